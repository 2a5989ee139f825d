//! The lease service: one writer task that owns the allocator and commits requests in groups.
//!
//! Every change to leases goes through [`LeaseService`], which sends a [`Command`] to the writer
//! task. The writer takes every command waiting at that moment (up to [`MAX_BATCH`]), decides each
//! against the in-memory [`Allocator`] and the database inside one `BEGIN IMMEDIATE` transaction,
//! commits once, and only then answers. Concurrent clients therefore share one fsync (group
//! commit) and no client hears of a lease before it is on disk. If a statement or the commit
//! fails, the transaction is rolled back, the allocator is rebuilt from the database, and every
//! command of the group gets the error: memory never runs ahead of the disk.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use subid_core::{AllocError, Allocator, ClaimSource, ForeignClaim, IdRange, Pool, PoolCounts};
use subid_store::{
    EventKind, LeaseRecord, NewLease, ProcessRecord, ProcessState, ProcessWriter, Store,
    StoreError, WriteTx, Writer,
};
use tokio::sync::{mpsc, oneshot};

use crate::error::{ApiError, STORE_UNAVAILABLE};
use crate::events::{EventFeed, Publisher};
use crate::holds::HoldScan;
use crate::metrics::Metrics;

/// Most commands committed in one transaction.
const MAX_BATCH: usize = 512;
/// Depth of the queue in front of the writer; senders wait when it is full.
const QUEUE_DEPTH: usize = 4096;
/// Most pool blocks tracked as claimed by other id owners (a claim over more, only possible with
/// tiny blocks, is cut here and logged).
const MAX_FOREIGN_BLOCKS: u64 = 1 << 20;

/// Another id owner claims ids of an active lease. Reported, never resolved by subidd: the
/// operator moves the other claim or releases the lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolWarning {
    /// The lease whose ids are claimed.
    pub lease: String,
    /// Who claims them, e.g. "/etc/subuid line 3 (alice:1879048192:65536)".
    pub claim: String,
}

/// What a claim of another id owner means for the pool, as last applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClaimStatus {
    /// A subid entry inside this active lease: the lease handed on (no conflict).
    HandsOn(String),
    /// It touches these active leases: reported as warnings.
    Conflicts(Vec<String>),
    /// It touches only blocks that are not active: those are withheld.
    Withheld,
}

/// One claim and its status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppliedClaim {
    pub claim: String,
    /// Pool blocks `(first, count)` it touches.
    pub blocks: (u32, u32),
    pub status: ClaimStatus,
}

/// The settings a client asks for; `None` means the default.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LeaseSpec {
    pub size: Option<u32>,
    pub labels: BTreeMap<String, String>,
    pub ttl_seconds: Option<u32>,
    /// Default rlimits of the lease's processes, name -> [soft, hard] (checked by the API).
    pub rlimits: BTreeMap<String, [u64; 2]>,
    /// Extra namespaces, sorted and without repeats (checked by the API).
    pub namespaces: Vec<String>,
    /// The cgroup cap (`pids.max`).
    pub pids_max: Option<u64>,
    /// The owner cap (the namespace creator's RLIMIT_NPROC).
    pub max_processes: Option<u64>,
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

enum Command {
    Create {
        name: String,
        spec: LeaseSpec,
        mode: CreateMode,
        caller: Caller,
        reply: oneshot::Sender<Result<Created, ApiError>>,
    },
    Renew {
        name: String,
        caller: Caller,
        reply: oneshot::Sender<Result<LeaseRecord, ApiError>>,
    },
    Release {
        name: String,
        purge: bool,
        caller: Caller,
        kind: ReleaseKind,
        reply: oneshot::Sender<Result<(), ApiError>>,
    },
    /// A health check: answered as soon as the writer has finished the group it was taken with.
    Ping { reply: oneshot::Sender<()> },
}

/// Why a lease is released.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReleaseKind {
    /// A client asked (`DELETE`).
    Delete,
    /// Its ttl ran out; skipped if it was renewed in the meantime.
    Expire,
}

/// A change to the process table (see [`LeaseService::record_process`]).
#[derive(Debug, Clone)]
pub enum ProcessOp {
    Insert(ProcessRecord),
    Finish {
        id: String,
        state: ProcessState,
        exit_code: Option<i32>,
        signal: Option<i32>,
        ended_at: i64,
    },
}

