//! Lease cgroups: detection, pids.max on real cgroups (wherever this host's pids controller
//! lives), `CLONE_INTO_CGROUP` on the real cgroup2 hierarchy, the cgroup2 file protocol on a fake
//! tree, teardown, and failed spawns leaving nothing behind. Each test prints which path ran.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use subid_sys::cgroup::{
    CgroupHost, CgroupMode, CgroupParent, CgroupParents, CgroupVersion, Hierarchy, LeaseCgroup,
    LeaseCgroups,
};
use subid_sys::{ChildStep, Command, Errno, PidFd, SysError};

use crate::support::{Lease, mounted, sh, wait_for_lines};

/// Held (shared) by every test that starts a v1 spawner, whose pidfd of this process lives in
/// this process's descriptor table as long as the spawner does; taken alone by the test that
/// counts those descriptors.
static SPAWNERS: std::sync::RwLock<()> = std::sync::RwLock::new(());

/// A parent cgroup for one test, removed (with anything left in it) on drop.
struct TestParent(CgroupParent);

impl TestParent {
    fn new(h: &Hierarchy, tag: &str) -> Self {
        let dir = h
            .own_dir
            .join(format!("subidd-it-{tag}-{}", std::process::id()));
        TestParent(CgroupParent::prepare(h, Some(&dir)).expect("prepare parent"))
    }
}

impl Drop for TestParent {
    fn drop(&mut self) {
        for name in self.0.lease_names() {
            if let Ok(cg) = LeaseCgroup::open(&self.0, &name)
                && let Err(err) = cg.kill_all_and_remove()
            {
                eprintln!("cleanup: {err}");
            }
        }
        if let Err(e) = fs::remove_dir(self.0.dir()) {
            eprintln!("cleanup: rmdir {:?}: {e}", self.0.dir());
        }
    }
}

fn pids_hierarchy() -> Hierarchy {
    let host = CgroupHost::detect().expect("detect");
    let h = host
        .require_pids()
        .expect("these tests need a pids controller")
        .clone();
    eprintln!(
        "pids controller: real cgroup {:?} hierarchy at {} (mode {})",
        h.version,
        h.mount.display(),
        host.mode()
    );
    h
}

