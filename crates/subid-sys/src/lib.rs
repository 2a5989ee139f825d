//! Everything subidd asks of the kernel: the user database, /proc, namespaces, spawning, cgroups,
//! file watches.
//!
//! This is the only crate of the workspace that may contain `unsafe`; every block carries a
//! `// SAFETY:` comment. Policy (who may do what, which range) lives in the daemon, not here.

pub mod userdb;

pub mod activation;
pub mod cgroup;
pub mod error;
pub mod fdlimit;
pub mod flock;
#[cfg(feature = "floors")]
pub mod floor;
pub mod idmount;
pub mod idscan;
pub mod logkeep;
pub mod malloc;
pub mod members;
pub mod peer;
pub mod pidfd;
mod raw;
pub mod reserve;
pub mod spawn;
pub mod userns;
pub mod watch;

pub use error::{ChildStep, Errno, SysError};
pub use pidfd::{ExitStatus, PidFd, ProcDir, ProcIds};
pub use spawn::{Command, Namespace, Rlimit, SpawnHooks};
pub use userns::{ExtraNs, LeaseNs, NsKind, UserNsSpec};
