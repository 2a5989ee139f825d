//! Per-lease process caps with the cgroup `pids` controller, on cgroup v1, v2 and hybrids.
//!
//! # Where things live
//! [`CgroupHost::detect`] reads `/proc/self/mountinfo` and `/proc/self/cgroup` and finds the
//! hierarchy holding the `pids` controller (a v1 `cgroup` mount with `pids` among its options, or
//! the `cgroup2` mount when `pids` is in the daemon's `cgroup.controllers`), and the daemon's own
//! cgroup in it. [`CgroupParent::prepare`] makes the lease parent (default `<own>/subidd`), and
//! [`LeaseCgroup`] one cgroup per lease below it with `pids.max`.
//!
//! # cgroup2 and the no-internal-process rule
//! On cgroup2 a non-root cgroup may enable controllers for its children only while it has no
//! processes of its own (cgroup-v2.rst, "No Internal Process Constraint"). A daemon started by
//! systemd with `Delegate=yes` sits in its own cgroup, so before `+pids` can be written into that
//! cgroup's `cgroup.subtree_control`, [`CgroupParent::prepare`] moves every process of it into
//! a leaf `<own>/daemon` (what systemd.resource-control(5) recommends for delegated services),
//! then enables `+pids` down to the parent. The root cgroup is exempt from the rule.
//!
//! # Starting processes inside
//! [`LeaseCgroup::spawn_handle`] gives a [`SpawnCgroup`] for [`crate::Command::cgroup`]; see
//! [`crate::spawn`] for how the child gets in without ever running outside: `clone3` with
//! `CLONE_INTO_CGROUP` on cgroup2, and on v1 the child's first system call writes `0` into the
//! lease's `cgroup.procs` (one RCU grace period per spawn, background.md: 12-15 ms p50 measured
//! here when spawns are spread out). [`LeaseCgroup::start_spawner`] avoids that on v1: a helper
//! already in the cgroup clones the lease's joining children ([`CgroupSpawner`]).
//!
//! On v1 a process *moved* into a cgroup is not checked against `pids.max` (only forks are), so
//! a spawn that writes `cgroup.procs` can take a full lease one past its cap; children cloned by
//! the spawner or by `clone3(CLONE_INTO_CGROUP)` are forks charged to the lease, refused with
//! `EAGAIN` when it is full.
//!
//! # Teardown
//! [`LeaseCgroup::kill_all_and_remove`]: cgroup2 writes `1` to `cgroup.kill` (Linux >= 5.14) and
//! waits for `populated 0` in `cgroup.events`; v1 freezes when `freezer` is co-mounted with
//! `pids`, then SIGKILLs every member through a pidfd verified to still be in the cgroup (so a
//! reused pid is never hit), thaws, and loops until `cgroup.procs` is empty; then `rmdir`s,
//! children first. Every failure is collected into [`SysError::Teardown`].

use std::fmt;
use std::fs;
use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sys::stat::Mode;

use crate::error::{Result, SysError, errno_of};
use crate::pidfd::PidFd;
pub use crate::spawn::CgroupSpawner;

/// How long teardown waits for a cgroup to empty before it reports failure.
const TEARDOWN_TIMEOUT: Duration = Duration::from_secs(10);

/// What the host offers, as far as the `pids` controller goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupMode {
    /// Pure cgroup2: the unified hierarchy has `pids`.
    V2,
    /// cgroup v1 with a `pids` hierarchy and no cgroup2 mount.
    V1,
    /// `pids` on a v1 hierarchy beside a cgroup2 mount without it (this project's machines).
    Hybrid,
    /// No usable `pids` controller.
    None,
}

impl CgroupMode {
    /// `"v2"`, `"v1"`, `"hybrid"` or `"none"`.
    pub fn as_str(self) -> &'static str {
        match self {
            CgroupMode::V2 => "v2",
            CgroupMode::V1 => "v1",
            CgroupMode::Hybrid => "hybrid",
            CgroupMode::None => "none",
        }
    }
}

impl fmt::Display for CgroupMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The cgroup version of one hierarchy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupVersion {
    /// A v1 `cgroup` mount (one or more controllers).
    V1,
    /// The `cgroup2` unified hierarchy.
    V2,
}