/// The answer a command is waiting for, decided before the commit and sent after it.
enum Outcome {
    Create(
        oneshot::Sender<Result<Created, ApiError>>,
        Result<Created, ApiError>,
    ),
    Renew(
        oneshot::Sender<Result<LeaseRecord, ApiError>>,
        Result<LeaseRecord, ApiError>,
    ),
    Release(oneshot::Sender<Result<(), ApiError>>, Result<(), ApiError>),
    Ping(oneshot::Sender<()>),
}

impl Outcome {
    /// Sends the decided answer, or the group's failure instead when it was not committed.
    fn send(self, failure: Option<&StoreError>) {
        fn pick<T>(failure: Option<&StoreError>, r: Result<T, ApiError>) -> Result<T, ApiError> {
            match failure {
                Some(e) => Err(ApiError::from(e)),
                None => r,
            }
        }
        // A client that went away does not care; ignoring the send error is right.
        match self {
            Outcome::Create(tx, r) => drop(tx.send(pick(failure, r))),
            Outcome::Renew(tx, r) => drop(tx.send(pick(failure, r))),
            Outcome::Release(tx, r) => drop(tx.send(pick(failure, r))),
            Outcome::Ping(tx) => drop(tx.send(())),
        }
    }
}

/// Shared handle to the lease service; cheap to clone.
#[derive(Clone)]
pub struct LeaseService {
    tx: mpsc::Sender<Command>,
    allocator: Arc<Mutex<Allocator>>,
    store: Store,
    claims: Arc<Mutex<Vec<AppliedClaim>>>,
    /// Blocks the last applied claims touch (see [`LeaseService::apply_claims`]).
    claim_blocks: Arc<Mutex<BTreeSet<u32>>>,
    /// Blocks, not active, where a live process holds ids: withheld like claimed ones (see
    /// [`LeaseService::set_process_holds`]).
    process_holds: Arc<Mutex<BTreeMap<u32, String>>>,
    holds: HoldScan,
    metrics: Arc<Metrics>,
    feed: EventFeed,
    /// Process rows, written on the caller's thread (see `subid_store::ProcessWriter`).
    rows: Arc<ProcessWriter>,
    /// Tells the event publisher that a write may have added events.
    published: Arc<tokio::sync::Notify>,
}

impl LeaseService {
    /// Rebuilds the allocator from the database and starts the writer task.
    pub async fn start(
        store: Store,
        mut writer: Writer,
        pool: Pool,
        quarantine: Duration,
    ) -> Result<LeaseService, StartError> {
        let quarantine_ms = u64::try_from(quarantine.as_millis()).unwrap_or(u64::MAX);
        let settled = writer.settle_block_size(pool.block()).await?;
        if settled != pool.block() {
            return Err(StartError::BlockChanged {
                stored: settled,
                configured: pool.block(),
            });
        }
        for lease in writer.active_leases().await? {
            let inside = pool.block_of(lease.uid_base).is_some()
                && lease.size % pool.block() == 0
                && pool
                    .block_of(lease.uid_base)
                    .and_then(|first| pool.blocks_range(first, lease.size / pool.block()))
                    .is_some_and(|r| r.start() == lease.uid_base);
            if !inside {
                return Err(StartError::LeaseOutsidePool {
                    name: lease.name,
                    base: lease.uid_base,
                    size: lease.size,
                });
            }
        }
        let allocator = rebuild(&mut writer, pool, quarantine_ms).await?;
        let allocator = Arc::new(Mutex::new(allocator));
        let metrics = Arc::new(Metrics::new());
        let feed = EventFeed::new(writer.last_event_id().await?);
        let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
        let publisher = Publisher::new(feed.clone(), Arc::clone(&metrics), store.clone());
        let rows = Arc::new(ProcessWriter::open(store.path())?);
        let published = publisher.poke();
        let task = WriterTask {
            writer,
            allocator: Arc::clone(&allocator),
            rx,
            published: Arc::clone(&published),
        };
        tokio::spawn(publisher.run());
        tokio::spawn(task.run());
        Ok(LeaseService {
            tx,
            allocator,
            store,
            claims: Arc::new(Mutex::new(Vec::new())),
            claim_blocks: Arc::new(Mutex::new(BTreeSet::new())),
            process_holds: Arc::new(Mutex::new(BTreeMap::new())),
            holds: HoldScan::default(),
            metrics,
            feed,
            rows,
            published,
        })
    }

