//! Lease writes to the SQLite file: one rusqlite connection, `synchronous=FULL`, every write in a
//! `BEGIN IMMEDIATE` transaction so that the process writer (or a second daemon pointed at the
//! same file by mistake) waits for the lock instead of failing at commit.

use std::path::{Path, PathBuf};

use rusqlite::{Connection, OpenFlags, OptionalExtension, TransactionBehavior, params};

use crate::record::{LEASE_COLUMNS, block_from, lease_from, release_detail};
use crate::{BlockRow, EventKind, LeaseRecord, NameState, NewLease, PoolMeta, StoreError};

/// The single writing connection. Owned by one thread; see [`SqliteWriter::begin`].
#[derive(Debug)]
pub(crate) struct SqliteWriter {
    conn: Connection,
    path: PathBuf,
}

/// Opens a read-write connection to a database [`super::open`] has checked and migrated.
fn connect(path: &Path) -> Result<Connection, StoreError> {
    let open_err = |source: rusqlite::Error| StoreError::Open {
        target: path.display().to_string(),
        source: source.into(),
    };
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX
            | OpenFlags::SQLITE_OPEN_URI,
    )
    .map_err(open_err)?;
    conn.execute_batch(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON;",
    )
    .map_err(open_err)?;
    conn.busy_timeout(super::BUSY_TIMEOUT).map_err(open_err)?;
    Ok(conn)
}

impl SqliteWriter {
    pub(crate) fn open(path: &Path) -> Result<SqliteWriter, StoreError> {
        Ok(SqliteWriter {
            conn: connect(path)?,
            path: path.to_path_buf(),
        })
    }

    /// Replaces the connection with a fresh one; closing the old one rolls back whatever it still
    /// had open.
    pub(crate) fn reopen(&mut self) -> Result<(), StoreError> {
        let fresh = connect(&self.path)?;
        let old = std::mem::replace(&mut self.conn, fresh);
        // Closing may report the failed transaction again; the new connection is what counts.
        let _ = old.close();
        Ok(())
    }

    pub(crate) fn block_rows(&mut self) -> Result<Vec<BlockRow>, StoreError> {
        let mut stmt = self
            .conn
            .prepare("SELECT start, lease_id, released_at FROM block ORDER BY start")
            .map_err(StoreError::read)?;
        let mut rows = stmt.query([]).map_err(StoreError::read)?;
        let mut out = Vec::new();
        while let Some(row) = rows.next().map_err(StoreError::read)? {
            out.push(block_from(row)?);
        }
        Ok(out)
    }

    pub(crate) fn last_event_id(&mut self) -> Result<i64, StoreError> {
        let id: Option<i64> = self
            .conn
            .query_row("SELECT MAX(id) FROM event", [], |r| r.get(0))
            .map_err(StoreError::read)?;
        Ok(id.unwrap_or(0))
    }

    pub(crate) fn first_active_outside(
        &mut self,
        base: u32,
        end: u64,
        block: u32,
    ) -> Result<Option<LeaseRecord>, StoreError> {
        let sql = format!("SELECT {LEASE_COLUMNS} FROM lease WHERE {OUTSIDE} LIMIT 1");
        let mut stmt = self.conn.prepare(&sql).map_err(StoreError::read)?;
        let mut rows = stmt
            .query(params![
                i64::from(base),
                i64::try_from(end).unwrap_or(i64::MAX),
                i64::from(block)
            ])
            .map_err(StoreError::read)?;
        match rows.next().map_err(StoreError::read)? {
            Some(row) => Ok(Some(lease_from(row)?)),
            None => Ok(None),
        }
    }

    pub(crate) fn settle_pool(&mut self, pool: PoolMeta) -> Result<PoolMeta, StoreError> {
        let tx = self.begin()?;
        let stored: Option<String> = tx
            .tx
            .query_row("SELECT value FROM pool_meta WHERE key = 'block'", [], |r| {
                r.get(0)
            })
            .optional()
            .map_err(StoreError::write)?;
        let settled = match stored.as_deref().map(str::parse::<u32>) {
            Some(Ok(stored)) => PoolMeta {
                block: stored,
                ..pool
            },
            Some(Err(_)) => {
                return Err(StoreError::Invalid {
                    what: "pool_meta.block".into(),
                    value: stored.unwrap_or_default(),
                });
            }
            None => {
                tx.tx
                    .execute(
                        "INSERT INTO pool_meta (key, value) VALUES ('block', ?1)",
                        [pool.block.to_string()],
                    )
                    .map_err(StoreError::write)?;
                pool
            }
        };
        tx.commit()?;
        Ok(settled)
    }

    #[cfg(test)]
    pub(crate) fn pragma_synchronous(&self) -> i64 {
        self.conn
            .query_row("PRAGMA synchronous", [], |r| r.get(0))
            .unwrap_or(-1)
    }

