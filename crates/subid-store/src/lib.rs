//! The durable store of leases, blocks and history: SQLite in WAL mode with `synchronous=FULL`
//! for leases; process rows through [`ProcessWriter`], a second connection.
//!
//! This is the only crate that speaks SQL. The daemon sees three handles: [`Store`], a pool of
//! read connections anyone may clone, [`Writer`], the connection that writes leases, and
//! [`ProcessWriter`], which writes process rows on the caller's thread. Every lease write
//! happens in a `BEGIN IMMEDIATE` transaction ([`WriteTx`]) so that concurrent writers (the
//! process writer, or a second daemon pointed at the same file by mistake) wait for the lock
//! instead of failing at commit.
//! A PostgreSQL back end would provide the same methods; nothing above this crate sees a query.

#![forbid(unsafe_code)]

mod error;
mod open;
mod process_writer;
mod record;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection, SqlitePool, SqliteRow};
use sqlx::{Connection, Row};
use subid_core::LeaseState;

pub use error::{DbError, StoreError};
pub use open::{APPLICATION_ID, open};
pub use process_writer::ProcessWriter;
pub use record::{
    BlockRow, EventKind, EventRecord, LeaseRecord, NewLease, ProcessRecord, ProcessState,
};

/// The migrations under the workspace's `migrations/`, embedded in the binary.
static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations");

/// How long a connection waits for another writer's lock before it reports `busy`.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// The columns of `process`.
const PROCESS_COLUMNS: &str = "id, lease_id, lease_name, pid, start_ticks, boot_id, host_uid, \
     host_gid, argv, state, exit_code, signal, started_at, ended_at";

/// The columns of `lease`, in the order [`LeaseRecord::from_row`] reads them.
const LEASE_COLUMNS: &str = "id, name, uid_base, gid_base, size, state, labels, ttl_seconds, \
     created_at, expires_at, released_at, created_by, rlimits, namespaces, pids_max, max_processes";

/// Read access to the store; cheap to clone.
#[derive(Clone, Debug)]
pub struct Store {
    readers: SqlitePool,
    path: PathBuf,
}

/// The single writing connection. Owned by one task; see [`Writer::begin`].
#[derive(Debug)]
pub struct Writer {
    conn: SqliteConnection,
    /// How `conn` was opened, for [`Writer::reopen`].
    options: SqliteConnectOptions,
    path: PathBuf,
}

impl Store {
    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The active lease of that name, else its most recently released one.
    pub async fn get_lease(&self, name: &str) -> Result<Option<LeaseRecord>, StoreError> {
        let sql = format!(
            "SELECT {LEASE_COLUMNS} FROM lease WHERE name = ? \
             ORDER BY state = 'active' DESC, released_at DESC, id DESC LIMIT 1"
        );
        let row = sqlx::query(&sql)
            .bind(name)
            .fetch_optional(&self.readers)
            .await
            .map_err(StoreError::read)?;
        row.map(|r| LeaseRecord::from_row(&r)).transpose()
    }

    /// Leases in `state` (all states when `None`) carrying every label of `labels`, by name.
    pub async fn list_leases(
        &self,
        state: Option<LeaseState>,
        labels: &[(String, String)],
    ) -> Result<Vec<LeaseRecord>, StoreError> {
        let mut sql = format!("SELECT {LEASE_COLUMNS} FROM lease WHERE 1");
        if state.is_some() {
            sql.push_str(" AND state = ?");
        }
        for _ in labels {
            sql.push_str(
                " AND EXISTS (SELECT 1 FROM json_each(lease.labels) j WHERE j.key = ? AND j.value = ?)",
            );
        }
        sql.push_str(" ORDER BY name, id");
        let mut query = sqlx::query(&sql);
        if let Some(state) = state {
            query = query.bind(state.as_str());
        }
        for (key, value) in labels {
            query = query.bind(key).bind(value);
        }
        let rows = query
            .fetch_all(&self.readers)
            .await
            .map_err(StoreError::read)?;
        rows.iter().map(LeaseRecord::from_row).collect()
    }

