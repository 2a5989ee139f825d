//! The spawn path: take the lease (shared for a join, alone for a first spawn), check the
//! request against it, build the command (log files, rlimits, the lease's cgroups, the deadline),
//! clone, record the process before answering, and hand it to its supervisor.

use std::sync::Arc;

use subid_core::RlimitName;
use subid_store::{ProcessRecord, ProcessState};
use subid_sys::spawn::{Command, Namespace};
use subid_sys::{ChildStep, Errno, SysError, members, userns};
use tokio::sync::{OwnedRwLockReadGuard, OwnedRwLockWriteGuard};

use super::namespaces::ns_spec;
use super::{ProcessService, SIGKILL, SpawnSpec, busy_elsewhere, lock_map, lock_wait};
use crate::lease::{ProcessOp, now_ms};
use crate::logs::{Logs, LogsError};
use crate::service_error::ServiceError;

/// A held per-lease lock: shared for joining spawns, exclusive for everything else. The guards
/// are held only for their `Drop`, which releases the lock.
#[allow(dead_code)]
enum LeaseGuard {
    Shared(OwnedRwLockReadGuard<()>),
    Exclusive(OwnedRwLockWriteGuard<()>),
}

impl ProcessService {
    /// Starts a process in the lease's namespace and records it before answering.
    pub async fn spawn(
        &self,
        name: String,
        spec: SpawnSpec,
    ) -> Result<ProcessRecord, ServiceError> {
        let this = self.clone();
        // Detached from the request: if the client disconnects, the spawn still finishes and is
        // recorded (or is undone), never left half-way.
        tokio::spawn(async move { this.spawn_detached(name, spec).await })
            .await
            .map_err(|e| ServiceError::internal(format!("spawn task failed: {e}")))
            .and_then(|r| r)
    }

