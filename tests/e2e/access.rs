//! Who may call: socket mode and group, SO_PEERCRED against allowed uids/gids, the bearer token
//! and loopback `Host` on TCP, and refusal of a non-loopback listener.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use hyper::{Method, StatusCode};
use subidd_tests::{Daemon, Reply, free_tcp_port, tcp_request};

use crate::util::{assert_error, assert_headers, assert_status, events};

/// What curl, run as `uid:gid` with no supplementary groups, got from the socket: `(http
/// status, body)`; status "000" when it could not connect.
pub(crate) async fn curl_as(
    uid: u32,
    gid: u32,
    socket: &Path,
    method: &str,
    path: &str,
) -> (String, String) {
    let output = tokio::process::Command::new("curl")
        .args(["-s", "-o", "-", "-w", "\n%{http_code}", "-X", method])
        .arg("--unix-socket")
        .arg(socket)
        .arg(format!("http://localhost{path}"))
        .uid(uid)
        .gid(gid)
        .output()
        .await
        .expect("run curl");
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    let (body, status) = text.rsplit_once('\n').unwrap_or(("", &text));
    (status.to_string(), body.to_string())
}

/// Lets other uids reach the socket through the daemon's temp dir (0700 by default).
pub(crate) fn open_dirs(daemon: &Daemon) {
    for dir in [daemon.dir.path().to_path_buf(), daemon.path("run")] {
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))
            .unwrap_or_else(|e| panic!("chmod 0755 {}: {e}", dir.display()));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(not(subidd_root), ignore = "needs root")]
