//! Starting processes inside a lease's user namespace, the vfork way.
//!
//! # How a process is started
//! The daemon is multi-threaded and may be large, so it never `fork`s (a plain fork costs ~31 us
//! per MiB of the parent, background.md) and never unshares a namespace itself. Children are
//! made with `clone(CLONE_VM | CLONE_VFORK)` on a separately mapped stack, like glibc's
//! `posix_spawn`: they share the daemon's memory, run only raw system calls (module `raw`) on
//! data prepared before the clone, and the calling thread sleeps until they `execve` or exit.
//! All signals are blocked around the clone, so none of the daemon's handlers can run on the
//! child's side; the child resets every disposition to `SIG_DFL` and empties its mask just before
//! `execve` (Rust ignores `SIGPIPE`, which `execve` would otherwise keep).
//!
//! * **Join** ([`Namespace::Join`]): one child C, `clone(CLONE_VM|CLONE_VFORK|CLONE_PIDFD)`;
//!   it sets its rlimits (still host root, so hard limits may go up), `setns`es into the
//!   lease's user namespace (allowed: C is single-threaded and does not share `fs`; `CLONE_VM`
//!   does not matter for a user namespace, setns(2)) and then into its optional namespaces
//!   (which that user namespace owns, so C now holds the capabilities they ask for), then the
//!   common steps and `execve`.
//! * **Create** ([`Namespace::Create`]): the namespace's owner is the euid of the task that
//!   creates it, and it must be the lease's base uid (background.md). `unshare(CLONE_NEWUSER)`
//!   is refused (`EINVAL`) to a task sharing its mm, so a helper A
//!   (`clone(CLONE_VM|CLONE_VFORK|CLONE_FILES)`) sets the rlimits (still host root, so B
//!   inherits them, hard limits raised if the daemon may), sets `PR_SET_KEEPCAPS`, drops its
//!   groups, switches to the base gid and uid with raw `setresgid`/`setresuid` (only A's creds
//!   change), raises its kept permitted capabilities (CAP_SYS_ADMIN among them) back into the
//!   effective set with `capset` — so hosts that restrict unprivileged user namespaces still
//!   allow it — and then `clone(CLONE_VM|CLONE_NEWUSER|CLONE_PARENT|CLONE_PIDFD [|CLONE_NEWNS|
//!   CLONE_NEWUTS|CLONE_NEWIPC|CLONE_NEWNET])`s B and exits. `clone` (unlike `unshare`) accepts
//!   `CLONE_NEWUSER` with `CLONE_VM`, so B still costs no page-table copy; the optional
//!   namespaces come out owned by the new user namespace. `CLONE_PARENT` makes B the daemon's
//!   child; `CLONE_FILES` puts B's pidfd straight into the daemon's fd table, so B is never
//!   named by a bare pid. B brings loopback up (new network namespace) and waits on a wake-up
//!   pipe while the daemon writes `setgroups`, `uid_map` and `gid_map` through the
//!   pidfd-verified `/proc/<B>`, reads them back and pins `/proc/<B>/ns/*` (bind mounts); then
//!   B runs the common steps and `execve`s (or, for [`crate::userns::create_pinned`], exits).
//!
//! * **Lease cgroup** ([`Command::cgroup`], see [`crate::cgroup`]): nothing of the lease may run
//!   outside its cgroup, even briefly, and the daemon writes no `cgroup.procs` per spawn. On
//!   cgroup2, C (join) and B (create) are made with `clone3(... | CLONE_INTO_CGROUP)` on the
//!   lease cgroup's directory fd (`raw::clone3_run`, since clone3 has no usable libc wrapper);
//!   they are born inside. On v1 the child's very first system call writes `0` into the
//!   lease's open `cgroup.procs` (for a create, A does, before it switches ids or clones B, so
//!   B inherits it); that write waits for an RCU grace period, 5-19 ms when spawns are spread
//!   out. A [`CgroupSpawner`] takes it off the join path: a helper sitting in the cgroup clones
//!   the children (`CLONE_PARENT`, so they are still the daemon's).
//!
//! Common steps: `setsid`; clear the inheritable and ambient capabilities; `setgroups` (none
//! unless asked), `setresgid`, `setresuid` (ids inside the namespace); umask; `chdir`; stdin
//! `/dev/null`, stdout/stderr as given; everything from fd 3 up close-on-exec
//! (`close_range`); empty signal mask; `execve` with exactly the given environment.
//!
//! The caller reaps with [`PidFd::wait`]. The daemon must not set `SIGCHLD` to `SIG_IGN` (or
//! `SA_NOCLDWAIT`), nor reap with `waitpid(-1)` elsewhere: the children are its own.
//!
//! Errors before `execve` travel back as `(step, errno)` through a close-on-exec pipe whose EOF
//! also tells the daemon that the child no longer uses the shared stack.

use std::convert::Infallible;
use std::ffi::{CString, OsStr, OsString};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::ptr;
use std::sync::{Arc, Mutex};

use libc::{c_char, c_int, c_void};
use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sys::resource::Resource;
use nix::sys::stat::Mode;

use crate::cgroup::{CgroupVersion, SpawnCgroup};
use crate::error::{ChildStep, Result, SysError};
use crate::pidfd::PidFd;
use crate::raw::{CLONE_INTO_CGROUP, CloneArgs, clone3_run, sys};
use crate::userns::{self, LeaseNs, NsKind, UserNsSpec};

/// One resource limit for the child: `prlimit64(resource, {soft, hard})`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rlimit {
    /// Which limit.
    pub resource: Resource,
    /// The soft limit (`u64::MAX` is `RLIM_INFINITY`).
    pub soft: u64,
    /// The hard limit.
    pub hard: u64,
}

