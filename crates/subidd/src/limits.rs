//! Serving limits: a per-request timeout, a cap on requests in flight that answers 503 at once
//! when reached, and a connection loop whose header read timeout cuts off clients that connect
//! and send nothing, dribble their headers, or sit idle on a kept-alive connection.
//!
//! Connections are bounded per listener: each has a budget of open connections and a smaller
//! one of connections whose caller has not been let in yet (no request has passed
//! authentication). A connection past either budget is answered `503` and closed at once, a
//! refused caller's connection (401/403) is closed after its answer, and the budgets are sized
//! so that all connections together take at most half of the daemon's RLIMIT_NOFILE: a flood
//! of TCP connections can neither exhaust the descriptors that spawns, the database and the
//! logs need, nor take the unix socket's budget, so root is still answered there.

use std::convert::Infallible;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::http::header::{CONNECTION, HeaderValue, RETRY_AFTER};
use axum::http::{Method, Request as HttpRequest, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::serve::Listener;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::error::ApiError;

/// The serving limits of the config (`request_timeout_ms`, `max_concurrent_requests`,
/// `header_read_timeout_ms`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServeLimits {
    pub request_timeout: Duration,
    pub max_concurrent_requests: usize,
    pub header_read_timeout: Duration,
}

/// The largest value any `max_*_connections` key may take.
pub const MAX_CONNECTIONS_KEY: usize = 1 << 20;
/// Default `max_unix_connections` when the open-file limit allows it.
pub const DEFAULT_UNIX_CONNECTIONS: usize = 4096;
/// Default `max_tcp_connections` when the open-file limit allows it.
pub const DEFAULT_TCP_CONNECTIONS: usize = 1024;
/// Default `max_unauthenticated_connections` (per listener).
pub const DEFAULT_UNAUTHENTICATED_CONNECTIONS: usize = 64;

/// The connection caps as configured: `None` for a key left unset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestedConnections {
    pub unix: Option<usize>,
    pub tcp: Option<usize>,
    pub unauthenticated: Option<usize>,
    /// Whether a TCP listener is configured (its budget counts only then).
    pub tcp_enabled: bool,
}

/// The connection caps in force.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionCaps {
    pub unix: usize,
    pub tcp: usize,
    pub unauthenticated: usize,
}

/// Why the configured caps cannot be served under the open-file limit.
#[derive(Debug, thiserror::Error)]
#[error(
    "{asked} need {needed} file descriptors, but connections may take at most half of the \
     daemon's open-file limit (RLIMIT_NOFILE {nofile}, after raising the soft limit to the hard \
     one): {budget}; the other half is kept for spawns (pidfds, pipes), the processes' pidfds, \
     the database and the logs. Lower the caps, or raise the hard limit (LimitNOFILE= in the \
     systemd unit, `ulimit -Hn` in a shell)"
)]
pub struct ConnectionsDoNotFit {
    asked: String,
    needed: u64,
    nofile: u64,
    budget: u64,
}