/// One mounted cgroup hierarchy and the daemon's place in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hierarchy {
    /// v1 or v2.
    pub version: CgroupVersion,
    /// Where it is mounted (with the detection root prefixed).
    pub mount: PathBuf,
    /// The cgroup shown at the mount point (mountinfo's root field, usually `/`).
    pub root: PathBuf,
    /// The daemon's cgroup, as `/proc/self/cgroup` names it (absolute within the hierarchy).
    pub own: PathBuf,
    /// The daemon's cgroup directory: `mount` joined with `own` relative to the mount's root.
    pub own_dir: PathBuf,
    /// Whether `pids` is usable here (v1: among the mount options; v2: in the daemon's
    /// `cgroup.controllers`).
    pub pids: bool,
    /// v1 only: `freezer` is co-mounted, so teardown can freeze before killing.
    pub freezer: bool,
}

impl Hierarchy {
    /// The path of `dir` (a directory of this hierarchy) as `/proc/PID/cgroup` shows it.
    fn cgroup_path_of(&self, dir: &Path) -> Option<PathBuf> {
        Some(self.root.join(dir.strip_prefix(&self.mount).ok()?))
    }

    /// The line of a `/proc/PID/cgroup` text that belongs to this hierarchy: its path.
    fn path_in(&self, proc_cgroup: &str) -> Option<PathBuf> {
        proc_cgroup.lines().find_map(|line| {
            let (id, rest) = line.split_once(':')?;
            let (ctrls, path) = rest.split_once(':')?;
            let ours = match self.version {
                CgroupVersion::V2 => id == "0" && ctrls.is_empty(),
                CgroupVersion::V1 => ctrls.split(',').any(|c| c == "pids"),
            };
            ours.then(|| PathBuf::from(path))
        })
    }
}

/// What [`CgroupHost::describe`] reports, for `GET /v1/pool`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupSummary {
    /// `"v2"`, `"v1"`, `"hybrid"` or `"none"`.
    pub mode: &'static str,
    /// Version of the hierarchy holding `pids` (`"v1"`/`"v2"`), if any.
    pub pids_version: Option<&'static str>,
    /// Where that hierarchy is mounted.
    pub pids_mount: Option<PathBuf>,
    /// The daemon's cgroup directory in it.
    pub own_cgroup: Option<PathBuf>,
    /// The cgroup2 mount, if there is one (with or without `pids`).
    pub unified_mount: Option<PathBuf>,
    /// Why no pids controller can be used, when `mode` is `"none"`.
    pub reason: Option<String>,
}

/// The host's cgroup layout as seen by this process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupHost {
    mode: CgroupMode,
    pids: Option<Hierarchy>,
    unified: Option<Hierarchy>,
    reason: Option<String>,
}

impl CgroupHost {
    /// Detects the layout from `/proc/self/mountinfo` and `/proc/self/cgroup`.
    pub fn detect() -> Result<Self> {
        Self::detect_in(Path::new("/"))
    }

    /// As [`detect`](Self::detect), reading `<root>/proc/self/{mountinfo,cgroup}` and prefixing
    /// every mount point with `root` (a fake cgroupfs tree in tests).
    pub fn detect_in(root: &Path) -> Result<Self> {
        let read = |rel: &str| {
            let path = root.join(rel);
            fs::read_to_string(&path).map_err(|e| SysError::io_path("read", path, &e))
        };
        let mountinfo = read("proc/self/mountinfo")?;
        let proc_cgroup = read("proc/self/cgroup")?;
        Ok(Self::from_tables(root, &mountinfo, &proc_cgroup))
    }

