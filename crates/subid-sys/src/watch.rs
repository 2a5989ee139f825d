//! Watching files for replacement with inotify, on tokio's reactor.
//!
//! The watch is on each file's directory, not the file: tools such as shadow's `useradd` replace
//! /etc/subuid by writing a new file and renaming it over the old one, which a watch on the old
//! inode would never see (inotify(7)).

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::path::{Path, PathBuf};

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

use crate::error::{Errno, Result, SysError, errno_of};

/// A watch on a set of files, by the names in their directories.
pub struct FileWatch {
    fd: AsyncFd<InotifyFd>,
    names: BTreeSet<OsString>,
}

/// Gives tokio the raw fd of an [`Inotify`], which offers only `AsFd`.
struct InotifyFd(Inotify);

impl AsRawFd for InotifyFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_fd().as_raw_fd()
    }
}

impl FileWatch {
    /// Watches the directories of `files` for files of those names being written, created,
    /// renamed or deleted. Needs a tokio runtime.
    pub fn new(files: &[PathBuf]) -> Result<FileWatch> {
        let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)
            .map_err(|e| SysError::syscall("inotify_init1", e))?;
        let mask = AddWatchFlags::IN_CLOSE_WRITE
            | AddWatchFlags::IN_MOVED_TO
            | AddWatchFlags::IN_MOVED_FROM
            | AddWatchFlags::IN_CREATE
            | AddWatchFlags::IN_DELETE;
        let mut names = BTreeSet::new();
        let mut dirs = BTreeSet::new();
        for file in files {
            let (Some(dir), Some(name)) = (file.parent(), file.file_name()) else {
                continue;
            };
            names.insert(name.to_os_string());
            let dir = if dir.as_os_str().is_empty() {
                Path::new(".")
            } else {
                dir
            };
            if dirs.insert(dir.to_path_buf()) {
                inotify
                    .add_watch(dir, mask)
                    .map_err(|e| SysError::path("inotify_add_watch", dir, e))?;
            }
        }
        // SAFETY: `InotifyFd` owns the Inotify, whose fd stays open and unchanged until the
        // AsyncFd (and with it the registration) is dropped.
        let fd = unsafe { AsyncFd::register_with_interest(InotifyFd(inotify), Interest::READABLE) }
            .map_err(|e| SysError::syscall("epoll_ctl(inotify)", errno_of(&e.into_parts().1)))?;
        Ok(FileWatch { fd, names })
    }

    /// Resolves when one of the files may have changed. Never resolves if the watch broke (the
    /// caller re-checks on a timer as well).
    pub async fn changed(&self) {
        loop {
            let Ok(mut guard) = self.fd.readable().await else {
                return std::future::pending().await;
            };
            match guard.get_inner().0.read_events() {
                Ok(events) => {
                    if events
                        .iter()
                        .any(|e| e.name.as_ref().is_some_and(|n| self.names.contains(n)))
                    {
                        return;
                    }
                }
                Err(Errno::EAGAIN) => guard.clear_ready(),
                // EINTR and the like: poll again.
                Err(_) => guard.clear_ready(),
            }
        }
    }

    /// Throws away the events queued now: the caller re-reads everything anyway.
    pub fn drain(&self) {
        while self.fd.get_ref().0.read_events().is_ok() {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn sees_a_rename_over_a_watched_file_and_ignores_others() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("subuid");
        std::fs::write(&file, "a:1:1\n").unwrap();
        let watch = FileWatch::new(std::slice::from_ref(&file)).unwrap();
        std::fs::write(dir.path().join("unrelated"), "x").unwrap();
        let quiet = tokio::time::timeout(Duration::from_millis(200), watch.changed()).await;
        assert!(quiet.is_err(), "an unrelated file woke the watch");
        let tmp = dir.path().join("subuid+");
        std::fs::write(&tmp, "b:2:2\n").unwrap();
        std::fs::rename(&tmp, &file).unwrap();
        tokio::time::timeout(Duration::from_secs(5), watch.changed())
            .await
            .expect("the rename was seen");
        watch.drain();
    }
}