/// Where the child's user namespace comes from.
#[derive(Debug, Clone, Copy)]
pub enum Namespace<'a> {
    /// Join a lease's pinned namespaces (see [`LeaseNs::open`]): the user namespace first, then
    /// the optional ones.
    Join(&'a LeaseNs),
    /// Create the lease's namespaces (owner: the base ids), pin them (the user namespace at `pin`,
    /// optional ones beside it, see [`userns::NsKind::pin_beside`]), and start the process as
    /// their first member. If the spawn fails, the pins are removed again.
    Create {
        /// The lease's ids.
        spec: &'a UserNsSpec,
        /// The file the namespace is bind-mounted onto (created, parents too).
        pin: &'a Path,
    },
}

/// What to run and how; see [`Command::spawn`].
///
/// Defaults: no environment at all, cwd `/`, uid 0 and gid 0 inside the namespace, no
/// supplementary groups, umask `022`, the daemon's rlimits, stdin/stdout/stderr `/dev/null`.
#[derive(Debug)]
pub struct Command {
    program: PathBuf,
    argv: Vec<OsString>,
    env: Vec<(OsString, OsString)>,
    cwd: PathBuf,
    uid: u32,
    gid: u32,
    groups: Vec<u32>,
    umask: u32,
    rlimits: Vec<Rlimit>,
    stdout: Option<OwnedFd>,
    stderr: Option<OwnedFd>,
    cgroup: Option<SpawnCgroup>,
}

impl Command {
    /// `program` is passed to `execve` as is (no `PATH` search; a relative path is taken from the
    /// cwd); `argv` is the whole argument vector, `argv[0]` included.
    pub fn new<I, S>(program: impl AsRef<Path>, argv: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        Command {
            program: program.as_ref().to_path_buf(),
            argv: argv.into_iter().map(|s| s.as_ref().to_owned()).collect(),
            env: Vec::new(),
            cwd: PathBuf::from("/"),
            uid: 0,
            gid: 0,
            groups: Vec::new(),
            umask: 0o022,
            rlimits: Vec::new(),
            stdout: None,
            stderr: None,
            cgroup: None,
        }
    }

    /// Adds `key=value` to the environment, which is exactly what is given here, nothing else.
    pub fn env(&mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> &mut Self {
        self.env
            .push((key.as_ref().to_owned(), value.as_ref().to_owned()));
        self
    }

    /// The working directory, entered after the ids are switched (so it is checked as the user).
    pub fn cwd(&mut self, dir: impl AsRef<Path>) -> &mut Self {
        self.cwd = dir.as_ref().to_path_buf();
        self
    }

    /// The uid and gid inside the namespace.
    pub fn user(&mut self, uid: u32, gid: u32) -> &mut Self {
        self.uid = uid;
        self.gid = gid;
        self
    }

    /// Supplementary groups inside the namespace (default: none).
    pub fn groups(&mut self, groups: impl IntoIterator<Item = u32>) -> &mut Self {
        self.groups = groups.into_iter().collect();
        self
    }

    /// The umask.
    pub fn umask(&mut self, umask: u32) -> &mut Self {
        self.umask = umask & 0o777;
        self
    }

    /// Adds a resource limit.
    pub fn rlimit(&mut self, resource: Resource, soft: u64, hard: u64) -> &mut Self {
        self.rlimits.push(Rlimit {
            resource,
            soft,
            hard,
        });
        self
    }

    /// Where fd 1 points (default `/dev/null`).
    pub fn stdout(&mut self, fd: OwnedFd) -> &mut Self {
        self.stdout = Some(fd);
        self
    }

    /// Where fd 2 points (default `/dev/null`).
    pub fn stderr(&mut self, fd: OwnedFd) -> &mut Self {
        self.stderr = Some(fd);
        self
    }

    /// Starts the process inside a lease cgroup (see [`crate::cgroup::LeaseCgroup::spawn_handle`]),
    /// so that it never runs outside it: cgroup2 starts it there with
    /// `clone3(CLONE_INTO_CGROUP)`; on v1 the child's first system call writes `0` into the
    /// cgroup's `cgroup.procs` (the namespace creator does, for a first spawn), before it can
    /// fork or exec.
    pub fn cgroup(&mut self, cgroup: SpawnCgroup) -> &mut Self {
        self.cgroup = Some(cgroup);
        self
    }

    /// Starts the process and returns its pidfd (the pid is [`PidFd::pid`]). The caller reaps it
    /// with [`PidFd::wait`] / [`PidFd::try_wait`]. On error nothing is left behind: a child that
    /// failed before `execve` has been reaped, and a namespace made by this call is unpinned.
    pub fn spawn(&self, ns: Namespace<'_>) -> Result<PidFd> {
        let prep = self.prepare()?;
        match ns {
            Namespace::Join(ns) => match &prep.spawner {
                Some(spawner) => spawn_join_via(spawner, &prep, ns),
                None => spawn_join(&prep, ns),
            },
            Namespace::Create { spec, pin } => {
                create(spec, pin, Some(&prep))?.ok_or_else(|| SysError::InvalidInput {
                    what: "spawn",
                    reason: "no process".into(),
                })
            }
        }
    }

    fn prepare(&self) -> Result<Prepared> {
        let cstr = |what: &'static str, s: &OsStr| {
            CString::new(s.as_bytes()).map_err(|_| SysError::InvalidInput {
                what,
                reason: format!("{s:?} contains a NUL byte"),
            })
        };
        if self.program.as_os_str().is_empty() {
            return Err(invalid("program", "is empty"));
        }
        if self.argv.is_empty() {
            return Err(invalid("argv", "needs at least argv[0]"));
        }
        let program = cstr("program", self.program.as_os_str())?;
        let cwd = cstr("cwd", self.cwd.as_os_str())?;
        let argv = self
            .argv
            .iter()
            .map(|a| cstr("argv", a))
            .collect::<Result<Vec<_>>>()?;
        let mut env = Vec::with_capacity(self.env.len());
        for (k, v) in &self.env {
            if k.is_empty() || k.as_bytes().contains(&b'=') {
                return Err(invalid("env", &format!("bad variable name {k:?}")));
            }
            let mut kv = k.clone();
            kv.push("=");
            kv.push(v);
            env.push(cstr("env", &kv)?);
        }
        let argv_ptrs = pointers(&argv);
        let env_ptrs = pointers(&env);
        let devnull =
            nix::fcntl::open("/dev/null", OFlag::O_RDWR | OFlag::O_CLOEXEC, Mode::empty())
                .map_err(|e| SysError::path("open", "/dev/null", e))?;
        let rlimits = self
            .rlimits
            .iter()
            .map(|r| RawRlimit {
                resource: r.resource as c_int,
                limit: [r.soft, r.hard],
            })
            .collect();
        Ok(Prepared {
            program,
            _argv: argv,
            _env: env,
            cwd,
            argv_ptrs,
            env_ptrs,
            stdio: [
                devnull.as_raw_fd(),
                self.stdout
                    .as_ref()
                    .map_or(devnull.as_raw_fd(), |f| f.as_raw_fd()),
                self.stderr
                    .as_ref()
                    .map_or(devnull.as_raw_fd(), |f| f.as_raw_fd()),
            ],
            _devnull: devnull,
            uid: self.uid,
            gid: self.gid,
            groups: self.groups.clone(),
            umask: self.umask,
            rlimits,
            cgroup: self.cgroup.as_ref().map(|c| (c.fd.as_raw_fd(), c.version)),
            spawner: self.cgroup.as_ref().and_then(|c| c.spawner.clone()),
        })
    }
}

