//! Serving limits: a saturated daemon answers 503 at once, a request that runs out of time gets
//! the JSON error, slow and idle clients are disconnected, long polls keep their own timeout.

use std::time::{Duration, Instant};

use hyper::StatusCode;
use serde_json::json;
use subidd_tests::Daemon;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

use crate::util::{assert_error, assert_status};

/// Opens a raw connection and sends a request head announcing a body that never comes: the
/// request holds its permit until it times out.
async fn stuck_request(daemon: &Daemon, name: &str) -> UnixStream {
    let mut stream = UnixStream::connect(&daemon.socket).await.expect("connect");
    let head =
        format!("PUT /v1/leases/{name} HTTP/1.1\r\nHost: localhost\r\nContent-Length: 10\r\n\r\n");
    stream.write_all(head.as_bytes()).await.expect("write head");
    stream
}

/// Reads until the peer closes the connection (or `limit` passes); returns what was read and
/// whether it was closed.
async fn read_to_close(stream: &mut UnixStream, limit: Duration) -> (String, bool) {
    let mut bytes = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (String::from_utf8_lossy(&bytes).into_owned(), true),
            Ok(Ok(n)) => bytes.extend_from_slice(&buf[..n]),
            Err(_) => return (String::from_utf8_lossy(&bytes).into_owned(), false),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn saturated_daemon_answers_503_at_once_and_slow_requests_time_out() {
    let daemon = Daemon::start(
        "max_concurrent_requests = 2\nrequest_timeout_ms = 2000\nheader_read_timeout_ms = 10000\n",
    )
    .expect("start daemon");
    let client = daemon.client();
    let mut held = vec![
        stuck_request(&daemon, "held-1").await,
        stuck_request(&daemon, "held-2").await,
    ];
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    let shed = client.get("/_ping").await.expect("ping while saturated");
    let took = started.elapsed();
    assert_error(
        &shed,
        StatusCode::SERVICE_UNAVAILABLE,
        "unavailable",
        "request past max_concurrent_requests",
    );
    assert_eq!(
        shed.headers
            .get("retry-after")
            .and_then(|v| v.to_str().ok()),
        Some("1"),
        "a shed request says when to retry: {:?}",
        shed.headers
    );
    assert!(
        took < Duration::from_millis(500),
        "shedding is immediate, not queued: {took:?}"
    );
    let put = client.put("/v1/leases/shed", None).await.expect("PUT");
    assert_error(
        &put,
        StatusCode::SERVICE_UNAVAILABLE,
        "unavailable",
        "PUT past max_concurrent_requests",
    );

    // The held requests run out of request_timeout_ms and get the JSON error.
    for stream in &mut held {
        let (text, _) = read_to_close(stream, Duration::from_secs(5)).await;
        assert!(
            text.starts_with("HTTP/1.1 503"),
            "a request past request_timeout_ms is answered 503: {text:?}"
        );
        let body = text.split("\r\n\r\n").nth(1).unwrap_or_default();
        let body: serde_json::Value =
            serde_json::from_str(body).unwrap_or_else(|e| panic!("JSON body ({e}): {text:?}"));
        assert_eq!(body["code"], "unavailable", "{body}");
        assert!(
            body["message"]
                .as_str()
                .is_some_and(|m| m.contains("request_timeout_ms")),
            "the message names the limit: {body}"
        );
    }
    // Permits are back: everything is served again, and nothing half-made stayed behind.
    let ping = client.get("/_ping").await.expect("ping");
    assert_status(&ping, StatusCode::OK, "ping after the held requests ended");
    for name in ["held-1", "held-2", "shed"] {
        let reply = client
            .get(&format!("/v1/leases/{name}"))
            .await
            .expect("GET");
        assert_status(&reply, StatusCode::NOT_FOUND, name);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slow_silent_and_idle_clients_are_disconnected() {
    let daemon = Daemon::start("header_read_timeout_ms = 1000\n").expect("start daemon");

    // Connects and sends nothing.
    let started = Instant::now();
    let mut silent = UnixStream::connect(&daemon.socket).await.expect("connect");
    let (_, closed) = read_to_close(&mut silent, Duration::from_secs(5)).await;
    assert!(closed, "a silent client is disconnected");
    let silent_after = started.elapsed();
    assert!(
        silent_after < Duration::from_secs(3),
        "a silent client is cut off after header_read_timeout_ms: {silent_after:?}"
    );

    // Dribbles a header line every 200 ms, forever.
    let started = Instant::now();
    let mut loris = UnixStream::connect(&daemon.socket).await.expect("connect");
    loris
        .write_all(b"GET /_ping HTTP/1.1\r\nHost: localhost\r\n")
        .await
        .expect("write");
    let mut cut = false;
    for i in 0..25 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        if loris
            .write_all(format!("X-Slow-{i}: a\r\n").as_bytes())
            .await
            .is_err()
        {
            cut = true;
            break;
        }
    }
    if !cut {
        let (_, closed) = read_to_close(&mut loris, Duration::from_millis(100)).await;
        cut = closed;
    }
    let loris_after = started.elapsed();
    assert!(cut, "a client dribbling its headers is disconnected");
    assert!(
        loris_after < Duration::from_secs(4),
        "a slow-loris client is cut off after about header_read_timeout_ms: {loris_after:?}"
    );

    // A kept-alive connection that goes idle after a request.
    let mut idle = UnixStream::connect(&daemon.socket).await.expect("connect");
    idle.write_all(b"GET /_ping HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .expect("write");
    let started = Instant::now();
    let (text, closed) = read_to_close(&mut idle, Duration::from_secs(5)).await;
    assert!(text.starts_with("HTTP/1.1 200"), "answered first: {text:?}");
    assert!(closed, "an idle kept-alive connection is closed");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "idle limit is header_read_timeout_ms: {:?}",
        started.elapsed()
    );

    // Everyone else is still served.
    let ping = daemon.client().get("/_ping").await.expect("ping");
    assert_status(&ping, StatusCode::OK, "ping after the slow clients");
    println!(
        "slow clients: silent cut after {silent_after:?}, slow-loris after {loris_after:?} \
         (header_read_timeout_ms = 1000)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(not(subidd_root), ignore = "needs root")]
async fn long_polls_keep_their_own_timeout() {
    let daemon = Daemon::start("request_timeout_ms = 1000\n").expect("start daemon");
    let client = daemon.client();
    let lease = client.put("/v1/leases/poll", None).await.expect("PUT");
    assert_status(&lease, StatusCode::CREATED, "PUT poll");
    let body = json!({"argv": ["/bin/sh", "-c", "sleep 2"]}).to_string();
    let started = Instant::now();
    let waited = client
        .post(
            "/v1/leases/poll/processes?wait=true&timeout_seconds=10",
            Some(&body),
        )
        .await
        .expect("spawn and wait");
    assert_status(
        &waited,
        StatusCode::CREATED,
        "spawn ?wait=true past request_timeout_ms",
    );
    assert_eq!(waited.json()["state"], "exited", "{}", waited.text());
    assert!(started.elapsed() >= Duration::from_secs(2));

    let spawned = client
        .post("/v1/leases/poll/processes", Some(&body))
        .await
        .expect("spawn");
    assert_status(&spawned, StatusCode::CREATED, "spawn");
    let id = spawned.json()["id"].as_str().expect("id").to_string();
    let waited = client
        .post(&format!("/v1/processes/{id}/wait?timeout_seconds=10"), None)
        .await
        .expect("wait");
    assert_status(&waited, StatusCode::OK, "wait past request_timeout_ms");
    assert_eq!(waited.json()["state"], "exited", "{}", waited.text());
}
