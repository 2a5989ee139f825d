//! `subidctl`: the command-line client of subidd. Parses the command line, runs it, and maps
//! failures to exit codes (1 the daemon or the connection, 2 usage).

#![forbid(unsafe_code)]

mod cli;
mod client;
mod commands;
mod report;
mod table;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let json = report::wants_json(args.iter().cloned());
    let cli = match cli::Cli::try_parse_from(&args) {
        Ok(cli) => cli,
        Err(error) => return ExitCode::from(report::usage(error, &args, json)),
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            report::failure(
                json,
                "client_error",
                &format!("cannot start the async runtime: {e}"),
            );
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(commands::execute(cli)) {
        Ok(code) => code,
        Err(e) => {
            // A DaemonError prints as `code: message`; a ConnectError names the socket.
            report::error(json, &e);
            ExitCode::FAILURE
        }
    }
}
