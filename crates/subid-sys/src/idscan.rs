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
//! never read the newcomer's ids.
//!
//! A process changes its ids only with CAP_SETUID/CAP_SETGID over the target ids, which inside a
//! lease's user namespace covers only that lease's own range, so a process can take ids of a free
//! block only from outside every lease (a root process of the host). Such a process most often
//! changes them right after it starts (`su`, `setpriv`, `runuser`, a daemon dropping to its
//! user), maybe just after a scan read it as root: so a refresh also reads again every process
//! that was root with CAP_SETUID or CAP_SETGID in its permitted set when last read and that the
//! scanner first read less than [`YOUNG`] ago. The cost follows how many root processes started
//! in that time, not how many run. A process that changes its ids later in its life is found by
//! the periodic rescan.

use std::collections::HashMap;
use std::fs;
use std::io::Read;
use std::os::unix::fs::DirEntryExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::error::{Result, SysError};

/// Most ids remembered per process (the 8 credentials plus supplementary groups); a process with
/// more supplementary groups than fit is remembered by its first ones only, which are the ones
/// `status` lists first (the kernel's order).
const MAX_IDS: usize = 64;

/// How long after the scanner first read a root process with CAP_SETUID or CAP_SETGID a refresh
/// reads it again, in case it changed its ids since (see the module's doc).
pub const YOUNG: Duration = Duration::from_secs(10);

/// CAP_SETGID and CAP_SETUID (capability numbers 6 and 7) as bits of a `Cap*:` mask.
const SET_ID_CAPS: u64 = (1 << 6) | (1 << 7);

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
    /// Whether it may take other ids at any moment: one of its uids is 0 and its permitted
    /// capabilities (`CapPrm:`) include CAP_SETUID or CAP_SETGID.
    pub may_set_ids: bool,
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
    /// The inode of each known pid's `/proc` entry and when the scanner first read it.
    seen: HashMap<i32, (u64, Instant)>,
    /// [`YOUNG`], shorter in tests.
    young: Duration,
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
            seen: HashMap::new(),
            young: YOUNG,
        }
    }

    /// Reads processes that may set their ids again for `young` after first reading them,
    /// instead of [`YOUNG`] (tests).
    pub fn with_young(mut self, young: Duration) -> Self {
        self.young = young;
        self
    }

    /// Lists the live pids, forgets those gone, and reads the ids of the pids not seen before,
    /// and of the young root processes that may have changed them (see the module's doc).
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
        let now = Instant::now();
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
            let first_read = match self.seen.get(&pid) {
                Some(&(known_inode, first)) if known_inode == inode => {
                    let settled = || {
                        !self.known.get(&pid).is_some_and(|h| h.may_set_ids)
                            || now.duration_since(first) >= self.young
                    };
                    if !all && self.known.contains_key(&pid) && settled() {
                        continue;
                    }
                    first
                }
                _ => now,
            };
            self.seen.insert(pid, (inode, first_read));
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
        self.seen.retain(|pid, _| live.binary_search(pid).is_ok());
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
    let mut permitted = 0u64;
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
            "CapPrm" => permitted = u64::from_str_radix(value.trim(), 16).unwrap_or(0),
            _ => {}
        }
    }
    if uids.is_empty() || gids.is_empty() {
        return None;
    }
    gids.extend(groups);
    gids.truncate(MAX_IDS);
    let may_set_ids = uids.contains(&0) && permitted & SET_ID_CAPS != 0;
    Some(IdHolder {
        pid,
        name,
        uids,
        gids,
        may_set_ids,
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

    /// A root process read just before it takes other ids (`setpriv --reuid=...` between fork
    /// and exec) is read again by the next refresh while it is young; a process without the
    /// capabilities to change its ids, or an old one, is not.
    #[test]
    fn a_young_root_process_is_read_again_in_case_it_took_other_ids() {
        let root = tempfile::tempdir().expect("tempdir");
        let write = |pid: i32, uid: u32, cap_prm: &str| {
            let dir = root.path().join(pid.to_string());
            fs::create_dir_all(&dir).expect("mkdir");
            let status = STATUS.replace("1879048200", &uid.to_string());
            fs::write(dir.join("status"), format!("{status}CapPrm:\t{cap_prm}\n")).expect("write");
        };
        let all_caps = "000001ffffffffff";
        write(20, 0, all_caps);
        write(21, 0, "0000000000000000");
        write(22, 1000, all_caps);
        let holds = |scanner: &IdScanner, pid: i32| {
            scanner
                .holders()
                .find(|h| h.pid == pid)
                .map(|h| h.uids[0])
                .expect("known")
        };

        let mut scanner = IdScanner::with_proc_root(root.path());
        assert_eq!(scanner.refresh().expect("refresh"), 3);
        assert!(scanner.holders().any(|h| h.pid == 20 && h.may_set_ids));
        assert!(scanner.holders().any(|h| h.pid == 21 && !h.may_set_ids));
        assert!(scanner.holders().any(|h| h.pid == 22 && !h.may_set_ids));
        // Each takes a pool uid (as only pid 20 could) and drops its capabilities.
        for pid in [20, 21, 22] {
            write(pid, 1879048200, "0000000000000000");
        }
        assert_eq!(
            scanner.refresh().expect("refresh"),
            1,
            "only the young root process with CAP_SETUID is read again"
        );
        assert_eq!(holds(&scanner, 20), 1879048200, "its new uid is seen");
        assert_eq!(holds(&scanner, 21), 0, "not read again");
        assert_eq!(scanner.refresh().expect("refresh"), 0, "settled: not again");

        // Past the young time, a root process is left to the rescan.
        let mut scanner = IdScanner::with_proc_root(root.path()).with_young(Duration::ZERO);
        write(20, 0, all_caps);
        assert_eq!(scanner.refresh().expect("refresh"), 3);
        write(20, 1879048200, "0000000000000000");
        assert_eq!(
            scanner.refresh().expect("refresh"),
            0,
            "old: not read again"
        );
        assert_eq!(holds(&scanner, 20), 0);
        scanner.rescan().expect("rescan");
        assert_eq!(holds(&scanner, 20), 1879048200, "the rescan reads it");
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
