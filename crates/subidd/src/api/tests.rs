//! Handler tests: the router with a real SQLite file, driven with `oneshot`.

use std::time::Duration;

use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use http_body_util::BodyExt;
use subid_core::{Pool, PoolSpec};
use tower::ServiceExt;

use super::*;

const BLOCK: u32 = 65536;
const BASE: u32 = 0x7000_0000;

pub(super) async fn app(
    blocks: u32,
    quarantine: Duration,
) -> (tempfile::TempDir, Router, LeaseService) {
    let dir = tempfile::tempdir().expect("tempdir");
    let (store, writer) = subid_store::open(&dir.path().join("subidd.db"))
        .await
        .expect("open store");
    let pool = Pool::new(PoolSpec {
        base: BASE,
        size: blocks * BLOCK,
        block: BLOCK,
    })
    .expect("pool");
    let leases = LeaseService::start(store, writer, pool, quarantine)
        .await
        .expect("service");
    let processes = ProcessService::start(
        leases.clone(),
        crate::process::ProcessConfig {
            ns_dir: dir.path().join("run/ns"),
            log_dir: dir.path().join("logs"),
            runtime_dir: dir.path().join("run"),
            keeper_program: std::path::PathBuf::from("/proc/self/exe"),
            log_max_bytes: 4096,
            kill_grace: Duration::from_millis(200),
            cgroup_parent: None,
            spawn_timeout: Duration::from_secs(5),
            reserve: dir.path().join("release-reserve"),
        },
    )
    .await
    .expect("process service");
    let state = AppState {
        leases: leases.clone(),
        processes,
        pool_source: Source::Config,
        quarantine_seconds: quarantine.as_secs(),
    };
    (dir, router(state), leases)
}

pub(super) async fn call(
    app: &Router,
    method: Method,
    uri: &str,
    body: &str,
) -> (StatusCode, serde_json::Value) {
    let request = Request::builder()
        .method(method)
        .uri(uri)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(Body::from(body.to_string()))
        .expect("request");
    let response = app.clone().oneshot(request).await.expect("infallible");
    let status = response.status();
    assert_eq!(
        response.headers().get("api-version").map(|v| v.as_bytes()),
        Some(&b"1"[..]),
        "every answer carries Api-Version"
    );
    let bytes = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    let json = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
    (status, json)
}

#[tokio::test]
async fn put_is_idempotent_and_conflicts_on_other_settings() {
    let (_dir, app, _) = app(8, Duration::from_secs(60)).await;
    let (s, a) = call(&app, Method::PUT, "/v1/leases/web-1", "").await;
    assert_eq!(s, StatusCode::CREATED);
    assert_eq!(a["uid_base"], BASE);
    assert_eq!(a["uid_map"], format!("0 {BASE} {BLOCK}"));
    let (s, b) = call(&app, Method::PUT, "/v1/leases/web-1", "{}").await;
    assert_eq!(s, StatusCode::OK, "identical settings: 200");
    assert_eq!(a, b);
    let (s, e) = call(
        &app,
        Method::PUT,
        "/v1/leases/web-1",
        r#"{"ttl_seconds":5}"#,
    )
    .await;
    assert_eq!(s, StatusCode::CONFLICT);
    assert_eq!(e["code"], "lease_conflict");
}

