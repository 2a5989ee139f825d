//! Observability endpoints and middleware: `GET /metrics`, `GET /v1/events`, and the
//! per-request log line and request metrics.

use std::time::Instant;

use axum::body::Body;
use axum::extract::{MatchedPath, Request, State};
use axum::http::header::{CACHE_CONTROL, CONTENT_TYPE};
use axum::http::{HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::{ApiResult, AppState, Caller, QueryParams, St, parse_bool};
use crate::error::{ApiError, ErrorBody, ErrorCode};
use crate::metrics::{self, Snapshot, UNMATCHED};

/// `GET /metrics`: Prometheus text format.
#[utoipa::path(get, path = "/metrics", tag = "daemon", operation_id = "metrics",
    responses(
        (status = 200, description = "Prometheus text exposition format 0.0.4; see docs/OPERATIONS.md",
            body = String, content_type = "text/plain"),
        (status = 400, description = "invalid_request: this endpoint takes no query parameters", body = ErrorBody)))]
pub async fn metrics(State(state): St, query: QueryParams) -> ApiResult {
    query.check(&[], &[])?;
    let (_, pool) = state.leases.pool_status();
    let leases_active = state.leases.store().active_lease_count().await?;
    let text = state.leases.metrics().render(&Snapshot {
        pool,
        leases_active,
        processes_running: state.processes.running(),
        event_streams: state.leases.feed().streams(),
        pool_conflicts: state.leases.pool_warnings().len(),
        pool_process_holds: state.leases.process_holds().len(),
    });
    let mut response = (StatusCode::OK, text).into_response();
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static(metrics::CONTENT_TYPE),
    );
    Ok(response)
}

/// `GET /v1/events?since=ID&follow=false&lease=NAME`: newline-delimited JSON, the events after
/// `since` (default: after the newest one now), then live ones unless `follow=false`.
#[utoipa::path(get, path = "/v1/events", tag = "daemon", operation_id = "events",
    params(
        ("since" = Option<i64>, Query, minimum = 0,
            description = "send the events after this id (0: the whole history); default: only new ones"),
        ("follow" = Option<bool>, Query, description = "keep the stream open for live events (default true)"),
        ("lease" = Option<String>, Query, pattern = "^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$",
            description = "only the events of this lease name"),
    ),
    responses(
        (status = 200, description = "one JSON object per line: `{id, type, at, lease, caller_uid, details}`",
            body = String, content_type = "application/x-ndjson"),
        (status = 400, description = "invalid_request: an unknown query key or a bad value", body = ErrorBody)))]
pub async fn events(State(state): St, query: QueryParams) -> ApiResult {
    let single = query.check(&["since", "follow", "lease"], &[])?;
    let since = single
        .get("since")
        .map(|v| {
            v.parse::<i64>().ok().filter(|n| *n >= 0).ok_or_else(|| {
                ApiError::InvalidRequest(format!(
                    "since={v:?}: expected an event id (0 for the whole history)"
                ))
            })
        })
        .transpose()?;
    let follow = match single.get("follow") {
        Some(v) => parse_bool("follow", v)?,
        None => true,
    };
    let lease = single
        .get("lease")
        .map(|name| {
            subid_core::validate_name(name)
                .map(|()| (*name).to_string())
                .map_err(|e| ApiError::InvalidRequest(format!("invalid lease name: {e}")))
        })
        .transpose()?;
    // Without `since`: what is committed now, read from the database rather than from the feed,
    // which publishes each commit only after answering it (the backlog step covers the gap).
    let since = match since {
        Some(since) => since,
        None => state.leases.store().last_event_id().await?,
    };
    let cursor = state
        .leases
        .feed()
        .cursor(
            state.leases.store().clone(),
            Some(since),
            follow,
            lease,
            state.leases.metrics().clone(),
        )
        .ok_or(ApiError::Unavailable(
            "too many event streams are open; close one or retry later",
        ))?;
    let mut response = Body::from_stream(cursor.into_stream()).into_response();
    let headers = response.headers_mut();
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/x-ndjson"),
    );
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(response)
}

/// Hands the caller (set by the auth layer, outside the router) back on the response, so the
/// request log, which wraps authentication, can name it.
pub async fn echo_caller(request: Request, next: Next) -> Response {
    let caller = request.extensions().get::<Caller>().copied();
    let mut response = next.run(request).await;
    if let Some(caller) = caller {
        response.extensions_mut().insert(caller);
    }
    response
}

/// Outermost layer of each transport: times the request, counts it by route template, method
/// and status, and logs one line (at debug for `/_ping` and `/metrics`, info otherwise).
pub async fn observe(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = metrics::method_label(request.method());
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string());
    let path = request.uri().path().to_string();
    let response = next.run(request).await;
    let elapsed = started.elapsed();
    let status = response.status().as_u16();
    let code = response.extensions().get::<ErrorCode>().map(|c| c.0);
    let uid = response
        .extensions()
        .get::<Caller>()
        .and_then(|caller| caller.uid);
    state.leases.metrics().observe_request(
        route.as_deref().unwrap_or(UNMATCHED),
        method,
        status,
        elapsed,
        code,
    );
    // Microsecond resolution: `0.217`, not `0.21730700000000002`.
    let duration_ms = elapsed.as_micros() as f64 / 1000.0;
    if matches!(route.as_deref(), Some("/_ping" | "/metrics")) {
        tracing::debug!(method, path, status, duration_ms, uid, code, "request");
    } else {
        tracing::info!(method, path, status, duration_ms, uid, code, "request");
    }
    response
}
