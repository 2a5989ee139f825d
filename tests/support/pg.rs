//! A PostgreSQL cluster of a test's own: `initdb` in a temp dir, `pg_ctl start` on a private
//! socket directory and a loopback port, run as an unprivileged user (the server refuses to run
//! as root), stopped and removed when the last handle goes, also when a test fails.
//!
//! Clusters a killed test run left behind (their directories name the test process) are
//! stopped and removed by the next run.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// Directory names of test clusters under the temp dir: `subidd-pg-<test pid>-<n>`.
const PREFIX: &str = "subidd-pg-";

/// The directory of PostgreSQL's programs: the one holding `initdb` on PATH, else the newest
/// `/usr/lib/postgresql/<version>/bin` (where Debian installs them, off PATH).
pub fn bin_dir() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        let initdb = dir.join("initdb");
        if initdb.is_file() {
            // Follow a symlink such as /usr/local/bin/initdb to the real bin dir.
            let real = std::fs::canonicalize(&initdb).unwrap_or(initdb);
            return real.parent().map(Path::to_path_buf);
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .flatten()
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").is_file().then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin)
}

/// The uid and gid the server runs as: ourselves unless we are root, then `postgres` if the
/// host has that user, else `nobody`.
fn server_user() -> anyhow::Result<Option<(u32, u32)>> {
    if !nix::unistd::geteuid().is_root() {
        return Ok(None);
    }
    for name in ["postgres", "nobody"] {
        if let Some(user) = nix::unistd::User::from_name(name).context("getpwnam")? {
            return Ok(Some((user.uid.as_raw(), user.gid.as_raw())));
        }
    }
    bail!("neither a postgres nor a nobody user exists to run the test server as")
}

/// A running cluster. Dropping the last handle stops it and removes its files.
#[derive(Debug)]
pub struct PgCluster {
    root: PathBuf,
    bin: PathBuf,
    user: Option<(u32, u32)>,
    port: u16,
    state: Mutex<Running>,
    databases: AtomicU32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Running {
    Yes,
    Stopped,
    Frozen,
}

static SHARED: Mutex<Weak<PgCluster>> = Mutex::new(Weak::new());
static COUNTER: AtomicU32 = AtomicU32::new(0);

impl PgCluster {
    /// The cluster the tests of this process share, started on first use; it stops when the
    /// last test holding it is done. For tests that stop or freeze the server, use
    /// [`PgCluster::start`] for one of their own.
    pub fn shared() -> anyhow::Result<Arc<PgCluster>> {
        let mut shared = SHARED.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(cluster) = shared.upgrade() {
            return Ok(cluster);
        }
        let cluster = Arc::new(PgCluster::start()?);
        *shared = Arc::downgrade(&cluster);
        Ok(cluster)
    }

