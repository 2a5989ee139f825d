//! The command line, as clap definitions: the one source of `--help`, the man pages and the
//! shell completions (`subidctl generate`).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Where the daemon listens unless `--socket` or `SUBIDD_SOCKET` says otherwise.
pub const DEFAULT_SOCKET: &str = "/run/subidd/subidd.sock";

/// Command-line client of subidd: lease host uid/gid ranges and run processes in them.
///
/// Exit status: 0 success, 1 an error from the daemon (printed as `subidctl: CODE: MESSAGE`) or
/// no connection to it, 2 a usage error. `run --wait` exits with the process's own status.
#[derive(Debug, Parser)]
#[command(name = "subidctl", version, propagate_version = true)]
pub struct Cli {
    /// The daemon's unix socket.
    #[arg(long, global = true, env = "SUBIDD_SOCKET", default_value = DEFAULT_SOCKET, value_name = "PATH")]
    pub socket: PathBuf,

    /// Print the daemon's JSON answer (pretty) instead of a table.
    #[arg(long, global = true)]
    pub json: bool,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create, inspect and release leases.
    #[command(subcommand)]
    Lease(LeaseCommand),
    /// Start a process in a lease's user namespace.
    Run(RunArgs),
    /// List the processes of a lease.
    Ps {
        /// The lease's name.
        lease: String,
    },
    /// Wait for a process to exit (or the timeout to pass) and show it.
    Wait {
        /// The process id (16 hex digits, as `run` and `ps` print it).
        id: String,
        /// How long to wait at most: seconds, or a duration like 90s, 10m, 1h (the daemon's
        /// default is 30 s, its maximum 1 h).
        #[arg(long, value_name = "DURATION", value_parser = duration_seconds)]
        timeout: Option<u32>,
    },
    /// Send a signal to a process.
    Kill {
        /// The process id.
        id: String,
        /// A signal name (TERM, SIGKILL, ...) or number.
        #[arg(long, short, default_value = "TERM")]
        signal: String,
    },
    /// Print what a process wrote to stdout or stderr.
    Logs {
        /// The process id.
        id: String,
        /// Which stream.
        #[arg(long, value_enum, default_value_t = Stream::Stdout)]
        stream: Stream,
    },
    /// Show the pool of ids and how much of it is leased.
    Pool {
        #[command(subcommand)]
        action: Option<PoolCommand>,
    },
    /// Print lease and process events as they happen (newline-delimited JSON with --json).
    Events(EventsArgs),
    /// Show this client's version and the daemon's.
    Version,
    /// Write man pages or shell completions (for packaging, or for your shell).
    #[command(subcommand)]
    Generate(GenerateCommand),
}

#[derive(Debug, Subcommand)]
pub enum PoolCommand {
    /// Register the pool in /etc/subuid and /etc/subgid: says to run `subidd --register`, which
    /// reads the daemon's own configuration on the daemon's host.
    Register,
}

