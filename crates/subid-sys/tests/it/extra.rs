//! Optional namespaces (mnt, uts, ipc, net): made with the user namespace, owned by it, pinned
//! beside it, joined by later spawns; a network namespace has loopback up.

use std::fs;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use subid_sys::Command;
use subid_sys::userns::{self, ExtraNs, NsKind};

use crate::support::{Lease, mounted, ns_of, wait_for_lines};

/// Connects over 127.0.0.1 (binding works with loopback down, connecting does not), sets the
/// namespace's hostname.
const LOOPBACK_AND_HOSTNAME: &str = "import socket\n\
s = socket.socket()\n\
s.bind(('127.0.0.1', 0))\n\
s.listen()\n\
c = socket.create_connection(s.getsockname())\n\
socket.sethostname('lease-uts')\n\
print('lo ok', socket.gethostname(), flush=True)\n";

/// The user namespace that owns the namespace behind `fd`: `ioctl(NS_GET_USERNS)`.
fn owning_userns_inode(fd: &OwnedFd) -> u64 {
    // SAFETY: NS_GET_USERNS takes no argument and returns a new fd (or -1).
    let owner = unsafe { libc::ioctl(fd.as_raw_fd(), libc::NS_GET_USERNS) };
    assert!(
        owner >= 0,
        "NS_GET_USERNS: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: the kernel just gave us this fd.
    let owner = unsafe { OwnedFd::from_raw_fd(owner) };
    userns::ns_inode(&owner).unwrap()
}

#[test]
#[cfg_attr(not(subidd_root), ignore = "needs root")]
fn optional_namespaces_are_owned_pinned_and_joined() {
    let mut lease = Lease::with_extra(0x7060_0000, ExtraNs::ALL);
    let first = lease
        .spawn(&Command::new("/bin/sleep", ["sleep", "30"]))
        .unwrap();
    let user_inode = lease.pin_inode();
    let me = std::process::id() as i32;
    for kind in NsKind::EXTRA {
        let pin = kind.pin_beside(&lease.pin);
        assert!(mounted(&pin), "{kind:?} not pinned");
        let fd = userns::open_pinned_kind(&pin, kind).unwrap();
        let inode = userns::ns_inode(&fd).unwrap();
        assert_eq!(ns_of(first, kind.name()), inode, "{kind:?}");
        assert_ne!(ns_of(me, kind.name()), inode, "{kind:?} is the daemon's");
        assert_eq!(owning_userns_inode(&fd), user_inode, "{kind:?} owner");
    }

    let (out, path) = lease.output("joined");
    let (err, err_path) = lease.output("joined.err");
    let mut cmd = Command::new("/usr/bin/python3", ["python3", "-c", LOOPBACK_AND_HOSTNAME]);
    cmd.stdout(out).stderr(err);
    let second = lease.spawn(&cmd).unwrap();
    for kind in [NsKind::User].into_iter().chain(NsKind::EXTRA) {
        assert_eq!(
            ns_of(second, kind.name()),
            ns_of(first, kind.name()),
            "{kind:?}"
        );
    }
    let status = lease.child(second).wait().unwrap();
    let text = fs::read_to_string(&path).unwrap();
    assert_eq!(
        text.trim(),
        "lo ok lease-uts",
        "{status:?} {}",
        fs::read_to_string(&err_path).unwrap()
    );
    assert_ne!(nix::unistd::gethostname().unwrap(), "lease-uts");

    userns::unpin(&lease.pin).unwrap();
    for kind in [NsKind::User].into_iter().chain(NsKind::EXTRA) {
        let pin = kind.pin_beside(&lease.pin);
        assert!(!mounted(&pin) && !pin.exists(), "{kind:?} left behind");
    }
}

#[test]
#[cfg_attr(not(subidd_root), ignore = "needs root")]
fn a_namespace_made_without_a_process_has_loopback_up() {
    let mut lease = Lease::with_extra(
        0x7062_0000,
        ExtraNs {
            net: true,
            ..ExtraNs::default()
        },
    );
    userns::create_pinned(&lease.spec, &lease.pin).unwrap();
    assert!(mounted(&NsKind::Net.pin_beside(&lease.pin)));
    assert!(!NsKind::Mnt.pin_beside(&lease.pin).exists());
    let (out, path) = lease.output("lo");
    let mut cmd = Command::new(
        "/usr/bin/python3",
        [
            "python3",
            "-c",
            "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen(); \
             socket.create_connection(s.getsockname()); print('lo ok')",
        ],
    );
    cmd.stdout(out);
    lease.spawn(&cmd).unwrap();
    assert_eq!(wait_for_lines(&path, 1).trim(), "lo ok");
}

#[test]
#[cfg_attr(not(subidd_root), ignore = "needs root")]
fn a_mount_namespace_pin_needs_a_private_parent_mount() {
    use nix::mount::{MntFlags, MsFlags, mount, umount2};
    let top = tempfile::tempdir().unwrap();
    let dir = top.path().join("ns");
    let peer = top.path().join("peer");
    fs::create_dir_all(&dir).unwrap();
    fs::create_dir_all(&peer).unwrap();
    // `dir` becomes a shared mount with a peer, as under systemd (/ is shared there).
    mount(
        Some(&dir),
        &dir,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .unwrap();
    struct Undo(Vec<std::path::PathBuf>);
    impl Drop for Undo {
        fn drop(&mut self) {
            for p in self.0.iter().rev() {
                let _ = umount2(p, MntFlags::MNT_DETACH);
            }
        }
    }
    let mut undo = Undo(vec![dir.clone()]);
    mount(
        None::<&str>,
        &dir,
        None::<&str>,
        MsFlags::MS_SHARED,
        None::<&str>,
    )
    .unwrap();
    mount(
        Some(&dir),
        &peer,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .unwrap();
    undo.0.push(peer.clone());

    let mut spec = userns::UserNsSpec::new(0x7064_0000, 65536);
    spec.extra.mnt = true;
    let pin = dir.join("lease").join("user");
    let err = userns::create_pinned(&spec, &pin).unwrap_err();
    assert_eq!(err.errno(), Some(subid_sys::Errno::EINVAL), "{err}");
    assert!(!pin.exists() && !NsKind::Mnt.pin_beside(&pin).exists());

    userns::make_private_mount(&dir).unwrap();
    userns::create_pinned(&spec, &pin).unwrap();
    assert!(mounted(&NsKind::Mnt.pin_beside(&pin)));
    userns::unpin(&pin).unwrap();
    assert!(!mounted(&NsKind::Mnt.pin_beside(&pin)) && !mounted(&pin));
    drop(undo);
}
