//! The spawn path: take the lease (shared for a join, alone for a first spawn), check the
//! request against it, build the command (log files, rlimits, the lease's cgroups, the deadline),
//! clone, record the process before answering, and hand it to its supervisor (or, for a caller
//! that waits and a process that exits within the linger, record it ended at once).

use std::sync::Arc;
use std::time::{Duration, Instant};

use subid_core::RlimitName;
use subid_store::{PendingRow, ProcessRecord, ProcessState};
use subid_sys::spawn::{Command, Namespace};
use subid_sys::{ChildStep, Errno, PidFd, SpawnHooks, SysError, members, userns};
use tokio::sync::{OwnedRwLockReadGuard, OwnedRwLockWriteGuard};

use super::namespaces::ns_spec;
use super::supervise::{end_of, ended};
use super::{ProcessService, SIGKILL, SpawnSpec, busy_elsewhere, lock_map, lock_wait};
use crate::lease::{LeaseService, ProcessOp, now_ms};
use crate::logs::{Logs, LogsError};
use crate::service_error::ServiceError;

/// A held per-lease lock: shared for joining spawns, exclusive for everything else. The guards
/// are held only for their `Drop`, which releases the lock.
#[allow(dead_code)]
enum LeaseGuard {
    Shared(OwnedRwLockReadGuard<()>),
    Exclusive(OwnedRwLockWriteGuard<()>),
}

/// How long a spawn whose caller waits for the exit (`POST ...?wait=true`) watches the new
/// process in place before it records it as running and hands it to its supervisor.
pub const LINGER_MAX: Duration = Duration::from_millis(10);

/// A started process, as [`ProcessService::spawn`] answers.
#[derive(Debug)]
pub struct Spawned {
    /// Its record: `running`, or already ended when it exited within the linger.
    pub record: ProcessRecord,
    /// The time spent waiting in place for its exit (part of the spawn's duration that was the
    /// process's own run).
    pub lingered: Duration,
}

impl ProcessService {
    /// Starts a process in the lease's namespace and records it before answering.
    ///
    /// `linger` (at most [`LINGER_MAX`]) is for a caller that will wait for the exit anyway: the
    /// spawn watches the process that long on the thread that started it, and one that has
    /// exited by then is recorded started and ended in one commit and answered ended, with no
    /// supervisor, reactor or second row in between (most of an API join's cost over the
    /// kernel's, docs/BENCHMARKS.md). One still running is recorded and supervised as usual. The
    /// process is in its lease's cgroup from birth, so an unrecorded moment leaves nothing
    /// outside the lease's teardown.
    pub async fn spawn(
        &self,
        name: String,
        spec: SpawnSpec,
        linger: Duration,
    ) -> Result<Spawned, ServiceError> {
        let linger = linger.min(LINGER_MAX);
        if crate::blocking::in_place() {
            // In the request's own task: from the clone on, the spawn never awaits (it blocks
            // in place), so a client that goes away cannot leave it half-way, and the answer
            // is written by the thread that saw the process start (and end).
            return self.spawn_here(name, spec, linger).await;
        }
        // Elsewhere the blocking part is awaited on the blocking pool: detached from the
        // request, so that it still finishes and is recorded (or is undone).
        let this = self.clone();
        tokio::spawn(async move { this.spawn_here(name, spec, linger).await })
            .await
            .map_err(|e| ServiceError::internal(format!("spawn task failed: {e}")))
            .and_then(|r| r)
    }

