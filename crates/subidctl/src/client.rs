//! An HTTP/1.1 client for the daemon's unix socket: one connection per request, errors split
//! into "could not reach the daemon" and "the daemon said no" so each gets its own message.

use std::fmt;
use std::path::{Path, PathBuf};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::client::conn::http1;
use hyper::header::{CONTENT_TYPE, HOST, HeaderMap, USER_AGENT};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;

/// The socket could not be connected to.
#[derive(Debug)]
pub struct ConnectError {
    pub socket: PathBuf,
    pub source: std::io::Error,
}

impl fmt::Display for ConnectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let hint = match self.source.kind() {
            std::io::ErrorKind::PermissionDenied => permission_hint(&self.socket),
            std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
                "is subidd running (`systemctl status subidd`)? Pick another socket with --socket or SUBIDD_SOCKET".to_string()
            }
            _ => "check that subidd is running and that you may use its socket".to_string(),
        };
        write!(
            f,
            "cannot connect to subidd at {}: {}; {hint}",
            self.socket.display(),
            self.source
        )
    }
}

/// What to do when the socket refused this user: join its group (creating the group first
/// when the daemon found none and left the socket root:root), and be allowed by the daemon.
fn permission_hint(socket: &Path) -> String {
    use std::os::unix::fs::MetadataExt;
    const ALLOWED: &str = "the daemon must also list you in allowed_uids (or the group's gid in \
         allowed_gids) of /etc/subidd/subidd.toml";
    match std::fs::metadata(socket).map(|m| m.gid()) {
        Ok(0) => format!(
            "only root may use it: the socket is root:root because its group (socket_group, \
             default subidd) did not exist when subidd started. As root: `groupadd --system \
             subidd`, `usermod -aG subidd USER`, then restart subidd (`systemctl restart \
             subidd`) and log in again; {ALLOWED}"
        ),
        Ok(gid) => {
            let group = group_name(gid).unwrap_or_else(|| gid.to_string());
            format!(
                "only root and members of the socket's group {group} may use it: as root, \
                 `usermod -aG {group} USER`, then log in again; {ALLOWED}"
            )
        }
        // The directory above it refused the lookup.
        Err(_) => format!(
            "a directory above the socket is closed to you; only root and members of the \
             socket's group (subidd) may use it. If the group does not exist: `groupadd \
             --system subidd`, `usermod -aG subidd USER`, restart subidd; {ALLOWED}"
        ),
    }
}

/// The name of group `gid` in /etc/group, if it is listed there.
fn group_name(gid: u32) -> Option<String> {
    let text = std::fs::read_to_string("/etc/group").ok()?;
    text.lines().find_map(|line| {
        let mut fields = line.split(':');
        let name = fields.next()?;
        let number = fields.nth(1)?.parse::<u32>().ok()?;
        (number == gid).then(|| name.to_string())
    })
}

// The io error is already in the message; no `source()`, so `{:#}` does not repeat it.
impl std::error::Error for ConnectError {}

/// The daemon answered with an error body `{"code": ..., "message": ...}`.
#[derive(Debug)]
pub struct DaemonError {
    pub code: String,
    pub message: String,
}

impl fmt::Display for DaemonError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

impl std::error::Error for DaemonError {}

