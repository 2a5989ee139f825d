//! Docker, every container its own lease: a private `dockerd` with `subid-runc` registered as a
//! runtime, the real subidd, and what /proc, the API and the image layers say. Also the
//! namespace endpoint and the typed client against the real daemon.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use subid_client::{Client, LeaseRequest, LeaseState};
use subidd_tests::Daemon;
use subidd_tests::docker::{Dockerd, EngineSpec, RuntimeEntry, subid_runc_bin};

use crate::util::{ids, ns_ino, pin};

/// Pools of these tests: `POOL_BLOCKS` blocks per slot from 0x7A000000, apart from the others'.
const POOL_BASE: u32 = 0x7A00_0000;
const POOL_BLOCKS: u32 = 8;
const BLOCK: u32 = 65_536;
/// The image every test imports (a busybox rootfs).
const IMAGE: &str = "subid-bb:1";

/// A subidd and an engine with `subid-runc` registered as runtime `subid`.
struct Setup {
    daemon: Daemon,
    engine: Dockerd,
    client: Client,
}

impl Setup {
    /// `slot` picks the test's pool; `mode` is `join` or `map`; `default` makes `subid` the
    /// engine's default runtime.
    fn new(slot: u32, mode: &str, default: bool) -> Setup {
        Setup::with_pool(slot, POOL_BLOCKS, mode, default)
    }

    fn with_pool(slot: u32, blocks: u32, mode: &str, default: bool) -> Setup {
        let config = format!(
            "kill_grace_ms = 1000\n[pool]\nbase = {}\nsize = {}\n",
            POOL_BASE + slot * POOL_BLOCKS * BLOCK,
            blocks * BLOCK
        );
        let daemon = Daemon::start(&config).expect("start subidd");
        let runtime = RuntimeEntry {
            name: "subid".into(),
            path: subid_runc_bin().expect("subid-runc binary"),
            args: vec![
                format!("--subid-socket={}", daemon.socket.display()),
                format!("--subid-mode={mode}"),
                "--subid-state-dir={dir}/subid-runc".into(),
                "--subid-timeout=10".into(),
            ],
        };
        let engine = Dockerd::start(EngineSpec {
            runtimes: vec![runtime],
            default_runtime: default.then(|| "subid".to_string()),
            flags: Vec::new(),
        })
        .expect("start dockerd");
        engine.import_busybox(IMAGE).expect("import image");
        let client = Client::new(&daemon.socket);
        Setup {
            daemon,
            engine,
            client,
        }
    }

    fn state_dir(&self) -> PathBuf {
        self.engine.path("subid-runc")
    }

    fn docker(&self, args: &[&str]) -> String {
        self.engine.docker_ok(args).expect("docker")
    }

    /// The host pid of a running container's init.
    fn pid(&self, name: &str) -> i64 {
        let pid = self.docker(&["inspect", "-f", "{{.State.Pid}}", name]);
        pid.parse()
            .unwrap_or_else(|_| panic!("pid of {name}: {pid:?}"))
    }

    fn id(&self, name: &str) -> String {
        self.docker(&["inspect", "-f", "{{.Id}}", name])
    }

    /// The lease that holds the host uid of the container's init.
    async fn lease_of(&self, name: &str) -> subid_client::Lookup {
        let uid = ids(self.pid(name), "Uid:")[0];
        self.client
            .lookup_uid(uid)
            .await
            .unwrap_or_else(|e| panic!("lookup of uid {uid} of {name}: {e}"))
    }

