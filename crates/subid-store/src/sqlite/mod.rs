//! The SQLite back end: one database file per host, WAL mode, `synchronous=FULL` for leases.
//!
//! Reads go through a small pool of read-only sqlx connections ([`SqliteReader`]). Lease writes
//! go through one rusqlite connection ([`SqliteWriter`]) that the daemon drives from a thread of
//! its own: every statement of a group of requests then runs on that thread, with no hand-off
//! to another one (sqlx runs each SQLite statement on a worker thread of its own, and on these
//! VMs each such hand-off cost about as much as the statement). The file also holds what is
//! local to the host in every mode: process rows and their events.

mod read;
mod write;

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use sqlx::Connection;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous,
};

pub(crate) use read::{STALE_CAPPED, SqliteReader};
pub(crate) use write::{SqliteTx, SqliteWriter};

use crate::StoreError;

/// The migrations under the workspace's `migrations/`, embedded in the binary.
pub(crate) static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations");

/// How long a connection waits for another writer's lock before it reports `busy`.
pub(crate) const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Opens (creating when absent) the database at `path`, applies migrations, and returns the read
/// pool and the writer. An existing file that is not a subidd database, is corrupt, or cannot be
/// written is refused with an error naming the file; it is never recreated.
pub(crate) async fn open(path: &Path) -> Result<(SqliteReader, SqliteWriter), StoreError> {
    let open_err = |source: sqlx::Error| StoreError::Open {
        target: path.display().to_string(),
        source: source.into(),
    };
    check_writable(path)?;
    check_header(path)?;
    let options = SqliteConnectOptions::from_str("sqlite://")
        .map_err(open_err)?
        .filename(path)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Full)
        .foreign_keys(true)
        .busy_timeout(BUSY_TIMEOUT);
    let mut conn = SqliteConnection::connect_with(&options)
        .await
        .map_err(open_err)?;
    // Touch the file for real: a corrupt or foreign file fails here, not at the first request.
    sqlx::query("PRAGMA quick_check")
        .fetch_all(&mut conn)
        .await
        .map_err(open_err)?;
    MIGRATOR
        .run(&mut conn)
        .await
        .map_err(|source| StoreError::Migrate {
            target: path.display().to_string(),
            source: source.into(),
        })?;
    conn.close().await.map_err(open_err)?;
    // Read connections keep a small page cache each (SQLite's default is 2 MiB): a list of
    // every lease walks the whole table, and the daemon's memory must not grow with it.
    let readers = SqlitePoolOptions::new()
        .max_connections(4)
        .min_connections(1)
        .connect_with(
            options
                .read_only(true)
                .create_if_missing(false)
                .pragma("cache_size", "-512"),
        )
        .await
        .map_err(open_err)?;
    let writer = SqliteWriter::open(path)?;
    Ok((SqliteReader::new(readers, path), writer))
}

/// Refuses an existing, non-empty file that is not an SQLite database or is shorter than its
/// header says (with no write-ahead log left to replay), before SQLite opens it (and makes its `-shm` and `-wal` files beside it).
/// SQLite's own check (`PRAGMA quick_check` in [`open`]) catches what this does not.
pub(crate) fn check_header(path: &Path) -> Result<(), StoreError> {
    use std::io::Read;
    const MAGIC: &[u8; 16] = b"SQLite format 3\0";
    let damaged = |reason: String| StoreError::Damaged {
        path: path.to_path_buf(),
        reason,
    };
    let Ok(mut file) = std::fs::File::open(path) else {
        // Missing (it is created) or unreadable (SQLite says why).
        return Ok(());
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    if len == 0 {
        return Ok(());
    }
    let mut header = [0u8; 100];
    if len < 100 || file.read_exact(&mut header).is_err() {
        return Err(damaged(format!(
            "not a database: {len} bytes, shorter than an SQLite header (truncated?)"
        )));
    }
    if &header[..16] != MAGIC {
        return Err(damaged("not a database: no SQLite header".into()));
    }
    // Page size: 2 bytes at 16 (1 means 65536). Size in pages: 4 bytes at 28, valid when the
    // change counter (24) equals version-valid-for (92) (https://www.sqlite.org/fileformat.html).
    let page_size = match u16::from_be_bytes([header[16], header[17]]) {
        1 => 65_536,
        n => u64::from(n),
    };
    let pages = u64::from(u32::from_be_bytes([
        header[28], header[29], header[30], header[31],
    ]));
    let valid = header[24..28] == header[92..96] && pages > 0;
    // A crash during a checkpoint can leave the header (page 1, written first) ahead of the
    // pages still to be copied; the write-ahead log holds them and SQLite replays it at open. So
    // the size is only a sign of truncation when there is no log to replay.
    let mut wal = path.as_os_str().to_owned();
    wal.push("-wal");
    let wal_pending = std::fs::metadata(&wal).is_ok_and(|m| m.len() > 0);
    if valid && !wal_pending && pages.saturating_mul(page_size) > len {
        return Err(damaged(format!(
            "malformed: its header says {pages} pages of {page_size} bytes, but the file holds \
             only {len} bytes (truncated?)"
        )));
    }
    Ok(())
}

/// Refuses an existing database file that cannot be opened for writing, saying why (SQLite
/// itself would only say "readonly database" or "unable to open", or open it read-only and fail
/// at the first write). Opening for writing changes nothing in the file.
fn check_writable(path: &Path) -> Result<(), StoreError> {
    if !path.exists() {
        return Ok(());
    }
    match std::fs::OpenOptions::new().write(true).open(path) {
        Ok(_) => Ok(()),
        Err(source) => {
            let reason = match source.kind() {
                std::io::ErrorKind::ReadOnlyFilesystem => {
                    "the file system holding it is mounted read-only"
                }
                std::io::ErrorKind::PermissionDenied => {
                    "permission denied by its owner or mode, or an immutable or append-only \
                     attribute (lsattr shows it; chattr -i clears it)"
                }
                _ => "it cannot be opened for writing",
            };
            Err(StoreError::NotWritable {
                path: path.to_path_buf(),
                reason,
                source,
            })
        }
    }
}
