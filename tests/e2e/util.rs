//! Shared helpers of the end-to-end tests: pool configs, error and range assertions, and what
//! /proc says of a process, and the live event stream read line by line.

use std::collections::BTreeSet;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::client::conn::http1;
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use subidd_tests::{Client, Daemon, Reply};

/// First id of the default pool (0x70000000).
pub const BASE: u32 = 1_879_048_192;
/// Default block size.
pub const BLOCK: u32 = 65_536;

/// Config of a pool of `blocks` blocks at the default base, with the given quarantine.
pub fn pool_config(blocks: u32, quarantine_seconds: u64) -> String {
    format!(
        "quarantine_seconds = {quarantine_seconds}\n[pool]\nbase = {BASE}\nsize = {size}\nblock = {BLOCK}\n",
        size = blocks * BLOCK
    )
}

/// Asserts an error answer: status, stable code, and a `{code, message}` JSON body.
#[track_caller]
pub fn assert_error(reply: &Reply, status: StatusCode, code: &str, what: &str) {
    assert_eq!(
        reply.status,
        status,
        "{what}: expected {status} {code}, got {} {}",
        reply.status,
        reply.text()
    );
    let body = reply.json();
    assert_eq!(body["code"], code, "{what}: error code in {body}");
    assert!(
        body["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{what}: error body has no message: {body}"
    );
    assert_headers(reply, what);
}

/// Asserts the headers every response carries.
#[track_caller]
pub fn assert_headers(reply: &Reply, what: &str) {
    assert_eq!(
        reply
            .headers
            .get("api-version")
            .and_then(|v| v.to_str().ok()),
        Some("1"),
        "{what}: api-version header missing or wrong in {:?}",
        reply.headers
    );
    let server = reply
        .headers
        .get("server")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    assert!(
        server.starts_with("subidd/"),
        "{what}: server header {server:?} does not start with subidd/"
    );
}

/// Asserts a status, showing the body when it differs.
#[track_caller]
pub fn assert_status(reply: &Reply, status: StatusCode, what: &str) {
    assert_eq!(
        reply.status,
        status,
        "{what}: expected {status}, got {} {}",
        reply.status,
        reply.text()
    );
}

/// `(uid_base, size)` of a lease answer, checking that gid_base equals uid_base.
#[track_caller]
pub fn range_of(lease: &Value) -> (u64, u64) {
    let base = lease["uid_base"]
        .as_u64()
        .unwrap_or_else(|| panic!("lease without uid_base: {lease}"));
    let size = lease["size"]
        .as_u64()
        .unwrap_or_else(|| panic!("lease without size: {lease}"));
    assert_eq!(
        lease["gid_base"].as_u64(),
        Some(base),
        "gid_base differs from uid_base: {lease}"
    );
    (base, size)
}

/// Asserts the `(base, size)` ranges are pairwise disjoint and inside `[start, end)`.
#[track_caller]
pub fn assert_disjoint_within(ranges: &[(u64, u64)], start: u64, end: u64) {
    let mut sorted = ranges.to_vec();
    sorted.sort_unstable();
    for pair in sorted.windows(2) {
        let ((a, a_len), (b, _)) = (pair[0], pair[1]);
        assert!(
            a + a_len <= b,
            "ranges overlap: {a}+{a_len} and {b} (of {} ranges)",
            sorted.len()
        );
    }
    for &(base, size) in &sorted {
        assert!(
            base >= start && base + size <= end && size > 0,
            "range {base}+{size} is not inside the pool [{start}, {end})"
        );
    }
}

/// Block counts of `GET /v1/pool`: `(active, quarantined, free)`.
pub async fn pool_counts(client: &Client) -> (u64, u64, u64) {
    let reply = client.get("/v1/pool").await.expect("GET /v1/pool");
    assert_status(&reply, StatusCode::OK, "GET /v1/pool");
    let pool = reply.json();
    let get = |k: &str| {
        pool["blocks"][k]
            .as_u64()
            .unwrap_or_else(|| panic!("pool without blocks.{k}: {pool}"))
    };
    (get("active"), get("quarantined"), get("free"))
}

/// The sorted names of a `GET /v1/leases...` answer.
pub async fn list_names(client: &Client, path: &str) -> Vec<String> {
    let reply = client.get(path).await.expect("list leases");
    assert_status(&reply, StatusCode::OK, path);
    let body = reply.json();
    let mut names: Vec<String> = body["leases"]
        .as_array()
        .unwrap_or_else(|| panic!("{path}: no leases array in {body}"))
        .iter()
        .map(|l| l["name"].as_str().unwrap_or_default().to_string())
        .collect();
    names.sort();
    names
}

/// The event kinds and caller uids of a name's history, oldest first.
pub async fn events(client: &Client, name: &str) -> Vec<(String, Value)> {
    let path = format!("/v1/leases/{name}/events");
    let reply = client.get(&path).await.expect("GET events");
    assert_status(&reply, StatusCode::OK, &path);
    let body = reply.json();
    body["events"]
        .as_array()
        .unwrap_or_else(|| panic!("{path}: no events array in {body}"))
        .iter()
        .map(|e| {
            (
                e["kind"].as_str().unwrap_or_default().to_string(),
                e["caller_uid"].clone(),
            )
        })
        .collect()
}

/// `(soft, hard)` limit on open files of this process, from /proc/self/limits.
fn open_files_limit() -> Option<(u64, u64)> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    let mut fields = line
        .trim_start_matches("Max open files")
        .split_whitespace()
        .map(|f| {
            if f == "unlimited" {
                Some(u64::MAX)
            } else {
                f.parse().ok()
            }
        });
    Some((fields.next()??, fields.next()??))
}

