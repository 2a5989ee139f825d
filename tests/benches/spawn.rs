//! Spawn benchmark: `/bin/true` started through the real daemon over its unix socket, beside
//! the kernel floors (`subid_sys::floor`) measured in the same run. Writes its tables into
//! docs/BENCHMARKS.md.
//!
//! Run: `cargo build --release -p subidd --bin subidd && cargo bench -p subidd-tests --bench spawn`
//! (`SUBIDD_BENCH_NO_WRITE=1` prints without touching the docs). Needs root.

use std::os::fd::AsFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use hyper::{Method, StatusCode};
use subid_sys::floor;
use subid_sys::userns::{self, UserNsSpec};
use subid_sys::{Command, LeaseNs, Namespace};
use subidd_tests::{Client, Conn, Daemon, rss_kib};

/// Samples of every latency row (rows take turns). Bounds the first-spawn leases too: each is
/// force-deleted after its sample and, with no quarantine, its block is reused.
const SAMPLES: usize = 300;
/// The join's rows alone, taking turns: the floor, the round trip, the library join and the
/// API join, with none of the heavier rows (first spawns, deletes) between them.
const FOCUS_ROWS: [Row; 4] = [Row::Setns, Row::Ping, Row::LibJoin, Row::ApiJoin];
const FOCUS_SAMPLES: usize = 300;
/// Samples of the join rows measured again after the concurrent phase.
const LATE_SAMPLES: usize = 200;
/// Memory this process touches before the last rows, and their samples.
const BALLAST_MIB: usize = 256;
const BALLAST_SAMPLES: usize = 100;
/// Concurrent clients of the throughput phase, all joining one lease.
const CLIENTS: usize = 8;
/// The throughput phase stops after this long or this many spawns, whichever comes first.
const BURST_TIME: Duration = Duration::from_secs(3);
const BURST_MAX: usize = 2_000;
/// The idle gap before every latency sample, floors and API rows alike: each sample starts
/// from the same pacing (an idle machine costs each of them the same wake-ups), so their
/// ratios compare like with like.
const GAP: Duration = Duration::from_millis(10);
/// Ranges of the in-process floors, outside the daemon's default pool.
const FLOOR_BASE: u32 = 0x6000_0000;
const SPAWN: &str = r#"{"argv":["/bin/true"]}"#;

fn main() -> anyhow::Result<()> {
    // One thread: the floors fork this process, and a small one copies few page tables.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let report = runtime.block_on(run())?;
    subidd_tests::publish("spawn", &report)
}

use subidd_tests::LatencyStats as Stats;

fn stats(samples: Vec<Duration>) -> Stats {
    subidd_tests::latency_stats(samples)
}

/// A directory on a tmpfs for runtime files: /dev/shm, else /run, else the temp dir.
fn tmpfs_dir() -> anyhow::Result<std::path::PathBuf> {
    for dir in ["/dev/shm", "/run"] {
        let on_tmpfs = nix::sys::statfs::statfs(dir)
            .is_ok_and(|st| st.filesystem_type() == nix::sys::statfs::TMPFS_MAGIC);
        if on_tmpfs {
            return Ok(dir.into());
        }
    }
    Ok(std::env::temp_dir())
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// The latency rows, in the order they take turns.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Row {
    Fork,
    Clone,
    Setns,
    Unshare,
    Ping,
    LibJoin,
    LibFirst,
    ApiJoin,
    ApiFirst,
    ApiJoinTwo,
    ApiJoinCapped,
}

const ROWS: [Row; 11] = [
    Row::Fork,
    Row::Clone,
    Row::Setns,
    Row::Unshare,
    Row::Ping,
    Row::LibJoin,
    Row::LibFirst,
    Row::ApiJoin,
    Row::ApiFirst,
    Row::ApiJoinTwo,
    Row::ApiJoinCapped,
];

