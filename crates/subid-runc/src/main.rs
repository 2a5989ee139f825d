//! `subid-runc`: an OCI runtime with runc's command line that gives every container its own
//! subidd lease. `create` and `delete` are wrapped (lifecycle.rs); every other command is the
//! real runtime's, which replaces this process (exit status, stdio and fds are the caller's).

#![forbid(unsafe_code)]

mod cli;
mod error;
mod lifecycle;
mod log;
mod mountinfo;
mod options;
mod rootfs;
mod runtime;
mod spec;
mod state;

use std::io::Write;
use std::process::ExitCode;

use cli::{Action, Command};
use error::RuncError;
use liboci_cli::StandardCmd;
use log::Reporter;
use runtime::Runtime;

fn main() -> ExitCode {
    let args: Vec<_> = std::env::args_os().skip(1).collect();
    let (options, rest) = match options::split(args) {
        Ok(Some(split)) => split,
        Ok(None) => {
            // A closed stdout (`| head`) is no failure of the wrapper's.
            let _ = writeln!(std::io::stdout(), "{}", options::HELP);
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            Reporter::default().error(&e.to_string());
            return ExitCode::from(2);
        }
    };
    let action = cli::action(&rest);
    let reporter = match &action {
        Action::Create(cli) | Action::Delete(cli) => {
            Reporter::new(cli.global.log.clone(), cli.global.log_format.as_deref())
        }
        _ => Reporter::default(),
    };
    let runtime = match Runtime::resolve(&options.runtime) {
        Ok(runtime) => runtime,
        Err(e) => {
            reporter.error(&e.to_string());
            return ExitCode::FAILURE;
        }
    };
    let cli = match action {
        Action::PassThrough => {
            let error = runtime.exec(&rest);
            reporter.error(&error.to_string());
            return ExitCode::FAILURE;
        }
        Action::Run => {
            reporter.error(
                "`run` is not supported: use `create` then `start` (as Docker and containerd do), \
                 so the container gets its lease before it starts",
            );
            return ExitCode::FAILURE;
        }
        Action::Unreadable(message) => {
            reporter.error(&format!(
                "cannot read this command line, and a container must not start on host ids: \
                 {message}"
            ));
            return ExitCode::FAILURE;
        }
        Action::Create(cli) | Action::Delete(cli) => cli,
    };
    let ctx = lifecycle::Context {
        options,
        cli: *cli,
        args: rest,
        runtime,
        reporter,
    };
    let result = match &ctx.cli.command {
        Command::Standard(cmd) => match &**cmd {
            StandardCmd::Create(create) => lifecycle::create(&ctx, create),
            StandardCmd::Delete(delete) => lifecycle::delete(&ctx, delete),
            _ => Err(RuncError::Usage(
                "only create and delete are wrapped".into(),
            )),
        },
        Command::Common(_) => Err(RuncError::Usage(
            "only create and delete are wrapped".into(),
        )),
    };
    match result {
        Ok(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        Err(e) => {
            ctx.reporter.error(&e.to_string());
            ExitCode::FAILURE
        }
    }
}
