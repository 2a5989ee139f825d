//! `StoreError`: what can go wrong with the database, sorted by what the caller should do.

use std::path::PathBuf;

/// SQLite primary result codes we tell apart (sqlite3.h).
const SQLITE_READONLY: u32 = 8;
const SQLITE_IOERR: u32 = 10;
const SQLITE_CORRUPT: u32 = 11;
const SQLITE_FULL: u32 = 13;
const SQLITE_CANTOPEN: u32 = 14;
const SQLITE_NOTADB: u32 = 26;
const SQLITE_BUSY: u32 = 5;
const SQLITE_LOCKED: u32 = 6;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open database {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: sqlx::Error,
    },
    #[error("database {path} cannot be written: {reason} ({source})")]
    NotWritable {
        path: PathBuf,
        reason: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("database {path} is damaged: {reason}")]
    Damaged { path: PathBuf, reason: String },
    /// A valid SQLite database that is not subidd's (another program's application id, or no
    /// subidd schema): refused, never migrated into.
    #[error("database {path} is not subidd's: {reason}")]
    Foreign { path: PathBuf, reason: String },
    #[error("cannot migrate database {path}: {source}")]
    Migrate {
        path: PathBuf,
        #[source]
        source: sqlx::migrate::MigrateError,
    },
    #[error("the disk holding the database is full: {source}")]
    Full {
        #[source]
        source: DbError,
    },
    #[error("the database cannot be written: {source}")]
    Unwritable {
        #[source]
        source: DbError,
    },
    #[error("the process writer is busy; retry from a thread that may wait")]
    Contended,
    #[error("database read failed: {source}")]
    Read {
        #[source]
        source: sqlx::Error,
    },
    #[error("block starting at host id {start} already has a holder")]
    BlockHeld { start: u64 },
    #[error("lease {id} is not active")]
    NotActive { id: i64 },
    #[error("stored value of {what} is invalid: {value:?}")]
    Invalid { what: String, value: String },
    #[error("cannot encode a value for the database: {source}")]
    Encode {
        #[source]
        source: serde_json::Error,
    },
}

impl StoreError {
    /// Sorts an error met while writing: a full disk, or a database that cannot take writes.
    pub(crate) fn write(source: impl Into<DbError>) -> StoreError {
        let source = source.into();
        match source.primary_code() {
            Some(SQLITE_FULL) => StoreError::Full { source },
            _ => StoreError::Unwritable { source },
        }
    }

    pub(crate) fn read(source: sqlx::Error) -> StoreError {
        StoreError::Read { source }
    }

    pub(crate) fn encode(source: serde_json::Error) -> StoreError {
        StoreError::Encode { source }
    }

    /// True when a write that must not wait found the connection or the write lock taken (see
    /// [`crate::ProcessWriter`]); retry it where waiting is allowed.
    pub fn is_contended(&self) -> bool {
        matches!(self, StoreError::Contended)
    }

    /// True when the disk is full: the caller should answer `storage_full`.
    pub fn is_full(&self) -> bool {
        matches!(self, StoreError::Full { .. })
    }

    /// True when the database file itself is damaged, not a stranger to subidd, or unreadable:
    /// an operator must look at it; subidd never recreates it.
    pub fn is_damaged(&self) -> bool {
        let code = match self {
            StoreError::Damaged { .. }
            | StoreError::Foreign { .. }
            | StoreError::NotWritable { .. } => return true,
            StoreError::Open { source, .. } | StoreError::Read { source } => primary_code(source),
            StoreError::Full { source } | StoreError::Unwritable { source } => {
                source.primary_code()
            }
            _ => return false,
        };
        matches!(
            code,
            Some(SQLITE_CORRUPT | SQLITE_NOTADB | SQLITE_READONLY | SQLITE_CANTOPEN | SQLITE_IOERR)
        )
    }

    /// True when another process holds the write lock for longer than the busy timeout.
    pub fn is_busy(&self) -> bool {
        let code = match self {
            StoreError::Unwritable { source } => source.primary_code(),
            StoreError::Read { source } => primary_code(source),
            _ => return false,
        };
        matches!(code, Some(SQLITE_BUSY | SQLITE_LOCKED))
    }
}

/// A failed write, from either connection kind: the lease writer's (sqlx) or the process
/// writer's (rusqlite, see [`crate::ProcessWriter`]).
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error(transparent)]
    Sqlx(#[from] sqlx::Error),
    #[error(transparent)]
    Sqlite(#[from] rusqlite::Error),
}

impl DbError {
    /// The primary SQLite result code, when SQLite gave one.
    fn primary_code(&self) -> Option<u32> {
        match self {
            DbError::Sqlx(e) => primary_code(e),
            DbError::Sqlite(rusqlite::Error::SqliteFailure(e, _)) => {
                u32::try_from(e.extended_code & 0xff).ok()
            }
            DbError::Sqlite(_) => None,
        }
    }
}

/// The primary SQLite result code of a database error (the low byte of the extended code).
fn primary_code(error: &sqlx::Error) -> Option<u32> {
    let sqlx::Error::Database(db) = error else {
        return None;
    };
    let code: u32 = db.code()?.parse().ok()?;
    Some(code & 0xff)
}
