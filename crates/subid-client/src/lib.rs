//! A typed client of subidd's v1 API: HTTP/1.1 over the daemon's unix socket, one connection
//! per request (as curl does), every request bounded by a deadline, and errors split into
//! "could not reach the daemon" ([`ClientError::Connect`], [`ClientError::Timeout`]) and "the
//! daemon said no" ([`ClientError::Api`], with the stable `code` of docs/API.md).
//!
//! [`Client`] is async (tokio); [`blocking::Client`] wraps it for programs without a runtime,
//! such as the OCI runtime wrapper `subid-runc`.

#![forbid(unsafe_code)]

pub mod blocking;
pub mod model;

use std::path::{Path, PathBuf};
use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper::client::conn::http1;
use hyper::header::{CONTENT_TYPE, HOST, USER_AGENT};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::net::UnixStream;

pub use hyper::Method as HttpMethod;
pub use model::*;

/// The socket of the packaged daemon.
pub const DEFAULT_SOCKET: &str = "/run/subidd/subidd.sock";
/// How long a request may take unless [`Client::with_timeout`] says otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// The largest answer read (a process log is at most the daemon's `log_max_bytes`).
pub const MAX_ANSWER_BYTES: usize = 64 * 1024 * 1024;

/// Every way a request can fail.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The socket could not be connected to: the daemon is not running, or may not be used.
    #[error("cannot connect to subidd at {}: {source}", socket.display())]
    Connect {
        socket: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// No complete answer within the deadline.
    #[error("subidd at {} did not answer {method} {path} within {after:?}", socket.display())]
    Timeout {
        socket: PathBuf,
        method: Method,
        path: String,
        after: Duration,
    },
    /// The connection broke, or the answer is not HTTP this client can read.
    #[error("{method} {path}: {message}")]
    Transport {
        method: Method,
        path: String,
        message: String,
    },
    /// The daemon answered with an error: `code` is stable, `message` is for people.
    #[error("{code}: {message}")]
    Api {
        status: u16,
        code: String,
        message: String,
    },
    /// A success answer whose body is not the JSON expected.
    #[error("{method} {path}: the answer is not the JSON expected ({source}): {body:?}")]
    Decode {
        method: Method,
        path: String,
        body: String,
        #[source]
        source: serde_json::Error,
    },
    /// A request that cannot be sent (a value that does not serialise, a bad URI).
    #[error("{0}")]
    Request(String),
}

impl ClientError {
    /// The daemon's error code, when it answered one.
    pub fn code(&self) -> Option<&str> {
        match self {
            ClientError::Api { code, .. } => Some(code),
            _ => None,
        }
    }

    /// The HTTP status of an error answer.
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Api { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// Whether the daemon could not be reached at all (no answer of any kind).
    pub fn is_unreachable(&self) -> bool {
        matches!(
            self,
            ClientError::Connect { .. } | ClientError::Timeout { .. }
        )
    }

    /// Whether the daemon has no such endpoint (an older daemon than this client).
    pub fn is_missing_endpoint(&self) -> bool {
        matches!(self, ClientError::Api { status: 404, code, message }
            if code == "not_found" && message.starts_with("no such endpoint"))
    }
}

/// Result of this crate.
pub type Result<T, E = ClientError> = std::result::Result<T, E>;

/// An answer of any status, its body read.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: hyper::HeaderMap,
    pub body: Bytes,
}

impl Answer {
    /// The body as text (lossy).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Talks to one daemon socket; cheap to clone.
#[derive(Debug, Clone)]
pub struct Client {
    socket: PathBuf,
    timeout: Duration,
    user_agent: String,
}

impl Client {
    /// A client of the daemon listening on `socket`.
    pub fn new(socket: impl AsRef<Path>) -> Client {
        Client {
            socket: socket.as_ref().to_path_buf(),
            timeout: DEFAULT_TIMEOUT,
            user_agent: concat!("subid-client/", env!("CARGO_PKG_VERSION")).to_string(),
        }
    }

