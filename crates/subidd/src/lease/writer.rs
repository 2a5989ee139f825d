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
//! With a fleet's store, other hosts allocate too. Every transaction holds the fleet's write
//! lock, and the first thing a group does under it is to read the block rows other hosts
//! changed since this host last looked (and their claims on the pool, when those changed), so
//! every decision is made against the fleet's state, as a single host's are against its own.
//!
//! The task runs on a thread of its own (see `spawn`): with the SQLite back end every statement
//! of a group then runs there without a hand-off to another thread.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use subid_core::{AllocError, Allocator, BlockState, Pool};
use subid_store::{
    BlockRow, Changes, EventKind, EventRecord, FleetClaim, LeaseRecord, NameState, NewLease,
    ProcessWriter, ReleaseRequest, StoreError, WriteTx, Writer,
};
use tokio::sync::{mpsc, oneshot};

use super::claims::Foreign;
use super::{Caller, CreateMode, Created, LeaseSpec, ReleaseKind, StartError, is_expired, lock};
use crate::clock::SharedClock;
use crate::service_error::ServiceError;

/// Most commands committed in one transaction.
pub(super) const MAX_BATCH: usize = 512;
/// Depth of the queue in front of the writer; senders wait when it is full.
pub(super) const QUEUE_DEPTH: usize = 4096;

pub(super) type Reply<T> = oneshot::Sender<Result<T, ServiceError>>;

/// What a release request came to.
#[derive(Debug, Clone)]
pub(super) enum Released {
    /// Released (or nothing to do: an expiry someone else did first, a purge of a range
    /// taken since).
    Done,
    /// Other hosts of the fleet have live processes of it: the release is recorded and waits
    /// for them to stop them.
    Pending {
        lease: Box<LeaseRecord>,
        hosts: Vec<String>,
    },
}

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
        reply: Reply<Released>,
    },
    /// This host has (`live`) or no longer has live processes of a lease. `true` is refused
    /// (answered `false`) for a lease that is not active or on its way out.
    Presence {
        lease_id: i64,
        live: bool,
        reply: Reply<bool>,
    },
    /// This host has cleaned up what it had of a lease; completes a waiting release when it
    /// was the last host with live processes.
    ClearPresence {
        lease_id: i64,
        reply: Reply<Option<LeaseRecord>>,
    },
    /// Completes a waiting release when no host has live processes of the lease any more.
    CompleteRelease {
        lease_id: i64,
        reply: Reply<Option<LeaseRecord>>,
    },
    /// Replaces this host's claims on the pool in the fleet's store.
    PublishClaims {
        claims: Vec<FleetClaim>,
        reply: Reply<()>,
    },
    /// Copies process events of this host's file into the fleet's feed.
    ForwardEvents {
        events: Vec<EventRecord>,
        reply: Reply<()>,
    },
    /// Reads what other hosts changed, outside any transaction.
    CatchUp { reply: Reply<()> },
    /// A health check: answered as soon as the writer has finished the group it was taken with.
    Ping { reply: oneshot::Sender<()> },
}

impl Command {
    /// Commands that take no part in a transaction.
    fn outside(&self) -> bool {
        matches!(self, Command::Ping { .. } | Command::CatchUp { .. })
    }
}

