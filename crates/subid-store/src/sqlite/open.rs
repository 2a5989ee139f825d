//! Opening the database: files that are not subidd's (empty, truncated, foreign, read-only) are
//! refused by name before SQLite touches them; a new database is made whole beside its final
//! name and renamed into place, so an empty `subidd.db` is never one of ours.
//!
//! How a file is recognised as subidd's: new files carry [`APPLICATION_ID`] in their header
//! (`PRAGMA application_id`, offset 68, <https://www.sqlite.org/fileformat.html#application_id>).
//! Files made before the id existed carry 0 there; they are accepted when their
//! `_sqlx_migrations` table records subidd's first migration with its exact checksum and the
//! `lease`, `block` and `pool_meta` tables exist, and are stamped with the id once migrated.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{ConnectOptions, Connection};

use super::{BUSY_TIMEOUT, MIGRATOR, SqliteReader, SqliteWriter};
use crate::StoreError;

/// subidd's `PRAGMA application_id`: the bytes "subd".
pub const APPLICATION_ID: i32 = 0x7375_6264;

/// The tables every subidd database has had since its first migration.
const OUR_TABLES: [&str; 3] = ["lease", "block", "pool_meta"];

/// What the header of the file at the database's path says.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Found {
    /// No file: a new database is made.
    Missing,
    /// Our application id.
    Ours,
    /// A database without an application id: ours from before the id, or a stranger's.
    Unstamped,
    /// The file could not be read; SQLite says why when it opens it.
    Unreadable,
}

/// Opens (creating when absent) the database at `path`, applies migrations, and returns the
/// reads and the writer. An existing file that is not a subidd database, is empty, corrupt, or
/// cannot be written is refused with an error naming the file; it is never recreated.
pub(crate) async fn open(path: &Path) -> Result<(SqliteReader, SqliteWriter), StoreError> {
    let open_err = |source: sqlx::Error| StoreError::Open {
        target: path.display().to_string(),
        source: source.into(),
    };
    check_writable(path)?;
    match inspect(path)? {
        Found::Missing => create(path).await?,
        Found::Unstamped => recognise_unstamped(path).await?,
        Found::Ours | Found::Unreadable => {}
    }
    let options = options(path)?;
    let mut conn = SqliteConnection::connect_with(&options)
        .await
        .map_err(open_err)?;
    // Touch the file for real: a corrupt file fails here, not at the first request.
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
    // A database from before the application id was recognised above: stamp it, so that the
    // next start knows it by its header alone.
    let id: i32 = sqlx::query_scalar("PRAGMA application_id")
        .fetch_one(&mut conn)
        .await
        .map_err(open_err)?;
    if id != APPLICATION_ID {
        sqlx::query(&format!("PRAGMA application_id = {APPLICATION_ID}"))
            .execute(&mut conn)
            .await
            .map_err(StoreError::write)?;
        // Into the main file's header, where the next start reads it before SQLite opens.
        sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
            .execute(&mut conn)
            .await
            .map_err(StoreError::write)?;
    }
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

/// How every connection of the lease writer opens the file (never creating it: [`create`] does).
fn options(path: &Path) -> Result<SqliteConnectOptions, StoreError> {
    Ok(SqliteConnectOptions::from_str("sqlite://")
        .map_err(|source| StoreError::Open {
            target: path.display().to_string(),
            source: source.into(),
        })?
        .filename(path)
        .create_if_missing(false)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Full)
        .foreign_keys(true)
        .busy_timeout(BUSY_TIMEOUT))
}