    fn from_tables(root: &Path, mountinfo: &str, proc_cgroup: &str) -> Self {
        let mut v1_pids: Option<Hierarchy> = None;
        let mut unified: Option<Hierarchy> = None;
        let mut reasons = Vec::new();
        for m in mountinfo.lines().filter_map(parse_mountinfo_line) {
            let mount = root.join(m.mount_point.trim_start_matches('/'));
            match m.fstype.as_str() {
                "cgroup2" if unified.is_none() => {
                    let Some(own) = own_cgroup(proc_cgroup, None) else {
                        reasons.push("no 0:: line in /proc/self/cgroup".to_string());
                        continue;
                    };
                    let Some(own_dir) = own_dir(&mount, &m.root, &own) else {
                        reasons.push(format!(
                            "own cgroup {} is outside the cgroup2 mount's root {}",
                            own.display(),
                            m.root
                        ));
                        continue;
                    };
                    let controllers = fs::read_to_string(own_dir.join("cgroup.controllers"))
                        .or_else(|_| fs::read_to_string(mount.join("cgroup.controllers")))
                        .unwrap_or_default();
                    let pids = controllers.split_whitespace().any(|c| c == "pids");
                    unified = Some(Hierarchy {
                        version: CgroupVersion::V2,
                        mount,
                        root: PathBuf::from(&m.root),
                        own,
                        own_dir,
                        pids,
                        freezer: false,
                    });
                }
                "cgroup" if v1_pids.is_none() => {
                    let opts: Vec<&str> = m.super_options.split(',').collect();
                    if !opts.contains(&"pids") {
                        continue;
                    }
                    let Some(own) = own_cgroup(proc_cgroup, Some("pids")) else {
                        reasons.push("no pids line in /proc/self/cgroup".to_string());
                        continue;
                    };
                    let Some(own_dir) = own_dir(&mount, &m.root, &own) else {
                        reasons.push(format!(
                            "own pids cgroup {} is outside the mount's root {}",
                            own.display(),
                            m.root
                        ));
                        continue;
                    };
                    v1_pids = Some(Hierarchy {
                        version: CgroupVersion::V1,
                        mount,
                        root: PathBuf::from(&m.root),
                        own,
                        own_dir,
                        pids: true,
                        freezer: opts.contains(&"freezer"),
                    });
                }
                _ => {}
            }
        }
        let (mode, pids) = match (&v1_pids, &unified) {
            (_, Some(u)) if u.pids => (CgroupMode::V2, Some(u.clone())),
            (Some(v1), Some(_)) => (CgroupMode::Hybrid, Some(v1.clone())),
            (Some(v1), None) => (CgroupMode::V1, Some(v1.clone())),
            (None, _) => (CgroupMode::None, None),
        };
        let reason = (mode == CgroupMode::None).then(|| {
            if unified.is_some() {
                reasons.push(
                    "the cgroup2 hierarchy does not offer pids to this cgroup \
                     (cgroup.controllers) and no v1 hierarchy has it"
                        .into(),
                );
            } else {
                reasons.push("no cgroup mount has the pids controller".into());
            }
            reasons.join("; ")
        });
        CgroupHost {
            mode,
            pids,
            unified,
            reason,
        }
    }

    /// The mode: where (if anywhere) the pids controller is.
    pub fn mode(&self) -> CgroupMode {
        self.mode
    }

    /// The hierarchy with the pids controller.
    pub fn pids(&self) -> Option<&Hierarchy> {
        self.pids.as_ref()
    }

    /// The cgroup2 hierarchy, with or without pids.
    pub fn unified(&self) -> Option<&Hierarchy> {
        self.unified.as_ref()
    }

    /// The pids hierarchy, or [`SysError::Unsupported`] naming why there is none.
    pub fn require_pids(&self) -> Result<&Hierarchy> {
        self.pids.as_ref().ok_or_else(|| SysError::Unsupported {
            what: "pids_max",
            reason: self
                .reason
                .clone()
                .unwrap_or_else(|| "no pids controller".into()),
        })
    }

    /// A summary for operators.
    pub fn describe(&self) -> CgroupSummary {
        CgroupSummary {
            mode: self.mode.as_str(),
            pids_version: self.pids.as_ref().map(|h| match h.version {
                CgroupVersion::V1 => "v1",
                CgroupVersion::V2 => "v2",
            }),
            pids_mount: self.pids.as_ref().map(|h| h.mount.clone()),
            own_cgroup: self.pids.as_ref().map(|h| h.own_dir.clone()),
            unified_mount: self.unified.as_ref().map(|h| h.mount.clone()),
            reason: self.reason.clone(),
        }
    }
}

struct MountLine {
    root: String,
    mount_point: String,
    fstype: String,
    super_options: String,
}

/// proc(5) mountinfo: `id parent major:minor root mount-point options [optional...] - fstype
/// source super-options`; paths escape space, tab, newline and backslash as `\ooo`.
fn parse_mountinfo_line(line: &str) -> Option<MountLine> {
    let (left, right) = line.split_once(" - ")?;
    let mut l = left.split(' ');
    let root = unescape(l.nth(3)?);
    let mount_point = unescape(l.next()?);
    let mut r = right.split(' ');
    let fstype = r.next()?.to_string();
    let _source = r.next()?;
    let super_options = r.next().unwrap_or("").to_string();
    Some(MountLine {
        root,
        mount_point,
        fstype,
        super_options,
    })
}

fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The daemon's cgroup in the v2 hierarchy (`None`) or the v1 hierarchy with `controller`.
fn own_cgroup(proc_cgroup: &str, controller: Option<&str>) -> Option<PathBuf> {
    proc_cgroup.lines().find_map(|line| {
        let (id, rest) = line.split_once(':')?;
        let (ctrls, path) = rest.split_once(':')?;
        let hit = match controller {
            None => id == "0" && ctrls.is_empty(),
            Some(c) => ctrls.split(',').any(|x| x == c),
        };
        hit.then(|| PathBuf::from(path))
    })
}

