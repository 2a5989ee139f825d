//! Test and benchmark support: start the real `subidd` binary on temp paths and talk to it
//! over its unix socket as a client would.

pub mod docker;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::client::conn::http1;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;

pub mod pg;

/// The `subidd` binary under test: `$SUBIDD_BIN`, else the one cargo built beside this test
/// (`target/<profile>/subidd`; build it with `cargo build --workspace --bins`).
pub fn subidd_bin() -> anyhow::Result<PathBuf> {
    if let Some(bin) = std::env::var_os("SUBIDD_BIN") {
        return Ok(PathBuf::from(bin));
    }
    let exe = std::env::current_exe().context("current_exe")?;
    // target/<profile>/deps/<test> -> target/<profile>/subidd
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .context("test binary has no target/<profile> parent")?;
    let bin = profile_dir.join("subidd");
    if !bin.exists() {
        bail!(
            "{} not found: run `cargo build --workspace --bins` first (the README's test command does)",
            bin.display()
        );
    }
    Ok(bin)
}

/// The cgroup path below which every test daemon makes its lease cgroups (one directory per
/// daemon), so a test's drop can kill and remove exactly what its daemon made.
pub const TEST_CGROUP_ROOT: &str = "/subidd-tests";

/// A running daemon with its own temp state, runtime dir and socket. Killed on drop, and then
/// everything it made outside its temp dir goes too: its namespace pins are unmounted and its
/// lease cgroups (with every process in them) killed and removed.
pub struct Daemon {
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub config: PathBuf,
    /// The runtime dir (socket, namespace pins).
    pub run: PathBuf,
    /// The cgroup path of this daemon's lease cgroups' parent (below [`TEST_CGROUP_ROOT`]),
    /// unless the test's config chose its own.
    pub cgroup_parent: Option<String>,
    child: Option<Child>,
    log: PathBuf,
    extra_args: Vec<String>,
    env: Vec<(String, String)>,
}

impl Daemon {
    /// Starts a daemon whose config file holds `config_toml` (paths are filled in).
    pub fn start(config_toml: &str) -> anyhow::Result<Daemon> {
        Daemon::start_with(config_toml, &[], &[])
    }

    /// As [`Daemon::start`], with extra flags and environment.
    pub fn start_with(
        config_toml: &str,
        extra_args: &[&str],
        env: &[(&str, &str)],
    ) -> anyhow::Result<Daemon> {
        Daemon::launch(config_toml, extra_args, env, "", "")
    }

    /// As [`Daemon::start`], with the daemon's subuid and subgid files holding `subuid_text`
    /// and `subgid_text` (in place of empty ones) from the first start.
    pub fn start_with_subid(
        config_toml: &str,
        subuid_text: &str,
        subgid_text: &str,
    ) -> anyhow::Result<Daemon> {
        Daemon::launch(config_toml, &[], &[], subuid_text, subgid_text)
    }

    /// As [`Daemon::start`], with the runtime dir (socket and namespace pins) in `run_dir`
    /// instead of the temp dir: the benchmarks put it on a tmpfs, as `/run` is on a systemd
    /// host.
    pub fn start_with_run_dir(config_toml: &str, run_dir: &Path) -> anyhow::Result<Daemon> {
        Daemon::launch_in(config_toml, &[], &[], "", "", Some(run_dir))
    }

    fn launch(
        config_toml: &str,
        extra_args: &[&str],
        env: &[(&str, &str)],
        subuid_text: &str,
        subgid_text: &str,
    ) -> anyhow::Result<Daemon> {
        Daemon::launch_in(config_toml, extra_args, env, subuid_text, subgid_text, None)
    }

