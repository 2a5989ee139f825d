//! Pinning: a namespace outlives its creator, opens from the pin, and unpins without a trace.

use std::fs;
use std::os::fd::AsFd;

use subid_sys::userns::{self, UserNsSpec};
use subid_sys::{Command, ExitStatus, LeaseNs, Namespace, SysError};

use crate::support::{mounted, user_ns_of};

#[test]
#[cfg_attr(not(subidd_root), ignore = "needs root")]
fn a_pinned_namespace_outlives_its_creator_and_unpins_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let pin = dir.path().join("ns").join("db-1").join("user");
    let spec = UserNsSpec::new(0x7020_0000, 65536);
    userns::create_pinned(&spec, &pin).unwrap();
    let cleanup = scopeguard(&pin);
    assert!(mounted(&pin));
    assert!(matches!(
        userns::create_pinned(&spec, &pin),
        Err(SysError::AlreadyPinned { .. })
    ));

    // nobody lives in it, yet it is there and joinable
    let fd = userns::open_pinned(&pin).unwrap();
    assert_eq!(userns::owner_uid(fd.as_fd()).unwrap(), 0x7020_0000);
    let inode = userns::ns_inode(&fd).unwrap();
    let ns = LeaseNs::from_user(fd);
    let child = Command::new("/bin/sleep", ["sleep", "30"])
        .spawn(Namespace::Join(&ns))
        .unwrap();
    assert_eq!(user_ns_of(child.pid()), inode);
    assert_eq!(
        child.proc_dir().unwrap().ids().unwrap().uid,
        [0x7020_0000; 4]
    );
    child.send_signal(libc::SIGKILL).unwrap();
    assert!(matches!(child.wait().unwrap(), ExitStatus::Signaled { .. }));
    drop(ns);

    userns::unpin(&pin).unwrap();
    assert!(!mounted(&pin));
    assert!(!pin.exists());
    userns::unpin(&pin).unwrap(); // idempotent
    drop(cleanup);
}

#[test]
fn a_plain_file_is_not_a_pin() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("user");
    fs::write(&path, "").unwrap();
    assert!(matches!(
        userns::open_pinned(&path),
        Err(SysError::NotPinned { .. })
    ));
    assert!(!userns::is_pinned(&path));
}

#[test]
#[cfg_attr(not(subidd_root), ignore = "needs root")]
fn a_pinned_namespace_of_another_type_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("uts");
    fs::write(&path, "").unwrap();
    nix::mount::mount(
        Some("/proc/self/ns/uts"),
        &path,
        None::<&str>,
        nix::mount::MsFlags::MS_BIND,
        None::<&str>,
    )
    .unwrap();
    let cleanup = scopeguard(&path);
    assert!(userns::is_pinned(&path));
    assert!(matches!(
        userns::open_pinned(&path),
        Err(SysError::NotPinned { .. })
    ));
    drop(cleanup);
    assert!(!mounted(&path));
}

/// Unpins on drop, so a failing assertion leaves no mount behind.
fn scopeguard(path: &std::path::Path) -> impl Drop + '_ {
    struct Unpin<'a>(&'a std::path::Path);
    impl Drop for Unpin<'_> {
        fn drop(&mut self) {
            let _ = userns::unpin(self.0);
        }
    }
    Unpin(path)
}
