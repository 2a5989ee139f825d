//! Restart and (simulated) reboot reconcile with the kernel: live processes are re-adopted,
//! vanished ones and those of another boot are `lost`, pins are re-opened, recreated or swept,
//! and a lease whose namespace still has processes is never released without force.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use hyper::StatusCode;
use serde_json::{Value, json};
use subidd_tests::{Client, Daemon};

use crate::util::{BASE, BLOCK, assert_error, assert_status};

/// A pool of its own (blocks 3000..3016 of the default range), so that the uids of its
/// processes are not shared with tests running at the same time.
fn config() -> String {
    format!(
        "kill_grace_ms = 500\nquarantine_seconds = 0\n[pool]\nbase = {}\nsize = {}\nblock = {BLOCK}\n",
        BASE + 3000 * BLOCK,
        16 * BLOCK
    )
}

async fn spawn(client: &Client, lease: &str, argv: &[&str]) -> Value {
    let reply = client
        .post(
            &format!("/v1/leases/{lease}/processes"),
            Some(&json!({ "argv": argv }).to_string()),
        )
        .await
        .expect("spawn");
    assert_status(&reply, StatusCode::CREATED, &format!("spawn in {lease}"));
    reply.json()
}

async fn process(client: &Client, id: &str) -> Value {
    let reply = client
        .get(&format!("/v1/processes/{id}"))
        .await
        .expect("GET process");
    assert_status(&reply, StatusCode::OK, id);
    reply.json()
}

fn id(p: &Value) -> String {
    p["id"].as_str().expect("id").to_string()
}

fn pid(p: &Value) -> i32 {
    i32::try_from(p["pid"].as_i64().expect("pid")).expect("pid fits")
}

fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z "))
}

async fn gone(pid: i32) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if !alive(pid) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

fn pin(daemon: &Daemon, lease: &str) -> PathBuf {
    daemon.path("run").join("ns").join(lease).join("user")
}

fn ino(path: impl AsRef<Path>) -> u64 {
    std::fs::metadata(path).expect("stat").ino()
}

/// The pin is an nsfs mount (not just a file).
fn pinned(path: &Path) -> bool {
    subid_sys::userns::is_pinned(path)
}

fn umount(path: &Path) {
    let status = Command::new("umount")
        .arg("-l")
        .arg(path)
        .status()
        .expect("run umount");
    assert!(status.success(), "umount {}", path.display());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(not(subidd_root), ignore = "needs root")]