    /// The active lease holding the block that starts at `block_start`.
    pub async fn lease_holding(&self, block_start: u32) -> Result<Option<LeaseRecord>, StoreError> {
        let sql = format!(
            "SELECT {LEASE_COLUMNS} FROM lease WHERE id = \
             (SELECT lease_id FROM block WHERE start = ? AND lease_id IS NOT NULL)"
        );
        let row = sqlx::query(&sql)
            .bind(i64::from(block_start))
            .fetch_optional(&self.readers)
            .await
            .map_err(StoreError::read)?;
        row.map(|r| LeaseRecord::from_row(&r)).transpose()
    }

    /// One process by id.
    pub async fn get_process(&self, id: &str) -> Result<Option<ProcessRecord>, StoreError> {
        let sql = format!("SELECT {PROCESS_COLUMNS} FROM process WHERE id = ?");
        let row = sqlx::query(&sql)
            .bind(id)
            .fetch_optional(&self.readers)
            .await
            .map_err(StoreError::read)?;
        row.map(|r| ProcessRecord::from_row(&r)).transpose()
    }

    /// The processes of a lease (by its id), oldest first.
    pub async fn lease_processes(&self, lease_id: i64) -> Result<Vec<ProcessRecord>, StoreError> {
        let sql = format!(
            "SELECT {PROCESS_COLUMNS} FROM process WHERE lease_id = ? ORDER BY started_at, id"
        );
        let rows = sqlx::query(&sql)
            .bind(lease_id)
            .fetch_all(&self.readers)
            .await
            .map_err(StoreError::read)?;
        rows.iter().map(ProcessRecord::from_row).collect()
    }

    /// The id of every recorded process (their log files are kept; any other goes at start).
    pub async fn process_ids(&self) -> Result<Vec<String>, StoreError> {
        sqlx::query_scalar("SELECT id FROM process")
            .fetch_all(&self.readers)
            .await
            .map_err(StoreError::read)
    }

    /// Every process recorded as running, for reconciling with the kernel at start.
    pub async fn running_processes(&self) -> Result<Vec<ProcessRecord>, StoreError> {
        let sql =
            format!("SELECT {PROCESS_COLUMNS} FROM process WHERE state = 'running' ORDER BY id");
        let rows = sqlx::query(&sql)
            .fetch_all(&self.readers)
            .await
            .map_err(StoreError::read)?;
        rows.iter().map(ProcessRecord::from_row).collect()
    }

    /// Active leases whose `expires_at` is at or before `now_ms`.
    pub async fn expired_leases(&self, now_ms: i64) -> Result<Vec<LeaseRecord>, StoreError> {
        let sql = format!(
            "SELECT {LEASE_COLUMNS} FROM lease WHERE state = 'active' \
             AND expires_at IS NOT NULL AND expires_at <= ? ORDER BY expires_at"
        );
        let rows = sqlx::query(&sql)
            .bind(now_ms)
            .fetch_all(&self.readers)
            .await
            .map_err(StoreError::read)?;
        rows.iter().map(LeaseRecord::from_row).collect()
    }

    /// The history of every lease that carried this name, oldest first.
    pub async fn events(&self, name: &str) -> Result<Vec<EventRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, at, kind, lease_id, lease_name, caller_uid, detail FROM event \
             WHERE lease_name = ? AND kind IN ('create', 'renew', 'release', 'expire', 'purge') \
             ORDER BY id",
        )
        .bind(name)
        .fetch_all(&self.readers)
        .await
        .map_err(StoreError::read)?;
        rows.iter().map(EventRecord::from_row).collect()
    }

    /// Up to `limit` events of every kind (processes too) with an id above `after`, in id order:
    /// the backlog of the event feed.
    pub async fn events_after(
        &self,
        after: i64,
        limit: u32,
    ) -> Result<Vec<EventRecord>, StoreError> {
        events_after_on(&self.readers, after, limit).await
    }

    /// The newest committed event id (0 when there is none).
    pub async fn last_event_id(&self) -> Result<i64, StoreError> {
        last_event_id_on(&self.readers).await
    }

    /// How many leases are active.
    pub async fn active_lease_count(&self) -> Result<u64, StoreError> {
        let count: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM lease WHERE state = 'active'")
            .fetch_one(&self.readers)
            .await
            .map_err(StoreError::read)?;
        Ok(u64::try_from(count).unwrap_or(0))
    }
}