fn unified_hierarchy() -> Hierarchy {
    let host = CgroupHost::detect().expect("detect");
    let h = host
        .unified()
        .expect("this test needs a cgroup2 mount")
        .clone();
    eprintln!(
        "cgroup2 path: real cgroup2 hierarchy at {} (pids {})",
        h.mount.display(),
        if h.pids {
            "on"
        } else {
            "off: CLONE_INTO_CGROUP and cgroup.kill only"
        }
    );
    h
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn sleeper_in(cg: &LeaseCgroup) -> Command {
    let mut cmd = Command::new("/bin/sleep", ["sleep", "60"]);
    cmd.cgroup(cg.start_spawner().unwrap());
    cmd
}

/// Pidfds of every process now in `cg`, to check later that teardown ended them.
fn members(cg: &LeaseCgroup) -> Vec<PidFd> {
    cg.procs()
        .unwrap()
        .into_iter()
        .filter_map(|p| PidFd::open(p).ok())
        .collect()
}

fn assert_all_exited(pids: &[PidFd]) {
    wait_until("every former member to exit", || {
        pids.iter().all(|p| p.has_exited().unwrap_or(true))
    });
}

#[test]
fn detection_matches_the_mount_table() {
    let host = CgroupHost::detect().unwrap();
    let summary = host.describe();
    eprintln!("detected: {summary:?}");
    let mounts = fs::read_to_string("/proc/self/mounts").unwrap();
    let v1_pids = mounts.lines().find_map(|l| {
        let f: Vec<&str> = l.split(' ').collect();
        (f.get(2) == Some(&"cgroup") && f[3].split(',').any(|o| o == "pids"))
            .then(|| PathBuf::from(f[1]))
    });
    let unified = mounts.lines().find_map(|l| {
        let f: Vec<&str> = l.split(' ').collect();
        (f.get(2) == Some(&"cgroup2")).then(|| PathBuf::from(f[1]))
    });
    let unified_pids = host.unified().is_some_and(|u| u.pids);
    let want = match (&v1_pids, &unified) {
        (_, Some(_)) if unified_pids => CgroupMode::V2,
        (Some(_), Some(_)) => CgroupMode::Hybrid,
        (Some(_), None) => CgroupMode::V1,
        (None, _) => CgroupMode::None,
    };
    assert_eq!(host.mode(), want);
    assert_eq!(summary.unified_mount, unified);
    if want == CgroupMode::Hybrid || want == CgroupMode::V1 {
        assert_eq!(host.pids().unwrap().version, CgroupVersion::V1);
        assert_eq!(summary.pids_mount, v1_pids);
        assert_eq!(summary.pids_version, Some("v1"));
    }
    if Path::new("/sys/fs/cgroup/pids").is_dir() && Path::new("/sys/fs/cgroup/unified").is_dir() {
        // This project's machines: pids on v1, a cgroup2 without pids.
        assert_eq!(host.mode(), CgroupMode::Hybrid);
        assert_eq!(
            summary.pids_mount.as_deref(),
            Some(Path::new("/sys/fs/cgroup/pids"))
        );
    }
}

/// Writes `files` (name, content) into `dir`, making it first.
fn fake_dir(dir: &Path, files: &[(&str, &str)]) {
    fs::create_dir_all(dir).unwrap();
    for (name, text) in files {
        fs::write(dir.join(name), text).unwrap();
    }
}

/// A fake root whose cgroup2 mount offers `controllers` to the daemon's cgroup
/// `/system.slice/subidd.service`.
fn fake_v2_root(controllers: &str) -> (tempfile::TempDir, PathBuf) {
    let root = tempfile::tempdir().unwrap();
    fake_dir(
        &root.path().join("proc/self"),
        &[
            (
                "mountinfo",
                "25 1 0:22 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n",
            ),
            ("cgroup", "0::/system.slice/subidd.service\n"),
        ],
    );
    let own = root
        .path()
        .join("sys/fs/cgroup/system.slice/subidd.service");
    fake_dir(
        &own,
        &[
            ("cgroup.controllers", controllers),
            ("cgroup.subtree_control", ""),
            ("cgroup.procs", "4242\n"),
        ],
    );
    (root, own)
}

#[test]
fn cgroup2_file_protocol_on_a_fake_tree() {
    let (root, own) = fake_v2_root("cpu memory pids\n");
    eprintln!(
        "cgroup2 file protocol: fake cgroupfs tree at {}",
        root.path().display()
    );
    let host = CgroupHost::detect_in(root.path()).unwrap();
    assert_eq!(host.mode(), CgroupMode::V2);
    let h = host.require_pids().unwrap();
    assert_eq!(h.own_dir, own);
    // What the kernel would show once the directories exist.
    let parent_dir = own.join("subidd");
    fake_dir(
        &parent_dir,
        &[
            ("cgroup.controllers", "pids\n"),
            ("cgroup.subtree_control", ""),
        ],
    );
    let lease_dir = parent_dir.join("lease-db-1");
    fake_dir(
        &lease_dir,
        &[
            ("pids.max", "max\n"),
            ("pids.current", "3\n"),
            ("pids.events", "max 7\n"),
            ("cgroup.procs", ""),
            ("cgroup.kill", ""),
            ("cgroup.events", "populated 0\nfrozen 0\n"),
        ],
    );

    let parent = CgroupParent::prepare(h, None).unwrap();
    assert_eq!(parent.dir(), parent_dir);
    for d in [&own, &parent_dir] {
        let ctl = fs::read_to_string(d.join("cgroup.subtree_control")).unwrap();
        assert_eq!(ctl, "+pids", "{d:?}");
    }

    let cg = LeaseCgroup::create(&parent, "db-1", Some(10)).unwrap();
    assert_eq!(cg.version(), CgroupVersion::V2);
    assert_eq!(
        fs::read_to_string(lease_dir.join("pids.max")).unwrap(),
        "10"
    );
    assert_eq!(cg.pids_max().unwrap(), Some(10));
    assert_eq!(cg.pids_current().unwrap(), 3);
    assert_eq!(cg.pids_events_max().unwrap(), 7);
    assert!(cg.procs().unwrap().is_empty());
    assert_eq!(
        cg.cgroup_path().unwrap(),
        Path::new("/system.slice/subidd.service/subidd/lease-db-1")
    );
    cg.set_pids_max(None).unwrap();
    assert_eq!(cg.pids_max().unwrap(), None);
    fs::write(lease_dir.join("cgroup.events"), "populated 1\nfrozen 0\n").unwrap();
    assert!(cg.has_members().unwrap());

    // The "kernel": once cgroup.kill reads 1, the cgroup becomes unpopulated.
    let kernel = {
        let dir = lease_dir.clone();
        std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if fs::read_to_string(dir.join("cgroup.kill")).is_ok_and(|t| t == "1") {
                    fs::write(dir.join("cgroup.events"), "populated 0\nfrozen 0\n").unwrap();
                    return true;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            false
        })
    };
    cg.kill_all_and_remove().unwrap();
    assert!(kernel.join().unwrap(), "cgroup.kill was never written");
    assert!(!lease_dir.exists());

    // A cgroup holding processes is not adopted by create.
    fake_dir(
        &lease_dir,
        &[
            ("cgroup.procs", "77\n"),
            ("pids.max", "max\n"),
            ("cgroup.events", "populated 1\nfrozen 0\n"),
        ],
    );
    let err = LeaseCgroup::create(&parent, "db-1", Some(5)).unwrap_err();
    assert_eq!(err.errno(), Some(Errno::EBUSY), "{err}");
    assert_eq!(
        fs::read_to_string(lease_dir.join("pids.max")).unwrap(),
        "max\n"
    );
}

