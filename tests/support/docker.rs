//! A private Docker engine for tests and benchmarks: `dockerd` (with its own containerd) on
//! paths under a temp dir (data root, exec root, pid file, socket), overlay2, no iptables, no
//! bridge, so the host's engine and network are untouched; images made without a registry
//! (`docker import` of a busybox rootfs). Dropping it removes its containers, stops it and
//! takes off whatever is still mounted under its dir, also when a test failed.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// The busybox that goes into test images (Debian's busybox-static).
pub const BUSYBOX: &str = "/bin/busybox";

/// The Docker client: Debian's (`/usr/bin/docker`, from the same package as `dockerd`) when
/// present, whatever `docker` is on PATH otherwise.
pub fn docker_client() -> PathBuf {
    let debian = Path::new("/usr/bin/docker");
    if debian.exists() {
        debian.to_path_buf()
    } else {
        PathBuf::from("docker")
    }
}

/// The `subid-runc` binary under test: `$SUBID_RUNC_BIN`, else the one cargo built beside the
/// test (`target/<profile>/subid-runc`).
pub fn subid_runc_bin() -> anyhow::Result<PathBuf> {
    if let Some(bin) = std::env::var_os("SUBID_RUNC_BIN") {
        return Ok(PathBuf::from(bin));
    }
    let subidd = crate::subidd_bin()?;
    let bin = subidd.with_file_name("subid-runc");
    if !bin.exists() {
        bail!(
            "{} not found: run `cargo build --workspace --bins` first",
            bin.display()
        );
    }
    Ok(bin)
}

/// A runtime registered in the engine's `daemon.json`; `{dir}` in an argument stands for the
/// engine's dir.
#[derive(Debug, Clone)]
pub struct RuntimeEntry {
    pub name: String,
    pub path: PathBuf,
    pub args: Vec<String>,
}

/// How to start an engine.
#[derive(Debug, Clone, Default)]
pub struct EngineSpec {
    pub runtimes: Vec<RuntimeEntry>,
    /// `default-runtime` of daemon.json.
    pub default_runtime: Option<String>,
    /// Extra dockerd flags (`--userns-remap=default`).
    pub flags: Vec<String>,
}

/// A running private `dockerd`.
pub struct Dockerd {
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    spec: EngineSpec,
    child: Option<Child>,
}

impl Dockerd {
    /// Starts an engine and waits (up to 60 s) until it answers `docker version`.
    pub fn start(spec: EngineSpec) -> anyhow::Result<Dockerd> {
        let dir = tempfile::Builder::new()
            .prefix("dkr")
            .tempdir()
            .context("tempdir")?;
        // Containers' roots (host uids of no group) must reach what is mounted below it.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .context("chmod tempdir")?;
        let socket = dir.path().join("docker.sock");
        let mut engine = Dockerd {
            dir,
            socket,
            spec,
            child: None,
        };
        engine.spawn()?;
        Ok(engine)
    }

    /// Path of a file in the engine's dir.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Where the engine keeps images and containers.
    pub fn data_root(&self) -> PathBuf {
        self.path("data")
    }

    fn write_config(&self) -> anyhow::Result<PathBuf> {
        let mut runtimes = serde_json::Map::new();
        let dir = self.dir.path().display().to_string();
        for r in &self.spec.runtimes {
            let args: Vec<String> = r.args.iter().map(|a| a.replace("{dir}", &dir)).collect();
            runtimes.insert(
                r.name.clone(),
                serde_json::json!({ "path": r.path, "runtimeArgs": args }),
            );
        }
        let mut config = serde_json::json!({ "runtimes": runtimes });
        if let Some(default) = &self.spec.default_runtime {
            config["default-runtime"] = serde_json::json!(default);
        }
        let path = self.path("daemon.json");
        std::fs::write(&path, serde_json::to_vec_pretty(&config)?).context("write daemon.json")?;
        Ok(path)
    }

