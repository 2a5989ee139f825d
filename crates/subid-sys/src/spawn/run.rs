//! The daemon's side of a spawn: clone the child (or have the namespace creator or the lease
//! spawner clone it), then wait, with a deadline, until it has exec'd or reported a failure.
//!
//! No wait here is unbounded. Once a child has joined a lease's user namespace, the lease's root
//! may signal it (kill(2): `CAP_KILL` in the target's user namespace), so a tenant can `SIGSTOP`
//! a child half-way; and the namespace creator runs as the lease's base uid, which the lease's
//! root is too. The daemon therefore never sleeps in a `CLONE_VFORK`: it polls the child's
//! close-on-exec error pipe until the deadline, then kills the child (SIGKILL works on a stopped
//! task) and reaps it within a short grace. A child that still cannot be confirmed gone might
//! yet run on the stack and plan it was given, so those are leaked rather than freed under it
//! (the caller leaks what it lent too: see [`Spawned::leaked`]).

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::ptr;
use std::time::{Duration, Instant};

use libc::{c_int, c_void};
use nix::errno::Errno;

use super::Prepared;
use super::child::{ChildPlan, CreatorPlan, HelperRequest, child_main, creator_main};
use super::mem::{SignalsBlocked, Stack, pipe, readable_by};
use super::spawner::CgroupSpawner;
use crate::error::{ChildStep, Result, SysError};
use crate::pidfd::PidFd;
use crate::raw::{CLONE_INTO_CGROUP, CloneArgs, clone3_run};
use crate::userns::{self, LeaseNs, NsKind, UserNsSpec};

/// What a caller does between the clone and the exec (see [`super::SpawnHooks`]).
pub(crate) type Meanwhile<'a> = &'a mut dyn super::SpawnHooks;

/// How long a killed child may take to be gone before its memory is given up for lost.
const REAP_GRACE: Duration = Duration::from_secs(2);

/// A spawn's result. `leaked`: a child could not be confirmed gone after it was killed, so the
/// memory it was lent (the caller's [`Prepared`] among it) must never be freed.
#[must_use]
pub(crate) struct Spawned {
    pub result: Result<PidFd>,
    pub leaked: bool,
}

impl Spawned {
    fn failed(error: SysError) -> Self {
        Spawned {
            result: Err(error),
            leaked: false,
        }
    }
}

impl From<Result<PidFd>> for Spawned {
    fn from(result: Result<PidFd>) -> Self {
        Spawned {
            result,
            leaked: false,
        }
    }
}

/// The plan of a child that runs `prep` (or, with `None`, a namespace holder that exits once
/// its namespace is pinned). Pointers refer into `prep`, which must outlive the child's use.
fn child_plan(prep: Option<&Prepared>, err_fd: c_int) -> Box<ChildPlan> {
    let mut plan = Box::new(ChildPlan {
        program: ptr::null(),
        argv: ptr::null(),
        envp: ptr::null(),
        cwd: ptr::null(),
        uid: 0,
        gid: 0,
        groups: ptr::null(),
        ngroups: 0,
        umask: 0o022,
        rlimits: ptr::null(),
        nrlimits: 0,
        stdio: [-1; 3],
        err_fd,
        join_fds: [-1; 5],
        join_types: [0; 5],
        njoin: 0,
        loopback: false,
        wake_rd: -1,
        exec: false,
    });
    if let Some(p) = prep {
        plan.program = p.program.as_ptr();
        plan.argv = p.argv_ptrs.as_ptr();
        plan.envp = p.env_ptrs.as_ptr();
        plan.cwd = p.cwd.as_ptr();
        plan.uid = p.uid;
        plan.gid = p.gid;
        plan.groups = p.groups.as_ptr();
        plan.ngroups = p.groups.len();
        plan.umask = p.umask;
        plan.rlimits = p.rlimits.as_ptr();
        plan.nrlimits = p.rlimits.len();
        plan.stdio = p.stdio;
        plan.exec = true;
    }
    plan
}