fn invalid(what: &'static str, reason: &str) -> SysError {
    SysError::InvalidInput {
        what,
        reason: reason.to_string(),
    }
}

fn pointers(strings: &[CString]) -> Vec<*const c_char> {
    strings
        .iter()
        .map(|s| s.as_ptr())
        .chain(std::iter::once(ptr::null()))
        .collect()
}

/// `rlimit64` as `prlimit64(2)` takes it, with its resource number.
#[derive(Debug, Clone, Copy)]
#[repr(C)]
struct RawRlimit {
    resource: c_int,
    limit: [u64; 2],
}

/// Everything the child reads, allocated before the clone. The raw pointers below point into it.
pub(crate) struct Prepared {
    program: CString,
    _argv: Vec<CString>,
    _env: Vec<CString>,
    cwd: CString,
    argv_ptrs: Vec<*const c_char>,
    env_ptrs: Vec<*const c_char>,
    stdio: [RawFd; 3],
    _devnull: OwnedFd,
    uid: u32,
    gid: u32,
    groups: Vec<u32>,
    umask: u32,
    rlimits: Vec<RawRlimit>,
    /// The lease cgroup: v1 `cgroup.procs` or v2 directory fd (owned by the `Command`).
    cgroup: Option<(RawFd, CgroupVersion)>,
    /// v1: the lease's spawner, which clones joining children from inside the cgroup.
    spawner: Option<Arc<CgroupSpawner>>,
}

impl Prepared {
    /// The v1 `cgroup.procs` fd the child writes itself into, or -1.
    fn v1_procs(&self) -> c_int {
        match self.cgroup {
            Some((fd, CgroupVersion::V1)) => fd,
            _ => -1,
        }
    }

    /// The v2 directory fd for `CLONE_INTO_CGROUP`, or -1.
    fn v2_dir(&self) -> c_int {
        match self.cgroup {
            Some((fd, CgroupVersion::V2)) => fd,
            _ => -1,
        }
    }
}

/// The child's instructions. Plain data and raw pointers into a [`Prepared`] that outlives the
/// child's use of it.
#[repr(C)]
struct ChildPlan {
    program: *const c_char,
    argv: *const *const c_char,
    envp: *const *const c_char,
    cwd: *const c_char,
    uid: u32,
    gid: u32,
    groups: *const u32,
    ngroups: usize,
    umask: u32,
    rlimits: *const RawRlimit,
    nrlimits: usize,
    stdio: [c_int; 3],
    err_fd: c_int,
    /// Join: the namespaces to `setns` into, in order (user first), and their types.
    join_fds: [c_int; 5],
    join_types: [c_int; 5],
    njoin: usize,
    /// Create: bring up loopback in the new network namespace.
    loopback: bool,
    /// Create: read one byte from here before going on; -1 otherwise.
    wake_rd: c_int,
    /// Create: the child's copy of the wake pipe's write end, closed first thing.
    wake_wr: c_int,
    /// False for a namespace holder that only exits once the maps are written and pinned.
    exec: bool,
    /// v1: the lease's `cgroup.procs`, written (`0`) as the very first step; -1 otherwise.
    cgroup_procs: c_int,
}

