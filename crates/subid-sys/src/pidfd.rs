//! Owned pidfds and the pidfd-verified `/proc/<pid>` handle.
//!
//! A bare pid may be recycled as soon as its process is reaped; a pidfd (pidfd_open(2)) names one
//! process for as long as the fd lives. To reach `/proc/<pid>` of *that* process we open the
//! directory first and then ask the pidfd whether the process still lives
//! (`pidfd_send_signal(fd, 0)`): if it does, the pid cannot have been reused in between, so the
//! directory fd is the right one, for good (proc(5) fds stay bound to their process).

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{OFlag, openat};
use nix::sys::stat::Mode;
use nix::sys::wait::{Id, WaitPidFlag, WaitStatus, waitid};

use crate::error::{Result, SysError, errno_of};

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    /// It called `exit` with this code.
    Exited(i32),
    /// A signal killed it.
    Signaled {
        /// The signal number.
        signal: i32,
        /// Whether it dumped core.
        core_dumped: bool,
    },
}

impl ExitStatus {
    /// True for `Exited(0)`.
    pub fn success(self) -> bool {
        self == ExitStatus::Exited(0)
    }
}

/// An owned pidfd together with the pid it was made for.
#[derive(Debug)]
pub struct PidFd {
    fd: OwnedFd,
    pid: i32,
}

