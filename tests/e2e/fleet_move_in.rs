//! Moving in: `subidd --move-in` copies a single host's SQLite leases into an empty
//! PostgreSQL store, every lease keeping its range, id and history, and refuses a store that
//! is not empty or was set up for another pool.

use std::collections::BTreeMap;
use std::process::Command;

use hyper::StatusCode;
use serde_json::Value;
use subidd_tests::pg::PgCluster;
use subidd_tests::{Client, Daemon, subidd_bin};

use crate::fleet::{BLOCK, fleet_config, slot_base};
use crate::util::assert_status;

/// A single host on SQLite with a pool of 32 blocks in fleet slot `slot`.
fn sqlite_config(slot: u32) -> String {
    format!(
        "quarantine_seconds = 3600\n[pool]\nbase = {}\nsize = {}\nblock = {BLOCK}\n",
        slot_base(slot),
        32 * BLOCK
    )
}

/// `subidd --move-in` on the daemon's config, into `url`: (success, output).
fn move_in(daemon: &Daemon, url: &str) -> (bool, String) {
    let out = Command::new(subidd_bin().expect("binary"))
        .arg("--config")
        .arg(&daemon.config)
        .arg("--move-in")
        .env_remove("SUBIDD_CONFIG")
        .env("SUBIDD_STORE_URL", url)
        .env("SUBIDD_STORE_HOST_ID", "solo")
        .output()
        .expect("run subidd --move-in");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// Every lease in every state: name and id -> (state, uid_base).
async fn all_leases(client: &Client) -> BTreeMap<String, (String, u64)> {
    let list = client
        .get("/v1/leases?state=all")
        .await
        .expect("list")
        .json();
    list["leases"]
        .as_array()
        .expect("leases")
        .iter()
        .map(|l| {
            (
                format!("{} {}", l["name"].as_str().unwrap_or(""), l["created_at"]),
                (
                    l["state"].as_str().unwrap_or("").to_string(),
                    l["uid_base"].as_u64().unwrap_or(0),
                ),
            )
        })
        .collect()
}

async fn feed(client: &Client) -> Vec<Value> {
    client
        .get("/v1/events?since=0&follow=false")
        .await
        .expect("feed")
        .text()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(subidd_postgres), ignore = "PostgreSQL is not installed")]