async fn restart_readopts_the_living_and_a_reboot_loses_everything_but_blocks_nothing() {
    let mut daemon = Daemon::start(&config()).expect("start daemon");
    let client = daemon.client();
    for name in ["a", "b"] {
        let reply = client
            .put(&format!("/v1/leases/{name}"), None)
            .await
            .expect("PUT");
        assert_status(&reply, StatusCode::CREATED, name);
    }
    let stays = spawn(&client, "a", &["sleep", "300"]).await;
    let vanishes = spawn(&client, "a", &["sleep", "300"]).await;
    let brief = spawn(&client, "b", &["true"]).await;
    let waited = client
        .post(
            &format!("/v1/processes/{}/wait?timeout_seconds=10", id(&brief)),
            None,
        )
        .await
        .expect("wait");
    assert_eq!(waited.json()["state"], "exited", "{}", waited.text());
    let ns_a = ino(pin(&daemon, "a"));

    // A plain restart: one process dies while the daemon is away.
    assert_eq!(daemon.stop().expect("stop"), Some(0));
    assert!(alive(pid(&stays)), "processes outlive the daemon");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid(&vanishes)),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill one process while the daemon is down");
    assert!(gone(pid(&vanishes)).await, "killed process is gone");
    daemon.spawn().expect("restart");
    let readopted = process(&client, &id(&stays)).await;
    assert_eq!(readopted["state"], "running", "re-adopted: {readopted}");
    assert_eq!(readopted["pid"], stays["pid"], "same pid: {readopted}");
    let lost = process(&client, &id(&vanishes)).await;
    assert_eq!(lost["state"], "lost", "vanished while away: {lost}");
    assert_eq!(
        ino(pin(&daemon, "a")),
        ns_a,
        "the pin is re-opened, not replaced"
    );
    let joined = spawn(&client, "a", &["sleep", "300"]).await;
    assert_eq!(
        ino(format!("/proc/{}/ns/user", pid(&joined))),
        ns_a,
        "a spawn after the restart joins the old namespace"
    );
    // The re-adopted process is held by a pidfd: it can be signalled and its end is seen.
    let sent = client
        .post(
            &format!("/v1/processes/{}/signal", id(&joined)),
            Some(r#"{"signal":"KILL"}"#),
        )
        .await
        .expect("signal");
    assert_status(
        &sent,
        StatusCode::ACCEPTED,
        "signal a process after restart",
    );

    // A simulated reboot: same processes, another boot id. Nothing is adopted, even though
    // the pid and start time match.
    assert_eq!(daemon.stop().expect("stop"), Some(0));
    daemon.set_env(
        "SUBIDD_TEST_BOOT_ID",
        Some("00000000-0000-4000-8000-00000000b007"),
    );
    daemon.spawn().expect("start after the simulated reboot");
    assert!(alive(pid(&stays)), "the process still runs");
    let after = process(&client, &id(&stays)).await;
    assert_eq!(
        after["state"], "lost",
        "a process recorded in another boot is not adopted: {after}"
    );
    assert!(
        daemon.log_text().contains("SUBIDD_TEST_BOOT_ID"),
        "the override is logged"
    );
    // Its lease is not released from under it: its namespace still has a member.
    let refused = client.delete("/v1/leases/a").await.expect("DELETE");
    assert_error(
        &refused,
        StatusCode::CONFLICT,
        "lease_busy",
        "delete of a lease whose namespace still runs a lost process",
    );
    let a = client.get("/v1/leases/a").await.expect("GET").json();
    assert_eq!(a["state"], "active", "{a}");
    let forced = client
        .delete("/v1/leases/a?force=true")
        .await
        .expect("DELETE force");
    assert_status(&forced, StatusCode::NO_CONTENT, "forced delete");
    assert!(
        gone(pid(&stays)).await,
        "a forced delete stops the namespace's processes, adopted or not"
    );
    assert!(!pin(&daemon, "a").exists(), "and removes the pin");

    // A pin of a name that is no lease (a crash between teardown and release), holding a
    // namespace without processes (b's, whose process has exited): swept at the next start.
    assert_eq!(daemon.stop().expect("stop"), Some(0));
    let pin_b = pin(&daemon, "b");
    let ghost = daemon.path("run").join("ns").join("ghost");
    std::fs::create_dir_all(&ghost).expect("mkdir ghost");
    std::fs::write(ghost.join("user"), "").expect("pin file");
    let status = Command::new("mount")
        .arg("--bind")
        .arg(&pin_b)
        .arg(ghost.join("user"))
        .status()
        .expect("run mount");
    assert!(status.success(), "bind a namespace onto the ghost pin");
    assert!(pinned(&ghost.join("user")), "ghost pin in place");
    // A real reboot empties /run: the pin of b is gone. The next spawn makes a new namespace.
    umount(&pin_b);
    std::fs::remove_file(&pin_b).expect("remove the pin file");
    daemon.set_env(
        "SUBIDD_TEST_BOOT_ID",
        Some("00000000-0000-4000-8000-00000000b008"),
    );
    daemon
        .spawn()
        .expect("start after the second simulated reboot");
    assert!(
        !ghost.exists(),
        "the pin of a name without an active lease is swept at start"
    );
    let fresh = spawn(&client, "b", &["sleep", "300"]).await;
    assert!(pinned(&pin_b), "the pin is made again");
    assert_eq!(
        ino(format!("/proc/{}/ns/user", pid(&fresh))),
        ino(&pin_b),
        "the new process lives in the new pinned namespace"
    );
    let forced = client
        .delete("/v1/leases/b?force=true")
        .await
        .expect("DELETE force");
    assert_status(&forced, StatusCode::NO_CONTENT, "forced delete of b");
    assert!(gone(pid(&fresh)).await);
}