/// Sizes the connection caps for an open-file limit of `nofile`: all listeners' connections
/// together may take at most half of it. A key that was set is kept as set (refused when the
/// set keys do not fit); unset keys get their default, lowered to what is left (the unix
/// socket gets four fifths of it when both are unset), and the notes say what was lowered.
pub fn fit_connections(
    requested: RequestedConnections,
    nofile: u64,
) -> Result<(ConnectionCaps, Vec<String>), ConnectionsDoNotFit> {
    let budget = nofile / 2;
    let as_u64 = |n: usize| u64::try_from(n).unwrap_or(u64::MAX);
    let tcp_counts = |n: usize| if requested.tcp_enabled { as_u64(n) } else { 0 };
    let explicit =
        as_u64(requested.unix.unwrap_or(0)).saturating_add(requested.tcp.map_or(0, tcp_counts));
    let refuse = |needed: u64| {
        let mut asked = Vec::new();
        if let Some(n) = requested.unix {
            asked.push(format!("max_unix_connections ({n})"));
        } else {
            asked.push("the unix socket (at least 1)".to_string());
        }
        if requested.tcp_enabled {
            match requested.tcp {
                Some(n) => asked.push(format!("max_tcp_connections ({n})")),
                None => asked.push("the TCP listener (at least 1)".to_string()),
            }
        }
        ConnectionsDoNotFit {
            asked: asked.join(" + "),
            needed,
            nofile,
            budget,
        }
    };
    let unset = u64::from(requested.unix.is_none())
        + u64::from(requested.tcp_enabled && requested.tcp.is_none());
    if explicit.saturating_add(unset) > budget {
        return Err(refuse(explicit.saturating_add(unset)));
    }
    let left = budget - explicit;
    let mut notes = Vec::new();
    let mut lowered = |key: &str, default: usize, got: usize| {
        if got < default {
            notes.push(format!(
                "{key} lowered from its default {default} to {got} to fit RLIMIT_NOFILE {nofile}"
            ));
        }
    };
    let to_usize = |n: u64| usize::try_from(n).unwrap_or(usize::MAX);
    let (unix, tcp) = match (requested.unix, requested.tcp) {
        (Some(unix), Some(tcp)) => (unix, tcp),
        (Some(unix), None) => {
            let tcp = DEFAULT_TCP_CONNECTIONS.min(to_usize(left));
            if requested.tcp_enabled {
                lowered("max_tcp_connections", DEFAULT_TCP_CONNECTIONS, tcp);
            }
            (unix, tcp.max(1))
        }
        (None, Some(tcp)) => {
            let unix = DEFAULT_UNIX_CONNECTIONS.min(to_usize(left));
            lowered("max_unix_connections", DEFAULT_UNIX_CONNECTIONS, unix);
            (unix, tcp)
        }
        (None, None) if !requested.tcp_enabled => {
            let unix = DEFAULT_UNIX_CONNECTIONS.min(to_usize(left));
            lowered("max_unix_connections", DEFAULT_UNIX_CONNECTIONS, unix);
            (unix, DEFAULT_TCP_CONNECTIONS)
        }
        (None, None) => {
            let wanted = as_u64(DEFAULT_UNIX_CONNECTIONS + DEFAULT_TCP_CONNECTIONS);
            let (unix, tcp) = if wanted <= left {
                (DEFAULT_UNIX_CONNECTIONS, DEFAULT_TCP_CONNECTIONS)
            } else {
                let unix = (left * 4 / 5).max(1);
                (to_usize(unix), to_usize((left - unix).max(1)))
            };
            lowered("max_unix_connections", DEFAULT_UNIX_CONNECTIONS, unix);
            lowered("max_tcp_connections", DEFAULT_TCP_CONNECTIONS, tcp);
            (unix, tcp)
        }
    };
    let unauthenticated = requested
        .unauthenticated
        .unwrap_or(DEFAULT_UNAUTHENTICATED_CONNECTIONS);
    Ok((
        ConnectionCaps {
            unix,
            tcp,
            unauthenticated,
        },
        notes,
    ))
}

/// One listener's connection budget: open connections, and among them those whose caller
/// has not been let in yet.
#[derive(Debug, Clone)]
pub struct ConnectionBudget {
    listener: &'static str,
    open: Arc<Semaphore>,
    unauthenticated: Arc<Semaphore>,
    max_open: usize,
    max_unauthenticated: usize,
    refusals: Arc<Refusals>,
}

/// What is known of a caller when its connection is accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Caller {
    /// Its credentials (SO_PEERCRED) are ones the listener serves.
    Allowed,
    /// Not known until a request passes authentication (TCP), or known to be refused.
    Unknown,
}

/// Why a connection was turned away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The listener holds its `max_*_connections` already.
    Full,
    /// The listener holds `max_unauthenticated_connections` callers not let in yet.
    Unauthenticated,
}

