//! Crash loop: clients allocate and release while the daemon is SIGKILLed again and again;
//! every acknowledged lease survives with its range and no block has two holders.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hyper::StatusCode;
use sqlx::ConnectOptions;
use sqlx::sqlite::SqliteConnectOptions;
use subidd_tests::{Client, Daemon, Reply};
use tokio::sync::Mutex;

use crate::util::{BASE, BLOCK, assert_disjoint_within, pool_config, range_of};

const CLIENTS: usize = 16;
const KILLS: usize = 24;
const POOL_BLOCKS: u32 = 4000;

/// What clients were told, by lease name.
#[derive(Default)]
struct Told {
    /// Acknowledged creates (2xx) with the range answered.
    created: BTreeMap<String, (u64, u64)>,
    /// Names whose release was acknowledged (204, or 404 after an unanswered delete).
    released: BTreeMap<String, ()>,
}

/// A small xorshift generator: the test needs spread, not quality.
struct Rng(u64);

impl Rng {
    fn seeded(salt: u64) -> Rng {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| u64::from(d.subsec_nanos()))
            .unwrap_or(1);
        Rng((nanos ^ salt.wrapping_mul(0x9E37_79B9_7F4A_7C15)) | 1)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// Sends one request; a transport error (daemon down) or a 5xx is `None`: the outcome is
/// unknown. A 5xx other than 503 fails the test.
async fn try_request(
    client: &Client,
    method: hyper::Method,
    path: &str,
    body: Option<&str>,
) -> Option<Reply> {
    let reply = client.request(method, path, body).await.ok()?;
    if reply.status.is_server_error() {
        assert_eq!(
            reply.status,
            StatusCode::SERVICE_UNAVAILABLE,
            "{path}: {}",
            reply.text()
        );
        return None;
    }
    Some(reply)
}

/// Creates `name` (POST first, then PUT until answered) and returns the acknowledged range.
async fn create(client: &Client, name: &str, body: &str, rng: &mut Rng) -> (u64, u64) {
    let mut first = true;
    loop {
        let reply = if first && rng.below(2) == 0 {
            let post = format!(r#"{{"name":"{name}",{}"#, &body[1..]);
            try_request(client, hyper::Method::POST, "/v1/leases", Some(&post)).await
        } else {
            let path = format!("/v1/leases/{name}");
            try_request(client, hyper::Method::PUT, &path, Some(body)).await
        };
        first = false;
        match reply {
            Some(r) if r.status.is_success() => return range_of(&r.json()),
            Some(r) => panic!("create {name}: {} {}", r.status, r.text()),
            None => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    }
}

/// Releases `name` until the daemon says it is gone (204, or 404 when an unanswered delete
/// went through).
async fn release(client: &Client, name: &str, purge: bool) {
    let path = format!("/v1/leases/{name}?purge={purge}");
    loop {
        match try_request(client, hyper::Method::DELETE, &path, None).await {
            Some(r) if r.status == StatusCode::NO_CONTENT || r.status == StatusCode::NOT_FOUND => {
                return;
            }
            Some(r) => panic!("release {name}: {} {}", r.status, r.text()),
            None => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    }
}

async fn client_loop(
    id: usize,
    client: Client,
    told: Arc<Mutex<Told>>,
    stop: Arc<AtomicBool>,
    ops: Arc<AtomicU64>,
) {
    let mut rng = Rng::seeded(id as u64 + 1);
    let mut n = 0;
    while !stop.load(Ordering::Relaxed) {
        let name = format!("c{id}-{n}");
        n += 1;
        let body = if rng.below(4) == 0 {
            r#"{"size":131072}"#
        } else {
            r#"{"labels":{"t":"crash"}}"#
        };
        let range = create(&client, &name, body, &mut rng).await;
        told.lock().await.created.insert(name.clone(), range);
        ops.fetch_add(1, Ordering::Relaxed);
        // Two of three leases are released again (some purged at once, so their blocks come
        // straight back); the rest stay to the end.
        if rng.below(3) != 0 {
            release(&client, &name, rng.below(2) == 0).await;
            told.lock().await.released.insert(name, ());
            ops.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// `(start, lease name, lease uid_base, lease size)` of every held block in the database.
async fn held_blocks(daemon: &Daemon) -> Vec<(i64, String, i64, i64)> {
    let mut conn = SqliteConnectOptions::new()
        .filename(daemon.database())
        .read_only(true)
        .connect()
        .await
        .expect("open the daemon's database read-only");
    sqlx::query_as::<_, (i64, String, i64, i64)>(
        "SELECT block.start, lease.name, lease.uid_base, lease.size FROM block \
         JOIN lease ON lease.id = block.lease_id WHERE block.lease_id IS NOT NULL \
         ORDER BY block.start",
    )
    .fetch_all(&mut conn)
    .await
    .expect("query block rows")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn acknowledged_leases_survive_repeated_sigkill() {
    let started = Instant::now();
    let mut daemon = Daemon::start(&pool_config(POOL_BLOCKS, 0)).expect("start daemon");
    let client = daemon.client();
    let told = Arc::new(Mutex::new(Told::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let ops = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for id in 0..CLIENTS {
        tasks.push(tokio::spawn(client_loop(
            id,
            client.clone(),
            Arc::clone(&told),
            Arc::clone(&stop),
            Arc::clone(&ops),
        )));
    }
    let mut rng = Rng::seeded(0xC0FFEE);
    for _ in 0..KILLS {
        // Let some work through first, then kill at a random moment.
        let before = ops.load(Ordering::Relaxed);
        let deadline = Instant::now() + Duration::from_secs(5);
        while ops.load(Ordering::Relaxed) < before + 5 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        tokio::time::sleep(Duration::from_millis(rng.below(300))).await;
        daemon.kill();
        tokio::task::block_in_place(|| daemon.spawn()).expect("restart after SIGKILL");
    }
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        task.await.expect("client task");
    }
    // One last crash with nothing in flight, then check everything against a fresh start.
    daemon.kill();
    tokio::task::block_in_place(|| daemon.spawn()).expect("final restart");
    let told = told.lock().await;
    let mut verified = 0;
    let mut active_ranges = Vec::new();
    for (name, range) in &told.created {
        let reply = client
            .get(&format!("/v1/leases/{name}"))
            .await
            .expect("GET lease");
        assert_eq!(
            reply.status,
            StatusCode::OK,
            "acknowledged {name}: {}",
            reply.text()
        );
        let lease = reply.json();
        assert_eq!(
            range_of(&lease),
            *range,
            "{name} kept its acknowledged range: {lease}"
        );
        let expected = if told.released.contains_key(name) {
            "released"
        } else {
            active_ranges.push(*range);
            "active"
        };
        assert_eq!(lease["state"], expected, "{name}: {lease}");
        verified += 1;
    }
    assert_disjoint_within(
        &active_ranges,
        u64::from(BASE),
        u64::from(BASE) + u64::from(POOL_BLOCKS) * u64::from(BLOCK),
    );
    // The database itself: every held block lies inside its lease, and each active lease holds
    // exactly its own blocks (the primary key on block.start rules out two holders).
    let blocks = held_blocks(&daemon).await;
    let mut per_lease: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    for (start, name, base, size) in &blocks {
        assert!(
            *start >= *base && *start < base + size,
            "block {start} held by {name} lies outside its range {base}+{size}"
        );
        per_lease.entry(name.clone()).or_default().push(*start);
    }
    let listed = client.get("/v1/leases").await.expect("list").json();
    let active = listed["leases"].as_array().expect("leases array");
    for lease in active {
        let name = lease["name"].as_str().expect("name");
        let (base, size) = range_of(lease);
        let expected: Vec<i64> = (0..size / u64::from(BLOCK))
            .map(|i| i64::try_from(base + i * u64::from(BLOCK)).expect("i64"))
            .collect();
        assert_eq!(
            per_lease.get(name),
            Some(&expected),
            "{name}'s block rows match its range"
        );
    }
    assert_eq!(
        per_lease.len(),
        active.len(),
        "no block is held by a lease that is not active"
    );
    let ranges: Vec<(u64, u64)> = active.iter().map(range_of).collect();
    assert_disjoint_within(
        &ranges,
        u64::from(BASE),
        u64::from(BASE) + u64::from(POOL_BLOCKS) * u64::from(BLOCK),
    );
    println!(
        "crash loop: {KILLS} SIGKILL cycles (+1 final), {CLIENTS} clients, {} acknowledged creates, \
         {} acknowledged releases, {verified} leases verified, {} active at the end, {} held blocks, \
         {:.1} s",
        told.created.len(),
        told.released.len(),
        active.len(),
        blocks.len(),
        started.elapsed().as_secs_f64()
    );
    assert!(
        told.created.len() >= KILLS * 5,
        "enough work was acknowledged between the kills"
    );
}
