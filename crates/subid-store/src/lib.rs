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

mod copy;
mod error;
mod pg;
mod process_writer;
mod record;
mod sqlite;

use std::path::Path;

use subid_core::LeaseState;

pub use copy::{MoveReport, move_in};
pub use error::{BackendError, Kind, StoreError};
pub use pg::{CHANNEL, PgConfig};
pub use process_writer::{PendingRow, ProcessEnd, ProcessWriter};
pub use record::{
    BlockRow, EventKind, EventRecord, LeaseRecord, NewLease, ProcessRecord, ProcessState,
};
pub use sqlite::APPLICATION_ID;

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

/// A claim one host of a fleet found on pool blocks: another id owner (its /etc/subuid,
/// /etc/subgid, users and groups) or a live process holding ids. Withheld fleet-wide.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FleetClaim {
    /// The host that found it.
    pub host: String,
    /// Pool blocks `first..first+count`.
    pub first: u32,
    pub count: u32,
    /// A live process holds the ids (else another id owner claims them).
    pub process: bool,
    /// Who, e.g. "/etc/subuid line 3 (alice:1879048192:65536)".
    pub source: String,
}

/// What other hosts changed since a host last looked (see [`WriteTx::changes_since`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Changes {
    /// Block rows changed, oldest change first.
    pub blocks: Vec<BlockRow>,
    /// The newest change number seen: where to look from next time.
    pub seq: i64,
    /// The version of the fleet's claims now.
    pub claims_seq: i64,
    /// Every host's claims, when their version moved past the one given.
    pub claims: Option<Vec<FleetClaim>>,
}

/// A host where a lease has state (a pin, a cgroup, processes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseHost {
    pub host: String,
    /// It has live processes of the lease.
    pub live: bool,
}

