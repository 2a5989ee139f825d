//! Handlers for the pool, leases, their id maps, history, and reverse lookup.

use std::collections::{BTreeMap, BTreeSet};

use axum::Extension;
use axum::extract::State;
use axum::http::header::{CONTENT_TYPE, LOCATION};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use subid_core::{LeaseState, NamespaceKind, Pool, validate_labels, validate_name};
use subid_store::LeaseFilter;

use super::model::{
    ClaimView, CreateBody, EmptyBody, EventList, EventView, IdmapJson, IdmapView, LeaseBody,
    LeaseHostView, LeaseList, LeaseView, LookupView, PoolView, PoolWarningView, TTL_MAX,
};
use super::{
    ApiResult, AppState, Caller, JsonBody, LeaseName, QueryParams, St, caller_uid, json, parse_bool,
};
use crate::error::{ApiError, ErrorBody};
use crate::lease::{CreateMode, LeaseSpec, ReleaseKind};

/// The pool: its range, block size, block counts and the host's cgroups.
#[utoipa::path(get, path = "/v1/pool", tag = "leases", operation_id = "get_pool",
    responses((status = 200, body = PoolView), (status = 400, description = INVALID, body = ErrorBody)))]
pub async fn pool(State(state): St, query: QueryParams) -> ApiResult {
    query.check(&[], &[])?;
    let (pool, counts) = state.leases.pool_status();
    let host = state.leases.host_id().map(str::to_string);
    let mut claims: Vec<ClaimView> = state
        .leases
        .pool_claims()
        .into_iter()
        .map(|a| ClaimView {
            host: host.clone(),
            ..ClaimView::from(a)
        })
        .collect();
    // Other hosts' claims (a fleet): withheld here as well.
    for c in state.leases.fleet_claims() {
        let conflicts = state.leases.active_leases_in(c.first, c.count).await?;
        claims.push(ClaimView {
            claim: if c.process {
                format!("{} (a process on host {})", c.source, c.host)
            } else {
                c.source
            },
            first_block: c.first,
            blocks: c.count,
            status: if conflicts.is_empty() {
                "withheld"
            } else {
                "conflict"
            },
            leases: conflicts,
            host: Some(c.host),
        });
    }
    let view = PoolView {
        base: pool.base(),
        size: pool.range().len(),
        end: pool.range().end(),
        block: pool.block(),
        source: state.pool_source.as_str(),
        quarantine_seconds: state.quarantine_seconds,
        blocks: counts.into(),
        cgroup: state.processes.cgroup_summary().map(Into::into),
        warnings: state
            .leases
            .pool_warnings()
            .into_iter()
            .map(Into::into)
            .chain(
                state
                    .leases
                    .process_holds()
                    .into_iter()
                    .map(|(block, who)| PoolWarningView::process_hold(block, who)),
            )
            .collect(),
        claims,
        host,
        store: state.leases.store().backend().as_str(),
    };
    Ok(json(StatusCode::OK, &view))
}

/// The leases, filtered by state and labels: every one at once (streamed, so the daemon's
/// memory does not grow with their number), or with `limit`, a page and a `continue` token for
/// the next one.
#[utoipa::path(get, path = "/v1/leases", tag = "leases", operation_id = "list_leases",
    params(
        ("state" = Option<String>, Query, pattern = "^(active|released|all)$",
            description = "`active` (the default), `released` or `all`"),
        ("label" = Option<Vec<String>>, Query, style = Form, explode = true,
            description = "`key=value`; repeat it to ask for all of several labels"),
        ("limit" = Option<u32>, Query, minimum = 1, maximum = 10000,
            description = "at most this many leases; `continue` in the answer names the next page"),
        ("continue" = Option<String>, Query,
            description = "the `continue` of the previous page (with the same `state` and `label`)"),
    ),
    responses((status = 200, body = LeaseList), (status = 400, description = INVALID, body = ErrorBody)))]