/// `<path><suffix>`, e.g. the `-wal` file beside a database.
fn beside(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// Reads the header of the file at `path` without SQLite (which would make `-shm` and `-wal`
/// files beside a damaged one). Refuses an empty file, a file that is not an SQLite database or
/// is shorter than its header says (with no write-ahead log left to replay), a file whose
/// application id is another program's, and a missing database whose write-ahead log is still
/// there. SQLite's own check (`PRAGMA quick_check` in [`open`]) catches what this does not.
pub(crate) fn inspect(path: &Path) -> Result<Found, StoreError> {
    const MAGIC: &[u8; 16] = b"SQLite format 3\0";
    let damaged = |reason: String| StoreError::Damaged {
        path: path.to_path_buf(),
        reason,
    };
    let wal = beside(path, "-wal");
    let wal_pending = std::fs::metadata(&wal).is_ok_and(|m| m.len() > 0);
    let mut file = match std::fs::File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if wal_pending {
                // SQLite would replay that log into the new file it makes: a stranger's pages.
                return Err(damaged(format!(
                    "it is missing, but its write-ahead log {} is still there: the database \
                     was deleted or moved without it. Put the database back beside its log, or \
                     move the log away to start with no leases",
                    wal.display()
                )));
            }
            return Ok(Found::Missing);
        }
        Err(_) => return Ok(Found::Unreadable),
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    if len == 0 {
        return Err(damaged(
            "it is empty (0 bytes). subidd never leaves an empty database (it makes a new one \
             whole and renames it into place), so this one was truncated or replaced: restore \
             it from a backup. If no lease was ever made here, remove the file and subidd makes \
             a new one"
                .into(),
        ));
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
    if valid && !wal_pending && pages.saturating_mul(page_size) > len {
        return Err(damaged(format!(
            "malformed: its header says {pages} pages of {page_size} bytes, but the file holds \
             only {len} bytes (truncated?)"
        )));
    }
    let application_id = i32::from_be_bytes([header[68], header[69], header[70], header[71]]);
    match application_id {
        APPLICATION_ID => Ok(Found::Ours),
        0 => Ok(Found::Unstamped),
        other => Err(StoreError::Foreign {
            path: path.to_path_buf(),
            reason: format!(
                "its application id is {other:#010x}, another program's (subidd's is \
                 {APPLICATION_ID:#010x})"
            ),
        }),
    }
}

/// Accepts a database without an application id only when its schema is subidd's: the first
/// migration recorded with subidd's checksum, and subidd's tables. Reads without changing
/// anything: with no write-ahead log beside it, the file is opened `immutable` (no `-shm`,
/// no lock); with one, read-only, so that SQLite replays the log into what it reads.
async fn recognise_unstamped(path: &Path) -> Result<(), StoreError> {
    let open_err = |source: sqlx::Error| StoreError::Open {
        target: path.display().to_string(),
        source: source.into(),
    };
    let wal_pending = std::fs::metadata(beside(path, "-wal")).is_ok_and(|m| m.len() > 0);
    let options = SqliteConnectOptions::new()
        .filename(path)
        .read_only(true)
        .immutable(!wal_pending)
        .busy_timeout(BUSY_TIMEOUT)
        .disable_statement_logging();
    let mut conn = SqliteConnection::connect_with(&options)
        .await
        .map_err(open_err)?;
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' \
         ORDER BY name",
    )
    .fetch_all(&mut conn)
    .await
    .map_err(open_err)?;
    let first_checksum: Option<Vec<u8>> = if tables.iter().any(|t| t == "_sqlx_migrations") {
        sqlx::query_scalar("SELECT checksum FROM _sqlx_migrations WHERE version = 1 AND success")
            .fetch_optional(&mut conn)
            .await
            .map_err(open_err)?
    } else {
        None
    };
    let _ = conn.close().await;
    let ours_first = MIGRATOR
        .iter()
        .find(|m| m.version == 1)
        .map(|m| m.checksum.as_ref());
    let has_our_tables = OUR_TABLES.iter().all(|t| tables.iter().any(|n| n == t));
    if has_our_tables && first_checksum.is_some() && first_checksum.as_deref() == ours_first {
        return Ok(());
    }
    let reason = if tables.is_empty() {
        "it holds no tables: an empty SQLite database, not subidd's (subidd makes its database \
         whole, tables and all)"
            .to_string()
    } else if first_checksum.is_some() {
        format!(
            "its _sqlx_migrations table records another program's first migration (tables: {})",
            shorten(&tables)
        )
    } else {
        format!(
            "it has no subidd schema (tables: {}; subidd's are lease, block, pool_meta and \
             _sqlx_migrations)",
            shorten(&tables)
        )
    };
    Err(StoreError::Foreign {
        path: path.to_path_buf(),
        reason,
    })
}

