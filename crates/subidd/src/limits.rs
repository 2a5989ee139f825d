//! Serving limits: a per-request timeout, a cap on requests in flight that answers 503 at once
//! when reached, and a connection loop whose header read timeout cuts off clients that connect
//! and send nothing, dribble their headers, or sit idle on a kept-alive connection.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::header::{HeaderValue, RETRY_AFTER};
use axum::http::{Method, Request as HttpRequest, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::serve::Listener;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::sync::Semaphore;

use crate::error::ApiError;

/// The serving limits of the config (`request_timeout_ms`, `max_concurrent_requests`,
/// `header_read_timeout_ms`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServeLimits {
    pub request_timeout: Duration,
    pub max_concurrent_requests: usize,
    pub header_read_timeout: Duration,
}

/// Shared by every listener: the permits are one global budget.
#[derive(Clone)]
pub struct Limiter {
    permits: Arc<Semaphore>,
    request_timeout: Duration,
}

impl Limiter {
    pub fn new(limits: &ServeLimits) -> Limiter {
        Limiter {
            permits: Arc::new(Semaphore::new(limits.max_concurrent_requests)),
            request_timeout: limits.request_timeout,
        }
    }
}

/// What a client hears when every permit is taken.
const SATURATED: &str =
    "the daemon is serving max_concurrent_requests requests already; retry shortly";
/// What a client hears when its request ran out of time.
const TIMED_OUT: &str = "the request did not finish within request_timeout_ms; it may still take \
     effect: read the state back before retrying";

/// Middleware: sheds a request when `max_concurrent_requests` are in flight (503 `unavailable`
/// with `Retry-After: 1`, never a queue), and answers 503 `unavailable` when a request takes
/// longer than `request_timeout_ms`. Long polls (`POST /v1/processes/{id}/wait` and spawns with
/// `?wait=true`) keep their own `timeout_seconds` instead, and forced deletes are bounded by
/// `kill_grace_ms`: cutting one short would leave its teardown half done.
pub async fn limit(State(limiter): State<Limiter>, request: Request, next: Next) -> Response {
    let Ok(_permit) = Arc::clone(&limiter.permits).try_acquire_owned() else {
        tracing::warn!("request shed: max_concurrent_requests reached");
        let mut response = ApiError::Unavailable(SATURATED).into_response();
        response
            .headers_mut()
            .insert(RETRY_AFTER, HeaderValue::from_static("1"));
        return response;
    };
    if is_long_poll(&request) {
        return next.run(request).await;
    }
    let what = format!("{} {}", request.method(), request.uri().path());
    match tokio::time::timeout(limiter.request_timeout, next.run(request)).await {
        Ok(response) => response,
        Err(_) => {
            tracing::warn!(request = %what, timeout = ?limiter.request_timeout, "request timed out");
            let mut response = ApiError::Unavailable(TIMED_OUT).into_response();
            debug_assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
            response
                .headers_mut()
                .insert(RETRY_AFTER, HeaderValue::from_static("1"));
            response
        }
    }
}

/// Whether the request waits for processes by design: bounded by its own `timeout_seconds`, or
/// (a forced delete) by `kill_grace_ms` plus the SIGKILL rounds.
fn is_long_poll(request: &Request) -> bool {
    let path = request.uri().path();
    let query_says = |key: &str| {
        form_urlencoded::parse(request.uri().query().unwrap_or("").as_bytes())
            .any(|(k, v)| k == key && crate::api::parse_bool(key, &v).unwrap_or(false))
    };
    if request.method() == Method::DELETE {
        return path.starts_with("/v1/leases/") && query_says("force");
    }
    if request.method() != Method::POST {
        return false;
    }
    if path.starts_with("/v1/processes/") && path.ends_with("/wait") {
        return true;
    }
    path.starts_with("/v1/leases/") && path.ends_with("/processes") && query_says("wait")
}

/// Serves HTTP/1.1 connections from `listener` until `shutdown` completes, then lets open
/// connections finish their requests (graceful shutdown). `service_for` builds the service of
/// one connection from its stream (the unix listener reads the peer's credentials there).
///
/// Unlike `axum::serve`, the connections get a timer, so `header_read_timeout` applies: a
/// client that has not sent a complete request head that long after connecting, or after its
/// previous response on a kept-alive connection, is disconnected.
pub async fn serve<L, S, F>(
    mut listener: L,
    header_read_timeout: Duration,
    shutdown: impl Future<Output = ()> + Send + 'static,
    service_for: F,
) where
    L: Listener,
    F: Fn(&L::Io) -> S,
    S: tower::Service<HttpRequest<Incoming>, Response = Response, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    let graceful = GracefulShutdown::new();
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(header_read_timeout);
    tokio::pin!(shutdown);
    loop {
        let (io, _addr) = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut shutdown => break,
        };
        let service = TowerToHyperService::new(service_for(&io));
        let connection = graceful.watch(builder.serve_connection(TokioIo::new(io), service));
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, "connection closed with an error");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_polls_are_told_apart() {
        let cases = [
            ("POST", "/v1/processes/0123456789abcdef/wait", true),
            (
                "POST",
                "/v1/processes/0123456789abcdef/wait?timeout_seconds=60",
                true,
            ),
            ("POST", "/v1/leases/a/processes?wait=true", true),
            ("POST", "/v1/leases/a/processes?wait", true),
            ("POST", "/v1/leases/a/processes?wait=false", false),
            ("POST", "/v1/leases/a/processes", false),
            ("DELETE", "/v1/leases/a?force=true", true),
            ("DELETE", "/v1/leases/a?force=0", false),
            ("DELETE", "/v1/leases/a", false),
            ("GET", "/v1/processes/0123456789abcdef/wait", false),
            ("PUT", "/v1/leases/a?wait=true", false),
        ];
        for (method, uri, expected) in cases {
            let request = HttpRequest::builder()
                .method(method)
                .uri(uri)
                .body(axum::body::Body::empty())
                .expect("request");
            assert_eq!(is_long_poll(&request), expected, "{method} {uri}");
        }
    }
}