    /// Applies the claims other id owners hold on the pool now: free blocks they touch are withheld,
    /// blocks no longer claimed come back, and claims on active leases (other than a subid entry
    /// inside one lease, which hands that lease on) become warnings, logged when they appear and
    /// when they clear. Returns each claim with its status.
    pub async fn apply_claims(
        &self,
        claims: &[ForeignClaim],
    ) -> Result<Vec<AppliedClaim>, StoreError> {
        let mut blocks = BTreeSet::new();
        let mut tracked = 0u64;
        for claim in claims {
            let (first, count) = claim.blocks;
            tracked = tracked.saturating_add(u64::from(count));
            if tracked > MAX_FOREIGN_BLOCKS {
                tracing::error!(
                    claim = %claim.source,
                    "claims of other id owners span more than {MAX_FOREIGN_BLOCKS} blocks; \
                     the rest is not withheld: use a larger pool block"
                );
                break;
            }
            blocks.extend(first..first.saturating_add(count));
        }
        let (pool, conflicts, withheld) = {
            let mut allocator = lock(&self.allocator);
            let mut foreign = blocks.clone();
            foreign.extend(lock(&self.process_holds).keys().copied());
            *lock(&self.claim_blocks) = blocks;
            let conflicts = allocator.set_foreign(&foreign);
            let withheld = allocator.counts(now_ms_u64()).withheld;
            (*allocator.pool(), conflicts, withheld)
        };
        let mut applied = Vec::new();
        for claim in claims {
            let status = match self.delegated_to(claim).await? {
                Some(lease) => ClaimStatus::HandsOn(lease),
                None => {
                    let (first, count) = claim.blocks;
                    let end = first.saturating_add(count);
                    let mut named = BTreeSet::new();
                    for &block in conflicts.iter().filter(|&&b| (first..end).contains(&b)) {
                        let Some(start) = pool.block_start(block) else {
                            continue;
                        };
                        if let Some(lease) = self.store.lease_holding(start).await? {
                            named.insert(lease.name);
                        }
                    }
                    if named.is_empty() {
                        ClaimStatus::Withheld
                    } else {
                        ClaimStatus::Conflicts(named.into_iter().collect())
                    }
                }
            };
            applied.push(AppliedClaim {
                claim: claim.source.to_string(),
                blocks: claim.blocks,
                status,
            });
        }
        let old = warnings_of(&std::mem::replace(
            &mut *lock(&self.claims),
            applied.clone(),
        ));
        let warnings = warnings_of(&applied);
        for w in warnings.iter().filter(|w| !old.contains(w)) {
            tracing::error!(
                lease = %w.lease,
                claim = %w.claim,
                "another id owner claims ids of an active lease; subidd does not resolve this: \
                 remove or move the other claim, or release the lease"
            );
        }
        for w in old.iter().filter(|w| !warnings.contains(w)) {
            tracing::info!(lease = %w.lease, claim = %w.claim, "claim on lease ids is gone");
        }
        if withheld > 0 {
            tracing::debug!(withheld, "pool blocks withheld for other id owners");
        }
        Ok(applied)
    }

    /// Withholds the blocks where a live process of the host holds ids (`holds`: block index ->
    /// who, e.g. "process 4242 (sleep) holds uid 1879048200"), so no lease is issued a range
    /// whose ids something still uses; blocks no longer held come back. Holds on active blocks
    /// are ignored: the processes of a lease hold its ids. Returns the holds kept.
    pub fn set_process_holds(&self, mut holds: BTreeMap<u32, String>) -> BTreeMap<u32, String> {
        let (old, kept) = {
            let mut allocator = lock(&self.allocator);
            holds.retain(|&block, _| {
                !matches!(
                    allocator.block_state(block),
                    Some(subid_core::BlockState::Active) | None
                )
            });
            let mut foreign = lock(&self.claim_blocks).clone();
            foreign.extend(holds.keys().copied());
            allocator.set_foreign(&foreign);
            let old = std::mem::replace(&mut *lock(&self.process_holds), holds.clone());
            (old, holds)
        };
        for (block, who) in kept.iter().filter(|(b, _)| !old.contains_key(b)) {
            tracing::warn!(block, holder = %who, "a live process holds ids of a pool block that is not leased; the block is withheld until it is gone");
        }
        for block in old.keys().filter(|b| !kept.contains_key(b)) {
            tracing::info!(
                block,
                "no process holds ids of the block any more; it is free again"
            );
        }
        kept
    }