    /// Waits until no active lease of the docker owner is left.
    async fn no_active_docker_leases(&self) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let leases = self
                .client
                .list_leases(None, &[("owner", "docker")])
                .await
                .expect("list leases");
            let names: Vec<String> = leases.into_iter().map(|l| l.name).collect();
            if names.is_empty() || Instant::now() > deadline {
                return names;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Mounts left by the wrapper, or Docker overlays still mounted, after containers went.
    async fn leftover_mounts(&self) -> Vec<PathBuf> {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let left: Vec<PathBuf> = Dockerd::mounts_under(self.engine.dir.path())
                .into_iter()
                .filter(|p| {
                    p.starts_with(self.state_dir().join("c"))
                        || p.starts_with(self.engine.data_root().join("overlay2"))
                })
                .collect();
            if left.is_empty() || Instant::now() > deadline {
                return left;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

#[tokio::test]
#[cfg_attr(
    not(all(subidd_root, subidd_dockerd, subidd_runc, subidd_busybox)),
    ignore = "needs root, dockerd, runc and a static /bin/busybox"
)]
async fn each_container_gets_its_own_lease_and_keeps_it_across_restarts() {
    let s = Setup::new(0, "join", false);
    for name in ["ca", "cb"] {
        s.docker(&[
            "run",
            "-d",
            "--runtime=subid",
            "--name",
            name,
            IMAGE,
            "sleep",
            "600",
        ]);
    }
    let (a, b) = (s.lease_of("ca").await, s.lease_of("cb").await);
    for (name, found) in [("ca", &a), ("cb", &b)] {
        let id = s.id(name);
        assert_eq!(found.lease.name, format!("docker-{id}"));
        assert_eq!(
            found.lease.labels.get("owner").map(String::as_str),
            Some("docker")
        );
        assert_eq!(found.lease.labels.get("container"), Some(&id));
        assert_eq!(
            found.inner_id, 0,
            "the container's root is the lease's uid 0"
        );
        // Joined: the container's user namespace is the lease's own (made by subidd).
        assert_eq!(
            ns_ino(format!("/proc/{}/ns/user", s.pid(name))),
            ns_ino(pin(&s.daemon, &found.lease.name))
        );
    }
    let (ra, rb) = (&a.lease, &b.lease);
    assert!(
        ra.uid_base + ra.size <= rb.uid_base || rb.uid_base + rb.size <= ra.uid_base,
        "two containers, overlapping leases: {} {}",
        ra.uid_base,
        rb.uid_base
    );

    // docker exec lands in the lease's namespace, as the lease's ids.
    let out = s.docker(&[
        "exec",
        "-u",
        "1000",
        "ca",
        "sh",
        "-c",
        "readlink /proc/self/ns/user; cat /proc/self/uid_map; id -u",
    ]);
    let pin_ino = ns_ino(pin(&s.daemon, &ra.name));
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines.first(),
        Some(&format!("user:[{pin_ino}]").as_str()),
        "{out}"
    );
    assert_eq!(
        lines
            .get(1)
            .map(|l| l.split_whitespace().collect::<Vec<_>>()),
        Some(vec!["0", &ra.uid_base.to_string(), "65536"]),
        "{out}"
    );
    assert_eq!(
        lines.get(2),
        Some(&"1000"),
        "container uid 1000 is host uid base + 1000"
    );

    // docker restart, and stop then start: the same range each time.
    s.docker(&["restart", "-t", "1", "ca"]);
    assert_eq!(s.lease_of("ca").await.lease.uid_base, ra.uid_base);
    s.docker(&["stop", "-t", "1", "ca"]);
    let stopped = s.client.get_lease(&ra.name).await.expect("GET lease");
    assert_eq!(
        stopped.state,
        LeaseState::Released,
        "a stopped container's lease is released"
    );
    s.docker(&["start", "ca"]);
    assert_eq!(s.lease_of("ca").await.lease.uid_base, ra.uid_base);
    // docker kill: the container stops and its lease goes with it.
    s.docker(&["kill", "ca"]);
    let deadline = Instant::now() + Duration::from_secs(15);
    while s.client.get_lease(&ra.name).await.expect("GET").state == LeaseState::Active {
        assert!(
            Instant::now() < deadline,
            "lease of a killed container still active"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // docker rm releases the lease and leaves nothing mounted.
    s.docker(&["rm", "-f", "ca", "cb"]);
    assert_eq!(s.no_active_docker_leases().await, Vec::<String>::new());
    assert_eq!(
        s.client.get_lease(&rb.name).await.expect("GET").state,
        LeaseState::Released
    );
    assert_eq!(s.leftover_mounts().await, Vec::<PathBuf>::new());
}

#[tokio::test]
#[cfg_attr(
    not(all(subidd_root, subidd_dockerd, subidd_runc, subidd_busybox)),
    ignore = "needs root, dockerd, runc and a static /bin/busybox"
)]
async fn with_default_runtime_a_plain_docker_run_gets_a_lease() {
    let s = Setup::new(1, "join", true);
    let out = s.docker(&[
        "run",
        "--rm",
        IMAGE,
        "sh",
        "-c",
        "cat /proc/self/uid_map; id -u",
    ]);
    let first = POOL_BASE + POOL_BLOCKS * BLOCK;
    let fields: Vec<u32> = out
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .filter_map(|f| f.parse().ok())
        .collect();
    assert_eq!(fields.len(), 3, "{out}");
    assert_eq!(fields[0], 0);
    assert!(
        fields[1] >= first && fields[1] + fields[2] <= first + POOL_BLOCKS * BLOCK,
        "{out}"
    );
    assert_eq!(fields[2], BLOCK);
    assert!(out.lines().any(|l| l == "0"), "{out}");
    assert_eq!(s.no_active_docker_leases().await, Vec::<String>::new());
    let released = s
        .client
        .list_leases(Some("released"), &[("owner", "docker")])
        .await
        .expect("list");
    assert_eq!(released.len(), 1, "one lease, released after --rm");
    assert_eq!(released[0].uid_base, fields[1]);
    assert_eq!(s.leftover_mounts().await, Vec::<PathBuf>::new());
}

/// `tar -tv --numeric-owner` lines of the top layer of `image`, saved with `docker save`.
fn top_layer_listing(s: &Setup, image: &str) -> String {
    let dir = s.engine.path("save");
    std::fs::create_dir_all(&dir).expect("mkdir");
    let archive = dir.join("image.tar");
    s.docker(&["save", "-o", archive.to_str().expect("utf-8"), image]);
    let run = |script: &str| {
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(script)
            .current_dir(&dir)
            .output()
            .expect("sh");
        assert!(out.status.success(), "{script}: {out:?}");
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    run("tar -xf image.tar");
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).expect("manifest"))
            .expect("manifest JSON");
    let layers = manifest[0]["Layers"].as_array().expect("layers");
    let top = layers.last().and_then(|l| l.as_str()).expect("a layer");
    run(&format!("tar --numeric-owner -tvf {top}"))
}

