//! Processes in a lease's user namespace: spawn, supervise, signal, tear down, expire.
//!
//! The namespace of a lease is created on its first spawn by a helper running as the lease's
//! base ids (so the namespace's owner, who is charged for per-user kernel counters, is per
//! lease), pinned at `<runtime-dir>/ns/<lease>/user`, and joined by every later spawn. Every
//! process of a lease lives in the lease's cgroups ([`subid_sys::cgroup::LeaseCgroups`]), made
//! at its first spawn: they, not a scan of /proc, say whether a lease has processes, and a
//! teardown kills by cgroup. Spawns and teardowns of one lease are serialised by a per-lease
//! lock, and every wait on something a tenant can touch has a deadline.
//!
//! # Rooms
//! This module holds the service and its small requests (signal, wait, get, list, logs,
//! renew); `spawn.rs` the spawn path; `supervise.rs` watching a process until it ends;
//! `lifecycle.rs` creating and releasing a lease (its processes stopped first) and the expiry
//! loop; `cgroups.rs` the lease cgroups; `attach.rs` cgroups of containers a runtime attached;
//! `namespaces.rs` pins; `recovery.rs` what a start finds
//! (re-adoption, stale pins and cgroups, processes of an older version moved into their
//! lease's cgroups, orphan logs).

mod attach;
mod cgroups;
mod lifecycle;
mod namespaces;

pub use attach::{Attachment, AttachmentState};
pub use namespaces::NamespacePins;
pub use spawn::{LINGER_MAX, Spawned};
mod recovery;
mod spawn;
mod supervise;

use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use subid_core::RlimitName;
use subid_store::{LeaseRecord, ProcessRecord};
use subid_sys::cgroup::{CgroupHost, CgroupParents, LeaseCgroups};
use subid_sys::{LeaseNs, PidFd, SysError};
use tokio::sync::{RwLock, watch};

use crate::lease::{Caller, LeaseService, is_expired, now_ms};
use crate::logs::{Logs, LogsConfig, log_path};
use crate::service_error::ServiceError;

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
    /// Per-process rlimits, [soft, hard]; they override the lease's defaults.
    pub rlimits: BTreeMap<RlimitName, [u64; 2]>,
    pub umask: u32,
}

/// Settings of the process service.
#[derive(Debug, Clone)]
pub struct ProcessConfig {
    /// `<runtime-dir>/ns`: one directory per lease with its pins.
    pub ns_dir: PathBuf,
    /// `<state-dir>/logs`: `<id>.stdout` and `<id>.stderr`.
    pub log_dir: PathBuf,
    /// The runtime dir, where the log keeper's socket is (`logkeeper.sock`).
    pub runtime_dir: PathBuf,
    /// The binary started as the log keeper (`--log-keeper`): the daemon's own,
    /// `/proc/self/exe`, in production.
    pub keeper_program: PathBuf,
    /// Bytes kept per stream (the keeper keeps the last ones); the rest is dropped.
    pub log_max_bytes: u64,
    /// Time between SIGTERM and SIGKILL on a forced delete or expiry.
    pub kill_grace: Duration,
    /// Where lease cgroups are made (default `<the daemon's cgroup>/subidd` in each hierarchy).
    pub cgroup_parent: Option<PathBuf>,
    /// How long a spawn may take from the clone until the child has exec'd; a child that a
    /// process of its lease stopped is killed then.
    pub spawn_timeout: Duration,
    /// `<state-dir>/release-reserve`: disk space kept so that a release works on a full disk.
    pub reserve: PathBuf,
}

/// Bytes kept in reserve for releases: a release writes a few pages and their write-ahead log
/// frames; this leaves room for dozens.
pub const RELEASE_RESERVE_BYTES: u64 = 1 << 20;

