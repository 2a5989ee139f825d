//! Fleet benchmark: leases on PostgreSQL, beside floors measured in the same run against the
//! same server: one insert's commit (`synchronous_commit=on`), one round trip to the server,
//! one HTTP round trip to the daemon. One host with one client, then three daemons with 32
//! clients each. Writes its table into docs/BENCHMARKS.md.
//!
//! Run: `cargo build --release --bins && cargo bench -p subidd-tests --bench fleet`
//! (`SUBIDD_BENCH_NO_WRITE=1` prints without touching the docs). Needs PostgreSQL's programs
//! (`initdb`, see tests/support/pg.rs); the cluster is the benchmark's own.

#[path = "common/store_row.rs"]
mod store_row;

use std::str::FromStr;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use sqlx::Connection;
use sqlx::postgres::{PgConnectOptions, PgConnection};
use subidd_tests::pg::PgCluster;
use subidd_tests::{Daemon, LatencyStats, latency_stats, rss_kib};

/// Ids per block (and lease).
const BLOCK: u32 = 4096;
/// The pool: below the default pool, above every id of this host's users.
const BASE: u32 = 0x1000_0000;
/// Rounds of the 1-host phase: one floor commit, one `SELECT 1`, one `/_ping`, one create by
/// the store in this process and one `PUT` each, taking turns so that every row sees the same
/// disk and CPU over the run.
const ROUNDS: usize = 300;
/// Daemons of the fleet, clients per daemon, leases per client.
const HOSTS: usize = 3;
const CLIENTS: usize = 32;
const EACH: usize = 40;

fn main() -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()?;
    let cluster = PgCluster::start().context("a PostgreSQL cluster (is initdb installed?)")?;
    let report = runtime.block_on(run(&cluster))?;
    subidd_tests::publish("fleet", &report)
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn config(url: &str, host: &str) -> String {
    format!(
        "quarantine_seconds = 86400\n[pool]\nbase = {BASE}\nsize = {}\nblock = {BLOCK}\n\
         [store]\nurl = {url:?}\nhost_id = {host:?}\n",
        20_000 * BLOCK
    )
}

