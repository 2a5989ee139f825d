//! Measurement floors for the benchmarks; not used by the daemon.
//!
//! Each function starts `/bin/true` once by the shortest path the kernel offers for its case and
//! waits for it; the caller times the call. They are what the daemon's own spawn paths are
//! compared with (`examples/spawn_floor.rs`, `tests/benches/spawn.rs`), so they do no more than
//! the kernel needs: no error pipe, no signal or fd hygiene, no pidfd.
//!
//! The children run between fork and exec only async-signal-safe system calls on data prepared
//! before the fork, so the functions may be called from a multi-threaded process. They use a
//! plain `fork`, whose cost grows with the caller's memory (page tables are copied): call them
//! from a small process.

use std::ffi::CString;
use std::os::fd::{AsRawFd, BorrowedFd};

use nix::errno::Errno;

use crate::error::{ChildStep, Result, SysError};

const TRUE: &std::ffi::CStr = c"/bin/true";

/// Child exit codes of a failed step (`/bin/true` itself exits 0).
const EXIT_WAIT_FOR_MAPS: i32 = 125;
const EXIT_SETNS: i32 = 126;
const EXIT_EXECVE: i32 = 127;

/// fork, exec `/bin/true`, wait: the cost of starting any process.
pub fn fork_exec_true() -> Result<()> {
    let argv = [TRUE.as_ptr(), std::ptr::null()];
    let envp: [*const libc::c_char; 1] = [std::ptr::null()];
    // SAFETY: the child only calls execve and _exit (async-signal-safe) on the arrays above,
    // prepared before the fork.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        // SAFETY: live NUL-terminated strings and NULL-terminated arrays; we are the child.
        unsafe { exec_or_exit(&argv, &envp) }
    }
    if pid < 0 {
        return Err(SysError::syscall("fork", Errno::last()));
    }
    wait_true(pid)
}

/// fork, `setns(CLONE_NEWUSER)` into `ns`, exec `/bin/true`, wait: joining a namespace that
/// already exists, with no id switch.
pub fn setns_exec_true(ns: BorrowedFd<'_>) -> Result<()> {
    let fd = ns.as_raw_fd();
    let argv = [TRUE.as_ptr(), std::ptr::null()];
    let envp: [*const libc::c_char; 1] = [std::ptr::null()];
    // SAFETY: the child only calls setns, execve and _exit (async-signal-safe) on an fd and
    // arrays prepared before the fork.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        // SAFETY: integer arguments; on failure the child leaves at once.
        unsafe {
            if libc::setns(fd, libc::CLONE_NEWUSER) != 0 {
                libc::_exit(EXIT_SETNS);
            }
        }
        // SAFETY: live NUL-terminated strings and NULL-terminated arrays; we are the child.
        unsafe { exec_or_exit(&argv, &envp) }
    }
    if pid < 0 {
        return Err(SysError::syscall("fork", Errno::last()));
    }
    wait_true(pid)
}

