//! The pool chosen at start: defaults, config, the `subidd` entry of subuid/subgid, and the
//! settings the daemon must refuse with a message naming what is wrong.

use hyper::StatusCode;
use subidd_tests::Daemon;

use crate::util::{BASE, assert_status};

/// Asserts `message` contains every one of `needles`.
#[track_caller]
fn assert_mentions(message: &str, needles: &[&str], what: &str) {
    let message = refusal_line(message);
    for needle in needles {
        assert!(
            message.contains(needle),
            "{what}: message does not mention {needle:?}:\n{message}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn default_pool_is_4094_blocks_above_systemd_container_ids() {
    let daemon = Daemon::start("").expect("start daemon");
    let reply = daemon.client().get("/v1/pool").await.expect("GET pool");
    assert_status(&reply, StatusCode::OK, "GET /v1/pool");
    let pool = reply.json();
    assert_eq!(pool["base"], BASE, "default base: {pool}");
    assert_eq!(pool["size"], 4094u64 * 65536, "default size: {pool}");
    assert_eq!(
        pool["end"], 2_147_352_576u64,
        "default end 0x7FFE0000: {pool}"
    );
    assert_eq!(pool["block"], 65536, "default block: {pool}");
    assert_eq!(pool["source"], "default", "source: {pool}");
    assert_eq!(pool["blocks"]["total"], 4094, "blocks: {pool}");
    assert_eq!(pool["blocks"]["free"], 4094, "blocks: {pool}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn subidd_entry_in_subuid_and_subgid_becomes_the_pool() {
    let entries = "# pools\nalice:100000:65536\nsubidd:1879048192:655360\n";
    let daemon = Daemon::start_with_subid("", entries, entries).expect("start daemon");
    let client = daemon.client();
    let pool = client.get("/v1/pool").await.expect("GET pool").json();
    assert_eq!(pool["base"], 1_879_048_192u64, "base from subuid: {pool}");
    assert_eq!(pool["size"], 655_360, "size from subuid: {pool}");
    assert_eq!(pool["source"], "subuid", "source: {pool}");
    assert_eq!(pool["blocks"]["total"], 10, "10 blocks: {pool}");
    let lease = client.put("/v1/leases/x", None).await.expect("PUT");
    assert_status(&lease, StatusCode::CREATED, "PUT in a subuid pool");
    assert_eq!(
        lease.json()["uid_base"],
        1_879_048_192u64,
        "first block of the entry"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn config_pool_overrides_the_subuid_entry() {
    let entries = "subidd:1879048192:655360\n";
    let daemon = Daemon::start_with_subid(
        "[pool]\nbase = 1946157056\nsize = 131072\n",
        entries,
        entries,
    )
    .expect("start daemon");
    let pool = daemon.client().get("/v1/pool").await.expect("GET").json();
    assert_eq!(pool["source"], "config", "source: {pool}");
    assert_eq!(pool["base"], 1_946_157_056u64, "base: {pool}");
    assert_eq!(pool["blocks"]["total"], 2, "blocks: {pool}");
}

#[test]
fn another_owners_subuid_entry_inside_the_pool_is_refused() {
    let subuid = "alice:100000:65536\nother:1879048192:65536\n";
    let message =
        Daemon::start_failure_with_subid("", subuid, "").expect("daemon refuses an overlap");
    assert_mentions(
        &message,
        &["subuid", "line 2", "other", "1879048192"],
        "foreign subuid entry",
    );
    let subgid = "other:1900000000:65536\n";
    let message =
        Daemon::start_failure_with_subid("", "", subgid).expect("daemon refuses an overlap");
    assert_mentions(
        &message,
        &["subgid", "line 1", "other"],
        "foreign subgid entry",
    );
}

#[test]
fn mismatched_or_one_sided_subidd_entries_are_refused() {
    let message = Daemon::start_failure_with_subid(
        "",
        "subidd:1879048192:655360\n",
        "subidd:1879048192:131072\n",
    )
    .expect("daemon refuses mismatched entries");
    assert_mentions(
        &message,
        &["subuid", "subgid", "655360", "131072"],
        "mismatched subidd entries",
    );
    let message = Daemon::start_failure_with_subid("", "subidd:1879048192:655360\n", "")
        .expect("daemon refuses a one-sided entry");
    assert_mentions(
        &message,
        &["subgid", "subidd"],
        "subidd entry only in subuid",
    );
}

#[test]
fn invalid_pool_settings_are_refused_naming_the_value() {
    let cases: [(&str, &[&str]); 5] = [
        ("[pool]\nbase = 1000\n", &["pool base 1000", "65536"]),
        ("[pool]\nbase = 0\n", &["pool base 0 "]),
        (
            "[pool]\nbase = 1879048193\n",
            &["pool base 1879048193", "multiple", "1879113728"],
        ),
        (
            "[pool]\nbase = 4294901760\nsize = 65536\n",
            &["4294967296", "4294967295"],
        ),
        ("[pool]\nsize = 1000\n", &["pool size 1000", "multiple"]),
    ];
    for (config, needles) in cases {
        let message = Daemon::start_failure(config).expect("daemon refuses");
        assert_mentions(&message, needles, config);
    }
}

/// The line the binary prints on stderr when it refuses to start.
fn refusal_line(output: &str) -> String {
    output
        .lines()
        .find_map(|l| l.strip_prefix("subidd: "))
        .unwrap_or_else(|| panic!("no `subidd: ...` refusal line in:\n{output}"))
        .to_string()
}

#[test]
fn pool_refusal_states_the_problem_once() {
    let output = Daemon::start_failure("[pool]\nbase = 1000\n").expect("daemon refuses");
    let line = refusal_line(&output);
    assert_eq!(
        line.matches("pool base 1000 is below").count(),
        1,
        "the refusal says it once: {line}"
    );
}

/// Base of the pool of the re-check tests: above the default pool, so the host user these tests
/// add for a moment cannot stop daemons of concurrent tests (on the default pool) from starting.
const RECHECK_BASE: u64 = 2_147_483_648;
const BLOCK: u64 = crate::util::BLOCK as u64;

/// Polls `GET /v1/pool` until `done` holds (the re-check runs on an inotify event), for 10 s.
async fn pool_when(
    client: &subidd_tests::Client,
    what: &str,
    done: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let pool = client.get("/v1/pool").await.expect("GET pool").json();
        if done(&pool) {
            return pool;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: not seen within 10 s; pool: {pool}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// Replaces a file the way shadow's tools do: write a sibling, rename it over.
fn replace_file(path: &std::path::Path, text: &str) {
    let tmp = path.with_extension("tmp+");
    std::fs::write(&tmp, text).expect("write replacement");
    std::fs::rename(&tmp, path).expect("rename over");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_new_subuid_claim_withholds_free_blocks_and_reports_active_leases() {
    let config = format!(
        "pool_check_interval_ms = 3600000\n[pool]\nbase = {RECHECK_BASE}\nsize = {}\n",
        4 * BLOCK
    );
    let daemon = Daemon::start(&config).expect("start daemon");
    let client = daemon.client();
    let a = client.put("/v1/leases/a", None).await.expect("PUT a");
    assert_status(&a, StatusCode::CREATED, "PUT a");
    assert_eq!(a.json()["uid_base"], RECHECK_BASE, "a gets block 0");

    // Another tool gives ids of blocks 0 (a's) and 1 (free) to one owner, and block 3 (free) to
    // another.
    let claims = format!(
        "other:{}:{BLOCK}\nsomeone:{}:{BLOCK}\n",
        RECHECK_BASE + 1000,
        RECHECK_BASE + 3 * BLOCK
    );
    replace_file(&daemon.path("subuid"), &claims);
    let pool = pool_when(&client, "warning for lease a", |p| {
        p["warnings"].as_array().is_some_and(|w| !w.is_empty())
    })
    .await;
    assert_eq!(
        pool["blocks"]["withheld"], 2,
        "blocks 1 and 3 withheld: {pool}"
    );
    assert_eq!(pool["blocks"]["active"], 1, "a stays active: {pool}");
    assert_eq!(pool["blocks"]["free"], 1, "block 2 free: {pool}");
    let warning = &pool["warnings"][0];
    assert_eq!(pool["warnings"].as_array().map(Vec::len), Some(1), "{pool}");
    assert_eq!(warning["code"], "lease_ids_claimed", "{warning}");
    assert_eq!(warning["lease"], "a", "{warning}");
    let claim = warning["claim"].as_str().unwrap_or_default();
    assert!(
        claim.contains("line 1") && claim.contains("other"),
        "claim names the line: {warning}"
    );
    let statuses: Vec<&str> = pool["claims"]
        .as_array()
        .map(|c| c.iter().filter_map(|c| c["status"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(statuses, ["conflict", "withheld"], "claims: {pool}");

    // Allocation steps around the withheld blocks; a is untouched.
    let b = client.put("/v1/leases/b", None).await.expect("PUT b");
    assert_status(&b, StatusCode::CREATED, "PUT b");
    assert_eq!(
        b.json()["uid_base"],
        RECHECK_BASE + 2 * BLOCK,
        "block 2, never 1 or 3"
    );
    let full = client.put("/v1/leases/d", None).await.expect("PUT d");
    assert_eq!(
        full.code(),
        "pool_exhausted",
        "only withheld blocks are left: {}",
        full.text()
    );
    let a_now = client.get("/v1/leases/a").await.expect("GET a").json();
    assert_eq!(a_now["state"], "active", "never silently resolved: {a_now}");
    assert!(
        daemon.log_text().contains("claims ids of an active lease"),
        "the conflict is logged:\n{}",
        daemon.log_text()
    );

    // The claims go away: the warning clears and blocks 1 and 3 are handed out again.
    replace_file(&daemon.path("subuid"), "");
    let pool = pool_when(&client, "claims cleared", |p| {
        p["warnings"].as_array().is_some_and(Vec::is_empty) && p["blocks"]["withheld"] == 0
    })
    .await;
    assert_eq!(pool["blocks"]["free"], 2, "{pool}");
    let d = client.put("/v1/leases/d", None).await.expect("PUT d");
    assert_status(&d, StatusCode::CREATED, "PUT d after the claim went away");
    assert_eq!(d.json()["uid_base"], RECHECK_BASE + BLOCK, "block 1");
}

/// Removes the host user on drop, so a failing test leaves the user database as it found it.
struct HostUser(&'static str);

impl Drop for HostUser {
    fn drop(&mut self) {
        let _ = std::process::Command::new("userdel").arg(self.0).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(not(subidd_root), ignore = "needs root (adds a host user)")]
async fn a_new_host_user_inside_an_active_lease_is_reported() {
    let config = format!(
        "pool_check_interval_ms = 3600000\n[pool]\nbase = {}\nsize = {}\n",
        RECHECK_BASE + 16 * BLOCK,
        2 * BLOCK
    );
    let daemon = Daemon::start(&config).expect("start daemon");
    let client = daemon.client();
    let lease = client.put("/v1/leases/u", None).await.expect("PUT u");
    assert_status(&lease, StatusCode::CREATED, "PUT u");
    let uid = RECHECK_BASE + 16 * BLOCK + 7;
    let user = HostUser("subidd-e2e-recheck");
    let added = std::process::Command::new("useradd")
        .args(["-M", "-N", "-s", "/usr/sbin/nologin", "-u"])
        .arg(uid.to_string())
        .arg(user.0)
        .status()
        .expect("run useradd");
    assert!(added.success(), "useradd: {added}");
    let pool = pool_when(&client, "warning for the new user", |p| {
        p["warnings"].as_array().is_some_and(|w| !w.is_empty())
    })
    .await;
    assert_eq!(pool["warnings"][0]["lease"], "u", "{pool}");
    let claim = pool["warnings"][0]["claim"].as_str().unwrap_or_default();
    assert!(
        claim.contains(&format!("uid {uid}")),
        "claim names the uid: {pool}"
    );
    drop(user);
    pool_when(&client, "warning cleared after userdel", |p| {
        p["warnings"].as_array().is_some_and(Vec::is_empty)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_subuid_entry_inside_a_lease_hands_it_on_until_the_lease_is_released() {
    let base = RECHECK_BASE + 32 * BLOCK;
    let config = format!(
        "quarantine_seconds = 0\npool_check_interval_ms = 3600000\n[pool]\nbase = {base}\nsize = {}\n",
        2 * BLOCK
    );
    let mut daemon = Daemon::start(&config).expect("start daemon");
    let client = daemon.client();
    let web = client.put("/v1/leases/web", None).await.expect("PUT web");
    assert_status(&web, StatusCode::CREATED, "PUT web");
    assert_eq!(web.json()["uid_base"], base, "web gets block 0");
    // The operator hands the lease to a rootless user the way the docs say.
    let line = client
        .get("/v1/leases/web/idmap?format=subuid")
        .await
        .expect("GET idmap")
        .text();
    assert_eq!(line, format!("web:{base}:{BLOCK}\n"), "subuid line");
    replace_file(&daemon.path("subuid"), &line);
    replace_file(&daemon.path("subgid"), &line);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !daemon.log_text().contains("hands on ids of a lease") {
        assert!(
            std::time::Instant::now() < deadline,
            "the re-check did not see the entry:\n{}",
            daemon.log_text()
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let pool = client.get("/v1/pool").await.expect("GET pool").json();
    assert_eq!(
        pool["warnings"],
        serde_json::json!([]),
        "no conflict: {pool}"
    );
    assert_eq!(pool["blocks"]["withheld"], 0, "{pool}");
    assert_eq!(pool["claims"][0]["status"], "hands_on", "{pool}");
    assert_eq!(
        pool["claims"][0]["leases"],
        serde_json::json!(["web"]),
        "{pool}"
    );

    // A restart accepts the entry (it names the lease's own ids).
    daemon.restart().expect("restart with the entry in place");
    let client = daemon.client();
    let pool = client.get("/v1/pool").await.expect("GET pool").json();
    assert_eq!(
        pool["warnings"],
        serde_json::json!([]),
        "after restart: {pool}"
    );

    // Released while the entry stays: its block is withheld, not handed to the next lease.
    let gone = client.delete("/v1/leases/web").await.expect("DELETE web");
    assert_status(&gone, StatusCode::NO_CONTENT, "DELETE web");
    let pool = client.get("/v1/pool").await.expect("GET pool").json();
    assert_eq!(
        pool["blocks"]["withheld"], 1,
        "released block withheld: {pool}"
    );
    let next = client.put("/v1/leases/next", None).await.expect("PUT next");
    assert_status(&next, StatusCode::CREATED, "PUT next");
    assert_eq!(next.json()["uid_base"], base + BLOCK, "block 1, not web's");
    let full = client.put("/v1/leases/more", None).await.expect("PUT more");
    assert_eq!(full.code(), "pool_exhausted", "{}", full.text());
}
