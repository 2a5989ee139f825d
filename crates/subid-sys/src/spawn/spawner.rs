//! The v1 lease spawner: a helper process sitting in a lease's cgroup v1 that clones the lease's
//! joining children, so they are born in the cgroup without a `cgroup.procs` write each.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use libc::{c_int, c_void};
use nix::errno::Errno;

use super::child::{HelperPlan, HelperRequest, helper_main};
use super::mem::{SignalsBlocked, Stack, pipe};
use crate::error::{Result, SysError};
use crate::pidfd::PidFd;
use crate::raw::{CloneArgs, clone3_run};

/// How long the spawner may take to start or to answer a request (it clones and answers; it
/// runs as host root in the initial user namespace, so no tenant can stop it).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a helper that was told to go (or killed) may take to be reaped.
const EXIT_GRACE: Duration = Duration::from_secs(2);

/// A per-lease helper process that sits in the lease's cgroup v1 and clones that lease's
/// joining children, so that they are born in the cgroup and a spawn needs no `cgroup.procs`
/// write (and no RCU grace period, docs/ARCHITECTURE.md "Kernel facts") of its own. Start one with
/// [`crate::cgroup::LeaseCgroup::start_spawner`].
///
/// The helper is a `clone(CLONE_VM | CLONE_FILES)` of the daemon: it costs no page-table copy,
/// runs only raw system calls, keeps every signal blocked, and counts as one process against
/// the lease's `pids.max`. It writes itself into `cgroup.procs` once, then waits for requests:
/// a pointer to a prepared `ChildPlan` and stack in the daemon's memory, for which it does
/// `clone3(CLONE_VM | CLONE_PARENT | CLONE_PIDFD [| CLONE_INTO_CGROUP])` and answers at once.
/// `CLONE_PARENT` makes the child the daemon's own (reaped through its pidfd as usual), the
/// pidfd lands in the daemon's fd table (shared), and the daemon then waits for the child's
/// exec itself, with a deadline (see `run.rs`); `CLONE_INTO_CGROUP` puts the child in the
/// lease's cgroup2 directory too, where one tracks the lease's processes beside a v1 pids
/// hierarchy. Requests are serialised. The helper exits when the spawner is dropped (EOF on its
/// request pipe) or when the daemon exits (it polls a pidfd of the daemon, which the daemon
/// owns, so a killed helper leaks nothing). The first spawn of a lease, which creates the
/// namespace, does not go through it: its creator writes itself into `cgroup.procs`.
pub struct CgroupSpawner {
    helper: PidFd,
    /// Request pipe write end and response pipe read end; `None` once shut down.
    chan: Mutex<Option<(OwnedFd, OwnedFd)>>,
    /// The helper's ends (in the shared fd table, so they stay open here too).
    _helper_ends: (OwnedFd, OwnedFd),
    _procs: OwnedFd,
    /// A pidfd of the daemon itself, which the helper polls to notice the daemon's exit.
    _daemon: OwnedFd,
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

impl CgroupSpawner {
    /// Starts the helper, which moves itself into the cgroup whose `cgroup.procs` is `procs`.
    pub(crate) fn start(procs: OwnedFd) -> Result<Self> {
        let (req_r, req_w) = pipe()?;
        let (resp_r, resp_w) = pipe()?;
        let daemon = PidFd::open(std::process::id() as i32)?.into_owned_fd();
        let plan = Box::new(HelperPlan {
            procs_fd: procs.as_raw_fd(),
            req_rd: req_r.as_raw_fd(),
            resp_wr: resp_w.as_raw_fd(),
            daemon_fd: daemon.as_raw_fd(),
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
            _daemon: daemon,
            plan,
            stack: Some(stack),
        };
        match spawner.read_status(Instant::now() + ANSWER_TIMEOUT) {
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

    /// Whether the helper is known to have exited (so it no longer reads the daemon's memory).
    pub fn is_gone(&self) -> bool {
        matches!(self.helper.has_exited(), Ok(true))
    }

    /// Reads one 4-byte answer, or fails if the helper is gone or silent at `deadline`.
    fn read_status(&self, deadline: Instant) -> Result<i32> {
        let mut guard = self.chan.lock().unwrap_or_else(|e| e.into_inner());
        let answer = {
            let (_, resp) = guard.as_ref().ok_or_else(|| self.gone())?;
            self.read_answer(resp, deadline)
        };
        if answer.is_err() {
            self.kill(&mut guard);
        }
        answer
    }

    fn read_answer(&self, resp: &OwnedFd, deadline: Instant) -> Result<i32> {
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
            let left = deadline.saturating_duration_since(Instant::now());
            let ms = c_int::try_from(left.as_millis()).unwrap_or(c_int::MAX);
            // SAFETY: two live pollfds.
            let ready = unsafe { libc::poll(fds.as_mut_ptr(), 2, ms) };
            if ready < 0 {
                match Errno::last() {
                    Errno::EINTR => continue,
                    e => return Err(SysError::syscall("poll (lease spawner)", e)),
                }
            }
            if ready == 0 {
                return Err(SysError::process(
                    "answer (lease spawner)",
                    self.helper.pid(),
                    Errno::ETIMEDOUT,
                ));
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

    /// Has the helper clone a child for `req`; returns once the child is cloned (the caller
    /// waits for its exec). A helper that dies or stays silent until `deadline` is killed, and
    /// every later request fails.
    pub(crate) fn run(&self, req: &mut HelperRequest, deadline: Instant) -> Result<()> {
        let mut guard = self.chan.lock().unwrap_or_else(|e| e.into_inner());
        let sent = {
            let (reqw, resp) = guard.as_ref().ok_or_else(|| self.gone())?;
            let ptr = (req as *mut HelperRequest as usize).to_ne_bytes();
            match nix::unistd::write(reqw, &ptr) {
                Ok(8) => self.read_answer(resp, deadline).map(|_| ()),
                Ok(_) => Err(SysError::syscall("write (lease spawner)", Errno::EIO)),
                Err(Errno::EPIPE) => Err(self.gone()),
                Err(e) => Err(SysError::syscall("write (lease spawner)", e)),
            }
        };
        if sent.is_err() {
            self.kill(&mut guard);
        }
        sent
    }

    /// Kills the helper and closes the channel; the helper is reaped within a grace.
    fn kill(&self, chan: &mut Option<(OwnedFd, OwnedFd)>) {
        drop(chan.take());
        let _ = self.helper.send_signal(libc::SIGKILL);
        let _ = self.helper.wait_timeout(EXIT_GRACE);
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
        let reaped = matches!(self.helper.wait_timeout(EXIT_GRACE), Ok(Some(_)))
            || (self.helper.send_signal(libc::SIGKILL).is_ok()
                && matches!(self.helper.wait_timeout(EXIT_GRACE), Ok(Some(_))))
            || matches!(self.helper.is_present(), Ok(false));
        if !reaped {
            std::mem::forget(self.stack.take());
            let plan = std::mem::replace(
                &mut self.plan,
                Box::new(HelperPlan {
                    procs_fd: -1,
                    req_rd: -1,
                    resp_wr: -1,
                    daemon_fd: -1,
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