    /// The deadline of each request: connecting, sending and reading the whole answer.
    pub fn with_timeout(mut self, timeout: Duration) -> Client {
        self.timeout = timeout;
        self
    }

    /// The `User-Agent` sent (the daemon logs it with the request).
    pub fn with_user_agent(mut self, agent: impl Into<String>) -> Client {
        self.user_agent = agent.into();
        self
    }

    /// The socket this client talks to.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    // ---- leases ----

    /// `PUT /v1/leases/{name}`: ensures the lease (idempotent; a released name gets its range
    /// back within quarantine). Returns it and whether it was created now.
    pub async fn put_lease(&self, name: &str, settings: &LeaseRequest) -> Result<(Lease, bool)> {
        let answer = self
            .call(Method::PUT, &lease_path(name, ""), Some(settings))
            .await?;
        let created = answer.status == StatusCode::CREATED;
        Ok((
            decode(&Method::PUT, &lease_path(name, ""), &answer)?,
            created,
        ))
    }

    /// `POST /v1/leases`: creates a lease; `lease_exists` if the name is taken.
    pub async fn create_lease(&self, request: &CreateLeaseRequest) -> Result<Lease> {
        self.json(Method::POST, "/v1/leases", Some(request)).await
    }

    /// `GET /v1/leases/{name}`: the active lease, else the last released one.
    pub async fn get_lease(&self, name: &str) -> Result<Lease> {
        self.json(Method::GET, &lease_path(name, ""), None::<&()>)
            .await
    }

    /// `GET /v1/leases`: leases in `state` (`active`, `released`, `all`; `None`: active) that
    /// carry every label of `labels`.
    pub async fn list_leases(
        &self,
        state: Option<&str>,
        labels: &[(&str, &str)],
    ) -> Result<Vec<Lease>> {
        let mut query: Vec<(&str, String)> = Vec::new();
        if let Some(state) = state {
            query.push(("state", state.to_string()));
        }
        for (k, v) in labels {
            query.push(("label", format!("{k}={v}")));
        }
        let list: LeaseList = self
            .json(Method::GET, &with_query("/v1/leases", &query), None::<&()>)
            .await?;
        Ok(list.leases)
    }

    /// `DELETE /v1/leases/{name}`: releases; `force` stops its processes first, `purge` skips
    /// quarantine.
    pub async fn release_lease(&self, name: &str, force: bool, purge: bool) -> Result<()> {
        let mut query = Vec::new();
        if force {
            query.push(("force", "true".to_string()));
        }
        if purge {
            query.push(("purge", "true".to_string()));
        }
        self.call(
            Method::DELETE,
            &with_query(&lease_path(name, ""), &query),
            None::<&()>,
        )
        .await
        .map(drop)
    }

    /// `POST /v1/leases/{name}/renew`.
    pub async fn renew_lease(&self, name: &str) -> Result<Lease> {
        self.json(Method::POST, &lease_path(name, "/renew"), None::<&()>)
            .await
    }

    /// `GET /v1/leases/{name}/idmap`: every rendering of the lease's maps.
    pub async fn idmap(&self, name: &str) -> Result<Idmap> {
        self.json(Method::GET, &lease_path(name, "/idmap"), None::<&()>)
            .await
    }

    /// `GET /v1/leases/{name}/idmap?format=F` for the text formats (`uid_map`, `podman`, ...).
    pub async fn idmap_text(&self, name: &str, format: &str) -> Result<String> {
        let path = with_query(&lease_path(name, "/idmap"), &[("format", format.into())]);
        Ok(self.call(Method::GET, &path, None::<&()>).await?.text())
    }

    /// `GET /v1/leases/{name}/events`: the name's history, oldest first.
    pub async fn lease_events(&self, name: &str) -> Result<Vec<LeaseEvent>> {
        let list: LeaseEventList = self
            .json(Method::GET, &lease_path(name, "/events"), None::<&()>)
            .await?;
        Ok(list.events)
    }

