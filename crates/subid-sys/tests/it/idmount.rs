//! Idmapped mounts: a clone idmapped with a lease's namespace shows the disk's ids shifted into
//! the lease, and an overlay on idmapped layers mounted as the lease's base lets the lease's
//! root write (copy-up, chown, whiteouts) while the disk keeps the container's own ids.

use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use subid_sys::idmount::{self, MountAttrs, Overlay};
use subid_sys::userns;
use subid_sys::{ExitStatus, SysError};

use crate::support::{Lease, sh};

/// Detaches the mounts it holds on drop, so a failed test leaves none behind.
struct Mounted(Vec<PathBuf>);

impl Drop for Mounted {
    fn drop(&mut self) {
        for path in self.0.iter().rev() {
            while let Ok(true) = idmount::detach(path) {}
        }
    }
}

fn chown(path: &Path, uid: u32, gid: u32) {
    std::os::unix::fs::lchown(path, Some(uid), Some(gid)).expect("chown");
}

#[test]
#[cfg_attr(not(subidd_root), ignore = "needs root")]
fn an_idmapped_clone_shows_the_disks_ids_inside_the_lease() {
    let lease = Lease::new(0x7200_0000);
    let base = lease.spec.uid_base;
    userns::create_pinned(&lease.spec, &lease.pin).unwrap();
    let ns = userns::open_pinned(&lease.pin).unwrap();

    let dir = lease.dir.path().join("data");
    fs::create_dir(&dir).unwrap();
    fs::write(dir.join("root-file"), "r").unwrap();
    fs::write(dir.join("user-file"), "u").unwrap();
    chown(&dir.join("user-file"), 1000, 1000);
    let view = lease.dir.path().join("view");
    fs::create_dir(&view).unwrap();

    idmount::probe(&dir, std::os::fd::AsFd::as_fd(&ns)).unwrap();
    let tree = idmount::clone_tree(&dir, false).unwrap();
    tree.set(&MountAttrs {
        idmap: Some(std::os::fd::AsFd::as_fd(&ns)),
        nosuid: true,
        ..MountAttrs::default()
    })
    .unwrap();
    tree.attach(&view).unwrap();
    let guard = Mounted(vec![view.clone()]);

    let meta = fs::metadata(view.join("root-file")).unwrap();
    assert_eq!((meta.uid(), meta.gid()), (base, base));
    let meta = fs::metadata(view.join("user-file")).unwrap();
    assert_eq!((meta.uid(), meta.gid()), (base + 1000, base + 1000));
    // Host root's uid 0 is not mapped by the lease: it cannot own anything made there.
    let refused = fs::write(view.join("made-by-host-root"), "x").unwrap_err();
    assert_eq!(refused.raw_os_error(), Some(libc::EOVERFLOW), "{refused}");

    drop(guard);
    assert_eq!(fs::metadata(view.join("root-file")).map(|_| ()).ok(), None);
    assert_eq!(fs::metadata(dir.join("root-file")).unwrap().uid(), 0);
}

#[test]
#[cfg_attr(not(subidd_root), ignore = "needs root")]
fn an_overlay_on_idmapped_layers_keeps_the_containers_ids_on_disk() {
    let mut lease = Lease::new(0x7201_0000);
    let base = lease.spec.uid_base;
    userns::create_pinned(&lease.spec, &lease.pin).unwrap();
    let ns = userns::open_pinned(&lease.pin).unwrap();
    let top = lease.dir.path().to_path_buf();
    // The lease's root (a host uid of no group) must reach the rootfs below.
    fs::set_permissions(&top, fs::Permissions::from_mode(0o755)).unwrap();

    // Layers as Docker's overlay2 keeps them: root-owned, modes 0700/0710.
    let layers = top.join("layers");
    for d in ["lower/etc", "lower/home/u", "upper", "work"] {
        fs::create_dir_all(layers.join(d)).unwrap();
    }
    fs::set_permissions(&layers, fs::Permissions::from_mode(0o700)).unwrap();
    fs::write(layers.join("lower/etc/passwd"), "root:x:0:0::/:/bin/sh\n").unwrap();
    fs::write(layers.join("lower/etc/gone"), "to be deleted").unwrap();
    chown(&layers.join("lower/home/u"), 1000, 1000);
    let view = top.join("view");
    let rootfs = top.join("rootfs");
    fs::create_dir(&view).unwrap();
    fs::create_dir(&rootfs).unwrap();

    let tree = idmount::clone_tree(&layers, false).unwrap();
    tree.set(&MountAttrs {
        idmap: Some(std::os::fd::AsFd::as_fd(&ns)),
        ..MountAttrs::default()
    })
    .unwrap();
    tree.attach(&view).unwrap();
    let mut guard = Mounted(vec![view.clone()]);
    let overlay = Overlay {
        base: view.clone(),
        lower: vec!["lower".into()],
        upper: "upper".into(),
        work: "work".into(),
        options: Vec::new(),
    };
    idmount::mount_overlay_as(&overlay, &rootfs, base, base).unwrap();
    guard.0.push(rootfs.clone());
    // The overlay holds its own references: the view can go at once.
    assert!(idmount::detach(&view).unwrap());
    let dev = idmount::device_of(&rootfs).unwrap();
    assert_ne!(dev, idmount::device_of(&top).unwrap());

    // What the host sees through the overlay: the lease's ids.
    let meta = fs::metadata(rootfs.join("etc/passwd")).unwrap();
    assert_eq!((meta.uid(), meta.gid()), (base, base));
    assert_eq!(
        fs::metadata(rootfs.join("home/u")).unwrap().uid(),
        base + 1000
    );

    // The lease's root writes, chowns, deletes and makes directories.
    let r = rootfs.display();
    let script = format!(
        "set -e; echo changed > {r}/etc/passwd; touch {r}/new; chown 1000:1000 {r}/new; \
         rm {r}/etc/gone; mkdir {r}/tmp; chmod 1777 {r}/tmp; touch {r}/home/u/file; \
         chown 1000:1000 {r}/home/u/file"
    );
    let pid = lease.spawn(&sh(&script)).unwrap();
    let status = lease.child(pid).wait().unwrap();
    assert!(matches!(status, ExitStatus::Exited(0)), "{status:?}");

    // On disk the upper layer keeps the container's own ids, as docker commit needs.
    let upper = layers.join("upper");
    let ids = |p: &str| {
        let m = fs::symlink_metadata(upper.join(p)).unwrap();
        (m.uid(), m.gid())
    };
    assert_eq!(ids("etc/passwd"), (0, 0));
    assert_eq!(
        fs::read_to_string(upper.join("etc/passwd")).unwrap(),
        "changed\n"
    );
    assert_eq!(ids("new"), (1000, 1000));
    assert_eq!(ids("tmp"), (0, 0));
    assert_eq!(ids("home/u"), (1000, 1000));
    assert_eq!(ids("home/u/file"), (1000, 1000));
    // A whiteout: a 0/0 character device in the upper layer; the lower file is untouched.
    let whiteout = fs::symlink_metadata(upper.join("etc/gone")).unwrap();
    assert!(whiteout.file_type().is_char_device());
    assert_eq!(whiteout.rdev(), 0);
    assert!(fs::metadata(rootfs.join("etc/gone")).is_err());
    assert!(layers.join("lower/etc/gone").exists());
    // And the host sees the new file as the lease's uid 1000.
    assert_eq!(fs::metadata(rootfs.join("new")).unwrap().uid(), base + 1000);
    drop(guard);
    assert!(!crate::support::mounted(&rootfs));
}