#[test]
fn no_pids_controller_is_refused_with_its_reason() {
    let (root, own) = fake_v2_root("cpu memory\n");
    eprintln!(
        "cgroup2 without pids: fake cgroupfs tree at {}",
        root.path().display()
    );
    let host = CgroupHost::detect_in(root.path()).unwrap();
    assert_eq!(host.mode(), CgroupMode::None);
    let err = host.require_pids().unwrap_err();
    assert!(
        matches!(&err, SysError::Unsupported { what: "pids_max", reason } if reason.contains("pids")),
        "{err}"
    );
    let parent = CgroupParent::prepare(host.unified().unwrap(), None).unwrap();
    let err = LeaseCgroup::create(&parent, "db-1", Some(10)).unwrap_err();
    assert!(matches!(err, SysError::Unsupported { .. }), "{err}");
    assert!(!own.join("subidd/db-1").exists());
}

#[test]
#[cfg_attr(not(subidd_root), ignore = "needs root")]
fn clone_into_cgroup_on_the_real_cgroup2_hierarchy() {
    let _spawners = SPAWNERS.read().unwrap_or_else(|e| e.into_inner());
    let h = unified_hierarchy();
    let parent = TestParent::new(&h, "v2");
    if !h.pids {
        let err = LeaseCgroup::create(&parent.0, "capped", Some(10)).unwrap_err();
        assert!(matches!(err, SysError::Unsupported { .. }), "{err}");
        assert!(!parent.0.dir().join("capped").exists());
    }
    let cg = LeaseCgroup::create(&parent.0, "l", None).unwrap();
    let mut lease = Lease::new(0x7103_0000);
    let first = lease.spawn(&sleeper_in(&cg)).unwrap(); // creator's clone3
    let (out, path) = lease.output("gc");
    let mut cmd = sh("sleep 60 & echo $!; wait");
    cmd.cgroup(cg.start_spawner().unwrap()).stdout(out);
    let second = lease.spawn(&cmd).unwrap(); // the join's clone3
    let grandchild: i32 = wait_for_lines(&path, 1).trim().parse().unwrap();
    let want = cg.cgroup_path().unwrap();
    for pid in [first, second, grandchild] {
        let text = fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
        let line = text.lines().find(|l| l.starts_with("0::")).unwrap();
        assert_eq!(Path::new(&line[3..]), want, "pid {pid}");
    }
    // Teardown through cgroup.kill.
    let before = members(&cg);
    assert_eq!(before.len(), 3);
    let dir = cg.path().to_path_buf();
    cg.kill_all_and_remove().unwrap();
    assert!(!dir.exists());
    assert_all_exited(&before);
}

