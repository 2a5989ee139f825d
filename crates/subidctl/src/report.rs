//! How failures reach the user: `subidctl: CODE: MESSAGE` on stderr, or with `--json` one JSON
//! object `{"code": ..., "message": ...}` on stderr, so scripts read errors the way they read
//! answers. Codes are the daemon's own (`docs/API.md`), or `cannot_connect`, `usage`,
//! `client_error` for what happens on this side.

use std::io::Write;

use crate::client::{ConnectError, DaemonError};

/// Prints one failure; never panics on a closed stderr.
pub fn failure(json: bool, code: &str, message: &str) {
    let text = if json {
        format!(
            "{}\n",
            serde_json::json!({ "code": code, "message": message })
        )
    } else {
        format!("subidctl: {code}: {message}\n")
    };
    let _ = std::io::stderr().write_all(text.as_bytes());
}

/// Prints an error of a command: the daemon's code and message, or one of this side's codes.
pub fn error(json: bool, error: &anyhow::Error) {
    if let Some(daemon) = error.downcast_ref::<DaemonError>() {
        return failure(json, &daemon.code, &daemon.message);
    }
    let code = if error.downcast_ref::<ConnectError>().is_some() {
        "cannot_connect"
    } else {
        "client_error"
    };
    if json {
        failure(json, code, &format!("{error:#}"))
    } else {
        // Plain text keeps its established form: the message alone for this side's errors.
        let _ = std::io::stderr().write_all(format!("subidctl: {error:#}\n").as_bytes());
    }
}

/// Whether `--json` is among the arguments (before any `--`), for errors met before or while
/// clap parses them.
pub fn wants_json(args: impl IntoIterator<Item = std::ffi::OsString>) -> bool {
    args.into_iter()
        .skip(1)
        .take_while(|a| a != "--")
        .any(|a| a == "--json")
}

/// The subcommand named on the command line (the first word that is not a global option).
fn subcommand(args: &[std::ffi::OsString]) -> Option<&str> {
    let mut words = args.iter().skip(1);
    while let Some(word) = words.next() {
        let word = word.to_str()?;
        match word {
            "--json" => {}
            "--socket" => {
                words.next();
            }
            w if w.starts_with("--socket=") => {}
            w => return Some(w),
        }
    }
    None
}

/// A usage error from clap, with a hint where the usual mistake is known; returns the exit
/// code (0 for `--help` and `--version`, 2 otherwise).
pub fn usage(error: clap::Error, args: &[std::ffi::OsString], json: bool) -> u8 {
    use clap::error::ErrorKind;
    let code = u8::try_from(error.exit_code()).unwrap_or(2);
    if matches!(
        error.kind(),
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion
    ) {
        let _ = error.print();
        return code;
    }
    let hint = (subcommand(args) == Some("run") && !args.iter().any(|a| a == "--")).then_some(
        "the program and its arguments go after `--`, so that their options are not taken for \
         subidctl's: subidctl run LEASE [OPTIONS] -- PROGRAM [ARGS...], e.g. \
         subidctl run web-1 --wait -- id -u",
    );
    if json {
        let text = error.to_string();
        let mut message = text.trim().trim_start_matches("error: ").to_string();
        if let Some(hint) = hint {
            message.push_str("\ntip: ");
            message.push_str(hint);
        }
        failure(true, "usage", &message);
    } else {
        let _ = error.print();
        if let Some(hint) = hint {
            let _ = std::io::stderr().write_all(format!("\ntip: {hint}\n").as_bytes());
        }
    }
    code
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(words: &[&str]) -> Vec<std::ffi::OsString> {
        words.iter().map(Into::into).collect()
    }

    #[test]
    fn finds_json_and_the_subcommand() {
        assert!(wants_json(args(&["subidctl", "--json", "lease", "ls"])));
        assert!(wants_json(args(&["subidctl", "lease", "ls", "--json"])));
        assert!(!wants_json(args(&["subidctl", "run", "x", "--", "--json"])));
        assert_eq!(
            subcommand(&args(&["subidctl", "--socket", "/s", "--json", "run", "x"])),
            Some("run")
        );
        assert_eq!(
            subcommand(&args(&["subidctl", "--socket=/s", "ps", "x"])),
            Some("ps")
        );
        assert_eq!(subcommand(&args(&["subidctl"])), None);
    }
}
