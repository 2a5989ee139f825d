//! The wrapper's own options: the leading `--subid-*` arguments (Docker's `runtimeArgs`), taken
//! off before the runtime's own command line, which is passed on unchanged.

use std::ffi::{OsStr, OsString};
use std::path::PathBuf;
use std::time::Duration;

use crate::error::{Result, RuncError};

/// How a container gets its user namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// It joins the lease's own namespace (made by subidd as the lease's base uid): per-lease
    /// accounting of inotify, signals and message queues, and subidd sees its processes.
    Join,
    /// The runtime makes a namespace of its own with the lease's mappings.
    Map,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Join => "join",
            Mode::Map => "map",
        }
    }
}

/// The wrapper's settings; every default works with the packaged subidd and Debian's runc.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// `--subid-socket`: subidd's socket.
    pub socket: PathBuf,
    /// `--subid-runtime`: the real runtime, a path or a name looked up in `PATH`.
    pub runtime: OsString,
    /// `--subid-mode`: `join` (default) or `map`.
    pub mode: Mode,
    /// `--subid-lease-prefix`: the lease of container ID is named PREFIX + ID.
    pub lease_prefix: String,
    /// `--subid-owner`: the `owner` label of the leases (which the sweep looks for).
    pub owner: String,
    /// `--subid-state-dir`: mounts and records of the containers (a tmpfs such as /run, so a
    /// reboot empties it as it empties the mounts).
    pub state_dir: PathBuf,
    /// `--subid-timeout`: longest wait for one answer of subidd, in seconds.
    pub timeout: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            socket: PathBuf::from(subid_client::DEFAULT_SOCKET),
            runtime: OsString::from("runc"),
            mode: Mode::Join,
            lease_prefix: "docker-".into(),
            owner: "docker".into(),
            state_dir: PathBuf::from("/run/subid-runc"),
            timeout: Duration::from_secs(20),
        }
    }
}

/// What `--help` of the wrapper's own options says (`subid-runc --subid-help`).
pub const HELP: &str = "\
subid-runc [--subid-OPTION=VALUE ...] RUNTIME-ARGS...
An OCI runtime with runc's command line that gives each container its own subidd lease.
Own options (before the runtime's arguments; Docker's runtimeArgs):
  --subid-socket=PATH        subidd's socket (default /run/subidd/subidd.sock)
  --subid-runtime=PATH|NAME  the real runtime (default runc; crun works too)
  --subid-mode=join|map      join the lease's namespace (default) or map its range
  --subid-lease-prefix=TEXT  lease name = TEXT + container id (default docker-)
  --subid-owner=TEXT         the leases' owner label (default docker)
  --subid-state-dir=PATH     mounts and records (default /run/subid-runc)
  --subid-timeout=SECONDS    longest wait for subidd (default 20)
Everything else is the runtime's own command line; create and delete are wrapped, every
other command is the real runtime's, unchanged.";

/// Splits the leading `--subid-NAME=VALUE` / `--subid-NAME VALUE` arguments off `args`
/// (program name already removed). `Ok(None)` for `--subid-help`.
pub fn split(args: Vec<OsString>) -> Result<Option<(Options, Vec<OsString>)>> {
    let mut options = Options::default();
    let mut rest = args.into_iter().peekable();
    while let Some(arg) = rest.peek() {
        let Some(text) = arg.to_str().and_then(|a| a.strip_prefix("--subid-")) else {
            break;
        };
        let text = text.to_string();
        rest.next();
        if text == "help" {
            return Ok(None);
        }
        let (name, value) = match text.split_once('=') {
            Some((name, value)) => (name.to_string(), OsString::from(value)),
            None => {
                let value = rest
                    .next()
                    .ok_or_else(|| RuncError::Usage(format!("--subid-{text} needs a value")))?;
                (text, value)
            }
        };
        apply(&mut options, &name, &value)?;
    }
    Ok(Some((options, rest.collect())))
}

fn apply(options: &mut Options, name: &str, value: &OsStr) -> Result<()> {
    let text = || {
        value
            .to_str()
            .map(str::to_string)
            .ok_or_else(|| RuncError::Usage(format!("--subid-{name}: not UTF-8")))
    };
    let nonempty = |v: String| {
        if v.is_empty() {
            Err(RuncError::Usage(format!("--subid-{name} is empty")))
        } else {
            Ok(v)
        }
    };
    match name {
        "socket" => options.socket = PathBuf::from(nonempty(text()?)?),
        "runtime" => options.runtime = OsString::from(nonempty(text()?)?),
        "mode" => {
            options.mode = match text()?.as_str() {
                "join" => Mode::Join,
                "map" => Mode::Map,
                other => {
                    return Err(RuncError::Usage(format!(
                        "--subid-mode={other}: expected join or map"
                    )));
                }
            }
        }
        "lease-prefix" => {
            let prefix = text()?;
            if !prefix
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
                || prefix.len() > 64
                || prefix.starts_with(['_', '.', '-'])
            {
                return Err(RuncError::Usage(format!(
                    "--subid-lease-prefix={prefix:?}: at most 64 of [A-Za-z0-9_.-], not starting \
                     with _ . or -"
                )));
            }
            options.lease_prefix = prefix;
        }
        "owner" => options.owner = nonempty(text()?)?,
        "state-dir" => {
            let dir = PathBuf::from(nonempty(text()?)?);
            if !dir.is_absolute() {
                return Err(RuncError::Usage(format!(
                    "--subid-state-dir={}: must be absolute",
                    dir.display()
                )));
            }
            options.state_dir = dir;
        }
        "timeout" => {
            let seconds: u64 = text()?
                .parse()
                .ok()
                .filter(|s| (1..=600).contains(s))
                .ok_or_else(|| {
                    RuncError::Usage("--subid-timeout: expected 1..=600 seconds".into())
                })?;
            options.timeout = Duration::from_secs(seconds);
        }
        other => {
            return Err(RuncError::Usage(format!(
                "unknown option --subid-{other}; see --subid-help"
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<OsString> {
        list.iter().map(OsString::from).collect()
    }

    #[test]
    fn leading_options_are_taken_off_and_the_rest_kept_as_is() {
        let (options, rest) = split(args(&[
            "--subid-socket=/tmp/s.sock",
            "--subid-mode",
            "map",
            "--subid-runtime=crun",
            "--root",
            "/run/x",
            "create",
            "--subid-socket=not-ours",
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(options.socket, PathBuf::from("/tmp/s.sock"));
        assert_eq!(options.mode, Mode::Map);
        assert_eq!(options.runtime, OsString::from("crun"));
        assert_eq!(
            rest,
            args(&["--root", "/run/x", "create", "--subid-socket=not-ours"])
        );
    }

    #[test]
    fn defaults_suit_the_packaged_daemon() {
        let (options, rest) = split(args(&["state", "x"])).unwrap().unwrap();
        assert_eq!(options, Options::default());
        assert_eq!(options.socket, PathBuf::from("/run/subidd/subidd.sock"));
        assert_eq!(rest, args(&["state", "x"]));
    }

    #[test]
    fn bad_options_are_usage_errors() {
        for bad in [
            &["--subid-mode=both"][..],
            &["--subid-frobnicate=1"],
            &["--subid-socket"],
            &["--subid-lease-prefix=a/b"],
            &["--subid-state-dir=relative"],
            &["--subid-timeout=0"],
            &["--subid-socket="],
        ] {
            assert!(
                matches!(split(args(bad)), Err(RuncError::Usage(_))),
                "{bad:?}"
            );
        }
        assert!(split(args(&["--subid-help"])).unwrap().is_none());
    }
}
