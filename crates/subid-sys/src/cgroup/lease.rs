//! The cgroups of one lease: the parent directories they are made under, one cgroup on one
//! hierarchy ([`LeaseCgroup`]), and a lease's set of them ([`LeaseCgroups`]: where its processes
//! live, and its pids cap), with the handle a spawn goes through and the teardown.

use std::fs;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sys::stat::Mode;

use super::fs::{
    populated_v2, read_file, read_procs, remove_tree, tree, wait_unpopulated, write_file,
};
use super::layout::{CgroupHost, CgroupVersion, Hierarchy};
use crate::error::{Result, SysError, errno_of};
use crate::pidfd::PidFd;
use crate::spawn::CgroupSpawner;

/// What every lease cgroup's directory name starts with (`lease-<name>`): no lease name can then
/// be one of the kernel's interface files, which share a v1 cgroup's directory.
pub const LEASE_PREFIX: &str = "lease-";

/// The directory below which lease cgroups are made, in one hierarchy.
#[derive(Debug, Clone)]
pub struct CgroupParent {
    hierarchy: Hierarchy,
    dir: PathBuf,
}

impl CgroupParent {
    /// Makes (if missing) the parent `dir` (default `<own cgroup>/subidd`) in `hierarchy`, which
    /// must be a directory of it. With `pids` on cgroup2, `+pids` is enabled in
    /// `cgroup.subtree_control` of the daemon's cgroup and of every directory down to `dir`; if
    /// the daemon's cgroup holds processes (and is not the root), they are first moved into
    /// `<own>/daemon`, see the module docs.
    pub fn prepare(hierarchy: &Hierarchy, dir: Option<&Path>) -> Result<Self> {
        Self::prepare_for(hierarchy, dir, hierarchy.pids)
    }