/// Fills the namespaces a joining child `setns`es into: the user namespace first.
fn join_plan(plan: &mut ChildPlan, ns: &LeaseNs) {
    let all = std::iter::once((NsKind::User, ns.user())).chain(ns.extra());
    for (i, (kind, fd)) in all.enumerate().take(plan.join_fds.len()) {
        plan.join_fds[i] = fd.as_raw_fd();
        plan.join_types[i] = kind.clone_flag();
        plan.njoin = i + 1;
    }
}

/// Reads the child's report once the pipe is readable: `None` at EOF without data (it exec'd, or
/// died), `Some((step, errno))` when it failed. Does not block: the 8-byte report is written in
/// one `write(2)` (atomic on a pipe) before the child exits.
fn read_report(err_r: &OwnedFd) -> Result<Option<(ChildStep, Errno)>> {
    let mut buf = [0u8; 8];
    let mut got = 0;
    while got < buf.len() {
        match nix::unistd::read(err_r, &mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(SysError::syscall("read (error pipe)", e)),
        }
    }
    if got == 0 {
        return Ok(None);
    }
    if got < buf.len() {
        return Err(SysError::syscall("read (error pipe, short)", Errno::EIO));
    }
    let step = u32::from_ne_bytes([buf[0], buf[1], buf[2], buf[3]]);
    let errno = i32::from_ne_bytes([buf[4], buf[5], buf[6], buf[7]]);
    let step = ChildStep::from_u32(step).unwrap_or(ChildStep::Execve);
    Ok(Some((step, Errno::from_raw(errno))))
}

/// SIGKILLs `child` and reaps it within [`REAP_GRACE`]; false when it is still there.
fn kill_and_reap(child: &PidFd) -> bool {
    let _ = child.send_signal(libc::SIGKILL);
    matches!(child.wait_timeout(REAP_GRACE), Ok(Some(_))) || matches!(child.is_present(), Ok(false))
}

/// Waits until `child` has exec'd (EOF on its error pipe) or reported a failure, until
/// `deadline`; a stalled child is killed. Returns the outcome and whether the child is known to
/// have left the daemon's memory (exec'd, or exited and reaped).
fn await_exec(
    child: PidFd,
    err_r: &OwnedFd,
    program: &str,
    started: Instant,
    deadline: Instant,
    meanwhile: Meanwhile<'_>,
) -> (Result<PidFd>, bool) {
    // The caller's work that needs the child but not its exec, done while the child sets itself
    // up. A panic there must not unwind past the stack and plan the child still runs on.
    let hooked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        meanwhile.cloned(&child);
        let patience = Instant::now()
            .checked_add(meanwhile.patience())
            .map_or(deadline, |p| p.min(deadline));
        // Not exec'd within the caller's patience: it lets go of what it held for the child.
        match readable_by(err_r, patience) {
            Ok(false) if patience < deadline => meanwhile.slow(),
            _ => {}
        }
    }));
    if hooked.is_err() {
        let gone = kill_and_reap(&child);
        let error = SysError::InvalidInput {
            what: "spawn",
            reason: "the caller's work between clone and exec panicked".into(),
        };
        return (Err(error), gone);
    }
    match readable_by(err_r, deadline) {
        Ok(true) => match read_report(err_r) {
            // EOF: the child exec'd (exec replaces its memory before close-on-exec fds go) or
            // exited; either way it no longer uses ours.
            Ok(None) => (Ok(child), true),
            Ok(Some((step, source))) => {
                // It exits right after its report, unless something stopped it there.
                let gone = kill_and_reap(&child);
                let error = SysError::ChildSetup {
                    pid: child.pid(),
                    program: program.to_string(),
                    step,
                    source,
                };
                (Err(error), gone)
            }
            Err(e) => {
                let gone = kill_and_reap(&child);
                (Err(e), gone)
            }
        },
        Ok(false) => {
            let gone = kill_and_reap(&child);
            let waited_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
            let error = SysError::SpawnTimeout {
                pid: child.pid(),
                program: program.to_string(),
                waited_ms,
            };
            (Err(error), gone)
        }
        Err(e) => {
            let gone = kill_and_reap(&child);
            (Err(e), gone)
        }
    }
}