/// `mount` + `own` relative to the mount's `root` (both as the kernel prints them).
fn own_dir(mount: &Path, root: &str, own: &Path) -> Option<PathBuf> {
    let rel = own.strip_prefix(root).ok()?;
    if rel.as_os_str().is_empty() {
        return Some(mount.to_path_buf()); // no trailing slash for the root cgroup
    }
    Some(mount.join(rel))
}

/// The directory below which lease cgroups are made.
#[derive(Debug, Clone)]
pub struct CgroupParent {
    hierarchy: Hierarchy,
    dir: PathBuf,
}

impl CgroupParent {
    /// Makes (if missing) the parent `dir` (default `<own cgroup>/subidd`) in `hierarchy`, which
    /// must be a directory of it. On cgroup2 with pids, `+pids` is enabled in
    /// `cgroup.subtree_control` of the daemon's cgroup and of every directory down to `dir`; if
    /// the daemon's cgroup holds processes (and is not the root), they are first moved into
    /// `<own>/daemon`, see the module docs.
    pub fn prepare(hierarchy: &Hierarchy, dir: Option<&Path>) -> Result<Self> {
        let dir = match dir {
            Some(d) => d.to_path_buf(),
            None => hierarchy.own_dir.join("subidd"),
        };
        if !dir.starts_with(&hierarchy.mount) || dir.components().any(|c| c == Component::ParentDir)
        {
            return Err(SysError::InvalidInput {
                what: "cgroup parent",
                reason: format!(
                    "{} is not below {}",
                    dir.display(),
                    hierarchy.mount.display()
                ),
            });
        }
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(&dir)
            .map_err(|e| SysError::io_path("mkdir", &dir, &e))?;
        if hierarchy.version == CgroupVersion::V2 && hierarchy.pids {
            // Every cgroup from the daemon's own down to the parent hands pids to its children.
            let start = if dir.starts_with(&hierarchy.own_dir) {
                hierarchy.own_dir.clone()
            } else {
                dir.clone()
            };
            let mut chain = vec![dir.clone()];
            let mut cur = dir.as_path();
            while cur != start {
                match cur.parent() {
                    Some(p) if p.starts_with(&hierarchy.mount) => {
                        chain.push(p.to_path_buf());
                        cur = p;
                    }
                    _ => break,
                }
            }
            chain.reverse();
            for d in &chain {
                enable_pids(hierarchy, d)?;
            }
        }
        Ok(CgroupParent {
            hierarchy: hierarchy.clone(),
            dir,
        })
    }

    /// The parent directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The hierarchy it lives in.
    pub fn hierarchy(&self) -> &Hierarchy {
        &self.hierarchy
    }
}

/// Writes `+pids` into `dir/cgroup.subtree_control` unless present; on `EBUSY` for the daemon's
/// own (non-root) cgroup, moves its processes into `<own>/daemon` and retries.
fn enable_pids(h: &Hierarchy, dir: &Path) -> Result<()> {
    let file = dir.join("cgroup.subtree_control");
    let current = read_file(&file)?;
    if current
        .split_whitespace()
        .any(|c| c.trim_start_matches('+') == "pids")
    {
        return Ok(());
    }
    match write_file(&file, b"+pids") {
        Err(e) if e.errno() == Some(Errno::EBUSY) && dir == h.own_dir && h.own_dir != h.mount => {
            let leaf = dir.join("daemon");
            fs::DirBuilder::new()
                .mode(0o755)
                .create(&leaf)
                .or_else(|e| match e.kind() {
                    std::io::ErrorKind::AlreadyExists => Ok(()),
                    _ => Err(e),
                })
                .map_err(|e| SysError::io_path("mkdir", &leaf, &e))?;
            for pid in read_procs(dir)? {
                match write_file(&leaf.join("cgroup.procs"), pid.to_string().as_bytes()) {
                    // gone meanwhile
                    Err(e) if e.errno() == Some(Errno::ESRCH) => {}
                    r => r?,
                }
            }
            write_file(&file, b"+pids")
        }
        r => r,
    }
}

/// A lease's cgroup.
#[derive(Debug)]
pub struct LeaseCgroup {
    hierarchy: Hierarchy,
    dir: PathBuf,
    /// The directory, open (for `CLONE_INTO_CGROUP` handles).
    dir_fd: OwnedFd,
}