pub async fn list(State(state): St, query: QueryParams) -> ApiResult {
    let single = query.check(&["state", "label", "limit", "continue"], &["label"])?;
    let filter_state = match single.get("state").copied() {
        None | Some("active") => Some(LeaseState::Active),
        Some("released") => Some(LeaseState::Released),
        Some("all") => None,
        Some(other) => {
            return Err(ApiError::InvalidRequest(format!(
                "state={other:?}: expected active, released or all"
            )));
        }
    };
    let mut labels = Vec::new();
    for pair in query.all("label") {
        let Some((key, value)) = pair.split_once('=') else {
            return Err(ApiError::InvalidRequest(format!(
                "label={pair:?}: expected label=key=value"
            )));
        };
        labels.push((key.to_string(), value.to_string()));
    }
    let filter = LeaseFilter {
        state: filter_state,
        labels,
    };
    let limit = match single.get("limit") {
        None => None,
        Some(raw) => match raw.parse::<u32>() {
            Ok(n) if (1..=LIST_LIMIT_MAX).contains(&n) => Some(n),
            _ => {
                return Err(ApiError::InvalidRequest(format!(
                    "limit={raw:?}: expected a number from 1 to {LIST_LIMIT_MAX}"
                )));
            }
        },
    };
    let after = match single.get("continue") {
        None | Some(&"") => None,
        Some(token) => Some(Continue::decode(token, &filter)?),
    };
    let store = state.leases.store().clone();
    let Some(limit) = limit else {
        return Ok(stream_leases(store, filter, after));
    };
    // One more than asked says whether another page follows.
    let mut page = store
        .list_leases_page(
            &filter,
            after.as_ref().map(|c| (c.name.as_str(), c.id)),
            limit + 1,
        )
        .await?;
    let more = page.len() > limit as usize;
    page.truncate(limit as usize);
    let next = match page.last() {
        Some(last) if more => Some(Continue::encode(&last.name, last.id, &filter)),
        _ => None,
    };
    let view = LeaseList {
        leases: page.iter().map(LeaseView::from).collect(),
        next,
    };
    Ok(json(StatusCode::OK, &view))
}

/// The largest `limit` of a lease list.
pub const LIST_LIMIT_MAX: u32 = 10_000;
/// Leases read from the store per page of a streamed list.
const STREAM_PAGE: u32 = 500;

/// `{"leases":[...]}` of every matching lease, read and sent a page at a time. A store failure
/// half-way ends the body early, so the client sees a cut-off document, never a short list.
fn stream_leases(
    store: subid_store::Store,
    filter: LeaseFilter,
    after: Option<Continue>,
) -> Response {
    struct Walk {
        store: subid_store::Store,
        filter: LeaseFilter,
        after: Option<(String, i64)>,
        first: bool,
        done: bool,
    }
    let walk = Walk {
        store,
        filter,
        after: after.map(|c| (c.name, c.id)),
        first: true,
        done: false,
    };
    let body = futures_util::stream::unfold(walk, |mut walk| async move {
        if walk.done {
            return None;
        }
        let page = walk
            .store
            .list_leases_page(
                &walk.filter,
                walk.after.as_ref().map(|(n, i)| (n.as_str(), *i)),
                STREAM_PAGE,
            )
            .await;
        let page = match page {
            Ok(page) => page,
            Err(error) => {
                tracing::error!(%error, "a streamed lease list failed half-way; cutting it off");
                walk.done = true;
                return Some((Err(std::io::Error::other(error)), walk));
            }
        };
        let mut chunk = Vec::with_capacity(page.len() * 512 + 16);
        if walk.first {
            chunk.extend_from_slice(b"{\"leases\":[");
        }
        for (i, lease) in page.iter().enumerate() {
            if !walk.first || i > 0 {
                chunk.push(b',');
            }
            // Plain data always serialises.
            if serde_json::to_writer(&mut chunk, &LeaseView::from(lease)).is_err() {
                walk.done = true;
                return Some((Err(std::io::Error::other("cannot render a lease")), walk));
            }
        }
        walk.first = false;
        if page.len() < STREAM_PAGE as usize {
            chunk.extend_from_slice(b"]}");
            walk.done = true;
        }
        walk.after = page.last().map(|l| (l.name.clone(), l.id));
        Some((Ok(axum::body::Bytes::from(chunk)), walk))
    });
    let mut response = axum::body::Body::from_stream(body).into_response();
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

/// Where a paged list goes on: after this (name, id), for these filters.
struct Continue {
    name: String,
    id: i64,
}

impl Continue {
    /// `v1.<id>.<filters' hash>.<name in hex>`: opaque to clients, and tied to the filters so
    /// that a token is not used for another list by mistake.
    fn encode(name: &str, id: i64, filter: &LeaseFilter) -> String {
        let hex: String = name.bytes().map(|b| format!("{b:02x}")).collect();
        format!("v1.{id}.{:016x}.{hex}", filter_hash(filter))
    }

    fn decode(token: &str, filter: &LeaseFilter) -> Result<Continue, ApiError> {
        let bad = || {
            ApiError::InvalidRequest(
                "continue: not a token of this list; pass the `continue` of the previous page \
                 unchanged"
                    .into(),
            )
        };
        let mut parts = token.splitn(4, '.');
        let (Some("v1"), Some(id), Some(hash), Some(hex)) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(bad());
        };
        let id: i64 = id.parse().map_err(|_| bad())?;
        if u64::from_str_radix(hash, 16).map_err(|_| bad())? != filter_hash(filter) {
            return Err(ApiError::InvalidRequest(
                "continue: the token belongs to a list with other state or label parameters".into(),
            ));
        }
        if hex.len() % 2 != 0 || hex.len() > 2 * 128 {
            return Err(bad());
        }
        let bytes = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16))
            .collect::<Result<Vec<u8>, _>>()
            .map_err(|_| bad())?;
        let name = String::from_utf8(bytes).map_err(|_| bad())?;
        Ok(Continue { name, id })
    }
}

