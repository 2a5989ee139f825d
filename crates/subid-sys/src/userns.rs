//! A lease's user namespace: the id maps, the pin (a bind mount of `/proc/<pid>/ns/user`), and
//! questions asked of a namespace fd.
//!
//! Creation itself lives in [`crate::spawn`] (it needs the clone machinery): the namespace is
//! created by a helper running as the lease's base uid/gid, so that the namespace's owner — who
//! is charged for inotify instances, pending signals, mqueue bytes and, since 5.14,
//! RLIMIT_NPROC of everything inside — is per lease (docs/ARCHITECTURE.md, "Kernel facts the
//! design relies on").

use std::fs;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::mount::{MntFlags, MsFlags};
use nix::sys::stat::Mode;
use subid_core::{Extent, NamespaceKind, lease_map, parse_map, render_map};

use crate::error::{Result, SysError, errno_of};
use crate::pidfd::ProcDir;

/// A kind of namespace a lease can have. The user namespace is always there; the others are
/// optional, created together with it (so owned by it) and pinned beside its pin.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NsKind {
    /// The user namespace.
    User,
    /// A mount namespace (a copy of the daemon's mounts, locked by the lease's namespace).
    Mnt,
    /// A UTS namespace (hostname).
    Uts,
    /// An IPC namespace (System V IPC, POSIX message queues).
    Ipc,
    /// A network namespace, with loopback up.
    Net,
}

impl NsKind {
    /// The optional kinds, in the order they are joined (after the user namespace).
    pub const EXTRA: [NsKind; 4] = [NsKind::Mnt, NsKind::Uts, NsKind::Ipc, NsKind::Net];

    /// The name under `/proc/<pid>/ns/` and of the pin file.
    pub fn name(self) -> &'static str {
        match self {
            NsKind::User => "user",
            NsKind::Mnt => "mnt",
            NsKind::Uts => "uts",
            NsKind::Ipc => "ipc",
            NsKind::Net => "net",
        }
    }

    /// The `CLONE_NEW*` flag (also what `NS_GET_NSTYPE` answers).
    pub fn clone_flag(self) -> libc::c_int {
        match self {
            NsKind::User => libc::CLONE_NEWUSER,
            NsKind::Mnt => libc::CLONE_NEWNS,
            NsKind::Uts => libc::CLONE_NEWUTS,
            NsKind::Ipc => libc::CLONE_NEWIPC,
            NsKind::Net => libc::CLONE_NEWNET,
        }
    }

    /// The pin of this kind beside the user namespace's pin `user_pin` (`<dir>/user`).
    pub fn pin_beside(self, user_pin: &Path) -> PathBuf {
        user_pin.with_file_name(self.name())
    }
}

/// Which optional namespaces a lease has besides its user namespace.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExtraNs {
    /// A mount namespace. Its pin needs a non-shared parent mount: see [`make_private_mount`].
    pub mnt: bool,
    /// A UTS namespace.
    pub uts: bool,
    /// An IPC namespace.
    pub ipc: bool,
    /// A network namespace (loopback is brought up).
    pub net: bool,
}

impl ExtraNs {
    /// All four.
    pub const ALL: ExtraNs = ExtraNs {
        mnt: true,
        uts: true,
        ipc: true,
        net: true,
    };

    /// The optional namespaces named by `kinds`.
    pub fn from_kinds(kinds: impl IntoIterator<Item = NamespaceKind>) -> ExtraNs {
        let mut extra = ExtraNs::default();
        for kind in kinds {
            match kind {
                NamespaceKind::Mnt => extra.mnt = true,
                NamespaceKind::Uts => extra.uts = true,
                NamespaceKind::Ipc => extra.ipc = true,
                NamespaceKind::Net => extra.net = true,
            }
        }
        extra
    }

    /// Whether `kind` is asked for (`User` always is).
    pub fn has(self, kind: NsKind) -> bool {
        match kind {
            NsKind::User => true,
            NsKind::Mnt => self.mnt,
            NsKind::Uts => self.uts,
            NsKind::Ipc => self.ipc,
            NsKind::Net => self.net,
        }
    }

