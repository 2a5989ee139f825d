//! The recipes of docs/INTEGRATIONS.md (runc, crun, podman, the process API), run as written
//! with bash against the real daemon, and what they claim checked from the host.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use hyper::StatusCode;
use serde_json::Value;
use subidd_tests::{Client, Daemon};

use crate::util::{BLOCK, assert_error, assert_status, gone, ids, ns_ino, pin, range_of};

/// Longest a recipe may take before the test calls it hung.
const RECIPE_TIMEOUT: Duration = Duration::from_secs(120);

/// Base of the tests' pools: each test gets `POOL_BLOCKS` blocks of its own from here, so no
/// other test's processes run with its uids (the tests look for processes by uid).
const POOL_BASE: u32 = 0x7C00_0000;
const POOL_BLOCKS: u32 = 4;

/// The `# recipe: NAME` blocks of docs/INTEGRATIONS.md, and its podman `containers.conf`.
struct Doc {
    recipes: HashMap<String, String>,
    containers_conf: String,
}

impl Doc {
    fn read() -> Doc {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/INTEGRATIONS.md");
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
        let mut recipes = HashMap::new();
        let mut containers_conf = None;
        let mut lines = text.lines();
        while let Some(line) = lines.next() {
            let Some(lang) = line.strip_prefix("```") else {
                continue;
            };
            let body: Vec<&str> = lines.by_ref().take_while(|l| *l != "```").collect();
            if lang == "toml" {
                containers_conf = Some(body.join("\n") + "\n");
            } else if let Some(name) = body.first().and_then(|l| l.strip_prefix("# recipe: ")) {
                let old = recipes.insert(name.to_string(), body[1..].join("\n") + "\n");
                assert!(old.is_none(), "recipe {name} appears twice in the doc");
            }
        }
        Doc {
            recipes,
            containers_conf: containers_conf.expect("the doc's podman containers.conf block"),
        }
    }

    fn recipe(&self, name: &str) -> &str {
        self.recipes
            .get(name)
            .unwrap_or_else(|| panic!("docs/INTEGRATIONS.md has no `# recipe: {name}` block"))
    }
}

/// Which runtime a test drives; decides the `RT` variable and how leftovers are removed.
#[derive(Clone, Copy, PartialEq)]
enum Runtime {
    Runc,
    Crun,
    Podman,
    None,
}

impl Runtime {
    fn rt(self) -> &'static str {
        match self {
            Runtime::Crun => "crun",
            _ => "runc",
        }
    }
}

/// A daemon, a directory of bundles and the shell environment the recipes run in. Removes the
/// containers it started when dropped, whatever the test's outcome.
struct Bench {
    daemon: Daemon,
    client: Client,
    doc: Doc,
    dir: tempfile::TempDir,
    runtime: Runtime,
    /// Prepended to every recipe: `setup`, and the crun work-around where the host needs it.
    prelude: String,
    env: Vec<(String, String)>,
    started: Vec<String>,
}

impl Bench {
    /// `slot` picks the test's own pool.
    fn new(runtime: Runtime, slot: u32) -> Bench {
        let config = format!(
            "kill_grace_ms = 1000\n[pool]\nbase = {}\nsize = {}\n",
            POOL_BASE + slot * POOL_BLOCKS * BLOCK,
            POOL_BLOCKS * BLOCK
        );
        let daemon = Daemon::start(&config).expect("start daemon");
        let client = daemon.client();
        let doc = Doc::read();
        let dir = tempfile::tempdir().expect("tempdir");
        // The container's root is an unmapped host uid: it must be able to reach the rootfs.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod tempdir");
        let mut prelude = doc.recipe("setup").to_string();
        if runtime == Runtime::Crun && cgroup2_has_controllers_beside_v1() {
            prelude.push_str(doc.recipe("crun-hybrid"));
        }
        let mut env = vec![
            ("S".to_string(), daemon.socket.display().to_string()),
            (
                "SUBIDD_RUNTIME_DIR".to_string(),
                daemon.path("run").display().to_string(),
            ),
            ("RT".to_string(), runtime.rt().to_string()),
        ];
        if runtime == Runtime::Podman {
            env.extend(podman_config(&doc, dir.path()));
        }
        Bench {
            daemon,
            client,
            doc,
            dir,
            runtime,
            prelude,
            env,
            started: Vec::new(),
        }
    }

    /// A lease (and container) name unique to this test run, as container names are host-wide.
    fn name(&self, short: &str) -> String {
        format!("{short}-{}", std::process::id())
    }

    fn bundle(&self, lease: &str) -> PathBuf {
        self.dir.path().join(lease)
    }

