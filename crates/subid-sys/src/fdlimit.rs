//! The daemon's open-file limit (RLIMIT_NOFILE): raised at start from its soft value to its
//! hard one, so that connection caps can be sized against what the kernel will really allow
//! (`getrlimit(2)`, `setrlimit(2)`). The limit before the raise is kept, so that spawned
//! processes can be given back the soft limit they would have had.

use std::sync::OnceLock;

use nix::sys::resource::{Resource, getrlimit, setrlimit};

use crate::error::{Result, SysError};

/// The soft and hard RLIMIT_NOFILE of this process when [`raise_nofile`] first ran.
static BEFORE: OnceLock<(u64, u64)> = OnceLock::new();

/// The outcome of [`raise_nofile`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NofileLimit {
    /// The soft limit before the raise.
    pub was: u64,
    /// The soft limit now: the most file descriptors this process may hold.
    pub soft: u64,
    /// The hard limit (unchanged; raising it needs CAP_SYS_RESOURCE).
    pub hard: u64,
}

/// Sets the soft RLIMIT_NOFILE to the hard one and reports both. When the kernel refuses the
/// raise (a hard limit above `fs.nr_open`), the soft limit stays and is reported as is.
pub fn raise_nofile() -> Result<NofileLimit> {
    let (soft, hard) =
        getrlimit(Resource::RLIMIT_NOFILE).map_err(|e| SysError::syscall("getrlimit", e))?;
    let _ = BEFORE.set((soft, hard));
    if soft >= hard {
        return Ok(NofileLimit {
            was: soft,
            soft,
            hard,
        });
    }
    match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
        Ok(()) => Ok(NofileLimit {
            was: soft,
            soft: hard,
            hard,
        }),
        Err(nix::errno::Errno::EPERM) => Ok(NofileLimit {
            was: soft,
            soft,
            hard,
        }),
        Err(e) => Err(SysError::syscall("setrlimit(RLIMIT_NOFILE)", e)),
    }
}

/// The soft and hard RLIMIT_NOFILE from before [`raise_nofile`], if it ran: what a spawned
/// process should get back unless its lease asks for another (a large soft limit slows
/// programs that close every descriptor up to it, and breaks those that use `select(2)`).
pub fn before_raise() -> Option<(u64, u64)> {
    BEFORE.get().copied()
}

/// The number of file descriptors this process holds now (entries of `/proc/self/fd`).
pub fn open_fds() -> Result<usize> {
    let dir = std::fs::read_dir("/proc/self/fd")
        .map_err(|e| SysError::io_path("opendir", "/proc/self/fd", &e))?;
    // The directory's own descriptor is one of the entries.
    Ok(dir.count().saturating_sub(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raises_the_soft_limit_to_the_hard_one_and_remembers_the_old() {
        let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit");
        let limit = raise_nofile().expect("raise");
        assert_eq!(limit.was, soft);
        assert_eq!(limit.hard, hard);
        assert_eq!(limit.soft, hard, "raised to the hard limit");
        assert_eq!(
            getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit").0,
            hard
        );
        assert_eq!(before_raise(), Some((soft, hard)));
        // A second call changes nothing and keeps the first "before".
        let again = raise_nofile().expect("raise again");
        assert_eq!((again.soft, again.hard), (hard, hard));
        assert_eq!(before_raise(), Some((soft, hard)));
        assert!(open_fds().expect("count") >= 3, "stdio at least");
    }
}
