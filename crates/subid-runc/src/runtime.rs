//! The real runtime (runc, crun): found on `PATH`, run in place of the wrapper (commands passed
//! through: its exit status, stdio and inherited fds are the caller's), or as a child whose
//! status the wrapper then acts on.

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::error::{Result, RuncError};

/// Where runtimes live when `PATH` (a service's environment) does not say.
const FALLBACK_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// A runtime binary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Runtime {
    pub path: PathBuf,
}

impl Runtime {
    /// `name` as a path when it has a `/`, else the first executable of that name on `PATH`
    /// (then on the usual system directories).
    pub fn resolve(name: &OsStr) -> Result<Runtime> {
        if name.as_bytes().contains(&b'/') {
            return Ok(Runtime {
                path: PathBuf::from(name),
            });
        }
        let path = std::env::var_os("PATH").unwrap_or_default();
        let dirs = std::env::split_paths(&path).chain(std::env::split_paths(FALLBACK_PATH));
        for dir in dirs {
            let candidate = dir.join(name);
            if std::fs::metadata(&candidate)
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            {
                return Ok(Runtime { path: candidate });
            }
        }
        Err(RuncError::Runtime {
            runtime: PathBuf::from(name),
            reason: "not found on PATH; install it or name it with --subid-runtime=PATH".into(),
        })
    }

    /// The runtime's state directory when no `--root` is given (runc: /run/runc, crun:
    /// /run/crun; the same pattern is assumed for others).
    pub fn default_root(&self) -> PathBuf {
        let name = self
            .path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "runc".into());
        PathBuf::from("/run").join(name)
    }

    /// Replaces this process with the runtime (returns only on failure).
    pub fn exec(&self, args: &[OsString]) -> RuncError {
        let error = Command::new(&self.path).args(args).exec();
        RuncError::Runtime {
            runtime: self.path.clone(),
            reason: format!("cannot execute: {error}"),
        }
    }

    /// Runs the runtime with this process's stdio and inherited fds; its exit code (128 +
    /// the signal when a signal ended it, as shells report it).
    pub fn status(&self, args: &[OsString]) -> Result<i32> {
        let status = Command::new(&self.path)
            .args(args)
            .status()
            .map_err(|e| self.cannot_run(&e))?;
        Ok(exit_code(status))
    }

    /// Runs the runtime with stdin and stderr closed off and stdout captured; its exit code and
    /// output.
    pub fn output(&self, args: &[OsString]) -> Result<(i32, Vec<u8>)> {
        let output = Command::new(&self.path)
            .args(args)
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .output()
            .map_err(|e| self.cannot_run(&e))?;
        Ok((exit_code(output.status), output.stdout))
    }

    /// The pid of container `id` from `<runtime> state` (its `pid`).
    pub fn pid(&self, global: &[OsString], id: &str) -> Result<i32> {
        let mut args = global.to_vec();
        args.push("state".into());
        args.push(id.into());
        let (code, out) = self.output(&args)?;
        let unreadable = |reason: String| RuncError::Runtime {
            runtime: self.path.clone(),
            reason,
        };
        if code != 0 {
            return Err(unreadable(format!(
                "state {id} failed with exit code {code}"
            )));
        }
        let state: serde_json::Value = serde_json::from_slice(&out)
            .map_err(|e| unreadable(format!("state {id} is not JSON: {e}")))?;
        state["pid"]
            .as_i64()
            .and_then(|p| i32::try_from(p).ok())
            .filter(|p| *p > 0)
            .ok_or_else(|| unreadable(format!("state {id} names no pid")))
    }

    fn cannot_run(&self, error: &std::io::Error) -> RuncError {
        RuncError::Runtime {
            runtime: self.path.clone(),
            reason: format!("cannot run: {error}"),
        }
    }
}

/// A pid from a runtime's `--pid-file`.
pub fn read_pid_file(path: &Path) -> Result<i32> {
    let text = std::fs::read_to_string(path).map_err(|e| RuncError::io("read", path, e))?;
    text.trim()
        .parse::<i32>()
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| RuncError::Runtime {
            runtime: path.to_path_buf(),
            reason: format!("pid file holds {text:?}"),
        })
}

fn exit_code(status: std::process::ExitStatus) -> i32 {
    status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_runtimes_and_their_state_directories() {
        let sh = Runtime::resolve(OsStr::new("sh")).unwrap();
        assert!(sh.path.is_absolute());
        let runc = Runtime {
            path: "/usr/sbin/runc".into(),
        };
        assert_eq!(runc.default_root(), PathBuf::from("/run/runc"));
        assert!(Runtime::resolve(OsStr::new("no-such-runtime-xyz")).is_err());
        assert_eq!(
            Runtime::resolve(OsStr::new("./rel/crun")).unwrap().path,
            PathBuf::from("./rel/crun")
        );
    }

    #[test]
    fn exit_codes_and_signals_come_back() {
        let sh = Runtime::resolve(OsStr::new("sh")).unwrap();
        let args = |s: &str| vec![OsString::from("-c"), OsString::from(s)];
        assert_eq!(sh.status(&args("exit 3")).unwrap(), 3);
        assert_eq!(sh.status(&args("kill -9 $$")).unwrap(), 137);
        let (code, out) = sh.output(&args("echo '{\"pid\": 42}'")).unwrap();
        assert_eq!((code, out), (0, b"{\"pid\": 42}\n".to_vec()));
    }

    #[test]
    fn pid_files_are_read_strictly() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pid");
        std::fs::write(&file, "1234").unwrap();
        assert_eq!(read_pid_file(&file).unwrap(), 1234);
        for bad in ["", "0", "-1", "12a"] {
            std::fs::write(&file, bad).unwrap();
            assert!(read_pid_file(&file).is_err(), "{bad:?}");
        }
    }
}