impl Row {
    fn label(self) -> &'static str {
        match self {
            Row::Fork => "floor: fork + exec `/bin/true`, waited",
            Row::Clone => "floor: raw clone(NEWUSER) + uid/gid maps + exec",
            Row::Setns => "floor: fork + setns into an existing user ns + exec",
            Row::Unshare => "floor: `unshare --user --map-root-user /bin/true` as a command",
            Row::Ping => "HTTP round trip on the socket (`GET /_ping`, keep-alive)",
            Row::LibJoin => "subid-sys join in this process (no HTTP, no database)",
            Row::LibFirst => "subid-sys first spawn in this process (create + pin + exec)",
            Row::ApiJoin => "API join: one `POST ...?wait=true`, lease has its namespace",
            Row::ApiFirst => "API first spawn of a lease: one `POST ...?wait=true`",
            Row::ApiJoinTwo => "API join as two requests: `POST` spawn, then `POST` wait",
            Row::ApiJoinCapped => {
                "API join, lease with `pids_max` (its cgroup): one `POST ...?wait=true`"
            }
        }
    }
}

/// What the rows need: the daemon's connection, and this process's own namespaces.
struct Bench {
    client: Client,
    conn: Conn,
    floor_ns: std::os::fd::OwnedFd,
    lib_ns: LeaseNs,
    lib_first_spec: UserNsSpec,
    lib_first_pin: std::path::PathBuf,
    truth: Command,
    first_seq: usize,
    /// Time until the `POST` spawn answered, of the two-request API join samples.
    join_post: Vec<Duration>,
}

impl Bench {
    /// One sample of `row`, after the idle [`GAP`]: the timed part only (set-up and teardown are
    /// outside it).
    async fn sample(&mut self, row: Row) -> anyhow::Result<Duration> {
        std::thread::sleep(GAP);
        Ok(match row {
            Row::Fork => timed(floor::fork_exec_true)?,
            Row::Clone => timed(|| floor::clone_newuser_maps_exec_true(FLOOR_BASE + 0x1_0000))?,
            Row::Setns => timed(|| floor::setns_exec_true(self.floor_ns.as_fd()))?,
            Row::Unshare => timed(floor::unshare_command_true)?,
            Row::Ping => {
                let t = Instant::now();
                let r = self.conn.request(Method::GET, "/_ping", None).await?;
                let took = t.elapsed();
                ensure!(r.status == StatusCode::OK, "ping: {}", r.status);
                took
            }
            Row::LibJoin => timed(|| {
                let child = self.truth.spawn(Namespace::Join(&self.lib_ns))?;
                ensure_true(child.wait()?)
            })?,
            Row::LibFirst => {
                let took = timed(|| {
                    let child = self.truth.spawn(Namespace::Create {
                        spec: &self.lib_first_spec,
                        pin: &self.lib_first_pin,
                    })?;
                    ensure_true(child.wait()?)
                })?;
                userns::unpin(&self.lib_first_pin)?;
                took
            }
            Row::ApiJoin => spawn_waiting(&mut self.conn, "join").await?,
            Row::ApiJoinCapped => spawn_waiting(&mut self.conn, "capped").await?,
            Row::ApiJoinTwo => {
                let t = Instant::now();
                let post = spawn_and_wait(&mut self.conn, "join").await?;
                let took = t.elapsed();
                self.join_post.push(post);
                took
            }
            Row::ApiFirst => {
                let name = format!("first-{}", self.first_seq);
                self.first_seq += 1;
                let path = format!("/v1/leases/{name}");
                let r = self.conn.request(Method::PUT, &path, None).await?;
                ensure!(r.status == StatusCode::CREATED, "PUT {path}: {}", r.text());
                let took = spawn_waiting(&mut self.conn, &name).await?;
                let r = self
                    .conn
                    .request(Method::DELETE, &format!("{path}?force=true"), None)
                    .await?;
                ensure!(r.status.is_success(), "DELETE {path}: {}", r.text());
                took
            }
        })
    }

