//! Docker benchmark: `docker run --rm IMAGE true` through `subid-runc` (join and map mode)
//! against plain runc, on one private engine, the rows taking turns so noise hits each alike.
//! Writes its table into docs/BENCHMARKS.md (section `docker`).
//!
//! Run: `cargo build --release -p subidd -p subid-runc && cargo bench -p subidd-tests --bench
//! docker` (`SUBIDD_BENCH_NO_WRITE=1` prints without touching the docs). Needs root, dockerd,
//! runc and a static /bin/busybox.

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use subidd_tests::docker::{Dockerd, EngineSpec, RuntimeEntry, subid_runc_bin};
use subidd_tests::{Daemon, LatencyStats, latency_stats};

/// Turns (each row once per turn) after one warm-up turn.
const TURNS: usize = 20;
/// The benchmark's pool, apart from the tests' (64 blocks, no quarantine: every `--rm` frees
/// its block at once).
const POOL: &str = "quarantine_seconds = 0\n[pool]\nbase = 2063597568\nsize = 4194304\n";
const IMAGE: &str = "subid-bench:1";

#[derive(Clone, Copy)]
struct Row {
    runtime: &'static str,
    label: &'static str,
}

const ROWS: [Row; 3] = [
    Row {
        runtime: "runc",
        label: "plain runc (Docker's default)",
    },
    Row {
        runtime: "subid",
        label: "subid-runc, join mode (default)",
    },
    Row {
        runtime: "subid-map",
        label: "subid-runc, map mode",
    },
];

fn main() -> anyhow::Result<()> {
    let report = run()?;
    subidd_tests::publish("docker", &report)
}

fn run() -> anyhow::Result<String> {
    // The socket and pins on a tmpfs, as /run is on a systemd host.
    let run_dir = tempfile::Builder::new()
        .prefix("subidd-bench")
        .tempdir_in(if std::path::Path::new("/dev/shm").is_dir() {
            "/dev/shm"
        } else {
            "/tmp"
        })
        .context("runtime dir")?;
    let daemon = Daemon::start_with_run_dir(POOL, run_dir.path()).context("start subidd")?;
    let wrapper = subid_runc_bin()?;
    let entry = |name: &str, mode: &str| RuntimeEntry {
        name: name.into(),
        path: wrapper.clone(),
        args: vec![
            format!("--subid-socket={}", daemon.socket.display()),
            format!("--subid-mode={mode}"),
            "--subid-state-dir={dir}/subid-runc".into(),
        ],
    };
    let engine = Dockerd::start(EngineSpec {
        runtimes: vec![entry("subid", "join"), entry("subid-map", "map")],
        ..EngineSpec::default()
    })?;
    engine.import_busybox(IMAGE)?;
    let docker_version = engine.docker_ok(&["version", "--format", "{{.Server.Version}}"])?;
    let runc_version = Command::new("runc")
        .arg("--version")
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or("")
                .to_string()
        })
        .unwrap_or_default();

    let sample = |row: Row| -> anyhow::Result<Duration> {
        let t = Instant::now();
        let out = engine.docker(&["run", "--rm", "--runtime", row.runtime, IMAGE, "true"])?;
        let took = t.elapsed();
        ensure!(
            out.status.success(),
            "{}: {}",
            row.label,
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(took)
    };
    for row in ROWS {
        sample(row).with_context(|| format!("warm-up: {}", row.label))?;
    }
    let mut samples = vec![Vec::with_capacity(TURNS); ROWS.len()];
    for _ in 0..TURNS {
        for (row, s) in ROWS.iter().zip(samples.iter_mut()) {
            s.push(sample(*row)?);
        }
    }
    let stats: Vec<LatencyStats> = samples.into_iter().map(latency_stats).collect();

    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let base = ms(stats[0].p50);
    let mut report = format!(
        "## Docker: `docker run --rm IMAGE true`\n\n\
         {}, {}, {} CPUs; Docker {docker_version}, {runc_version}; a private dockerd (overlay2 on \
         ext4, no network), busybox image; subidd and subid-runc release builds, subidd's socket \
         on a tmpfs. {TURNS} turns after a warm-up, the rows taking turns. Target: subid-runc \
         within 1.3x of plain runc.\n\n\
         | runtime | p50 ms | p99 ms | p50 vs runc |\n|---|---|---|---|\n",
        subidd_tests::run_date(),
        subidd_tests::kernel(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
    );
    for (row, s) in ROWS.iter().zip(&stats) {
        report.push_str(&format!(
            "| {} | {:.0} | {:.0} | {:.2}x |\n",
            row.label,
            ms(s.p50),
            ms(s.p99),
            ms(s.p50) / base
        ));
    }
    report.push_str(&format!(
        "\nWhat the wrapper adds per container (create and delete): one lease `PUT` and one \
         `DELETE` (each a committed SQLite write), the lease's namespace (`PUT .../namespace`), \
         the leases' sweep (`GET /v1/leases?label=owner=docker`, on a create at most every 30 s), an idmapped clone of \
         the layers, the overlay mounted again, a bind over Docker's `merged`, three idmapped \
         bind sources, and `config.json` read and written once; Docker calls `delete` twice per \
         container. n = {} per row.\n",
        stats[0].n
    ));
    Ok(report)
}
