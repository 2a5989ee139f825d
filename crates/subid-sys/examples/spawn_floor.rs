//! Spawn latency floors beside subid-sys's spawn API: p50/p99 of starting `/bin/true` and
//! waiting for it, N iterations each (default 300; `spawn_floor <N>`). Needs root.
//!
//! Rows: plain fork+exec; raw clone(CLONE_NEWUSER) + maps + exec; raw setns + exec; `unshare
//! --user --map-root-user /bin/true` as a command; the API's first spawn (creates and pins the
//! namespace) and join; then the API join and plain fork again with 256 MiB of touched memory in
//! this process, to show which cost grows with the parent's size. The floors themselves live in
//! `subid_sys::floor`.

use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use subid_sys::cgroup::{CgroupHost, CgroupParent, CgroupVersion, LeaseCgroup};
use subid_sys::floor;
use subid_sys::userns::{self, UserNsSpec};
use subid_sys::{Command, LeaseNs, Namespace};

const BASE: u32 = 0x7050_0000;

type Row<'a> = (&'static str, Box<dyn FnMut() -> Duration + 'a>);
/// Named sample sets.
type Table = Vec<(&'static str, Vec<Duration>)>;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let n: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(300);
    let dir = tempfile::tempdir()?;
    let pin = dir.path().join("ns/bench/user");
    let first_pin = dir.path().join("ns/first/user");
    let spec = UserNsSpec::new(BASE, 65536);
    let first_spec = UserNsSpec::new(BASE + 0x2_0000, 65536);
    let truth = Command::new("/bin/true", ["true"]);
    // Unpinned on every way out, a panic in a row included: a pin left mounted outlives the
    // temporary directory.
    let _pins = Pins([pin.clone(), first_pin.clone()]);
    userns::create_pinned(&spec, &pin)?;
    let nsfd = userns::open_pinned(&pin)?;
    let lease_ns = LeaseNs::open(&pin)?;
    let join = || {
        timed(|| {
            let child = truth.spawn(Namespace::Join(&lease_ns)).expect("spawn");
            assert!(child.wait().expect("wait").success());
        })
    };

    // The machine is shared and noisy: rows take turns, so noise hits them alike.
    let small: Vec<Row> = vec![
        (
            "fork + exec /bin/true, waited",
            Box::new(|| timed(|| floor::fork_exec_true().expect("fork + exec"))),
        ),
        (
            "raw clone(NEWUSER) + uid/gid maps + exec",
            Box::new(|| {
                timed(|| {
                    floor::clone_newuser_maps_exec_true(BASE + 0x1_0000).expect("clone + exec")
                })
            }),
        ),
        (
            "raw fork + setns + exec",
            Box::new(|| timed(|| floor::setns_exec_true(nsfd.as_fd()).expect("setns + exec"))),
        ),
        (
            "unshare --user --map-root-user /bin/true",
            Box::new(|| timed(|| floor::unshare_command_true().expect("unshare"))),
        ),
        (
            "API first spawn (create + pin + exec)",
            Box::new(|| {
                // unpinning is teardown, outside the timing
                let took = timed(|| {
                    let child = truth
                        .spawn(Namespace::Create {
                            spec: &first_spec,
                            pin: &first_pin,
                        })
                        .expect("first spawn");
                    assert!(child.wait().expect("wait").success());
                });
                userns::unpin(&first_pin).expect("unpin");
                took
            }),
        ),
        ("API join (setns + exec)", Box::new(join)),
    ];
    let mut table = run(n, small, true);
    table.extend(cgroup_rows(n, &lease_ns)?);

    // 256 MiB of touched memory: a plain fork copies its page tables, the vfork way does not.
    let ballast = vec![1u8; 256 << 20];
    std::hint::black_box(&ballast);
    let big: Vec<Row> = vec![
        ("API join, parent holds 256 MiB", Box::new(join)),
        (
            "fork + exec, parent holds 256 MiB",
            Box::new(|| timed(|| floor::fork_exec_true().expect("fork + exec"))),
        ),
    ];
    // One after the other: a forked 256 MiB child tears its page tables down while the next
    // sample would run.
    table.extend(run(n.min(100), big, false));
    drop(ballast);
    drop(nsfd);
    drop(lease_ns);

    println!("{:<46} {:>6} {:>10} {:>10}", "path", "n", "p50", "p99");
    for (name, mut samples) in table {
        samples.sort();
        println!(
            "{:<46} {:>6} {:>8.0}us {:>8.0}us",
            name,
            samples.len(),
            pct(&samples, 0.50),
            pct(&samples, 0.99)
        );
    }
    Ok(())
}

