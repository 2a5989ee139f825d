//! Sets `cfg(subidd_root)` when the tests are built as root, so tests that need root are
//! reported as ignored (not silently passed) elsewhere.

fn main() {
    println!("cargo::rustc-check-cfg=cfg(subidd_root)");
    println!("cargo::rustc-check-cfg=cfg(subidd_pids)");
    if has_pids_controller() {
        println!("cargo::rustc-cfg=subidd_pids");
    }
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

/// Whether this host has a usable pids cgroup controller: a v1 hierarchy mounted with `pids`,
/// or a cgroup2 whose root lists `pids` among its controllers.
fn has_pids_controller() -> bool {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    mounts.lines().any(|line| {
        let Some((_, rest)) = line.split_once(" - ") else {
            return false;
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let mount_point = line.split_whitespace().nth(4).unwrap_or("");
        match fields.first().copied() {
            Some("cgroup") => fields
                .get(2)
                .is_some_and(|opts| opts.split(',').any(|o| o == "pids")),
            Some("cgroup2") => std::fs::read_to_string(format!("{mount_point}/cgroup.controllers"))
                .is_ok_and(|c| c.split_whitespace().any(|c| c == "pids")),
            _ => false,
        }
    })
}
