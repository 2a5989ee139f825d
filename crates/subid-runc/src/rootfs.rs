//! The container's files, owned by host root on disk, shown to the container as its own.
//!
//! * **An overlay root** (Docker's overlay2): the directory holding the layers is cloned and
//!   idmapped with the lease's user namespace, and a new overlay with the same layers is
//!   mounted from that view by a thread whose fsuid/fsgid are the lease's base
//!   (`subid_sys::idmount`), at `<container dir>/rootfs`. What the container writes lands in
//!   the upper layer with its own ids (0, 1000), so `docker commit` stays right. The new overlay
//!   is also bind-mounted over the runtime's root path (Docker's `merged`), so what Docker reads
//!   there (`docker cp`, `docker export`) is what the container sees.
//! * **Any other root** (a plain directory, as runc bundles have): an idmapped clone of it.
//! * **Bind mounts** (Docker's hosts/hostname/resolv.conf, volumes): an idmapped, nosuid clone
//!   of each source, which the spec then names instead.
//!
//! Everything is mounted under `<state dir>/c/<id>`, a directory of mode 0710 owned by the
//! lease's gid: the container's root (host uid `uid_base`) must reach its root filesystem, and
//! Docker's own directories (mode 0710 root) are closed to it.

use std::fs;
use std::os::fd::BorrowedFd;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};
use subid_sys::idmount::{self, MountAttrs, Overlay};

use crate::error::{Result, RuncError};
use crate::mountinfo::{self, MountEntry};
use crate::spec::BindMount;

/// Overlay options carried over from the runtime's overlay to the new one; the others are the
/// kernel's defaults or name the layers.
const CARRIED_OPTIONS: [&str; 5] = ["index", "metacopy", "redirect_dir", "xino", "volatile"];

/// The work directory of the new overlay, beside the container's upper layer: two overlays
/// must not share one (overlayfs empties `work/work` at mount).
pub const WORK_DIR: &str = "subid-runc-work";

/// Where one container's mounts live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    pub dir: PathBuf,
}

impl Layout {
    pub fn rootfs(&self) -> PathBuf {
        self.dir.join("rootfs")
    }

    /// The idmapped view of the layers while the overlay is mounted.
    pub fn layers(&self) -> PathBuf {
        self.dir.join("layers")
    }

    /// The directory of the bind sources.
    pub fn binds(&self) -> PathBuf {
        self.dir.join("m")
    }

    /// The idmapped copy of the source of `mounts[index]`.
    pub fn bind(&self, index: usize) -> PathBuf {
        self.binds().join(index.to_string())
    }
}

/// A mount stacked on a path outside the state directory (Docker's `merged`), and the device
/// of the overlay that was put there, so only that one is ever taken off.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Covered {
    pub path: PathBuf,
    pub dev: u64,
}

/// An overlay's layers, as absolute paths.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layers {
    pub lower: Vec<PathBuf>,
    pub upper: PathBuf,
    pub work: PathBuf,
    pub options: Vec<String>,
}

/// The layers of the overlay `entry` mounted at `root`. Relative layer paths (dockerd mounts
/// that way when absolute ones would not fit in a page) are taken from the directory two
/// levels above `root` (`<data-root>/overlay2/<id>/merged`).
pub fn overlay_layers(entry: &MountEntry, root: &Path) -> Result<Layers> {
    let refuse = |reason: String| RuncError::Spec {
        bundle: root.to_path_buf(),
        reason,
    };
    let anchor = root.parent().and_then(Path::parent);
    let absolute = |p: &str| -> Result<PathBuf> {
        let path = PathBuf::from(p);
        if path.is_absolute() {
            return Ok(path);
        }
        anchor.map(|a| a.join(&path)).ok_or_else(|| {
            refuse(format!(
                "relative overlay layer {p} with nowhere to anchor it"
            ))
        })
    };
    let mut lower = Vec::new();
    for option in &entry.super_options {
        if let Some(list) = option.strip_prefix("lowerdir=") {
            if list.contains("::") || list.contains('\\') {
                return Err(refuse(format!(
                    "overlay lowerdir {list:?} has data-only or escaped layers, which subid-runc \
                     does not rebuild"
                )));
            }
            for p in list.split(':').filter(|p| !p.is_empty()) {
                lower.push(absolute(p)?);
            }
        } else if let Some(p) = option.strip_prefix("lowerdir+=") {
            lower.push(absolute(p)?);
        }
    }
    let upper = entry
        .option("upperdir")
        .ok_or_else(|| refuse("the overlay root has no upper layer (read-only image?)".into()))?;
    let work = entry
        .option("workdir")
        .ok_or_else(|| refuse("the overlay root has no work directory".into()))?;
    if lower.is_empty() {
        return Err(refuse("the overlay root has no lower layer".into()));
    }
    let options = entry
        .super_options
        .iter()
        .filter(|o| {
            let key = o.split('=').next().unwrap_or("");
            CARRIED_OPTIONS.contains(&key)
        })
        .cloned()
        .collect();
    Ok(Layers {
        lower,
        upper: absolute(upper)?,
        work: absolute(work)?,
        options,
    })
}

