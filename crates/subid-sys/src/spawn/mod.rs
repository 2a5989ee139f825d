//! Starting processes inside a lease's user namespace, the vfork way, with a deadline.
//!
//! # Rooms
//! This module holds the builder ([`Command`]) and what it prepares before a clone; `child.rs`
//! the code that runs in a child between clone and exec (raw system calls only: audit it
//! alone); `run.rs` the daemon's side of a spawn (clone, then wait with a deadline); `spawner.rs`
//! the v1 lease spawner; `mem.rs` stacks, signal masks and pipes.
//!
//! # How a process is started
//! The daemon is multi-threaded and may be large, so it never `fork`s (a plain fork costs about
//! 31 us per MiB of the parent, docs/ARCHITECTURE.md "Kernel facts") and never unshares a namespace itself.
//! Children are made with `clone3(CLONE_VM)` on a separately mapped stack, like glibc's
//! `posix_spawn`: they share the daemon's memory and run only raw system calls (module `raw`)
//! on data prepared before the clone. Unlike `posix_spawn` they are not `CLONE_VFORK`: once a
//! child has joined a lease's user namespace, the lease's root may stop it (kill(2) needs only
//! `CAP_KILL` in the target's user namespace), and a vfork parent would then sleep for good. The
//! daemon instead polls the child's close-on-exec error pipe until the spawn's deadline
//! ([`Command::timeout`]) and kills the child when it stalls (see `run.rs`). All signals are
//! blocked around the clone, so none of the daemon's handlers can run on the child's side; the
//! child resets every disposition to `SIG_DFL` and empties its mask just before `execve` (Rust
//! ignores `SIGPIPE`, which `execve` would otherwise keep).
//!
//! * **Join** ([`Namespace::Join`]): one child C, `clone3(CLONE_VM|CLONE_PIDFD)`; it sets its
//!   rlimits (still host root, so hard limits may go up), `setns`es into the lease's user
//!   namespace (allowed: C is single-threaded and does not share `fs`; `CLONE_VM` does not
//!   matter for a user namespace, setns(2)) and then into its optional namespaces (which that
//!   user namespace owns, so C now holds the capabilities they ask for), then the common steps
//!   and `execve`.
//! * **Create** ([`Namespace::Create`]): the namespace's owner is the euid of the task that
//!   creates it, and it must be the lease's base uid, so that every per-user counter charged to
//!   the owner (inotify instances, pending signals, message queues) is per lease
//!   (docs/ARCHITECTURE.md "Kernel facts"). `unshare(CLONE_NEWUSER)` is refused (`EINVAL`) to a task sharing its
//!   mm, so a helper A (`clone3(CLONE_VM|CLONE_FILES|CLONE_PIDFD)`) sets the rlimits (still host
//!   root, so B inherits them, hard limits raised if the daemon may), sets `PR_SET_KEEPCAPS`,
//!   drops its groups, switches to the base gid and uid with raw `setresgid`/`setresuid` (only
//!   A's creds change), raises its kept permitted capabilities (CAP_SYS_ADMIN among them) back
//!   into the effective set with `capset` (so hosts that restrict unprivileged user namespaces
//!   still allow it) and then `clone3(CLONE_VM|CLONE_NEWUSER|CLONE_PARENT|CLONE_PIDFD
//!   [|CLONE_NEWNS|CLONE_NEWUTS|CLONE_NEWIPC|CLONE_NEWNET])`s B and exits; the daemon waits for
//!   A's exit with the deadline too. `clone3` (unlike `unshare`) accepts `CLONE_NEWUSER` with
//!   `CLONE_VM`, so B still costs no page-table copy; the optional namespaces come out owned by
//!   the new user namespace. `CLONE_PARENT` makes B the daemon's child; `CLONE_FILES` puts B's
//!   pidfd straight into the daemon's fd table, so B is never named by a bare pid. B brings
//!   loopback up (new network namespace) and waits on a wake-up pipe while the daemon writes
//!   `setgroups`, `uid_map` and `gid_map` through the pidfd-verified `/proc/<B>`, reads them back
//!   and pins `/proc/<B>/ns/*` (bind mounts); then B runs the common steps and `execve`s (or, for
//!   [`crate::userns::create_pinned`], exits).
//!
//! * **Lease cgroup** ([`Command::cgroup`], see [`crate::cgroup`]): nothing of the lease may run
//!   outside its cgroup, even briefly, and the daemon writes no `cgroup.procs` per spawn. On
//!   cgroup2, C (join) and B (create) are made with `clone3(... | CLONE_INTO_CGROUP)` on the
//!   lease cgroup's directory fd; they are born inside. On a v1 hierarchy the child's very first
//!   system call writes `0` into the lease's open `cgroup.procs` (for a create, A does, before it
//!   switches ids or clones B, so B inherits it); that write waits for an RCU grace period, 5-19
//!   ms when spawns are spread out. A [`CgroupSpawner`] takes it off the join path: a helper
//!   sitting in the v1 cgroup clones the children (`CLONE_PARENT`, so they are still the
//!   daemon's), into the lease's cgroup2 directory as well where there is one.
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

