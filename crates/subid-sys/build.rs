//! Build script: marks builds made by root with `cfg(subidd_root)`, so kernel tests that need root
//! are reported as ignored (never as passed) when the test binary is built by anyone else, and
//! hosts with a v1 pids hierarchy with `cfg(subidd_pids_v1)` (the lease spawner's tests).

use std::fs;

fn main() {
    println!("cargo::rustc-check-cfg=cfg(subidd_root)");
    println!("cargo::rerun-if-changed=build.rs");
    // Rebuilding as another user normally means another shell; these catch `sudo` and `su`.
    println!("cargo::rerun-if-env-changed=USER");
    println!("cargo::rerun-if-env-changed=SUDO_UID");
    if effective_uid() == Some(0) {
        println!("cargo::rustc-cfg=subidd_root");
    }
    println!("cargo::rustc-check-cfg=cfg(subidd_pids_v1)");
    let mounts = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let v1_pids = mounts.lines().any(|line| {
        line.split_once(" - ").is_some_and(|(_, rest)| {
            let fields: Vec<&str> = rest.split_whitespace().collect();
            fields.first() == Some(&"cgroup")
                && fields
                    .get(2)
                    .is_some_and(|o| o.split(',').any(|c| c == "pids"))
        })
    });
    if v1_pids {
        println!("cargo::rustc-cfg=subidd_pids_v1");
    }
}

/// The effective uid, the second field of the `Uid:` line of /proc/self/status (proc(5)).
fn effective_uid() -> Option<u32> {
    let status = fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(2)?.parse().ok()
}