/// The deepest directory that holds every path (all absolute, already resolved).
fn common_dir(paths: &[PathBuf]) -> PathBuf {
    let mut common: Vec<Component<'_>> = match paths.first() {
        Some(p) => p.components().collect(),
        None => return PathBuf::from("/"),
    };
    for p in &paths[1..] {
        let n = common
            .iter()
            .zip(p.components())
            .take_while(|(a, b)| *a == b)
            .count();
        common.truncate(n);
    }
    common.iter().collect()
}

/// A layer path relative to `base` (canonical). Docker's short links (`l/NAME`, a relative
/// symlink `../<layer>/diff`) are kept as they are, which keeps the options within a page;
/// any other path is resolved first, so nothing in the idmapped view needs following.
fn relative_layer(path: &Path, resolved: &Path, base: &Path) -> Result<PathBuf> {
    let io = |e| RuncError::io("resolve", path, e);
    if let (Some(dir), Some(name)) = (path.parent(), path.file_name())
        && fs::canonicalize(dir).map_err(io)? == base.join("l")
        && let Ok(target) = fs::read_link(path)
    {
        let parts: Vec<Component<'_>> = target.components().collect();
        if let [
            Component::ParentDir,
            Component::Normal(_),
            Component::Normal(diff),
        ] = parts[..]
            && diff == "diff"
        {
            return Ok(Path::new("l").join(name));
        }
    }
    resolved
        .strip_prefix(base)
        .map(Path::to_path_buf)
        .map_err(|_| RuncError::Spec {
            bundle: path.to_path_buf(),
            reason: format!("layer outside {}", base.display()),
        })
}

/// Makes `<dir>` (mode `mode`) unless it exists.
fn make_dir(dir: &Path, mode: u32) -> Result<()> {
    match fs::DirBuilder::new().mode(mode).create(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(RuncError::io("mkdir", dir, e)),
    }
}