/// FNV-1a of the filters, labels in a fixed order.
fn filter_hash(filter: &LeaseFilter) -> u64 {
    let mut labels = filter.labels.clone();
    labels.sort();
    let mut text = filter.state.map_or("all", |s| s.as_str()).to_string();
    for (k, v) in labels {
        text.push_str(&format!("\u{0}{k}={v}"));
    }
    text.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Error descriptions shared by the operations of this file.
const INVALID: &str = "invalid_request: a bad name, query key or value, or body";
const TOO_LARGE: &str = "payload_too_large: the body is over 64 KiB";
const PIDS: &str = "pids_unsupported: `pids_max` needs a pids cgroup controller this host lacks";
const FULL: &str = "storage_full: the state directory's disk is full";

/// The largest process cap accepted (the kernel's PID_MAX_LIMIT).
pub const PROCESS_CAP_MAX: u64 = 4_194_304;

/// The active lease (with its cgroup's use), else the most recently released one.
#[utoipa::path(get, path = "/v1/leases/{name}", tag = "leases", operation_id = "get_lease",
    params(LeaseName),
    responses((status = 200, body = LeaseView), (status = 400, description = INVALID, body = ErrorBody),
        (status = 404, description = "not_found: no lease of that name", body = ErrorBody)))]
pub async fn get_one(
    State(state): St,
    LeaseName(name): LeaseName,
    query: QueryParams,
) -> ApiResult {
    query.check(&[], &[])?;
    let lease = find(&state, &name).await?;
    let mut view = LeaseView::from(&lease);
    if let Some((current, denied)) = state.processes.pids_usage(&lease) {
        view.limits.pids_current = Some(current);
        view.limits.pids_denied = Some(denied);
    }
    // A fleet: where the lease has processes (left out while the store is out of reach and
    // the lease comes from this host's own copy).
    if state.leases.host_id().is_some() && lease.state == LeaseState::Active {
        match state.leases.store().lease_hosts(lease.id).await {
            Ok(hosts) => {
                view.hosts = Some(
                    hosts
                        .into_iter()
                        .map(|h| LeaseHostView {
                            host: h.host,
                            live: h.live,
                        })
                        .collect(),
                );
            }
            Err(error) if error.is_unreachable() => {}
            Err(error) => return Err(error.into()),
        }
    }
    Ok(json(StatusCode::OK, &view))
}

/// Ensures a lease: 201 created, 200 an identical one exists, 409 `lease_conflict`.
#[utoipa::path(put, path = "/v1/leases/{name}", tag = "leases", operation_id = "put_lease",
    params(LeaseName), request_body(content = Option<LeaseBody>, description = "optional"),
    responses((status = 200, description = "an identical lease exists", body = LeaseView),
        (status = 201, description = "created", body = LeaseView),
        (status = 400, description = INVALID, body = ErrorBody),
        (status = 409, description = "lease_conflict (exists with other settings), pool_exhausted", body = ErrorBody),
        (status = 413, description = TOO_LARGE, body = ErrorBody),
        (status = 422, description = PIDS, body = ErrorBody),
        (status = 507, description = FULL, body = ErrorBody)))]