    /// The asked-for optional kinds.
    pub fn kinds(self) -> impl Iterator<Item = NsKind> {
        NsKind::EXTRA.into_iter().filter(move |k| self.has(*k))
    }

    /// The `CLONE_NEW*` flags of the asked-for optional kinds.
    pub fn clone_flags(self) -> libc::c_int {
        self.kinds().fold(0, |f, k| f | k.clone_flag())
    }
}

/// The ids of a lease: inside the namespace `0..size` maps to `uid_base..uid_base+size` (and the
/// same for gids), as one extent `0 <base> <size>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UserNsSpec {
    /// First host uid; also the owner of the namespace.
    pub uid_base: u32,
    /// First host gid; also the group of the namespace's creator.
    pub gid_base: u32,
    /// Number of ids.
    pub size: u32,
    /// RLIMIT_NPROC of the creator, which caps the processes of the whole namespace
    /// (kernel >= 5.14). `None` inherits the daemon's soft limit.
    pub nproc_limit: Option<u64>,
    /// Optional namespaces made with the user namespace and pinned beside it.
    pub extra: ExtraNs,
}

impl UserNsSpec {
    /// uid and gid base alike, no process cap.
    pub fn new(base: u32, size: u32) -> Self {
        UserNsSpec {
            uid_base: base,
            gid_base: base,
            size,
            nproc_limit: None,
            extra: ExtraNs::default(),
        }
    }

    /// Rejects empty ranges, ranges that run past the last valid id (`u32::MAX` is `(uid_t)-1`),
    /// and a base of 0 (the namespace would be owned by root, which defeats its purpose).
    pub fn validate(&self) -> Result<()> {
        let bad = |reason: &str| {
            Err(SysError::InvalidInput {
                what: "id range",
                reason: reason.to_string(),
            })
        };
        if self.size == 0 {
            return bad("size is 0");
        }
        for base in [self.uid_base, self.gid_base] {
            if base == 0 {
                return bad("base 0 would make root the namespace's owner");
            }
            if u64::from(base) + u64::from(self.size) > u64::from(u32::MAX) {
                return bad("range runs past 4294967294");
            }
        }
        Ok(())
    }

    /// The one-extent map `0 <base> <size>`, in the kernel's format (subid-core renders it).
    fn map_line(base: u32, size: u32) -> String {
        render_map(&[lease_map(base, size)])
    }
}

/// Reads `uid_map` or `gid_map` of a process, as seen from the daemon's namespace, with
/// subid-core's parser.
pub fn read_map(proc: &ProcDir, file: &str) -> Result<Vec<Extent>> {
    let text = proc.read_to_string(file)?;
    parse_map(&text).map_err(|_| SysError::MapMismatch {
        pid: proc.pid(),
        file: "id map",
        wrote: String::new(),
        found: text,
    })
}

/// Writes `setgroups` ("allow": setgroups stays allowed so in-namespace initgroups works; the
/// child starts with no groups of its own), then `uid_map` and `gid_map`, each with one write
/// and exactly once, then reads both back. user_namespaces(7): a map file takes one write ever.
pub(crate) fn write_maps(proc: &ProcDir, spec: &UserNsSpec) -> Result<()> {
    proc.write_once("setgroups", b"allow")?;
    let files = [("uid_map", spec.uid_base), ("gid_map", spec.gid_base)];
    for (file, base) in files {
        proc.write_once(file, UserNsSpec::map_line(base, spec.size).as_bytes())?;
    }
    for (file, base) in files {
        let found = proc.read_to_string(file)?;
        if parse_map(&found).ok() != Some(vec![lease_map(base, spec.size)]) {
            return Err(SysError::MapMismatch {
                pid: proc.pid(),
                file,
                wrote: UserNsSpec::map_line(base, spec.size),
                found,
            });
        }
    }
    Ok(())
}

/// Whether `path` is an nsfs bind mount (a pin of any namespace).
pub fn is_pinned(path: &Path) -> bool {
    nix::sys::statfs::statfs(path)
        .map(|st| is_nsfs(&st))
        .unwrap_or(false)
}

