//! Released ranges: quarantine before reuse, sticky names, purge, and the history they leave.

use hyper::StatusCode;
use serde_json::{Value, json};
use subidd_tests::Daemon;

use crate::util::{BASE, BLOCK, assert_error, assert_status, events, pool_config, pool_counts};

/// `uid_base` of a successful PUT.
async fn put_base(client: &subidd_tests::Client, name: &str, status: StatusCode) -> Value {
    let reply = client
        .put(&format!("/v1/leases/{name}"), None)
        .await
        .expect("PUT");
    assert_status(&reply, status, &format!("PUT {name}"));
    reply.json()["uid_base"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn released_range_is_quarantined_and_comes_back_to_its_name() {
    let daemon = Daemon::start(&pool_config(2, 3600)).expect("start daemon");
    let client = daemon.client();
    assert_eq!(pool_counts(&client).await, (0, 0, 2), "empty 2-block pool");

    let a = put_base(&client, "a", StatusCode::CREATED).await;
    assert_eq!(a, BASE, "a takes the first block");
    assert_eq!(pool_counts(&client).await, (1, 0, 1), "after PUT a");

    let deleted = client.delete("/v1/leases/a").await.expect("DELETE");
    assert_status(&deleted, StatusCode::NO_CONTENT, "DELETE a");
    assert!(deleted.body.is_empty(), "204 has no body");
    assert_eq!(
        pool_counts(&client).await,
        (0, 1, 1),
        "a's block quarantined"
    );
    let released = client.get("/v1/leases/a").await.expect("GET").json();
    assert_eq!(
        released["state"], "released",
        "GET a after DELETE: {released}"
    );
    let again = client.delete("/v1/leases/a").await.expect("DELETE");
    assert_error(
        &again,
        StatusCode::NOT_FOUND,
        "not_found",
        "second DELETE a",
    );

    let b = put_base(&client, "b", StatusCode::CREATED).await;
    assert_eq!(
        b,
        BASE + BLOCK,
        "b gets the other block, not a's quarantined one"
    );
    assert_eq!(pool_counts(&client).await, (1, 1, 0), "after PUT b");

    let c = client.put("/v1/leases/c", None).await.expect("PUT");
    assert_error(
        &c,
        StatusCode::CONFLICT,
        "pool_exhausted",
        "PUT c while the only free block is quarantined",
    );

    let a_again = put_base(&client, "a", StatusCode::CREATED).await;
    assert_eq!(
        a_again, a,
        "a gets its old range back within quarantine (sticky)"
    );
    assert_eq!(pool_counts(&client).await, (2, 0, 0), "after PUT a again");

    let history = events(&client, "a").await;
    assert_eq!(
        history,
        [
            ("create".to_string(), json!(0)),
            ("release".to_string(), json!(0)),
            ("create".to_string(), json!(0)),
        ],
        "history of a, each by uid 0"
    );
    let none = client.get("/v1/leases/zzz/events").await.expect("GET");
    assert_error(
        &none,
        StatusCode::NOT_FOUND,
        "not_found",
        "events of a name never used",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn delete_with_purge_makes_the_range_reusable_at_once() {
    let daemon = Daemon::start(&pool_config(2, 3600)).expect("start daemon");
    let client = daemon.client();
    let a = put_base(&client, "a", StatusCode::CREATED).await;
    put_base(&client, "b", StatusCode::CREATED).await;
    assert_eq!(pool_counts(&client).await, (2, 0, 0), "pool full");

    let purged = client
        .delete("/v1/leases/a?purge=true")
        .await
        .expect("DELETE");
    assert_status(&purged, StatusCode::NO_CONTENT, "DELETE a?purge=true");
    assert_eq!(
        pool_counts(&client).await,
        (1, 0, 1),
        "a's block free at once"
    );
    let released = client.get("/v1/leases/a").await.expect("GET").json();
    assert_eq!(released["state"], "released", "a after purge: {released}");
    let c = put_base(&client, "c", StatusCode::CREATED).await;
    assert_eq!(c, a, "another name reuses a's purged range at once");
    assert_eq!(pool_counts(&client).await, (2, 0, 0), "pool full again");
    assert_eq!(
        events(&client, "a").await,
        [
            ("create".to_string(), json!(0)),
            ("release".to_string(), json!(0)),
            ("purge".to_string(), json!(0)),
        ],
        "history of a"
    );
    let unknown = client
        .delete("/v1/leases/never?purge=true")
        .await
        .expect("DELETE");
    assert_error(
        &unknown,
        StatusCode::NOT_FOUND,
        "not_found",
        "purge of an unknown name",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn purge_of_an_already_released_lease_frees_its_range_at_once() {
    let mut daemon = Daemon::start(&pool_config(2, 3600)).expect("start daemon");
    let client = daemon.client();
    put_base(&client, "a", StatusCode::CREATED).await;
    let b = put_base(&client, "b", StatusCode::CREATED).await;
    let deleted = client.delete("/v1/leases/b").await.expect("DELETE");
    assert_status(&deleted, StatusCode::NO_CONTENT, "DELETE b");
    assert_eq!(pool_counts(&client).await, (1, 1, 0), "b quarantined");
    let d = client.put("/v1/leases/d", None).await.expect("PUT");
    assert_error(
        &d,
        StatusCode::CONFLICT,
        "pool_exhausted",
        "PUT d before purge",
    );

    let purged = client
        .delete("/v1/leases/b?purge=true")
        .await
        .expect("DELETE");
    assert_status(
        &purged,
        StatusCode::NO_CONTENT,
        "DELETE b?purge=true after release",
    );
    assert_eq!(
        events(&client, "b").await,
        [
            ("create".to_string(), json!(0)),
            ("release".to_string(), json!(0)),
            ("purge".to_string(), json!(0)),
        ],
        "history of b"
    );
    // What the daemon answers now must agree with what it will answer after a restart.
    let live = pool_counts(&client).await;
    daemon.restart().expect("restart");
    let after_restart = pool_counts(&daemon.client()).await;
    assert_eq!(
        live, after_restart,
        "pool counts after purge (live) differ from the same database after a restart"
    );
    assert_eq!(live, (1, 0, 1), "b's block free after purge");
    let d = put_base(&daemon.client(), "d", StatusCode::CREATED).await;
    assert_eq!(d, b, "d reuses b's purged range");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn zero_quarantine_reuses_a_released_range_at_once() {
    let daemon = Daemon::start(&pool_config(1, 0)).expect("start daemon");
    let client = daemon.client();
    let a = put_base(&client, "a", StatusCode::CREATED).await;
    let full = client.put("/v1/leases/b", None).await.expect("PUT");
    assert_error(
        &full,
        StatusCode::CONFLICT,
        "pool_exhausted",
        "PUT b in a full pool",
    );
    let deleted = client.delete("/v1/leases/a").await.expect("DELETE");
    assert_status(&deleted, StatusCode::NO_CONTENT, "DELETE a");
    assert_eq!(
        pool_counts(&client).await,
        (0, 0, 1),
        "no quarantine configured"
    );
    let b = put_base(&client, "b", StatusCode::CREATED).await;
    assert_eq!(b, a, "b reuses a's range at once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn allocation_prefers_never_used_then_least_recently_released() {
    let daemon = Daemon::start(&pool_config(3, 0)).expect("start daemon");
    let client = daemon.client();
    let a = put_base(&client, "a", StatusCode::CREATED).await;
    let b = put_base(&client, "b", StatusCode::CREATED).await;
    for name in ["b", "a"] {
        let deleted = client
            .delete(&format!("/v1/leases/{name}"))
            .await
            .expect("DELETE");
        assert_status(&deleted, StatusCode::NO_CONTENT, &format!("DELETE {name}"));
        // Distinct release times, so "least recently released" is well defined.
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let c = put_base(&client, "c", StatusCode::CREATED).await;
    assert_eq!(c, BASE + 2 * BLOCK, "a never-used block comes first");
    let d = put_base(&client, "d", StatusCode::CREATED).await;
    assert_eq!(d, b, "then the least recently released (b, released first)");
    let e = put_base(&client, "e", StatusCode::CREATED).await;
    assert_eq!(e, a, "then the next (a)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sticky_name_does_not_take_a_range_quarantined_for_another_name() {
    let daemon = Daemon::start(&pool_config(1, 3600)).expect("start daemon");
    let client = daemon.client();
    let a = put_base(&client, "a", StatusCode::CREATED).await;
    let purged = client
        .delete("/v1/leases/a?purge=true")
        .await
        .expect("DELETE");
    assert_status(&purged, StatusCode::NO_CONTENT, "DELETE a?purge=true");
    let c = put_base(&client, "c", StatusCode::CREATED).await;
    assert_eq!(c, a, "c takes the purged block");
    let deleted = client.delete("/v1/leases/c").await.expect("DELETE");
    assert_status(&deleted, StatusCode::NO_CONTENT, "DELETE c");
    assert_eq!(
        pool_counts(&client).await,
        (0, 1, 0),
        "c's block quarantined"
    );
    let again = client.put("/v1/leases/a", None).await.expect("PUT");
    assert_error(
        &again,
        StatusCode::CONFLICT,
        "pool_exhausted",
        "PUT a while its old block is in quarantine for c's files",
    );
}