/// At most eight names, then how many more.
fn shorten(names: &[String]) -> String {
    let mut text = names.iter().take(8).cloned().collect::<Vec<_>>().join(", ");
    if names.len() > 8 {
        text.push_str(&format!(" and {} more", names.len() - 8));
    }
    text
}

/// Makes a new database: schema and application id in `<path>.new`, checkpointed, fsync'd,
/// then linked to `path` (which fails if another process made one meanwhile: that one is
/// used) and the directory fsync'd. A crash leaves either no `path` or a whole database.
async fn create(path: &Path) -> Result<(), StoreError> {
    let staging = beside(path, ".new");
    let io_err = |what: &str, file: &Path, source: std::io::Error| StoreError::Damaged {
        path: path.to_path_buf(),
        reason: format!("cannot create it: {what} {}: {source}", file.display()),
    };
    // Leftovers of a creation that a crash interrupted: never a database anyone used.
    for suffix in ["", "-wal", "-shm", "-journal"] {
        let leftover = beside(&staging, suffix);
        match std::fs::remove_file(&leftover) {
            Ok(()) => {
                tracing::info!(file = %leftover.display(), "removed an unfinished new database")
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("removing", &leftover, e)),
        }
    }
    let open_err = |source: sqlx::Error| StoreError::Open {
        target: staging.display().to_string(),
        source: source.into(),
    };
    let mut conn = SqliteConnection::connect_with(&options(&staging)?.create_if_missing(true))
        .await
        .map_err(open_err)?;
    sqlx::query(&format!("PRAGMA application_id = {APPLICATION_ID}"))
        .execute(&mut conn)
        .await
        .map_err(StoreError::write)?;
    MIGRATOR
        .run(&mut conn)
        .await
        .map_err(|source| StoreError::Migrate {
            target: staging.display().to_string(),
            source: source.into(),
        })?;
    // Everything into the main file: it is renamed alone.
    sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
        .execute(&mut conn)
        .await
        .map_err(StoreError::write)?;
    conn.close().await.map_err(open_err)?;
    for suffix in ["-wal", "-shm"] {
        let side = beside(&staging, suffix);
        if std::fs::metadata(&side).is_ok_and(|m| m.len() > 0) && suffix == "-wal" {
            return Err(StoreError::Damaged {
                path: path.to_path_buf(),
                reason: format!(
                    "cannot create it: {} still holds pages after a checkpoint",
                    side.display()
                ),
            });
        }
        let _ = std::fs::remove_file(&side);
    }
    std::fs::File::open(&staging)
        .and_then(|f| f.sync_all())
        .map_err(|e| io_err("syncing", &staging, e))?;
    match std::fs::hard_link(&staging, path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            tracing::warn!(
                database = %path.display(),
                "another process made the database while this one did; using that one"
            );
        }
        // File systems without hard links: a rename, which replaces; nothing else makes the file.
        Err(_) => std::fs::rename(&staging, path).map_err(|e| io_err("renaming", &staging, e))?,
    }
    let _ = std::fs::remove_file(&staging);
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| io_err("syncing the directory", dir, e))?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::open;

    async fn sqlite(path: &Path, sql: &str) {
        let mut conn = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .connect()
            .await
            .expect("open with sqlite");
        sqlx::raw_sql(sql)
            .execute(&mut conn)
            .await
            .expect("run sql");
        conn.close().await.expect("close");
    }

    fn files(dir: &Path) -> Vec<(String, Vec<u8>)> {
        let mut all: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
            .expect("read dir")
            .flatten()
            .map(|e| {
                (
                    e.file_name().to_string_lossy().into_owned(),
                    std::fs::read(e.path()).expect("read"),
                )
            })
            .collect();
        all.sort();
        all
    }

    #[tokio::test]
    async fn a_new_database_carries_the_application_id_and_no_staging_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("subidd.db");
        let (store, writer) = open(&path).await.expect("create");
        drop((store, writer));
        let header = std::fs::read(&path).expect("read");
        assert_eq!(
            i32::from_be_bytes([header[68], header[69], header[70], header[71]]),
            APPLICATION_ID
        );
        assert!(!dir.path().join("subidd.db.new").exists(), "staging gone");
        assert_eq!(inspect(&path).expect("inspect"), Found::Ours);
        open(&path).await.expect("opens again");
    }

    #[tokio::test]
    async fn an_empty_file_is_refused_and_left_empty() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("subidd.db");
        std::fs::write(&path, b"").expect("touch");
        let err = open(&path).await.expect_err("empty refused");
        assert!(err.is_damaged(), "{err:?}");
        let text = err.to_string();
        assert!(
            text.contains("subidd.db") && text.contains("empty (0 bytes)"),
            "{text}"
        );
        assert_eq!(files(dir.path()), vec![("subidd.db".into(), Vec::new())]);
    }

    #[tokio::test]
    async fn foreign_databases_are_refused_untouched() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cases = [
            ("empty-schema.db", "PRAGMA user_version = 1;", "no tables"),
            (
                "notes.db",
                "CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT);",
                "no subidd schema (tables: notes",
            ),
            (
                "lookalike.db",
                "CREATE TABLE lease (id INTEGER); CREATE TABLE block (start INTEGER); \
                 CREATE TABLE pool_meta (key TEXT); CREATE TABLE _sqlx_migrations \
                 (version BIGINT PRIMARY KEY, description TEXT, installed_on TEXT, \
                 success BOOLEAN, checksum BLOB, execution_time BIGINT); \
                 INSERT INTO _sqlx_migrations VALUES (1, 'init', '', 1, x'00', 0);",
                "another program's first migration",
            ),
            (
                "other-app.db",
                "PRAGMA application_id = 1234; CREATE TABLE lease (id INTEGER);",
                "application id is 0x000004d2",
            ),
            (
                "wal-mode.db",
                "PRAGMA journal_mode = WAL; CREATE TABLE t (x);",
                "no subidd schema (tables: t",
            ),
        ];
        for (name, sql, says) in cases {
            let path = dir.path().join(name);
            sqlite(&path, sql).await;
            let before = files(dir.path());
            let err = open(&path).await.expect_err(name);
            let text = err.to_string();
            assert!(
                matches!(err, StoreError::Foreign { .. }) && err.is_damaged(),
                "{name}: {err:?}"
            );
            assert!(
                text.contains(name) && text.contains("not subidd's") && text.contains(says),
                "{name}: {text}"
            );
            assert_eq!(files(dir.path()), before, "{name}: nothing changed");
        }
    }

    #[tokio::test]
    async fn an_unstamped_subidd_database_is_accepted_and_stamped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("subidd.db");
        drop(open(&path).await.expect("create"));
        sqlite(&path, "PRAGMA application_id = 0;").await;
        assert_eq!(inspect(&path).expect("inspect"), Found::Unstamped);
        drop(open(&path).await.expect("an older subidd's database opens"));
        assert_eq!(inspect(&path).expect("inspect"), Found::Ours, "stamped");
    }

    #[tokio::test]
    async fn a_missing_database_beside_its_log_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("subidd.db");
        std::fs::write(dir.path().join("subidd.db-wal"), b"frames").expect("write wal");
        let err = open(&path).await.expect_err("refused");
        assert!(err.to_string().contains("write-ahead log"), "{err}");
        assert!(!path.exists(), "not created");
    }

    #[tokio::test]
    async fn leftovers_of_an_interrupted_creation_are_replaced() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("subidd.db");
        std::fs::write(dir.path().join("subidd.db.new"), b"half").expect("leftover");
        std::fs::write(dir.path().join("subidd.db.new-wal"), b"half").expect("leftover");
        drop(open(&path).await.expect("create"));
        assert!(!dir.path().join("subidd.db.new").exists());
        assert!(!dir.path().join("subidd.db.new-wal").exists());
        assert_eq!(inspect(&path).expect("inspect"), Found::Ours);
    }
}