#[test]
#[cfg_attr(not(subidd_root), ignore = "needs root")]
fn lease_spawner_clones_joins_inside_the_cgroup() {
    let _spawners = SPAWNERS.read().unwrap_or_else(|e| e.into_inner());
    let h = pids_hierarchy();
    let parent = TestParent::new(&h, "spawner");
    let cg = LeaseCgroup::create(&parent.0, "l", Some(10)).unwrap();
    let handle = cg.start_spawner().unwrap();
    let helper = handle.spawner().map(|s| s.pid());
    if h.version == CgroupVersion::V1 {
        eprintln!("v1: lease spawner {helper:?} clones the joins");
        let helper = helper.expect("a spawner on v1");
        assert_eq!(cg.procs().unwrap(), vec![helper]);
    } else {
        eprintln!("v2: no spawner needed (clone3 CLONE_INTO_CGROUP)");
        assert!(helper.is_none());
    }
    let mut lease = Lease::new(0x7106_0000);
    let mut first_cmd = Command::new("/bin/sleep", ["sleep", "60"]);
    first_cmd.cgroup(handle.try_clone().unwrap());
    let first = lease.spawn(&first_cmd).unwrap(); // creates the namespace; not via the helper

    // A join through the helper: in the cgroup, our child (CLONE_PARENT), reaped by us.
    let mut truth = Command::new("/bin/true", ["true"]);
    truth.cgroup(handle.try_clone().unwrap());
    let t = lease.spawn(&truth).unwrap();
    let status = lease.child(t).wait().unwrap();
    assert!(status.success(), "{status:?}");

    let (out, path) = lease.output("gc");
    let mut cmd = sh("sleep 60 & echo $!; wait");
    cmd.cgroup(handle.try_clone().unwrap()).stdout(out);
    let second = lease.spawn(&cmd).unwrap();
    let grandchild: i32 = wait_for_lines(&path, 1).trim().parse().unwrap();
    let status = fs::read_to_string(format!("/proc/{second}/status")).unwrap();
    let ppid = status
        .lines()
        .find_map(|l| l.strip_prefix("PPid:"))
        .unwrap();
    assert_eq!(ppid.trim(), std::process::id().to_string());
    for pid in [first, second, grandchild] {
        assert!(cg.contains_pid(pid).unwrap(), "pid {pid}");
    }

    // A failed join through the helper leaves nothing.
    let mut missing = Command::new("/nonexistent/binary", ["binary"]);
    missing.cgroup(handle.try_clone().unwrap());
    let before = cg.procs().unwrap().len();
    let err = lease.spawn(&missing).unwrap_err();
    assert_eq!(err.errno(), Some(Errno::ENOENT), "{err}");
    assert_eq!(cg.procs().unwrap().len(), before);

    // Dropping every handle ends the helper.
    drop((first_cmd, truth, cmd, missing, handle));
    if let Some(helper) = helper {
        wait_until("the helper to exit", || {
            !cg.procs().unwrap().contains(&helper)
        });
    }
    let dir = cg.path().to_path_buf();
    let members = members(&cg);
    cg.kill_all_and_remove().unwrap();
    assert!(!dir.exists());
    assert_all_exited(&members);
}

#[test]
#[cfg_attr(not(subidd_root), ignore = "needs root")]
fn a_join_into_a_full_lease_is_refused_when_forked_inside() {
    let _spawners = SPAWNERS.read().unwrap_or_else(|e| e.into_inner());
    let h = pids_hierarchy();
    let parent = TestParent::new(&h, "full");
    let cg = LeaseCgroup::create(&parent.0, "l", Some(3)).unwrap();
    let handle = cg.start_spawner().unwrap();
    let mut lease = Lease::new(0x7107_0000);
    let mut cmd = Command::new("/bin/sleep", ["sleep", "60"]);
    cmd.cgroup(handle.try_clone().unwrap());
    lease.spawn(&cmd).unwrap(); // creates the namespace
    lease.spawn(&cmd).unwrap(); // joins
    let full = cg.pids_current().unwrap();
    assert_eq!(full, 3, "helper (v1) or creator's child + join");
    if h.version == CgroupVersion::V2 {
        lease.spawn(&cmd).unwrap_err(); // clone3 charged in the cgroup: EAGAIN
    } else {
        // The helper forks inside the cgroup, so the fork is charged and refused.
        let err = lease.spawn(&cmd).unwrap_err();
        assert_eq!(err.errno(), Some(Errno::EAGAIN), "{err}");
    }
    assert_eq!(cg.pids_current().unwrap(), full);
    assert!(cg.pids_events_max().unwrap() > 0);
    drop((cmd, handle));
    cg.kill_all_and_remove().unwrap();
}

