//! Processes in a lease's user namespace: spawn, supervise, signal, tear down, expire.
//!
//! The namespace of a lease is created on its first spawn by a helper running as the lease's
//! base ids (so the namespace's owner, who is charged for per-user kernel counters, is per
//! lease), pinned at `<runtime-dir>/ns/<lease>/user`, and joined by every later spawn. Spawns and
//! teardowns of one lease are serialised by a per-lease lock; the spawn itself runs detached
//! from the request, so a client that goes away leaves a recorded process or nothing.

use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use subid_store::{LeaseRecord, ProcessRecord, ProcessState};
use subid_sys::cgroup::{CgroupHost, CgroupParent, LeaseCgroup, SpawnCgroup};
use subid_sys::logfile::Trimmed;
use subid_sys::spawn::{Command, Namespace};
use subid_sys::userns::{self, LeaseNs, UserNsSpec};
use subid_sys::{ChildStep, Errno, ExitStatus, PidFd, SysError, members};
use tokio::sync::{OwnedRwLockReadGuard, OwnedRwLockWriteGuard, RwLock, watch};

/// How often the logs of a running process are trimmed to `log_max_bytes`.
const LOG_TRIM_INTERVAL: Duration = Duration::from_secs(1);

/// A held per-lease lock: shared for joining spawns, exclusive for everything else. The guards
/// are held only for their `Drop`, which releases the lock.
#[allow(dead_code)]
enum LeaseGuard {
    Shared(OwnedRwLockReadGuard<()>),
    Exclusive(OwnedRwLockWriteGuard<()>),
}

use crate::error::ApiError;
use crate::lease::{Caller, LeaseService, ProcessOp, ReleaseKind, is_expired, now_ms};
use crate::logs::{LogPool, STREAMS};

/// What to start; checked by the API layer (ids against the lease's size here).
#[derive(Debug, Clone)]
pub struct SpawnSpec {
    /// The resolved executable (absolute, or relative to `cwd` as given).
    pub program: PathBuf,
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    pub cwd: PathBuf,
    pub user: u32,
    pub group: u32,
    pub groups: Vec<u32>,
    /// Per-process rlimits, name -> [soft, hard]; they override the lease's defaults.
    pub rlimits: BTreeMap<String, [u64; 2]>,
    pub umask: u32,
}

/// Settings of the process service.
#[derive(Debug, Clone)]
pub struct ProcessConfig {
    /// `<runtime-dir>/ns`: one directory per lease with its pins.
    pub ns_dir: PathBuf,
    /// `<state-dir>/logs`: `<id>.stdout` and `<id>.stderr`.
    pub log_dir: PathBuf,
    /// Bytes kept per stream; the rest is read and dropped so the process never blocks on it.
    pub log_max_bytes: u64,
    /// Time between SIGTERM and SIGKILL on a forced delete or expiry.
    pub kill_grace: Duration,
    /// Where lease cgroups are made (default `<the daemon's cgroup>/subidd` in the hierarchy
    /// that has the pids controller).
    pub cgroup_parent: Option<PathBuf>,
}

/// The cgroup of a capped lease, with the handle its spawns go through.
struct LeaseCg {
    cgroup: LeaseCgroup,
    spawn: Option<SpawnCgroup>,
}

/// A process this daemon watches.
struct Live {
    lease_id: i64,
    pidfd: Arc<PidFd>,
    /// The final record, once the exit is committed.
    done: watch::Receiver<Option<ProcessRecord>>,
}

struct Inner {
    leases: LeaseService,
    config: ProcessConfig,
    boot_id: String,
    spaces: Mutex<HashMap<i64, Arc<LeaseNs>>>,
    locks: Mutex<HashMap<String, Arc<RwLock<()>>>>,
    live: Mutex<HashMap<String, Live>>,
    /// What the host offers; `None` when detection itself failed.
    cgroup_host: Option<CgroupHost>,
    cgroup_parent: Mutex<Option<Arc<CgroupParent>>>,
    cgroups: Mutex<HashMap<i64, LeaseCg>>,
    /// Active leases by name, as last read (see `active_lease`).
    lease_cache: Mutex<HashMap<String, LeaseRecord>>,
    /// Log files made ahead of the spawns that take them.
    logs: Arc<LogPool>,
}

/// Shared handle to the process service; cheap to clone.
#[derive(Clone)]
pub struct ProcessService {
    inner: Arc<Inner>,
}

impl ProcessService {
    /// Prepares directories and re-adopts processes a previous daemon started: a row that still
    /// names a live process (same boot, pid and start time) is watched again; any other running
    /// row is marked `lost`.
    pub async fn start(
        leases: LeaseService,
        config: ProcessConfig,
    ) -> Result<ProcessService, anyhow::Error> {
        std::fs::create_dir_all(&config.ns_dir)?;
        std::fs::create_dir_all(&config.log_dir)?;
        let boot_id = boot_id()?;
        let cgroup_host = match CgroupHost::detect() {
            Ok(host) => {
                let summary = host.describe();
                tracing::info!(mode = summary.mode, pids = ?summary.pids_version, mount = ?summary.pids_mount, reason = ?summary.reason, "cgroups");
                Some(host)
            }
            Err(error) => {
                tracing::warn!(%error, "cannot read the cgroup layout; pids_max is unavailable");
                None
            }
        };
        let logs = LogPool::new(config.log_dir.clone());
        let service = ProcessService {
            inner: Arc::new(Inner {
                leases,
                config,
                boot_id,
                spaces: Mutex::new(HashMap::new()),
                locks: Mutex::new(HashMap::new()),
                live: Mutex::new(HashMap::new()),
                cgroup_host,
                cgroup_parent: Mutex::new(None),
                cgroups: Mutex::new(HashMap::new()),
                lease_cache: Mutex::new(HashMap::new()),
                logs,
            }),
        };
        for row in service.inner.leases.store().running_processes().await? {
            match service.adoptable(&row) {
                Some(pidfd) => {
                    tracing::info!(id = %row.id, pid = row.pid, lease = %row.lease_name, "re-adopted process");
                    service.supervise(row.clone(), Arc::new(pidfd), false);
                }
                None => {
                    tracing::warn!(id = %row.id, pid = row.pid, lease = %row.lease_name, "process vanished while the daemon was away");
                    service
                        .inner
                        .leases
                        .record_process(&ProcessOp::Finish {
                            id: row.id.clone(),
                            state: ProcessState::Lost,
                            exit_code: None,
                            signal: None,
                            ended_at: now_ms(),
                        })
                        .await?;
                }
            }
        }
        service.sweep_stale_pins().await?;
        service.sweep_stale_cgroups().await?;
        service.sweep_orphan_logs().await?;
        service.inner.logs.refill();
        Ok(service)
    }

