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
            log_max_bytes: 4096,
            kill_grace: Duration::from_millis(200),
            cgroup_parent: None,
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
            Err(ApiError::PoolExhausted(_)) => exhausted += 1,
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
        let uri = path
            .replace("{name}", "probe")
            .replace("{id}", "0123456789abcdef");
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