/// The parents of one test's lease cgroups on every hierarchy this host uses (tracking, and pids
/// when that is another one), removed with anything left in them on drop.
struct TestParents(CgroupParents);

impl TestParents {
    fn new(tag: &str) -> Self {
        let host = CgroupHost::detect().expect("detect");
        let th = host.tracking().expect("a tracking hierarchy");
        eprintln!(
            "lease cgroups: tracking on {} at {}, pids on {:?}",
            th.version.as_str(),
            th.mount.display(),
            host.pids().map(|h| (h.version.as_str(), h.mount.clone()))
        );
        let configured = th
            .own
            .join(format!("subidd-it-{tag}-{}", std::process::id()));
        TestParents(CgroupParents::prepare(&host, Some(&configured), true).expect("prepare"))
    }
}

impl Drop for TestParents {
    fn drop(&mut self) {
        for parent in [Some(self.0.track()), self.0.cap()].into_iter().flatten() {
            for name in parent.lease_names() {
                if let Ok(cg) = LeaseCgroup::open(parent, &name)
                    && let Err(err) = cg.kill_all_and_remove()
                {
                    eprintln!("cleanup: {err}");
                }
            }
            if let Err(e) = fs::remove_dir(parent.dir()) {
                eprintln!("cleanup: rmdir {:?}: {e}", parent.dir());
            }
        }
    }
}

fn spawn_in(lease: &mut Lease, cgs: &mut LeaseCgroups, mut cmd: Command) -> i32 {
    cmd.cgroup(cgs.spawn_handle().unwrap());
    lease.spawn(&cmd).unwrap()
}

/// `pids_max` is the lease's whole budget on every layout: with 25, a process of the lease
/// forks 24 children and the 25th fork is refused, the v1 spawner (on hosts that need one)
/// notwithstanding; the other lease is untouched; teardown ends them all.
#[test]
#[cfg_attr(not(subidd_root), ignore = "needs root")]
fn pids_max_is_the_whole_budget_and_spares_other_leases() {
    let _spawners = SPAWNERS.read().unwrap_or_else(|e| e.into_inner());
    let parents = TestParents::new("budget");
    let mut a = LeaseCgroups::open_or_create(&parents.0, "a", Some(25)).unwrap();
    let mut b = LeaseCgroups::open_or_create(&parents.0, "b", Some(25)).unwrap();
    let mut lease_a = Lease::new(0x7100_0000);
    let mut lease_b = Lease::new(0x7101_0000);
    let (out, path) = lease_a.output("forks");
    let script = "import os, time\nn = 0\ntry:\n    while True:\n        if os.fork() == 0:\n            time.sleep(1000)\n        n += 1\nexcept OSError as e:\n    print(n, e.errno, flush=True)\ntime.sleep(1000)\n";
    let mut cmd = Command::new("/usr/bin/python3", ["python3", "-c", script]);
    cmd.stdout(out);
    let first = spawn_in(&mut lease_a, &mut a, cmd);
    let other = spawn_in(
        &mut lease_b,
        &mut b,
        Command::new("/bin/sleep", ["sleep", "60"]),
    );
    let line = wait_for_lines(&path, 1);
    let mut fields = line.split_whitespace();
    let forked: u32 = fields.next().unwrap().parse().unwrap();
    let errno: i32 = fields.next().unwrap().parse().unwrap();
    eprintln!("lease a forked {forked} children, then errno {errno}");
    assert_eq!(errno, libc::EAGAIN, "the fork was refused by the cap");
    assert_eq!(forked, 24, "25 processes in all: python and 24 children");
    let (current, denied) = a.pids_usage().unwrap();
    assert_eq!(current, 25, "pids_current without the spawner");
    assert!(denied > 0);
    let members = a.members().unwrap();
    assert_eq!(members.len(), 25, "{members:?}");
    assert!(members.contains(&first));
    for pid in &members {
        assert!(a.track().contains_pid(*pid).unwrap(), "pid {pid} outside a");
        assert!(!b.track().contains_pid(*pid).unwrap());
    }
    assert_eq!(b.members().unwrap(), vec![other]);
    assert_eq!(b.pids_usage(), Some((1, 0)));

    let before: Vec<PidFd> = members
        .iter()
        .filter_map(|&p| PidFd::open(p).ok())
        .collect();
    a.kill(Instant::now() + Duration::from_secs(10)).unwrap();
    assert!(!a.populated().unwrap());
    assert_all_exited(&before);
    a.remove(Instant::now() + Duration::from_secs(10)).unwrap();
    assert!(
        !lease_b.child(other).has_exited().unwrap(),
        "lease b untouched"
    );
    b.kill(Instant::now() + Duration::from_secs(10)).unwrap();
    b.remove(Instant::now() + Duration::from_secs(10)).unwrap();
}

