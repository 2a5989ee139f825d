//! Who is at the other end of a unix socket, beyond what `SO_PEERCRED` says: the peer's
//! supplementary groups (`SO_PEERGROUPS`, socket(7), Linux 4.13), taken at `connect()`.

use std::os::fd::{AsRawFd, BorrowedFd};

use crate::error::{Errno, Result, SysError};

/// Most groups a process can have (`NGROUPS_MAX` on Linux).
const NGROUPS_MAX: usize = 65_536;

/// The supplementary groups the peer had when it connected.
pub fn peer_groups(socket: BorrowedFd<'_>) -> Result<Vec<u32>> {
    let mut groups: Vec<libc::gid_t> = vec![0; 64];
    loop {
        let mut len = libc::socklen_t::try_from(groups.len() * size_of::<libc::gid_t>())
            .map_err(|_| SysError::syscall("getsockopt(SO_PEERGROUPS)", Errno::ERANGE))?;
        // SAFETY: the buffer is `len` bytes of writable gid_t storage owned by `groups`, and the
        // kernel writes at most `len` bytes and stores the size it needed in `len`.
        let rc = unsafe {
            libc::getsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PEERGROUPS,
                groups.as_mut_ptr().cast(),
                &mut len,
            )
        };
        let needed = usize::try_from(len).unwrap_or(usize::MAX) / size_of::<libc::gid_t>();
        if rc == 0 {
            groups.truncate(needed);
            return Ok(groups);
        }
        let errno = Errno::last();
        // ERANGE: the buffer was too small and `len` says how much is needed.
        if errno != Errno::ERANGE || needed <= groups.len() || needed > NGROUPS_MAX {
            return Err(SysError::syscall("getsockopt(SO_PEERGROUPS)", errno));
        }
        groups.resize(needed, 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixStream;

    #[test]
    fn a_socketpair_peer_has_our_groups() {
        let (a, _b) = UnixStream::pair().unwrap();
        let mut got = peer_groups(a.as_fd()).unwrap();
        let mut ours: Vec<u32> = nix::unistd::getgroups()
            .unwrap()
            .iter()
            .map(|g| g.as_raw())
            .collect();
        got.sort_unstable();
        ours.sort_unstable();
        assert_eq!(got, ours);
    }
}
