//! Idmapped mounts for container root filesystems that belong to host root: cloning a mount
//! (`open_tree`), idmapping the clone with a lease's user namespace (`mount_setattr`), attaching
//! it (`move_mount`), and mounting an overlay over idmapped layers from a thread whose fsuid and
//! fsgid are the lease's base ids.
//!
//! # Why the overlay is mounted that way
//! An overlay mount itself cannot be idmapped (`mount_setattr` answers `EINVAL`: overlayfs does
//! not set `FS_ALLOW_IDMAP`), but since Linux 5.19 its *layers* may be idmapped mounts
//! (Documentation/filesystems/overlayfs.rst, "Idmapped layers"). overlayfs then acts on the upper
//! and work directories with the credentials of whoever mounted it (`ovl_override_creds`): as
//! host root, whose uid 0 the idmapped view does not map, it cannot even make its work
//! directory and falls back to read-only. Mounted by a thread whose fsuid/fsgid are the lease's
//! base (container root on the host), it works: what it writes lands on disk as id 0 and the
//! container's other ids land as themselves, so the layer keeps the container's own ids. The
//! thread keeps its capabilities across the fsuid change with `SECBIT_NO_SETUID_FIXUP`
//! (capabilities(7), "Effect of user ID changes on capabilities"); the change is made with raw
//! `setfsuid`/`setfsgid`, which act on the calling thread only (credentials are per thread in
//! Linux; setfsuid(2)), and the thread ends after the mount, taking its credentials with it.

use std::ffi::CString;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::mount::{MntFlags, MsFlags};

use crate::error::{Result, SysError};

/// `AT_RECURSIVE` of include/uapi/linux/fcntl.h: apply to the whole mount tree.
const AT_RECURSIVE: libc::c_uint = 0x8000;

/// The most bytes of mount(2) options the kernel copies (one page): longer overlay options
/// would be cut.
const MOUNT_DATA_MAX: usize = 4095;

/// What [`Tree::set`] changes on a cloned mount (tree).
#[derive(Debug, Clone, Copy, Default)]
pub struct MountAttrs<'a> {
    /// Idmap the mount with this user namespace: on-disk id N shows as the host id that N maps
    /// to in the namespace (`MOUNT_ATTR_IDMAP`).
    pub idmap: Option<BorrowedFd<'a>>,
    /// `MOUNT_ATTR_NOSUID`: set-user-ID bits and file capabilities are ignored.
    pub nosuid: bool,
    /// `MOUNT_ATTR_NODEV`: device files cannot be opened.
    pub nodev: bool,
}

/// A detached copy of the mount at a path (`open_tree(OPEN_TREE_CLONE)`). Until attached with
/// [`Tree::attach`] it is in no mount namespace; dropping it unmounts it (the kernel frees an
/// anonymous tree when its last fd closes).
#[derive(Debug)]
pub struct Tree {
    fd: OwnedFd,
    source: PathBuf,
    recursive: bool,
}

/// Clones the mount at `source` (rooted at `source`, which need not be a mount point), with its
/// submounts when `recursive`.
pub fn clone_tree(source: &Path, recursive: bool) -> Result<Tree> {
    let path = cpath(source)?;
    let mut flags = libc::OPEN_TREE_CLONE | libc::O_CLOEXEC as libc::c_uint;
    if recursive {
        flags |= AT_RECURSIVE;
    }
    // SAFETY: open_tree(2) with a NUL-terminated path that lives across the call; it returns a
    // new fd or -1 and touches no other memory of ours.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_open_tree,
            libc::AT_FDCWD,
            path.as_ptr(),
            flags as libc::c_ulong,
        )
    };
    if fd < 0 {
        let errno = Errno::last();
        if errno == Errno::ENOSYS {
            return Err(unsupported(
                "open_tree(2) is missing: idmapped mounts need Linux 5.12 or later",
            ));
        }
        return Err(SysError::path("open_tree (clone)", source, errno));
    }
    let raw = i32::try_from(fd).map_err(|_| SysError::path("open_tree", source, Errno::EBADF))?;
    // SAFETY: the kernel just returned this fd, and nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    Ok(Tree {
        fd,
        source: source.to_path_buf(),
        recursive,
    })
}

