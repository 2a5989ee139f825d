//! The durable store of leases, blocks, the pool, quarantine and history, behind one interface
//! with two back ends: an SQLite file on the host (the default) and, for a fleet of hosts,
//! PostgreSQL. Host-local state (process rows and their events) always lives in the host's
//! SQLite file.
//!
//! This is the only crate that speaks SQL. The daemon sees three handles:
//! - [`Store`], reads anyone may clone: leases from the lease store, processes from the file;
//! - [`Writer`], the one connection that writes leases, in transactions ([`WriteTx`]) whose
//!   methods are the same whatever the back end;
//! - [`ProcessWriter`], which writes process rows on the caller's thread.
//!
//! Nothing above this crate sees a query, a row or a driver's error type.

#![forbid(unsafe_code)]

mod error;
mod pg;
mod process_writer;
mod record;
mod sqlite;

use std::path::Path;

use subid_core::LeaseState;

pub use error::{BackendError, Kind, StoreError};
pub use pg::{CHANNEL, PgConfig};
pub use process_writer::ProcessWriter;
pub use record::{
    BlockRow, EventKind, EventRecord, LeaseRecord, NewLease, ProcessRecord, ProcessState,
};

/// Which back end holds the leases.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// The host's own SQLite file.
    Sqlite,
    /// A PostgreSQL database a fleet of hosts shares.
    Postgres,
}

impl Backend {
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Sqlite => "sqlite",
            Backend::Postgres => "postgresql",
        }
    }
}

/// The pool a store was cut for. SQLite records the block size only (a host may move its pool
/// as long as every active lease stays inside); a shared store records all three, since every
/// host of a fleet must hand out the same pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolMeta {
    pub base: u32,
    pub size: u32,
    pub block: u32,
}

/// Which leases a list asks for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LeaseFilter {
    /// Only this state; every state when `None`.
    pub state: Option<LeaseState>,
    /// Every one of these labels, exactly.
    pub labels: Vec<(String, String)>,
}

/// What a write transaction knows about a name: its active lease and its last released one.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NameState {
    pub active: Option<LeaseRecord>,
    pub last_released: Option<LeaseRecord>,
}

/// Opens (creating when absent) the SQLite database at `path`, applies migrations, and returns the
/// reads and the writer. An existing file that is not a subidd database, is corrupt, or cannot be
/// written is refused with an error naming the file; it is never recreated.
pub async fn open(path: &Path) -> Result<(Store, Writer), StoreError> {
    let (local, writer) = sqlite::open(path).await?;
    Ok((
        Store {
            local,
            leases: Leases::Sqlite,
        },
        Writer {
            inner: WriterInner::Sqlite(writer),
        },
    ))
}

/// Opens the host's SQLite file at `path` (for process rows) and the fleet's PostgreSQL store
/// (for leases), applying the migrations of each.
pub async fn open_fleet(path: &Path, config: &PgConfig) -> Result<(Store, Writer), StoreError> {
    let (local, _) = sqlite::open(path).await?;
    let (reader, writer) = pg::open(config).await?;
    Ok((
        Store {
            local,
            leases: Leases::Postgres(reader),
        },
        Writer {
            inner: WriterInner::Postgres(writer),
        },
    ))
}

/// Read access to the store; cheap to clone.
#[derive(Clone, Debug)]
pub struct Store {
    /// The host's own file: process rows always; leases too with the SQLite back end.
    local: sqlite::SqliteReader,
    leases: Leases,
}

#[derive(Clone, Debug)]
enum Leases {
    Sqlite,
    Postgres(pg::PgReader),
}

impl Store {
    /// The host's SQLite file.
    pub fn path(&self) -> &Path {
        self.local.path()
    }

    /// Which back end holds the leases.
    pub fn backend(&self) -> Backend {
        match self.leases {
            Leases::Sqlite => Backend::Sqlite,
            Leases::Postgres(_) => Backend::Postgres,
        }
    }

    /// The active lease of that name, else its most recently released one.
    pub async fn get_lease(&self, name: &str) -> Result<Option<LeaseRecord>, StoreError> {
        match &self.leases {
            Leases::Sqlite => self.local.get_lease(name).await,
            Leases::Postgres(pg) => pg.get_lease(name).await,
        }
    }

    /// The lease with this id, in any state.
    pub async fn get_lease_by_id(&self, id: i64) -> Result<Option<LeaseRecord>, StoreError> {
        match &self.leases {
            Leases::Sqlite => self.local.get_lease_by_id(id).await,
            Leases::Postgres(pg) => pg.get_lease_by_id(id).await,
        }
    }

