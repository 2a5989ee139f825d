//! Build script: marks builds made by root with `cfg(subidd_root)`, so the integration tests
//! that need root (the log keeper's) are reported as ignored, never as passed, when the test
//! binary is built by anyone else.

use std::fs;

fn main() {
    println!("cargo::rustc-check-cfg=cfg(subidd_root)");
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-env-changed=USER");
    println!("cargo::rerun-if-env-changed=SUDO_UID");
    if effective_uid() == Some(0) {
        println!("cargo::rustc-cfg=subidd_root");
    }
}

/// The effective uid, the second field of the `Uid:` line of /proc/self/status (proc(5)).
fn effective_uid() -> Option<u32> {
    let status = fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(2)?.parse().ok()
}