/// What a spawn needs to start its child inside a lease cgroup; see [`crate::Command::cgroup`].
#[derive(Debug)]
pub struct SpawnCgroup {
    pub(crate) fd: OwnedFd,
    pub(crate) version: CgroupVersion,
    /// v1 with a lease spawner: joins are cloned by it (see [`CgroupSpawner`]).
    pub(crate) spawner: Option<Arc<CgroupSpawner>>,
}

impl SpawnCgroup {
    /// v1: the open `cgroup.procs` (the child writes `0` into it); v2: the directory, for
    /// `clone3(CLONE_INTO_CGROUP)`.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// The version of the cgroup.
    pub fn version(&self) -> CgroupVersion {
        self.version
    }

    /// The lease spawner behind this handle, if any.
    pub fn spawner(&self) -> Option<&CgroupSpawner> {
        self.spawner.as_deref()
    }

    /// Another handle to the same cgroup (and spawner), for the next spawn.
    pub fn try_clone(&self) -> Result<Self> {
        Ok(SpawnCgroup {
            fd: self
                .fd
                .try_clone()
                .map_err(|e| SysError::syscall("dup", errno_of(&e)))?,
            version: self.version,
            spawner: self.spawner.clone(),
        })
    }
}

fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 200
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.@:".contains(&b));
    // Names like `pids.max` would clash with interface files on v1, where they share the dir.
    let clash = name.starts_with("cgroup.") || name.starts_with("pids.") || name == "tasks";
    if ok && !clash {
        Ok(())
    } else {
        Err(SysError::InvalidInput {
            what: "cgroup name",
            reason: format!("{name:?}: want [A-Za-z0-9-_.@:], no leading dot, no interface name"),
        })
    }
}

impl LeaseCgroup {
    /// Makes `<parent>/<name>` and sets `pids.max` (when given). An existing directory without
    /// processes (left by a crash) is adopted; one with processes is `EBUSY` (use
    /// [`open`](Self::open)). `pids_max` on a hierarchy without pids is
    /// [`SysError::Unsupported`], and nothing is created. If setting the limit fails, the
    /// directory is removed again.
    pub fn create(parent: &CgroupParent, name: &str, pids_max: Option<u64>) -> Result<Self> {
        check_name(name)?;
        let h = &parent.hierarchy;
        if pids_max.is_some() && !h.pids {
            return Err(SysError::Unsupported {
                what: "pids_max",
                reason: format!("no pids controller in {}", h.mount.display()),
            });
        }
        let dir = parent.dir.join(name);
        let made = match fs::DirBuilder::new().mode(0o755).create(&dir) {
            Ok(()) => true,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => false,
            Err(e) => return Err(SysError::io_path("mkdir", &dir, &e)),
        };
        let setup = (|| {
            let cg = Self::open_dir(h, dir.clone())?;
            if !made && !cg.procs()?.is_empty() {
                return Err(SysError::path(
                    "adopt cgroup (has processes)",
                    &dir,
                    Errno::EBUSY,
                ));
            }
            if h.pids {
                cg.set_pids_max(pids_max)?;
            }
            Ok(cg)
        })();
        if setup.is_err() && made {
            let _ = fs::remove_dir(&dir);
        }
        setup
    }

    /// Opens the existing `<parent>/<name>` (after a daemon restart).
    pub fn open(parent: &CgroupParent, name: &str) -> Result<Self> {
        check_name(name)?;
        Self::open_dir(&parent.hierarchy, parent.dir.join(name))
    }

    fn open_dir(h: &Hierarchy, dir: PathBuf) -> Result<Self> {
        let dir_fd = nix::fcntl::open(
            &dir,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| SysError::path("open", &dir, e))?;
        Ok(LeaseCgroup {
            hierarchy: h.clone(),
            dir,
            dir_fd,
        })
    }

    /// The cgroup's directory.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// v1 or v2.
    pub fn version(&self) -> CgroupVersion {
        self.hierarchy.version
    }

    /// The cgroup's path as `/proc/PID/cgroup` shows it for members.
    pub fn cgroup_path(&self) -> Option<PathBuf> {
        self.hierarchy.cgroup_path_of(&self.dir)
    }

    /// Whether process `pid`'s `/proc/PID/cgroup` puts it in this cgroup or below. On a v1
    /// hierarchy the kernel shows an exiting process (`PF_EXITING`) at `/`, so a process on its
    /// way out reads as outside while `cgroup.procs` may still list it.
    pub fn contains_pid(&self, pid: i32) -> Result<bool> {
        let path = format!("/proc/{pid}/cgroup");
        let text = fs::read_to_string(&path).map_err(|e| SysError::io_path("read", &path, &e))?;
        Ok(self.member_text(&text))
    }

