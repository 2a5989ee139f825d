//! Config layers as the binary applies them: file < `SUBIDD_*` environment; bad keys refused.

use hyper::StatusCode;
use subidd_tests::Daemon;

use crate::util::{BLOCK, assert_status};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn environment_beats_the_config_file() {
    let daemon = Daemon::start_with(
        "quarantine_seconds = 5\n[pool]\nsize = 262144\n",
        &[],
        &[
            ("SUBIDD_QUARANTINE_SECONDS", "7"),
            ("SUBIDD_POOL_SIZE", "131072"),
        ],
    )
    .expect("start daemon");
    let reply = daemon.client().get("/v1/pool").await.expect("GET pool");
    assert_status(&reply, StatusCode::OK, "GET /v1/pool");
    let pool = reply.json();
    assert_eq!(pool["quarantine_seconds"], 7, "env quarantine wins: {pool}");
    assert_eq!(pool["size"], 2 * BLOCK, "env pool size wins: {pool}");
    assert_eq!(pool["source"], "config", "source: {pool}");
}

#[test]
fn unknown_keys_and_bad_values_are_refused_by_name() {
    let message = Daemon::start_failure("sokcet = \"/x\"\n").expect("typo refused");
    assert!(
        message.contains("sokcet"),
        "names the unknown key: {message}"
    );
    let message = Daemon::start_failure("[pool]\nbloc = 65536\n").expect("typo refused");
    assert!(
        message.contains("bloc"),
        "names the unknown pool key: {message}"
    );
    let message = Daemon::start_failure("expiry_interval_ms = 0\n").expect("zero refused");
    assert!(
        message.contains("expiry_interval_ms"),
        "names expiry_interval_ms: {message}"
    );
    let message = Daemon::start_failure("pool_check_interval_ms = 0\n").expect("zero refused");
    assert!(
        message.contains("pool_check_interval_ms"),
        "names pool_check_interval_ms: {message}"
    );
    let message = match Daemon::start_with("", &[], &[("SUBIDD_POOL_BASE", "lots")]) {
        Ok(_) => panic!("subidd started with SUBIDD_POOL_BASE=lots"),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        message.contains("SUBIDD_POOL_BASE"),
        "names the variable: {message}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn log_format_flag_gives_json_lines_and_beats_the_environment() {
    let daemon = Daemon::start_with(
        "",
        &["--log-format", "json"],
        &[("SUBIDD_LOG_FORMAT", "text")],
    )
    .expect("start daemon");
    let reply = daemon
        .client()
        .put("/v1/leases/logged", None)
        .await
        .expect("PUT");
    assert_status(&reply, StatusCode::CREATED, "PUT");
    // The request line is written once the answer has gone out: poll for it.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let log = daemon.log_text();
        let lines: Vec<serde_json::Value> = log
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
            .collect();
        let found = lines
            .iter()
            .any(|l| l["fields"]["path"] == "/v1/leases/logged" && l["fields"]["status"] == 201);
        if found {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no JSON request line for the PUT:\n{log}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}
