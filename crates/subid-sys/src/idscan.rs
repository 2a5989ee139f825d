//! Which host ids live processes hold: the scan behind "no block is issued while a process holds
//! an id in it".
//!
//! Every process's `/proc/<pid>/status` names its real, effective, saved and filesystem uids and
//! gids and its supplementary groups (proc(5)). Reading it for every process costs a few
//! microseconds each, so [`IdScanner`] keeps what it read per pid: [`IdScanner::refresh`] lists
//! `/proc` and reads only pids it has not seen (new processes), [`IdScanner::rescan`] reads them
//! all again. A pid is "seen" by its number and the inode of its `/proc/<pid>` entry, which
//! `readdir` gives for free and which is new for a new process that reuses the number (procfs
//! makes a new inode for each `struct pid`): on a host with `pid_max` 32768 and many short
//! processes a number comes back within seconds, and a scanner keyed by the number alone would
//! never read the newcomer's ids. A process changes its ids only with CAP_SETUID/CAP_SETGID over the target ids, which
//! inside a lease's user namespace covers only that lease's own range, so a process can take ids
//! of a free block only from outside every lease (a root process of the host): a refresh before
//! each issue finds new processes at once, and the periodic rescan finds such id changes.

use std::collections::HashMap;
use std::fs;
use std::io::Read;
use std::os::unix::fs::DirEntryExt;
use std::path::{Path, PathBuf};

use crate::error::{Result, SysError};

/// Most ids remembered per process (the 8 credentials plus supplementary groups); a process with
/// more supplementary groups than fit is remembered by its first ones only, which are the ones
/// `status` lists first (the kernel's order).
const MAX_IDS: usize = 64;

/// What one process holds, as its `status` showed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdHolder {
    /// The pid (in the daemon's pid namespace).
    pub pid: i32,
    /// Its command name (`Name:`), for reports.
    pub name: String,
    /// Its uids: real, effective, saved, filesystem.
    pub uids: Vec<u32>,
    /// Its gids: real, effective, saved, filesystem, then the supplementary groups.
    pub gids: Vec<u32>,
}

impl IdHolder {
    /// The first id this process holds in `lo..hi` (uid or gid), with its kind ("uid" or "gid").
    pub fn holds_in(&self, lo: u64, hi: u64) -> Option<(&'static str, u32)> {
        let inside = |id: &&u32| (lo..hi).contains(&u64::from(**id));
        self.uids
            .iter()
            .find(inside)
            .map(|&id| ("uid", id))
            .or_else(|| self.gids.iter().find(inside).map(|&id| ("gid", id)))
    }
}

/// The ids of every live process, kept up to date by [`refresh`](Self::refresh) and
/// [`rescan`](Self::rescan).
#[derive(Debug)]
pub struct IdScanner {
    proc_root: PathBuf,
    known: HashMap<i32, IdHolder>,
    /// The inode of each known pid's `/proc` entry when it was read.
    inodes: HashMap<i32, u64>,
}

impl Default for IdScanner {
    fn default() -> Self {
        Self::new()
    }
}

impl IdScanner {
    /// A scanner of the host's `/proc`, empty until the first refresh.
    pub fn new() -> Self {
        Self::with_proc_root(Path::new("/proc"))
    }

    /// A scanner of another proc root (a fake tree in tests).
    pub fn with_proc_root(root: &Path) -> Self {
        IdScanner {
            proc_root: root.to_path_buf(),
            known: HashMap::new(),
            inodes: HashMap::new(),
        }
    }

    /// Lists the live pids, forgets those gone, and reads the ids of the pids not seen before.
    /// Returns how many processes were read.
    pub fn refresh(&mut self) -> Result<usize> {
        self.scan(false)
    }

    /// Reads the ids of every live process again (ids of known processes may have changed).
    pub fn rescan(&mut self) -> Result<usize> {
        self.scan(true)
    }

    /// The processes as last read.
    pub fn holders(&self) -> impl Iterator<Item = &IdHolder> {
        self.known.values()
    }

    fn scan(&mut self, all: bool) -> Result<usize> {
        let entries = fs::read_dir(&self.proc_root)
            .map_err(|e| SysError::io_path("readdir", &self.proc_root, &e))?;
        let mut live = Vec::with_capacity(self.known.len() + 16);
        let mut read = 0;
        let mut buf = Vec::with_capacity(2048);
        for entry in entries.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<i32>().ok())
            else {
                continue;
            };
            live.push(pid);
            let inode = entry.ino();
            if !all && self.known.contains_key(&pid) && self.inodes.get(&pid) == Some(&inode) {
                continue;
            }
            self.inodes.insert(pid, inode);
            buf.clear();
            let path = self.proc_root.join(pid.to_string()).join("status");
            // A process that exits meanwhile is simply not there any more.
            let Ok(mut file) = fs::File::open(&path) else {
                self.known.remove(&pid);
                continue;
            };
            if file.read_to_end(&mut buf).is_err() {
                self.known.remove(&pid);
                continue;
            }
            read += 1;
            match parse_status(pid, &buf) {
                Some(holder) => {
                    self.known.insert(pid, holder);
                }
                None => {
                    self.known.remove(&pid);
                }
            }
        }
        live.sort_unstable();
        self.known.retain(|pid, _| live.binary_search(pid).is_ok());
        self.inodes.retain(|pid, _| live.binary_search(pid).is_ok());
        Ok(read)
    }
}

