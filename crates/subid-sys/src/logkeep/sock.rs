//! The few socket and pipe calls the keeper and its client make: `sendmsg`/`recvmsg` with
//! `SCM_RIGHTS` (unix(7), cmsg(3)), peer credentials, `FIONREAD`, `poll`.
//!
//! `recvmsg` is written against libc rather than nix because nix refuses to walk the control
//! messages when the kernel set `MSG_CTRUNC`, and fds the kernel did install before running out
//! of room (or of the receiver's fd limit) would then stay open with nobody owning them.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

use nix::sys::socket::{getsockopt, sockopt};

use crate::error::Errno;

/// Most fds one message may carry (`SCM_MAX_FD` in the kernel).
pub(crate) const MAX_FDS: usize = 253;

/// Room for one `SCM_RIGHTS` header with `MAX_FDS` fds, in u64s so that it is aligned for
/// `cmsghdr`. `CMSG_SPACE(253 * 4)` is 1032 on 64-bit Linux.
const CMSG_WORDS: usize = 136;

/// What one `recvmsg` got.
#[derive(Debug, Default)]
pub(crate) struct Received {
    /// Bytes of the message (0 with no fds: the peer closed the connection).
    pub len: usize,
    /// The message was longer than the buffer (`MSG_TRUNC`); the rest is lost.
    pub truncated: bool,
    /// Some fds could not be passed (`MSG_CTRUNC`): the receiver's fd limit, or no room.
    pub fds_lost: bool,
}

/// Sends one message with `fds` as `SCM_RIGHTS`. `MSG_NOSIGNAL`: a closed peer is `EPIPE`, not
/// a SIGPIPE. On a `SOCK_SEQPACKET` socket the message goes whole or not at all.
pub(crate) fn send_msg(
    sock: BorrowedFd<'_>,
    bytes: &[u8],
    fds: &[BorrowedFd<'_>],
    dontwait: bool,
) -> Result<(), Errno> {
    if fds.len() > MAX_FDS {
        return Err(Errno::EINVAL);
    }
    let mut control = [0u64; CMSG_WORDS];
    let raw: Vec<RawFd> = fds.iter().map(|fd| fd.as_raw_fd()).collect();
    let fd_bytes = std::mem::size_of_val(raw.as_slice());
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr().cast_mut().cast(),
        iov_len: bytes.len(),
    };
    // SAFETY: an all-zero msghdr is a valid "no name, no iov, no control" header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !raw.is_empty() {
        let fd_len = u32::try_from(fd_bytes).map_err(|_| Errno::EINVAL)?;
        // SAFETY: CMSG_SPACE only computes a size.
        let space = unsafe { libc::CMSG_SPACE(fd_len) } as usize;
        debug_assert!(space <= std::mem::size_of_val(&control));
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space;
        // SAFETY: msg_control points at `space` bytes of zeroed, u64-aligned storage, so the
        // first header fits; CMSG_DATA points inside it, `fd_bytes` bytes from there are within
        // `space` (CMSG_SPACE(fd_len) >= CMSG_LEN(fd_len)), and `raw` holds `fd_bytes` bytes.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(fd_len) as usize;
            std::ptr::copy_nonoverlapping(
                raw.as_ptr().cast::<u8>(),
                libc::CMSG_DATA(cmsg),
                fd_bytes,
            );
        }
    }
    let mut flags = libc::MSG_NOSIGNAL;
    if dontwait {
        flags |= libc::MSG_DONTWAIT;
    }
    loop {
        // SAFETY: msg points at the iovec and control buffer above, alive for the call; the fds
        // in it are borrowed, so open, for the call.
        let n = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, flags) };
        if n >= 0 {
            return if usize::try_from(n).ok() == Some(bytes.len()) {
                Ok(())
            } else {
                Err(Errno::EMSGSIZE)
            };
        }
        match Errno::last() {
            Errno::EINTR => continue,
            e => return Err(e),
        }
    }
}

/// Receives one message into `buf`, without waiting. Every fd that came with it is pushed to
/// `fds` as an `OwnedFd` (close-on-exec), also when the message is refused afterwards, so none
/// leaks. `EAGAIN` when nothing is queued.
pub(crate) fn recv_msg(
    sock: BorrowedFd<'_>,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
) -> Result<Received, Errno> {
    let mut control = [0u64; CMSG_WORDS];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: an all-zero msghdr is valid; the pointers set below outlive the call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control);
    let n = loop {
        // SAFETY: msg describes `buf` and `control`, both writable and alive for the call.
        let n = unsafe {
            libc::recvmsg(
                sock.as_raw_fd(),
                &mut msg,
                libc::MSG_DONTWAIT | libc::MSG_CMSG_CLOEXEC,
            )
        };
        if n >= 0 {
            break n;
        }
        match Errno::last() {
            Errno::EINTR => continue,
            e => return Err(e),
        }
    };
    // SAFETY: after a successful recvmsg the kernel has filled `msg_controllen` bytes of
    // `control` with whole cmsghdrs; CMSG_FIRSTHDR/NXTHDR stay within that length, and each
    // SCM_RIGHTS header's data holds (cmsg_len - CMSG_LEN(0)) / 4 fds the kernel installed in
    // this process for us alone, so each becomes an OwnedFd exactly once. The data may be
    // unaligned for RawFd, hence read_unaligned.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg);
                let header = libc::CMSG_LEN(0) as usize;
                let count = ((*cmsg).cmsg_len as usize).saturating_sub(header)
                    / std::mem::size_of::<RawFd>();
                for i in 0..count {
                    let fd = std::ptr::read_unaligned(data.cast::<RawFd>().add(i));
                    if fd >= 0 {
                        fds.push(OwnedFd::from_raw_fd(fd));
                    }
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    Ok(Received {
        len: usize::try_from(n).unwrap_or(0),
        truncated: msg.msg_flags & libc::MSG_TRUNC != 0,
        fds_lost: msg.msg_flags & libc::MSG_CTRUNC != 0,
    })
}

