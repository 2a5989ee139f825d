//! The log files of processes, made ahead of need.
//!
//! Every process writes `<log-dir>/<id>.stdout` and `<id>.stderr` itself, so its output
//! survives a daemon restart. Creating a file is a metadata change of the filesystem: 25 us on
//! a quiet disk, but 0.4-1 ms measured on these machines while the disk is busy (ext4, a VM's
//! virtio disk), twice per spawn. So the spawn path takes a pair from a small pool that a
//! background thread keeps filled; it makes a pair itself only when the pool is empty.
//!
//! A pair's name is the process id it will carry. Pairs still in the pool when the daemon stops
//! belong to no process; the next start removes them with the other orphans
//! ([`LogPool::remove_orphans`]).

use std::collections::HashSet;
use std::io::Read;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// Pairs kept ready. A burst of spawns faster than the refill thread makes them drains the pool
/// and falls back to making pairs in place, which is what every spawn did before the pool.
const READY: usize = 16;

/// The two streams of one process.
pub const STREAMS: [&str; 2] = ["stdout", "stderr"];

/// A process id and its two log files, open for appending.
#[derive(Debug)]
pub struct LogFiles {
    pub id: String,
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
}

/// Pairs of log files made ahead of need (see the module docs).
#[derive(Debug)]
pub struct LogPool {
    dir: PathBuf,
    ready: Mutex<Vec<LogFiles>>,
    /// True while a refill thread runs; at most one does.
    refilling: AtomicBool,
}

impl LogPool {
    /// A pool for `dir`, empty until [`LogPool::take`] first asks for a refill.
    pub fn new(dir: PathBuf) -> Arc<LogPool> {
        Arc::new(LogPool {
            dir,
            ready: Mutex::new(Vec::with_capacity(READY)),
            refilling: AtomicBool::new(false),
        })
    }

    /// Where the log of process `id` is written.
    pub fn path(&self, id: &str, stream: &str) -> PathBuf {
        log_path(&self.dir, id, stream)
    }

    /// A fresh pair: a ready one when there is one, else one made now. Asks for a refill when the
    /// pool runs low (the refill runs on tokio's blocking pool, off the caller's path).
    pub fn take(self: &Arc<Self>) -> std::io::Result<LogFiles> {
        let (taken, left) = {
            let mut ready = self.ready.lock().unwrap_or_else(|e| e.into_inner());
            let taken = ready.pop();
            (taken, ready.len())
        };
        if left < READY / 2 {
            self.refill();
        }
        match taken {
            Some(files) => Ok(files),
            None => make_pair(&self.dir, new_id()),
        }
    }

    /// How many pairs are ready now.
    pub fn ready(&self) -> usize {
        self.ready.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Fills the pool in the background unless a refill already runs.
    pub fn refill(self: &Arc<Self>) {
        if self.refilling.swap(true, Ordering::AcqRel) {
            return;
        }
        let pool = Arc::clone(self);
        let work = move || {
            loop {
                if pool.ready() >= READY {
                    break;
                }
                match make_pair(&pool.dir, new_id()) {
                    Ok(files) => pool
                        .ready
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(files),
                    Err(error) => {
                        // The spawn path makes its own pair and reports the error to its client.
                        tracing::warn!(dir = %pool.dir.display(), %error, "cannot make log files ahead");
                        break;
                    }
                }
            }
            pool.refilling.store(false, Ordering::Release);
        };
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => drop(handle.spawn_blocking(work)),
            Err(_) => work(),
        }
    }

