//! Per-user kernel accounting: namespaces owned by the lease's base uid each get their own
//! inotify budget (fs.inotify.max_user_instances = 128 here), root-owned ones share root's.

use std::process::Stdio;

use crate::support::{Lease, sh, wait_for_lines};

/// Opens 100 inotify instances, prints how many succeeded, then holds them.
const OPEN_100: &str = "import ctypes, sys, time\n\
libc = ctypes.CDLL(None, use_errno=True)\n\
fds = [libc.inotify_init1(0) for _ in range(100)]\n\
print(sum(1 for f in fds if f >= 0), flush=True)\n\
time.sleep(30)\n";

#[test]
#[cfg_attr(not(subidd_root), ignore = "needs root")]
fn three_leases_each_open_100_inotify_instances() {
    let mut leases: Vec<Lease> = (0..3u32)
        .map(|i| Lease::new(0x7030_0000 + i * 0x1_0000))
        .collect();
    let mut counts = Vec::new();
    for (i, lease) in leases.iter_mut().enumerate() {
        let (out, path) = lease.output(&format!("inotify{i}"));
        let mut cmd = sh(&format!("exec python3 -c '{OPEN_100}'"));
        cmd.stdout(out);
        lease.spawn(&cmd).unwrap();
        // the next lease starts only while this one holds its 100
        counts.push(wait_for_lines(&path, 1).trim().parse::<u32>().unwrap());
    }
    assert_eq!(counts, [100, 100, 100]);
}

#[test]
#[cfg_attr(not(subidd_root), ignore = "needs root")]
fn namespaces_created_by_root_share_roots_budget() {
    let dir = tempfile::tempdir().unwrap();
    let mut children = Vec::new();
    let mut counts = Vec::new();
    for i in 0..3 {
        let path = dir.path().join(format!("root{i}"));
        let out = std::fs::File::create(&path).unwrap();
        // util-linux unshare(1): the namespace's creator, and so its owner, is root
        let child = std::process::Command::new("unshare")
            .args(["--user", "python3", "-c", OPEN_100])
            .stdout(out)
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        children.push(child);
        counts.push(wait_for_lines(&path, 1).trim().parse::<u32>().unwrap());
    }
    for mut child in children {
        let _ = child.kill();
        let _ = child.wait();
    }
    let total: u32 = counts.iter().sum();
    assert!(total <= 128, "root-owned namespaces opened {counts:?}");
}
