//! The wrapper's state directory: one directory per container (`c/<id>`) with its mounts and
//! a record of what create did, locked (`flock`) while a call works on it, so that the sweep of
//! another call leaves it alone.

use std::fs::{self, File};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

use crate::error::{Result, RuncError};
use crate::rootfs::{Covered, Layout};

/// The record's file name in a container's directory.
pub const RECORD: &str = "record.json";
/// The record while it is written.
pub const RECORD_TMP: &str = "record.json.tmp";

/// What a create did, for the delete (or the sweep) that undoes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub id: String,
    pub lease: String,
    /// `join` or `map`.
    pub mode: String,
    /// The runtime's state directory (`--root`): the container exists while `<root>/<id>` does.
    pub runtime_root: PathBuf,
    /// The overlay stacked over the runtime's root path, if any.
    pub covered: Option<Covered>,
}

/// The state directory.
#[derive(Debug, Clone)]
pub struct StateDir {
    root: PathBuf,
}

impl StateDir {
    /// Makes the directory (mode 0711) and its `c/`, and makes it a private mount, so that what
    /// is mounted under it does not propagate into other mount namespaces (mount_namespaces(7)).
    pub fn open(root: &Path) -> Result<StateDir> {
        let containers = root.join("c");
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o711)
            .create(&containers)
            .map_err(|e| RuncError::io("mkdir", &containers, e))?;
        for dir in [root, containers.as_path()] {
            fs::set_permissions(dir, fs::Permissions::from_mode(0o711))
                .map_err(|e| RuncError::io("chmod", dir, e))?;
        }
        // Once: a mount point already is one we made (reading the mount table each call
        // would cost as much as the rest of a delete on a host with many mounts).
        if !is_mount_point(root) {
            subid_sys::userns::make_private_mount(root)
                .map_err(|e| RuncError::sys("make the state directory a private mount", e))?;
        }
        Ok(StateDir {
            root: root.to_path_buf(),
        })
    }

    /// Whether the leases' sweep is due: none in the last `interval` (the time of the last is
    /// a file's modification time). Marks it done now when due.
    pub fn sweep_due(&self, interval: Duration) -> bool {
        let mark = self.root.join("swept");
        let recent = fs::metadata(&mark)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age < interval);
        if recent {
            return false;
        }
        let _ = fs::write(&mark, b"");
        true
    }

    /// The layout of container `id` (which must be a valid id, see [`valid_id`]).
    pub fn container(&self, id: &str) -> Layout {
        Layout {
            dir: self.root.join("c").join(id),
        }
    }

    /// The containers that have a directory.
    pub fn containers(&self) -> Vec<String> {
        let Ok(entries) = fs::read_dir(self.root.join("c")) else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter_map(|e| e.file_name().to_str().map(str::to_string))
            .filter(|id| valid_id(id))
            .collect()
    }
}

/// Whether `dir` is the root of a mount: its mount id (`mnt_id` of /proc/self/fdinfo,
/// proc(5)) differs from its parent's.
fn is_mount_point(dir: &Path) -> bool {
    let mnt_id = |path: &Path| -> Option<u64> {
        use std::os::fd::AsRawFd;
        let file = File::open(path).ok()?;
        let info = fs::read_to_string(format!("/proc/self/fdinfo/{}", file.as_raw_fd())).ok()?;
        info.lines()
            .find_map(|l| l.strip_prefix("mnt_id:"))
            .and_then(|v| v.trim().parse().ok())
    };
    match (mnt_id(dir), dir.parent().and_then(mnt_id)) {
        (Some(own), Some(parent)) => own != parent,
        _ => false,
    }
}

/// Whether `id` can name a directory: runc's container id characters (`[A-Za-z0-9_+.-]`), not
/// `.` or `..`, at most 1024 bytes.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 1024
        && id != "."
        && id != ".."
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'+' | b'.' | b'-'))
}

/// A held lock on a container's directory; released on drop.
#[derive(Debug)]
pub struct Lock {
    _file: Flock<File>,
}

/// Locks the container's directory, waiting at most `wait`. `Ok(None)` when it does not exist.
pub fn lock(layout: &Layout, id: &str, wait: Duration) -> Result<Option<Lock>> {
    let deadline = Instant::now() + wait;
    loop {
        match try_lock(layout)? {
            Attempt::Held(lock) => return Ok(Some(lock)),
            Attempt::Absent => return Ok(None),
            Attempt::Busy if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Attempt::Busy => {
                return Err(RuncError::Locked {
                    id: id.to_string(),
                    seconds: wait.as_secs(),
                });
            }
        }
    }
}

