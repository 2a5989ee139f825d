//! `SysError`: every way a call into the kernel can fail, with the context an operator needs.

use std::fmt;
use std::path::PathBuf;

pub use nix::errno::Errno;

/// A failed step of a child between `clone` and `execve`, reported back through the error pipe
/// (or, for the namespace creator, through shared memory) as a number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
#[non_exhaustive]
pub enum ChildStep {
    /// `rt_sigaction(SIG_DFL)` on every catchable signal.
    ResetSignals = 1,
    /// `prlimit64` on the child itself (also in the namespace creator, before it switches ids).
    Rlimit,
    /// `setns` into the lease's user namespace, then into its optional ones.
    Setns,
    /// Reading the wake-up byte that says the id maps are written.
    WaitForMaps,
    /// `setsid`.
    Setsid,
    /// `capget`/`capset` clearing the inheritable set.
    ClearInheritable,
    /// `prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)`.
    ClearAmbient,
    /// `setgroups` inside the namespace.
    Setgroups,
    /// `setresgid` inside the namespace.
    Setresgid,
    /// `setresuid` inside the namespace.
    Setresuid,
    /// `chdir` to the working directory.
    Chdir,
    /// Moving stdin/stdout/stderr into place (`fcntl(F_DUPFD_CLOEXEC)`, `dup3`).
    Stdio,
    /// `close_range(3, ~0, CLOSE_RANGE_CLOEXEC)`.
    CloseRange,
    /// `rt_sigprocmask` emptying the signal mask.
    SignalMask,
    /// `execve`.
    Execve,
    /// Creator: `prlimit64(RLIMIT_NPROC)`, the namespace's process cap.
    CreatorNproc,
    /// Creator: `prctl(PR_SET_KEEPCAPS)`.
    CreatorKeepCaps,
    /// Creator: `setgroups(0, NULL)` before switching ids.
    CreatorSetgroups,
    /// Creator: `setresgid` to the lease's base gid.
    CreatorSetresgid,
    /// Creator: `setresuid` to the lease's base uid.
    CreatorSetresuid,
    /// Creator: `capset` raising the kept capabilities back into the effective set.
    CreatorCapset,
    /// Creator: `clone(CLONE_NEWUSER)`.
    CreatorClone,
    /// Bringing loopback up in a new network namespace (`ioctl(SIOCSIFFLAGS)`).
    Loopback,
    /// Writing `0` into the lease cgroup's `cgroup.procs` (cgroup v1), the child's first step.
    JoinCgroup,
    /// Creator: `clone3(CLONE_NEWUSER | CLONE_INTO_CGROUP)` (cgroup2).
    CreatorClone3,
    /// `close_range` of every fd of the daemon the child does not need, its first step.
    DropFds,
}

impl ChildStep {
    /// The step numbered `n` on the wire, if any.
    pub(crate) fn from_u32(n: u32) -> Option<Self> {
        use ChildStep::*;
        const ALL: [ChildStep; 26] = [
            ResetSignals,
            Rlimit,
            Setns,
            WaitForMaps,
            Setsid,
            ClearInheritable,
            ClearAmbient,
            Setgroups,
            Setresgid,
            Setresuid,
            Chdir,
            Stdio,
            CloseRange,
            SignalMask,
            Execve,
            CreatorNproc,
            CreatorKeepCaps,
            CreatorSetgroups,
            CreatorSetresgid,
            CreatorSetresuid,
            CreatorCapset,
            CreatorClone,
            Loopback,
            JoinCgroup,
            CreatorClone3,
            DropFds,
        ];
        ALL.into_iter().find(|s| *s as u32 == n)
    }

    /// The name shown to operators: the system call and what it was for.
    pub fn as_str(self) -> &'static str {
        use ChildStep::*;
        match self {
            ResetSignals => "rt_sigaction (default signal dispositions)",
            Rlimit => "prlimit64",
            Setns => "setns (user namespace)",
            WaitForMaps => "read (wait for id maps)",
            Setsid => "setsid",
            ClearInheritable => "capset (clear inheritable)",
            ClearAmbient => "prctl (clear ambient capabilities)",
            Setgroups => "setgroups",
            Setresgid => "setresgid",
            Setresuid => "setresuid",
            Chdir => "chdir",
            Stdio => "dup3 (stdio)",
            CloseRange => "close_range",
            SignalMask => "rt_sigprocmask",
            Execve => "execve",
            CreatorNproc => "prlimit64 (namespace RLIMIT_NPROC)",
            CreatorKeepCaps => "prctl (PR_SET_KEEPCAPS)",
            CreatorSetgroups => "setgroups (creator)",
            CreatorSetresgid => "setresgid (creator to base gid)",
            CreatorSetresuid => "setresuid (creator to base uid)",
            CreatorCapset => "capset (creator keeps CAP_SYS_ADMIN)",
            CreatorClone => "clone (CLONE_NEWUSER)",
            Loopback => "ioctl (SIOCSIFFLAGS lo up)",
            JoinCgroup => "write cgroup.procs (join the lease cgroup)",
            CreatorClone3 => "clone3 (CLONE_NEWUSER | CLONE_INTO_CGROUP)",
            DropFds => "close_range (the daemon's other fds)",
        }
    }
}

