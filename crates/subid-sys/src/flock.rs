//! Whole-file advisory locks (`flock(2)`): held by an open file description, so a lock dies
//! with the process that holds it, whatever way it ends, and files opened close-on-exec never
//! pass it to a child.

use std::fs::File;
use std::path::Path;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

use crate::error::{Result, SysError};

/// A file and the exclusive lock on it; unlocked when dropped (or when the process ends).
#[derive(Debug)]
pub struct Locked {
    lock: Flock<File>,
}

impl Locked {
    /// The locked file.
    pub fn file(&self) -> &File {
        &self.lock
    }
}

/// Takes an exclusive lock on `file` without waiting: `Ok(None)` when another open file
/// description holds one (the file is closed again).
pub fn try_lock(file: File, path: &Path) -> Result<Option<Locked>> {
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(lock) => Ok(Some(Locked { lock })),
        Err((_, Errno::EWOULDBLOCK)) => Ok(None),
        Err((_, e)) => Err(SysError::path("flock", path, e)),
    }
}

/// Takes an exclusive lock on `file`, waiting at most `within` for the holder to let go
/// (polling, so that no thread sleeps in the kernel past the deadline). `Ok(None)` when the
/// deadline passed.
pub fn lock_within(file: File, path: &Path, within: Duration) -> Result<Option<Locked>> {
    let deadline = Instant::now() + within;
    let mut file = file;
    let mut pause = Duration::from_millis(1);
    loop {
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => return Ok(Some(Locked { lock })),
            Err((back, Errno::EWOULDBLOCK)) => file = back,
            Err((_, e)) => return Err(SysError::path("flock", path, e)),
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lock_excludes_other_descriptions_until_dropped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("lock");
        let first = try_lock(File::create(&path).expect("create"), &path)
            .expect("flock")
            .expect("free");
        let second = try_lock(File::open(&path).expect("open"), &path).expect("flock");
        assert!(second.is_none(), "held by the first");
        let waited = lock_within(
            File::open(&path).expect("open"),
            &path,
            Duration::from_millis(30),
        )
        .expect("flock");
        assert!(waited.is_none(), "still held after the deadline");
        assert!(first.file().metadata().is_ok());
        drop(first);
        assert!(
            try_lock(File::open(&path).expect("open"), &path)
                .expect("flock")
                .is_some(),
            "free once dropped"
        );
    }
}