async fn run(cluster: &PgCluster) -> anyhow::Result<String> {
    let mut floor = PgFloor::open(&cluster.create_db("floor")?).await?;
    // One host, one client.
    let run_dir = tempfile::tempdir_in("/dev/shm").context("tmpfs run dir")?;
    let one_url = cluster.create_db("one")?;
    let mut one = Daemon::start_with_run_dir(&config(&one_url, "one"), run_dir.path())?;
    if let Ok(level) = std::env::var("SUBIDD_BENCH_LOG") {
        one.set_env("SUBIDD_LOG", Some(&level));
        one.restart()?;
    }
    let store_dir = tempfile::tempdir()?;
    let mut store = store_row::StoreRow::postgres(
        &cluster.create_db("store")?,
        &store_dir.path().join("local.db"),
        BASE,
        BLOCK,
    )
    .await?;
    let mut conn = one.client().connect().await?;
    let (mut commits, mut trips, mut pings, mut puts) = (vec![], vec![], vec![], vec![]);
    let mut stored = Vec::new();
    for i in 0..ROUNDS {
        commits.push(floor.commit(i).await?);
        trips.push(floor.trip().await?);
        pings.push(subidd_tests::ping_once(&mut conn).await?);
        stored.push(store.create(i, &format!("s-{i}")).await?);
        puts.push(subidd_tests::put_once(&mut conn, &format!("seq-{i}")).await?);
    }
    drop(conn);
    drop(store);
    let (commit, trip) = (latency_stats(commits), latency_stats(trips));
    let (http, single) = (latency_stats(pings), latency_stats(puts));
    let in_process = latency_stats(stored);
    if std::env::var_os("SUBIDD_BENCH_LOG").is_some() {
        eprintln!("{}", one.log_text());
    }
    one.stop()?;
    // Three hosts, 32 clients each.
    let fleet_url = cluster.create_db("fleet")?;
    let dirs: Vec<tempfile::TempDir> = (0..HOSTS)
        .map(|_| tempfile::tempdir_in("/dev/shm"))
        .collect::<Result<_, _>>()?;
    let mut daemons = Vec::new();
    for (i, dir) in dirs.iter().enumerate() {
        daemons.push(Daemon::start_with_run_dir(
            &config(&fleet_url, &format!("h{i}")),
            dir.path(),
        )?);
    }
    let started = Instant::now();
    let mut tasks = Vec::new();
    for (h, daemon) in daemons.iter().enumerate() {
        for c in 0..CLIENTS {
            let client = daemon.client();
            tasks.push(tokio::spawn(async move {
                subidd_tests::sequential_puts(&client, &format!("h{h}c{c}"), EACH).await
            }));
        }
    }
    let mut fleet_samples = Vec::new();
    for task in tasks {
        fleet_samples.extend(task.await??);
    }
    let elapsed = started.elapsed();
    let total = HOSTS * CLIENTS * EACH;
    ensure!(fleet_samples.len() == total);
    let rate = total as f64 / elapsed.as_secs_f64();
    let fleet = latency_stats(fleet_samples);
    // Each host's counts follow the others' commits within a poll interval.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let pool = daemons[0].client().get("/v1/pool").await?.json();
        if pool["blocks"]["active"].as_u64() == Some(total as u64) {
            break;
        }
        ensure!(Instant::now() < deadline, "pool: {pool}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let rss: Vec<f64> = daemons
        .iter()
        .filter_map(|d| d.pid())
        .filter_map(|pid| rss_kib(pid).ok())
        .map(|kib| kib as f64 / 1024.0)
        .collect();
    for daemon in &mut daemons {
        daemon.stop()?;
    }

    let ceiling = 1.0 / commit.p50.as_secs_f64();
    let floor = commit.p50 + trip.p50 + http.p50;
    let mut out = format!(
        "Run {} on {} ({} cores), release build, PostgreSQL {} on loopback TCP (the benchmark's \
         own cluster, fsync on), runtime dirs on a tmpfs.\n\n",
        subidd_tests::run_date(),
        subidd_tests::kernel(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        cluster
            .psql("postgres", "SHOW server_version")
            .unwrap_or_default()
    );
    out.push_str("| measurement | p50 | p99 |\n|---|---|---|\n");
    let row = |out: &mut String, name: &str, s: &LatencyStats| {
        out.push_str(&format!(
            "| {name} | {:.0} us | {:.0} us |\n",
            us(s.p50),
            us(s.p99)
        ));
    };
    row(
        &mut out,
        "floor: one PostgreSQL insert commit, `synchronous_commit=on`",
        &commit,
    );
    row(
        &mut out,
        "floor: one PostgreSQL round trip (`SELECT 1`)",
        &trip,
    );
    row(
        &mut out,
        "floor: HTTP round trip on the unix socket (`GET /_ping`, keep-alive)",
        &http,
    );
    row(
        &mut out,
        "the store's transaction in this process (lock, changes, name, insert, commit: the \
         daemon's writer without the daemon)",
        &in_process,
    );
    row(
        &mut out,
        "`PUT /v1/leases/{name}`, 1 host, 1 client",
        &single,
    );
    row(
        &mut out,
        &format!("`PUT /v1/leases/{{name}}`, {HOSTS} hosts x {CLIENTS} clients"),
        &fleet,
    );
    out.push_str(&format!(
        "\nDaemon RSS after the fleet run: {}.\n\n",
        rss.iter()
            .map(|r| format!("{r:.1} MiB"))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    out.push_str("| target | measured | ratio | target met |\n|---|---|---|---|\n");
    let r = rate / ceiling;
    out.push_str(&format!(
        "| {HOSTS} hosts x {CLIENTS} clients: leases/s above the one-commit ceiling (1/commit = \
         {ceiling:.0}/s) | {rate:.0} leases/s ({total} in {:.2} s) | {r:.2} | {} |\n",
        elapsed.as_secs_f64(),
        if r >= 1.0 { "yes" } else { "no" }
    ));
    let r = single.p50.as_secs_f64() / floor.as_secs_f64();
    out.push_str(&format!(
        "| 1 host, 1 client: p50 <= 2x (commit + PostgreSQL round trip + HTTP round trip) | \
         {:.0} us vs {:.0} us | {r:.2} | {} |\n",
        us(single.p50),
        us(floor),
        if r <= 2.0 { "yes" } else { "no" }
    ));
    let r = single.p50.as_secs_f64() / (in_process.p50 + http.p50).as_secs_f64();
    out.push_str(&format!(
        "| 1 host, 1 client, report only: p50 against (the store's transaction in this process \
         + HTTP round trip), the daemon's own share | {:.0} us vs {:.0} us | {r:.2} | - |\n",
        us(single.p50),
        us(in_process.p50 + http.p50),
    ));
    Ok(out)
}

/// The floors: one insert's commit (autocommit, `synchronous_commit=on`) and one `SELECT 1`
/// round trip, on a session of their own.
struct PgFloor {
    conn: PgConnection,
}

impl PgFloor {
    async fn open(url: &str) -> anyhow::Result<PgFloor> {
        let options = PgConnectOptions::from_str(url)?;
        let mut conn = PgConnection::connect_with(&options).await?;
        sqlx::query("SET synchronous_commit = on")
            .execute(&mut conn)
            .await?;
        sqlx::query("CREATE TABLE t (id BIGSERIAL PRIMARY KEY, v TEXT NOT NULL)")
            .execute(&mut conn)
            .await?;
        Ok(PgFloor { conn })
    }

    async fn commit(&mut self, i: usize) -> anyhow::Result<Duration> {
        let t = Instant::now();
        sqlx::query("INSERT INTO t (v) VALUES ($1)")
            .bind(format!("lease-{i}"))
            .execute(&mut self.conn)
            .await?;
        Ok(t.elapsed())
    }

    async fn trip(&mut self) -> anyhow::Result<Duration> {
        let t = Instant::now();
        let _: i32 = sqlx::query_scalar("SELECT 1")
            .fetch_one(&mut self.conn)
            .await?;
        Ok(t.elapsed())
    }
}
