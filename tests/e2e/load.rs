//! Load: 10,000 mixed requests (allocate, get, spawn, release) from 256 concurrent clients;
//! `/_ping` answers throughout, nothing is a 5xx but 503, and memory and fds stay bounded.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use hyper::{Method, StatusCode};
use subidd_tests::{Client, Daemon, rss_kib};
use tokio::sync::Mutex;

use crate::util::{BASE, BLOCK, ensure_open_files};

const CLIENTS: usize = 256;
const REQUESTS: usize = 10_000;
/// Blocks 3500..4012 of the default range: a pool of its own, so the uids its processes run
/// as are not shared with tests running at the same time.
const POOL_FIRST_BLOCK: u32 = 3500;
const POOL_BLOCKS: u32 = 512;

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Status counts of every answer, by status code.
type Tally = Arc<Mutex<BTreeMap<u16, usize>>>;

/// Sends one request, counting it; `None` for a transport error (counted as 0).
async fn send(
    client: &Client,
    tally: &Tally,
    sent: &AtomicUsize,
    method: Method,
    path: &str,
    body: Option<&str>,
) -> Option<subidd_tests::Reply> {
    sent.fetch_add(1, Ordering::Relaxed);
    let reply = client.request(method, path, body).await.ok();
    let code = reply.as_ref().map_or(0, |r| r.status.as_u16());
    *tally.lock().await.entry(code).or_default() += 1;
    if let Some(r) = &reply {
        assert!(
            !r.status.is_server_error() || r.status == StatusCode::SERVICE_UNAVAILABLE,
            "{path}: {} {}",
            r.status,
            r.text()
        );
    }
    reply
}

/// One client: lease, read it, spawn /bin/true in it, read the process, release; until the
/// shared request budget is spent.
async fn client_loop(id: usize, client: Client, tally: Tally, sent: Arc<AtomicUsize>) {
    let mut n = 0;
    while sent.load(Ordering::Relaxed) < REQUESTS {
        let name = format!("l{id}-{n}");
        n += 1;
        let path = format!("/v1/leases/{name}");
        let created = send(&client, &tally, &sent, Method::PUT, &path, None).await;
        if !created.is_some_and(|r| r.status.is_success()) {
            continue;
        }
        send(&client, &tally, &sent, Method::GET, &path, None).await;
        let spawned = send(
            &client,
            &tally,
            &sent,
            Method::POST,
            &format!("{path}/processes"),
            Some(r#"{"argv":["/bin/true"]}"#),
        )
        .await;
        if let Some(reply) = spawned.filter(|r| r.status == StatusCode::CREATED) {
            let pid = reply.json()["id"].as_str().unwrap_or_default().to_string();
            send(
                &client,
                &tally,
                &sent,
                Method::GET,
                &format!("/v1/processes/{pid}"),
                None,
            )
            .await;
        }
        send(
            &client,
            &tally,
            &sent,
            Method::DELETE,
            &format!("{path}?force=true&purge=true"),
            None,
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(not(subidd_root), ignore = "needs root")]
async fn ten_thousand_mixed_requests_from_256_clients_stay_bounded() {
    ensure_open_files(4096);
    let config = format!(
        "kill_grace_ms = 1000\n[pool]\nbase = {}\nsize = {}\nblock = {BLOCK}\n",
        BASE + POOL_FIRST_BLOCK * BLOCK,
        POOL_BLOCKS * BLOCK
    );
    let daemon = Daemon::start(&config).expect("start daemon");
    let client = daemon.client();
    let pid = daemon.pid().expect("daemon pid");
    // Warm up once (first spawn, reader connections), then take the baseline.
    let warm = client.put("/v1/leases/warm", None).await.expect("PUT");
    assert!(warm.status.is_success(), "{}", warm.text());
    let spawned = client
        .post(
            "/v1/leases/warm/processes?wait=true",
            Some(r#"{"argv":["/bin/true"]}"#),
        )
        .await
        .expect("spawn");
    assert_eq!(spawned.status, StatusCode::CREATED, "{}", spawned.text());
    let gone = client
        .delete("/v1/leases/warm?force=true&purge=true")
        .await
        .expect("DELETE");
    assert_eq!(gone.status, StatusCode::NO_CONTENT, "{}", gone.text());
    let (fds_before, rss_before) = (open_fds(pid), rss_kib(pid).expect("rss"));

    let stop = Arc::new(AtomicBool::new(false));
    let pinger = {
        let client = client.clone();
        let stop = Arc::clone(&stop);
        tokio::spawn(async move {
            let mut worst = Duration::ZERO;
            let mut pings = 0usize;
            let mut failed = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let started = Instant::now();
                match client.get("/_ping").await {
                    Ok(r) if r.status == StatusCode::OK => {}
                    Ok(r) => failed.push(format!("{} {}", r.status, r.text())),
                    Err(e) => failed.push(format!("{e:#}")),
                }
                worst = worst.max(started.elapsed());
                pings += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            (pings, worst, failed)
        })
    };

    let started = Instant::now();
    let tally: Tally = Arc::default();
    let sent = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for id in 0..CLIENTS {
        tasks.push(tokio::spawn(client_loop(
            id,
            client.clone(),
            Arc::clone(&tally),
            Arc::clone(&sent),
        )));
    }
    for task in tasks {
        task.await.expect("client task");
    }
    let elapsed = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    let (pings, worst_ping, failed_pings) = pinger.await.expect("pinger");

    // Let the supervisors record the last exits and drop what they held.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (fds_after, rss_after) = (open_fds(pid), rss_kib(pid).expect("rss"));
    let tally = tally.lock().await.clone();
    let total: usize = tally.values().sum();
    println!(
        "load: {total} requests from {CLIENTS} clients in {:.1} s ({:.0}/s); statuses {tally:?}; \
         {pings} pings, max ping latency {} ms; daemon fds {fds_before} -> {fds_after}, \
         RSS {} -> {} MiB",
        elapsed.as_secs_f64(),
        total as f64 / elapsed.as_secs_f64(),
        worst_ping.as_millis(),
        rss_before / 1024,
        rss_after / 1024,
    );
    assert!(total >= REQUESTS, "{total} requests sent");
    assert!(
        failed_pings.is_empty(),
        "/_ping failed during the load: {failed_pings:?}"
    );
    assert!(pings >= 10, "the pinger ran throughout ({pings} pings)");
    assert!(
        worst_ping < Duration::from_secs(5),
        "/_ping answered within 5 s throughout: worst {worst_ping:?}"
    );
    assert_eq!(
        tally.get(&0),
        None,
        "no request failed at the transport level"
    );
    for code in tally.keys() {
        assert!(
            (200..300).contains(code) || (400..500).contains(code) || *code == 503,
            "every answer is 2xx, 4xx or 503: {tally:?}"
        );
    }
    assert!(
        fds_after <= fds_before + 16,
        "daemon fds back near the baseline: {fds_before} -> {fds_after}"
    );
    assert!(
        rss_after < 256 * 1024,
        "daemon RSS stays under 256 MiB: {rss_after} KiB"
    );
    let left = crate::util::list_names(&client, "/v1/leases").await;
    assert!(left.is_empty(), "every lease was released: {left:?}");
}
