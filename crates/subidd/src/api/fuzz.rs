//! Fuzz-style tests of request bodies on stable: every seed of `tests/fuzz/corpus/request/`,
//! then proptest bytes and near-valid JSON, through serde and the checks of the lease and spawn
//! requests, and through the handlers themselves. No panic, never a 5xx, errors in the
//! `{"code","message"}` shape, and what the checks accept keeps their promises.

use std::path::PathBuf;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use http_body_util::BodyExt;
use proptest::prelude::*;
use subid_core::{Pool, PoolSpec};
use tower::ServiceExt;

use super::Router;
use super::leases::spec;
use super::model::{CreateBody, LeaseBody};
use super::processes::{SignalBody, SpawnBody, spawn_spec};
use super::tests::app;
use crate::error::ERROR_CODES;

const BLOCK: u32 = 65536;

fn pool() -> Pool {
    Pool::new(PoolSpec {
        base: 0x7000_0000,
        size: 4 * BLOCK,
        block: BLOCK,
    })
    .expect("pool")
}

fn corpus() -> Vec<(PathBuf, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fuzz/corpus/request");
    let mut files: Vec<(PathBuf, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("read corpus {}: {e}", dir.display()))
        .map(|entry| {
            let path = entry.expect("corpus entry").path();
            let bytes = std::fs::read(&path).expect("read corpus file");
            (path, bytes)
        })
        .collect();
    files.sort();
    assert!(!files.is_empty(), "corpus {} is empty", dir.display());
    files
}

/// serde and the checks, without the handlers: what is accepted keeps the documented bounds.
fn check_parsing(bytes: &[u8]) {
    let pool = pool();
    let lease = serde_json::from_slice::<LeaseBody>(bytes).ok();
    let create = serde_json::from_slice::<CreateBody>(bytes).ok();
    for settings in lease.into_iter().chain(create.map(|b| b.split().1)) {
        let Ok(spec) = spec(&pool, settings) else {
            continue;
        };
        let size = spec.size.expect("a size is always filled in");
        assert!(size > 0 && size % BLOCK == 0 && size <= pool.range().len());
        assert!(
            spec.ttl_seconds
                .is_none_or(|t| (1..=super::model::TTL_MAX).contains(&t))
        );
        assert!(spec.rlimits.values().all(|[soft, hard]| soft <= hard));
    }
    if let Ok(body) = serde_json::from_slice::<SpawnBody>(bytes)
        && let Ok(spawn) = spawn_spec(body)
    {
        assert!(!spawn.argv.is_empty() && !spawn.argv[0].is_empty());
        assert!(spawn.argv.iter().all(|a| !a.contains('\0')));
        assert!(
            spawn
                .env
                .iter()
                .all(|(k, v)| !k.is_empty() && !k.contains('=') && !v.contains('\0'))
        );
        assert!(spawn.cwd.is_absolute() && spawn.umask <= 0o777);
    }
    let _ = serde_json::from_slice::<SignalBody>(bytes);
}

/// One request through the router: never a 5xx, and an error is `{"code","message"}`.
async fn check_answer(app: &Router, method: Method, uri: &str, bytes: &[u8]) {
    let request = Request::builder()
        .method(method.clone())
        .uri(uri)
        .body(Body::from(bytes.to_vec()))
        .expect("request");
    let response = app.clone().oneshot(request).await.expect("infallible");
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    let shown = String::from_utf8_lossy(bytes);
    assert!(
        !status.is_server_error(),
        "{method} {uri} {shown:?}: {status}"
    );
    if !status.is_success() {
        let error: serde_json::Value = serde_json::from_slice(&body).expect("an error is JSON");
        let code = error["code"].as_str().unwrap_or_default();
        assert!(ERROR_CODES.contains(&code), "{method} {uri}: code {code:?}");
        assert!(error["message"].is_string(), "{method} {uri}: message");
    }
}

