//! Client tests against a scripted server on a temp unix socket: what is sent, how answers and
//! errors are read, and that a silent server or a missing socket fails in bounded time.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::*;

/// A server that answers each connection with the next of `answers` (raw HTTP) and reports the
/// requests it read (head and body as text). `None`: read the request, never answer.
struct Scripted {
    _dir: tempfile::TempDir,
    socket: PathBuf,
    requests: mpsc::Receiver<String>,
}

fn serve(answers: Vec<Option<String>>) -> Scripted {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("s.sock");
    let listener = UnixListener::bind(&socket).expect("bind");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for answer in answers {
            let Ok((stream, _)) = listener.accept() else {
                return;
            };
            let mut reader = BufReader::new(stream);
            let mut head = String::new();
            let mut length = 0usize;
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 {
                    break;
                }
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    length = v.trim().parse().unwrap_or(0);
                }
                let end = line == "\r\n";
                head.push_str(&line);
                if end {
                    break;
                }
            }
            let mut body = vec![0; length];
            let _ = reader.read_exact(&mut body);
            let _ = tx.send(format!("{head}{}", String::from_utf8_lossy(&body)));
            let mut stream = reader.into_inner();
            match answer {
                Some(text) => {
                    let _ = stream.write_all(text.as_bytes());
                }
                None => held.push(stream),
            }
        }
        // Keep silent connections open until the test is over.
        std::thread::sleep(Duration::from_secs(5));
        drop(held);
    });
    Scripted {
        _dir: dir,
        socket,
        requests: rx,
    }
}