impl ConnectionBudget {
    /// A budget of `max_open` connections on the listener named `listener` (`unix`, `tcp`),
    /// at most `max_unauthenticated` of them not let in yet.
    pub fn new(listener: &'static str, max_open: usize, max_unauthenticated: usize) -> Self {
        let max_unauthenticated = max_unauthenticated.min(max_open);
        ConnectionBudget {
            listener,
            open: Arc::new(Semaphore::new(max_open)),
            unauthenticated: Arc::new(Semaphore::new(max_unauthenticated)),
            max_open,
            max_unauthenticated,
            refusals: Arc::new(Refusals::default()),
        }
    }

    /// A place for one more connection, or why there is none. `caller` says whether the
    /// caller is known to be let in already (a unix peer the policy allows, by its
    /// credentials): such a connection never takes an unauthenticated place.
    pub fn admit(&self, caller: Caller) -> Result<Admission, Refusal> {
        let open = Arc::clone(&self.open)
            .try_acquire_owned()
            .map_err(|_| Refusal::Full)?;
        let unauthenticated = match caller {
            Caller::Allowed => None,
            Caller::Unknown => Some(
                Arc::clone(&self.unauthenticated)
                    .try_acquire_owned()
                    .map_err(|_| Refusal::Unauthenticated)?,
            ),
        };
        Ok(Admission {
            inner: Arc::new(AdmissionInner {
                _open: open,
                unauthenticated: Mutex::new(unauthenticated),
            }),
        })
    }

    /// Connections open now.
    pub fn open_now(&self) -> usize {
        self.max_open - self.open.available_permits()
    }

    /// Records a refusal; logs at most one line per ten seconds per listener, with the count.
    fn refused(&self, why: Refusal) {
        let count = self.refusals.count.fetch_add(1, Ordering::Relaxed) + 1;
        let Ok(mut last) = self.refusals.last_log.lock() else {
            return;
        };
        if last.is_some_and(|at| at.elapsed() < Duration::from_secs(10)) {
            return;
        }
        *last = Some(Instant::now());
        let (key, cap) = match why {
            Refusal::Full => (
                match self.listener {
                    "tcp" => "max_tcp_connections",
                    _ => "max_unix_connections",
                },
                self.max_open,
            ),
            Refusal::Unauthenticated => {
                ("max_unauthenticated_connections", self.max_unauthenticated)
            }
        };
        tracing::warn!(
            listener = self.listener,
            refused_total = count,
            "connection refused: {key} ({cap}) reached"
        );
    }
}

#[derive(Debug, Default)]
struct Refusals {
    count: AtomicU64,
    last_log: Mutex<Option<Instant>>,
}

/// A connection's place in its listener's budget, carried in each request's extensions; the
/// places are given back when the connection ends.
#[derive(Debug, Clone)]
pub struct Admission {
    inner: Arc<AdmissionInner>,
}

#[derive(Debug)]
struct AdmissionInner {
    _open: OwnedSemaphorePermit,
    unauthenticated: Mutex<Option<OwnedSemaphorePermit>>,
}

impl Admission {
    /// A request on this connection passed authentication: it no longer counts as
    /// unauthenticated.
    pub fn authenticated(&self) {
        if let Ok(mut permit) = self.inner.unauthenticated.lock() {
            permit.take();
        }
    }
}

/// Middleware placed inside the authentication layer (so only requests it let through reach
/// it): moves the connection out of the unauthenticated budget.
pub async fn mark_authenticated(request: Request, next: Next) -> Response {
    if let Some(admission) = request.extensions().get::<Admission>() {
        admission.authenticated();
    }
    next.run(request).await
}