async fn moving_in_keeps_every_range_and_history() {
    let cluster = PgCluster::shared().expect("cluster");
    let mut host = Daemon::start(&sqlite_config(6)).expect("start on SQLite");
    let client = host.client();
    for i in 0..5 {
        let put = client
            .put(
                &format!("/v1/leases/keep-{i}"),
                Some(r#"{"labels":{"team":"a"}}"#),
            )
            .await
            .expect("PUT");
        assert_status(&put, StatusCode::CREATED, "PUT keep");
    }
    let ttl = client
        .put("/v1/leases/timed", Some(r#"{"ttl_seconds":3600}"#))
        .await
        .expect("PUT");
    assert_status(&ttl, StatusCode::CREATED, "PUT timed");
    for name in ["gone", "purged"] {
        let put = client
            .put(&format!("/v1/leases/{name}"), None)
            .await
            .expect("PUT");
        assert_status(&put, StatusCode::CREATED, "PUT");
    }
    let gone_base = client.get("/v1/leases/gone").await.expect("GET").json()["uid_base"].clone();
    let del = client.delete("/v1/leases/gone").await.expect("DELETE");
    assert_status(&del, StatusCode::NO_CONTENT, "DELETE gone");
    let del = client
        .delete("/v1/leases/purged?purge=true")
        .await
        .expect("DELETE");
    assert_status(&del, StatusCode::NO_CONTENT, "DELETE purged");
    let before = all_leases(&client).await;
    let history = feed(&client).await;
    assert_eq!(before.len(), 8);

    // Refused while the daemon runs.
    let url = cluster.create_db("movein").expect("database");
    let (ok, out) = move_in(&host, &url);
    assert!(!ok && out.contains("stop the daemon"), "{out}");
    host.stop().expect("stop");
    let (ok, out) = move_in(&host, &url);
    assert!(ok, "move-in failed: {out}");
    assert!(out.contains("6 active and 2 released leases"), "{out}");

    // The host starts again on the fleet's store: the same leases, ranges and history.
    host.set_env("SUBIDD_STORE_URL", Some(&url));
    host.set_env("SUBIDD_STORE_HOST_ID", Some("solo"));
    host.spawn().expect("start on PostgreSQL");
    let pool = client.get("/v1/pool").await.expect("pool").json();
    assert_eq!(pool["store"], "postgresql", "{pool}");
    assert_eq!(pool["blocks"]["active"], 6, "{pool}");
    assert_eq!(
        all_leases(&client).await,
        before,
        "every lease keeps its range"
    );
    let moved = feed(&client).await;
    assert_eq!(moved, history, "the event feed, ids included, is the same");
    let sticky = client.put("/v1/leases/gone", None).await.expect("PUT gone");
    assert_status(&sticky, StatusCode::CREATED, "PUT gone again");
    assert_eq!(sticky.json()["uid_base"], gone_base, "still sticky");
    // A second host joins with an empty state directory and sees them too.
    let second = Daemon::start(&fleet_config(&url, "second", 6, 32, "")).expect("second host");
    let new = second
        .client()
        .put("/v1/leases/fresh", None)
        .await
        .expect("PUT");
    assert_status(&new, StatusCode::CREATED, "PUT fresh on the second host");
    let bases: Vec<u64> = all_leases(&second.client())
        .await
        .values()
        .filter(|(state, _)| state == "active")
        .map(|(_, base)| *base)
        .collect();
    let mut unique = bases.clone();
    unique.sort_unstable();
    unique.dedup();
    assert_eq!(unique.len(), bases.len(), "no range handed out twice");
    assert_eq!(bases.len(), 8);

    // Another host with leases of its own cannot move into the store now.
    let mut other = Daemon::start(&sqlite_config(6)).expect("another SQLite host");
    let put = other
        .client()
        .put("/v1/leases/mine", None)
        .await
        .expect("PUT");
    assert_status(&put, StatusCode::CREATED, "PUT on the other host");
    other.stop().expect("stop");
    let (ok, out) = move_in(&other, &url);
    assert!(!ok && out.contains("not empty"), "{out}");
    // ... nor join it without moving in.
    other.set_env("SUBIDD_STORE_URL", Some(&url));
    other.set_env("SUBIDD_STORE_HOST_ID", Some("other"));
    let refused = other
        .spawn()
        .expect_err("a file with leases of its own joins no fleet");
    assert!(format!("{refused:#}").contains("--move-in"), "{refused:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(subidd_postgres), ignore = "PostgreSQL is not installed")]
async fn moving_in_refuses_a_store_of_another_pool() {
    let cluster = PgCluster::shared().expect("cluster");
    let url = cluster.create_db("movein_pool").expect("database");
    // A fleet host sets the store up for its pool (slot 7), with no lease.
    let mut first = Daemon::start(&fleet_config(&url, "first", 7, 32, "")).expect("fleet host");
    first.stop().expect("stop");
    let mut host = Daemon::start(&sqlite_config(8)).expect("SQLite host");
    let put = host.client().put("/v1/leases/x", None).await.expect("PUT");
    assert_status(&put, StatusCode::CREATED, "PUT x");
    host.stop().expect("stop");
    let (ok, out) = move_in(&host, &url);
    assert!(!ok && out.contains("pool mismatch"), "{out}");
    let leases = cluster
        .psql(
            url.rsplit('/').next().expect("db"),
            "SELECT COUNT(*) FROM lease",
        )
        .expect("psql");
    assert_eq!(leases, "0", "nothing copied");
}
