//! A fleet's store going away mid-storm: stopped (connections refused), frozen (SIGSTOP: no
//! answer at all), and daemons SIGKILLed meanwhile. Writes answer 503 `store_unavailable`
//! within the deadline, reads and spawns of known leases go on, writes work again once the
//! store is back, and no acknowledged lease is lost or moved.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use hyper::{Method, StatusCode};
use subidd_tests::pg::PgCluster;
use subidd_tests::{Client, Daemon};

use crate::fleet::{Fleet, STORE_TIMEOUT_MS, fleet_config};
use crate::util::{assert_error, assert_status};

/// The longest a lease write may take to be refused in an outage: the deadline of the group
/// in progress and of its own (`Store::write_deadline`), with a second of slack for this
/// shared, busy machine.
fn bound() -> Duration {
    Duration::from_millis(2 * STORE_TIMEOUT_MS + 1000 + 1000)
}

/// What one storm request came to.
#[derive(Debug)]
struct Answer {
    name: String,
    status: Option<StatusCode>,
    code: String,
    base: Option<u64>,
    took: Duration,
}

/// Clients creating leases on `client` until `stop`.
fn storm(
    client: Client,
    prefix: String,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<Vec<Answer>> {
    tokio::spawn(async move {
        let mut answers = Vec::new();
        let mut i = 0;
        while !stop.load(Ordering::Relaxed) {
            let name = format!("{prefix}-{i}");
            i += 1;
            let started = Instant::now();
            let reply = client.put(&format!("/v1/leases/{name}"), None).await;
            let took = started.elapsed();
            let answer = match reply {
                Ok(r) => Answer {
                    name,
                    status: Some(r.status),
                    code: if r.status.is_success() {
                        String::new()
                    } else {
                        r.code()
                    },
                    base: r
                        .status
                        .is_success()
                        .then(|| r.json()["uid_base"].as_u64())
                        .flatten(),
                    took,
                },
                // The daemon was killed under it.
                Err(_) => Answer {
                    name,
                    status: None,
                    code: String::new(),
                    base: None,
                    took,
                },
            };
            answers.push(answer);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        answers
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(not(subidd_postgres), ignore = "PostgreSQL is not installed")]
#[cfg_attr(not(subidd_root), ignore = "needs root")]
async fn a_store_outage_mid_storm_loses_nothing_acknowledged() {
    let cluster = Arc::new(PgCluster::start().expect("a cluster of its own"));
    let mut fleet = Fleet::start(Arc::clone(&cluster), 4, 1024, "kill_grace_ms = 500");
    let (a, b) = (fleet.client(0), fleet.client(1));
    // A lease a knows, with a process running there.
    let known = a.put("/v1/leases/known", None).await.expect("PUT known");
    assert_status(&known, StatusCode::CREATED, "PUT known");
    let running = a
        .post(
            "/v1/leases/known/processes",
            Some(r#"{"argv":["/bin/sleep","600"]}"#),
        )
        .await
        .expect("spawn");
    assert_status(&running, StatusCode::CREATED, "spawn in known");

    let stop = Arc::new(AtomicBool::new(false));
    let mut storms = Vec::new();
    for host in 0..3 {
        for c in 0..4 {
            storms.push(storm(
                fleet.client(host),
                format!("s{host}-{c}"),
                Arc::clone(&stop),
            ));
        }
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // c is SIGKILLed mid-storm and started again.
    fleet.daemons[2].kill();
    tokio::time::sleep(Duration::from_millis(300)).await;
    fleet.daemons[2].spawn().expect("c starts again");
    tokio::time::sleep(Duration::from_millis(700)).await;

    // The store goes away.
    cluster.stop().expect("stop PostgreSQL");
    let outage = Instant::now();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let refused = b.put("/v1/leases/during-outage", None).await.expect("PUT");
    assert_error(
        &refused,
        StatusCode::SERVICE_UNAVAILABLE,
        "store_unavailable",
        "PUT while the store is down",
    );
    for (i, client) in [&a, &b].iter().enumerate() {
        let ping = client.get("/_ping").await.expect("ping");
        assert_status(&ping, StatusCode::OK, &format!("/_ping on host {i}"));
    }
    let read = a.get("/v1/leases/known").await.expect("GET known");
    assert_status(&read, StatusCode::OK, "GET of a known lease in the outage");
    assert_eq!(read.json()["state"], "active");
    let spawned = a
        .post(
            "/v1/leases/known/processes?wait=true",
            Some(r#"{"argv":["/bin/sh","-c","exit 3"]}"#),
        )
        .await
        .expect("spawn");
    assert_status(
        &spawned,
        StatusCode::CREATED,
        "spawn into a known lease in the outage",
    );
    assert_eq!(spawned.json()["exit_code"], 3);
    let metrics = a.get("/metrics").await.expect("metrics").text();
    assert!(
        metrics.contains("subidd_store_up{backend=\"postgresql\"} 0"),
        "{metrics}"
    );
    assert!(
        fleet.daemons[0]
            .log_text()
            .contains("the lease store cannot be reached"),
        "the log says the store is down"
    );
    tokio::time::sleep(Duration::from_millis(2000)).await;

    // Back: writes work again without restarting any daemon.
    cluster.restart().expect("restart PostgreSQL");
    let back = Instant::now();
    for (i, client) in [&a, &b, &fleet.client(2)].iter().enumerate() {
        loop {
            let reply = client
                .put(&format!("/v1/leases/after-{i}"), None)
                .await
                .expect("PUT after");
            if reply.status == StatusCode::CREATED {
                break;
            }
            assert!(
                back.elapsed() < Duration::from_secs(30),
                "host {i} still refuses writes: {}",
                reply.text()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    eprintln!(
        "outage {:?}; writes back on every host {:?} after the store",
        back - outage,
        back.elapsed()
    );
    stop.store(true, Ordering::Relaxed);
    let mut answers = Vec::new();
    for task in storms {
        answers.extend(task.await.expect("storm task"));
    }
    let acked: BTreeMap<String, u64> = answers
        .iter()
        .filter(|a| a.status == Some(StatusCode::CREATED))
        .map(|a| (a.name.clone(), a.base.expect("a created lease has a base")))
        .collect();
    let refusals: Vec<&Answer> = answers
        .iter()
        .filter(|a| a.status.is_some_and(|s| s.is_server_error()))
        .collect();
    assert!(!refusals.is_empty(), "the storm met the outage");
    for r in &refusals {
        assert_eq!(r.code, "store_unavailable", "{r:?}");
        assert!(
            r.took <= bound(),
            "a refusal took {:?} (> {:?}): {r:?}",
            r.took,
            bound()
        );
    }
    assert!(
        answers.iter().all(|a| a
            .status
            .is_none_or(|s| s == StatusCode::CREATED || s.is_server_error())),
        "only created or refused: {:?}",
        answers.iter().filter_map(|a| a.status).collect::<Vec<_>>()
    );
    let slowest = refusals.iter().map(|r| r.took).max().unwrap_or_default();
    eprintln!(
        "storm: {} created, {} refused with 503 (slowest {slowest:?}), {} cut by the SIGKILL",
        acked.len(),
        refusals.len(),
        answers.iter().filter(|a| a.status.is_none()).count()
    );
    // Nothing acknowledged is lost or moved.
    let stored: BTreeMap<String, u64> = fleet
        .sql("SELECT name || ' ' || uid_base FROM lease WHERE state = 'active' AND name LIKE 's%'")
        .lines()
        .filter_map(|l| {
            let (name, base) = l.split_once(' ')?;
            Some((name.to_string(), base.parse().ok()?))
        })
        .collect();
    for (name, base) in &acked {
        assert_eq!(
            stored.get(name),
            Some(base),
            "acknowledged lease {name} lost or moved"
        );
    }
    assert_eq!(
        fleet.sql(
            "SELECT COUNT(*) FROM lease x JOIN lease y ON x.id < y.id AND x.state = 'active' \
             AND y.state = 'active' AND int8range(x.uid_base, x.uid_base + x.size) \
             && int8range(y.uid_base, y.uid_base + y.size)"
        ),
        "0"
    );
    // The process events of the outage reach the fleet's feed once the store is back.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let exits = fleet
            .sql("SELECT COUNT(*) FROM event WHERE lease_name = 'known' AND kind = 'process_exit'");
        if exits == "1" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "process exit never forwarded: {exits}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let _ = fleet.client(0).delete("/v1/leases/known?force=true").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(subidd_postgres), ignore = "PostgreSQL is not installed")]
async fn a_frozen_store_gets_writes_refused_within_the_deadline() {
    let cluster = Arc::new(PgCluster::start().expect("a cluster of its own"));
    let url = cluster.create_db("frozen").expect("database");
    let daemon = Daemon::start(&fleet_config(&url, "solo", 5, 16, "")).expect("start");
    let client = daemon.client();
    let lease = client.put("/v1/leases/before", None).await.expect("PUT");
    assert_status(&lease, StatusCode::CREATED, "PUT before");
    cluster.freeze().expect("SIGSTOP the server");
    for name in ["frozen-1", "frozen-2"] {
        let started = Instant::now();
        let reply = client
            .request(Method::PUT, &format!("/v1/leases/{name}"), None)
            .await
            .expect("PUT");
        let took = started.elapsed();
        assert_error(
            &reply,
            StatusCode::SERVICE_UNAVAILABLE,
            "store_unavailable",
            "PUT while the server answers nothing",
        );
        assert!(
            took <= bound(),
            "{name}: refused after {took:?} (> {:?})",
            bound()
        );
        eprintln!("{name}: 503 after {took:?}");
    }
    // A read of a known lease is answered from the host's own copy.
    let read = client.get("/v1/leases/before").await.expect("GET");
    assert_status(&read, StatusCode::OK, "GET of a known lease while frozen");
    cluster.thaw();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let reply = client.put("/v1/leases/thawed", None).await.expect("PUT");
        if reply.status == StatusCode::CREATED {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "writes never came back: {}",
            reply.text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let names = cluster
        .psql(
            url.rsplit('/').next().expect("db"),
            "SELECT string_agg(name, ',' ORDER BY name) FROM lease WHERE state = 'active'",
        )
        .expect("psql");
    assert!(
        names.contains("before") && names.contains("thawed"),
        "{names}"
    );
}