impl Writer {
    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Replaces the writing connection with a fresh one; closing the old one rolls back whatever
    /// it still had open.
    ///
    /// Needed after a failed `COMMIT`: SQLite may have rolled the transaction back by itself
    /// (SQLITE_FULL, SQLITE_IOERR), so the explicit rollback fails and the connection believes
    /// it is still inside a transaction; every later `BEGIN` would then fail, even once the
    /// disk has room again.
    pub async fn reopen(&mut self) -> Result<(), StoreError> {
        let fresh = SqliteConnection::connect_with(&self.options)
            .await
            .map_err(|source| StoreError::Open {
                path: self.path.clone(),
                source,
            })?;
        let old = std::mem::replace(&mut self.conn, fresh);
        // Closing may report the failed transaction again; the new connection is what counts.
        let _ = old.close().await;
        Ok(())
    }

    /// Every block row, for rebuilding the in-memory allocator at start.
    pub async fn block_rows(&mut self) -> Result<Vec<BlockRow>, StoreError> {
        let rows = sqlx::query("SELECT start, lease_id, released_at FROM block ORDER BY start")
            .fetch_all(&mut self.conn)
            .await
            .map_err(StoreError::read)?;
        rows.iter().map(BlockRow::from_row).collect()
    }

    /// The newest event id (0 when there is none): where the live feed starts.
    pub async fn last_event_id(&mut self) -> Result<i64, StoreError> {
        last_event_id_on(&mut self.conn).await
    }

    /// The active leases, for checking them against the configured pool at start.
    pub async fn active_leases(&mut self) -> Result<Vec<LeaseRecord>, StoreError> {
        let sql = format!("SELECT {LEASE_COLUMNS} FROM lease WHERE state = 'active' ORDER BY id");
        let rows = sqlx::query(&sql)
            .fetch_all(&mut self.conn)
            .await
            .map_err(StoreError::read)?;
        rows.iter().map(LeaseRecord::from_row).collect()
    }

    /// The block size the database was cut with, if it has any blocks; records `block` otherwise.
    pub async fn settle_block_size(&mut self, block: u32) -> Result<u32, StoreError> {
        let mut tx = self.begin().await?;
        let stored: Option<String> =
            sqlx::query_scalar("SELECT value FROM pool_meta WHERE key = 'block'")
                .fetch_optional(&mut *tx.tx)
                .await
                .map_err(StoreError::write)?;
        let settled = match stored.as_deref().map(str::parse::<u32>) {
            Some(Ok(stored)) => stored,
            Some(Err(_)) => {
                return Err(StoreError::Invalid {
                    what: "pool_meta.block".into(),
                    value: stored.unwrap_or_default(),
                });
            }
            None => {
                sqlx::query("INSERT INTO pool_meta (key, value) VALUES ('block', ?)")
                    .bind(block.to_string())
                    .execute(&mut *tx.tx)
                    .await
                    .map_err(StoreError::write)?;
                block
            }
        };
        tx.commit().await?;
        Ok(settled)
    }

    /// Starts a `BEGIN IMMEDIATE` transaction with full durability: it holds the write lock from
    /// its first statement and its commit is fsync'd.
    pub async fn begin(&mut self) -> Result<WriteTx<'_>, StoreError> {
        let tx = self
            .conn
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(StoreError::write)?;
        Ok(WriteTx { tx })
    }
}

/// One write transaction. Dropping it without [`WriteTx::commit`] rolls everything back.
pub struct WriteTx<'c> {
    tx: sqlx::Transaction<'c, sqlx::Sqlite>,
}

