//! Scale benchmark: 100,000 active leases (blocks of 4,096 ids) on each back end, SQLite and
//! PostgreSQL: allocation latency with them against an empty pool, the daemon's RSS, a list of
//! all of them (streamed) and in pages, and a restart with them. Writes its table into
//! docs/BENCHMARKS.md.
//!
//! Run: `cargo build --release --bins && cargo bench -p subidd-tests --bench scale`
//! (`SUBIDD_BENCH_NO_WRITE=1` prints without touching the docs; `SUBIDD_SCALE_LEASES=N`
//! changes the number of leases; PostgreSQL rows need `initdb`, see tests/support/pg.rs).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use hyper::StatusCode;
use subidd_tests::pg::PgCluster;
use subidd_tests::{Client, Daemon, LatencyStats, latency_stats, rss_kib};

/// Ids per block (and lease).
const BLOCK: u32 = 4096;
/// The pool: below the default pool, above every id of this host's users.
const BASE: u32 = 0x1000_0000;
/// Leases created one by one for each latency row.
const SEQ: usize = 300;
/// Clients filling the pool.
const FILLERS: usize = 64;

fn main() -> anyhow::Result<()> {
    let leases: usize = std::env::var("SUBIDD_SCALE_LEASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()?;
    let mut rows = Vec::new();
    rows.push(runtime.block_on(run("SQLite", None, leases))?);
    let cluster = if subidd_tests::pg::bin_dir().is_some() {
        Some(Arc::new(PgCluster::start()?))
    } else {
        eprintln!("PostgreSQL is not installed: SQLite only");
        None
    };
    if let Some(cluster) = &cluster {
        let urls = (cluster.create_db("scale")?, cluster.create_db("twin")?);
        rows.push(runtime.block_on(run("PostgreSQL", Some(urls), leases))?);
    }
    subidd_tests::publish("scale", &report(&rows, leases))
}

/// What one back end measured.
struct Row {
    backend: &'static str,
    empty: LatencyStats,
    full: LatencyStats,
    after_restart: LatencyStats,
    fill_rate: f64,
    rss_filled_mib: f64,
    list_all: Duration,
    list_bytes: usize,
    rss_after_list_mib: f64,
    pages: Duration,
    page_count: usize,
    start: Duration,
    rss_started_mib: f64,
    rss_after_use_mib: f64,
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn config(url: Option<&str>, leases: usize) -> String {
    let blocks = u32::try_from(leases + 4 * SEQ + 1000).unwrap_or(u32::MAX);
    let mut text = format!(
        "quarantine_seconds = 86400\n[pool]\nbase = {BASE}\nsize = {}\nblock = {BLOCK}\n",
        blocks * BLOCK
    );
    if let Some(url) = url {
        text.push_str(&format!(
            "[store]\nurl = {url:?}\nhost_id = \"bench\"\ntimeout_ms = 10000\n"
        ));
    }
    text
}

/// One back end's rows. `urls`: PostgreSQL databases for the filled daemon and its empty twin
/// (`None`: SQLite).
async fn run(
    backend: &'static str,
    urls: Option<(String, String)>,
    leases: usize,
) -> anyhow::Result<Row> {
    eprintln!("{backend}: starting");
    let run_dir = tempfile::tempdir_in("/dev/shm").context("tmpfs run dir")?;
    let url = urls.as_ref().map(|(url, _)| url.as_str());
    let mut daemon = Daemon::start_with_run_dir(&config(url, leases), run_dir.path())?;
    let client = daemon.client();
    eprintln!("{backend}: filling {leases} leases");
    let started = Instant::now();
    concurrent(&client, FILLERS, leases).await?;
    let fill_rate = leases as f64 / started.elapsed().as_secs_f64();
    // Allocation with them against an empty pool: a twin daemon with an empty store, the two
    // taking turns, so that both rows see the same machine over the same time.
    let twin_dir = tempfile::tempdir_in("/dev/shm").context("tmpfs run dir")?;
    let twin_url = urls.as_ref().map(|(_, url)| url.as_str());
    let mut twin = Daemon::start_with_run_dir(&config(twin_url, leases), twin_dir.path())?;
    let (mut empty, mut full) = (Vec::new(), Vec::new());
    {
        let mut to_twin = twin.client().connect().await?;
        let mut to_filled = client.connect().await?;
        for i in 0..SEQ {
            empty.push(subidd_tests::put_once(&mut to_twin, &format!("empty-{i}")).await?);
            full.push(subidd_tests::put_once(&mut to_filled, &format!("full-{i}")).await?);
        }
    }
    twin.stop()?;
    let (empty, full) = (latency_stats(empty), latency_stats(full));
    let pid = daemon.pid().context("pid")?;
    let rss_filled_mib = rss_kib(pid)? as f64 / 1024.0;
    // Every lease at once, streamed.
    let t = Instant::now();
    let all = client.get("/v1/leases").await?;
    let list_all = t.elapsed();
    ensure!(all.status == StatusCode::OK, "list: {}", all.status);
    let listed = all.json()["leases"].as_array().map_or(0, Vec::len);
    ensure!(listed == leases + SEQ, "listed {listed}");
    let list_bytes = all.body.len();
    drop(all);
    let rss_after_list_mib = rss_kib(pid)? as f64 / 1024.0;
    // In pages of 1,000.
    let t = Instant::now();
    let mut token: Option<String> = None;
    let mut page_count = 0;
    loop {
        let path = match &token {
            Some(t) => format!("/v1/leases?limit=1000&continue={t}"),
            None => "/v1/leases?limit=1000".to_string(),
        };
        let page = client.get(&path).await?.json();
        page_count += 1;
        match page["continue"].as_str() {
            Some(next) => token = Some(next.to_string()),
            None => break,
        }
    }
    let pages = t.elapsed();
    // A restart with them.
    daemon.stop()?;
    let t = Instant::now();
    daemon.spawn()?;
    let start = t.elapsed();
    let pid = daemon.pid().context("pid")?;
    let rss_started_mib = rss_kib(pid)? as f64 / 1024.0;
    let after_restart =
        latency_stats(subidd_tests::sequential_puts(&client, "restarted", SEQ).await?);
    let pool = client.get("/v1/pool").await?.json();
    let active = pool["blocks"]["active"].as_u64().unwrap_or(0) as usize;
    ensure!(active == leases + 2 * SEQ, "pool says {active} active");
    let rss_after_use_mib = rss_kib(pid)? as f64 / 1024.0;
    daemon.stop()?;
    Ok(Row {
        backend,
        empty,
        full,
        after_restart,
        fill_rate,
        rss_filled_mib,
        list_all,
        list_bytes,
        rss_after_list_mib,
        pages,
        page_count,
        start,
        rss_started_mib,
        rss_after_use_mib,
    })
}

fn report(rows: &[Row], leases: usize) -> String {
    let mut out = format!(
        "Run {} on {} ({} cores), release build: {leases} active leases of {BLOCK} ids each \
         (filled by {FILLERS} clients), runtime dir on a tmpfs.\n\n",
        subidd_tests::run_date(),
        subidd_tests::kernel(),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    out.push_str("| measurement | SQLite | PostgreSQL |\n|---|---|---|\n");
    let cell = |f: &dyn Fn(&Row) -> String, backend: &str| {
        rows.iter()
            .find(|r| r.backend == backend)
            .map_or_else(|| "-".to_string(), f)
    };
    let line = |out: &mut String, name: &str, f: &dyn Fn(&Row) -> String| {
        out.push_str(&format!(
            "| {name} | {} | {} |\n",
            cell(f, "SQLite"),
            cell(f, "PostgreSQL")
        ));
    };
    line(
        &mut out,
        "`PUT`, 1 client, pool empty (a twin daemon, taking turns with the next row; p50 / p99)",
        &|r| format!("{:.0} / {:.0} us", us(r.empty.p50), us(r.empty.p99)),
    );
    line(
        &mut out,
        &format!("`PUT`, 1 client, {leases} active (p50 / p99)"),
        &|r| format!("{:.0} / {:.0} us", us(r.full.p50), us(r.full.p99)),
    );
    line(
        &mut out,
        &format!("filling: leases/s, {FILLERS} clients"),
        &|r| format!("{:.0}", r.fill_rate),
    );
    line(&mut out, "daemon RSS once filled", &|r| {
        format!("{:.1} MiB", r.rss_filled_mib)
    });
    line(&mut out, "`GET /v1/leases`, all of them, streamed", &|r| {
        format!(
            "{:.0} ms, {:.1} MB",
            ms(r.list_all),
            r.list_bytes as f64 / 1e6
        )
    });
    line(&mut out, "daemon RSS after that list", &|r| {
        format!("{:.1} MiB", r.rss_after_list_mib)
    });
    line(&mut out, "`GET /v1/leases?limit=1000`, every page", &|r| {
        format!("{:.0} ms, {} pages", ms(r.pages), r.page_count)
    });
    line(&mut out, "restart: start until the socket answers", &|r| {
        format!("{:.0} ms", ms(r.start))
    });
    line(&mut out, "daemon RSS just started", &|r| {
        format!("{:.1} MiB", r.rss_started_mib)
    });
    line(&mut out, "`PUT`, 1 client, after the restart (p50)", &|r| {
        format!("{:.0} us", us(r.after_restart.p50))
    });
    line(&mut out, "daemon RSS after those", &|r| {
        format!("{:.1} MiB", r.rss_after_use_mib)
    });
    out.push_str(
        "\n| target | back end | measured | ratio | target met |\n|---|---|---|---|---|\n",
    );
    for r in rows {
        let mut target = |name: String, measured: String, ratio: f64, ok: bool| {
            out.push_str(&format!(
                "| {name} | {} | {measured} | {ratio:.2} | {} |\n",
                r.backend,
                if ok { "yes" } else { "no" }
            ));
        };
        let ratio = r.full.p50.as_secs_f64() / r.empty.p50.as_secs_f64();
        target(
            format!("allocation with {leases} active <= 1.2x empty pool (p50)"),
            format!("{:.0} us vs {:.0} us", us(r.full.p50), us(r.empty.p50)),
            ratio,
            ratio <= 1.2,
        );
        let ratio = r.start.as_secs_f64() / 2.0;
        target(
            format!("start with {leases} leases < 2 s"),
            format!("{:.0} ms", ms(r.start)),
            ratio,
            ratio < 1.0,
        );
        let worst = r
            .rss_filled_mib
            .max(r.rss_after_list_mib)
            .max(r.rss_started_mib)
            .max(r.rss_after_use_mib);
        let ratio = worst / 64.0;
        target(
            "daemon RSS < 64 MiB (the largest of the four readings)".into(),
            format!("{worst:.1} MiB"),
            ratio,
            ratio < 1.0,
        );
        let ratio = r.rss_after_list_mib / r.rss_filled_mib;
        target(
            "a list of every lease does not grow the daemon (RSS after / before)".into(),
            format!(
                "{:.1} MiB vs {:.1} MiB",
                r.rss_after_list_mib, r.rss_filled_mib
            ),
            ratio,
            ratio <= 1.1,
        );
    }
    out
}

/// `clients` clients creating `total` leases together.
async fn concurrent(client: &Client, clients: usize, total: usize) -> anyhow::Result<()> {
    let client = Arc::new(client.clone());
    let mut tasks = Vec::new();
    for c in 0..clients {
        let client = Arc::clone(&client);
        let n = total / clients + usize::from(c < total % clients);
        tasks.push(tokio::spawn(async move {
            subidd_tests::sequential_puts(&client, &format!("fill{c}"), n)
                .await
                .map(drop)
        }));
    }
    for task in tasks {
        task.await??;
    }
    Ok(())
}