impl ChildPlan {
    fn new(prep: Option<&Prepared>, err_fd: c_int) -> Self {
        let mut plan = ChildPlan {
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
            wake_wr: -1,
            exec: false,
            cgroup_procs: -1,
        };
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
}

/// The namespace creator's instructions and its answers (written by A while the daemon's thread
/// sleeps in the vfork).
#[repr(C)]
struct CreatorPlan {
    uid_base: u32,
    gid_base: u32,
    nproc_limit: u64,
    has_nproc_limit: bool,
    /// `CLONE_NEW*` flags of the optional namespaces, made together with the user namespace.
    extra_flags: c_int,
    b_stack_top: *mut c_void,
    /// B's stack as clone3 takes it: lowest address and size.
    b_stack_lo: *mut c_void,
    b_stack_size: usize,
    b_plan: *const ChildPlan,
    b_pidfd: c_int,
    b_pid: c_int,
    /// v1: the lease's `cgroup.procs`; A writes itself in first, so B inherits it. -1 if none.
    cgroup_procs: c_int,
    /// v2: the lease cgroup's directory; B is made there with `clone3(CLONE_INTO_CGROUP)`.
    cgroup_dir: c_int,
    step: u32,
    errno: i32,
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
extern "C" fn child_main(arg: *mut c_void) -> c_int {
    // SAFETY: `arg` is the `ChildPlan` the daemon passed to clone; it stays alive and unchanged
    // until this child has exec'd or exited (the daemon waits for the error pipe's EOF, or for
    // the vfork to release it, before dropping it).
    let plan = unsafe { &*(arg as *const ChildPlan) };
    let mut err_fd = plan.err_fd;
    // SAFETY: raw system calls on the plan's live data; see `child_steps`.
    let failure = unsafe { join_cgroup(plan.cgroup_procs, ChildStep::JoinCgroup) }
        // SAFETY: as above.
        .and_then(|()| unsafe { child_steps(plan, &mut err_fd) });
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
        // SAFETY: closing our copy of the write end, so the daemon's death reads as EOF.
        let _ = unsafe { sys(libc::SYS_close, [p.wake_wr as usize, 0, 0, 0, 0, 0]) };
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

/// cgroup v1: moves the calling process into the cgroup whose `cgroup.procs` is open as `fd`
/// (`-1`: nothing to do) by writing `0`, which names the writer (cgroups(7)). One raw
/// `write(2)`; the kernel's attach waits for an RCU grace period (background.md).
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
extern "C" fn creator_main(arg: *mut c_void) -> c_int {
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
/// Runs in a `CLONE_VM|CLONE_VFORK` child: raw system calls only, on live data.
unsafe fn creator_steps(p: &mut CreatorPlan) -> Step<()> {
    use ChildStep::*;
    // First of all (v1): into the lease cgroup, so B and all it starts are born there.
    // SAFETY: raw write of a live local.
    unsafe { join_cgroup(p.cgroup_procs, JoinCgroup) }?;
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
    if p.cgroup_dir >= 0 {
        // cgroup2: B is born in the lease cgroup. A has CAP_DAC_OVERRIDE in its effective set
        // (raised above), which the attach permission check on cgroup.procs asks for.
        let args = CloneArgs {
            flags: (flags as u64) | CLONE_INTO_CGROUP,
            pidfd: &mut p.b_pidfd as *mut c_int as u64,
            // clone3 refuses an exit signal with CLONE_PARENT (EINVAL): B takes A's, SIGCHLD.
            exit_signal: 0,
            stack: p.b_stack_lo as u64,
            stack_size: p.b_stack_size as u64,
            cgroup: p.cgroup_dir as u64,
            ..CloneArgs::default()
        };
        // SAFETY: B runs `child_main` on its own stack with the daemon's live `ChildPlan`; the
        // kernel writes B's pidfd into `b_pidfd` (in the daemon's fd table, CLONE_FILES).
        let pid = unsafe { clone3_run(&args, child_main, p.b_plan as *mut c_void) }
            .map_err(|e| (CreatorClone3, e))?;
        p.b_pid = pid;
        return Ok(());
    }
    // SAFETY: glibc's clone is an assembly trampoline that touches no TLS in the child; B runs
    // `child_main` on its own stack with the daemon's live `ChildPlan`; the kernel writes B's
    // pidfd into `b_pidfd` (CLONE_PIDFD uses the parent_tid slot), in the daemon's fd table
    // since A shares it (CLONE_FILES).
    let pid = unsafe {
        libc::clone(
            child_main,
            p.b_stack_top,
            flags | libc::SIGCHLD,
            p.b_plan as *mut c_void,
            &mut p.b_pidfd as *mut c_int,
        )
    };
    if pid < 0 {
        // errno lives in the daemon thread's TLS, which sleeps in the vfork meanwhile.
        return Err((CreatorClone, Errno::last_raw()));
    }
    p.b_pid = pid;
    Ok(())
}

/// A child stack: an anonymous mapping with a guard page below it.
struct Stack {
    base: *mut c_void,
    len: usize,
}

impl Stack {
    const SIZE: usize = 128 * 1024;

    fn new() -> Result<Self> {
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

    fn top(&self) -> *mut c_void {
        // The end of the mapping, page aligned, so 16-byte aligned as the ABIs want.
        self.base.wrapping_byte_add(self.len)
    }

    /// The usable part (above the guard page) as clone3 takes it: lowest address and size.
    fn range(&self) -> (*mut c_void, usize) {
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
struct SignalsBlocked {
    old: libc::sigset_t,
}

impl SignalsBlocked {
    fn new() -> Result<Self> {
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

fn pipe() -> Result<(OwnedFd, OwnedFd)> {
    nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(|e| SysError::syscall("pipe2", e))
}

/// Reads the child's report: `None` at EOF without data (it exec'd, or died after the point of
/// no return), `Some((step, errno))` when it failed.
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

fn spawn_join(prep: &Prepared, ns: &LeaseNs) -> Result<PidFd> {
    let (err_r, err_w) = pipe()?;
    let mut plan = ChildPlan::new(Some(prep), err_w.as_raw_fd());
    let all = std::iter::once((NsKind::User, ns.user())).chain(ns.extra());
    for (i, (kind, fd)) in all.enumerate().take(plan.join_fds.len()) {
        plan.join_fds[i] = fd.as_raw_fd();
        plan.join_types[i] = kind.clone_flag();
        plan.njoin = i + 1;
    }
    plan.cgroup_procs = prep.v1_procs();
    let stack = Stack::new()?;
    let mut pidfd: c_int = -1;
    let flags = libc::CLONE_VM | libc::CLONE_VFORK | libc::CLONE_PIDFD;
    let (pid, errno) = {
        let _blocked = SignalsBlocked::new()?;
        let plan_ptr = &plan as *const ChildPlan as *mut c_void;
        if prep.v2_dir() >= 0 {
            let (lo, size) = stack.range();
            let args = CloneArgs {
                flags: flags as u64 | CLONE_INTO_CGROUP,
                pidfd: &mut pidfd as *mut c_int as u64,
                exit_signal: libc::SIGCHLD as u64,
                stack: lo as u64,
                stack_size: size as u64,
                cgroup: prep.v2_dir() as u64,
                ..CloneArgs::default()
            };
            // SAFETY: as below; clone3 starts the child in the lease cgroup (cgroup2) and it
            // runs `child_main(plan)` on the top of `stack`.
            match unsafe { clone3_run(&args, child_main, plan_ptr) } {
                Ok(pid) => (pid, Errno::UnknownErrno),
                Err(e) => (-1, Errno::from_raw(e)),
            }
        } else {
            // SAFETY: the child runs `child_main` on `stack` with `plan`, both alive until the
            // clone returns, which (CLONE_VFORK) is after the child has exec'd or exited; it
            // only issues raw system calls. The kernel stores the pidfd in `pidfd`.
            let pid = unsafe {
                libc::clone(
                    child_main,
                    stack.top(),
                    flags | libc::SIGCHLD,
                    plan_ptr,
                    &mut pidfd as *mut c_int,
                )
            };
            (pid, Errno::last())
        }
    };
    drop(stack);
    if pid < 0 {
        return Err(SysError::syscall("clone", errno));
    }
    // SAFETY: CLONE_PIDFD gave us this fd for `pid`; nothing else owns it.
    let child = unsafe { PidFd::from_raw(pidfd, pid) };
    drop(err_w);
    finish(child, &err_r, prep)
}

/// Reads the child's report; on failure reaps it and turns the report into an error.
fn finish(child: PidFd, err_r: &OwnedFd, prep: &Prepared) -> Result<PidFd> {
    match read_report(err_r) {
        Ok(None) => Ok(child),
        Ok(Some((step, source))) => {
            let _ = child.wait();
            Err(SysError::ChildSetup {
                pid: child.pid(),
                program: prep.program.to_string_lossy().into_owned(),
                step,
                source,
            })
        }
        Err(e) => {
            let _ = child.send_signal(libc::SIGKILL);
            let _ = child.wait();
            Err(e)
        }
    }
}

/// Kills and reaps B unless defused, so that no path out of `create` (panics included) frees
/// B's stack or plan while B may still run on them.
struct ReapOnDrop(Option<PidFd>);

impl ReapOnDrop {
    fn defuse(mut self) -> PidFd {
        self.0.take().expect("armed")
    }
}

impl Drop for ReapOnDrop {
    fn drop(&mut self) {
        if let Some(child) = self.0.take() {
            let _ = child.send_signal(libc::SIGKILL);
            let _ = child.wait();
        }
    }
}

/// Creates the namespace of `spec`, pins it at `pin`, and either starts `prep` in it (returning
/// its pidfd) or, with `None`, lets the holder exit (returning `None`).
pub(crate) fn create(
    spec: &UserNsSpec,
    pin: &Path,
    prep: Option<&Prepared>,
) -> Result<Option<PidFd>> {
    spec.validate()?;
    let kinds: Vec<NsKind> = std::iter::once(NsKind::User)
        .chain(spec.extra.kinds())
        .collect();
    for kind in &kinds {
        let path = kind.pin_beside(pin);
        if userns::is_pinned(&path) {
            return Err(SysError::AlreadyPinned { path });
        }
    }
    let (err_r, err_w) = pipe()?;
    let (wake_r, wake_w) = pipe()?;
    let mut b_plan = ChildPlan::new(prep, err_w.as_raw_fd());
    b_plan.wake_rd = wake_r.as_raw_fd();
    b_plan.wake_wr = wake_w.as_raw_fd();
    b_plan.loopback = spec.extra.net;
    let stack_a = Stack::new()?;
    let stack_b = Stack::new()?;
    let (b_stack_lo, b_stack_size) = stack_b.range();
    let mut creator = CreatorPlan {
        uid_base: spec.uid_base,
        gid_base: spec.gid_base,
        nproc_limit: spec.nproc_limit.unwrap_or(0),
        has_nproc_limit: spec.nproc_limit.is_some(),
        extra_flags: spec.extra.clone_flags(),
        b_stack_top: stack_b.top(),
        b_stack_lo,
        b_stack_size,
        b_plan: &b_plan,
        b_pidfd: -1,
        b_pid: -1,
        cgroup_procs: prep.map_or(-1, Prepared::v1_procs),
        cgroup_dir: prep.map_or(-1, Prepared::v2_dir),
        step: 0,
        errno: 0,
    };
    let flags = libc::CLONE_VM | libc::CLONE_VFORK | libc::CLONE_FILES | libc::SIGCHLD;
    let (pid_a, errno) = {
        let _blocked = SignalsBlocked::new()?;
        // SAFETY: A runs `creator_main` on `stack_a` with `creator`, both alive past the clone,
        // which returns only once A has exited (CLONE_VFORK). A issues raw system calls only.
        let pid = unsafe {
            libc::clone(
                creator_main,
                stack_a.top(),
                flags,
                &mut creator as *mut CreatorPlan as *mut c_void,
            )
        };
        (pid, Errno::last())
    };
    if pid_a < 0 {
        return Err(SysError::syscall("clone (namespace creator)", errno));
    }
    // SAFETY: A wrote these fields before exiting (the vfork ended with its exit); read them as
    // memory another task changed.
    let (step, errno, b_pid, b_pidfd) = unsafe {
        (
            ptr::read_volatile(&creator.step),
            ptr::read_volatile(&creator.errno),
            ptr::read_volatile(&creator.b_pid),
            ptr::read_volatile(&creator.b_pidfd),
        )
    };
    if step != 0 || b_pid <= 0 || b_pidfd < 0 {
        reap_pid(pid_a)?;
        return Err(SysError::Creator {
            pid: pid_a,
            step: ChildStep::from_u32(step).unwrap_or(ChildStep::CreatorClone),
            source: Errno::from_raw(errno),
        });
    }
    // SAFETY: CLONE_PIDFD installed this fd in our table for B; nothing else owns it.
    let guard = ReapOnDrop(Some(unsafe { PidFd::from_raw(b_pidfd, b_pid) }));
    reap_pid(pid_a)?;
    drop(err_w);
    drop(wake_r);
    let b = guard.0.as_ref().expect("armed");
    let mut pinned = false;
    let setup = (|| {
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
        drop(guard); // kills and reaps B before its stack goes
        if pinned {
            let _ = userns::unpin(pin);
        }
        // B may have failed first (say, bringing loopback up) and made our step fail: its
        // report, already in the pipe, names the real cause. Not so when B only saw the wake
        // pipe close (ECANCELED), which our failure caused: `wake_w` is closed before B dies.
        if let Ok(Some((step, source))) = read_report(&err_r)
            && !(step == ChildStep::WaitForMaps && source == Errno::ECANCELED)
        {
            return Err(SysError::ChildSetup {
                pid: b_pid,
                program: program_of(prep),
                step,
                source,
            });
        }
        return Err(e);
    }
    // EOF on the error pipe comes after B has left our memory (exec or exit releases the mm
    // before the fd table).
    let report = read_report(&err_r);
    match (report, prep) {
        (Ok(None), Some(_)) => Ok(Some(guard.defuse())),
        (Ok(None), None) => {
            let b = guard.defuse();
            match b.wait() {
                Ok(status) if status.success() => Ok(None),
                Ok(status) => {
                    let _ = userns::unpin(pin);
                    Err(SysError::process(
                        "namespace holder exit",
                        b.pid(),
                        match status {
                            crate::pidfd::ExitStatus::Signaled { .. } => Errno::EINTR,
                            _ => Errno::EIO,
                        },
                    ))
                }
                Err(e) => {
                    let _ = userns::unpin(pin);
                    Err(e)
                }
            }
        }
        (Ok(Some((step, source))), _) => {
            let b = guard.defuse();
            let _ = b.wait();
            let _ = userns::unpin(pin);
            Err(SysError::ChildSetup {
                pid: b.pid(),
                program: program_of(prep),
                step,
                source,
            })
        }
        (Err(e), _) => {
            drop(guard);
            let _ = userns::unpin(pin);
            Err(e)
        }
    }
    // `stack_a`, `stack_b`, `b_plan` and `creator` drop here, after B is gone or has exec'd.
}

/// The program for error messages; empty for a namespace holder.
fn program_of(prep: Option<&Prepared>) -> String {
    prep.map_or_else(String::new, |p| p.program.to_string_lossy().into_owned())
}

/// `waitpid(pid, __WALL)` for the creator A, our own child.
fn reap_pid(pid: i32) -> Result<()> {
    loop {
        let mut status = 0;
        // SAFETY: a live status int.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::__WALL) };
        if r == pid {
            return Ok(());
        }
        let e = Errno::last();
        if e != Errno::EINTR {
            return Err(SysError::process("waitpid (namespace creator)", pid, e));
        }
    }
}

/// A per-lease helper process that sits in the lease's cgroup v1 and clones that lease's
/// joining children, so that they are born in the cgroup and a spawn needs no `cgroup.procs`
/// write (and no RCU grace period) of its own (background.md: "forking from a process that
/// already sits in the target cgroup"). Start one with
/// [`crate::cgroup::LeaseCgroup::start_spawner`].
///
/// The helper is a `clone(CLONE_VM | CLONE_FILES)` of the daemon: it costs no page-table copy,
/// runs only raw system calls, keeps every signal blocked, and counts as one process against
/// the lease's `pids.max`. It writes itself into `cgroup.procs` once, then waits for requests:
/// a pointer to a prepared `ChildPlan` and stack in the daemon's memory, for which it does
/// `clone3(CLONE_VM | CLONE_VFORK | CLONE_PARENT | CLONE_PIDFD)`. `CLONE_PARENT` makes the
/// child the daemon's own (reaped through its pidfd as usual), and the pidfd lands in the
/// daemon's fd table (shared). Requests are serialised; each takes until the child has
/// exec'd. The helper exits when the spawner is dropped (EOF on its request pipe) or when the
/// daemon exits (it polls a pidfd of the daemon). The first spawn of a lease, which creates
/// the namespace, does not go through it: its creator writes itself into `cgroup.procs`.
pub struct CgroupSpawner {
    helper: PidFd,
    /// Request pipe write end and response pipe read end; `None` once shut down.
    chan: Mutex<Option<(OwnedFd, OwnedFd)>>,
    /// The helper's ends (in the shared fd table, so they stay open here too).
    _helper_ends: (OwnedFd, OwnedFd),
    _procs: OwnedFd,
    plan: Box<HelperPlan>,
    stack: Option<Stack>,
}

impl std::fmt::Debug for CgroupSpawner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CgroupSpawner")
            .field("helper", &self.helper.pid())
            .finish_non_exhaustive()
    }
}

// SAFETY: the raw pointers inside (`Stack`, `HelperPlan`) name memory owned by this value and
// only used by the helper process; the channel is behind a mutex.
unsafe impl Send for CgroupSpawner {}
// SAFETY: as above; `&self` methods only lock the mutex and read fds.
unsafe impl Sync for CgroupSpawner {}

/// The helper's start-up data.
#[repr(C)]
#[derive(Debug)]
struct HelperPlan {
    procs_fd: c_int,
    req_rd: c_int,
    resp_wr: c_int,
}

/// One request, in the requesting daemon thread's memory; answered before that thread goes on.
#[repr(C)]
struct HelperRequest {
    plan: *const ChildPlan,
    stack_lo: *mut c_void,
    stack_size: usize,
    pidfd: c_int,
    pid: c_int,
    errno: c_int,
}

impl CgroupSpawner {
    /// Starts the helper, which moves itself into the cgroup whose `cgroup.procs` is `procs`.
    pub(crate) fn start(procs: OwnedFd) -> Result<Self> {
        let (req_r, req_w) = pipe()?;
        let (resp_r, resp_w) = pipe()?;
        let plan = Box::new(HelperPlan {
            procs_fd: procs.as_raw_fd(),
            req_rd: req_r.as_raw_fd(),
            resp_wr: resp_w.as_raw_fd(),
        });
        let stack = Stack::new()?;
        let (lo, size) = stack.range();
        let mut pidfd: c_int = -1;
        let args = CloneArgs {
            flags: (libc::CLONE_VM | libc::CLONE_FILES | libc::CLONE_PIDFD) as u64,
            pidfd: &mut pidfd as *mut c_int as u64,
            exit_signal: libc::SIGCHLD as u64,
            stack: lo as u64,
            stack_size: size as u64,
            ..CloneArgs::default()
        };
        let pid = {
            // The helper inherits the full mask and keeps it: no handler of the daemon ever
            // runs on its side.
            let _blocked = SignalsBlocked::new()?;
            // SAFETY: the helper runs `helper_main` on `stack` with `plan`, both owned by the
            // returned spawner, which outlives the helper (Drop waits for it to exit).
            unsafe {
                clone3_run(
                    &args,
                    helper_main,
                    &*plan as *const HelperPlan as *mut c_void,
                )
            }
            .map_err(|e| SysError::syscall("clone3 (lease spawner)", Errno::from_raw(e)))?
        };
        // SAFETY: CLONE_PIDFD gave us this fd for `pid`; nothing else owns it.
        let helper = unsafe { PidFd::from_raw(pidfd, pid) };
        let mut spawner = CgroupSpawner {
            helper,
            chan: Mutex::new(Some((req_w, resp_r))),
            _helper_ends: (req_r, resp_w),
            _procs: procs,
            plan,
            stack: Some(stack),
        };
        match spawner.read_status() {
            Ok(0) => Ok(spawner),
            Ok(e) => {
                spawner.shutdown();
                Err(SysError::process(
                    "write cgroup.procs (lease spawner)",
                    pid,
                    Errno::from_raw(e),
                ))
            }
            Err(e) => {
                spawner.shutdown();
                Err(e)
            }
        }
    }

    /// The helper's pid.
    pub fn pid(&self) -> i32 {
        self.helper.pid()
    }

    fn gone(&self) -> SysError {
        SysError::ProcessGone {
            pid: self.helper.pid(),
        }
    }

    /// Reads one 4-byte answer, or fails if the helper is gone.
    fn read_status(&self) -> Result<i32> {
        let guard = self.chan.lock().unwrap_or_else(|e| e.into_inner());
        let (_, resp) = guard.as_ref().ok_or_else(|| self.gone())?;
        self.read_answer(resp)
    }

    fn read_answer(&self, resp: &OwnedFd) -> Result<i32> {
        let mut buf = [0u8; 4];
        let mut got = 0;
        while got < 4 {
            let mut fds = [
                libc::pollfd {
                    fd: resp.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: self.helper.as_fd().as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            // SAFETY: two live pollfds, no timeout.
            if unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) } < 0 {
                match Errno::last() {
                    Errno::EINTR => continue,
                    e => return Err(SysError::syscall("poll (lease spawner)", e)),
                }
            }
            if fds[0].revents == 0 {
                return Err(self.gone()); // only the helper's pidfd is ready: it exited
            }
            match nix::unistd::read(resp, &mut buf[got..]) {
                Ok(0) => return Err(self.gone()),
                Ok(n) => got += n,
                Err(Errno::EINTR) => {}
                Err(e) => return Err(SysError::syscall("read (lease spawner)", e)),
            }
        }
        Ok(i32::from_ne_bytes(buf))
    }

    /// Has the helper clone a child for `req`; returns once the child has exec'd or exited.
    fn run(&self, req: &mut HelperRequest) -> Result<()> {
        let guard = self.chan.lock().unwrap_or_else(|e| e.into_inner());
        let (reqw, resp) = guard.as_ref().ok_or_else(|| self.gone())?;
        let ptr = (req as *mut HelperRequest as usize).to_ne_bytes();
        match nix::unistd::write(reqw, &ptr) {
            Ok(8) => {}
            Ok(_) => return Err(SysError::syscall("write (lease spawner)", Errno::EIO)),
            Err(Errno::EPIPE) => return Err(self.gone()),
            Err(e) => return Err(SysError::syscall("write (lease spawner)", e)),
        }
        self.read_answer(resp).map(|_| ())
    }

    /// Closes the request pipe (the helper exits at EOF) and reaps the helper; only then is
    /// its stack unmapped. If it cannot be reaped, the stack and plan are leaked rather than
    /// freed under a process that may still use them.
    fn shutdown(&mut self) {
        let chan = self
            .chan
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        drop(chan);
        let reaped = self.helper.wait().is_ok()
            || (self.helper.send_signal(libc::SIGKILL).is_ok() && self.helper.wait().is_ok());
        if !reaped {
            std::mem::forget(self.stack.take());
            let plan = std::mem::replace(
                &mut self.plan,
                Box::new(HelperPlan {
                    procs_fd: -1,
                    req_rd: -1,
                    resp_wr: -1,
                }),
            );
            std::mem::forget(plan);
        }
    }
}

impl Drop for CgroupSpawner {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Entry of the lease spawner; returns (to `clone3_run`, which exits) at EOF or daemon exit.
extern "C" fn helper_main(arg: *mut c_void) -> c_int {
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
    // SAFETY: no arguments.
    let ppid = unsafe { sys(libc::SYS_getppid, [0; 6]) }.unwrap_or(0);
    // SAFETY: integer arguments; a pidfd of the daemon, readable once it has exited.
    let daemon = match unsafe { sys(libc::SYS_pidfd_open, [ppid, 0, 0, 0, 0, 0]) } {
        Ok(fd) => fd as c_int,
        Err(e) => {
            answer(e);
            return 1;
        }
    };
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
        let args = CloneArgs {
            flags: (libc::CLONE_VM | libc::CLONE_VFORK | libc::CLONE_PARENT | libc::CLONE_PIDFD)
                as u64,
            pidfd: &mut req.pidfd as *mut c_int as u64,
            // With CLONE_PARENT the child takes our exit signal (SIGCHLD); clone3 wants 0.
            exit_signal: 0,
            stack: req.stack_lo as u64,
            stack_size: req.stack_size as u64,
            ..CloneArgs::default()
        };
        // SAFETY: the child runs `child_main` on the request's stack with its plan, both alive
        // until we answer, which is after the child has exec'd or exited (CLONE_VFORK).
        match unsafe { clone3_run(&args, child_main, req.plan as *mut c_void) } {
            Ok(pid) => req.pid = pid,
            Err(e) => req.errno = e,
        }
        answer(0);
    }
    // SAFETY: our own fd.
    let _ = unsafe { sys(libc::SYS_close, [daemon as usize, 0, 0, 0, 0, 0]) };
    0
}

/// A join through the lease's spawner (cgroup v1): as [`spawn_join`], but the helper clones.
fn spawn_join_via(spawner: &CgroupSpawner, prep: &Prepared, ns: &LeaseNs) -> Result<PidFd> {
    let (err_r, err_w) = pipe()?;
    let mut plan = ChildPlan::new(Some(prep), err_w.as_raw_fd());
    let all = std::iter::once((NsKind::User, ns.user())).chain(ns.extra());
    for (i, (kind, fd)) in all.enumerate().take(plan.join_fds.len()) {
        plan.join_fds[i] = fd.as_raw_fd();
        plan.join_types[i] = kind.clone_flag();
        plan.njoin = i + 1;
    }
    let stack = Stack::new()?;
    let (stack_lo, stack_size) = stack.range();
    let mut req = HelperRequest {
        plan: &plan,
        stack_lo,
        stack_size,
        pidfd: -1,
        pid: -1,
        errno: 0,
    };
    let sent = spawner.run(&mut req);
    // SAFETY: the helper wrote these before answering (or died); read as memory another task
    // changed.
    let (pidfd, pid, errno) = unsafe {
        (
            ptr::read_volatile(&req.pidfd),
            ptr::read_volatile(&req.pid),
            ptr::read_volatile(&req.errno),
        )
    };
    if let Err(e) = sent {
        // The helper died mid-request. A child it may have made could still use `plan` and
        // `stack`: kill and reap it before they go (its pidfd is written before it runs).
        if pidfd >= 0 {
            // SAFETY: CLONE_PIDFD installed this fd for the child; nothing else owns it.
            let child = unsafe { PidFd::from_raw(pidfd, pid) };
            let _ = child.send_signal(libc::SIGKILL);
            let _ = child.wait();
        }
        return Err(e);
    }
    drop(stack);
    if errno != 0 || pid <= 0 || pidfd < 0 {
        let errno = if errno != 0 { errno } else { libc::EIO };
        return Err(SysError::syscall(
            "clone3 (lease spawner)",
            Errno::from_raw(errno),
        ));
    }
    // SAFETY: CLONE_PIDFD gave us this fd for `pid`; nothing else owns it.
    let child = unsafe { PidFd::from_raw(pidfd, pid) };
    drop(err_w);
    finish(child, &err_r, prep)
}