    fn prepare_for(hierarchy: &Hierarchy, dir: Option<&Path>, pids: bool) -> Result<Self> {
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
        if hierarchy.version == CgroupVersion::V2 && pids && hierarchy.pids {
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

    /// The lease cgroup directory of `name` under this parent.
    pub fn lease_dir(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{LEASE_PREFIX}{name}"))
    }

    /// The names of the leases with a cgroup here (directories `lease-<name>`).
    pub fn lease_names(&self) -> Vec<String> {
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .filter_map(|e| {
                e.file_name()
                    .to_str()
                    .and_then(|n| n.strip_prefix(LEASE_PREFIX))
                    .map(str::to_string)
            })
            .collect()
    }
}

/// Where a configured parent goes in `h`: `None` for the default; a path below a cgroup mount
/// point (`/sys/fs/cgroup/pids/x`) or a cgroup path as `/proc/self/cgroup` names them (`/x`)
/// both mean cgroup `/x`, which lies at `<mount>/x` (relative to the mount's root) in every
/// hierarchy.
fn parent_in(host: &CgroupHost, h: &Hierarchy, configured: Option<&Path>) -> Option<PathBuf> {
    let configured = configured?;
    let mounts = [host.unified(), host.pids()];
    let cgroup_path = mounts
        .into_iter()
        .flatten()
        .find_map(|m| {
            configured
                .strip_prefix(&m.mount)
                .ok()
                .map(|rel| m.root.join(rel))
        })
        .unwrap_or_else(|| configured.to_path_buf());
    let rel = cgroup_path.strip_prefix(&h.root).unwrap_or(&cgroup_path);
    let rel = rel.strip_prefix("/").unwrap_or(rel);
    Some(h.mount.join(rel))
}

/// The parents of a daemon's lease cgroups: on the tracking hierarchy, and (for `pids_max`) on
/// the pids hierarchy when that is another one.
#[derive(Debug, Clone)]
pub struct CgroupParents {
    track: CgroupParent,
    /// The pids hierarchy's parent: `None` when tracking has pids itself, or none is usable.
    cap: Option<CgroupParent>,
    /// Why `pids_max` cannot be honoured, when it cannot.
    cap_reason: Option<String>,
}

impl CgroupParents {
    /// Prepares the tracking parent (and, when `pids` is wanted and lives elsewhere, the pids
    /// parent). `configured`: the operator's parent (see [`CgroupParents::configured_dir`]), or
    /// `None` for `<own cgroup>/subidd` in each hierarchy. With `pids` false the daemon is never
    /// moved into a leaf (tracking needs no controller); ask again with `pids` true on the first
    /// lease that wants a cap.
    pub fn prepare(host: &CgroupHost, configured: Option<&Path>, pids: bool) -> Result<Self> {
        let th = host.require_tracking()?;
        let tracks_pids = th.pids;
        let track =
            CgroupParent::prepare_for(th, parent_in(host, th, configured).as_deref(), pids)?;
        let (cap, cap_reason) = if tracks_pids {
            (None, None)
        } else {
            // The pids parent is prepared when asked for, or when a previous daemon made it
            // (its leftovers must be found at start).
            let made_before = Self::planned(host, configured)
                .1
                .is_some_and(|d| d.is_dir());
            match host.pids() {
                Some(ph) if pids || made_before => {
                    let dir = parent_in(host, ph, configured);
                    (
                        Some(CgroupParent::prepare_for(ph, dir.as_deref(), true)?),
                        None,
                    )
                }
                Some(_) => (None, None),
                None => (None, host.require_pids().err().map(|e| e.to_string())),
            }
        };
        Ok(CgroupParents {
            track,
            cap,
            cap_reason,
        })
    }

    /// Where `prepare` puts the tracking parent and the pids parent, made or not.
    pub fn planned(
        host: &CgroupHost,
        configured: Option<&Path>,
    ) -> (Option<PathBuf>, Option<PathBuf>) {
        let dir = |h: &Hierarchy| {
            parent_in(host, h, configured).unwrap_or_else(|| h.own_dir.join("subidd"))
        };
        let track = host.tracking().map(dir);
        let pids = match host.tracking() {
            Some(th) if th.pids => track.clone(),
            _ => host.pids().map(dir),
        };
        (track, pids)
    }

    /// Whether the tracking parent `prepare` would make is there already (a daemon made it).
    pub fn exist(host: &CgroupHost, configured: Option<&Path>) -> bool {
        Self::planned(host, configured)
            .0
            .is_some_and(|d| d.is_dir())
    }

    /// The tracking parent.
    pub fn track(&self) -> &CgroupParent {
        &self.track
    }

    /// The pids parent on another hierarchy, when prepared.
    pub fn cap(&self) -> Option<&CgroupParent> {
        self.cap.as_ref()
    }

    /// Whether `pids_max` can be honoured with these parents.
    pub fn can_cap(&self) -> Result<()> {
        if self.track.hierarchy.pids || self.cap.is_some() {
            return Ok(());
        }
        Err(SysError::Unsupported {
            what: "pids_max",
            reason: self
                .cap_reason
                .clone()
                .unwrap_or_else(|| "the pids hierarchy's parent is not prepared".into()),
        })
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

/// One cgroup of a lease, on one hierarchy.
#[derive(Debug)]
pub struct LeaseCgroup {
    hierarchy: Hierarchy,
    dir: PathBuf,
    /// The directory, open (for `CLONE_INTO_CGROUP` handles).
    dir_fd: OwnedFd,
}

/// What a spawn needs to start its child inside a lease's cgroups; see
/// [`crate::Command::cgroup`].
#[derive(Debug)]
pub struct SpawnCgroup {
    /// cgroup2: the lease's directory; children are born there (`CLONE_INTO_CGROUP`).
    pub(crate) v2_dir: Option<OwnedFd>,
    /// v1: the lease's `cgroup.procs`, which the first process of a new namespace is moved into.
    pub(crate) v1_procs: Option<OwnedFd>,
    /// v1: the spawner that clones joining children inside the v1 cgroup.
    pub(crate) spawner: Option<Arc<CgroupSpawner>>,
}

impl SpawnCgroup {
    /// The lease spawner behind this handle, if any.
    pub fn spawner(&self) -> Option<&CgroupSpawner> {
        self.spawner.as_deref()
    }

    /// The cgroup2 directory children are born in, if any.
    pub fn v2_dir(&self) -> Option<BorrowedFd<'_>> {
        self.v2_dir.as_ref().map(AsFd::as_fd)
    }

    /// Another handle to the same cgroups (and spawner), for the next spawn.
    pub fn try_clone(&self) -> Result<Self> {
        let dup = |fd: &Option<OwnedFd>| {
            fd.as_ref()
                .map(|f| f.try_clone())
                .transpose()
                .map_err(|e| SysError::syscall("dup", errno_of(&e)))
        };
        Ok(SpawnCgroup {
            v2_dir: dup(&self.v2_dir)?,
            v1_procs: dup(&self.v1_procs)?,
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
    if ok {
        Ok(())
    } else {
        Err(SysError::InvalidInput {
            what: "cgroup name",
            reason: format!("{name:?}: want 1-200 of [A-Za-z0-9-_.@:], no leading dot"),
        })
    }
}

impl LeaseCgroup {
    /// Makes the lease cgroup `<parent>/lease-<name>` and sets `pids.max` (when given). An
    /// existing directory without processes (left by a crash) is adopted; one with processes is
    /// `EBUSY` (use [`open`](Self::open)). `pids_max` on a hierarchy without pids is
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
        let dir = parent.lease_dir(name);
        let made = match fs::DirBuilder::new().mode(0o755).create(&dir) {
            Ok(()) => true,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => false,
            Err(e) => return Err(SysError::io_path("mkdir", &dir, &e)),
        };
        let setup = (|| {
            let cg = Self::open_dir(h, dir.clone())?;
            if !made && cg.has_members()? {
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

    /// Opens a cgroup subidd did not make (a container's, attached to a lease) from its path as
    /// `/proc/PID/cgroup` shows it on `hierarchy`.
    pub fn at(hierarchy: &Hierarchy, cgroup_path: &Path) -> Result<Self> {
        let rel =
            cgroup_path
                .strip_prefix(&hierarchy.root)
                .map_err(|_| SysError::InvalidInput {
                    what: "cgroup path",
                    reason: format!(
                        "{} is outside the hierarchy's root {}",
                        cgroup_path.display(),
                        hierarchy.root.display()
                    ),
                })?;
        if rel.components().any(|c| !matches!(c, Component::Normal(_)))
            || rel.as_os_str().is_empty()
        {
            return Err(SysError::InvalidInput {
                what: "cgroup path",
                reason: format!("{} is not a cgroup below the root", cgroup_path.display()),
            });
        }
        Self::open_dir(hierarchy, hierarchy.mount.join(rel))
    }

    /// Opens the existing `<parent>/lease-<name>` (after a daemon restart).
    pub fn open(parent: &CgroupParent, name: &str) -> Result<Self> {
        check_name(name)?;
        Self::open_dir(&parent.hierarchy, parent.lease_dir(name))
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

    /// Whether this hierarchy has the pids controller.
    pub fn has_pids(&self) -> bool {
        self.hierarchy.pids
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

    /// Every process in the cgroup and below.
    pub fn all_procs(&self) -> Result<Vec<i32>> {
        let mut pids = Vec::new();
        for d in tree(&self.dir) {
            match read_procs(&d) {
                Ok(p) => pids.extend(p),
                Err(e) if e.errno() == Some(Errno::ENOENT) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(pids)
    }

    /// Whether any live process is in the cgroup or below (cgroup2: `populated`; v1: a member
    /// listed in `cgroup.procs`).
    pub fn has_members(&self) -> Result<bool> {
        match self.hierarchy.version {
            CgroupVersion::V2 => populated_v2(&self.dir),
            CgroupVersion::V1 => Ok(!self.all_procs()?.is_empty()),
        }
    }

    /// A handle for [`crate::Command::cgroup`] without a spawner: v2 the directory; v1 the open
    /// `cgroup.procs` (enough for a first spawn, which the daemon moves in; joins into a v1
    /// cgroup need [`start_spawner`](Self::start_spawner)).
    pub fn spawn_handle(&self) -> Result<SpawnCgroup> {
        match self.hierarchy.version {
            CgroupVersion::V2 => Ok(SpawnCgroup {
                v2_dir: Some(
                    self.dir_fd
                        .try_clone()
                        .map_err(|e| SysError::io_path("dup", &self.dir, &e))?,
                ),
                v1_procs: None,
                spawner: None,
            }),
            CgroupVersion::V1 => Ok(SpawnCgroup {
                v2_dir: None,
                v1_procs: Some(self.open_procs()?),
                spawner: None,
            }),
        }
    }

    fn open_procs(&self) -> Result<OwnedFd> {
        let file = self.dir.join("cgroup.procs");
        nix::fcntl::open(&file, OFlag::O_WRONLY | OFlag::O_CLOEXEC, Mode::empty())
            .map_err(|e| SysError::path("open", file, e))
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
            handle.spawner = Some(Arc::new(CgroupSpawner::start(self.open_procs()?)?));
        }
        Ok(handle)
    }

    /// Sends `signal` to every process of the cgroup (and below), each through a pidfd verified
    /// to still be in the cgroup; returns how many were signalled.
    pub fn signal_all(&self, signal: i32) -> Result<usize> {
        let mut sent = 0;
        for pid in self.all_procs()? {
            if self.signal_verified(pid, signal)? {
                sent += 1;
            }
        }
        Ok(sent)
    }

    /// Kills every process in the cgroup and its descendants and waits (until `deadline`) until
    /// none is left; see the module docs. Processes that are the caller's children stay zombies
    /// for the caller to reap.
    pub fn kill_all(&self, deadline: Instant) -> Result<()> {
        let mut errors = Vec::new();
        if self.hierarchy.version == CgroupVersion::V2 {
            match write_file(&self.dir.join("cgroup.kill"), b"1") {
                Ok(()) => {
                    return wait_unpopulated(&self.dir, deadline).map_err(|e| SysError::Teardown {
                        errors: vec![e, self.remaining()],
                    });
                }
                // Linux < 5.14: no cgroup.kill; fall back to the loop below.
                Err(e) if e.errno() == Some(Errno::ENOENT) => {}
                Err(e) => errors.push(e),
            }
        }
        self.kill_loop(deadline, &mut errors);
        if errors.is_empty() {
            Ok(())
        } else {
            Err(SysError::Teardown { errors })
        }
    }

    /// The processes still there, as an error naming them.
    fn remaining(&self) -> SysError {
        let pids = self.all_procs().unwrap_or_default();
        SysError::InvalidInput {
            what: "processes left",
            reason: format!("{} in {}: {pids:?}", pids.len(), self.dir.display()),
        }
    }

    /// Kills everything (see [`kill_all`](Self::kill_all)), then removes the cgroup and its
    /// children, going on after each failure.
    pub fn kill_all_and_remove(self) -> Result<()> {
        let deadline = Instant::now() + super::TEARDOWN_TIMEOUT;
        let mut errors = match self.kill_all(deadline) {
            Ok(()) => Vec::new(),
            Err(SysError::Teardown { errors }) => errors,
            Err(e) => vec![e],
        };
        remove_tree(&self.dir, deadline, &mut errors);
        if errors.is_empty() {
            Ok(())
        } else {
            Err(SysError::Teardown { errors })
        }
    }

    /// Removes the (empty) cgroup and its children.
    pub fn remove(self, deadline: Instant) -> Result<()> {
        let mut errors = Vec::new();
        remove_tree(&self.dir, deadline, &mut errors);
        if errors.is_empty() {
            Ok(())
        } else {
            Err(SysError::Teardown { errors })
        }
    }

    /// v1 (and v2 without `cgroup.kill`): no more forks (`pids.max` 0 where the hierarchy has
    /// pids), freeze if possible, SIGKILL all through verified pidfds, thaw, until nothing is
    /// left.
    fn kill_loop(&self, deadline: Instant, errors: &mut Vec<SysError>) {
        let freezer = self.hierarchy.freezer && self.hierarchy.version == CgroupVersion::V1;
        if self.hierarchy.pids
            && let Err(e) = write_file(&self.dir.join("pids.max"), b"0")
        {
            errors.push(e);
        }
        let mut pause = Duration::from_micros(200);
        loop {
            let pids = match self.all_procs() {
                Ok(p) => p,
                Err(e) => {
                    errors.push(e);
                    return;
                }
            };
            if pids.is_empty() {
                return;
            }
            if Instant::now() > deadline {
                errors.push(SysError::path(
                    "kill (processes remain)",
                    &self.dir,
                    Errno::ETIMEDOUT,
                ));
                errors.push(self.remaining());
                return;
            }
            if freezer {
                let _ = write_file(&self.dir.join("freezer.state"), b"FROZEN");
            }
            for pid in pids {
                if let Err(e) = self.signal_verified(pid, libc::SIGKILL) {
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

    /// Sends `signal` to `pid` through a pidfd, after checking (through that pidfd's verified
    /// /proc dir) that it is still in this cgroup, so a reused pid is never signalled. False when
    /// it was not ours (any more).
    fn signal_verified(&self, pid: i32, signal: i32) -> Result<bool> {
        let fd = match PidFd::open(pid) {
            Ok(fd) => fd,
            Err(e) if e.errno() == Some(Errno::ESRCH) => return Ok(false),
            Err(e) => return Err(e),
        };
        let text = match fd.proc_dir().and_then(|d| d.read_to_string("cgroup")) {
            Ok(t) => t,
            Err(SysError::ProcessGone { .. }) => return Ok(false),
            Err(e) if e.errno() == Some(Errno::ESRCH) => return Ok(false),
            Err(e) => return Err(e),
        };
        if !self.member_text(&text) {
            return Ok(false); // left the cgroup, or the pid was reused: not ours
        }
        match fd.send_signal(signal) {
            Err(SysError::ProcessGone { .. }) => Ok(false),
            Err(e) if e.errno() == Some(Errno::ESRCH) => Ok(false),
            Err(e) => Err(e),
            Ok(()) => Ok(true),
        }
    }
}

impl AsRawFd for LeaseCgroup {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.dir_fd.as_raw_fd()
    }
}

/// Every cgroup of one lease: the tracking one (where all its processes live), the pids one
/// when that is on another hierarchy, and the v1 spawner while one runs.
#[derive(Debug)]
pub struct LeaseCgroups {
    track: LeaseCgroup,
    /// `pids_max` on the v1 pids hierarchy beside a cgroup2 tracking hierarchy.
    cap: Option<LeaseCgroup>,
    pids_max: Option<u64>,
    spawner: Option<Arc<CgroupSpawner>>,
}

impl LeaseCgroups {
    /// Opens the lease's cgroups, or makes those that are missing (after a restart, or a reboot
    /// that emptied cgroupfs, they are opened or made again), with `pids_max` set. `pids_max`
    /// where no pids controller can be used is [`SysError::Unsupported`], nothing made.
    pub fn open_or_create(
        parents: &CgroupParents,
        name: &str,
        pids_max: Option<u64>,
    ) -> Result<Self> {
        if pids_max.is_some() {
            parents.can_cap()?;
        }
        let track = open_or_make(
            &parents.track,
            name,
            pids_max.filter(|_| parents.track.hierarchy.pids),
        )?;
        let cap = match (&parents.cap, pids_max) {
            (Some(parent), Some(_)) => match open_or_make(parent, name, pids_max) {
                Ok(cg) => Some(cg),
                Err(e) => {
                    // Nothing half-made: the tracking cgroup goes again if it is empty.
                    if !track.has_members().unwrap_or(true) {
                        let _ = track.remove(Instant::now() + Duration::from_secs(1));
                    }
                    return Err(e);
                }
            },
            _ => None,
        };
        Ok(LeaseCgroups {
            track,
            cap,
            pids_max,
            spawner: None,
        })
    }

    /// Opens what exists of a lease's cgroups (for a teardown after a restart); `None` when
    /// there is no tracking cgroup.
    pub fn open_existing(parents: &CgroupParents, name: &str) -> Option<Self> {
        let track = LeaseCgroup::open(&parents.track, name).ok()?;
        let cap = parents
            .cap
            .as_ref()
            .and_then(|p| LeaseCgroup::open(p, name).ok());
        Some(LeaseCgroups {
            track,
            cap,
            pids_max: None,
            spawner: None,
        })
    }

    /// The tracking cgroup.
    pub fn track(&self) -> &LeaseCgroup {
        &self.track
    }

    /// The cgroup with the lease's `pids.max`, if it has one.
    fn pids_cgroup(&self) -> Option<&LeaseCgroup> {
        self.cap
            .as_ref()
            .or(Some(&self.track).filter(|t| t.hierarchy.pids))
    }

    /// The v1 cgroup children must be born in, if any (the tracking one on a pure v1 host, the
    /// pids one on a hybrid).
    fn v1(&self) -> Option<&LeaseCgroup> {
        [Some(&self.track), self.cap.as_ref()]
            .into_iter()
            .flatten()
            .find(|c| c.version() == CgroupVersion::V1)
    }

    /// The handle the lease's next spawn goes through. A v1 cgroup gets a spawner (started now,
    /// or again if the last one died) and, while it runs, `pids.max` = `pids_max` + 1, since
    /// the spawner itself is one of the cgroup's processes.
    pub fn spawn_handle(&mut self) -> Result<SpawnCgroup> {
        let v2_dir = [Some(&self.track), self.cap.as_ref()]
            .into_iter()
            .flatten()
            .find(|c| c.version() == CgroupVersion::V2)
            .map(|c| {
                c.dir_fd
                    .try_clone()
                    .map_err(|e| SysError::io_path("dup", &c.dir, &e))
            })
            .transpose()?;
        let Some(v1) = self.v1() else {
            return Ok(SpawnCgroup {
                v2_dir,
                v1_procs: None,
                spawner: None,
            });
        };
        let v1_procs = Some(v1.open_procs()?);
        let alive = self.spawner.as_ref().is_some_and(|s| !s.is_gone());
        let started = if alive {
            None
        } else {
            let limited = v1.has_pids() && self.pids_max.is_some();
            if limited {
                v1.set_pids_max(self.pids_max.map(|n| n.saturating_add(1)))?;
            }
            match CgroupSpawner::start(v1.open_procs()?) {
                Ok(spawner) => Some(Arc::new(spawner)),
                Err(e) => {
                    if limited {
                        let _ = v1.set_pids_max(self.pids_max);
                    }
                    return Err(e);
                }
            }
        };
        if let Some(spawner) = started {
            self.spawner = Some(spawner);
        }
        Ok(SpawnCgroup {
            v2_dir,
            v1_procs,
            spawner: self.spawner.clone(),
        })
    }

    /// `pids.current` without the spawner, and the forks refused at the cap; `None` when the
    /// lease has no cap.
    pub fn pids_usage(&self) -> Option<(u64, u64)> {
        self.pids_max?;
        let cg = self.pids_cgroup()?;
        let spawner = u64::from(
            self.spawner.as_ref().is_some_and(|s| !s.is_gone())
                && cg.version() == CgroupVersion::V1,
        );
        let current = cg.pids_current().ok()?;
        let denied = cg.pids_events_max().ok()?;
        Some((current.saturating_sub(spawner), denied))
    }

    /// The lease's processes (the tracking cgroup's tree; the spawner is never in it, except on
    /// a pure v1 host, where it is left out).
    pub fn members(&self) -> Result<Vec<i32>> {
        let mut pids = self.track.all_procs()?;
        if self.track.version() == CgroupVersion::V1
            && let Some(spawner) = &self.spawner
        {
            pids.retain(|&p| p != spawner.pid());
        }
        Ok(pids)
    }

    /// Whether any process of the lease lives.
    pub fn populated(&self) -> Result<bool> {
        match self.track.version() {
            CgroupVersion::V2 => populated_v2(&self.track.dir),
            CgroupVersion::V1 => Ok(!self.members()?.is_empty()),
        }
    }

    /// Sends `signal` to every process of the lease (see [`LeaseCgroup::signal_all`]).
    pub fn signal(&self, signal: i32) -> Result<usize> {
        let spawner = self.spawner.as_ref().map(|s| s.pid());
        let mut sent = 0;
        for pid in self.track.all_procs()? {
            if Some(pid) != spawner && self.track.signal_verified(pid, signal)? {
                sent += 1;
            }
        }
        Ok(sent)
    }

    /// Stops the spawner, then kills every process of the lease and waits until none is left
    /// or `deadline` passes (then the error names what is left).
    pub fn kill(&mut self, deadline: Instant) -> Result<()> {
        self.spawner = None; // the helper exits once the last handle is gone
        self.track.kill_all(deadline)
    }

    /// Removes the lease's cgroups (after [`kill`](Self::kill)), children first, going on after
    /// each failure. Anything still in the pids cgroup (a spawner still exiting) is killed.
    pub fn remove(mut self, deadline: Instant) -> Result<()> {
        self.spawner = None;
        let mut errors = Vec::new();
        if let Some(cap) = self.cap.take() {
            if let Err(e) = cap.kill_all(deadline) {
                errors.push(e);
            }
            remove_tree(&cap.dir, deadline, &mut errors);
        }
        remove_tree(&self.track.dir, deadline, &mut errors);
        if errors.is_empty() {
            Ok(())
        } else {
            Err(SysError::Teardown { errors })
        }
    }
}

/// Opens `<parent>/lease-<name>` (setting its `pids.max` when the hierarchy has pids), or makes it.
fn open_or_make(parent: &CgroupParent, name: &str, pids_max: Option<u64>) -> Result<LeaseCgroup> {
    match LeaseCgroup::open(parent, name) {
        Ok(cg) => {
            if cg.has_pids() {
                cg.set_pids_max(pids_max)?;
            }
            Ok(cg)
        }
        Err(_) => LeaseCgroup::create(parent, name, pids_max),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        // Kernel interface names are fine: the directory is `lease-<name>`.
        for ok in [
            "db-1",
            "a",
            "lease_2.x",
            "tasks",
            "cgroup.procs",
            "pids.max",
        ] {
            assert!(check_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", ".", "..", "a/b", "a b", ".hidden"] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
    }
}