    /// Leases in `state` (all states when `None`) carrying every label of `labels`, by name.
    /// Every matching lease at once: prefer [`Store::list_leases_page`] where there may be many.
    pub async fn list_leases(
        &self,
        state: Option<LeaseState>,
        labels: &[(String, String)],
    ) -> Result<Vec<LeaseRecord>, StoreError> {
        let filter = LeaseFilter {
            state,
            labels: labels.to_vec(),
        };
        let mut all = Vec::new();
        let mut after: Option<(String, i64)> = None;
        loop {
            let page = self
                .list_leases_page(&filter, after.as_ref().map(|(n, i)| (n.as_str(), *i)), 1000)
                .await?;
            let done = page.len() < 1000;
            after = page.last().map(|l| (l.name.clone(), l.id));
            all.extend(page);
            if done {
                return Ok(all);
            }
        }
    }

    /// Up to `limit` leases matching `filter` that come after `after` (a name and id) in the
    /// order of name, then id: one page of a list that may be long.
    pub async fn list_leases_page(
        &self,
        filter: &LeaseFilter,
        after: Option<(&str, i64)>,
        limit: u32,
    ) -> Result<Vec<LeaseRecord>, StoreError> {
        match &self.leases {
            Leases::Sqlite => self.local.list_leases_page(filter, after, limit).await,
            Leases::Postgres(pg) => pg.list_leases_page(filter, after, limit).await,
        }
    }

    /// The names of the active leases, in order.
    pub async fn active_names(&self) -> Result<Vec<String>, StoreError> {
        match &self.leases {
            Leases::Sqlite => self.local.active_names().await,
            Leases::Postgres(pg) => pg.active_names().await,
        }
    }

    /// The names that had a lease with a cgroup cap (`pids_max`) and have no active lease now:
    /// their cgroups should be gone.
    pub async fn stale_capped_names(&self) -> Result<Vec<String>, StoreError> {
        match &self.leases {
            Leases::Sqlite => self.local.stale_capped_names().await,
            Leases::Postgres(pg) => pg.stale_capped_names().await,
        }
    }

    /// The active lease holding the block that starts at `block_start`.
    pub async fn lease_holding(&self, block_start: u32) -> Result<Option<LeaseRecord>, StoreError> {
        match &self.leases {
            Leases::Sqlite => self.local.lease_holding(block_start).await,
            Leases::Postgres(pg) => pg.lease_holding(block_start).await,
        }
    }

    /// Active leases whose `expires_at` is at or before `now_ms`.
    pub async fn expired_leases(&self, now_ms: i64) -> Result<Vec<LeaseRecord>, StoreError> {
        match &self.leases {
            Leases::Sqlite => self.local.expired_leases(now_ms).await,
            Leases::Postgres(pg) => pg.expired_leases(now_ms).await,
        }
    }

    /// The history of every lease that carried this name, oldest first.
    pub async fn events(&self, name: &str) -> Result<Vec<EventRecord>, StoreError> {
        match &self.leases {
            Leases::Sqlite => self.local.events(name).await,
            Leases::Postgres(pg) => pg.events(name).await,
        }
    }

    /// Up to `limit` events of every kind (processes too) with an id above `after`, in id order:
    /// the backlog of the event feed.
    pub async fn events_after(
        &self,
        after: i64,
        limit: u32,
    ) -> Result<Vec<EventRecord>, StoreError> {
        match &self.leases {
            Leases::Sqlite => self.local.events_after(after, limit).await,
            Leases::Postgres(pg) => pg.events_after(after, limit).await,
        }
    }

    /// The newest committed event id (0 when there is none).
    pub async fn last_event_id(&self) -> Result<i64, StoreError> {
        match &self.leases {
            Leases::Sqlite => self.local.last_event_id().await,
            Leases::Postgres(pg) => pg.last_event_id().await,
        }
    }

    /// How many leases are active.
    pub async fn active_lease_count(&self) -> Result<u64, StoreError> {
        match &self.leases {
            Leases::Sqlite => self.local.active_lease_count().await,
            Leases::Postgres(pg) => pg.active_lease_count().await,
        }
    }

    /// One process by id (this host's).
    pub async fn get_process(&self, id: &str) -> Result<Option<ProcessRecord>, StoreError> {
        self.local.get_process(id).await
    }

    /// This host's processes of a lease (by its id), oldest first.
    pub async fn lease_processes(&self, lease_id: i64) -> Result<Vec<ProcessRecord>, StoreError> {
        self.local.lease_processes(lease_id).await
    }

