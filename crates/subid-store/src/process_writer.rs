//! Process rows, written on the caller's thread through a connection of their own.
//!
//! A spawn records its process before it answers, and a process's exit is recorded before a
//! waiting client hears of it. Through the lease writer (a tokio task driving an sqlx
//! connection, which runs every statement on a thread of its own) each such row cost four
//! thread hand-offs; on a VM whose idle CPUs take 0.1-0.3 ms to wake, that was most of the
//! daemon's share of a spawn. Here the caller runs the statement itself: one autocommit
//! `INSERT` or `UPDATE` on a second SQLite connection, about 20-80 us.
//!
//! Durability: `synchronous=NORMAL` in WAL mode, so a row survives a crash of the daemon but
//! not a power loss. That is enough for process rows (after a power loss every process is gone
//! anyway, and the next start marks the rows it cannot find as lost); lease commits stay
//! `FULL` on the lease writer's connection.
//!
//! Both connections write the same file; SQLite's write lock orders them. A caller on an async
//! runtime's worker thread must never wait for that lock: the lease writer that holds it may
//! need that very worker to reach its commit. So every write has two modes: `wait = false`
//! returns [`StoreError::Contended`] at once when another caller has this connection or the
//! lease writer has the write lock (the caller then retries with `wait = true` from a thread
//! that may block), and `wait = true` waits for the lock in steps of 50 us (a lease commit holds
//! it for about one fsync) up to 5 s. The lease writer's connection keeps SQLite's own busy
//! handler.

use std::path::Path;
use std::sync::{Mutex, MutexGuard, TryLockError};
use std::time::{Duration, Instant};

use rusqlite::{Connection, OpenFlags, params};

use crate::error::StoreError;
use crate::record::{LeaseRecord, ProcessRecord, ProcessState};
use subid_core::LeaseState;

/// How long a write waits for the lease writer to let go of the write lock.
const BUSY_WAIT: Duration = Duration::from_secs(5);
/// One step of that wait.
const BUSY_STEP: Duration = Duration::from_micros(50);

const INSERT: &str = "INSERT INTO process (id, lease_id, lease_name, pid, start_ticks, boot_id, \
     host_uid, host_gid, argv, state, exit_code, signal, started_at, ended_at) \
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)";

/// A copy of a fleet's lease, by its id there.
const MIRROR: &str = "INSERT INTO lease (id, name, uid_base, gid_base, size, state, labels, \
     ttl_seconds, created_at, expires_at, released_at, created_by, rlimits, namespaces, pids_max, \
     max_processes) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16) \
     ON CONFLICT (id) DO UPDATE SET state = excluded.state, labels = excluded.labels, \
     ttl_seconds = excluded.ttl_seconds, expires_at = excluded.expires_at, \
     released_at = excluded.released_at";

const FINISH: &str = "UPDATE process SET state = ?1, exit_code = ?2, signal = ?3, ended_at = ?4 \
     WHERE id = ?5 AND state = 'running'";

/// How a process ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessEnd {
    pub state: ProcessState,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub ended_at: i64,
}

/// A process row written but not committed (see [`ProcessWriter::begin_insert`]).
#[derive(Debug)]
pub struct PendingRow<'a> {
    conn: Option<MutexGuard<'a, Connection>>,
}

impl PendingRow<'_> {
    /// Commits the row.
    pub fn commit(mut self) -> Result<(), StoreError> {
        let Some(conn) = self.conn.take() else {
            return Ok(());
        };
        let _mode = Mode::set(true);
        let result = conn.execute_batch("COMMIT").map(|()| 0);
        settle(&conn, result)
    }
}

impl Drop for PendingRow<'_> {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take()
            && !conn.is_autocommit()
        {
            let _ = conn.execute_batch("ROLLBACK");
        }
    }
}

/// Runs [`INSERT`] for `p` (its argv already encoded) on `conn`.
fn run_insert(conn: &Connection, p: &ProcessRecord, argv: &str) -> rusqlite::Result<usize> {
    conn.prepare_cached(INSERT)?.execute(params![
        p.id,
        p.lease_id,
        p.lease_name,
        i64::from(p.pid),
        i64::try_from(p.start_ticks).unwrap_or(i64::MAX),
        p.boot_id,
        i64::from(p.host_uid),
        i64::from(p.host_gid),
        argv,
        p.state.as_str(),
        p.exit_code.map(i64::from),
        p.signal.map(i64::from),
        p.started_at,
        p.ended_at,
    ])
}

/// Writes process rows synchronously (see the module docs). Shared by every thread that spawns
/// or reaps; one statement at a time.
#[derive(Debug)]
pub struct ProcessWriter {
    conn: Mutex<Connection>,
}

