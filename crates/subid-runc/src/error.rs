//! `RuncError`: every way the wrapper fails, worded for the place Docker shows it (the runtime's
//! `--log`, which `docker run` prints): the cause first, then what was refused.

use std::path::PathBuf;

use subid_client::ClientError;
use subid_sys::SysError;

/// A failure of the wrapper itself (the real runtime's own failures keep its exit status).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RuncError {
    /// Our own leading options, or a runtime command line that cannot be read.
    #[error("usage: {0}")]
    Usage(String),
    /// subidd could not be reached at all: fail closed, never on host ids.
    #[error(
        "subidd is not reachable at {} ({source}); refusing to run container {id} on host ids",
        socket.display()
    )]
    Unreachable {
        socket: PathBuf,
        id: String,
        #[source]
        source: Box<ClientError>,
    },
    /// subidd answered, and said no.
    #[error("subidd refused to {what} for container {id}: {source}")]
    Daemon {
        what: &'static str,
        id: String,
        #[source]
        source: Box<ClientError>,
    },
    /// A kernel call failed (mounts, idmapping).
    #[error("{what}: {source}")]
    Sys {
        what: String,
        #[source]
        source: SysError,
    },
    /// A file of the bundle or the state directory.
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The bundle's `config.json` asks for something the wrapper cannot do.
    #[error("config.json of {}: {reason}", bundle.display())]
    Spec { bundle: PathBuf, reason: String },
    /// The real runtime could not be started, or answered something unreadable.
    #[error("runtime {}: {reason}", runtime.display())]
    Runtime { runtime: PathBuf, reason: String },
    /// Another call holds the container's lock for too long.
    #[error("container {id} is locked by another subid-runc call for more than {seconds} s")]
    Locked { id: String, seconds: u64 },
}

impl RuncError {
    /// Wraps a client error: "unreachable" for no answer at all, the daemon's refusal
    /// otherwise.
    pub fn daemon(socket: &std::path::Path, id: &str, what: &'static str, e: ClientError) -> Self {
        if e.is_unreachable() {
            RuncError::Unreachable {
                socket: socket.to_path_buf(),
                id: id.to_string(),
                source: Box::new(e),
            }
        } else {
            RuncError::Daemon {
                what,
                id: id.to_string(),
                source: Box::new(e),
            }
        }
    }

    pub fn sys(what: impl Into<String>, source: SysError) -> Self {
        RuncError::Sys {
            what: what.into(),
            source,
        }
    }

    pub fn io(what: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        RuncError::Io {
            what,
            path: path.into(),
            source,
        }
    }
}

/// Result of this crate.
pub type Result<T, E = RuncError> = std::result::Result<T, E>;
