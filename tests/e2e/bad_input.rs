//! Bad names, bodies, queries, methods and paths: each a 4xx with a `{code, message}` body,
//! never a 5xx, and nothing created.

use hyper::{Method, StatusCode};
use subidd_tests::{Client, Daemon};

use crate::util::{assert_error, assert_status, pool_counts};

/// Asserts 400 `invalid_request`.
#[track_caller]
fn assert_invalid(reply: &subidd_tests::Reply, what: &str) {
    assert_error(reply, StatusCode::BAD_REQUEST, "invalid_request", what);
}

/// Asserts no lease was created by the refused requests.
async fn assert_nothing_created(client: &Client) {
    assert_eq!(
        pool_counts(client).await,
        (0, 0, 4094),
        "refused requests must not allocate"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_names_are_invalid_requests() {
    let daemon = Daemon::start("").expect("start daemon");
    let client = daemon.client();
    let long = format!("a{}", "b".repeat(128));
    assert_eq!(long.len(), 129);
    // (as it goes in the path, as it goes in a JSON body)
    let names = [
        ("-x", "-x"),
        (".x", ".x"),
        ("_x", "_x"),
        (long.as_str(), long.as_str()),
        ("a%20b", "a b"),
        ("a%2Fb", "a/b"),
        ("a%3Ab", "a:b"),
        ("%C3%A9t%C3%A9", "été"),
        ("a%00b", "a\u{0}b"),
        ("a%0Ab", "a\nb"),
    ];
    for (in_path, in_body) in names {
        let path = format!("/v1/leases/{in_path}");
        let put = client.put(&path, None).await.expect("PUT");
        assert_invalid(&put, &format!("PUT {path}"));
        let get = client.get(&path).await.expect("GET");
        assert_invalid(&get, &format!("GET {path}"));
        let body = serde_json::json!({ "name": in_body }).to_string();
        let post = client.post("/v1/leases", Some(&body)).await.expect("POST");
        assert_invalid(&post, &format!("POST {body}"));
    }
    // Percent-encoding that is not UTF-8 cannot be a name either.
    let raw = client.put("/v1/leases/a%FFb", None).await.expect("PUT");
    assert_invalid(&raw, "PUT /v1/leases/a%FFb");
    let empty = client
        .post("/v1/leases", Some(r#"{"name":""}"#))
        .await
        .expect("POST");
    assert_invalid(&empty, "POST with an empty name");
    // A literal slash makes another path, which is not an endpoint.
    let slash = client.put("/v1/leases/a/b", None).await.expect("PUT");
    assert_error(
        &slash,
        StatusCode::NOT_FOUND,
        "not_found",
        "PUT /v1/leases/a/b",
    );
    assert_nothing_created(&client).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn names_of_128_chars_and_every_allowed_character_are_accepted() {
    let daemon = Daemon::start("").expect("start daemon");
    let client = daemon.client();
    let long = format!("Z{}", "9".repeat(127));
    assert_eq!(long.len(), 128);
    for name in [
        long.as_str(),
        "0",
        "a",
        "A.b-c_d",
        "3f2504e04f8941d39a0c0305e82c33013f2504e04f8941d39a0c0305e82c3301",
    ] {
        let reply = client
            .put(&format!("/v1/leases/{name}"), None)
            .await
            .expect("PUT");
        assert_status(&reply, StatusCode::CREATED, &format!("PUT {name}"));
        assert_eq!(reply.json()["name"], name, "name echoed");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_bodies_are_invalid_requests() {
    let daemon = Daemon::start("").expect("start daemon");
    let client = daemon.client();
    let many_labels: serde_json::Map<String, serde_json::Value> = (0..65)
        .map(|i| (format!("k{i}"), serde_json::Value::from("v")))
        .collect();
    let many_labels = serde_json::json!({ "labels": many_labels }).to_string();
    let long_value = format!(r#"{{"labels":{{"k":"{}"}}}}"#, "v".repeat(1025));
    // Default pool: 4094 blocks; one more block is larger than the pool.
    let too_big = format!(r#"{{"size":{}}}"#, 4095u64 * 65536);
    let bodies = [
        "{",
        "not json",
        "[]",
        "null",
        r#"{"sizee":1}"#,
        r#"{"size":"big"}"#,
        r#"{"size":-65536}"#,
        r#"{"size":0}"#,
        r#"{"size":1000}"#,
        r#"{"size":65537}"#,
        too_big.as_str(),
        r#"{"ttl_seconds":0}"#,
        r#"{"ttl_seconds":-1}"#,
        r#"{"ttl_seconds":315360001}"#,
        r#"{"ttl_seconds":4294967296}"#,
        r#"{"size":4294967296}"#,
        r#"{"size":65536.5}"#,
        r#"{"labels":["a"]}"#,
        r#"{"labels":{"a b":"v"}}"#,
        r#"{"labels":{"":"v"}}"#,
        r#"{"labels":{"k":"a\u0000b"}}"#,
        r#"{"labels":{"k":"line\nbreak"}}"#,
        r#"{"labels":{"k":1}}"#,
        long_value.as_str(),
        many_labels.as_str(),
        r#"{"name":"x"}"#,
    ];
    for body in bodies {
        let put = client.put("/v1/leases/x", Some(body)).await.expect("PUT");
        assert_invalid(&put, &format!("PUT body {body}"));
    }
    for body in [
        r#"{"name":"x","sizee":1}"#,
        r#"{"name":"x","size":1000}"#,
        r#"{"name":"x","ttl_seconds":0}"#,
        r#"{"size":65536}"#,
        "{",
    ] {
        let post = client.post("/v1/leases", Some(body)).await.expect("POST");
        assert_invalid(&post, &format!("POST body {body}"));
    }
    let exactly_64: serde_json::Map<String, serde_json::Value> = (0..64)
        .map(|i| (format!("k{i}"), serde_json::Value::from("v")))
        .collect();
    let ok = serde_json::json!({ "labels": exactly_64 }).to_string();
    let reply = client.put("/v1/leases/x64", Some(&ok)).await.expect("PUT");
    assert_status(&reply, StatusCode::CREATED, "64 labels are allowed");
    let not_x = client.get("/v1/leases/x").await.expect("GET");
    assert_error(
        &not_x,
        StatusCode::NOT_FOUND,
        "not_found",
        "refused PUTs created nothing",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_queries_are_invalid_requests() {
    let daemon = Daemon::start("").expect("start daemon");
    let client = daemon.client();
    let put = client.put("/v1/leases/q", None).await.expect("PUT");
    assert_status(&put, StatusCode::CREATED, "PUT q");
    let cases: [(Method, &str); 13] = [
        (Method::GET, "/v1/leases?bogus=1"),
        (Method::GET, "/v1/leases?state=bogus"),
        (Method::GET, "/v1/leases?state=active&state=all"),
        (Method::GET, "/v1/leases?label=novalue"),
        (Method::PUT, "/v1/leases/q?size=65536"),
        (Method::GET, "/v1/leases/q?x=1"),
        (Method::GET, "/v1/pool?verbose=1"),
        (Method::DELETE, "/v1/leases/q?purge=maybe"),
        (Method::DELETE, "/v1/leases/q?force=perhaps"),
        (Method::GET, "/v1/lookup"),
        (Method::GET, "/v1/lookup?uid=abc"),
        (Method::GET, "/v1/lookup?uid=-1"),
        (Method::GET, "/v1/lookup?uid=1&gid=1"),
    ];
    for (method, path) in cases {
        let what = format!("{method} {path}");
        let reply = client.request(method, path, None).await.expect("request");
        assert_invalid(&reply, &what);
    }
    let big = client.get("/v1/lookup?uid=4294967296").await.expect("GET");
    assert_invalid(&big, "lookup of an id past u32");
    let still = client.get("/v1/leases/q").await.expect("GET");
    assert_eq!(
        still.json()["state"],
        "active",
        "refused DELETEs released nothing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn body_over_64_kib_is_413() {
    let daemon = Daemon::start("").expect("start daemon");
    let client = daemon.client();
    let value = "v".repeat(64 * 1024);
    let body = format!(r#"{{"labels":{{"k":"{value}"}}}}"#);
    assert!(body.len() > 64 * 1024);
    let put = client
        .put("/v1/leases/big", Some(&body))
        .await
        .expect("PUT");
    assert_error(
        &put,
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
        "PUT with a 64 KiB+ body",
    );
    let post_body = format!(r#"{{"name":"big","labels":{{"k":"{value}"}}}}"#);
    let post = client
        .post("/v1/leases", Some(&post_body))
        .await
        .expect("POST");
    assert_error(
        &post,
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
        "POST with a 64 KiB+ body",
    );
    assert_nothing_created(&client).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn wrong_methods_and_unknown_paths_get_json_errors() {
    let daemon = Daemon::start("").expect("start daemon");
    let client = daemon.client();
    for (method, path) in [
        (Method::DELETE, "/v1/pool"),
        (Method::POST, "/v1/pool"),
        (Method::PATCH, "/v1/leases/x"),
        (Method::POST, "/v1/leases/x"),
        (Method::DELETE, "/v1/leases"),
        (Method::GET, "/v1/leases/x/renew"),
        (Method::PUT, "/_ping"),
    ] {
        let what = format!("{method} {path}");
        let reply = client.request(method, path, None).await.expect("request");
        assert_error(
            &reply,
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            &what,
        );
    }
    for path in [
        "/",
        "/v2/leases",
        "/v1/leases/x/y/z",
        "/v1/lease/x",
        "/v1/poolx",
    ] {
        let reply = client.get(path).await.expect("GET");
        assert_error(
            &reply,
            StatusCode::NOT_FOUND,
            "not_found",
            &format!("GET {path}"),
        );
    }
    assert_nothing_created(&client).await;
}