/// The answer a command is waiting for, decided before the commit and sent after it.
enum Outcome {
    Create(Reply<Created>, Result<Created, ServiceError>),
    Renew(Reply<LeaseRecord>, Result<LeaseRecord, ServiceError>),
    Release(Reply<Released>, Result<Released, ServiceError>),
    Flag(Reply<bool>, Result<bool, ServiceError>),
    Lease(
        Reply<Option<LeaseRecord>>,
        Result<Option<LeaseRecord>, ServiceError>,
    ),
    Unit(Reply<()>, Result<(), ServiceError>),
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
            Outcome::Flag(tx, r) => drop(tx.send(pick(failure, r))),
            Outcome::Lease(tx, r) => drop(tx.send(pick(failure, r))),
            Outcome::Unit(tx, r) => drop(tx.send(pick(failure, r))),
        }
    }

    /// The shell of an outcome for a command that was not decided (the group failed before
    /// it): only the group's failure is ever sent through it.
    fn undecided(command: Command) -> Option<Outcome> {
        fn e<T>() -> Result<T, ServiceError> {
            Err(ServiceError::internal(
                "the group failed before this command",
            ))
        }
        Some(match command {
            Command::Create { reply, .. } => Outcome::Create(reply, e()),
            Command::Renew { reply, .. } => Outcome::Renew(reply, e()),
            Command::Release { reply, .. } => Outcome::Release(reply, e()),
            Command::Presence { reply, .. } => Outcome::Flag(reply, e()),
            Command::ClearPresence { reply, .. } | Command::CompleteRelease { reply, .. } => {
                Outcome::Lease(reply, e())
            }
            Command::PublishClaims { reply, .. }
            | Command::ForwardEvents { reply, .. }
            | Command::CatchUp { reply } => Outcome::Unit(reply, e()),
            Command::Ping { .. } => return None,
        })
    }
}

/// What the writer keeps of a fleet's store.
pub(super) struct Fleet {
    /// This host's name in the fleet.
    pub(super) host: String,
    /// The newest change number of the block rows applied to the allocator.
    pub(super) seq: i64,
    /// The version of the fleet's claims applied.
    pub(super) claims_seq: i64,
    /// This host's own file, for its copies of the leases it changed and its process rows.
    pub(super) rows: Arc<ProcessWriter>,
    /// When the writer last read other hosts' changes.
    pub(super) caught_up: Option<std::time::Instant>,
}

/// A catch-up asked for within this long of the last one is skipped.
const CATCH_UP_SKIP: std::time::Duration = std::time::Duration::from_millis(100);

/// The task that owns the writer.
pub(super) struct WriterTask {
    pub(super) writer: Writer,
    pub(super) allocator: Arc<Mutex<Allocator>>,
    pub(super) foreign: Arc<Mutex<Foreign>>,
    pub(super) rx: mpsc::Receiver<Command>,
    pub(super) clock: SharedClock,
    /// Tells the event publisher that a commit may have added events.
    pub(super) published: Arc<tokio::sync::Notify>,
    /// Set with a fleet's store.
    pub(super) fleet: Option<Fleet>,
    /// Whether the store answered the last time it was used (for the log and metrics).
    pub(super) health: super::StoreHealth,
}

/// What deciding the commands of one group needs besides the transaction.
struct Decide<'a> {
    allocator: &'a Mutex<Allocator>,
    now: i64,
    /// This host's name in a fleet.
    host: Option<&'a str>,
    /// Set when a committed change could not be mirrored in the allocator: it is rebuilt from
    /// the database after the group.
    resync: bool,
    /// Leases this group changed, for this host's copies once committed (a fleet only).
    changed: Vec<LeaseRecord>,
    /// What the group's names were at its start, read in one step; a name is read again
    /// once a command of the group changed it.
    known: std::collections::HashMap<String, NameState>,
    /// Leases decided but not yet inserted, with the index of their outcome: inserted together
    /// (one statement with PostgreSQL) before any other kind of command and before the commit.
    pending: Vec<(usize, NewLease)>,
}

impl Decide<'_> {
    /// Whether `command` must see the pending inserts first.
    fn must_flush(&self, command: &Command) -> bool {
        match command {
            Command::Create { name, .. } => self.pending.iter().any(|(_, n)| &n.name == name),
            _ => !self.pending.is_empty(),
        }
    }

    /// Inserts the pending leases and fills their ids into the outcomes.
    async fn flush(
        &mut self,
        tx: &mut WriteTx<'_>,
        outcomes: &mut [Outcome],
    ) -> Result<(), StoreError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let block = lock(self.allocator).pool().block();
        let (slots, news): (Vec<usize>, Vec<NewLease>) =
            std::mem::take(&mut self.pending).into_iter().unzip();
        let records = tx.insert_leases(&news, block).await?;
        for (slot, record) in slots.into_iter().zip(records) {
            if let Some(Outcome::Create(_, Ok(created))) = outcomes.get_mut(slot) {
                created.lease = record.clone();
            }
            self.changed.push(record);
        }
        Ok(())
    }
}