    /// Scans `/proc` (every process when `full`, else the new ones) and withholds the blocks
    /// whose ids a live process holds; see [`crate::holds`].
    pub async fn check_holds(&self, full: bool) -> std::io::Result<()> {
        let pool = *lock(&self.allocator).pool();
        let holds = self.holds.holds(pool, full).await?;
        self.set_process_holds(holds);
        Ok(())
    }

    /// The scanner behind [`LeaseService::check_holds`].
    pub fn hold_scan(&self) -> &HoldScan {
        &self.holds
    }

    /// The blocks withheld because a live process holds their ids, as last set.
    pub fn process_holds(&self) -> BTreeMap<u32, String> {
        lock(&self.process_holds).clone()
    }

    /// The active lease an /etc/subuid or /etc/subgid entry hands on, when the entry lies wholly
    /// inside one (as `idmap?format=subuid` renders it). Such an entry is no conflict while the
    /// lease is active; once the lease is released its blocks are withheld like any claimed ones.
    pub async fn delegated_to(&self, claim: &ForeignClaim) -> Result<Option<String>, StoreError> {
        let ClaimSource::Subid { start, count, .. } = claim.source else {
            return Ok(None);
        };
        let Ok(ids) = IdRange::new(start, count) else {
            return Ok(None);
        };
        let (pool, _) = self.pool_status();
        let Some(first) = pool.block_start(claim.blocks.0) else {
            return Ok(None);
        };
        let Some(lease) = self.store.lease_holding(first).await? else {
            return Ok(None);
        };
        let inside =
            IdRange::new(lease.uid_base, lease.size).is_ok_and(|held| held.contains_range(&ids));
        Ok(inside.then_some(lease.name))
    }

    /// Every claim of another id owner on the pool, as last applied.
    pub fn pool_claims(&self) -> Vec<AppliedClaim> {
        lock(&self.claims).clone()
    }

    /// The conflicts found by the last [`LeaseService::apply_claims`].
    pub fn pool_warnings(&self) -> Vec<PoolWarning> {
        warnings_of(&lock(&self.claims))
    }

    /// The daemon's metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The live event feed, published after each commit.
    pub fn feed(&self) -> &EventFeed {
        &self.feed
    }

    /// Read access to the store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The pool and its block counts now.
    pub fn pool_status(&self) -> (Pool, PoolCounts) {
        let allocator = lock(&self.allocator);
        (*allocator.pool(), allocator.counts(now_ms_u64()))
    }

    /// Creates the lease, or finds the identical one (`Ensure`).
    pub async fn create(
        &self,
        name: String,
        spec: LeaseSpec,
        mode: CreateMode,
        caller: Caller,
    ) -> Result<Created, ApiError> {
        // Before a block can be issued: withhold those a process started since the last scan
        // holds ids of (known processes are rescanned by the pool re-check).
        self.check_holds(false).await.map_err(|error| {
            tracing::error!(%error, "cannot scan /proc for processes holding pool ids");
            ApiError::Unavailable("cannot check which ids live processes hold; see the daemon log")
        })?;
        let (reply, rx) = oneshot::channel();
        self.send(Command::Create {
            name,
            spec,
            mode,
            caller,
            reply,
        })
        .await?;
        rx.await.map_err(|_| gone())?
    }