impl WriteTx<'_> {
    /// The active lease of that name.
    pub async fn active_lease(&mut self, name: &str) -> Result<Option<LeaseRecord>, StoreError> {
        let sql = format!("SELECT {LEASE_COLUMNS} FROM lease WHERE name = ? AND state = 'active'");
        let row = sqlx::query(&sql)
            .bind(name)
            .fetch_optional(&mut *self.tx)
            .await
            .map_err(StoreError::write)?;
        row.map(|r| LeaseRecord::from_row(&r)).transpose()
    }

    /// The most recently released lease of that name (for sticky ranges).
    pub async fn last_released(&mut self, name: &str) -> Result<Option<LeaseRecord>, StoreError> {
        let sql = format!(
            "SELECT {LEASE_COLUMNS} FROM lease WHERE name = ? AND state = 'released' \
             ORDER BY released_at DESC, id DESC LIMIT 1"
        );
        let row = sqlx::query(&sql)
            .bind(name)
            .fetch_optional(&mut *self.tx)
            .await
            .map_err(StoreError::write)?;
        row.map(|r| LeaseRecord::from_row(&r)).transpose()
    }

    /// Whether any lease was created on an id of `base..base+size` at or after `since_ms`.
    pub async fn range_held_since(
        &mut self,
        base: u32,
        size: u32,
        since_ms: i64,
    ) -> Result<bool, StoreError> {
        let count: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM lease WHERE created_at >= ? AND uid_base < ? AND uid_base + size > ?",
        )
        .bind(since_ms)
        .bind(i64::from(base) + i64::from(size))
        .bind(i64::from(base))
        .fetch_one(&mut *self.tx)
        .await
        .map_err(StoreError::write)?;
        Ok(count > 0)
    }

    /// Active leases whose `expires_at` is at or before `now_ms`.
    pub async fn expired(&mut self, now_ms: i64) -> Result<Vec<LeaseRecord>, StoreError> {
        let sql = format!(
            "SELECT {LEASE_COLUMNS} FROM lease WHERE state = 'active' \
             AND expires_at IS NOT NULL AND expires_at <= ? ORDER BY expires_at"
        );
        let rows = sqlx::query(&sql)
            .bind(now_ms)
            .fetch_all(&mut *self.tx)
            .await
            .map_err(StoreError::write)?;
        rows.iter().map(LeaseRecord::from_row).collect()
    }

    /// Inserts an active lease, takes its blocks (one row each, `block` ids apart) and records a
    /// `create` event. Fails with [`StoreError::BlockHeld`] if any block already has a holder:
    /// the schema refuses a second holder even if the caller's bookkeeping were wrong.
    pub async fn insert_lease(
        &mut self,
        new: &NewLease,
        block: u32,
    ) -> Result<LeaseRecord, StoreError> {
        let labels = serde_json::to_string(&new.labels).map_err(StoreError::encode)?;
        let rlimits = serde_json::to_string(&new.rlimits).map_err(StoreError::encode)?;
        let namespaces = serde_json::to_string(&new.namespaces).map_err(StoreError::encode)?;
        let result = sqlx::query(
            "INSERT INTO lease (name, uid_base, gid_base, size, state, labels, ttl_seconds, \
             created_at, expires_at, created_by, rlimits, namespaces, pids_max, max_processes) \
             VALUES (?, ?, ?, ?, 'active', ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(&new.name)
        .bind(i64::from(new.uid_base))
        .bind(i64::from(new.gid_base))
        .bind(i64::from(new.size))
        .bind(&labels)
        .bind(new.ttl_seconds.map(i64::from))
        .bind(new.created_at)
        .bind(new.expires_at)
        .bind(new.created_by.map(i64::from))
        .bind(rlimits)
        .bind(namespaces)
        .bind(new.pids_max.map(|v| i64::try_from(v).unwrap_or(i64::MAX)))
        .bind(
            new.max_processes
                .map(|v| i64::try_from(v).unwrap_or(i64::MAX)),
        )
        .execute(&mut *self.tx)
        .await
        .map_err(StoreError::write)?;
        let id = result.last_insert_rowid();
        let blocks = new.size / block.max(1);
        for i in 0..blocks {
            let start = u64::from(new.uid_base) + u64::from(i) * u64::from(block);
            let taken = sqlx::query(
                "INSERT INTO block (start, lease_id, released_at) VALUES (?, ?, NULL) \
                 ON CONFLICT (start) DO UPDATE SET lease_id = excluded.lease_id, released_at = NULL \
                 WHERE block.lease_id IS NULL",
            )
            .bind(start as i64)
            .bind(id)
            .execute(&mut *self.tx)
            .await
            .map_err(StoreError::write)?;
            if taken.rows_affected() != 1 {
                return Err(StoreError::BlockHeld { start });
            }
        }
        let detail = serde_json::json!({
            "uid_base": new.uid_base,
            "gid_base": new.gid_base,
            "size": new.size,
            "ttl_seconds": new.ttl_seconds,
            "expires_at": new.expires_at,
        })
        .to_string();
        self.event(
            new.created_at,
            EventKind::Create,
            id,
            &new.name,
            new.created_by,
            Some(&detail),
        )
        .await?;
        Ok(LeaseRecord {
            id,
            name: new.name.clone(),
            uid_base: new.uid_base,
            gid_base: new.gid_base,
            size: new.size,
            state: LeaseState::Active,
            labels: new.labels.clone(),
            ttl_seconds: new.ttl_seconds,
            created_at: new.created_at,
            expires_at: new.expires_at,
            released_at: None,
            created_by: new.created_by,
            rlimits: new.rlimits.clone(),
            namespaces: new.namespaces.clone(),
            pids_max: new.pids_max,
            max_processes: new.max_processes,
        })
    }

    /// Sets a new expiry on an active lease and records a `renew` event.
    pub async fn renew(
        &mut self,
        lease: &LeaseRecord,
        expires_at: i64,
        now_ms: i64,
        caller: Option<u32>,
    ) -> Result<(), StoreError> {
        let done = sqlx::query("UPDATE lease SET expires_at = ? WHERE id = ? AND state = 'active'")
            .bind(expires_at)
            .bind(lease.id)
            .execute(&mut *self.tx)
            .await
            .map_err(StoreError::write)?;
        if done.rows_affected() != 1 {
            return Err(StoreError::NotActive { id: lease.id });
        }
        let detail = serde_json::json!({ "expires_at": expires_at }).to_string();
        self.event(
            now_ms,
            EventKind::Renew,
            lease.id,
            &lease.name,
            caller,
            Some(&detail),
        )
        .await
    }

    /// Releases an active lease: its blocks become free with `released_at = now_ms` (quarantine
    /// starts), or `0` when `purge` (reusable at once). Records `release` or `expire`, and `purge`.
    pub async fn release(
        &mut self,
        lease: &LeaseRecord,
        kind: EventKind,
        purge: bool,
        now_ms: i64,
        caller: Option<u32>,
    ) -> Result<(), StoreError> {
        let done = sqlx::query(
            "UPDATE lease SET state = 'released', released_at = ? WHERE id = ? AND state = 'active'",
        )
        .bind(now_ms)
        .bind(lease.id)
        .execute(&mut *self.tx)
        .await
        .map_err(StoreError::write)?;
        if done.rows_affected() != 1 {
            return Err(StoreError::NotActive { id: lease.id });
        }
        // Process rows live as long as their lease.
        sqlx::query("DELETE FROM process WHERE lease_id = ?")
            .bind(lease.id)
            .execute(&mut *self.tx)
            .await
            .map_err(StoreError::write)?;
        let block_released_at = if purge { 0 } else { now_ms };
        sqlx::query("UPDATE block SET lease_id = NULL, released_at = ? WHERE lease_id = ?")
            .bind(block_released_at)
            .bind(lease.id)
            .execute(&mut *self.tx)
            .await
            .map_err(StoreError::write)?;
        let detail = serde_json::json!({
            "uid_base": lease.uid_base,
            "size": lease.size,
            "purge": purge,
        })
        .to_string();
        self.event(now_ms, kind, lease.id, &lease.name, caller, Some(&detail))
            .await?;
        if purge {
            self.event(
                now_ms,
                EventKind::Purge,
                lease.id,
                &lease.name,
                caller,
                None,
            )
            .await?;
        }
        Ok(())
    }

    /// Makes the quarantined blocks of a released lease reusable at once (`released_at = 0`) and
    /// records a `purge` event. Blocks another lease holds by now are left alone.
    pub async fn purge_released(
        &mut self,
        lease: &LeaseRecord,
        now_ms: i64,
        caller: Option<u32>,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE block SET released_at = 0 WHERE lease_id IS NULL AND start >= ? AND start < ?",
        )
        .bind(i64::from(lease.uid_base))
        .bind(i64::from(lease.uid_base) + i64::from(lease.size))
        .execute(&mut *self.tx)
        .await
        .map_err(StoreError::write)?;
        self.event(
            now_ms,
            EventKind::Purge,
            lease.id,
            &lease.name,
            caller,
            None,
        )
        .await
    }

    async fn event(
        &mut self,
        at: i64,
        kind: EventKind,
        lease_id: i64,
        lease_name: &str,
        caller: Option<u32>,
        detail: Option<&str>,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO event (at, kind, lease_id, lease_name, caller_uid, detail) \
             VALUES (?, ?, ?, ?, ?, ?)",
        )
        .bind(at)
        .bind(kind.as_str())
        .bind(lease_id)
        .bind(lease_name)
        .bind(caller.map(i64::from))
        .bind(detail)
        .execute(&mut *self.tx)
        .await
        .map_err(StoreError::write)?;
        Ok(())
    }

    /// Commits; the changes are on disk (fsync'd, `synchronous=FULL`) when this returns `Ok`.
    pub async fn commit(self) -> Result<(), StoreError> {
        self.tx.commit().await.map_err(StoreError::write)
    }
}