    /// Runs the named recipes, in order, as one bash script for `lease`; returns its stdout.
    /// Panics with the script's output when it fails or hangs.
    fn recipes(&mut self, lease: &str, names: &[&str]) -> String {
        let mut script = self.prelude.clone();
        for name in names {
            script.push_str(self.doc.recipe(name));
        }
        if names.iter().any(|n| n.ends_with("-run")) {
            self.started.push(lease.to_string());
        }
        self.bash(lease, &script, &names.join(", "))
    }

    /// Runs `script` after the prelude, with the recipes' variables set for `lease`.
    fn shell(&self, lease: &str, script: &str) -> String {
        self.bash(lease, &format!("{}{script}\n", self.prelude), script)
    }

    fn bash(&self, lease: &str, script: &str, what: &str) -> String {
        // Files, not pipes: a detached container keeps the runtime's stdout open for its life.
        let out_path = self.dir.path().join(format!("{lease}.out"));
        let err_path = self.dir.path().join(format!("{lease}.err"));
        let out = File::create(&out_path).expect("create stdout file");
        let err = File::create(&err_path).expect("create stderr file");
        let mut child = Command::new("bash")
            .args(["-euo", "pipefail", "-c", script])
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .env("LEASE", lease)
            .env("BUNDLE", self.bundle(lease))
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("spawn bash");
        let deadline = Instant::now() + RECIPE_TIMEOUT;
        let status = loop {
            if let Some(status) = child.try_wait().expect("try_wait bash") {
                break Some(status);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let stdout = std::fs::read_to_string(&out_path).unwrap_or_default();
        let stderr = std::fs::read_to_string(&err_path).unwrap_or_default();
        match status {
            Some(s) if s.success() => stdout,
            Some(s) => panic!(
                "recipe {what} for {lease} failed ({s})\n--- stdout\n{stdout}--- stderr\n{stderr}"
            ),
            None => panic!(
                "recipe {what} for {lease} did not finish in {RECIPE_TIMEOUT:?}\n--- stdout\n{stdout}--- stderr\n{stderr}"
            ),
        }
    }

    /// `(uid_base, size)` of the lease, from the daemon.
    async fn range(&self, lease: &str) -> (u32, u32) {
        let reply = self
            .client
            .get(&format!("/v1/leases/{lease}"))
            .await
            .expect("GET lease");
        assert_status(&reply, StatusCode::OK, "GET lease");
        let (base, size) = range_of(&reply.json());
        (
            u32::try_from(base).expect("base fits u32"),
            u32::try_from(size).expect("size fits u32"),
        )
    }
}

impl Drop for Bench {
    fn drop(&mut self) {
        let remove = match self.runtime {
            Runtime::Podman => r#"podman rm --force --time 0 "$LEASE""#,
            Runtime::Runc | Runtime::Crun => r#"$RT delete --force "$LEASE""#,
            Runtime::None => return,
        };
        for lease in std::mem::take(&mut self.started) {
            // Best effort: most are gone already, and a panic here would hide the test's own.
            let _ = Command::new("bash")
                .args(["-c", &format!("{}{remove}\n", self.prelude)])
                .envs(self.env.iter().map(|(k, v)| (k, v)))
                .env("LEASE", &lease)
                .env("BUNDLE", self.bundle(&lease))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// A hybrid host whose cgroup2 mount has controllers: crun 1.8 refuses those.
fn cgroup2_has_controllers_beside_v1() -> bool {
    std::fs::read_to_string("/sys/fs/cgroup/unified/cgroup.controllers")
        .is_ok_and(|c| !c.trim().is_empty())
}

/// The doc's `containers.conf` plus a temp state, and a temp `storage.conf`, as env vars.
fn podman_config(doc: &Doc, dir: &Path) -> Vec<(String, String)> {
    let state = dir.join("podman");
    let conf = dir.join("containers.conf");
    let storage = dir.join("storage.conf");
    assert!(
        doc.containers_conf
            .trim_end()
            .ends_with("runtime = \"runc\""),
        "the doc's containers.conf should end in its [engine] table"
    );
    let text = format!("{}tmp_dir = {:?}\n", doc.containers_conf, state.join("tmp"));
    std::fs::write(&conf, text).expect("write containers.conf");
    let text = format!(
        "[storage]\ndriver = \"vfs\"\ngraphroot = {:?}\nrunroot = {:?}\n",
        state.join("graph"),
        state.join("run")
    );
    std::fs::write(&storage, text).expect("write storage.conf");
    vec![
        ("CONTAINERS_CONF".to_string(), conf.display().to_string()),
        (
            "CONTAINERS_STORAGE_CONF".to_string(),
            storage.display().to_string(),
        ),
    ]
}

/// The pid a runtime wrote to `file` in the bundle.
fn pid_file(bundle: &Path, file: &str) -> i64 {
    let path = bundle.join(file);
    let text =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    text.trim()
        .parse()
        .unwrap_or_else(|e| panic!("{} holds {text:?}: {e}", path.display()))
}

/// Real uid of a process.
fn uid(pid: i64) -> u32 {
    ids(pid, "Uid:")[0]
}

/// Live (not zombie) processes whose real uid is in `[base, base + size)`: `(pid, uid)`.
fn in_range(base: u32, size: u32) -> Vec<(i64, u32)> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("read /proc").flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i64>().ok())
        else {
            continue;
        };
        let Ok(status) = std::fs::read_to_string(entry.path().join("status")) else {
            continue;
        };
        let field = |key: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .map(str::trim)
                .map(str::to_owned)
        };
        let zombie = field("State:").is_some_and(|s| s.starts_with('Z'));
        let uid = field("Uid:").and_then(|u| {
            u.split_whitespace()
                .next()
                .and_then(|u| u.parse::<u32>().ok())
        });
        if let Some(uid) = uid
            && !zombie
            && uid >= base
            && uid - base < size
        {
            found.push((pid, uid));
        }
    }
    found
}

/// Waits (10 s at most) until no live process has a uid in the range; returns those left.
async fn drained(base: u32, size: u32) -> Vec<(i64, u32)> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = in_range(base, size);
        if left.is_empty() || Instant::now() > deadline {
            return left;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Mapping (`idmap?format=oci` into a user namespace of the runtime's own), for two leases.
async fn mapping(runtime: Runtime, slot: u32) {
    let mut bench = Bench::new(runtime, slot);
    let (a, b) = (bench.name("map-a"), bench.name("map-b"));
    let mut seen = Vec::new();
    for lease in [&a, &b] {
        bench.recipes(lease, &["lease", "rootfs", "oci-map", "oci-run"]);
        let (base, size) = bench.range(lease).await;
        let bundle = bench.bundle(lease);
        let (root, user) = (pid_file(&bundle, "pid"), pid_file(&bundle, "pid999"));
        assert_eq!(uid(root), base, "{lease}: container root is uid_base");
        assert_eq!(uid(user), base + 999, "{lease}: container uid 999");
        let listed = bench.recipes(lease, &["range-procs"]);
        for pid in [root, user] {
            assert!(
                listed
                    .lines()
                    .any(|l| l.split_whitespace().next() == Some(&pid.to_string())),
                "range-procs should list {pid}:\n{listed}"
            );
        }
        seen.push((base, size, root, user));
    }
    let [
        (base_a, size_a, root_a, user_a),
        (base_b, size_b, root_b, _),
    ] = seen[..]
    else {
        panic!("two leases expected");
    };
    assert!(
        base_a + size_a <= base_b || base_b + size_b <= base_a,
        "the two leases' host ranges overlap: {base_a}+{size_a}, {base_b}+{size_b}"
    );

    // subidd does not know a container the runtime started: even a forced release answers 204
    // and leaves it running.
    let reply = bench
        .client
        .delete(&format!("/v1/leases/{a}?force=true"))
        .await
        .expect("DELETE");
    assert_status(&reply, StatusCode::NO_CONTENT, "forced release of a");
    let left = in_range(base_a, size_a);
    for pid in [root_a, user_a] {
        assert!(
            left.iter().any(|&(p, _)| p == pid),
            "{pid} of released lease {a} still runs: {left:?}"
        );
    }
    bench.shell(&a, r#"$RT delete --force "$LEASE""#);
    assert!(gone(root_a).await, "{a}: the runtime stopped its container");

    // The documented order: stop the container, then release.
    bench.recipes(&b, &["oci-stop"]);
    assert!(gone(root_b).await, "{b}: oci-stop stopped the container");
    let left = drained(base_b, size_b).await;
    assert!(left.is_empty(), "{b}: left in the range: {left:?}");
    let lease = bench
        .client
        .get(&format!("/v1/leases/{b}"))
        .await
        .expect("GET");
    assert_eq!(lease.json()["state"], "released", "{b}: {}", lease.text());
}

/// Joining (the lease's pinned user namespace): subidd counts and stops the container.
async fn joining(runtime: Runtime, slot: u32) {
    let mut bench = Bench::new(runtime, slot);
    let lease = bench.name("join");
    bench.recipes(&lease, &["lease", "rootfs", "oci-join", "oci-run"]);
    let (base, _) = bench.range(&lease).await;
    let bundle = bench.bundle(&lease);
    let (root, user) = (pid_file(&bundle, "pid"), pid_file(&bundle, "pid999"));
    let pin_ino = ns_ino(pin(&bench.daemon, &lease));
    for pid in [root, user] {
        assert_eq!(
            ns_ino(format!("/proc/{pid}/ns/user")),
            pin_ino,
            "{pid} runs in the lease's own user namespace"
        );
    }
    assert_eq!(uid(root), base, "container root is uid_base");
    assert_eq!(uid(user), base + 999, "container uid 999");

    let path = format!("/v1/leases/{lease}");
    let busy = bench.client.delete(&path).await.expect("DELETE");
    assert_error(
        &busy,
        StatusCode::CONFLICT,
        "lease_busy",
        "release, container running",
    );
    let forced = bench
        .client
        .delete(&format!("{path}?force=true"))
        .await
        .expect("DELETE force");
    assert_status(&forced, StatusCode::NO_CONTENT, "forced release");
    assert!(
        gone(root).await && gone(user).await,
        "force stopped the container"
    );
    // The runtime keeps its record of the stopped container until it is deleted.
    bench.shell(&lease, r#"$RT delete "$LEASE""#);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(all(subidd_root, subidd_runc, subidd_jq, subidd_busybox)),
    ignore = "needs root, runc, jq and a static /bin/busybox (apt-get install runc jq busybox-static)"
)]
async fn runc_mapping() {
    mapping(Runtime::Runc, 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(all(subidd_root, subidd_crun, subidd_jq, subidd_busybox)),
    ignore = "needs root, crun, jq and a static /bin/busybox (apt-get install crun jq busybox-static)"
)]
async fn crun_mapping() {
    mapping(Runtime::Crun, 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(all(subidd_root, subidd_runc, subidd_jq, subidd_busybox)),
    ignore = "needs root, runc, jq and a static /bin/busybox (apt-get install runc jq busybox-static)"
)]
async fn runc_joining() {
    joining(Runtime::Runc, 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(all(subidd_root, subidd_crun, subidd_jq, subidd_busybox)),
    ignore = "needs root, crun, jq and a static /bin/busybox (apt-get install crun jq busybox-static)"
)]
async fn crun_joining() {
    joining(Runtime::Crun, 3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(all(subidd_root, subidd_podman, subidd_runc, subidd_jq, subidd_busybox)),
    ignore = "needs root, podman, runc, jq and a static /bin/busybox (apt-get install podman runc jq busybox-static)"
)]
async fn podman_mapping() {
    let mut bench = Bench::new(Runtime::Podman, 4);
    let lease = bench.name("podman");
    let out = bench.recipes(&lease, &["lease", "rootfs", "podman-run"]);
    let (base, size) = bench.range(&lease).await;
    assert!(
        out.contains(&format!("Uid:\t{base}\t")),
        "podman-run prints the container root's host uid {base}:\n{out}"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut uids: Vec<u32> = Vec::new();
    while Instant::now() < deadline {
        uids = in_range(base, size).into_iter().map(|(_, u)| u).collect();
        if uids.contains(&base) && uids.contains(&(base + 999)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        uids.contains(&base) && uids.contains(&(base + 999)),
        "container uids 0 and 999 run as {base} and {}; found {uids:?}",
        base + 999
    );
    bench.recipes(&lease, &["podman-stop"]);
    let left = drained(base, size).await;
    assert!(left.is_empty(), "podman-stop left in the range: {left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(all(subidd_root, subidd_jq, subidd_busybox)),
    ignore = "needs root, jq and a static /bin/busybox (apt-get install jq busybox-static)"
)]
async fn process_api_chroot() {
    let mut bench = Bench::new(Runtime::None, 5);
    let lease = bench.name("api");
    let out = bench.recipes(&lease, &["lease", "rootfs", "api-run"]);
    let (base, size) = bench.range(&lease).await;
    let spawned: Vec<Value> = out
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v.get("host_uid").is_some())
        .collect();
    let host_uids: Vec<u64> = spawned
        .iter()
        .filter_map(|v| v["host_uid"].as_u64())
        .collect();
    assert_eq!(
        host_uids,
        [u64::from(base) + 999, u64::from(base)],
        "api-run starts as uid 999, then as uid 0 (chroot): {out}"
    );
    let id_file = bench.bundle(&lease).join("rootfs/out/id");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !id_file.exists() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let meta = std::fs::metadata(&id_file).expect("the chrooted shell wrote out/id");
    assert_eq!(meta.uid(), base + 999, "out/id belongs to uid_base + 999");
    let text = std::fs::read_to_string(&id_file).expect("read out/id");
    assert!(
        text.starts_with("uid=999 gid=999"),
        "id in the chroot: {text}"
    );
    let pids: Vec<i64> = spawned.iter().filter_map(|v| v["pid"].as_i64()).collect();
    for &pid in &pids {
        assert_eq!(uid(pid), base + 999, "{pid} runs as uid_base + 999");
    }

    let reply = bench
        .client
        .delete(&format!("/v1/leases/{lease}?force=true"))
        .await
        .expect("DELETE");
    assert_status(&reply, StatusCode::NO_CONTENT, "forced release");
    for pid in pids {
        assert!(gone(pid).await, "force stopped {pid}");
    }
    let left = drained(base, size).await;
    assert!(left.is_empty(), "left in the range: {left:?}");
}