/// The first spawn (which makes the namespace), a join and a grandchild all live in the
/// lease's tracking cgroup, and only they count as the lease's members.
#[test]
#[cfg_attr(not(subidd_root), ignore = "needs root")]
fn first_spawn_join_and_grandchild_are_the_leases_members() {
    let _spawners = SPAWNERS.read().unwrap_or_else(|e| e.into_inner());
    let parents = TestParents::new("members");
    let mut cgs = LeaseCgroups::open_or_create(&parents.0, "l", None).unwrap();
    assert_eq!(cgs.pids_usage(), None, "no cap, no usage");
    let mut lease = Lease::new(0x7102_0000);
    let first = spawn_in(
        &mut lease,
        &mut cgs,
        Command::new("/bin/sleep", ["sleep", "60"]),
    );
    let (out, path) = lease.output("gc");
    let mut cmd = sh("sleep 60 & echo $!; wait");
    cmd.stdout(out);
    let second = spawn_in(&mut lease, &mut cgs, cmd);
    let grandchild: i32 = wait_for_lines(&path, 1).trim().parse().unwrap();
    let mut members = cgs.members().unwrap();
    members.sort();
    let mut want = vec![first, second, grandchild];
    want.sort();
    assert_eq!(members, want);
    assert!(cgs.populated().unwrap());
    let before: Vec<PidFd> = want.iter().filter_map(|&p| PidFd::open(p).ok()).collect();
    cgs.kill(Instant::now() + Duration::from_secs(10)).unwrap();
    assert_all_exited(&before);
    let dir = cgs.track().path().to_path_buf();
    cgs.remove(Instant::now() + Duration::from_secs(10))
        .unwrap();
    assert!(!dir.exists());
}

/// Failed spawns, first and join alike, leave no process in the lease's cgroups.
#[test]
#[cfg_attr(not(subidd_root), ignore = "needs root")]
fn failed_spawns_leave_nothing_in_the_lease_cgroups() {
    let _spawners = SPAWNERS.read().unwrap_or_else(|e| e.into_inner());
    let parents = TestParents::new("fail");
    let mut cgs = LeaseCgroups::open_or_create(&parents.0, "l", Some(10)).unwrap();
    let mut lease = Lease::new(0x7104_0000);
    let mut missing = Command::new("/nonexistent/binary", ["binary"]);
    missing.cgroup(cgs.spawn_handle().unwrap());
    let err = lease.spawn(&missing).unwrap_err();
    assert!(
        matches!(
            err,
            SysError::ChildSetup {
                step: ChildStep::Execve,
                ..
            }
        ),
        "{err}"
    );
    assert!(!mounted(&lease.pin));
    assert!(cgs.members().unwrap().is_empty());
    spawn_in(
        &mut lease,
        &mut cgs,
        Command::new("/bin/sleep", ["sleep", "60"]),
    );
    let err = lease.spawn(&missing).unwrap_err();
    assert_eq!(err.errno(), Some(Errno::ENOENT), "{err}");
    assert_eq!(cgs.members().unwrap().len(), 1);
    cgs.kill(Instant::now() + Duration::from_secs(10)).unwrap();
    cgs.remove(Instant::now() + Duration::from_secs(10))
        .unwrap();
}