/// Whether a statfs answer is nsfs. The field types differ between libcs and arches.
#[allow(clippy::unnecessary_cast)]
fn is_nsfs(st: &nix::sys::statfs::Statfs) -> bool {
    st.filesystem_type().0 as i64 == libc::NSFS_MAGIC as i64
}

/// Bind-mounts the `kind` namespace of the verified process onto `path`, creating the empty file
/// (and its parents) first. A file this call created is removed again if the mount fails.
pub(crate) fn pin(proc: &ProcDir, kind: NsKind, path: &Path) -> Result<()> {
    if is_pinned(path) {
        return Err(SysError::AlreadyPinned {
            path: path.to_path_buf(),
        });
    }
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).map_err(|e| SysError::io_path("mkdir", parent, &e))?;
    }
    let existed = path.exists();
    fs::OpenOptions::new()
        .write(true)
        .create(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| SysError::io_path("create", path, &e))?;
    let ns = proc.open(&format!("ns/{}", kind.name()), OFlag::O_RDONLY)?;
    // The magic link /proc/self/fd/N resolves to the nsfs inode we hold, not to a path that
    // could be swapped meanwhile.
    let source = format!("/proc/self/fd/{}", ns.as_raw_fd());
    let mounted = nix::mount::mount(
        Some(source.as_str()),
        path,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    );
    if let Err(e) = mounted {
        if !existed {
            let _ = fs::remove_file(path);
        }
        // EINVAL for a mount namespace: its pin sits in a shared mount (make_private_mount).
        return Err(SysError::path("mount (bind, pin)", path, e));
    }
    Ok(())
}

/// Makes `dir` a mount point of its own with private propagation (bind-mounting it onto itself
/// first when it is none), as util-linux `unshare --mount=<file>` asks: a pinned *mount*
/// namespace cannot be bind-mounted into a shared mount, whose peers would get a copy
/// (`copy_tree` refuses mount namespace files, fs/namespace.c). Call once for the directory
/// that holds the pins, e.g. `<runtime-dir>/ns`.
pub fn make_private_mount(dir: &Path) -> Result<()> {
    fs::create_dir_all(dir).map_err(|e| SysError::io_path("mkdir", dir, &e))?;
    if !is_mount_point(dir)? {
        nix::mount::mount(
            Some(dir),
            dir,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        )
        .map_err(|e| SysError::path("mount (bind onto itself)", dir, e))?;
    }
    nix::mount::mount(
        None::<&str>,
        dir,
        None::<&str>,
        MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(|e| SysError::path("mount (make private)", dir, e))
}

/// Removes a directory of pins made with [`make_private_mount`]: unmounts it (lazily, while
/// mounts are stacked on it), then removes it. A directory that is no mount point is just
/// removed; one that does not exist is fine.
pub fn remove_private_dir(dir: &Path) -> Result<()> {
    for _ in 0..16 {
        match nix::mount::umount2(dir, MntFlags::MNT_DETACH | MntFlags::UMOUNT_NOFOLLOW) {
            Ok(()) => continue,
            Err(Errno::EINVAL | Errno::ENOENT) => break,
            Err(e) => return Err(SysError::path("umount2", dir, e)),
        }
    }
    match fs::remove_dir(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(SysError::path("rmdir", dir, errno_of(&e))),
    }
}

/// Whether `dir` is the root of a mount, by its mount id against its parent's.
fn is_mount_point(dir: &Path) -> Result<bool> {
    let canonical = fs::canonicalize(dir).map_err(|e| SysError::io_path("realpath", dir, &e))?;
    let table = fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| SysError::io_path("read", "/proc/self/mountinfo", &e))?;
    let needle = canonical.to_string_lossy();
    Ok(table.lines().any(|l| l.split(' ').nth(4) == Some(&needle)))
}

/// Opens a pinned user namespace (`nsenter`, ioctls; [`LeaseNs::open`] for spawning).
/// `NotPinned` when `path` is no nsfs mount of a *user* namespace.
pub fn open_pinned(path: &Path) -> Result<OwnedFd> {
    open_pinned_kind(path, NsKind::User)
}