    /// Writes the config (paths in the temp dir filled in) and the subid files, then starts.
    fn launch_in(
        config_toml: &str,
        extra_args: &[&str],
        env: &[(&str, &str)],
        subuid_text: &str,
        subgid_text: &str,
        run_dir: Option<&Path>,
    ) -> anyhow::Result<Daemon> {
        let dir = tempfile::tempdir().context("tempdir")?;
        let config = dir.path().join("subidd.toml");
        let run = run_dir.map_or_else(|| dir.path().join("run"), Path::to_path_buf);
        let socket = run.join("subidd.sock");
        // Subid files of the test's own keep the host's from deciding the test's pool.
        let subuid = dir.path().join("subuid");
        let subgid = dir.path().join("subgid");
        std::fs::write(&subuid, subuid_text).context("write subuid file")?;
        std::fs::write(&subgid, subgid_text).context("write subgid file")?;
        // Each daemon's lease cgroups under a parent of its own, named after its temp dir.
        let cgroup_parent = (!config_toml.contains("cgroup_parent")).then(|| {
            let tag = dir.path().file_name().map_or_else(
                || std::process::id().to_string(),
                |n| n.to_string_lossy().trim_start_matches('.').to_string(),
            );
            format!("{TEST_CGROUP_ROOT}/{tag}")
        });
        let parent_line = cgroup_parent
            .as_ref()
            .map(|p| format!("cgroup_parent = {p:?}\n"))
            .unwrap_or_default();
        // A pool registry of the test's own: tests run many daemons with the same pool at once.
        let text = format!(
            "state_dir = {state:?}\nruntime_dir = {run:?}\nsubuid_file = {subuid:?}\nsubgid_file = {subgid:?}\npool_registry_dir = {pools:?}\n{parent_line}{config_toml}\n",
            state = dir.path().join("state"),
            pools = dir.path().join("pools"),
        );
        std::fs::write(&config, text).context("write config")?;
        let mut daemon = Daemon {
            log: dir.path().join("subidd.log"),
            dir,
            socket,
            config,
            run,
            cgroup_parent,
            child: None,
            extra_args: extra_args.iter().map(|s| s.to_string()).collect(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        daemon.spawn()?;
        Ok(daemon)
    }

    /// Sets (or, with `None`, removes) an environment variable for the next [`Daemon::spawn`].
    pub fn set_env(&mut self, name: &str, value: Option<&str>) {
        self.env.retain(|(k, _)| k != name);
        if let Some(value) = value {
            self.env.push((name.to_string(), value.to_string()));
        }
    }

    /// Path of a file in the daemon's temp dir.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Starts the binary and waits until `/_ping` answers (or it exits).
    pub fn spawn(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .context("open log")?;
        let mut cmd = Command::new(subidd_bin()?);
        cmd.arg("--config")
            .arg(&self.config)
            .args(&self.extra_args)
            .env_remove("SUBIDD_CONFIG")
            .env("SUBIDD_LOG", "info")
            .env(TEST_FOREIGN_CGROUPS_ENV, TEST_CGROUP_ROOT)
            .stdin(Stdio::null())
            .stdout(log.try_clone().context("dup log")?)
            .stderr(log);
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().context("spawn subidd")?;
        self.child = Some(child);
        self.wait_ready()
    }

    /// Waits until the socket accepts connections (or the process exits): after
    /// [`Daemon::spawn_via`], for a daemon started under a wrapper.
    pub fn wait_ready(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait().context("try_wait")?
            {
                bail!("subidd exited early with {status}: {}", self.log_text());
            }
            if std::os::unix::net::UnixStream::connect(&self.socket).is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("subidd did not start in 30s: {}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Runs the binary with this config expecting it to fail at start; returns its output.
    pub fn start_failure(config_toml: &str) -> anyhow::Result<String> {
        match Daemon::start(config_toml) {
            Ok(_) => bail!("subidd started although it should have refused"),
            Err(e) => Ok(format!("{e:#}")),
        }
    }

    /// What the daemon logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The daemon's pid, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGTERM, then waits for a clean exit; returns the exit status code.
    pub fn stop(&mut self) -> anyhow::Result<Option<i32>> {
        let Some(mut child) = self.child.take() else {
            return Ok(None);
        };
        let pid = i32::try_from(child.id()).context("pid")?;
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGTERM,
        )
        .context("kill -TERM")?;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = child.try_wait().context("try_wait")? {
                return Ok(status.code());
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                bail!("subidd did not stop within 20s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops (SIGTERM) and starts again on the same state.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.stop()?;
        self.spawn()
    }

    /// A client for this daemon's socket.
    pub fn client(&self) -> Client {
        Client::new(&self.socket)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
        self.clean_up();
    }
}

/// The daemon's variable that keeps other test daemons' lease processes from counting as id
/// holders (see `subidd::holds`).
const TEST_FOREIGN_CGROUPS_ENV: &str = "SUBIDD_TEST_FOREIGN_CGROUPS";

impl Daemon {
    /// The pid of the log keeper serving this daemon (started with its first spawn).
    pub fn log_keeper_pid(&self) -> anyhow::Result<i32> {
        let deadline = Instant::now() + Duration::from_secs(5);
        let client =
            subid_sys::logkeep::Client::connect(&self.run.join("logkeeper.sock"), deadline)?;
        Ok(client.keeper_pidfd()?.pid())
    }

    /// After the daemon is gone: unmounts every mount below its runtime dir (namespace pins,
    /// private mounts), then kills and removes its lease cgroups with everything in them.
    /// Failures are printed, never fatal: a drop must not panic.
    pub fn clean_up(&self) {
        // The log keeper outlives a daemon by design; a test's goes with it.
        let keeper = self.run.join("logkeeper.sock");
        if keeper.exists() {
            let deadline = Instant::now() + Duration::from_secs(5);
            match subid_sys::logkeep::Client::connect(&keeper, deadline) {
                Ok(client) => {
                    if let Err(e) = client.shutdown(deadline) {
                        eprintln!("cleanup: stop the log keeper: {e}");
                    }
                }
                Err(e) => eprintln!("cleanup: reach the log keeper: {e}"),
            }
        }
        for mount in mounts_below(&self.run) {
            if let Err(e) = nix::mount::umount2(&mount, nix::mount::MntFlags::MNT_DETACH) {
                eprintln!("cleanup: umount {}: {e}", mount.display());
            }
        }
        if let Some(parent) = &self.cgroup_parent {
            clean_cgroup_path(parent);
        }
    }
}

/// Kills and removes the cgroup path `parent` (as /proc/self/cgroup names it) and everything
/// below it, in every hierarchy that has it.
pub fn clean_cgroup_path(parent: &str) {
    for dir in cgroup_dirs(parent) {
        kill_cgroup_tree(&dir);
    }
}

/// Mount points at or below `dir`, deepest first (from /proc/self/mountinfo).
fn mounts_below(dir: &Path) -> Vec<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut found: Vec<PathBuf> = text
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(p.replace("\\040", " ")))
        .filter(|p| p.starts_with(dir))
        .collect();
    found.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    found.dedup();
    found
}

/// The directories of cgroup path `parent` in every mounted hierarchy that has it.
fn cgroup_dirs(parent: &str) -> Vec<PathBuf> {
    let Ok(host) = subid_sys::cgroup::CgroupHost::detect() else {
        return Vec::new();
    };
    let rel = parent.trim_start_matches('/');
    [host.unified(), host.pids()]
        .into_iter()
        .flatten()
        .map(|h| h.mount.join(rel))
        .filter(|d| d.is_dir())
        .collect()
}

/// Kills every process in the cgroup `dir` and below (`cgroup.kill` where there is one, else
/// SIGKILL to each listed pid, repeated), then removes the cgroups, deepest first.
pub fn kill_cgroup_tree(dir: &Path) {
    let mut dirs = vec![dir.to_path_buf()];
    let mut i = 0;
    while i < dirs.len() {
        if let Ok(entries) = std::fs::read_dir(&dirs[i]) {
            dirs.extend(
                entries
                    .flatten()
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| e.path()),
            );
        }
        i += 1;
    }
    let _ = std::fs::write(dir.join("cgroup.kill"), "1");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let pids: Vec<i32> = dirs
            .iter()
            .filter_map(|d| std::fs::read_to_string(d.join("cgroup.procs")).ok())
            .flat_map(|t| {
                t.split_whitespace()
                    .filter_map(|p| p.parse().ok())
                    .collect::<Vec<i32>>()
            })
            .collect();
        if pids.is_empty() || Instant::now() > deadline {
            if !pids.is_empty() {
                eprintln!("cleanup: processes left in {}: {pids:?}", dir.display());
            }
            break;
        }
        for pid in pids {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    for d in dirs.iter().rev() {
        let deadline = Instant::now() + Duration::from_secs(5);
        while let Err(e) = std::fs::remove_dir(d) {
            if e.raw_os_error() != Some(libc::EBUSY) || Instant::now() > deadline {
                if e.kind() != std::io::ErrorKind::NotFound {
                    eprintln!("cleanup: rmdir {}: {e}", d.display());
                }
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// A response: status, headers we care about, body.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: hyper::HeaderMap,
    pub body: Bytes,
}

impl Reply {
    /// The body as JSON (panics with the body text when it is not JSON: test helper).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}): {:?}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// A header's value as text; empty when absent or not text.
    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }

    /// The `code` of an error body.
    pub fn code(&self) -> String {
        self.json()["code"].as_str().unwrap_or_default().to_string()
    }
}

/// An HTTP/1.1 client over a unix socket: one connection per request, as curl does.
#[derive(Debug, Clone)]
pub struct Client {
    socket: PathBuf,
}

impl Client {
    pub fn new(socket: &Path) -> Client {
        Client {
            socket: socket.to_path_buf(),
        }
    }

    /// Opens a connection that can carry many requests (keep-alive).
    pub async fn connect(&self) -> anyhow::Result<Conn> {
        let stream = connect_retrying(&self.socket).await?;
        let (sender, connection) = http1::handshake(TokioIo::new(stream))
            .await
            .context("http handshake")?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(Conn { sender })
    }

    /// One request on a fresh connection.
    pub async fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<&str>,
    ) -> anyhow::Result<Reply> {
        self.connect().await?.request(method, path, body).await
    }

    pub async fn get(&self, path: &str) -> anyhow::Result<Reply> {
        self.request(Method::GET, path, None).await
    }

    pub async fn put(&self, path: &str, body: Option<&str>) -> anyhow::Result<Reply> {
        self.request(Method::PUT, path, body).await
    }

    pub async fn post(&self, path: &str, body: Option<&str>) -> anyhow::Result<Reply> {
        self.request(Method::POST, path, body).await
    }

    pub async fn delete(&self, path: &str) -> anyhow::Result<Reply> {
        self.request(Method::DELETE, path, None).await
    }
}

/// A kept-alive connection.
pub struct Conn {
    sender: http1::SendRequest<Full<Bytes>>,
}

impl Conn {
    pub async fn request(
        &mut self,
        method: Method,
        path: &str,
        body: Option<&str>,
    ) -> anyhow::Result<Reply> {
        let body = Full::new(Bytes::from(body.unwrap_or("").to_string()));
        let request = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "localhost")
            .body(body)
            .context("build request")?;
        self.sender.ready().await.context("connection ready")?;
        let response = self
            .sender
            .send_request(request)
            .await
            .context("send request")?;
        let status = response.status();
        let headers = response.headers().clone();
        let body = response
            .into_body()
            .collect()
            .await
            .context("read body")?
            .to_bytes();
        Ok(Reply {
            status,
            headers,
            body,
        })
    }
}

/// Connects, retrying briefly when the listen backlog is momentarily full (EAGAIN).
async fn connect_retrying(socket: &Path) -> anyhow::Result<UnixStream> {
    let mut delay = Duration::from_millis(1);
    for _ in 0..50 {
        match UnixStream::connect(socket).await {
            Ok(stream) => return Ok(stream),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_millis(100));
            }
            Err(e) => return Err(e).with_context(|| format!("connect {}", socket.display())),
        }
    }
    bail!("connect {}: backlog full for too long", socket.display())
}

/// Resident set size of a process in KiB, from /proc/PID/status.
pub fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    for line in status.lines() {
        if let Some(rest) = line.strip_prefix("VmRSS:") {
            let kib = rest.trim().trim_end_matches("kB").trim();
            return Ok(kib.parse()?);
        }
    }
    bail!("no VmRSS in /proc/{pid}/status")
}