#[tokio::test]
#[cfg_attr(
    not(all(subidd_root, subidd_dockerd, subidd_runc, subidd_busybox)),
    ignore = "needs root, dockerd, runc and a static /bin/busybox"
)]
async fn the_container_writes_its_files_and_commit_keeps_its_own_ids() {
    let s = Setup::new(2, "join", false);
    let out = s.docker(&[
        "run",
        "--runtime=subid",
        "--name",
        "cw",
        IMAGE,
        "sh",
        "-c",
        "set -e; echo hello > /etc/motd; echo 'x:x:5:5::/:/bin/sh' >> /etc/passwd; \
         touch /tmp/f; chown 1000:1000 /tmp/f; mkdir /home/user/d; chown user:user /home/user/d; \
         rm /bin/ls; stat -c '%u:%g %n' /tmp/f /home/user/d /etc/motd",
    ]);
    assert_eq!(
        out, "1000:1000 /tmp/f\n1000:1000 /home/user/d\n0:0 /etc/motd",
        "what the container sees"
    );
    s.docker(&["commit", "cw", "committed:1"]);
    let listing = top_layer_listing(&s, "committed:1");
    let owner_of = |path: &str| {
        listing
            .lines()
            .find(|l| l.ends_with(&format!(" {path}")) || l.ends_with(&format!(" {path}/")))
            .and_then(|l| l.split_whitespace().nth(1))
            .unwrap_or_else(|| panic!("{path} not in the layer:\n{listing}"))
            .to_string()
    };
    // The layer carries the container's own ids, not the lease's host ids.
    assert_eq!(owner_of("etc/motd"), "0/0");
    assert_eq!(owner_of("etc/passwd"), "0/0");
    assert_eq!(owner_of("tmp/f"), "1000/1000");
    assert_eq!(owner_of("home/user/d"), "1000/1000");
    assert!(
        listing.contains("bin/.wh.ls"),
        "a whiteout for ls:\n{listing}"
    );
    // And a container of the committed image sees them the same way.
    let out = s.docker(&[
        "run",
        "--rm",
        "--runtime=subid",
        "committed:1",
        "sh",
        "-c",
        "stat -c '%u:%g' /tmp/f; cat /etc/motd; test ! -e /bin/ls && echo no-ls",
    ]);
    assert_eq!(out, "1000:1000\nhello\nno-ls");
    s.docker(&["rm", "cw"]);
    assert_eq!(s.leftover_mounts().await, Vec::<PathBuf>::new());
}