    fn member_text(&self, proc_cgroup: &str) -> bool {
        match (self.hierarchy.path_in(proc_cgroup), self.cgroup_path()) {
            (Some(p), Some(me)) => p.starts_with(me),
            _ => false,
        }
    }

    /// Writes `pids.max` (`None` is `max`, no limit).
    pub fn set_pids_max(&self, max: Option<u64>) -> Result<()> {
        let value = max.map_or_else(|| "max".to_string(), |n| n.to_string());
        match write_file(&self.dir.join("pids.max"), value.as_bytes()) {
            Err(e) if e.errno() == Some(Errno::ENOENT) => Err(SysError::Unsupported {
                what: "pids_max",
                reason: format!("{} has no pids.max", self.dir.display()),
            }),
            r => r,
        }
    }

    /// `pids.max` (`None` for `max`).
    pub fn pids_max(&self) -> Result<Option<u64>> {
        let file = self.dir.join("pids.max");
        let text = read_file(&file)?;
        match text.trim() {
            "max" => Ok(None),
            n => n
                .parse()
                .map(Some)
                .map_err(|_| SysError::path("parse", file, Errno::EINVAL)),
        }
    }

    /// `pids.current`: tasks (threads included) in the cgroup and below.
    pub fn pids_current(&self) -> Result<u64> {
        let file = self.dir.join("pids.current");
        read_file(&file)?
            .trim()
            .parse()
            .map_err(|_| SysError::path("parse", file, Errno::EINVAL))
    }

    /// The `max N` line of `pids.events`: forks refused because of this cgroup's limit.
    pub fn pids_events_max(&self) -> Result<u64> {
        let file = self.dir.join("pids.events");
        let text = read_file(&file)?;
        text.lines()
            .find_map(|l| l.strip_prefix("max "))
            .and_then(|n| n.trim().parse().ok())
            .ok_or_else(|| SysError::path("parse", file, Errno::EINVAL))
    }

    /// The processes (thread group ids) directly in the cgroup (`cgroup.procs`).
    pub fn procs(&self) -> Result<Vec<i32>> {
        read_procs(&self.dir)
    }

    /// A handle for [`crate::Command::cgroup`]: v1 the open `cgroup.procs`, v2 the directory.
    pub fn spawn_handle(&self) -> Result<SpawnCgroup> {
        let fd = match self.hierarchy.version {
            CgroupVersion::V2 => self
                .dir_fd
                .try_clone()
                .map_err(|e| SysError::io_path("dup", &self.dir, &e))?,
            CgroupVersion::V1 => {
                let file = self.dir.join("cgroup.procs");
                nix::fcntl::open(&file, OFlag::O_WRONLY | OFlag::O_CLOEXEC, Mode::empty())
                    .map_err(|e| SysError::path("open", file, e))?
            }
        };
        Ok(SpawnCgroup {
            fd,
            version: self.hierarchy.version,
            spawner: None,
        })
    }

    /// A handle whose joins are cloned by a per-lease helper already inside the cgroup (see
    /// [`CgroupSpawner`]): on v1 this takes the `cgroup.procs` write (an RCU grace period, 5-19
    /// ms) off every join; the helper writes itself in once, here. The helper counts as one
    /// process against `pids.max` and lives until the last clone of the handle is dropped; it
    /// is killed by [`kill_all_and_remove`](Self::kill_all_and_remove) like any member, so
    /// drop the handles first. On cgroup2 this is [`spawn_handle`](Self::spawn_handle):
    /// `clone3(CLONE_INTO_CGROUP)` needs no helper.
    pub fn start_spawner(&self) -> Result<SpawnCgroup> {
        let mut handle = self.spawn_handle()?;
        if self.hierarchy.version == CgroupVersion::V1 {
            let procs = handle
                .fd
                .try_clone()
                .map_err(|e| SysError::syscall("dup", errno_of(&e)))?;
            handle.spawner = Some(Arc::new(CgroupSpawner::start(procs)?));
        }
        Ok(handle)
    }

