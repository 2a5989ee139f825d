//! Lease allocation benchmark: the real daemon over its unix socket, beside floors measured in
//! the same run on the same disk. Writes its table into docs/BENCHMARKS.md.
//!
//! Run: `cargo build --release --bins && cargo bench -p subidd-tests --bench leases`
//! (`SUBIDD_BENCH_NO_WRITE=1` prints without touching the docs).

#[path = "common/store_row.rs"]
mod store_row;

use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use sqlx::Connection;
use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqliteSynchronous};
use subidd_tests::{Client, Daemon, rss_kib};

/// Rounds of the 1-client phase: one floor commit, one `/_ping`, one create by the store in
/// this process and one `PUT` each, taking turns so that every row sees the same disk and CPU
/// over the run.
const ROUNDS: usize = 300;
/// Concurrent clients of the throughput phase.
const CLIENTS: usize = 64;
/// Leases created by the concurrent phase (brings the pool to 4,000 active).
const CONCURRENT_TOTAL: usize = 3_700;
/// Leases created one by one with 4,000 active.
const FULL_SEQ: usize = 90;

fn main() -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()?;
    let report = runtime.block_on(run())?;
    subidd_tests::publish("leases", &report)
}

use subidd_tests::LatencyStats as Stats;

fn stats(samples: Vec<Duration>) -> Stats {
    subidd_tests::latency_stats(samples)
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

async fn run() -> anyhow::Result<String> {
    let mut daemon = Daemon::start("quarantine_seconds = 86400")?;
    let client = daemon.client();
    // 1 client on an empty pool, taking turns with the floors (on the same disk as the
    // daemon's database, in this run).
    let mut floor = CommitFloor::open(&daemon.path("floor.db")).await?;
    let mut store =
        store_row::StoreRow::sqlite(&daemon.path("store-row.db"), 0x1000_0000, 65536).await?;
    let mut conn = client.connect().await?;
    let (mut commits, mut pings, mut empty) = (Vec::new(), Vec::new(), Vec::new());
    let mut stored = Vec::new();
    for i in 0..ROUNDS {
        commits.push(floor.commit(i).await?);
        pings.push(subidd_tests::ping_once(&mut conn).await?);
        stored.push(store.create(i, &format!("s-{i}")).await?);
        empty.push(subidd_tests::put_once(&mut conn, &format!("empty-{i}")).await?);
    }
    drop(conn);
    drop(store);
    let commit = stats(commits);
    let rtt = stats(pings);
    let in_process = stats(stored);
    // 64 clients.
    let started = Instant::now();
    let concurrent = concurrent(&client, CLIENTS, CONCURRENT_TOTAL).await?;
    let elapsed = started.elapsed();
    let rate = CONCURRENT_TOTAL as f64 / elapsed.as_secs_f64();
    // 1 client with 4,000 active.
    let full = subidd_tests::sequential_puts(&client, "full", FULL_SEQ).await?;
    let pool = client.get("/v1/pool").await?.json();
    let active = pool["blocks"]["active"].as_u64().unwrap_or(0);
    ensure!(
        active as usize == ROUNDS + CONCURRENT_TOTAL + FULL_SEQ,
        "pool says {active} active"
    );
    let pid = daemon.pid().context("daemon pid")?;
    let rss_mib = rss_kib(pid)? as f64 / 1024.0;
    daemon.stop()?;

    let empty_s = stats(empty);
    let conc_s = stats(concurrent);
    let full_s = stats(full);
    let ceiling = 1.0 / commit.p50.as_secs_f64();
    let one_client_floor = commit.p50 + rtt.p50;
    let mut out = String::new();
    out.push_str(&format!(
        "Run {} on {} ({} cores), release build, default pool (4,094 blocks).\n\n",
        subidd_tests::run_date(),
        subidd_tests::kernel(),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    ));
    out.push_str("| measurement | p50 | p99 |\n|---|---|---|\n");
    out.push_str(&format!(
        "| floor: one SQLite commit, WAL + synchronous=FULL, same disk | {:.0} us | {:.0} us |\n",
        us(commit.p50),
        us(commit.p99)
    ));
    out.push_str(&format!(
        "| floor: HTTP round trip on the unix socket (`GET /_ping`, keep-alive) | {:.0} us | {:.0} us |\n",
        us(rtt.p50),
        us(rtt.p99)
    ));
    out.push_str(&format!(
        "| the store's transaction in this process (name, insert, commit: the daemon's writer \
         without the daemon) | {:.0} us | {:.0} us |\n",
        us(in_process.p50),
        us(in_process.p99)
    ));
    out.push_str(&format!(
        "| `PUT /v1/leases/{{name}}`, 1 client, pool empty | {:.0} us | {:.0} us |\n",
        us(empty_s.p50),
        us(empty_s.p99)
    ));
    out.push_str(&format!(
        "| `PUT /v1/leases/{{name}}`, {CLIENTS} clients | {:.0} us | {:.0} us |\n",
        us(conc_s.p50),
        us(conc_s.p99)
    ));
    out.push_str(&format!(
        "| `PUT /v1/leases/{{name}}`, 1 client, 4,000 leases active | {:.0} us | {:.0} us |\n\n",
        us(full_s.p50),
        us(full_s.p99)
    ));
    out.push_str("| target | measured | ratio | target met |\n|---|---|---|---|\n");
    // `ok`: whether the target is met; None for a figure reported only.
    let row = |out: &mut String, name: &str, measured: String, ratio: f64, ok: Option<bool>| {
        let met = match ok {
            Some(true) => "yes",
            Some(false) => "no",
            None => "-",
        };
        out.push_str(&format!("| {name} | {measured} | {ratio:.2} | {met} |\n"));
    };
    let r = rate / ceiling;
    row(
        &mut out,
        &format!(
            "{CLIENTS} clients: leases/s >= single-commit ceiling (1/commit = {ceiling:.0}/s)"
        ),
        format!("{rate:.0} leases/s"),
        r,
        Some(r >= 1.0),
    );
    let r = empty_s.p50.as_secs_f64() / one_client_floor.as_secs_f64();
    row(
        &mut out,
        "1 client: p50 <= 2x (commit + round trip)",
        format!(
            "{:.0} us vs {:.0} us",
            us(empty_s.p50),
            us(one_client_floor)
        ),
        r,
        Some(r <= 2.0),
    );
    let r = empty_s.p50.as_secs_f64() / (in_process.p50 + rtt.p50).as_secs_f64();
    row(
        &mut out,
        "1 client, report only: p50 against (the store's transaction in this process + round \
         trip), the daemon's own share",
        format!(
            "{:.0} us vs {:.0} us",
            us(empty_s.p50),
            us(in_process.p50 + rtt.p50)
        ),
        r,
        None,
    );
    let r = full_s.p50.as_secs_f64() / empty_s.p50.as_secs_f64();
    row(
        &mut out,
        "allocation with 4,000 active <= 1.2x empty pool (p50)",
        format!("{:.0} us vs {:.0} us", us(full_s.p50), us(empty_s.p50)),
        r,
        Some(r <= 1.2),
    );
    let r = rss_mib / 32.0;
    row(
        &mut out,
        &format!(
            "daemon RSS with {} leases < 32 MiB",
            ROUNDS + CONCURRENT_TOTAL + FULL_SEQ
        ),
        format!("{rss_mib:.1} MiB"),
        r,
        Some(r < 1.0),
    );
    Ok(out)
}

/// The floor: one single-insert commit on the same file system, WAL + synchronous=FULL.
struct CommitFloor {
    conn: SqliteConnection,
}

impl CommitFloor {
    async fn open(path: &Path) -> anyhow::Result<CommitFloor> {
        let options = SqliteConnectOptions::from_str("sqlite://")?
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full);
        let mut conn = SqliteConnection::connect_with(&options).await?;
        sqlx::query("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT NOT NULL)")
            .execute(&mut conn)
            .await?;
        Ok(CommitFloor { conn })
    }

    /// One timed commit.
    async fn commit(&mut self, i: usize) -> anyhow::Result<Duration> {
        let t = Instant::now();
        sqlx::query("INSERT INTO t (v) VALUES (?)")
            .bind(format!("lease-{i}"))
            .execute(&mut self.conn)
            .await?;
        Ok(t.elapsed())
    }
}

/// `clients` clients, each on its own kept-alive connection, creating `total` leases together.
async fn concurrent(
    client: &Client,
    clients: usize,
    total: usize,
) -> anyhow::Result<Vec<Duration>> {
    let per = total / clients;
    let extra = total % clients;
    let client = Arc::new(client.clone());
    let mut tasks = Vec::with_capacity(clients);
    for c in 0..clients {
        let client = Arc::clone(&client);
        let n = per + usize::from(c < extra);
        tasks.push(tokio::spawn(async move {
            subidd_tests::sequential_puts(&client, &format!("c{c}"), n).await
        }));
    }
    let mut all = Vec::with_capacity(total);
    for task in tasks {
        all.extend(task.await??);
    }
    Ok(all)
}