/// Starts `prep` in the lease's namespaces `ns`: one child, `clone3(CLONE_VM | CLONE_PIDFD
/// [| CLONE_INTO_CGROUP])`, that `setns`es and execs.
pub(crate) fn spawn_join(
    prep: &Prepared,
    ns: &LeaseNs,
    timeout: Duration,
    meanwhile: Meanwhile<'_>,
) -> Spawned {
    let started = Instant::now();
    if prep.v1_procs() >= 0 {
        // A joining child is born in a v1 cgroup only when its spawner (already inside) clones it.
        return Spawned::failed(SysError::InvalidInput {
            what: "spawn cgroup",
            reason: "a v1 lease cgroup needs its spawner for joins".into(),
        });
    }
    let (err_r, err_w) = match pipe() {
        Ok(p) => p,
        Err(e) => return Spawned::failed(e),
    };
    let mut plan = child_plan(Some(prep), err_w.as_raw_fd());
    join_plan(&mut plan, ns);
    let stack = match Stack::new() {
        Ok(s) => s,
        Err(e) => return Spawned::failed(e),
    };
    let mut pidfd: c_int = -1;
    let (lo, size) = stack.range();
    let into = prep.v2_dir();
    let args = CloneArgs {
        flags: (libc::CLONE_VM | libc::CLONE_PIDFD) as u64
            | if into >= 0 { CLONE_INTO_CGROUP } else { 0 },
        pidfd: &mut pidfd as *mut c_int as u64,
        exit_signal: libc::SIGCHLD as u64,
        stack: lo as u64,
        stack_size: size as u64,
        cgroup: if into >= 0 { into as u64 } else { 0 },
        ..CloneArgs::default()
    };
    let cloned = match SignalsBlocked::new() {
        // SAFETY: the child runs `child_main(plan)` on `stack`; both stay alive until it has
        // exec'd or exited (`await_exec`), or are leaked if that cannot be confirmed. It issues
        // raw system calls only. The kernel stores its pidfd in `pidfd` before it runs.
        Ok(_blocked) => unsafe {
            clone3_run(&args, child_main, &*plan as *const ChildPlan as *mut c_void)
        },
        Err(e) => return Spawned::failed(e),
    };
    // The child has its own copy of the fd table: closing ours makes its exec (or exit) an EOF.
    drop(err_w);
    let pid = match cloned {
        Ok(pid) => pid,
        Err(e) => return Spawned::failed(SysError::syscall("clone3", Errno::from_raw(e))),
    };
    // SAFETY: CLONE_PIDFD gave us this fd for `pid`; nothing else owns it.
    let child = unsafe { PidFd::from_raw(pidfd, pid) };
    let program = prep.program.to_string_lossy();
    let (result, gone) = await_exec(
        child,
        &err_r,
        &program,
        started,
        started + timeout,
        meanwhile,
    );
    if !gone {
        std::mem::forget(stack);
        std::mem::forget(plan);
    }
    Spawned {
        result,
        leaked: !gone,
    }
}