    /// Removes the cgroups of capped leases that are released (left by a crash between a
    /// release and its cgroup's removal, or a removal that failed). Only names of this
    /// database's released leases are touched, never other directories under the parent. A
    /// cgroup that still holds processes is kept and reported, like a pin.
    async fn sweep_stale_cgroups(&self) -> Result<(), anyhow::Error> {
        let stale: std::collections::BTreeSet<String> = self
            .inner
            .leases
            .store()
            .stale_capped_names()
            .await?
            .into_iter()
            .collect();
        if stale.is_empty() {
            return Ok(());
        }
        let Ok(parent) = self.cgroup_parent() else {
            return Ok(());
        };
        tokio::task::spawn_blocking(move || {
            for name in stale {
                let Ok(cgroup) = LeaseCgroup::open(&parent, &name) else {
                    continue;
                };
                let live = cgroup.procs().map_or(0, |p| p.len());
                if live > 0 {
                    tracing::error!(lease = %name, live, cgroup = %cgroup.path().display(), "processes still run in the cgroup of a released lease; stop them so that its range is safe to reuse");
                    continue;
                }
                match cgroup.kill_all_and_remove() {
                    Ok(()) => tracing::info!(lease = %name, "removed the stale lease cgroup"),
                    Err(error) => tracing::warn!(lease = %name, %error, "cannot remove a stale lease cgroup"),
                }
            }
        })
        .await?;
        Ok(())
    }

    /// Removes log files that belong to no recorded process: pairs a previous daemon made ahead
    /// of need, and those of a spawn a crash cut short before its process was recorded.
    async fn sweep_orphan_logs(&self) -> Result<(), anyhow::Error> {
        let known: std::collections::HashSet<String> = self
            .inner
            .leases
            .store()
            .process_ids()
            .await?
            .into_iter()
            .collect();
        let logs = Arc::clone(&self.inner.logs);
        let removed = tokio::task::spawn_blocking(move || logs.remove_orphans(&known)).await??;
        if removed > 0 {
            tracing::info!(removed, "removed log files of no recorded process");
        }
        Ok(())
    }

