//! The JSON shapes of the v1 API: request bodies (unknown fields refused) and answers.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use subid_core::{IdRange, PoolCounts, lease_map, render_map, render_subid_line};
use subid_store::{EventRecord, LeaseRecord};
use utoipa::ToSchema;

pub use crate::wire::rfc3339;

/// `POST /v1/leases/{name}/renew` body: none, or an empty object.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EmptyBody {}

/// The longest ttl accepted: ten years, far from any overflow.
pub const TTL_MAX: u32 = 10 * 365 * 24 * 3600;

/// `PUT /v1/leases/{name}` body.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LeaseBody {
    /// Ids: a positive multiple of the pool's block (`GET /v1/pool`); default one block.
    #[schema(minimum = 1)]
    pub size: Option<u32>,
    /// Up to 64; keys of `[A-Za-z0-9_./-]` starting with a letter or digit, values without
    /// control characters.
    pub labels: Option<BTreeMap<String, String>>,
    /// Released this long after creation or the last renew; none: never.
    #[schema(minimum = 1, maximum = 315_360_000)]
    pub ttl_seconds: Option<u32>,
    #[schema(schema_with = rlimits_or_null)]
    pub rlimits: Option<BTreeMap<String, [u64; 2]>>,
    /// Namespaces the lease's processes share besides the user namespace.
    #[schema(value_type = Option<Vec<NamespaceName>>)]
    pub namespaces: Option<Vec<String>>,
    /// A pids cgroup cap over all the lease's processes.
    #[schema(minimum = 1, maximum = 4_194_304)]
    pub pids_max: Option<u64>,
    /// RLIMIT_NPROC of the namespace owner: its processes, counted by the kernel.
    #[schema(minimum = 1, maximum = 4_194_304)]
    pub max_processes: Option<u64>,
}

/// `POST /v1/leases` body.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateBody {
    /// 1-128 characters of `[A-Za-z0-9_.-]`, the first a letter or digit.
    #[schema(pattern = "^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")]
    pub name: String,
    /// Ids: a positive multiple of the pool's block (`GET /v1/pool`); default one block.
    #[schema(minimum = 1)]
    pub size: Option<u32>,
    /// Up to 64; keys of `[A-Za-z0-9_./-]` starting with a letter or digit, values without
    /// control characters.
    pub labels: Option<BTreeMap<String, String>>,
    /// Released this long after creation or the last renew; none: never.
    #[schema(minimum = 1, maximum = 315_360_000)]
    pub ttl_seconds: Option<u32>,
    #[schema(schema_with = rlimits_or_null)]
    pub rlimits: Option<BTreeMap<String, [u64; 2]>>,
    /// Namespaces the lease's processes share besides the user namespace.
    #[schema(value_type = Option<Vec<NamespaceName>>)]
    pub namespaces: Option<Vec<String>>,
    /// A pids cgroup cap over all the lease's processes.
    #[schema(minimum = 1, maximum = 4_194_304)]
    pub pids_max: Option<u64>,
    /// RLIMIT_NPROC of the namespace owner: its processes, counted by the kernel.
    #[schema(minimum = 1, maximum = 4_194_304)]
    pub max_processes: Option<u64>,
}

impl CreateBody {
    /// The name, and the settings as a `PUT` body carries them.
    pub fn split(self) -> (String, LeaseBody) {
        let settings = LeaseBody {
            size: self.size,
            labels: self.labels,
            ttl_seconds: self.ttl_seconds,
            rlimits: self.rlimits,
            namespaces: self.namespaces,
            pids_max: self.pids_max,
            max_processes: self.max_processes,
        };
        (self.name, settings)
    }
}

/// The process caps of a lease and their use (use only while the lease is active and capped).
#[derive(Debug, Default, Serialize, ToSchema)]
pub struct LimitsView {
    pub pids_max: Option<u64>,
    pub max_processes: Option<u64>,
    pub pids_current: Option<u64>,
    /// Forks the cgroup refused (`max` in `pids.events`).
    pub pids_denied: Option<u64>,
}

/// A lease as the API shows it.
#[derive(Debug, Serialize, ToSchema)]
pub struct LeaseView {
    pub name: String,
    pub uid_base: u32,
    pub gid_base: u32,
    pub size: u32,
    /// `active` or `released`.
    #[schema(value_type = LeaseStateName)]
    pub state: &'static str,
    pub labels: BTreeMap<String, String>,
    pub ttl_seconds: Option<u32>,
    pub created_at: String,
    pub expires_at: Option<String>,
    pub released_at: Option<String>,
    /// Default rlimits of the lease's processes: name -> [soft, hard].
    #[schema(schema_with = rlimits)]
    pub rlimits: BTreeMap<String, [u64; 2]>,
    /// Extra namespaces its processes share.
    pub namespaces: Vec<String>,
    /// Process caps and their use.
    pub limits: LimitsView,
    /// The kernel's `uid_map` line for this lease (`0 <uid_base> <size>`), without newline.
    pub uid_map: String,
    pub gid_map: String,
    /// A fleet only: when a forced release (or expiry) of this active lease was asked for that
    /// waits for hosts to stop its processes (see `hosts`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub release_requested_at: Option<String>,
    /// A fleet only (`GET /v1/leases/{name}`): the hosts where the lease has a namespace,
    /// cgroup or processes, and whether they have live processes of it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hosts: Option<Vec<LeaseHostView>>,
}

