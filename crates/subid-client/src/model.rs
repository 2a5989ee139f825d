//! The JSON shapes of subidd's v1 API, as a client sends and reads them. Answers accept fields
//! this version does not know (a newer daemon may add some); requests send only what is set.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// `{code, message}`: the body of every error answer. `code` is stable (docs/API.md).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub code: String,
    pub message: String,
}

/// Whether a lease holds its range or has given it back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LeaseState {
    Active,
    Released,
    /// A state this client does not know.
    #[serde(other)]
    Other,
}

/// Settings of a lease: the body of `PUT /v1/leases/{name}` (every field optional).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseRequest {
    /// Ids: a positive multiple of the pool's block; default one block.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub size: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub labels: Option<BTreeMap<String, String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ttl_seconds: Option<u32>,
    /// rlimit name -> `[soft, hard]`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rlimits: Option<BTreeMap<String, [u64; 2]>>,
    /// `mnt`, `uts`, `ipc`, `net`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespaces: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pids_max: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_processes: Option<u64>,
}

/// The body of `POST /v1/leases`: a name and the settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CreateLeaseRequest {
    pub name: String,
    #[serde(flatten)]
    pub settings: LeaseRequest,
}

/// The process caps of a lease and their use.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    pub pids_max: Option<u64>,
    pub max_processes: Option<u64>,
    pub pids_current: Option<u64>,
    pub pids_denied: Option<u64>,
}

/// A lease.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub name: String,
    pub uid_base: u32,
    pub gid_base: u32,
    pub size: u32,
    pub state: LeaseState,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    pub ttl_seconds: Option<u32>,
    pub created_at: String,
    pub expires_at: Option<String>,
    pub released_at: Option<String>,
    #[serde(default)]
    pub rlimits: BTreeMap<String, [u64; 2]>,
    #[serde(default)]
    pub namespaces: Vec<String>,
    #[serde(default)]
    pub limits: Limits,
    pub uid_map: String,
    pub gid_map: String,
}

impl Lease {
    /// Whether host uid `uid` is in the lease's range.
    pub fn holds_uid(&self, uid: u32) -> bool {
        uid.checked_sub(self.uid_base)
            .is_some_and(|n| n < self.size)
    }
}

/// `GET /v1/leases` answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseList {
    pub leases: Vec<Lease>,
}

/// Block counts of the pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockCounts {
    pub total: u32,
    pub active: u32,
    pub quarantined: u32,
    #[serde(default)]
    pub withheld: u32,
    pub free: u32,
}

/// The host's cgroups as the daemon found them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CgroupInfo {
    pub mode: String,
    pub pids_max_supported: bool,
    pub pids_version: Option<String>,
    pub pids_mount: Option<String>,
    pub own_cgroup: Option<String>,
    pub unified_mount: Option<String>,
    pub reason: Option<String>,
}

/// An active lease whose ids another id owner claims.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolWarning {
    pub code: String,
    /// The lease concerned; none for ids a process holds outside any lease.
    pub lease: Option<String>,
    pub claim: String,
    pub message: String,
}

/// A claim of another id owner on ids of the pool.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claim {
    pub claim: String,
    pub first_block: u32,
    pub blocks: u32,
    pub status: String,
    #[serde(default)]
    pub leases: Vec<String>,
}

/// `GET /v1/pool` answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pool {
    pub base: u32,
    pub size: u32,
    pub end: u64,
    pub block: u32,
    pub source: String,
    pub quarantine_seconds: u64,
    pub blocks: BlockCounts,
    pub cgroup: Option<CgroupInfo>,
    #[serde(default)]
    pub warnings: Vec<PoolWarning>,
    #[serde(default)]
    pub claims: Vec<Claim>,
}

/// `GET /v1/lookup` answer: who holds a host id, and what it is inside.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lookup {
    /// `uid` or `gid`.
    pub kind: String,
    pub host_id: u32,
    pub inner_id: u32,
    pub lease: Lease,
}

/// One mapping of an OCI `config.json` (`linux.uidMappings[]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct OciMapping {
    #[serde(rename = "containerID")]
    pub container_id: u32,
    #[serde(rename = "hostID")]
    pub host_id: u32,
    pub size: u32,
}

/// `linux.uidMappings` and `linux.gidMappings` (`idmap?format=oci`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OciMappings {
    #[serde(rename = "uidMappings")]
    pub uid_mappings: Vec<OciMapping>,
    #[serde(rename = "gidMappings")]
    pub gid_mappings: Vec<OciMapping>,
}

/// `GET /v1/leases/{name}/idmap` answer: every rendering of the lease's maps.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Idmap {
    pub uid_map: String,
    pub gid_map: String,
    pub oci: OciMappings,
    pub podman: Vec<String>,
    pub subuid: String,
    pub subgid: String,
}

/// `PUT /v1/leases/{name}/namespace` answer: where the lease's namespaces are pinned.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NamespacePins {
    pub user: PathBuf,
    pub mnt: Option<PathBuf>,
    pub uts: Option<PathBuf>,
    pub ipc: Option<PathBuf>,
    pub net: Option<PathBuf>,
}

/// The body of `POST /v1/leases/{name}/attach`: a process (a container's init) whose cgroups
/// the lease is to count as its own, under a caller-chosen id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachRequest {
    pub pid: i32,
    pub id: String,
}

/// `POST /v1/leases/{name}/attach` answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    pub id: String,
    pub pid: i32,
    #[serde(default)]
    pub cgroups: Vec<String>,
}

/// Whether a process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProcessState {
    Running,
    Exited,
    Lost,
    #[serde(other)]
    Other,
}

/// The body of `POST /v1/leases/{name}/processes`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpawnRequest {
    /// The program (a path, or a name looked up in `PATH`) and its arguments.
    pub argv: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub env: Option<BTreeMap<String, String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub groups: Option<Vec<u32>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rlimits: Option<BTreeMap<String, [u64; 2]>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub umask: Option<u32>,
}

/// A process started in a lease.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Process {
    pub id: String,
    pub lease: String,
    pub pid: i32,
    pub host_uid: u32,
    pub host_gid: u32,
    pub argv: Vec<String>,
    pub state: ProcessState,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub started_at: String,
    pub ended_at: Option<String>,
}

/// `GET /v1/leases/{name}/processes` answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessList {
    pub processes: Vec<Process>,
}

/// One row of a lease's history (`GET /v1/leases/{name}/events`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseEvent {
    pub at: String,
    pub kind: String,
    pub caller_uid: Option<u32>,
}

/// `GET /v1/leases/{name}/events` answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseEventList {
    pub events: Vec<LeaseEvent>,
}

/// One line of the event feed (`GET /v1/events`); `kind` is its `type`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FeedEvent {
    #[serde(default)]
    pub id: i64,
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub at: String,
    #[serde(default)]
    pub lease: String,
    pub caller_uid: Option<u32>,
    #[serde(default)]
    pub details: serde_json::Value,
    /// Only on an `error` line, the last of a stream that cannot go on.
    pub code: Option<String>,
    pub message: Option<String>,
}
