//! The host's cgroup hierarchies as this process sees them: which one tracks the leases'
//! processes, which one has the `pids` controller, and the daemon's own place in each.

use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};

use crate::error::{Result, SysError};

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

impl CgroupVersion {
    /// `"v1"` or `"v2"`.
    pub fn as_str(self) -> &'static str {
        match self {
            CgroupVersion::V1 => "v1",
            CgroupVersion::V2 => "v2",
        }
    }
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
    pub(crate) fn cgroup_path_of(&self, dir: &Path) -> Option<PathBuf> {
        Some(self.root.join(dir.strip_prefix(&self.mount).ok()?))
    }

    /// The line of a `/proc/PID/cgroup` text that belongs to this hierarchy: its path (v1: the
    /// line with `pids`).
    pub fn path_in(&self, proc_cgroup: &str) -> Option<PathBuf> {
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
    /// Version of the hierarchy that holds every lease's processes (`"v2"`/`"v1"`), if any.
    pub tracking_version: Option<&'static str>,
    /// Where that hierarchy is mounted.
    pub tracking_mount: Option<PathBuf>,
    /// The directory lease cgroups are made in, on the tracking hierarchy (filled in by the
    /// daemon once it has prepared it).
    pub lease_parent: Option<PathBuf>,
    /// The directory capped leases' pids cgroups are made in (filled in by the daemon).
    pub pids_parent: Option<PathBuf>,
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

    /// The hierarchy that holds every lease's processes: cgroup2 when mounted (it needs no
    /// controller for that, and `cgroup.kill` and `clone3(CLONE_INTO_CGROUP)` work there), else
    /// the v1 hierarchy with `pids` (whose `pids.max` 0 stops forks during a teardown).
    pub fn tracking(&self) -> Option<&Hierarchy> {
        self.unified.as_ref().or(self
            .pids
            .as_ref()
            .filter(|h| h.version == CgroupVersion::V1))
    }

    /// The tracking hierarchy, or [`SysError::Unsupported`] naming why there is none.
    pub fn require_tracking(&self) -> Result<&Hierarchy> {
        self.tracking().ok_or_else(|| SysError::Unsupported {
            what: "lease cgroups",
            reason: "no cgroup2 mount and no v1 hierarchy with the pids controller: processes \
                     cannot be held in a cgroup of their lease"
                .into(),
        })
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
            pids_version: self.pids.as_ref().map(|h| h.version.as_str()),
            pids_mount: self.pids.as_ref().map(|h| h.mount.clone()),
            own_cgroup: self.pids.as_ref().map(|h| h.own_dir.clone()),
            unified_mount: self.unified.as_ref().map(|h| h.mount.clone()),
            tracking_version: self.tracking().map(|h| h.version.as_str()),
            tracking_mount: self.tracking().map(|h| h.mount.clone()),
            lease_parent: None,
            pids_parent: None,
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
}