    /// Removes the namespace pins of leases that are no longer active (left by a crash between
    /// a teardown and its release). A pin whose namespace still has live processes is kept and
    /// reported: those processes run with ids of a released lease, which an operator must stop.
    async fn sweep_stale_pins(&self) -> Result<(), anyhow::Error> {
        let active: std::collections::HashSet<String> = self
            .inner
            .leases
            .store()
            .active_names()
            .await?
            .into_iter()
            .collect();
        let ns_dir = self.inner.config.ns_dir.clone();
        tokio::task::spawn_blocking(move || {
            let Ok(entries) = std::fs::read_dir(&ns_dir) else {
                return;
            };
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if active.contains(&name) || !entry.path().is_dir() {
                    continue;
                }
                let pin = entry.path().join("user");
                if userns::is_pinned(&pin) {
                    let live = userns::open_pinned(&pin)
                        .and_then(|fd| userns::ns_inode(&fd))
                        .and_then(members::userns_members)
                        .map_or(0, |m| m.len());
                    if live > 0 {
                        tracing::error!(lease = %name, live, pin = %pin.display(), "processes still run in the namespace of a lease that is not active; stop them (nsenter --user=PIN) so that its range is safe to reuse");
                        continue;
                    }
                    match userns::unpin(&pin) {
                        Ok(()) => tracing::info!(lease = %name, "removed the stale namespace pin"),
                        Err(error) => {
                            tracing::warn!(lease = %name, %error, "cannot remove a stale pin");
                            continue;
                        }
                    }
                }
                let _ = std::fs::remove_dir(entry.path());
            }
        })
        .await?;
        Ok(())
    }

    /// The pidfd of a recorded process if it is still that process.
    fn adoptable(&self, row: &ProcessRecord) -> Option<PidFd> {
        if row.boot_id != self.inner.boot_id {
            return None;
        }
        let pidfd = PidFd::open(row.pid).ok()?;
        let dir = pidfd.proc_dir().ok()?;
        let ticks = members::start_ticks(&dir).ok()?;
        // A zombie (dead, not yet reaped by its new parent) has vanished too.
        let zombie = dir
            .read_to_string("stat")
            .ok()
            .and_then(|stat| members::stat_state(&stat))
            .is_none_or(|state| matches!(state, 'Z' | 'X'));
        (ticks == row.start_ticks && !zombie).then_some(pidfd)
    }

    /// Starts a process in the lease's namespace and records it before answering.
    pub async fn spawn(&self, name: String, spec: SpawnSpec) -> Result<ProcessRecord, ApiError> {
        let this = self.clone();
        let started = Instant::now();
        // Detached from the request: if the client disconnects, the spawn still finishes and is
        // recorded (or is undone), never left half-way.
        let result = tokio::spawn(async move { this.spawn_detached(name, spec).await })
            .await
            .map_err(|e| ApiError::Internal(format!("spawn task failed: {e}")))
            .and_then(|r| r);
        let failure = result.as_ref().err().map(ApiError::code);
        self.inner
            .leases
            .metrics()
            .observe_spawn(started.elapsed(), failure);
        result
    }

    /// How many processes this daemon watches now.
    pub fn running(&self) -> usize {
        lock_map(&self.inner.live)
            .values()
            .filter(|l| l.done.borrow().is_none())
            .count()
    }

    async fn spawn_detached(
        &self,
        name: String,
        spec: SpawnSpec,
    ) -> Result<ProcessRecord, ApiError> {
        let lock = self.lease_lock(&name);
        // Joining spawns share the lease; making its namespace (the first spawn) and tearing it
        // down are exclusive.
        let pin = self.pin_path(&name);
        let mut guard = if userns::is_pinned(&pin) {
            LeaseGuard::Shared(Arc::clone(&lock).read_owned().await)
        } else {
            LeaseGuard::Exclusive(Arc::clone(&lock).write_owned().await)
        };
        let mut lease = self.active_lease(&name).await?;
        let mut existing = self.namespace_of(&lease, &pin)?;
        if existing.is_none() && matches!(guard, LeaseGuard::Shared(_)) {
            // The namespace must be made after all (its pin went stale): take the lease alone.
            drop(guard);
            guard = LeaseGuard::Exclusive(Arc::clone(&lock).write_owned().await);
            lease = self.active_lease(&name).await?;
            existing = self.namespace_of(&lease, &pin)?;
        }
        for (what, id) in [("user", spec.user), ("group", spec.group)]
            .into_iter()
            .chain(spec.groups.iter().map(|g| ("groups entry", *g)))
        {
            if id >= lease.size {
                return Err(ApiError::InvalidRequest(format!(
                    "{what} {id} is outside lease {name}, which maps ids 0..{}",
                    lease.size
                )));
            }
        }
        // With a fleet's store, the store hears of the lease's first process on this host
        // before it starts (refused for a lease on its way out); nothing with SQLite.
        self.inner.leases.spawning(&lease).await?;
        // The process writes its log files itself (no pipe through the daemon), so its output
        // survives a restart of the daemon; the supervisor trims them to `log_max_bytes`.
        let files = self
            .inner
            .logs
            .take()
            .map_err(|e| internal("log file", e))?;
        let id = files.id;
        // Until the process is recorded, its log files go again with any failure.
        let unrecorded = Unrecorded {
            pool: &self.inner.logs,
            id: &id,
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
            .stdout(files.stdout)
            .stderr(files.stderr);
        let mut rlimits = lease.rlimits.clone();
        rlimits.extend(spec.rlimits.clone());
        // A cap the client set: pids_max, max_processes, or an nproc rlimit.
        let capped = lease.pids_max.is_some()
            || lease.max_processes.is_some()
            || rlimits.contains_key("nproc");
        for (rname, [soft, hard]) in &rlimits {
            let resource = crate::api::resource(rname)
                .ok_or_else(|| ApiError::InvalidRequest(format!("unknown rlimit {rname:?}")))?;
            command.rlimit(resource, *soft, *hard);
        }
        if let Some(handle) = self.spawn_cgroup(&lease)? {
            command.cgroup(handle);
        }
        let ns_spec = ns_spec(&lease);
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
        // The clone-to-exec handshake blocks for about a millisecond: on the multi-threaded
        // runtime it runs in place (no hop to another thread), elsewhere on the blocking pool.
        let result = if tokio::runtime::Handle::current().runtime_flavor()
            == tokio::runtime::RuntimeFlavor::MultiThread
        {
            tokio::task::block_in_place(run)
        } else {
            tokio::task::spawn_blocking(run)
                .await
                .map_err(|e| ApiError::Internal(format!("spawn thread failed: {e}")))?
        };
        let pidfd = Arc::new(result.map_err(|e| spawn_error(&spec, capped, e))?);
        if created {
            match LeaseNs::open(&pin) {
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
            // Not recorded means not started: take it back.
            let _ = pidfd.send_signal(libc_sigkill());
            let reaper = Arc::clone(&pidfd);
            let _ = tokio::task::spawn_blocking(move || reaper.wait()).await;
            return Err(error.into());
        }
        // Recorded: the files are the process's now, and go with its lease.
        std::mem::forget(unrecorded);
        tracing::info!(id = %id, pid = record.pid, lease = %name, host_uid = record.host_uid, "process started");
        self.supervise(record.clone(), pidfd, true);
        drop(guard);
        Ok(record)
    }

    /// Watches a process until it ends and records how.
    fn supervise(&self, record: ProcessRecord, pidfd: Arc<PidFd>, own_child: bool) {
        let id = record.id.clone();
        let lease_id = record.lease_id;
        let (done_tx, done_rx) = watch::channel(None);
        lock_map(&self.inner.live).insert(
            id.clone(),
            Live {
                lease_id,
                pidfd: Arc::clone(&pidfd),
                done: done_rx,
            },
        );
        let this = self.clone();
        tokio::spawn(async move {
            let status = {
                let exit = wait_exit(&pidfd, own_child);
                tokio::pin!(exit);
                let mut tick = tokio::time::interval(LOG_TRIM_INTERVAL);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tokio::select! {
                        status = &mut exit => break status,
                        _ = tick.tick() => this.trim_logs(&id).await,
                    }
                }
            };
            this.trim_logs_if_over(&id).await;
            let (exit_code, signal) = match status {
                Some(ExitStatus::Exited(code)) => (Some(code), None),
                Some(ExitStatus::Signaled { signal, .. }) => (None, Some(signal)),
                None => (None, None),
            };
            let ended_at = now_ms();
            let op = ProcessOp::Finish {
                id: id.clone(),
                state: ProcessState::Exited,
                exit_code,
                signal,
                ended_at,
            };
            // Retry a failed write a few times: the status is worth keeping.
            for attempt in 0..5u32 {
                match this.inner.leases.record_process(&op).await {
                    Ok(()) => break,
                    Err(error) => {
                        tracing::warn!(%id, %error, attempt, "cannot record exit status");
                        tokio::time::sleep(Duration::from_millis(200 << attempt)).await;
                    }
                }
            }
            lock_map(&this.inner.live).remove(&id);
            let _ = done_tx.send(Some(ProcessRecord {
                state: ProcessState::Exited,
                exit_code,
                signal,
                ended_at: Some(ended_at),
                ..record
            }));
        });
    }

    /// Trims the logs only when one is over the limit (a stat each, no thread hop otherwise).
    async fn trim_logs_if_over(&self, id: &str) {
        let max = self.inner.config.log_max_bytes;
        let over = ["stdout", "stderr"]
            .iter()
            .any(|s| std::fs::metadata(self.log_path(id, s)).is_ok_and(|m| m.len() > max));
        if over {
            self.trim_logs(id).await;
        }
    }

    /// Trims both log files of a process to their last `log_max_bytes`.
    async fn trim_logs(&self, id: &str) {
        let max = self.inner.config.log_max_bytes;
        for stream in ["stdout", "stderr"] {
            let path = self.log_path(id, stream);
            let done = tokio::task::spawn_blocking(move || trim_log(&path, max)).await;
            if let Ok(Err(error)) = done {
                tracing::warn!(%id, stream, %error, "cannot trim log file");
            }
        }
    }

    /// Sends a signal to a running process of this daemon.
    pub async fn signal(&self, id: &str, signal: i32) -> Result<(), ApiError> {
        let pidfd = lock_map(&self.inner.live)
            .get(id)
            .map(|l| Arc::clone(&l.pidfd));
        match pidfd {
            Some(pidfd) => match pidfd.send_signal(signal) {
                Ok(()) => Ok(()),
                Err(SysError::ProcessGone { .. }) => {
                    Err(ApiError::ProcessExited(format!("process {id} has exited")))
                }
                Err(error) => Err(ApiError::Internal(format!(
                    "signal {signal} to {id}: {error}"
                ))),
            },
            None => match self.inner.leases.store().get_process(id).await? {
                Some(_) => Err(ApiError::ProcessExited(format!(
                    "process {id} is not running"
                ))),
                None => Err(ApiError::NotFound(format!("no process {id}"))),
            },
        }
    }

    /// Waits until the process ends or `timeout` passes, then returns its record.
    pub async fn wait(&self, id: &str, timeout: Duration) -> Result<ProcessRecord, ApiError> {
        let done = lock_map(&self.inner.live).get(id).map(|l| l.done.clone());
        if let Some(mut done) = done
            && let Ok(Ok(finished)) =
                tokio::time::timeout(timeout, done.wait_for(Option::is_some)).await
            && let Some(record) = finished.clone()
        {
            return Ok(record);
        }
        self.get(id).await
    }

    /// The record of a process.
    pub async fn get(&self, id: &str) -> Result<ProcessRecord, ApiError> {
        self.inner
            .leases
            .store()
            .get_process(id)
            .await?
            .ok_or_else(|| ApiError::NotFound(format!("no process {id}")))
    }

    /// The processes of the active lease `name`.
    pub async fn list(&self, name: &str) -> Result<Vec<ProcessRecord>, ApiError> {
        let lease = self.active_lease(name).await?;
        Ok(self.inner.leases.store().lease_processes(lease.id).await?)
    }

    /// A log file of a process, if it exists.
    pub fn log_path(&self, id: &str, stream: &str) -> PathBuf {
        self.inner.logs.path(id, stream)
    }

    /// What a process wrote to `stream` (its last `log_max_bytes`).
    pub async fn read_log(&self, id: &str, stream: &str) -> Result<Vec<u8>, ApiError> {
        let path = self.log_path(id, stream);
        let max = self.inner.config.log_max_bytes;
        tokio::task::spawn_blocking(move || {
            read_log_tail(&path, max).map_err(|e| internal(&format!("read {}", path.display()), e))
        })
        .await
        .map_err(|e| ApiError::Internal(format!("log read task failed: {e}")))?
    }

    /// Creates (or finds) a lease; a new lease that asks for extra namespaces gets them made and
    /// pinned now, and is released again if that fails, so no half-made lease stays behind.
    pub async fn create_lease(
        &self,
        name: String,
        spec: crate::lease::LeaseSpec,
        mode: crate::lease::CreateMode,
        caller: Caller,
    ) -> Result<crate::lease::Created, ApiError> {
        let lock = self.lease_lock(&name);
        let _guard = lock.write().await;
        if spec.pids_max.is_some() {
            // Refuse before anything is made: a lease never runs without the cap it asked for.
            self.cgroup_parent()?;
        }
        self.forget_lease(&name);
        let done = self
            .inner
            .leases
            .create(name.clone(), spec, mode, caller)
            .await?;
        if done.created
            && done.lease.pids_max.is_some()
            && let Err(error) = self.lease_cgroup(&done.lease)
        {
            self.undo_lease(&name, caller).await;
            return Err(error);
        }
        if done.created && !done.lease.namespaces.is_empty() {
            let pin = self.pin_path(&name);
            let spec = ns_spec(&done.lease);
            let made = if spec.extra.mnt {
                self.private_ns_dir(&name)
            } else {
                Ok(())
            };
            let made = match made {
                Err(e) => Err(e),
                Ok(()) => tokio::task::spawn_blocking(move || userns::create_pinned(&spec, &pin))
                    .await
                    .map_err(|e| ApiError::Internal(format!("namespace thread: {e}")))
                    .and_then(|r| {
                        r.map_err(|e| ApiError::Internal(format!("creating namespaces: {e}")))
                    }),
            };
            if let Err(error) = made {
                self.remove_cgroup(&done.lease).await;
                self.undo_lease(&name, caller).await;
                return Err(error);
            }
        }
        if done.lease.state == subid_core::LeaseState::Active {
            // Its first spawn, which often follows at once, need not read it back.
            cache_lease(&self.inner.lease_cache, name, done.lease.clone());
        }
        Ok(done)
    }

    /// Releases (and purges) a lease whose set-up failed half-way.
    async fn undo_lease(&self, name: &str, caller: Caller) {
        self.forget_lease(name);
        if let Err(undo) = self
            .inner
            .leases
            .release(name.to_string(), true, caller, ReleaseKind::Delete)
            .await
        {
            tracing::error!(lease = %name, error = %undo, "cannot undo a half-made lease");
        }
    }

    /// The prepared cgroup parent; `pids_unsupported` when the host has no usable pids
    /// controller.
    fn cgroup_parent(&self) -> Result<Arc<CgroupParent>, ApiError> {
        let mut parent = lock_map(&self.inner.cgroup_parent);
        if let Some(p) = parent.as_ref() {
            return Ok(Arc::clone(p));
        }
        let host = self.inner.cgroup_host.as_ref().ok_or_else(|| {
            ApiError::PidsUnsupported(
                "pids_max needs the cgroup pids controller, and the cgroup layout could not be read; \
                 use max_processes (the owner cap) instead"
                    .into(),
            )
        })?;
        let hierarchy = host.require_pids().map_err(|e| {
            ApiError::PidsUnsupported(format!(
                "pids_max cannot be honoured on this host: {e}; use max_processes (the owner cap) instead"
            ))
        })?;
        let prepared = CgroupParent::prepare(hierarchy, self.inner.config.cgroup_parent.as_deref())
            .map_err(|e| {
                ApiError::PidsUnsupported(format!(
                    "pids_max cannot be honoured: preparing the cgroup parent failed: {e}; \
                     fix cgroup_parent, or use max_processes (the owner cap) instead"
                ))
            })?;
        tracing::info!(parent = %prepared.dir().display(), "lease cgroups go here");
        let prepared = Arc::new(prepared);
        *parent = Some(Arc::clone(&prepared));
        Ok(prepared)
    }

    /// Makes sure the capped lease's cgroup exists (after a restart, or a reboot that emptied
    /// cgroupfs, it is opened or made again with its cap).
    fn lease_cgroup(&self, lease: &LeaseRecord) -> Result<(), ApiError> {
        {
            let mut cgroups = lock_map(&self.inner.cgroups);
            match cgroups.get(&lease.id) {
                Some(entry) if entry.cgroup.path().is_dir() => return Ok(()),
                Some(_) => {
                    // Removed behind the daemon's back: make it again rather than fail spawns.
                    tracing::warn!(lease = %lease.name, "the lease's cgroup vanished; making it again");
                    cgroups.remove(&lease.id);
                }
                None => {}
            }
        }
        let parent = self.cgroup_parent()?;
        let cgroup = match LeaseCgroup::open(&parent, &lease.name) {
            Ok(cgroup) => {
                cgroup
                    .set_pids_max(lease.pids_max)
                    .map_err(|e| ApiError::Internal(format!("pids.max of {}: {e}", lease.name)))?;
                cgroup
            }
            Err(_) => LeaseCgroup::create(&parent, &lease.name, lease.pids_max)
                .map_err(|e| ApiError::Internal(format!("cgroup of {}: {e}", lease.name)))?,
        };
        lock_map(&self.inner.cgroups).insert(
            lease.id,
            LeaseCg {
                cgroup,
                spawn: None,
            },
        );
        Ok(())
    }

    /// The handle a spawn of this lease goes through, if the lease is capped.
    fn spawn_cgroup(&self, lease: &LeaseRecord) -> Result<Option<SpawnCgroup>, ApiError> {
        if lease.pids_max.is_none() {
            return Ok(None);
        }
        self.lease_cgroup(lease)?;
        let mut cgroups = lock_map(&self.inner.cgroups);
        let Some(entry) = cgroups.get_mut(&lease.id) else {
            return Err(ApiError::Internal(format!(
                "cgroup of {} vanished",
                lease.name
            )));
        };
        if entry.spawn.is_none() {
            // On v1 a helper inside the cgroup clones the joins (no cgroup.procs write per
            // spawn); on cgroup2 clone3(CLONE_INTO_CGROUP) needs none.
            entry.spawn = Some(
                entry
                    .cgroup
                    .start_spawner()
                    .map_err(|e| ApiError::Internal(format!("cgroup spawner: {e}")))?,
            );
        }
        let handle = entry
            .spawn
            .as_ref()
            .map(SpawnCgroup::try_clone)
            .transpose()
            .map_err(|e| ApiError::Internal(format!("cgroup handle: {e}")))?;
        Ok(handle)
    }

    /// `pids.current` and the refused forks of a capped, active lease.
    pub fn pids_usage(&self, lease: &LeaseRecord) -> Option<(u64, u64)> {
        let cgroups = lock_map(&self.inner.cgroups);
        let entry = cgroups.get(&lease.id)?;
        let spawner = u64::from(entry.spawn.as_ref().is_some_and(|s| s.spawner().is_some()));
        let current = entry.cgroup.pids_current().ok()?;
        let denied = entry.cgroup.pids_events_max().ok()?;
        // The spawner helper sits in the cgroup but is not the lease's.
        Some((current.saturating_sub(spawner), denied))
    }

    /// What the host offers, for `GET /v1/pool`.
    pub fn cgroup_summary(&self) -> Option<subid_sys::cgroup::CgroupSummary> {
        self.inner.cgroup_host.as_ref().map(CgroupHost::describe)
    }

    /// Kills what is left in the lease's cgroup and removes it.
    async fn remove_cgroup(&self, lease: &LeaseRecord) -> Option<String> {
        let entry = lock_map(&self.inner.cgroups).remove(&lease.id);
        let cgroup = match entry {
            Some(LeaseCg { cgroup, spawn }) => {
                // The spawner is a member too: let it go first.
                drop(spawn);
                cgroup
            }
            None if lease.pids_max.is_some() => {
                let parent = self.cgroup_parent().ok()?;
                LeaseCgroup::open(&parent, &lease.name).ok()?
            }
            None => return None,
        };
        match tokio::task::spawn_blocking(move || cgroup.kill_all_and_remove()).await {
            Ok(Ok(())) => None,
            Ok(Err(error)) => Some(error.to_string()),
            Err(error) => Some(error.to_string()),
        }
    }

    /// Releases a lease. With live processes: `lease_busy`, unless `force`, which sends SIGTERM to
    /// every process of its namespace, SIGKILL after the grace period, then unpins and releases.
    pub async fn release(
        &self,
        name: String,
        purge: bool,
        force: bool,
        caller: Caller,
        kind: ReleaseKind,
    ) -> Result<(), ApiError> {
        let lock = self.lease_lock(&name);
        let guard = lock.write().await;
        self.forget_lease(&name);
        let lease = self.inner.leases.store().get_lease(&name).await?;
        let mut logs = Vec::new();
        if let Some(lease) = lease.filter(|l| l.state == subid_core::LeaseState::Active) {
            self.teardown(&lease, force).await?;
            logs = self.inner.leases.store().lease_processes(lease.id).await?;
        }
        let result = self
            .inner
            .leases
            .release(name.clone(), purge, caller, kind)
            .await;
        self.forget_lease(&name);
        if result.is_ok() {
            // The process rows went with the lease; so do their logs (on the blocking pool: a
            // lease may have thousands, and each unlink touches the disk).
            let pool = Arc::clone(&self.inner.logs);
            let ids: Vec<String> = logs.into_iter().map(|p| p.id).collect();
            let _ = tokio::task::spawn_blocking(move || {
                for id in ids {
                    for stream in STREAMS {
                        let _ = std::fs::remove_file(pool.path(&id, stream));
                    }
                }
            })
            .await;
        }
        drop(guard);
        self.forget_lock(&name, lock);
        result.map_err(ApiError::from)
    }

    /// Stops everything of the lease's namespace (when `force`) and removes its pins.
    async fn teardown(&self, lease: &LeaseRecord, force: bool) -> Result<(), ApiError> {
        let pin = self.pin_path(&lease.name);
        let ns_ino = self.namespace_inode(lease, &pin);
        let busy = self.members_or_live(lease.id, ns_ino).await;
        if busy > 0 {
            if !force {
                return Err(ApiError::LeaseBusy(format!(
                    "lease {} has {busy} live process(es); stop them or delete with ?force=true",
                    lease.name
                )));
            }
            self.kill_all(lease.id, ns_ino, libc_sigterm());
            let deadline = Instant::now() + self.inner.config.kill_grace;
            while Instant::now() < deadline && self.members_or_live(lease.id, ns_ino).await > 0 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let deadline = Instant::now() + Duration::from_secs(10);
            while self.members_or_live(lease.id, ns_ino).await > 0 {
                if Instant::now() > deadline {
                    return Err(ApiError::LeaseBusy(format!(
                        "processes of lease {} survived SIGKILL for 10 s; retry",
                        lease.name
                    )));
                }
                self.kill_all(lease.id, ns_ino, libc_sigkill());
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            tracing::info!(lease = %lease.name, "stopped every process of the lease");
        }
        lock_map(&self.inner.spaces).remove(&lease.id);
        if let Err(error) = userns::unpin(&pin) {
            tracing::error!(lease = %lease.name, %error, "cannot unpin namespace");
            return Err(ApiError::Internal(format!(
                "unpin {}: {error}",
                pin.display()
            )));
        }
        if let Some(dir) = pin.parent()
            && let Err(error) = userns::remove_private_dir(dir)
        {
            tracing::warn!(lease = %lease.name, %error, "cannot remove the lease's pin directory");
        }
        if let Some(error) = self.remove_cgroup(lease).await {
            tracing::error!(lease = %lease.name, %error, "cannot remove the lease's cgroup");
            return Err(ApiError::Internal(format!(
                "cgroup of {} cannot be removed: {error}",
                lease.name
            )));
        }
        Ok(())
    }

    /// How many processes still belong to the lease: namespace members plus watched ones.
    async fn members_or_live(&self, lease_id: i64, ns_ino: Option<u64>) -> usize {
        let live = lock_map(&self.inner.live)
            .values()
            .filter(|l| l.lease_id == lease_id && l.done.borrow().is_none())
            .count();
        let members = match ns_ino {
            Some(ino) => tokio::task::spawn_blocking(move || members::userns_members(ino))
                .await
                .ok()
                .and_then(Result::ok)
                .map_or(0, |m| m.len()),
            None => 0,
        };
        live.max(members)
    }

    fn kill_all(&self, lease_id: i64, ns_ino: Option<u64>, signal: i32) {
        if let Some(ino) = ns_ino
            && let Err(error) = members::signal_members(ino, signal)
        {
            tracing::warn!(%error, "signalling namespace members");
        }
        for live in lock_map(&self.inner.live).values() {
            if live.lease_id == lease_id {
                let _ = live.pidfd.send_signal(signal);
            }
        }
    }

    /// Releases, with force, every lease whose ttl ran out; runs until the daemon stops.
    pub async fn run_expiry(self, interval: Duration) {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let due = match self.inner.leases.store().expired_leases(now_ms()).await {
                Ok(due) => due,
                Err(error) => {
                    tracing::warn!(%error, "expiry pass cannot read leases; retrying");
                    continue;
                }
            };
            for lease in due {
                let name = lease.name.clone();
                match self
                    .release(lease.name, false, true, None, ReleaseKind::Expire)
                    .await
                {
                    Ok(()) => tracing::info!(lease = %name, "lease expired and released"),
                    Err(error) => {
                        tracing::warn!(lease = %name, %error, "cannot release expired lease")
                    }
                }
            }
        }
    }

    /// The active, unexpired lease of that name.
    ///
    /// Active leases are cached (a spawn then needs no database read): every path that changes
    /// a lease (create, renew, release, expiry) goes through [`ProcessService::forget_lease`].
    async fn active_lease(&self, name: &str) -> Result<LeaseRecord, ApiError> {
        let now = now_ms();
        if let Some(lease) = lock_map(&self.inner.lease_cache).get(name)
            && !is_expired(lease, now)
        {
            return Ok(lease.clone());
        }
        match self.inner.leases.store().get_lease(name).await? {
            Some(lease)
                if lease.state == subid_core::LeaseState::Active && !is_expired(&lease, now) =>
            {
                cache_lease(&self.inner.lease_cache, name.to_string(), lease.clone());
                Ok(lease)
            }
            _ => Err(ApiError::NotFound(format!("no active lease {name}"))),
        }
    }

    /// Drops the cached record of a lease that is about to change.
    pub fn forget_lease(&self, name: &str) {
        lock_map(&self.inner.lease_cache).remove(name);
    }

    /// Mount-namespace pins cannot sit in a shared mount (EINVAL): the first lease that asks for
    /// one makes `<runtime-dir>/ns` a private mount of its own. Idempotent.
    /// Makes the lease's pin directory a private mount, as a pinned mount namespace needs. Only
    /// the lease's own directory: a bind mount over the whole `ns` directory would cover the
    /// pins other leases made before it, which could then no longer be unmounted (unlink EBUSY).
    fn private_ns_dir(&self, name: &str) -> Result<(), ApiError> {
        userns::make_private_mount(&self.inner.config.ns_dir.join(name))
            .map_err(|e| ApiError::Internal(format!("private mount for pins: {e}")))
    }

    fn pin_path(&self, name: &str) -> PathBuf {
        self.inner.config.ns_dir.join(name).join("user")
    }

    /// The lease's namespace if it exists: open already, or pinned by an earlier daemon. A pin
    /// owned by anyone but the lease's base uid is stale (another tenant's): it is removed.
    fn namespace_of(
        &self,
        lease: &LeaseRecord,
        pin: &Path,
    ) -> Result<Option<Arc<LeaseNs>>, ApiError> {
        if let Some(ns) = lock_map(&self.inner.spaces).get(&lease.id) {
            return Ok(Some(Arc::clone(ns)));
        }
        if !userns::is_pinned(pin) {
            return Ok(None);
        }
        let ns = LeaseNs::open(pin).map_err(|e| ApiError::Internal(format!("open pin: {e}")))?;
        match userns::owner_uid(ns.user()) {
            Ok(owner) if owner == lease.uid_base => {
                let ns = Arc::new(ns);
                lock_map(&self.inner.spaces).insert(lease.id, Arc::clone(&ns));
                Ok(Some(ns))
            }
            other => {
                tracing::warn!(lease = %lease.name, owner = ?other, "stale namespace pin; replacing it");
                drop(ns);
                userns::unpin(pin)
                    .map_err(|e| ApiError::Internal(format!("unpin stale pin: {e}")))?;
                Ok(None)
            }
        }
    }

    fn namespace_inode(&self, lease: &LeaseRecord, pin: &Path) -> Option<u64> {
        if let Some(ns) = lock_map(&self.inner.spaces).get(&lease.id) {
            return userns::ns_inode(ns.user()).ok();
        }
        if userns::is_pinned(pin) {
            let fd = userns::open_pinned(pin).ok()?;
            return userns::ns_inode(&fd).ok();
        }
        None
    }

    fn lease_lock(&self, name: &str) -> Arc<RwLock<()>> {
        Arc::clone(
            lock_map(&self.inner.locks)
                .entry(name.to_string())
                .or_default(),
        )
    }

    /// Drops the lock entry of a released lease when nobody else holds it.
    fn forget_lock(&self, name: &str, lock: Arc<RwLock<()>>) {
        let mut locks = lock_map(&self.inner.locks);
        drop(lock);
        if locks.get(name).is_some_and(|l| Arc::strong_count(l) == 1) {
            locks.remove(name);
        }
    }
}

