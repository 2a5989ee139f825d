//! A file of preallocated disk space, kept so that a write that matters can be made on a full
//! disk: deleting it gives its blocks back to the file system at once.

use std::path::{Path, PathBuf};

use nix::fcntl::{FallocateFlags, fallocate};

use crate::error::{Result, SysError, errno_of};

/// A reserve file of `size` bytes, all allocated.
#[derive(Debug, Clone)]
pub struct Reserve {
    path: PathBuf,
    size: u64,
}

impl Reserve {
    pub fn new(path: impl Into<PathBuf>, size: u64) -> Reserve {
        Reserve {
            path: path.into(),
            size,
        }
    }

    /// Where it lives.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether it is there, whole.
    pub fn is_held(&self) -> bool {
        std::fs::metadata(&self.path).is_ok_and(|m| m.len() >= self.size)
    }

    /// Makes the reserve (every block allocated with `fallocate`, so a full disk cannot leave it
    /// sparse) unless it is there. On failure (no room) nothing is left half-made.
    pub fn ensure(&self) -> Result<()> {
        if self.is_held() {
            return Ok(());
        }
        let made = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(false)
            .open(&self.path)
            .map_err(|e| SysError::io_path("open", &self.path, &e))
            .and_then(|file| {
                let len = i64::try_from(self.size).unwrap_or(i64::MAX);
                fallocate(&file, FallocateFlags::empty(), 0, len)
                    .map_err(|e| SysError::path("fallocate", &self.path, e))
            });
        if made.is_err() {
            let _ = std::fs::remove_file(&self.path);
        }
        made
    }

    /// Deletes the reserve, giving its space to the next write; false when there was none.
    pub fn free(&self) -> Result<bool> {
        match std::fs::remove_file(&self.path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(SysError::path("unlink", &self.path, errno_of(&e))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reserve_is_made_whole_and_freed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let reserve = Reserve::new(dir.path().join("reserve"), 64 * 1024);
        assert!(!reserve.is_held());
        reserve.ensure().expect("ensure");
        assert!(reserve.is_held());
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(reserve.path()).expect("stat");
        assert!(
            meta.blocks() * 512 >= 64 * 1024,
            "blocks allocated, not sparse"
        );
        reserve.ensure().expect("again: nothing to do");
        assert!(reserve.free().expect("free"));
        assert!(!reserve.free().expect("free twice"));
        assert!(!reserve.is_held());
    }
}
