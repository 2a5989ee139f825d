//! Raw system calls for the code that runs between `clone` and `execve`.
//!
//! The children of this crate share the daemon's memory (`CLONE_VM`), and the namespace's first
//! member runs at the same time as the daemon's threads. The libc wrappers write `errno`, which
//! lives in the *daemon thread's* TLS, and glibc's `setresuid`/`setgroups` signal every thread of
//! the daemon (nptl "setxid" broadcast). So the child side issues system calls itself: no errno,
//! no locks, no allocation (signal-safety(7), vfork(2) NOTES).

use libc::c_long;

/// A system call with six arguments; returns the kernel's raw answer (`-errno` on failure).
///
/// # Safety
/// The arguments must be valid for system call `nr` (pointers to live memory of the right shape).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) unsafe fn syscall6(nr: c_long, a: [usize; 6]) -> isize {
    let ret: isize;
    // SAFETY: the x86_64 Linux system call convention (syscall(2)): number in rax, arguments in
    // rdi, rsi, rdx, r10, r8, r9; rcx and r11 are clobbered; the kernel touches no user stack.
    // Argument validity is the caller's contract.
    unsafe {
        core::arch::asm!(
            "syscall",
            inlateout("rax") nr as isize => ret,
            in("rdi") a[0],
            in("rsi") a[1],
            in("rdx") a[2],
            in("r10") a[3],
            in("r8") a[4],
            in("r9") a[5],
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
    }
    ret
}

/// A system call with six arguments; returns the kernel's raw answer (`-errno` on failure).
///
/// # Safety
/// The arguments must be valid for system call `nr` (pointers to live memory of the right shape).
#[cfg(target_arch = "aarch64")]
#[inline(always)]
pub(crate) unsafe fn syscall6(nr: c_long, a: [usize; 6]) -> isize {
    let ret: isize;
    // SAFETY: the aarch64 Linux system call convention (syscall(2)): number in x8, arguments in
    // x0..x5, result in x0. Argument validity is the caller's contract.
    unsafe {
        core::arch::asm!(
            "svc 0",
            in("x8") nr,
            inlateout("x0") a[0] => ret,
            in("x1") a[1],
            in("x2") a[2],
            in("x3") a[3],
            in("x4") a[4],
            in("x5") a[5],
            options(nostack),
        );
    }
    ret
}

#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
compile_error!("subid-sys issues raw system calls in children; port `raw::syscall6` to this arch");

/// `syscall6` with `Result`: `Ok(value)` or `Err(errno)`.
///
/// # Safety
/// As for [`syscall6`].
#[inline(always)]
pub(crate) unsafe fn sys(nr: c_long, a: [usize; 6]) -> Result<usize, i32> {
    // SAFETY: forwarded contract.
    let r = unsafe { syscall6(nr, a) };
    if (-4095..0).contains(&r) {
        Err((-r) as i32)
    } else {
        Ok(r as usize)
    }
}
