//! Memory and signal plumbing of a spawn, on the daemon's side: child stacks, the signal mask
//! held around a clone, close-on-exec pipes, and bounded waits on them.

use std::os::fd::{AsRawFd, OwnedFd};
use std::ptr;
use std::time::Instant;

use libc::c_void;
use nix::errno::Errno;
use nix::fcntl::OFlag;

use crate::error::{Result, SysError};

/// A child stack: an anonymous mapping with a guard page below it.
pub(crate) struct Stack {
    base: *mut c_void,
    len: usize,
}

impl Stack {
    const SIZE: usize = 128 * 1024;

    pub(crate) fn new() -> Result<Self> {
        let guard = page_size();
        let len = guard + Self::SIZE;
        // SAFETY: a fresh private anonymous mapping; no existing memory is touched.
        let base = unsafe {
            libc::mmap(
                ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_STACK | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(SysError::syscall("mmap (child stack)", Errno::last()));
        }
        let stack = Stack { base, len };
        // SAFETY: the first page of our own mapping becomes the guard.
        if unsafe { libc::mprotect(base, guard, libc::PROT_NONE) } != 0 {
            return Err(SysError::syscall("mprotect (stack guard)", Errno::last()));
        }
        Ok(stack)
    }

    /// The usable part (above the guard page) as clone3 takes it: lowest address and size.
    pub(crate) fn range(&self) -> (*mut c_void, usize) {
        (
            self.base.wrapping_byte_add(self.len - Self::SIZE),
            Self::SIZE,
        )
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        // SAFETY: our own mapping; no child runs on it any more (see the callers).
        unsafe { libc::munmap(self.base, self.len) };
    }
}

fn page_size() -> usize {
    // SAFETY: sysconf takes an integer.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if n > 0 { n as usize } else { 4096 }
}

/// Blocks every signal in the calling thread until dropped, so no handler runs in a child that
/// shares the thread's memory and stack-pointer-free signal frames (glibc posix_spawn does the
/// same; glibc keeps its two internal signals, which only target the daemon's own threads).
pub(crate) struct SignalsBlocked {
    old: libc::sigset_t,
}

impl SignalsBlocked {
    pub(crate) fn new() -> Result<Self> {
        // SAFETY: sigset_t is plain data; sigfillset initialises it.
        let mut all: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        let mut old: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: live sigsets.
        unsafe { libc::sigfillset(&mut all) };
        // SAFETY: live sigsets.
        let r = unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old) };
        if r != 0 {
            return Err(SysError::syscall("pthread_sigmask", Errno::from_raw(r)));
        }
        Ok(SignalsBlocked { old })
    }
}

impl Drop for SignalsBlocked {
    fn drop(&mut self) {
        // SAFETY: restores the mask saved in `new`.
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &self.old, ptr::null_mut()) };
    }
}

pub(crate) fn pipe() -> Result<(OwnedFd, OwnedFd)> {
    nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(|e| SysError::syscall("pipe2", e))
}

/// Waits until `fd` is readable (data, EOF or hang-up) or `deadline` passes; true when readable.
pub(crate) fn readable_by(fd: &OwnedFd, deadline: Instant) -> Result<bool> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let ms = i32::try_from(left.as_millis()).unwrap_or(i32::MAX);
        let mut pfd = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one live pollfd.
        let r = unsafe { libc::poll(&mut pfd, 1, ms) };
        if r < 0 {
            match Errno::last() {
                Errno::EINTR => continue,
                e => return Err(SysError::syscall("poll", e)),
            }
        }
        if r > 0 {
            return Ok(true);
        }
        if left.is_zero() {
            return Ok(false);
        }
    }
}