/// Opens a pinned namespace of the given kind; `NotPinned` for anything else.
pub fn open_pinned_kind(path: &Path, want: NsKind) -> Result<OwnedFd> {
    let fd = nix::fcntl::open(
        path,
        OFlag::O_RDONLY | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW,
        Mode::empty(),
    )
    .map_err(|e| SysError::path("open", path, e))?;
    let st = nix::sys::statfs::fstatfs(&fd).map_err(|e| SysError::path("fstatfs", path, e))?;
    if !is_nsfs(&st) {
        return Err(SysError::NotPinned {
            path: path.to_path_buf(),
        });
    }
    // SAFETY: NS_GET_NSTYPE takes no argument and returns the CLONE_NEW* type.
    let kind = unsafe { libc::ioctl(fd.as_raw_fd(), libc::NS_GET_NSTYPE) };
    if kind != want.clone_flag() {
        return Err(SysError::NotPinned {
            path: path.to_path_buf(),
        });
    }
    Ok(fd)
}

/// The pinned namespaces of one lease, opened: what [`crate::spawn::Namespace::Join`] joins.
#[derive(Debug)]
pub struct LeaseNs {
    user: OwnedFd,
    extra: Vec<(NsKind, OwnedFd)>,
}

impl LeaseNs {
    /// Opens the user namespace pinned at `user_pin` and every optional namespace pinned beside
    /// it (`<dir>/mnt`, `uts`, `ipc`, `net`).
    pub fn open(user_pin: &Path) -> Result<Self> {
        let user = open_pinned(user_pin)?;
        let mut extra = Vec::new();
        for kind in NsKind::EXTRA {
            let path = kind.pin_beside(user_pin);
            if is_pinned(&path) {
                extra.push((kind, open_pinned_kind(&path, kind)?));
            }
        }
        Ok(LeaseNs { user, extra })
    }

    /// Just a user namespace, e.g. one opened with [`open_pinned`].
    pub fn from_user(user: OwnedFd) -> Self {
        LeaseNs {
            user,
            extra: Vec::new(),
        }
    }

    /// The user namespace.
    pub fn user(&self) -> BorrowedFd<'_> {
        self.user.as_fd()
    }

    /// The namespace of `kind`, if the lease has one.
    pub fn get(&self, kind: NsKind) -> Option<BorrowedFd<'_>> {
        if kind == NsKind::User {
            return Some(self.user());
        }
        self.extra
            .iter()
            .find(|(k, _)| *k == kind)
            .map(|(_, fd)| fd.as_fd())
    }

    /// The optional namespaces, in joining order.
    pub(crate) fn extra(&self) -> impl Iterator<Item = (NsKind, BorrowedFd<'_>)> {
        self.extra.iter().map(|(k, fd)| (*k, fd.as_fd()))
    }
}

/// Removes the pins of a lease: the user namespace's at `user_pin` and those beside it, each
/// with [`unpin_one`]. Every pin is tried; every failure is reported.
pub fn unpin(user_pin: &Path) -> Result<()> {
    let mut errors = Vec::new();
    for kind in NsKind::EXTRA {
        if let Err(e) = unpin_one(&kind.pin_beside(user_pin)) {
            errors.push(e);
        }
    }
    if let Err(e) = unpin_one(user_pin) {
        errors.push(e);
    }
    match errors.len() {
        0 => Ok(()),
        1 => Err(errors.remove(0)),
        _ => Err(SysError::Teardown { errors }),
    }
}

/// Removes one pin: `umount2(MNT_DETACH)` (repeated while pins are stacked), then the file.
/// Idempotent: a path that is not mounted or does not exist is fine. Both steps are tried and
/// every failure is reported.
pub fn unpin_one(path: &Path) -> Result<()> {
    let mut errors = Vec::new();
    for _ in 0..16 {
        match nix::mount::umount2(path, MntFlags::MNT_DETACH | MntFlags::UMOUNT_NOFOLLOW) {
            Ok(()) => continue,
            Err(Errno::EINVAL | Errno::ENOENT) => break,
            Err(e) => {
                errors.push(SysError::path("umount2", path, e));
                break;
            }
        }
    }
    match fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => errors.push(SysError::path("unlink", path, errno_of(&e))),
    }
    match errors.len() {
        0 => Ok(()),
        1 => Err(errors.remove(0)),
        _ => Err(SysError::Teardown { errors }),
    }
}

