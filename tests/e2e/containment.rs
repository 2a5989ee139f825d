//! Tenant containment, tried as a hostile tenant would: nothing of a lease outlives its release,
//! no range is issued while something holds its ids, no tenant stalls the daemon or fills its
//! disk. One test per attack; each asserts the outcome.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hyper::StatusCode;
use serde_json::{Value, json};
use subidd_tests::{Client, Daemon, Reply};

use crate::util::{BLOCK, assert_error, assert_status, gone, processes_in_range};

/// Base of the pool the id-holder test uses (block 4000 of the default pool), apart from the
/// blocks other tests' leases take.
const HOLD_BASE: u32 = 0x7000_0000 + 4000 * BLOCK;

/// A host process (not of any lease) started by the test; killed and reaped on drop.
struct HostProcess(Child);

impl HostProcess {
    /// `setpriv ARGS sleep 600`, as root.
    fn start(setpriv: &[String]) -> HostProcess {
        let child = Command::new("setpriv")
            .args(setpriv)
            .args(["sleep", "600"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("start setpriv");
        HostProcess(child)
    }

    fn pid(&self) -> u32 {
        self.0.id()
    }

    fn stop(mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for HostProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits (bounded) until `/proc/<pid>/status` shows the process with a uid or gid in `lo..hi`.
fn wait_holding(pid: u32, lo: u32, hi: u32) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let held = status
            .lines()
            .filter(|l| l.starts_with("Uid:") || l.starts_with("Gid:") || l.starts_with("Groups:"))
            .flat_map(|l| l.split_whitespace().skip(1))
            .filter_map(|v| v.parse::<u32>().ok())
            .any(|id| (lo..hi).contains(&id));
        if held {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "process {pid} never took ids in {lo}..{hi}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A live process holding an id of a block that is not leased (a survivor of an earlier tenant,
/// or a root process of the host) keeps that block from being issued, by uid and by
/// supplementary group alike; `GET /v1/pool` and `/metrics` say so; once the process is gone the
/// block is issued again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(not(subidd_root), ignore = "needs root")]
async fn a_block_whose_ids_a_live_process_holds_is_never_issued() {
    let config = format!(
        "quarantine_seconds = 0\n[pool]\nbase = {HOLD_BASE}\nsize = {}\nblock = {BLOCK}\n",
        4 * BLOCK
    );
    let by_uid = HOLD_BASE + 5;
    let by_group = HOLD_BASE + BLOCK + 7;
    // The holders take their ids before the daemon starts. The daemon reads a process when it
    // first sees it and again at each full scan, which begins as the daemon serves (and whenever
    // /etc/passwd changes, as other tests make users): a holder read as root between its fork
    // and its setresuid would be seen holding only at the next full scan (docs/SECURITY.md).
    let uid_holder = HostProcess::start(&[
        format!("--reuid={by_uid}"),
        format!("--regid={by_uid}"),
        "--clear-groups".into(),
    ]);
    let group_holder = HostProcess::start(&[
        "--reuid=65534".into(),
        "--regid=65534".into(),
        format!("--groups={by_group}"),
    ]);
    wait_holding(uid_holder.pid(), HOLD_BASE, HOLD_BASE + BLOCK);
    wait_holding(group_holder.pid(), HOLD_BASE + BLOCK, HOLD_BASE + 2 * BLOCK);
    let daemon = Daemon::start(&config).expect("start daemon");
    let client = daemon.client();

    let lease = client.put("/v1/leases/first", None).await.expect("PUT");
    assert_status(&lease, StatusCode::CREATED, "PUT first");
    assert_eq!(
        lease.json()["uid_base"],
        HOLD_BASE + 2 * BLOCK,
        "blocks 0 and 1 are held by live processes: the lease gets block 2"
    );
    let pool = client.get("/v1/pool").await.expect("GET pool").json();
    assert_eq!(pool["blocks"]["withheld"], 2, "two blocks withheld: {pool}");
    let warnings = pool["warnings"].as_array().expect("warnings");
    for (pid, id) in [(uid_holder.pid(), by_uid), (group_holder.pid(), by_group)] {
        assert!(
            warnings.iter().any(|w| w["code"] == "ids_held_by_process"
                && w["claim"].as_str().is_some_and(
                    |c| c.contains(&format!("process {pid} ")) && c.contains(&id.to_string())
                )),
            "a warning names process {pid} and id {id}: {pool}"
        );
    }
    let metrics = client.get("/metrics").await.expect("metrics").text();
    assert!(
        metrics.contains("subidd_pool_blocks_held_by_processes 2"),
        "metric counts the held blocks:\n{metrics}"
    );

    // Gone: the next create sees the process list again and the blocks come back.
    uid_holder.stop();
    group_holder.stop();
    let lease = client.put("/v1/leases/second", None).await.expect("PUT");
    assert_status(&lease, StatusCode::CREATED, "PUT second");
    assert_eq!(
        lease.json()["uid_base"],
        HOLD_BASE,
        "block 0 is free again once its holder is gone"
    );
    let pool = client.get("/v1/pool").await.expect("GET pool").json();
    assert_eq!(pool["blocks"]["withheld"], 0, "nothing withheld: {pool}");
    assert!(
        pool["warnings"].as_array().is_some_and(|w| w.is_empty()),
        "no warnings left: {pool}"
    );
}

/// The config of a pool of `blocks` blocks starting at block `first` of the default pool (each
/// test its own region, so no other test's processes ever hold its ids), with `extra` keys.
fn region(first: u32, blocks: u32, extra: &str) -> (String, u64) {
    let base = 0x7000_0000 + first * BLOCK;
    let config = format!(
        "quarantine_seconds = 0\nkill_grace_ms = 300\n{extra}\n[pool]\nbase = {base}\nsize = {}\nblock = {BLOCK}\n",
        blocks * BLOCK
    );
    (config, u64::from(base))
}

async fn put(client: &Client, name: &str, body: Option<&str>) -> Value {
    let reply = client
        .put(&format!("/v1/leases/{name}"), body)
        .await
        .expect("PUT");
    assert_status(&reply, StatusCode::CREATED, &format!("PUT {name}"));
    reply.json()
}

async fn spawn(client: &Client, lease: &str, argv: &[&str]) -> Value {
    let body = json!({ "argv": argv }).to_string();
    let reply = client
        .post(&format!("/v1/leases/{lease}/processes"), Some(&body))
        .await
        .expect("spawn");
    assert_status(&reply, StatusCode::CREATED, &format!("spawn in {lease}"));
    reply.json()
}

/// `POST .../processes?wait=true` of `/bin/true` in `lease`: the answer.
async fn run_true(client: &Client, lease: &str) -> Reply {
    client
        .post(
            &format!("/v1/leases/{lease}/processes?wait=true"),
            Some(r#"{"argv":["/bin/true"]}"#),
        )
        .await
        .expect("spawn")
}

/// The first line a process wrote to stdout (bounded wait).
async fn first_line(client: &Client, id: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = client
            .get(&format!("/v1/processes/{id}/logs"))
            .await
            .expect("logs")
            .text();
        if let Some(line) = text.lines().next() {
            return line.to_string();
        }
        assert!(Instant::now() < deadline, "process {id} wrote nothing");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A sleeper that hides in a nested user namespace (invisible to a scan of the lease's own
/// namespace) is killed by a forced release, and the next tenant of the range finds nothing of
/// the last one running.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(not(subidd_root), ignore = "needs root")]
async fn a_process_in_a_nested_namespace_does_not_outlive_a_forced_release() {
    let (config, base) = region(4010, 1, "");
    let daemon = Daemon::start(&config).expect("start");
    let client = daemon.client();
    put(&client, "a", None).await;
    let p = spawn(
        &client,
        "a",
        &[
            "/bin/sh",
            "-c",
            "setsid unshare -U /bin/sleep 1000 & echo $!; exec sleep 1000",
        ],
    )
    .await;
    let hidden: i64 = first_line(&client, p["id"].as_str().expect("id"))
        .await
        .parse()
        .expect("pid");
    let size = u64::from(BLOCK);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !processes_in_range(base, size).contains(&(hidden as i32)) {
        assert!(
            Instant::now() < deadline,
            "the hidden sleeper never started"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let reply = client
        .delete("/v1/leases/a?force=true&purge=true")
        .await
        .expect("DELETE");
    assert_status(&reply, StatusCode::NO_CONTENT, "forced release");
    assert!(
        processes_in_range(base, size).is_empty(),
        "nothing runs in the released range: {:?}",
        processes_in_range(base, size)
    );
    assert!(gone(hidden).await, "the hidden sleeper {hidden} is gone");
    let next = put(&client, "b", None).await;
    assert_eq!(
        next["uid_base"].as_u64(),
        Some(base),
        "the next tenant gets the range"
    );
    assert!(processes_in_range(base, size).is_empty());
}

/// A process that forks and lets its parent exit as fast as it can cannot outrun a forced
/// release: the cgroup holds every generation.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(not(subidd_root), ignore = "needs root")]
async fn a_fork_racer_does_not_outrun_a_forced_release() {
    let (config, base) = region(4012, 1, "");
    let daemon = Daemon::start(&config).expect("start");
    let client = daemon.client();
    put(&client, "racer", None).await;
    let racer = "import os\nwhile True:\n    if os.fork() != 0:\n        os._exit(0)\n";
    spawn(&client, "racer", &["/usr/bin/python3", "-c", racer]).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let size = u64::from(BLOCK);
    let reply = client
        .delete("/v1/leases/racer?force=true")
        .await
        .expect("DELETE");
    assert_status(&reply, StatusCode::NO_CONTENT, "forced release");
    for _ in 0..20 {
        let left = processes_in_range(base, size);
        assert!(left.is_empty(), "the racer survived the release: {left:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A plain release of a lease whose only process sits in a nested user namespace is refused
/// (`lease_busy`), and the process keeps running; wherever in the lease a process is, the lease
/// has processes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(not(subidd_root), ignore = "needs root")]
async fn a_plain_release_is_refused_while_a_nested_process_lives() {
    let (config, base) = region(4014, 2, "");
    let daemon = Daemon::start(&config).expect("start");
    let client = daemon.client();
    for (lease, body) in [("capped", Some(r#"{"pids_max": 50}"#)), ("plain", None)] {
        put(&client, lease, body).await;
        let p = spawn(
            &client,
            lease,
            &[
                "/bin/sh",
                "-c",
                "setsid unshare -U /bin/sleep 1000 & echo $!",
            ],
        )
        .await;
        let id = p["id"].as_str().expect("id");
        let hidden: i64 = first_line(&client, id).await.parse().expect("pid");
        let done = client
            .post(&format!("/v1/processes/{id}/wait?timeout_seconds=10"), None)
            .await
            .expect("wait")
            .json();
        assert_eq!(
            done["state"], "exited",
            "the recorded process ended: {done}"
        );
        let reply = client
            .delete(&format!("/v1/leases/{lease}"))
            .await
            .expect("DELETE");
        assert_error(&reply, StatusCode::CONFLICT, "lease_busy", "plain release");
        assert!(
            reply.json()["message"]
                .as_str()
                .is_some_and(|m| m.contains(&hidden.to_string())),
            "the message names what is left: {}",
            reply.text()
        );
        assert!(!gone_now(hidden), "the nested process still runs");
        let reply = client
            .delete(&format!("/v1/leases/{lease}?force=true"))
            .await
            .expect("DELETE");
        assert_status(&reply, StatusCode::NO_CONTENT, "forced release");
        assert!(gone(hidden).await);
    }
    assert!(processes_in_range(base, 2 * u64::from(BLOCK)).is_empty());
}

fn gone_now(pid: i64) -> bool {
    !std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z "))
}

/// Lease names equal to cgroup interface files work like any other, with a cap: a lease's
/// cgroup is `lease-<name>`, never the kernel's file.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(not(subidd_root), ignore = "needs root")]
#[cfg_attr(
    not(subidd_pids),
    ignore = "needs a pids cgroup controller on this host"
)]
async fn lease_names_like_cgroup_files_get_cgroups_of_their_own() {
    let (config, _) = region(4016, 4, "");
    let daemon = Daemon::start(&config).expect("start");
    let client = daemon.client();
    for name in ["tasks", "cgroup.procs", "notify_on_release"] {
        put(&client, name, Some(r#"{"pids_max": 500}"#)).await;
        let reply = client
            .post(
                &format!("/v1/leases/{name}/processes?wait=true"),
                Some(r#"{"argv":["/bin/true"]}"#),
            )
            .await
            .expect("spawn");
        assert_status(&reply, StatusCode::CREATED, name);
        assert_eq!(reply.json()["exit_code"], 0, "{}", reply.text());
        let limits = client
            .get(&format!("/v1/leases/{name}"))
            .await
            .expect("GET")
            .json()["limits"]
            .clone();
        assert_eq!(limits["pids_max"], 500, "{limits}");
        let reply = client
            .delete(&format!("/v1/leases/{name}"))
            .await
            .expect("DELETE");
        assert_status(&reply, StatusCode::NO_CONTENT, name);
    }
}

/// `pids_max` is the lease's whole budget on every layout: with 25, a process of the lease forks
/// 24 children and no more, whatever helper the daemon keeps beside it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(not(subidd_root), ignore = "needs root")]
#[cfg_attr(
    not(subidd_pids),
    ignore = "needs a pids cgroup controller on this host"
)]
async fn pids_max_is_the_leases_whole_budget() {
    let (config, _) = region(4020, 1, "");
    let daemon = Daemon::start(&config).expect("start");
    let client = daemon.client();
    put(&client, "budget", Some(r#"{"pids_max": 25}"#)).await;
    // A first spawn makes the namespace; the count runs in a join, through any spawner.
    let first = run_true(&client, "budget").await;
    assert_status(&first, StatusCode::CREATED, "first spawn");
    let script = "import os, time\nn = 0\ntry:\n    while True:\n        if os.fork() == 0:\n            time.sleep(1000)\n        n += 1\nexcept OSError as e:\n    print(n, e.errno, flush=True)\ntime.sleep(1000)\n";
    let p = spawn(&client, "budget", &["/usr/bin/python3", "-c", script]).await;
    let line = first_line(&client, p["id"].as_str().expect("id")).await;
    let forked: u32 = line
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .expect("count");
    assert_eq!(forked, 24, "python and 24 children are the 25 ({line})");
    let limits = client.get("/v1/leases/budget").await.expect("GET").json()["limits"].clone();
    assert_eq!(limits["pids_current"], 25, "{limits}");
    assert!(limits["pids_denied"].as_u64() > Some(0), "{limits}");
    let reply = client
        .delete("/v1/leases/budget?force=true")
        .await
        .expect("DELETE");
    assert_status(&reply, StatusCode::NO_CONTENT, "forced release");
}

/// A tenant that SIGSTOPs every process it may signal (as a lease's root may, once a spawning
/// child has joined its namespace) stalls nothing: each spawn into its lease answers within the
/// spawn deadline (201, or 503 `spawn_timeout` with the child killed), another lease's spawns
/// answer meanwhile, a ttl expiry happens on time, a forced release of the lease answers, and
/// SIGTERM still stops the daemon.
///
/// Another lease's spawns must not time out. They did, rarely, in CI: a victim's child,
/// stopped before its exec, held a copy of the daemon's fd table, the bystander's error pipe
/// among it, until the victim's deadline. Children now drop the daemon's fds before they join
/// a lease (`subid-sys` test `a_child_a_tenant_stops_holds_none_of_the_callers_fds`). The
/// deadline is 1 s, so that a loaded machine's scheduling does not pass for a stall.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(not(subidd_root), ignore = "needs root")]
async fn a_tenant_that_stops_spawning_children_stalls_nothing() {
    let (config, base) = region(4022, 3, "spawn_timeout_ms = 1000\nexpiry_interval_ms = 200");
    let mut daemon = Daemon::start(&config).expect("start");
    let client = daemon.client();
    put(&client, "victim", None).await;
    put(&client, "bystander", None).await;
    // The bystander's namespace is made before the stall: what is under test is that its
    // spawns join on while another lease is stalled. (Making a namespace pins it with bind
    // mounts, which may wait on other tests' mounts beyond this daemon's short spawn deadline:
    // set-up, so tried again.)
    let mut made = false;
    for _ in 0..5 {
        let reply = run_true(&client, "bystander").await;
        if reply.status == StatusCode::CREATED {
            made = true;
            break;
        }
        assert_eq!(reply.code(), "spawn_timeout", "{}", reply.text());
    }
    assert!(made, "the bystander's namespace was never made");
    let stopper = "import os, signal\nme = os.getpid()\nwhile True:\n    for d in os.listdir('/proc'):\n        if d.isdigit() and int(d) != me:\n            try:\n                os.kill(int(d), signal.SIGSTOP)\n            except OSError:\n                pass\n";
    spawn(&client, "victim", &["/usr/bin/python3", "-c", stopper]).await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Spawns into the victim, in a task of their own.
    let victim_client = daemon.client();
    let victim = tokio::spawn(async move {
        let (mut created, mut timeouts, mut slowest) = (0, 0, Duration::ZERO);
        for _ in 0..60 {
            let t0 = Instant::now();
            let reply = victim_client
                .post(
                    "/v1/leases/victim/processes",
                    Some(r#"{"argv":["/bin/sleep","1000"]}"#),
                )
                .await
                .expect("spawn");
            slowest = slowest.max(t0.elapsed());
            match reply.status {
                StatusCode::CREATED => created += 1,
                StatusCode::SERVICE_UNAVAILABLE => {
                    assert_eq!(reply.code(), "spawn_timeout", "{}", reply.text());
                    timeouts += 1;
                }
                other => panic!("unexpected {other}: {}", reply.text()),
            }
            if timeouts >= 3 {
                break;
            }
        }
        (created, timeouts, slowest)
    });
    // Meanwhile another lease's spawns answer, and a lease with a ttl expires.
    let ttl = put(&client, "short", Some(r#"{"ttl_seconds": 1}"#)).await;
    assert!(ttl["expires_at"].is_string());
    for _ in 0..10 {
        let t0 = Instant::now();
        let reply = run_true(&client, "bystander").await;
        if reply.status != StatusCode::CREATED {
            let log = daemon.log_text();
            let tail: Vec<&str> = log.lines().rev().take(80).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            panic!(
                "bystander spawn: {} {}\ndaemon log (last lines):\n{}",
                reply.status,
                reply.text(),
                tail.join("\n")
            );
        }
        assert!(
            t0.elapsed() < Duration::from_secs(3),
            "a bystander's spawn took {:?}",
            t0.elapsed()
        );
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let state = client.get("/v1/leases/short").await.expect("GET");
        if state.status == StatusCode::NOT_FOUND || state.json()["state"] == "released" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the ttl lease never expired: {}",
            state.text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (created, timeouts, slowest) = victim.await.expect("victim task");
    println!(
        "victim: {created} spawns started, {timeouts} stopped and killed at the deadline, slowest answer {slowest:?}"
    );
    assert!(timeouts > 0, "the stopper never caught a spawning child");
    assert!(
        slowest < Duration::from_secs(5),
        "a spawn into the stalled lease took {slowest:?}"
    );
    let t0 = Instant::now();
    let reply = client
        .delete("/v1/leases/victim?force=true")
        .await
        .expect("DELETE");
    assert_status(
        &reply,
        StatusCode::NO_CONTENT,
        "forced release of the stalled lease",
    );
    assert!(t0.elapsed() < Duration::from_secs(20), "{:?}", t0.elapsed());
    assert!(processes_in_range(base, u64::from(BLOCK)).is_empty());
    let t0 = Instant::now();
    let code = daemon.stop().expect("SIGTERM stops the daemon");
    assert_eq!(code, Some(0));
    assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
}

/// A test's daemon, dropped while its leases run processes, leaves nothing: no namespace pin
/// mounted under its runtime dir, no process in its range, no cgroup.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(not(subidd_root), ignore = "needs root")]
async fn a_dropped_test_daemon_leaves_no_mount_process_or_cgroup() {
    let (config, base) = region(4026, 2, "");
    let daemon = Daemon::start(&config).expect("start");
    let client = daemon.client();
    for lease in ["one", "two"] {
        put(&client, lease, Some(r#"{"namespaces": ["mnt", "net"]}"#)).await;
        spawn(&client, lease, &["/bin/sleep", "1000"]).await;
    }
    let run = daemon.run.clone();
    let parent = daemon.cgroup_parent.clone().expect("a test cgroup parent");
    let pool = client.get("/v1/pool").await.expect("pool").json();
    let lease_cgroups = std::path::PathBuf::from(
        pool["cgroup"]["lease_cgroups"]
            .as_str()
            .expect("lease cgroups"),
    );
    assert!(lease_cgroups.ends_with(parent.trim_start_matches('/')));
    let mounted = |dir: &std::path::Path| {
        std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
            .filter(|l| {
                l.split(' ')
                    .nth(4)
                    .is_some_and(|m| m.starts_with(dir.to_str().unwrap_or("-")))
            })
            .count()
    };
    assert!(mounted(&run) > 0, "pins are mounted while it runs");
    assert_eq!(processes_in_range(base, 2 * u64::from(BLOCK)).len(), 2);
    drop(client);
    drop(daemon);
    assert_eq!(mounted(&run), 0, "no mount left under {}", run.display());
    assert!(
        processes_in_range(base, 2 * u64::from(BLOCK)).is_empty(),
        "no lease process left"
    );
    assert!(
        !lease_cgroups.exists(),
        "{} removed",
        lease_cgroups.display()
    );
}

/// Disk a log file takes: the larger of its size and its allocated blocks.
fn disk_use(path: &std::path::Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).map_or(0, |m| m.len().max(m.blocks() * 512))
}

/// A tenant cannot make its logs use more than `log_max_bytes` plus the keeper's slack on disk,
/// whatever it does: a writer as fast as it can go, a writer that outlives the recorded process,
/// `fallocate` on its stdout. The newest output is kept and readable.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(not(subidd_root), ignore = "needs root")]
async fn a_tenant_cannot_grow_its_logs_past_the_bound() {
    const MAX: u64 = 64 * 1024;
    // The keeper's slack: a quarter of the limit, at least 64 KiB (subid_sys::logkeep::slack).
    const BOUND: u64 = MAX + 64 * 1024;
    let (config, base) = region(4030, 1, &format!("log_max_bytes = {MAX}"));
    let daemon = Daemon::start(&config).expect("start");
    let client = daemon.client();
    put(&client, "noisy", None).await;
    let fast = spawn(&client, "noisy", &["/bin/sh", "-c", "exec cat /dev/zero"]).await;
    // Outlives its recorded process: the shell exits at once, the writer goes on.
    let orphan = spawn(
        &client,
        "noisy",
        &["/bin/sh", "-c", "(yes orphan-line &) ; exit 0"],
    )
    .await;
    let prealloc = spawn(
        &client,
        "noisy",
        &[
            "/usr/bin/python3",
            "-c",
            "import os, sys\ntry:\n    os.posix_fallocate(1, 0, 1 << 31)\n    print('fallocate worked', file=sys.stderr)\nexcept OSError as e:\n    print('fallocate refused', e.errno, file=sys.stderr)\n",
        ],
    )
    .await;
    let logs = daemon.path("state").join("logs");
    let ids: Vec<String> = [&fast, &orphan, &prealloc]
        .iter()
        .map(|p| p["id"].as_str().expect("id").to_string())
        .collect();
    let mut largest = 0;
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        for id in &ids {
            for stream in ["stdout", "stderr"] {
                largest = largest.max(disk_use(&logs.join(format!("{id}.{stream}"))));
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    println!("largest log file seen on disk: {largest} bytes (bound {BOUND})");
    assert!(
        largest <= BOUND,
        "a log file took {largest} bytes, bound {BOUND}"
    );
    assert!(largest >= MAX, "the floods did write: {largest}");
    let orphan_out = client
        .get(&format!("/v1/processes/{}/logs", ids[1]))
        .await
        .expect("logs")
        .text();
    assert!(orphan_out.ends_with("orphan-line\n") || orphan_out.contains("orphan-line"));
    assert!(
        orphan_out.len() as u64 <= MAX,
        "the answer is the last log_max_bytes"
    );
    let refused = client
        .get(&format!("/v1/processes/{}/logs?stream=stderr", ids[2]))
        .await
        .expect("logs")
        .text();
    assert!(refused.contains("fallocate refused"), "{refused}");
    let reply = client
        .delete("/v1/leases/noisy?force=true")
        .await
        .expect("DELETE");
    assert_status(&reply, StatusCode::NO_CONTENT, "forced release");
    assert!(processes_in_range(base, u64::from(BLOCK)).is_empty());
    for id in &ids {
        assert!(
            !logs.join(format!("{id}.stdout")).exists(),
            "logs go with the lease"
        );
    }
}

/// What a runtime may attach to a lease: only the cgroup of a process inside the lease, never
/// the daemon's or the host's root; an attached cgroup holds the lease until it is empty or the
/// release is forced, which kills it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(not(subidd_root), ignore = "needs root")]
async fn only_a_cgroup_inside_the_lease_can_be_attached_and_it_holds_the_lease() {
    let (config, base) = region(4034, 1, "");
    let daemon = Daemon::start(&config).expect("start");
    let client = daemon.client();
    put(&client, "outer", None).await;
    let post = |body: Value| {
        let client = daemon.client();
        async move {
            client
                .post("/v1/leases/outer/attach", Some(&body.to_string()))
                .await
                .expect("attach")
        }
    };
    let reply = post(json!({"pid": 0, "id": "c1"})).await;
    assert_error(&reply, StatusCode::BAD_REQUEST, "invalid_request", "pid 0");
    let reply = post(json!({"pid": 999_999_999, "id": "c1"})).await;
    assert_error(
        &reply,
        StatusCode::BAD_REQUEST,
        "invalid_request",
        "no such pid",
    );
    let me = std::process::id();
    let reply = post(json!({"pid": me, "id": "c1"})).await;
    assert_error(
        &reply,
        StatusCode::CONFLICT,
        "not_in_lease",
        "a host process",
    );
    // The host's init: outside the lease, whether or not this host lets its namespace be read.
    let reply = post(json!({"pid": 1, "id": "c1"})).await;
    assert_error(
        &reply,
        StatusCode::CONFLICT,
        "not_in_lease",
        "the host's init",
    );
    let reply = post(json!({"pid": 1, "id": "../x"})).await;
    assert_error(
        &reply,
        StatusCode::BAD_REQUEST,
        "invalid_request",
        "a bad id",
    );

    // A container of the lease in a cgroup of its own, as a runtime would make it: a process
    // in the lease's namespace (nsenter on the pin) moved into a fresh cgroup2 directory.
    let ns = client
        .put("/v1/leases/outer/namespace", None)
        .await
        .expect("namespace")
        .json();
    let pin = ns["user"].as_str().expect("pin").to_string();
    let pool = client.get("/v1/pool").await.expect("pool").json();
    let lease_cgroups = std::path::PathBuf::from(
        pool["cgroup"]["lease_cgroups"]
            .as_str()
            .expect("lease cgroups"),
    );
    let container_cg = lease_cgroups
        .parent()
        .expect("parent")
        .join(format!("container-{}", std::process::id()));
    std::fs::create_dir_all(&container_cg).expect("mkdir container cgroup");
    struct Gone(std::path::PathBuf);
    impl Drop for Gone {
        fn drop(&mut self) {
            subidd_tests::kill_cgroup_tree(&self.0);
        }
    }
    let _gone = Gone(container_cg.clone());
    // A root process of the host in the lease's namespace would be nobody's: run as its root.
    let mut child = Command::new("nsenter")
        .arg(format!("--user={pin}"))
        .args(["--setuid=0", "--setgid=0", "/bin/sleep", "1000"])
        .spawn()
        .expect("nsenter");
    let pid = child.id();
    std::fs::write(container_cg.join("cgroup.procs"), pid.to_string()).expect("move it");
    let reply = post(json!({"pid": pid, "id": "c1"})).await;
    assert_status(&reply, StatusCode::OK, "attach the container");
    assert_eq!(reply.json()["processes"], 1, "{}", reply.text());
    let listed = client
        .get("/v1/leases/outer/attach")
        .await
        .expect("list")
        .json();
    assert_eq!(listed["attached"][0]["id"], "c1", "{listed}");
    let busy = client.delete("/v1/leases/outer").await.expect("DELETE");
    assert_error(&busy, StatusCode::CONFLICT, "lease_busy", "plain release");
    let forced = client
        .delete("/v1/leases/outer?force=true")
        .await
        .expect("DELETE");
    assert_status(&forced, StatusCode::NO_CONTENT, "forced release");
    let _ = child.wait();
    assert!(processes_in_range(base, u64::from(BLOCK)).is_empty());
}
