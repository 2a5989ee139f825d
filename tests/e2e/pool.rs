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
