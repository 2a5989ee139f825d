//! `StoreError`: what can go wrong with a lease store, sorted by what the caller should do.
//!
//! No driver type appears in this enum: a database's own error travels as a [`BackendError`],
//! which keeps it as its `source()` (so logs show the whole chain) and carries the one thing the
//! layers above need from it, its [`Kind`].

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

/// SQLite primary result codes we tell apart (sqlite3.h).
const SQLITE_BUSY: u32 = 5;
const SQLITE_LOCKED: u32 = 6;
const SQLITE_READONLY: u32 = 8;
const SQLITE_IOERR: u32 = 10;
const SQLITE_CORRUPT: u32 = 11;
const SQLITE_FULL: u32 = 13;
const SQLITE_CANTOPEN: u32 = 14;
const SQLITE_CONSTRAINT: u32 = 19;
const SQLITE_NOTADB: u32 = 26;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open the store {target}: {source}")]
    Open {
        /// A file path, or a PostgreSQL URL without its password.
        target: String,
        #[source]
        source: BackendError,
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
    #[error("cannot migrate the store {target}: {source}")]
    Migrate {
        target: String,
        #[source]
        source: BackendError,
    },
    #[error("the disk holding the database is full: {source}")]
    Full {
        #[source]
        source: BackendError,
    },
    #[error("the database cannot be written: {source}")]
    Unwritable {
        #[source]
        source: BackendError,
    },
    #[error("the lease store {target} cannot be reached: {source}")]
    Unreachable {
        target: String,
        #[source]
        source: BackendError,
    },
    #[error("the lease store did not answer {what} within {after:?}")]
    TimedOut { what: &'static str, after: Duration },
    #[error("the process writer is busy; retry from a thread that may wait")]
    Contended,
    #[error("database read failed: {source}")]
    Read {
        #[source]
        source: BackendError,
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
    #[error("{reason}")]
    Refused { reason: String },
}

impl StoreError {
    /// Sorts an error met while writing: a full disk, a store that cannot be reached, or a
    /// database that cannot take writes.
    pub(crate) fn write(source: impl Into<BackendError>) -> StoreError {
        let source = source.into();
        match source.kind {
            Kind::Full => StoreError::Full { source },
            Kind::Connection => StoreError::Unreachable {
                target: String::new(),
                source,
            },
            _ => StoreError::Unwritable { source },
        }
    }

    /// Sorts an error met while reading: a store that cannot be reached, or a failed read.
    pub(crate) fn read(source: impl Into<BackendError>) -> StoreError {
        let source = source.into();
        match source.kind {
            Kind::Connection => StoreError::Unreachable {
                target: String::new(),
                source,
            },
            _ => StoreError::Read { source },
        }
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

    /// True when the store cannot be reached or did not answer in time (a PostgreSQL server that
    /// is down, restarting, or cut off): nothing was written; retry later.
    pub fn is_unreachable(&self) -> bool {
        matches!(
            self,
            StoreError::Unreachable { .. } | StoreError::TimedOut { .. }
        )
    }

    /// True when the database file itself is damaged, not a stranger to subidd, or unreadable:
    /// an operator must look at it; subidd never recreates it.
    pub fn is_damaged(&self) -> bool {
        match self {
            StoreError::Damaged { .. }
            | StoreError::Foreign { .. }
            | StoreError::NotWritable { .. } => true,
            StoreError::Open { source, .. }
            | StoreError::Read { source }
            | StoreError::Full { source }
            | StoreError::Unwritable { source } => source.kind == Kind::Damaged,
            _ => false,
        }
    }

    /// True when another writer holds the lock for longer than the busy timeout.
    pub fn is_busy(&self) -> bool {
        match self {
            StoreError::Unwritable { source } | StoreError::Read { source } => {
                source.kind == Kind::Busy
            }
            _ => false,
        }
    }

    /// True when a uniqueness or exclusion constraint refused the write.
    pub fn is_constraint(&self) -> bool {
        match self {
            StoreError::Unwritable { source } => source.kind == Kind::Constraint,
            _ => false,
        }
    }
}

/// What kind of failure a database reported, as far as the caller must tell them apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The disk (or the server's) is full.
    Full,
    /// Another writer holds a lock for longer than the wait allows.
    Busy,
    /// The file is corrupt, foreign, read-only or cannot be opened.
    Damaged,
    /// A uniqueness, exclusion or check constraint refused the write.
    Constraint,
    /// The server cannot be reached, went away, or ended the session.
    Connection,
    /// Anything else.
    Other,
}

/// A database driver's error, kept whole as the source, with its [`Kind`].
pub struct BackendError {
    kind: Kind,
    inner: Box<dyn std::error::Error + Send + Sync + 'static>,
}

impl BackendError {
    /// What kind of failure this is.
    pub fn kind(&self) -> Kind {
        self.kind
    }

    pub(crate) fn new(
        kind: Kind,
        inner: impl Into<Box<dyn std::error::Error + Send + Sync + 'static>>,
    ) -> BackendError {
        BackendError {
            kind,
            inner: inner.into(),
        }
    }
}

impl fmt::Debug for BackendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}: {:?}", self.kind, self.inner)
    }
}

