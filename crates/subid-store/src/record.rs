//! The rows the store hands out (leases, blocks, history events, processes) and how a row of
//! either back end is read into them.

use std::collections::BTreeMap;

use subid_core::LeaseState;

use crate::StoreError;

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
    /// A fleet only: when a forced release (or an expiry) was asked for that waits for other
    /// hosts to stop the lease's processes. The lease stays active until they have.
    pub release_requested_at: Option<i64>,
}

/// The columns of `lease` that [`lease_from`] reads, as SQLite selects them (a host's own file
/// has no forced releases waiting for other hosts).
pub(crate) const LEASE_COLUMNS: &str = "id, name, uid_base, gid_base, size, state, labels, \
     ttl_seconds, created_at, expires_at, released_at, created_by, rlimits, namespaces, \
     pids_max, max_processes, NULL AS release_requested_at";

/// The same, as PostgreSQL selects them.
pub(crate) const PG_LEASE_COLUMNS: &str = "id, name, uid_base, gid_base, size, state, labels, \
     ttl_seconds, created_at, expires_at, released_at, created_by, rlimits, namespaces, \
     pids_max, max_processes, release_requested_at";

/// The columns of `process`, in the order [`process_from`] and the process writer use them.
pub(crate) const PROCESS_COLUMNS: &str = "id, lease_id, lease_name, pid, start_ticks, boot_id, \
     host_uid, host_gid, argv, state, exit_code, signal, started_at, ended_at";

/// The columns of `event`.
pub(crate) const EVENT_COLUMNS: &str = "id, at, kind, lease_id, lease_name, caller_uid, detail";

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

impl NewLease {
    /// The record this lease is once stored with `id`.
    pub fn into_record(self, id: i64) -> LeaseRecord {
        LeaseRecord {
            id,
            name: self.name,
            uid_base: self.uid_base,
            gid_base: self.gid_base,
            size: self.size,
            state: LeaseState::Active,
            labels: self.labels,
            ttl_seconds: self.ttl_seconds,
            created_at: self.created_at,
            expires_at: self.expires_at,
            released_at: None,
            created_by: self.created_by,
            rlimits: self.rlimits,
            namespaces: self.namespaces,
            pids_max: self.pids_max,
            max_processes: self.max_processes,
            release_requested_at: None,
        }
    }

    /// The JSON columns: labels, rlimits, namespaces.
    pub(crate) fn json_columns(&self) -> Result<(String, String, String), StoreError> {
        Ok((
            serde_json::to_string(&self.labels).map_err(StoreError::encode)?,
            serde_json::to_string(&self.rlimits).map_err(StoreError::encode)?,
            serde_json::to_string(&self.namespaces).map_err(StoreError::encode)?,
        ))
    }

    /// The `detail` of its `create` event.
    pub(crate) fn create_detail(&self) -> String {
        serde_json::json!({
            "uid_base": self.uid_base,
            "gid_base": self.gid_base,
            "size": self.size,
            "ttl_seconds": self.ttl_seconds,
            "expires_at": self.expires_at,
        })
        .to_string()
    }
}