/// Makes sure this process (and the daemons it starts, which inherit the limit) may hold
/// `needed` open files, raising the soft limit up to the hard one with prlimit(1) when it is
/// lower (CI containers often start at 1024). Panics with the reason when that is impossible.
pub fn ensure_open_files(needed: u64) {
    let Some((soft, hard)) = open_files_limit() else {
        panic!("cannot read the open-files limit from /proc/self/limits");
    };
    if soft >= needed {
        return;
    }
    assert!(
        hard >= needed,
        "this test needs {needed} open files but the hard limit is {hard}; raise it (ulimit -Hn)"
    );
    let status = std::process::Command::new("prlimit")
        .arg("--pid")
        .arg(std::process::id().to_string())
        .arg(format!("--nofile={hard}:{hard}"))
        .status();
    let raised = open_files_limit().map(|(soft, _)| soft).unwrap_or(0);
    assert!(
        raised >= needed,
        "this test needs {needed} open files, the soft limit is {soft} and prlimit could not \
         raise it ({status:?}); run `ulimit -n {hard}` first"
    );
}

/// `[real, effective, saved, fs]` of a `/proc/<pid>/status` line (`Uid:` or `Gid:`).
pub fn ids(pid: i64, key: &str) -> Vec<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .expect("line")
        .split_whitespace()
        .filter_map(|v| v.parse().ok())
        .collect()
}

/// Inode of a namespace file (`/proc/<pid>/ns/*` or a pin): equal inodes, same namespace.
pub fn ns_ino(path: impl AsRef<Path>) -> u64 {
    std::fs::metadata(path).expect("ns").ino()
}

/// Where the daemon pins a lease's user namespace.
pub fn pin(daemon: &Daemon, lease: &str) -> PathBuf {
    daemon.path("run").join("ns").join(lease).join("user")
}

/// Polls until `/proc/<pid>` is gone or 10 s passed.
pub async fn gone(pid: i64) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        let alive =
            std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z "));
        if !alive {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

/// Live (non-zombie) processes whose real uid is in `[base, base + size)`.
pub fn processes_in_range(base: u64, size: u64) -> BTreeSet<i32> {
    let mut found = BTreeSet::new();
    for entry in std::fs::read_dir("/proc").expect("read /proc").flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
            continue;
        };
        if status
            .lines()
            .any(|l| l.starts_with("State:") && l.contains("zombie"))
        {
            continue;
        }
        let uid: Option<u64> = status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|l| l.split_whitespace().next())
            .and_then(|u| u.parse().ok());
        if uid.is_some_and(|u| u >= base && u < base + size) {
            found.insert(pid);
        }
    }
    found
}

/// A `GET /v1/events` response read line by line as it arrives.
pub struct EventStream {
    body: Incoming,
    buffer: Vec<u8>,
}

impl EventStream {
    pub async fn open(socket: &Path, query: &str) -> EventStream {
        let stream = tokio::net::UnixStream::connect(socket)
            .await
            .expect("connect");
        let (mut sender, connection) = http1::handshake(TokioIo::new(stream))
            .await
            .expect("handshake");
        tokio::spawn(async move {
            let _ = connection.await;
        });
        let request = Request::builder()
            .uri(format!("/v1/events{query}"))
            .header("host", "localhost")
            .body(Full::new(Bytes::new()))
            .expect("request");
        let response = sender.send_request(request).await.expect("send");
        assert_eq!(response.status(), StatusCode::OK, "GET /v1/events{query}");
        assert_eq!(
            response
                .headers()
                .get("content-type")
                .and_then(|v| v.to_str().ok()),
            Some("application/x-ndjson")
        );
        EventStream {
            body: response.into_body(),
            buffer: Vec::new(),
        }
    }

    /// The next event, or `None` when the stream ended; panics when nothing comes in 10 s.
    pub async fn next(&mut self) -> Option<Value> {
        loop {
            if let Some(end) = self.buffer.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.buffer.drain(..=end).collect();
                return Some(serde_json::from_slice(&line).expect("a JSON line"));
            }
            let frame = tokio::time::timeout(Duration::from_secs(10), self.body.frame())
                .await
                .expect("an event or the end of the stream within 10 s");
            match frame {
                None => {
                    assert!(self.buffer.is_empty(), "stream ended mid-line");
                    return None;
                }
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        self.buffer.extend_from_slice(&data);
                    }
                }
                Some(Err(e)) => panic!("event stream broke: {e}"),
            }
        }
    }
}