thread_local! {
    /// Whether the statement running on this thread may wait for the write lock (read by the
    /// busy handler, which SQLite calls on the thread that runs the statement).
    static WAITING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

impl ProcessWriter {
    /// Opens a second connection to a database that [`crate::open`] has checked and migrated;
    /// it never creates one.
    pub fn open(path: &Path) -> Result<ProcessWriter, StoreError> {
        let open_err = |source: rusqlite::Error| StoreError::Damaged {
            path: path.to_path_buf(),
            reason: format!("cannot open a second connection for process rows: {source}"),
        };
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE
                | OpenFlags::SQLITE_OPEN_NO_MUTEX
                | OpenFlags::SQLITE_OPEN_URI,
        )
        .map_err(open_err)?;
        conn.execute_batch(
            "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; PRAGMA foreign_keys = ON;",
        )
        .map_err(open_err)?;
        conn.busy_handler(Some(busy_wait)).map_err(open_err)?;
        Ok(ProcessWriter {
            conn: Mutex::new(conn),
        })
    }

    /// Records a process that is now running (see the module docs for `wait`).
    pub fn insert(&self, p: &ProcessRecord, wait: bool) -> Result<(), StoreError> {
        let argv = serde_json::to_string(&p.argv).map_err(StoreError::encode)?;
        let conn = self.conn(wait)?;
        let _mode = Mode::set(wait);
        let result = run_insert(&conn, p, &argv);
        settle(&conn, result)
    }

    /// Writes the row of a process that has just been cloned but may not exec, in a
    /// transaction left open: [`PendingRow::commit`] once it has exec'd, and a dropped
    /// `PendingRow` rolls back (it never ran). The spawn path writes it while the child sets
    /// itself up, so the commit after the exec is all that is left of it. Waits for the write
    /// lock (call from a thread that may block); holds this connection and SQLite's write lock
    /// until committed or dropped, so keep that short.
    pub fn begin_insert(&self, p: &ProcessRecord) -> Result<PendingRow<'_>, StoreError> {
        let argv = serde_json::to_string(&p.argv).map_err(StoreError::encode)?;
        let conn = self.conn(true)?;
        let _mode = Mode::set(true);
        let result = conn
            .execute_batch("BEGIN IMMEDIATE")
            .and_then(|()| run_insert(&conn, p, &argv));
        settle(&conn, result)?;
        Ok(PendingRow { conn: Some(conn) })
    }

    /// Records how a running process ended (`Exited` or `Lost`). A process already ended is
    /// left as it is. See the module docs for `wait`.
    pub fn finish(
        &self,
        id: &str,
        state: ProcessState,
        exit_code: Option<i32>,
        signal: Option<i32>,
        ended_at: i64,
        wait: bool,
    ) -> Result<(), StoreError> {
        let conn = self.conn(wait)?;
        let _mode = Mode::set(wait);
        let result = conn.prepare_cached(FINISH).and_then(|mut stmt| {
            stmt.execute(params![
                state.as_str(),
                exit_code.map(i64::from),
                signal.map(i64::from),
                ended_at,
                id,
            ])
        });
        settle(&conn, result)
    }

    /// Keeps a copy of a lease of a fleet's store in this host's file: process rows name it,
    /// and the host can still read it while the store is out of reach. An active copy replaces
    /// any other active copy of the name (released meanwhile by another host). Waits for the
    /// lock; call from a thread that may block.
    pub fn mirror(&self, lease: &LeaseRecord, now_ms: i64) -> Result<(), StoreError> {
        self.mirror_all(std::slice::from_ref(lease), now_ms)
    }

    /// [`ProcessWriter::mirror`] of several leases in one transaction.
    pub fn mirror_all(&self, leases: &[LeaseRecord], now_ms: i64) -> Result<(), StoreError> {
        if leases.is_empty() {
            return Ok(());
        }
        let mut columns = Vec::with_capacity(leases.len());
        for lease in leases {
            columns.push((
                serde_json::to_string(&lease.labels).map_err(StoreError::encode)?,
                serde_json::to_string(&lease.rlimits).map_err(StoreError::encode)?,
                serde_json::to_string(&lease.namespaces).map_err(StoreError::encode)?,
            ));
        }
        let to_i64 = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        let mut conn = self.conn(true)?;
        let _mode = Mode::set(true);
        let result = (|| {
            let tx = conn.transaction()?;
            for (lease, (labels, rlimits, namespaces)) in leases.iter().zip(&columns) {
                if lease.state == LeaseState::Active {
                    tx.prepare_cached(
                        "UPDATE lease SET state = 'released', released_at = ?3 \
                         WHERE name = ?1 AND state = 'active' AND id <> ?2",
                    )?
                    .execute(params![lease.name, lease.id, now_ms])?;
                }
                tx.prepare_cached(MIRROR)?.execute(params![
                    lease.id,
                    lease.name,
                    i64::from(lease.uid_base),
                    i64::from(lease.gid_base),
                    i64::from(lease.size),
                    lease.state.as_str(),
                    labels,
                    lease.ttl_seconds.map(i64::from),
                    lease.created_at,
                    lease.expires_at,
                    lease.released_at,
                    lease.created_by.map(i64::from),
                    rlimits,
                    namespaces,
                    lease.pids_max.map(to_i64),
                    lease.max_processes.map(to_i64),
                ])?;
            }
            tx.commit()
        })();
        settle(&conn, result.map(|()| 0))
    }

    /// Brings the copies this file has of these leases up to date (leases it has no copy of
    /// are left out). Returns how many copies changed.
    pub fn refresh_mirror(&self, leases: &[LeaseRecord], now_ms: i64) -> Result<usize, StoreError> {
        if leases.is_empty() {
            return Ok(0);
        }
        let ids = serde_json::to_string(&leases.iter().map(|l| l.id).collect::<Vec<_>>())
            .map_err(StoreError::encode)?;
        let known: std::collections::HashSet<i64> = {
            let conn = self.conn(true)?;
            let mut stmt = conn
                .prepare_cached(
                    "SELECT id FROM lease WHERE id IN (SELECT value FROM json_each(?1))",
                )
                .map_err(StoreError::read)?;
            let found = stmt
                .query_map([ids], |r| r.get::<_, i64>(0))
                .map_err(StoreError::read)?;
            found.collect::<Result<_, _>>().map_err(StoreError::read)?
        };
        let known: Vec<LeaseRecord> = leases
            .iter()
            .filter(|l| known.contains(&l.id))
            .cloned()
            .collect();
        self.mirror_all(&known, now_ms)?;
        Ok(known.len())
    }

    /// Removes this host's process rows of a lease (released fleet-wide). Waits for the lock.
    pub fn delete_processes(&self, lease_id: i64) -> Result<(), StoreError> {
        let conn = self.conn(true)?;
        let _mode = Mode::set(true);
        let result = conn
            .prepare_cached("DELETE FROM process WHERE lease_id = ?1")
            .and_then(|mut s| s.execute([lease_id]));
        settle(&conn, result)
    }

    /// Sets a value of this file's `pool_meta`. Waits for the lock.
    pub fn set_meta(&self, key: &str, value: &str) -> Result<(), StoreError> {
        let conn = self.conn(true)?;
        let _mode = Mode::set(true);
        let result = conn
            .prepare_cached(
                "INSERT INTO pool_meta (key, value) VALUES (?1, ?2) \
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            )
            .and_then(|mut s| s.execute([key, value]));
        settle(&conn, result)
    }

    /// The connection; without `wait`, only if nobody else has it now.
    pub(crate) fn conn(&self, wait: bool) -> Result<MutexGuard<'_, Connection>, StoreError> {
        // A panic while holding the lock cannot leave a statement half-run: SQLite rolls back.
        if wait {
            return Ok(self.conn.lock().unwrap_or_else(|e| e.into_inner()));
        }
        match self.conn.try_lock() {
            Ok(guard) => Ok(guard),
            Err(TryLockError::Poisoned(e)) => Ok(e.into_inner()),
            Err(TryLockError::WouldBlock) => Err(StoreError::Contended),
        }
    }
}

