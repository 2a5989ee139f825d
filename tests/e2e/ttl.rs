//! Leases with `ttl_seconds`: expiry, renew, and what renew refuses.

use std::time::{Duration, Instant};

use hyper::StatusCode;
use subidd_tests::Daemon;

use crate::util::{assert_error, assert_status, events, list_names, pool_counts};

const FAST_EXPIRY: &str = "expiry_interval_ms = 100\nquarantine_seconds = 3600\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lease_expires_unless_renewed() {
    let daemon = Daemon::start(FAST_EXPIRY).expect("start daemon");
    let client = daemon.client();
    let created = client
        .put("/v1/leases/short", Some(r#"{"ttl_seconds":1}"#))
        .await
        .expect("PUT");
    assert_status(&created, StatusCode::CREATED, "PUT short with ttl");
    let created = created.json();
    assert_eq!(created["ttl_seconds"], 1, "ttl echoed: {created}");
    let first_expiry = created["expires_at"]
        .as_str()
        .unwrap_or_else(|| panic!("a ttl lease has expires_at: {created}"))
        .to_string();
    let forever = client.put("/v1/leases/forever", None).await.expect("PUT");
    assert_status(&forever, StatusCode::CREATED, "PUT forever");
    assert_eq!(pool_counts(&client).await, (2, 0, 4092), "two active");

    // Renew later than creation, so the new expiry is measurably later.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let renewed = client
        .post("/v1/leases/short/renew", None)
        .await
        .expect("renew");
    let renewed_at = Instant::now();
    assert_status(&renewed, StatusCode::OK, "renew short");
    let renewed = renewed.json();
    let second_expiry = renewed["expires_at"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    // Same RFC 3339 millisecond format, so text order is time order.
    assert!(
        second_expiry > first_expiry,
        "renew moves expires_at later: {first_expiry} -> {second_expiry}"
    );
    assert_eq!(
        renewed["uid_base"], created["uid_base"],
        "renew keeps the range"
    );
    let got = client.get("/v1/leases/short").await.expect("GET").json();
    assert_eq!(
        got["expires_at"], second_expiry,
        "GET shows the renewed expiry"
    );

    // Without further renewal it is released about one second after the renew.
    let deadline = renewed_at + Duration::from_secs(5);
    let released = loop {
        let lease = client.get("/v1/leases/short").await.expect("GET").json();
        if lease["state"] == "released" {
            break lease;
        }
        assert!(
            Instant::now() < deadline,
            "short still {} 5 s after a renew with ttl 1 s: {lease}",
            lease["state"]
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let after = renewed_at.elapsed();
    assert!(
        after >= Duration::from_millis(900),
        "released {after:?} after the renew: the renew was not honoured"
    );
    assert!(
        released["released_at"].is_string(),
        "released_at set: {released}"
    );
    assert_eq!(
        pool_counts(&client).await,
        (1, 1, 4092),
        "one fewer active, its block quarantined"
    );
    assert_eq!(list_names(&client, "/v1/leases").await, ["forever"]);
    assert_eq!(
        list_names(&client, "/v1/leases?state=released").await,
        ["short"]
    );
    let history: Vec<String> = events(&client, "short")
        .await
        .into_iter()
        .map(|(kind, _)| kind)
        .collect();
    assert_eq!(history, ["create", "renew", "expire"], "history of short");
    let gone = client
        .post("/v1/leases/short/renew", None)
        .await
        .expect("renew");
    assert_error(
        &gone,
        StatusCode::NOT_FOUND,
        "not_found",
        "renew of an expired lease",
    );
    let still = client.get("/v1/leases/forever").await.expect("GET").json();
    assert_eq!(
        still["state"], "active",
        "a lease without ttl never expires"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn renew_refuses_leases_without_ttl_and_unknown_names() {
    let daemon = Daemon::start(FAST_EXPIRY).expect("start daemon");
    let client = daemon.client();
    let plain = client.put("/v1/leases/plain", None).await.expect("PUT");
    assert_status(&plain, StatusCode::CREATED, "PUT plain");
    let reply = client
        .post("/v1/leases/plain/renew", None)
        .await
        .expect("renew");
    assert_error(
        &reply,
        StatusCode::CONFLICT,
        "lease_conflict",
        "renew of a lease without ttl",
    );
    let reply = client
        .post("/v1/leases/nobody/renew", None)
        .await
        .expect("renew");
    assert_error(
        &reply,
        StatusCode::NOT_FOUND,
        "not_found",
        "renew of an unknown lease",
    );
    let ttl = client
        .put("/v1/leases/ttl", Some(r#"{"ttl_seconds":60}"#))
        .await
        .expect("PUT");
    assert_status(&ttl, StatusCode::CREATED, "PUT ttl");
    let reply = client
        .post("/v1/leases/ttl/renew", Some(r#"{"ttl_seconds":5}"#))
        .await
        .expect("renew");
    assert_error(
        &reply,
        StatusCode::BAD_REQUEST,
        "invalid_request",
        "renew with a body",
    );
    let reply = client
        .post("/v1/leases/ttl/renew", Some("{}"))
        .await
        .expect("renew");
    assert_status(&reply, StatusCode::OK, "renew with an empty JSON object");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lease_past_its_expiry_cannot_be_renewed_before_the_sweep() {
    // A long expiry interval leaves a window between expires_at and the release.
    let daemon = Daemon::start("expiry_interval_ms = 60000\n").expect("start daemon");
    let client = daemon.client();
    let created = client
        .put("/v1/leases/late", Some(r#"{"ttl_seconds":1}"#))
        .await
        .expect("PUT");
    assert_status(&created, StatusCode::CREATED, "PUT late");
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let renewed = client
        .post("/v1/leases/late/renew", None)
        .await
        .expect("renew");
    assert_error(
        &renewed,
        StatusCode::NOT_FOUND,
        "not_found",
        "renew 200 ms after expires_at",
    );
}