/// The environment variable that overrides the boot id, for tests only: it lets a test play a
/// reboot (every recorded process then counts as from another boot and is marked `lost`, never
/// re-adopted) without rebooting the machine. Never set it in production.
pub const TEST_BOOT_ID_ENV: &str = "SUBIDD_TEST_BOOT_ID";

/// This boot's id, or the test override of [`TEST_BOOT_ID_ENV`].
fn boot_id() -> Result<String, SysError> {
    match std::env::var(TEST_BOOT_ID_ENV) {
        Ok(fake) if !fake.is_empty() => {
            tracing::warn!(boot_id = %fake, "boot id overridden by {TEST_BOOT_ID_ENV} (tests only)");
            Ok(fake)
        }
        _ => members::boot_id(),
    }
}

/// The namespace settings of a lease.
fn ns_spec(lease: &LeaseRecord) -> UserNsSpec {
    let mut spec = UserNsSpec::new(lease.uid_base, lease.size);
    spec.gid_base = lease.gid_base;
    spec.nproc_limit = lease.max_processes;
    for ns in &lease.namespaces {
        match ns.as_str() {
            "mnt" => spec.extra.mnt = true,
            "uts" => spec.extra.uts = true,
            "ipc" => spec.extra.ipc = true,
            "net" => spec.extra.net = true,
            _ => {}
        }
    }
    spec
}