    /// Pushes the expiry of a lease with a ttl to now + ttl.
    pub async fn renew(&self, name: String, caller: Caller) -> Result<LeaseRecord, ApiError> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Renew {
            name,
            caller,
            reply,
        })
        .await?;
        rx.await.map_err(|_| gone())?
    }

    /// Releases the active lease of that name; with `purge`, skips quarantine (also for a lease
    /// released earlier whose range is still in quarantine).
    pub async fn release(
        &self,
        name: String,
        purge: bool,
        caller: Caller,
        kind: ReleaseKind,
    ) -> Result<(), ApiError> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Release {
            name,
            purge,
            caller,
            kind,
            reply,
        })
        .await?;
        rx.await.map_err(|_| gone())?
    }

    /// Writes a change to the process table; `Ok` once it is in the database file, where it
    /// survives a crash of the daemon. Written on this thread when the process writer's
    /// connection and SQLite's write lock are free, which is the common case and costs one
    /// statement with no hand-off to another thread (see `subid_store::ProcessWriter`);
    /// otherwise on the blocking pool, which may wait for the lock (a worker thread must not:
    /// the lease writer holding it may need that worker to reach its commit).
    pub async fn record_process(&self, op: &ProcessOp) -> Result<(), ApiError> {
        let result = match write_row(&self.rows, op, false) {
            Err(e) if e.is_contended() => {
                let (rows, op) = (Arc::clone(&self.rows), op.clone());
                tokio::task::spawn_blocking(move || write_row(&rows, &op, true))
                    .await
                    .map_err(|e| ApiError::Internal(format!("process row thread: {e}")))?
            }
            other => other,
        };
        if result.is_ok() {
            // The rows' triggers added events; the publisher reads them back on its own task.
            self.published.notify_one();
        }
        result.map_err(ApiError::from)
    }

    /// Answers once the writer task has taken the ping and finished the group it came with: a
    /// cheap proof that the writer is alive and not stuck in a commit (the watchdog's check).
    pub async fn ping(&self) -> Result<(), ApiError> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Ping { reply }).await?;
        rx.await.map_err(|_| gone())
    }

    async fn send(&self, command: Command) -> Result<(), ApiError> {
        self.tx.send(command).await.map_err(|_| gone())
    }
}

/// Why the service could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Store(#[from] StoreError),
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
}

struct WriterTask {
    writer: Writer,
    allocator: Arc<Mutex<Allocator>>,
    rx: mpsc::Receiver<Command>,
    /// Tells the event publisher that a commit may have added events.
    published: Arc<tokio::sync::Notify>,
}

impl WriterTask {
    async fn run(mut self) {
        let mut batch = Vec::with_capacity(MAX_BATCH);
        while self.rx.recv_many(&mut batch, MAX_BATCH).await > 0 {
            // Pings take no part in the transaction; they are answered after the group's commit.
            let pings: Vec<Command> = batch
                .extract_if(.., |c| matches!(c, Command::Ping { .. }))
                .collect();
            if !batch.is_empty() {
                self.commit_group(&mut batch).await;
            }
            for ping in pings {
                if let Command::Ping { reply } = ping {
                    let _ = reply.send(());
                }
            }
        }
    }

    /// Decides, commits and answers one group of commands.
    async fn commit_group(&mut self, batch: &mut Vec<Command>) {
        let now = now_ms();
        let mut outcomes = Vec::with_capacity(batch.len());
        let failure = match self.writer.begin().await {
            Err(error) => Some(error),
            Ok(mut tx) => {
                let mut failure = None;
                for command in batch.drain(..) {
                    match decide(&mut tx, &self.allocator, command, now).await {
                        Ok(outcome) => outcomes.push(outcome),
                        Err((outcome, error)) => {
                            outcomes.push(outcome);
                            failure = Some(error);
                            break;
                        }
                    }
                }
                match failure {
                    Some(error) => Some(error),
                    None => tx.commit().await.err(),
                }
            }
        };
        // Commands not reached because an earlier one failed get the same failure.
        let unreached: Vec<Command> = std::mem::take(batch);
        if let Some(error) = &failure {
            tracing::error!(%error, "lease store write failed; group rolled back");
            if let Err(e) = self.writer.reopen().await {
                tracing::error!(error = %e, "cannot reopen the database after a failed write");
            }
            let pool = *lock(&self.allocator).pool();
            let quarantine = lock(&self.allocator).quarantine_ms();
            match rebuild(&mut self.writer, pool, quarantine).await {
                Ok(mut fresh) => {
                    let mut allocator = lock(&self.allocator);
                    fresh.set_foreign(allocator.foreign());
                    *allocator = fresh;
                }
                Err(e) => tracing::error!(error = %e, "cannot rebuild the allocator"),
            }
        }
        for outcome in outcomes {
            outcome.send(failure.as_ref());
        }
        for command in unreached {
            unreached_outcome(command).send(failure.as_ref());
        }
        // Events are published by a task of their own: reading the new rows back is one more
        // round trip to SQLite, which neither this client nor the next should wait for.
        // Streams may see an event a moment after its request was answered; none is missed.
        self.published.notify_one();
    }
}

