//! What the log keeper costs the spawn path: p50/p90/p99/max of `Logs::attach` (two `pipe2`,
//! one `sendmsg`, the mirror); of the first `Logs::sync` after it (which waits for the keeper
//! to have created the two files) and of a second one (the round trip alone); and, for
//! comparison, of making a pair of log files in place (what every spawn paid when `LogPool`'s
//! pool was empty).
//! Needs root (the keeper accepts only root).
//!
//! `cargo build --release -p subidd --bins --examples &&
//!  target/release/examples/logs_attach target/release/subidd [N]` (N defaults to 500).

use std::time::{Duration, Instant};

use subidd::logs::{Logs, LogsConfig};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let program = args.next().ok_or("usage: logs_attach PATH-TO-SUBIDD [N]")?;
    let n: usize = args.next().map(|s| s.parse()).transpose()?.unwrap_or(500);
    let dir = tempfile::tempdir()?;
    let run = dir.path().join("run");
    std::fs::create_dir_all(&run)?;
    let mut config = LogsConfig::new(&run, dir.path().join("logs"), 1 << 20);
    config.program = program.into();
    let logs = Logs::start_with(config)?;
    let deadline = || Instant::now() + Duration::from_secs(10);

    let mut attach = Vec::with_capacity(n);
    let mut sync = Vec::with_capacity(n);
    let mut resync = Vec::with_capacity(n);
    for i in 0..n + 20 {
        let id = Logs::new_id();
        let t0 = Instant::now();
        let ends = logs.attach(&id)?;
        let took = t0.elapsed();
        let t1 = Instant::now();
        logs.sync(&id, deadline())?;
        let synced = t1.elapsed();
        let t2 = Instant::now();
        logs.sync(&id, deadline())?;
        let resynced = t2.elapsed();
        // The child would take the write ends; its exit closes them.
        drop(ends);
        logs.forget(&id);
        if i >= 20 {
            attach.push(took);
            sync.push(synced);
            resync.push(resynced);
        }
    }
    let mut files = Vec::with_capacity(n);
    for _ in 0..n {
        let id = Logs::new_id();
        let t0 = Instant::now();
        for stream in ["stdout", "stderr"] {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .mode(0o640)
                .open(dir.path().join("logs").join(format!("{id}.{stream}")))?;
        }
        files.push(t0.elapsed());
    }
    for (name, samples) in [
        ("Logs::attach (spawn path)", &mut attach),
        ("first Logs::sync (files made)", &mut sync),
        ("second Logs::sync (round trip)", &mut resync),
        ("create two log files in place", &mut files),
    ] {
        samples.sort();
        let at = |q: f64| samples[((samples.len() - 1) as f64 * q) as usize];
        println!(
            "{name:32} n={:4}  p50 {:>8.1?}  p90 {:>8.1?}  p99 {:>8.1?}  max {:>8.1?}",
            samples.len(),
            at(0.5),
            at(0.9),
            at(0.99),
            at(1.0)
        );
    }
    logs.shutdown_keeper(deadline())?;
    Ok(())
}
