//! `/v1/leases/{name}/attach`: cgroups of processes subidd did not start (a runtime's
//! container), attached to a lease so that its teardown counts and stops them.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::{ApiResult, JsonBody, LeaseName, QueryParams, St, json};
use crate::error::{ApiError, ErrorBody};
use crate::process::AttachmentState;

/// `POST /v1/leases/{name}/attach` body.
#[derive(Debug, Deserialize, ToSchema)]
#[schema(example = json!({"pid": 4711, "id": "3f2a9c0e1b7d"}))]
#[serde(deny_unknown_fields)]
pub struct AttachBody {
    /// A process of the container (its init), as the host sees it. It must run in the lease's
    /// user namespace (or one nested in it), or in one that maps only the lease's ids.
    pub pid: i32,
    /// The runtime's name for it (a container id): 1-128 of `[A-Za-z0-9_.-]`, the first a
    /// letter or digit.
    pub id: String,
}

/// An attached cgroup.
#[derive(Debug, Serialize, ToSchema)]
pub struct AttachmentView {
    pub id: String,
    pub pid: i32,
    /// `v2` or `v1`: the hierarchy of `cgroup`.
    pub hierarchy: String,
    /// The cgroup, as `/proc/PID/cgroup` names it.
    pub cgroup: String,
    /// Its directory, `null` once the runtime removed it.
    pub dir: Option<String>,
    /// Live processes in it (and below) now.
    pub processes: usize,
}

impl From<AttachmentState> for AttachmentView {
    fn from(s: AttachmentState) -> AttachmentView {
        AttachmentView {
            id: s.attachment.id,
            pid: s.attachment.pid,
            hierarchy: s.attachment.hierarchy,
            cgroup: s.attachment.cgroup.display().to_string(),
            dir: s.dir.map(|d| d.display().to_string()),
            processes: s.processes,
        }
    }
}

/// `GET /v1/leases/{name}/attach` answer.
#[derive(Debug, Serialize, ToSchema)]
pub struct AttachmentList {
    pub attached: Vec<AttachmentView>,
}

/// The attachment id in `/v1/leases/{name}/attach/{id}`.
#[derive(Debug, IntoParams)]
#[into_params(parameter_in = Path)]
#[allow(dead_code)] // documents the path; the handler reads it with the lease name
pub struct AttachmentId {
    /// 1-128 characters of `[A-Za-z0-9_.-]`, the first a letter or digit.
    #[param(pattern = "^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")]
    pub id: String,
}

/// Attaches the cgroup of a process of the lease that subidd did not start: from then on a
/// plain release is refused while it holds a process, a forced one kills it. Idempotent per id.
#[utoipa::path(post, path = "/v1/leases/{name}/attach", tag = "leases", operation_id = "attach",
    params(LeaseName), request_body = AttachBody,
    responses((status = 200, description = "attached", body = AttachmentView),
        (status = 400, description = "invalid_request: bad body, no such process, or a process in no cgroup of its own (or in one holding the daemon)", body = ErrorBody),
        (status = 404, description = "not_found: no active lease of that name", body = ErrorBody),
        (status = 409, description = "not_in_lease: the process is not inside the lease", body = ErrorBody),
        (status = 413, description = "payload_too_large", body = ErrorBody)))]
pub async fn post(
    State(state): St,
    LeaseName(name): LeaseName,
    query: QueryParams,
    JsonBody(body): JsonBody<AttachBody>,
) -> ApiResult {
    query.check(&[], &[])?;
    let body = body.ok_or_else(|| {
        ApiError::InvalidRequest("a body {\"pid\": N, \"id\": \"...\"} is needed".into())
    })?;
    let attached = state.processes.attach(&name, &body.id, body.pid).await?;
    Ok(json(StatusCode::OK, &AttachmentView::from(attached)))
}

/// The lease's attached cgroups and their live processes.
#[utoipa::path(get, path = "/v1/leases/{name}/attach", tag = "leases", operation_id = "list_attached",
    params(LeaseName),
    responses((status = 200, body = AttachmentList),
        (status = 400, description = "invalid_request", body = ErrorBody),
        (status = 404, description = "not_found: no active lease of that name", body = ErrorBody)))]
pub async fn list(State(state): St, LeaseName(name): LeaseName, query: QueryParams) -> ApiResult {
    query.check(&[], &[])?;
    let lease = state
        .leases
        .store()
        .get_lease(&name)
        .await?
        .filter(|l| l.state == subid_core::LeaseState::Active)
        .ok_or_else(|| ApiError::NotFound(format!("no active lease {name}")))?;
    let attached = state
        .processes
        .attachments(&lease)
        .into_iter()
        .map(AttachmentView::from)
        .collect();
    Ok(json(StatusCode::OK, &AttachmentList { attached }))
}

/// Forgets one attachment (its processes keep running).
#[utoipa::path(delete, path = "/v1/leases/{name}/attach/{id}", tag = "leases", operation_id = "detach",
    params(("name" = String, Path, pattern = "^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$"), AttachmentId),
    responses((status = 204, description = "forgotten"),
        (status = 400, description = "invalid_request", body = ErrorBody),
        (status = 404, description = "not_found: no active lease, or no such attachment", body = ErrorBody)))]
pub async fn delete(
    State(state): St,
    axum::extract::Path((name, id)): axum::extract::Path<(String, String)>,
    query: QueryParams,
) -> ApiResult {
    query.check(&[], &[])?;
    subid_core::validate_name(&name)
        .map_err(|e| ApiError::InvalidRequest(format!("invalid lease name: {e}")))?;
    subid_core::validate_name(&id)
        .map_err(|e| ApiError::InvalidRequest(format!("invalid attachment id: {e}")))?;
    state.processes.detach(&name, &id).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}
