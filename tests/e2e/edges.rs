//! The daemon's edges (issue 10, findings 5, 6, 9, 10): a TCP connection flood cannot take the
//! descriptors or the unix socket's budget; an empty or foreign database, an untrusted runtime
//! dir and an exposed token file are refused at start by name; two daemons never serve
//! overlapping pools on one host.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::{PermissionsExt, chown};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hyper::{Method, StatusCode};
use sqlx::sqlite::SqliteConnectOptions;
use sqlx::{ConnectOptions, Connection};
use subidd_tests::{Daemon, free_tcp_port, tcp_request};

use crate::util::{BASE, BLOCK, assert_status, ensure_open_files, pool_config};

// ---- Finding 5: connection caps ----

/// A daemon serving loopback TCP with `extra` config, started under `prlimit --nofile=N:N`
/// (so its descriptor budget is small and known); returns it, `host:port` and the token.
fn tcp_daemon_with_nofile(extra: &str, nofile: u64) -> (Daemon, String, String) {
    let port = free_tcp_port().expect("free port");
    let addr = format!("127.0.0.1:{port}");
    let token = "edges-token-0123456789abcdef".to_string();
    let keep = tempfile::tempdir().expect("tempdir");
    let token_file = keep.path().join("token");
    std::fs::write(&token_file, format!("{token}\n")).expect("write token");
    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o600))
        .expect("chmod token");
    let mut daemon = Daemon::prepared(&format!(
        "listen_tcp = {addr:?}\ntoken_file = {token_file:?}\n{extra}"
    ))
    .expect("prepare daemon");
    daemon
        .spawn_via(&["prlimit", &format!("--nofile={nofile}:{nofile}")], &[])
        .expect("start under prlimit");
    daemon.wait_ready().expect("daemon ready");
    drop(keep);
    (daemon, addr, token)
}

/// Descriptors the process holds now.
fn fds_of(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(Iterator::count)
        .unwrap_or(0)
}

/// What a non-blocking read says of a connection: closed by the peer (EOF, reset, or the 503
/// answer followed by EOF), or still open.
#[derive(Debug, PartialEq, Eq)]
enum Peer {
    Open,
    Closed,
}

fn peek(stream: &mut TcpStream, seen: &mut Vec<u8>) -> Peer {
    let mut buf = [0u8; 1024];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return Peer::Closed,
            Ok(n) => seen.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Peer::Open,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return Peer::Closed,
        }
    }
}

/// Reads one HTTP/1.1 response (head and a `content-length` body) from a blocking stream.
fn read_response(stream: &mut TcpStream) -> (String, String) {
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("read timeout");
    let mut data = Vec::new();
    let mut buf = [0u8; 4096];
    let head_end = loop {
        if let Some(at) = data.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        let n = stream.read(&mut buf).expect("read response head");
        assert!(n > 0, "connection closed before a response head");
        data.extend_from_slice(&buf[..n]);
    };
    let head = String::from_utf8_lossy(&data[..head_end]).to_ascii_lowercase();
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    while data.len() < head_end + length {
        let n = stream.read(&mut buf).expect("read response body");
        assert!(n > 0, "connection closed inside the body");
        data.extend_from_slice(&buf[..n]);
    }
    let body = String::from_utf8_lossy(&data[head_end..head_end + length]).into_owned();
    (head, body)
}

/// Whether the peer closes `stream` within `within` (reads until EOF or an error).
fn closed_within(stream: &mut TcpStream, within: Duration) -> bool {
    stream.set_read_timeout(Some(within)).expect("read timeout");
    let mut buf = [0u8; 256];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return false;
            }
            Err(_) => return true,
        }
    }
}

/// `GET /_ping` on the unix socket must answer 200 within this long, flood or not (the
/// finding saw 10-15 s timeouts; a healthy answer takes milliseconds).
const PING_BOUND: Duration = Duration::from_secs(5);