    /// Starts `dockerd` on the engine's paths (again, after [`Dockerd::stop`]).
    pub fn spawn(&mut self) -> anyhow::Result<()> {
        let config = self.write_config()?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.path("dockerd.log"))
            .context("open dockerd log")?;
        let mut cmd = Command::new("dockerd");
        cmd.arg("--config-file")
            .arg(&config)
            .arg("--data-root")
            .arg(self.data_root())
            .arg("--exec-root")
            .arg(self.path("exec"))
            .arg("--pidfile")
            .arg(self.path("dockerd.pid"))
            .arg("--host")
            .arg(format!("unix://{}", self.socket.display()))
            .args([
                "--storage-driver=overlay2",
                "--iptables=false",
                "--ip-forward=false",
                "--ip-masq=false",
                "--bridge=none",
            ])
            .args(&self.spec.flags)
            .stdin(Stdio::null())
            .stdout(log.try_clone().context("dup log")?)
            .stderr(log);
        self.child = Some(cmd.spawn().context("spawn dockerd")?);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait().context("try_wait")?
            {
                self.child = None;
                bail!("dockerd exited with {status}: {}", self.log());
            }
            if self.socket.exists()
                && self
                    .docker(&["version", "--format", "{{.Server.Version}}"])
                    .is_ok_and(|o| o.status.success())
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("dockerd did not answer within 60 s: {}", self.log());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The engine's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.path("dockerd.log")).unwrap_or_default()
    }

    /// Runs the Docker client against this engine; its output, whatever the status.
    pub fn docker(&self, args: &[&str]) -> anyhow::Result<Output> {
        Command::new(docker_client())
            .arg("--host")
            .arg(format!("unix://{}", self.socket.display()))
            .args(args)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("run docker {args:?}"))
    }

    /// Runs the client and requires success; its stdout, trimmed.
    pub fn docker_ok(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = self.docker(args)?;
        if !out.status.success() {
            bail!(
                "docker {args:?} failed ({}): {}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// Imports a one-binary busybox rootfs as image `name` (no registry needed): `/bin/busybox`
    /// with a link per applet, `/etc/passwd` and `/etc/group`, `/tmp` 1777, an empty `/usr`
    /// and `/lib`, `/lib64` links into it.
    pub fn import_busybox(&self, name: &str) -> anyhow::Result<()> {
        let rootfs = self.path("bbroot");
        if !rootfs.exists() {
            for d in ["bin", "etc", "tmp", "root", "home/user", "usr"] {
                std::fs::create_dir_all(rootfs.join(d)).context("mkdir rootfs")?;
            }
            // So that the host's /usr, bound in (`-v /usr:/usr:ro`), runs: its programs look
            // for their loader and libraries there (a merged-/usr Debian).
            for (link, target) in [("lib", "usr/lib"), ("lib64", "usr/lib64")] {
                std::os::unix::fs::symlink(target, rootfs.join(link)).context("lib link")?;
            }
            std::fs::copy(BUSYBOX, rootfs.join("bin/busybox")).context("copy busybox")?;
            let list = Command::new(BUSYBOX).arg("--list").output()?;
            for applet in String::from_utf8_lossy(&list.stdout).lines() {
                if applet != "busybox" && !applet.contains('/') {
                    std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(applet))
                        .context("applet link")?;
                }
            }
            std::fs::write(
                rootfs.join("etc/passwd"),
                "root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000:user:/home/user:/bin/sh\n",
            )?;
            std::fs::write(rootfs.join("etc/group"), "root:x:0:\nuser:x:1000:\n")?;
            std::os::unix::fs::chown(rootfs.join("home/user"), Some(1000), Some(1000))?;
            std::fs::set_permissions(rootfs.join("tmp"), std::fs::Permissions::from_mode(0o1777))?;
        }
        let script = format!(
            "tar -C {} -c . | {} --host unix://{} import -c 'ENV PATH=/bin' - {name}",
            rootfs.display(),
            docker_client().display(),
            self.socket.display()
        );
        let out = Command::new("sh").arg("-c").arg(&script).output()?;
        if !out.status.success() {
            bail!("import failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    }

    /// Stops the engine: its containers removed, then SIGTERM (SIGKILL after 30 s).
    pub fn stop(&mut self) {
        if self.child.is_none() {
            return;
        }
        if let Ok(out) = self.docker(&["ps", "-aq"]) {
            let ids = String::from_utf8_lossy(&out.stdout).to_string();
            let ids: Vec<&str> = ids.split_whitespace().collect();
            if !ids.is_empty() {
                let mut args = vec!["rm", "-f"];
                args.extend(ids);
                let _ = self.docker(&args);
            }
        }
        self.signal_and_wait(libc::SIGTERM);
    }

    /// Stops `dockerd` alone, leaving its containers to its restart policies.
    pub fn stop_engine(&mut self) {
        self.signal_and_wait(libc::SIGTERM);
    }

    fn signal_and_wait(&mut self, signal: i32) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if let Ok(pid) = i32::try_from(child.id()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::try_from(signal).ok(),
            );
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    /// The mount points under the engine's dir, deepest first.
    pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
        let table = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let mut points: Vec<PathBuf> = table
            .lines()
            .filter_map(|l| l.split(' ').nth(4))
            .map(|p| PathBuf::from(p.replace("\\040", " ")))
            .filter(|p| p.starts_with(dir) && p != dir)
            .collect();
        points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
        points
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        self.stop();
        // containerd's shims exit with their containers; wait a moment for their mounts to go.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !Dockerd::mounts_under(self.dir.path()).is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        for point in Dockerd::mounts_under(self.dir.path()) {
            let _ = nix::mount::umount2(&point, nix::mount::MntFlags::MNT_DETACH);
        }
    }
}