    /// One warm-up turn, then `n` turns of `rows`: noise hits every row alike.
    async fn turns(&mut self, rows: &[Row], n: usize) -> anyhow::Result<Vec<Stats>> {
        for &row in rows {
            self.sample(row)
                .await
                .with_context(|| format!("warm-up: {}", row.label()))?;
        }
        let mut samples = vec![Vec::with_capacity(n); rows.len()];
        for _ in 0..n {
            for (&row, s) in rows.iter().zip(samples.iter_mut()) {
                s.push(self.sample(row).await.with_context(|| row.label())?);
            }
        }
        Ok(samples.into_iter().map(stats).collect())
    }

    /// One warm-up sample, then `n` samples of each row, row after row: a forked child of a
    /// large parent tears its page tables down while the next sample would run.
    async fn in_sequence(&mut self, rows: &[Row], n: usize) -> anyhow::Result<Vec<Stats>> {
        let mut out = Vec::with_capacity(rows.len());
        for &row in rows {
            self.sample(row)
                .await
                .with_context(|| format!("warm-up: {}", row.label()))?;
            let mut samples = Vec::with_capacity(n);
            for _ in 0..n {
                samples.push(self.sample(row).await.with_context(|| row.label())?);
            }
            out.push(stats(samples));
        }
        Ok(out)
    }
}