/// Builds the container's root filesystem (module docs) and answers its path, and the mount
/// stacked over `root` when one was.
pub fn prepare_root(
    layout: &Layout,
    root: &Path,
    userns: BorrowedFd<'_>,
    uid_base: u32,
    gid_base: u32,
) -> Result<(PathBuf, Option<Covered>)> {
    let root = fs::canonicalize(root).map_err(|e| RuncError::io("resolve root", root, e))?;
    let target = layout.rootfs();
    make_dir(&target, 0o755)?;
    let table = mountinfo::read()?;
    let entry = mountinfo::top_at(&table, &root).filter(|e| e.fstype == "overlay");
    let Some(entry) = entry else {
        // A plain directory: an idmapped clone of it, with whatever is mounted below it.
        let tree = idmount::clone_tree(&root, true)
            .map_err(|e| RuncError::sys(format!("clone root {}", root.display()), e))?;
        tree.set(&MountAttrs {
            idmap: Some(userns),
            ..MountAttrs::default()
        })
        .map_err(|e| RuncError::sys(format!("idmap root {}", root.display()), e))?;
        tree.attach(&target)
            .map_err(|e| RuncError::sys("attach the idmapped root", e))?;
        return Ok((target, None));
    };
    let layers = overlay_layers(entry, &root)?;
    let resolve = |p: &Path| fs::canonicalize(p).map_err(|e| RuncError::io("resolve layer", p, e));
    let mut resolved = Vec::new();
    for p in layers.lower.iter().chain([&layers.upper, &layers.work]) {
        resolved.push(resolve(p)?);
    }
    let base = common_dir(&resolved);
    let base_dev = fs::metadata(&base)
        .map_err(|e| RuncError::io("stat", &base, e))?
        .dev();
    for p in &resolved {
        let dev = fs::metadata(p)
            .map_err(|e| RuncError::io("stat", p, e))?
            .dev();
        if dev != base_dev {
            return Err(RuncError::Spec {
                bundle: root.clone(),
                reason: format!(
                    "overlay layer {} is on another filesystem than {}; subid-runc idmaps one",
                    p.display(),
                    base.display()
                ),
            });
        }
    }
    let upper = &resolved[layers.lower.len()];
    let work = upper
        .parent()
        .map(|p| p.join(WORK_DIR))
        .ok_or_else(|| RuncError::Spec {
            bundle: root.clone(),
            reason: "the upper layer has no parent directory".into(),
        })?;
    make_dir(&work, 0o700)?;
    let mut lower = Vec::new();
    for (given, real) in layers.lower.iter().zip(&resolved) {
        lower.push(relative_layer(given, real, &base)?);
    }
    let mut options = layers.options.clone();
    if !options.iter().any(|o| o.starts_with("index=")) && index_on_by_default() {
        // Two overlays on one upper layer: with the index on, the second mount is refused
        // (EBUSY, "upperdir is in-use"); dockerd turns it off too.
        options.push("index=off".into());
    }
    let overlay = Overlay {
        base: layout.layers(),
        lower,
        upper: relative_layer(&layers.upper, upper, &base)?,
        work: work
            .strip_prefix(&base)
            .map(Path::to_path_buf)
            .map_err(|_| RuncError::Spec {
                bundle: root.clone(),
                reason: format!("work directory outside {}", base.display()),
            })?,
        options,
    };
    // Checked before anything is mounted: a clear refusal rather than a cut option string.
    overlay
        .data()
        .map_err(|e| RuncError::sys("overlay options", e))?;

    let view = layout.layers();
    make_dir(&view, 0o700)?;
    let tree = idmount::clone_tree(&base, false)
        .map_err(|e| RuncError::sys(format!("clone the layers {}", base.display()), e))?;
    tree.set(&MountAttrs {
        idmap: Some(userns),
        ..MountAttrs::default()
    })
    .map_err(|e| RuncError::sys(format!("idmap the layers {}", base.display()), e))?;
    tree.attach(&view)
        .map_err(|e| RuncError::sys("attach the idmapped layers", e))?;
    let mounted = idmount::mount_overlay_as(&overlay, &target, uid_base, gid_base);
    // The overlay holds its own references to the layers: the view goes either way.
    let detached = idmount::detach(&view);
    mounted.map_err(|e| {
        RuncError::sys(
            format!("mount the container's overlay at {}", target.display()),
            e,
        )
    })?;
    detached.map_err(|e| RuncError::sys("detach the layers' view", e))?;
    let _ = fs::remove_dir(&view);
    let dev = idmount::device_of(&target).map_err(|e| RuncError::sys("stat the overlay", e))?;
    idmount::bind(&target, &root)
        .map_err(|e| RuncError::sys(format!("cover {}", root.display()), e))?;
    Ok((target, Some(Covered { path: root, dev })))
}

/// Whether overlayfs turns the inode index on unless told otherwise (its module parameter).
fn index_on_by_default() -> bool {
    fs::read_to_string("/sys/module/overlay/parameters/index").is_ok_and(|v| v.trim() == "Y")
}

