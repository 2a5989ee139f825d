//! One log file that the keeper alone writes, held at `max + slack` bytes whatever is appended.
//!
//! Before an append of `n` bytes would take the file past `max + slack`, its head is cut so
//! that its last `max - n` bytes remain (the append then brings it back to `max`):
//! `fallocate(FALLOC_FL_COLLAPSE_RANGE)` from offset 0 on whole blocks where the filesystem
//! can (fallocate(2): ext4 and xfs; the length must be a multiple of the block size and end
//! before the end of the file), else the tail is copied to the front and the file truncated.
//! The keeper is the file's only writer, so neither can race with an append. A read larger
//! than `max` keeps only its own last `max` bytes.

use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::time::{Duration, Instant};

use nix::fcntl::{FallocateFlags, FcntlArg, OFlag, fallocate, fcntl, openat};
use nix::sys::stat::{Mode, SFlag};

use super::keeper::note;
use super::wire::StreamStats;
use crate::error::{Errno, errno_of};

/// How long a file that could not be opened waits before the next try (meanwhile what its
/// pipe delivers is dropped and counted).
const REOPEN_AFTER: Duration = Duration::from_secs(1);

/// The bound of every file.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Bound {
    pub max: u64,
    pub slack: u64,
}

/// A log file being appended to.
#[derive(Debug)]
pub(crate) struct Sink {
    /// `<id>.<stream>` in the keeper's log directory.
    name: String,
    file: Option<File>,
    /// Its size as far as the keeper knows (re-read before every cut).
    len: u64,
    /// `st_blksize`: the unit `COLLAPSE_RANGE` cuts in.
    block: u64,
    /// False once the filesystem said it cannot collapse ranges.
    collapse: bool,
    /// When to try opening it again, after a failure.
    retry_at: Option<Instant>,
    /// A write error has been logged (once per stream).
    warned: bool,
}

impl Sink {
    /// A sink for `name` in the keeper's log directory. The file is opened (created, mode 0640
    /// under the keeper's umask) with the first bytes to write, not before: a process that writes
    /// nothing costs no file (creating one takes up to a millisecond on a busy ext4), and an
    /// attach does no disk work beside the spawn it serves. At that open, a file an earlier keeper
    /// or daemon left longer than the bound is cut to it. A failure is logged and retried later;
    /// it never refuses the stream.
    pub fn open(name: String) -> Sink {
        Sink {
            name,
            file: None,
            len: 0,
            block: 4096,
            collapse: true,
            retry_at: None,
            warned: false,
        }
    }

    fn try_open(
        &mut self,
        dir: BorrowedFd<'_>,
        bound: Bound,
        scratch: &mut [u8],
        stats: &mut StreamStats,
    ) {
        match open_log(dir, &self.name) {
            Ok((file, len, block)) => {
                self.file = Some(file);
                self.len = len;
                self.block = block.max(512);
                self.retry_at = None;
                if len > bound.max + bound.slack {
                    self.cut_to(bound.max, scratch, stats);
                }
            }
            Err(errno) => {
                self.retry_at = Some(Instant::now() + REOPEN_AFTER);
                self.warn("open", errno);
            }
        }
    }

    /// Appends `data` (one read from the pipe), cutting the head first when needed.
    pub fn append(
        &mut self,
        dir: BorrowedFd<'_>,
        data: &[u8],
        bound: Bound,
        scratch: &mut [u8],
        stats: &mut StreamStats,
    ) {
        let n = data.len() as u64;
        if self.file.is_none() && self.retry_at.is_none_or(|t| Instant::now() >= t) {
            self.try_open(dir, bound, scratch, stats);
        }
        if self.file.is_none() {
            stats.dropped += n;
            return;
        }
        let mut data = data;
        if n >= bound.max {
            // This read alone fills the file: keep its last `max` bytes and nothing before.
            let skip = n - bound.max;
            if !self.truncate_all(stats) {
                stats.dropped += n;
                return;
            }
            stats.trimmed += skip;
            data = &data[usize::try_from(skip).unwrap_or(data.len())..];
        } else if self.len + n > bound.max + bound.slack
            && !self.cut_to(bound.max - n, scratch, stats)
        {
            // The file could not be brought under its bound: the data goes, not the bound.
            stats.dropped += n;
            return;
        }
        self.write_all(data, stats);
    }

