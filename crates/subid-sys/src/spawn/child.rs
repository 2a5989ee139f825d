//! The code that runs in a child between `clone` and `execve`, and nothing else: the spawned
//! process (`child_main`), the namespace creator (`creator_main`) and the v1 lease spawner
//! (`helper_main`), with the plain-data plans they read.
//!
//! Everything here runs in a task that shares the daemon's memory (`CLONE_VM`) while the daemon's
//! threads go on, so it must be async-signal-safe (signal-safety(7)): no allocation, no locks, no
//! logging, no libc wrappers that touch errno or broadcast to the daemon's threads; only the raw
//! system calls of [`crate::raw`] on data prepared before the clone. Audit this file alone for
//! that rule; the daemon side of a spawn is in `run.rs`.

use std::convert::Infallible;

use libc::{c_char, c_int, c_void};

use super::RawRlimit;
use crate::error::ChildStep;
use crate::raw::{CLONE_INTO_CGROUP, CloneArgs, clone3_run, sys};

/// The child's instructions. Plain data and raw pointers into a [`super::Prepared`] that outlives the
/// child's use of it.
#[repr(C)]
pub(crate) struct ChildPlan {
    pub(crate) program: *const c_char,
    pub(crate) argv: *const *const c_char,
    pub(crate) envp: *const *const c_char,
    pub(crate) cwd: *const c_char,
    pub(crate) uid: u32,
    pub(crate) gid: u32,
    pub(crate) groups: *const u32,
    pub(crate) ngroups: usize,
    pub(crate) umask: u32,
    pub(crate) rlimits: *const RawRlimit,
    pub(crate) nrlimits: usize,
    pub(crate) stdio: [c_int; 3],
    pub(crate) err_fd: c_int,
    /// Join: the namespaces to `setns` into, in order (user first), and their types.
    pub(crate) join_fds: [c_int; 5],
    pub(crate) join_types: [c_int; 5],
    pub(crate) njoin: usize,
    /// Create: bring up loopback in the new network namespace.
    pub(crate) loopback: bool,
    /// Create: read one byte from here before going on; -1 otherwise.
    pub(crate) wake_rd: c_int,
    /// False for a namespace holder that only exits once the maps are written and pinned.
    pub(crate) exec: bool,
}