    async fn spawn_detached(
        &self,
        name: String,
        spec: SpawnSpec,
    ) -> Result<ProcessRecord, ServiceError> {
        let lock = self.lease_lock(&name);
        let wait = lock_wait(&self.inner.config);
        // Joining spawns share the lease; making its namespace (the first spawn) and tearing it
        // down are exclusive.
        let pin = self.pin_path(&name);
        let mut guard = if userns::is_pinned(&pin) {
            let shared = tokio::time::timeout(wait, Arc::clone(&lock).read_owned()).await;
            LeaseGuard::Shared(shared.map_err(|_| busy_elsewhere(&name))?)
        } else {
            LeaseGuard::Exclusive(self.exclusive(&lock, &name).await?)
        };
        let mut lease = self.active_lease(&name).await?;
        let mut existing = self.namespace_of(&lease, &pin)?;
        if existing.is_none() && matches!(guard, LeaseGuard::Shared(_)) {
            // The namespace must be made after all (its pin went stale): take the lease alone.
            drop(guard);
            guard = LeaseGuard::Exclusive(self.exclusive(&lock, &name).await?);
            lease = self.active_lease(&name).await?;
            existing = self.namespace_of(&lease, &pin)?;
        }
        for (what, id) in [("user", spec.user), ("group", spec.group)]
            .into_iter()
            .chain(spec.groups.iter().map(|g| ("groups entry", *g)))
        {
            if id >= lease.size {
                return Err(ServiceError::invalid(format!(
                    "{what} {id} is outside lease {name}, which maps ids 0..{}",
                    lease.size
                )));
            }
        }
        // The lease's default rlimits, overridden per process. A stored name this daemon does not
        // know is refused by name.
        let mut rlimits = std::collections::BTreeMap::new();
        for (rname, limits) in &lease.rlimits {
            let known = RlimitName::parse(rname).map_err(|e| {
                ServiceError::internal(format!("lease {name}: stored rlimits: {e}"))
            })?;
            rlimits.insert(known, *limits);
        }
        rlimits.extend(spec.rlimits.clone());
        // The daemon raised its own open-file limit for its connections; a process gets the one
        // it would have had, unless its lease or request sets one.
        if let Some((soft, hard)) = subid_sys::fdlimit::before_raise() {
            rlimits.entry(RlimitName::Nofile).or_insert([soft, hard]);
        }
        let ns_spec = ns_spec(&lease)?;
        // With a fleet's store, the store hears of the lease's first process on this host
        // before it starts (refused for a lease on its way out); nothing with SQLite.
        self.inner.leases.spawning(&lease).await?;
        // Every process of the lease is born in its cgroups.
        let cgroup = self.spawn_cgroup(&lease)?;
        // Its stdout and stderr are pipes to the log keeper, which writes and bounds the files
        // (the process never holds them) and outlives the daemon.
        let held = lock_map(&self.inner.logs).clone();
        let logs = match held {
            Some(logs) => logs,
            None => {
                // The first spawn starts the keeper (a few milliseconds, on the blocking pool).
                let this = self.clone();
                tokio::task::spawn_blocking(move || this.logs())
                    .await
                    .map_err(|e| ServiceError::internal(format!("log keeper task: {e}")))??
            }
        };
        let id = Logs::new_id();
        let (stdout, stderr) = logs.attach(&id).map_err(|e| match e {
            LogsError::Full { .. } => ServiceError::Unavailable {
                reason: "the log keeper holds the logs of as many processes as it can; retry \
                         when some have exited",
            },
            other => ServiceError::internal(format!("logs of a new process: {other}")),
        })?;
        // Until the process is recorded, its logs go again with any failure.
        let unrecorded = Unrecorded {
            logs: Some(Arc::clone(&logs)),
            id: id.clone(),
        };
        let mut command = Command::new(&spec.program, &spec.argv);
        for (k, v) in &spec.env {
            command.env(k, v);
        }
        command
            .cwd(&spec.cwd)
            .user(spec.user, spec.group)
            .groups(spec.groups.iter().copied())
            .umask(spec.umask)
            .stdout(stdout)
            .stderr(stderr)
            .cgroup(cgroup)
            .timeout(self.inner.config.spawn_timeout);
        // A cap the client set: pids_max, max_processes, or an nproc rlimit.
        let capped = lease.pids_max.is_some()
            || lease.max_processes.is_some()
            || rlimits.contains_key(&RlimitName::Nproc);
        for (rname, [soft, hard]) in &rlimits {
            command.rlimit_named(*rname, *soft, *hard);
        }
        let created = existing.is_none();
        if created && ns_spec.extra.mnt {
            self.private_ns_dir(&name)?;
        }
        let spawn_pin = pin.clone();
        let run = move || match &existing {
            Some(ns) => command.spawn(Namespace::Join(ns)),
            None => command.spawn(Namespace::Create {
                spec: &ns_spec,
                pin: &spawn_pin,
            }),
        };
        // The clone-to-exec handshake blocks for about a millisecond (at most the spawn's
        // deadline): on the multi-threaded runtime it runs in place (no hop to another thread),
        // elsewhere on the blocking pool.
        let result = if tokio::runtime::Handle::current().runtime_flavor()
            == tokio::runtime::RuntimeFlavor::MultiThread
        {
            tokio::task::block_in_place(run)
        } else {
            tokio::task::spawn_blocking(run)
                .await
                .map_err(|e| ServiceError::internal(format!("spawn thread failed: {e}")))?
        };
        let pidfd = Arc::new(result.map_err(|e| spawn_error(&spec, capped, e))?);
        if created {
            match subid_sys::LeaseNs::open(&pin) {
                Ok(ns) => {
                    lock_map(&self.inner.spaces).insert(lease.id, Arc::new(ns));
                }
                Err(error) => tracing::warn!(lease = %name, %error, "cannot reopen the new pin"),
            }
        }
        let start_ticks = pidfd
            .proc_dir()
            .and_then(|dir| members::start_ticks(&dir))
            .unwrap_or(0);
        let record = ProcessRecord {
            id: id.clone(),
            lease_id: lease.id,
            lease_name: lease.name.clone(),
            pid: pidfd.pid(),
            start_ticks,
            boot_id: self.inner.boot_id.clone(),
            host_uid: lease.uid_base.saturating_add(spec.user),
            host_gid: lease.gid_base.saturating_add(spec.group),
            argv: spec.argv.clone(),
            state: ProcessState::Running,
            exit_code: None,
            signal: None,
            started_at: now_ms(),
            ended_at: None,
        };
        // Written on this thread when nothing holds the write lock: a hand-off to another
        // thread costs more than the write (see `LeaseService::record_process`).
        if let Err(error) = self
            .inner
            .leases
            .record_process(&ProcessOp::Insert(record.clone()))
            .await
        {
            // Not recorded means not started: take it back (it cannot be stopped: SIGKILL).
            let _ = pidfd.send_signal(SIGKILL);
            let reaper = Arc::clone(&pidfd);
            let _ = tokio::task::spawn_blocking(move || {
                reaper.wait_timeout(std::time::Duration::from_secs(5))
            })
            .await;
            return Err(error);
        }
        // Recorded: the logs are the process's now, and go with its lease.
        unrecorded.recorded();
        tracing::info!(id = %id, pid = record.pid, lease = %name, host_uid = record.host_uid, "process started");
        self.supervise(record.clone(), pidfd, true);
        drop(guard);
        Ok(record)
    }
}