    /// Removes log files in the directory whose process id is not in `known`: pairs made ahead by
    /// a previous daemon, and files left by a crash between making a pair and recording its
    /// process. Returns how many files went.
    pub fn remove_orphans(&self, known: &HashSet<String>) -> std::io::Result<usize> {
        let ready: HashSet<String> = self
            .ready
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|f| f.id.clone())
            .collect();
        let mut removed = 0;
        for entry in std::fs::read_dir(&self.dir)?.flatten() {
            let name = entry.file_name();
            let Some(id) = name.to_str().and_then(|n| {
                STREAMS
                    .iter()
                    .find_map(|s| n.strip_suffix(&format!(".{s}")))
            }) else {
                continue;
            };
            if is_id(id) && !known.contains(id) && !ready.contains(id) {
                match std::fs::remove_file(entry.path()) {
                    Ok(()) => removed += 1,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(removed)
    }
}

fn log_path(dir: &Path, id: &str, stream: &str) -> PathBuf {
    dir.join(format!("{id}.{stream}"))
}

/// Creates both files of `id` (the first is removed again if the second cannot be made).
fn make_pair(dir: &Path, id: String) -> std::io::Result<LogFiles> {
    let stdout = open_log(&log_path(dir, &id, "stdout"))?;
    let stderr = match open_log(&log_path(dir, &id, "stderr")) {
        Ok(fd) => fd,
        Err(e) => {
            let _ = std::fs::remove_file(log_path(dir, &id, "stdout"));
            return Err(e);
        }
    };
    Ok(LogFiles { id, stdout, stderr })
}

/// Opens (creating) a log file for appending; close-on-exec, so only the child's dup2'd copy
/// crosses exec.
fn open_log(path: &Path) -> std::io::Result<OwnedFd> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o640)
        .open(path)
        .map(OwnedFd::from)
}

/// Whether `s` has the shape of a process id (see [`new_id`]).
fn is_id(s: &str) -> bool {
    s.len() == 16 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// A process id: 16 random hex digits.
fn new_id() -> String {
    let mut bytes = [0u8; 8];
    let filled = std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .is_ok();
    if !filled {
        // Time and a counter still make ids unique within this daemon.
        static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        bytes = (u64::try_from(crate::lease::now_ms()).unwrap_or(0) ^ (n << 48)).to_be_bytes();
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn a_taken_pair_is_two_fresh_files_named_by_a_new_id() {
        let dir = tempfile::tempdir().unwrap();
        let pool = LogPool::new(dir.path().to_path_buf());
        let a = pool.take().unwrap();
        let b = pool.take().unwrap();
        assert_ne!(a.id, b.id);
        assert!(is_id(&a.id), "{}", a.id);
        for stream in STREAMS {
            let meta = std::fs::metadata(pool.path(&a.id, stream)).unwrap();
            assert_eq!(meta.len(), 0);
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(meta.permissions().mode() & 0o777, 0o640 & !current_umask());
        }
        // The first take found the pool empty: it made its own pair, and the refill (in place,
        // outside a runtime) filled the pool; the second took one of those.
        assert_eq!(pool.ready(), READY - 1);
        assert_eq!(names(dir.path()).len(), 2 * (READY + 1));
    }

    #[test]
    fn orphans_go_and_known_and_ready_pairs_stay() {
        let dir = tempfile::tempdir().unwrap();
        let pool = LogPool::new(dir.path().to_path_buf());
        let kept = pool.take().unwrap();
        let orphan = make_pair(dir.path(), new_id()).unwrap();
        std::fs::write(dir.path().join("notes.txt"), "not a log").unwrap();
        std::fs::write(dir.path().join("0123456789abcdef.other"), "").unwrap();
        let known: HashSet<String> = [kept.id.clone()].into();
        assert_eq!(pool.remove_orphans(&known).unwrap(), 2);
        let left = names(dir.path());
        assert!(!left.iter().any(|n| n.starts_with(&orphan.id)), "{left:?}");
        assert!(left.contains(&format!("{}.stdout", kept.id)));
        assert!(left.contains(&"notes.txt".to_string()));
        assert!(left.contains(&"0123456789abcdef.other".to_string()));
        // The ready pairs are still there to be taken.
        assert_eq!(left.len(), 2 + 2 + 2 * READY);
        // A pool made by the next daemon start removes them: they belong to no process.
        let next = LogPool::new(dir.path().to_path_buf());
        assert_eq!(next.remove_orphans(&known).unwrap(), 2 * READY);
    }

    fn current_umask() -> u32 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let line = status.lines().find(|l| l.starts_with("Umask:")).unwrap();
        u32::from_str_radix(line[6..].trim(), 8).unwrap()
    }
}