mod child;
mod mem;
mod run;
mod spawner;

pub use spawner::CgroupSpawner;

/// `/dev/null`, opened once for every spawn of this process (the children's stdin, and stdout
/// and stderr unless given): one `open` and `close` fewer per spawn. Close-on-exec here; each
/// child dups it to its own fds.
fn dev_null() -> Result<BorrowedFd<'static>> {
    static DEV_NULL: std::sync::OnceLock<OwnedFd> = std::sync::OnceLock::new();
    if let Some(fd) = DEV_NULL.get() {
        return Ok(fd.as_fd());
    }
    let opened = nix::fcntl::open("/dev/null", OFlag::O_RDWR | OFlag::O_CLOEXEC, Mode::empty())
        .map_err(|e| SysError::path("open", "/dev/null", e))?;
    // A spawn on another thread that opened it first wins; this copy closes.
    Ok(DEV_NULL.get_or_init(|| opened).as_fd())
}

/// What a caller of [`Command::spawn_then`] does while the child sets itself up. The spawn's
/// deadline runs on meanwhile; no hook may wait on the child.
pub trait SpawnHooks {
    /// The child exists (its pid and start time are fixed) and has not exec'd yet.
    fn cloned(&mut self, _child: &PidFd) {}
    /// How long after [`SpawnHooks::cloned`] the child may take to exec before
    /// [`SpawnHooks::slow`] is called: a caller that holds something for the child (a lock)
    /// lets go of it then, since a process of the lease can stop the child for as long as the
    /// deadline.
    fn patience(&self) -> Duration {
        Duration::MAX
    }
    /// The child did not exec within [`SpawnHooks::patience`]; the spawn goes on waiting until
    /// its deadline.
    fn slow(&mut self) {}
}

/// No hooks.
impl SpawnHooks for () {}

/// Creates and pins the namespaces of `spec` at `pin` with no process left in them (a holder
/// that exits once they are pinned); see [`crate::userns::create_pinned`].
pub(crate) fn create_holder(spec: &UserNsSpec, pin: &Path, timeout: Duration) -> Result<()> {
    let (result, _leaked) = run::create(spec, pin, None, timeout, &mut ());
    result.map(|_| ())
}

use std::ffi::{CString, OsStr, OsString};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::ptr;
use std::sync::Arc;
use std::time::Duration;

use libc::{c_char, c_int};
use nix::fcntl::OFlag;
use nix::sys::resource::Resource;
use nix::sys::stat::Mode;
use subid_core::RlimitName;

use crate::cgroup::SpawnCgroup;
use crate::error::{Result, SysError};
use crate::pidfd::PidFd;
use crate::userns::{LeaseNs, UserNsSpec};