pub async fn put(
    State(state): St,
    caller: Option<Extension<Caller>>,
    LeaseName(name): LeaseName,
    query: QueryParams,
    JsonBody(body): JsonBody<LeaseBody>,
) -> ApiResult {
    query.check(&[], &[])?;
    let spec = spec(&state.leases.pool_status().0, body.unwrap_or_default())?;
    let done = state
        .processes
        .create_lease(name, spec, CreateMode::Ensure, caller_uid(caller))
        .await?;
    let status = if done.created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok(json(status, &LeaseView::from(&done.lease)))
}

/// Creates a lease: 201 with `Location`, 409 `lease_exists`.
#[utoipa::path(post, path = "/v1/leases", tag = "leases", operation_id = "create_lease",
    request_body = CreateBody,
    responses((status = 201, description = "created", body = LeaseView,
            headers(("Location" = String, description = "`/v1/leases/{name}`"))),
        (status = 400, description = INVALID, body = ErrorBody),
        (status = 409, description = "lease_exists, pool_exhausted", body = ErrorBody),
        (status = 413, description = TOO_LARGE, body = ErrorBody),
        (status = 422, description = PIDS, body = ErrorBody),
        (status = 507, description = FULL, body = ErrorBody)))]
pub async fn post(
    State(state): St,
    caller: Option<Extension<Caller>>,
    query: QueryParams,
    JsonBody(body): JsonBody<CreateBody>,
) -> ApiResult {
    query.check(&[], &[])?;
    let Some(body) = body else {
        return Err(ApiError::InvalidRequest(
            "a JSON body with at least \"name\" is required".into(),
        ));
    };
    let (name, settings) = body.split();
    validate_name(&name)
        .map_err(|e| ApiError::InvalidRequest(format!("invalid lease name: {e}")))?;
    let spec = spec(&state.leases.pool_status().0, settings)?;
    let done = state
        .processes
        .create_lease(name, spec, CreateMode::New, caller_uid(caller))
        .await?;
    let mut response = json(StatusCode::CREATED, &LeaseView::from(&done.lease));
    // Names are [A-Za-z0-9_.-], so the path needs no escaping and is a valid header value.
    if let Ok(location) = HeaderValue::from_str(&format!("/v1/leases/{}", done.lease.name)) {
        response.headers_mut().insert(LOCATION, location);
    }
    Ok(response)
}

/// Applies the lease's `ttl_seconds` again from now. Takes no body (or `{}`).
#[utoipa::path(post, path = "/v1/leases/{name}/renew", tag = "leases", operation_id = "renew_lease",
    params(LeaseName), request_body(content = Option<EmptyBody>, description = "none, or `{}`"),
    responses((status = 200, body = LeaseView), (status = 400, description = INVALID, body = ErrorBody),
        (status = 404, description = "not_found: no active lease of that name", body = ErrorBody),
        (status = 409, description = "lease_conflict: the lease has no ttl_seconds", body = ErrorBody),
        (status = 413, description = TOO_LARGE, body = ErrorBody),
        (status = 507, description = FULL, body = ErrorBody)))]
pub async fn renew(
    State(state): St,
    caller: Option<Extension<Caller>>,
    LeaseName(name): LeaseName,
    query: QueryParams,
    JsonBody(body): JsonBody<serde_json::Map<String, serde_json::Value>>,
) -> ApiResult {
    query.check(&[], &[])?;
    if body.is_some_and(|b| !b.is_empty()) {
        return Err(ApiError::InvalidRequest(
            "renew takes no body; the lease's own ttl_seconds is applied again".into(),
        ));
    }
    state.processes.forget_lease(&name);
    let lease = state
        .processes
        .renew(name.clone(), caller_uid(caller))
        .await;
    state.processes.forget_lease(&name);
    let lease = lease?;
    Ok(json(StatusCode::OK, &LeaseView::from(&lease)))
}

/// Releases a lease (its range is quarantined), or with `purge` also forgets its history.
#[utoipa::path(delete, path = "/v1/leases/{name}", tag = "leases", operation_id = "delete_lease",
    params(LeaseName,
        ("purge" = Option<bool>, Query, description = "also free the range at once and drop the history"),
        ("force" = Option<bool>, Query, description = "kill the lease's live processes first"),
    ),
    responses((status = 204, description = "released"), (status = 400, description = INVALID, body = ErrorBody),
        (status = 404, description = "not_found: no active lease of that name", body = ErrorBody),
        (status = 202, description = "release_pending (a fleet, `force`): the release is recorded and completes once the hosts named stop the lease's processes", body = ErrorBody),
        (status = 409, description = "lease_busy: it has live processes (on this host, or on the hosts named) and `force` was not given", body = ErrorBody),
        (status = 503, description = "store_unavailable: the lease store cannot be reached; nothing was done", body = ErrorBody),
        (status = 507, description = FULL, body = ErrorBody)))]
