//! Operator views of the real daemon: `/metrics`, the `/v1/events` feed (live, resumed across
//! a restart), the per-request log line, and `subidd --register`.

use std::collections::BTreeSet;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::{Duration, Instant};

use hyper::{Method, StatusCode};
use serde_json::Value;
use subidd_tests::{Client, Daemon, subidd_bin, tcp_request};

use crate::util::{BASE, BLOCK, EventStream, assert_error, assert_status, pool_config};

/// Parses the text format strictly enough for a test: every line is `# HELP`, `# TYPE` or
/// `name{labels} value`. Returns `(series, value)` pairs.
fn parse_metrics(text: &str) -> Vec<(String, f64)> {
    let mut samples = Vec::new();
    for line in text.lines() {
        if line.starts_with("# HELP ") || line.starts_with("# TYPE ") {
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("not `series value`: {line:?}"));
        let name_end = series.find('{').unwrap_or(series.len());
        let name = &series[..name_end];
        assert!(
            !name.is_empty()
                && name.starts_with("subidd_")
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
            "bad metric name in {line:?}"
        );
        if name_end < series.len() {
            let labels = &series[name_end..];
            assert!(
                labels.ends_with('}') && labels.len() > 2,
                "bad labels in {line:?}"
            );
            for pair in labels[1..labels.len() - 1].split("\",") {
                let (key, value) = pair
                    .split_once("=\"")
                    .unwrap_or_else(|| panic!("bad label {pair:?} in {line:?}"));
                assert!(
                    key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
                    "bad label name in {line:?}"
                );
                assert!(!value.contains('\n'), "raw newline in {line:?}");
            }
        }
        let value = match value {
            "+Inf" => f64::INFINITY,
            v => v
                .parse()
                .unwrap_or_else(|_| panic!("bad value in {line:?}")),
        };
        samples.push((series.to_string(), value));
    }
    samples
}

#[track_caller]
fn metric(samples: &[(String, f64)], series: &str) -> f64 {
    samples
        .iter()
        .find(|(s, _)| s == series)
        .map(|(_, v)| *v)
        .unwrap_or_else(|| panic!("no sample {series} in {samples:?}"))
}

/// `GET /metrics`, checked for status, content type and format.
async fn scrape(client: &Client) -> Vec<(String, f64)> {
    let reply = client.get("/metrics").await.expect("GET /metrics");
    assert_status(&reply, StatusCode::OK, "GET /metrics");
    let content_type = reply.header("content-type");
    assert!(
        content_type.starts_with("text/plain; version=0.0.4"),
        "content type {content_type:?}"
    );
    parse_metrics(&reply.text())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(not(subidd_root), ignore = "needs root")]
