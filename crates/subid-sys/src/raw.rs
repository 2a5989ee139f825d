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

/// `struct clone_args` of clone3(2), up to `cgroup` (`CLONE_ARGS_SIZE_VER2`, 88 bytes).
#[repr(C)]
#[derive(Debug, Default)]
pub(crate) struct CloneArgs {
    pub flags: u64,
    pub pidfd: u64,
    pub child_tid: u64,
    pub parent_tid: u64,
    pub exit_signal: u64,
    pub stack: u64,
    pub stack_size: u64,
    pub tls: u64,
    pub set_tid: u64,
    pub set_tid_size: u64,
    pub cgroup: u64,
}

/// `CLONE_INTO_CGROUP` (Linux >= 5.7): start the child in the cgroup2 directory `args.cgroup`.
pub(crate) const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;

/// `clone3(args)` whose child calls `f(arg)` on the stack `args.stack..+stack_size` and then
/// `exit`s with its result (`f` normally never returns: it execs or calls `exit_group`).
/// Returns the child's pid in the caller, or the errno.
///
/// clone3 has no glibc wrapper usable here: the child resumes after the system call with the
/// new stack pointer and none of the caller's stack frames, so it must branch to `f` in the
/// same assembly block, touching no memory of the caller's frame.
///
/// # Safety
/// `args` must describe a live stack the child may use, 16-byte aligned at its top; `f` must be
/// safe to run as the child (raw system calls only when `CLONE_VM`); any pointers in `args` live.
#[cfg(target_arch = "x86_64")]
pub(crate) unsafe fn clone3_run(
    args: &CloneArgs,
    f: extern "C" fn(*mut libc::c_void) -> libc::c_int,
    arg: *mut libc::c_void,
) -> Result<i32, i32> {
    let ret: isize;
    // SAFETY: the x86_64 system call convention as in `syscall6`. In the child (rax == 0) the
    // kernel has set rsp to the top of the new stack; r12/r13 hold `arg` and `f` (the child
    // gets a copy of every register); it calls `f` with a 16-byte aligned stack and then
    // `exit`s (60), never falling through. The parent continues after label 2.
    unsafe {
        core::arch::asm!(
            "syscall",
            "test rax, rax",
            "jnz 2f",
            "xor ebp, ebp",
            "mov rdi, r12",
            "call r13",
            "mov edi, eax",
            "mov eax, 60",
            "syscall",
            "ud2",
            "2:",
            inlateout("rax") libc::SYS_clone3 as isize => ret,
            in("rdi") args as *const CloneArgs as usize,
            in("rsi") core::mem::size_of::<CloneArgs>(),
            in("r12") arg as usize,
            in("r13") f as usize,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
    }
    if (-4095..0).contains(&ret) {
        Err((-ret) as i32)
    } else {
        Ok(ret as i32)
    }
}

/// `clone3(args)` running `f(arg)` in the child; see the x86_64 version. (Not yet run on
/// aarch64 hardware.)
///
/// # Safety
/// As for the x86_64 version.
#[cfg(target_arch = "aarch64")]
pub(crate) unsafe fn clone3_run(
    args: &CloneArgs,
    f: extern "C" fn(*mut libc::c_void) -> libc::c_int,
    arg: *mut libc::c_void,
) -> Result<i32, i32> {
    let ret: isize;
    // SAFETY: the aarch64 system call convention as in `syscall6`. In the child (x0 == 0) sp is
    // the new stack's top; x9/x10 (copied into the child) hold `arg` and `f`; it calls `f` and
    // then `exit`s (93), never falling through. The parent continues after label 2.
    unsafe {
        core::arch::asm!(
            "svc 0",
            "cbnz x0, 2f",
            "mov x29, xzr",
            "mov x0, x9",
            "blr x10",
            "mov x8, #93",
            "svc 0",
            "brk #0",
            "2:",
            in("x8") libc::SYS_clone3,
            inlateout("x0") args as *const CloneArgs as usize => ret,
            in("x1") core::mem::size_of::<CloneArgs>(),
            in("x9") arg as usize,
            in("x10") f as usize,
            lateout("x30") _,
            options(nostack),
        );
    }
    if (-4095..0).contains(&ret) {
        Err((-ret) as i32)
    } else {
        Ok(ret as i32)
    }
}