/// A process that hides in a nested user namespace, and one that forks and lets its parent exit
/// as fast as it can, are both killed by the teardown: the cgroup holds them, not a /proc scan.
#[test]
#[cfg_attr(not(subidd_root), ignore = "needs root")]
fn teardown_kills_nested_namespaces_and_fork_racers() {
    let _spawners = SPAWNERS.read().unwrap_or_else(|e| e.into_inner());
    let parents = TestParents::new("escape");
    let mut cgs = LeaseCgroups::open_or_create(&parents.0, "l", None).unwrap();
    let mut lease = Lease::new(0x7105_0000);
    let (out, path) = lease.output("nested");
    let mut nested = sh("setsid unshare -U /bin/sleep 1000 & echo $!");
    nested.stdout(out);
    spawn_in(&mut lease, &mut cgs, nested);
    let hidden: i32 = wait_for_lines(&path, 1).trim().parse().unwrap();
    wait_until("the nested namespace to be made", || {
        crate::support::user_ns_of(hidden) != lease.pin_inode()
    });
    // A fork racer: every generation forks the next and exits at once.
    let racer = "import os\nwhile True:\n    if os.fork() != 0:\n        os._exit(0)\n";
    spawn_in(
        &mut lease,
        &mut cgs,
        Command::new("/usr/bin/python3", ["python3", "-c", racer]),
    );
    std::thread::sleep(Duration::from_millis(200));
    let hidden_fd = PidFd::open(hidden).unwrap();
    assert!(cgs.track().contains_pid(hidden).unwrap());
    cgs.kill(Instant::now() + Duration::from_secs(10)).unwrap();
    assert!(!cgs.populated().unwrap(), "nothing of the lease is left");
    wait_until("the hidden sleeper to exit", || {
        hidden_fd.has_exited().unwrap_or(true)
    });
    cgs.remove(Instant::now() + Duration::from_secs(10))
        .unwrap();
}

/// The descriptors of this process that are pidfds of this process itself (only v1 spawners open
/// them: see [`SPAWNERS`]).
fn own_pidfds() -> Vec<i32> {
    let me = std::process::id().to_string();
    fs::read_dir("/proc/self/fd")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()))
        .filter(|fd| {
            fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).is_ok_and(|info| {
                info.lines()
                    .any(|l| l.strip_prefix("Pid:").is_some_and(|p| p.trim() == me))
            })
        })
        .collect()
}

/// A v1 lease spawner that is SIGKILLed (by a teardown's kill loop, by an operator) leaves no
/// descriptor behind in the daemon, whose descriptor table it shares: the pidfd it polls to
/// notice the daemon's exit is the daemon's, closed with the spawner.
#[test]
#[cfg_attr(not(subidd_root), ignore = "needs root")]
#[cfg_attr(
    not(subidd_pids_v1),
    ignore = "needs a v1 pids hierarchy (the spawner)"
)]
fn a_killed_spawner_leaves_no_descriptor_behind() {
    // Alone: the spawners of the other tests hold pidfds of this process too.
    let _alone = SPAWNERS.write().unwrap_or_else(|e| e.into_inner());
    let h = pids_hierarchy();
    let parent = TestParent::new(&h, "spawnerfd");
    let cg = LeaseCgroup::create(&parent.0, "l", None).unwrap();
    let before = own_pidfds();
    let handle = cg.start_spawner().unwrap();
    assert_eq!(
        own_pidfds().len(),
        before.len() + 1,
        "the spawner's pidfd of us"
    );
    let helper = handle.spawner().expect("a spawner on v1").pid();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(helper),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    wait_until("the spawner to die", || {
        fs::read_to_string(format!("/proc/{helper}/stat")).map_or(true, |s| s.contains(") Z "))
    });
    drop(handle);
    let mut after = own_pidfds();
    after.retain(|fd| !before.contains(fd));
    assert!(after.is_empty(), "pidfds of this process left: {after:?}");
    cg.kill_all_and_remove().unwrap();
}