/// `hosts[]` of a lease in a fleet.
#[derive(Debug, Serialize, ToSchema)]
pub struct LeaseHostView {
    /// The host's `store.host_id`.
    pub host: String,
    /// It has live processes of the lease (a plain `DELETE` is refused while any host has).
    pub live: bool,
}

/// A namespace a lease's processes may share (`namespaces`).
#[derive(Debug, ToSchema)]
#[serde(rename_all = "lowercase")]
#[allow(dead_code)] // documents the strings `leases::spec` accepts
pub enum NamespaceName {
    Mnt,
    Uts,
    Ipc,
    Net,
}

/// `rlimits` of leases and spawns: a known name -> `[soft, hard]`, soft <= hard.
pub fn rlimits() -> utoipa::openapi::Object {
    use utoipa::openapi::schema::{ArrayBuilder, KnownFormat, ObjectBuilder, SchemaFormat, Type};
    let limit = ObjectBuilder::new()
        .schema_type(Type::Integer)
        .format(Some(SchemaFormat::KnownFormat(KnownFormat::Int64)))
        .minimum(Some(0));
    let pair = ArrayBuilder::new()
        .items(limit)
        .min_items(Some(2))
        .max_items(Some(2));
    ObjectBuilder::new()
        .schema_type(Type::Object)
        .property_names(Some(
            ObjectBuilder::new()
                .schema_type(Type::String)
                .enum_values(Some(super::processes::RLIMIT_NAMES)),
        ))
        .additional_properties(Some(pair))
        .description(Some("rlimit name -> [soft, hard], soft <= hard"))
        .build()
}

/// [`rlimits`] of a request, where `null` means none.
pub fn rlimits_or_null() -> utoipa::openapi::Object {
    use utoipa::openapi::schema::{SchemaType, Type};
    let mut schema = rlimits();
    schema.schema_type = SchemaType::from_iter([Type::Object, Type::Null]);
    schema
}

/// The state of a lease, as its `state` field names it.
#[derive(Debug, ToSchema)]
#[serde(rename_all = "lowercase")]
#[allow(dead_code)] // documents the strings `LeaseState::as_str` gives
pub enum LeaseStateName {
    Active,
    Released,
}

impl From<&LeaseRecord> for LeaseView {
    fn from(lease: &LeaseRecord) -> LeaseView {
        LeaseView {
            name: lease.name.clone(),
            uid_base: lease.uid_base,
            gid_base: lease.gid_base,
            size: lease.size,
            state: lease.state.as_str(),
            labels: lease.labels.clone(),
            ttl_seconds: lease.ttl_seconds,
            created_at: rfc3339(lease.created_at),
            expires_at: lease.expires_at.map(rfc3339),
            released_at: lease.released_at.map(rfc3339),
            rlimits: lease.rlimits.clone(),
            namespaces: lease.namespaces.clone(),
            limits: LimitsView {
                pids_max: lease.pids_max,
                max_processes: lease.max_processes,
                pids_current: None,
                pids_denied: None,
            },
            uid_map: map_line(lease.uid_base, lease.size),
            gid_map: map_line(lease.gid_base, lease.size),
            release_requested_at: lease.release_requested_at.map(rfc3339),
            hosts: None,
        }
    }
}

/// `0 base size`, the single extent of a lease, as the kernel prints it (without newline).
pub fn map_line(base: u32, size: u32) -> String {
    render_map(&[lease_map(base, size)]).trim_end().to_string()
}

/// `GET /v1/leases` answer.
#[derive(Debug, Serialize, ToSchema)]
pub struct LeaseList {
    /// In order of name, then creation.
    pub leases: Vec<LeaseView>,
    /// With `limit`, when more leases may follow: pass it as `continue` for the next page.
    /// Opaque; valid with the same `state` and `label` parameters.
    #[serde(rename = "continue", skip_serializing_if = "Option::is_none")]
    pub next: Option<String>,
}

