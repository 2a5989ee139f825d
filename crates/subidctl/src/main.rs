//! `subidctl`: the command-line client of subidd. Parses the command line, runs it, and maps
//! failures to exit codes (1 the daemon or the connection, 2 usage, which clap handles).

#![forbid(unsafe_code)]

mod cli;
mod client;
mod commands;
mod table;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("subidctl: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(commands::execute(cli)) {
        Ok(code) => code,
        Err(e) => {
            // A DaemonError prints as `code: message`; a ConnectError names the socket.
            eprintln!("subidctl: {e:#}");
            ExitCode::FAILURE
        }
    }
}
