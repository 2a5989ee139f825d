//! The lease service: creates, renews and releases leases through one writer task
//! ([`writer`]), tracks what other id owners hold in the pool ([`claims`]), and writes process
//! rows for the process service.
//!
//! Every change to leases goes through [`LeaseService`], which sends a command to the writer
//! task and waits for its answer; the answer comes only after the change is committed.

mod claims;
mod fleet;
mod writer;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use subid_core::{Allocator, NamespaceKind, Pool, PoolCounts, RlimitName};
use subid_store::{
    Backend, LeaseRecord, PendingRow, PoolMeta, ProcessEnd, ProcessRecord, ProcessWriter, Store,
    StoreError, Writer,
};
use tokio::sync::{mpsc, oneshot};

pub use claims::{AppliedClaim, ClaimStatus, PoolWarning};

use crate::clock::{SharedClock, SystemClock};
use crate::events::{EventFeed, Publisher};
use crate::holds::HoldScan;
use crate::metrics::Metrics;
use crate::service_error::ServiceError;
use claims::Foreign;
use writer::{Command, QUEUE_DEPTH, Released, WriterTask, rebuild};

/// The settings a client asks for; `None` means the default.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LeaseSpec {
    pub size: Option<u32>,
    pub labels: BTreeMap<String, String>,
    pub ttl_seconds: Option<u32>,
    /// Default rlimits of the lease's processes, [soft, hard] (soft <= hard, checked by the API).
    pub rlimits: BTreeMap<RlimitName, [u64; 2]>,
    /// Extra namespaces besides the user namespace.
    pub namespaces: BTreeSet<NamespaceKind>,
    /// The cgroup cap (`pids.max`).
    pub pids_max: Option<u64>,
    /// The owner cap (the namespace creator's RLIMIT_NPROC).
    pub max_processes: Option<u64>,
}

impl LeaseSpec {
    /// The rlimits as the store keeps them: by name.
    pub(crate) fn stored_rlimits(&self) -> BTreeMap<String, [u64; 2]> {
        self.rlimits
            .iter()
            .map(|(name, limits)| (name.as_str().to_string(), *limits))
            .collect()
    }

    /// The namespaces as the store keeps them: names, sorted by name.
    pub(crate) fn stored_namespaces(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .namespaces
            .iter()
            .map(|n| n.as_str().to_string())
            .collect();
        names.sort();
        names
    }
}

/// How a create request treats an existing lease of the same name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CreateMode {
    /// `PUT`: an identical existing lease is fine (200), a different one is a conflict.
    Ensure,
    /// `POST`: any existing lease is `lease_exists`.
    New,
}

/// The outcome of a create request.
#[derive(Debug, Clone)]
pub struct Created {
    pub lease: LeaseRecord,
    /// False when an identical lease already existed.
    pub created: bool,
}

/// Who asked, for the history.
pub type Caller = Option<u32>;

/// Why a lease is released.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReleaseKind {
    /// A client asked (`DELETE`).
    Delete,
    /// A client asked with `force`: the caller has stopped this host's processes of the lease.
    ForcedDelete,
    /// Its ttl ran out; skipped if it was renewed in the meantime, or released already.
    Expire,
}

/// A change to the process table (see [`LeaseService::record_process`]).
#[derive(Debug, Clone)]
pub enum ProcessOp {
    /// A process now running.
    Insert(ProcessRecord),
    /// How a running process ended.
    Finish { id: String, end: ProcessEnd },
}

/// How the service runs; [`StartOptions::new`] gives the daemon's defaults.
#[derive(Debug, Clone)]
pub struct StartOptions {
    /// How long a released range is withheld.
    pub quarantine: Duration,
    /// The time the service goes by.
    pub clock: SharedClock,
    /// With a fleet's store: how long a forced release waits for other hosts to stop the
    /// lease's processes before it answers that the release is under way.
    pub release_wait: Duration,
}

impl StartOptions {
    /// The system clock, this quarantine, and a release wait of 30 s.
    pub fn new(quarantine: Duration) -> StartOptions {
        StartOptions {
            quarantine,
            clock: Arc::new(SystemClock),
            release_wait: Duration::from_secs(30),
        }
    }
}

/// Whether the lease store answered when last used; logged and shown in `/metrics` when it
/// changes.
#[derive(Debug, Clone)]
pub(crate) struct StoreHealth {
    down: Arc<AtomicBool>,
    metrics: Arc<Metrics>,
}

impl StoreHealth {
    fn new(metrics: Arc<Metrics>, backend: Backend) -> StoreHealth {
        metrics.set_store(backend.as_str(), true);
        StoreHealth {
            down: Arc::new(AtomicBool::new(false)),
            metrics,
        }
    }

