//! `PUT /v1/leases/{name}/namespace`: make sure the lease's namespaces exist, answer their pins
//! (for runtimes that join them, such as `subid-runc`).

use axum::extract::State;
use axum::http::StatusCode;
use serde::Serialize;
use utoipa::ToSchema;

use super::model::EmptyBody;
use super::{ApiResult, JsonBody, LeaseName, QueryParams, St, json};
use crate::error::{ApiError, ErrorBody};

/// `PUT /v1/leases/{name}/namespace` answer: where the lease's namespaces are pinned (open them,
/// or name them as a runtime's `linux.namespaces[].path`).
#[derive(Debug, Serialize, ToSchema)]
#[schema(example = json!({"user": "/run/subidd/ns/web-1/user"}))]
pub struct NamespaceView {
    /// The user namespace, owned by the lease's base uid and mapping the lease's range.
    pub user: String,
    /// The lease's mount namespace, when it has one (`namespaces`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mnt: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uts: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ipc: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub net: Option<String>,
}

/// Makes the lease's namespaces if they do not exist yet, exactly as its first spawn would, and
/// answers their pins: 201 when made now, 200 when they existed. Takes no body (or `{}`).
#[utoipa::path(put, path = "/v1/leases/{name}/namespace", tag = "leases", operation_id = "ensure_namespace",
    params(LeaseName), request_body(content = Option<EmptyBody>, description = "none, or `{}`"),
    responses((status = 200, description = "they existed", body = NamespaceView),
        (status = 201, description = "made now", body = NamespaceView),
        (status = 400, description = "invalid_request: a bad name, query key or body", body = ErrorBody),
        (status = 404, description = "not_found: no active lease of that name", body = ErrorBody),
        (status = 413, description = "payload_too_large: the body is over 64 KiB", body = ErrorBody)))]
pub async fn put(
    State(state): St,
    LeaseName(name): LeaseName,
    query: QueryParams,
    JsonBody(_body): JsonBody<EmptyBody>,
) -> ApiResult {
    query.check(&[], &[])?;
    let pins = state.processes.ensure_namespace(&name).await?;
    let text = |p: &std::path::Path| {
        p.to_str()
            .map(str::to_string)
            .ok_or_else(|| ApiError::Internal(format!("pin path {} is not UTF-8", p.display())))
    };
    let mut view = NamespaceView {
        user: text(&pins.user)?,
        mnt: None,
        uts: None,
        ipc: None,
        net: None,
    };
    for (kind, path) in &pins.extra {
        let path = Some(text(path)?);
        match kind {
            subid_sys::NsKind::Mnt => view.mnt = path,
            subid_sys::NsKind::Uts => view.uts = path,
            subid_sys::NsKind::Ipc => view.ipc = path,
            subid_sys::NsKind::Net => view.net = path,
            subid_sys::NsKind::User => {}
        }
    }
    let status = if pins.created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok(json(status, &view))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use axum::http::{Method, StatusCode};

    use super::super::tests::{app, call};

    #[tokio::test]
    async fn without_an_active_lease_or_with_a_body_it_refuses() {
        let (_dir, app, _) = app(2, Duration::from_secs(60)).await;
        let (s, e) = call(&app, Method::PUT, "/v1/leases/nobody/namespace", "").await;
        assert_eq!(
            (s, e["code"].as_str()),
            (StatusCode::NOT_FOUND, Some("not_found"))
        );
        let (s, _) = call(&app, Method::PUT, "/v1/leases/a", "").await;
        assert_eq!(s, StatusCode::CREATED);
        let (s, e) = call(&app, Method::PUT, "/v1/leases/a/namespace", r#"{"x":1}"#).await;
        assert_eq!(
            (s, e["code"].as_str()),
            (StatusCode::BAD_REQUEST, Some("invalid_request"))
        );
        let (s, e) = call(&app, Method::PUT, "/v1/leases/a/namespace?force=1", "").await;
        assert_eq!(
            (s, e["code"].as_str()),
            (StatusCode::BAD_REQUEST, Some("invalid_request"))
        );
        let (s, e) = call(&app, Method::PUT, "/v1/leases/-bad/namespace", "").await;
        assert_eq!(
            (s, e["code"].as_str()),
            (StatusCode::BAD_REQUEST, Some("invalid_request"))
        );
        let (s, _) = call(&app, Method::DELETE, "/v1/leases/a", "").await;
        assert_eq!(s, StatusCode::NO_CONTENT);
        let (s, e) = call(&app, Method::PUT, "/v1/leases/a/namespace", "").await;
        assert_eq!(
            (s, e["code"].as_str()),
            (StatusCode::NOT_FOUND, Some("not_found"))
        );
    }
}