/// A fork-like `clone(CLONE_NEWUSER)` (the caller, root, owns the new namespace); the parent
/// writes `setgroups`, `uid_map` and `gid_map` (`0 <base> 65536`) and wakes the child through a
/// pipe; the child execs `/bin/true`; wait. The raw cost of a first spawn.
pub fn clone_newuser_maps_exec_true(base: u32) -> Result<()> {
    let map = CString::new(format!("0 {base} 65536\n")).map_err(|e| SysError::InvalidInput {
        what: "map",
        reason: e.to_string(),
    })?;
    let argv = [TRUE.as_ptr(), std::ptr::null()];
    let envp: [*const libc::c_char; 1] = [std::ptr::null()];
    let mut fds = [0; 2];
    // SAFETY: a live array of two fds.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(SysError::syscall("pipe2", Errno::last()));
    }
    let [rd, wr] = fds;
    // SAFETY: a fork-like clone (no new stack, no CLONE_VM) returns twice; the child only calls
    // close, read, execve and _exit (async-signal-safe) on fds and arrays prepared before it.
    let pid = unsafe {
        libc::syscall(
            libc::SYS_clone,
            (libc::CLONE_NEWUSER | libc::SIGCHLD) as libc::c_ulong,
            0usize,
            0usize,
            0usize,
            0usize,
        )
    } as libc::pid_t;
    if pid == 0 {
        let mut byte = 0u8;
        // SAFETY: our own fds and a live byte; on failure the child leaves at once.
        unsafe {
            libc::close(wr);
            if libc::read(rd, (&raw mut byte).cast(), 1) != 1 {
                libc::_exit(EXIT_WAIT_FOR_MAPS);
            }
        }
        // SAFETY: live NUL-terminated strings and NULL-terminated arrays; we are the child.
        unsafe { exec_or_exit(&argv, &envp) }
    }
    let clone_errno = Errno::last();
    // SAFETY: our own fd, closed once.
    unsafe { libc::close(rd) };
    if pid < 0 {
        // SAFETY: our own fd, closed once.
        unsafe { libc::close(wr) };
        return Err(SysError::syscall("clone(CLONE_NEWUSER)", clone_errno));
    }
    let mut result = Ok(());
    for (file, data) in [
        ("setgroups", c"allow".to_bytes()),
        ("uid_map", map.to_bytes()),
        ("gid_map", map.to_bytes()),
    ] {
        let path = format!("/proc/{pid}/{file}");
        if let Err(e) = std::fs::write(&path, data) {
            result = Err(SysError::io_path("write", path, &e));
            break;
        }
    }
    if result.is_ok() {
        // SAFETY: our own fd and a live byte.
        if unsafe { libc::write(wr, [1u8].as_ptr().cast(), 1) } != 1 {
            result = Err(SysError::process("write (wake-up)", pid, Errno::last()));
        }
    }
    // SAFETY: our own fd, closed once; without the byte the child's read sees EOF and it exits.
    unsafe { libc::close(wr) };
    let waited = wait_true(pid);
    result.and(waited)
}

/// `unshare --user --map-root-user /bin/true`, run as a command (util-linux): what a shell
/// script would do, process start of `unshare` itself included.
pub fn unshare_command_true() -> Result<()> {
    let status = std::process::Command::new("unshare")
        .args(["--user", "--map-root-user", "/bin/true"])
        .status()
        .map_err(|e| SysError::io_path("spawn", "unshare", &e))?;
    if status.success() {
        Ok(())
    } else {
        Err(SysError::InvalidInput {
            what: "unshare command",
            reason: format!("exited with {status}"),
        })
    }
}

/// execve `/bin/true`; `_exit` when that fails.
///
/// # Safety
/// Only in a freshly forked child; the arrays hold live NUL-terminated strings and end in NULL.
unsafe fn exec_or_exit(argv: &[*const libc::c_char], envp: &[*const libc::c_char]) -> ! {
    // SAFETY: the caller's contract.
    unsafe {
        libc::execve(TRUE.as_ptr(), argv.as_ptr(), envp.as_ptr());
        libc::_exit(EXIT_EXECVE)
    }
}

/// Reaps our child `pid`: Ok when `/bin/true` exited 0.
fn wait_true(pid: libc::pid_t) -> Result<()> {
    let mut status = 0;
    let r = loop {
        // SAFETY: a live status int; `pid` is our own child.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        if r >= 0 || Errno::last() != Errno::EINTR {
            break r;
        }
    };
    if r != pid {
        return Err(SysError::process("waitpid", pid, Errno::last()));
    }
    if status == 0 {
        return Ok(());
    }
    let step = match libc::WIFEXITED(status).then(|| libc::WEXITSTATUS(status)) {
        Some(EXIT_WAIT_FOR_MAPS) => ChildStep::WaitForMaps,
        Some(EXIT_SETNS) => ChildStep::Setns,
        _ => ChildStep::Execve,
    };
    Err(SysError::ChildSetup {
        pid,
        program: format!("{TRUE:?} (wait status {status:#x})"),
        step,
        source: Errno::UnknownErrno,
    })
}
