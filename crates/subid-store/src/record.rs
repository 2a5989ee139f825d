//! The rows the store hands out: leases, blocks and history events.

use std::collections::BTreeMap;

use sqlx::Row;
use sqlx::sqlite::SqliteRow;
use subid_core::LeaseState;

use crate::{StoreError, get_labels, get_opt_u32, get_u32};

/// A lease as stored. Times are unix milliseconds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseRecord {
    pub id: i64,
    pub name: String,
    pub uid_base: u32,
    pub gid_base: u32,
    pub size: u32,
    pub state: LeaseState,
    pub labels: BTreeMap<String, String>,
    pub ttl_seconds: Option<u32>,
    pub created_at: i64,
    pub expires_at: Option<i64>,
    pub released_at: Option<i64>,
    pub created_by: Option<u32>,
}

impl LeaseRecord {
    pub(crate) fn from_row(row: &SqliteRow) -> Result<LeaseRecord, StoreError> {
        let state: String = row.try_get("state").map_err(StoreError::read)?;
        Ok(LeaseRecord {
            id: row.try_get("id").map_err(StoreError::read)?,
            name: row.try_get("name").map_err(StoreError::read)?,
            uid_base: get_u32(row, "uid_base")?,
            gid_base: get_u32(row, "gid_base")?,
            size: get_u32(row, "size")?,
            state: LeaseState::parse(&state).ok_or(StoreError::Invalid {
                what: "lease.state".into(),
                value: state,
            })?,
            labels: get_labels(row)?,
            ttl_seconds: get_opt_u32(row, "ttl_seconds")?,
            created_at: row.try_get("created_at").map_err(StoreError::read)?,
            expires_at: row.try_get("expires_at").map_err(StoreError::read)?,
            released_at: row.try_get("released_at").map_err(StoreError::read)?,
            created_by: get_opt_u32(row, "created_by")?,
        })
    }
}

/// What the daemon decided a new lease is; the store adds the id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewLease {
    pub name: String,
    pub uid_base: u32,
    pub gid_base: u32,
    pub size: u32,
    pub labels: BTreeMap<String, String>,
    pub ttl_seconds: Option<u32>,
    pub created_at: i64,
    pub expires_at: Option<i64>,
    pub created_by: Option<u32>,
}

/// One row of `block`: a block that was handed out at least once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockRow {
    /// First host id of the block.
    pub start: u32,
    /// The holding lease, while active.
    pub lease_id: Option<i64>,
    /// When it was last released (0 = purged), while free.
    pub released_at: Option<i64>,
}

impl BlockRow {
    pub(crate) fn from_row(row: &SqliteRow) -> Result<BlockRow, StoreError> {
        Ok(BlockRow {
            start: get_u32(row, "start")?,
            lease_id: row.try_get("lease_id").map_err(StoreError::read)?,
            released_at: row.try_get("released_at").map_err(StoreError::read)?,
        })
    }
}

/// What happened to a lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    Create,
    Renew,
    Release,
    Expire,
    Purge,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Create => "create",
            EventKind::Renew => "renew",
            EventKind::Release => "release",
            EventKind::Expire => "expire",
            EventKind::Purge => "purge",
        }
    }
}

/// One row of the history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventRecord {
    pub id: i64,
    pub at: i64,
    pub kind: String,
    pub lease_id: i64,
    pub lease_name: String,
    pub caller_uid: Option<u32>,
    pub detail: Option<String>,
}

impl EventRecord {
    pub(crate) fn from_row(row: &SqliteRow) -> Result<EventRecord, StoreError> {
        Ok(EventRecord {
            id: row.try_get("id").map_err(StoreError::read)?,
            at: row.try_get("at").map_err(StoreError::read)?,
            kind: row.try_get("kind").map_err(StoreError::read)?,
            lease_id: row.try_get("lease_id").map_err(StoreError::read)?,
            lease_name: row.try_get("lease_name").map_err(StoreError::read)?,
            caller_uid: get_opt_u32(row, "caller_uid")?,
            detail: row.try_get("detail").map_err(StoreError::read)?,
        })
    }
}
