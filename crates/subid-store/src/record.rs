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
    /// Default rlimits of the lease's processes: name -> [soft, hard].
    pub rlimits: BTreeMap<String, [u64; 2]>,
    /// Extra namespaces shared by the lease's processes (`mnt`, `uts`, `ipc`, `net`).
    pub namespaces: Vec<String>,
    /// The cgroup cap: `pids.max` of the lease's cgroup.
    pub pids_max: Option<u64>,
    /// The owner cap: RLIMIT_NPROC of the namespace's creator.
    pub max_processes: Option<u64>,
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
            rlimits: get_json(row, "rlimits")?.unwrap_or_default(),
            namespaces: get_json(row, "namespaces")?.unwrap_or_default(),
            pids_max: get_opt_u64(row, "pids_max")?,
            max_processes: get_opt_u64(row, "max_processes")?,
        })
    }
}

/// Reads a nullable, non-negative integer column.
fn get_opt_u64(row: &SqliteRow, column: &str) -> Result<Option<u64>, StoreError> {
    let value: Option<i64> = row.try_get(column).map_err(StoreError::read)?;
    value
        .map(|v| {
            u64::try_from(v).map_err(|_| StoreError::Invalid {
                what: format!("lease.{column}"),
                value: v.to_string(),
            })
        })
        .transpose()
}

/// Decodes a nullable JSON column.
fn get_json<T: serde::de::DeserializeOwned>(
    row: &SqliteRow,
    column: &str,
) -> Result<Option<T>, StoreError> {
    let text: Option<String> = row.try_get(column).map_err(StoreError::read)?;
    text.map(|t| {
        serde_json::from_str(&t).map_err(|_| StoreError::Invalid {
            what: format!("lease.{column}"),
            value: t,
        })
    })
    .transpose()
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
    pub rlimits: BTreeMap<String, [u64; 2]>,
    pub namespaces: Vec<String>,
    pub pids_max: Option<u64>,
    pub max_processes: Option<u64>,
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

/// Where a process stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProcessState {
    Running,
    Exited,
    /// It vanished while the daemon was not watching (restart, reboot): no exit status known.
    Lost,
}

impl ProcessState {
    pub fn as_str(self) -> &'static str {
        match self {
            ProcessState::Running => "running",
            ProcessState::Exited => "exited",
            ProcessState::Lost => "lost",
        }
    }

    pub fn parse(s: &str) -> Option<ProcessState> {
        match s {
            "running" => Some(ProcessState::Running),
            "exited" => Some(ProcessState::Exited),
            "lost" => Some(ProcessState::Lost),
            _ => None,
        }
    }
}

/// A process started in a lease's namespace. Times are unix milliseconds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessRecord {
    pub id: String,
    pub lease_id: i64,
    pub lease_name: String,
    pub pid: i32,
    pub start_ticks: u64,
    pub boot_id: String,
    pub host_uid: u32,
    pub host_gid: u32,
    pub argv: Vec<String>,
    pub state: ProcessState,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub started_at: i64,
    pub ended_at: Option<i64>,
}

impl ProcessRecord {
    pub(crate) fn from_row(row: &SqliteRow) -> Result<ProcessRecord, StoreError> {
        let state: String = row.try_get("state").map_err(StoreError::read)?;
        let argv: String = row.try_get("argv").map_err(StoreError::read)?;
        let start_ticks: i64 = row.try_get("start_ticks").map_err(StoreError::read)?;
        let opt_i32 = |column: &str| -> Result<Option<i32>, StoreError> {
            let v: Option<i64> = row.try_get(column).map_err(StoreError::read)?;
            v.map(|v| {
                i32::try_from(v).map_err(|_| StoreError::Invalid {
                    what: column.to_string(),
                    value: v.to_string(),
                })
            })
            .transpose()
        };
        Ok(ProcessRecord {
            id: row.try_get("id").map_err(StoreError::read)?,
            lease_id: row.try_get("lease_id").map_err(StoreError::read)?,
            lease_name: row.try_get("lease_name").map_err(StoreError::read)?,
            pid: opt_i32("pid")?.unwrap_or_default(),
            start_ticks: u64::try_from(start_ticks).unwrap_or_default(),
            boot_id: row.try_get("boot_id").map_err(StoreError::read)?,
            host_uid: get_u32(row, "host_uid")?,
            host_gid: get_u32(row, "host_gid")?,
            argv: serde_json::from_str(&argv).map_err(|_| StoreError::Invalid {
                what: "process.argv".into(),
                value: argv.clone(),
            })?,
            state: ProcessState::parse(&state).ok_or(StoreError::Invalid {
                what: "process.state".into(),
                value: state,
            })?,
            exit_code: opt_i32("exit_code")?,
            signal: opt_i32("signal")?,
            started_at: row.try_get("started_at").map_err(StoreError::read)?,
            ended_at: row.try_get("ended_at").map_err(StoreError::read)?,
        })
    }
}