impl PidFd {
    /// `pidfd_open(pid, 0)`. The caller must know `pid` is the intended process (a child it has
    /// not reaped yet); everything later goes through the fd.
    pub fn open(pid: i32) -> Result<Self> {
        // SAFETY: pidfd_open takes two integers and returns a new fd or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        if fd < 0 {
            return Err(SysError::process("pidfd_open", pid, Errno::last()));
        }
        // SAFETY: the kernel just gave us this fd (close-on-exec by definition); nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
        Ok(PidFd { fd, pid })
    }

    /// Wraps a pidfd the kernel returned by `clone(CLONE_PIDFD)` for `pid`.
    ///
    /// # Safety
    /// `fd` must be an open pidfd owned by nobody else.
    pub(crate) unsafe fn from_raw(fd: RawFd, pid: i32) -> Self {
        // SAFETY: forwarded contract.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        PidFd { fd, pid }
    }

    /// The pid in the daemon's pid namespace.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// The fd itself.
    pub fn into_owned_fd(self) -> OwnedFd {
        self.fd
    }

    /// `pidfd_send_signal(fd, signal)`; `ProcessGone` when it has already been reaped.
    pub fn send_signal(&self, signal: i32) -> Result<()> {
        // SAFETY: integers and a NULL siginfo, which means "as kill(2) would".
        let r = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.fd.as_raw_fd(),
                signal,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        if r < 0 {
            let e = Errno::last();
            if e == Errno::ESRCH {
                return Err(SysError::ProcessGone { pid: self.pid });
            }
            return Err(SysError::process("pidfd_send_signal", self.pid, e));
        }
        Ok(())
    }

    /// Whether the process has not been reaped yet (a zombie still counts as present).
    pub fn is_present(&self) -> Result<bool> {
        match self.send_signal(0) {
            Ok(()) => Ok(true),
            Err(SysError::ProcessGone { .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Non-blocking: has the process exited (zombie or reaped)? A pidfd polls readable then.
    pub fn has_exited(&self) -> Result<bool> {
        let mut pfd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, timeout 0.
        let r = unsafe { libc::poll(&mut pfd, 1, 0) };
        if r < 0 {
            return Err(SysError::process("poll(pidfd)", self.pid, Errno::last()));
        }
        Ok(pfd.revents & (libc::POLLIN | libc::POLLHUP) != 0)
    }

    /// Reaps the process if it has exited: `waitid(P_PIDFD, WEXITED | WNOHANG)`.
    /// Only the parent (the daemon) may reap; `ECHILD` otherwise.
    pub fn try_wait(&self) -> Result<Option<ExitStatus>> {
        self.wait_with(WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG)
    }

    /// Blocks until the process exits and reaps it: `waitid(P_PIDFD, WEXITED)`.
    pub fn wait(&self) -> Result<ExitStatus> {
        loop {
            if let Some(status) = self.wait_with(WaitPidFlag::WEXITED)? {
                return Ok(status);
            }
        }
    }

    /// Waits up to `timeout` for the process to exit (`poll` on the pidfd), then reaps it.
    /// `None` when it is still running at the deadline.
    pub fn wait_timeout(&self, timeout: Duration) -> Result<Option<ExitStatus>> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let mut pfd = libc::pollfd {
                fd: self.fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            let ms = left.as_millis().min(i32::MAX as u128) as i32;
            // SAFETY: one valid pollfd.
            let r = unsafe { libc::poll(&mut pfd, 1, ms) };
            if r < 0 {
                let e = Errno::last();
                if e == Errno::EINTR {
                    continue;
                }
                return Err(SysError::process("poll(pidfd)", self.pid, e));
            }
            if r > 0 || left.is_zero() {
                return self.try_wait();
            }
        }
    }

    fn wait_with(&self, flags: WaitPidFlag) -> Result<Option<ExitStatus>> {
        loop {
            match waitid(Id::PIDFd(self.fd.as_fd()), flags | WaitPidFlag::__WALL) {
                Ok(WaitStatus::Exited(_, code)) => return Ok(Some(ExitStatus::Exited(code))),
                Ok(WaitStatus::Signaled(_, signal, core_dumped)) => {
                    return Ok(Some(ExitStatus::Signaled {
                        signal: signal as i32,
                        core_dumped,
                    }));
                }
                Ok(_) => return Ok(None),
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(SysError::process("waitid(P_PIDFD)", self.pid, e)),
            }
        }
    }

    /// Opens `/proc/<pid>` and verifies through the pidfd that it is this process.
    pub fn proc_dir(&self) -> Result<ProcDir> {
        let path = format!("/proc/{}", self.pid);
        let fd = nix::fcntl::open(
            path.as_str(),
            OFlag::O_DIRECTORY | OFlag::O_RDONLY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| match e {
            Errno::ENOENT => SysError::ProcessGone { pid: self.pid },
            e => SysError::path("open", &path, e),
        })?;
        // The directory was opened while the process was alive, if it is alive now.
        if !self.is_present()? {
            return Err(SysError::ProcessGone { pid: self.pid });
        }
        Ok(ProcDir { fd, pid: self.pid })
    }
}

impl AsFd for PidFd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// A `/proc/<pid>` directory verified to belong to one live process (see [`PidFd::proc_dir`]).
#[derive(Debug)]
pub struct ProcDir {
    fd: OwnedFd,
    pid: i32,
}

impl ProcDir {
    /// The pid this directory belongs to.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    fn path_of(&self, name: &str) -> PathBuf {
        PathBuf::from(format!("/proc/{}/{name}", self.pid))
    }

    /// Opens a file below the directory (e.g. `"uid_map"`, `"ns/user"`), close-on-exec.
    pub fn open(&self, name: &str, flags: OFlag) -> Result<OwnedFd> {
        openat(&self.fd, name, flags | OFlag::O_CLOEXEC, Mode::empty())
            .map_err(|e| SysError::path("openat", self.path_of(name), e))
    }

    /// Reads a whole file below the directory.
    pub fn read_to_string(&self, name: &str) -> Result<String> {
        let fd = self.open(name, OFlag::O_RDONLY)?;
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match nix::unistd::read(&fd, &mut buf) {
                Ok(0) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(SysError::path("read", self.path_of(name), e)),
            }
        }
        String::from_utf8(out)
            .map_err(|_| SysError::path("read", self.path_of(name), Errno::EILSEQ))
    }

    /// Writes `data` with exactly one `write(2)`; a short write is an error. The id map files
    /// accept one write only (user_namespaces(7)), so retrying would be wrong.
    pub fn write_once(&self, name: &str, data: &[u8]) -> Result<()> {
        let fd = self.open(name, OFlag::O_WRONLY)?;
        match nix::unistd::write(&fd, data) {
            Ok(n) if n == data.len() => Ok(()),
            Ok(_) => Err(SysError::path(
                "write (short)",
                self.path_of(name),
                Errno::EIO,
            )),
            Err(e) => Err(SysError::path("write", self.path_of(name), e)),
        }
    }

    /// The real, effective, saved and filesystem uids and gids from `status`, as seen from the
    /// daemon's user namespace (host ids).
    pub fn ids(&self) -> Result<ProcIds> {
        let status = self.read_to_string("status")?;
        parse_ids(&status)
            .ok_or_else(|| SysError::path("parse", self.path_of("status"), Errno::EINVAL))
    }
}

