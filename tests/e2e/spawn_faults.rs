//! A spawn never half-happens: a client that disconnects mid-spawn leaves a recorded running
//! process or nothing, and spawns that fail inside the child (exec, cwd) or at the cgroup leave
//! no process, row or pin behind.

use std::collections::BTreeSet;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use hyper::StatusCode;
use serde_json::{Value, json};
use subidd_tests::{Client, Daemon};
use tokio::io::AsyncWriteExt;
use tokio::net::UnixStream;

use crate::util::{BASE, BLOCK, assert_error, assert_status, processes_in_range};

/// A pool of its own for each test (16 blocks from `first_block`, in 3100..3132), so the uids
/// its processes run as are nobody else's.
fn config(first_block: u32) -> String {
    format!(
        "kill_grace_ms = 500\nquarantine_seconds = 0\n[pool]\nbase = {}\nsize = {}\nblock = {BLOCK}\n",
        BASE + first_block * BLOCK,
        16 * BLOCK
    )
}

fn pin(daemon: &Daemon, lease: &str) -> PathBuf {
    daemon.path("run").join("ns").join(lease).join("user")
}

async fn records(client: &Client, lease: &str) -> Vec<Value> {
    let reply = client
        .get(&format!("/v1/leases/{lease}/processes"))
        .await
        .expect("list processes");
    assert_status(&reply, StatusCode::OK, "list processes");
    reply.json()["processes"]
        .as_array()
        .expect("processes array")
        .clone()
}