/// A join through the lease's spawner (cgroup v1): as [`spawn_join`], but the spawner, which
/// sits in the lease's v1 cgroup, clones the child (`CLONE_PARENT`: still the daemon's child).
pub(crate) fn spawn_join_via(
    spawner: &CgroupSpawner,
    prep: &Prepared,
    ns: &LeaseNs,
    timeout: Duration,
    meanwhile: Meanwhile<'_>,
) -> Spawned {
    let started = Instant::now();
    let deadline = started + timeout;
    let (err_r, err_w) = match pipe() {
        Ok(p) => p,
        Err(e) => return Spawned::failed(e),
    };
    let mut plan = child_plan(Some(prep), err_w.as_raw_fd());
    join_plan(&mut plan, ns);
    let stack = match Stack::new() {
        Ok(s) => s,
        Err(e) => return Spawned::failed(e),
    };
    let (stack_lo, stack_size) = stack.range();
    let mut req = Box::new(HelperRequest {
        plan: &*plan,
        stack_lo,
        stack_size,
        cgroup_dir: prep.v2_dir(),
        pidfd: -1,
        pid: -1,
        errno: 0,
    });
    let sent = spawner.run(&mut req, deadline);
    // SAFETY: the spawner wrote these before answering (or died, or was killed at the deadline:
    // the kernel writes the pidfd at clone time); read as memory another task changed.
    let (pidfd, pid, errno) = unsafe {
        (
            ptr::read_volatile(&req.pidfd),
            ptr::read_volatile(&req.pid),
            ptr::read_volatile(&req.errno),
        )
    };
    // The child (if any) was cloned from the shared fd table with `err_w` in it: only now may it go.
    drop(err_w);
    // The kernel writes the pidfd number before it decides whether the clone succeeds (a full
    // cgroup refuses it later, and the number is freed again): trust it only once the spawner
    // wrote the pid, which it does after a successful clone.
    let child = (pid > 0 && pidfd >= 0).then(|| {
        // SAFETY: CLONE_PIDFD installed this fd for the child, which exists; nobody else owns it.
        unsafe { PidFd::from_raw(pidfd, pid) }
    });
    if let Err(e) = sent {
        // The spawner died or stalled mid-request (it has been killed). A child it may have
        // made could still use `plan` and `stack`: kill it before they go. A spawner killed
        // between the clone and writing the pid leaves a child we cannot name: then the memory
        // is given up for lost.
        let child_gone = match &child {
            Some(c) => kill_and_reap(c),
            None => pidfd < 0,
        };
        let gone = child_gone && spawner.is_gone();
        if !gone {
            std::mem::forget(stack);
            std::mem::forget(plan);
            std::mem::forget(req);
        }
        return Spawned {
            result: Err(e),
            leaked: !gone,
        };
    }
    let Some(child) = child.filter(|_| errno == 0) else {
        let errno = if errno != 0 { errno } else { libc::EIO };
        return Spawned::failed(SysError::syscall(
            "clone3 (lease spawner)",
            Errno::from_raw(errno),
        ));
    };
    let program = prep.program.to_string_lossy();
    let (result, gone) = await_exec(child, &err_r, &program, started, deadline, meanwhile);
    if !gone {
        std::mem::forget(stack);
        std::mem::forget(plan);
    }
    Spawned {
        result,
        leaked: !gone,
    }
}

/// Kills and reaps a child unless defused, so that no path out of `create` (panics included)
/// frees its stack or plan while it may still run on them.
struct ReapOnDrop(Option<PidFd>);

impl ReapOnDrop {
    fn get(&self) -> Option<&PidFd> {
        self.0.as_ref()
    }

    fn defuse(mut self) -> Option<PidFd> {
        self.0.take()
    }
}

impl Drop for ReapOnDrop {
    fn drop(&mut self) {
        if let Some(child) = self.0.take() {
            let _ = kill_and_reap(&child);
        }
    }
}