    /// The store answered.
    pub(crate) fn ok(&self) {
        if self.down.swap(false, Ordering::AcqRel) {
            tracing::info!("the lease store answers again; lease writes work");
            self.metrics.set_store_up(true);
        }
    }

    /// An operation failed; a store that cannot be reached is logged once until it answers.
    pub(crate) fn failed(&self, error: &StoreError) {
        if error.is_unreachable() && !self.down.swap(true, Ordering::AcqRel) {
            tracing::error!(%error, "the lease store cannot be reached: lease writes answer 503 store_unavailable; reads of leases this host knows and spawns into them go on; reconnecting");
            self.metrics.set_store_up(false);
        }
    }

    /// Whether the store failed to answer last time.
    pub(crate) fn is_down(&self) -> bool {
        self.down.load(Ordering::Acquire)
    }
}

/// Shared handle to the lease service; cheap to clone.
#[derive(Clone)]
pub struct LeaseService {
    inner: Arc<Inner>,
}

struct Inner {
    tx: mpsc::Sender<Command>,
    allocator: Arc<Mutex<Allocator>>,
    store: Store,
    clock: SharedClock,
    claims: Mutex<Vec<AppliedClaim>>,
    /// Blocks withheld for owners other than leases (see [`Foreign`]).
    foreign: Arc<Mutex<Foreign>>,
    holds: HoldScan,
    health: StoreHealth,
    /// Set with a fleet's store.
    fleet: Option<fleet::FleetSide>,
    metrics: Arc<Metrics>,
    feed: EventFeed,
    /// Process rows, written on the caller's thread (see `subid_store::ProcessWriter`).
    rows: Arc<ProcessWriter>,
    /// Tells the event publisher that a write may have added events.
    published: Arc<tokio::sync::Notify>,
}

impl LeaseService {
    /// Rebuilds the allocator from the database and starts the writer task, on the system clock.
    pub async fn start(
        store: Store,
        writer: Writer,
        pool: Pool,
        quarantine: Duration,
    ) -> Result<LeaseService, StartError> {
        LeaseService::start_with(store, writer, pool, StartOptions::new(quarantine)).await
    }

    /// As [`LeaseService::start`], with every option.
    pub async fn start_with(
        store: Store,
        mut writer: Writer,
        pool: Pool,
        options: StartOptions,
    ) -> Result<LeaseService, StartError> {
        let quarantine_ms = u64::try_from(options.quarantine.as_millis()).unwrap_or(u64::MAX);
        let wanted = PoolMeta {
            base: pool.base(),
            size: pool.range().len(),
            block: pool.block(),
        };
        let rows = Arc::new(ProcessWriter::open(store.path())?);
        fleet::check_membership(&store, &rows).await?;
        let settled = writer.settle_pool(wanted).await?;
        if settled.block != pool.block() {
            return Err(StartError::BlockChanged {
                stored: settled.block,
                configured: pool.block(),
            });
        }
        if settled != wanted {
            return Err(StartError::PoolMismatch {
                stored: settled,
                configured: wanted,
            });
        }
        let range = pool.range();
        if let Some(lease) = writer
            .first_active_outside(range.start(), range.end(), pool.block())
            .await?
        {
            return Err(StartError::LeaseOutsidePool {
                name: lease.name,
                base: lease.uid_base,
                size: lease.size,
            });
        }
        // Changes from here on are read again by the writer's first catch-up: applying a row
        // twice changes nothing.
        let seq = writer.last_change().await?;
        let allocator = rebuild(&mut writer, pool, quarantine_ms).await?;
        let allocator = Arc::new(Mutex::new(allocator));
        let metrics = Arc::new(Metrics::new());
        let health = StoreHealth::new(Arc::clone(&metrics), store.backend());
        let feed = EventFeed::new(writer.last_event_id().await?);
        let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
        let publisher = Publisher::new(feed.clone(), Arc::clone(&metrics), store.clone());
        let published = publisher.poke();
        let foreign = Arc::new(Mutex::new(Foreign::default()));
        let side = match store.host_id() {
            Some(host) => Some(fleet::FleetSide::new(host, options.release_wait)),
            None => None,
        };
        WriterTask {
            writer,
            allocator: Arc::clone(&allocator),
            foreign: Arc::clone(&foreign),
            rx,
            clock: Arc::clone(&options.clock),
            published: Arc::clone(&published),
            fleet: side.as_ref().map(|s| writer::Fleet {
                host: s.host.clone(),
                seq,
                claims_seq: 0,
                rows: Arc::clone(&rows),
                caught_up: None,
            }),
            health: health.clone(),
        }
        .spawn()?;
        tokio::spawn(publisher.run());
        Ok(LeaseService {
            inner: Arc::new(Inner {
                tx,
                allocator,
                store,
                clock: options.clock,
                claims: Mutex::new(Vec::new()),
                foreign,
                holds: HoldScan::default(),
                health,
                fleet: side,
                metrics,
                feed,
                rows,
                published,
            }),
        })
    }