/// The outcome of one try at a lock.
#[derive(Debug)]
pub enum Attempt {
    Held(Lock),
    Busy,
    Absent,
}

/// One non-blocking try.
pub fn try_lock(layout: &Layout) -> Result<Attempt> {
    let file = match File::open(&layout.dir) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Attempt::Absent),
        Err(e) => return Err(RuncError::io("open", &layout.dir, e)),
    };
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(file) => Ok(Attempt::Held(Lock { _file: file })),
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => Ok(Attempt::Busy),
        Err((_, e)) => Err(RuncError::io("flock", &layout.dir, e.into())),
    }
}

impl Layout {
    /// Makes the container's directory, root's alone (mode 0700, also when an earlier create
    /// left it) until [`Layout::open_to`].
    pub fn make(&self) -> Result<()> {
        match fs::DirBuilder::new().mode(0o700).create(&self.dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                nix::unistd::chown(&self.dir, Some(0.into()), Some(0.into()))
                    .map_err(|e| RuncError::io("chown", &self.dir, e.into()))?;
                fs::set_permissions(&self.dir, fs::Permissions::from_mode(0o700))
                    .map_err(|e| RuncError::io("chmod", &self.dir, e))
            }
            Err(e) => Err(RuncError::io("mkdir", &self.dir, e)),
        }
    }

    /// Opens the directory to the lease's root: mode 0710, group `gid`.
    pub fn open_to(&self, gid: u32) -> Result<()> {
        nix::unistd::chown(&self.dir, Some(0.into()), Some(gid.into()))
            .map_err(|e| RuncError::io("chown", &self.dir, e.into()))?;
        fs::set_permissions(&self.dir, fs::Permissions::from_mode(0o710))
            .map_err(|e| RuncError::io("chmod", &self.dir, e))
    }

    /// Writes the record (a temp file renamed over it).
    pub fn write_record(&self, record: &Record) -> Result<()> {
        let path = self.dir.join(RECORD);
        let tmp = self.dir.join(RECORD_TMP);
        let bytes = serde_json::to_vec(record).map_err(|e| RuncError::Spec {
            bundle: self.dir.clone(),
            reason: e.to_string(),
        })?;
        fs::write(&tmp, bytes).map_err(|e| RuncError::io("write", &tmp, e))?;
        fs::rename(&tmp, &path).map_err(|e| RuncError::io("rename", &path, e))
    }

    /// The record, if one was written and reads back.
    pub fn read_record(&self) -> Option<Record> {
        let bytes = fs::read(self.dir.join(RECORD)).ok()?;
        serde_json::from_slice(&bytes).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_points_are_told_from_directories() {
        assert!(is_mount_point(Path::new("/proc")));
        let dir = tempfile::tempdir().unwrap();
        assert!(!is_mount_point(dir.path()));
    }

    #[test]
    fn the_lease_sweep_is_due_once_per_interval() {
        let dir = tempfile::tempdir().unwrap();
        let states = StateDir {
            root: dir.path().to_path_buf(),
        };
        assert!(states.sweep_due(Duration::from_secs(30)));
        assert!(!states.sweep_due(Duration::from_secs(30)));
        assert!(states.sweep_due(Duration::ZERO));
    }

    #[test]
    fn ids_that_can_name_a_directory() {
        assert!(valid_id(&"a".repeat(64)));
        assert!(valid_id("web_1.2+x-y"));
        for bad in ["", ".", "..", "a/b", "a b", "é"] {
            assert!(!valid_id(bad), "{bad:?}");
        }
        assert!(!valid_id(&"a".repeat(1025)));
    }

    #[test]
    fn a_locked_directory_is_busy_for_others_and_records_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout {
            dir: dir.path().join("c1"),
        };
        assert!(matches!(try_lock(&layout).unwrap(), Attempt::Absent));
        layout.make().unwrap();
        let held = lock(&layout, "c1", Duration::from_secs(1))
            .unwrap()
            .unwrap();
        assert!(matches!(try_lock(&layout).unwrap(), Attempt::Busy));
        assert!(matches!(
            lock(&layout, "c1", Duration::from_millis(50)),
            Err(RuncError::Locked { .. })
        ));
        drop(held);
        assert!(matches!(try_lock(&layout).unwrap(), Attempt::Held(_)));
        let record = Record {
            id: "c1".into(),
            lease: "docker-c1".into(),
            mode: "join".into(),
            runtime_root: "/run/runc".into(),
            covered: Some(Covered {
                path: "/d/merged".into(),
                dev: 42,
            }),
        };
        assert!(layout.read_record().is_none());
        layout.write_record(&record).unwrap();
        assert_eq!(layout.read_record(), Some(record));
    }
}