/// The peer's (pid, uid) from `SO_PEERCRED`, as they were at `connect()`/`listen()`.
pub(crate) fn peer(sock: BorrowedFd<'_>) -> Result<(i32, u32), Errno> {
    let cred = getsockopt(&sock, sockopt::PeerCredentials)?;
    Ok((cred.pid(), cred.uid()))
}

/// Bytes waiting in a pipe (`FIONREAD`, pipe(7)).
pub(crate) fn readable(pipe: BorrowedFd<'_>) -> Result<usize, Errno> {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int through the pointer, which is valid for the call.
    let r = unsafe { libc::ioctl(pipe.as_raw_fd(), libc::FIONREAD, &mut n) };
    if r < 0 {
        return Err(Errno::last());
    }
    Ok(usize::try_from(n).unwrap_or(0))
}

/// `poll` on one fd; the returned events (0 at the timeout). EINTR counts as a timeout.
pub(crate) fn poll_one(fd: BorrowedFd<'_>, events: i16, timeout: Duration) -> Result<i16, Errno> {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events,
        revents: 0,
    };
    let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
    // SAFETY: one valid pollfd for the duration of the call.
    let r = unsafe { libc::poll(&mut pfd, 1, ms) };
    if r < 0 {
        return match Errno::last() {
            Errno::EINTR => Ok(0),
            e => Err(e),
        };
    }
    Ok(pfd.revents)
}

/// Sets or clears `O_NONBLOCK` on the open file description.
pub(crate) fn set_nonblocking(fd: impl AsFd, on: bool) -> Result<(), Errno> {
    use nix::fcntl::{FcntlArg, OFlag, fcntl};
    let fd = fd.as_fd();
    let flags = OFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFL)?);
    let flags = if on {
        flags | OFlag::O_NONBLOCK
    } else {
        flags - OFlag::O_NONBLOCK
    };
    fcntl(fd, FcntlArg::F_SETFL(flags)).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, socketpair};

    fn pair() -> (OwnedFd, OwnedFd) {
        socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .unwrap()
    }

    #[test]
    fn fds_cross_with_their_message_and_arrive_close_on_exec() {
        let (a, b) = pair();
        let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
        send_msg(a.as_fd(), b"hello", &[r.as_fd(), w.as_fd()], false).unwrap();
        let mut buf = [0u8; 64];
        let mut fds = Vec::new();
        let got = recv_msg(b.as_fd(), &mut buf, &mut fds).unwrap();
        assert_eq!(
            (&buf[..got.len], got.truncated, got.fds_lost),
            (&b"hello"[..], false, false)
        );
        assert_eq!(fds.len(), 2);
        for fd in &fds {
            let flags = nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFD).unwrap();
            assert_ne!(flags & libc::FD_CLOEXEC, 0);
        }
        // The received write end writes into the same pipe.
        nix::unistd::write(&fds[1], b"x").unwrap();
        assert_eq!(readable(r.as_fd()).unwrap(), 1);
        assert_eq!(
            recv_msg(b.as_fd(), &mut buf, &mut fds).unwrap_err(),
            Errno::EAGAIN
        );
    }

    #[test]
    fn a_long_message_is_reported_truncated() {
        let (a, b) = pair();
        send_msg(a.as_fd(), &[7u8; 100], &[], false).unwrap();
        let mut buf = [0u8; 10];
        let got = recv_msg(b.as_fd(), &mut buf, &mut Vec::new()).unwrap();
        assert!(got.truncated);
    }

    #[test]
    fn a_closed_peer_reads_as_an_empty_message_and_sends_epipe() {
        let (a, b) = pair();
        drop(a);
        let got = recv_msg(b.as_fd(), &mut [0u8; 8], &mut Vec::new()).unwrap();
        assert_eq!(got.len, 0);
        assert_eq!(send_msg(b.as_fd(), b"x", &[], true), Err(Errno::EPIPE));
        let events = poll_one(b.as_fd(), libc::POLLIN, Duration::ZERO).unwrap();
        assert_ne!(events & (libc::POLLHUP | libc::POLLIN), 0);
    }

    #[test]
    fn the_peer_of_a_socketpair_is_this_process() {
        let (a, _b) = pair();
        let (pid, uid) = peer(a.as_fd()).unwrap();
        assert_eq!(pid, i32::try_from(std::process::id()).unwrap());
        assert_eq!(uid, nix::unistd::geteuid().as_raw());
    }
}