/// Waits until the process exits. For our own child, reaps it and returns its status; for an
/// adopted process (a previous daemon's child) the status cannot be known.
async fn wait_exit(pidfd: &Arc<PidFd>, own_child: bool) -> Option<ExitStatus> {
    if let Err(error) = subid_sys::pidfd::exited(Arc::clone(pidfd)).await {
        // Fall back to polling from a thread now and then.
        tracing::warn!(%error, "cannot register pidfd with the reactor; polling");
        loop {
            let p = Arc::clone(pidfd);
            let exited = tokio::task::spawn_blocking(move || p.has_exited().unwrap_or(true))
                .await
                .unwrap_or(true);
            if exited {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    if !own_child {
        return None;
    }
    // It has exited, so reaping does not block.
    if let Ok(Some(status)) = pidfd.try_wait() {
        return Some(status);
    }
    let p = Arc::clone(pidfd);
    tokio::task::spawn_blocking(move || p.wait().ok())
        .await
        .ok()
        .flatten()
}

/// Maps a spawn failure to what the client should hear. `capped`: the lease or the request set
/// a process cap (pids_max, max_processes, an nproc rlimit).
fn spawn_error(spec: &SpawnSpec, capped: bool, error: SysError) -> ApiError {
    if error.errno() == Some(Errno::EAGAIN) {
        // fork, clone or execve (RLIMIT_NPROC) refused: the lease's cap, or a system limit.
        if capped {
            return ApiError::ProcessLimit(
                "the kernel refused a new process: the lease is at its process cap (pids_max, \
                 max_processes or the nproc rlimit); retry when some of its processes exit"
                    .into(),
            );
        }
        return ApiError::Unavailable(
            "the kernel refused a new process: the lease is at its process cap (pids_max or \
             max_processes) or a system limit was reached; retry when some of its processes exit",
        );
    }
    match &error {
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
                return ApiError::ExecFailed(format!("{what}: {source}"));
            }
            ApiError::Internal(format!("spawn: {error}"))
        }
        SysError::InvalidInput { reason, .. } => ApiError::InvalidRequest(reason.clone()),
        _ => ApiError::Internal(format!("spawn: {error}")),
    }
}

/// Opens (creates) a log file for a process to append to: mode 0640, close-on-exec in the
/// daemon (the spawn engine dups it onto fd 1 or 2 of the child).
/// Keeps at least the last `max` bytes of a log file: whole blocks are cut from its head in one
/// step where the filesystem can (nothing the process appends meanwhile is lost; see
/// `subid_sys::logfile`); elsewhere copy-truncate, as logrotate does (bytes appended during the
/// copy can be lost).
fn trim_log(path: &Path, max: u64) -> std::io::Result<()> {
    use std::io::{Seek, SeekFrom, Write};
    match subid_sys::logfile::trim_head(path, max) {
        Ok(Trimmed::Nothing | Trimmed::Collapsed(_)) => return Ok(()),
        Ok(Trimmed::Unsupported) => {}
        Err(error) => return Err(std::io::Error::other(error)),
    }
    let mut file = match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
    {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    let len = file.metadata()?.len();
    if len <= max {
        return Ok(());
    }
    file.seek(SeekFrom::Start(len - max))?;
    let mut tail = Vec::with_capacity(usize::try_from(max).unwrap_or(0));
    (&mut file).take(max).read_to_end(&mut tail)?;
    file.set_len(0)?;
    file.seek(SeekFrom::Start(0))?;
    file.write_all(&tail)?;
    Ok(())
}

/// The last `max` bytes of a log file (a trimmed file may hold up to a block more).
fn read_log_tail(path: &Path, max: u64) -> std::io::Result<Vec<u8>> {
    use std::io::{Seek, SeekFrom};
    let mut file = match std::fs::File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let len = file.metadata()?.len();
    file.seek(SeekFrom::Start(len.saturating_sub(max)))?;
    let mut tail = Vec::with_capacity(usize::try_from(max.min(len)).unwrap_or(0));
    (&mut file).take(max).read_to_end(&mut tail)?;
    Ok(tail)
}

fn internal(what: &str, error: std::io::Error) -> ApiError {
    ApiError::Internal(format!("{what}: {error}"))
}

/// The log files of a spawn not (yet) recorded; dropping this removes them.
struct Unrecorded<'a> {
    pool: &'a LogPool,
    id: &'a str,
}

impl Drop for Unrecorded<'_> {
    fn drop(&mut self) {
        for stream in STREAMS {
            let _ = std::fs::remove_file(self.pool.path(self.id, stream));
        }
    }
}

