//! A fleet: three daemons (own state and runtime dirs) sharing one PostgreSQL store, in a
//! cluster the tests start themselves (`subidd_tests::pg`; ignored where PostgreSQL is not
//! installed).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper::StatusCode;
use serde_json::Value;
use subidd_tests::pg::PgCluster;
use subidd_tests::{Client, Daemon};

use crate::util::{EventStream, assert_error, assert_status};

/// The fleets' pools: away from the default pool other tests' daemons use on this host, and
/// one slot of 1024 blocks per test, so that the processes of one test (which hold ids of its
/// pool, and every daemon on the host sees them) are no other test's concern.
pub const FLEET_BASE: u32 = 0x5000_0000;
pub const BLOCK: u32 = 65_536;
const SLOT_BLOCKS: u32 = 1024;

/// The first id of the pool of slot `slot`.
pub fn slot_base(slot: u32) -> u32 {
    FLEET_BASE + slot * SLOT_BLOCKS * BLOCK
}

/// The deadline of the store's operations in these tests (`store.timeout_ms`).
pub const STORE_TIMEOUT_MS: u64 = 1500;

/// A config for host `host` of a fleet on `url` with a pool of `blocks` blocks in slot `slot`;
/// `extra` goes first (top-level keys).
pub fn fleet_config(url: &str, host: &str, slot: u32, blocks: u32, extra: &str) -> String {
    assert!(blocks <= SLOT_BLOCKS);
    format!(
        "{extra}\n[pool]\nbase = {base}\nsize = {size}\nblock = {BLOCK}\n\
         [store]\nurl = {url:?}\nhost_id = {host:?}\ntimeout_ms = {STORE_TIMEOUT_MS}\n\
         poll_interval_ms = 200\n",
        base = slot_base(slot),
        size = blocks * BLOCK
    )
}

/// A cluster with a fresh database, and three daemons on it named a, b and c.
pub struct Fleet {
    pub cluster: Arc<PgCluster>,
    pub url: String,
    pub daemons: Vec<Daemon>,
}

impl Fleet {
    pub fn start(cluster: Arc<PgCluster>, slot: u32, blocks: u32, extra: &str) -> Fleet {
        let url = cluster.create_db("fleet").expect("create database");
        let daemons = ["a", "b", "c"]
            .iter()
            .map(|host| {
                Daemon::start(&fleet_config(&url, host, slot, blocks, extra))
                    .unwrap_or_else(|e| panic!("start daemon {host}: {e:#}"))
            })
            .collect();
        Fleet {
            cluster,
            url,
            daemons,
        }
    }

    pub fn client(&self, i: usize) -> Client {
        self.daemons[i].client()
    }

    /// Runs SQL against the fleet's database.
    pub fn sql(&self, sql: &str) -> String {
        let db = self.url.rsplit('/').next().expect("database name");
        self.cluster.psql(db, sql).expect("psql")
    }
}

/// Active leases whose ids overlap another active lease's, by the database's own account.
fn overlapping_pairs(fleet: &Fleet) -> u64 {
    fleet
        .sql(
            "SELECT COUNT(*) FROM lease a JOIN lease b ON a.id < b.id \
             AND a.state = 'active' AND b.state = 'active' \
             AND int8range(a.uid_base, a.uid_base + a.size) && int8range(b.uid_base, b.uid_base + b.size)",
        )
        .parse()
        .expect("count")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(not(subidd_postgres), ignore = "PostgreSQL is not installed")]
