//! Sets cfgs the tests are gated on: `subidd_root` when built as root, `subidd_pids` when the host
//! has a pids controller, `subidd_postgres` when PostgreSQL is installed, one per container
//! tool the integration recipes use, and `subidd_dockerd` when a Docker engine can be started, so tests that
//! cannot run here are reported as ignored (not silently passed).

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// The one-file rootfs of the integration recipes (Debian's busybox-static).
const BUSYBOX: &str = "/bin/busybox";

fn main() {
    println!("cargo::rustc-check-cfg=cfg(subidd_root)");
    println!("cargo::rustc-check-cfg=cfg(subidd_pids)");
    println!("cargo::rustc-check-cfg=cfg(subidd_pids_v1)");
    if has_pids_controller() {
        println!("cargo::rustc-cfg=subidd_pids");
    }
    if has_v1_pids_beside_cgroup2() {
        println!("cargo::rustc-cfg=subidd_pids_v1");
    }
    println!("cargo::rerun-if-changed=build.rs");
    // Container tools the recipes of docs/INTEGRATIONS.md need; a missing one shows its tests
    // as ignored. PATH is read at build time: rebuild after installing one.
    println!("cargo::rerun-if-env-changed=PATH");
    for tool in ["runc", "crun", "podman", "jq"] {
        println!("cargo::rustc-check-cfg=cfg(subidd_{tool})");
        if on_path(tool) {
            println!("cargo::rustc-cfg=subidd_{tool}");
        }
    }
    // The Docker tests (tests/e2e/docker.rs) start a private dockerd of their own.
    println!("cargo::rustc-check-cfg=cfg(subidd_dockerd)");
    if on_path("dockerd") && (on_path("docker") || Path::new("/usr/bin/docker").exists()) {
        println!("cargo::rustc-cfg=subidd_dockerd");
    }
    // PostgreSQL's programs, for the fleet tests (tests/support/pg.rs starts a cluster).
    println!("cargo::rustc-check-cfg=cfg(subidd_postgres)");
    if has_initdb() {
        println!("cargo::rustc-cfg=subidd_postgres");
    }
    println!("cargo::rustc-check-cfg=cfg(subidd_busybox)");
    if is_static_elf(Path::new(BUSYBOX)) {
        println!("cargo::rustc-cfg=subidd_busybox");
    }
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

/// Whether the pids controller is on a v1 hierarchy while a cgroup2 is mounted too (a hybrid:
/// a lease's processes live on cgroup2 and its cap on v1).
fn has_v1_pids_beside_cgroup2() -> bool {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let fstype_opts = |line: &str| {
        let (_, rest) = line.split_once(" - ")?;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        Some((
            fields.first()?.to_string(),
            fields.get(2).unwrap_or(&"").to_string(),
        ))
    };
    let v1_pids = mounts
        .lines()
        .filter_map(fstype_opts)
        .any(|(t, opts)| t == "cgroup" && opts.split(',').any(|o| o == "pids"));
    let v2 = mounts
        .lines()
        .filter_map(fstype_opts)
        .any(|(t, _)| t == "cgroup2");
    v1_pids && v2
}

/// Whether PostgreSQL's `initdb` is on PATH or in `/usr/lib/postgresql/<version>/bin`, where
/// Debian installs it.
fn has_initdb() -> bool {
    on_path("initdb")
        || std::fs::read_dir("/usr/lib/postgresql")
            .map(|entries| {
                entries
                    .flatten()
                    .any(|e| e.path().join("bin/initdb").is_file())
            })
            .unwrap_or(false)
}

/// Whether an executable file named `tool` is in a directory of PATH.
fn on_path(tool: &str) -> bool {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path).any(|dir| {
        std::fs::metadata(dir.join(tool))
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    })
}

/// Whether `path` is a 64-bit ELF executable without a program interpreter (PT_INTERP), so it
/// runs in a rootfs that has no dynamic loader.
fn is_static_elf(path: &Path) -> bool {
    const PT_INTERP: u32 = 3;
    let Ok(bytes) = std::fs::read(path) else {
        return false;
    };
    let le_u16 = |at: usize| {
        bytes
            .get(at..at + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
    };
    let le_u32 = |at: usize| {
        bytes
            .get(at..at + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    let le_u64 = |at: usize| {
        bytes
            .get(at..at + 8)
            .and_then(|b| <[u8; 8]>::try_from(b).ok())
            .map(u64::from_le_bytes)
    };
    // ELF magic, ELFCLASS64, little-endian.
    if bytes.get(..6) != Some(&[0x7f, b'E', b'L', b'F', 2, 1][..]) {
        return false;
    }
    let (Some(phoff), Some(phentsize), Some(phnum)) = (le_u64(0x20), le_u16(0x36), le_u16(0x38))
    else {
        return false;
    };
    let Ok(phoff) = usize::try_from(phoff) else {
        return false;
    };
    (0..usize::from(phnum))
        .all(|i| le_u32(phoff + i * usize::from(phentsize)).is_some_and(|kind| kind != PT_INTERP))
}
