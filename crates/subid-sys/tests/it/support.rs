//! Test fixtures: a lease with its pin in a temp dir, output files, child cleanup.

use std::fs;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use subid_sys::userns::{self, ExtraNs, UserNsSpec};
use subid_sys::{Command, LeaseNs, Namespace, PidFd};

/// A lease for one test: its spec, a temp runtime dir, the pin path, and every child started
/// through it. Drop kills and reaps the children and unpins, even when the test failed.
pub struct Lease {
    pub spec: UserNsSpec,
    pub dir: tempfile::TempDir,
    pub pin: PathBuf,
    pub children: Vec<PidFd>,
    /// A private mount made for mount namespace pins, undone on drop.
    pub private_mount: Option<PathBuf>,
}

impl Lease {
    pub fn new(base: u32) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("subid-sys-it")
            .tempdir()
            .expect("temp dir");
        let pin = dir.path().join("ns").join("lease").join("user");
        Lease {
            spec: UserNsSpec::new(base, 65536),
            dir,
            pin,
            children: Vec::new(),
            private_mount: None,
        }
    }

    /// A lease that also has the optional namespaces `extra`; its pins' directory becomes a
    /// private mount (needed for a mount namespace pin where / is shared).
    pub fn with_extra(base: u32, extra: ExtraNs) -> Self {
        let mut lease = Lease::new(base);
        lease.spec.extra = extra;
        let ns_dir = lease.dir.path().join("ns");
        userns::make_private_mount(&ns_dir).expect("private mount");
        lease.private_mount = Some(ns_dir);
        lease
    }

    /// First spawn when nothing is pinned yet, a join afterwards. Returns the child's pid.
    pub fn spawn(&mut self, cmd: &Command) -> subid_sys::error::Result<i32> {
        self.spawn_then(cmd, &mut ())
    }

    /// [`Lease::spawn`] with hooks (`Command::spawn_then`).
    pub fn spawn_then(
        &mut self,
        cmd: &Command,
        hooks: &mut dyn subid_sys::SpawnHooks,
    ) -> subid_sys::error::Result<i32> {
        let child = if userns::is_pinned(&self.pin) {
            let ns = LeaseNs::open(&self.pin)?;
            cmd.spawn_then(Namespace::Join(&ns), hooks)?
        } else {
            cmd.spawn_then(
                Namespace::Create {
                    spec: &self.spec,
                    pin: &self.pin,
                },
                hooks,
            )?
        };
        let pid = child.pid();
        self.children.push(child);
        Ok(pid)
    }

    pub fn child(&self, pid: i32) -> &PidFd {
        self.children
            .iter()
            .find(|c| c.pid() == pid)
            .expect("a child of this lease")
    }

    /// An output file in the lease's temp dir, and its path.
    pub fn output(&self, name: &str) -> (OwnedFd, PathBuf) {
        let path = self.dir.path().join(name);
        let file = fs::File::create(&path).expect("output file");
        (OwnedFd::from(file), path)
    }

    pub fn pin_inode(&self) -> u64 {
        let fd = userns::open_pinned(&self.pin).expect("pinned");
        userns::ns_inode(&fd).expect("inode")
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        for child in self.children.drain(..) {
            let _ = child.send_signal(libc::SIGKILL);
            let _ = child.wait();
        }
        if let Err(e) = userns::unpin(&self.pin) {
            eprintln!("cleanup: {e}");
        }
        if let Some(dir) = self.private_mount.take()
            && let Err(e) = nix::mount::umount2(&dir, nix::mount::MntFlags::MNT_DETACH)
        {
            eprintln!("cleanup: umount {dir:?}: {e}");
        }
    }
}

/// Waits until `path` holds at least `lines` lines (a child's output), or panics after 10 s.
pub fn wait_for_lines(path: &Path, lines: usize) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = fs::read_to_string(path).unwrap_or_default();
        if text.lines().count() >= lines {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "timed out, {path:?} holds {text:?}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The nsfs inode of `/proc/<pid>/ns/user`.
pub fn user_ns_of(pid: i32) -> u64 {
    ns_of(pid, "user")
}

/// The nsfs inode of `/proc/<pid>/ns/<kind>`.
pub fn ns_of(pid: i32, kind: &str) -> u64 {
    let fd = fs::File::open(format!("/proc/{pid}/ns/{kind}")).expect("ns file");
    userns::ns_inode(&fd).expect("inode")
}

/// Whether the mount table of this process mentions `path`.
pub fn mounted(path: &Path) -> bool {
    let table = fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    let needle = path.to_str().expect("utf-8 path");
    table.lines().any(|l| l.split(' ').nth(4) == Some(needle))
}

/// `Command` for `/bin/sh -c script` with a minimal PATH.
pub fn sh(script: &str) -> Command {
    let mut cmd = Command::new("/bin/sh", ["sh", "-c", script]);
    cmd.env("PATH", "/usr/bin:/bin");
    cmd
}
