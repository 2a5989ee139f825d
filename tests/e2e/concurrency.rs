//! Many clients at once: disjoint ranges, clean exhaustion, one lease per name, and a database
//! that holds exactly what was answered.

use std::collections::{BTreeMap, BTreeSet};

use hyper::StatusCode;
use sqlx::ConnectOptions;
use sqlx::sqlite::SqliteConnectOptions;
use subidd_tests::{Client, Daemon, Reply};
use tokio::task::JoinSet;

use crate::util::{
    BASE, BLOCK, assert_disjoint_within, ensure_open_files, pool_config, pool_counts, range_of,
};

/// Sends `PUT /v1/leases/<name>` for every name at once; answers in the order of `names`.
async fn put_all_at_once(client: &Client, names: &[String], body: Option<&str>) -> Vec<Reply> {
    let mut set = JoinSet::new();
    for (i, name) in names.iter().enumerate() {
        let client = client.clone();
        let path = format!("/v1/leases/{name}");
        let body = body.map(str::to_string);
        set.spawn(async move { (i, client.put(&path, body.as_deref()).await) });
    }
    let mut replies: Vec<Option<Reply>> = vec![None; names.len()];
    while let Some(joined) = set.join_next().await {
        let (i, reply) = joined.expect("client task panicked");
        let reply = reply.unwrap_or_else(|e| panic!("PUT {}: transport error {e:#}", names[i]));
        replies[i] = Some(reply);
    }
    replies
        .into_iter()
        .map(|r| r.expect("every client answered"))
        .collect()
}