pub async fn delete(
    State(state): St,
    caller: Option<Extension<Caller>>,
    LeaseName(name): LeaseName,
    query: QueryParams,
) -> ApiResult {
    let single = query.check(&["purge", "force"], &[])?;
    let flag = |key: &str| match single.get(key) {
        Some(v) => parse_bool(key, v),
        None => Ok(false),
    };
    let (purge, force) = (flag("purge")?, flag("force")?);
    let kind = if force {
        ReleaseKind::ForcedDelete
    } else {
        ReleaseKind::Delete
    };
    state
        .processes
        .release(name, purge, force, caller_uid(caller), kind)
        .await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// The lease's id maps, for `uid_map` files, OCI `config.json`, podman or /etc/subuid.
#[utoipa::path(get, path = "/v1/leases/{name}/idmap", tag = "leases", operation_id = "get_idmap",
    params(LeaseName,
        ("format" = Option<String>, Query, pattern = "^(json|uid_map|gid_map|oci|podman|subuid|subgid)$",
            description = "`json` (the default: every rendering) or `oci` answer JSON; `uid_map`, \
                `gid_map`, `podman`, `subuid` and `subgid` answer one line of text"),
    ),
    responses((status = 200, description = "the map in the asked format", content(
            (IdmapJson = "application/json"), (String = "text/plain"))),
        (status = 400, description = INVALID, body = ErrorBody),
        (status = 404, description = "not_found: no such lease, or it is released", body = ErrorBody)))]
pub async fn idmap(State(state): St, LeaseName(name): LeaseName, query: QueryParams) -> ApiResult {
    let single = query.check(&["format"], &[])?;
    let lease = find(&state, &name).await?;
    if lease.state != LeaseState::Active {
        return Err(ApiError::NotFound(format!(
            "lease {name} is released; its range is no longer yours to map"
        )));
    }
    let view = IdmapView::of(&lease);
    let text = |body: String| -> Response {
        let mut r = (StatusCode::OK, body).into_response();
        r.headers_mut().insert(
            CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        r
    };
    Ok(match single.get("format").copied() {
        None | Some("json") => json(StatusCode::OK, &IdmapJson::All(view)),
        Some("uid_map") => text(format!("{}\n", view.uid_map)),
        Some("gid_map") => text(format!("{}\n", view.gid_map)),
        Some("oci") => json(StatusCode::OK, &IdmapJson::Oci(view.oci)),
        Some("podman") => text(format!("{}\n", view.podman.join(" "))),
        Some("subuid") => text(format!("{}\n", view.subuid)),
        Some("subgid") => text(format!("{}\n", view.subgid)),
        Some(other) => {
            return Err(ApiError::InvalidRequest(format!(
                "format={other:?}: expected json, uid_map, gid_map, oci, podman, subuid or subgid"
            )));
        }
    })
}

/// The history of a lease name, oldest first.
#[utoipa::path(get, path = "/v1/leases/{name}/events", tag = "leases", operation_id = "lease_events",
    params(LeaseName),
    responses((status = 200, body = EventList), (status = 400, description = INVALID, body = ErrorBody),
        (status = 404, description = "not_found: no lease ever had that name", body = ErrorBody)))]
pub async fn events(State(state): St, LeaseName(name): LeaseName, query: QueryParams) -> ApiResult {
    query.check(&[], &[])?;
    let events = state.leases.store().events(&name).await?;
    if events.is_empty() {
        return Err(ApiError::NotFound(format!(
            "no lease was ever named {name}"
        )));
    }
    let view = EventList {
        events: events.iter().map(EventView::from).collect(),
    };
    Ok(json(StatusCode::OK, &view))
}