/// A successful answer.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    /// The body as JSON.
    pub fn json(&self) -> anyhow::Result<serde_json::Value> {
        serde_json::from_slice(&self.body).map_err(|e| {
            anyhow::anyhow!(
                "the daemon answered {} with a body that is not JSON ({e}): {:?}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }
}

/// Talks to one daemon socket.
#[derive(Debug, Clone)]
pub struct Client {
    socket: PathBuf,
}

impl Client {
    pub fn new(socket: &Path) -> Client {
        Client {
            socket: socket.to_path_buf(),
        }
    }

    /// Sends one request; a non-2xx answer becomes a [`DaemonError`].
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> anyhow::Result<Reply> {
        let reply = self.raw(method, path, body).await?;
        if reply.status.is_success() {
            return Ok(reply);
        }
        Err(daemon_error(&reply).into())
    }

    /// Sends one request and returns any answer, error statuses included.
    pub async fn raw(
        &self,
        method: Method,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> anyhow::Result<Reply> {
        let response = self.send(method.clone(), path, body).await?;
        let status = response.status();
        let headers = response.headers().clone();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| anyhow::anyhow!("{method} {path}: reading the answer: {e}"))?
            .to_bytes();
        Ok(Reply {
            status,
            headers,
            body,
        })
    }

    /// `GET path` and hands each line of a streamed answer to `line` as it arrives; a non-2xx
    /// answer becomes a [`DaemonError`].
    pub async fn stream_lines(
        &self,
        path: &str,
        mut line: impl FnMut(&[u8]) -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        let response = self.send(Method::GET, path, None).await?;
        let status = response.status();
        let headers = response.headers().clone();
        let mut body = response.into_body();
        if !status.is_success() {
            let body = body
                .collect()
                .await
                .map_err(|e| anyhow::anyhow!("GET {path}: reading the answer: {e}"))?
                .to_bytes();
            let reply = Reply {
                status,
                headers,
                body,
            };
            return Err(daemon_error(&reply).into());
        }
        let mut buffer = Vec::new();
        while let Some(frame) = body.frame().await {
            let frame =
                frame.map_err(|e| anyhow::anyhow!("GET {path}: reading the stream: {e}"))?;
            if let Ok(data) = frame.into_data() {
                buffer.extend_from_slice(&data);
                while let Some(end) = buffer.iter().position(|b| *b == b'\n') {
                    let rest = buffer.split_off(end + 1);
                    line(&buffer[..end])?;
                    buffer = rest;
                }
            }
        }
        Ok(())
    }

    /// Connects and sends one request; the answer's body is still to be read.
    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> anyhow::Result<hyper::Response<hyper::body::Incoming>> {
        let stream = UnixStream::connect(&self.socket)
            .await
            .map_err(|source| ConnectError {
                socket: self.socket.clone(),
                source,
            })?;
        let (mut sender, connection) = http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| anyhow::anyhow!("HTTP handshake on {}: {e}", self.socket.display()))?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        let mut request = Request::builder()
            .method(method.clone())
            .uri(path)
            .header(HOST, "localhost")
            .header(USER_AGENT, concat!("subidctl/", env!("CARGO_PKG_VERSION")));
        let bytes = match body {
            Some(value) => {
                request = request.header(CONTENT_TYPE, "application/json");
                Bytes::from(serde_json::to_vec(value)?)
            }
            None => Bytes::new(),
        };
        let request = request.body(Full::new(bytes))?;
        sender
            .send_request(request)
            .await
            .map_err(|e| anyhow::anyhow!("{method} {path}: {e}"))
    }
}

/// The daemon's error body, or a stand-in when it sent none we understand.
fn daemon_error(reply: &Reply) -> DaemonError {
    let parsed: Option<(String, String)> = serde_json::from_slice::<serde_json::Value>(&reply.body)
        .ok()
        .and_then(|v| {
            Some((
                v.get("code")?.as_str()?.to_string(),
                v.get("message")?.as_str()?.to_string(),
            ))
        });
    let (code, message) = parsed.unwrap_or_else(|| {
        (
            format!("http_{}", reply.status.as_u16()),
            String::from_utf8_lossy(&reply.body).trim().to_string(),
        )
    });
    DaemonError { code, message }
}

/// Percent-encodes one path segment or query component (everything but RFC 3986 unreserved).
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

/// `path?k=v&...` with each key and value encoded; no `?` when there are no pairs.
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
mod tests {
    use super::*;

    #[test]
    fn encodes_reserved_bytes() {
        assert_eq!(encode("a-b.c_d~e"), "a-b.c_d~e");
        assert_eq!(encode("k=v&x"), "k%3Dv%26x");
        assert_eq!(encode("a/b c"), "a%2Fb%20c");
        assert_eq!(encode("é"), "%C3%A9");
    }

    #[test]
    fn builds_queries() {
        assert_eq!(with_query("/v1/leases", &[]), "/v1/leases");
        assert_eq!(
            with_query(
                "/v1/leases",
                &[("state", "all".into()), ("label", "k=v".into())]
            ),
            "/v1/leases?state=all&label=k%3Dv"
        );
    }

    #[test]
    fn error_bodies_become_daemon_errors() {
        let reply = Reply {
            status: StatusCode::CONFLICT,
            headers: HeaderMap::new(),
            body: Bytes::from_static(
                br#"{"code":"lease_exists","message":"lease a already exists"}"#,
            ),
        };
        let e = daemon_error(&reply);
        assert_eq!(e.to_string(), "lease_exists: lease a already exists");
        let reply = Reply {
            status: StatusCode::BAD_GATEWAY,
            headers: HeaderMap::new(),
            body: Bytes::from_static(b"upstream down\n"),
        };
        assert_eq!(daemon_error(&reply).to_string(), "http_502: upstream down");
    }
}