async fn metrics_reflect_a_lease_and_a_spawn() {
    let daemon = Daemon::start(&pool_config(4, 60)).expect("start daemon");
    let client = daemon.client();
    let before = scrape(&client).await;
    assert_eq!(metric(&before, "subidd_leases_created_total"), 0.0);
    assert_eq!(metric(&before, "subidd_pool_blocks{state=\"free\"}"), 4.0);
    let lease = client.put("/v1/leases/obs-1", None).await.expect("PUT");
    assert_status(&lease, StatusCode::CREATED, "PUT obs-1");
    let spawned = client
        .post(
            "/v1/leases/obs-1/processes",
            Some(r#"{"argv":["/bin/true"]}"#),
        )
        .await
        .expect("spawn");
    assert_status(&spawned, StatusCode::CREATED, "spawn /bin/true");
    let id = spawned.json()["id"].as_str().expect("id").to_string();
    let waited = client
        .post(&format!("/v1/processes/{id}/wait?timeout_seconds=20"), None)
        .await
        .expect("wait")
        .json();
    assert_eq!(waited["state"], "exited", "{waited}");

    // Event counters are bumped by the writer right after it answers: poll briefly.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let s = loop {
        let s = scrape(&client).await;
        if metric(&s, "subidd_processes_exited_total") == 1.0
            || std::time::Instant::now() > deadline
        {
            break s;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    for (series, want) in [
        ("subidd_leases_created_total", 1.0),
        ("subidd_leases_active", 1.0),
        ("subidd_pool_blocks{state=\"active\"}", 1.0),
        ("subidd_pool_blocks{state=\"free\"}", 3.0),
        ("subidd_pool_capacity_blocks", 4.0),
        ("subidd_spawns_total", 1.0),
        ("subidd_processes_started_total", 1.0),
        ("subidd_processes_exited_total", 1.0),
        ("subidd_processes_running", 0.0),
        ("subidd_spawn_duration_seconds_count", 1.0),
        ("subidd_spawn_duration_seconds_bucket{le=\"+Inf\"}", 1.0),
        (
            "subidd_http_requests_total{method=\"PUT\",route=\"/v1/leases/{name}\",status=\"201\"}",
            1.0,
        ),
        (
            "subidd_http_requests_total{method=\"POST\",route=\"/v1/leases/{name}/processes\",status=\"201\"}",
            1.0,
        ),
        (
            "subidd_http_request_duration_seconds_count{method=\"PUT\",route=\"/v1/leases/{name}\"}",
            1.0,
        ),
    ] {
        assert_eq!(metric(&s, series), want, "{series}");
    }
    assert!(metric(&s, "subidd_spawn_duration_seconds_sum") > 0.0);
    assert!(
        s.iter()
            .all(|(series, _)| !series.contains("obs-1") && !series.contains(&id)),
        "a raw path leaked into a label"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metrics_count_errors_and_need_the_token_over_tcp() {
    let token = "obs-token-0123456789abcdef";
    let (daemon, addr) = crate::access::tcp_daemon(token);
    let client = daemon.client();
    let missing = client.get("/v1/leases/nope").await.expect("GET");
    assert_error(
        &missing,
        StatusCode::NOT_FOUND,
        "not_found",
        "missing lease",
    );
    let unknown = client.get("/no/such/path").await.expect("GET");
    assert_error(&unknown, StatusCode::NOT_FOUND, "not_found", "unknown path");

    let refused = tcp_request(
        &addr,
        Method::GET,
        "/metrics",
        &[("host", "localhost")],
        None,
    )
    .await
    .expect("TCP GET /metrics");
    assert_error(
        &refused,
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        "/metrics without the token",
    );
    let bearer = format!("Bearer {token}");
    let reply = tcp_request(
        &addr,
        Method::GET,
        "/metrics",
        &[("host", "localhost"), ("authorization", &bearer)],
        None,
    )
    .await
    .expect("TCP GET /metrics");
    assert_status(&reply, StatusCode::OK, "/metrics with the token");
    let s = parse_metrics(&reply.text());
    assert_eq!(
        metric(&s, "subidd_http_errors_total{code=\"not_found\"}"),
        2.0
    );
    assert_eq!(
        metric(&s, "subidd_http_errors_total{code=\"unauthorized\"}"),
        1.0,
        "refusals by the auth layer are counted too"
    );
    assert_eq!(
        metric(
            &s,
            "subidd_http_requests_total{method=\"GET\",route=\"unmatched\",status=\"404\"}"
        ),
        1.0,
        "unknown paths share one route label"
    );
    assert_eq!(
        metric(
            &s,
            "subidd_http_requests_total{method=\"GET\",route=\"/metrics\",status=\"401\"}"
        ),
        1.0
    );
}

/// `GET /v1/events?since=ID&follow=false`, parsed.
async fn backlog(client: &Client, since: i64) -> Vec<Value> {
    let reply = client
        .get(&format!("/v1/events?since={since}&follow=false"))
        .await
        .expect("GET /v1/events");
    assert_status(&reply, StatusCode::OK, "events backlog");
    reply
        .text()
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect()
}

fn id(event: &Value) -> i64 {
    event["id"]
        .as_i64()
        .unwrap_or_else(|| panic!("no id: {event}"))
}

#[track_caller]
fn assert_event(event: &Value, kind: &str, lease: &str) {
    assert_eq!(event["type"], kind, "{event}");
    assert_eq!(event["lease"], lease, "{event}");
    assert!(
        event["at"].as_str().is_some_and(|a| a.ends_with('Z')),
        "{event}"
    );
}

/// A process's start and end reach a stream that follows the feed (while one is open, the spawn
/// path pokes the publisher at once rather than leaving the rows for its next turn).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(not(subidd_root), ignore = "needs root")]
async fn process_events_reach_an_open_stream() {
    let daemon = Daemon::start(&pool_config(8, 60)).expect("start daemon");
    let client = daemon.client();
    let mut live = EventStream::open(&daemon.socket, "?since=0").await;
    assert_status(
        &client.put("/v1/leases/ev-p", None).await.expect("PUT"),
        StatusCode::CREATED,
        "PUT ev-p",
    );
    assert_event(
        &live.next().await.expect("a live event"),
        "lease.created",
        "ev-p",
    );
    let spawned = client
        .post(
            "/v1/leases/ev-p/processes?wait=true",
            Some(r#"{"argv":["/bin/sh","-c","exit 7"]}"#),
        )
        .await
        .expect("spawn");
    assert_status(&spawned, StatusCode::CREATED, "spawn");
    let process = spawned.json()["id"].clone();
    let started = live.next().await.expect("a live event");
    assert_event(&started, "process.started", "ev-p");
    assert_eq!(started["details"]["process"], process, "{started}");
    let exited = live.next().await.expect("a live event");
    assert_event(&exited, "process.exited", "ev-p");
    assert_eq!(exited["details"]["process"], process, "{exited}");
    assert_eq!(exited["details"]["exit_code"], 7, "{exited}");
    assert!(id(&exited) > id(&started));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn events_stream_live_and_resume_across_a_restart() {
    let mut daemon = Daemon::start(&pool_config(8, 60)).expect("start daemon");
    let client = daemon.client();
    let mut live = EventStream::open(&daemon.socket, "?since=0").await;
    assert_status(
        &client.put("/v1/leases/ev-a", None).await.expect("PUT"),
        StatusCode::CREATED,
        "PUT ev-a",
    );
    let first = live.next().await.expect("a live event");
    assert_event(&first, "lease.created", "ev-a");
    assert_eq!(first["details"]["uid_base"], BASE, "{first}");
    client.put("/v1/leases/ev-b", None).await.expect("PUT");
    let second = live.next().await.expect("a live event");
    assert_event(&second, "lease.created", "ev-b");
    assert!(id(&second) > id(&first));

    // A stop does not wait for open streams: they end, and the daemon exits promptly.
    let stopping = Instant::now();
    daemon.restart().expect("restart with a stream open");
    assert!(
        stopping.elapsed() < Duration::from_secs(15),
        "restart took {:?}",
        stopping.elapsed()
    );
    assert!(live.next().await.is_none(), "the stream ends at shutdown");

    let client = daemon.client();
    assert_status(
        &client.delete("/v1/leases/ev-a").await.expect("DELETE"),
        StatusCode::NO_CONTENT,
        "DELETE ev-a",
    );
    client.put("/v1/leases/ev-c", None).await.expect("PUT");
    let resumed = backlog(&client, id(&second)).await;
    assert_eq!(resumed.len(), 2, "{resumed:?}");
    assert_event(&resumed[0], "lease.released", "ev-a");
    assert_event(&resumed[1], "lease.created", "ev-c");
    assert!(id(&resumed[0]) > id(&second) && id(&resumed[1]) > id(&resumed[0]));

    // The whole history: every id once, in order, and exactly what the two reads saw.
    let all = backlog(&client, 0).await;
    let ids: Vec<i64> = all.iter().map(id).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
    let seen: BTreeSet<i64> = [&first, &second]
        .into_iter()
        .chain(&resumed)
        .map(id)
        .collect();
    assert_eq!(ids.iter().copied().collect::<BTreeSet<_>>(), seen);

    // Following from an id: the backlog, then live events, no gap and no repeat.
    let mut follow = EventStream::open(&daemon.socket, &format!("?since={}", id(&first))).await;
    let mut got = Vec::new();
    for _ in 0..3 {
        got.push(follow.next().await.expect("backlog event"));
    }
    client.put("/v1/leases/ev-d", None).await.expect("PUT");
    let next = follow.next().await.expect("live event");
    assert_event(&next, "lease.created", "ev-d");
    got.push(next);
    let got_ids: Vec<i64> = got.iter().map(id).collect();
    let mut want = ids[1..].to_vec();
    want.push(id(&got[3]));
    assert_eq!(got_ids, want, "backlog then live, each id once");

    // One log line per request, with the caller; health checks and scrapes stay out of info.
    client.get("/_ping").await.expect("ping");
    client.get("/metrics").await.expect("metrics");
    let log = daemon.log_text();
    assert!(
        log.lines().any(|l| l.contains("request")
            && l.contains("method=\"PUT\"")
            && l.contains("path=\"/v1/leases/ev-d\"")
            && l.contains("status=201")
            && l.contains("duration_ms=")
            && l.contains("uid=")),
        "no request line for PUT ev-d in:\n{log}"
    );
    assert!(
        !log.contains("path=\"/_ping\"") && !log.contains("path=\"/metrics\""),
        "ping and metrics are not logged at info:\n{log}"
    );
}

/// Runs `subidd --config CONFIG --register`; returns exit code, stdout and stderr.
fn register(config: &Path) -> (Option<i32>, String, String) {
    let out = std::process::Command::new(subidd_bin().expect("subidd binary"))
        .arg("--config")
        .arg(config)
        .arg("--register")
        .env_remove("SUBIDD_CONFIG")
        .env_remove("SUBIDD_SUBUID_FILE")
        .env_remove("SUBIDD_SUBGID_FILE")
        .output()
        .expect("run subidd --register");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A config naming temp subid files and a pool of `blocks` blocks at the default base.
fn register_config(dir: &Path, blocks: u32) -> std::path::PathBuf {
    let config = dir.join("subidd.toml");
    std::fs::write(
        &config,
        format!(
            "state_dir = {:?}\nsubuid_file = {:?}\nsubgid_file = {:?}\n{}",
            dir.join("state"),
            dir.join("subuid"),
            dir.join("subgid"),
            pool_config(blocks, 60)
        ),
    )
    .expect("write config");
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn register_writes_keeps_and_refuses() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (subuid, subgid) = (dir.path().join("subuid"), dir.path().join("subgid"));
    let uid_text = "# site users\nalice:100000:65536\nsubidd:5:5\nbroken line\n";
    std::fs::write(&subuid, uid_text).expect("write subuid");
    std::fs::set_permissions(&subuid, std::fs::Permissions::from_mode(0o640)).expect("chmod");
    std::fs::write(&subgid, "alice:100000:65536").expect("write subgid");
    let config = register_config(dir.path(), 10);
    let entry = format!("subidd:{BASE}:{}", 10 * BLOCK);

    let (code, out, err) = register(&config);
    assert_eq!(code, Some(0), "register: {out}{err}");
    assert!(out.contains("registered") && out.contains(&entry), "{out}");
    assert_eq!(
        std::fs::read_to_string(&subuid).expect("read subuid"),
        format!("# site users\nalice:100000:65536\n{entry}\nbroken line\n"),
        "the stale subidd line is replaced in place, every other line kept"
    );
    assert_eq!(
        std::fs::read_to_string(&subgid).expect("read subgid"),
        format!("alice:100000:65536\n{entry}\n")
    );
    let meta = std::fs::metadata(&subuid).expect("stat");
    assert_eq!(meta.mode() & 0o777, 0o640, "mode kept");
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .expect("read dir")
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "temp files left: {leftovers:?}");

    // Again: nothing to do, nothing rewritten.
    let (code, out, err) = register(&config);
    assert_eq!(code, Some(0), "second register: {out}{err}");
    assert!(out.contains("already registered"), "{out}");
    assert_eq!(
        std::fs::metadata(&subuid).expect("stat").ino(),
        meta.ino(),
        "an already registered file is not replaced"
    );

    // The daemon takes the registered entry as its pool.
    let registered = std::fs::read_to_string(&subuid).expect("read");
    let daemon = Daemon::start_with_subid(
        "",
        &registered,
        &std::fs::read_to_string(&subgid).expect("read"),
    )
    .expect("start on the registered files");
    let pool = daemon.client().get("/v1/pool").await.expect("pool").json();
    assert_eq!(pool["source"], "subuid", "{pool}");
    assert_eq!(pool["base"], BASE, "{pool}");
    assert_eq!(pool["blocks"]["total"], 10, "{pool}");

    // Another owner inside the pool: refused, exit 1, nothing written.
    let other = tempfile::tempdir().expect("tempdir");
    let bob = format!("bob:{}:1\n", BASE + 3 * BLOCK);
    std::fs::write(other.path().join("subuid"), &bob).expect("write");
    std::fs::write(other.path().join("subgid"), "").expect("write");
    let (code, out, err) = register(&register_config(other.path(), 10));
    assert_eq!(code, Some(1), "overlap: {out}{err}");
    assert!(
        err.contains("bob") && err.contains("cannot register"),
        "the refusal names the other owner: {err}"
    );
    assert_eq!(
        std::fs::read_to_string(other.path().join("subuid")).expect("read"),
        bob
    );
    assert_eq!(
        std::fs::read_to_string(other.path().join("subgid")).expect("read"),
        ""
    );
}