impl Tree {
    /// Sets `attrs` on the clone (on every mount of it when it was cloned recursively).
    pub fn set(&self, attrs: &MountAttrs<'_>) -> Result<()> {
        let mut attr = libc::mount_attr {
            attr_set: 0,
            attr_clr: 0,
            propagation: 0,
            userns_fd: 0,
        };
        if let Some(ns) = attrs.idmap {
            attr.attr_set |= libc::MOUNT_ATTR_IDMAP;
            attr.userns_fd = u64::try_from(ns.as_raw_fd()).unwrap_or(u64::MAX);
        }
        if attrs.nosuid {
            attr.attr_set |= libc::MOUNT_ATTR_NOSUID;
        }
        if attrs.nodev {
            attr.attr_set |= libc::MOUNT_ATTR_NODEV;
        }
        let mut flags = libc::AT_EMPTY_PATH as libc::c_uint;
        if self.recursive {
            flags |= AT_RECURSIVE;
        }
        let empty = c"";
        // SAFETY: mount_setattr(2) on our own mount fd with an empty path, a live `mount_attr`
        // and its exact size; the kernel reads the struct and writes nothing back.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_mount_setattr,
                self.fd.as_raw_fd(),
                empty.as_ptr(),
                flags as libc::c_ulong,
                &attr as *const libc::mount_attr,
                std::mem::size_of::<libc::mount_attr>(),
            )
        };
        if rc < 0 {
            let errno = Errno::last();
            return Err(match errno {
                Errno::ENOSYS => unsupported(
                    "mount_setattr(2) is missing: idmapped mounts need Linux 5.12 or later",
                ),
                // EINVAL: the filesystem does not allow idmapped mounts (FS_ALLOW_IDMAP), or
                // the mount is idmapped already (mount_setattr(2)).
                Errno::EINVAL if attrs.idmap.is_some() => SysError::Unsupported {
                    what: "idmapped mount",
                    reason: format!(
                        "{} is on {}, which this kernel cannot idmap (or it is idmapped already): \
                         mount_setattr(MOUNT_ATTR_IDMAP): {errno}",
                        self.source.display(),
                        fs_name(&self.source)
                    ),
                },
                _ => SysError::path("mount_setattr", &self.source, errno),
            });
        }
        Ok(())
    }

    /// Attaches the clone at `target` (an existing directory, or a file for a cloned file).
    pub fn attach(self, target: &Path) -> Result<()> {
        let to = cpath(target)?;
        let empty = c"";
        // SAFETY: move_mount(2) from our mount fd (empty path) to a NUL-terminated path; both
        // strings live across the call, and the kernel writes nothing back.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_move_mount,
                self.fd.as_raw_fd(),
                empty.as_ptr(),
                libc::AT_FDCWD,
                to.as_ptr(),
                libc::MOVE_MOUNT_F_EMPTY_PATH as libc::c_ulong,
            )
        };
        if rc < 0 {
            return Err(SysError::path("move_mount", target, Errno::last()));
        }
        Ok(())
    }
}

/// An overlay to mount: its layers as paths relative to `base` (the directory the mounting
/// thread works in), so the options stay short whatever `base` is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Overlay {
    /// Absolute: the directory (an idmapped view of the layers) that the paths below are in.
    pub base: PathBuf,
    /// Lower layers, top first (overlayfs's `lowerdir` order).
    pub lower: Vec<PathBuf>,
    pub upper: PathBuf,
    pub work: PathBuf,
    /// Other overlay options to pass on as they are (`index=off`, `xino=on`, ...).
    pub options: Vec<String>,
}

impl Overlay {
    /// The mount(2) option string; paths that overlayfs would split (`,` `:`) or escape (`\`)
    /// are refused rather than escaped.
    pub fn data(&self) -> Result<String> {
        let path = |p: &Path| -> Result<String> {
            let text = p.to_str().filter(|t| {
                !t.is_empty() && !t.contains([',', ':', '\\', '\0']) && !t.starts_with('/')
            });
            text.map(str::to_string)
                .ok_or_else(|| SysError::InvalidInput {
                    what: "overlay layer path",
                    reason: format!(
                        "{} must be relative to the layers' directory, non-empty UTF-8 without \
                     ',', ':' or '\\'",
                        p.display()
                    ),
                })
        };
        if self.lower.is_empty() {
            return Err(SysError::InvalidInput {
                what: "overlay",
                reason: "no lower layer".into(),
            });
        }
        let lower = self
            .lower
            .iter()
            .map(|p| path(p))
            .collect::<Result<Vec<_>>>()?
            .join(":");
        let mut data = format!(
            "lowerdir={lower},upperdir={},workdir={}",
            path(&self.upper)?,
            path(&self.work)?
        );
        for option in &self.options {
            if option.is_empty() || option.contains([',', '\0']) {
                return Err(SysError::InvalidInput {
                    what: "overlay option",
                    reason: format!("{option:?}"),
                });
            }
            data.push(',');
            data.push_str(option);
        }
        if data.len() > MOUNT_DATA_MAX {
            return Err(SysError::InvalidInput {
                what: "overlay",
                reason: format!(
                    "its options take {} bytes, more than the {MOUNT_DATA_MAX} mount(2) copies",
                    data.len()
                ),
            });
        }
        Ok(data)
    }
}