impl Daemon {
    /// As [`Daemon::start_failure`], with the given subuid and subgid file contents.
    pub fn start_failure_with_subid(
        config_toml: &str,
        subuid_text: &str,
        subgid_text: &str,
    ) -> anyhow::Result<String> {
        match Daemon::start_with_subid(config_toml, subuid_text, subgid_text) {
            Ok(_) => bail!("subidd started although it should have refused"),
            Err(e) => Ok(format!("{e:#}")),
        }
    }

    /// The daemon's SQLite database file.
    pub fn database(&self) -> PathBuf {
        self.dir.path().join("state").join("subidd.db")
    }
}

/// A loopback TCP port that was free a moment ago (bind to port 0, read it, close).
pub fn free_tcp_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("bind 127.0.0.1:0")?;
    Ok(listener.local_addr().context("local_addr")?.port())
}

/// One request over TCP to `addr` with exactly the given headers (no `Host` is added: pass
/// one, as real clients do).
pub async fn tcp_request(
    addr: &str,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> anyhow::Result<Reply> {
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .with_context(|| format!("connect {addr}"))?;
    let (mut sender, connection) = http1::handshake(TokioIo::new(stream))
        .await
        .context("http handshake")?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let mut request = Request::builder().method(method).uri(path);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let request = request
        .body(Full::new(Bytes::from(body.unwrap_or("").to_string())))
        .context("build request")?;
    let response = sender.send_request(request).await.context("send request")?;
    let status = response.status();
    let headers = response.headers().clone();
    let body = response
        .into_body()
        .collect()
        .await
        .context("read body")?
        .to_bytes();
    Ok(Reply {
        status,
        headers,
        body,
    })
}

/// Replaces the text between `<!-- NAME:begin -->` and `<!-- NAME:end -->` in `file` (appending
/// a new section when the markers are absent): how the benchmarks write docs/BENCHMARKS.md.
pub fn splice(file: &Path, name: &str, body: &str) -> anyhow::Result<()> {
    let begin = format!("<!-- {name}:begin -->");
    let end = format!("<!-- {name}:end -->");
    let text = std::fs::read_to_string(file).unwrap_or_else(|_| "# Benchmarks\n".into());
    let new = match (text.find(&begin), text.find(&end)) {
        (Some(b), Some(e)) if b < e => {
            format!("{}{begin}\n{body}{}", &text[..b], &text[e..])
        }
        _ => format!("{text}\n{begin}\n{body}{end}\n"),
    };
    std::fs::write(file, new).with_context(|| format!("writing {}", file.display()))
}

/// p50 and p99 of a set of latency samples.
#[derive(Debug, Clone, Copy)]
pub struct LatencyStats {
    pub n: usize,
    pub p50: std::time::Duration,
    pub p99: std::time::Duration,
}

/// `n` `GET /_ping` on one kept-alive connection, each timed: the HTTP round trip the
/// benchmarks compare against.
pub async fn ping_samples(client: &Client, n: usize) -> anyhow::Result<Vec<Duration>> {
    let mut conn = client.connect().await?;
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        samples.push(ping_once(&mut conn).await?);
    }
    Ok(samples)
}