/// The namespace creator's instructions and its answers (written by A before it exits; the
/// daemon reads them once A's pidfd says it has).
#[repr(C)]
pub(crate) struct CreatorPlan {
    pub(crate) uid_base: u32,
    pub(crate) gid_base: u32,
    pub(crate) nproc_limit: u64,
    pub(crate) has_nproc_limit: bool,
    /// `CLONE_NEW*` flags of the optional namespaces, made together with the user namespace.
    pub(crate) extra_flags: c_int,
    /// B's stack as clone3 takes it: lowest address and size.
    pub(crate) b_stack_lo: *mut c_void,
    pub(crate) b_stack_size: usize,
    pub(crate) b_plan: *const ChildPlan,
    pub(crate) b_pidfd: c_int,
    pub(crate) b_pid: c_int,
    /// v2: the lease cgroup's directory; B is made there with `clone3(CLONE_INTO_CGROUP)`.
    pub(crate) cgroup_dir: c_int,
    pub(crate) step: u32,
    pub(crate) errno: i32,
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: c_int,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// `_LINUX_CAPABILITY_VERSION_3` (capget(2)): two `CapData` words.
const CAP_V3: u32 = 0x2008_0522;

type Step<T> = std::result::Result<T, (ChildStep, i32)>;

fn at<T>(step: ChildStep, r: std::result::Result<T, i32>) -> Step<T> {
    r.map_err(|e| (step, e))
}

/// Reads this thread's capability sets (capget), applies `edit` to both words, and writes them
/// back (capset): raw syscalls on stack data only, safe between clone and exec.
fn edit_caps(edit: impl Fn(&mut CapData)) -> std::result::Result<(), i32> {
    let hdr = CapHeader {
        version: CAP_V3,
        pid: 0,
    };
    let mut caps = [CapData {
        effective: 0,
        permitted: 0,
        inheritable: 0,
    }; 2];
    // SAFETY: a live v3 header and two live data words.
    unsafe {
        sys(
            libc::SYS_capget,
            [
                &hdr as *const _ as usize,
                caps.as_mut_ptr() as usize,
                0,
                0,
                0,
                0,
            ],
        )
    }?;
    for c in &mut caps {
        edit(c);
    }
    // SAFETY: as above.
    unsafe {
        sys(
            libc::SYS_capset,
            [
                &hdr as *const _ as usize,
                caps.as_ptr() as usize,
                0,
                0,
                0,
                0,
            ],
        )
    }?;
    Ok(())
}

/// Entry of B and C. Never returns: `execve` or `exit_group`.
pub(crate) extern "C" fn child_main(arg: *mut c_void) -> c_int {
    // SAFETY: `arg` is the `ChildPlan` the daemon passed to clone; it stays alive and unchanged
    // until this child has exec'd or exited (the daemon waits for the error pipe's EOF, or for
    // the child's exit, before dropping it, and leaks it if neither can be confirmed).
    let plan = unsafe { &*(arg as *const ChildPlan) };
    let mut err_fd = plan.err_fd;
    // SAFETY: raw system calls on the plan's live data; see `child_steps`.
    let failure = unsafe { child_steps(plan, &mut err_fd) };
    let code = match failure {
        Ok(done) => done,
        Err((step, errno)) => {
            let msg: [u32; 2] = [step as u32, errno as u32];
            // SAFETY: writes 8 bytes of a live local array to a pipe fd.
            let _ = unsafe {
                sys(
                    libc::SYS_write,
                    [err_fd as usize, msg.as_ptr() as usize, 8, 0, 0, 0],
                )
            };
            127
        }
    };
    // SAFETY: ends this child's thread group only (it shares no thread group with the daemon).
    unsafe { sys(libc::SYS_exit_group, [code as usize, 0, 0, 0, 0, 0]) }.ok();
    code
}

/// The child's steps. `Ok(code)` means exit with `code` without exec (a namespace holder).
///
/// # Safety
/// Runs in a `CLONE_VM` child: only raw system calls, no allocation, nothing that touches the
/// daemon's TLS or locks. All pointers in `p` are live.
unsafe fn child_steps(p: &ChildPlan, err_fd: &mut c_int) -> Step<c_int> {
    use ChildStep::*;
    // First, while no tenant can signal us yet (host root, or alone in a new namespace), let
    // go of the copy of the daemon's fd table the clone gave us.
    // SAFETY: raw close_range calls on integers.
    unsafe { drop_foreign_fds(p) }?;
    // Default dispositions everywhere. Signals stay blocked (inherited from the daemon's thread)
    // until just before execve, so no handler of the daemon can ever run on this side.
    let dfl = [0u64; 4]; // struct k_sigaction with sa_handler = SIG_DFL, no flags, empty mask
    for sig in 1..=64usize {
        if sig == libc::SIGKILL as usize || sig == libc::SIGSTOP as usize {
            continue;
        }
        // SAFETY: a live, zeroed kernel sigaction; sigsetsize 8.
        at(ResetSignals, unsafe {
            sys(
                libc::SYS_rt_sigaction,
                [sig, dfl.as_ptr() as usize, 0, 8, 0, 0],
            )
        })?;
    }
    if p.loopback {
        // SAFETY: raw socket and ioctl calls on live locals.
        unsafe { loopback_up() }.map_err(|e| (Loopback, e))?;
    }
    if p.wake_rd >= 0 {
        // Our copy of the wake pipe's write end went with the daemon's other fds, so the
        // daemon's death reads as EOF.
        let mut byte = 0u8;
        loop {
            // SAFETY: reads one byte into a live local.
            let r = unsafe {
                sys(
                    libc::SYS_read,
                    [
                        p.wake_rd as usize,
                        &mut byte as *mut u8 as usize,
                        1,
                        0,
                        0,
                        0,
                    ],
                )
            };
            match r {
                Ok(1) => break,
                Ok(_) => return Err((WaitForMaps, libc::ECANCELED)),
                Err(libc::EINTR) => continue,
                Err(e) => return Err((WaitForMaps, e)),
            }
        }
        // SAFETY: our own fd.
        let _ = unsafe { sys(libc::SYS_close, [p.wake_rd as usize, 0, 0, 0, 0, 0]) };
    }
    if !p.exec {
        return Ok(0);
    }
    // SAFETY: the plan's live rlimit array.
    unsafe { apply_rlimits(p, ChildStep::Rlimit) }?;
    // The user namespace first: it owns the others, so afterwards we hold the capabilities
    // their setns needs (setns(2)).
    for (fd, nstype) in p.join_fds.iter().zip(p.join_types).take(p.njoin) {
        // SAFETY: integer arguments.
        at(Setns, unsafe {
            sys(libc::SYS_setns, [*fd as usize, nstype as usize, 0, 0, 0, 0])
        })?;
    }
    // SAFETY: no arguments.
    at(Setsid, unsafe { sys(libc::SYS_setsid, [0; 6]) })?;

    // Clear the inheritable set (the ambient set goes next).
    at(ClearInheritable, edit_caps(|c| c.inheritable = 0))?;
    // SAFETY: integer arguments.
    at(ClearAmbient, unsafe {
        sys(
            libc::SYS_prctl,
            [
                libc::PR_CAP_AMBIENT as usize,
                libc::PR_CAP_AMBIENT_CLEAR_ALL as usize,
                0,
                0,
                0,
                0,
            ],
        )
    })?;
    // SAFETY: `groups` holds `ngroups` gids (or is unused when 0).
    at(Setgroups, unsafe {
        sys(
            libc::SYS_setgroups,
            [p.ngroups, p.groups as usize, 0, 0, 0, 0],
        )
    })?;
    let (g, u) = (p.gid as usize, p.uid as usize);
    // SAFETY: integer arguments; raw, so only this task changes (no nptl broadcast).
    at(Setresgid, unsafe {
        sys(libc::SYS_setresgid, [g, g, g, 0, 0, 0])
    })?;
    // SAFETY: as above.
    at(Setresuid, unsafe {
        sys(libc::SYS_setresuid, [u, u, u, 0, 0, 0])
    })?;
    // SAFETY: integer argument; cannot fail.
    let _ = unsafe { sys(libc::SYS_umask, [p.umask as usize, 0, 0, 0, 0, 0]) };
    // SAFETY: a live NUL-terminated path.
    at(Chdir, unsafe {
        sys(libc::SYS_chdir, [p.cwd as usize, 0, 0, 0, 0, 0])
    })?;

    // Move every fd we need above 2 first, so that dup3 onto 0..2 cannot clobber a source.
    let dup_high = |fd: c_int| {
        // SAFETY: integer arguments.
        unsafe {
            sys(
                libc::SYS_fcntl,
                [fd as usize, libc::F_DUPFD_CLOEXEC as usize, 3, 0, 0, 0],
            )
        }
    };
    *err_fd = at(Stdio, dup_high(*err_fd))? as c_int;
    let mut high = [0usize; 3];
    for (slot, fd) in high.iter_mut().zip(p.stdio) {
        *slot = at(Stdio, dup_high(fd))?;
    }
    for (target, fd) in high.into_iter().enumerate() {
        // SAFETY: integer arguments; flags 0 clears close-on-exec on the target.
        at(Stdio, unsafe {
            sys(libc::SYS_dup3, [fd, target, 0, 0, 0, 0])
        })?;
    }
    // Everything from 3 up closes at execve; the error pipe stays usable until then.
    // SAFETY: integer arguments.
    at(CloseRange, unsafe {
        sys(
            libc::SYS_close_range,
            [
                3,
                u32::MAX as usize,
                libc::CLOSE_RANGE_CLOEXEC as usize,
                0,
                0,
                0,
            ],
        )
    })?;
    let empty: u64 = 0;
    // SAFETY: a live empty sigset, sigsetsize 8.
    at(SignalMask, unsafe {
        sys(
            libc::SYS_rt_sigprocmask,
            [
                libc::SIG_SETMASK as usize,
                &empty as *const u64 as usize,
                0,
                8,
                0,
                0,
            ],
        )
    })?;
    // SAFETY: live NUL-terminated path and NULL-terminated pointer arrays.
    let r = unsafe {
        sys(
            libc::SYS_execve,
            [
                p.program as usize,
                p.argv as usize,
                p.envp as usize,
                0,
                0,
                0,
            ],
        )
    };
    let errno = match r {
        Ok(_) => 0, // execve does not return on success
        Err(e) => e,
    };
    let never: Step<Infallible> = Err((Execve, errno));
    never.map(|n| match n {})
}

/// Closes every fd of the child's own table (a copy of the daemon's: no child of the daemon is
/// cloned with `CLONE_FILES`) but the few the plan names: its error pipe, stdio and the
/// namespaces it joins, and the wake pipe's read end. Once the child has joined a lease's user
/// namespace the lease's root may `SIGSTOP` it (kill(2)); a child stopped holding the daemon's
/// fds would keep, until its deadline, other spawns' error pipes open (so their children's
/// exec would never read as EOF: a tenant could make every other lease's spawns time out) and
/// connections the daemon has closed. Sorted into a fixed array on the stack, then one
/// `close_range` per gap; nothing allocates.
///
/// # Safety
/// Raw system calls on integers only.
unsafe fn drop_foreign_fds(p: &ChildPlan) -> Step<()> {
    let mut keep = [-1 as c_int; 10];
    let mut n = 0;
    let wanted = [p.err_fd, p.wake_rd]
        .into_iter()
        .chain(p.stdio)
        .chain(p.join_fds.into_iter().take(p.njoin));
    for fd in wanted {
        if fd >= 0 && n < keep.len() {
            keep[n] = fd;
            n += 1;
        }
    }
    let keep = &mut keep[..n];
    keep.sort_unstable();
    let mut next: c_int = 0;
    for &fd in keep.iter() {
        if fd > next {
            // SAFETY: integer arguments.
            at(ChildStep::DropFds, unsafe {
                sys(
                    libc::SYS_close_range,
                    [next as usize, (fd - 1) as usize, 0, 0, 0, 0],
                )
            })?;
        }
        next = next.max(fd + 1);
    }
    // SAFETY: integer arguments.
    at(ChildStep::DropFds, unsafe {
        sys(
            libc::SYS_close_range,
            [next as usize, u32::MAX as usize, 0, 0, 0, 0],
        )
    })?;
    Ok(())
}

/// Brings `lo` up in the caller's network namespace, as `ip link set lo up` would
/// (netdevice(7): `SIOCGIFFLAGS`, then `SIOCSIFFLAGS` with `IFF_UP`).
///
/// # Safety
/// Raw system calls on live locals only.
unsafe fn loopback_up() -> std::result::Result<(), i32> {
    // SAFETY: integer arguments.
    let sock = unsafe {
        sys(
            libc::SYS_socket,
            [
                libc::AF_INET as usize,
                (libc::SOCK_DGRAM | libc::SOCK_CLOEXEC) as usize,
                0,
                0,
                0,
                0,
            ],
        )
    }?;
    // struct ifreq: 16 bytes of name, then a union whose first short is ifr_flags.
    let mut ifr = [0u8; 40];
    ifr[0] = b'l';
    ifr[1] = b'o';
    // SAFETY: a live ifreq-sized buffer.
    let got = unsafe {
        sys(
            libc::SYS_ioctl,
            [
                sock,
                libc::SIOCGIFFLAGS as usize,
                ifr.as_mut_ptr() as usize,
                0,
                0,
                0,
            ],
        )
    };
    let set = got.and_then(|_| {
        let flags = i16::from_ne_bytes([ifr[16], ifr[17]]) | libc::IFF_UP as i16;
        let [lo, hi] = flags.to_ne_bytes();
        ifr[16] = lo;
        ifr[17] = hi;
        // SAFETY: as above.
        unsafe {
            sys(
                libc::SYS_ioctl,
                [
                    sock,
                    libc::SIOCSIFFLAGS as usize,
                    ifr.as_ptr() as usize,
                    0,
                    0,
                    0,
                ],
            )
        }
    });
    // SAFETY: our own socket.
    let _ = unsafe { sys(libc::SYS_close, [sock, 0, 0, 0, 0, 0]) };
    set.map(|_| ())
}

/// cgroup v1: moves the calling process (the lease spawner) into the cgroup whose
/// `cgroup.procs` is open as `fd` (`-1`: nothing to do) by writing `0`, which names the writer
/// (cgroups(7)). One raw `write(2)`; the kernel's attach waits for an RCU grace period.
///
/// # Safety
/// Raw system calls on a live local only.
unsafe fn join_cgroup(fd: c_int, step: ChildStep) -> Step<()> {
    if fd < 0 {
        return Ok(());
    }
    let zero = b'0';
    // SAFETY: writes one byte of a live local.
    let n = at(step, unsafe {
        sys(
            libc::SYS_write,
            [fd as usize, &zero as *const u8 as usize, 1, 0, 0, 0],
        )
    })?;
    if n == 1 {
        Ok(())
    } else {
        Err((step, libc::EIO))
    }
}

/// `prlimit64` on the calling task for each of the plan's limits. Setting a limit needs no
/// privilege unless it raises a hard limit (CAP_SYS_RESOURCE in the initial namespace).
///
/// # Safety
/// `p.rlimits` holds `p.nrlimits` live entries (or `nrlimits` is 0). Raw system calls only.
unsafe fn apply_rlimits(p: &ChildPlan, step: ChildStep) -> Step<()> {
    for i in 0..p.nrlimits {
        // SAFETY: `i < nrlimits`, the length of the live array.
        let rl = unsafe { &*p.rlimits.add(i) };
        // SAFETY: prlimit64 on ourselves (pid 0) with a live new-limit struct.
        at(step, unsafe {
            sys(
                libc::SYS_prlimit64,
                [0, rl.resource as usize, rl.limit.as_ptr() as usize, 0, 0, 0],
            )
        })?;
    }
    Ok(())
}

/// Entry of A, the namespace creator. Returns to glibc's clone trampoline, which calls `exit`.
pub(crate) extern "C" fn creator_main(arg: *mut c_void) -> c_int {
    // SAFETY: `arg` is the daemon's `CreatorPlan`; the daemon's thread sleeps (vfork) until A
    // exits, so A has it to itself.
    let plan = unsafe { &mut *(arg as *mut CreatorPlan) };
    // SAFETY: raw system calls on live data; see `creator_steps`.
    match unsafe { creator_steps(plan) } {
        Ok(()) => 0,
        Err((step, errno)) => {
            plan.step = step as u32;
            plan.errno = errno;
            1
        }
    }
}

/// # Safety
/// Runs in a `CLONE_VM` child: raw system calls only, on live data.
unsafe fn creator_steps(p: &mut CreatorPlan) -> Step<()> {
    use ChildStep::*;
    // A itself stays out of the lease's cgroups: B is born in the cgroup2 one
    // (`CLONE_INTO_CGROUP`) and moved into a v1 one by the daemon before it is woken.
    // B inherits A's limits. A sets them while it is still host root with the daemon's
    // capabilities, so a hard limit may go up here, which B (capable only inside its new
    // namespace) could not do; B sets them again itself, which then changes nothing but the
    // soft RLIMIT_NPROC lowered below.
    // SAFETY: `b_plan` is the daemon's live plan.
    unsafe { apply_rlimits(&*p.b_plan, Rlimit) }?;
    if p.has_nproc_limit {
        // The namespace's process cap is its creator's soft RLIMIT_NPROC at creation
        // (kernel >= 5.14, `enforced_nproc_rlimit`); lowering a soft limit needs no privilege.
        let mut limit = [0u64; 2];
        // SAFETY: prlimit64 reading our own limit into a live array.
        at(CreatorNproc, unsafe {
            sys(
                libc::SYS_prlimit64,
                [
                    0,
                    libc::RLIMIT_NPROC as usize,
                    0,
                    limit.as_mut_ptr() as usize,
                    0,
                    0,
                ],
            )
        })?;
        limit[0] = p.nproc_limit.min(limit[1]);
        // SAFETY: prlimit64 on ourselves with a live struct.
        at(CreatorNproc, unsafe {
            sys(
                libc::SYS_prlimit64,
                [
                    0,
                    libc::RLIMIT_NPROC as usize,
                    limit.as_ptr() as usize,
                    0,
                    0,
                    0,
                ],
            )
        })?;
    }
    // SAFETY: integer arguments.
    at(CreatorKeepCaps, unsafe {
        sys(
            libc::SYS_prctl,
            [libc::PR_SET_KEEPCAPS as usize, 1, 0, 0, 0, 0],
        )
    })?;
    // SAFETY: zero groups.
    at(CreatorSetgroups, unsafe {
        sys(libc::SYS_setgroups, [0; 6])
    })?;
    let (g, u) = (p.gid_base as usize, p.uid_base as usize);
    // SAFETY: integer arguments; raw, so only A's creds change.
    at(CreatorSetresgid, unsafe {
        sys(libc::SYS_setresgid, [g, g, g, 0, 0, 0])
    })?;
    // SAFETY: as above. KEEPCAPS keeps the permitted set; the effective set is cleared.
    at(CreatorSetresuid, unsafe {
        sys(libc::SYS_setresuid, [u, u, u, 0, 0, 0])
    })?;
    at(CreatorCapset, edit_caps(|c| c.effective = c.permitted))?;
    // The optional namespaces are created after the user namespace in the same clone, so the
    // new user namespace owns them (clone(2)); none of them conflicts with CLONE_VM.
    let flags = libc::CLONE_VM
        | libc::CLONE_NEWUSER
        | libc::CLONE_PARENT
        | libc::CLONE_PIDFD
        | p.extra_flags;
    // cgroup2: B is born in the lease cgroup (`CLONE_INTO_CGROUP`); A has CAP_DAC_OVERRIDE in
    // its effective set (raised above), which the attach permission check asks for.
    let into = if p.cgroup_dir >= 0 {
        CLONE_INTO_CGROUP
    } else {
        0
    };
    let args = CloneArgs {
        flags: (flags as u64) | into,
        pidfd: &mut p.b_pidfd as *mut c_int as u64,
        // clone3 refuses an exit signal with CLONE_PARENT (EINVAL): B takes A's, SIGCHLD.
        exit_signal: 0,
        stack: p.b_stack_lo as u64,
        stack_size: p.b_stack_size as u64,
        cgroup: if p.cgroup_dir >= 0 {
            p.cgroup_dir as u64
        } else {
            0
        },
        ..CloneArgs::default()
    };
    // SAFETY: B runs `child_main` on its own stack with the daemon's live `ChildPlan`; the
    // kernel writes B's pidfd into `b_pidfd` (in the daemon's fd table, CLONE_FILES).
    let pid = unsafe { clone3_run(&args, child_main, p.b_plan as *mut c_void) }
        .map_err(|e| (CreatorClone3, e))?;
    p.b_pid = pid;
    Ok(())
}

/// The helper's start-up data.
#[repr(C)]
#[derive(Debug)]
pub(crate) struct HelperPlan {
    pub(crate) procs_fd: c_int,
    pub(crate) req_rd: c_int,
    pub(crate) resp_wr: c_int,
    /// A pidfd of the daemon (owned by the daemon), readable once it has exited.
    pub(crate) daemon_fd: c_int,
}

/// One request, in the requesting daemon thread's memory; answered once the child is cloned (not
/// once it has exec'd: the daemon waits for that itself, with a deadline).
#[repr(C)]
pub(crate) struct HelperRequest {
    pub(crate) plan: *const ChildPlan,
    pub(crate) stack_lo: *mut c_void,
    pub(crate) stack_size: usize,
    /// cgroup2 directory the child is born in (`CLONE_INTO_CGROUP`), -1 for none.
    pub(crate) cgroup_dir: c_int,
    pub(crate) pidfd: c_int,
    pub(crate) pid: c_int,
    pub(crate) errno: c_int,
}

/// Entry of the lease spawner; returns (to `clone3_run`, which exits) at EOF or daemon exit.
pub(crate) extern "C" fn helper_main(arg: *mut c_void) -> c_int {
    // SAFETY: `arg` is the spawner's `HelperPlan`, alive until this process has exited.
    let p = unsafe { &*(arg as *const HelperPlan) };
    let answer = |v: i32| {
        let b = v.to_ne_bytes();
        // SAFETY: writes 4 bytes of a live local to our pipe.
        let _ = unsafe {
            sys(
                libc::SYS_write,
                [p.resp_wr as usize, b.as_ptr() as usize, 4, 0, 0, 0],
            )
        };
    };
    // SAFETY: raw write of a live local.
    if let Err((_, e)) = unsafe { join_cgroup(p.procs_fd, ChildStep::JoinCgroup) } {
        answer(e);
        return 1;
    }
    let daemon = p.daemon_fd;
    answer(0);
    loop {
        let mut fds = [
            libc::pollfd {
                fd: p.req_rd,
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: daemon,
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: two live pollfds, no timeout, no signal mask change.
        match unsafe { sys(libc::SYS_ppoll, [fds.as_mut_ptr() as usize, 2, 0, 0, 8, 0]) } {
            Ok(_) => {}
            Err(libc::EINTR) => continue,
            Err(_) => break,
        }
        if fds[1].revents != 0 || fds[0].revents == 0 {
            break; // the daemon has exited
        }
        let mut ptr = [0u8; 8];
        // SAFETY: reads 8 bytes into a live local.
        match unsafe {
            sys(
                libc::SYS_read,
                [p.req_rd as usize, ptr.as_mut_ptr() as usize, 8, 0, 0, 0],
            )
        } {
            Ok(8) => {}
            Err(libc::EINTR) => continue,
            _ => break, // EOF: the spawner was dropped
        }
        // SAFETY: the daemon wrote the address of a live `HelperRequest`, which it keeps
        // unchanged until our answer.
        let req = unsafe { &mut *(usize::from_ne_bytes(ptr) as *mut HelperRequest) };
        let into = if req.cgroup_dir >= 0 {
            CLONE_INTO_CGROUP
        } else {
            0
        };
        let args = CloneArgs {
            flags: (libc::CLONE_VM | libc::CLONE_PARENT | libc::CLONE_PIDFD) as u64 | into,
            pidfd: &mut req.pidfd as *mut c_int as u64,
            // With CLONE_PARENT the child takes our exit signal (SIGCHLD); clone3 wants 0.
            exit_signal: 0,
            stack: req.stack_lo as u64,
            stack_size: req.stack_size as u64,
            cgroup: if req.cgroup_dir >= 0 {
                req.cgroup_dir as u64
            } else {
                0
            },
            ..CloneArgs::default()
        };
        // SAFETY: the child runs `child_main` on the request's stack with its plan; the daemon
        // keeps both alive until the child has exec'd or exited (it waits for that itself,
        // after our answer, and kills the child at its deadline).
        match unsafe { clone3_run(&args, child_main, req.plan as *mut c_void) } {
            Ok(pid) => req.pid = pid,
            Err(e) => req.errno = e,
        }
        answer(0);
    }
    0
}