#[tokio::test]
async fn exhaustion_is_a_clear_409() {
    let (_dir, app, _) = app(2, Duration::from_secs(60)).await;
    for name in ["a", "b"] {
        let (s, _) = call(&app, Method::PUT, &format!("/v1/leases/{name}"), "").await;
        assert_eq!(s, StatusCode::CREATED);
    }
    let (s, e) = call(&app, Method::PUT, "/v1/leases/c", "").await;
    assert_eq!(s, StatusCode::CONFLICT);
    assert_eq!(e["code"], "pool_exhausted");
    let (s, e) = call(
        &app,
        Method::PUT,
        "/v1/leases/d",
        &format!(r#"{{"size":{}}}"#, 2 * BLOCK),
    )
    .await;
    assert_eq!(
        (s, e["code"].as_str()),
        (StatusCode::CONFLICT, Some("pool_exhausted"))
    );
}

#[tokio::test]
async fn bad_input_is_invalid_request() {
    let (_dir, app, _) = app(2, Duration::from_secs(60)).await;
    let cases: &[(Method, &str, &str)] = &[
        (Method::PUT, "/v1/leases/-x", ""),
        (Method::PUT, "/v1/leases/a%20b", ""),
        (Method::PUT, "/v1/leases/ok", "{not json"),
        (Method::PUT, "/v1/leases/ok", r#"{"sizee":1}"#),
        (Method::PUT, "/v1/leases/ok", r#"{"size":0}"#),
        (Method::PUT, "/v1/leases/ok", r#"{"size":100}"#),
        (Method::PUT, "/v1/leases/ok", r#"{"size":-1}"#),
        (Method::PUT, "/v1/leases/ok", r#"{"ttl_seconds":0}"#),
        (Method::PUT, "/v1/leases/ok", r#"{"labels":{"a b":"c"}}"#),
        (Method::PUT, "/v1/leases/ok?x=1", ""),
        (Method::POST, "/v1/leases", ""),
        (Method::POST, "/v1/leases", r#"{"name":"../x"}"#),
        (Method::GET, "/v1/leases?state=bogus", ""),
        (Method::GET, "/v1/lookup", ""),
        (Method::GET, "/v1/lookup?uid=-1", ""),
        (Method::DELETE, "/v1/leases/ok?purge=maybe", ""),
    ];
    for (method, uri, body) in cases {
        let (s, e) = call(&app, method.clone(), uri, body).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{method} {uri} {body}: {e}");
        assert_eq!(e["code"], "invalid_request", "{method} {uri} {body}");
        assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    let big = format!(r#"{{"labels":{{"k":"{}"}}}}"#, "x".repeat(BODY_LIMIT));
    let (s, e) = call(&app, Method::PUT, "/v1/leases/ok", &big).await;
    assert_eq!(
        (s, e["code"].as_str()),
        (StatusCode::PAYLOAD_TOO_LARGE, Some("payload_too_large"))
    );
    let (s, e) = call(&app, Method::GET, "/v2/nothing", "").await;
    assert_eq!(
        (s, e["code"].as_str()),
        (StatusCode::NOT_FOUND, Some("not_found"))
    );
    let (s, e) = call(&app, Method::PATCH, "/v1/leases/ok", "").await;
    assert_eq!(
        (s, e["code"].as_str()),
        (StatusCode::METHOD_NOT_ALLOWED, Some("method_not_allowed"))
    );
}

#[tokio::test]
async fn concurrent_creates_commit_together_and_never_overlap() {
    let (_dir, _app, leases) = app(64, Duration::from_secs(60)).await;
    let mut tasks = Vec::new();
    for i in 0..80 {
        let leases = leases.clone();
        tasks.push(tokio::spawn(async move {
            leases
                .create(
                    format!("n{i}"),
                    crate::lease::LeaseSpec::default(),
                    crate::lease::CreateMode::Ensure,
                    None,
                )
                .await
        }));
    }
    let mut bases = Vec::new();
    let mut exhausted = 0;
    for task in tasks {
        match task.await.expect("join") {
            Ok(created) => bases.push(created.lease.uid_base),
            Err(crate::service_error::ServiceError::Exhausted { .. }) => exhausted += 1,
            Err(other) => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(bases.len(), 64, "every block handed out once");
    assert_eq!(exhausted, 16);
    bases.sort_unstable();
    bases.dedup();
    assert_eq!(bases.len(), 64, "no base handed out twice");
}

#[tokio::test]
async fn release_quarantines_and_purge_frees() {
    let (_dir, app, _) = app(2, Duration::from_secs(3600)).await;
    call(&app, Method::PUT, "/v1/leases/a", "").await;
    let (s, _) = call(&app, Method::DELETE, "/v1/leases/a", "").await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (_, pool) = call(&app, Method::GET, "/v1/pool", "").await;
    assert_eq!(pool["blocks"]["quarantined"], 1);
    let (s, b) = call(&app, Method::PUT, "/v1/leases/b", "").await;
    assert_eq!(s, StatusCode::CREATED);
    assert_eq!(b["uid_base"], BASE + BLOCK, "a's block is in quarantine");
    let (s, e) = call(&app, Method::PUT, "/v1/leases/c", "").await;
    assert_eq!(
        (s, e["code"].as_str()),
        (StatusCode::CONFLICT, Some("pool_exhausted"))
    );
    let (s, _) = call(&app, Method::DELETE, "/v1/leases/a?purge=true", "").await;
    assert_eq!(
        s,
        StatusCode::NO_CONTENT,
        "purging an already released lease"
    );
    let (s, c) = call(&app, Method::PUT, "/v1/leases/c", "").await;
    assert_eq!(s, StatusCode::CREATED);
    assert_eq!(c["uid_base"], BASE, "purged block reusable at once");
    let (s, e) = call(&app, Method::DELETE, "/v1/leases/never", "").await;
    assert_eq!(
        (s, e["code"].as_str()),
        (StatusCode::NOT_FOUND, Some("not_found"))
    );
}

#[tokio::test]
async fn every_listed_route_answers_its_method() {
    let (_dir, app, _) = app(2, Duration::from_secs(60)).await;
    for (method, path, _) in routes() {
        // The event feed stays open unless asked not to follow.
        let uri = match path {
            "/v1/events" => "/v1/events?follow=false".to_string(),
            _ => path
                .replace("{name}", "probe")
                .replace("{id}", "0123456789abcdef"),
        };
        let method = Method::from_bytes(method.as_bytes()).expect("method");
        let (status, body) = call(&app, method.clone(), &uri, "").await;
        assert_ne!(status, StatusCode::METHOD_NOT_ALLOWED, "{method} {path}");
        assert!(
            !body["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("no such endpoint")),
            "{method} {path} is not routed"
        );
    }
}

/// GET `uri` and returns status, content type and the body as text.
async fn get_text(app: &Router, uri: &str) -> (StatusCode, String, String) {
    let request = Request::builder()
        .uri(uri)
        .body(Body::empty())
        .expect("request");
    let response = app.clone().oneshot(request).await.expect("infallible");
    let status = response.status();
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let bytes = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    (
        status,
        content_type,
        String::from_utf8_lossy(&bytes).into_owned(),
    )
}

#[tokio::test]
async fn metrics_count_committed_leases() {
    let (_dir, app, _) = app(4, Duration::from_secs(60)).await;
    call(&app, Method::PUT, "/v1/leases/m1", "").await;
    call(&app, Method::PUT, "/v1/leases/m2", "").await;
    call(&app, Method::DELETE, "/v1/leases/m1", "").await;
    let want = [
        "subidd_leases_created_total 2\n",
        "subidd_leases_released_total 1\n",
        "subidd_leases_active 1\n",
        "subidd_pool_blocks{state=\"active\"} 1\n",
        "subidd_pool_blocks{state=\"quarantined\"} 1\n",
        "subidd_pool_blocks{state=\"free\"} 2\n",
        "subidd_processes_running 0\n",
    ];
    // Event counters are bumped by the writer right after it answers: poll briefly.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let (status, content_type, text) = get_text(&app, "/metrics").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(content_type, crate::metrics::CONTENT_TYPE);
        match want.iter().find(|line| !text.contains(*line)) {
            None => break,
            Some(line) if std::time::Instant::now() > deadline => {
                panic!("missing {line:?} in:\n{text}")
            }
            Some(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
    let (status, _, _) = get_text(&app, "/metrics?x=1").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn events_backlog_and_bad_parameters() {
    let (_dir, app, _) = app(4, Duration::from_secs(60)).await;
    call(&app, Method::PUT, "/v1/leases/e1", r#"{"ttl_seconds":60}"#).await;
    call(&app, Method::POST, "/v1/leases/e1/renew", "").await;
    call(&app, Method::PUT, "/v1/leases/e2", "").await;
    call(&app, Method::DELETE, "/v1/leases/e1?purge=true", "").await;
    let (status, content_type, text) = get_text(&app, "/v1/events?since=0&follow=false").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(content_type, "application/x-ndjson");
    let events: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("each line is JSON"))
        .collect();
    let types: Vec<&str> = events.iter().filter_map(|e| e["type"].as_str()).collect();
    assert_eq!(
        types,
        [
            "lease.created",
            "lease.renewed",
            "lease.created",
            "lease.released",
            "lease.purged"
        ],
        "{text}"
    );
    let ids: Vec<i64> = events.iter().filter_map(|e| e["id"].as_i64()).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
    assert_eq!(events[0]["lease"], "e1");
    assert_eq!(events[0]["details"]["uid_base"], BASE);
    assert!(
        events[1]["details"]["expires_at"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z')),
        "{}",
        events[1]
    );
    // Resuming after the second event gives the rest; a lease filter keeps one name.
    let (_, _, rest) = get_text(&app, &format!("/v1/events?since={}&follow=false", ids[1])).await;
    assert_eq!(rest.lines().count(), 3, "{rest}");
    let (_, _, only) = get_text(&app, "/v1/events?since=0&follow=false&lease=e2").await;
    assert_eq!(only.lines().count(), 1, "{only}");
    // Without since, the stream starts after the newest event: no backlog.
    let (_, _, none) = get_text(&app, "/v1/events?follow=false").await;
    assert_eq!(none, "");
    for bad in [
        "/v1/events?since=-1",
        "/v1/events?since=x",
        "/v1/events?follow=maybe",
        "/v1/events?lease=a/b",
        "/v1/events?other=1",
    ] {
        let (status, _, body) = get_text(&app, bad).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}: {body}");
        assert!(body.contains("invalid_request"), "{bad}: {body}");
    }
}

#[tokio::test]
async fn events_stream_delivers_live_events() {
    let (_dir, app, _) = app(4, Duration::from_secs(60)).await;
    call(&app, Method::PUT, "/v1/leases/before", "").await;
    let request = Request::builder()
        .uri("/v1/events")
        .body(Body::empty())
        .expect("request");
    let response = app.clone().oneshot(request).await.expect("infallible");
    assert_eq!(response.status(), StatusCode::OK);
    let mut body = response.into_body();
    call(&app, Method::PUT, "/v1/leases/live", "").await;
    let frame = tokio::time::timeout(Duration::from_secs(10), body.frame())
        .await
        .expect("a live event within 10 s")
        .expect("a frame")
        .expect("no error");
    let data = frame.into_data().expect("data frame");
    let event: serde_json::Value = serde_json::from_slice(&data).expect("JSON line");
    assert_eq!(event["type"], "lease.created");
    assert_eq!(event["lease"], "live", "the earlier lease is not replayed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lagging_event_stream_catches_up_from_the_database() {
    let burst = crate::events::LIVE_BUFFER + 100;
    let blocks = u32::try_from(burst).expect("small") + 8;
    let (_dir, app, leases) = app(blocks, Duration::from_secs(60)).await;
    let request = Request::builder()
        .uri("/v1/events")
        .body(Body::empty())
        .expect("request");
    let response = app.clone().oneshot(request).await.expect("infallible");
    let mut body = response.into_body();
    let mut buffer = Vec::new();
    let mut next_line = async move || -> serde_json::Value {
        loop {
            if let Some(end) = buffer.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = buffer.drain(..=end).collect();
                return serde_json::from_slice(&line).expect("JSON line");
            }
            let frame = tokio::time::timeout(Duration::from_secs(20), body.frame())
                .await
                .expect("a line within 20 s")
                .expect("a frame")
                .expect("no error");
            buffer.extend_from_slice(&frame.into_data().expect("data"));
        }
    };
    call(&app, Method::PUT, "/v1/leases/first", "").await;
    let first = next_line().await;
    assert_eq!(first["lease"], "first", "the stream is live now");
    // More events than the live buffer holds, while the client reads nothing.
    let mut tasks = Vec::new();
    for i in 0..burst {
        let app = app.clone();
        tasks.push(tokio::spawn(async move {
            call(&app, Method::PUT, &format!("/v1/leases/burst-{i}"), "").await
        }));
    }
    for task in tasks {
        assert_eq!(task.await.expect("task").0, StatusCode::CREATED);
    }
    let mut last = first["id"].as_i64().expect("id");
    // The publisher runs on a task of its own: let it publish the whole burst before reading.
    let published = last + i64::try_from(burst).expect("small");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while leases.feed().last_id() < published {
        assert!(std::time::Instant::now() < deadline, "burst not published");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for _ in 0..burst {
        let event = next_line().await;
        let id = event["id"].as_i64().expect("id");
        assert_eq!(id, last + 1, "no gap and no repeat after {last}: {event}");
        assert_eq!(event["type"], "lease.created");
        last = id;
    }
    let (_, _, metrics) = get_text(&app, "/metrics").await;
    assert!(
        metrics.contains("subidd_event_stream_catch_ups_total 1\n"),
        "{metrics}"
    );
}