/// One timed `GET /_ping` on `conn`.
pub async fn ping_once(conn: &mut Conn) -> anyhow::Result<Duration> {
    let t = Instant::now();
    let r = conn.request(Method::GET, "/_ping", None).await?;
    let took = t.elapsed();
    anyhow::ensure!(r.status == StatusCode::OK, "ping: {}", r.status);
    Ok(took)
}

/// One timed `PUT /v1/leases/{name}` on `conn`, which must create the lease.
pub async fn put_once(conn: &mut Conn, name: &str) -> anyhow::Result<Duration> {
    let path = format!("/v1/leases/{name}");
    let t = Instant::now();
    let r = conn.request(Method::PUT, &path, None).await?;
    let took = t.elapsed();
    if r.status != StatusCode::CREATED {
        bail!("{path}: {} {}", r.status, r.text());
    }
    Ok(took)
}

/// One client creating leases `{prefix}-0` .. `{prefix}-{n-1}` one after another on a
/// kept-alive connection, each `PUT` timed.
pub async fn sequential_puts(
    client: &Client,
    prefix: &str,
    n: usize,
) -> anyhow::Result<Vec<Duration>> {
    let mut conn = client.connect().await?;
    let mut samples = Vec::with_capacity(n);
    for i in 0..n {
        samples.push(put_once(&mut conn, &format!("{prefix}-{i}")).await?);
    }
    Ok(samples)
}