/// The ids of a `status` text; `None` for a zombie (it holds nothing any more: it runs nothing and
/// its credentials go with its reaping) or a text without `Uid:`/`Gid:` lines.
pub fn parse_status(pid: i32, text: &[u8]) -> Option<IdHolder> {
    let text = String::from_utf8_lossy(text);
    let mut name = String::new();
    let mut uids = Vec::new();
    let mut gids = Vec::new();
    let mut groups = Vec::new();
    for line in text.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let ids = || {
            value
                .split_whitespace()
                .filter_map(|v| v.parse::<u32>().ok())
                .take(MAX_IDS)
        };
        match key {
            "Name" => name = value.trim().chars().take(64).collect(),
            "State" if value.trim_start().starts_with(['Z', 'X']) => return None,
            "Uid" => uids = ids().collect(),
            "Gid" => gids = ids().collect(),
            "Groups" => groups = ids().collect(),
            _ => {}
        }
    }
    if uids.is_empty() || gids.is_empty() {
        return None;
    }
    gids.extend(groups);
    gids.truncate(MAX_IDS);
    Some(IdHolder {
        pid,
        name,
        uids,
        gids,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const STATUS: &str = "Name:\tsleep\nUmask:\t0022\nState:\tS (sleeping)\nTgid:\t42\n\
        Uid:\t1879048200\t1879048200\t1879048200\t1879048200\n\
        Gid:\t5\t5\t5\t5\nGroups:\t7 1879113729 \n";

    #[test]
    fn status_lines_give_every_id() {
        let h = parse_status(42, STATUS.as_bytes()).expect("holder");
        assert_eq!(h.name, "sleep");
        assert_eq!(h.uids, vec![1879048200; 4]);
        assert_eq!(h.gids, vec![5, 5, 5, 5, 7, 1879113729]);
        assert_eq!(
            h.holds_in(1879048192, 1879048192 + 65536),
            Some(("uid", 1879048200))
        );
        assert_eq!(
            h.holds_in(1879113728, 1879113728 + 65536),
            Some(("gid", 1879113729))
        );
        assert_eq!(h.holds_in(0, 5), None);
    }

    #[test]
    fn zombies_and_garbage_hold_nothing() {
        let zombie = STATUS.replace("S (sleeping)", "Z (zombie)");
        assert_eq!(parse_status(1, zombie.as_bytes()), None);
        assert_eq!(parse_status(1, b"garbage"), None);
        assert_eq!(parse_status(1, b"Uid:\t1\t1\t1\t1\n"), None);
    }

    #[test]
    fn refresh_reads_new_pids_and_forgets_gone_ones() {
        let root = tempfile::tempdir().expect("tempdir");
        let add = |pid: i32, uid: u32| {
            let dir = root.path().join(pid.to_string());
            fs::create_dir_all(&dir).expect("mkdir");
            fs::write(
                dir.join("status"),
                STATUS.replace("1879048200", &uid.to_string()),
            )
            .expect("write");
        };
        add(10, 100);
        add(11, 200);
        fs::create_dir_all(root.path().join("self")).expect("mkdir");
        let mut scanner = IdScanner::with_proc_root(root.path());
        assert_eq!(scanner.refresh().expect("refresh"), 2);
        assert_eq!(
            scanner.refresh().expect("refresh"),
            0,
            "known pids not read again"
        );
        // A known pid whose ids changed shows only after a rescan.
        add(10, 300);
        scanner.refresh().expect("refresh");
        assert!(scanner.holders().any(|h| h.uids[0] == 100));
        assert_eq!(scanner.rescan().expect("rescan"), 2);
        assert!(scanner.holders().any(|h| h.uids[0] == 300));
        fs::remove_dir_all(root.path().join("11")).expect("rm");
        scanner.refresh().expect("refresh");
        assert_eq!(scanner.holders().count(), 1);
        // Pid 10 is reused by a new process between two refreshes (a new /proc entry: the new
        // directory is made while the old one still exists, so its inode differs).
        fs::rename(root.path().join("10"), root.path().join("old-10")).expect("mv");
        add(10, 400);
        fs::remove_dir_all(root.path().join("old-10")).expect("rm");
        assert_eq!(
            scanner.refresh().expect("refresh"),
            1,
            "the newcomer is read"
        );
        assert!(
            scanner.holders().any(|h| h.pid == 10 && h.uids[0] == 400),
            "the reused pid shows the new process's ids"
        );
    }

    #[test]
    fn the_real_proc_lists_this_process() {
        let mut scanner = IdScanner::new();
        scanner.refresh().expect("refresh");
        let me = i32::try_from(std::process::id()).expect("pid");
        let uid = nix::unistd::getuid().as_raw();
        assert!(
            scanner.holders().any(|h| h.pid == me && h.uids[0] == uid),
            "this process is found with its uid"
        );
    }
}