    /// The id of every process this host recorded (their log files are kept; any other goes
    /// at start).
    pub async fn process_ids(&self) -> Result<Vec<String>, StoreError> {
        self.local.process_ids().await
    }

    /// Every process of this host recorded as running, for reconciling with the kernel at start.
    pub async fn running_processes(&self) -> Result<Vec<ProcessRecord>, StoreError> {
        self.local.running_processes().await
    }
}

/// The single writing connection of the lease store. Owned by one task; see [`Writer::begin`].
#[derive(Debug)]
pub struct Writer {
    inner: WriterInner,
}

#[derive(Debug)]
enum WriterInner {
    Sqlite(sqlite::SqliteWriter),
    Postgres(pg::PgWriter),
}

impl Writer {
    /// Which back end this writer writes.
    pub fn backend(&self) -> Backend {
        match &self.inner {
            WriterInner::Sqlite(_) => Backend::Sqlite,
            WriterInner::Postgres(_) => Backend::Postgres,
        }
    }

    /// Replaces the writing connection with a fresh one; closing the old one rolls back whatever
    /// it still had open.
    ///
    /// Needed after a failed `COMMIT`: SQLite may have rolled the transaction back by itself
    /// (SQLITE_FULL, SQLITE_IOERR), so the explicit rollback fails and the connection believes
    /// it is still inside a transaction; every later `BEGIN` would then fail, even once the
    /// disk has room again.
    pub async fn reopen(&mut self) -> Result<(), StoreError> {
        match &mut self.inner {
            WriterInner::Sqlite(w) => w.reopen(),
            WriterInner::Postgres(w) => {
                w.reopen();
                Ok(())
            }
        }
    }

    /// Every block row, for rebuilding the in-memory allocator.
    pub async fn block_rows(&mut self) -> Result<Vec<BlockRow>, StoreError> {
        match &mut self.inner {
            WriterInner::Sqlite(w) => w.block_rows(),
            WriterInner::Postgres(w) => w.block_rows().await,
        }
    }

    /// The newest event id (0 when there is none): where the live feed starts.
    pub async fn last_event_id(&mut self) -> Result<i64, StoreError> {
        match &mut self.inner {
            WriterInner::Sqlite(w) => w.last_event_id(),
            WriterInner::Postgres(w) => w.last_event_id().await,
        }
    }

    /// An active lease that does not lie on whole blocks of the pool `base..end` cut in blocks
    /// of `block`, if there is one (checked at start: a changed pool must keep every lease).
    pub async fn first_active_outside(
        &mut self,
        base: u32,
        end: u64,
        block: u32,
    ) -> Result<Option<LeaseRecord>, StoreError> {
        match &mut self.inner {
            WriterInner::Sqlite(w) => w.first_active_outside(base, end, block),
            WriterInner::Postgres(w) => w.first_active_outside(base, end, block).await,
        }
    }

    /// The pool the store was cut for, recording `pool` when it has none yet. SQLite keeps the
    /// block size only: the result has the stored block and the given base and size.
    pub async fn settle_pool(&mut self, pool: PoolMeta) -> Result<PoolMeta, StoreError> {
        match &mut self.inner {
            WriterInner::Sqlite(w) => w.settle_pool(pool),
            WriterInner::Postgres(w) => w.settle_pool(pool).await,
        }
    }

    /// The block size the database was cut with, if it has any blocks; records `block` otherwise.
    pub async fn settle_block_size(&mut self, block: u32) -> Result<u32, StoreError> {
        let meta = PoolMeta {
            base: 0,
            size: 0,
            block,
        };
        Ok(self.settle_pool(meta).await?.block)
    }

    /// Starts a write transaction that holds the store's write lock from its start (SQLite:
    /// `BEGIN IMMEDIATE`) and whose commit is durable.
    pub async fn begin(&mut self) -> Result<WriteTx<'_>, StoreError> {
        match &mut self.inner {
            WriterInner::Sqlite(w) => Ok(WriteTx {
                inner: TxInner::Sqlite(w.begin()?),
            }),
            WriterInner::Postgres(w) => Ok(WriteTx {
                inner: TxInner::Postgres(w.begin().await?),
            }),
        }
    }
}

/// One write transaction. Dropping it without [`WriteTx::commit`] rolls everything back.
pub struct WriteTx<'c> {
    inner: TxInner<'c>,
}