/// What the budget probe printed: inotify instances it got (of 100) and message queues.
fn budget(line: &str) -> (u32, u32) {
    let value = |key: &str| {
        line.split_whitespace()
            .find_map(|f| f.strip_prefix(key))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {key} in {line:?}"))
    };
    (value("inotify="), value("mqueue="))
}

/// Takes 100 inotify instances and makes POSIX message queues (files in the mqueue mount) until
/// one is refused, prints what it got, then holds it all. Python from the host's /usr, bound in
/// read-only (busybox has no inotify tool).
const BUDGET_PROBE: &str = "import ctypes, time
libc = ctypes.CDLL(None, use_errno=True)
fds = [fd for fd in (libc.inotify_init() for _ in range(100)) if fd >= 0]
queues = 0
for i in range(64):
    try:
        open('/dev/mqueue/q%d' % i, 'x').close()
    except OSError:
        break
    queues += 1
print('budget inotify=%d mqueue=%d' % (len(fds), queues), flush=True)
time.sleep(600)
";

/// Runs the probe in two containers of `engine`'s runtime `runtime`, one after the other, both
/// as container uid 0; the budgets each got.
fn two_probes(s_engine: &Dockerd, runtime: &str) -> ((u32, u32), (u32, u32)) {
    let mut got = Vec::new();
    for name in ["first", "second"] {
        s_engine
            .docker_ok(&[
                "run",
                "-d",
                "--runtime",
                runtime,
                "--name",
                name,
                "-v",
                "/usr:/usr:ro",
                IMAGE,
                "/usr/bin/python3",
                "-c",
                BUDGET_PROBE,
            ])
            .expect("docker run");
        let deadline = Instant::now() + Duration::from_secs(90);
        let line = loop {
            let out = s_engine.docker(&["logs", name]).expect("logs");
            let text = String::from_utf8_lossy(&out.stdout).to_string();
            if let Some(l) = text.lines().find(|l| l.starts_with("budget ")) {
                break l.to_string();
            }
            assert!(Instant::now() < deadline, "{name}: no budget line: {text}");
            std::thread::sleep(Duration::from_millis(200));
        };
        got.push(budget(&line));
    }
    s_engine
        .docker_ok(&["rm", "-f", "first", "second"])
        .expect("rm");
    (got[0], got[1])
}

/// Removes the `dockremap` user and its subordinate ranges that `dockerd --userns-remap=default`
/// adds, when this test was the one to add them.
struct RemapUser {
    existed: bool,
    subuid: String,
    subgid: String,
}

impl RemapUser {
    fn note() -> RemapUser {
        RemapUser {
            existed: std::process::Command::new("id")
                .arg("dockremap")
                .output()
                .is_ok_and(|o| o.status.success()),
            subuid: std::fs::read_to_string("/etc/subuid").unwrap_or_default(),
            subgid: std::fs::read_to_string("/etc/subgid").unwrap_or_default(),
        }
    }
}