/// An idmapped, nosuid copy of a bind mount's source, attached in the container's directory;
/// answers where, and the mount options the runtime must keep when it remounts it (`nosuid`,
/// and `nodev`, `noexec`, `ro` when the source's mount has them): the copy's flags are locked
/// in the container's mount namespace, and a remount that would clear one is refused (EPERM;
/// mount_namespaces(7), "MNT_LOCKED"), which runc 1.1 does when it makes a bind read-only.
pub fn prepare_bind(
    layout: &Layout,
    bind: &BindMount,
    userns: BorrowedFd<'_>,
) -> Result<(PathBuf, Vec<&'static str>)> {
    make_dir(&layout.binds(), 0o755)?;
    let target = layout.bind(bind.index);
    let meta =
        fs::metadata(&bind.source).map_err(|e| RuncError::io("bind source", &bind.source, e))?;
    if meta.is_dir() {
        make_dir(&target, 0o755)?;
    } else {
        fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(&target)
            .map_err(|e| RuncError::io("create", &target, e))?;
    }
    let what = |step: &str| format!("{step} bind source {}", bind.source.display());
    let tree = idmount::clone_tree(&bind.source, bind.recursive)
        .map_err(|e| RuncError::sys(what("clone"), e))?;
    tree.set(&MountAttrs {
        idmap: Some(userns),
        nosuid: true,
        ..MountAttrs::default()
    })
    .map_err(|e| RuncError::sys(what("idmap"), e))?;
    tree.attach(&target)
        .map_err(|e| RuncError::sys(what("attach"), e))?;
    Ok((target, locked_options(&bind.source)))
}

/// The options that keep the flags of the mount at `path` (with `nosuid`, which the copies
/// always get).
fn locked_options(path: &Path) -> Vec<&'static str> {
    use nix::sys::statvfs::FsFlags;
    let mut options = vec!["nosuid"];
    if let Ok(st) = nix::sys::statvfs::statvfs(path) {
        let flags = st.flags();
        for (flag, option) in [
            (FsFlags::ST_NODEV, "nodev"),
            (FsFlags::ST_NOEXEC, "noexec"),
            (FsFlags::ST_RDONLY, "ro"),
        ] {
            if flags.contains(flag) {
                options.push(option);
            }
        }
    }
    options
}

/// Takes off everything a create mounted, then removes the container's directory (see
/// [`cleanup_mounts`] and [`remove_files`]).
pub fn cleanup(layout: &Layout, covered: Option<&Covered>) -> Vec<RuncError> {
    let mut errors = cleanup_mounts(layout, covered);
    if errors.is_empty() {
        errors.extend(remove_files(layout, false));
    }
    errors
}