    /// Kills every process in the cgroup and its descendants, then removes them all, going on
    /// after each failure; see the module docs. Processes that are the caller's children stay
    /// zombies for the caller to reap.
    pub fn kill_all_and_remove(self) -> Result<()> {
        let mut errors = Vec::new();
        let deadline = Instant::now() + TEARDOWN_TIMEOUT;
        let mut killed = false;
        if self.hierarchy.version == CgroupVersion::V2 {
            match write_file(&self.dir.join("cgroup.kill"), b"1") {
                Ok(()) => {
                    killed = true;
                    if let Err(e) = wait_unpopulated(&self.dir, deadline) {
                        errors.push(e);
                    }
                }
                // Linux < 5.14: no cgroup.kill; fall back to the loop below.
                Err(e) if e.errno() == Some(Errno::ENOENT) => {}
                Err(e) => errors.push(e),
            }
        }
        if !killed {
            self.kill_loop(deadline, &mut errors);
        }
        remove_tree(&self.dir, deadline, &mut errors);
        if errors.is_empty() {
            Ok(())
        } else {
            Err(SysError::Teardown { errors })
        }
    }

    /// v1 (and v2 without `cgroup.kill`): freeze if possible, SIGKILL all through verified
    /// pidfds, thaw, until nothing is left.
    fn kill_loop(&self, deadline: Instant, errors: &mut Vec<SysError>) {
        let freezer = self.hierarchy.freezer && self.hierarchy.version == CgroupVersion::V1;
        let mut pause = Duration::from_micros(200);
        loop {
            let dirs = tree(&self.dir);
            let mut pids = Vec::new();
            for d in &dirs {
                match read_procs(d) {
                    Ok(p) => pids.extend(p),
                    Err(e) if e.errno() == Some(Errno::ENOENT) => {}
                    Err(e) => {
                        errors.push(e);
                        return;
                    }
                }
            }
            if pids.is_empty() {
                return;
            }
            if Instant::now() > deadline {
                errors.push(SysError::path(
                    "kill (processes remain)",
                    &self.dir,
                    Errno::ETIMEDOUT,
                ));
                return;
            }
            if freezer {
                let _ = write_file(&self.dir.join("freezer.state"), b"FROZEN");
            }
            for pid in pids {
                if let Err(e) = self.kill_verified(pid) {
                    errors.push(e);
                }
            }
            if freezer {
                // SIGKILL is acted on once a v1-frozen task thaws.
                if let Err(e) = write_file(&self.dir.join("freezer.state"), b"THAWED") {
                    errors.push(e);
                }
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(20));
        }
    }

    /// SIGKILL `pid` through a pidfd, after checking (through that pidfd's verified /proc dir)
    /// that it is still in this cgroup, so a reused pid is never signalled.
    fn kill_verified(&self, pid: i32) -> Result<()> {
        let fd = match PidFd::open(pid) {
            Ok(fd) => fd,
            Err(e) if e.errno() == Some(Errno::ESRCH) => return Ok(()),
            Err(e) => return Err(e),
        };
        let text = match fd.proc_dir().and_then(|d| d.read_to_string("cgroup")) {
            Ok(t) => t,
            Err(SysError::ProcessGone { .. }) => return Ok(()),
            Err(e) if e.errno() == Some(Errno::ESRCH) => return Ok(()),
            Err(e) => return Err(e),
        };
        if !self.member_text(&text) {
            return Ok(()); // left the cgroup, or the pid was reused: not ours
        }
        match fd.send_signal(libc::SIGKILL) {
            Err(e) if e.errno() == Some(Errno::ESRCH) => Ok(()),
            r => r,
        }
    }
}

/// `dir` and every cgroup below it, parents before children.
fn tree(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![dir.to_path_buf()];
    let mut i = 0;
    while i < out.len() {
        if let Ok(entries) = fs::read_dir(&out[i]) {
            for e in entries.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    out.push(e.path());
                }
            }
        }
        i += 1;
    }
    out
}

/// Removes `dir` and its child cgroups, deepest first; retries `EBUSY` (tasks still exiting)
/// until `deadline`.
fn remove_tree(dir: &Path, deadline: Instant, errors: &mut Vec<SysError>) {
    for d in tree(dir).iter().rev() {
        loop {
            match remove_cgroup_dir(d) {
                Ok(()) => break,
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => break,
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err(e) => {
                    errors.push(SysError::io_path("rmdir", d, &e));
                    break;
                }
            }
        }
    }
}

/// `rmdir`. On a directory that is not on cgroupfs (a fake tree in tests), the "interface
/// files" are plain files and are deleted first; on cgroupfs they vanish with the directory.
fn remove_cgroup_dir(dir: &Path) -> std::io::Result<()> {
    match fs::remove_dir(dir) {
        Err(e) if e.raw_os_error() == Some(libc::ENOTEMPTY) && !on_cgroupfs(dir) => {
            for entry in fs::read_dir(dir)?.flatten() {
                if entry.file_type().is_ok_and(|t| t.is_file()) {
                    fs::remove_file(entry.path())?;
                }
            }
            fs::remove_dir(dir)
        }
        r => r,
    }
}