/// One process row change through the process writer (`wait`: see `ProcessWriter`).
fn write_row(rows: &ProcessWriter, op: &ProcessOp, wait: bool) -> Result<(), StoreError> {
    match op {
        ProcessOp::Insert(record) => rows.insert(record, wait),
        ProcessOp::Finish {
            id,
            state,
            exit_code,
            signal,
            ended_at,
        } => rows.finish(id, *state, *exit_code, *signal, *ended_at, wait),
    }
}

/// An outcome shell for a command that was never decided.
fn unreached_outcome(command: Command) -> Outcome {
    fn e<T>() -> Result<T, ApiError> {
        Err(ApiError::Unavailable(STORE_UNAVAILABLE))
    }
    match command {
        Command::Create { reply, .. } => Outcome::Create(reply, e()),
        Command::Renew { reply, .. } => Outcome::Renew(reply, e()),
        Command::Release { reply, .. } => Outcome::Release(reply, e()),
        Command::Ping { reply } => Outcome::Ping(reply),
    }
}

/// Decides one command inside the group's transaction. `Err` means the store failed and the
/// whole group must be rolled back; the outcome is still returned so its sender gets the error.
async fn decide(
    tx: &mut WriteTx<'_>,
    allocator: &Mutex<Allocator>,
    command: Command,
    now: i64,
) -> Result<Outcome, (Outcome, StoreError)> {
    match command {
        Command::Create {
            name,
            spec,
            mode,
            caller,
            reply,
        } => match create(tx, allocator, &name, &spec, mode, caller, now).await {
            Ok(r) => Ok(Outcome::Create(reply, r)),
            Err(e) => Err((
                Outcome::Create(reply, Err(ApiError::Unavailable(STORE_UNAVAILABLE))),
                e,
            )),
        },
        Command::Renew {
            name,
            caller,
            reply,
        } => match renew(tx, &name, caller, now).await {
            Ok(r) => Ok(Outcome::Renew(reply, r)),
            Err(e) => Err((
                Outcome::Renew(reply, Err(ApiError::Unavailable(STORE_UNAVAILABLE))),
                e,
            )),
        },
        Command::Release {
            name,
            purge,
            caller,
            kind,
            reply,
        } => match release(tx, allocator, &name, purge, caller, kind, now).await {
            Ok(r) => Ok(Outcome::Release(reply, r)),
            Err(e) => Err((
                Outcome::Release(reply, Err(ApiError::Unavailable(STORE_UNAVAILABLE))),
                e,
            )),
        },
        // `run` takes pings out of the group; one that got here is answered with the group.
        Command::Ping { reply } => Ok(Outcome::Ping(reply)),
    }
}

/// The settings a spec resolves to with defaults filled in.
fn resolve(spec: &LeaseSpec, pool: &Pool) -> (u32, Option<u32>) {
    (spec.size.unwrap_or(pool.block()), spec.ttl_seconds)
}