/// Pins unmounted when dropped (one not mounted is no error).
struct Pins([std::path::PathBuf; 2]);

impl Drop for Pins {
    fn drop(&mut self) {
        for pin in &self.0 {
            let _ = userns::unpin(pin);
        }
    }
}

/// Joins with and without a lease cgroup, in turns: the pids cgroup wherever this host has it
/// (v1 here: the lease spawner, already in the cgroup, clones the child), the cgroup2
/// hierarchy (`clone3(CLONE_INTO_CGROUP)`, even without pids), back-to-back and spread out
/// (50 ms idle before each sample, outside the timing).
/// The cgroups are removed afterwards.
fn cgroup_rows(n: usize, lease_ns: &LeaseNs) -> Result<Table, Box<dyn std::error::Error>> {
    let host = CgroupHost::detect()?;
    let tag = format!("subidd-bench-{}", std::process::id());
    let mut made = Vec::new();
    // (name back-to-back, name spread out, command)
    let mut rows: Vec<(&'static str, &'static str, Command)> = vec![(
        "API join, no cgroup",
        "API join, no cgroup, spread out",
        Command::new("/bin/true", ["true"]),
    )];
    for (h, max) in [
        (host.pids(), Some(1000)),
        (host.unified().filter(|u| !u.pids), None),
    ] {
        let Some(h) = h else { continue };
        let parent = CgroupParent::prepare(h, Some(&h.own_dir.join(&tag)))?;
        let cg = LeaseCgroup::create(&parent, "bench", max)?;
        let mut cmd = Command::new("/bin/true", ["true"]);
        cmd.cgroup(cg.spawn_handle()?);
        match (h.version, h.pids) {
            // A join into a v1 cgroup goes through the lease spawner (below).
            (CgroupVersion::V1, _) => {}
            (CgroupVersion::V2, true) => rows.push((
                "API join, v2 pids cgroup (clone3 INTO_CGROUP)",
                "API join, v2 pids cgroup (clone3), spread out",
                cmd,
            )),
            (CgroupVersion::V2, false) => rows.push((
                "API join, cgroup2 no pids (clone3 INTO_CGROUP)",
                "API join, cgroup2 (clone3), spread out",
                cmd,
            )),
        }
        if h.version == CgroupVersion::V1 {
            let mut cmd = Command::new("/bin/true", ["true"]);
            cmd.cgroup(cg.start_spawner()?);
            rows.push((
                "API join, v1 pids cgroup via lease spawner",
                "API join, v1 via lease spawner, spread out",
                cmd,
            ));
        }
        made.push((parent, cg));
    }
    let make = |spaced: bool| -> Vec<Row> {
        rows.iter()
            .map(|(name, spaced_name, cmd)| {
                let f: Box<dyn FnMut() -> Duration> = Box::new(move || {
                    if spaced {
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    timed(|| {
                        let child = cmd.spawn(Namespace::Join(lease_ns)).expect("spawn");
                        assert!(child.wait().expect("wait").success());
                    })
                });
                (if spaced { *spaced_name } else { *name }, f)
            })
            .collect()
    };
    let mut table = run(n, make(false), true);
    table.extend(run(n.min(100), make(true), true));
    for (parent, cg) in made {
        cg.kill_all_and_remove()?;
        std::fs::remove_dir(parent.dir())?;
    }
    Ok(table)
}

/// One warm-up round, then `n` samples of every row: in turns, or row after row.
fn run(n: usize, mut rows: Vec<Row>, interleave: bool) -> Vec<(&'static str, Vec<Duration>)> {
    for (_, f) in rows.iter_mut() {
        f();
    }
    let mut samples = vec![Vec::with_capacity(n); rows.len()];
    if interleave {
        for _ in 0..n {
            for ((_, f), s) in rows.iter_mut().zip(samples.iter_mut()) {
                s.push(f());
            }
        }
    } else {
        for ((_, f), s) in rows.iter_mut().zip(samples.iter_mut()) {
            s.extend((0..n).map(|_| f()));
        }
    }
    rows.into_iter()
        .map(|(name, _)| name)
        .zip(samples)
        .collect()
}

fn timed(f: impl FnOnce()) -> Duration {
    let t = Instant::now();
    f();
    t.elapsed()
}

fn pct(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1e6
}