#[test]
#[cfg_attr(not(subidd_root), ignore = "needs root")]
fn an_overlay_cannot_be_idmapped_itself() {
    let lease = Lease::new(0x7202_0000);
    userns::create_pinned(&lease.spec, &lease.pin).unwrap();
    let ns = userns::open_pinned(&lease.pin).unwrap();
    let top = lease.dir.path();
    for d in ["lower", "upper", "work", "merged"] {
        fs::create_dir(top.join(d)).unwrap();
    }
    let overlay = Overlay {
        base: top.to_path_buf(),
        lower: vec!["lower".into()],
        upper: "upper".into(),
        work: "work".into(),
        options: Vec::new(),
    };
    // As host root (fsuid 0), on plain layers: an ordinary overlay.
    idmount::mount_overlay_as(&overlay, &top.join("merged"), 0, 0).unwrap();
    let _guard = Mounted(vec![top.join("merged")]);
    let refused = idmount::probe(&top.join("merged"), std::os::fd::AsFd::as_fd(&ns)).unwrap_err();
    assert!(matches!(refused, SysError::Unsupported { .. }), "{refused}");
    assert!(refused.to_string().contains("overlayfs"), "{refused}");
}

#[test]
#[cfg_attr(not(subidd_root), ignore = "needs root")]
fn an_overlay_on_idmapped_layers_mounted_as_host_root_cannot_write() {
    let lease = Lease::new(0x7203_0000);
    userns::create_pinned(&lease.spec, &lease.pin).unwrap();
    let ns = userns::open_pinned(&lease.pin).unwrap();
    let top = lease.dir.path();
    let layers = top.join("layers");
    for d in ["lower", "upper", "work"] {
        fs::create_dir_all(layers.join(d)).unwrap();
    }
    let view = top.join("view");
    let rootfs = top.join("rootfs");
    fs::create_dir(&view).unwrap();
    fs::create_dir(&rootfs).unwrap();
    let tree = idmount::clone_tree(&layers, false).unwrap();
    tree.set(&MountAttrs {
        idmap: Some(std::os::fd::AsFd::as_fd(&ns)),
        ..MountAttrs::default()
    })
    .unwrap();
    tree.attach(&view).unwrap();
    let mut guard = Mounted(vec![view.clone()]);
    let overlay = Overlay {
        base: view.clone(),
        lower: vec!["lower".into()],
        upper: "upper".into(),
        work: "work".into(),
        options: Vec::new(),
    };
    // Host root's fsuid 0 is not mapped in the idmapped view: overlayfs cannot make its work
    // directory there and the mount is refused, or comes up read-only.
    match idmount::mount_overlay_as(&overlay, &rootfs, 0, 0) {
        Err(e) => eprintln!("refused: {e}"),
        Ok(()) => {
            guard.0.push(rootfs.clone());
            let write = fs::write(rootfs.join("f"), "x").unwrap_err();
            eprintln!("mounted, write refused: {write}");
            assert!(
                matches!(write.raw_os_error(), Some(libc::EROFS | libc::EOVERFLOW)),
                "{write}"
            );
        }
    }
    assert!(!layers.join("upper/f").exists());
}