/// Creates the namespaces of `spec`, pins them at `pin`, and either starts `prep` in them
/// (returning its pidfd) or, with `None`, lets the holder exit (returning `None`). On failure
/// nothing is left pinned.
pub(crate) fn create(
    spec: &UserNsSpec,
    pin: &Path,
    prep: Option<&Prepared>,
    timeout: Duration,
    meanwhile: Meanwhile<'_>,
) -> (Result<Option<PidFd>>, bool) {
    let started = Instant::now();
    let deadline = started + timeout;
    if let Err(e) = spec.validate() {
        return (Err(e), false);
    }
    let kinds: Vec<NsKind> = std::iter::once(NsKind::User)
        .chain(spec.extra.kinds())
        .collect();
    for kind in &kinds {
        let path = kind.pin_beside(pin);
        if userns::is_pinned(&path) {
            return (Err(SysError::AlreadyPinned { path }), false);
        }
    }
    let setup = (|| -> Result<_> {
        let (err_r, err_w) = pipe()?;
        let (wake_r, wake_w) = pipe()?;
        Ok((err_r, err_w, wake_r, wake_w, Stack::new()?, Stack::new()?))
    })();
    let (err_r, err_w, wake_r, wake_w, stack_a, stack_b) = match setup {
        Ok(s) => s,
        Err(e) => return (Err(e), false),
    };
    let mut b_plan = child_plan(prep, err_w.as_raw_fd());
    b_plan.wake_rd = wake_r.as_raw_fd();
    b_plan.loopback = spec.extra.net;
    let (b_stack_lo, b_stack_size) = stack_b.range();
    let mut creator = Box::new(CreatorPlan {
        uid_base: spec.uid_base,
        gid_base: spec.gid_base,
        nproc_limit: spec.nproc_limit.unwrap_or(0),
        has_nproc_limit: spec.nproc_limit.is_some(),
        extra_flags: spec.extra.clone_flags(),
        b_stack_lo,
        b_stack_size,
        b_plan: &*b_plan,
        b_pidfd: -1,
        b_pid: -1,
        cgroup_dir: prep.map_or(-1, Prepared::v2_dir),
        step: 0,
        errno: 0,
    });
    let mut a_pidfd: c_int = -1;
    let (a_lo, a_size) = stack_a.range();
    let args = CloneArgs {
        flags: (libc::CLONE_VM | libc::CLONE_FILES | libc::CLONE_PIDFD) as u64,
        pidfd: &mut a_pidfd as *mut c_int as u64,
        exit_signal: libc::SIGCHLD as u64,
        stack: a_lo as u64,
        stack_size: a_size as u64,
        ..CloneArgs::default()
    };
    let cloned = match SignalsBlocked::new() {
        // SAFETY: A runs `creator_main(creator)` on `stack_a`; both (and B's plan and stack,
        // which A hands to B) stay alive until A and B are known gone or have exec'd, or are
        // leaked. A issues raw system calls only.
        Ok(_blocked) => unsafe {
            clone3_run(
                &args,
                creator_main,
                &mut *creator as *mut CreatorPlan as *mut c_void,
            )
        },
        Err(e) => return (Err(e), false),
    };
    let pid_a = match cloned {
        Ok(pid) => pid,
        Err(e) => {
            let e = SysError::syscall("clone3 (namespace creator)", Errno::from_raw(e));
            return (Err(e), false);
        }
    };
    // SAFETY: CLONE_PIDFD gave us this fd for A; nothing else owns it.
    let a = unsafe { PidFd::from_raw(a_pidfd, pid_a) };
    // A only switches ids and clones B; it runs as the lease's base uid, which a process of the
    // lease (its root) could signal, so its exit is waited for with the deadline too.
    let left = deadline.saturating_duration_since(Instant::now());
    let a_done = matches!(a.wait_timeout(left), Ok(Some(_)));
    // SAFETY: A wrote these before exiting (or was stopped somewhere before); read them as
    // memory another task changed.
    let (step, errno, b_pid, b_pidfd) = unsafe {
        (
            ptr::read_volatile(&creator.step),
            ptr::read_volatile(&creator.errno),
            ptr::read_volatile(&creator.b_pid),
            ptr::read_volatile(&creator.b_pidfd),
        )
    };
    // As for the spawner: the pidfd number is written before the clone may still fail, so it
    // names B only once A wrote B's pid, which it does after a successful clone.
    let b = ReapOnDrop((b_pid > 0 && b_pidfd >= 0).then(|| {
        // SAFETY: CLONE_PIDFD installed this fd in our (shared) table for B; nobody else owns it.
        unsafe { PidFd::from_raw(b_pidfd, b_pid) }
    }));
    if !a_done {
        let a_gone = kill_and_reap(&a);
        // A stopped between cloning B and writing its pid leaves a B we cannot name.
        let b_unknown = b.get().is_none() && b_pidfd >= 0;
        let b_gone = !b_unknown && b.defuse().as_ref().is_none_or(kill_and_reap);
        let gone = a_gone && b_gone;
        if !gone {
            std::mem::forget((stack_a, stack_b, creator, b_plan));
        }
        let waited_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        let error = SysError::SpawnTimeout {
            pid: pid_a,
            program: "(namespace creator)".into(),
            waited_ms,
        };
        return (Err(error), !gone);
    }
    drop(stack_a);
    if step != 0 || b.get().is_none() {
        return (
            Err(SysError::Creator {
                pid: pid_a,
                step: ChildStep::from_u32(step).unwrap_or(ChildStep::CreatorClone3),
                source: Errno::from_raw(errno),
            }),
            false,
        );
    }
    drop(err_w);
    drop(wake_r);
    let mut pinned = false;
    let setup = (|| {
        let b = b.get().ok_or(SysError::ProcessGone { pid: b_pid })?;
        if let Some(procs) = prep.and_then(|p| p.v1_procs) {
            // B waits on the wake pipe, so it runs nothing before it is in the v1 cgroup. A
            // move is not checked against `pids.max` (only forks are), and the lease has no
            // process yet.
            crate::cgroup::move_into(procs, b)?;
        }
        let proc = b.proc_dir()?;
        userns::write_maps(&proc, spec)?;
        for kind in &kinds {
            pinned = true;
            userns::pin(&proc, *kind, &kind.pin_beside(pin))?;
        }
        match nix::unistd::write(&wake_w, &[1u8]) {
            Ok(1) => Ok(()),
            Ok(_) => Err(SysError::process("write (wake pipe)", b.pid(), Errno::EIO)),
            Err(e) => Err(SysError::process("write (wake pipe)", b.pid(), e)),
        }
    })();
    drop(wake_w);
    if let Err(e) = setup {
        let b_gone = b.defuse().as_ref().is_none_or(kill_and_reap);
        if pinned {
            let _ = userns::unpin(pin);
        }
        if !b_gone {
            std::mem::forget((stack_b, b_plan));
        }
        // B may have failed first (say, bringing loopback up) and made our step fail: its
        // report, already in the pipe, names the real cause. Not so when B only saw the wake
        // pipe close (ECANCELED), which our failure caused.
        if b_gone
            && let Ok(Some((step, source))) = read_report(&err_r)
            && !(step == ChildStep::WaitForMaps && source == Errno::ECANCELED)
        {
            let error = SysError::ChildSetup {
                pid: b_pid,
                program: program_of(prep),
                step,
                source,
            };
            return (Err(error), false);
        }
        return (Err(e), !b_gone);
    }
    let Some(b) = b.defuse() else {
        return (Err(SysError::ProcessGone { pid: b_pid }), false);
    };
    let (result, gone) = await_exec(b, &err_r, &program_of(prep), started, deadline, meanwhile);
    if !gone {
        std::mem::forget((stack_b, b_plan));
    }
    let result = match (result, prep) {
        (Ok(b), Some(_)) => Ok(Some(b)),
        // The holder exits once its namespace is pinned: its exit status says how it went.
        (Ok(b), None) => match b.wait_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(Some(status)) if status.success() => Ok(None),
            Ok(Some(status)) => Err(SysError::process(
                "namespace holder exit",
                b.pid(),
                match status {
                    crate::pidfd::ExitStatus::Signaled { .. } => Errno::EINTR,
                    _ => Errno::EIO,
                },
            )),
            Ok(None) => {
                let _ = kill_and_reap(&b);
                Err(SysError::process(
                    "namespace holder exit",
                    b.pid(),
                    Errno::ETIMEDOUT,
                ))
            }
            Err(e) => Err(e),
        },
        (Err(e), _) => Err(e),
    };
    if result.is_err() {
        let _ = userns::unpin(pin);
    }
    (result, !gone)
}

/// The program for error messages; empty for a namespace holder.
fn program_of(prep: Option<&Prepared>) -> String {
    prep.map_or_else(String::new, |p| p.program.to_string_lossy().into_owned())
}
