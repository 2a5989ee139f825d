//! The host-wide pool registry: one file per running daemon in a shared directory (default
//! `/run/subidd-pools`), holding its pid, state directory, socket and pool, and locked with
//! `flock(2)` for the daemon's whole life. At start, under a lock on the directory, a daemon
//! reads every file whose lock is held and refuses to start when its pool overlaps one of
//! them (two daemons would hand the same host ids to different leases); a file whose lock is
//! free belongs to a daemon that is gone (however it ended: the kernel drops the lock with the
//! process) and is removed. The lock, not the pid, says who is alive, so a reused pid or a
//! daemon in another pid namespace never keeps a stale claim alive.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use subid_core::IdRange;
use subid_sys::flock::{self, Locked};

use crate::paths::{self, PathError};

/// How long start-up waits for another daemon's scan of the registry to finish.
const DIR_LOCK_WAIT: Duration = Duration::from_secs(10);
/// The directory lock's file name (never a registration).
const DIR_LOCK: &str = ".lock";
/// Registration files end with this.
const SUFFIX: &str = ".pool";

/// What a registration says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registration {
    pub pid: u32,
    pub state_dir: String,
    pub socket: String,
    /// First host id of the pool.
    pub base: u32,
    /// Ids in the pool.
    pub size: u32,
    /// Unix seconds when the daemon registered.
    pub since: u64,
}

impl Registration {
    fn range(&self) -> Option<IdRange> {
        IdRange::new(self.base, self.size).ok()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("pool_registry_dir: {0}")]
    Path(#[from] PathError),
    #[error("pool registry {}: {what}: {source}", path.display())]
    Io {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("pool registry {}: {source}", path.display())]
    Lock {
        path: PathBuf,
        #[source]
        source: subid_sys::SysError,
    },
    #[error(
        "pool registry {}: another daemon has been scanning it for {DIR_LOCK_WAIT:?}; retry, \
         or find the process holding {} (fuser {})",
        path.display(),
        lock.display(),
        lock.display()
    )]
    Busy { path: PathBuf, lock: PathBuf },
    #[error(
        "pool {}-{} overlaps the pool {}-{} of another subidd, running as pid {} with state \
         dir {} and socket {} (registered in {}): two daemons would hand the same host ids to \
         different leases. Stop that daemon, or give this one a [pool] that does not overlap \
         (base and size in the config)",
        ours.start(), ours.end() - 1, theirs.base,
        u64::from(theirs.base) + u64::from(theirs.size) - 1,
        theirs.pid, theirs.state_dir, theirs.socket, file.display()
    )]
    Overlap {
        ours: IdRange,
        theirs: Registration,
        file: PathBuf,
    },
    #[error(
        "pool registry file {} is held by a running process but cannot be read ({reason}); \
         find it with `fuser {}`",
        file.display(),
        file.display()
    )]
    Unreadable { file: PathBuf, reason: String },
}

/// This daemon's registration: the file stays locked until dropped, then is removed.
#[derive(Debug)]
pub struct PoolClaim {
    file: PathBuf,
    lock: Option<Locked>,
}

impl PoolClaim {
    /// The registration file.
    pub fn file(&self) -> &Path {
        &self.file
    }
}

impl Drop for PoolClaim {
    fn drop(&mut self) {
        // Removed while still locked, so no scan can find it unlocked and take it for stale
        // while this daemon still serves.
        if let Err(error) = std::fs::remove_file(&self.file)
            && error.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(%error, file = %self.file.display(), "cannot remove the pool registration");
        }
        drop(self.lock.take());
    }
}

/// Registers `pool` in `dir` for this process, or refuses when a running daemon's pool
/// overlaps it. Blocking: call from a thread that may wait (at most [`DIR_LOCK_WAIT`]).
pub fn claim(
    dir: &Path,
    pool: IdRange,
    state_dir: &Path,
    socket: &Path,
) -> Result<PoolClaim, RegistryError> {
    claim_trusting(dir, pool, state_dir, socket, &|uid| uid == 0)
}

