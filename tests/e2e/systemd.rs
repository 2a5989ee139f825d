//! The real binary started the way systemd starts it (CI has no systemd as PID 1): a notify
//! socket of the test's own for READY/WATCHDOG/STOPPING, and a socket bound by a shim and
//! passed as fd 3 with LISTEN_FDS/LISTEN_PID.

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::time::{Duration, Instant};

use hyper::StatusCode;
use sqlx::ConnectOptions;
use sqlx::sqlite::SqliteConnectOptions;
use subidd_tests::{Daemon, NotifySocket, SOCKET_ACTIVATE_PY};

use crate::access::{curl_as, open_dirs};

const PYTHON: &str = "/usr/bin/python3";

/// Starts the binary with a notify socket of the test's and WATCHDOG_USEC=400000 (a ping every
/// 200 ms); returns once READY=1 arrived, with that message and the ones before it.
fn launch_with_watchdog() -> (Daemon, NotifySocket, String, Vec<String>) {
    let mut daemon = Daemon::prepared("").expect("prepare daemon");
    let notify = NotifySocket::bind(&daemon.path("notify.sock")).expect("notify socket");
    daemon
        .spawn_via(
            &[],
            &[
                ("NOTIFY_SOCKET", notify.env_value.as_str()),
                ("WATCHDOG_USEC", "400000"),
            ],
        )
        .expect("launch");
    let (ready, before) = notify
        .wait_for("READY=1", Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e:#}: {}", daemon.log_text()));
    (daemon, notify, ready, before)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notify_ready_after_ping_then_watchdog_then_stopping() {
    let (mut daemon, notify, ready, before) = launch_with_watchdog();
    assert!(before.is_empty(), "nothing before READY=1: {before:?}");
    assert!(
        ready.lines().any(|l| l.starts_with("STATUS=serving ")),
        "READY=1 comes with a STATUS line: {ready:?}"
    );
    // Readiness means served now: one connection, no retry on a missing socket.
    let reply = daemon
        .client()
        .get("/_ping")
        .await
        .expect("ping right after READY");
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());

    let start = Instant::now();
    let mut pings = 0;
    while start.elapsed() < Duration::from_millis(1500) {
        match notify.recv(Duration::from_secs(2)).expect("recv") {
            Some(m) if m == "WATCHDOG=1" => pings += 1,
            Some(m) => panic!("unexpected message while serving: {m:?}"),
            None => break,
        }
    }
    assert!(
        pings >= 4,
        "WATCHDOG=1 every 200 ms: {pings} in {:?}",
        start.elapsed()
    );
    // Writes still work with the watchdog pinging the writer.
    let reply = daemon
        .client()
        .put("/v1/leases/wd-1", None)
        .await
        .expect("PUT");
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.text());

    let code = daemon.stop().expect("stop");
    assert_eq!(code, Some(0), "clean exit: {}", daemon.log_text());
    let (stopping, _) = notify
        .wait_for("STOPPING=1", Duration::from_secs(5))
        .expect("STOPPING=1 on SIGTERM");
    assert!(stopping.contains("STATUS="), "{stopping:?}");
    assert!(
        !daemon.socket.exists(),
        "a socket the daemon bound itself is removed at exit"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watchdog_pings_stop_while_the_writer_is_stuck() {
    let (daemon, notify, _, _) = launch_with_watchdog();
    notify
        .wait_for("WATCHDOG=1", Duration::from_secs(5))
        .expect("pings while healthy");

    // Another process holds the database's write lock: the writer waits in BEGIN IMMEDIATE
    // (busy timeout 5 s) with a PUT in hand, and cannot take the watchdog's ping.
    let mut lock = SqliteConnectOptions::new()
        .filename(daemon.database())
        .connect()
        .await
        .expect("open the daemon's database");
    sqlx::query("BEGIN IMMEDIATE")
        .execute(&mut lock)
        .await
        .expect("take the write lock");
    let client = daemon.client();
    let put = tokio::spawn(async move { client.put("/v1/leases/wd-stuck", None).await });
    let (unhealthy, _) = notify
        .wait_for_prefix("STATUS=unhealthy: ", Duration::from_secs(3))
        .unwrap_or_else(|e| panic!("{e:#}: {}", daemon.log_text()));
    assert!(
        unhealthy.contains("lease writer"),
        "the status names the writer: {unhealthy:?}"
    );
    assert!(
        !unhealthy.lines().any(|l| l == "WATCHDOG=1"),
        "no ping with an unhealthy status: {unhealthy:?}"
    );
    // While it is stuck, nothing but more unhealthy statuses.
    let until = Instant::now() + Duration::from_millis(800);
    while let Some(m) = notify
        .recv(until.saturating_duration_since(Instant::now()))
        .expect("recv")
    {
        assert!(m.starts_with("STATUS=unhealthy: "), "while stuck: {m:?}");
    }

    sqlx::query("ROLLBACK")
        .execute(&mut lock)
        .await
        .expect("release the write lock");
    let reply = put.await.expect("join").expect("PUT");
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.text());
    let (back, _) = notify
        .wait_for("WATCHDOG=1", Duration::from_secs(3))
        .expect("pings resume");
    assert!(back.contains("STATUS=serving"), "{back:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_watchdog_pings_for_another_pid() {
    let mut daemon = Daemon::prepared("").expect("prepare daemon");
    let name = format!("subidd-e2e-notify-{}", std::process::id());
    let notify = NotifySocket::bind_abstract(&name).expect("abstract notify socket");
    daemon
        .spawn_via(
            &[],
            &[
                ("NOTIFY_SOCKET", notify.env_value.as_str()),
                ("WATCHDOG_USEC", "200000"),
                ("WATCHDOG_PID", "1"),
            ],
        )
        .expect("launch");
    notify
        .wait_for("READY=1", Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e:#}: {}", daemon.log_text()));
    let quiet = notify.recv(Duration::from_millis(600)).expect("recv");
    assert_eq!(quiet, None, "WATCHDOG_PID=1 is not us: no pings");
    assert!(
        daemon
            .log_text()
            .contains("WATCHDOG_PID names another process"),
        "the reason is logged: {}",
        daemon.log_text()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(not(subidd_root), ignore = "needs root")]
async fn socket_activation_serves_the_passed_socket_and_leaves_it() {
    let mut daemon = Daemon::prepared("socket_group = \"root\"\nallowed_uids = [4242]\n")
        .expect("prepare daemon");
    let name = format!("subidd-e2e-activate-{}", std::process::id());
    let notify = NotifySocket::bind_abstract(&name).expect("abstract notify socket");
    let socket = daemon.socket.display().to_string();
    // As subidd.socket would: SocketMode=0660, SocketGroup=4242 (not the configured group).
    daemon
        .spawn_via(
            &[
                PYTHON,
                "-c",
                SOCKET_ACTIVATE_PY,
                "unix",
                &socket,
                "660",
                "4242",
            ],
            &[("NOTIFY_SOCKET", notify.env_value.as_str())],
        )
        .expect("launch through the activation shim");
    notify
        .wait_for("READY=1", Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e:#}: {}", daemon.log_text()));
    assert!(
        daemon
            .log_text()
            .contains("serving the socket systemd passed"),
        "{}",
        daemon.log_text()
    );
    let meta = std::fs::metadata(&daemon.socket).expect("stat socket");
    assert_eq!(
        (meta.mode() & 0o7777, meta.uid(), meta.gid()),
        (0o660, 0, 4242),
        "the daemon leaves the unit's mode and group alone"
    );

    let client = daemon.client();
    let reply = client.put("/v1/leases/act-1", None).await.expect("PUT");
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.text());
    let reply = client.get("/v1/leases/act-1").await.expect("GET");
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());

    // SO_PEERCRED still decides: 4242 is allowed, 4243 (in the socket's group) is not.
    open_dirs(&daemon);
    let (status, body) = curl_as(4242, 4242, &daemon.socket, "GET", "/_ping").await;
    assert_eq!((status.as_str(), body.as_str()), ("200", "OK"), "uid 4242");
    let (status, body) = curl_as(4243, 4242, &daemon.socket, "GET", "/_ping").await;
    assert_eq!(status, "403", "uid 4243 is not allowed: {body}");

    let code = daemon.stop().expect("stop");
    assert_eq!(code, Some(0), "clean exit: {}", daemon.log_text());
    notify
        .wait_for("STOPPING=1", Duration::from_secs(5))
        .expect("STOPPING=1");
    let meta = std::fs::symlink_metadata(&daemon.socket).expect("socket file stays");
    assert!(meta.file_type().is_socket(), "still a socket");

    // A plain restart (no systemd) finds the stale socket file, replaces it and serves.
    daemon.spawn().expect("start again without activation");
    let reply = daemon.client().get("/v1/leases/act-1").await.expect("GET");
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
}

#[test]
fn a_passed_tcp_socket_is_refused() {
    let mut daemon = Daemon::prepared("").expect("prepare daemon");
    daemon
        .spawn_via(&[PYTHON, "-c", SOCKET_ACTIVATE_PY, "tcp", "127.0.0.1"], &[])
        .expect("launch through the activation shim");
    let code = daemon
        .wait_exit(Duration::from_secs(30))
        .expect("exits by itself");
    assert_eq!(code, Some(1), "{}", daemon.log_text());
    let log = daemon.log_text();
    assert!(
        log.contains("takes only a listening unix stream socket") && log.contains("listen_tcp"),
        "the refusal says what to do: {log}"
    );
    assert!(!daemon.socket.exists(), "nothing was bound instead");
}
