//! The runtime's command line (runc's global flags and subcommands, as `liboci-cli` parses
//! them), read only to decide what the wrapper does; the arguments are passed on as given.

use std::ffi::OsString;
use std::path::PathBuf;

use clap::{Parser, Subcommand};
use liboci_cli::{CommonCmd, GlobalOpts, StandardCmd};

/// runc's command line.
#[derive(Parser, Debug)]
#[command(
    no_binary_name = true,
    disable_help_flag = true,
    disable_version_flag = true,
    disable_help_subcommand = true
)]
pub struct RuntimeCli {
    #[command(flatten)]
    pub global: GlobalOpts,
    /// runc's `--criu PATH` (not in liboci-cli).
    #[arg(long)]
    pub criu: Option<PathBuf>,
    /// runc's `--rootless true|false|auto` (not in liboci-cli).
    #[arg(long)]
    pub rootless: Option<String>,
    #[command(subcommand)]
    pub command: Command,
}

/// Every subcommand liboci-cli knows.
#[derive(Subcommand, Debug)]
pub enum Command {
    #[command(flatten)]
    Standard(Box<StandardCmd>),
    #[command(flatten)]
    Common(Box<CommonCmd>),
}

/// What the wrapper does with a command line.
#[derive(Debug)]
pub enum Action {
    /// Lease, namespace and root filesystem, then the runtime's `create`.
    Create(Box<RuntimeCli>),
    /// The runtime's `delete`, then unmount and release.
    Delete(Box<RuntimeCli>),
    /// Refused: `run` would start a container without the wrapper seeing it start.
    Run,
    /// A `create` or `run` this parser cannot read: refused, since passing it on would run a
    /// container on host ids.
    Unreadable(String),
    /// Anything else: the real runtime, unchanged.
    PassThrough,
}

/// Decides what to do with the runtime's arguments.
pub fn action(args: &[OsString]) -> Action {
    match RuntimeCli::try_parse_from(args) {
        Ok(cli) => match &cli.command {
            Command::Standard(cmd) if matches!(**cmd, StandardCmd::Create(_)) => {
                Action::Create(Box::new(cli))
            }
            Command::Standard(cmd) if matches!(**cmd, StandardCmd::Delete(_)) => {
                Action::Delete(Box::new(cli))
            }
            Command::Common(cmd) if matches!(**cmd, CommonCmd::Run(_)) => Action::Run,
            _ => Action::PassThrough,
        },
        Err(error) => {
            let starts_one = args.iter().any(|a| a == "create" || a == "run");
            if starts_one {
                Action::Unreadable(error.to_string().trim().to_string())
            } else {
                Action::PassThrough
            }
        }
    }
}

impl RuntimeCli {
    /// The global flags to repeat on the wrapper's own calls of the runtime (`state`, and
    /// `delete --force` when a create is undone), so they see the same state directory.
    pub fn global_args(&self) -> Vec<OsString> {
        let mut args = Vec::new();
        if let Some(root) = &self.global.root {
            args.push("--root".into());
            args.push(root.clone().into_os_string());
        }
        if let Some(log) = &self.global.log {
            args.push("--log".into());
            args.push(log.clone().into_os_string());
        }
        if let Some(format) = &self.global.log_format {
            args.push("--log-format".into());
            args.push(format.into());
        }
        if self.global.systemd_cgroup {
            args.push("--systemd-cgroup".into());
        }
        if let Some(rootless) = &self.rootless {
            args.push("--rootless".into());
            args.push(rootless.into());
        }
        args
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<OsString> {
        list.iter().map(OsString::from).collect()
    }

    #[test]
    fn dockers_create_is_wrapped() {
        let a = args(&[
            "--root",
            "/run/docker/runtime-runc/moby",
            "--log",
            "/run/x/log.json",
            "--log-format",
            "json",
            "create",
            "--bundle",
            "/run/x",
            "--pid-file",
            "/run/x/init.pid",
            "abc",
        ]);
        let Action::Create(cli) = action(&a) else {
            panic!("not a create");
        };
        let Command::Standard(cmd) = &cli.command else {
            panic!()
        };
        let StandardCmd::Create(create) = &**cmd else {
            panic!()
        };
        assert_eq!(create.container_id, "abc");
        assert_eq!(create.bundle, PathBuf::from("/run/x"));
        assert_eq!(
            cli.global_args(),
            args(&[
                "--root",
                "/run/docker/runtime-runc/moby",
                "--log",
                "/run/x/log.json",
                "--log-format",
                "json"
            ])
        );
    }

    #[test]
    fn delete_is_wrapped_and_the_rest_passes_through() {
        assert!(matches!(
            action(&args(&["--root", "/r", "delete", "--force", "abc"])),
            Action::Delete(_)
        ));
        for passed in [
            &["--root", "/r", "start", "abc"][..],
            &["state", "abc"],
            &["kill", "abc", "9"],
            &["exec", "--process", "/p.json", "--detach", "abc"],
            &["--version"],
            &["--help"],
            &["features"],
            &["some-future-command", "--flag"],
        ] {
            assert!(
                matches!(action(&args(passed)), Action::PassThrough),
                "{passed:?}"
            );
        }
    }

    #[test]
    fn run_and_unreadable_creates_are_refused() {
        assert!(matches!(
            action(&args(&["run", "--bundle", "/b", "abc"])),
            Action::Run
        ));
        assert!(matches!(
            action(&args(&["create", "--no-such-flag", "abc"])),
            Action::Unreadable(_)
        ));
    }
}