enum TxInner<'c> {
    Sqlite(sqlite::SqliteTx<'c>),
    Postgres(pg::PgTx<'c>),
}

impl WriteTx<'_> {
    /// The active and the last released lease of that name, in one step.
    pub async fn name_state(&mut self, name: &str) -> Result<NameState, StoreError> {
        match &mut self.inner {
            TxInner::Sqlite(tx) => tx.name_state(name),
            TxInner::Postgres(tx) => tx.name_state(name).await,
        }
    }

    /// The active lease of that name.
    pub async fn active_lease(&mut self, name: &str) -> Result<Option<LeaseRecord>, StoreError> {
        match &mut self.inner {
            TxInner::Sqlite(tx) => tx.active_lease(name),
            TxInner::Postgres(tx) => tx.active_lease(name).await,
        }
    }

    /// The most recently released lease of that name (for sticky ranges).
    pub async fn last_released(&mut self, name: &str) -> Result<Option<LeaseRecord>, StoreError> {
        match &mut self.inner {
            TxInner::Sqlite(tx) => tx.last_released(name),
            TxInner::Postgres(tx) => tx.last_released(name).await,
        }
    }

    /// Whether a lease other than `old` was created on an id of `old`'s range at or after
    /// `since_ms` (then `old`'s name may not have its range back: see the sticky rule).
    pub async fn range_held_since(
        &mut self,
        old: &LeaseRecord,
        since_ms: i64,
    ) -> Result<bool, StoreError> {
        match &mut self.inner {
            TxInner::Sqlite(tx) => tx.range_held_since(old, since_ms),
            TxInner::Postgres(tx) => tx.range_held_since(old, since_ms).await,
        }
    }

    /// Active leases whose `expires_at` is at or before `now_ms`.
    pub async fn expired(&mut self, now_ms: i64) -> Result<Vec<LeaseRecord>, StoreError> {
        match &mut self.inner {
            TxInner::Sqlite(tx) => tx.expired(now_ms),
            TxInner::Postgres(tx) => tx.expired(now_ms).await,
        }
    }

    /// Inserts an active lease, takes its blocks (one row each, `block` ids apart) and records a
    /// `create` event. Fails with [`StoreError::BlockHeld`] if any block already has a holder:
    /// the schema refuses a second holder even if the caller's bookkeeping were wrong.
    pub async fn insert_lease(
        &mut self,
        new: &NewLease,
        block: u32,
    ) -> Result<LeaseRecord, StoreError> {
        match &mut self.inner {
            TxInner::Sqlite(tx) => tx.insert_lease(new, block),
            TxInner::Postgres(tx) => tx.insert_lease(new, block).await,
        }
    }

    /// Sets a new expiry on an active lease and records a `renew` event.
    pub async fn renew(
        &mut self,
        lease: &LeaseRecord,
        expires_at: i64,
        now_ms: i64,
        caller: Option<u32>,
    ) -> Result<(), StoreError> {
        match &mut self.inner {
            TxInner::Sqlite(tx) => tx.renew(lease, expires_at, now_ms, caller),
            TxInner::Postgres(tx) => tx.renew(lease, expires_at, now_ms, caller).await,
        }
    }

    /// Releases an active lease: its blocks become free with `released_at = now_ms` (quarantine
    /// starts), or `0` when `purge` (reusable at once). Records `release` or `expire`, and
    /// `purge`. The lease's process rows go with it.
    pub async fn release(
        &mut self,
        lease: &LeaseRecord,
        kind: EventKind,
        purge: bool,
        now_ms: i64,
        caller: Option<u32>,
    ) -> Result<(), StoreError> {
        match &mut self.inner {
            TxInner::Sqlite(tx) => tx.release(lease, kind, purge, now_ms, caller),
            TxInner::Postgres(tx) => tx.release(lease, kind, purge, now_ms, caller).await,
        }
    }

    /// Makes the quarantined blocks of a released lease reusable at once (`released_at = 0`) and
    /// records a `purge` event. Blocks another lease holds by now are left alone.
    pub async fn purge_released(
        &mut self,
        lease: &LeaseRecord,
        now_ms: i64,
        caller: Option<u32>,
    ) -> Result<(), StoreError> {
        match &mut self.inner {
            TxInner::Sqlite(tx) => tx.purge_released(lease, now_ms, caller),
            TxInner::Postgres(tx) => tx.purge_released(lease, now_ms, caller).await,
        }
    }

    /// Commits; the changes are durable when this returns `Ok`.
    pub async fn commit(self) -> Result<(), StoreError> {
        match self.inner {
            TxInner::Sqlite(tx) => tx.commit(),
            TxInner::Postgres(tx) => tx.commit().await,
        }
    }
}

#[cfg(test)]
mod tests;
