//! Tenant containment, tried as a hostile tenant would: nothing of a lease outlives its release,
//! no range is issued while something holds its ids, no tenant stalls the daemon or fills its
//! disk. One test per attack; each asserts the outcome.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hyper::StatusCode;
use subidd_tests::Daemon;

use crate::util::{BLOCK, assert_status};

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
    let daemon = Daemon::start(&config).expect("start daemon");
    let client = daemon.client();
    let by_uid = HOLD_BASE + 5;
    let by_group = HOLD_BASE + BLOCK + 7;
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