/// The `detail` of a `release` or `expire` event.
pub(crate) fn release_detail(lease: &LeaseRecord, purge: bool) -> String {
    serde_json::json!({
        "uid_base": lease.uid_base,
        "size": lease.size,
        "purge": purge,
    })
    .to_string()
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

    pub fn parse(s: &str) -> Option<EventKind> {
        match s {
            "create" => Some(EventKind::Create),
            "renew" => Some(EventKind::Renew),
            "release" => Some(EventKind::Release),
            "expire" => Some(EventKind::Expire),
            "purge" => Some(EventKind::Purge),
            _ => None,
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

/// Named columns of a result row, whatever the driver: integers and text are all the schemas
/// use (JSON is stored as text), so every record is read through these four.
pub(crate) trait Cols {
    fn opt_i64(&self, column: &str) -> Result<Option<i64>, StoreError>;
    fn opt_text(&self, column: &str) -> Result<Option<String>, StoreError>;

    fn i64(&self, column: &str) -> Result<i64, StoreError> {
        self.opt_i64(column)?.ok_or_else(|| null(column))
    }

    fn text(&self, column: &str) -> Result<String, StoreError> {
        self.opt_text(column)?.ok_or_else(|| null(column))
    }

    /// An integer column that must fit a `u32`.
    fn u32(&self, column: &str) -> Result<u32, StoreError> {
        let value = self.i64(column)?;
        u32::try_from(value).map_err(|_| invalid(column, value))
    }

    fn opt_u32(&self, column: &str) -> Result<Option<u32>, StoreError> {
        self.opt_i64(column)?
            .map(|v| u32::try_from(v).map_err(|_| invalid(column, v)))
            .transpose()
    }

    fn opt_u64(&self, column: &str) -> Result<Option<u64>, StoreError> {
        self.opt_i64(column)?
            .map(|v| u64::try_from(v).map_err(|_| invalid(column, v)))
            .transpose()
    }

    fn opt_i32(&self, column: &str) -> Result<Option<i32>, StoreError> {
        self.opt_i64(column)?
            .map(|v| i32::try_from(v).map_err(|_| invalid(column, v)))
            .transpose()
    }

    /// A nullable JSON text column.
    fn opt_json<T: serde::de::DeserializeOwned>(
        &self,
        column: &str,
    ) -> Result<Option<T>, StoreError> {
        self.opt_text(column)?
            .map(|text| {
                serde_json::from_str(&text).map_err(|_| StoreError::Invalid {
                    what: column.to_string(),
                    value: text,
                })
            })
            .transpose()
    }
}

fn null(column: &str) -> StoreError {
    StoreError::Invalid {
        what: column.to_string(),
        value: "NULL".into(),
    }
}

fn invalid(column: &str, value: i64) -> StoreError {
    StoreError::Invalid {
        what: column.to_string(),
        value: value.to_string(),
    }
}

/// Reads a lease row selected with [`LEASE_COLUMNS`].
pub(crate) fn lease_from(row: &impl Cols) -> Result<LeaseRecord, StoreError> {
    let state = row.text("state")?;
    Ok(LeaseRecord {
        id: row.i64("id")?,
        name: row.text("name")?,
        uid_base: row.u32("uid_base")?,
        gid_base: row.u32("gid_base")?,
        size: row.u32("size")?,
        state: LeaseState::parse(&state).ok_or(StoreError::Invalid {
            what: "lease.state".into(),
            value: state,
        })?,
        labels: row.opt_json("labels")?.unwrap_or_default(),
        ttl_seconds: row.opt_u32("ttl_seconds")?,
        created_at: row.i64("created_at")?,
        expires_at: row.opt_i64("expires_at")?,
        released_at: row.opt_i64("released_at")?,
        created_by: row.opt_u32("created_by")?,
        rlimits: row.opt_json("rlimits")?.unwrap_or_default(),
        namespaces: row.opt_json("namespaces")?.unwrap_or_default(),
        pids_max: row.opt_u64("pids_max")?,
        max_processes: row.opt_u64("max_processes")?,
        release_requested_at: row.opt_i64("release_requested_at")?,
    })
}

/// Reads a `block` row.
pub(crate) fn block_from(row: &impl Cols) -> Result<BlockRow, StoreError> {
    Ok(BlockRow {
        start: row.u32("start")?,
        lease_id: row.opt_i64("lease_id")?,
        released_at: row.opt_i64("released_at")?,
    })
}

/// Reads an event row selected with [`EVENT_COLUMNS`].
pub(crate) fn event_from(row: &impl Cols) -> Result<EventRecord, StoreError> {
    Ok(EventRecord {
        id: row.i64("id")?,
        at: row.i64("at")?,
        kind: row.text("kind")?,
        lease_id: row.i64("lease_id")?,
        lease_name: row.text("lease_name")?,
        caller_uid: row.opt_u32("caller_uid")?,
        detail: row.opt_text("detail")?,
    })
}

/// Reads a process row selected with [`PROCESS_COLUMNS`].
pub(crate) fn process_from(row: &impl Cols) -> Result<ProcessRecord, StoreError> {
    let state = row.text("state")?;
    let argv = row.text("argv")?;
    Ok(ProcessRecord {
        id: row.text("id")?,
        lease_id: row.i64("lease_id")?,
        lease_name: row.text("lease_name")?,
        pid: row.opt_i32("pid")?.unwrap_or_default(),
        start_ticks: u64::try_from(row.i64("start_ticks")?).unwrap_or_default(),
        boot_id: row.text("boot_id")?,
        host_uid: row.u32("host_uid")?,
        host_gid: row.u32("host_gid")?,
        argv: serde_json::from_str(&argv).map_err(|_| StoreError::Invalid {
            what: "process.argv".into(),
            value: argv.clone(),
        })?,
        state: ProcessState::parse(&state).ok_or(StoreError::Invalid {
            what: "process.state".into(),
            value: state,
        })?,
        exit_code: row.opt_i32("exit_code")?,
        signal: row.opt_i32("signal")?,
        started_at: row.i64("started_at")?,
        ended_at: row.opt_i64("ended_at")?,
    })
}

/// sqlx rows of either back end.
macro_rules! sqlx_cols {
    ($row:ty) => {
        impl Cols for $row {
            fn opt_i64(&self, column: &str) -> Result<Option<i64>, StoreError> {
                sqlx::Row::try_get(self, column).map_err(StoreError::read)
            }

            fn opt_text(&self, column: &str) -> Result<Option<String>, StoreError> {
                sqlx::Row::try_get(self, column).map_err(StoreError::read)
            }
        }
    };
}
sqlx_cols!(sqlx::sqlite::SqliteRow);
sqlx_cols!(sqlx::postgres::PgRow);

impl Cols for rusqlite::Row<'_> {
    fn opt_i64(&self, column: &str) -> Result<Option<i64>, StoreError> {
        self.get(column).map_err(StoreError::read)
    }

    fn opt_text(&self, column: &str) -> Result<Option<String>, StoreError> {
        self.get(column).map_err(StoreError::read)
    }
}