async fn run() -> anyhow::Result<String> {
    let machine_start = machine_jiffies()?;
    // Runtime dirs (socket, namespace pins) on a tmpfs, as /run is under systemd: making a pin
    // file on this machine's disk cost 0.4-1 ms at times (ext4, see "Where the time goes").
    let run_base = tmpfs_dir()?;
    let daemon_run = tempfile::tempdir_in(&run_base)?;
    let mut daemon = Daemon::start_with_run_dir(
        "quarantine_seconds = 0\nkill_grace_ms = 500",
        daemon_run.path(),
    )?;
    let client = daemon.client();
    let pid = daemon.pid().context("daemon pid")?;
    let rss_start = rss_kib(pid)?;

    // This process's own namespaces, for the floors and the in-process library rows.
    let dir = tempfile::tempdir_in(&run_base)?;
    let floor_pin = dir.path().join("ns/floor/user");
    let lib_pin = dir.path().join("ns/lib/user");
    let lib_first_pin = dir.path().join("ns/lib-first/user");
    let _pins = Pins(vec![
        floor_pin.clone(),
        lib_pin.clone(),
        lib_first_pin.clone(),
    ]);
    userns::create_pinned(&UserNsSpec::new(FLOOR_BASE, 65536), &floor_pin)?;
    userns::create_pinned(&UserNsSpec::new(FLOOR_BASE + 0x2_0000, 65536), &lib_pin)?;
    let mut bench = Bench {
        conn: client.connect().await?,
        client: client.clone(),
        floor_ns: userns::open_pinned(&floor_pin)?,
        lib_ns: LeaseNs::open(&lib_pin)?,
        lib_first_spec: UserNsSpec::new(FLOOR_BASE + 0x3_0000, 65536),
        lib_first_pin,
        truth: Command::new("/bin/true", ["true"]),
        first_seq: 0,
        join_post: Vec::new(),
    };

    // The joined lease: its namespace is made (and pinned) by this untimed first spawn.
    let r = bench
        .conn
        .request(Method::PUT, "/v1/leases/join", None)
        .await?;
    ensure!(r.status == StatusCode::CREATED, "PUT join: {}", r.text());
    spawn_and_wait(&mut bench.conn, "join").await?;
    // The capped lease: a cgroup with pids.max on whatever pids hierarchy the host has.
    let r = bench
        .conn
        .request(
            Method::PUT,
            "/v1/leases/capped",
            Some(r#"{"pids_max": 1000}"#),
        )
        .await?;
    ensure!(r.status == StatusCode::CREATED, "PUT capped: {}", r.text());
    spawn_and_wait(&mut bench.conn, "capped").await?;

    // `SUBIDD_SPAWN_QUICK=N`: only the join's rows and their limit, N turns, printed (for
    // trying a change to the spawn path in a minute).
    if let Some(n) = std::env::var("SUBIDD_SPAWN_QUICK")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
    {
        let t = bench.turns(&FOCUS_ROWS, n).await?;
        let mut out = String::new();
        for (row, s) in FOCUS_ROWS.iter().zip(&t) {
            out.push_str(&format!(
                "{:>8.0} us p50 {:>8.0} us p99  {}\n",
                us(s.p50),
                us(s.p99),
                row.label()
            ));
        }
        out.push_str(&format!(
            "API join / (setns floor + ping) = {:.2}\n",
            join_ratio(&t[3], &t[0], &t[1])
        ));
        for lease in ["join", "capped"] {
            let _ = client
                .delete(&format!("/v1/leases/{lease}?force=true"))
                .await?;
        }
        drop(bench);
        for pin in [&floor_pin, &lib_pin] {
            userns::unpin(pin)?;
        }
        daemon.stop()?;
        print!("{out}");
        std::process::exit(0);
    }
    // The join's rows alone first, then every row.
    let focus = bench.turns(&FOCUS_ROWS, FOCUS_SAMPLES).await?;
    let table = bench.turns(&ROWS, SAMPLES).await?;
    // Without the warm-up turn's.
    let join_post = stats(bench.join_post.split_off(1));
    let rss_mid = rss_kib(pid)?;

    let started = Instant::now();
    let (burst_n, burst) = concurrent(&bench.client, CLIENTS).await?;
    let burst_time = started.elapsed();
    let rate = burst_n as f64 / burst_time.as_secs_f64();
    let rss_end = rss_kib(pid)?;

    // The join again, after the daemon has served thousands of spawns.
    let late = bench
        .turns(&[Row::Setns, Row::ApiJoin], LATE_SAMPLES)
        .await?;
    let rss_late = rss_kib(pid)?;
    let self_anon = self_rss_anon_kib().unwrap_or(0);

    // The daemon's spawn path against a plain fork, with this process grown by 256 MiB of
    // touched memory: which cost grows with the parent's size.
    let ballast = vec![1u8; BALLAST_MIB << 20];
    std::hint::black_box(&ballast);
    let big = bench
        .in_sequence(&[Row::LibJoin, Row::Fork], BALLAST_SAMPLES)
        .await?;
    drop(ballast);

    // Teardown: the leases released (unpinning their namespaces), ours unpinned.
    for lease in ["join", "capped"] {
        let r = client
            .delete(&format!("/v1/leases/{lease}?force=true"))
            .await?;
        ensure!(r.status.is_success(), "DELETE {lease}: {}", r.text());
    }
    let first_left = bench.first_seq;
    drop(bench);
    for pin in [&floor_pin, &lib_pin] {
        userns::unpin(pin)?;
    }
    daemon.stop()?;
    // CPU time the machine spent on anything but this benchmark, the daemon and their children.
    let (busy, total) = machine_jiffies()?;
    let others = (busy - machine_start.0).saturating_sub(own_jiffies()?);
    let others_pct = 100.0 * others as f64 / (total - machine_start.1).max(1) as f64;

    let row = |r: Row| &table[ROWS.iter().position(|&x| x == r).unwrap_or(0)];
    let mut out = String::new();
    out.push_str(&format!(
        "Run {} on {} ({} cores), release build. `/bin/true`, started and waited for; \
         {SAMPLES} samples per row, rows taking turns so noise hits them alike, each sample after \
         the same {} ms idle gap; every floor forks this benchmark (RssAnon {:.1} MiB); the \
         daemon spawns with clone3(CLONE_VM) into the lease's cgroup, with a deadline; \
         runtime dirs (socket, namespace pins) in {}. \
         Other work on the machine took {others_pct:.0}% of its CPU time during the run.\n\n",
        subidd_tests::run_date(),
        subidd_tests::kernel(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        GAP.as_millis(),
        self_anon as f64 / 1024.0,
        run_base.display(),
    ));
    out.push_str("| path | n | p50 | p99 |\n|---|---|---|---|\n");
    let line = |out: &mut String, label: &str, s: &Stats| {
        out.push_str(&format!(
            "| {label} | {} | {:.0} us | {:.0} us |\n",
            s.n,
            us(s.p50),
            us(s.p99)
        ));
    };
    for (r, s) in ROWS.iter().zip(&table) {
        line(&mut out, r.label(), s);
        if *r == Row::ApiJoinTwo {
            line(
                &mut out,
                "... of which until `POST` spawn answered",
                &join_post,
            );
        }
    }
    for (r, s) in FOCUS_ROWS.iter().zip(&focus) {
        line(
            &mut out,
            &format!("{}, the join's rows alone", r.label()),
            s,
        );
    }
    let burst_s = stats(burst);
    line(
        &mut out,
        &format!("API join, {CLIENTS} clients on one lease, each its own connection"),
        &burst_s,
    );
    line(
        &mut out,
        "floor: fork + setns + exec, again after the concurrent phase",
        &late[0],
    );
    line(
        &mut out,
        "API join, again after the concurrent phase",
        &late[1],
    );
    line(
        &mut out,
        &format!("subid-sys join, this process holding {BALLAST_MIB} MiB more"),
        &big[0],
    );
    line(
        &mut out,
        &format!("fork + exec, this process holding {BALLAST_MIB} MiB more"),
        &big[1],
    );
    out.push_str(&format!(
        "\nDaemon RSS: {:.1} MiB at start, {:.1} MiB after the latency rows ({first_left} leases \
         created, spawned in and force-deleted), {:.1} MiB after the concurrent phase, \
         {:.1} MiB at the end.\n\n",
        rss_start as f64 / 1024.0,
        rss_mid as f64 / 1024.0,
        rss_end as f64 / 1024.0,
        rss_late as f64 / 1024.0,
    ));

    out.push_str("| target | measured | ratio | target met |\n|---|---|---|---|\n");
    let target = |out: &mut String, name: &str, measured: String, ratio: f64, ok: bool| {
        out.push_str(&format!(
            "| {name} | {measured} | {ratio:.2} | {} |\n",
            if ok { "yes" } else { "no" }
        ));
    };
    let ratio = |a: &Stats, b: &Stats| a.p50.as_secs_f64() / b.p50.as_secs_f64();
    let vs = |a: &Stats, b: &Stats| format!("{:.0} us vs {:.0} us", us(a.p50), us(b.p50));
    let (join, first) = (row(Row::ApiJoin), row(Row::ApiFirst));
    let (setns, clone, unshare) = (row(Row::Setns), row(Row::Clone), row(Row::Unshare));
    let ping = row(Row::Ping);
    let limit = setns.p50 + ping.p50;
    let r = join_ratio(join, setns, ping);
    target(
        &mut out,
        "API join p50 <= 1.3x (setns + exec floor + `/_ping` round trip), every row taking turns",
        format!(
            "{:.0} us vs {:.0} + {:.0} = {:.0} us",
            us(join.p50),
            us(setns.p50),
            us(ping.p50),
            us(limit)
        ),
        r,
        r <= 1.3,
    );
    let r = join_ratio(&focus[3], &focus[0], &focus[1]);
    target(
        &mut out,
        "API join p50 <= 1.3x (setns + exec floor + `/_ping` round trip), the join's rows alone",
        format!(
            "{:.0} us vs {:.0} + {:.0} = {:.0} us",
            us(focus[3].p50),
            us(focus[0].p50),
            us(focus[1].p50),
            us(focus[0].p50 + focus[1].p50)
        ),
        r,
        r <= 1.3,
    );
    let r = ratio(first, clone);
    target(
        &mut out,
        "API first spawn p50 <= 1.5x raw clone(NEWUSER) + maps + exec",
        vs(first, clone),
        r,
        r <= 1.5,
    );
    let r = ratio(join, unshare);
    target(
        &mut out,
        "API join p50 < `unshare --user --map-root-user /bin/true`",
        vs(join, unshare),
        r,
        r < 1.0,
    );
    let r = ratio(first, unshare);
    target(
        &mut out,
        "API first spawn p50 < `unshare --user --map-root-user /bin/true`",
        vs(first, unshare),
        r,
        r < 1.0,
    );
    let r = ratio(&big[0], row(Row::LibJoin));
    target(
        &mut out,
        &format!(
            "spawn cost does not grow with memory: the daemon's spawn path (subid-sys join) with \
             {BALLAST_MIB} MiB more in the parent <= 1.2x without"
        ),
        format!(
            "{:.0} us vs {:.0} us (plain fork + exec: {:.0} us vs {:.0} us)",
            us(big[0].p50),
            us(row(Row::LibJoin).p50),
            us(big[1].p50),
            us(row(Row::Fork).p50)
        ),
        r,
        r <= 1.2,
    );
    let r = ratio(&late[1], &late[0]) / ratio(join, setns);
    target(
        &mut out,
        "API join/floor ratio after the concurrent phase <= 1.2x the ratio before (the daemon \
         does not slow down as it serves)",
        format!(
            "{:.2} vs {:.2}, RSS {:.1} -> {:.1} MiB",
            ratio(&late[1], &late[0]),
            ratio(join, setns),
            rss_start as f64 / 1024.0,
            rss_late as f64 / 1024.0
        ),
        r,
        r <= 1.2,
    );
    let capped = row(Row::ApiJoinCapped);
    let r = capped.p99.as_secs_f64() / join.p99.as_secs_f64();
    target(
        &mut out,
        "API join p99 with a cap (`pids_max`) <= 1.5x without",
        format!("{:.0} us vs {:.0} us", us(capped.p99), us(join.p99)),
        r,
        r <= 1.5,
    );
    out.push_str(&format!(
        "| spawns/s, {CLIENTS} clients joining one lease (report only) | {rate:.0} spawns/s \
         ({burst_n} in {:.2} s) | - | - |\n",
        burst_time.as_secs_f64()
    ));
    Ok(out)
}

/// Namespaces this process pinned, unpinned on the way out even when the run fails.
struct Pins(Vec<std::path::PathBuf>);

impl Drop for Pins {
    fn drop(&mut self) {
        for pin in &self.0 {
            if userns::is_pinned(pin) {
                let _ = userns::unpin(pin);
            }
        }
    }
}

/// An API join's p50 over its limit: the setns + exec floor's p50 plus one `/_ping`'s.
fn join_ratio(join: &Stats, setns: &Stats, ping: &Stats) -> f64 {
    join.p50.as_secs_f64() / (setns.p50 + ping.p50).as_secs_f64()
}

/// One `POST ...?wait=true` of `/bin/true` in `lease`: the time until it answered that the
/// process exited 0 (and its status is recorded).
async fn spawn_waiting(conn: &mut Conn, lease: &str) -> anyhow::Result<Duration> {
    let path = format!("/v1/leases/{lease}/processes?wait=true&timeout_seconds=10");
    let t = Instant::now();
    let r = conn.request(Method::POST, &path, Some(SPAWN)).await?;
    let took = t.elapsed();
    let body = r.json();
    ensure!(
        r.status == StatusCode::CREATED && body["state"] == "exited" && body["exit_code"] == 0,
        "POST {path}: {} {body}",
        r.status
    );
    Ok(took)
}

/// `POST` spawn of `/bin/true` in `lease`, then `POST` wait: Ok when it exited 0, with the time
/// the spawn took to answer.
async fn spawn_and_wait(conn: &mut Conn, lease: &str) -> anyhow::Result<Duration> {
    let path = format!("/v1/leases/{lease}/processes");
    let t = Instant::now();
    let r = conn.request(Method::POST, &path, Some(SPAWN)).await?;
    let post = t.elapsed();
    if r.status != StatusCode::CREATED {
        bail!("POST {path}: {} {}", r.status, r.text());
    }
    let body = r.json();
    let id = body["id"].as_str().context("spawn answer without id")?;
    let path = format!("/v1/processes/{id}/wait?timeout_seconds=10");
    let r = conn.request(Method::POST, &path, None).await?;
    let body = r.json();
    ensure!(
        r.status == StatusCode::OK && body["state"] == "exited" && body["exit_code"] == 0,
        "POST {path}: {} {body}",
        r.status
    );
    Ok(post)
}

/// `clients` clients, each on its own kept-alive connection, spawning in the lease `join` until
/// [`BURST_TIME`] has passed or [`BURST_MAX`] spawns were made; their latencies.
async fn concurrent(client: &Client, clients: usize) -> anyhow::Result<(usize, Vec<Duration>)> {
    let done = Arc::new(AtomicUsize::new(0));
    let deadline = Instant::now() + BURST_TIME;
    let mut tasks = Vec::with_capacity(clients);
    for _ in 0..clients {
        let client = client.clone();
        let done = Arc::clone(&done);
        tasks.push(tokio::spawn(async move {
            let mut conn = client.connect().await?;
            let mut samples = Vec::new();
            while Instant::now() < deadline && done.fetch_add(1, Ordering::Relaxed) < BURST_MAX {
                let t = Instant::now();
                spawn_and_wait(&mut conn, "join").await?;
                samples.push(t.elapsed());
            }
            anyhow::Ok(samples)
        }));
    }
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await??);
    }
    Ok((all.len(), all))
}