/// The active lease that holds host uid (or gid) N, and N inside its namespace.
#[utoipa::path(get, path = "/v1/lookup", tag = "leases", operation_id = "lookup",
    params(
        ("uid" = Option<u32>, Query, description = "a host uid; give exactly one of `uid` and `gid`"),
        ("gid" = Option<u32>, Query, description = "a host gid"),
    ),
    responses((status = 200, body = LookupView), (status = 400, description = INVALID, body = ErrorBody),
        (status = 404, description = "not_found: no active lease holds that id", body = ErrorBody)))]
pub async fn lookup(State(state): St, query: QueryParams) -> ApiResult {
    let single = query.check(&["uid", "gid"], &[])?;
    let (kind, raw) = match (single.get("uid"), single.get("gid")) {
        (Some(v), None) => ("uid", *v),
        (None, Some(v)) => ("gid", *v),
        _ => {
            return Err(ApiError::InvalidRequest(
                "give exactly one of uid=N or gid=N".into(),
            ));
        }
    };
    let id: u32 = raw.parse().map_err(|_| {
        ApiError::InvalidRequest(format!("{kind}={raw:?}: expected a host id 0..=4294967295"))
    })?;
    let (pool, _) = state.leases.pool_status();
    let not_held = || ApiError::NotFound(format!("no active lease holds host {kind} {id}"));
    let block = pool.block_of(id).ok_or_else(not_held)?;
    let start = pool.block_start(block).ok_or_else(not_held)?;
    let lease = state
        .leases
        .store()
        .lease_holding(start)
        .await?
        .ok_or_else(not_held)?;
    let base = if kind == "uid" {
        lease.uid_base
    } else {
        lease.gid_base
    };
    let inner_id = id.checked_sub(base).ok_or_else(not_held)?;
    let view = LookupView {
        kind,
        host_id: id,
        inner_id,
        lease: LeaseView::from(&lease),
    };
    Ok(json(StatusCode::OK, &view))
}

async fn find(state: &AppState, name: &str) -> Result<subid_store::LeaseRecord, ApiError> {
    state
        .leases
        .store()
        .get_lease(name)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no lease named {name}")))
}

/// Checks the requested settings and fills in the defaults.
pub(super) fn spec(
    pool: &Pool,
    LeaseBody {
        size,
        labels,
        ttl_seconds,
        rlimits,
        namespaces,
        pids_max,
        max_processes,
    }: LeaseBody,
) -> Result<LeaseSpec, ApiError> {
    for (key, value) in [("pids_max", pids_max), ("max_processes", max_processes)] {
        if let Some(v) = value
            && !(1..=PROCESS_CAP_MAX).contains(&v)
        {
            return Err(ApiError::InvalidRequest(format!(
                "{key} {v} must be between 1 and {PROCESS_CAP_MAX}"
            )));
        }
    }
    if let Some(size) = size {
        if size == 0 || size % pool.block() != 0 {
            return Err(ApiError::InvalidRequest(format!(
                "size {size} must be a positive multiple of the pool's block size {}",
                pool.block()
            )));
        }
        if size > pool.range().len() {
            return Err(ApiError::InvalidRequest(format!(
                "size {size} is larger than the whole pool ({} ids)",
                pool.range().len()
            )));
        }
    }
    let labels = labels.unwrap_or_default();
    validate_labels(labels.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .map_err(|e| ApiError::InvalidRequest(format!("invalid labels: {e}")))?;
    if let Some(ttl) = ttl_seconds
        && (ttl == 0 || ttl > TTL_MAX)
    {
        return Err(ApiError::InvalidRequest(format!(
            "ttl_seconds {ttl} must be between 1 and {TTL_MAX}"
        )));
    }
    let rlimits = rlimits
        .unwrap_or_default()
        .into_iter()
        .map(|(name, limits)| Ok((super::processes::check_rlimit(&name, limits)?, limits)))
        .collect::<Result<BTreeMap<_, _>, ApiError>>()?;
    let namespaces = namespaces
        .unwrap_or_default()
        .iter()
        .map(|name| {
            NamespaceKind::parse(name).map_err(|_| {
                ApiError::InvalidRequest(format!(
                    "namespace {name:?} is not one of mnt, uts, ipc, net (the user namespace is \
                     always there)"
                ))
            })
        })
        .collect::<Result<BTreeSet<_>, ApiError>>()?;
    Ok(LeaseSpec {
        size: Some(size.unwrap_or(pool.block())),
        labels,
        ttl_seconds,
        rlimits,
        namespaces,
        pids_max,
        max_processes,
    })
}