    /// The daemon's metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.inner.metrics
    }

    /// The live event feed, published after each commit.
    pub fn feed(&self) -> &EventFeed {
        &self.inner.feed
    }

    /// Read access to the store.
    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    /// The time the service goes by, in unix milliseconds.
    pub fn now_ms(&self) -> i64 {
        self.inner.clock.now_ms()
    }

    fn now_ms_u64(&self) -> u64 {
        u64::try_from(self.now_ms()).unwrap_or(0)
    }

    /// The pool and its block counts now.
    pub fn pool_status(&self) -> (Pool, PoolCounts) {
        let allocator = lock(&self.inner.allocator);
        (*allocator.pool(), allocator.counts(self.now_ms_u64()))
    }

    /// Creates the lease, or finds the identical one (`Ensure`).
    pub async fn create(
        &self,
        name: String,
        spec: LeaseSpec,
        mode: CreateMode,
        caller: Caller,
    ) -> Result<Created, ServiceError> {
        // Before a block can be issued: withhold those a process started since the last scan
        // holds ids of (known processes are rescanned by the pool re-check).
        self.check_new_holds().await?;
        let (reply, rx) = oneshot::channel();
        self.send(Command::Create {
            name,
            spec,
            mode,
            caller,
            reply,
        })
        .await?;
        self.answer(rx).await
    }

    /// Pushes the expiry of a lease with a ttl to now + ttl.
    pub async fn renew(&self, name: String, caller: Caller) -> Result<LeaseRecord, ServiceError> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Renew {
            name,
            caller,
            reply,
        })
        .await?;
        self.answer(rx).await
    }

    /// Releases the active lease of that name; with `purge`, skips quarantine (also for a lease
    /// released earlier whose range is still in quarantine).
    ///
    /// With a fleet's store, other hosts' live processes of the lease refuse a plain release
    /// (`Busy`, naming the hosts). A forced one (or an expiry) is recorded and carried out by
    /// every host for its own processes; the range stays taken until they report none left. A
    /// forced release waits up to `release_wait` for that, then answers `ReleasePending`; an
    /// expiry does not wait.
    pub async fn release(
        &self,
        name: String,
        purge: bool,
        caller: Caller,
        kind: ReleaseKind,
    ) -> Result<(), ServiceError> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Release {
            name: name.clone(),
            purge,
            caller,
            kind,
            reply,
        })
        .await?;
        match self.answer(rx).await? {
            Released::Done => Ok(()),
            Released::Pending { lease, hosts } => {
                tracing::info!(lease = %name, hosts = %hosts.join(","), "release recorded; waiting for the hosts to stop the lease's processes");
                if kind == ReleaseKind::Expire {
                    return Ok(());
                }
                self.wait_released(*lease, hosts).await
            }
        }
    }

    /// Writes a change to the process table; `Ok` once it is in the database file, where it
    /// survives a crash of the daemon. Written on this thread when the process writer's
    /// connection and SQLite's write lock are free, which is the common case and costs one
    /// statement with no hand-off to another thread (see `subid_store::ProcessWriter`);
    /// otherwise on the blocking pool, which may wait for the lock (a worker thread must not:
    /// the lease writer holding it may need that worker to reach its commit).
    pub async fn record_process(&self, op: &ProcessOp) -> Result<(), ServiceError> {
        let result = match write_row(&self.inner.rows, op, false) {
            Err(e) if e.is_contended() => {
                let (rows, op) = (Arc::clone(&self.inner.rows), op.clone());
                tokio::task::spawn_blocking(move || write_row(&rows, &op, true))
                    .await
                    .map_err(|e| ServiceError::Internal {
                        what: "the process row thread failed".into(),
                        source: Some(Box::new(e)),
                    })?
            }
            other => other,
        };
        if result.is_ok() {
            // The rows' triggers added events; the publisher reads them back on its own task,
            // soon (not on the spawn's path unless a stream follows the feed).
            self.inner.feed.publish_soon(&self.inner.published);
        }
        result.map_err(ServiceError::from)
    }

    /// [`LeaseService::record_process`] from a thread that may block (it waits for the write
    /// lock if the lease writer holds it).
    pub fn record_process_blocking(&self, op: &ProcessOp) -> Result<(), ServiceError> {
        write_row(&self.inner.rows, op, true)?;
        self.inner.feed.publish_soon(&self.inner.published);
        Ok(())
    }

    /// The row of a process just cloned, written but not committed (see
    /// `subid_store::ProcessWriter::begin_insert`); [`LeaseService::commit_process`] commits it.
    /// Blocks: call from a thread that may.
    pub fn begin_process(&self, record: &ProcessRecord) -> Result<PendingRow<'_>, ServiceError> {
        Ok(self.inner.rows.begin_insert(record)?)
    }

    /// Commits a row [`LeaseService::begin_process`] wrote.
    pub fn commit_process(&self, row: PendingRow<'_>) -> Result<(), ServiceError> {
        row.commit()?;
        self.inner.feed.publish_soon(&self.inner.published);
        Ok(())
    }

    /// Answers once the writer task has taken the ping and finished the group it came with: a
    /// cheap proof that the writer is alive and not stuck in a commit (the watchdog's check).
    pub async fn ping(&self) -> Result<(), ServiceError> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Ping { reply }).await?;
        rx.await.map_err(|_| ServiceError::ShuttingDown)
    }

    async fn send(&self, command: Command) -> Result<(), ServiceError> {
        let sent = self.inner.tx.send(command);
        match self.inner.store.write_deadline() {
            None => sent.await.map_err(|_| ServiceError::ShuttingDown),
            Some(deadline) => match tokio::time::timeout(deadline, sent).await {
                Ok(result) => result.map_err(|_| ServiceError::ShuttingDown),
                Err(_) => Err(unanswered(deadline)),
            },
        }
    }

    /// The writer's answer. With a fleet's store, within the store's write deadline: a client
    /// never waits longer for a 503 `store_unavailable` in an outage (the write may still take
    /// effect if the store comes back in the meantime: read back before retrying, or use `PUT`,
    /// which answers the existing lease).
    async fn answer<T>(
        &self,
        rx: oneshot::Receiver<Result<T, ServiceError>>,
    ) -> Result<T, ServiceError> {
        match self.inner.store.write_deadline() {
            None => rx.await.map_err(|_| ServiceError::ShuttingDown)?,
            Some(deadline) => match tokio::time::timeout(deadline, rx).await {
                Ok(answer) => answer.map_err(|_| ServiceError::ShuttingDown)?,
                Err(_) => Err(unanswered(deadline)),
            },
        }
    }

    /// Test hook: makes the allocator believe the blocks of `lease` are free, as a bug or a
    /// change behind the daemon's back would.
    #[cfg(test)]
    fn forget_blocks(&self, lease: &LeaseRecord) {
        let mut allocator = lock(&self.inner.allocator);
        let pool = *allocator.pool();
        if let Some(first) = pool.block_of(lease.uid_base) {
            let count = lease.size / pool.block();
            let _ = allocator.release(first, count, 0, true);
        }
    }
}