/// Mounts `overlay` on `target` (absolute) from a new thread whose fsuid and fsgid are `uid`
/// and `gid`, with its capabilities kept (module docs). The calling thread's credentials and
/// working directory do not change.
pub fn mount_overlay_as(overlay: &Overlay, target: &Path, uid: u32, gid: u32) -> Result<()> {
    if !target.is_absolute() || !overlay.base.is_absolute() {
        return Err(SysError::InvalidInput {
            what: "overlay mount",
            reason: format!(
                "{} and {} must be absolute",
                target.display(),
                overlay.base.display()
            ),
        });
    }
    let data = overlay.data()?;
    let base = overlay.base.clone();
    let target = target.to_path_buf();
    let thread = std::thread::Builder::new()
        .name("overlay-mount".into())
        .spawn(move || mount_in_this_thread(&base, &target, &data, uid, gid))
        .map_err(|e| SysError::syscall("clone (mount thread)", crate::error::errno_of(&e)))?;
    thread
        .join()
        .map_err(|_| SysError::syscall("mount thread", Errno::EIO))?
}

/// The body of [`mount_overlay_as`]'s thread: its own fs context (cwd), the layers' directory
/// as cwd, `SECBIT_NO_SETUID_FIXUP`, fsgid, fsuid, mount. Never call it on a thread that goes
/// on to do anything else.
fn mount_in_this_thread(base: &Path, target: &Path, data: &str, uid: u32, gid: u32) -> Result<()> {
    // A cwd of this thread's own: the process's stays where it is (unshare(2), CLONE_FS).
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_FS)
        .map_err(|e| SysError::syscall("unshare (CLONE_FS)", e))?;
    nix::unistd::chdir(base).map_err(|e| SysError::path("chdir", base, e))?;
    // SAFETY: prctl(PR_GET_SECUREBITS) takes no pointer and returns the bits or -1.
    let bits = unsafe { libc::prctl(libc::PR_GET_SECUREBITS) };
    if bits < 0 {
        return Err(SysError::syscall(
            "prctl (PR_GET_SECUREBITS)",
            Errno::last(),
        ));
    }
    let keep = bits | libc::SECBIT_NO_SETUID_FIXUP;
    // SAFETY: prctl(PR_SET_SECUREBITS, bits) takes an integer; it changes this thread's
    // credentials only.
    let rc = unsafe { libc::prctl(libc::PR_SET_SECUREBITS, keep as libc::c_ulong) };
    if rc < 0 {
        return Err(SysError::syscall(
            "prctl (PR_SET_SECUREBITS)",
            Errno::last(),
        ));
    }
    for (nr, id, name) in [
        (libc::SYS_setfsgid, gid, "setfsgid"),
        (libc::SYS_setfsuid, uid, "setfsuid"),
    ] {
        // SAFETY: setfsgid/setfsuid take an integer, act on this thread only, and return the
        // previous value (they report no error: the value is read back below).
        unsafe { libc::syscall(nr, id as libc::c_ulong) };
        // SAFETY: as above; -1 is never a valid id, so this only reads the current value.
        let now = unsafe { libc::syscall(nr, u32::MAX as libc::c_ulong) };
        if now != i64::from(id) {
            return Err(SysError::syscall(name, Errno::EPERM));
        }
    }
    nix::mount::mount(
        Some("overlay"),
        target,
        Some("overlay"),
        MsFlags::empty(),
        Some(data),
    )
    .map_err(|e| match e {
        // Before Linux 5.19 overlayfs refuses idmapped layers.
        Errno::EINVAL => SysError::Unsupported {
            what: "overlay on idmapped layers",
            reason: format!(
                "mount overlay on {}: {e} (overlayfs takes idmapped layers from Linux 5.19; \
                 the kernel log says more)",
                target.display()
            ),
        },
        e => SysError::path("mount (overlay)", target, e),
    })
}