    /// `PUT /v1/leases/{name}/namespace`: makes the lease's namespaces if they do not exist,
    /// and answers their pins.
    pub async fn ensure_namespace(&self, name: &str) -> Result<NamespacePins> {
        self.json(Method::PUT, &lease_path(name, "/namespace"), None::<&()>)
            .await
    }

    /// `POST /v1/leases/{name}/attach`: the lease counts the cgroups of process `pid` as its
    /// own, under `id` (idempotent per id).
    pub async fn attach(&self, name: &str, pid: i32, id: &str) -> Result<Attachment> {
        let body = AttachRequest {
            pid,
            id: id.to_string(),
        };
        self.json(Method::POST, &lease_path(name, "/attach"), Some(&body))
            .await
    }

    /// `DELETE /v1/leases/{name}/attach/{id}`: forgets one attachment.
    pub async fn detach(&self, name: &str, id: &str) -> Result<()> {
        let path = format!("{}/{}", lease_path(name, "/attach"), encode(id));
        self.call(Method::DELETE, &path, None::<&()>)
            .await
            .map(drop)
    }

    // ---- pool and lookup ----

    /// `GET /v1/pool`.
    pub async fn pool(&self) -> Result<Pool> {
        self.json(Method::GET, "/v1/pool", None::<&()>).await
    }

    /// `GET /v1/lookup?uid=N`: the active lease holding host uid `uid`.
    pub async fn lookup_uid(&self, uid: u32) -> Result<Lookup> {
        self.json(Method::GET, &format!("/v1/lookup?uid={uid}"), None::<&()>)
            .await
    }

    /// `GET /v1/lookup?gid=N`.
    pub async fn lookup_gid(&self, gid: u32) -> Result<Lookup> {
        self.json(Method::GET, &format!("/v1/lookup?gid={gid}"), None::<&()>)
            .await
    }

    // ---- processes ----

    /// `POST /v1/leases/{name}/processes`; with `wait`, answered once it exited or `wait`
    /// passed (the request's own deadline is stretched to cover it).
    pub async fn spawn(
        &self,
        name: &str,
        request: &SpawnRequest,
        wait: Option<Duration>,
    ) -> Result<Process> {
        let mut path = lease_path(name, "/processes");
        let mut client = self.clone();
        if let Some(wait) = wait {
            path = with_query(
                &path,
                &[
                    ("wait", "true".into()),
                    ("timeout_seconds", wait.as_secs().to_string()),
                ],
            );
            client.timeout = self.timeout.saturating_add(wait);
        }
        client.json(Method::POST, &path, Some(request)).await
    }

    /// `GET /v1/leases/{name}/processes`.
    pub async fn processes(&self, name: &str) -> Result<Vec<Process>> {
        let list: ProcessList = self
            .json(Method::GET, &lease_path(name, "/processes"), None::<&()>)
            .await?;
        Ok(list.processes)
    }

    /// `GET /v1/processes/{id}`.
    pub async fn process(&self, id: &str) -> Result<Process> {
        self.json(
            Method::GET,
            &format!("/v1/processes/{}", encode(id)),
            None::<&()>,
        )
        .await
    }

    /// `POST /v1/processes/{id}/wait`: answered once it exited or `wait` passed.
    pub async fn wait_process(&self, id: &str, wait: Duration) -> Result<Process> {
        let mut client = self.clone();
        client.timeout = self.timeout.saturating_add(wait);
        let path = format!(
            "/v1/processes/{}/wait?timeout_seconds={}",
            encode(id),
            wait.as_secs()
        );
        client.json(Method::POST, &path, None::<&()>).await
    }

    /// `POST /v1/processes/{id}/signal` with a signal name (`TERM`) or number.
    pub async fn signal(&self, id: &str, signal: &str) -> Result<()> {
        let body = match signal.parse::<i64>() {
            Ok(n) => serde_json::json!({ "signal": n }),
            Err(_) => serde_json::json!({ "signal": signal }),
        };
        let path = format!("/v1/processes/{}/signal", encode(id));
        self.call(Method::POST, &path, Some(&body)).await.map(drop)
    }