/// Most leases kept in the cache of active leases: with many leases, memory must not grow with
/// their number (a cache that is full starts again empty; a miss costs one read).
const LEASE_CACHE_MAX: usize = 4096;

fn cache_lease(cache: &Mutex<HashMap<String, LeaseRecord>>, name: String, lease: LeaseRecord) {
    let mut cache = lock_map(cache);
    if cache.len() >= LEASE_CACHE_MAX && !cache.contains_key(&name) {
        cache.clear();
        cache.shrink_to(LEASE_CACHE_MAX);
    }
    cache.insert(name, lease);
}

fn lock_map<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn libc_sigterm() -> i32 {
    nix::sys::signal::Signal::SIGTERM as i32
}

fn libc_sigkill() -> i32 {
    nix::sys::signal::Signal::SIGKILL as i32
}

/// What a fleet's task needs from this host's processes (see `crate::fleet`). Built on the
/// teardown a forced release uses.
impl crate::fleet::LocalProcesses for ProcessService {
    async fn local_live(&self, lease: &LeaseRecord) -> bool {
        let pin = self.pin_path(&lease.name);
        let ns_ino = self.namespace_inode(lease, &pin);
        self.members_or_live(lease.id, ns_ino).await > 0
    }

    async fn stop_local(
        &self,
        lease: &LeaseRecord,
    ) -> Result<(), crate::service_error::ServiceError> {
        use crate::service_error::ServiceError;
        let lock = self.lease_lock(&lease.name);
        let guard = lock.write().await;
        self.forget_lease(&lease.name);
        // A newer active lease of the same name owns the name's pin and cgroup now: only this
        // lease's rows and logs go (its processes were stopped before it could be released).
        let newer = match self.inner.leases.store().get_lease(&lease.name).await {
            Ok(Some(now)) => now.id != lease.id && now.state == subid_core::LeaseState::Active,
            Ok(None) => false,
            Err(error) => return Err(ServiceError::from(error)),
        };
        let stopped = if newer {
            Ok(())
        } else {
            self.teardown(lease, true).await
        };
        let logs = self
            .inner
            .leases
            .store()
            .lease_processes(lease.id)
            .await
            .unwrap_or_default();
        drop(guard);
        self.forget_lock(&lease.name, lock);
        stopped.map_err(|error| match error {
            ApiError::LeaseBusy(reason) => ServiceError::Busy {
                reason,
                hosts: Vec::new(),
            },
            other => ServiceError::internal(other.to_string()),
        })?;
        let pool = Arc::clone(&self.inner.logs);
        let ids: Vec<String> = logs.into_iter().map(|p| p.id).collect();
        let _ = tokio::task::spawn_blocking(move || {
            for id in ids {
                for stream in STREAMS {
                    let _ = std::fs::remove_file(pool.path(&id, stream));
                }
            }
        })
        .await;
        Ok(())
    }
}