    /// A cluster of its own: initdb, then start on a free loopback port.
    pub fn start() -> anyhow::Result<PgCluster> {
        sweep_stale();
        let bin = bin_dir().context(
            "PostgreSQL is not installed (no initdb on PATH or in /usr/lib/postgresql/*/bin); \
             apt-get install postgresql",
        )?;
        let user = server_user()?;
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let root = std::env::temp_dir().join(format!("{PREFIX}{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).with_context(|| format!("mkdir {}", root.display()))?;
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o755))?;
        for sub in ["data", "sock"] {
            let dir = root.join(sub);
            std::fs::create_dir(&dir)?;
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
            if let Some((uid, gid)) = user {
                std::os::unix::fs::chown(&dir, Some(uid), Some(gid))?;
            }
        }
        let cluster = PgCluster {
            root,
            bin,
            user,
            port: crate::free_tcp_port()?,
            state: Mutex::new(Running::Stopped),
            databases: AtomicU32::new(0),
        };
        let out = cluster.run(
            "initdb",
            &[
                "-D",
                &cluster.data().display().to_string(),
                "-U",
                "subidd",
                "--auth=trust",
                "--no-instructions",
                "-E",
                "UTF8",
                "--locale=C",
            ],
        )?;
        if !out.status.success() {
            bail!(
                "initdb failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        cluster.pg_ctl_start()?;
        Ok(cluster)
    }

    fn data(&self) -> PathBuf {
        self.root.join("data")
    }

    fn sock(&self) -> PathBuf {
        self.root.join("sock")
    }

    /// The loopback port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A URL for database `db` over loopback TCP.
    pub fn url(&self, db: &str) -> String {
        format!("postgresql://subidd@127.0.0.1:{}/{db}", self.port)
    }

    /// Makes a fresh, empty database and returns its URL.
    pub fn create_db(&self, prefix: &str) -> anyhow::Result<String> {
        let n = self.databases.fetch_add(1, Ordering::SeqCst);
        let name = format!("{prefix}_{n}");
        self.psql("postgres", &format!("CREATE DATABASE {name}"))?;
        Ok(self.url(&name))
    }

    /// Runs SQL with psql over the private socket; its output (unaligned, tuples only).
    pub fn psql(&self, db: &str, sql: &str) -> anyhow::Result<String> {
        let sock = self.sock().display().to_string();
        let port = self.port.to_string();
        let out = self.run(
            "psql",
            &[
                "-h",
                &sock,
                "-p",
                &port,
                "-U",
                "subidd",
                "-d",
                db,
                "-v",
                "ON_ERROR_STOP=1",
                "-At",
                "-c",
                sql,
            ],
        )?;
        if !out.status.success() {
            bail!("psql {sql:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// Stops the server (`pg_ctl stop -m fast`: sessions are ended, the port closes).
    pub fn stop(&self) -> anyhow::Result<()> {
        self.thaw();
        let out = self.pg_ctl(&["stop", "-m", "fast", "-w", "-t", "60"])?;
        if !out.status.success() {
            bail!("pg_ctl stop: {}", String::from_utf8_lossy(&out.stderr));
        }
        *self.state.lock().unwrap_or_else(|e| e.into_inner()) = Running::Stopped;
        Ok(())
    }

    /// Starts the server again on the same port and data.
    pub fn restart(&self) -> anyhow::Result<()> {
        self.pg_ctl_start()
    }

    /// Stops every process of the server with SIGSTOP: connections stay open but nothing
    /// answers, as when a network drops packets. [`PgCluster::thaw`] (or drop) resumes it.
    pub fn freeze(&self) -> anyhow::Result<()> {
        self.signal_all(nix::sys::signal::Signal::SIGSTOP)?;
        *self.state.lock().unwrap_or_else(|e| e.into_inner()) = Running::Frozen;
        Ok(())
    }

    /// Resumes a frozen server.
    pub fn thaw(&self) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if *state == Running::Frozen {
            let _ = self.signal_all(nix::sys::signal::Signal::SIGCONT);
            *state = Running::Yes;
        }
    }

    /// The postmaster and its children (the sessions and background workers).
    fn pids(&self) -> anyhow::Result<Vec<i32>> {
        let pidfile = std::fs::read_to_string(self.data().join("postmaster.pid"))
            .context("read postmaster.pid")?;
        let master: i32 = pidfile
            .lines()
            .next()
            .and_then(|l| l.trim().parse().ok())
            .context("postmaster.pid has no pid")?;
        let mut pids = vec![master];
        for entry in std::fs::read_dir("/proc")?.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<i32>().ok())
            else {
                continue;
            };
            let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
            // ppid is the 2nd field after the parenthesised command name.
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                .and_then(|p| p.parse::<i32>().ok());
            if ppid == Some(master) {
                pids.push(pid);
            }
        }
        Ok(pids)
    }

    fn signal_all(&self, signal: nix::sys::signal::Signal) -> anyhow::Result<()> {
        for pid in self.pids()? {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal);
        }
        Ok(())
    }

    fn pg_ctl_start(&self) -> anyhow::Result<()> {
        // SUBIDD_PG_OPTIONS adds server options, e.g. `-c log_min_duration_statement=0` to see
        // where a benchmark's statements spend their time.
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c max_connections=300 \
             -c fsync=on -c synchronous_commit=on {}",
            self.port,
            self.sock().display(),
            std::env::var("SUBIDD_PG_OPTIONS").unwrap_or_default()
        );
        let log = self.root.join("server.log");
        if let Some((uid, gid)) = self.user {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&log)?;
            std::os::unix::fs::chown(&log, Some(uid), Some(gid))?;
        }
        let out = self.pg_ctl(&[
            "start",
            "-w",
            "-t",
            "60",
            "-l",
            &log.display().to_string(),
            "-o",
            &options,
        ])?;
        if !out.status.success() {
            bail!(
                "pg_ctl start: {}{}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        *self.state.lock().unwrap_or_else(|e| e.into_inner()) = Running::Yes;
        Ok(())
    }

    fn pg_ctl(&self, args: &[&str]) -> anyhow::Result<Output> {
        let data = self.data().display().to_string();
        let mut all = vec!["-D", data.as_str()];
        all.extend_from_slice(args);
        self.run("pg_ctl", &all)
    }

    /// Runs one of PostgreSQL's programs as the server's user, with a clean environment.
    fn run(&self, program: &str, args: &[&str]) -> anyhow::Result<Output> {
        let mut cmd = Command::new(self.bin.join(program));
        cmd.args(args)
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .env("LC_ALL", "C")
            .current_dir(&self.root)
            .stdin(Stdio::null());
        if let Some((uid, gid)) = self.user {
            // std drops the supplementary groups (setgroups(0)) when root sets a uid.
            cmd.uid(uid).gid(gid);
        }
        let started = Instant::now();
        let out = cmd.output().with_context(|| format!("running {program}"))?;
        if started.elapsed() > Duration::from_secs(30) {
            eprintln!("{program} took {:?}", started.elapsed());
        }
        Ok(out)
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        self.thaw();
        let _ = self.pg_ctl(&["stop", "-m", "immediate", "-w", "-t", "30"]);
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// Stops and removes the clusters of test processes that are gone (killed before their drop).
fn sweep_stale() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    let Some(bin) = bin_dir() else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(owner) = name
            .strip_prefix(PREFIX)
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if Path::new(&format!("/proc/{owner}")).exists() {
            continue;
        }
        let data = entry.path().join("data");
        if data.join("postmaster.pid").exists() {
            let mut cmd = Command::new(bin.join("pg_ctl"));
            cmd.args(["-D", &data.display().to_string(), "stop", "-m", "immediate"])
                .env_clear()
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            if let Ok(meta) = std::fs::metadata(&data) {
                use std::os::unix::fs::MetadataExt;
                if nix::unistd::geteuid().is_root() && meta.uid() != 0 {
                    cmd.uid(meta.uid()).gid(meta.gid());
                }
            }
            let _ = cmd.status();
        }
        let _ = std::fs::remove_dir_all(entry.path());
    }
}