/// `GET /v1/pool` answer.
#[derive(Debug, Serialize, ToSchema)]
pub struct PoolView {
    pub base: u32,
    pub size: u32,
    /// One past the last id of the pool.
    pub end: u64,
    pub block: u32,
    /// Where the pool came from: `config`, `subuid` or `default`.
    pub source: &'static str,
    pub quarantine_seconds: u64,
    pub blocks: BlockCounts,
    /// The host's cgroups, as detected at start: whether `pids_max` can be honoured.
    pub cgroup: Option<CgroupView>,
    /// Active leases whose ids another id owner claims (found by the pool re-check), and blocks
    /// withheld because a live process holds their ids.
    pub warnings: Vec<PoolWarningView>,
    /// Every claim of another id owner on ids of the pool, and what it means; with a fleet's
    /// store also those other hosts found (with their `host`), which are withheld here too.
    pub claims: Vec<ClaimView>,
    /// A fleet only: this host's `store.host_id`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// Where leases are kept: `sqlite` or `postgresql`.
    pub store: &'static str,
}

/// `GET /v1/pool` `claims[]`.
#[derive(Debug, Serialize, ToSchema)]
pub struct ClaimView {
    /// Who claims the ids.
    pub claim: String,
    /// First pool block it touches and how many.
    pub first_block: u32,
    pub blocks: u32,
    /// `hands_on` (a subid entry inside one active lease: that lease handed on), `conflict`
    /// (touches active leases: see `warnings`), `withheld` (its blocks are kept from allocation).
    pub status: &'static str,
    /// The leases concerned (`hands_on`, `conflict`).
    pub leases: Vec<String>,
    /// A fleet only: the host whose checks found it (its /etc/subuid, /etc/subgid, users, or
    /// processes).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
}

impl From<crate::lease::AppliedClaim> for ClaimView {
    fn from(a: crate::lease::AppliedClaim) -> ClaimView {
        use crate::lease::ClaimStatus;
        let (status, leases) = match a.status {
            ClaimStatus::HandsOn(lease) => ("hands_on", vec![lease]),
            ClaimStatus::Conflicts(leases) => ("conflict", leases),
            ClaimStatus::Withheld => ("withheld", Vec::new()),
        };
        ClaimView {
            claim: a.claim,
            first_block: a.blocks.0,
            blocks: a.blocks.1,
            status,
            leases,
            host: None,
        }
    }
}

/// `GET /v1/pool` `warnings[]`.
#[derive(Debug, Serialize, ToSchema)]
pub struct PoolWarningView {
    /// `lease_ids_claimed` (another id owner claims ids of an active lease) or
    /// `ids_held_by_process` (a live process holds ids of a block that is not leased: the block
    /// is withheld until it is gone).
    pub code: &'static str,
    /// The lease concerned (`lease_ids_claimed`).
    pub lease: Option<String>,
    /// Who claims the ids, e.g. `/etc/subuid line 3 (alice:1879048192:65536)`.
    pub claim: String,
    pub message: String,
}

impl From<crate::lease::PoolWarning> for PoolWarningView {
    fn from(w: crate::lease::PoolWarning) -> PoolWarningView {
        PoolWarningView {
            code: "lease_ids_claimed",
            message: format!(
                "{} claims ids of active lease {}; subidd does not resolve this: remove or move \
                 the other claim, or release the lease",
                w.claim, w.lease
            ),
            lease: Some(w.lease),
            claim: w.claim,
        }
    }
}

impl PoolWarningView {
    /// A block withheld because a live process holds its ids.
    pub fn process_hold(block: u32, holder: String) -> PoolWarningView {
        PoolWarningView {
            code: "ids_held_by_process",
            message: format!(
                "{holder}, an id of pool block {block}, which is not leased: the block is \
                 withheld until that process is gone; stop it if it is a leftover"
            ),
            lease: None,
            claim: holder,
        }
    }
}

/// `GET /v1/pool` `cgroup`.
#[derive(Debug, Serialize, ToSchema)]
pub struct CgroupView {
    /// `v2`, `v1`, `hybrid` or `none`.
    pub mode: &'static str,
    /// Whether leases may ask for `pids_max` here.
    pub pids_max_supported: bool,
    /// Version of the hierarchy that holds the pids controller.
    pub pids_version: Option<&'static str>,
    pub pids_mount: Option<String>,
    pub own_cgroup: Option<String>,
    pub unified_mount: Option<String>,
    /// The hierarchy that holds every lease's processes (`v2` or `v1`); `null` when there is
    /// none, and then spawns are refused (`cgroups_unavailable`).
    pub tracking_version: Option<&'static str>,
    /// Where each lease's cgroup (`lease-<name>`) is made on that hierarchy.
    pub lease_cgroups: Option<String>,
    /// Where capped leases' pids cgroups (`lease-<name>`) are made.
    pub pids_cgroups: Option<String>,
    /// Why `pids_max` cannot be used, when it cannot.
    pub reason: Option<String>,
}

