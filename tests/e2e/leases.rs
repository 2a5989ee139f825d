//! The lease API's main path: PUT/POST/GET/list, idempotence, conflicts, and response headers.

use hyper::{Method, StatusCode};
use serde_json::json;
use subidd_tests::Daemon;

use crate::util::{BASE, BLOCK, assert_error, assert_headers, assert_status, list_names};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn first_put_creates_a_lease_with_the_documented_fields() {
    let daemon = Daemon::start("").expect("start daemon");
    let client = daemon.client();
    let reply = client.put("/v1/leases/web-1", None).await.expect("PUT");
    assert_status(&reply, StatusCode::CREATED, "first PUT /v1/leases/web-1");
    assert_headers(&reply, "first PUT");
    let lease = reply.json();
    assert_eq!(lease["name"], "web-1", "name in {lease}");
    assert_eq!(
        lease["uid_base"], BASE,
        "first lease starts the default pool: {lease}"
    );
    assert_eq!(lease["gid_base"], BASE, "gid_base equals uid_base: {lease}");
    assert_eq!(lease["size"], BLOCK, "default size is one block: {lease}");
    assert_eq!(lease["state"], "active", "state in {lease}");
    assert_eq!(
        lease["labels"],
        json!({}),
        "no labels asked, none given: {lease}"
    );
    assert_eq!(
        lease["uid_map"],
        format!("0 {BASE} {BLOCK}"),
        "uid_map line in {lease}"
    );
    assert!(
        lease["created_at"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z')),
        "created_at is an RFC 3339 UTC time: {lease}"
    );
    assert!(
        lease["expires_at"].is_null(),
        "a lease without ttl never expires: {lease}"
    );

    let got = client.get("/v1/leases/web-1").await.expect("GET");
    assert_status(&got, StatusCode::OK, "GET /v1/leases/web-1");
    assert_eq!(got.json(), lease, "GET shows what PUT answered");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn put_is_idempotent_and_refuses_other_settings() {
    let daemon = Daemon::start("").expect("start daemon");
    let client = daemon.client();
    let first = client
        .put(
            "/v1/leases/app",
            Some(r#"{"labels":{"team":"a"},"ttl_seconds":3600}"#),
        )
        .await
        .expect("PUT");
    assert_status(&first, StatusCode::CREATED, "first PUT");
    let first = first.json();

    let same = client
        .put(
            "/v1/leases/app",
            Some(r#"{"size":65536,"labels":{"team":"a"},"ttl_seconds":3600}"#),
        )
        .await
        .expect("PUT again");
    assert_status(&same, StatusCode::OK, "second PUT with the same settings");
    assert_eq!(same.json(), first, "the same lease is answered");

    let plain = client.put("/v1/leases/plain", None).await.expect("PUT");
    assert_status(&plain, StatusCode::CREATED, "PUT plain");
    let plain = plain.json();
    for body in [None, Some(""), Some("{}"), Some(r#"{"size":65536}"#)] {
        let again = client.put("/v1/leases/plain", body).await.expect("PUT");
        assert_status(
            &again,
            StatusCode::OK,
            &format!("PUT plain again with {body:?}"),
        );
        assert_eq!(again.json(), plain, "same range for PUT with {body:?}");
    }

    for other in [
        r#"{"size":131072}"#,
        r#"{"labels":{"team":"b"}}"#,
        r#"{"labels":{"team":"a"},"ttl_seconds":60}"#,
        r#"{"labels":{"team":"a"}}"#,
    ] {
        let reply = client
            .put("/v1/leases/app", Some(other))
            .await
            .expect("PUT other");
        assert_error(
            &reply,
            StatusCode::CONFLICT,
            "lease_conflict",
            &format!("PUT app with {other}"),
        );
    }
    let got = client.get("/v1/leases/app").await.expect("GET").json();
    assert_eq!(got, first, "a refused PUT changes nothing");
    assert_ne!(got["uid_base"], plain["uid_base"], "two names, two ranges");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn post_creates_with_location_and_refuses_an_existing_name() {
    let daemon = Daemon::start("").expect("start daemon");
    let client = daemon.client();
    let reply = client
        .post("/v1/leases", Some(r#"{"name":"db-1","labels":{"k":"v"}}"#))
        .await
        .expect("POST");
    assert_status(&reply, StatusCode::CREATED, "POST /v1/leases");
    assert_eq!(
        reply.headers.get("location").and_then(|v| v.to_str().ok()),
        Some("/v1/leases/db-1"),
        "Location header of the created lease"
    );
    let lease = reply.json();
    assert_eq!(lease["name"], "db-1");
    assert_eq!(lease["labels"], json!({"k": "v"}));

    let again = client
        .post("/v1/leases", Some(r#"{"name":"db-1","labels":{"k":"v"}}"#))
        .await
        .expect("POST again");
    assert_error(
        &again,
        StatusCode::CONFLICT,
        "lease_exists",
        "second POST db-1",
    );

    assert_status(
        &client.put("/v1/leases/by-put", None).await.expect("PUT"),
        StatusCode::CREATED,
        "PUT by-put",
    );
    let over_put = client
        .post("/v1/leases", Some(r#"{"name":"by-put"}"#))
        .await
        .expect("POST");
    assert_error(
        &over_put,
        StatusCode::CONFLICT,
        "lease_exists",
        "POST over a PUT lease",
    );

    let located = client.get("/v1/leases/db-1").await.expect("GET");
    assert_eq!(located.json(), lease, "Location names the lease");
    let no_body = client.post("/v1/leases", None).await.expect("POST");
    assert_error(
        &no_body,
        StatusCode::BAD_REQUEST,
        "invalid_request",
        "POST without a body",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_response_carries_api_version_and_server_headers() {
    let daemon = Daemon::start(&crate::util::pool_config(1, 3600)).expect("start daemon");
    let client = daemon.client();
    let cases: Vec<(Method, &str, Option<&str>, StatusCode)> = vec![
        (Method::GET, "/_ping", None, StatusCode::OK),
        (Method::GET, "/v1/pool", None, StatusCode::OK),
        (Method::PUT, "/v1/leases/h", None, StatusCode::CREATED),
        (Method::PUT, "/v1/leases/h", None, StatusCode::OK),
        (
            Method::PUT,
            "/v1/leases/h",
            Some(r#"{"ttl_seconds":5}"#),
            StatusCode::CONFLICT,
        ),
        (Method::PUT, "/v1/leases/h2", None, StatusCode::CONFLICT),
        (Method::PUT, "/v1/leases/-h", None, StatusCode::BAD_REQUEST),
        (Method::GET, "/v1/leases/nope", None, StatusCode::NOT_FOUND),
        (Method::GET, "/no/such/path", None, StatusCode::NOT_FOUND),
        (
            Method::PATCH,
            "/v1/pool",
            None,
            StatusCode::METHOD_NOT_ALLOWED,
        ),
        (Method::GET, "/v1/leases", None, StatusCode::OK),
        (Method::DELETE, "/v1/leases/h", None, StatusCode::NO_CONTENT),
    ];
    for (method, path, body, status) in cases {
        let what = format!("{method} {path}");
        let reply = client
            .request(method, path, body)
            .await
            .unwrap_or_else(|e| panic!("{what}: {e:#}"));
        assert_status(&reply, status, &what);
        assert_headers(&reply, &what);
    }
    let ping = client.get("/_ping").await.expect("ping");
    assert_eq!(ping.text(), "OK", "/_ping body");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn list_filters_by_state_and_labels() {
    let daemon = Daemon::start("").expect("start daemon");
    let client = daemon.client();
    for (name, body) in [
        ("a", r#"{"labels":{"env":"prod","team":"x"}}"#),
        ("b", r#"{"labels":{"env":"prod","team":"y"}}"#),
        ("c", r#"{"labels":{"env":"dev"}}"#),
        ("d", "{}"),
    ] {
        let reply = client
            .put(&format!("/v1/leases/{name}"), Some(body))
            .await
            .expect("PUT");
        assert_status(&reply, StatusCode::CREATED, &format!("PUT {name}"));
    }
    let deleted = client.delete("/v1/leases/c").await.expect("DELETE");
    assert_status(&deleted, StatusCode::NO_CONTENT, "DELETE c");

    let cases: [(&str, &[&str]); 9] = [
        ("/v1/leases", &["a", "b", "d"]),
        ("/v1/leases?state=active", &["a", "b", "d"]),
        ("/v1/leases?state=all", &["a", "b", "c", "d"]),
        ("/v1/leases?state=released", &["c"]),
        ("/v1/leases?label=env=prod", &["a", "b"]),
        ("/v1/leases?label=env=prod&label=team=y", &["b"]),
        ("/v1/leases?label=env=dev", &[]),
        ("/v1/leases?label=env=dev&state=all", &["c"]),
        ("/v1/leases?label=team=x&label=env=dev&state=all", &[]),
    ];
    for (path, expected) in cases {
        assert_eq!(list_names(&client, path).await, expected, "{path}");
    }
    let released = client.get("/v1/leases?state=released").await.expect("list");
    let c = &released.json()["leases"][0];
    assert_eq!(
        c["state"], "released",
        "released lease shows its state: {c}"
    );
    assert!(
        c["released_at"].is_string(),
        "released lease has released_at: {c}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn multi_block_lease_takes_a_contiguous_range() {
    let daemon = Daemon::start(&crate::util::pool_config(4, 0)).expect("start daemon");
    let client = daemon.client();
    for name in ["a", "b", "c"] {
        let reply = client
            .put(&format!("/v1/leases/{name}"), None)
            .await
            .expect("PUT");
        assert_status(&reply, StatusCode::CREATED, &format!("PUT {name}"));
    }
    let deleted = client.delete("/v1/leases/b").await.expect("DELETE");
    assert_status(&deleted, StatusCode::NO_CONTENT, "DELETE b");
    // Two blocks are free (the 2nd and the 4th) but not side by side.
    let two = client
        .put("/v1/leases/two", Some(r#"{"size":131072}"#))
        .await
        .expect("PUT");
    assert_error(
        &two,
        StatusCode::CONFLICT,
        "pool_exhausted",
        "two blocks asked, only separate single blocks free",
    );
    let deleted = client.delete("/v1/leases/c").await.expect("DELETE");
    assert_status(&deleted, StatusCode::NO_CONTENT, "DELETE c");
    let two = client
        .put("/v1/leases/two", Some(r#"{"size":196608}"#))
        .await
        .expect("PUT");
    assert_status(&two, StatusCode::CREATED, "three contiguous blocks");
    let two = two.json();
    assert_eq!(
        (two["uid_base"].clone(), two["size"].clone()),
        (json!(BASE + BLOCK), json!(3 * BLOCK)),
        "blocks 2-4 as one range: {two}"
    );
    assert_eq!(two["uid_map"], format!("0 {} {}", BASE + BLOCK, 3 * BLOCK));
    assert_eq!(
        crate::util::pool_counts(&client).await,
        (4, 0, 0),
        "a three-block lease counts three blocks"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_connection_carries_many_requests() {
    let daemon = Daemon::start("").expect("start daemon");
    let mut conn = daemon.client().connect().await.expect("connect");
    for i in 0..20 {
        let path = format!("/v1/leases/keep-{i}");
        let reply = conn.request(Method::PUT, &path, None).await.expect("PUT");
        assert_status(&reply, StatusCode::CREATED, &path);
        let reply = conn.request(Method::GET, &path, None).await.expect("GET");
        assert_status(&reply, StatusCode::OK, &path);
    }
    let bad = conn
        .request(Method::PUT, "/v1/leases/-bad", None)
        .await
        .expect("PUT");
    assert_error(
        &bad,
        StatusCode::BAD_REQUEST,
        "invalid_request",
        "error on a kept-alive connection",
    );
    let after = conn
        .request(Method::GET, "/_ping", None)
        .await
        .expect("ping");
    assert_status(
        &after,
        StatusCode::OK,
        "the connection survives an error answer",
    );
}
