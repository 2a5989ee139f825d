//! Sets `cfg(subidd_root)` when the CLI tests are built as root, so tests that need root
//! (spawning into a user namespace) are reported as ignored elsewhere, not silently passed.

fn main() {
    println!("cargo::rustc-check-cfg=cfg(subidd_root)");
    println!("cargo::rerun-if-changed=build.rs");
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let euid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap_or("");
    if euid == "0" {
        println!("cargo::rustc-cfg=subidd_root");
    }
}