fn on_cgroupfs(dir: &Path) -> bool {
    const CGROUP_SUPER_MAGIC: i64 = 0x0027_e0eb;
    const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;
    match nix::sys::statfs::statfs(dir) {
        Ok(s) => {
            // `__fsword_t` differs between architectures and libcs.
            #[allow(clippy::unnecessary_cast)]
            let t = s.filesystem_type().0 as i64;
            t == CGROUP_SUPER_MAGIC || t == CGROUP2_SUPER_MAGIC
        }
        Err(_) => true, // unknown: never delete files
    }
}

/// Waits until `cgroup.events` says `populated 0`.
fn wait_unpopulated(dir: &Path, deadline: Instant) -> Result<()> {
    let file = dir.join("cgroup.events");
    let mut pause = Duration::from_micros(100);
    loop {
        let text = read_file(&file)?;
        if text.lines().any(|l| l.trim() == "populated 0") {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(SysError::path("wait (populated 0)", file, Errno::ETIMEDOUT));
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(10));
    }
}

fn read_procs(dir: &Path) -> Result<Vec<i32>> {
    let file = dir.join("cgroup.procs");
    let text = read_file(&file)?;
    text.split_whitespace()
        .map(|p| {
            p.parse()
                .map_err(|_| SysError::path("parse", &file, Errno::EINVAL))
        })
        .collect()
}

fn read_file(path: &Path) -> Result<String> {
    fs::read_to_string(path).map_err(|e| SysError::io_path("read", path, &e))
}

/// One `write(2)` of `data` into an existing file (cgroupfs files take one value per write).
fn write_file(path: &Path, data: &[u8]) -> Result<()> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(path)
        .map_err(|e| SysError::io_path("open", path, &e))?;
    match f.write(data) {
        Ok(n) if n == data.len() => Ok(()),
        Ok(_) => Err(SysError::path("write (short)", path, Errno::EIO)),
        Err(e) => Err(SysError::path("write", path, errno_of(&e))),
    }
}

impl AsRawFd for SpawnCgroup {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.fd.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID_MOUNTS: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
37 31 0:34 / /sys/fs/cgroup/freezer rw,relatime - cgroup cgroup rw,freezer
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
    const HYBRID_CGROUP: &str = "8:pids:/svc\n6:freezer:/\n0::/\n";

    #[test]
    fn modes_from_tables() {
        let root = Path::new("/nonexistent-root");
        let h = CgroupHost::from_tables(root, HYBRID_MOUNTS, HYBRID_CGROUP);
        assert_eq!(h.mode(), CgroupMode::Hybrid);
        let p = h.pids().unwrap();
        assert_eq!(p.version, CgroupVersion::V1);
        assert_eq!(
            p.own_dir,
            Path::new("/nonexistent-root/sys/fs/cgroup/pids/svc")
        );
        assert!(!p.freezer);

        let v1 = "39 31 0:36 / /sys/fs/cgroup/pids rw - cgroup cgroup rw,pids,freezer\n";
        let h = CgroupHost::from_tables(root, v1, "3:freezer,pids:/a/b\n");
        assert_eq!(h.mode(), CgroupMode::V1);
        assert!(h.pids().unwrap().freezer);

        let none = "41 31 0:38 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n";
        let h = CgroupHost::from_tables(root, none, "0::/\n");
        assert_eq!(h.mode(), CgroupMode::None);
        assert!(h.require_pids().is_err());
        assert!(h.describe().reason.is_some());

        let h = CgroupHost::from_tables(root, "", "");
        assert_eq!(h.mode(), CgroupMode::None);
    }

    #[test]
    fn mount_root_and_escapes() {
        let m = parse_mountinfo_line(
            "1 2 0:3 /ctr /sys/fs/cgroup/my\\040pids rw - cgroup cgroup rw,pids",
        )
        .unwrap();
        assert_eq!(m.mount_point, "/sys/fs/cgroup/my pids");
        assert_eq!(m.root, "/ctr");
        assert_eq!(
            own_dir(Path::new("/m"), "/ctr", Path::new("/ctr/x")).unwrap(),
            Path::new("/m/x")
        );
        assert!(own_dir(Path::new("/m"), "/ctr", Path::new("/other")).is_none());
    }

    #[test]
    fn names() {
        for ok in ["db-1", "a", "lease_2.x"] {
            assert!(check_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            ".",
            "..",
            "a/b",
            "pids.max",
            "cgroup.procs",
            "tasks",
            "a b",
        ] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
    }
}