/// The owner of a user namespace, in the daemon's namespace: `ioctl(NS_GET_OWNER_UID)`.
pub fn owner_uid(ns: BorrowedFd<'_>) -> Result<u32> {
    let mut uid: libc::uid_t = 0;
    // SAFETY: NS_GET_OWNER_UID writes one uid_t into the live local.
    let r = unsafe { libc::ioctl(ns.as_raw_fd(), libc::NS_GET_OWNER_UID, &mut uid) };
    if r < 0 {
        return Err(SysError::syscall("ioctl(NS_GET_OWNER_UID)", Errno::last()));
    }
    Ok(uid)
}

/// The user namespace that owns `ns` (its parent): `ioctl(NS_GET_PARENT)`; `None` at the top
/// (the initial namespace, or one outside the caller's view: `EPERM`).
pub fn parent_of(ns: BorrowedFd<'_>) -> Result<Option<OwnedFd>> {
    // SAFETY: NS_GET_PARENT takes no argument and returns a new fd or -1.
    let r = unsafe { libc::ioctl(ns.as_raw_fd(), libc::NS_GET_PARENT) };
    if r < 0 {
        return match Errno::last() {
            Errno::EPERM => Ok(None),
            e => Err(SysError::syscall("ioctl(NS_GET_PARENT)", e)),
        };
    }
    // SAFETY: the kernel just gave us this fd; nothing else owns it.
    Ok(Some(unsafe { OwnedFd::from_raw_fd(r) }))
}

/// Whether the user namespace `ns` is the one with inode `ancestor` or lies below it (at most
/// 32 levels, the kernel's limit on user namespace nesting).
pub fn is_within(ns: BorrowedFd<'_>, ancestor: u64) -> Result<bool> {
    if ns_inode(ns)? == ancestor {
        return Ok(true);
    }
    let mut current = parent_of(ns)?;
    for _ in 0..32 {
        let Some(fd) = current else {
            return Ok(false);
        };
        if ns_inode(&fd)? == ancestor {
            return Ok(true);
        }
        current = parent_of(fd.as_fd())?;
    }
    Ok(false)
}

/// The namespace's identity: the nsfs inode number (what `readlink /proc/PID/ns/user` shows).
pub fn ns_inode(ns: impl AsFd) -> Result<u64> {
    let st = nix::sys::stat::fstat(ns.as_fd()).map_err(|e| SysError::syscall("fstat", e))?;
    Ok(st.st_ino)
}

/// Creates the lease's namespaces and pins them (the user namespace at `pin`, the optional ones
/// beside it), leaving no process in them: the holder exits once the maps are written, loopback
/// is up and the pins are in place.
pub fn create_pinned(spec: &UserNsSpec, pin: &Path) -> Result<()> {
    crate::spawn::create_holder(spec, pin, crate::spawn::DEFAULT_TIMEOUT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validates_ranges() {
        assert!(UserNsSpec::new(0x7000_0000, 65536).validate().is_ok());
        assert!(UserNsSpec::new(0x7000_0000, 0).validate().is_err());
        assert!(UserNsSpec::new(0, 65536).validate().is_err());
        assert!(UserNsSpec::new(u32::MAX - 65535, 65535).validate().is_ok());
        assert!(UserNsSpec::new(u32::MAX - 65535, 65536).validate().is_err());
    }

    #[test]
    fn maps_are_rendered_as_the_kernel_prints_them() {
        assert_eq!(
            UserNsSpec::map_line(1879048192, 65536),
            "0 1879048192 65536\n"
        );
        let kernel = "         0 1879048192      65536\n";
        assert_eq!(
            parse_map(kernel).ok(),
            Some(vec![lease_map(1879048192, 65536)])
        );
    }
}
