//! The cgroupfs file protocol: one value per `write(2)`, `cgroup.procs` lists, trees of
//! cgroups, removal, and waiting for a cgroup to empty.

use std::fs;
use std::io::Write;
use std::os::fd::RawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::errno::Errno;

use crate::error::{Result, SysError, errno_of};
use crate::pidfd::PidFd;

/// Moves the process behind `pid` into the v1 cgroup whose `cgroup.procs` is open as `procs`
/// (one `write(2)` of its pid; cgroups(7)). The caller knows the process is its unreaped child,
/// so the pid names it.
pub(crate) fn move_into(procs: RawFd, pid: &PidFd) -> Result<()> {
    let text = pid.pid().to_string();
    // SAFETY: `procs` is an open fd the caller owns for the duration of the call; a write of a
    // live buffer.
    let n = unsafe { libc::write(procs, text.as_ptr().cast(), text.len()) };
    if n < 0 {
        return Err(SysError::process(
            "write cgroup.procs",
            pid.pid(),
            Errno::last(),
        ));
    }
    if n as usize != text.len() {
        return Err(SysError::process(
            "write cgroup.procs (short)",
            pid.pid(),
            Errno::EIO,
        ));
    }
    Ok(())
}

/// Whether `cgroup.events` of a cgroup2 directory says `populated 1` (a live process in it or
/// below).
pub(super) fn populated_v2(dir: &Path) -> Result<bool> {
    let text = read_file(&dir.join("cgroup.events"))?;
    Ok(!text.lines().any(|l| l.trim() == "populated 0"))
}

/// `dir` and every cgroup below it, parents before children.
pub(super) fn tree(dir: &Path) -> Vec<PathBuf> {
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
pub(super) fn remove_tree(dir: &Path, deadline: Instant, errors: &mut Vec<SysError>) {
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
pub(super) fn remove_cgroup_dir(dir: &Path) -> std::io::Result<()> {
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

pub(super) fn on_cgroupfs(dir: &Path) -> bool {
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
pub(super) fn wait_unpopulated(dir: &Path, deadline: Instant) -> Result<()> {
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

pub(super) fn read_procs(dir: &Path) -> Result<Vec<i32>> {
    let file = dir.join("cgroup.procs");
    let text = read_file(&file)?;
    text.split_whitespace()
        .map(|p| {
            p.parse()
                .map_err(|_| SysError::path("parse", &file, Errno::EINVAL))
        })
        .collect()
}

pub(super) fn read_file(path: &Path) -> Result<String> {
    fs::read_to_string(path).map_err(|e| SysError::io_path("read", path, &e))
}

/// One `write(2)` of `data` into an existing file (cgroupfs files take one value per write).
pub(super) fn write_file(path: &Path, data: &[u8]) -> Result<()> {
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