    async fn spawn_here(
        &self,
        name: String,
        spec: SpawnSpec,
        linger: Duration,
    ) -> Result<Spawned, ServiceError> {
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
        // Handed to the keeper once the child exists (below), while it sets itself up.
        let (stdout, stderr) = logs.attach_unsent(&id).map_err(|e| match e {
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
        // The record, but for what only the started process can tell.
        let template = ProcessRecord {
            id: id.clone(),
            lease_id: lease.id,
            lease_name: lease.name.clone(),
            pid: 0,
            start_ticks: 0,
            boot_id: self.inner.boot_id.clone(),
            host_uid: lease.uid_base.saturating_add(spec.user),
            host_gid: lease.gid_base.saturating_add(spec.group),
            argv: spec.argv.clone(),
            state: ProcessState::Running,
            exit_code: None,
            signal: None,
            started_at: 0,
            ended_at: None,
        };
        let spawn_pin = pin.clone();
        let leases = self.inner.leases.clone();
        let (keeper, log_id) = (Arc::clone(&logs), id.clone());

        // Clone, handshake, linger and the row, all on one thread that may block: nothing after
        // the clone awaits, so neither a client that goes away nor a hop to another thread comes
        // between a started process and its record.
        let run = move || -> Result<Started, Failure> {
            let mut ahead = RowAhead {
                leases: &leases,
                template,
                keeper: &keeper,
                log_id: &log_id,
                record: None,
                pending: None,
            };
            let spawned = match &existing {
                Some(ns) => command.spawn_then(Namespace::Join(ns), &mut ahead),
                None => command.spawn_then(
                    Namespace::Create {
                        spec: &ns_spec,
                        pin: &spawn_pin,
                    },
                    &mut ahead,
                ),
            };
            // A failed spawn drops its pending row: rolled back.
            let pidfd = spawned.map_err(Failure::Spawn)?;
            // Not recorded means not started: take it back (it cannot be stopped: SIGKILL).
            let take_back = |error: ServiceError| {
                let _ = pidfd.send_signal(SIGKILL);
                let _ = pidfd.wait_timeout(Duration::from_secs(5));
                Failure::Record(error)
            };
            let recorded = match (ahead.pending.take(), ahead.record.take()) {
                (Some(Ok(row)), Some(record)) => leases.commit_process(row).map(|()| record),
                (Some(Err(error)), _) => Err(error),
                // Written after the exec: the child was slow to get there.
                (None, Some(record)) => leases
                    .record_process_blocking(&ProcessOp::Insert(record.clone()))
                    .map(|()| record),
                (_, None) => Err(ServiceError::internal(
                    "a spawn returned a process it never showed its caller",
                )),
            };
            let record = recorded.map_err(take_back)?;
            let lingered_from = Instant::now();
            // Reaped here if it exits within the linger; a failed poll only ends the linger.
            let end = if linger.is_zero() {
                None
            } else {
                pidfd
                    .wait_timeout(linger)
                    .ok()
                    .flatten()
                    .map(|s| end_of(Some(s)))
            };
            let lingered = lingered_from.elapsed();
            // Its end, when it came within the linger; one the disk refuses now is written
            // later, with retries (`end_recorded`).
            let end_recorded = match &end {
                Some(end) => leases
                    .record_process_blocking(&ProcessOp::Finish {
                        id: record.id.clone(),
                        end: end.clone(),
                    })
                    .is_ok(),
                None => true,
            };
            Ok(Started {
                pidfd,
                record,
                end,
                end_recorded,
                lingered,
            })
        };
        // The clone-to-exec handshake blocks for about a millisecond (at most the spawn's
        // deadline), the linger for at most its own: on the multi-threaded runtime this runs in
        // place, elsewhere on the blocking pool.
        let result = crate::blocking::run(run)
            .await
            .map_err(|e| ServiceError::internal(format!("spawn thread failed: {e}")))?;
        let started = result.map_err(|failure| match failure {
            Failure::Spawn(e) => spawn_error(&spec, capped, e),
            Failure::Record(e) => e,
        })?;
        if created {
            match subid_sys::LeaseNs::open(&pin) {
                Ok(ns) => {
                    lock_map(&self.inner.spaces).insert(lease.id, Arc::new(ns));
                }
                Err(error) => tracing::warn!(lease = %name, %error, "cannot reopen the new pin"),
            }
        }
        // Recorded: the logs are the process's now, and go with its lease.
        unrecorded.recorded();
        let Started {
            pidfd,
            record,
            end,
            end_recorded,
            lingered,
        } = started;
        if let Some(end) = end {
            tracing::info!(id = %id, pid = record.pid, lease = %name, host_uid = record.host_uid, exit_code = ?end.exit_code, signal = ?end.signal, "process started and exited");
            if end_recorded {
                // The keeper goes on copying while writers remain (a background child).
                logs.forget(&id);
            } else {
                self.record_end_later(record.clone(), pidfd, end.clone());
            }
            drop(guard);
            return Ok(Spawned {
                record: ended(record, &end),
                lingered,
            });
        }
        tracing::info!(id = %id, pid = record.pid, lease = %name, host_uid = record.host_uid, "process started");
        self.supervise(record.clone(), Arc::new(pidfd), true);
        drop(guard);
        Ok(Spawned { record, lingered })
    }
}

/// How long a child may take from its clone to its exec while its row waits uncommitted (and
/// holds the process rows' connection and SQLite's write lock): a process of the lease can stop
/// the child, and must not hold up other spawns or lease commits for longer than this.
const ROW_PATIENCE: Duration = Duration::from_millis(5);

/// The spawn path's hooks: while the child sets itself up (on another CPU, about a
/// millisecond), its row is written (its start time is fixed at the clone) but committed only
/// once it has exec'd, so a child that fails leaves nothing; and its logs go to the keeper. A
/// child slow to exec has its row rolled back (written again after the exec).
struct RowAhead<'a> {
    leases: &'a LeaseService,
    template: ProcessRecord,
    keeper: &'a Logs,
    log_id: &'a str,
    record: Option<ProcessRecord>,
    pending: Option<Result<PendingRow<'a>, ServiceError>>,
}

impl SpawnHooks for RowAhead<'_> {
    fn cloned(&mut self, child: &PidFd) {
        let record = ProcessRecord {
            pid: child.pid(),
            start_ticks: child
                .proc_dir()
                .and_then(|dir| members::start_ticks(&dir))
                .unwrap_or(0),
            started_at: now_ms(),
            ..self.template.clone()
        };
        self.pending = Some(self.leases.begin_process(&record));
        self.record = Some(record);
        self.keeper.send(self.log_id);
    }

    fn patience(&self) -> Duration {
        ROW_PATIENCE
    }

    fn slow(&mut self) {
        // A failure to write it stays, to be answered.
        if matches!(self.pending, Some(Ok(_))) {
            self.pending = None;
        }
    }
}

/// What the blocking part of a spawn hands back: the recorded process, and how it ended when
/// it did within the linger (then it is reaped).
struct Started {
    pidfd: PidFd,
    record: ProcessRecord,
    end: Option<subid_store::ProcessEnd>,
    /// Whether `end` is on disk.
    end_recorded: bool,
    lingered: Duration,
}

/// Why the blocking part of a spawn failed.
enum Failure {
    /// Nothing started.
    Spawn(SysError),
    /// It started but could not be recorded, and was killed.
    Record(ServiceError),
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