async fn ping_unix(daemon: &Daemon, what: &str) {
    let reply = tokio::time::timeout(PING_BOUND, daemon.client().get("/_ping"))
        .await
        .unwrap_or_else(|_| panic!("{what}: /_ping on the unix socket took over {PING_BOUND:?}"))
        .expect("unix ping");
    assert_status(&reply, StatusCode::OK, what);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tcp_flood_is_capped_and_the_unix_socket_keeps_answering() {
    const FLOOD: usize = 3000;
    const UNAUTHENTICATED: usize = 32;
    // The daemon gets 2048 descriptors: 3000 idle connections would exhaust them without caps.
    ensure_open_files(FLOOD as u64 + 1024);
    let (daemon, addr, token) = tcp_daemon_with_nofile(
        &format!(
            "header_read_timeout_ms = 60000\nmax_unix_connections = 512\n\
             max_tcp_connections = 256\nmax_unauthenticated_connections = {UNAUTHENTICATED}\n"
        ),
        2048,
    );
    let pid = daemon.pid().expect("pid");
    ping_unix(&daemon, "before the flood").await;
    let baseline = fds_of(pid);

    // Token-less keep-alive connections that never send a byte, as the finding's tenant did.
    let target: std::net::SocketAddr = addr.parse().expect("addr");
    let flood = tokio::task::spawn_blocking(move || {
        let mut streams = Vec::with_capacity(FLOOD);
        for _ in 0..FLOOD {
            match TcpStream::connect_timeout(&target, Duration::from_secs(5)) {
                Ok(stream) => streams.push(stream),
                Err(e) => panic!("flood connect {}: {e}", streams.len()),
            }
        }
        streams
    })
    .await
    .expect("flood thread");
    assert_eq!(flood.len(), FLOOD);

    // The unix socket answers root while the flood holds, and a lease can still be made.
    for round in 0..3 {
        ping_unix(&daemon, &format!("during the flood, round {round}")).await;
    }
    let put = tokio::time::timeout(PING_BOUND, daemon.client().put("/v1/leases/flooded", None))
        .await
        .expect("PUT within the bound during the flood")
        .expect("PUT");
    assert_status(&put, StatusCode::CREATED, "PUT during the flood");

    // All but the unauthenticated budget are closed by the daemon, long before the header
    // read timeout (60 s here) would have cut them.
    let mut flood = flood;
    for stream in &flood {
        stream.set_nonblocking(true).expect("nonblocking");
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut answers = Vec::new();
    let (closed, open) = loop {
        let mut closed = 0;
        for stream in &mut flood {
            if peek(stream, &mut answers) == Peer::Closed {
                closed += 1;
            }
        }
        let open = FLOOD - closed;
        if open <= UNAUTHENTICATED || Instant::now() > deadline {
            break (closed, open);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        open <= UNAUTHENTICATED,
        "the daemon closed {closed} of {FLOOD} token-less connections; {open} are still open, \
         more than max_unauthenticated_connections ({UNAUTHENTICATED})"
    );
    let text = String::from_utf8_lossy(&answers);
    assert!(
        text.contains("503 Service Unavailable")
            && text.contains("max_unauthenticated_connections"),
        "the excess was told why before the close: {}",
        &text[..text.len().min(400)]
    );
    let held = fds_of(pid);
    assert!(
        held <= baseline + UNAUTHENTICATED + 64,
        "the daemon holds {held} descriptors during the flood (baseline {baseline}, at most \
         {UNAUTHENTICATED} flood connections)"
    );
    ping_unix(&daemon, "after the excess was closed").await;
    assert!(
        daemon.log_text().contains("connection refused"),
        "the refusals are logged: {}",
        daemon.log_text()
    );

    // A refused caller's connection is closed after the 401, not kept alive.
    drop(flood);
    let mut refused = TcpStream::connect(&addr).expect("connect");
    refused
        .write_all(b"GET /_ping HTTP/1.1\r\nhost: localhost\r\n\r\n")
        .expect("send");
    let (head, body) = read_response(&mut refused);
    assert!(head.starts_with("http/1.1 401"), "{head}");
    assert!(head.contains("connection: close"), "{head}");
    assert!(body.contains("unauthorized"), "{body}");
    assert!(
        closed_within(&mut refused, Duration::from_secs(5)),
        "the daemon closes a refused caller's connection"
    );

    // With the flood gone, TCP serves again.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let reply = tcp_request(
            &addr,
            Method::GET,
            "/_ping",
            &[
                ("host", "localhost"),
                ("authorization", &format!("Bearer {token}")),
            ],
            None,
        )
        .await;
        match reply {
            Ok(reply) if reply.status == StatusCode::OK => break,
            other if Instant::now() > deadline => {
                panic!("TCP does not serve again after the flood: {other:?}")
            }
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tcp_budgets_count_open_and_unauthenticated_connections_apart() {
    let (daemon, addr, token) = tcp_daemon_with_nofile(
        "header_read_timeout_ms = 60000\nmax_tcp_connections = 4\n\
         max_unauthenticated_connections = 2\n",
        4096,
    );
    // Whether the daemon turns a new connection away at once (it answers before any request).
    let turned_away = |stream: &mut TcpStream| {
        stream
            .set_read_timeout(Some(Duration::from_millis(300)))
            .expect("read timeout");
        let mut first = [0u8; 1];
        match stream.peek(&mut first) {
            Ok(_) => true,
            Err(e) => !matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
        }
    };
    // Two idle connections fill the unauthenticated budget: the third is told and closed.
    let idle: Vec<TcpStream> = (0..2)
        .map(|_| TcpStream::connect(&addr).expect("connect"))
        .collect();
    let mut third = TcpStream::connect(&addr).expect("connect");
    let (head, body) = read_response(&mut third);
    assert!(head.starts_with("http/1.1 503"), "{head}");
    assert!(body.contains("max_unauthenticated_connections"), "{body}");
    assert!(closed_within(&mut third, Duration::from_secs(5)));
    drop(idle);

    // Connections that authenticated leave that budget but still count as open: four kept
    // alive fill max_tcp_connections, and the fifth is refused as full.
    let request =
        format!("GET /_ping HTTP/1.1\r\nhost: localhost\r\nauthorization: Bearer {token}\r\n\r\n");
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut kept = Vec::new();
    while kept.len() < 4 {
        let mut stream = TcpStream::connect(&addr).expect("connect");
        if turned_away(&mut stream) {
            // The idle ones' places come back once the daemon has seen them close.
            assert!(Instant::now() < deadline, "places never came back");
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        }
        stream.write_all(request.as_bytes()).expect("send");
        let (head, _) = read_response(&mut stream);
        assert!(head.starts_with("http/1.1 200"), "{head}");
        kept.push(stream);
    }
    let mut fifth = TcpStream::connect(&addr).expect("connect");
    let (head, body) = read_response(&mut fifth);
    assert!(head.starts_with("http/1.1 503"), "{head}");
    assert!(body.contains("max_tcp_connections"), "{body}");
    // The kept connections still serve, and so does the unix socket.
    for stream in &mut kept {
        stream.write_all(request.as_bytes()).expect("send again");
        let (head, _) = read_response(stream);
        assert!(head.starts_with("http/1.1 200"), "kept alive: {head}");
    }
    ping_unix(&daemon, "with the TCP budget full").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn connection_caps_that_cannot_fit_the_open_file_limit_are_refused() {
    let mut daemon = Daemon::prepared("max_unix_connections = 2000\n").expect("prepare");
    daemon
        .spawn_via(&["prlimit", "--nofile=2048:2048"], &[])
        .expect("start under prlimit");
    let code = daemon
        .wait_exit(Duration::from_secs(30))
        .expect("exits by itself");
    assert_eq!(code, Some(1), "refused: {}", daemon.log_text());
    let log = daemon.log_text();
    for part in [
        "max_unix_connections (2000)",
        "RLIMIT_NOFILE 2048",
        "LimitNOFILE",
    ] {
        assert!(log.contains(part), "{part}: {log}");
    }
    // Unset caps are lowered to fit instead, and say so.
    let mut fitted = Daemon::prepared("").expect("prepare");
    fitted
        .spawn_via(&["prlimit", "--nofile=1024:1024"], &[])
        .expect("start under prlimit");
    fitted.wait_ready().expect("starts with lowered caps");
    assert!(
        fitted
            .log_text()
            .contains("max_unix_connections lowered from its default 4096 to 512"),
        "{}",
        fitted.log_text()
    );
}

// ---- Finding 6: the database must be subidd's ----

/// A stopped daemon with a database holding lease `kept`; returns it and the database path.
async fn stopped_with_a_lease() -> (Daemon, PathBuf) {
    let mut daemon = Daemon::start("").expect("start");
    let reply = daemon
        .client()
        .put("/v1/leases/kept", None)
        .await
        .expect("PUT");
    assert_status(&reply, StatusCode::CREATED, "PUT kept");
    assert_eq!(daemon.stop().expect("stop"), Some(0));
    let database = daemon.database();
    // Everything into the main file, which the tests below copy and replace alone.
    sqlite(&database, "PRAGMA wal_checkpoint(TRUNCATE);").await;
    (daemon, database)
}

/// Every file of `dir` with its bytes.
fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut files: Vec<(PathBuf, Vec<u8>)> = std::fs::read_dir(dir)
        .expect("read dir")
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .map(|e| (e.path(), std::fs::read(e.path()).expect("read")))
        .collect();
    files.sort();
    files
}

/// Starts `daemon` again expecting a refusal; returns its log.
fn refused_start(daemon: &mut Daemon) -> String {
    daemon.spawn_via(&[], &[]).expect("spawn");
    let code = daemon.wait_exit(Duration::from_secs(30)).expect("exits");
    assert_eq!(code, Some(1), "refused: {}", daemon.log_text());
    daemon.log_text()
}

async fn sqlite(path: &Path, sql: &str) {
    let mut conn = SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(true)
        .connect()
        .await
        .expect("open with sqlite");
    sqlx::raw_sql(sql).execute(&mut conn).await.expect("sql");
    conn.close().await.expect("close");
}

fn remove_side_files(database: &Path) {
    for suffix in ["-wal", "-shm"] {
        let mut side = database.as_os_str().to_owned();
        side.push(suffix);
        let _ = std::fs::remove_file(PathBuf::from(side));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_empty_database_file_is_refused_not_initialised() {
    let (mut daemon, database) = stopped_with_a_lease().await;
    remove_side_files(&database);
    std::fs::write(&database, b"").expect("truncate to 0 bytes");
    let state = database.parent().expect("state dir").to_path_buf();
    let before = snapshot(&state);
    let log = refused_start(&mut daemon);
    assert!(
        log.contains(&database.display().to_string()) && log.contains("empty (0 bytes)"),
        "the refusal names the file and says it is empty: {log}"
    );
    assert!(log.contains("restore it from a backup"), "{log}");
    assert_eq!(snapshot(&state), before, "nothing in the state dir changed");
    assert_eq!(std::fs::metadata(&database).expect("stat").len(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_foreign_sqlite_database_is_refused_not_migrated_into() {
    let (mut daemon, database) = stopped_with_a_lease().await;
    let state = database.parent().expect("state dir").to_path_buf();
    let ours = std::fs::read(&database).expect("read");
    for (sql, says) in [
        (
            "CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT); \
             INSERT INTO notes (body) VALUES ('someone else''s');",
            "no subidd schema (tables: notes",
        ),
        (
            "PRAGMA application_id = 1179603524; CREATE TABLE lease (x);",
            "application id is 0x464f5244",
        ),
    ] {
        remove_side_files(&database);
        std::fs::remove_file(&database).expect("remove");
        sqlite(&database, sql).await;
        remove_side_files(&database);
        let before = snapshot(&state);
        let log = refused_start(&mut daemon);
        assert!(
            log.contains(&database.display().to_string())
                && log.contains("is not subidd's")
                && log.contains(says),
            "the refusal names the file and says whose it is not ({says}): {log}"
        );
        assert_eq!(
            snapshot(&state),
            before,
            "the foreign database is untouched, no -wal or -shm made beside it"
        );
    }
    // subidd's own database, put back, starts again with its lease.
    std::fs::write(&database, ours).expect("restore");
    daemon.spawn().expect("starts on its own database");
    let kept = daemon.client().get("/v1/leases/kept").await.expect("GET");
    assert_status(&kept, StatusCode::OK, "kept");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_database_from_before_the_application_id_is_accepted_and_stamped() {
    let (mut daemon, database) = stopped_with_a_lease().await;
    sqlite(&database, "PRAGMA application_id = 0;").await;
    daemon.spawn().expect("an older subidd's database starts");
    let kept = daemon.client().get("/v1/leases/kept").await.expect("GET");
    assert_status(&kept, StatusCode::OK, "kept survives");
    daemon.stop().expect("stop");
    let header = std::fs::read(&database).expect("read");
    assert_eq!(
        &header[68..72],
        b"subd",
        "stamped with subidd's application id"
    );
}

// ---- Finding 9: trusted directories and the token file ----

/// A directory `name` in a fresh root-owned temp dir, with `mode` and `owner`.
fn dir_with(base: &Path, name: &str, mode: u32, owner: u32) -> PathBuf {
    let dir = base.join(name);
    std::fs::create_dir_all(&dir).expect("mkdir");
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(mode)).expect("chmod");
    chown(&dir, Some(owner), None).expect("chown");
    dir
}

fn start_refusal(args: &[&str], config: &str) -> String {
    match Daemon::start_with(config, args, &[]) {
        Ok(_) => panic!("subidd started with {args:?} although it should have refused"),
        Err(e) => format!("{e:#}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(not(subidd_root), ignore = "needs root (chown)")]
async fn an_untrusted_runtime_dir_is_refused_by_name_with_the_fix() {
    let base = tempfile::tempdir().expect("tempdir");
    let foreign = dir_with(base.path(), "owned-by-4242", 0o755, 4242);
    let arg = foreign.display().to_string();
    let message = start_refusal(&["--runtime-dir", &arg], "");
    assert!(
        message.contains(&format!("runtime_dir {arg} is owned by uid 4242"))
            && message.contains(&format!("chown root:root {arg}; chmod 0755 {arg}")),
        "{message}"
    );
    assert!(
        std::fs::read_dir(&foreign).expect("read").next().is_none(),
        "nothing was made inside it"
    );

    let writable = dir_with(base.path(), "group-writable", 0o775, 0);
    let arg = writable.display().to_string();
    let message = start_refusal(&["--runtime-dir", &arg], "");
    assert!(
        message.contains(&format!("runtime_dir {arg} is writable by its group"))
            && message.contains(&format!("chmod go-w {arg}")),
        "{message}"
    );
    assert_eq!(
        std::fs::metadata(&writable)
            .expect("stat")
            .permissions()
            .mode()
            & 0o7777,
        0o775,
        "refused, not silently chmod'ed"
    );

    // A parent that another user owns could swap the directory for its own.
    let parent = dir_with(base.path(), "home-of-4242", 0o755, 4242);
    let inner = dir_with(&parent, "run", 0o755, 0);
    let arg = inner.display().to_string();
    let message = start_refusal(&["--runtime-dir", &arg], "");
    assert!(
        message.contains(&format!(
            "runtime_dir {arg} sits in {}, which is owned by uid 4242",
            parent.display()
        )) && message.contains(&format!("chown root:root {}", parent.display())),
        "{message}"
    );
    // (A root-owned 0755 directory below a sticky /tmp is what every other test daemon uses.)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(not(subidd_root), ignore = "needs root (chown)")]
async fn a_token_file_others_can_read_is_refused() {
    let port = free_tcp_port().expect("free port");
    let keep = tempfile::tempdir().expect("tempdir");
    let token = keep.path().join("token");
    std::fs::write(&token, "edges-token-0123456789\n").expect("write");
    for (mode, owner, says) in [
        (0o644, 0, "open to group or others (mode 0644)"),
        (0o640, 0, "open to group or others (mode 0640)"),
        (0o600, 4242, "owned by uid 4242, not root"),
    ] {
        std::fs::set_permissions(&token, std::fs::Permissions::from_mode(mode)).expect("chmod");
        chown(&token, Some(owner), None).expect("chown");
        let message = Daemon::start_failure(&format!(
            "listen_tcp = \"127.0.0.1:{port}\"\ntoken_file = {token:?}\n"
        ))
        .expect("refused");
        let path = token.display().to_string();
        assert!(
            message.contains(&format!("token_file {path} is {says}"))
                && message.contains(&format!("chown root:root {path}; chmod 0600 {path}")),
            "{mode:o} {owner}: {message}"
        );
    }
}

// ---- Finding 10: one pool, one daemon per host ----

/// A pool of `blocks` blocks starting `offset` blocks above the default base.
fn pool_at(offset: u32, blocks: u32) -> String {
    format!(
        "[pool]\nbase = {}\nsize = {}\nblock = {BLOCK}\n",
        BASE + offset * BLOCK,
        blocks * BLOCK
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn daemons_sharing_a_registry_never_serve_overlapping_pools() {
    let registry = tempfile::tempdir().expect("tempdir");
    let shared = registry.path().join("pools").display().to_string();
    // The environment beats the private registry of each test daemon's config file.
    let env = [("SUBIDD_POOL_REGISTRY_DIR", shared.as_str())];
    let mut first = Daemon::start_with(&pool_at(0, 4), &[], &env).expect("first daemon");
    let first_pid = first.pid().expect("pid");

    let refusal = match Daemon::start_with(&pool_at(2, 4), &[], &env) {
        Ok(_) => panic!("an overlapping daemon started"),
        Err(e) => format!("{e:#}"),
    };
    let first_state = first.path("state").display().to_string();
    for part in [
        format!("pid {first_pid}"),
        first_state.clone(),
        first.socket.display().to_string(),
        "another subidd".to_string(),
        format!("{}-{}", BASE + 2 * BLOCK, BASE + 6 * BLOCK - 1),
    ] {
        assert!(refusal.contains(&part), "{part}: {refusal}");
    }

    // A disjoint pool starts beside it, and both serve.
    let mut disjoint = Daemon::start_with(&pool_at(8, 4), &[], &env).expect("disjoint daemon");
    for daemon in [&first, &disjoint] {
        let reply = daemon
            .client()
            .put("/v1/leases/x", None)
            .await
            .expect("PUT");
        assert_status(&reply, StatusCode::CREATED, "PUT on each daemon");
    }

    // Once the first stops, the overlapping one may start.
    assert_eq!(first.stop().expect("stop"), Some(0));
    let mut second = Daemon::start_with(&pool_at(2, 4), &[], &env).expect("starts now");

    // A daemon killed outright leaves its file behind, but not its lock: not in the way.
    disjoint.kill();
    let mut after_kill = Daemon::start_with(&pool_at(8, 4), &[], &env).expect("after a SIGKILL");
    let files: Vec<String> = std::fs::read_dir(registry.path().join("pools"))
        .expect("read registry")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".pool"))
        .collect();
    assert_eq!(files.len(), 2, "one file per running daemon: {files:?}");
    second.stop().expect("stop");
    after_kill.stop().expect("stop");
    let left = std::fs::read_dir(registry.path().join("pools"))
        .expect("read registry")
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".pool"))
        .count();
    assert_eq!(left, 0, "stopped daemons remove their registrations");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn test_daemons_use_a_private_registry() {
    // Two daemons with the default pool at once: what every test does, in parallel.
    let one = Daemon::start(&pool_config(4, 60)).expect("one");
    let two = Daemon::start(&pool_config(4, 60)).expect("two");
    for daemon in [&one, &two] {
        let files = std::fs::read_dir(daemon.path("pools"))
            .expect("each has its own registry")
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".pool"))
            .count();
        assert_eq!(files, 1);
    }
}