impl From<subid_sys::cgroup::CgroupSummary> for CgroupView {
    fn from(s: subid_sys::cgroup::CgroupSummary) -> CgroupView {
        let path = |p: Option<std::path::PathBuf>| p.map(|p| p.display().to_string());
        CgroupView {
            mode: s.mode,
            pids_max_supported: s.pids_version.is_some(),
            pids_version: s.pids_version,
            pids_mount: path(s.pids_mount),
            own_cgroup: path(s.own_cgroup),
            unified_mount: path(s.unified_mount),
            tracking_version: s.tracking_version,
            lease_cgroups: path(s.lease_parent),
            pids_cgroups: path(s.pids_parent),
            reason: s.reason,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct BlockCounts {
    pub total: u32,
    pub active: u32,
    pub quarantined: u32,
    /// Blocks withheld because another id owner claims their ids.
    pub withheld: u32,
    pub free: u32,
}

impl From<PoolCounts> for BlockCounts {
    fn from(c: PoolCounts) -> BlockCounts {
        BlockCounts {
            total: c.total,
            active: c.active,
            quarantined: c.quarantined,
            withheld: c.withheld,
            free: c.free,
        }
    }
}

/// One mapping of an OCI runtime `config.json` (`linux.uidMappings`).
#[derive(Debug, Serialize, ToSchema)]
pub struct OciMapping {
    #[serde(rename = "containerID")]
    pub container_id: u32,
    #[serde(rename = "hostID")]
    pub host_id: u32,
    pub size: u32,
}

/// `linux.uidMappings` and `linux.gidMappings` of an OCI runtime `config.json`.
#[derive(Debug, Serialize, ToSchema)]
pub struct OciMappings {
    #[serde(rename = "uidMappings")]
    pub uid_mappings: Vec<OciMapping>,
    #[serde(rename = "gidMappings")]
    pub gid_mappings: Vec<OciMapping>,
}

/// `GET /v1/leases/{name}/idmap` without `format`: every rendering at once.
#[derive(Debug, Serialize, ToSchema)]
pub struct IdmapView {
    pub uid_map: String,
    pub gid_map: String,
    pub oci: OciMappings,
    pub podman: Vec<String>,
    pub subuid: String,
    pub subgid: String,
}

impl IdmapView {
    pub fn of(lease: &LeaseRecord) -> IdmapView {
        IdmapView {
            uid_map: map_line(lease.uid_base, lease.size),
            gid_map: map_line(lease.gid_base, lease.size),
            oci: OciMappings {
                uid_mappings: vec![OciMapping {
                    container_id: 0,
                    host_id: lease.uid_base,
                    size: lease.size,
                }],
                gid_mappings: vec![OciMapping {
                    container_id: 0,
                    host_id: lease.gid_base,
                    size: lease.size,
                }],
            },
            podman: vec![
                format!("--uidmap=0:{}:{}", lease.uid_base, lease.size),
                format!("--gidmap=0:{}:{}", lease.gid_base, lease.size),
            ],
            subuid: subid_line(&lease.name, lease.uid_base, lease.size),
            subgid: subid_line(&lease.name, lease.gid_base, lease.size),
        }
    }
}

fn subid_line(name: &str, base: u32, size: u32) -> String {
    match IdRange::new(base, size) {
        Ok(range) => render_subid_line(name, range),
        Err(_) => format!("{name}:{base}:{size}"),
    }
}

/// `GET /v1/lookup` answer.
#[derive(Debug, Serialize, ToSchema)]
pub struct LookupView {
    /// `uid` or `gid`, as asked.
    pub kind: &'static str,
    pub host_id: u32,
    /// The id inside the lease's namespace.
    pub inner_id: u32,
    pub lease: LeaseView,
}

/// `GET /v1/leases/{name}/events` answer.
#[derive(Debug, Serialize, ToSchema)]
pub struct EventList {
    pub events: Vec<EventView>,
}

/// `GET /v1/leases/{name}/idmap` as JSON: every rendering (no `format`, or `format=json`), or
/// the OCI mappings alone (`format=oci`).
#[derive(Debug, Serialize, ToSchema)]
#[serde(untagged)]
pub enum IdmapJson {
    All(IdmapView),
    Oci(OciMappings),
}

/// One history row.
#[derive(Debug, Serialize, ToSchema)]
pub struct EventView {
    pub at: String,
    pub kind: String,
    pub caller_uid: Option<u32>,
}

impl From<&EventRecord> for EventView {
    fn from(e: &EventRecord) -> EventView {
        EventView {
            at: rfc3339(e.at),
            kind: e.kind.clone(),
            caller_uid: e.caller_uid,
        }
    }
}