    /// `GET /v1/processes/{id}/logs?stream=S` (`stdout` or `stderr`), as bytes.
    pub async fn logs(&self, id: &str, stream: &str) -> Result<Bytes> {
        let path = with_query(
            &format!("/v1/processes/{}/logs", encode(id)),
            &[("stream", stream.into())],
        );
        Ok(self.call(Method::GET, &path, None::<&()>).await?.body)
    }

    // ---- events ----

    /// `GET /v1/events?follow=false` (and `since`, `lease`): the events recorded so far.
    pub async fn events(&self, since: Option<i64>, lease: Option<&str>) -> Result<Vec<FeedEvent>> {
        let mut query = vec![("follow", "false".to_string())];
        if let Some(since) = since {
            query.push(("since", since.to_string()));
        }
        if let Some(lease) = lease {
            query.push(("lease", lease.to_string()));
        }
        let path = with_query("/v1/events", &query);
        let answer = self.call(Method::GET, &path, None::<&()>).await?;
        answer
            .body
            .split(|b| *b == b'\n')
            .filter(|line| !line.is_empty())
            .map(|line| {
                serde_json::from_slice(line).map_err(|source| ClientError::Decode {
                    method: Method::GET,
                    path: path.clone(),
                    body: String::from_utf8_lossy(line).into_owned(),
                    source,
                })
            })
            .collect()
    }

    /// `GET path` (an endpoint that streams lines, such as `/v1/events`), handing each line to
    /// `line` as it arrives; no deadline once the answer has begun. An error answer becomes
    /// [`ClientError::Api`]; `line` returning `false` stops reading.
    pub async fn stream_lines(
        &self,
        path: &str,
        mut line: impl FnMut(&[u8]) -> bool,
    ) -> Result<()> {
        let method = Method::GET;
        let response = tokio::time::timeout(self.timeout, self.send(&method, path, None))
            .await
            .map_err(|_| self.timeout_error(&method, path))??;
        let status = response.status();
        let mut body = response.into_body();
        if !status.is_success() {
            let bytes =
                tokio::time::timeout(self.timeout, Limited::new(body, MAX_ANSWER_BYTES).collect())
                    .await
                    .map_err(|_| self.timeout_error(&method, path))?
                    .map_err(|e| transport(&method, path, e))?
                    .to_bytes();
            return Err(api_error(status, &bytes));
        }
        let mut buffer = Vec::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| transport(&method, path, e))?;
            if let Ok(data) = frame.into_data() {
                buffer.extend_from_slice(&data);
                while let Some(end) = buffer.iter().position(|b| *b == b'\n') {
                    let rest = buffer.split_off(end + 1);
                    if !line(&buffer[..end]) {
                        return Ok(());
                    }
                    buffer = rest;
                }
                if buffer.len() > MAX_ANSWER_BYTES {
                    return Err(transport(&method, path, "a line longer than 64 MiB"));
                }
            }
        }
        Ok(())
    }

    // ---- any request ----

    /// Sends one request and returns the answer whatever its status (for callers that look at
    /// error answers themselves, and tests).
    pub async fn raw(
        &self,
        method: Method,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<Answer> {
        let bytes = match body {
            Some(value) => Some(
                serde_json::to_vec(value)
                    .map_err(|e| ClientError::Request(format!("{method} {path}: {e}")))?,
            ),
            None => None,
        };
        tokio::time::timeout(self.timeout, self.exchange(&method, path, bytes))
            .await
            .map_err(|_| self.timeout_error(&method, path))?
    }

    /// Sends one request; a non-2xx answer becomes [`ClientError::Api`].
    pub async fn call<B: Serialize>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<Answer> {
        let bytes = match body {
            Some(value) => Some(
                serde_json::to_vec(value)
                    .map_err(|e| ClientError::Request(format!("{method} {path}: {e}")))?,
            ),
            None => None,
        };
        let answer = tokio::time::timeout(self.timeout, self.exchange(&method, path, bytes))
            .await
            .map_err(|_| self.timeout_error(&method, path))??;
        if answer.status.is_success() {
            Ok(answer)
        } else {
            Err(api_error(answer.status, &answer.body))
        }
    }

    /// [`Client::call`], the answer decoded as `T`.
    pub async fn json<T: DeserializeOwned, B: Serialize>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<T> {
        let answer = self.call(method.clone(), path, body).await?;
        decode(&method, path, &answer)
    }

    async fn exchange(&self, method: &Method, path: &str, body: Option<Vec<u8>>) -> Result<Answer> {
        let response = self.send(method, path, body).await?;
        let status = response.status();
        let headers = response.headers().clone();
        let body = Limited::new(response.into_body(), MAX_ANSWER_BYTES)
            .collect()
            .await
            .map_err(|e| transport(method, path, e))?
            .to_bytes();
        Ok(Answer {
            status,
            headers,
            body,
        })
    }

    async fn send(
        &self,
        method: &Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<hyper::Response<hyper::body::Incoming>> {
        let stream =
            UnixStream::connect(&self.socket)
                .await
                .map_err(|source| ClientError::Connect {
                    socket: self.socket.clone(),
                    source,
                })?;
        let (mut sender, connection) = http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| transport(method, path, e))?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        let mut request = Request::builder()
            .method(method.clone())
            .uri(path)
            .header(HOST, "localhost")
            .header(USER_AGENT, &self.user_agent);
        let bytes = match body {
            Some(bytes) => {
                request = request.header(CONTENT_TYPE, "application/json");
                Bytes::from(bytes)
            }
            None => Bytes::new(),
        };
        let request = request
            .body(Full::new(bytes))
            .map_err(|e| ClientError::Request(format!("{method} {path}: {e}")))?;
        sender
            .send_request(request)
            .await
            .map_err(|e| transport(method, path, e))
    }

    fn timeout_error(&self, method: &Method, path: &str) -> ClientError {
        ClientError::Timeout {
            socket: self.socket.clone(),
            method: method.clone(),
            path: path.to_string(),
            after: self.timeout,
        }
    }
}