fn answer(status: &str, body: &str) -> Option<String> {
    Some(format!(
        "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    ))
}

const LEASE: &str = r#"{"name":"docker-abc","uid_base":1879048192,"gid_base":1879048192,"size":65536,
"state":"active","labels":{"owner":"docker"},"ttl_seconds":null,"created_at":"2026-01-01T00:00:00.000Z",
"expires_at":null,"released_at":null,"rlimits":{},"namespaces":[],"limits":{"pids_max":null,
"max_processes":null,"pids_current":null,"pids_denied":null},"uid_map":"0 1879048192 65536",
"gid_map":"0 1879048192 65536","a_field_of_a_newer_daemon":1}"#;

#[test]
fn put_lease_sends_its_labels_and_reads_the_lease() {
    let server = serve(vec![answer("201 Created", LEASE), answer("200 OK", LEASE)]);
    let client = blocking::Client::new(&server.socket).unwrap();
    let mut labels = std::collections::BTreeMap::new();
    labels.insert("owner".to_string(), "docker".to_string());
    let settings = LeaseRequest {
        labels: Some(labels),
        ..LeaseRequest::default()
    };
    let (lease, created) = client.put_lease("docker-abc", &settings).unwrap();
    assert!(created);
    assert_eq!(lease.uid_base, 1_879_048_192);
    assert_eq!(lease.state, LeaseState::Active);
    assert!(lease.holds_uid(1_879_048_192 + 65_535));
    assert!(!lease.holds_uid(1_879_048_192 + 65_536));
    assert!(!lease.holds_uid(0));
    let request = server.requests.recv().unwrap();
    assert!(
        request.starts_with("PUT /v1/leases/docker-abc HTTP/1.1\r\n"),
        "{request}"
    );
    assert!(
        request
            .to_ascii_lowercase()
            .contains("content-type: application/json")
    );
    assert!(
        request.ends_with(r#"{"labels":{"owner":"docker"}}"#),
        "{request}"
    );
    let (_, created) = client.put_lease("docker-abc", &settings).unwrap();
    assert!(!created);
}

#[test]
fn error_answers_carry_their_code() {
    let server = serve(vec![
        answer(
            "409 Conflict",
            r#"{"code":"pool_exhausted","message":"no free range of 65536 ids"}"#,
        ),
        answer(
            "404 Not Found",
            r#"{"code":"not_found","message":"no such endpoint; see docs/API.md"}"#,
        ),
        Some("HTTP/1.1 502 Bad Gateway\r\ncontent-length: 14\r\n\r\nupstream down\n".into()),
        answer("200 OK", "not json"),
    ]);
    let client = blocking::Client::new(&server.socket).unwrap();
    let e = client.put_lease("a", &LeaseRequest::default()).unwrap_err();
    assert_eq!(e.code(), Some("pool_exhausted"));
    assert_eq!(e.status(), Some(409));
    assert_eq!(e.to_string(), "pool_exhausted: no free range of 65536 ids");
    assert!(!e.is_unreachable() && !e.is_missing_endpoint());
    let e = client.attach("a", 1, "x").unwrap_err();
    assert!(e.is_missing_endpoint(), "{e}");
    let e = client.pool().unwrap_err();
    assert_eq!(e.to_string(), "http_502: upstream down");
    let e = client.pool().unwrap_err();
    assert!(matches!(e, ClientError::Decode { .. }), "{e}");
}

#[test]
fn paths_and_queries_are_encoded() {
    assert_eq!(encode("a-b.c_d~e"), "a-b.c_d~e");
    assert_eq!(encode("k=v&x"), "k%3Dv%26x");
    assert_eq!(encode("a/b c"), "a%2Fb%20c");
    assert_eq!(
        with_query(
            "/v1/leases",
            &[("state", "all".into()), ("label", "k=v".into())]
        ),
        "/v1/leases?state=all&label=k%3Dv"
    );
    let server = serve(vec![answer("200 OK", r#"{"leases":[]}"#)]);
    let client = blocking::Client::new(&server.socket).unwrap();
    let leases = client
        .list_leases(Some("all"), &[("owner", "docker")])
        .unwrap();
    assert!(leases.is_empty());
    let request = server.requests.recv().unwrap();
    assert!(
        request.starts_with("GET /v1/leases?state=all&label=owner%3Ddocker HTTP/1.1"),
        "{request}"
    );
}

#[test]
fn no_daemon_is_unreachable_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let client = blocking::Client::new(dir.path().join("absent.sock")).unwrap();
    let e = client.pool().unwrap_err();
    assert!(e.is_unreachable(), "{e}");
    assert!(e.to_string().contains("absent.sock"), "{e}");
}

#[test]
fn a_silent_daemon_times_out() {
    let server = serve(vec![None]);
    let client = blocking::Client::new(&server.socket)
        .unwrap()
        .with_timeout(Duration::from_millis(300));
    let started = Instant::now();
    let e = client.pool().unwrap_err();
    assert!(matches!(e, ClientError::Timeout { .. }), "{e}");
    assert!(e.is_unreachable());
    assert!(started.elapsed() < Duration::from_secs(3));
}

/// The pool as a daemon answers it while a process outside every lease holds ids of the pool
/// (`lease` is null) and another owner claims blocks: both read.
#[test]
fn pool_warnings_without_a_lease_are_read() {
    let pool = r#"{"base":1879048192,"size":268304384,"end":2147352576,"block":65536,
"source":"default","quarantine_seconds":60,"blocks":{"total":4094,"active":1,"quarantined":0,
"withheld":1,"free":4092},"cgroup":null,"warnings":[{"code":"ids_held_by_process","lease":null,
"claim":"process 17525 (python3) holds uid 2141978624","message":"withheld"},
{"code":"claimed","lease":"web","claim":"/etc/subuid line 3","message":"claimed"}],
"claims":[],"store":"sqlite"}"#;
    let server = serve(vec![answer("200 OK", pool)]);
    let client = blocking::Client::new(&server.socket).unwrap();
    let pool = client.pool().unwrap();
    assert_eq!(pool.warnings.len(), 2);
    assert_eq!(pool.warnings[0].lease, None);
    assert_eq!(pool.warnings[1].lease.as_deref(), Some("web"));
}
