//! Processes in a lease's user namespace, through the API: host ids, one namespace per lease
//! owned by its base uid, what the child inherits, per-owner kernel counters, teardown.

use std::time::{Duration, Instant};

use hyper::StatusCode;
use serde_json::{Value, json};
use subidd_tests::{Client, Daemon};

use crate::util::{assert_error, gone, ids, ns_ino, pin};

/// Spawns `body` in `lease`; panics unless 201. Returns the process JSON.
async fn spawn(client: &Client, lease: &str, body: Value) -> Value {
    let reply = client
        .post(
            &format!("/v1/leases/{lease}/processes"),
            Some(&body.to_string()),
        )
        .await
        .expect("spawn");
    assert_eq!(
        reply.status,
        StatusCode::CREATED,
        "spawn in {lease}: {}",
        reply.text()
    );
    reply.json()
}

/// Waits for a process to end (bounded) and returns its record.
async fn wait(client: &Client, id: &str) -> Value {
    client
        .post(&format!("/v1/processes/{id}/wait?timeout_seconds=20"), None)
        .await
        .expect("wait")
        .json()
}

async fn logs(client: &Client, id: &str, stream: &str) -> String {
    client
        .get(&format!("/v1/processes/{id}/logs?stream={stream}"))
        .await
        .expect("logs")
        .text()
}

/// Creates a lease and returns its uid_base.
async fn lease(client: &Client, name: &str) -> u32 {
    let reply = client
        .put(&format!("/v1/leases/{name}"), None)
        .await
        .expect("put");
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.text());
    u32::try_from(reply.json()["uid_base"].as_u64().expect("base")).expect("u32")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(not(subidd_root), ignore = "needs root")]
