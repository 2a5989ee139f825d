//! What a service manager hands a daemon at exec: listening sockets (sd_listen_fds(3)) and
//! environment variables (NOTIFY_SOCKET, WATCHDOG_USEC, LISTEN_FDS, ...) to take and unset.
//!
//! No policy here: the daemon decides which variables to believe and which sockets to serve.

use std::ffi::OsString;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};

use nix::errno::Errno;
use nix::fcntl::{FcntlArg, FdFlag, fcntl};
use nix::sys::socket::{AddressFamily, SockType, SockaddrLike, SockaddrStorage, getsockname};
use nix::sys::socket::{getsockopt, sockopt};

use crate::error::{Result, SysError};

/// The first passed fd (`SD_LISTEN_FDS_START`): fds 0-2 are stdio.
pub const LISTEN_FDS_START: RawFd = 3;

/// Set once the passed fds have been adopted, so no fd number is ever owned twice.
static FDS_TAKEN: AtomicBool = AtomicBool::new(false);

/// Reads `names` from the environment and removes them, so no child or later exec inherits
/// them; returns their values in order. Refused (`Unsupported`) once a second thread exists:
/// changing the environment is only sound while this thread is the process's only one
/// (`std::env::remove_var`'s docs), so call it first thing in `main`.
pub fn take_env(names: &[&str]) -> Result<Vec<Option<OsString>>> {
    let threads = thread_count()?;
    if threads != 1 {
        return Err(SysError::Unsupported {
            what: "unsetting environment variables",
            reason: format!("{threads} threads are running; it is only sound in a single thread"),
        });
    }
    let values = names.iter().map(std::env::var_os).collect();
    for name in names {
        // SAFETY: remove_var is sound when no other thread reads or writes the environment at
        // the same time. This process has exactly one thread (checked just above, from
        // /proc/self/task), and only this thread could start another, which it does not do
        // until this loop ends.
        unsafe { std::env::remove_var(name) };
    }
    Ok(values)
}

/// The number of threads of this process, from /proc/self/task.
fn thread_count() -> Result<usize> {
    let entries = std::fs::read_dir("/proc/self/task")
        .map_err(|e| SysError::io_path("opendir", "/proc/self/task", &e))?;
    Ok(entries.filter(|e| e.is_ok()).count())
}

/// Takes ownership of the `count` fds a service manager passed from fd 3 on, and makes them
/// close-on-exec. Works once per process (a second call is `InvalidInput`).
///
/// Each fd must be open and must *not* be close-on-exec: a passed fd survived an `execve`, so
/// it cannot be; everything this process opens itself (std, tokio, SQLite) is close-on-exec.
/// That check keeps an fd this process already owns from getting a second owner when
/// `LISTEN_FDS` claims more fds than were passed.
pub fn take_listen_fds(count: u32) -> Result<Vec<OwnedFd>> {
    if FDS_TAKEN.swap(true, Ordering::SeqCst) {
        return Err(SysError::InvalidInput {
            what: "LISTEN_FDS",
            reason: "the passed fds were taken already".into(),
        });
    }
    let count = RawFd::try_from(count).map_err(|_| SysError::InvalidInput {
        what: "LISTEN_FDS",
        reason: format!("{count} fds is too many"),
    })?;
    let end = LISTEN_FDS_START
        .checked_add(count)
        .ok_or_else(|| SysError::InvalidInput {
            what: "LISTEN_FDS",
            reason: format!("{count} fds is too many"),
        })?;
    let mut fds = Vec::new();
    for raw in LISTEN_FDS_START..end {
        // SAFETY: F_GETFD takes an fd number and no pointer; on a closed fd it fails with EBADF.
        let flags = unsafe { libc::fcntl(raw, libc::F_GETFD) };
        if flags < 0 {
            return Err(SysError::InvalidInput {
                what: "LISTEN_FDS",
                reason: format!("fd {raw} is not open ({})", Errno::last()),
            });
        }
        if flags & libc::FD_CLOEXEC != 0 {
            return Err(SysError::InvalidInput {
                what: "LISTEN_FDS",
                reason: format!(
                    "fd {raw} is close-on-exec, so it was not passed across exec by a service manager"
                ),
            });
        }
        // SAFETY: fd `raw` is open (F_GETFD succeeded) and was inherited across execve (it is
        // not close-on-exec, and every fd this process opens is), so no object in this process
        // owns it; FDS_TAKEN makes sure this loop runs once, so it gets exactly one owner.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        fcntl(&fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC))
            .map_err(|e| SysError::syscall("fcntl F_SETFD FD_CLOEXEC", e))?;
        fds.push(fd);
    }
    Ok(fds)
}

/// What a passed fd is, for the daemon to decide whether to serve it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SocketInfo {
    /// The fd number.
    pub fd: RawFd,
    /// The address family (`None` for one nix does not know).
    pub family: Option<AddressFamily>,
    /// Stream, datagram, seqpacket...
    pub sock_type: SockType,
    /// Whether `listen(2)` was called on it (`SO_ACCEPTCONN`).
    pub listening: bool,
    /// The path a unix socket is bound to (`None` for abstract, unnamed or other families).
    pub path: Option<PathBuf>,
}

/// Describes the socket behind `fd`; `ENOTSOCK` (as `Syscall`) when it is no socket.
pub fn socket_info(fd: BorrowedFd<'_>) -> Result<SocketInfo> {
    let sock_type = getsockopt(&fd, sockopt::SockType)
        .map_err(|e| SysError::syscall("getsockopt SO_TYPE", e))?;
    let listening = getsockopt(&fd, sockopt::AcceptConn)
        .map_err(|e| SysError::syscall("getsockopt SO_ACCEPTCONN", e))?;
    let addr: SockaddrStorage =
        getsockname(fd.as_raw_fd()).map_err(|e| SysError::syscall("getsockname", e))?;
    let path = addr
        .as_unix_addr()
        .and_then(|unix| unix.path())
        .map(PathBuf::from);
    Ok(SocketInfo {
        fd: fd.as_fd().as_raw_fd(),
        family: addr.family(),
        sock_type,
        listening,
        path,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn take_env_refuses_with_other_threads() {
        let helper = std::thread::spawn(|| std::thread::sleep(std::time::Duration::from_secs(2)));
        let err = take_env(&["SUBIDD_NO_SUCH_VAR"]).expect_err("two threads run");
        assert!(err.to_string().contains("threads are running"), "{err}");
        let _ = helper.join();
    }

    #[test]
    fn describes_a_listening_unix_socket() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).expect("bind");
        let info = socket_info(listener.as_fd()).expect("socket_info");
        assert_eq!(info.family, Some(AddressFamily::Unix));
        assert_eq!(info.sock_type, SockType::Stream);
        assert!(info.listening);
        assert_eq!(info.path.as_deref(), Some(path.as_path()));
    }

    #[test]
    fn describes_a_tcp_socket_and_a_file() {
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let info = socket_info(tcp.as_fd()).expect("socket_info");
        assert_eq!(info.family, Some(AddressFamily::Inet));
        assert!(info.listening);
        assert_eq!(info.path, None);
        let file = std::fs::File::open("/proc/self/status").expect("open");
        let err = socket_info(file.as_fd()).expect_err("a file is no socket");
        assert_eq!(err.errno(), Some(Errno::ENOTSOCK));
    }
}