/// Events above `after`, oldest first, on any connection or pool.
async fn last_event_id_on<'e, E: sqlx::SqliteExecutor<'e>>(executor: E) -> Result<i64, StoreError> {
    let id: Option<i64> = sqlx::query_scalar("SELECT MAX(id) FROM event")
        .fetch_one(executor)
        .await
        .map_err(StoreError::read)?;
    Ok(id.unwrap_or(0))
}

async fn events_after_on<'e, E: sqlx::SqliteExecutor<'e>>(
    executor: E,
    after: i64,
    limit: u32,
) -> Result<Vec<EventRecord>, StoreError> {
    let rows = sqlx::query(
        "SELECT id, at, kind, lease_id, lease_name, caller_uid, detail FROM event \
         WHERE id > ? ORDER BY id LIMIT ?",
    )
    .bind(after)
    .bind(i64::from(limit))
    .fetch_all(executor)
    .await
    .map_err(StoreError::read)?;
    rows.iter().map(EventRecord::from_row).collect()
}

/// Reads an integer column that must fit a `u32`.
fn get_u32(row: &SqliteRow, column: &str) -> Result<u32, StoreError> {
    let value: i64 = row.try_get(column).map_err(StoreError::read)?;
    u32::try_from(value).map_err(|_| StoreError::Invalid {
        what: column.to_string(),
        value: value.to_string(),
    })
}

/// Reads a nullable integer column that must fit a `u32`.
fn get_opt_u32(row: &SqliteRow, column: &str) -> Result<Option<u32>, StoreError> {
    let value: Option<i64> = row.try_get(column).map_err(StoreError::read)?;
    value
        .map(|v| {
            u32::try_from(v).map_err(|_| StoreError::Invalid {
                what: column.to_string(),
                value: v.to_string(),
            })
        })
        .transpose()
}

/// Decodes the `labels` JSON column.
fn get_labels(row: &SqliteRow) -> Result<BTreeMap<String, String>, StoreError> {
    let text: String = row.try_get("labels").map_err(StoreError::read)?;
    serde_json::from_str(&text).map_err(|_| StoreError::Invalid {
        what: "lease.labels".into(),
        value: text,
    })
}

#[cfg(test)]
mod tests;