/// [`claim`], with `trusted` saying which owners of the directory count as root.
fn claim_trusting(
    dir: &Path,
    pool: IdRange,
    state_dir: &Path,
    socket: &Path,
    trusted: &dyn Fn(u32) -> bool,
) -> Result<PoolClaim, RegistryError> {
    let io = |what, path: &Path| {
        let path = path.to_path_buf();
        move |source| RegistryError::Io { path, what, source }
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(dir)
        .map_err(io("creating the directory", dir))?;
    paths::check_dir_owned_by("pool_registry_dir", dir, trusted)?;
    let lock_path = dir.join(DIR_LOCK);
    let lock_file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o644)
        .custom_flags(libc_o_nofollow())
        .open(&lock_path)
        .map_err(io("opening the lock", &lock_path))?;
    let _dir_lock = flock::lock_within(lock_file, &lock_path, DIR_LOCK_WAIT)
        .map_err(|source| RegistryError::Lock {
            path: lock_path.clone(),
            source,
        })?
        .ok_or_else(|| RegistryError::Busy {
            path: dir.to_path_buf(),
            lock: lock_path.clone(),
        })?;
    for entry in std::fs::read_dir(dir).map_err(io("reading", dir))? {
        let entry = entry.map_err(io("reading", dir))?;
        let name = entry.file_name();
        if !name.to_string_lossy().ends_with(SUFFIX) {
            continue;
        }
        let file = entry.path();
        let Some(theirs) = read_if_held(&file)? else {
            continue;
        };
        match theirs.range() {
            Some(range) if range.overlaps(&pool) => {
                return Err(RegistryError::Overlap {
                    ours: pool,
                    theirs,
                    file,
                });
            }
            Some(_) => {}
            None => {
                return Err(RegistryError::Unreadable {
                    file,
                    reason: format!("pool {}+{} is not a range", theirs.base, theirs.size),
                });
            }
        }
    }
    let pid = std::process::id();
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    // Unique among this process's claims too (tests make several).
    static SEQUENCE: AtomicU64 = AtomicU64::new(0);
    let sequence = SEQUENCE.fetch_add(1, Ordering::Relaxed);
    let file = dir.join(format!("{pid}-{since}-{sequence}{SUFFIX}"));
    let created = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(&file)
        .map_err(io("creating the registration", &file))?;
    let lock = flock::try_lock(created, &file)
        .map_err(|source| RegistryError::Lock {
            path: file.clone(),
            source,
        })?
        .ok_or_else(|| RegistryError::Busy {
            path: dir.to_path_buf(),
            lock: file.clone(),
        })?;
    // From here the claim removes the file if anything below fails.
    let claim = PoolClaim {
        file: file.clone(),
        lock: Some(lock),
    };
    let registration = Registration {
        pid,
        state_dir: state_dir.display().to_string(),
        socket: socket.display().to_string(),
        base: pool.start(),
        size: pool.len(),
        since,
    };
    let text = serde_json::to_string(&registration).map_err(|e| RegistryError::Io {
        path: file.clone(),
        what: "encoding the registration",
        source: std::io::Error::other(e),
    })?;
    if let Some(locked) = &claim.lock {
        let mut writer = locked.file();
        writer
            .write_all(format!("{text}\n").as_bytes())
            .map_err(io("writing the registration", &file))?;
    }
    Ok(claim)
}

/// The registration in `file` when a running daemon holds its lock; `None` (after removing
/// the file) when its lock is free, or when it vanished meanwhile.
fn read_if_held(file: &Path) -> Result<Option<Registration>, RegistryError> {
    let opened = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc_o_nofollow())
        .open(file)
    {
        Ok(opened) => opened,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(RegistryError::Io {
                path: file.to_path_buf(),
                what: "opening a registration",
                source,
            });
        }
    };
    let lock_err = |source| RegistryError::Lock {
        path: file.to_path_buf(),
        source,
    };
    let reopen = || {
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc_o_nofollow())
            .open(file)
    };
    if let Some(stale) = flock::try_lock(opened, file).map_err(lock_err)? {
        return remove_stale(file, stale).map(|()| None);
    }
    let text = std::fs::read_to_string(file).map_err(|source| RegistryError::Io {
        path: file.to_path_buf(),
        what: "reading a registration",
        source,
    })?;
    let registration: Registration =
        serde_json::from_str(text.trim()).map_err(|e| RegistryError::Unreadable {
            file: file.to_path_buf(),
            reason: e.to_string(),
        })?;
    // A daemon's v1 lease spawners share its descriptor table (clone(CLONE_FILES)), so its
    // lock outlives a killed daemon until they notice and exit, within milliseconds. When the
    // registered pid is gone, wait a little for the lock before calling the daemon alive.
    if !pid_alive(registration.pid)
        && let Ok(opened) = reopen()
        && let Some(stale) = flock::lock_within(opened, file, GONE_WAIT).map_err(lock_err)?
    {
        return remove_stale(file, stale).map(|()| None);
    }
    Ok(Some(registration))
}

/// How long a registration whose pid is gone may stay locked before it counts as held.
const GONE_WAIT: Duration = Duration::from_secs(5);

/// Removes a registration whose lock this scan holds: its daemon is gone.
fn remove_stale(file: &Path, lock: Locked) -> Result<(), RegistryError> {
    let text = std::fs::read_to_string(file).unwrap_or_default();
    std::fs::remove_file(file).map_err(|source| RegistryError::Io {
        path: file.to_path_buf(),
        what: "removing a stale registration",
        source,
    })?;
    drop(lock);
    tracing::info!(
        file = %file.display(),
        registration = text.trim(),
        "removed the registration of a daemon that is gone"
    );
    Ok(())
}

