//! The writer task: the one owner of the lease store's writing connection, committing requests
//! in groups.
//!
//! It takes every command waiting at that moment (up to [`MAX_BATCH`]), decides each against the
//! in-memory [`Allocator`] and the database inside one transaction, commits once, and only then
//! answers. Concurrent clients therefore share one commit (group commit) and no client hears of
//! a lease before it is durable. If a statement or the commit fails, the transaction is rolled
//! back, the allocator is rebuilt from the database, and every command of the group gets the
//! error: memory never runs ahead of the database. When a committed change cannot be mirrored
//! in memory (the allocator disagrees with the database), the change stands, the client hears
//! of it, and the allocator is rebuilt from the database after the commit.
//!
//! The task runs on a thread of its own (see `spawn`): with the SQLite back end every statement
//! of a group then runs there without a hand-off to another thread.

use std::sync::{Arc, Mutex};

use subid_core::{AllocError, Allocator, Pool};
use subid_store::{EventKind, LeaseRecord, NewLease, StoreError, WriteTx, Writer};
use tokio::sync::{mpsc, oneshot};

use super::{Caller, CreateMode, Created, LeaseSpec, ReleaseKind, StartError, is_expired, lock};
use crate::clock::SharedClock;
use crate::service_error::ServiceError;

/// Most commands committed in one transaction.
pub(super) const MAX_BATCH: usize = 512;
/// Depth of the queue in front of the writer; senders wait when it is full.
pub(super) const QUEUE_DEPTH: usize = 4096;

pub(super) type Reply<T> = oneshot::Sender<Result<T, ServiceError>>;

pub(super) enum Command {
    Create {
        name: String,
        spec: LeaseSpec,
        mode: CreateMode,
        caller: Caller,
        reply: Reply<Created>,
    },
    Renew {
        name: String,
        caller: Caller,
        reply: Reply<LeaseRecord>,
    },
    Release {
        name: String,
        purge: bool,
        caller: Caller,
        kind: ReleaseKind,
        reply: Reply<()>,
    },
    /// A health check: answered as soon as the writer has finished the group it was taken with.
    Ping { reply: oneshot::Sender<()> },
}

/// The answer a command is waiting for, decided before the commit and sent after it.
enum Outcome {
    Create(Reply<Created>, Result<Created, ServiceError>),
    Renew(Reply<LeaseRecord>, Result<LeaseRecord, ServiceError>),
    Release(Reply<()>, Result<(), ServiceError>),
    Ping(oneshot::Sender<()>),
}