/// A forced release (or an expiry) waiting for other hosts: what to do once they are done.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReleaseRequest {
    pub at: i64,
    pub kind: EventKind,
    pub purge: bool,
    pub caller: Option<u32>,
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

    /// The active lease of that name, else its most recently released one. With a fleet's
    /// store out of reach, what this host knows of it (the copy in its own file of every lease
    /// it created, changed or started processes in).
    pub async fn get_lease(&self, name: &str) -> Result<Option<LeaseRecord>, StoreError> {
        match &self.leases {
            Leases::Sqlite => self.local.get_lease(name).await,
            Leases::Postgres(pg) => {
                if pg.down()
                    && let Ok(Some(known)) = self.local.get_lease(name).await
                {
                    return Ok(Some(known));
                }
                match pg.get_lease(name).await {
                    Err(error) if error.is_unreachable() => {
                        match self.local.get_lease(name).await {
                            Ok(Some(known)) => Ok(Some(known)),
                            _ => Err(error),
                        }
                    }
                    other => other,
                }
            }
        }
    }

    /// The lease with this id, in any state (from this host's copy when a fleet's store is
    /// out of reach).
    pub async fn get_lease_by_id(&self, id: i64) -> Result<Option<LeaseRecord>, StoreError> {
        match &self.leases {
            Leases::Sqlite => self.local.get_lease_by_id(id).await,
            Leases::Postgres(pg) => {
                if pg.down()
                    && let Ok(Some(known)) = self.local.get_lease_by_id(id).await
                {
                    return Ok(Some(known));
                }
                match pg.get_lease_by_id(id).await {
                    Err(error) if error.is_unreachable() => {
                        match self.local.get_lease_by_id(id).await {
                            Ok(Some(known)) => Ok(Some(known)),
                            _ => Err(error),
                        }
                    }
                    other => other,
                }
            }
        }
    }

    /// Reads this host's own file (the watchdog's check: it answers whether or not a fleet's
    /// store can be reached).
    pub async fn check_local(&self) -> Result<(), StoreError> {
        self.local.meta("block").await.map(drop)
    }

    /// How long a client should give a lease write before it counts as lost in an outage: the
    /// writer's deadline for the group in progress and for its own (`None` with SQLite, whose
    /// writes wait for the lock as long as SQLite says).
    pub fn write_deadline(&self) -> Option<std::time::Duration> {
        match &self.leases {
            Leases::Sqlite => None,
            Leases::Postgres(pg) => Some(pg.timeout() * 2 + std::time::Duration::from_secs(1)),
        }
    }

    /// This host's name in a fleet (`None` with SQLite).
    pub fn host_id(&self) -> Option<&str> {
        match &self.leases {
            Leases::Sqlite => None,
            Leases::Postgres(pg) => Some(pg.host_id()),
        }
    }

    /// Every host's claims on the pool (none with SQLite).
    pub async fn fleet_claims(&self) -> Result<Vec<FleetClaim>, StoreError> {
        match &self.leases {
            Leases::Sqlite => Ok(Vec::new()),
            Leases::Postgres(pg) => pg.fleet_claims().await,
        }
    }

    /// The hosts where a lease has state (none with SQLite).
    pub async fn lease_hosts(&self, lease_id: i64) -> Result<Vec<LeaseHost>, StoreError> {
        match &self.leases {
            Leases::Sqlite => Ok(Vec::new()),
            Leases::Postgres(pg) => pg.lease_hosts(lease_id).await,
        }
    }

    /// Leases where this host has state and that are released, or whose release waits for the
    /// hosts to stop their processes (none with SQLite).
    pub async fn to_clean_up(&self) -> Result<Vec<LeaseRecord>, StoreError> {
        match &self.leases {
            Leases::Sqlite => Ok(Vec::new()),
            Leases::Postgres(pg) => pg.to_clean_up().await,
        }
    }

    /// Leases where this host said it has live processes (none with SQLite).
    pub async fn live_here(&self) -> Result<Vec<LeaseRecord>, StoreError> {
        match &self.leases {
            Leases::Sqlite => Ok(Vec::new()),
            Leases::Postgres(pg) => pg.live_here().await,
        }
    }

    /// Ids of active leases whose release waits and that no host has live processes of any
    /// more (none with SQLite).
    pub async fn releasable(&self) -> Result<Vec<i64>, StoreError> {
        match &self.leases {
            Leases::Sqlite => Ok(Vec::new()),
            Leases::Postgres(pg) => pg.releasable().await,
        }
    }

    /// Up to `limit` leases changed after change number `seq`, each with its change number
    /// (none with SQLite).
    pub async fn lease_changes_since(
        &self,
        seq: i64,
        limit: u32,
    ) -> Result<Vec<(LeaseRecord, i64)>, StoreError> {
        match &self.leases {
            Leases::Sqlite => Ok(Vec::new()),
            Leases::Postgres(pg) => pg.lease_changes_since(seq, limit).await,
        }
    }

    /// The identity of a shared store (`None` with SQLite).
    pub async fn store_id(&self) -> Result<Option<String>, StoreError> {
        match &self.leases {
            Leases::Sqlite => Ok(None),
            Leases::Postgres(pg) => pg.store_id().await,
        }
    }

    /// A session notified of every lease-writing commit of the fleet (`None` with SQLite).
    pub async fn listen(&self) -> Result<Option<Notifications>, StoreError> {
        match &self.leases {
            Leases::Sqlite => Ok(None),
            Leases::Postgres(pg) => Ok(Some(Notifications {
                listener: pg.listen().await?,
            })),
        }
    }

    /// Up to `limit` events of this host's own file with an id above `after`: with a fleet's
    /// store, the process events still to be copied into the fleet's feed.
    pub async fn local_events_after(
        &self,
        after: i64,
        limit: u32,
    ) -> Result<Vec<EventRecord>, StoreError> {
        self.local.events_after(after, limit).await
    }

    /// Whether this host's own file has any lease row (its own leases with SQLite; copies of a
    /// fleet's leases otherwise).
    pub async fn local_has_leases(&self) -> Result<bool, StoreError> {
        self.local.has_leases().await
    }

    /// The newest event id of this host's own file.
    pub async fn local_last_event_id(&self) -> Result<i64, StoreError> {
        self.local.last_event_id().await
    }

    /// A value of this host's own file's `pool_meta`.
    pub async fn local_meta(&self, key: &str) -> Result<Option<String>, StoreError> {
        self.local.meta(key).await
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

/// Notifications of the fleet's commits (LISTEN, see `pg::CHANNEL`).
pub struct Notifications {
    listener: sqlx::postgres::PgListener,
}

impl Notifications {
    /// Waits for the next commit of any host; the host that made it. An error means the
    /// session was lost; it is made again at the next call, and commits made meanwhile were
    /// not notified (look for changes anyway).
    pub async fn next(&mut self) -> Result<String, StoreError> {
        match self.listener.try_recv().await {
            Ok(Some(notification)) => Ok(notification.payload().to_string()),
            Ok(None) => Err(StoreError::Refused {
                reason: "the listening session was lost; listening again".into(),
            }),
            Err(error) => Err(StoreError::read(error)),
        }
    }
}

impl std::fmt::Debug for Notifications {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Notifications")
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

    /// The newest change number of the block rows (0 with SQLite): where a host starts to
    /// follow other hosts' changes once it has read every block row.
    pub async fn last_change(&mut self) -> Result<i64, StoreError> {
        match &mut self.inner {
            WriterInner::Sqlite(_) => Ok(0),
            WriterInner::Postgres(w) => w.last_change().await,
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

    /// What other hosts of a fleet changed since change number `seq`, read outside a
    /// transaction (see [`WriteTx::changes_since`]). Nothing with SQLite.
    pub async fn changes_since(
        &mut self,
        seq: i64,
        claims_seq: i64,
    ) -> Result<Changes, StoreError> {
        match &mut self.inner {
            WriterInner::Sqlite(_) => Ok(Changes {
                seq,
                claims_seq,
                ..Changes::default()
            }),
            WriterInner::Postgres(w) => w.changes_since(seq, claims_seq).await,
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

    /// [`Writer::begin`], and at once what a group of commands needs first: with `changes`
    /// (`(seq, claims_seq)`), what other hosts changed since ([`WriteTx::changes_since`]), and
    /// the state of each of `names` ([`WriteTx::name_state`]). With PostgreSQL the names take
    /// one round trip together.
    pub async fn begin_group(
        &mut self,
        names: &[String],
        changes: Option<(i64, i64)>,
    ) -> Result<GroupStart<'_>, StoreError> {
        match &mut self.inner {
            WriterInner::Sqlite(w) => {
                let mut tx = w.begin()?;
                let mut states = std::collections::HashMap::new();
                for name in names {
                    states.insert(name.clone(), tx.name_state(name)?);
                }
                let changes = changes.map(|(seq, claims_seq)| Changes {
                    seq,
                    claims_seq,
                    ..Changes::default()
                });
                Ok((
                    WriteTx {
                        inner: TxInner::Sqlite(tx),
                    },
                    changes,
                    states,
                ))
            }
            WriterInner::Postgres(w) => {
                let (tx, changes, states) = w.begin_group(names, changes).await?;
                Ok((
                    WriteTx {
                        inner: TxInner::Postgres(tx),
                    },
                    changes,
                    states,
                ))
            }
        }
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

/// What [`Writer::begin_group`] read at the start of the transaction.
pub type GroupStart<'c> = (
    WriteTx<'c>,
    Option<Changes>,
    std::collections::HashMap<String, NameState>,
);

/// One write transaction. Dropping it without [`WriteTx::commit`] rolls everything back.
pub struct WriteTx<'c> {
    inner: TxInner<'c>,
}

enum TxInner<'c> {
    Sqlite(sqlite::SqliteTx<'c>),
    Postgres(pg::PgTx<'c>),
}

impl WriteTx<'_> {
    /// The lease with this id, in any state.
    pub async fn lease_by_id(&mut self, id: i64) -> Result<Option<LeaseRecord>, StoreError> {
        match &mut self.inner {
            TxInner::Sqlite(tx) => tx.lease_by_id(id),
            TxInner::Postgres(tx) => tx.lease_by_id(id).await,
        }
    }

    /// [`WriteTx::name_state`] of several names in one step (one round trip with PostgreSQL).
    pub async fn name_states(
        &mut self,
        names: &[String],
    ) -> Result<std::collections::HashMap<String, NameState>, StoreError> {
        match &mut self.inner {
            TxInner::Sqlite(tx) => {
                let mut all = std::collections::HashMap::new();
                for name in names {
                    all.insert(name.clone(), tx.name_state(name)?);
                }
                Ok(all)
            }
            TxInner::Postgres(tx) => tx.name_states(names).await,
        }
    }

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

    /// [`WriteTx::insert_lease`] of several leases (of distinct names), in their order; with
    /// PostgreSQL one statement for all of them.
    pub async fn insert_leases(
        &mut self,
        news: &[NewLease],
        block: u32,
    ) -> Result<Vec<LeaseRecord>, StoreError> {
        match &mut self.inner {
            TxInner::Sqlite(tx) => news.iter().map(|n| tx.insert_lease(n, block)).collect(),
            TxInner::Postgres(tx) => tx.insert_leases(news, block).await,
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

    /// What other hosts of a fleet changed since change number `seq` (block rows) and, when
    /// their version moved past `claims_seq`, every host's claims. Nothing with SQLite, where
    /// this writer is the only one.
    pub async fn changes_since(
        &mut self,
        seq: i64,
        claims_seq: i64,
    ) -> Result<Changes, StoreError> {
        match &mut self.inner {
            TxInner::Sqlite(_) => Ok(Changes {
                seq,
                claims_seq,
                ..Changes::default()
            }),
            TxInner::Postgres(tx) => tx.changes_since(seq, claims_seq).await,
        }
    }

    /// The hosts where the lease has state (none with SQLite: this host is the only one).
    pub async fn lease_hosts(&mut self, lease_id: i64) -> Result<Vec<LeaseHost>, StoreError> {
        match &mut self.inner {
            TxInner::Sqlite(_) => Ok(Vec::new()),
            TxInner::Postgres(tx) => tx.lease_hosts(lease_id).await,
        }
    }

    /// Records whether this host has live processes of the lease; `live` is refused (false)
    /// unless the lease is active and no release of it waits.
    pub async fn set_presence(
        &mut self,
        lease_id: i64,
        live: bool,
        now_ms: i64,
    ) -> Result<bool, StoreError> {
        match &mut self.inner {
            TxInner::Sqlite(_) => Ok(true),
            TxInner::Postgres(tx) => tx.set_presence(lease_id, live, now_ms).await,
        }
    }

    /// Forgets that this host has state of the lease.
    pub async fn clear_presence(&mut self, lease_id: i64) -> Result<(), StoreError> {
        match &mut self.inner {
            TxInner::Sqlite(_) => Ok(()),
            TxInner::Postgres(tx) => tx.clear_presence(lease_id).await,
        }
    }

    /// Records that the lease is to be released once no other host has live processes of it
    /// (a fleet only). False when it is not active or a release waits already.
    pub async fn request_release(
        &mut self,
        lease: &LeaseRecord,
        request: &ReleaseRequest,
    ) -> Result<bool, StoreError> {
        match &mut self.inner {
            TxInner::Sqlite(_) => Err(StoreError::Refused {
                reason: "a release waiting for other hosts needs a shared store".into(),
            }),
            TxInner::Postgres(tx) => tx.request_release(lease, request).await,
        }
    }

    /// The release waiting for the lease, if any.
    pub async fn release_request(
        &mut self,
        lease_id: i64,
    ) -> Result<Option<ReleaseRequest>, StoreError> {
        match &mut self.inner {
            TxInner::Sqlite(_) => Ok(None),
            TxInner::Postgres(tx) => tx.release_request(lease_id).await,
        }
    }

    /// Replaces this host's claims on the pool with `claims` (a fleet only).
    pub async fn publish_claims(
        &mut self,
        claims: &[FleetClaim],
        now_ms: i64,
    ) -> Result<(), StoreError> {
        match &mut self.inner {
            TxInner::Sqlite(_) => Ok(()),
            TxInner::Postgres(tx) => tx.publish_claims(claims, now_ms).await,
        }
    }

    /// Copies this host's own events (process starts and ends) into the fleet's feed, each
    /// once (a fleet only).
    pub async fn forward_events(&mut self, events: &[EventRecord]) -> Result<(), StoreError> {
        match &mut self.inner {
            TxInner::Sqlite(_) => Ok(()),
            TxInner::Postgres(tx) => tx.forward_events(events).await,
        }
    }

    /// Commits; the changes are durable when this returns `Ok`.
    pub async fn commit(self) -> Result<(), StoreError> {
        match self.inner {
            TxInner::Sqlite(tx) => tx.commit(),
            TxInner::Postgres(tx) => tx.commit().await,
        }
    }

    /// [`WriteTx::commit`], and with a fleet's store the last change number as it committed:
    /// a watermark to give [`Writer::begin_group`] next, which then reads no changes unless
    /// another host committed since. `None` with SQLite.
    pub async fn commit_seq(self) -> Result<Option<i64>, StoreError> {
        match self.inner {
            TxInner::Sqlite(tx) => tx.commit().map(|()| None),
            TxInner::Postgres(tx) => tx.commit_seq().await.map(Some),
        }
    }
}

#[cfg(test)]
mod tests;