impl Decide<'_> {
    /// The name's state: from the group's first read, or read now.
    async fn name_state(
        &mut self,
        tx: &mut WriteTx<'_>,
        name: &str,
    ) -> Result<NameState, StoreError> {
        match self.known.remove(name) {
            Some(state) => Ok(state),
            None => tx.name_state(name).await,
        }
    }
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
        if self.fleet.is_some() {
            // The session opened at start belongs to the daemon's runtime, whose threads would
            // then relay every answer of the server to this one: one more thread wake-up per
            // round trip. A session of this thread's own is made at the first write.
            let _ = self.writer.reopen().await;
        }
        let mut batch = Vec::with_capacity(MAX_BATCH);
        while self.rx.recv_many(&mut batch, MAX_BATCH).await > 0 {
            // Pings and catch-ups take no part in the transaction; catch-ups run first (the
            // group reads the changes again under the lock anyway), pings are answered after
            // the group's commit.
            let outside: Vec<Command> = batch.extract_if(.., |c| c.outside()).collect();
            let mut pings = Vec::new();
            for command in outside {
                match command {
                    Command::CatchUp { reply } => {
                        let result = self.catch_up().await;
                        let _ = reply.send(result);
                    }
                    Command::Ping { reply } => pings.push(reply),
                    _ => {}
                }
            }
            if !batch.is_empty() {
                self.commit_group(&mut batch).await;
            }
            for ping in pings {
                let _ = ping.send(());
            }
        }
    }

    /// Applies what other hosts changed, read outside a transaction.
    async fn catch_up(&mut self) -> Result<(), ServiceError> {
        let Some(fleet) = &self.fleet else {
            return Ok(());
        };
        // Every group catches up under the lock: while groups come often, this one is not
        // needed.
        if fleet
            .caught_up
            .is_some_and(|at| at.elapsed() < CATCH_UP_SKIP)
        {
            return Ok(());
        }
        let (seq, claims_seq) = (fleet.seq, fleet.claims_seq);
        match self.writer.changes_since(seq, claims_seq).await {
            Ok(changes) => {
                self.health.ok();
                if let Some(fleet) = &mut self.fleet {
                    fleet.caught_up = Some(std::time::Instant::now());
                }
                if self.apply(changes) {
                    self.resync().await;
                }
                Ok(())
            }
            Err(error) => {
                self.health.failed(&error);
                self.writer.reopen().await.ok();
                Err(ServiceError::store(error))
            }
        }
    }

    /// Applies other hosts' changes to the allocator and the claims, and moves the watermark;
    /// true when the allocator disagreed and must be rebuilt.
    fn apply(&mut self, changes: Changes) -> bool {
        let Some(fleet) = &mut self.fleet else {
            return false;
        };
        let resync = apply_changes(&self.allocator, &self.foreign, Some(&fleet.host), &changes);
        fleet.seq = changes.seq;
        fleet.claims_seq = changes.claims_seq;
        resync
    }

    /// Decides, commits and answers one group of commands.
    async fn commit_group(&mut self, batch: &mut Vec<Command>) {
        let started = std::time::Instant::now();
        let commands = batch.len();
        let host = self.fleet.as_ref().map(|f| f.host.clone());
        let mut ctx = Decide {
            allocator: &self.allocator,
            now: self.clock.now_ms(),
            host: host.as_deref(),
            resync: false,
            changed: Vec::new(),
            known: std::collections::HashMap::new(),
            pending: Vec::new(),
        };
        let names: Vec<String> = {
            let mut names: Vec<String> = batch
                .iter()
                .filter_map(|c| match c {
                    Command::Create { name, .. }
                    | Command::Renew { name, .. }
                    | Command::Release { name, .. } => Some(name.clone()),
                    _ => None,
                })
                .collect();
            names.sort();
            names.dedup();
            names
        };
        let mut outcomes = Vec::with_capacity(batch.len());
        let watermark = self.fleet.as_ref().map(|f| (f.seq, f.claims_seq));
        let mut changes = None;
        let mut committed_at = None;
        let failure = match self.writer.begin_group(&names, watermark).await {
            Err(error) => Some(error),
            Ok((mut tx, found, known)) => {
                let mut failure = None;
                // Under the fleet's lock: what other hosts did first.
                if let Some(found) = &found {
                    // Applied before deciding; a rollback rebuilds the allocator anyway.
                    ctx.resync |=
                        apply_changes(&self.allocator, &self.foreign, host.as_deref(), found);
                }
                changes = found;
                ctx.known = known;
                for command in batch.drain(..) {
                    if ctx.must_flush(&command)
                        && let Err(error) = ctx.flush(&mut tx, &mut outcomes).await
                    {
                        failure = Some(error);
                        // The command was not decided: it gets the group's failure.
                        if let Some(outcome) = Outcome::undecided(command) {
                            outcomes.push(outcome);
                        }
                        break;
                    }
                    let slot = outcomes.len();
                    match decide(&mut tx, &mut ctx, command, slot).await {
                        Ok(outcome) => outcomes.push(outcome),
                        Err((outcome, error)) => {
                            outcomes.push(outcome);
                            failure = Some(error);
                            break;
                        }
                    }
                }
                if failure.is_none()
                    && let Err(error) = ctx.flush(&mut tx, &mut outcomes).await
                {
                    failure = Some(error);
                }
                match failure {
                    Some(error) => Some(error),
                    None => match tx.commit_seq().await {
                        Ok(at) => {
                            committed_at = at;
                            None
                        }
                        Err(error) => Some(error),
                    },
                }
            }
        };
        // Commands not reached because an earlier one failed get the same failure.
        let unreached: Vec<Command> = std::mem::take(batch);
        let failure = failure.map(Arc::new);
        let resync = ctx.resync;
        let changed = std::mem::take(&mut ctx.changed);
        match &failure {
            Some(error) => {
                self.health.failed(error);
                tracing::error!(%error, "lease store write failed; group rolled back");
                if let Err(e) = self.writer.reopen().await {
                    tracing::error!(error = %e, "cannot reopen the lease store after a failed write");
                }
            }
            None => {
                self.health.ok();
                if let (Some(fleet), Some(found)) = (&mut self.fleet, changes) {
                    // Every block row up to the commit's change number was read under the
                    // lock or written by this group, whose decisions the allocator holds.
                    fleet.seq = found.seq.max(committed_at.unwrap_or(0));
                    fleet.claims_seq = found.claims_seq;
                    fleet.caught_up = Some(std::time::Instant::now());
                }
            }
        }
        if failure.is_some() || resync {
            self.resync().await;
        }
        for outcome in outcomes {
            outcome.send(failure.as_ref());
        }
        for command in unreached {
            if let Some(outcome) = Outcome::undecided(command) {
                outcome.send(failure.as_ref());
            }
        }
        let answered = started.elapsed();
        if failure.is_none() {
            self.keep_copies(&changed);
        }
        tracing::debug!(
            commands,
            answered_us = answered.as_micros() as u64,
            done_us = started.elapsed().as_micros() as u64,
            "group"
        );
        // Events are published by a task of their own: reading the new rows back is one more
        // round trip, which neither this client nor the next should wait for. Streams may see
        // an event a moment after its request was answered; none is missed.
        self.published.notify_one();
    }

    /// With a fleet's store: this host's copies of the leases the group changed, and the
    /// process rows of those it released, after the answers are sent (this thread may wait).
    fn keep_copies(&self, changed: &[LeaseRecord]) {
        let Some(fleet) = &self.fleet else {
            return;
        };
        let now = self.clock.now_ms();
        for lease in changed {
            if lease.state == subid_core::LeaseState::Released
                && let Err(error) = fleet.rows.delete_processes(lease.id)
            {
                tracing::warn!(lease = %lease.name, %error, "cannot remove the process rows of a released lease");
            }
        }
        if let Err(error) = fleet.rows.mirror_all(changed, now) {
            tracing::warn!(%error, "cannot keep this host's copies of the leases a group changed");
        }
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

/// [`WriterTask::apply`] for a group, whose changes are kept only if it commits.
fn apply_changes(
    allocator: &Mutex<Allocator>,
    foreign: &Mutex<Foreign>,
    host: Option<&str>,
    changes: &Changes,
) -> bool {
    let mut resync = false;
    let mut allocator = lock(allocator);
    let pool = *allocator.pool();
    for row in &changes.blocks {
        if let Err(error) = apply_block(&mut allocator, &pool, row) {
            tracing::warn!(start = row.start, %error, "a block another host changed does not fit this host's allocator; rebuilding it");
            resync = true;
        }
    }
    if let Some(claims) = &changes.claims {
        let mut foreign = lock(foreign);
        foreign.fleet = claims
            .iter()
            .filter(|c| Some(c.host.as_str()) != host)
            .cloned()
            .collect();
        allocator.set_foreign(&foreign.blocks());
    }
    resync
}

/// Brings one block of the allocator to what its row says (applying a row twice changes
/// nothing). A block withheld here for a claim is let go for the change and withheld again.
fn apply_block(allocator: &mut Allocator, pool: &Pool, row: &BlockRow) -> Result<(), AllocError> {
    let Some(idx) = pool.block_of(row.start) else {
        // Outside this host's pool: the start-up check refuses a pool that differs.
        return Ok(());
    };
    let state = allocator.block_state(idx);
    let withheld = matches!(state, Some(BlockState::Withheld));
    let kept = withheld.then(|| allocator.foreign().clone());
    if let Some(foreign) = &kept {
        let mut without = foreign.clone();
        without.remove(&idx);
        allocator.set_foreign(&without);
    }
    let state = allocator.block_state(idx);
    let result = match (row.lease_id, row.released_at, state) {
        (Some(_), _, Some(BlockState::Active)) => Ok(()),
        (Some(_), _, _) => allocator.claim(idx, 1),
        (None, Some(at), Some(BlockState::Active)) => {
            allocator.release(idx, 1, u64::try_from(at).unwrap_or(0), at == 0)
        }
        (None, Some(0), Some(BlockState::Released(_))) => allocator.purge(idx, 1),
        (None, Some(at), _) => allocator.mark_released(idx, 1, u64::try_from(at).unwrap_or(0)),
        (None, None, _) => Ok(()),
    };
    if let Some(foreign) = &kept {
        allocator.set_foreign(foreign);
    }
    result
}

/// Decides one command inside the group's transaction. `Err` means the store failed and the
/// whole group must be rolled back; the outcome is still returned so its sender gets the error.
async fn decide(
    tx: &mut WriteTx<'_>,
    ctx: &mut Decide<'_>,
    command: Command,
    slot: usize,
) -> Result<Outcome, (Outcome, StoreError)> {
    macro_rules! answer {
        ($result:expr, $reply:expr, $wrap:path) => {
            match $result {
                Ok(r) => Ok($wrap($reply, r)),
                Err(e) => Err(($wrap($reply, Err(ServiceError::internal("rolled back"))), e)),
            }
        };
    }
    match command {
        Command::Create {
            name,
            spec,
            mode,
            caller,
            reply,
        } => answer!(
            create(tx, ctx, &name, &spec, mode, caller, slot).await,
            reply,
            Outcome::Create
        ),
        Command::Renew {
            name,
            caller,
            reply,
        } => answer!(renew(tx, ctx, &name, caller).await, reply, Outcome::Renew),
        Command::Release {
            name,
            purge,
            caller,
            kind,
            reply,
        } => answer!(
            release(tx, ctx, &name, purge, caller, kind).await,
            reply,
            Outcome::Release
        ),
        Command::Presence {
            lease_id,
            live,
            reply,
        } => answer!(
            tx.set_presence(lease_id, live, ctx.now).await.map(Ok),
            reply,
            Outcome::Flag
        ),
        Command::ClearPresence { lease_id, reply } => {
            let result = match tx.clear_presence(lease_id).await {
                Ok(()) => complete(tx, ctx, lease_id).await,
                Err(e) => Err(e),
            };
            answer!(result.map(Ok), reply, Outcome::Lease)
        }
        Command::CompleteRelease { lease_id, reply } => answer!(
            complete(tx, ctx, lease_id).await.map(Ok),
            reply,
            Outcome::Lease
        ),
        Command::PublishClaims { claims, reply } => answer!(
            tx.publish_claims(&claims, ctx.now).await.map(Ok),
            reply,
            Outcome::Unit
        ),
        Command::ForwardEvents { events, reply } => answer!(
            tx.forward_events(&events).await.map(Ok),
            reply,
            Outcome::Unit
        ),
        // `run` takes these out of the group.
        Command::CatchUp { reply } => Ok(Outcome::Unit(reply, Ok(()))),
        Command::Ping { reply } => {
            let _ = reply.send(());
            Ok(Outcome::Unit(oneshot::channel().0, Ok(())))
        }
    }
}

/// The settings a spec resolves to with defaults filled in.
fn resolve(spec: &LeaseSpec, pool: &Pool) -> (u32, Option<u32>) {
    (spec.size.unwrap_or(pool.block()), spec.ttl_seconds)
}

/// The refusal for a lease whose release waits for other hosts.
fn on_its_way_out(name: &str) -> ServiceError {
    ServiceError::Conflict {
        reason: format!(
            "lease {name} is being released (hosts are stopping its processes); retry in a moment"
        ),
    }
}

async fn create(
    tx: &mut WriteTx<'_>,
    ctx: &mut Decide<'_>,
    name: &str,
    spec: &LeaseSpec,
    mode: CreateMode,
    caller: Caller,
    slot: usize,
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
    let known = ctx.name_state(tx, name).await?;
    if let Some(existing) = known.active {
        if is_expired(&existing, now) {
            return Ok(Err(ServiceError::Conflict {
                reason: format!("lease {name} expired and is being released; retry in a moment"),
            }));
        }
        if existing.release_requested_at.is_some() {
            return Ok(Err(on_its_way_out(name)));
        }
        if mode == CreateMode::New {
            return Ok(Err(ServiceError::Exists {
                lease: name.to_string(),
            }));
        }
        let same = existing.size == size
            && existing.labels == spec.labels
            && existing.ttl_seconds == ttl_seconds
            && existing.rlimits == spec.stored_rlimits()
            && existing.namespaces == spec.stored_namespaces()
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
        rlimits: spec.stored_rlimits(),
        namespaces: spec.stored_namespaces(),
        pids_max: spec.pids_max,
        max_processes: spec.max_processes,
    };
    // Inserted with the group's other new leases (see `Decide::flush`), which fills in the id.
    let lease = new.clone().into_record(0);
    ctx.pending.push((slot, new));
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
    let Some(mut lease) = ctx.name_state(tx, name).await?.active else {
        return Ok(Err(ServiceError::NotFound {
            what: format!("no active lease {name}"),
        }));
    };
    if is_expired(&lease, now) {
        return Ok(Err(ServiceError::NotFound {
            what: format!("lease {name} expired and is being released; create it again"),
        }));
    }
    if lease.release_requested_at.is_some() {
        return Ok(Err(on_its_way_out(name)));
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
    ctx.changed.push(lease.clone());
    Ok(Ok(lease))
}

async fn release(
    tx: &mut WriteTx<'_>,
    ctx: &mut Decide<'_>,
    name: &str,
    purge: bool,
    caller: Caller,
    kind: ReleaseKind,
) -> Result<Result<Released, ServiceError>, StoreError> {
    let now = ctx.now;
    let pool = *lock(ctx.allocator).pool();
    let known = ctx.name_state(tx, name).await?;
    if let Some(lease) = known.active {
        if kind == ReleaseKind::Expire && !is_expired(&lease, now) {
            // Renewed since the expiry pass looked: nothing to do.
            return Ok(Ok(Released::Done));
        }
        let event = match kind {
            ReleaseKind::Delete | ReleaseKind::ForcedDelete => EventKind::Release,
            ReleaseKind::Expire => EventKind::Expire,
        };
        // The caller has stopped this host's processes; other hosts' live ones stand in the
        // way (a fleet only).
        let others: Vec<String> = tx
            .lease_hosts(lease.id)
            .await?
            .into_iter()
            .filter(|h| h.live && Some(h.host.as_str()) != ctx.host)
            .map(|h| h.host)
            .collect();
        tx.clear_presence(lease.id).await?;
        if !others.is_empty() {
            if kind == ReleaseKind::Delete && lease.release_requested_at.is_none() {
                return Ok(Err(ServiceError::Busy {
                    reason: format!(
                        "lease {name} has live processes on host(s) {}; stop them or delete \
                         with ?force=true",
                        others.join(", ")
                    ),
                    hosts: others,
                }));
            }
            let request = ReleaseRequest {
                at: now,
                kind: event,
                purge,
                caller,
            };
            tx.request_release(&lease, &request).await?;
            return Ok(Ok(Released::Pending {
                lease: Box::new(lease),
                hosts: others,
            }));
        }
        tx.release(&lease, event, purge, now, caller).await?;
        mirror_release(ctx, &pool, &lease, purge);
        return Ok(Ok(Released::Done));
    }
    if kind == ReleaseKind::Expire {
        // Released by someone else since the expiry pass looked.
        return Ok(Ok(Released::Done));
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
            return Ok(Ok(Released::Done));
        }
    }
    Ok(Err(ServiceError::NotFound {
        what: format!("no active lease {name}"),
    }))
}

/// Completes the waiting release of a lease when no host has live processes of it any more.
async fn complete(
    tx: &mut WriteTx<'_>,
    ctx: &mut Decide<'_>,
    lease_id: i64,
) -> Result<Option<LeaseRecord>, StoreError> {
    let Some(request) = tx.release_request(lease_id).await? else {
        return Ok(None);
    };
    if tx.lease_hosts(lease_id).await?.iter().any(|h| h.live) {
        return Ok(None);
    }
    let Some(lease) = tx.lease_by_id(lease_id).await? else {
        return Ok(None);
    };
    let pool = *lock(ctx.allocator).pool();
    tx.release(&lease, request.kind, request.purge, ctx.now, request.caller)
        .await?;
    mirror_release(ctx, &pool, &lease, request.purge);
    tracing::info!(lease = %lease.name, "every host stopped the lease's processes; released");
    Ok(Some(lease))
}

/// Mirrors a release in the allocator (and this host's copies). The release is in the
/// transaction and goes with the group's commit whatever memory says: an allocator that
/// disagrees is rebuilt from the database afterwards.
fn mirror_release(ctx: &mut Decide<'_>, pool: &Pool, lease: &LeaseRecord, purge: bool) {
    let mirrored = match blocks_of(pool, lease) {
        Some((first, count)) => lock(ctx.allocator)
            .release(first, count, u64::try_from(ctx.now).unwrap_or(0), purge)
            .map_err(|e| e.to_string()),
        None => Err("it lies outside the pool".to_string()),
    };
    if let Err(error) = mirrored {
        tracing::error!(lease = %lease.name, %error, "the allocator disagrees with the database about a released lease; rebuilding it from the database");
        ctx.resync = true;
    }
    ctx.changed.push(LeaseRecord {
        state: subid_core::LeaseState::Released,
        released_at: Some(ctx.now),
        release_requested_at: None,
        ..lease.clone()
    });
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

/// Blocks a set of claims touches, at most `limit` of them.
pub(super) fn claim_blocks(claims: &[FleetClaim], limit: u64) -> BTreeSet<u32> {
    let mut blocks = BTreeSet::new();
    let mut tracked = 0u64;
    for claim in claims {
        tracked = tracked.saturating_add(u64::from(claim.count));
        if tracked > limit {
            break;
        }
        blocks.extend(claim.first..claim.first.saturating_add(claim.count));
    }
    blocks
}