    /// Cuts the head so that at least the last `keep` bytes remain (and, for a collapse, less
    /// than one block more). False when nothing worked, not even truncating to 0.
    fn cut_to(&mut self, keep: u64, scratch: &mut [u8], stats: &mut StreamStats) -> bool {
        let Some(file) = &self.file else {
            return false;
        };
        // Re-read the size: nothing else should write the file, but a wrong size must not
        // make the keeper cut the wrong bytes.
        if let Ok(meta) = file.metadata() {
            self.len = meta.len();
        }
        if self.len <= keep {
            return true;
        }
        let excess = self.len - keep;
        if self.collapse {
            let cut = excess - excess % self.block;
            if cut > 0 && cut < self.len {
                match i64::try_from(cut)
                    .map_err(|_| Errno::EFBIG)
                    .and_then(|len| {
                        fallocate(file, FallocateFlags::FALLOC_FL_COLLAPSE_RANGE, 0, len)
                    }) {
                    Ok(()) => {
                        self.len -= cut;
                        stats.trimmed += cut;
                        return true;
                    }
                    // tmpfs, btrfs, and blocks the filesystem sizes differently: copy instead.
                    Err(Errno::EOPNOTSUPP | Errno::EINVAL) => self.collapse = false,
                    // Anything else (ENOSPC while shifting extents, EIO): try the copy once.
                    Err(errno) => {
                        warn_once(
                            &mut self.warned,
                            &self.name,
                            "fallocate(COLLAPSE_RANGE)",
                            errno,
                        );
                    }
                }
            }
        }
        match copy_tail(file, self.len, keep, scratch) {
            Ok(()) => {
                self.len = keep;
                stats.trimmed += excess;
                true
            }
            Err(errno) => {
                self.warn("copy the tail to the front", errno);
                self.truncate_all(stats)
            }
        }
    }

    /// Empties the file; what it held counts as trimmed.
    fn truncate_all(&mut self, stats: &mut StreamStats) -> bool {
        let Some(file) = &self.file else {
            return false;
        };
        match file.set_len(0) {
            Ok(()) => {
                stats.trimmed += self.len;
                self.len = 0;
                true
            }
            Err(e) => {
                self.warn("ftruncate", errno_of(&e));
                false
            }
        }
    }

    fn write_all(&mut self, mut data: &[u8], stats: &mut StreamStats) {
        let Some(file) = &self.file else {
            stats.dropped += data.len() as u64;
            return;
        };
        while !data.is_empty() {
            match nix::unistd::write(file, data) {
                Ok(0) => {
                    self.warn("write", Errno::ENOSPC);
                    break;
                }
                Ok(k) => {
                    self.len += k as u64;
                    stats.written += k as u64;
                    data = &data[k..];
                }
                Err(Errno::EINTR) => {}
                Err(errno) => {
                    self.warn("write", errno);
                    break;
                }
            }
        }
        stats.dropped += data.len() as u64;
    }

    fn warn(&mut self, what: &str, errno: Errno) {
        warn_once(&mut self.warned, &self.name, what, errno);
    }
}

/// Logs the first error of a stream; later ones are only counted.
fn warn_once(warned: &mut bool, name: &str, what: &str, errno: Errno) {
    if !*warned {
        *warned = true;
        note(format_args!(
            "{what} {name}: {errno} (what cannot be written is dropped and counted; later errors \
             of this stream are not logged)"
        ));
    }
}

/// Opens a log file for appending: (file, size, block size). Refuses anything but a regular
/// file (`O_NOFOLLOW`; `O_NONBLOCK` so that a FIFO put in its place cannot block the open).
fn open_log(dir: BorrowedFd<'_>, name: &str) -> Result<(File, u64, u64), Errno> {
    let fd: OwnedFd = openat(
        dir,
        name,
        OFlag::O_RDWR
            | OFlag::O_CREAT
            | OFlag::O_APPEND
            | OFlag::O_CLOEXEC
            | OFlag::O_NOFOLLOW
            | OFlag::O_NOCTTY
            | OFlag::O_NONBLOCK,
        Mode::from_bits_truncate(0o640),
    )?;
    let file = File::from(fd);
    let meta = file.metadata().map_err(|e| errno_of(&e))?;
    if meta.mode() & SFlag::S_IFMT.bits() != SFlag::S_IFREG.bits() {
        return Err(Errno::EINVAL);
    }
    Ok((file, meta.len(), meta.blksize()))
}