/// A process this daemon watches.
struct Live {
    lease_id: i64,
    pidfd: Arc<PidFd>,
    /// The final record, once the exit is known (written to the database or not yet).
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
    /// The parents of lease cgroups (prepared with the first spawn, or at start when a previous
    /// daemon made them; again with the pids parent when the first lease asks for a cap), or why
    /// there are none; `None` until then.
    cgroup_parents: Mutex<Option<Result<Arc<CgroupParents>, String>>>,
    /// The cgroups of leases that have had a process since the start.
    cgroups: Mutex<HashMap<i64, LeaseCgroups>>,
    /// Active leases by name, as last read (see `active_lease`).
    lease_cache: Mutex<HashMap<String, LeaseRecord>>,
    /// The log keeper's glue: started with the first spawn, or at start when a keeper of a
    /// previous daemon runs.
    logs: Mutex<Option<Arc<Logs>>>,
    /// Disk space for releases on a full disk.
    reserve: subid_sys::reserve::Reserve,
    /// Cgroups of processes subidd did not start, attached to leases (by lease id, then id).
    attached: Mutex<HashMap<i64, BTreeMap<String, attach::Attachment>>>,
}

/// Shared handle to the process service; cheap to clone.
#[derive(Clone)]
pub struct ProcessService {
    inner: Arc<Inner>,
}

/// How long a request waits for a lease another request is changing (a spawn takes at most its
/// deadline; a teardown its grace and the kill deadline) before it answers `lease_busy`.
fn lock_wait(config: &ProcessConfig) -> Duration {
    config.spawn_timeout + config.kill_grace + subid_sys::cgroup::TEARDOWN_TIMEOUT
}

impl ProcessService {
    /// How many processes this daemon watches now.
    pub fn running(&self) -> usize {
        lock_map(&self.inner.live)
            .values()
            .filter(|l| l.done.borrow().is_none())
            .count()
    }

    /// Sends a signal to a running process of this daemon.
    pub async fn signal(&self, id: &str, signal: i32) -> Result<(), ServiceError> {
        let pidfd = lock_map(&self.inner.live)
            .get(id)
            .filter(|l| l.done.borrow().is_none())
            .map(|l| Arc::clone(&l.pidfd));
        match pidfd {
            Some(pidfd) => match pidfd.send_signal(signal) {
                Ok(()) => Ok(()),
                Err(SysError::ProcessGone { .. }) => Err(ServiceError::ProcessExited {
                    reason: format!("process {id} has exited"),
                }),
                Err(error) => Err(ServiceError::internal(format!(
                    "signal {signal} to {id}: {error}"
                ))),
            },
            None => match self.get(id).await {
                Ok(_) => Err(ServiceError::ProcessExited {
                    reason: format!("process {id} is not running"),
                }),
                Err(e) => Err(e),
            },
        }
    }