fn transport(method: &Method, path: &str, error: impl std::fmt::Display) -> ClientError {
    ClientError::Transport {
        method: method.clone(),
        path: path.to_string(),
        message: error.to_string(),
    }
}

fn decode<T: DeserializeOwned>(method: &Method, path: &str, answer: &Answer) -> Result<T> {
    serde_json::from_slice(&answer.body).map_err(|source| ClientError::Decode {
        method: method.clone(),
        path: path.to_string(),
        body: answer.text(),
        source,
    })
}

/// The daemon's error body, or a stand-in (`http_<status>`) when it sent none this client
/// understands.
fn api_error(status: StatusCode, body: &[u8]) -> ClientError {
    match serde_json::from_slice::<ErrorBody>(body) {
        Ok(e) => ClientError::Api {
            status: status.as_u16(),
            code: e.code,
            message: e.message,
        },
        Err(_) => ClientError::Api {
            status: status.as_u16(),
            code: format!("http_{}", status.as_u16()),
            message: String::from_utf8_lossy(body).trim().to_string(),
        },
    }
}

/// `/v1/leases/{name}{rest}`, the name percent-encoded.
fn lease_path(name: &str, rest: &str) -> String {
    format!("/v1/leases/{}{rest}", encode(name))
}

/// Percent-encodes one path segment or query component (all but RFC 3986 unreserved bytes).
pub fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `path?k=v&...`, each key and value encoded; no `?` without pairs.
pub fn with_query(path: &str, pairs: &[(&str, String)]) -> String {
    if pairs.is_empty() {
        return path.to_string();
    }
    let query: Vec<String> = pairs
        .iter()
        .map(|(k, v)| format!("{}={}", encode(k), encode(v)))
        .collect();
    format!("{path}?{}", query.join("&"))
}

#[cfg(test)]
mod tests;