impl Drop for RemapUser {
    fn drop(&mut self) {
        if self.existed {
            return;
        }
        let _ = std::process::Command::new("userdel")
            .arg("dockremap")
            .status();
        let _ = std::fs::write("/etc/subuid", &self.subuid);
        let _ = std::fs::write("/etc/subgid", &self.subgid);
    }
}

#[tokio::test]
#[cfg_attr(
    not(all(subidd_root, subidd_dockerd, subidd_runc, subidd_busybox)),
    ignore = "needs root, dockerd, runc and a static /bin/busybox"
)]
async fn per_user_budgets_are_per_container_unlike_with_userns_remap() {
    // Each container its own lease: the second gets the whole budget again.
    let s = Setup::new(3, "join", false);
    let (first, second) = two_probes(&s.engine, "subid");
    eprintln!("each its own lease: first {first:?}, second {second:?} (inotify, mqueue)");
    assert_eq!(first.0, 100, "inotify instances of the first container");
    assert!(
        first.1 >= 1,
        "the first container makes message queues: {first:?}"
    );
    assert_eq!(
        second, first,
        "the second container, same container uid, own lease"
    );
    drop(s);

    // --userns-remap: one range for every container, whose namespaces root owns: what the
    // first takes, the second does not get.
    let _user = RemapUser::note();
    let remap = Dockerd::start(EngineSpec {
        flags: vec!["--userns-remap=default".into()],
        ..EngineSpec::default()
    })
    .expect("start dockerd --userns-remap");
    remap.import_busybox(IMAGE).expect("import");
    let (first, second) = two_probes(&remap, "runc");
    eprintln!("--userns-remap: first {first:?}, second {second:?} (inotify, mqueue)");
    assert!(
        first.1 >= 1,
        "the first remapped container makes queues: {first:?}"
    );
    assert_eq!(
        second.1, 0,
        "the second remapped container gets no message queue"
    );
    assert!(
        second.0 < 100,
        "the second remapped container gets fewer inotify instances ({})",
        second.0
    );
}

#[tokio::test]
#[cfg_attr(
    not(all(subidd_root, subidd_dockerd, subidd_runc, subidd_busybox)),
    ignore = "needs root, dockerd, runc and a static /bin/busybox"
)]
async fn docker_run_fails_closed_when_subidd_is_down_or_the_pool_is_exhausted() {
    // A pool of one block, held by another lease.
    let mut s = Setup::with_pool(4, 1, "join", false);
    let hog = s
        .client
        .put_lease("hog", &LeaseRequest::default())
        .await
        .expect("lease hog");
    assert!(hog.1);
    let out = s
        .engine
        .docker(&["run", "--runtime=subid", "--name", "full", IMAGE, "true"])
        .expect("docker");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("pool_exhausted"), "docker run says: {err}");

    // subidd down.
    s.daemon.stop().expect("stop subidd");
    let out = s
        .engine
        .docker(&["run", "--runtime=subid", "--name", "down", IMAGE, "true"])
        .expect("docker");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("subidd is not reachable") && err.contains("refusing to run"),
        "docker run says: {err}"
    );
    // No container ran, nothing stays mounted.
    assert_eq!(s.docker(&["ps", "-q"]), "");
    for name in ["full", "down"] {
        let state = s.docker(&["inspect", "-f", "{{.State.Status}}", name]);
        assert_eq!(state, "created", "{name} never ran");
    }
    assert_eq!(s.leftover_mounts().await, Vec::<PathBuf>::new());
}