    /// Waits until the process ends or `timeout` passes, then returns its record.
    pub async fn wait(&self, id: &str, timeout: Duration) -> Result<ProcessRecord, ServiceError> {
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

    /// The record of a process. A process whose exit is known but not yet written to the
    /// database (the disk refused it) is answered from memory, so nobody reads back `running`.
    pub async fn get(&self, id: &str) -> Result<ProcessRecord, ServiceError> {
        let finished = lock_map(&self.inner.live)
            .get(id)
            .and_then(|l| l.done.borrow().clone());
        if let Some(record) = finished {
            return Ok(record);
        }
        self.inner
            .leases
            .store()
            .get_process(id)
            .await?
            .ok_or_else(|| ServiceError::not_found(format!("no process {id}")))
    }

    /// The processes of the active lease `name`.
    pub async fn list(&self, name: &str) -> Result<Vec<ProcessRecord>, ServiceError> {
        let lease = self.active_lease(name).await?;
        let mut rows = self.inner.leases.store().lease_processes(lease.id).await?;
        let live = lock_map(&self.inner.live);
        for row in &mut rows {
            if let Some(finished) = live.get(&row.id).and_then(|l| l.done.borrow().clone()) {
                *row = finished;
            }
        }
        Ok(rows)
    }

    /// A log file of a process, if it exists.
    pub fn log_path(&self, id: &str, stream: &str) -> PathBuf {
        log_path(&self.inner.config.log_dir, id, stream)
    }

    /// What a process wrote to `stream` (its last `log_max_bytes`): the keeper first writes out
    /// what the process's pipes hold, so everything written before this call is there. Asked
    /// whether or not the daemon still holds the process's pipes: a process that just exited
    /// was forgotten here at once, but its last output may still sit in the pipe, unread.
    pub async fn read_log(&self, id: &str, stream: &str) -> Result<Vec<u8>, ServiceError> {
        let path = self.log_path(id, stream);
        let max = self.inner.config.log_max_bytes;
        let logs = lock_map(&self.inner.logs).clone();
        let id = id.to_string();
        tokio::task::spawn_blocking(move || {
            if let Some(logs) = logs
                && let Err(error) = logs.sync(&id, std::time::Instant::now() + LOG_SYNC_TIMEOUT)
            {
                tracing::warn!(%id, %error, "the log keeper did not write out the process's output");
            }
            read_log_tail(&path, max).map_err(|e| internal(&format!("read {}", path.display()), e))
        })
        .await
        .map_err(|e| ServiceError::internal(format!("log read task failed: {e}")))?
    }

    /// The log keeper's glue, started now unless it runs (this blocks for the keeper's start:
    /// call it from the blocking pool).
    fn logs(&self) -> Result<Arc<Logs>, ServiceError> {
        let mut logs = lock_map(&self.inner.logs);
        if let Some(held) = logs.as_ref() {
            return Ok(Arc::clone(held));
        }
        let config = &self.inner.config;
        let mut logs_config = LogsConfig::new(
            &config.runtime_dir,
            config.log_dir.clone(),
            config.log_max_bytes,
        );
        logs_config.program = config.keeper_program.clone();
        let started = Logs::start_with(logs_config)
            .map_err(|e| ServiceError::internal(format!("log keeper: {e}")))?;
        let started = Arc::new(started);
        *logs = Some(Arc::clone(&started));
        Ok(started)
    }

    /// Pushes the expiry of a lease with a ttl; under the lease's lock, so an expiry that is
    /// tearing the lease down finishes first (and the renewal then finds it released) or starts
    /// after (and finds it renewed).
    pub async fn renew(&self, name: String, caller: Caller) -> Result<LeaseRecord, ServiceError> {
        let lock = self.lease_lock(&name);
        let _guard = self.exclusive(&lock, &name).await?;
        self.forget_lease(&name);
        let renewed = self.inner.leases.renew(name.clone(), caller).await;
        self.forget_lease(&name);
        renewed
    }

    /// The active, unexpired lease of that name.
    ///
    /// Active leases are cached (a spawn then needs no database read): every path that changes
    /// a lease (create, renew, release, expiry) goes through [`ProcessService::forget_lease`].
    async fn active_lease(&self, name: &str) -> Result<LeaseRecord, ServiceError> {
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
            _ => Err(ServiceError::not_found(format!("no active lease {name}"))),
        }
    }

    /// Drops the cached record of a lease that is about to change.
    pub fn forget_lease(&self, name: &str) {
        lock_map(&self.inner.lease_cache).remove(name);
    }

    fn lease_lock(&self, name: &str) -> Arc<RwLock<()>> {
        Arc::clone(
            lock_map(&self.inner.locks)
                .entry(name.to_string())
                .or_default(),
        )
    }

    /// Takes the lease's lock alone, waiting at most [`lock_wait`].
    async fn exclusive(
        &self,
        lock: &Arc<RwLock<()>>,
        name: &str,
    ) -> Result<tokio::sync::OwnedRwLockWriteGuard<()>, ServiceError> {
        tokio::time::timeout(
            lock_wait(&self.inner.config),
            Arc::clone(lock).write_owned(),
        )
        .await
        .map_err(|_| busy_elsewhere(name))
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

/// Another request has held the lease for longer than any spawn or teardown may take.
fn busy_elsewhere(name: &str) -> ServiceError {
    ServiceError::busy(format!(
        "lease {name} is being changed by another request (a spawn or a teardown) that has not \
         finished; retry"
    ))
}

/// How long reading a process's log waits for the keeper to write out what its pipes hold.
const LOG_SYNC_TIMEOUT: Duration = Duration::from_secs(2);

/// The environment variable that overrides the boot id, for tests only: it lets a test play a
/// reboot (every recorded process then counts as from another boot and is marked `lost`, never
/// re-adopted) without rebooting the machine. Never set it in production.
pub const TEST_BOOT_ID_ENV: &str = "SUBIDD_TEST_BOOT_ID";

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

fn internal(what: &str, error: std::io::Error) -> ServiceError {
    ServiceError::internal(format!("{what}: {error}"))
}

const SIGTERM: i32 = nix::sys::signal::Signal::SIGTERM as i32;
const SIGKILL: i32 = nix::sys::signal::Signal::SIGKILL as i32;

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