/// Bind-mounts `source` onto `target` (not recursive).
pub fn bind(source: &Path, target: &Path) -> Result<()> {
    nix::mount::mount(
        Some(source),
        target,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .map_err(|e| SysError::path("mount (bind)", target, e))
}

/// Detaches the topmost mount at `path` (`umount2(MNT_DETACH)`, never following a symlink).
/// `Ok(false)` when nothing is mounted there or the path is gone.
pub fn detach(path: &Path) -> Result<bool> {
    match nix::mount::umount2(path, MntFlags::MNT_DETACH | MntFlags::UMOUNT_NOFOLLOW) {
        Ok(()) => Ok(true),
        Err(Errno::EINVAL | Errno::ENOENT) => Ok(false),
        Err(e) => Err(SysError::path("umount2", path, e)),
    }
}

/// The device of the filesystem at `path` (`st_dev`): every overlay mount has its own, so it
/// tells one overlay stacked on a path from another.
pub fn device_of(path: &Path) -> Result<u64> {
    nix::sys::stat::stat(path)
        .map(|st| st.st_dev)
        .map_err(|e| SysError::path("stat", path, e))
}

/// Whether the kernel can idmap a clone of `dir` with `userns`: a clone is made, idmapped and
/// dropped. `Unsupported` says why not (no such system calls, or not on this filesystem).
pub fn probe(dir: &Path, userns: BorrowedFd<'_>) -> Result<()> {
    let tree = clone_tree(dir, false)?;
    tree.set(&MountAttrs {
        idmap: Some(userns),
        ..MountAttrs::default()
    })
}

fn cpath(path: &Path) -> Result<CString> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| SysError::InvalidInput {
        what: "path",
        reason: format!("{} contains a NUL byte", path.display()),
    })
}

fn unsupported(reason: &str) -> SysError {
    SysError::Unsupported {
        what: "idmapped mounts",
        reason: reason.to_string(),
    }
}

/// A name for the filesystem at `path`, for messages (statfs(2) magic numbers).
fn fs_name(path: &Path) -> String {
    #[allow(clippy::unnecessary_cast)]
    let magic = match nix::sys::statfs::statfs(path) {
        Ok(st) => st.filesystem_type().0 as i64,
        Err(_) => return "a filesystem that cannot be examined".into(),
    };
    let name = match magic {
        0xEF53 => "ext2/3/4",
        0x5846_5342 => "xfs",
        0x9123_683E => "btrfs",
        0x0102_1994 => "tmpfs",
        0x794C_7630 => "overlayfs",
        0x6969 => "nfs",
        0x6573_5546 => "fuse",
        0x2FC1_2FC1 => "zfs",
        0xF2F5_2010 => "f2fs",
        _ => return format!("a filesystem of type {magic:#x}"),
    };
    name.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn overlay() -> Overlay {
        Overlay {
            base: PathBuf::from("/run/x/layers"),
            lower: vec!["l/AAA".into(), "l/BBB".into()],
            upper: "id/diff".into(),
            work: "id/work".into(),
            options: vec!["index=off".into()],
        }
    }

    #[test]
    fn renders_relative_overlay_options() {
        assert_eq!(
            overlay().data().unwrap(),
            "lowerdir=l/AAA:l/BBB,upperdir=id/diff,workdir=id/work,index=off"
        );
    }

    #[test]
    fn refuses_paths_overlayfs_would_split_or_that_are_absolute() {
        for bad in ["a,b", "a:b", "a\\b", "/abs", ""] {
            let mut o = overlay();
            o.upper = bad.into();
            assert!(
                matches!(o.data(), Err(SysError::InvalidInput { .. })),
                "{bad:?}"
            );
        }
        let mut o = overlay();
        o.lower.clear();
        assert!(o.data().is_err());
        let mut o = overlay();
        o.options.push("a,b".into());
        assert!(o.data().is_err());
    }

    #[test]
    fn refuses_options_longer_than_a_page() {
        let mut o = overlay();
        o.lower = (0..200)
            .map(|i| PathBuf::from(format!("l/{i:026}")))
            .collect();
        assert!(matches!(o.data(), Err(SysError::InvalidInput { .. })));
    }
}