async fn concurrent_clients_on_three_hosts_get_distinct_leases() {
    let fleet = Fleet::start(PgCluster::shared().expect("cluster"), 0, 512, "");
    const CLIENTS: usize = 12;
    const EACH: usize = 10;
    let mut tasks = Vec::new();
    for host in 0..3 {
        for c in 0..CLIENTS {
            let client = fleet.client(host);
            tasks.push(tokio::spawn(async move {
                let mut got = Vec::new();
                let mut conn = client.connect().await.expect("connect");
                for i in 0..EACH {
                    let path = format!("/v1/leases/h{host}-c{c}-{i}");
                    let reply = conn
                        .request(hyper::Method::PUT, &path, None)
                        .await
                        .expect("PUT");
                    assert_eq!(
                        reply.status,
                        StatusCode::CREATED,
                        "{path}: {}",
                        reply.text()
                    );
                    let lease = reply.json();
                    got.push((
                        lease["name"].as_str().unwrap_or_default().to_string(),
                        lease["uid_base"].as_u64().unwrap_or(0),
                    ));
                }
                got
            }));
        }
    }
    let mut acked = BTreeMap::new();
    for task in tasks {
        for (name, base) in task.await.expect("client task") {
            acked.insert(name, base);
        }
    }
    assert_eq!(acked.len(), 3 * CLIENTS * EACH);
    let bases: BTreeSet<u64> = acked.values().copied().collect();
    assert_eq!(
        bases.len(),
        acked.len(),
        "every acknowledged lease has a range of its own"
    );
    assert_eq!(
        overlapping_pairs(&fleet),
        0,
        "the database's active ranges are disjoint"
    );
    // Every acknowledged lease is in the database with the range its client was told.
    let stored: BTreeMap<String, u64> = fleet
        .sql("SELECT name || ' ' || uid_base FROM lease WHERE state = 'active'")
        .lines()
        .filter_map(|l| {
            let (name, base) = l.split_once(' ')?;
            Some((name.to_string(), base.parse().ok()?))
        })
        .collect();
    assert_eq!(stored, acked);
    // Each host sees the whole fleet's leases once it has read the others' last commits (on
    // their notification, or its next poll: 200 ms here; waited for up to 10 s).
    for host in 0..3 {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let pool = fleet
                .client(host)
                .get("/v1/pool")
                .await
                .expect("pool")
                .json();
            assert_eq!(pool["store"], "postgresql");
            let active = pool["blocks"]["active"].as_u64();
            if active == Some((3 * CLIENTS * EACH) as u64) {
                break;
            }
            assert!(Instant::now() < deadline, "host {host}: {pool}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(subidd_postgres), ignore = "PostgreSQL is not installed")]
async fn a_name_is_the_same_lease_on_every_host_and_sticky_fleet_wide() {
    let fleet = Fleet::start(
        PgCluster::shared().expect("cluster"),
        1,
        16,
        "quarantine_seconds = 3600",
    );
    let (a, b, c) = (fleet.client(0), fleet.client(1), fleet.client(2));
    let created = a.put("/v1/leases/web-1", None).await.expect("PUT on a");
    assert_status(&created, StatusCode::CREATED, "PUT web-1 on a");
    let created = created.json();
    let on_b = b.put("/v1/leases/web-1", None).await.expect("PUT on b");
    assert_status(&on_b, StatusCode::OK, "PUT web-1 on b: the same lease");
    assert_eq!(on_b.json()["uid_base"], created["uid_base"]);
    let on_c = c.get("/v1/leases/web-1").await.expect("GET on c").json();
    assert_eq!(on_c["uid_base"], created["uid_base"]);
    let other = c
        .post("/v1/leases", Some(r#"{"name":"web-1"}"#))
        .await
        .expect("POST");
    assert_error(
        &other,
        StatusCode::CONFLICT,
        "lease_exists",
        "POST web-1 on c",
    );
    // Released on b, it comes back with its range on c; another name does not get it.
    let gone = b.delete("/v1/leases/web-1").await.expect("DELETE on b");
    assert_status(&gone, StatusCode::NO_CONTENT, "DELETE web-1 on b");
    let web2 = a
        .put("/v1/leases/web-2", None)
        .await
        .expect("PUT web-2")
        .json();
    assert_ne!(
        web2["uid_base"], created["uid_base"],
        "quarantined fleet-wide"
    );
    let back = c.put("/v1/leases/web-1", None).await.expect("PUT on c");
    assert_status(&back, StatusCode::CREATED, "PUT web-1 again on c");
    assert_eq!(
        back.json()["uid_base"],
        created["uid_base"],
        "sticky fleet-wide"
    );
    // The history and the event feed are the fleet's, on every host.
    let history = a
        .get("/v1/leases/web-1/events")
        .await
        .expect("events")
        .json();
    let kinds: Vec<&str> = history["events"]
        .as_array()
        .expect("events")
        .iter()
        .filter_map(|e| e["kind"].as_str())
        .collect();
    assert_eq!(kinds, ["create", "release", "create"]);
    let feed = b
        .get("/v1/events?since=0&follow=false")
        .await
        .expect("feed")
        .text();
    let types: Vec<String> = feed
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .map(|e| {
            format!(
                "{} {}",
                e["type"].as_str().unwrap_or(""),
                e["lease"].as_str().unwrap_or("")
            )
        })
        .collect();
    assert_eq!(
        types,
        [
            "lease.created web-1",
            "lease.released web-1",
            "lease.created web-2",
            "lease.created web-1"
        ]
    );
}

/// A live event stream on one host carries what another host commits, without a commit of its
/// own host to wake it (the fleet's task reads other hosts' changes on their notification or
/// its poll, and wakes the publisher).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(subidd_postgres), ignore = "PostgreSQL is not installed")]
#[cfg_attr(not(subidd_root), ignore = "needs root")]
async fn a_live_event_stream_carries_other_hosts_commits() {
    // Slot 9: no other test's; these daemons start no process.
    let fleet = Fleet::start(PgCluster::shared().expect("cluster"), 9, 8, "");
    let a = fleet.client(0);
    let first = a
        .put("/v1/leases/early", None)
        .await
        .expect("PUT early on a");
    assert_status(&first, StatusCode::CREATED, "PUT early on a");
    let mut live = EventStream::open(&fleet.daemons[1].socket, "?since=0").await;
    let seen = live.next().await.expect("the backlog");
    assert_eq!(seen["lease"], "early", "{seen}");
    let later = a
        .put("/v1/leases/later", None)
        .await
        .expect("PUT later on a");
    assert_status(&later, StatusCode::CREATED, "PUT later on a");
    // `next` waits at most 10 s: far beyond one poll interval (200 ms here).
    let event = live.next().await.expect("the live event");
    assert_eq!(event["type"], "lease.created", "{event}");
    assert_eq!(event["lease"], "later", "{event}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(subidd_postgres), ignore = "PostgreSQL is not installed")]
#[cfg_attr(not(subidd_root), ignore = "needs root")]
async fn a_forced_release_on_one_host_stops_the_processes_on_another() {
    let fleet = Fleet::start(
        PgCluster::shared().expect("cluster"),
        2,
        16,
        "kill_grace_ms = 500",
    );
    let (a, b) = (fleet.client(0), fleet.client(1));
    let lease = a.put("/v1/leases/job", None).await.expect("PUT on a");
    assert_status(&lease, StatusCode::CREATED, "PUT job on a");
    let spawned = b
        .post(
            "/v1/leases/job/processes",
            Some(r#"{"argv":["/bin/sleep","300"]}"#),
        )
        .await
        .expect("spawn on b");
    assert_status(&spawned, StatusCode::CREATED, "spawn on b");
    let pid = spawned.json()["pid"].as_i64().expect("pid");
    let hosts = a.get("/v1/leases/job").await.expect("GET").json();
    assert_eq!(
        hosts["hosts"],
        serde_json::json!([{"host": "b", "live": true}]),
        "{hosts}"
    );
    // b's process events join the fleet's feed, which a serves.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let feed = a
            .get("/v1/events?since=0&follow=false&lease=job")
            .await
            .expect("feed")
            .text();
        if feed.contains("\"process.started\"") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "b's process start never reached a's feed: {feed}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A plain release is refused, naming the host with live processes.
    let refused = a.delete("/v1/leases/job").await.expect("DELETE on a");
    assert_error(
        &refused,
        StatusCode::CONFLICT,
        "lease_busy",
        "plain DELETE on a",
    );
    assert!(
        refused.json()["message"]
            .as_str()
            .unwrap_or("")
            .contains(" b"),
        "{}",
        refused.text()
    );
    assert!(std::path::Path::new(&format!("/proc/{pid}")).exists());
    // A forced one is carried out by b for its own process.
    let started = Instant::now();
    let forced = a
        .delete("/v1/leases/job?force=true")
        .await
        .expect("DELETE force");
    assert_status(&forced, StatusCode::NO_CONTENT, "forced DELETE on a");
    let took = started.elapsed();
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}/stat")).exists()
            || std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .is_ok_and(|s| s.contains(") Z ")),
        "b's process is gone"
    );
    eprintln!("forced release across hosts took {took:?}");
    let after = b.get("/v1/leases/job").await.expect("GET on b").json();
    assert_eq!(after["state"], "released", "{after}");
    let pin = fleet.daemons[1].path("run/ns/job/user");
    assert!(!pin.exists(), "b removed its pin");
    assert_eq!(
        fleet.sql("SELECT COUNT(*) FROM lease_host"),
        "0",
        "no host has state of it any more"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(subidd_postgres), ignore = "PostgreSQL is not installed")]
async fn expiry_is_done_once_and_claims_are_withheld_fleet_wide() {
    let fleet = Fleet::start(
        PgCluster::shared().expect("cluster"),
        3,
        16,
        "expiry_interval_ms = 100\npool_check_interval_ms = 200",
    );
    let (a, b, c) = (fleet.client(0), fleet.client(1), fleet.client(2));
    let t = a
        .put("/v1/leases/short", Some(r#"{"ttl_seconds":1}"#))
        .await
        .expect("PUT");
    assert_status(&t, StatusCode::CREATED, "PUT short");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let got = b.get("/v1/leases/short").await.expect("GET").json();
        if got["state"] == "released" {
            break;
        }
        assert!(Instant::now() < deadline, "not expired: {got}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Three expiry passes saw it; one expiry happened.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        fleet.sql("SELECT string_agg(kind, ',' ORDER BY id) FROM event WHERE lease_name = 'short'"),
        "create,expire"
    );
    // Host c's /etc/subuid claims the pool's second block: every host withholds it.
    let second = slot_base(3) + BLOCK;
    std::fs::write(
        fleet.daemons[2].path("subuid"),
        format!("alice:{second}:{BLOCK}\n"),
    )
    .expect("write c's subuid");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let pool = a.get("/v1/pool").await.expect("pool").json();
        let claimed = pool["claims"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|claim| claim["host"] == "c" && claim["first_block"] == 1);
        if claimed && pool["blocks"]["withheld"] == 1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "a never withheld c's claim: {pool}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Nobody is given the claimed block.
    for i in 0..14 {
        let host = [&a, &b, &c][i % 3];
        let lease = host
            .put(&format!("/v1/leases/fill-{i}"), None)
            .await
            .expect("PUT");
        assert_status(&lease, StatusCode::CREATED, "fill");
        assert_ne!(lease.json()["uid_base"].as_u64(), Some(u64::from(second)));
    }
}
