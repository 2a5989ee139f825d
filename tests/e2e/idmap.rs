//! Id maps of a lease in each format, and reverse lookup of a host id.

use hyper::StatusCode;
use serde_json::json;
use subidd_tests::Daemon;

use crate::util::{BASE, BLOCK, assert_error, assert_status};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idmap_renders_every_format() {
    let daemon = Daemon::start("").expect("start daemon");
    let client = daemon.client();
    let first = client.put("/v1/leases/first", None).await.expect("PUT");
    assert_status(&first, StatusCode::CREATED, "PUT first");
    let web = client.put("/v1/leases/web", None).await.expect("PUT");
    assert_status(&web, StatusCode::CREATED, "PUT web");
    let base = web.json()["uid_base"].as_u64().expect("uid_base");
    assert_eq!(
        base,
        u64::from(BASE + BLOCK),
        "second lease takes the second block"
    );

    let all = client.get("/v1/leases/web/idmap").await.expect("GET");
    assert_status(&all, StatusCode::OK, "idmap without format");
    let explicit = client
        .get("/v1/leases/web/idmap?format=json")
        .await
        .expect("GET");
    assert_eq!(explicit.json(), all.json(), "format=json is the default");
    let all = all.json();
    let mapping = json!([{ "containerID": 0, "hostID": base, "size": 65536 }]);
    assert_eq!(
        all["uid_map"],
        format!("0 {base} 65536"),
        "json uid_map: {all}"
    );
    assert_eq!(
        all["gid_map"],
        format!("0 {base} 65536"),
        "json gid_map: {all}"
    );
    assert_eq!(
        all["oci"],
        json!({ "uidMappings": mapping, "gidMappings": mapping }),
        "json oci: {all}"
    );
    assert_eq!(
        all["podman"],
        json!([
            format!("--uidmap=0:{base}:65536"),
            format!("--gidmap=0:{base}:65536")
        ]),
        "json podman: {all}"
    );
    assert_eq!(
        all["subuid"],
        format!("web:{base}:65536"),
        "json subuid: {all}"
    );

    let text_formats = [
        ("uid_map", format!("0 {base} 65536\n")),
        ("gid_map", format!("0 {base} 65536\n")),
        (
            "podman",
            format!("--uidmap=0:{base}:65536 --gidmap=0:{base}:65536\n"),
        ),
        ("subuid", format!("web:{base}:65536\n")),
        ("subgid", format!("web:{base}:65536\n")),
    ];
    for (format, expected) in text_formats {
        let reply = client
            .get(&format!("/v1/leases/web/idmap?format={format}"))
            .await
            .expect("GET");
        assert_status(&reply, StatusCode::OK, &format!("format={format}"));
        assert_eq!(reply.text(), expected, "format={format}");
        let content_type = reply
            .headers
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        assert!(
            content_type.starts_with("text/plain"),
            "format={format} is text/plain, got {content_type:?}"
        );
    }
    let oci = client
        .get("/v1/leases/web/idmap?format=oci")
        .await
        .expect("GET");
    assert_status(&oci, StatusCode::OK, "format=oci");
    assert_eq!(
        oci.json(),
        json!({ "uidMappings": mapping, "gidMappings": mapping }),
        "format=oci"
    );

    let bad = client
        .get("/v1/leases/web/idmap?format=yaml")
        .await
        .expect("GET");
    assert_error(
        &bad,
        StatusCode::BAD_REQUEST,
        "invalid_request",
        "format=yaml",
    );
    let unknown = client.get("/v1/leases/nope/idmap").await.expect("GET");
    assert_error(
        &unknown,
        StatusCode::NOT_FOUND,
        "not_found",
        "idmap of an unknown lease",
    );
    let deleted = client.delete("/v1/leases/web").await.expect("DELETE");
    assert_status(&deleted, StatusCode::NO_CONTENT, "DELETE web");
    let released = client
        .get("/v1/leases/web/idmap?format=uid_map")
        .await
        .expect("GET");
    assert_error(
        &released,
        StatusCode::NOT_FOUND,
        "not_found",
        "idmap of a released lease",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lookup_finds_the_lease_holding_a_host_id() {
    let daemon = Daemon::start("quarantine_seconds = 3600\n").expect("start daemon");
    let client = daemon.client();
    let a = client.put("/v1/leases/a", None).await.expect("PUT");
    assert_status(&a, StatusCode::CREATED, "PUT a");
    let b = client
        .put("/v1/leases/b", Some(r#"{"size":131072}"#))
        .await
        .expect("PUT");
    assert_status(&b, StatusCode::CREATED, "PUT b");
    let b = b.json();
    let b_base = b["uid_base"].as_u64().expect("uid_base");

    for (query, inner) in [
        (format!("uid={}", b_base + 999), 999),
        (format!("gid={}", b_base + 999), 999),
        (format!("uid={b_base}"), 0),
        (format!("uid={}", b_base + 65536 + 7), 65536 + 7),
        (format!("uid={}", b_base + 131071), 131071),
    ] {
        let reply = client
            .get(&format!("/v1/lookup?{query}"))
            .await
            .expect("GET");
        assert_status(&reply, StatusCode::OK, &format!("lookup {query}"));
        let found = reply.json();
        assert_eq!(found["inner_id"], inner, "lookup {query}: {found}");
        assert_eq!(found["lease"], b, "lookup {query} names lease b");
        assert_eq!(
            found["kind"],
            query.split('=').next().unwrap_or_default(),
            "lookup {query}: kind"
        );
    }
    let a_base = a.json()["uid_base"].as_u64().expect("uid_base");
    let in_a = client
        .get(&format!("/v1/lookup?uid={}", a_base + 65535))
        .await
        .expect("GET");
    assert_eq!(in_a.json()["lease"]["name"], "a", "last id of a is a's");

    let free = b_base + 131072 + 5;
    for id in [0, 1000, u64::from(BASE) - 1, free, 4_294_967_295] {
        let reply = client
            .get(&format!("/v1/lookup?uid={id}"))
            .await
            .expect("GET");
        assert_error(
            &reply,
            StatusCode::NOT_FOUND,
            "not_found",
            &format!("lookup of uid {id}, held by no lease"),
        );
    }
    let deleted = client.delete("/v1/leases/a").await.expect("DELETE");
    assert_status(&deleted, StatusCode::NO_CONTENT, "DELETE a");
    let released = client
        .get(&format!("/v1/lookup?uid={}", a_base + 1))
        .await
        .expect("GET");
    assert_error(
        &released,
        StatusCode::NOT_FOUND,
        "not_found",
        "lookup of an id of a released (quarantined) lease",
    );
}