/// Endpoints whose body is checked before anything is made: a spawn into a lease that does not
/// exist (checked, then 404), a signal to a process that does not exist, a renew.
async fn check_handlers(app: &Router, bytes: &[u8]) {
    for uri in [
        "/v1/leases/no-such-lease/processes",
        "/v1/processes/0123456789abcdef/signal",
        "/v1/leases/no-such-lease/renew",
    ] {
        check_answer(app, Method::POST, uri, bytes).await;
    }
}

/// Creating leases through the router, without `pids_max` and `namespaces` (those make cgroups
/// and namespaces on the host; `check_parsing` covers their checks).
async fn check_lease_handlers(app: &Router, mut value: serde_json::Value) {
    if let Some(object) = value.as_object_mut() {
        object.remove("pids_max");
        object.remove("namespaces");
    }
    let bytes = serde_json::to_vec(&value).expect("serialise");
    check_answer(app, Method::PUT, "/v1/leases/fuzz", &bytes).await;
    check_answer(app, Method::POST, "/v1/leases", &bytes).await;
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

#[test]
fn fuzz_corpus_request() {
    let rt = runtime();
    let (_dir, app, _) = rt.block_on(app(4, Duration::from_secs(1)));
    for (path, bytes) in corpus() {
        eprintln!("{}", path.display());
        check_parsing(&bytes);
        rt.block_on(check_handlers(&app, &bytes));
        if let Ok(value) = serde_json::from_slice(&bytes) {
            rt.block_on(check_lease_handlers(&app, value));
        }
    }
}

/// JSON near the request shapes: the real field names with values of every type.
fn request_json() -> impl Strategy<Value = serde_json::Value> {
    let key = prop_oneof![
        prop::sample::select(vec![
            "name",
            "size",
            "labels",
            "ttl_seconds",
            "rlimits",
            "namespaces",
            "pids_max",
            "max_processes",
            "argv",
            "env",
            "cwd",
            "user",
            "group",
            "groups",
            "umask",
            "signal",
            "nofile",
            "nproc",
            "PATH",
            "net",
        ])
        .prop_map(str::to_string),
        "[a-z_=/.]{0,6}",
    ];
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        any::<u64>().prop_map(serde_json::Value::from),
        (0u64..200_000).prop_map(serde_json::Value::from),
        any::<f64>().prop_map(serde_json::Value::from),
        prop::sample::select(vec![
            "/bin/true",
            "true",
            "",
            "/",
            "/tmp",
            "rel",
            "TERM",
            "SIGKILL",
            "A=1",
            "mnt",
            "web-1",
            "..",
            "a\u{0}b",
        ])
        .prop_map(serde_json::Value::from),
        ".{0,8}".prop_map(serde_json::Value::from),
    ];
    leaf.prop_recursive(3, 24, 6, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::from),
            prop::collection::btree_map(key.clone(), inner, 0..6)
                .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}

#[test]
fn fuzz_random_request() {
    let rt = runtime();
    let (_dir, app, _) = rt.block_on(app(4, Duration::from_secs(1)));
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig::with_cases(300));
    let inputs = (prop::collection::vec(any::<u8>(), 0..256), request_json());
    let result = runner.run(&inputs, |(bytes, value)| {
        let text = serde_json::to_vec(&value).expect("serialise");
        for input in [&bytes, &text] {
            check_parsing(input);
            rt.block_on(check_handlers(&app, input));
        }
        rt.block_on(check_lease_handlers(&app, value));
        Ok(())
    });
    if let Err(failure) = result {
        panic!("{failure}");
    }
}

#[test]
fn oversized_bodies_are_refused_with_413() {
    let rt = runtime();
    let (_dir, app, _) = rt.block_on(app(4, Duration::from_secs(1)));
    let big = vec![b' '; super::BODY_LIMIT + 1];
    rt.block_on(async {
        let request = Request::builder()
            .method(Method::PUT)
            .uri("/v1/leases/big")
            .body(Body::from(big))
            .expect("request");
        let response = app.clone().oneshot(request).await.expect("infallible");
        assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
    });
}