/// Stops the container by releasing its lease with force; checks the plain release is refused
/// first. Shared by the join and map tests.
async fn release_is_refused_while_it_runs_and_force_stops_it(s: &Setup) {
    s.docker(&[
        "run",
        "-d",
        "--runtime=subid",
        "--name",
        "held",
        IMAGE,
        "sleep",
        "600",
    ]);
    let lease = s.lease_of("held").await.lease.name;
    let refused = s.client.release_lease(&lease, false, false).await;
    assert_eq!(
        refused.as_ref().err().and_then(|e| e.code()),
        Some("lease_busy"),
        "{refused:?}"
    );
    s.client
        .release_lease(&lease, true, false)
        .await
        .expect("forced release");
    let deadline = Instant::now() + Duration::from_secs(20);
    while s.docker(&["inspect", "-f", "{{.State.Running}}", "held"]) == "true" {
        assert!(
            Instant::now() < deadline,
            "the container survived a forced release"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    s.docker(&["rm", "-f", "held"]);
    assert_eq!(s.leftover_mounts().await, Vec::<PathBuf>::new());
}

#[tokio::test]
#[cfg_attr(
    not(all(subidd_root, subidd_dockerd, subidd_runc, subidd_busybox)),
    ignore = "needs root, dockerd, runc and a static /bin/busybox"
)]
async fn a_joined_container_holds_its_lease_until_forced() {
    let s = Setup::new(5, "join", false);
    release_is_refused_while_it_runs_and_force_stops_it(&s).await;
}

/// Needs `POST /v1/leases/{name}/attach` (the container's cgroup counted as the lease's): in
/// map mode nothing else tells subidd the container is there.
#[tokio::test]
#[cfg_attr(
    not(all(subidd_root, subidd_dockerd, subidd_runc, subidd_busybox)),
    ignore = "needs root, dockerd, runc and a static /bin/busybox"
)]
async fn a_mapped_container_is_attached_and_holds_its_lease_until_forced() {
    let s = Setup::new(6, "map", false);
    s.docker(&[
        "run",
        "-d",
        "--runtime=subid",
        "--name",
        "cm",
        IMAGE,
        "sleep",
        "600",
    ]);
    let found = s.lease_of("cm").await;
    // Mapped: a namespace of the runtime's own, with the lease's range.
    assert_ne!(
        ns_ino(format!("/proc/{}/ns/user", s.pid("cm"))),
        ns_ino(pin(&s.daemon, &found.lease.name))
    );
    let map = std::fs::read_to_string(format!("/proc/{}/uid_map", s.pid("cm"))).expect("map");
    assert_eq!(
        map.split_whitespace().collect::<Vec<_>>(),
        vec![
            "0".to_string(),
            found.lease.uid_base.to_string(),
            BLOCK.to_string()
        ]
    );
    s.docker(&["rm", "-f", "cm"]);
    release_is_refused_while_it_runs_and_force_stops_it(&s).await;
}