impl AsFd for ProcDir {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// Ids of a process as its `status` file shows them: `[real, effective, saved, fs]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcIds {
    /// `Uid:` line.
    pub uid: [u32; 4],
    /// `Gid:` line.
    pub gid: [u32; 4],
}

fn parse_ids(status: &str) -> Option<ProcIds> {
    fn four(status: &str, key: &str) -> Option<[u32; 4]> {
        let line = status.lines().find(|l| l.starts_with(key))?;
        let mut it = line[key.len()..]
            .split_whitespace()
            .map(|s| s.parse::<u32>());
        let mut out = [0; 4];
        for slot in &mut out {
            *slot = it.next()?.ok()?;
        }
        Some(out)
    }
    Some(ProcIds {
        uid: four(status, "Uid:")?,
        gid: four(status, "Gid:")?,
    })
}

/// Resolves once the process behind `pidfd` has exited (a pidfd polls readable then), without
/// holding a thread: the fd is registered with tokio's reactor.
pub async fn exited(pidfd: std::sync::Arc<PidFd>) -> Result<()> {
    struct Watch(std::sync::Arc<PidFd>);
    impl AsRawFd for Watch {
        fn as_raw_fd(&self) -> RawFd {
            self.0.fd.as_raw_fd()
        }
    }
    let pid = pidfd.pid;
    // SAFETY: `Watch` owns an Arc of the PidFd, so the fd stays open for as long as the
    // registration exists (it is dropped with the AsyncFd, before the Arc).
    let watch = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(
            Watch(pidfd),
            tokio::io::Interest::READABLE,
        )
    }
    .map_err(|e| SysError::process("epoll_ctl(pidfd)", pid, errno_of(&e.into_parts().1)))?;
    let _ready = watch
        .readable()
        .await
        .map_err(|e| SysError::process("poll(pidfd)", pid, errno_of(&e)))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_status_ids() {
        let s = "Name:\tsh\nUid:\t1879048192\t1879048193\t3\t4\nGid:\t5\t6\t7\t8\nGroups:\t\n";
        let ids = parse_ids(s).unwrap();
        assert_eq!(ids.uid, [1879048192, 1879048193, 3, 4]);
        assert_eq!(ids.gid, [5, 6, 7, 8]);
        assert_eq!(parse_ids("Uid:\t1\t2\n"), None);
    }

    #[test]
    fn own_pidfd_and_proc_dir() {
        let me = PidFd::open(std::process::id() as i32).unwrap();
        assert!(me.is_present().unwrap());
        assert!(!me.has_exited().unwrap());
        let dir = me.proc_dir().unwrap();
        let ids = dir.ids().unwrap();
        assert_eq!(ids.uid[1], nix::unistd::geteuid().as_raw());
    }

    #[test]
    fn wait_timeout_returns_at_the_deadline_or_the_exit() {
        let child = std::process::Command::new("/bin/sleep")
            .arg("0.3")
            .spawn()
            .unwrap();
        let pidfd = PidFd::open(child.id() as i32).unwrap();
        std::mem::forget(child); // reaped through the pidfd
        let t = Instant::now();
        assert_eq!(pidfd.wait_timeout(Duration::from_millis(50)).unwrap(), None);
        assert!(t.elapsed() >= Duration::from_millis(50));
        let status = pidfd.wait_timeout(Duration::from_secs(10)).unwrap();
        assert_eq!(status, Some(ExitStatus::Exited(0)));
        assert!(t.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn reaped_child_is_gone() {
        let child = std::process::Command::new("/bin/true").spawn().unwrap();
        let pidfd = PidFd::open(child.id() as i32).unwrap();
        // Reaped through the pidfd below; std's handle has nothing left to wait for.
        std::mem::forget(child);
        assert_eq!(pidfd.wait().unwrap(), ExitStatus::Exited(0));
        assert!(!pidfd.is_present().unwrap());
        assert!(pidfd.has_exited().unwrap());
        assert!(matches!(
            pidfd.proc_dir(),
            Err(SysError::ProcessGone { .. })
        ));
        assert!(matches!(
            pidfd.send_signal(libc::SIGTERM),
            Err(SysError::ProcessGone { .. })
        ));
    }
}