impl fmt::Display for ChildStep {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Errors of the kernel layer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SysError {
    /// A system call of the daemon itself failed.
    #[error("{syscall}: {source}")]
    Syscall {
        syscall: &'static str,
        #[source]
        source: Errno,
    },
    /// A system call about one process failed.
    #[error("{syscall} on pid {pid}: {source}")]
    Process {
        syscall: &'static str,
        pid: i32,
        #[source]
        source: Errno,
    },
    /// A system call on a path failed.
    #[error("{syscall} {}: {source}", path.display())]
    Path {
        syscall: &'static str,
        path: PathBuf,
        #[source]
        source: Errno,
    },
    /// A child failed between `clone` and `execve`; it has been reaped.
    #[error("child {pid} failed before exec of {program:?}, at {step}: {source}")]
    ChildSetup {
        pid: i32,
        program: String,
        step: ChildStep,
        #[source]
        source: Errno,
    },
    /// A child did not reach `execve` within the spawn's deadline (something in the lease stopped
    /// or stalled it); it has been killed.
    #[error("child {pid} ({program:?}) did not reach exec within {waited_ms} ms; it was killed")]
    SpawnTimeout {
        pid: i32,
        program: String,
        waited_ms: u64,
    },
    /// The namespace creator (the helper running as the lease's base ids) failed.
    #[error("namespace creator {pid} failed at {step}: {source}")]
    Creator {
        pid: i32,
        step: ChildStep,
        #[source]
        source: Errno,
    },
    /// An id map read back differs from what was written.
    #[error("{file} of pid {pid} reads back {found:?}, wrote {wrote:?}")]
    MapMismatch {
        pid: i32,
        file: &'static str,
        wrote: String,
        found: String,
    },
    /// The process behind a pidfd has exited (or been reaped), so /proc/PID is not it.
    #[error("process {pid} has exited")]
    ProcessGone { pid: i32 },
    /// The path exists but is not a bind mount of a user namespace.
    #[error("{} is not a pinned user namespace", path.display())]
    NotPinned { path: PathBuf },
    /// A namespace is already pinned at the path.
    #[error("{} already pins a namespace", path.display())]
    AlreadyPinned { path: PathBuf },
    /// The host cannot do what was asked (e.g. `pids_max` where no pids controller is usable).
    #[error("unsupported {what}: {reason}")]
    Unsupported { what: &'static str, reason: String },
    /// Input rejected before anything was spawned.
    #[error("invalid {what}: {reason}")]
    InvalidInput { what: &'static str, reason: String },
    /// Several steps of a teardown failed; the teardown went on after each.
    #[error("{} teardown step(s) failed: {}", errors.len(), join(errors))]
    Teardown { errors: Vec<SysError> },
}

fn join(errors: &[SysError]) -> String {
    errors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

impl SysError {
    /// The errno behind the error, when one system call caused it.
    pub fn errno(&self) -> Option<Errno> {
        match self {
            SysError::Syscall { source, .. }
            | SysError::Process { source, .. }
            | SysError::Path { source, .. }
            | SysError::ChildSetup { source, .. }
            | SysError::Creator { source, .. } => Some(*source),
            _ => None,
        }
    }

    pub(crate) fn syscall(syscall: &'static str, source: Errno) -> Self {
        SysError::Syscall { syscall, source }
    }

    pub(crate) fn process(syscall: &'static str, pid: i32, source: Errno) -> Self {
        SysError::Process {
            syscall,
            pid,
            source,
        }
    }

    pub(crate) fn path(syscall: &'static str, path: impl Into<PathBuf>, source: Errno) -> Self {
        SysError::Path {
            syscall,
            path: path.into(),
            source,
        }
    }

    pub(crate) fn io_path(
        syscall: &'static str,
        path: impl Into<PathBuf>,
        err: &std::io::Error,
    ) -> Self {
        Self::path(syscall, path, errno_of(err))
    }
}

/// The errno inside an `io::Error` (EIO when it carries none).
pub(crate) fn errno_of(err: &std::io::Error) -> Errno {
    Errno::from_raw(err.raw_os_error().unwrap_or(libc::EIO))
}

/// Result of this crate.
pub type Result<T, E = SysError> = std::result::Result<T, E>;