impl Outcome {
    /// Sends the decided answer, or the group's failure instead when it was not committed.
    fn send(self, failure: Option<&Arc<StoreError>>) {
        fn pick<T>(
            failure: Option<&Arc<StoreError>>,
            r: Result<T, ServiceError>,
        ) -> Result<T, ServiceError> {
            match failure {
                Some(e) => Err(ServiceError::store(Arc::clone(e))),
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

    /// An outcome for a command that was never decided: the group's failure is sent instead.
    fn unreached(command: Command) -> Outcome {
        fn e<T>() -> Result<T, ServiceError> {
            Err(ServiceError::internal(
                "the group failed before this command",
            ))
        }
        match command {
            Command::Create { reply, .. } => Outcome::Create(reply, e()),
            Command::Renew { reply, .. } => Outcome::Renew(reply, e()),
            Command::Release { reply, .. } => Outcome::Release(reply, e()),
            Command::Ping { reply } => Outcome::Ping(reply),
        }
    }
}

/// The task that owns the writer.
pub(super) struct WriterTask {
    pub(super) writer: Writer,
    pub(super) allocator: Arc<Mutex<Allocator>>,
    pub(super) rx: mpsc::Receiver<Command>,
    pub(super) clock: SharedClock,
    /// Tells the event publisher that a commit may have added events.
    pub(super) published: Arc<tokio::sync::Notify>,
}

/// What deciding the commands of one group needs besides the transaction.
struct Decide<'a> {
    allocator: &'a Mutex<Allocator>,
    now: i64,
    /// Set when a committed change could not be mirrored in the allocator: it is rebuilt from
    /// the database after the group.
    resync: bool,
}

impl WriterTask {
    /// Starts the task on a thread of its own, with a runtime of its own: with SQLite every
    /// statement of a group then runs there, with no hand-off to another thread (see the module
    /// docs); with PostgreSQL the thread only waits for the server.
    pub(super) fn spawn(self) -> Result<(), StartError> {
        std::thread::Builder::new()
            .name("lease-writer".into())
            .spawn(move || {
                match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime.block_on(self.run()),
                    // Dropping the task closes the queue: every request then hears that the
                    // daemon is stopping.
                    Err(error) => tracing::error!(
                        %error,
                        "cannot start the lease writer's runtime; lease writes fail"
                    ),
                }
            })
            .map_err(StartError::Thread)?;
        Ok(())
    }

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
        let mut ctx = Decide {
            allocator: &self.allocator,
            now: self.clock.now_ms(),
            resync: false,
        };
        let mut outcomes = Vec::with_capacity(batch.len());
        let failure = match self.writer.begin().await {
            Err(error) => Some(error),
            Ok(mut tx) => {
                let mut failure = None;
                for command in batch.drain(..) {
                    match decide(&mut tx, &mut ctx, command).await {
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
        let failure = failure.map(Arc::new);
        if let Some(error) = &failure {
            tracing::error!(%error, "lease store write failed; group rolled back");
            if let Err(e) = self.writer.reopen().await {
                tracing::error!(error = %e, "cannot reopen the lease store after a failed write");
            }
        }
        if failure.is_some() || ctx.resync {
            self.resync().await;
        }
        for outcome in outcomes {
            outcome.send(failure.as_ref());
        }
        for command in unreached {
            Outcome::unreached(command).send(failure.as_ref());
        }
        // Events are published by a task of their own: reading the new rows back is one more
        // round trip, which neither this client nor the next should wait for. Streams may see
        // an event a moment after its request was answered; none is missed.
        self.published.notify_one();
    }

    /// Rebuilds the allocator from the database, keeping the blocks withheld for other owners.
    async fn resync(&mut self) {
        let (pool, quarantine) = {
            let allocator = lock(&self.allocator);
            (*allocator.pool(), allocator.quarantine_ms())
        };
        match rebuild(&mut self.writer, pool, quarantine).await {
            Ok(mut fresh) => {
                let mut allocator = lock(&self.allocator);
                fresh.set_foreign(allocator.foreign());
                *allocator = fresh;
            }
            Err(e) => tracing::error!(error = %e, "cannot rebuild the allocator"),
        }
    }
}

/// Decides one command inside the group's transaction. `Err` means the store failed and the
/// whole group must be rolled back; the outcome is still returned so its sender gets the error.
async fn decide(
    tx: &mut WriteTx<'_>,
    ctx: &mut Decide<'_>,
    command: Command,
) -> Result<Outcome, (Outcome, StoreError)> {
    fn failed<T>(
        reply: Reply<T>,
        wrap: fn(Reply<T>, Result<T, ServiceError>) -> Outcome,
    ) -> Outcome {
        wrap(reply, Err(ServiceError::internal("rolled back")))
    }
    match command {
        Command::Create {
            name,
            spec,
            mode,
            caller,
            reply,
        } => match create(tx, ctx, &name, &spec, mode, caller).await {
            Ok(r) => Ok(Outcome::Create(reply, r)),
            Err(e) => Err((failed(reply, Outcome::Create), e)),
        },
        Command::Renew {
            name,
            caller,
            reply,
        } => match renew(tx, ctx, &name, caller).await {
            Ok(r) => Ok(Outcome::Renew(reply, r)),
            Err(e) => Err((failed(reply, Outcome::Renew), e)),
        },
        Command::Release {
            name,
            purge,
            caller,
            kind,
            reply,
        } => match release(tx, ctx, &name, purge, caller, kind).await {
            Ok(r) => Ok(Outcome::Release(reply, r)),
            Err(e) => Err((failed(reply, Outcome::Release), e)),
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
    ctx: &mut Decide<'_>,
    name: &str,
    spec: &LeaseSpec,
    mode: CreateMode,
    caller: Caller,
) -> Result<Result<Created, ServiceError>, StoreError> {
    let now = ctx.now;
    let (pool, quarantine) = {
        let allocator = lock(ctx.allocator);
        (
            *allocator.pool(),
            i64::try_from(allocator.quarantine_ms()).unwrap_or(i64::MAX),
        )
    };
    let (size, ttl_seconds) = resolve(spec, &pool);
    let known = tx.name_state(name).await?;
    if let Some(existing) = known.active {
        if is_expired(&existing, now) {
            return Ok(Err(ServiceError::Conflict {
                reason: format!("lease {name} expired and is being released; retry in a moment"),
            }));
        }
        if mode == CreateMode::New {
            return Ok(Err(ServiceError::Exists {
                lease: name.to_string(),
            }));
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
        return Ok(Err(ServiceError::Conflict {
            reason: format!(
                "lease {name} exists with other settings (size {}, ttl_seconds {}, {} labels, \
                 rlimits, namespaces or process caps may differ too); \
                 delete it first or ask for the same settings",
                existing.size,
                existing
                    .ttl_seconds
                    .map_or_else(|| "none".to_string(), |t| t.to_string()),
                existing.labels.len()
            ),
        }));
    }
    let count = size / pool.block();
    // Sticky: the same name within quarantine gets its old range back when it is still free.
    // Only while no other lease held the range after it: otherwise the quarantine now protects
    // that other tenant's files.
    let sticky = match known.last_released {
        Some(old)
            if old.size == size
                && old
                    .released_at
                    .is_some_and(|at| at.saturating_add(quarantine) > now) =>
        {
            let since = old.released_at.unwrap_or(now);
            if tx.range_held_since(&old, since).await? {
                None
            } else {
                pool.block_of(old.uid_base)
            }
        }
        _ => None,
    };
    let first = {
        let mut alloc = lock(ctx.allocator);
        let at = u64::try_from(now).unwrap_or(0);
        let claimed = sticky.filter(|&first| alloc.claim(first, count).is_ok());
        match claimed {
            Some(first) => first,
            None => match alloc.allocate(count, at) {
                Ok(first) => first,
                Err(AllocError::Exhausted { .. }) => {
                    let counts = alloc.counts(at);
                    return Ok(Err(ServiceError::Exhausted {
                        reason: format!(
                            "no free range of {size} ids: {} of {} blocks active, {} in \
                             quarantine; release leases, purge quarantined ones, or grow the pool",
                            counts.active, counts.total, counts.quarantined
                        ),
                    }));
                }
                Err(other) => {
                    return Ok(Err(ServiceError::Internal {
                        what: format!("the allocator refused {count} block(s)"),
                        source: Some(Box::new(other)),
                    }));
                }
            },
        }
    };
    let Some(range) = pool.blocks_range(first, count) else {
        return Ok(Err(ServiceError::internal(format!(
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
    ctx: &mut Decide<'_>,
    name: &str,
    caller: Caller,
) -> Result<Result<LeaseRecord, ServiceError>, StoreError> {
    let now = ctx.now;
    let Some(mut lease) = tx.active_lease(name).await? else {
        return Ok(Err(ServiceError::NotFound {
            what: format!("no active lease {name}"),
        }));
    };
    if is_expired(&lease, now) {
        return Ok(Err(ServiceError::NotFound {
            what: format!("lease {name} expired and is being released; create it again"),
        }));
    }
    let Some(ttl) = lease.ttl_seconds else {
        return Ok(Err(ServiceError::Conflict {
            reason: format!(
                "lease {name} has no ttl_seconds, so it never expires and cannot be renewed"
            ),
        }));
    };
    let expires_at = now.saturating_add(i64::from(ttl) * 1000);
    tx.renew(&lease, expires_at, now, caller).await?;
    lease.expires_at = Some(expires_at);
    Ok(Ok(lease))
}

async fn release(
    tx: &mut WriteTx<'_>,
    ctx: &mut Decide<'_>,
    name: &str,
    purge: bool,
    caller: Caller,
    kind: ReleaseKind,
) -> Result<Result<(), ServiceError>, StoreError> {
    let now = ctx.now;
    let pool = *lock(ctx.allocator).pool();
    let known = tx.name_state(name).await?;
    if let Some(lease) = known.active {
        if kind == ReleaseKind::Expire && !is_expired(&lease, now) {
            // Renewed since the expiry pass looked: nothing to do.
            return Ok(Ok(()));
        }
        let event = match kind {
            ReleaseKind::Delete | ReleaseKind::ForcedDelete => EventKind::Release,
            ReleaseKind::Expire => EventKind::Expire,
        };
        tx.release(&lease, event, purge, now, caller).await?;
        // The release is in the transaction and goes with the group's commit whatever memory
        // says: an allocator that disagrees is rebuilt from the database afterwards.
        let mirrored = match blocks_of(&pool, &lease) {
            Some((first, count)) => lock(ctx.allocator)
                .release(first, count, u64::try_from(now).unwrap_or(0), purge)
                .map_err(|e| e.to_string()),
            None => Err("it lies outside the pool".to_string()),
        };
        if let Err(error) = mirrored {
            tracing::error!(lease = %name, %error, "the allocator disagrees with the database about a released lease; rebuilding it from the database");
            ctx.resync = true;
        }
        return Ok(Ok(()));
    }
    if kind == ReleaseKind::Expire {
        // Released by someone else since the expiry pass looked.
        return Ok(Ok(()));
    }
    if purge {
        // Purging a lease released earlier: its range leaves quarantine now, if nobody took it.
        if let Some(old) = known.last_released
            && let Some((first, count)) = blocks_of(&pool, &old)
        {
            let purged = {
                let mut alloc = lock(ctx.allocator);
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
                    return Ok(Err(ServiceError::Internal {
                        what: format!("the allocator refused to purge lease {name}'s range"),
                        source: Some(Box::new(error)),
                    }));
                }
            }
            return Ok(Ok(()));
        }
    }
    Ok(Err(ServiceError::NotFound {
        what: format!("no active lease {name}"),
    }))
}

/// The first block index and block count of a lease.
fn blocks_of(pool: &Pool, lease: &LeaseRecord) -> Option<(u32, u32)> {
    let first = pool.block_of(lease.uid_base)?;
    Some((first, lease.size / pool.block()))
}

/// Rebuilds the in-memory allocator from the block rows.
pub(super) async fn rebuild(
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