/// Response mapper: a refused caller (401, 403) gets `Connection: close`, so hyper closes the
/// connection after the answer and a refused caller never keeps a connection open.
pub async fn close_refused(mut response: Response) -> Response {
    if matches!(
        response.status(),
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN
    ) {
        response
            .headers_mut()
            .insert(CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

/// A stream a refusal can be written to without waiting.
pub trait TryWrite {
    /// Writes what fits in the socket buffer now; never blocks.
    fn try_write_now(&self, bytes: &[u8]);
}

impl TryWrite for tokio::net::TcpStream {
    fn try_write_now(&self, bytes: &[u8]) {
        let _ = self.try_write(bytes);
    }
}

impl TryWrite for tokio::net::UnixStream {
    fn try_write_now(&self, bytes: &[u8]) {
        let _ = self.try_write(bytes);
    }
}

/// What a connection past its listener's budget is told.
const FULL: &str = "the daemon holds as many connections on this listener as it serves \
     (max_unix_connections or max_tcp_connections); retry shortly";
/// What a connection past the unauthenticated budget is told.
const TOO_MANY_UNAUTHENTICATED: &str = "too many connections on this listener have not \
     authenticated yet (max_unauthenticated_connections); retry shortly";

/// The answer of a connection past its listener's budget, written before the request is read
/// (best effort: a client that already sent its request may see a reset instead): the same
/// `503 unavailable` JSON body as any other.
fn refusal_bytes(why: Refusal) -> Vec<u8> {
    let message = match why {
        Refusal::Full => FULL,
        Refusal::Unauthenticated => TOO_MANY_UNAUTHENTICATED,
    };
    let body = serde_json::json!({ "code": "unavailable", "message": message }).to_string();
    format!(
        "HTTP/1.1 503 Service Unavailable\r\nconnection: close\r\nretry-after: 1\r\n\
         content-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
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
            .any(|(k, v)| k == key && crate::wire::parse_bool(key, &v).unwrap_or(false))
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
/// previous response on a kept-alive connection, is disconnected. Each connection takes a place
/// in `budget` first (`service_for` also says what is known of the caller); one past it is
/// answered 503 and closed at once, so the listener never holds more descriptors than its
/// budget.
pub async fn serve<L, S, F>(
    mut listener: L,
    header_read_timeout: Duration,
    budget: ConnectionBudget,
    shutdown: impl Future<Output = ()> + Send + 'static,
    service_for: F,
) where
    L: Listener,
    L::Io: TryWrite,
    F: Fn(&L::Io) -> (S, Caller),
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
        let (service, caller) = service_for(&io);
        let admission = match budget.admit(caller) {
            Ok(admission) => admission,
            Err(why) => {
                budget.refused(why);
                io.try_write_now(&refusal_bytes(why));
                continue;
            }
        };
        let tagged = admission.clone();
        let service = tower::ServiceBuilder::new()
            .map_request(move |mut request: HttpRequest<Incoming>| {
                request.extensions_mut().insert(tagged.clone());
                request
            })
            .service(service);
        let service = TowerToHyperService::new(service);
        let connection = graceful.watch(builder.serve_connection(TokioIo::new(io), service));
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, "connection closed with an error");
            }
            // The connection's places go back only now that it is closed.
            drop(admission);
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn asked(unix: Option<usize>, tcp: Option<usize>, tcp_enabled: bool) -> RequestedConnections {
        RequestedConnections {
            unix,
            tcp,
            unauthenticated: None,
            tcp_enabled,
        }
    }

    #[test]
    fn caps_fit_in_half_the_open_file_limit() {
        // Plenty: the defaults as they are.
        let (caps, notes) = fit_connections(asked(None, None, true), 65_536).expect("fits");
        assert_eq!(
            (caps.unix, caps.tcp, caps.unauthenticated),
            (4096, 1024, 64)
        );
        assert!(notes.is_empty(), "{notes:?}");
        // Too little for the defaults: lowered, four fifths to the unix socket, with notes.
        let (caps, notes) = fit_connections(asked(None, None, true), 2048).expect("fits");
        assert_eq!((caps.unix, caps.tcp), (819, 205));
        assert!(caps.unix + caps.tcp <= 1024);
        assert_eq!(notes.len(), 2, "{notes:?}");
        assert!(notes[0].contains("max_unix_connections") && notes[0].contains("2048"));
        // Without TCP the unix socket may take the whole half.
        let (caps, _) = fit_connections(asked(None, None, false), 2048).expect("fits");
        assert_eq!(caps.unix, 1024);
        // A set key is kept; the unset one gets what is left.
        let (caps, notes) = fit_connections(asked(Some(1000), None, true), 2048).expect("fits");
        assert_eq!((caps.unix, caps.tcp), (1000, 24));
        assert_eq!(notes.len(), 1, "{notes:?}");
        let (caps, _) = fit_connections(asked(None, Some(100), true), 20_000).expect("fits");
        assert_eq!((caps.unix, caps.tcp), (4096, 100));
        // The TCP key does not count when there is no TCP listener.
        fit_connections(asked(Some(1024), Some(4096), false), 2048).expect("fits");
        // Set keys that do not fit are refused, naming them, the limit and the way out.
        let err =
            fit_connections(asked(Some(1000), Some(100), true), 2048).expect_err("does not fit");
        let text = err.to_string();
        for part in [
            "max_unix_connections (1000)",
            "max_tcp_connections (100)",
            "1100",
            "RLIMIT_NOFILE 2048",
            "1024",
            "LimitNOFILE",
        ] {
            assert!(text.contains(part), "{part}: {text}");
        }
        let err = fit_connections(asked(Some(1024), None, true), 2048).expect_err("no room");
        assert!(err.to_string().contains("TCP listener"), "{err}");
        assert!(fit_connections(asked(None, None, false), 1).is_err());
    }

    #[tokio::test]
    async fn budgets_admit_up_to_their_caps_and_give_places_back() {
        let budget = ConnectionBudget::new("tcp", 4, 2);
        let a = budget.admit(Caller::Unknown).expect("first");
        let b = budget.admit(Caller::Unknown).expect("second");
        assert_eq!(
            budget.admit(Caller::Unknown).map(drop),
            Err(Refusal::Unauthenticated),
            "two not let in yet"
        );
        let allowed = budget
            .admit(Caller::Allowed)
            .expect("a caller known to be allowed takes no unauthenticated place");
        a.authenticated();
        let c = budget
            .admit(Caller::Unknown)
            .expect("a's unauthenticated place is free again");
        assert_eq!(budget.open_now(), 4);
        assert_eq!(
            budget.admit(Caller::Allowed).map(drop),
            Err(Refusal::Full),
            "four open"
        );
        drop((b, c, allowed));
        assert_eq!(budget.open_now(), 1);
        a.authenticated();
        drop(a);
        assert_eq!(budget.open_now(), 0);
        let refusal = String::from_utf8(refusal_bytes(Refusal::Full)).expect("text");
        let (head, body) = refusal.split_once("\r\n\r\n").expect("head and body");
        assert!(head.starts_with("HTTP/1.1 503 "), "{head}");
        assert!(
            head.contains(&format!("content-length: {}", body.len())),
            "{head}"
        );
        let json: serde_json::Value = serde_json::from_str(body).expect("JSON body");
        assert_eq!(json["code"], "unavailable");
    }

    #[tokio::test]
    async fn refused_callers_are_told_to_close() {
        for (status, closes) in [
            (StatusCode::UNAUTHORIZED, true),
            (StatusCode::FORBIDDEN, true),
            (StatusCode::OK, false),
            (StatusCode::NOT_FOUND, false),
        ] {
            let response = close_refused((status, "x").into_response()).await;
            assert_eq!(
                response
                    .headers()
                    .get(CONNECTION)
                    .is_some_and(|v| v == "close"),
                closes,
                "{status}"
            );
        }
    }

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