fn timed<E: Into<anyhow::Error>>(f: impl FnOnce() -> Result<(), E>) -> anyhow::Result<Duration> {
    let t = Instant::now();
    f().map_err(Into::into)?;
    Ok(t.elapsed())
}

fn ensure_true(status: subid_sys::ExitStatus) -> anyhow::Result<()> {
    ensure!(status.success(), "/bin/true: {status:?}");
    Ok(())
}

/// This process's anonymous resident memory (what a plain fork copies page tables for).
fn self_rss_anon_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let rest = status.lines().find_map(|l| l.strip_prefix("RssAnon:"))?;
    rest.trim().trim_end_matches("kB").trim().parse().ok()
}

/// Busy and total CPU time of the whole machine so far, in clock ticks (`/proc/stat`).
fn machine_jiffies() -> anyhow::Result<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let cpu = stat.lines().next().context("empty /proc/stat")?;
    let v: Vec<u64> = cpu
        .split_whitespace()
        .skip(1)
        .take(8)
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    ensure!(v.len() == 8, "short cpu line in /proc/stat");
    // user nice system idle iowait irq softirq steal
    let idle = v[3] + v[4];
    let total: u64 = v.iter().sum();
    Ok((total - idle, total))
}

/// CPU time of this process and of its reaped children (the daemon and what it reaped, the
/// floors' children), in clock ticks (`/proc/self/stat` utime, stime, cutime, cstime).
fn own_jiffies() -> anyhow::Result<u64> {
    let stat = std::fs::read_to_string("/proc/self/stat")?;
    // Fields after the command name, which ends at the last ')': state is field 3.
    let rest = &stat[stat.rfind(')').context("no ) in /proc/self/stat")? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime is field 14, i.e. index 11 after the state (field 3).
    let sum = f
        .get(11..15)
        .context("short /proc/self/stat")?
        .iter()
        .map(|x| x.parse::<u64>())
        .sum::<Result<u64, _>>()?;
    Ok(sum)
}
