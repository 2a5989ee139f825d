//! Keeping a log file that a process appends to at a bounded size, without losing what it writes
//! meanwhile.
//!
//! Copy-truncate (logrotate's way) races with an `O_APPEND` writer: bytes appended between the
//! copy and the truncate are lost, and bytes appended after the truncate are overwritten by the
//! copy. `fallocate(FALLOC_FL_COLLAPSE_RANGE)` (fallocate(2); ext4 and xfs) removes the head of
//! the file in one step under the inode lock, so an append lands either before (and is kept,
//! shifted) or after it. It works on whole filesystem blocks, so the file keeps between `max`
//! and `max + block - 1` bytes; readers take the last `max`.

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use nix::fcntl::{FallocateFlags, fallocate};

use crate::error::{Errno, Result, SysError};

/// How a trim went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trimmed {
    /// The file was at most the limit (plus less than one block): nothing to do.
    Nothing,
    /// This many bytes were cut from the head.
    Collapsed(u64),
    /// The filesystem cannot collapse ranges (tmpfs, for example): the caller must fall back.
    Unsupported,
}

/// Cuts whole blocks from the head of `path` so that at least its last `max` bytes remain.
pub fn trim_head(path: &Path, max: u64) -> Result<Trimmed> {
    let file = match File::options().write(true).open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Trimmed::Nothing),
        Err(e) => return Err(SysError::io_path("open", path, &e)),
    };
    let meta = file
        .metadata()
        .map_err(|e| SysError::io_path("fstat", path, &e))?;
    let block = meta.blksize().max(512);
    let excess = meta.len().saturating_sub(max);
    let cut = excess - excess % block;
    if cut == 0 {
        return Ok(Trimmed::Nothing);
    }
    let len = i64::try_from(cut).map_err(|_| SysError::path("fallocate", path, Errno::EFBIG))?;
    match fallocate(&file, FallocateFlags::FALLOC_FL_COLLAPSE_RANGE, 0, len) {
        Ok(()) => Ok(Trimmed::Collapsed(cut)),
        Err(Errno::EOPNOTSUPP | Errno::EINVAL) => Ok(Trimmed::Unsupported),
        Err(errno) => Err(SysError::path("fallocate(COLLAPSE_RANGE)", path, errno)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn keeps_the_tail_and_whole_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let mut f = File::options()
            .create(true)
            .append(true)
            .open(&path)
            .unwrap();
        let text: String = (0..5000).map(|i| format!("{i}\n")).collect();
        f.write_all(text.as_bytes()).unwrap();
        match trim_head(&path, 1000).unwrap() {
            // tmpfs, btrfs: nothing may have changed, the caller falls back.
            Trimmed::Unsupported => assert_eq!(std::fs::read(&path).unwrap(), text.as_bytes()),
            Trimmed::Nothing => panic!("a file over the limit was left alone"),
            Trimmed::Collapsed(cut) => {
                let kept = std::fs::read(&path).unwrap();
                assert_eq!(kept.len() as u64 + cut, text.len() as u64);
                assert!(kept.len() >= 1000);
                assert!(text.as_bytes().ends_with(&kept), "the tail is what is kept");
                // An append after the collapse lands at the new end.
                f.write_all(b"after\n").unwrap();
                assert!(std::fs::read(&path).unwrap().ends_with(b"4999\nafter\n"));
            }
        }
        assert_eq!(trim_head(&path, 1 << 20).unwrap(), Trimmed::Nothing);
        assert_eq!(
            trim_head(&dir.path().join("none"), 10).unwrap(),
            Trimmed::Nothing
        );
    }
}
