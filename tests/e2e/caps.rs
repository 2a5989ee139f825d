//! Per-lease process caps through the API: cgroup `pids.max` (on whatever pids hierarchy this
//! host has) and the owner cap `max_processes` (the namespace creator's RLIMIT_NPROC).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use hyper::StatusCode;
use serde_json::Value;
use subidd_tests::{Client, Daemon};

use crate::util::{assert_error, assert_status};

/// Base of the pool the owner-cap test uses (0x78000000), apart from every other test's.
const OWN_BASE: u32 = 0x7800_0000;

/// The lease's pids cgroup directory, from what `GET /v1/pool` says about the host.
async fn cgroup_dir(client: &Client, lease: &str) -> PathBuf {
    let pool = client.get("/v1/pool").await.expect("pool").json();
    let cgroup = &pool["cgroup"];
    println!(
        "cgroup path under test: mode {}, processes on {} at {}, pids on {} at {}",
        cgroup["mode"],
        cgroup["tracking_version"],
        cgroup["lease_cgroups"],
        cgroup["pids_version"],
        cgroup["pids_cgroups"]
    );
    let parent = cgroup["pids_cgroups"].as_str().expect("pids cgroups");
    PathBuf::from(parent).join(format!("lease-{lease}"))
}

/// Runs `/bin/true` in the lease and waits for it: a lease's cgroups are made by its first spawn.
async fn first_spawn(client: &Client, lease: &str) {
    let reply = client
        .post(
            &format!("/v1/leases/{lease}/processes?wait=true"),
            Some(r#"{"argv":["/bin/true"]}"#),
        )
        .await
        .expect("spawn");
    assert_eq!(
        reply.status,
        StatusCode::CREATED,
        "first spawn: {}",
        reply.text()
    );
}

/// Polls the lease's `limits` until `done` says so (bounded), returning the last answer.
async fn limits_until(client: &Client, lease: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let limits = client
            .get(&format!("/v1/leases/{lease}"))
            .await
            .expect("get")
            .json()["limits"]
            .clone();
        if done(&limits) || Instant::now() > deadline {
            return limits;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The real uid of a live (non-zombie) process.
fn real_uid(pid: i32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    if status
        .lines()
        .any(|l| l.starts_with("State:") && l.contains("zombie"))
    {
        return None;
    }
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|u| u.parse().ok())
}

fn members(dir: &std::path::Path) -> Vec<i32> {
    std::fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(not(subidd_root), ignore = "needs root")]
#[cfg_attr(
    not(subidd_pids),
    ignore = "needs a pids cgroup controller on this host"
)]
async fn pids_max_caps_children_and_grandchildren_and_spares_other_leases() {
    let daemon = Daemon::start("kill_grace_ms = 500\nquarantine_seconds = 0").expect("start");
    let client = daemon.client();
    let a = client
        .put("/v1/leases/capped", Some(r#"{"pids_max": 10}"#))
        .await
        .expect("put");
    assert_eq!(a.status, StatusCode::CREATED, "{}", a.text());
    let b = client
        .put("/v1/leases/roomy", Some(r#"{"pids_max": 100}"#))
        .await
        .expect("put");
    assert_eq!(b.status, StatusCode::CREATED, "{}", b.text());
    let dir = cgroup_dir(&client, "capped").await;
    first_spawn(&client, "capped").await;
    assert!(dir.is_dir(), "{} made at the first spawn", dir.display());
    // On v1 the lease's spawner sits in the cgroup: its limit is the lease's 10 plus it.
    let pids_v1 =
        client.get("/v1/pool").await.expect("pool").json()["cgroup"]["pids_version"] == "v1";
    assert_eq!(
        std::fs::read_to_string(dir.join("pids.max"))
            .expect("pids.max")
            .trim(),
        if pids_v1 { "11" } else { "10" }
    );

    // Children fork grandchildren; python goes on when a fork is refused (a shell would stop).
    let script = "import os, time\ndef fork(depth):\n    try:\n        pid = os.fork()\n    except OSError:\n        return False\n    if pid == 0:\n        if depth == 0:\n            fork(1)\n        time.sleep(30)\n        os._exit(0)\n    return True\nprint(sum(1 for _ in range(30) if fork(0)), flush=True)\ntime.sleep(30)\n";
    for lease in ["capped", "roomy"] {
        let body = serde_json::json!({ "argv": ["/usr/bin/python3", "-c", script] }).to_string();
        let reply = client
            .post(&format!("/v1/leases/{lease}/processes"), Some(&body))
            .await
            .expect("spawn");
        assert_eq!(reply.status, StatusCode::CREATED, "spawn: {}", reply.text());
    }
    let capped = limits_until(&client, "capped", |l| l["pids_denied"].as_u64() > Some(0)).await;
    assert!(
        capped["pids_denied"].as_u64() > Some(0),
        "forks past the cap were refused: {capped}"
    );
    assert!(
        capped["pids_current"].as_u64() <= Some(10),
        "never more than the cap: {capped}"
    );
    // Every member, grandchildren included, runs with the lease's ids; the one exception is
    // the daemon's v1 spawner helper (root), which sits in the cgroup to clone the joins.
    let base = a.json()["uid_base"].as_u64().expect("base");
    let lease_members = members(&dir)
        .into_iter()
        .filter(|&p| real_uid(p).is_some_and(|u| u != 0))
        .count();
    assert!(
        lease_members <= 10,
        "the lease runs at most 10: {lease_members}"
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    let uids = loop {
        let uids: Vec<(i32, u64)> = members(&dir)
            .into_iter()
            .filter_map(|pid| Some((pid, real_uid(pid)?)))
            .collect();
        if uids.iter().any(|&(_, uid)| uid == base) || Instant::now() > deadline {
            break uids;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        uids.iter().any(|&(_, uid)| uid == base),
        "members run as the lease's base uid {base}: {uids:?}"
    );
    assert!(
        uids.iter().all(|&(_, uid)| uid == base || uid == 0),
        "nothing else is in the lease's cgroup: {uids:?}"
    );

    // The other lease got all of its 61 processes (python + 30 children + 30 grandchildren).
    let roomy = limits_until(&client, "roomy", |l| l["pids_current"].as_u64() >= Some(61)).await;
    assert_eq!(roomy["pids_denied"], 0, "second lease untouched: {roomy}");
    assert!(roomy["pids_current"].as_u64() >= Some(61), "{roomy}");

    // Teardown leaves no cgroup directory.
    for lease in ["capped", "roomy"] {
        let gone = client
            .delete(&format!("/v1/leases/{lease}?force=true"))
            .await
            .expect("delete");
        assert_eq!(gone.status, StatusCode::NO_CONTENT, "{}", gone.text());
    }
    assert!(!dir.exists(), "{} removed at release", dir.display());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(not(subidd_root), ignore = "needs root")]
#[cfg_attr(
    not(subidd_pids_v1),
    ignore = "needs the pids controller on a v1 hierarchy beside cgroup2"
)]
async fn a_cap_that_cannot_be_honoured_is_refused_with_its_reason() {
    // A parent the pids hierarchy cannot have: on a v1 hierarchy every cgroup directory holds a
    // file named `tasks`, so `<parent>/tasks/x` cannot be made there, while cgroup2 (where the
    // lease's processes live) has no such file.
    let root = format!("/subidd-tests/nocap-{}", std::process::id());
    struct Clean(String);
    impl Drop for Clean {
        fn drop(&mut self) {
            subidd_tests::clean_cgroup_path(&self.0);
        }
    }
    let _clean = Clean(root.clone());
    let daemon = Daemon::start(&format!("cgroup_parent = \"{root}/tasks/x\"")).expect("start");
    let client = daemon.client();
    let reply = client
        .put("/v1/leases/nocap", Some(r#"{"pids_max": 10}"#))
        .await
        .expect("put");
    assert_error(
        &reply,
        StatusCode::UNPROCESSABLE_ENTITY,
        "pids_unsupported",
        "pids_max without a usable pids controller",
    );
    assert!(
        reply.json()["message"]
            .as_str()
            .is_some_and(|m| m.contains("max_processes")),
        "the message names the alternative: {}",
        reply.text()
    );
    let get = client.get("/v1/leases/nocap").await.expect("get");
    assert_eq!(get.status, StatusCode::NOT_FOUND, "no lease was made");
    // The owner cap needs no cgroup and is accepted on the same daemon.
    let owner = client
        .put("/v1/leases/nocap", Some(r#"{"max_processes": 10}"#))
        .await
        .expect("put");
    assert_eq!(owner.status, StatusCode::CREATED, "{}", owner.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(not(subidd_root), ignore = "needs root")]
async fn the_owner_cap_holds_without_any_cgroup() {
    // A pool of its own: RLIMIT_NPROC counts per host uid, and other tests' daemons hand out the
    // default pool's first ranges at the same time.
    let daemon = Daemon::start(&format!(
        "kill_grace_ms = 500\n[pool]\nbase = {OWN_BASE}\nsize = 655360\n"
    ))
    .expect("start");
    let client = daemon.client();
    let lease = client
        .put("/v1/leases/owner", Some(r#"{"max_processes": 10}"#))
        .await
        .expect("put");
    assert_eq!(lease.status, StatusCode::CREATED, "{}", lease.text());
    assert_eq!(lease.json()["limits"]["max_processes"], 10);
    // In-namespace root forks 30 sleepers, counting the forks that worked.
    let script = "import os, signal, time\nkids = []\nfor _ in range(30):\n    try:\n        pid = os.fork()\n    except OSError:\n        continue\n    if pid == 0:\n        time.sleep(30)\n        os._exit(0)\n    kids.append(pid)\nprint(len(kids), flush=True)\nfor pid in kids:\n    os.kill(pid, signal.SIGKILL)\n    os.waitpid(pid, 0)\n";
    let body = serde_json::json!({ "argv": ["/usr/bin/python3", "-c", script] }).to_string();
    let reply = client
        .post("/v1/leases/owner/processes", Some(&body))
        .await
        .expect("spawn");
    assert_eq!(reply.status, StatusCode::CREATED, "spawn: {}", reply.text());
    let p = reply.json();
    let id = p["id"].as_str().expect("id");
    let done = client
        .post(&format!("/v1/processes/{id}/wait?timeout_seconds=20"), None)
        .await
        .expect("wait")
        .json();
    assert_eq!(done["state"], "exited", "{done}");
    let out = client
        .get(&format!("/v1/processes/{id}/logs"))
        .await
        .expect("logs")
        .text();
    let started: u32 = out.trim().parse().unwrap_or(u32::MAX);
    println!("owner cap 10: {started} of 30 forks succeeded");
    assert!(
        started < 10,
        "fewer than the cap (python itself counts): {out:?}"
    );
    assert!(started > 0, "the lease can still run something: {out:?}");
    let dir = cgroup_dir(&client, "owner").await;
    assert!(
        !dir.exists(),
        "no pids cgroup was made for the owner cap: {}",
        dir.display()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(not(subidd_root), ignore = "needs root")]
#[cfg_attr(
    not(subidd_pids),
    ignore = "needs a pids cgroup controller on this host"
)]
async fn caps_are_checked_and_part_of_the_lease_identity() {
    let daemon = Daemon::start("").expect("start");
    let client = daemon.client();
    for body in [
        r#"{"pids_max": 0}"#,
        r#"{"pids_max": 4194305}"#,
        r#"{"max_processes": 0}"#,
        r#"{"pids_max": -1}"#,
    ] {
        let reply = client.put("/v1/leases/bad", Some(body)).await.expect("put");
        assert_error(&reply, StatusCode::BAD_REQUEST, "invalid_request", body);
    }
    let first = client
        .put("/v1/leases/same", Some(r#"{"pids_max": 20}"#))
        .await
        .expect("put");
    assert_eq!(first.status, StatusCode::CREATED);
    let again = client
        .put("/v1/leases/same", Some(r#"{"pids_max": 20}"#))
        .await
        .expect("put");
    assert_eq!(again.status, StatusCode::OK);
    let other = client
        .put("/v1/leases/same", Some(r#"{"pids_max": 21}"#))
        .await
        .expect("put");
    assert_error(&other, StatusCode::CONFLICT, "lease_conflict", "other cap");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(not(subidd_root), ignore = "needs root")]
#[cfg_attr(
    not(subidd_pids),
    ignore = "needs a pids cgroup controller on this host"
)]
async fn a_stale_cgroup_of_a_released_lease_is_removed_at_start() {
    let mut daemon = Daemon::start("quarantine_seconds = 0").expect("start");
    let client = daemon.client();
    let name = "stale-cgroup-e2e";
    let reply = client
        .put(&format!("/v1/leases/{name}"), Some(r#"{"pids_max": 5}"#))
        .await
        .expect("PUT");
    assert_status(&reply, StatusCode::CREATED, "capped lease");
    let dir = cgroup_dir(&client, name).await;
    first_spawn(&client, name).await;
    assert!(dir.is_dir(), "{} made at the first spawn", dir.display());
    let gone = client
        .delete(&format!("/v1/leases/{name}"))
        .await
        .expect("DELETE");
    assert_status(&gone, StatusCode::NO_CONTENT, "release");
    assert!(!dir.exists(), "{} removed with the lease", dir.display());
    // A crash between the release and the removal leaves the directory; another directory
    // under the parent is none of this daemon's business.
    let foreign = dir.with_file_name("not-a-lease-of-this-daemon-e2e");
    std::fs::create_dir(&dir).expect("mkdir the leftover cgroup");
    std::fs::create_dir(&foreign).expect("mkdir a foreign cgroup");
    daemon.restart().expect("restart");
    let kept = foreign.is_dir();
    let _ = std::fs::remove_dir(&foreign);
    assert!(
        !dir.exists(),
        "{} swept at start:\n{}",
        dir.display(),
        daemon.log_text()
    );
    assert!(kept, "{} left alone", foreign.display());
    assert!(
        daemon.log_text().contains("removed the stale lease cgroup"),
        "the sweep is logged"
    );
}

/// Found by schemathesis: a spawn into a lease at its own cap answered 503, as if the daemon
/// were at fault. It is the lease's settings: 409 `process_limit`, and nothing is started.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(not(subidd_root), ignore = "needs root")]
async fn a_spawn_past_the_leases_cap_is_a_409() {
    // A pool of its own (0x7A000000): RLIMIT_NPROC counts per host uid.
    let daemon = Daemon::start("kill_grace_ms = 500\n[pool]\nbase = 2046820352\nsize = 655360\n")
        .expect("start");
    let client = daemon.client();
    let lease = client
        .put("/v1/leases/full", Some(r#"{"max_processes": 3}"#))
        .await
        .expect("put");
    assert_eq!(lease.status, StatusCode::CREATED, "{}", lease.text());
    let body = r#"{"argv": ["/bin/sleep", "30"]}"#;
    let mut started = 0;
    let refused = loop {
        let reply = client
            .post("/v1/leases/full/processes", Some(body))
            .await
            .expect("spawn");
        if reply.status != StatusCode::CREATED {
            break reply;
        }
        started += 1;
        assert!(started <= 3, "more processes than the cap of 3");
    };
    println!("cap 3: {started} sleepers started before the refusal");
    assert_error(
        &refused,
        StatusCode::CONFLICT,
        "process_limit",
        "a spawn past the cap",
    );
    let deleted = client
        .delete("/v1/leases/full?force=true")
        .await
        .expect("delete");
    assert_eq!(deleted.status, StatusCode::NO_CONTENT, "{}", deleted.text());
}