#[tokio::test]
#[cfg_attr(
    not(all(subidd_root, subidd_dockerd, subidd_runc, subidd_busybox)),
    ignore = "needs root, dockerd, runc and a static /bin/busybox"
)]
async fn restart_policies_and_a_dockerd_restart_keep_the_range() {
    let mut s = Setup::new(7, "join", false);
    s.docker(&[
        "run",
        "-d",
        "--runtime=subid",
        "--restart=always",
        "--name",
        "cr",
        IMAGE,
        "sleep",
        "600",
    ]);
    let before = s.lease_of("cr").await.lease;
    // The container's init dies: the restart policy starts it again, on the same range.
    let pid = s.pid("cr");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(pid).expect("pid")),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill");
    let deadline = Instant::now() + Duration::from_secs(30);
    while s.pid("cr") == pid || s.pid("cr") == 0 {
        assert!(Instant::now() < deadline, "not restarted");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(s.lease_of("cr").await.lease.uid_base, before.uid_base);
    // dockerd stops (and stops the container), starts again: --restart=always brings it back.
    s.engine.stop_engine();
    s.engine.spawn().expect("dockerd again");
    let deadline = Instant::now() + Duration::from_secs(60);
    while s.pid("cr") == 0 {
        assert!(Instant::now() < deadline, "not restarted with the engine");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let after = s.lease_of("cr").await.lease;
    assert_eq!((after.name, after.uid_base), (before.name, before.uid_base));
    s.docker(&["rm", "-f", "cr"]);
    assert_eq!(s.leftover_mounts().await, Vec::<PathBuf>::new());
}

#[tokio::test]
#[cfg_attr(not(subidd_root), ignore = "needs root")]
async fn the_namespace_endpoint_makes_the_leases_namespace_once() {
    let daemon = Daemon::start("").expect("start subidd");
    let client = Client::new(&daemon.socket);
    let (lease, created) = client
        .put_lease("ns-1", &LeaseRequest::default())
        .await
        .expect("lease");
    assert!(created);
    let pins = client.ensure_namespace("ns-1").await.expect("namespace");
    assert_eq!(pins.user, pin(&daemon, "ns-1"));
    assert!(subid_sys::userns::is_pinned(&pins.user));
    let fd = subid_sys::userns::open_pinned(&pins.user).expect("open pin");
    assert_eq!(
        subid_sys::userns::owner_uid(std::os::fd::AsFd::as_fd(&fd)).expect("owner"),
        lease.uid_base,
        "the namespace's owner is the lease's base uid"
    );
    // Again: the same namespace (200), and a spawn joins it.
    let raw = client
        .raw(
            subid_client::HttpMethod::PUT,
            "/v1/leases/ns-1/namespace",
            None,
        )
        .await
        .expect("PUT");
    assert_eq!(raw.status.as_u16(), 200);
    let process = client
        .spawn(
            "ns-1",
            &subid_client::SpawnRequest {
                argv: vec!["/bin/sleep".into(), "30".into()],
                ..Default::default()
            },
            None,
        )
        .await
        .expect("spawn");
    assert_eq!(
        ns_ino(format!("/proc/{}/ns/user", process.pid)),
        ns_ino(&pins.user)
    );
    client
        .release_lease("ns-1", true, false)
        .await
        .expect("release");
    assert!(!pins.user.exists(), "the pin goes with the lease");
    let gone = client.ensure_namespace("ns-1").await.unwrap_err();
    assert_eq!(gone.code(), Some("not_found"));
}

#[tokio::test]
async fn the_typed_client_reads_every_answer_of_the_real_daemon() {
    let daemon = Daemon::start("quarantine_seconds = 60").expect("start subidd");
    let client = Client::new(&daemon.socket);
    let labels = std::collections::BTreeMap::from([("owner".to_string(), "t".to_string())]);
    let (lease, created) = client
        .put_lease(
            "typed",
            &LeaseRequest {
                labels: Some(labels),
                ttl_seconds: Some(3600),
                ..Default::default()
            },
        )
        .await
        .expect("put");
    assert!(created && lease.state == LeaseState::Active);
    assert_eq!(client.get_lease("typed").await.expect("get"), lease);
    let found = client
        .lookup_uid(lease.uid_base + 999)
        .await
        .expect("lookup");
    assert_eq!((found.inner_id, found.lease.name.as_str()), (999, "typed"));
    let idmap = client.idmap("typed").await.expect("idmap");
    assert_eq!(idmap.oci.uid_mappings[0].host_id, lease.uid_base);
    assert_eq!(
        client.idmap_text("typed", "uid_map").await.expect("text"),
        format!("0 {} {}\n", lease.uid_base, lease.size)
    );
    let pool = client.pool().await.expect("pool");
    assert_eq!(pool.blocks.active, 1);
    assert_eq!(
        client
            .list_leases(None, &[("owner", "t")])
            .await
            .expect("list")
            .len(),
        1
    );
    client.renew_lease("typed").await.expect("renew");
    let conflict = client
        .put_lease("typed", &LeaseRequest::default())
        .await
        .unwrap_err();
    assert_eq!(conflict.code(), Some("lease_conflict"));
    assert_eq!(conflict.status(), Some(409));
    client
        .release_lease("typed", false, false)
        .await
        .expect("release");
    let events = client.lease_events("typed").await.expect("events");
    let kinds: Vec<&str> = events.iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(kinds, vec!["create", "renew", "release"]);
    let feed = client.events(Some(0), Some("typed")).await.expect("feed");
    assert!(feed.iter().any(|e| e.kind == "lease.released"), "{feed:?}");
    let missing = client.get_lease("never").await.unwrap_err();
    assert_eq!(missing.code(), Some("not_found"));
}