/// The deadline of a spawn unless [`Command::timeout`] sets another: from the clone until the
/// child has exec'd.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// The kernel's resource behind an API name.
pub fn resource_of(name: RlimitName) -> Resource {
    match name {
        RlimitName::As => Resource::RLIMIT_AS,
        RlimitName::Core => Resource::RLIMIT_CORE,
        RlimitName::Cpu => Resource::RLIMIT_CPU,
        RlimitName::Data => Resource::RLIMIT_DATA,
        RlimitName::Fsize => Resource::RLIMIT_FSIZE,
        RlimitName::Locks => Resource::RLIMIT_LOCKS,
        RlimitName::Memlock => Resource::RLIMIT_MEMLOCK,
        RlimitName::Msgqueue => Resource::RLIMIT_MSGQUEUE,
        RlimitName::Nice => Resource::RLIMIT_NICE,
        RlimitName::Nofile => Resource::RLIMIT_NOFILE,
        RlimitName::Nproc => Resource::RLIMIT_NPROC,
        RlimitName::Rss => Resource::RLIMIT_RSS,
        RlimitName::Rtprio => Resource::RLIMIT_RTPRIO,
        RlimitName::Rttime => Resource::RLIMIT_RTTIME,
        RlimitName::Sigpending => Resource::RLIMIT_SIGPENDING,
        RlimitName::Stack => Resource::RLIMIT_STACK,
    }
}

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
    timeout: Duration,
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
            timeout: DEFAULT_TIMEOUT,
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

    /// Adds a resource limit by its API name.
    pub fn rlimit_named(&mut self, name: RlimitName, soft: u64, hard: u64) -> &mut Self {
        self.rlimit(resource_of(name), soft, hard)
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

    /// Starts the process inside the lease's cgroups (see [`crate::cgroup::LeaseCgroups`]),
    /// so that it never runs anything outside them: cgroup2 starts it there with
    /// `clone3(CLONE_INTO_CGROUP)`; a v1 cgroup's spawner, sitting inside, clones joining
    /// children, and the first process of a new namespace is moved in by the daemon while it
    /// still waits for its maps.
    pub fn cgroup(&mut self, cgroup: SpawnCgroup) -> &mut Self {
        self.cgroup = Some(cgroup);
        self
    }

    /// How long the child may take from the clone until it has exec'd (default
    /// [`DEFAULT_TIMEOUT`]); a first spawn counts the namespace's creation in it.
    pub fn timeout(&mut self, timeout: Duration) -> &mut Self {
        self.timeout = timeout;
        self
    }

    /// Starts the process and returns its pidfd (the pid is [`PidFd::pid`]). The caller reaps it
    /// with [`PidFd::wait`] / [`PidFd::try_wait`]. On error nothing is left behind: a child that
    /// failed before `execve` has been reaped, and a namespace made by this call is unpinned.
    ///
    /// A child that has not exec'd by the deadline ([`timeout`](Self::timeout)) is killed and the
    /// spawn fails with [`SysError::SpawnTimeout`]: a process of the lease may stop the child
    /// once it has joined the lease's namespace, and no such stop holds the caller longer.
    pub fn spawn(&self, ns: Namespace<'_>) -> Result<PidFd> {
        self.spawn_then(ns, &mut ())
    }

    /// [`Command::spawn`], with `meanwhile` told of the child once it exists and before its
    /// exec: work that needs the child but not its exec (reading its start time, writing its
    /// record) then runs while the child sets itself up (see [`SpawnHooks`]). If a hook panics,
    /// the child is killed and the spawn fails.
    pub fn spawn_then(&self, ns: Namespace<'_>, meanwhile: &mut dyn SpawnHooks) -> Result<PidFd> {
        let prep = self.prepare()?;
        let spawned = match ns {
            Namespace::Join(ns) => match &prep.spawner {
                Some(spawner) => run::spawn_join_via(spawner, &prep, ns, self.timeout, meanwhile),
                None => run::spawn_join(&prep, ns, self.timeout, meanwhile),
            },
            Namespace::Create { spec, pin } => {
                let (result, leaked) = run::create(spec, pin, Some(&prep), self.timeout, meanwhile);
                run::Spawned {
                    result: result.and_then(|pid| {
                        pid.ok_or_else(|| SysError::InvalidInput {
                            what: "spawn",
                            reason: "no process".into(),
                        })
                    }),
                    leaked,
                }
            }
        };
        if spawned.leaked {
            // A killed child could not be confirmed gone and may still read what it was lent.
            std::mem::forget(prep);
        }
        spawned.result
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
        let devnull = dev_null()?;
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
            uid: self.uid,
            gid: self.gid,
            groups: self.groups.clone(),
            umask: self.umask,
            rlimits,
            v2_dir: self
                .cgroup
                .as_ref()
                .and_then(|c| c.v2_dir.as_ref())
                .map(AsRawFd::as_raw_fd),
            v1_procs: self
                .cgroup
                .as_ref()
                .and_then(|c| c.v1_procs.as_ref())
                .map(AsRawFd::as_raw_fd),
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
pub(crate) struct RawRlimit {
    pub(crate) resource: c_int,
    pub(crate) limit: [u64; 2],
}

/// Everything the child reads, allocated before the clone. The raw pointers below point into it.
pub(crate) struct Prepared {
    pub(crate) program: CString,
    pub(crate) _argv: Vec<CString>,
    pub(crate) _env: Vec<CString>,
    pub(crate) cwd: CString,
    pub(crate) argv_ptrs: Vec<*const c_char>,
    pub(crate) env_ptrs: Vec<*const c_char>,
    pub(crate) stdio: [RawFd; 3],
    pub(crate) uid: u32,
    pub(crate) gid: u32,
    pub(crate) groups: Vec<u32>,
    pub(crate) umask: u32,
    pub(crate) rlimits: Vec<RawRlimit>,
    /// The lease's cgroups, owned by the `Command` (see [`SpawnCgroup`]).
    pub(crate) v2_dir: Option<RawFd>,
    pub(crate) v1_procs: Option<RawFd>,
    /// v1: the lease's spawner, which clones joining children from inside the cgroup.
    pub(crate) spawner: Option<Arc<CgroupSpawner>>,
}

impl Prepared {
    /// The v1 `cgroup.procs` the first process of a new namespace is moved into, or -1.
    pub(crate) fn v1_procs(&self) -> c_int {
        self.v1_procs.unwrap_or(-1)
    }

    /// The v2 directory fd for `CLONE_INTO_CGROUP`, or -1.
    pub(crate) fn v2_dir(&self) -> c_int {
        self.v2_dir.unwrap_or(-1)
    }
}
