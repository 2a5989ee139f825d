//! The `subidd` binary: parse flags, set up logging, run the daemon.

#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use subidd::config::{Config, Flags, LogFormat};

/// subidd: gives every container its own range of host user and group ids.
#[derive(Debug, Parser)]
#[command(version, about)]
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
    /// Write the configured pool as the `subidd` entry of subuid_file and subgid_file
    /// (default /etc/subuid, /etc/subgid), then exit
    #[arg(long)]
    register: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let flags = Flags {
        config: args.config,
        socket: args.socket,
        state_dir: args.state_dir,
        runtime_dir: args.runtime_dir,
        listen_tcp: args.listen_tcp,
        token_file: args.token_file,
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
    match runtime.block_on(subidd::server::run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("{error:#}");
            eprintln!("subidd: {error:#}");
            ExitCode::FAILURE
        }
    }
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