/// Moves the last `keep` bytes of a `len`-byte file to its start and truncates it there,
/// through `scratch`. Writes go front to back and each source range lies after its
/// destination, so no byte is overwritten before it is read. `O_APPEND` is off meanwhile
/// (on Linux, `pwrite` on an `O_APPEND` file appends whatever the offset; pwrite(2), BUGS).
fn copy_tail(file: &File, len: u64, keep: u64, scratch: &mut [u8]) -> Result<(), Errno> {
    let fd = file.as_fd();
    let flags = OFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFL)?);
    fcntl(fd, FcntlArg::F_SETFL(flags - OFlag::O_APPEND))?;
    let copied = (|| {
        let from = len - keep;
        let mut done = 0u64;
        while done < keep {
            let want = usize::try_from(keep - done)
                .unwrap_or(usize::MAX)
                .min(scratch.len());
            let got = file
                .read_at(&mut scratch[..want], from + done)
                .map_err(|e| errno_of(&e))?;
            if got == 0 {
                // The file is shorter than it was a moment ago: keep what was moved.
                break;
            }
            file.write_all_at(&scratch[..got], done)
                .map_err(|e| errno_of(&e))?;
            done += got as u64;
        }
        file.set_len(done).map_err(|e| errno_of(&e))
    })();
    let restored = fcntl(fd, FcntlArg::F_SETFL(flags)).map(drop);
    copied.and(restored)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir() -> (tempfile::TempDir, OwnedFd) {
        let dir = tempfile::tempdir().unwrap();
        let fd = nix::fcntl::open(
            dir.path(),
            OFlag::O_DIRECTORY | OFlag::O_RDONLY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .unwrap();
        (dir, fd)
    }

    /// The bound holds after every append and the file ends with the last bytes written.
    fn check_bound(sink: &mut Sink, d: BorrowedFd<'_>, bound: Bound) {
        let mut scratch = vec![0u8; 4096];
        let mut stats = StreamStats::default();
        let mut all = Vec::new();
        for i in 0..1500u32 {
            let len = [1usize, 17, 999, 5000, 40_000][i as usize % 5];
            let chunk: Vec<u8> = (0..len).map(|j| (i as usize * 31 + j) as u8).collect();
            sink.append(d, &chunk, bound, &mut scratch, &mut stats);
            all.extend_from_slice(&chunk);
            assert!(sink.len <= bound.max + bound.slack, "{} at {i}", sink.len);
        }
        let file = std::fs::read(format!("/proc/self/fd/{}", {
            use std::os::fd::AsRawFd;
            sink.file.as_ref().unwrap().as_raw_fd()
        }))
        .unwrap();
        assert_eq!(file.len() as u64, sink.len);
        assert!(file.len() as u64 >= bound.max.min(all.len() as u64));
        assert!(
            all.ends_with(&file),
            "the file is the tail of what was written"
        );
        // No read here is larger than the limit, so every byte trimmed had been written.
        assert_eq!(stats.written - stats.trimmed, file.len() as u64);
        assert_eq!(stats.dropped, 0);
    }

    #[test]
    fn the_bound_holds_and_the_tail_is_kept_with_the_copy_fallback() {
        let (_t, d) = dir();
        let bound = Bound {
            max: 100_000,
            slack: 64 * 1024,
        };
        let mut sink = Sink::open("a.stdout".into());
        sink.collapse = false;
        check_bound(&mut sink, d.as_fd(), bound);
    }

    #[test]
    fn the_bound_holds_and_the_tail_is_kept_with_collapse_where_it_exists() {
        let (_t, d) = dir();
        let bound = Bound {
            max: 100_000,
            slack: 64 * 1024,
        };
        let mut sink = Sink::open("a.stderr".into());
        check_bound(&mut sink, d.as_fd(), bound);
        // ext4 and xfs can collapse: there the fallback must not have been taken.
        let fs = nix::sys::statfs::fstatfs(&d).unwrap().filesystem_type();
        if [
            nix::sys::statfs::EXT4_SUPER_MAGIC,
            nix::sys::statfs::XFS_SUPER_MAGIC,
        ]
        .contains(&fs)
        {
            assert!(sink.collapse, "COLLAPSE_RANGE was given up on {fs:?}");
        }
    }

    #[test]
    fn a_file_left_too_long_is_cut_at_its_first_write_and_a_symlink_is_refused() {
        let (t, d) = dir();
        let bound = Bound {
            max: 10_000,
            slack: 64 * 1024,
        };
        let data: Vec<u8> = (0..1_000_000u32).map(|i| i as u8).collect();
        std::fs::write(t.path().join("old.stdout"), &data).unwrap();
        let mut stats = StreamStats::default();
        let mut sink = Sink::open("old.stdout".into());
        assert_eq!(
            std::fs::read(t.path().join("old.stdout")).unwrap().len(),
            data.len(),
            "nothing is touched before the first write"
        );
        sink.append(d.as_fd(), b"!", bound, &mut [0u8; 4096], &mut stats);
        let kept = std::fs::read(t.path().join("old.stdout")).unwrap();
        assert!(kept.len() as u64 >= bound.max && kept.len() as u64 <= bound.max + bound.slack);
        assert!(kept.ends_with(b"!"));
        assert!(data.ends_with(&kept[..kept.len() - 1]));
        assert_eq!(stats.trimmed, (data.len() + 1 - kept.len()) as u64);
        assert_eq!(sink.len, kept.len() as u64);

        std::os::unix::fs::symlink("/etc/passwd", t.path().join("link.stdout")).unwrap();
        let mut stats = StreamStats::default();
        let mut sink = Sink::open("link.stdout".into());
        assert!(sink.file.is_none());
        sink.append(d.as_fd(), b"lost", bound, &mut [0u8; 4096], &mut stats);
        assert_eq!(stats.dropped, 4);
    }

    #[test]
    fn a_read_larger_than_the_limit_keeps_its_own_tail() {
        let (t, d) = dir();
        let bound = Bound {
            max: 10,
            slack: 64 * 1024,
        };
        let mut stats = StreamStats::default();
        let mut sink = Sink::open("s.stdout".into());
        sink.append(d.as_fd(), b"0123", bound, &mut [0u8; 64], &mut stats);
        sink.append(
            d.as_fd(),
            b"abcdefghijklmnop",
            bound,
            &mut [0u8; 64],
            &mut stats,
        );
        assert_eq!(
            std::fs::read(t.path().join("s.stdout")).unwrap(),
            b"ghijklmnop"
        );
        assert_eq!((stats.written, stats.trimmed), (14, 10));
    }
}