#[derive(Debug, Args)]
pub struct EventsArgs {
    /// Start after this event id (0: the whole history); default: only events from now on.
    #[arg(long, value_name = "ID")]
    pub since: Option<u64>,
    /// Print the stored events and exit instead of following.
    #[arg(long)]
    pub no_follow: bool,
    /// Only the events of this lease.
    #[arg(long, value_name = "NAME")]
    pub lease: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum LeaseCommand {
    /// Create a lease, or confirm that an identical one exists (idempotent).
    Put(PutArgs),
    /// Show a lease (the active one, else the last released).
    Get {
        /// The lease's name.
        name: String,
    },
    /// List leases.
    #[command(visible_alias = "list")]
    Ls {
        /// Which leases.
        #[arg(long, value_enum, default_value_t = StateFilter::Active)]
        state: StateFilter,
        /// Only leases carrying this label (repeatable; all must match).
        #[arg(long = "label", value_name = "KEY=VALUE", value_parser = key_value)]
        labels: Vec<(String, String)>,
    },
    /// Release a lease; its range is quarantined before reuse.
    #[command(visible_alias = "delete")]
    Rm {
        /// The lease's name.
        name: String,
        /// Skip the quarantine: the range is free for any name at once (on a released lease,
        /// ends its quarantine).
        #[arg(long)]
        purge: bool,
        /// Stop its running processes instead of refusing while they run.
        #[arg(long)]
        force: bool,
    },
    /// Restart a lease's ttl from now.
    Renew {
        /// The lease's name.
        name: String,
    },
    /// Print a lease's id mapping in the form a tool wants.
    Idmap {
        /// The lease's name.
        name: String,
        /// The rendering; without it, a summary of all of them.
        #[arg(long, value_enum)]
        format: Option<IdmapFormat>,
    },
    /// Find the active lease that holds a host uid or gid.
    Lookup(LookupArgs),
}

#[derive(Debug, Args)]
pub struct PutArgs {
    /// The lease's name ([A-Za-z0-9_.-]).
    pub name: String,
    /// Number of ids, a multiple of the pool's block size (default: one block).
    #[arg(long)]
    pub size: Option<u32>,
    /// A label (repeatable).
    #[arg(long = "label", value_name = "KEY=VALUE", value_parser = key_value)]
    pub labels: Vec<(String, String)>,
    /// Release the lease automatically after this long unless renewed: seconds, or a duration
    /// like 90s, 10m, 1h, 2d, 1h30m.
    #[arg(long, value_name = "DURATION", value_parser = duration_seconds)]
    pub ttl: Option<u32>,
    /// A default rlimit of its processes (repeatable); `unlimited` for no limit.
    #[arg(long = "rlimit", value_name = "NAME=SOFT:HARD", value_parser = rlimit)]
    pub rlimits: Vec<(String, [u64; 2])>,
    /// An extra namespace its processes share (repeatable).
    #[arg(long = "namespace", value_enum, value_name = "NS")]
    pub namespaces: Vec<Namespace>,
    /// Cap on the processes in its cgroup (pids.max).
    #[arg(long)]
    pub pids_max: Option<u64>,
    /// Cap on the processes the daemon starts in it at once.
    #[arg(long)]
    pub max_processes: Option<u64>,
}

#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
pub struct LookupArgs {
    /// A host uid.
    #[arg(long)]
    pub uid: Option<u32>,
    /// A host gid.
    #[arg(long)]
    pub gid: Option<u32>,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// The lease to run in.
    pub lease: String,
    /// The uid inside the lease's user namespace, a number (default 0, its root).
    #[arg(long, short, value_name = "UID", value_parser = inner_uid)]
    pub user: Option<u32>,
    /// The gid inside the lease's user namespace, a number (default 0).
    #[arg(long, short, value_name = "GID", value_parser = inner_gid)]
    pub group: Option<u32>,
    /// An environment variable (repeatable).
    #[arg(long = "env", short = 'e', value_name = "KEY=VALUE", value_parser = key_value)]
    pub env: Vec<(String, String)>,
    /// The working directory.
    #[arg(long, value_name = "DIR")]
    pub cwd: Option<String>,
    /// Wait for it to exit, print its output and exit with its status (128+N if killed by
    /// signal N).
    #[arg(long)]
    pub wait: bool,
    /// The program and its arguments, after `--` (so that their options are not taken for
    /// subidctl's): `subidctl run web-1 --wait -- ls -l /`.
    #[arg(last = true, required = true, value_name = "ARGV")]
    pub argv: Vec<String>,
}

#[derive(Debug, Subcommand)]
pub enum GenerateCommand {
    /// Write one man page per command into DIR.
    Man {
        /// The directory (created if missing).
        dir: PathBuf,
    },
    /// Print a completion script for a shell to stdout.
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StateFilter {
    Active,
    Released,
    All,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Namespace {
    Mnt,
    Uts,
    Ipc,
    Net,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum IdmapFormat {
    Json,
    #[value(name = "uid_map")]
    UidMap,
    #[value(name = "gid_map")]
    GidMap,
    Oci,
    Podman,
    Subuid,
    Subgid,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Stream {
    Stdout,
    Stderr,
}

/// The name clap gives a value (what the daemon expects too).
pub fn value_name<T: ValueEnum>(value: &T) -> String {
    value
        .to_possible_value()
        .map(|v| v.get_name().to_string())
        .unwrap_or_default()
}

/// `KEY=VALUE`, split at the first `=`.
fn key_value(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("{s:?}: expected KEY=VALUE")),
    }
}

/// A duration in whole seconds: a plain number of seconds, or a duration as the daemon's docs
/// write them (`90s`, `10m`, `1h`, `2d`, `1h30m`; humantime's units).
pub fn duration_seconds(s: &str) -> Result<u32, String> {
    let text = s.trim();
    let seconds = match text.parse::<u64>() {
        Ok(n) => n,
        Err(_) => {
            let duration = humantime::parse_duration(text).map_err(|e| {
                format!(
                    "{s:?} is not a duration ({e}); give seconds (3600) or e.g. 90s, 10m, 1h, 2d"
                )
            })?;
            if duration.subsec_nanos() != 0 {
                return Err(format!("{s:?}: durations are whole seconds"));
            }
            duration.as_secs()
        }
    };
    if seconds == 0 {
        return Err(format!("{s:?}: must be at least one second"));
    }
    u32::try_from(seconds).map_err(|_| format!("{s:?}: at most {} seconds", u32::MAX))
}

/// A uid inside the lease's namespace: a number, since a name would have to be looked up in
/// the image's /etc/passwd, which the daemon never reads (the host's could name another uid).
fn inner_uid(s: &str) -> Result<u32, String> {
    inner_id(s, "uid")
}

/// As [`inner_uid`], for gids.
fn inner_gid(s: &str) -> Result<u32, String> {
    inner_id(s, "gid")
}

fn inner_id(s: &str, kind: &str) -> Result<u32, String> {
    let (file, find) = if kind == "uid" {
        ("passwd", format!("id -u {s}"))
    } else {
        ("group", format!("getent group {s}"))
    };
    s.trim().parse::<u32>().map_err(|_| {
        format!(
            "a numeric {kind} inside the lease's user namespace is needed, not {s:?} (0 is the \
             namespace's root; e.g. 999 for an image's mysql {kind}): subidd does not look names \
             up, since a name means what the container image's /etc/{file} says, which the daemon \
             never reads (the host's could give another number). Find the number with `{find}` \
             inside the image"
        )
    })
}

/// `NAME=SOFT:HARD`, each limit a number or `unlimited`.
fn rlimit(s: &str) -> Result<(String, [u64; 2]), String> {
    let bad = || format!("{s:?}: expected NAME=SOFT:HARD, e.g. nofile=1024:4096");
    let (name, limits) = s.split_once('=').ok_or_else(bad)?;
    let (soft, hard) = limits.split_once(':').ok_or_else(bad)?;
    let limit = |v: &str| match v {
        "unlimited" | "infinity" => Ok(u64::MAX),
        v => v.parse::<u64>().map_err(|_| bad()),
    };
    if name.is_empty() {
        return Err(bad());
    }
    Ok((name.to_string(), [limit(soft)?, limit(hard)?]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn definitions_are_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn parses_pairs_and_rlimits() {
        assert_eq!(key_value("a=b=c"), Ok(("a".into(), "b=c".into())));
        assert!(key_value("=x").is_err());
        assert!(key_value("x").is_err());
        assert_eq!(rlimit("nofile=1:2"), Ok(("nofile".into(), [1, 2])));
        assert_eq!(
            rlimit("core=0:unlimited"),
            Ok(("core".into(), [0, u64::MAX]))
        );
        assert!(rlimit("nofile=1").is_err());
        assert!(rlimit("nofile").is_err());
        assert!(rlimit("nofile=a:1").is_err());
    }

    #[test]
    fn run_takes_argv_after_dashes() {
        let cli = Cli::try_parse_from([
            "subidctl", "run", "box", "--wait", "-e", "A=1", "--", "/bin/sh", "-c", "exit 3",
        ])
        .expect("parses");
        let Command::Run(run) = cli.command else {
            panic!("not run");
        };
        assert_eq!(run.argv, ["/bin/sh", "-c", "exit 3"]);
        assert!(run.wait);
        assert_eq!(run.env, [("A".to_string(), "1".to_string())]);
    }

    #[test]
    fn durations_as_the_daemon_writes_them() {
        for (text, seconds) in [
            ("3600", 3600),
            ("90s", 90),
            ("10m", 600),
            ("1h", 3600),
            ("2d", 172_800),
            ("1h30m", 5400),
            (" 45 ", 45),
        ] {
            assert_eq!(duration_seconds(text), Ok(seconds), "{text}");
        }
        for bad in ["0", "0s", "1500ms", "soon", "-5", "", "99999999999"] {
            assert!(duration_seconds(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn ids_must_be_numbers_and_say_why() {
        assert_eq!(inner_uid("999"), Ok(999));
        let err = inner_uid("root").expect_err("a name");
        assert!(
            err.contains("numeric uid") && err.contains("/etc/passwd") && !err.contains("digit"),
            "{err}"
        );
        assert!(
            inner_gid("mysql")
                .expect_err("a name")
                .contains("/etc/group")
        );
    }

    #[test]
    fn idmap_formats_use_the_daemons_names() {
        assert_eq!(value_name(&IdmapFormat::UidMap), "uid_map");
        assert_eq!(value_name(&IdmapFormat::Subgid), "subgid");
    }
}