    pub(crate) fn begin(&mut self) -> Result<SqliteTx<'_>, StoreError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(StoreError::write)?;
        Ok(SqliteTx { tx })
    }
}

/// Active leases that do not lie on whole blocks inside the pool: `?1` base, `?2` end, `?3`
/// block.
pub(crate) const OUTSIDE: &str = "state = 'active' AND NOT (uid_base >= ?1 AND \
     uid_base + size <= ?2 AND (uid_base - ?1) % ?3 = 0 AND size % ?3 = 0 AND size > 0)";

/// Leases other than `?4` created at or after `?1` on an id of `?3..?2`.
pub(crate) const HELD_SINCE: &str = "SELECT COUNT(*) FROM lease WHERE created_at >= ?1 \
     AND uid_base < ?2 AND uid_base + size > ?3 AND id <> ?4";

/// One write transaction; dropping it without [`SqliteTx::commit`] rolls everything back.
pub(crate) struct SqliteTx<'c> {
    tx: rusqlite::Transaction<'c>,
}

impl SqliteTx<'_> {
    fn one_lease(
        &self,
        sql: &str,
        args: impl rusqlite::Params,
    ) -> Result<Option<LeaseRecord>, StoreError> {
        let mut stmt = self.tx.prepare_cached(sql).map_err(StoreError::write)?;
        let mut rows = stmt.query(args).map_err(StoreError::write)?;
        match rows.next().map_err(StoreError::write)? {
            Some(row) => Ok(Some(lease_from(row)?)),
            None => Ok(None),
        }
    }

    pub(crate) fn lease_by_id(&mut self, id: i64) -> Result<Option<LeaseRecord>, StoreError> {
        self.one_lease(
            &format!("SELECT {LEASE_COLUMNS} FROM lease WHERE id = ?1"),
            [id],
        )
    }

    pub(crate) fn name_state(&mut self, name: &str) -> Result<NameState, StoreError> {
        Ok(NameState {
            active: self.active_lease(name)?,
            last_released: self.last_released(name)?,
        })
    }

    pub(crate) fn active_lease(&mut self, name: &str) -> Result<Option<LeaseRecord>, StoreError> {
        self.one_lease(
            &format!("SELECT {LEASE_COLUMNS} FROM lease WHERE name = ?1 AND state = 'active'"),
            [name],
        )
    }

    pub(crate) fn last_released(&mut self, name: &str) -> Result<Option<LeaseRecord>, StoreError> {
        self.one_lease(
            &format!(
                "SELECT {LEASE_COLUMNS} FROM lease WHERE name = ?1 AND state = 'released' \
                 ORDER BY released_at DESC, id DESC LIMIT 1"
            ),
            [name],
        )
    }

    pub(crate) fn range_held_since(
        &mut self,
        old: &LeaseRecord,
        since_ms: i64,
    ) -> Result<bool, StoreError> {
        let count: i64 = self
            .tx
            .prepare_cached(HELD_SINCE)
            .and_then(|mut s| {
                s.query_row(
                    params![
                        since_ms,
                        i64::from(old.uid_base) + i64::from(old.size),
                        i64::from(old.uid_base),
                        old.id
                    ],
                    |r| r.get(0),
                )
            })
            .map_err(StoreError::write)?;
        Ok(count > 0)
    }

    pub(crate) fn expired(&mut self, now_ms: i64) -> Result<Vec<LeaseRecord>, StoreError> {
        let sql = format!(
            "SELECT {LEASE_COLUMNS} FROM lease WHERE state = 'active' \
             AND expires_at IS NOT NULL AND expires_at <= ?1 ORDER BY expires_at"
        );
        let mut stmt = self.tx.prepare_cached(&sql).map_err(StoreError::write)?;
        let mut rows = stmt.query([now_ms]).map_err(StoreError::write)?;
        let mut out = Vec::new();
        while let Some(row) = rows.next().map_err(StoreError::write)? {
            out.push(lease_from(row)?);
        }
        Ok(out)
    }

    pub(crate) fn insert_lease(
        &mut self,
        new: &NewLease,
        block: u32,
    ) -> Result<LeaseRecord, StoreError> {
        let (labels, rlimits, namespaces) = new.json_columns()?;
        let to_i64 = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        self.tx
            .prepare_cached(
                "INSERT INTO lease (name, uid_base, gid_base, size, state, labels, ttl_seconds, \
                 created_at, expires_at, created_by, rlimits, namespaces, pids_max, max_processes) \
                 VALUES (?1, ?2, ?3, ?4, 'active', ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
            )
            .and_then(|mut s| {
                s.execute(params![
                    new.name,
                    i64::from(new.uid_base),
                    i64::from(new.gid_base),
                    i64::from(new.size),
                    labels,
                    new.ttl_seconds.map(i64::from),
                    new.created_at,
                    new.expires_at,
                    new.created_by.map(i64::from),
                    rlimits,
                    namespaces,
                    new.pids_max.map(to_i64),
                    new.max_processes.map(to_i64),
                ])
            })
            .map_err(StoreError::write)?;
        let id = self.tx.last_insert_rowid();
        let blocks = new.size / block.max(1);
        {
            let mut take = self
                .tx
                .prepare_cached(
                    "INSERT INTO block (start, lease_id, released_at) VALUES (?1, ?2, NULL) \
                     ON CONFLICT (start) DO UPDATE SET lease_id = excluded.lease_id, \
                     released_at = NULL WHERE block.lease_id IS NULL",
                )
                .map_err(StoreError::write)?;
            for i in 0..blocks {
                let start = u64::from(new.uid_base) + u64::from(i) * u64::from(block);
                let taken = take
                    .execute(params![i64::try_from(start).unwrap_or(i64::MAX), id])
                    .map_err(StoreError::write)?;
                if taken != 1 {
                    return Err(StoreError::BlockHeld { start });
                }
            }
        }
        self.event(
            new.created_at,
            EventKind::Create,
            id,
            &new.name,
            new.created_by,
            Some(&new.create_detail()),
        )?;
        Ok(new.clone().into_record(id))
    }

    pub(crate) fn renew(
        &mut self,
        lease: &LeaseRecord,
        expires_at: i64,
        now_ms: i64,
        caller: Option<u32>,
    ) -> Result<(), StoreError> {
        let done = self
            .tx
            .prepare_cached("UPDATE lease SET expires_at = ?1 WHERE id = ?2 AND state = 'active'")
            .and_then(|mut s| s.execute(params![expires_at, lease.id]))
            .map_err(StoreError::write)?;
        if done != 1 {
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
    }

    pub(crate) fn release(
        &mut self,
        lease: &LeaseRecord,
        kind: EventKind,
        purge: bool,
        now_ms: i64,
        caller: Option<u32>,
    ) -> Result<(), StoreError> {
        let done = self
            .tx
            .prepare_cached(
                "UPDATE lease SET state = 'released', released_at = ?1 \
                 WHERE id = ?2 AND state = 'active'",
            )
            .and_then(|mut s| s.execute(params![now_ms, lease.id]))
            .map_err(StoreError::write)?;
        if done != 1 {
            return Err(StoreError::NotActive { id: lease.id });
        }
        // Process rows live as long as their lease.
        self.tx
            .prepare_cached("DELETE FROM process WHERE lease_id = ?1")
            .and_then(|mut s| s.execute([lease.id]))
            .map_err(StoreError::write)?;
        let block_released_at = if purge { 0 } else { now_ms };
        self.tx
            .prepare_cached(
                "UPDATE block SET lease_id = NULL, released_at = ?1 WHERE lease_id = ?2",
            )
            .and_then(|mut s| s.execute(params![block_released_at, lease.id]))
            .map_err(StoreError::write)?;
        let detail = release_detail(lease, purge);
        self.event(now_ms, kind, lease.id, &lease.name, caller, Some(&detail))?;
        if purge {
            self.event(
                now_ms,
                EventKind::Purge,
                lease.id,
                &lease.name,
                caller,
                None,
            )?;
        }
        Ok(())
    }

    pub(crate) fn purge_released(
        &mut self,
        lease: &LeaseRecord,
        now_ms: i64,
        caller: Option<u32>,
    ) -> Result<(), StoreError> {
        self.tx
            .prepare_cached(
                "UPDATE block SET released_at = 0 WHERE lease_id IS NULL \
                 AND start >= ?1 AND start < ?2",
            )
            .and_then(|mut s| {
                s.execute(params![
                    i64::from(lease.uid_base),
                    i64::from(lease.uid_base) + i64::from(lease.size)
                ])
            })
            .map_err(StoreError::write)?;
        self.event(
            now_ms,
            EventKind::Purge,
            lease.id,
            &lease.name,
            caller,
            None,
        )
    }

    fn event(
        &mut self,
        at: i64,
        kind: EventKind,
        lease_id: i64,
        lease_name: &str,
        caller: Option<u32>,
        detail: Option<&str>,
    ) -> Result<(), StoreError> {
        self.tx
            .prepare_cached(
                "INSERT INTO event (at, kind, lease_id, lease_name, caller_uid, detail) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )
            .and_then(|mut s| {
                s.execute(params![
                    at,
                    kind.as_str(),
                    lease_id,
                    lease_name,
                    caller.map(i64::from),
                    detail
                ])
            })
            .map_err(StoreError::write)?;
        Ok(())
    }

    /// Commits; the changes are on disk (fsync'd, `synchronous=FULL`) when this returns `Ok`.
    pub(crate) fn commit(self) -> Result<(), StoreError> {
        self.tx.commit().map_err(StoreError::write)
    }
}
