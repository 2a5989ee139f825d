//! The SQLite back end: one database file per host, WAL mode, `synchronous=FULL` for leases.
//!
//! Reads go through a small pool of read-only sqlx connections ([`SqliteReader`]). Lease writes
//! go through one rusqlite connection ([`SqliteWriter`]) that the daemon drives from a thread of
//! its own: every statement of a group of requests then runs on that thread, with no hand-off
//! to another one (sqlx runs each SQLite statement on a worker thread of its own, and on these
//! VMs each such hand-off cost about as much as the statement). The file also holds what is
//! local to the host in every mode: process rows and their events.

pub(crate) mod open;
mod read;
mod write;

use std::time::Duration;

pub use open::APPLICATION_ID;
pub(crate) use open::open;
pub(crate) use read::{STALE_CAPPED, SqliteReader};
pub(crate) use write::{SqliteTx, SqliteWriter};

/// The migrations under the workspace's `migrations/`, embedded in the binary.
pub(crate) static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations");

/// How long a connection waits for another writer's lock before it reports `busy`.
pub(crate) const BUSY_TIMEOUT: Duration = Duration::from_secs(5);