/// Takes off everything a create mounted: the overlay over `covered` (only while it is ours),
/// then every mount under the container's directory. Keeps going after a failure and reports
/// each, and reports any mount left under the directory.
pub fn cleanup_mounts(layout: &Layout, covered: Option<&Covered>) -> Vec<RuncError> {
    let mut errors = Vec::new();
    if let Some(covered) = covered {
        for _ in 0..8 {
            match idmount::device_of(&covered.path) {
                Ok(dev) if dev == covered.dev => {
                    if let Err(e) = idmount::detach(&covered.path) {
                        errors.push(RuncError::sys("uncover", e));
                        break;
                    }
                }
                _ => break,
            }
        }
    }
    // Detached deepest first; what is left after a few rounds (a mount that came back, or one
    // that cannot be taken off) is reported.
    let mut left = Vec::new();
    for round in 0..5 {
        left = match mountinfo::read() {
            Ok(t) => mountinfo::under(&t, &layout.dir),
            Err(e) => {
                errors.push(e);
                return errors;
            }
        };
        if left.is_empty() || round == 4 {
            break;
        }
        for path in &left {
            if let Err(e) = idmount::detach(path) {
                errors.push(RuncError::sys("unmount", e));
            }
        }
    }
    if !left.is_empty() {
        errors.push(RuncError::Spec {
            bundle: layout.dir.clone(),
            reason: format!(
                "still mounted after cleanup, so it is kept: {}",
                left.iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        });
    }
    errors
}

/// Removes the container directory's files one by one, and the directory itself unless
/// `keep_dir` (never recursively: should a mount be there after all, its contents stay).
pub fn remove_files(layout: &Layout, keep_dir: bool) -> Vec<RuncError> {
    let mut errors = Vec::new();
    let gone = |r: std::io::Result<()>, path: &Path, errors: &mut Vec<RuncError>| {
        if let Err(e) = r
            && e.kind() != std::io::ErrorKind::NotFound
        {
            errors.push(RuncError::io("remove", path, e));
        }
    };
    if let Ok(entries) = fs::read_dir(layout.binds()) {
        for entry in entries.flatten() {
            let path = entry.path();
            let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
            let r = if is_dir {
                fs::remove_dir(&path)
            } else {
                fs::remove_file(&path)
            };
            gone(r, &path, &mut errors);
        }
    }
    for dir in [layout.binds(), layout.rootfs(), layout.layers()] {
        gone(fs::remove_dir(&dir), &dir, &mut errors);
    }
    for name in [crate::state::RECORD, crate::state::RECORD_TMP] {
        let file = layout.dir.join(name);
        gone(fs::remove_file(&file), &file, &mut errors);
    }
    if !keep_dir {
        gone(fs::remove_dir(&layout.dir), &layout.dir, &mut errors);
    }
    errors
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(options: &str) -> MountEntry {
        mountinfo::parse(&format!(
            "49 45 0:40 / /d/overlay2/abc/merged rw - overlay overlay {options}\n"
        ))
        .remove(0)
    }

    #[test]
    fn reads_dockers_layers() {
        let e = entry(
            "rw,lowerdir=/d/overlay2/l/AAA:/d/overlay2/l/BBB,upperdir=/d/overlay2/abc/diff,\
             workdir=/d/overlay2/abc/work,index=off,xino=off,uuid=on",
        );
        let layers = overlay_layers(&e, Path::new("/d/overlay2/abc/merged")).unwrap();
        assert_eq!(
            layers.lower,
            vec![
                PathBuf::from("/d/overlay2/l/AAA"),
                "/d/overlay2/l/BBB".into()
            ]
        );
        assert_eq!(layers.upper, PathBuf::from("/d/overlay2/abc/diff"));
        assert_eq!(layers.options, vec!["index=off", "xino=off"]);
    }

    #[test]
    fn relative_layers_are_anchored_two_levels_up() {
        let e = entry("rw,lowerdir=l/AAA,upperdir=abc/diff,workdir=abc/work");
        let layers = overlay_layers(&e, Path::new("/d/overlay2/abc/merged")).unwrap();
        assert_eq!(layers.lower, vec![PathBuf::from("/d/overlay2/l/AAA")]);
        assert_eq!(layers.work, PathBuf::from("/d/overlay2/abc/work"));
    }

    #[test]
    fn refuses_what_it_cannot_rebuild() {
        let root = Path::new("/d/overlay2/abc/merged");
        for bad in [
            "rw,lowerdir=/a,workdir=/w",
            "rw,lowerdir=/a,upperdir=/u",
            "rw,upperdir=/u,workdir=/w",
            "rw,lowerdir=/a::/b,upperdir=/u,workdir=/w",
        ] {
            assert!(overlay_layers(&entry(bad), root).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_common_directory_of_layers() {
        assert_eq!(
            common_dir(&[
                "/d/overlay2/aaa/diff".into(),
                "/d/overlay2/bbb/diff".into(),
                "/d/overlay2/bbb/work".into()
            ]),
            PathBuf::from("/d/overlay2")
        );
        assert_eq!(common_dir(&["/x/y".into()]), PathBuf::from("/x/y"));
    }

    #[test]
    fn dockers_short_links_stay_short() {
        let dir = tempfile::tempdir().unwrap();
        let base = fs::canonicalize(dir.path()).unwrap();
        fs::create_dir_all(base.join("l")).unwrap();
        fs::create_dir_all(base.join("layer1/diff")).unwrap();
        std::os::unix::fs::symlink("../layer1/diff", base.join("l/AAA")).unwrap();
        std::os::unix::fs::symlink(base.join("layer1/diff"), base.join("l/ABS")).unwrap();
        let real = base.join("layer1/diff");
        assert_eq!(
            relative_layer(&base.join("l/AAA"), &real, &base).unwrap(),
            PathBuf::from("l/AAA")
        );
        // An absolute link would lead out of the idmapped view: the resolved path is used.
        assert_eq!(
            relative_layer(&base.join("l/ABS"), &real, &base).unwrap(),
            PathBuf::from("layer1/diff")
        );
    }
}