/// Why the service could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(
        "the lease store was set up for the pool base {} size {} block {} but this host's \
         config gives base {} size {} block {}; every host of a fleet must use the same pool",
        stored.base, stored.size, stored.block, configured.base, configured.size, configured.block
    )]
    PoolMismatch {
        stored: PoolMeta,
        configured: PoolMeta,
    },
    #[error("{0}")]
    Membership(String),
    #[error(
        "the database was cut into blocks of {stored} ids but the config says block = {configured}; \
         set [pool] block = {stored} (a database cannot change its block size)"
    )]
    BlockChanged { stored: u32, configured: u32 },
    #[error(
        "active lease {name} (host ids {base}..{end}) lies outside the configured pool; \
         restore the old [pool] settings or release the lease with the old settings first",
        end = u64::from(*base) + u64::from(*size)
    )]
    LeaseOutsidePool { name: String, base: u32, size: u32 },
    #[error("the database holds overlapping or invalid blocks: {0}")]
    Inconsistent(String),
    #[error("cannot start the lease writer thread: {0}")]
    Thread(#[source] std::io::Error),
}

/// One process row change through the process writer (`wait`: see `ProcessWriter`).
fn write_row(rows: &ProcessWriter, op: &ProcessOp, wait: bool) -> Result<(), StoreError> {
    match op {
        ProcessOp::Insert(record) => rows.insert(record, wait),
        ProcessOp::Finish { id, end } => {
            rows.finish(id, end.state, end.exit_code, end.signal, end.ended_at, wait)
        }
    }
}

/// The error for a write the store did not answer in time.
fn unanswered(deadline: Duration) -> ServiceError {
    ServiceError::StoreUnavailable {
        source: Arc::new(StoreError::TimedOut {
            what: "a lease write",
            after: deadline,
        }),
    }
}

/// Whether the lease's ttl has run out at `now`.
pub fn is_expired(lease: &LeaseRecord, now: i64) -> bool {
    lease.expires_at.is_some_and(|at| at <= now)
}

/// Locks a mutex; a panic elsewhere while it was held leaves data that is still consistent (every
/// critical section here is a plain read or a whole-value update), so poisoning is ignored.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// Unix time in milliseconds, by the system clock (for callers without a service at hand).
pub fn now_ms() -> i64 {
    crate::clock::Clock::now_ms(&SystemClock)
}

#[cfg(test)]
mod tests;
