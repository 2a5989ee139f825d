//! The process service as the daemon builds it, driven directly: an expiry that finds its lease
//! renewed meanwhile (the expiry pass read a view older than the renewal's commit) leaves the
//! lease and its processes alone.

use std::path::PathBuf;
use std::time::Duration;

use subid_core::{Pool, PoolSpec};
use subid_sys::cgroup::{CgroupHost, CgroupParents, LeaseCgroup};
use subidd::lease::{CreateMode, LeaseService, LeaseSpec, ReleaseKind};
use subidd::process::{ProcessConfig, ProcessService, SpawnSpec};

const SUBIDD: &str = env!("CARGO_BIN_EXE_subidd");
const BLOCK: u32 = 65536;
/// Block 4090 of the default pool: apart from the ranges the other tests use.
const BASE: u32 = 0x7000_0000 + 4090 * BLOCK;

/// The test's lease cgroups and log keeper, gone on drop (also after a failed assertion).
struct Leftovers {
    cgroup_parent: PathBuf,
    keeper: PathBuf,
}

impl Drop for Leftovers {
    fn drop(&mut self) {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        if let Ok(client) = subid_sys::logkeep::Client::connect(&self.keeper, deadline) {
            let _ = client.shutdown(deadline);
        }
        let Ok(host) = CgroupHost::detect() else {
            return;
        };
        if let Ok(parents) = CgroupParents::prepare(&host, Some(&self.cgroup_parent), false) {
            for parent in [Some(parents.track()), parents.cap()].into_iter().flatten() {
                for name in parent.lease_names() {
                    if let Ok(cg) = LeaseCgroup::open(parent, &name) {
                        let _ = cg.kill_all_and_remove();
                    }
                }
                let _ = std::fs::remove_dir(parent.dir());
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(subidd_root), ignore = "needs root")]
async fn an_expiry_that_finds_its_lease_renewed_leaves_its_processes_alone() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cgroup_parent = PathBuf::from(format!("/subidd-tests/lifecycle-{}", std::process::id()));
    let _leftovers = Leftovers {
        cgroup_parent: cgroup_parent.clone(),
        keeper: dir.path().join("run/logkeeper.sock"),
    };
    let (store, writer) = subid_store::open(&dir.path().join("subidd.db"))
        .await
        .expect("store");
    let pool = Pool::new(PoolSpec {
        base: BASE,
        size: 2 * BLOCK,
        block: BLOCK,
    })
    .expect("pool");
    let leases = LeaseService::start(store, writer, pool, Duration::ZERO)
        .await
        .expect("lease service");
    let processes = ProcessService::start(
        leases,
        ProcessConfig {
            ns_dir: dir.path().join("run/ns"),
            log_dir: dir.path().join("logs"),
            runtime_dir: dir.path().join("run"),
            keeper_program: PathBuf::from(SUBIDD),
            log_max_bytes: 4096,
            kill_grace: Duration::from_millis(200),
            cgroup_parent: Some(cgroup_parent),
            spawn_timeout: Duration::from_secs(5),
            reserve: dir.path().join("release-reserve"),
        },
    )
    .await
    .expect("process service");
    let spec = LeaseSpec {
        ttl_seconds: Some(3600),
        ..LeaseSpec::default()
    };
    processes
        .create_lease("renewed".into(), spec, CreateMode::Ensure, None)
        .await
        .expect("create");
    let record = processes
        .spawn(
            "renewed".into(),
            SpawnSpec {
                program: PathBuf::from("/bin/sleep"),
                argv: vec!["sleep".into(), "1000".into()],
                env: Vec::new(),
                cwd: PathBuf::from("/"),
                user: 0,
                group: 0,
                groups: Vec::new(),
                rlimits: Default::default(),
                umask: 0o022,
            },
            std::time::Duration::ZERO,
        )
        .await
        .expect("spawn")
        .record;

    // The expiry pass read the lease as expired; by the time its release runs, the lease has
    // been renewed (here: it never was due). Nothing may be torn down.
    processes
        .release("renewed".into(), false, true, None, ReleaseKind::Expire)
        .await
        .expect("the expiry finds nothing to do");
    let alive = std::fs::read_to_string(format!("/proc/{}/stat", record.pid))
        .is_ok_and(|s| !s.contains(") Z "));
    assert!(alive, "the renewed lease's process still runs");
    let listed = processes
        .list("renewed")
        .await
        .expect("the lease is active");
    assert_eq!(listed.len(), 1);

    processes
        .release("renewed".into(), true, true, None, ReleaseKind::Delete)
        .await
        .expect("forced release");
}