async fn host_ids_namespaces_owner_and_inheritance() {
    let daemon = Daemon::start("kill_grace_ms = 500").expect("start");
    let client = daemon.client();
    let (a, b) = (lease(&client, "a").await, lease(&client, "b").await);
    let sleeper = json!({"argv": ["/bin/sh", "-c", "sleep 30"], "user": 999, "group": 999});
    let pa = spawn(&client, "a", sleeper.clone()).await;
    let pb = spawn(&client, "b", sleeper).await;
    for (p, base) in [(&pa, a), (&pb, b)] {
        assert_eq!(p["host_uid"], base + 999);
        assert_eq!(p["host_gid"], base + 999);
        let pid = p["pid"].as_i64().expect("pid");
        assert_eq!(
            ids(pid, "Uid:"),
            vec![base + 999; 4],
            "real/effective/saved/fs uid"
        );
        assert_eq!(ids(pid, "Gid:"), vec![base + 999; 4]);
    }
    assert_ne!(
        pa["host_uid"], pb["host_uid"],
        "same image user, different host uids"
    );
    let (ia, ib) = (
        ns_ino(format!("/proc/{}/ns/user", pa["pid"])),
        ns_ino(format!("/proc/{}/ns/user", pb["pid"])),
    );
    assert_ne!(ia, ib, "one namespace per lease");
    assert_eq!(
        ia,
        ns_ino(pin(&daemon, "a")),
        "pinned at <runtime>/ns/a/user"
    );
    // The namespace's owner is the lease's base uid, not root.
    let fd = subid_sys::userns::open_pinned(&pin(&daemon, "a")).expect("open pin");
    assert_eq!(
        subid_sys::userns::owner_uid(std::os::fd::AsFd::as_fd(&fd)).expect("owner"),
        a
    );
    // A second process joins; its grandchild inherits.
    let second = spawn(
        &client,
        "a",
        json!({"argv": ["/bin/sh", "-c", "sleep 30 & echo $!; wait"]}),
    )
    .await;
    assert_eq!(ns_ino(format!("/proc/{}/ns/user", second["pid"])), ia);
    let id = second["id"].as_str().expect("id");
    let deadline = Instant::now() + Duration::from_secs(5);
    let grandchild: i64 = loop {
        if let Ok(pid) = logs(&client, id, "stdout").await.trim().parse() {
            break pid;
        }
        assert!(
            Instant::now() < deadline,
            "the grandchild's pid never showed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(ns_ino(format!("/proc/{grandchild}/ns/user")), ia);
    assert_eq!(ids(grandchild, "Uid:")[0], a, "in-namespace root = base");
    let pinned = pin(&daemon, "a").display().to_string();
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    assert!(
        mounts.contains(&pinned),
        "the pin is a mount while the lease lives"
    );
    // Teardown: the lease is busy; force kills everything, grandchild included, and unpins.
    let busy = client.delete("/v1/leases/a").await.expect("delete");
    assert_error(
        &busy,
        StatusCode::CONFLICT,
        "lease_busy",
        "DELETE with live processes",
    );
    let forced = client
        .delete("/v1/leases/a?force=true")
        .await
        .expect("delete");
    assert_eq!(forced.status, StatusCode::NO_CONTENT, "{}", forced.text());
    for pid in [pa["pid"].as_i64(), second["pid"].as_i64(), Some(grandchild)]
        .into_iter()
        .flatten()
    {
        assert!(
            gone(pid).await,
            "process {pid} of the released lease is gone"
        );
    }
    assert!(!pin(&daemon, "a").exists(), "pin removed");
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    assert!(
        !mounts.contains(&pin(&daemon, "a").display().to_string()),
        "nothing pinned"
    );
    let record = client
        .get(&format!("/v1/processes/{}", pa["id"].as_str().expect("id")))
        .await
        .expect("get");
    assert_eq!(
        record.status,
        StatusCode::NOT_FOUND,
        "rows go with the lease"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(not(subidd_root), ignore = "needs root")]
async fn the_child_gets_nothing_of_the_daemon() {
    let daemon = Daemon::start_with("", &[], &[("SECRET_DAEMON_ENV", "leak")]).expect("start");
    let client = daemon.client();
    lease(&client, "probe").await;
    let script = "ls /proc/self/fd; echo ---; env; echo ---; \
                  grep -E '^(Groups|CapInh|CapAmb|SigIgn|SigBlk):' /proc/self/status";
    let p = spawn(
        &client,
        "probe",
        json!({"argv": ["/bin/sh", "-c", script], "env": {"FOO": "bar"}}),
    )
    .await;
    let id = p["id"].as_str().expect("id");
    assert_eq!(wait(&client, id).await["exit_code"], 0);
    let out = logs(&client, id, "stdout").await;
    let parts: Vec<&str> = out.split("---\n").collect();
    assert_eq!(parts.len(), 3, "{out}");
    let fds: Vec<&str> = parts[0].split_whitespace().collect();
    assert_eq!(
        fds,
        vec!["0", "1", "2", "3"],
        "0-2 and the fd ls opens: {out}"
    );
    let mut names: Vec<&str> = parts[1]
        .lines()
        .filter_map(|l| l.split_once('=').map(|(k, _)| k))
        .collect();
    names.sort_unstable();
    // What the request gave, the documented defaults, and what sh sets itself.
    assert_eq!(names, vec!["FOO", "HOME", "PATH", "PWD", "TERM"], "{out}");
    assert!(
        !out.contains("SECRET_DAEMON_ENV"),
        "daemon env leaked: {out}"
    );
    for line in parts[2].lines() {
        let (key, value) = line.split_once(':').expect("status line");
        let value = value.trim();
        match key {
            "Groups" => assert!(value.is_empty(), "no supplementary groups: {line}"),
            _ => assert!(
                value.chars().all(|c| c == '0'),
                "{key} must be zero (default dispositions, empty mask, no caps): {line}"
            ),
        }
    }
    assert_eq!(parts[2].lines().count(), 5, "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(not(subidd_root), ignore = "needs root")]
async fn three_leases_each_get_their_own_inotify_budget() {
    let limit = std::fs::read_to_string("/proc/sys/fs/inotify/max_user_instances")
        .expect("limit")
        .trim()
        .to_string();
    println!("fs.inotify.max_user_instances = {limit} (per namespace owner)");
    // A pool of its own, so no other test's processes share these owners.
    let daemon = Daemon::start("[pool]\nbase = 2030043136\nsize = 262144\n").expect("start");
    let client = daemon.client();
    let script = "import ctypes, time\nl = ctypes.CDLL(None)\n\
                  fds = [l.inotify_init1(0) for _ in range(100)]\n\
                  print(sum(1 for f in fds if f >= 0), flush=True)\ntime.sleep(2)\n";
    let mut ids = Vec::new();
    for name in ["i1", "i2", "i3"] {
        lease(&client, name).await;
        let p = spawn(
            &client,
            name,
            json!({"argv": ["/usr/bin/python3", "-c", script]}),
        )
        .await;
        ids.push(p["id"].as_str().expect("id").to_string());
    }
    for id in &ids {
        assert_eq!(wait(&client, id).await["exit_code"], 0);
        assert_eq!(
            logs(&client, id, "stdout").await.trim(),
            "100",
            "all 100 instances, while the other leases hold theirs"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(not(subidd_root), ignore = "needs root")]
async fn exit_status_signals_wait_logs_and_rlimits() {
    let daemon = Daemon::start("").expect("start");
    let client = daemon.client();
    lease(&client, "s").await;
    let p = spawn(
        &client,
        "s",
        json!({"argv": ["/bin/sh", "-c", "echo out; echo err >&2; exit 7"]}),
    )
    .await;
    let id = p["id"].as_str().expect("id");
    let done = wait(&client, id).await;
    assert_eq!(
        (done["state"].as_str(), done["exit_code"].as_i64()),
        (Some("exited"), Some(7))
    );
    assert_eq!(logs(&client, id, "stdout").await, "out\n");
    assert_eq!(logs(&client, id, "stderr").await, "err\n");
    let listed = client
        .get("/v1/leases/s/processes")
        .await
        .expect("list")
        .json();
    assert_eq!(listed["processes"].as_array().map(Vec::len), Some(1));

    let sleeper = spawn(&client, "s", json!({"argv": ["sleep", "30"]})).await;
    let sid = sleeper["id"].as_str().expect("id");
    let t = Instant::now();
    let still = client
        .post(&format!("/v1/processes/{sid}/wait?timeout_seconds=1"), None)
        .await
        .expect("wait")
        .json();
    assert_eq!(still["state"], "running");
    assert!(t.elapsed() >= Duration::from_millis(900));
    let sent = client
        .post(
            &format!("/v1/processes/{sid}/signal"),
            Some(r#"{"signal":"TERM"}"#),
        )
        .await
        .expect("signal");
    assert_eq!(sent.status, StatusCode::ACCEPTED);
    assert_eq!(wait(&client, sid).await["signal"], 15);
    let again = client
        .post(
            &format!("/v1/processes/{sid}/signal"),
            Some(r#"{"signal":9}"#),
        )
        .await
        .expect("signal");
    assert_error(
        &again,
        StatusCode::CONFLICT,
        "process_exited",
        "signal after exit",
    );
    let unknown = client
        .get("/v1/processes/0123456789abcdef")
        .await
        .expect("get");
    assert_error(
        &unknown,
        StatusCode::NOT_FOUND,
        "not_found",
        "unknown process",
    );

    let limited = spawn(
        &client,
        "s",
        json!({"argv": ["/bin/sh", "-c", "grep -E '^Max (open files|processes)' /proc/self/limits"],
               "rlimits": {"nofile": [1024, 4096], "nproc": [512, 512]}}),
    )
    .await;
    let lid = limited["id"].as_str().expect("id");
    wait(&client, lid).await;
    let limits = logs(&client, lid, "stdout").await;
    let values: Vec<Vec<&str>> = limits
        .lines()
        .map(|l| l.split_whitespace().rev().skip(1).take(2).collect())
        .collect();
    // `Max processes  512  512  processes` and `Max open files  1024  4096  files`, reversed.
    assert!(values.contains(&vec!["512", "512"]), "{limits}");
    assert!(values.contains(&vec!["4096", "1024"]), "{limits}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(not(subidd_root), ignore = "needs root")]
async fn bad_spawns_are_refused_before_anything_runs() {
    let daemon = Daemon::start("").expect("start");
    let client = daemon.client();
    lease(&client, "bad").await;
    let cases = [
        (
            json!({"argv": ["no-such-program-xyz"]}),
            "executable_not_found",
        ),
        (json!({"argv": ["/etc/passwd"]}), "executable_not_found"),
        (
            json!({"argv": ["/bin/true"], "cwd": "/no/such/dir"}),
            "invalid_request",
        ),
        (
            json!({"argv": ["/bin/true"], "user": 70000}),
            "invalid_request",
        ),
        (json!({"argv": ["/bin/true", "a\u{0}b"]}), "invalid_request"),
        (json!({"argv": []}), "invalid_request"),
        (
            json!({"argv": ["/bin/true"], "env": {"A=B": "c"}}),
            "invalid_request",
        ),
        (
            json!({"argv": ["/bin/true"], "rlimits": {"nofile": [10, 5]}}),
            "invalid_request",
        ),
        (
            json!({"argv": ["/bin/true"], "bogus": 1}),
            "invalid_request",
        ),
    ];
    for (body, code) in cases {
        let reply = client
            .post("/v1/leases/bad/processes", Some(&body.to_string()))
            .await
            .expect("post");
        assert_error(&reply, StatusCode::BAD_REQUEST, code, &body.to_string());
    }
    let listed = client
        .get("/v1/leases/bad/processes")
        .await
        .expect("list")
        .json();
    assert_eq!(
        listed["processes"],
        json!([]),
        "nothing was started or recorded"
    );
    assert!(
        !pin(&daemon, "bad").exists(),
        "no namespace was made either"
    );
    let unknown = client
        .post(
            "/v1/leases/nope/processes",
            Some(r#"{"argv":["/bin/true"]}"#),
        )
        .await
        .expect("post");
    assert_error(
        &unknown,
        StatusCode::NOT_FOUND,
        "not_found",
        "unknown lease",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(not(subidd_root), ignore = "needs root")]
async fn namespaces_and_output_survive_a_daemon_restart() {
    let mut daemon = Daemon::start("").expect("start");
    let client = daemon.client();
    lease(&client, "r").await;
    let p = spawn(
        &client,
        "r",
        json!({"argv": ["/bin/sh", "-c", "echo before; sleep 2; echo after; sleep 30"]}),
    )
    .await;
    let id = p["id"].as_str().expect("id").to_string();
    let ino = ns_ino(pin(&daemon, "r"));
    daemon.restart().expect("restart");
    assert_eq!(ns_ino(pin(&daemon, "r")), ino, "the pin survived");
    let again = client
        .get(&format!("/v1/processes/{id}"))
        .await
        .expect("get")
        .json();
    assert_eq!(again["state"], "running", "re-adopted: {again}");
    let joined = spawn(&client, "r", json!({"argv": ["sleep", "30"]})).await;
    assert_eq!(
        ns_ino(format!("/proc/{}/ns/user", joined["pid"])),
        ino,
        "joins the old namespace"
    );
    // It keeps writing its log across the restart.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !logs(&client, &id, "stdout").await.contains("after") {
        assert!(
            Instant::now() < deadline,
            "output after the restart never arrived"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(logs(&client, &id, "stdout").await, "before\nafter\n");
    let forced = client
        .delete("/v1/leases/r?force=true")
        .await
        .expect("delete");
    assert_eq!(forced.status, StatusCode::NO_CONTENT, "{}", forced.text());
    assert!(gone(p["pid"].as_i64().expect("pid")).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(not(subidd_root), ignore = "needs root")]
async fn ttl_expiry_stops_the_leases_processes() {
    let daemon = Daemon::start("expiry_interval_ms = 100\nkill_grace_ms = 500").expect("start");
    let client = daemon.client();
    let reply = client
        .put("/v1/leases/t", Some(r#"{"ttl_seconds": 1}"#))
        .await
        .expect("put");
    assert_eq!(reply.status, StatusCode::CREATED);
    let p = spawn(&client, "t", json!({"argv": ["sleep", "30"]})).await;
    assert!(
        gone(p["pid"].as_i64().expect("pid")).await,
        "expiry killed it"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while client.get("/v1/leases/t").await.expect("get").json()["state"] != "released" {
        assert!(
            Instant::now() < deadline,
            "the expired lease was never released"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!pin(&daemon, "t").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(not(subidd_root), ignore = "needs root")]
async fn log_files_keep_their_last_bytes_and_never_block() {
    let daemon = Daemon::start("log_max_bytes = 1000").expect("start");
    let client = daemon.client();
    lease(&client, "l").await;
    let p = spawn(
        &client,
        "l",
        json!({"argv": ["/bin/sh", "-c", "i=0; while [ $i -lt 2000 ]; do echo $i; i=$((i+1)); done"]}),
    )
    .await;
    let id = p["id"].as_str().expect("id");
    assert_eq!(wait(&client, id).await["exit_code"], 0, "never blocked");
    let out = logs(&client, id, "stdout").await;
    assert_eq!(out.len(), 1000, "capped");
    assert!(
        out.ends_with("\n1999\n"),
        "the newest output is kept: {out:?}"
    );
}

/// Sends SIGCONT to a stopped process when dropped (also when the test fails).
struct Resume(nix::unistd::Pid);

impl Drop for Resume {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(self.0, nix::sys::signal::Signal::SIGCONT);
    }
}

/// Output read right after its process was seen to exit is all there, even when the log keeper
/// has not read the pipe yet (a busy machine): reading a log first has the keeper write out
/// what the pipes hold, also for a process the daemon has already forgotten. Here the keeper
/// is stopped while the process writes and exits, and resumes only once the read waits on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(not(subidd_root), ignore = "needs root")]
async fn logs_read_after_an_exit_have_all_the_output_the_keeper_had_not_read() {
    let daemon = Daemon::start("").expect("start");
    let client = daemon.client();
    lease(&client, "k").await;
    // The first spawn starts the keeper.
    let first = client
        .post(
            "/v1/leases/k/processes?wait=true",
            Some(r#"{"argv": ["/bin/true"]}"#),
        )
        .await
        .expect("spawn");
    assert_eq!(first.status, StatusCode::CREATED, "{}", first.text());
    let keeper = nix::unistd::Pid::from_raw(daemon.log_keeper_pid().expect("keeper pid"));
    let resume = Resume(keeper);
    for (wait_in_spawn, body) in [
        (true, r#"{"argv": ["seq", "1", "2000"]}"#),
        (false, r#"{"argv": ["seq", "1", "3000"]}"#),
    ] {
        nix::sys::signal::kill(keeper, nix::sys::signal::Signal::SIGSTOP).expect("SIGSTOP");
        let (id, last) = if wait_in_spawn {
            let r = client
                .post("/v1/leases/k/processes?wait=true", Some(body))
                .await
                .expect("spawn");
            assert_eq!(r.status, StatusCode::CREATED, "{}", r.text());
            let p = r.json();
            assert_eq!(p["exit_code"], 0, "{p}");
            (p["id"].as_str().expect("id").to_string(), "\n2000\n")
        } else {
            let p = spawn(&client, "k", serde_json::from_str(body).expect("json")).await;
            let id = p["id"].as_str().expect("id").to_string();
            assert_eq!(wait(&client, &id).await["exit_code"], 0);
            (id, "\n3000\n")
        };
        let later = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            let _ = nix::sys::signal::kill(keeper, nix::sys::signal::Signal::SIGCONT);
        });
        let out = logs(&client, &id, "stdout").await;
        later.join().expect("resume thread");
        assert!(
            out.ends_with(last),
            "wait in the spawn: {wait_in_spawn}: {out:?}"
        );
    }
    drop(resume);
}

/// A waiting spawn watches a short process to its end in place and records it started and
/// ended in one commit; one that outlives that linger (10 ms) goes to its supervisor. Both
/// read back alike afterwards: the record, the refusal to signal, the logs and both events.
/// A wait that times out answers the live state.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(not(subidd_root), ignore = "needs root")]
async fn spawn_can_wait_in_one_request() {
    let daemon = Daemon::start("").expect("start");
    let client = daemon.client();
    lease(&client, "w").await;
    for (script, word, code) in [
        ("echo quick; exit 3", "quick", 3),
        ("sleep 0.3; echo slow; exit 5", "slow", 5),
    ] {
        let body = json!({"argv": ["/bin/sh", "-c", script]}).to_string();
        let reply = client
            .post("/v1/leases/w/processes?wait=true", Some(&body))
            .await
            .expect("spawn");
        assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.text());
        let done = reply.json();
        assert_eq!(
            (done["state"].as_str(), done["exit_code"].as_i64()),
            (Some("exited"), Some(code)),
            "{script}: {done}"
        );
        let id = done["id"].as_str().expect("id").to_string();
        let got = client
            .get(&format!("/v1/processes/{id}"))
            .await
            .expect("get")
            .json();
        assert_eq!(
            (got["state"].as_str(), got["exit_code"].as_i64()),
            (Some("exited"), Some(code)),
            "{script}: read back {got}"
        );
        assert!(got["ended_at"].is_string(), "{got}");
        let signalled = client
            .post(
                &format!("/v1/processes/{id}/signal"),
                Some(r#"{"signal":"TERM"}"#),
            )
            .await
            .expect("signal");
        assert_error(
            &signalled,
            StatusCode::CONFLICT,
            "process_exited",
            "signal after exit",
        );
        let out = logs(&client, &id, "stdout").await;
        assert_eq!(out, format!("{word}\n"), "{script}: its output is kept");
        let listed = client
            .get("/v1/leases/w/processes")
            .await
            .expect("list")
            .json();
        let row = listed["processes"]
            .as_array()
            .expect("processes")
            .iter()
            .find(|p| p["id"] == id.as_str())
            .cloned()
            .unwrap_or_else(|| panic!("{id} not listed: {listed}"));
        assert_eq!(row["state"], "exited", "{row}");
        // The feed has its start and its end, in that order.
        let events = client
            .get("/v1/events?since=0&follow=false")
            .await
            .expect("events")
            .text();
        let kinds: Vec<String> = events
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("a JSON line"))
            .filter(|e| e["details"]["process"] == id.as_str())
            .map(|e| e["type"].as_str().unwrap_or_default().to_string())
            .collect();
        assert_eq!(
            kinds,
            ["process.started", "process.exited"],
            "{script}: {events}"
        );
    }
    let body = json!({"argv": ["/bin/sh", "-c", "exit 4"]}).to_string();
    let stuck = json!({"argv": ["sleep", "30"]}).to_string();
    let reply = client
        .post(
            "/v1/leases/w/processes?wait=true&timeout_seconds=1",
            Some(&stuck),
        )
        .await
        .expect("spawn");
    assert_eq!(
        reply.json()["state"],
        "running",
        "the timeout answers with the live state"
    );
    let reply = client
        .post("/v1/leases/w/processes?timeout_seconds=1", Some(&body))
        .await
        .expect("spawn");
    assert_error(
        &reply,
        StatusCode::BAD_REQUEST,
        "invalid_request",
        "timeout without wait",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(not(subidd_root), ignore = "needs root")]
async fn a_renewed_lease_keeps_spawning_after_its_first_expiry() {
    // Spawns read leases from a cache; a renew must reach it.
    let daemon = Daemon::start("expiry_interval_ms = 60000").expect("start");
    let client = daemon.client();
    let reply = client
        .put("/v1/leases/renewed", Some(r#"{"ttl_seconds": 1}"#))
        .await
        .expect("put");
    assert_eq!(reply.status, StatusCode::CREATED);
    spawn(&client, "renewed", json!({"argv": ["/bin/true"]})).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let renewed = client
        .post("/v1/leases/renewed/renew", None)
        .await
        .expect("renew");
    assert_eq!(renewed.status, StatusCode::OK, "{}", renewed.text());
    tokio::time::sleep(Duration::from_millis(700)).await;
    // Past the first expires_at, before the second.
    spawn(&client, "renewed", json!({"argv": ["/bin/true"]})).await;
}

/// Found by schemathesis: a lease with a mount namespace made the whole pin directory a bind
/// mount, covering the pins of leases spawned before it, so deleting those answered 500 (unlink
/// EBUSY). Only the mount-namespace lease's own directory is a mount now, and it goes with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(not(subidd_root), ignore = "needs root")]
async fn a_mount_namespace_lease_leaves_earlier_pins_removable() {
    let daemon = Daemon::start("kill_grace_ms = 500").expect("start");
    let client = daemon.client();
    lease(&client, "plain").await;
    let first = spawn(&client, "plain", json!({"argv": ["/bin/true"]})).await;
    let reply = client
        .put("/v1/leases/withmnt", Some(r#"{"namespaces":["mnt"]}"#))
        .await
        .expect("put");
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.text());
    let second = spawn(&client, "withmnt", json!({"argv": ["/bin/true"]})).await;
    for (name, process) in [("plain", &first), ("withmnt", &second)] {
        wait(&client, process["id"].as_str().expect("id")).await;
        let deleted = client
            .delete(&format!("/v1/leases/{name}?force=true"))
            .await
            .expect("delete");
        assert_eq!(
            deleted.status,
            StatusCode::NO_CONTENT,
            "{name}: {}",
            deleted.text()
        );
        assert!(!pin(&daemon, name).exists(), "{name}: pin removed");
    }
    let ns_dir = daemon.path("run").join("ns").display().to_string();
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    assert!(
        !mounts.contains(&ns_dir),
        "nothing stays mounted under {ns_dir}"
    );
}

/// At start the daemon removes every log file that belongs to no recorded process (a crash's
/// leftovers) and keeps those of recorded processes; a released lease's go with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(not(subidd_root), ignore = "needs root")]
async fn log_files_of_no_process_go_at_start_and_a_leases_go_with_it() {
    let mut daemon = Daemon::start("").expect("start");
    let client = daemon.client();
    lease(&client, "o").await;
    let body = json!({"argv": ["/bin/echo", "kept"]}).to_string();
    let reply = client
        .post("/v1/leases/o/processes?wait=true", Some(&body))
        .await
        .expect("spawn");
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.text());
    let id = reply.json()["id"].as_str().expect("id").to_string();
    let dir = daemon.path("state/logs");
    let orphan = "0123456789abcdef";
    for stream in ["stdout", "stderr"] {
        std::fs::write(dir.join(format!("{orphan}.{stream}")), "left by a crash").expect("write");
    }
    std::fs::write(dir.join("notes.txt"), "not a log").expect("write");
    daemon.restart().expect("restart");
    assert_eq!(logs(&client, &id, "stdout").await, "kept\n");
    assert!(
        !dir.join(format!("{orphan}.stdout")).exists(),
        "orphan removed"
    );
    assert!(
        !dir.join(format!("{orphan}.stderr")).exists(),
        "orphan removed"
    );
    assert!(dir.join("notes.txt").exists(), "only log files are touched");
    let released = client.delete("/v1/leases/o").await.expect("delete");
    assert_eq!(
        released.status,
        StatusCode::NO_CONTENT,
        "{}",
        released.text()
    );
    assert!(
        !dir.join(format!("{id}.stdout")).exists(),
        "logs go with the lease"
    );
    assert!(
        !dir.join(format!("{id}.stderr")).exists(),
        "logs go with the lease"
    );
}