/// Block starts of active leases in the database, by lease name, read with a read-only
/// connection of its own.
async fn held_blocks(daemon: &Daemon) -> Vec<(i64, String)> {
    let mut conn = SqliteConnectOptions::new()
        .filename(daemon.database())
        .read_only(true)
        .connect()
        .await
        .expect("open the daemon's database read-only");
    sqlx::query_as::<_, (i64, String)>(
        "SELECT block.start, lease.name FROM block JOIN lease ON lease.id = block.lease_id \
         WHERE block.lease_id IS NOT NULL ORDER BY block.start",
    )
    .fetch_all(&mut conn)
    .await
    .expect("query block rows")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn thousands_of_concurrent_puts_get_disjoint_ranges_then_pool_exhausted() {
    const BLOCKS: u32 = 1000;
    // 2,000 connections at once on each side, plus what the runtime itself holds.
    ensure_open_files(4096);
    let daemon = Daemon::start(&pool_config(BLOCKS, 86_400)).expect("start daemon");
    let client = daemon.client();
    let pool_end = u64::from(BASE) + u64::from(BLOCKS) * u64::from(BLOCK);

    // 500 distinct names at once: every one gets its own range.
    let first: Vec<String> = (0..500).map(|i| format!("first-{i}")).collect();
    let replies = put_all_at_once(&client, &first, None).await;
    let mut answered: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for (name, reply) in first.iter().zip(&replies) {
        assert_eq!(
            reply.status,
            StatusCode::CREATED,
            "PUT {name} among 500 at once: {}",
            reply.text()
        );
        let lease = reply.json();
        assert_eq!(lease["name"], name.as_str(), "answer names its lease");
        answered.insert(name.clone(), range_of(&lease));
    }
    let ranges: Vec<(u64, u64)> = answered.values().copied().collect();
    assert_disjoint_within(&ranges, u64::from(BASE), pool_end);
    let (active, quarantined, free) = pool_counts(&client).await;
    assert_eq!(
        (active, quarantined, free),
        (500, 0, 500),
        "pool counts after 500 leases"
    );

    // 2,000 more at once against the 500 free blocks: exactly 500 win, the rest are told the
    // pool is exhausted, and nobody gets a 5xx.
    let second: Vec<String> = (0..2000).map(|i| format!("second-{i}")).collect();
    let replies = put_all_at_once(&client, &second, None).await;
    let mut created = 0;
    let mut exhausted = 0;
    for (name, reply) in second.iter().zip(&replies) {
        assert!(
            !reply.status.is_server_error(),
            "PUT {name}: server error {} {}",
            reply.status,
            reply.text()
        );
        match reply.status {
            StatusCode::CREATED => {
                created += 1;
                answered.insert(name.clone(), range_of(&reply.json()));
            }
            StatusCode::CONFLICT => {
                assert_eq!(
                    reply.code(),
                    "pool_exhausted",
                    "PUT {name}: {}",
                    reply.text()
                );
                exhausted += 1;
            }
            other => panic!("PUT {name}: unexpected {other} {}", reply.text()),
        }
    }
    assert_eq!(
        created, free,
        "as many 201s as there were free blocks ({exhausted} pool_exhausted)"
    );
    assert_eq!(created + exhausted, 2000, "every client answered");
    let ranges: Vec<(u64, u64)> = answered.values().copied().collect();
    assert_eq!(ranges.len(), BLOCKS as usize, "one lease per block");
    assert_disjoint_within(&ranges, u64::from(BASE), pool_end);
    assert_eq!(
        pool_counts(&client).await,
        (u64::from(BLOCKS), 0, 0),
        "pool full"
    );

    // The database holds exactly the answered leases, one row per block.
    let rows = held_blocks(&daemon).await;
    let starts: BTreeSet<i64> = rows.iter().map(|(s, _)| *s).collect();
    assert_eq!(
        starts.len(),
        rows.len(),
        "duplicate block starts in the database"
    );
    let in_db: BTreeMap<String, u64> = rows
        .iter()
        .map(|(start, name)| (name.clone(), u64::try_from(*start).expect("start >= 0")))
        .collect();
    assert_eq!(in_db.len(), rows.len(), "a one-block lease holds one row");
    let answered_starts: BTreeMap<String, u64> = answered
        .iter()
        .map(|(name, (base, _))| (name.clone(), *base))
        .collect();
    assert_eq!(
        in_db, answered_starts,
        "held blocks in the database equal the 201 answers"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_name_from_fifty_clients_at_once_is_one_lease() {
    let daemon = Daemon::start("").expect("start daemon");
    let client = daemon.client();
    let names = vec!["shared".to_string(); 50];
    let replies = put_all_at_once(&client, &names, Some(r#"{"labels":{"k":"v"}}"#)).await;
    let statuses: Vec<StatusCode> = replies.iter().map(|r| r.status).collect();
    let created = statuses
        .iter()
        .filter(|s| **s == StatusCode::CREATED)
        .count();
    let ok = statuses.iter().filter(|s| **s == StatusCode::OK).count();
    assert_eq!(
        (created, ok),
        (1, 49),
        "one 201 and 49 200s for one name: {statuses:?}"
    );
    let ranges: BTreeSet<(u64, u64)> = replies.iter().map(|r| range_of(&r.json())).collect();
    assert_eq!(
        ranges.len(),
        1,
        "every answer names the same range: {ranges:?}"
    );
    assert_eq!(pool_counts(&client).await.0, 1, "one block active");
    let list = client
        .get("/v1/leases?state=all")
        .await
        .expect("list")
        .json();
    assert_eq!(
        list["leases"].as_array().map(Vec::len),
        Some(1),
        "one lease row: {list}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_name_posted_by_fifty_clients_at_once_is_created_once() {
    let daemon = Daemon::start("").expect("start daemon");
    let client = daemon.client();
    let mut set = JoinSet::new();
    for _ in 0..50 {
        let client = client.clone();
        set.spawn(async move {
            client
                .post("/v1/leases", Some(r#"{"name":"posted"}"#))
                .await
                .expect("POST")
        });
    }
    let mut created = 0;
    let mut exists = 0;
    while let Some(reply) = set.join_next().await {
        let reply = reply.expect("client task");
        match (reply.status, reply.code().as_str()) {
            (StatusCode::CREATED, _) => created += 1,
            (StatusCode::CONFLICT, "lease_exists") => exists += 1,
            (status, _) => panic!("POST posted: unexpected {status} {}", reply.text()),
        }
    }
    assert_eq!((created, exists), (1, 49), "one 201, 49 lease_exists");
    assert_eq!(pool_counts(&client).await.0, 1, "one block active");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn live_state_after_mixed_concurrent_operations_matches_a_restart() {
    const BLOCKS: u32 = 64;
    let mut daemon = Daemon::start(&pool_config(BLOCKS, 3600)).expect("start daemon");
    let client = daemon.client();
    // Rounds of creates, releases, purges and renews on overlapping names, all at once.
    for round in 0..4 {
        let mut set = JoinSet::new();
        for i in 0..120u32 {
            let client = client.clone();
            set.spawn(async move {
                let name = format!("m-{}", (i * 7 + round) % 40);
                let path = format!("/v1/leases/{name}");
                let reply = match (i + round) % 6 {
                    0 | 1 => client.put(&path, None).await,
                    2 => client.put(&path, Some(r#"{"size":131072}"#)).await,
                    3 => client.delete(&path).await,
                    4 => client.delete(&format!("{path}?purge=true")).await,
                    _ => client.post(&format!("{path}/renew"), None).await,
                };
                (path, reply.expect("request"))
            });
        }
        while let Some(joined) = set.join_next().await {
            let (path, reply) = joined.expect("client task");
            assert!(
                !reply.status.is_server_error(),
                "{path}: {} {}",
                reply.status,
                reply.text()
            );
        }
    }
    let pool_end = u64::from(BASE) + u64::from(BLOCKS) * u64::from(BLOCK);
    let active = client.get("/v1/leases").await.expect("list").json();
    let ranges: Vec<(u64, u64)> = active["leases"]
        .as_array()
        .expect("leases")
        .iter()
        .map(range_of)
        .collect();
    assert_disjoint_within(&ranges, u64::from(BASE), pool_end);
    let live_pool = client.get("/v1/pool").await.expect("pool").json();
    let live_all = client
        .get("/v1/leases?state=all")
        .await
        .expect("list")
        .json();
    let held: u64 = ranges.iter().map(|(_, size)| size / u64::from(BLOCK)).sum();
    assert_eq!(
        live_pool["blocks"]["active"], held,
        "active block count equals the blocks the active leases hold"
    );

    daemon.restart().expect("restart");
    let client = daemon.client();
    assert_eq!(
        client.get("/v1/pool").await.expect("pool").json(),
        live_pool,
        "pool counts the daemon served equal those rebuilt from the database"
    );
    assert_eq!(
        client
            .get("/v1/leases?state=all")
            .await
            .expect("list")
            .json(),
        live_all,
        "leases the daemon served equal those in the database"
    );
}