impl fmt::Display for BackendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.inner.fmt(f)
    }
}

impl std::error::Error for BackendError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.inner.source()
    }
}

impl From<sqlx::Error> for BackendError {
    fn from(error: sqlx::Error) -> BackendError {
        BackendError::new(sqlx_kind(&error), error)
    }
}

impl From<rusqlite::Error> for BackendError {
    fn from(error: rusqlite::Error) -> BackendError {
        let kind = match &error {
            rusqlite::Error::SqliteFailure(e, _) => {
                sqlite_kind(u32::try_from(e.extended_code & 0xff).ok())
            }
            _ => Kind::Other,
        };
        BackendError::new(kind, error)
    }
}

impl From<sqlx::migrate::MigrateError> for BackendError {
    fn from(error: sqlx::migrate::MigrateError) -> BackendError {
        let kind = match &error {
            sqlx::migrate::MigrateError::Execute(e) => sqlx_kind(e),
            _ => Kind::Other,
        };
        BackendError::new(kind, error)
    }
}

/// Sorts an sqlx error: SQLite's result codes, PostgreSQL's SQLSTATEs, and the transport.
fn sqlx_kind(error: &sqlx::Error) -> Kind {
    match error {
        sqlx::Error::Database(db) => {
            let Some(code) = db.code() else {
                return Kind::Other;
            };
            // PostgreSQL reports a five-character SQLSTATE, SQLite its numeric result code.
            if db
                .try_downcast_ref::<sqlx::postgres::PgDatabaseError>()
                .is_some()
            {
                pg_kind(&code)
            } else {
                sqlite_kind(code.parse::<u32>().ok().map(|n| n & 0xff))
            }
        }
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => Kind::Connection,
        _ => Kind::Other,
    }
}

fn sqlite_kind(primary: Option<u32>) -> Kind {
    match primary {
        Some(SQLITE_FULL) => Kind::Full,
        Some(SQLITE_BUSY | SQLITE_LOCKED) => Kind::Busy,
        Some(SQLITE_CORRUPT | SQLITE_NOTADB | SQLITE_READONLY | SQLITE_CANTOPEN | SQLITE_IOERR) => {
            Kind::Damaged
        }
        Some(SQLITE_CONSTRAINT) => Kind::Constraint,
        _ => Kind::Other,
    }
}

/// PostgreSQL error codes (Appendix A of the PostgreSQL documentation).
fn pg_kind(sqlstate: &str) -> Kind {
    match sqlstate {
        // disk_full, out_of_memory, insufficient_resources
        "53100" | "53200" | "53000" => Kind::Full,
        // deadlock_detected, serialization_failure
        "40P01" | "40001" => Kind::Busy,
        // unique_violation, exclusion_violation, check_violation, foreign_key_violation
        "23505" | "23P01" | "23514" | "23503" => Kind::Constraint,
        // lock_not_available (lock_timeout: another host holds the fleet's write lock too
        // long), query_canceled (statement_timeout), admin_shutdown, crash_shutdown,
        // cannot_connect_now, idle_in_transaction_session_timeout, read_only_sql_transaction
        // (a standby after a failover), too_many_connections
        "55P03" | "57014" | "57P01" | "57P02" | "57P03" | "25P03" | "25006" | "53300" => {
            Kind::Connection
        }
        // connection_exception and its subclasses
        s if s.starts_with("08") => Kind::Connection,
        _ => Kind::Other,
    }
}