/// Maps a spawn failure to what the client should hear. `capped`: the lease or the request set
/// a process cap (pids_max, max_processes, an nproc rlimit).
fn spawn_error(spec: &SpawnSpec, capped: bool, error: SysError) -> ServiceError {
    if error.errno() == Some(Errno::EAGAIN) {
        // fork, clone or execve (RLIMIT_NPROC) refused: the lease's cap, or a system limit.
        if capped {
            return ServiceError::ProcessLimit {
                reason: "the kernel refused a new process: the lease is at its process cap \
                         (pids_max, max_processes or the nproc rlimit); retry when some of its \
                         processes exit"
                    .into(),
            };
        }
        return ServiceError::Unavailable {
            reason: "the kernel refused a new process: the lease is at its process cap \
                     (pids_max or max_processes) or a system limit was reached; retry when some \
                     of its processes exit",
        };
    }
    match &error {
        SysError::SpawnTimeout { waited_ms, .. } => ServiceError::SpawnTimeout {
            reason: format!(
                "{} did not start within {waited_ms} ms (something in the lease stopped or \
                 stalled it) and was killed; nothing was started",
                spec.program.display()
            ),
        },
        SysError::ChildSetup { step, source, .. } => {
            let client_fault = matches!(
                source,
                Errno::ENOENT
                    | Errno::EACCES
                    | Errno::ENOEXEC
                    | Errno::ENOTDIR
                    | Errno::ELOOP
                    | Errno::E2BIG
                    | Errno::ETXTBSY
                    | Errno::EISDIR
                    | Errno::EPERM
                    | Errno::EINVAL
                    | Errno::ENAMETOOLONG
            );
            if client_fault {
                let what = match step {
                    ChildStep::Execve => format!("cannot execute {}", spec.program.display()),
                    ChildStep::Chdir => format!("cannot enter cwd {}", spec.cwd.display()),
                    other => format!("process setup failed at {}", other.as_str()),
                };
                return ServiceError::ExecFailed {
                    reason: format!("{what}: {source}"),
                };
            }
            ServiceError::internal(format!("spawn: {error}"))
        }
        SysError::InvalidInput { reason, .. } => ServiceError::invalid(reason.clone()),
        _ => ServiceError::internal(format!("spawn: {error}")),
    }
}

/// The logs of a spawn not (yet) recorded; dropping this detaches them from the keeper and
/// removes their files (on a thread of its own: it waits for the keeper, with a deadline).
struct Unrecorded {
    logs: Option<Arc<Logs>>,
    id: String,
}

impl Unrecorded {
    /// The process is recorded: its logs stay.
    fn recorded(mut self) {
        self.logs = None;
    }
}

impl Drop for Unrecorded {
    fn drop(&mut self) {
        let Some(logs) = self.logs.take() else {
            return;
        };
        let ids = vec![std::mem::take(&mut self.id)];
        std::thread::spawn(move || {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
            if let Err(error) = logs.remove_files(&ids, deadline) {
                tracing::warn!(%error, "cannot remove the logs of a process that did not start");
            }
        });
    }
}
