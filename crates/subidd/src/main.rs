//! The `subidd` binary: parse flags, set up logging, run the daemon.

#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use subidd::config::{Config, Flags, LogFormat};
use subidd::systemd::Handoff;

/// subidd: gives every container its own range of host user and group ids.
///
/// A root daemon serving a REST API on a unix socket (default /run/subidd/subidd.sock): it
/// hands out durable, non-overlapping leases of host uids/gids and starts processes inside
/// each lease's user namespace. Configuration: /etc/subidd/subidd.toml (every key documented
/// there), SUBIDD_* environment variables, then these flags. Clients: subidctl(1) or curl.
///
/// Under systemd (subidd.service, Type=notify): READY=1 is sent to NOTIFY_SOCKET once the
/// socket answers, STOPPING=1 on SIGTERM, WATCHDOG=1 every WATCHDOG_USEC/2 while the lease
/// writer and the database answer. With subidd.socket the listening socket is passed as fd 3
/// (LISTEN_FDS=1, LISTEN_PID) and left in place at exit. These variables are removed from the
/// environment at start. SIGTERM or SIGINT stop the daemon; the leases' processes keep running
/// and are adopted again at the next start.
#[derive(Debug, Parser)]
#[command(version, about, long_about)]
struct Args {
    /// Config file (default /etc/subidd/subidd.toml when it exists; env SUBIDD_CONFIG)
    #[arg(long)]
    config: Option<PathBuf>,
    /// Unix socket to serve (default <runtime-dir>/subidd.sock)
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Directory of the database (default /var/lib/subidd)
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Directory of the socket and namespace pins (default /run/subidd)
    #[arg(long)]
    runtime_dir: Option<PathBuf>,
    /// Also serve loopback TCP on this address, e.g. 127.0.0.1:7070 (needs --token-file)
    #[arg(long)]
    listen_tcp: Option<String>,
    /// File holding the bearer token TCP clients must send
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// Log lines as text (default) or JSON (env SUBIDD_LOG_FORMAT, config log_format)
    #[arg(long, value_enum)]
    log_format: Option<LogFormat>,
    /// Keep leases in this PostgreSQL database, shared by a fleet of hosts (env
    /// SUBIDD_STORE_URL, config store.url; default: the SQLite file in the state dir)
    #[arg(long, value_name = "URL")]
    store_url: Option<String>,
    /// Write the man page subidd.8 into DIR and exit (for packaging)
    #[arg(long, hide = true, value_name = "DIR")]
    generate_man: Option<PathBuf>,
    /// Write the configured pool as the `subidd` entry of subuid_file and subgid_file
    /// (default /etc/subuid, /etc/subgid), then exit
    #[arg(long)]
    register: bool,
    /// Copy this host's leases (the SQLite file in the state dir) into the empty PostgreSQL
    /// store named by store.url, keeping every range and its history, so the host can join a
    /// fleet; then exit. Stop the daemon first. Refuses a store that is not empty or was set
    /// up for another pool.
    #[arg(long)]
    move_in: bool,
}

fn main() -> ExitCode {
    // `subidd --log-keeper --socket PATH --log-dir DIR --max-bytes N ...`: the daemon starts
    // its own binary this way as the log keeper (subid_sys::logkeep), with an empty
    // environment. It is not a daemon flag, so clap never sees it and --help does not show it.
    if std::env::args_os().nth(1).as_deref() == Some(subid_sys::logkeep::KEEPER_FLAG.as_ref()) {
        return subid_sys::logkeep::keeper_main(std::env::args_os().skip(1));
    }
    // While this is the only thread: few malloc arenas, so that memory freed by one worker
    // thread serves the others (see subid_sys::malloc).
    subid_sys::malloc::limit_arenas(2);
    // First, while this is the only thread and nothing is open: take what systemd passed
    // (NOTIFY_SOCKET, WATCHDOG_*, LISTEN_*) out of the environment, so nothing inherits it.
    let handoff = match Handoff::take() {
        Ok(handoff) => handoff,
        Err(error) => {
            eprintln!("subidd: {error:#}");
            return ExitCode::FAILURE;
        }
    };
    let args = Args::parse();
    if let Some(dir) = &args.generate_man {
        return match write_man_page(dir) {
            Ok(path) => {
                eprintln!("wrote {}", path.display());
                ExitCode::SUCCESS
            }
            Err(error) => {
                eprintln!("subidd: {error:#}");
                ExitCode::FAILURE
            }
        };
    }
    let flags = Flags {
        config: args.config,
        socket: args.socket,
        state_dir: args.state_dir,
        runtime_dir: args.runtime_dir,
        listen_tcp: args.listen_tcp,
        token_file: args.token_file,
        log_format: args.log_format,
        store_url: args.store_url,
    };
    let config = match Config::load(&flags, |k| std::env::var(k).ok()) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("subidd: {error}");
            return ExitCode::from(2);
        }
    };
    init_logging(config.log_format);
    if args.register {
        return register(&config);
    }
    if args.move_in {
        return move_in(&config);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("subidd: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(subidd::server::run(config, handoff)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("{error:#}");
            eprintln!("subidd: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Renders `subidd(8)` from the same clap definitions as `--help`.
fn write_man_page(dir: &std::path::Path) -> anyhow::Result<PathBuf> {
    use anyhow::Context;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join("subidd.8");
    let mut page = Vec::new();
    clap_mangen::Man::new(<Args as clap::CommandFactory>::command())
        .section("8")
        .render(&mut page)
        .context("rendering the man page")?;
    std::fs::write(&path, page).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// `--register`: 0 when the entry is written or already there, 1 when refused.
fn register(config: &Config) -> ExitCode {
    match subidd::pool::register(config) {
        Ok(done) => {
            let entry = format!(
                "{}:{}:{}",
                subidd::pool::OWNER,
                done.pool.base(),
                done.pool.range().len()
            );
            if done.written.is_empty() {
                println!(
                    "{entry} is already registered in {} and {}",
                    config.subuid_file.display(),
                    config.subgid_file.display()
                );
            } else {
                let files: Vec<String> = done
                    .written
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect();
                println!("registered {entry} in {}", files.join(" and "));
            }
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("subidd: cannot register the pool: {error}");
            ExitCode::FAILURE
        }
    }
}

/// `--move-in`: 0 when every lease was copied, 1 when refused or failed (nothing copied).
fn move_in(config: &Config) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("subidd: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(subidd::move_in::run(config)) {
        Ok(done) => {
            println!(
                "moved in: {} active and {} released leases, {} blocks, {} events; this host's \
                 file now belongs to the fleet store {}: start the daemon with the same store.url",
                done.active, done.released, done.blocks, done.events, done.store_id
            );
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("subidd: cannot move in: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Human lines by default, JSON with `log_format = "json"`; no timestamps under journald,
/// which stamps every line itself.
fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("SUBIDD_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let journald = std::env::var_os("JOURNAL_STREAM").is_some();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match (format, journald) {
        (LogFormat::Json, _) => builder.json().init(),
        (LogFormat::Text, true) => builder.without_time().init(),
        (LogFormat::Text, false) => builder.init(),
    }
}