/// Sets, for the statement about to run on this thread, whether the busy handler may wait.
struct Mode;

impl Mode {
    fn set(wait: bool) -> Mode {
        WAITING.with(|w| w.set(wait));
        Mode
    }
}

impl Drop for Mode {
    fn drop(&mut self) {
        WAITING.with(|w| w.set(false));
    }
}

/// Turns a statement's outcome into the store's error; after a failure, makes sure no
/// transaction stays open on the connection (a failed autocommit statement rolls itself back,
/// but a full disk may leave the journal mid-way), so the next write starts clean.
fn settle(conn: &Connection, result: rusqlite::Result<usize>) -> Result<(), StoreError> {
    match result {
        Ok(_) => Ok(()),
        Err(error) => {
            if !conn.is_autocommit() {
                let _ = conn.execute_batch("ROLLBACK");
            }
            let busy = matches!(
                &error,
                rusqlite::Error::SqliteFailure(e, _)
                    if matches!(e.code, rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
            );
            if busy && !WAITING.with(|w| w.get()) {
                return Err(StoreError::Contended);
            }
            Err(StoreError::write(error))
        }
    }
}

/// SQLite's busy handler: give up at once unless this statement may wait; else sleep one step
/// and try again, until [`BUSY_WAIT`] has passed.
fn busy_wait(attempt: i32) -> bool {
    if !WAITING.with(|w| w.get()) {
        return false;
    }
    thread_local! {
        static SINCE: std::cell::Cell<Option<Instant>> = const { std::cell::Cell::new(None) };
    }
    let since = SINCE.with(|s| {
        if attempt == 0 || s.get().is_none() {
            s.set(Some(Instant::now()));
        }
        s.get().unwrap_or_else(Instant::now)
    });
    if since.elapsed() >= BUSY_WAIT {
        return false;
    }
    std::thread::sleep(BUSY_STEP);
    true
}