/// Whether a process with this pid exists in this pid namespace (`kill(pid, 0)`, kill(2)).
/// A daemon in another pid namespace may look gone: only a free lock makes it stale.
fn pid_alive(pid: u32) -> bool {
    let Ok(raw) = i32::try_from(pid) else {
        return false;
    };
    !matches!(
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(raw), None),
        Err(nix::errno::Errno::ESRCH)
    )
}

/// `O_NOFOLLOW`: a registration or the lock is never a symbolic link (the directory is
/// root's, but a link would be someone's mistake to refuse, not to follow).
fn libc_o_nofollow() -> i32 {
    nix::fcntl::OFlag::O_NOFOLLOW.bits()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(start: u32, len: u32) -> IdRange {
        IdRange::new(start, len).expect("range")
    }

    /// A registry directory of the test's own.
    fn registry() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().expect("tempdir");
        let registry = dir.path().join("pools");
        (dir, registry)
    }

    /// [`claim`] trusting the test's own uid as well as root.
    fn claim(
        dir: &Path,
        pool: IdRange,
        state_dir: &Path,
        socket: &Path,
    ) -> Result<PoolClaim, RegistryError> {
        let me = nix::unistd::geteuid().as_raw();
        claim_trusting(dir, pool, state_dir, socket, &|uid| uid == 0 || uid == me)
    }

    #[test]
    fn overlapping_pools_are_refused_disjoint_ones_registered_and_stale_ones_removed() {
        let (_dir, registry) = registry();
        let state = Path::new("/var/lib/first");
        let socket = Path::new("/run/first.sock");
        let first =
            claim(&registry, range(0x7000_0000, 0x20000), state, socket).expect("first claim");
        let text = std::fs::read_to_string(first.file()).expect("read");
        let written: Registration = serde_json::from_str(text.trim()).expect("json");
        assert_eq!(written.pid, std::process::id());
        assert_eq!(written.state_dir, "/var/lib/first");

        // The same process may not hold two overlapping claims either: the lock is per open
        // file, not per process.
        let err = claim(
            &registry,
            range(0x7001_0000, 0x20000),
            Path::new("/var/lib/second"),
            socket,
        )
        .expect_err("overlap");
        let message = err.to_string();
        for part in [
            "1879113728-1879244799",
            "1879048192-1879179263",
            &format!("pid {}", std::process::id()),
            "/var/lib/first",
            "/run/first.sock",
        ] {
            assert!(message.contains(part), "{part}: {message}");
        }
        let disjoint = claim(
            &registry,
            range(0x7002_0000, 0x10000),
            Path::new("/var/lib/third"),
            socket,
        )
        .expect("a disjoint pool is fine");

        // A registration nobody holds (its daemon was SIGKILLed) is removed at the next scan.
        let stale = registry.join("99999-1.pool");
        std::fs::write(
            &stale,
            r#"{"pid":99999,"state_dir":"/gone","socket":"/gone.sock","base":1879048192,"size":65536,"since":1}"#,
        )
        .expect("write stale");
        drop(first);
        let again = claim(
            &registry,
            range(0x7000_0000, 0x10000),
            Path::new("/var/lib/again"),
            socket,
        )
        .expect("the first is gone, the stale one too");
        assert!(!stale.exists(), "stale registration removed");
        let left: Vec<String> = std::fs::read_dir(&registry)
            .expect("read")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(SUFFIX))
            .collect();
        assert_eq!(left.len(), 2, "the disjoint and the new claim: {left:?}");
        drop((again, disjoint));
        let left = std::fs::read_dir(&registry)
            .expect("read")
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(SUFFIX))
            .count();
        assert_eq!(left, 0, "dropped claims remove their files");
    }

    #[test]
    fn a_locked_registration_of_a_gone_pid_is_waited_for_not_taken_as_alive() {
        // What a SIGKILLed daemon's v1 lease spawner leaves for a moment: the daemon's pid is
        // gone but the shared descriptor table still holds the lock.
        let (_dir, registry) = registry();
        std::fs::create_dir_all(&registry).expect("mkdir");
        let file = registry.join("4194305-1-0.pool");
        std::fs::write(
            &file,
            r#"{"pid":4194305,"state_dir":"/gone","socket":"/gone.sock","base":1879048192,"size":65536,"since":1}"#,
        )
        .expect("write");
        let held = flock::try_lock(std::fs::File::open(&file).expect("open"), &file)
            .expect("flock")
            .expect("free");
        let release = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            drop(held);
        });
        let claim = claim(
            &registry,
            range(0x7000_0000, 0x10000),
            Path::new("/var/lib/next"),
            Path::new("/run/next.sock"),
        )
        .expect("the lock came free within the wait");
        release.join().expect("thread");
        assert!(!file.exists(), "the gone daemon's registration was removed");
        drop(claim);
    }
}