async fn create(
    tx: &mut WriteTx<'_>,
    allocator: &Mutex<Allocator>,
    name: &str,
    spec: &LeaseSpec,
    mode: CreateMode,
    caller: Caller,
    now: i64,
) -> Result<Result<Created, ApiError>, StoreError> {
    let pool = *lock(allocator).pool();
    let (size, ttl_seconds) = resolve(spec, &pool);
    if let Some(existing) = tx.active_lease(name).await? {
        if is_expired(&existing, now) {
            return Ok(Err(ApiError::LeaseConflict(format!(
                "lease {name} expired and is being released; retry in a moment"
            ))));
        }
        if mode == CreateMode::New {
            return Ok(Err(ApiError::LeaseExists(name.to_string())));
        }
        let same = existing.size == size
            && existing.labels == spec.labels
            && existing.ttl_seconds == ttl_seconds
            && existing.rlimits == spec.rlimits
            && existing.namespaces == spec.namespaces
            && existing.pids_max == spec.pids_max
            && existing.max_processes == spec.max_processes;
        if same {
            return Ok(Ok(Created {
                lease: existing,
                created: false,
            }));
        }
        return Ok(Err(ApiError::LeaseConflict(format!(
            "lease {name} exists with other settings (size {}, ttl_seconds {}, {} labels, \
             rlimits, namespaces or process caps may differ too); \
             delete it first or ask for the same settings",
            existing.size,
            existing
                .ttl_seconds
                .map_or_else(|| "none".to_string(), |t| t.to_string()),
            existing.labels.len()
        ))));
    }
    let count = size / pool.block();
    // Sticky: the same name within quarantine gets its old range back when it is still free.
    // Only while no other lease held the range after it: otherwise the quarantine now protects
    // that other tenant's files.
    let sticky = match tx.last_released(name).await? {
        Some(old)
            if old.size == size
                && old
                    .released_at
                    .is_some_and(|at| at.saturating_add(quarantine_of(allocator)) > now) =>
        {
            let since = old.released_at.unwrap_or(now);
            if tx.range_held_since(old.uid_base, old.size, since).await? {
                None
            } else {
                pool.block_of(old.uid_base)
            }
        }
        _ => None,
    };
    let first = {
        let mut alloc = lock(allocator);
        let claimed = sticky.filter(|&first| alloc.claim(first, count).is_ok());
        match claimed {
            Some(first) => first,
            None => match alloc.allocate(count, u64::try_from(now).unwrap_or(0)) {
                Ok(first) => first,
                Err(AllocError::Exhausted { .. }) => {
                    let counts = alloc.counts(u64::try_from(now).unwrap_or(0));
                    return Ok(Err(ApiError::PoolExhausted(format!(
                        "no free range of {size} ids: {} of {} blocks active, {} in quarantine; \
                         release leases, purge quarantined ones, or grow the pool",
                        counts.active, counts.total, counts.quarantined
                    ))));
                }
                Err(other) => {
                    return Ok(Err(ApiError::Internal(format!("allocator: {other}"))));
                }
            },
        }
    };
    let Some(range) = pool.blocks_range(first, count) else {
        return Ok(Err(ApiError::Internal(format!(
            "allocator returned block {first}+{count} outside the pool"
        ))));
    };
    let new = NewLease {
        name: name.to_string(),
        uid_base: range.start(),
        gid_base: range.start(),
        size,
        labels: spec.labels.clone(),
        ttl_seconds,
        created_at: now,
        expires_at: ttl_seconds.map(|t| now.saturating_add(i64::from(t) * 1000)),
        created_by: caller,
        rlimits: spec.rlimits.clone(),
        namespaces: spec.namespaces.clone(),
        pids_max: spec.pids_max,
        max_processes: spec.max_processes,
    };
    let lease = tx.insert_lease(&new, pool.block()).await?;
    Ok(Ok(Created {
        lease,
        created: true,
    }))
}

async fn renew(
    tx: &mut WriteTx<'_>,
    name: &str,
    caller: Caller,
    now: i64,
) -> Result<Result<LeaseRecord, ApiError>, StoreError> {
    let Some(mut lease) = tx.active_lease(name).await? else {
        return Ok(Err(ApiError::NotFound(format!("no active lease {name}"))));
    };
    if is_expired(&lease, now) {
        return Ok(Err(ApiError::NotFound(format!(
            "lease {name} expired and is being released; create it again"
        ))));
    }
    let Some(ttl) = lease.ttl_seconds else {
        return Ok(Err(ApiError::LeaseConflict(format!(
            "lease {name} has no ttl_seconds, so it never expires and cannot be renewed"
        ))));
    };
    let expires_at = now.saturating_add(i64::from(ttl) * 1000);
    tx.renew(&lease, expires_at, now, caller).await?;
    lease.expires_at = Some(expires_at);
    Ok(Ok(lease))
}

