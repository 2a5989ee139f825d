//! The processes of a lease's namespace, found through /proc, however they got there (children
//! of children included), and their identity (pid + start time) for re-adoption after a restart.

use std::os::unix::fs::MetadataExt;

use nix::fcntl::OFlag;

use crate::error::{Result, SysError};
use crate::pidfd::{PidFd, ProcDir};
use crate::userns::ns_inode;

/// Every live process whose user namespace has inode `ns_ino`, each held by a pidfd that was
/// checked, after opening, to still be in that namespace (so a pid reused meanwhile is skipped).
pub fn userns_members(ns_ino: u64) -> Result<Vec<PidFd>> {
    let entries =
        std::fs::read_dir("/proc").map_err(|e| SysError::io_path("readdir", "/proc", &e))?;
    let mut members = Vec::new();
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        // stat() follows the magic link to the nsfs inode; a process that is gone is skipped.
        let Ok(meta) = std::fs::metadata(format!("/proc/{pid}/ns/user")) else {
            continue;
        };
        if meta.ino() != ns_ino {
            continue;
        }
        let Ok(pidfd) = PidFd::open(pid) else {
            continue;
        };
        if still_in(&pidfd, ns_ino) {
            members.push(pidfd);
        }
    }
    Ok(members)
}

/// Whether the process behind `pidfd` is (still) a live member of the user namespace `ns_ino`.
/// A zombie keeps its credentials (and so its namespace) until its parent reaps it, but it runs
/// nothing and cannot be killed again: it does not count.
fn still_in(pidfd: &PidFd, ns_ino: u64) -> bool {
    let Ok(dir) = pidfd.proc_dir() else {
        return false;
    };
    let zombie = dir
        .read_to_string("stat")
        .ok()
        .and_then(|stat| stat_state(&stat))
        .is_none_or(|state| matches!(state, 'Z' | 'X'));
    if zombie {
        return false;
    }
    let Ok(fd) = dir.open("ns/user", OFlag::O_RDONLY | OFlag::O_CLOEXEC) else {
        return false;
    };
    ns_inode(&fd).is_ok_and(|ino| ino == ns_ino)
}

/// Sends `signal` to every member of the namespace; returns how many were signalled.
pub fn signal_members(ns_ino: u64, signal: i32) -> Result<usize> {
    let mut sent = 0;
    for member in userns_members(ns_ino)? {
        match member.send_signal(signal) {
            Ok(()) => sent += 1,
            Err(SysError::ProcessGone { .. }) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(sent)
}

/// The start time of the process (`/proc/<pid>/stat` field 22, clock ticks since boot): with
/// the pid and the boot id it names one process for the lifetime of the machine.
pub fn start_ticks(dir: &ProcDir) -> Result<u64> {
    let stat = dir.read_to_string("stat")?;
    parse_start_ticks(&stat).ok_or_else(|| SysError::InvalidInput {
        what: "/proc/<pid>/stat",
        reason: format!("no start time in {stat:?}"),
    })
}

/// Field 22 of a `stat` line. The command name (field 2) may hold spaces and parentheses, so
/// counting starts after the last `)`.
pub fn parse_start_ticks(stat: &str) -> Option<u64> {
    let after = &stat[stat.rfind(')')? + 1..];
    // Fields after the name start at 3 (state); starttime is field 22: the 20th of these.
    after.split_whitespace().nth(19)?.parse().ok()
}

/// Field 3 of a `stat` line: the state letter (R, S, D, Z, ...).
pub fn stat_state(stat: &str) -> Option<char> {
    stat[stat.rfind(')')? + 1..].trim_start().chars().next()
}

/// This boot's id (`/proc/sys/kernel/random/boot_id`): a pid from another boot names nothing.
pub fn boot_id() -> Result<String> {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .map_err(|e| SysError::io_path("read", "/proc/sys/kernel/random/boot_id", &e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_ticks_survive_odd_command_names() {
        let line = "4242 (a) b (c)) S 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 10 184467";
        assert_eq!(parse_start_ticks(line), Some(987654));
        assert_eq!(parse_start_ticks("garbage"), None);
        assert_eq!(parse_start_ticks("1 (x) S 1 2"), None);
        assert_eq!(stat_state(line), Some('S'));
        assert_eq!(stat_state("7 (z) Z 1"), Some('Z'));
        assert_eq!(stat_state("nothing"), None);
    }

    #[test]
    fn own_start_time_and_boot_id_read() {
        let me = PidFd::open(i32::try_from(std::process::id()).expect("pid")).expect("pidfd");
        let dir = me.proc_dir().expect("proc dir");
        assert!(start_ticks(&dir).expect("start") > 0);
        assert_eq!(boot_id().expect("boot id").len(), 36);
    }
}