async fn socket_is_mode_0660_with_the_configured_group() {
    let daemon = Daemon::start("socket_group = \"4242\"\n").expect("start daemon");
    let meta = std::fs::metadata(&daemon.socket).expect("stat socket");
    assert_eq!(meta.mode() & 0o7777, 0o660, "socket mode");
    assert_eq!(
        (meta.uid(), meta.gid()),
        (0, 4242),
        "socket owner root:4242"
    );

    let fallback = Daemon::start("socket_group = \"no-such-group-subidd-e2e\"\n")
        .expect("start daemon with a missing group");
    let meta = std::fs::metadata(&fallback.socket).expect("stat socket");
    assert_eq!(meta.mode() & 0o7777, 0o660, "socket mode");
    assert_eq!(
        (meta.uid(), meta.gid()),
        (0, 0),
        "missing group falls back to root"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(not(subidd_root), ignore = "needs root")]
async fn peer_not_allowed_is_forbidden() {
    let daemon = Daemon::start("socket_group = \"4242\"\n").expect("start daemon");
    open_dirs(&daemon);
    let (status, body) = curl_as(4242, 4242, &daemon.socket, "GET", "/_ping").await;
    assert_eq!(status, "403", "uid 4242 not in allowed_uids: {body}");
    let body: serde_json::Value = serde_json::from_str(&body).expect("403 body is JSON");
    assert_eq!(body["code"], "forbidden", "error code: {body}");
    let (status, body) = curl_as(4242, 4242, &daemon.socket, "PUT", "/v1/leases/sneak").await;
    assert_eq!(status, "403", "PUT by a refused peer: {body}");
    let (status, body) = curl_as(4242, 4242, &daemon.socket, "GET", "/no/such/path").await;
    assert_eq!(
        status, "403",
        "a refused peer learns nothing about paths: {body}"
    );
    // Outside the socket's group the file mode refuses the connection itself.
    let (status, _) = curl_as(4243, 4243, &daemon.socket, "GET", "/_ping").await;
    assert_eq!(status, "000", "uid 4243 outside group 4242 cannot connect");
    // Root is always served, and nothing was created by the refused peer.
    let client = daemon.client();
    let reply = client.get("/v1/leases/sneak").await.expect("GET");
    assert_error(
        &reply,
        StatusCode::NOT_FOUND,
        "not_found",
        "refused PUT created nothing",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(not(subidd_root), ignore = "needs root")]
async fn allowed_uid_and_allowed_gid_are_served() {
    let daemon =
        Daemon::start("socket_group = \"4242\"\nallowed_uids = [4242]\nallowed_gids = [4242]\n")
            .expect("start daemon");
    open_dirs(&daemon);
    let (status, body) = curl_as(4242, 4242, &daemon.socket, "GET", "/_ping").await;
    assert_eq!(
        (status.as_str(), body.as_str()),
        ("200", "OK"),
        "allowed uid 4242"
    );
    let (status, body) = curl_as(4242, 4242, &daemon.socket, "PUT", "/v1/leases/by-4242").await;
    assert_eq!(status, "201", "PUT by allowed uid: {body}");
    // A uid not listed whose primary gid is listed.
    let (status, body) = curl_as(4244, 4242, &daemon.socket, "PUT", "/v1/leases/by-4244").await;
    assert_eq!(
        status, "201",
        "PUT by uid 4244 with allowed gid 4242: {body}"
    );
    // A uid whose primary gid is not listed but a supplementary group is (SO_PEERGROUPS).
    let output = tokio::process::Command::new("setpriv")
        .args(["--reuid=4245", "--regid=4245", "--groups=4300,4242", "--"])
        .args(["curl", "-s", "-o", "-", "-w", "\n%{http_code}", "-X", "PUT"])
        .arg("--unix-socket")
        .arg(&daemon.socket)
        .arg("http://localhost/v1/leases/by-4245")
        .output()
        .await
        .expect("run setpriv curl");
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        text.ends_with("\n201"),
        "PUT by uid 4245 with supplementary group 4242: {text} {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let (status, body) = curl_as(4246, 4300, &daemon.socket, "GET", "/_ping").await;
    assert_eq!(
        status, "000",
        "uid 4246 outside the socket group cannot connect: {body}"
    );
    let client = daemon.client();
    let history = events(&client, "by-4242").await;
    assert_eq!(history[0].0, "create");
    assert_eq!(history[0].1, 4242, "history records the peer's uid");
    assert_eq!(events(&client, "by-4244").await[0].1, 4244, "peer uid 4244");
}

/// Starts a daemon serving loopback TCP with a token; returns it and `host:port`.
pub(crate) fn tcp_daemon(token: &str) -> (Daemon, String) {
    let port = free_tcp_port().expect("free port");
    let addr = format!("127.0.0.1:{port}");
    let dir = tempfile::tempdir().expect("tempdir");
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, format!("{token}\n")).expect("write token");
    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o600))
        .expect("chmod token");
    let daemon = Daemon::start(&format!(
        "listen_tcp = {addr:?}\ntoken_file = {token_file:?}\n"
    ))
    .expect("start daemon with TCP");
    // The token file is read at start; the daemon's own temp dir outlives this one.
    drop(dir);
    (daemon, addr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tcp_requires_the_bearer_token_and_a_loopback_host() {
    let token = "e2e-token-0123456789abcdef";
    let (daemon, addr) = tcp_daemon(token);
    // An answer on the unix socket means start-up, including the TCP bind, is done.
    let ping = daemon.client().get("/_ping").await.expect("unix ping");
    assert_status(&ping, StatusCode::OK, "unix ping");

    let bearer = format!("Bearer {token}");
    let send = |headers: Vec<(&'static str, String)>, method: Method, path: &'static str| {
        let addr = addr.clone();
        async move {
            let headers: Vec<(&str, &str)> =
                headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
            tcp_request(&addr, method, path, &headers, None)
                .await
                .expect("TCP request")
        }
    };
    let host = ("host", "localhost".to_string());

    let none: Reply = send(vec![host.clone()], Method::GET, "/_ping").await;
    assert_error(
        &none,
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        "TCP without token",
    );
    assert_eq!(
        none.headers
            .get("www-authenticate")
            .and_then(|v| v.to_str().ok()),
        Some("Bearer"),
        "401 names the scheme"
    );
    for wrong in ["Bearer nope", "Bearer ", "Basic Zm9vOmJhcg==", token] {
        let reply = send(
            vec![host.clone(), ("authorization", wrong.to_string())],
            Method::GET,
            "/_ping",
        )
        .await;
        assert_error(
            &reply,
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            &format!("TCP with authorization {wrong:?}"),
        );
    }
    let wrong_prefix = format!("Bearer {}", &token[..token.len() - 1]);
    let reply = send(
        vec![host.clone(), ("authorization", wrong_prefix)],
        Method::GET,
        "/_ping",
    )
    .await;
    assert_error(
        &reply,
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        "token prefix",
    );

    let ok = send(
        vec![host.clone(), ("authorization", bearer.clone())],
        Method::GET,
        "/_ping",
    )
    .await;
    assert_status(&ok, StatusCode::OK, "TCP with the right token");
    assert_eq!(ok.text(), "OK");
    assert_headers(&ok, "TCP ping");
    let with_port = send(
        vec![("host", addr.clone()), ("authorization", bearer.clone())],
        Method::GET,
        "/v1/pool",
    )
    .await;
    assert_status(&with_port, StatusCode::OK, "Host 127.0.0.1:port");

    for evil in ["evil.example", "evil.example:80", "localhost.evil.example"] {
        let reply = send(
            vec![
                ("host", evil.to_string()),
                ("authorization", bearer.clone()),
            ],
            Method::GET,
            "/_ping",
        )
        .await;
        assert_error(
            &reply,
            StatusCode::FORBIDDEN,
            "forbidden",
            &format!("right token, Host {evil}"),
        );
    }

    let created = send(
        vec![host.clone(), ("authorization", bearer.clone())],
        Method::PUT,
        "/v1/leases/over-tcp",
    )
    .await;
    assert_status(&created, StatusCode::CREATED, "PUT over TCP");
    let history = events(&daemon.client(), "over-tcp").await;
    assert_eq!(
        history,
        [("create".to_string(), serde_json::Value::Null)],
        "a TCP caller has no uid"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn non_loopback_tcp_is_refused_at_start() {
    let port = free_tcp_port().expect("free port");
    for addr in [format!("0.0.0.0:{port}"), format!("[::]:{port}")] {
        let message = Daemon::start_failure(&format!(
            "listen_tcp = {addr:?}\ntoken_file = \"/nonexistent/token\"\n"
        ))
        .expect("daemon refuses");
        assert!(
            message.contains("loopback") && message.contains(&port.to_string()),
            "refusal of {addr} names loopback and the address: {message}"
        );
    }
    let message = Daemon::start_failure(&format!("listen_tcp = \"127.0.0.1:{port}\"\n"))
        .expect("daemon refuses TCP without a token");
    assert!(
        message.contains("token_file"),
        "TCP without a token is refused naming token_file: {message}"
    );
}