async fn release(
    tx: &mut WriteTx<'_>,
    allocator: &Mutex<Allocator>,
    name: &str,
    purge: bool,
    caller: Caller,
    kind: ReleaseKind,
    now: i64,
) -> Result<Result<(), ApiError>, StoreError> {
    let pool = *lock(allocator).pool();
    if let Some(lease) = tx.active_lease(name).await? {
        if kind == ReleaseKind::Expire && !is_expired(&lease, now) {
            // Renewed since the expiry pass looked: nothing to do.
            return Ok(Ok(()));
        }
        let event = match kind {
            ReleaseKind::Delete => EventKind::Release,
            ReleaseKind::Expire => EventKind::Expire,
        };
        let Some((first, count)) = blocks_of(&pool, &lease) else {
            return Ok(Err(ApiError::Internal(format!(
                "lease {name} lies outside the pool"
            ))));
        };
        tx.release(&lease, event, purge, now, caller).await?;
        let at = u64::try_from(now).unwrap_or(0);
        if let Err(error) = lock(allocator).release(first, count, at, purge) {
            return Ok(Err(ApiError::Internal(format!("allocator: {error}"))));
        }
        return Ok(Ok(()));
    }
    if purge {
        // Purging a lease released earlier: its range leaves quarantine now, if nobody took it.
        if let Some(old) = tx.last_released(name).await?
            && let Some((first, count)) = blocks_of(&pool, &old)
        {
            let purged = {
                let mut alloc = lock(allocator);
                if alloc.is_free_for(first, count) {
                    alloc.purge(first, count).map(|()| true)
                } else {
                    Ok(false)
                }
            };
            match purged {
                Ok(true) => tx.purge_released(&old, now, caller).await?,
                Ok(false) => {}
                Err(error) => {
                    return Ok(Err(ApiError::Internal(format!("allocator: {error}"))));
                }
            }
            return Ok(Ok(()));
        }
    }
    Ok(Err(ApiError::NotFound(format!("no active lease {name}"))))
}

/// Whether the lease's ttl has run out at `now`.
pub fn is_expired(lease: &LeaseRecord, now: i64) -> bool {
    lease.expires_at.is_some_and(|at| at <= now)
}

/// The first block index and block count of a lease.
fn blocks_of(pool: &Pool, lease: &LeaseRecord) -> Option<(u32, u32)> {
    let first = pool.block_of(lease.uid_base)?;
    Some((first, lease.size / pool.block()))
}

/// Rebuilds the in-memory allocator from the block rows.
async fn rebuild(
    writer: &mut Writer,
    pool: Pool,
    quarantine_ms: u64,
) -> Result<Allocator, StartError> {
    let mut allocator = Allocator::new(pool, quarantine_ms);
    for row in writer.block_rows().await? {
        // Blocks outside the current pool (a pool that shrank) are simply not ours any more.
        let Some(idx) = pool.block_of(row.start) else {
            continue;
        };
        let result = match (row.lease_id, row.released_at) {
            (Some(_), _) => allocator.mark_active(idx, 1),
            (None, Some(at)) => allocator.mark_released(idx, 1, u64::try_from(at).unwrap_or(0)),
            (None, None) => continue,
        };
        result.map_err(|e| StartError::Inconsistent(format!("block at {}: {e}", row.start)))?;
    }
    Ok(allocator)
}

fn quarantine_of(allocator: &Mutex<Allocator>) -> i64 {
    i64::try_from(lock(allocator).quarantine_ms()).unwrap_or(i64::MAX)
}

/// Locks the allocator; a panic while holding it cannot leave it half-changed in a way the
/// next rebuild would not repair, so a poisoned lock is taken over.
/// One warning per claim and active lease it touches.
fn warnings_of(claims: &[AppliedClaim]) -> Vec<PoolWarning> {
    claims
        .iter()
        .flat_map(|a| match &a.status {
            ClaimStatus::Conflicts(leases) => leases
                .iter()
                .map(|lease| PoolWarning {
                    lease: lease.clone(),
                    claim: a.claim.clone(),
                })
                .collect(),
            ClaimStatus::HandsOn(_) | ClaimStatus::Withheld => Vec::new(),
        })
        .collect()
}

/// Locks a mutex; a panic elsewhere while it was held leaves data that is still consistent (every
/// critical section here is a plain read or a whole-value update), so poisoning is ignored.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

fn gone() -> ApiError {
    ApiError::Unavailable("the daemon is shutting down")
}

/// Unix time in milliseconds.
pub fn now_ms() -> i64 {
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO);
    i64::try_from(since.as_millis()).unwrap_or(i64::MAX)
}

fn now_ms_u64() -> u64 {
    u64::try_from(now_ms()).unwrap_or(0)
}