/// Nearest-rank percentiles of `samples`.
pub fn latency_stats(mut samples: Vec<std::time::Duration>) -> LatencyStats {
    samples.sort_unstable();
    let at = |q: f64| {
        let idx = ((samples.len() as f64 - 1.0) * q).round() as usize;
        samples.get(idx).copied().unwrap_or_default()
    };
    LatencyStats {
        n: samples.len(),
        p50: at(0.50),
        p99: at(0.99),
    }
}

/// Prints a benchmark's report and, unless `SUBIDD_BENCH_NO_WRITE` is set, writes it as section
/// `name` of docs/BENCHMARKS.md.
pub fn publish(name: &str, report: &str) -> anyhow::Result<()> {
    println!("{report}");
    if std::env::var_os("SUBIDD_BENCH_NO_WRITE").is_none() {
        let docs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/BENCHMARKS.md");
        splice(&docs, name, report)?;
        println!("written to {}", docs.display());
    }
    Ok(())
}

/// `Linux <release>` of this machine, for benchmark headers.
pub fn kernel() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| format!("Linux {}", s.trim()))
        .unwrap_or_else(|_| "Linux".into())
}

/// The date and time of a run, UTC to the minute, for benchmark headers.
pub fn run_date() -> String {
    let out = std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output();
    out.map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

// ---- Starting the binary the way systemd would (socket activation, sd_notify) ----

impl Daemon {
    /// A daemon's temp dir and config after one start and clean stop (so its directories and
    /// database exist), with no process running: for tests that start the binary themselves
    /// with [`Daemon::spawn_via`].
    pub fn prepared(config_toml: &str) -> anyhow::Result<Daemon> {
        let mut daemon = Daemon::start(config_toml)?;
        daemon.stop()?;
        Ok(daemon)
    }

    /// Starts the binary on this daemon's config, as `wrapper... subidd --config FILE`, with
    /// `env` added, and does NOT wait for the socket: the test decides what "ready" means.
    /// [`Daemon::stop`], [`Daemon::pid`], [`Daemon::log_text`] and drop work as usual.
    pub fn spawn_via(&mut self, wrapper: &[&str], env: &[(&str, &str)]) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .context("open log")?;
        let bin = subidd_bin()?;
        let mut argv: Vec<std::ffi::OsString> = wrapper.iter().map(Into::into).collect();
        argv.push(bin.into_os_string());
        let mut cmd = Command::new(&argv[0]);
        cmd.args(&argv[1..])
            .arg("--config")
            .arg(&self.config)
            .env_remove("SUBIDD_CONFIG")
            .env("SUBIDD_LOG", "info")
            .env(TEST_FOREIGN_CGROUPS_ENV, TEST_CGROUP_ROOT)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(log.try_clone().context("dup log")?)
            .stderr(log);
        self.child = Some(cmd.spawn().with_context(|| format!("spawn {argv:?}"))?);
        Ok(())
    }

    /// Waits up to `within` for the process to exit by itself; its exit code (`None` when a
    /// signal ended it).
    pub fn wait_exit(&mut self, within: Duration) -> anyhow::Result<Option<i32>> {
        let child = self.child.as_mut().context("no process running")?;
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = child.try_wait().context("try_wait")? {
                self.child = None;
                return Ok(status.code());
            }
            if Instant::now() > deadline {
                bail!("subidd still runs after {within:?}: {}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A datagram socket standing in for systemd's notify socket: collects what the daemon sends.
pub struct NotifySocket {
    socket: std::os::unix::net::UnixDatagram,
    /// What to put in `NOTIFY_SOCKET` (a path, or `@name` for an abstract socket).
    pub env_value: String,
}

impl NotifySocket {
    /// Binds at `path`.
    pub fn bind(path: &Path) -> anyhow::Result<NotifySocket> {
        let socket = std::os::unix::net::UnixDatagram::bind(path)
            .with_context(|| format!("bind {}", path.display()))?;
        Ok(NotifySocket {
            socket,
            env_value: path.display().to_string(),
        })
    }

    /// Binds an abstract socket named `name` (no file).
    pub fn bind_abstract(name: &str) -> anyhow::Result<NotifySocket> {
        use std::os::linux::net::SocketAddrExt;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())
            .context("abstract address")?;
        let socket = std::os::unix::net::UnixDatagram::bind_addr(&addr)
            .with_context(|| format!("bind @{name}"))?;
        Ok(NotifySocket {
            socket,
            env_value: format!("@{name}"),
        })
    }

    /// The next message, or `None` when none arrives within `within`.
    pub fn recv(&self, within: Duration) -> anyhow::Result<Option<String>> {
        self.socket
            .set_read_timeout(Some(within.max(Duration::from_millis(1))))
            .context("set_read_timeout")?;
        let mut buf = vec![0u8; 4096];
        match self.socket.recv(&mut buf) {
            Ok(n) => Ok(Some(String::from_utf8_lossy(&buf[..n]).into_owned())),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                Ok(None)
            }
            Err(e) => Err(e).context("recv on the notify socket"),
        }
    }

    /// Waits up to `within` for a message with the line `line` (e.g. `READY=1`); returns it
    /// and every message that came before it.
    pub fn wait_for(&self, line: &str, within: Duration) -> anyhow::Result<(String, Vec<String>)> {
        self.wait_until(|l| l == line, line, within)
    }

    /// As [`NotifySocket::wait_for`], for a line starting with `prefix` (e.g. `STATUS=`).
    pub fn wait_for_prefix(
        &self,
        prefix: &str,
        within: Duration,
    ) -> anyhow::Result<(String, Vec<String>)> {
        self.wait_until(|l| l.starts_with(prefix), prefix, within)
    }

    fn wait_until(
        &self,
        matches: impl Fn(&str) -> bool,
        what: &str,
        within: Duration,
    ) -> anyhow::Result<(String, Vec<String>)> {
        let deadline = Instant::now() + within;
        let mut before = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.recv(left)? {
                Some(message) if message.lines().any(&matches) => return Ok((message, before)),
                Some(message) => before.push(message),
                None => bail!("no {what} within {within:?}; got {before:?}"),
            }
        }
    }
}

/// A python3 shim that does what systemd does for a .socket unit: binds and listens on a
/// socket, puts it at fd 3, sets LISTEN_PID to its own pid (which the exec keeps), LISTEN_FDS=1
/// and LISTEN_FDNAMES, then execs the rest of its argv. Arguments: `unix PATH MODE GID` (GID
/// -1 leaves the group alone) or `tcp 127.0.0.1`.
pub const SOCKET_ACTIVATE_PY: &str = r#"
import os, socket, sys
kind, args = sys.argv[1], sys.argv[2:]
if kind == "unix":
    path, mode, gid, argv = args[0], int(args[1], 8), int(args[2]), args[3:]
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    os.chown(path, -1, gid)
    os.chmod(path, mode)
else:
    host, argv = args[0], args[1:]
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind((host, 0))
s.listen(128)
if s.fileno() != 3:
    os.dup2(s.fileno(), 3)
os.set_inheritable(3, True)
os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS="1", LISTEN_FDNAMES="subidd.socket")
os.execv(argv[0], argv)
"#;
