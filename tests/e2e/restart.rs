//! Durability: leases survive a clean restart and a SIGKILL; SIGTERM exits cleanly.

use std::collections::BTreeMap;

use hyper::StatusCode;
use subidd_tests::Daemon;
use tokio::sync::mpsc;

use crate::util::{BASE, BLOCK, assert_disjoint_within, assert_status, pool_config, range_of};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leases_keep_their_ranges_across_a_restart() {
    let mut daemon = Daemon::start("").expect("start daemon");
    let client = daemon.client();
    let mut before = BTreeMap::new();
    for (name, body) in [
        ("r-1", None),
        ("r-2", Some(r#"{"size":131072,"labels":{"k":"v"}}"#)),
        ("r-3", Some(r#"{"ttl_seconds":3600}"#)),
        ("r-4", None),
    ] {
        let reply = client
            .put(&format!("/v1/leases/{name}"), body)
            .await
            .expect("PUT");
        assert_status(&reply, StatusCode::CREATED, &format!("PUT {name}"));
        before.insert(name.to_string(), reply.json());
    }
    let deleted = client.delete("/v1/leases/r-4").await.expect("DELETE");
    assert_status(&deleted, StatusCode::NO_CONTENT, "DELETE r-4");
    let pool_before = client.get("/v1/pool").await.expect("pool").json();

    daemon.restart().expect("restart");
    let client = daemon.client();

    for name in ["r-1", "r-2", "r-3"] {
        let reply = client
            .get(&format!("/v1/leases/{name}"))
            .await
            .expect("GET");
        assert_status(&reply, StatusCode::OK, &format!("GET {name} after restart"));
        assert_eq!(
            reply.json(),
            before[name],
            "{name} unchanged by the restart"
        );
    }
    let r4 = client.get("/v1/leases/r-4").await.expect("GET").json();
    assert_eq!(r4["state"], "released", "r-4 stays released: {r4}");
    assert_eq!(
        client.get("/v1/pool").await.expect("pool").json(),
        pool_before,
        "pool counts (with r-4 quarantined) survive the restart"
    );

    let again = client.put("/v1/leases/r-1", None).await.expect("PUT");
    assert_status(
        &again,
        StatusCode::OK,
        "PUT r-1 after restart is idempotent",
    );
    assert_eq!(again.json(), before["r-1"], "same range after restart");

    let fresh = client.put("/v1/leases/r-new", None).await.expect("PUT");
    assert_status(&fresh, StatusCode::CREATED, "new name after restart");
    let mut ranges: Vec<(u64, u64)> = before.values().map(range_of).collect();
    ranges.push(range_of(&fresh.json()));
    assert_disjoint_within(
        &ranges,
        u64::from(BASE),
        u64::from(BASE) + 4094 * u64::from(BLOCK),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_acknowledged_lease_survives_sigkill() {
    const CLIENTS: usize = 300;
    const KILL_AFTER: usize = 60;
    let mut daemon = Daemon::start(&pool_config(1000, 86_400)).expect("start daemon");
    let client = daemon.client();
    let (tx, mut rx) = mpsc::unbounded_channel();
    for i in 0..CLIENTS {
        let client = client.clone();
        let tx = tx.clone();
        tokio::spawn(async move {
            let name = format!("k-{i}");
            let reply = client.put(&format!("/v1/leases/{name}"), None).await;
            let _ = tx.send((name, reply));
        });
    }
    drop(tx);
    // Kill the daemon while requests are still in flight, once some were acknowledged.
    let mut acknowledged = BTreeMap::new();
    let mut killed = false;
    let mut cut_off = 0;
    while let Some((name, reply)) = rx.recv().await {
        if reply.is_err() {
            cut_off += 1;
        }
        if let Ok(reply) = reply {
            assert!(
                !reply.status.is_server_error(),
                "PUT {name}: {} {}",
                reply.status,
                reply.text()
            );
            if reply.status == StatusCode::CREATED {
                acknowledged.insert(name, reply.json());
            }
        }
        if !killed && acknowledged.len() >= KILL_AFTER {
            daemon.kill();
            killed = true;
        }
    }
    assert!(killed, "the daemon was killed mid-way");
    eprintln!(
        "SIGKILL: {} acknowledged, {cut_off} cut off of {CLIENTS}",
        acknowledged.len()
    );
    assert!(
        acknowledged.len() >= KILL_AFTER,
        "some leases were acknowledged"
    );

    daemon.spawn().expect("start again after SIGKILL");
    let client = daemon.client();
    for (name, lease) in &acknowledged {
        let reply = client
            .get(&format!("/v1/leases/{name}"))
            .await
            .expect("GET");
        assert_status(
            &reply,
            StatusCode::OK,
            &format!("acknowledged {name} after SIGKILL"),
        );
        assert_eq!(&reply.json(), lease, "{name} kept its range across SIGKILL");
    }
    let list = client.get("/v1/leases").await.expect("list").json();
    let all = list["leases"].as_array().expect("leases array");
    assert!(
        all.len() >= acknowledged.len(),
        "{} leases listed, {} acknowledged",
        all.len(),
        acknowledged.len()
    );
    let ranges: Vec<(u64, u64)> = all.iter().map(range_of).collect();
    assert_disjoint_within(
        &ranges,
        u64::from(BASE),
        u64::from(BASE) + 1000 * u64::from(BLOCK),
    );
    let fresh = client
        .put("/v1/leases/after-kill", None)
        .await
        .expect("PUT");
    assert_status(&fresh, StatusCode::CREATED, "new lease after SIGKILL");
    let mut with_fresh = ranges;
    with_fresh.push(range_of(&fresh.json()));
    assert_disjoint_within(
        &with_fresh,
        u64::from(BASE),
        u64::from(BASE) + 1000 * u64::from(BLOCK),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_exits_zero_and_removes_the_socket() {
    let mut daemon = Daemon::start("").expect("start daemon");
    let client = daemon.client();
    let reply = client.put("/v1/leases/t", None).await.expect("PUT");
    assert_status(&reply, StatusCode::CREATED, "PUT t");
    assert!(daemon.socket.exists(), "socket exists while serving");
    let code = daemon.stop().expect("stop");
    assert_eq!(
        code,
        Some(0),
        "exit code after SIGTERM; log:\n{}",
        daemon.log_text()
    );
    assert!(
        !daemon.socket.exists(),
        "socket {} removed on shutdown",
        daemon.socket.display()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lease_that_expired_while_stopped_is_released_at_start() {
    let mut daemon =
        Daemon::start("expiry_interval_ms = 100\nquarantine_seconds = 3600\n").expect("start");
    let client = daemon.client();
    let reply = client
        .put("/v1/leases/brief", Some(r#"{"ttl_seconds":1}"#))
        .await
        .expect("PUT");
    assert_status(&reply, StatusCode::CREATED, "PUT brief");
    assert_eq!(daemon.stop().expect("stop"), Some(0), "clean stop");
    // The whole ttl passes while no daemon runs.
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    daemon.spawn().expect("start again");
    let client = daemon.client();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let lease = client.get("/v1/leases/brief").await.expect("GET").json();
        if lease["state"] == "released" {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "brief still {} 5 s after a start past its expiry: {lease}",
            lease["state"]
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(
        crate::util::pool_counts(&client).await,
        (0, 1, 4093),
        "expired lease's block quarantined"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn restart_with_another_block_size_or_a_pool_without_a_lease_is_refused() {
    let mut daemon = Daemon::start(&pool_config(4, 3600)).expect("start daemon");
    let client = daemon.client();
    for name in ["x", "y", "z"] {
        let reply = client
            .put(&format!("/v1/leases/{name}"), None)
            .await
            .expect("PUT");
        assert_status(&reply, StatusCode::CREATED, &format!("PUT {name}"));
    }
    assert_eq!(daemon.stop().expect("stop"), Some(0));
    let original = std::fs::read_to_string(&daemon.config).expect("read config");

    let block_changed = original.replace("block = 65536", "block = 131072");
    assert_ne!(block_changed, original, "config has a block key");
    std::fs::write(&daemon.config, &block_changed).expect("write config");
    let err = daemon.spawn().expect_err("a changed block size is refused");
    let message = format!("{err:#}");
    assert!(
        message.contains("block") && message.contains("65536"),
        "refusal names the block size the database was cut into: {message}"
    );

    // A pool of two blocks no longer holds z (third block).
    let shrunk = original.replace(
        &format!("size = {}", 4 * BLOCK),
        &format!("size = {}", 2 * BLOCK),
    );
    assert_ne!(shrunk, original, "config has a size key");
    std::fs::write(&daemon.config, &shrunk).expect("write config");
    let err = daemon
        .spawn()
        .expect_err("a pool without lease z is refused");
    let message = format!("{err:#}");
    assert!(
        message.contains("lease z") && message.contains("outside"),
        "refusal names the lease left outside the pool: {message}"
    );

    std::fs::write(&daemon.config, &original).expect("restore config");
    daemon.spawn().expect("the original settings start again");
    let z = daemon.client().get("/v1/leases/z").await.expect("GET");
    assert_status(&z, StatusCode::OK, "z survives the refused starts");
    assert_eq!(
        z.json()["uid_base"],
        u64::from(BASE + 2 * BLOCK),
        "z's range"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn second_daemon_on_a_live_socket_is_refused() {
    let daemon = Daemon::start("").expect("start daemon");
    let client = daemon.client();
    let reply = client.put("/v1/leases/first", None).await.expect("PUT");
    assert_status(&reply, StatusCode::CREATED, "PUT first");
    let output = tokio::process::Command::new(subidd_tests::subidd_bin().expect("binary"))
        .arg("--config")
        .arg(&daemon.config)
        .env_remove("SUBIDD_CONFIG")
        .output()
        .await
        .expect("run a second subidd");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success(),
        "second daemon must not start: {stderr}"
    );
    assert!(
        stderr.contains("another"),
        "refusal says another process serves the socket: {stderr}"
    );
    let ping = client.get("/v1/leases/first").await.expect("GET");
    assert_status(&ping, StatusCode::OK, "the first daemon still serves");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unusable_database_is_refused_not_recreated() {
    let mut daemon = Daemon::start("").expect("start daemon");
    let reply = daemon
        .client()
        .put("/v1/leases/kept", None)
        .await
        .expect("PUT");
    assert_status(&reply, StatusCode::CREATED, "PUT kept");
    assert_eq!(daemon.stop().expect("stop"), Some(0), "clean stop");
    let database = daemon.database();
    let garbage = b"this is not an SQLite database, but it must not be thrown away either";
    std::fs::write(&database, garbage).expect("overwrite database");
    for suffix in ["-wal", "-shm"] {
        let side = database.with_file_name(format!("subidd.db{suffix}"));
        if side.exists() {
            std::fs::remove_file(&side).expect("remove WAL side file");
        }
    }
    let err = daemon.spawn().expect_err("a broken database is refused");
    let message = format!("{err:#}");
    assert!(
        message.contains("subidd.db"),
        "refusal names the database file: {message}"
    );
    assert_eq!(
        std::fs::read(&database).expect("read database"),
        garbage,
        "the daemon left the broken file as it was"
    );
}