async fn lease(client: &Client, name: &str, body: Option<&str>) -> (u64, u64) {
    let reply = client
        .put(&format!("/v1/leases/{name}"), body)
        .await
        .expect("PUT");
    assert_status(&reply, StatusCode::CREATED, name);
    let lease = reply.json();
    (
        lease["uid_base"].as_u64().expect("base"),
        lease["size"].as_u64().expect("size"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(not(subidd_root), ignore = "needs root")]
async fn a_client_that_hangs_up_mid_spawn_leaves_a_recorded_process_or_nothing() {
    const DROPS: usize = 40;
    let daemon = Daemon::start(&config(3100)).expect("start daemon");
    let client = daemon.client();
    let (base, size) = lease(&client, "hangup", None).await;
    let body = json!({"argv": ["sleep", "60"]}).to_string();
    let request = format!(
        "POST /v1/leases/hangup/processes HTTP/1.1\r\nHost: localhost\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    for i in 0..DROPS {
        let mut stream = UnixStream::connect(&daemon.socket).await.expect("connect");
        stream.write_all(request.as_bytes()).await.expect("write");
        // Hang up at once, or a moment later, while the spawn is under way.
        if i % 2 == 1 {
            tokio::time::sleep(Duration::from_micros(200 * i as u64)).await;
        }
        drop(stream);
    }
    // Let every detached spawn finish (recorded, or undone).
    let deadline = Instant::now() + Duration::from_secs(10);
    let (running, live) = loop {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let running: BTreeSet<i32> = records(&client, "hangup")
            .await
            .iter()
            .filter(|p| p["state"] == "running")
            .map(|p| i32::try_from(p["pid"].as_i64().expect("pid")).expect("pid"))
            .collect();
        let live = processes_in_range(base, size);
        if running == live || Instant::now() > deadline {
            break (running, live);
        }
    };
    assert_eq!(
        running, live,
        "every live process of the lease is recorded as running, and every running record lives"
    );
    let ns = std::fs::metadata(pin(&daemon, "hangup")).map(|m| m.ino());
    for pid in &running {
        let member = std::fs::metadata(format!("/proc/{pid}/ns/user")).map(|m| m.ino());
        assert_eq!(
            member.ok(),
            ns.as_ref().ok().copied(),
            "{pid} is in the lease's namespace"
        );
    }
    let all = records(&client, "hangup").await;
    assert!(
        all.len() <= DROPS,
        "no spawn was recorded twice: {}",
        all.len()
    );
    println!(
        "hang-up mid-spawn: {} of {DROPS} spawns recorded and running, the other {} left nothing",
        running.len(),
        DROPS - running.len()
    );
    let forced = client
        .delete("/v1/leases/hangup?force=true")
        .await
        .expect("DELETE");
    assert_status(&forced, StatusCode::NO_CONTENT, "forced delete");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !processes_in_range(base, size).is_empty() {
        assert!(
            Instant::now() < deadline,
            "processes survived the forced delete"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(not(subidd_root), ignore = "needs root")]
async fn spawns_failing_in_the_child_leave_no_process_row_or_pin() {
    let daemon = Daemon::start(&config(3116)).expect("start daemon");
    let client = daemon.client();
    // Files the API's checks accept but the child cannot use: a script whose interpreter is
    // missing (execve fails with ENOENT), and a directory only root may enter (chdir fails
    // with EACCES as the lease's uid).
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let script = dir.path().join("bad-interpreter");
    std::fs::write(&script, "#!/no/such/interpreter\n").expect("write script");
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let locked = dir.path().join("locked");
    std::fs::create_dir(&locked).expect("mkdir");
    std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    let cases = [
        ("exec", json!({"argv": [script.to_str().expect("utf-8")]})),
        (
            "cwd",
            json!({"argv": ["/bin/true"], "cwd": locked.to_str().expect("utf-8"), "user": 1000}),
        ),
    ];
    for (what, body) in &cases {
        // First spawn of a fresh lease (the namespace would be made by it), then the same in a
        // lease whose namespace exists already.
        let name = format!("fail-{what}");
        let (base, size) = lease(&client, &name, None).await;
        let reply = client
            .post(
                &format!("/v1/leases/{name}/processes"),
                Some(&body.to_string()),
            )
            .await
            .expect("spawn");
        assert_error(
            &reply,
            StatusCode::BAD_REQUEST,
            "exec_failed",
            &format!("{what} failing in the child"),
        );
        assert_eq!(
            records(&client, &name).await,
            Vec::<Value>::new(),
            "{what}: no row"
        );
        let left = processes_in_range(base, size);
        let shown: Vec<String> = left
            .iter()
            .map(|p| {
                format!(
                    "{p}: {}",
                    std::fs::read_to_string(format!("/proc/{p}/status"))
                        .unwrap_or_default()
                        .lines()
                        .take(8)
                        .collect::<Vec<_>>()
                        .join(" | ")
                )
            })
            .collect();
        assert!(left.is_empty(), "{what}: no process left: {shown:?}");
        assert!(
            !subid_sys::userns::is_pinned(&pin(&daemon, &name)),
            "{what}: no pin left by a failed first spawn"
        );
        let ok = client
            .post(
                &format!("/v1/leases/{name}/processes?wait=true"),
                Some(r#"{"argv":["/bin/true"]}"#),
            )
            .await
            .expect("spawn");
        assert_status(&ok, StatusCode::CREATED, "a good spawn makes the namespace");
        let pinned_ino = std::fs::metadata(pin(&daemon, &name)).expect("pin").ino();
        let reply = client
            .post(
                &format!("/v1/leases/{name}/processes"),
                Some(&body.to_string()),
            )
            .await
            .expect("spawn");
        assert_error(
            &reply,
            StatusCode::BAD_REQUEST,
            "exec_failed",
            &format!("{what} failing in a joining spawn"),
        );
        assert_eq!(
            records(&client, &name).await.len(),
            1,
            "{what}: only the good spawn is recorded"
        );
        assert!(
            processes_in_range(base, size).is_empty(),
            "{what}: no process left by the joining spawn"
        );
        assert_eq!(
            std::fs::metadata(pin(&daemon, &name)).expect("pin").ino(),
            pinned_ino,
            "{what}: the lease's namespace is unharmed"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(not(subidd_root), ignore = "needs root")]
#[cfg_attr(
    not(subidd_pids),
    ignore = "needs a pids cgroup controller on this host"
)]
async fn a_lease_cgroup_removed_behind_the_daemons_back_is_made_again() {
    let daemon = Daemon::start(&config(3132)).expect("start daemon");
    let client = daemon.client();
    let (base, size) = lease(&client, "cg", Some(r#"{"pids_max": 10}"#)).await;
    let pool = client.get("/v1/pool").await.expect("pool").json();
    let parent = pool["cgroup"]["lease_cgroups"]
        .as_str()
        .expect("lease cgroups")
        .to_string();
    let dir = PathBuf::from(parent).join("lease-cg");
    let first = client
        .post(
            "/v1/leases/cg/processes?wait=true",
            Some(r#"{"argv":["/bin/true"]}"#),
        )
        .await
        .expect("spawn");
    assert_status(&first, StatusCode::CREATED, "first spawn");
    assert!(dir.is_dir(), "{} made at the first spawn", dir.display());
    std::fs::remove_dir(&dir).expect("remove the empty lease cgroup");
    let reply = client
        .post(
            "/v1/leases/cg/processes?wait=true",
            Some(r#"{"argv":["/bin/true"]}"#),
        )
        .await
        .expect("spawn");
    assert_status(
        &reply,
        StatusCode::CREATED,
        "a spawn after the lease's cgroup was removed",
    );
    assert!(dir.is_dir(), "the cgroup was made again for the spawn");
    assert_eq!(records(&client, "cg").await.len(), 2, "two rows");
    assert!(
        processes_in_range(base, size).is_empty(),
        "/bin/true has exited"
    );
    let forced = client
        .delete("/v1/leases/cg?force=true")
        .await
        .expect("DELETE");
    assert_status(&forced, StatusCode::NO_CONTENT, "forced delete");
    assert!(!dir.exists(), "no cgroup left after the delete");
}
