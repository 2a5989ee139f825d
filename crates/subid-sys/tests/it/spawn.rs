//! Spawning into lease namespaces: host ids, joining, inheritance, a clean child, failures.

use std::fs;
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use subid_sys::userns::{self, UserNsSpec};
use subid_sys::{ChildStep, Command, Errno, ExitStatus, Namespace, PidFd, SysError};

use crate::support::{Lease, mounted, sh, user_ns_of, wait_for_lines};

fn sleeper() -> Command {
    Command::new("/bin/sleep", ["sleep", "30"])
}

#[test]
#[cfg_attr(not(subidd_root), ignore = "needs root")]
fn host_ids_are_base_plus_namespace_ids() {
    let mut lease = Lease::new(0x7000_0000);
    let mut cmd = sleeper();
    cmd.user(999, 998);
    let pid = lease.spawn(&cmd).unwrap();
    let proc = lease.child(pid).proc_dir().unwrap();
    let ids = proc.ids().unwrap();
    assert_eq!(ids.uid, [0x7000_0000 + 999; 4]);
    assert_eq!(ids.gid, [0x7000_0000 + 998; 4]);
    let lease_map = vec![subid_core::lease_map(0x7000_0000, 65536)];
    assert_eq!(userns::read_map(&proc, "uid_map").unwrap(), lease_map);
    assert_eq!(userns::read_map(&proc, "gid_map").unwrap(), lease_map);
    assert_eq!(user_ns_of(pid), lease.pin_inode());
    assert!(mounted(&lease.pin));
}

#[test]
#[cfg_attr(not(subidd_root), ignore = "needs root")]
fn namespace_owner_is_the_base_uid() {
    let mut lease = Lease::new(0x7002_0000);
    lease.spawn(&sleeper()).unwrap();
    let fd = userns::open_pinned(&lease.pin).unwrap();
    assert_eq!(userns::owner_uid(fd.as_fd()).unwrap(), 0x7002_0000);
}

#[test]
#[cfg_attr(not(subidd_root), ignore = "needs root")]
fn two_leases_get_disjoint_host_ids() {
    let mut a = Lease::new(0x7000_0000 + 0x0004_0000);
    let mut b = Lease::new(0x7001_0000 + 0x0004_0000);
    let mut cmd = sleeper();
    cmd.user(999, 999);
    let pa = a.spawn(&cmd).unwrap();
    let pb = b.spawn(&cmd).unwrap();
    let ua = a.child(pa).proc_dir().unwrap().ids().unwrap().uid[1];
    let ub = b.child(pb).proc_dir().unwrap().ids().unwrap().uid[1];
    assert_eq!(ua, 0x7004_0000 + 999);
    assert_eq!(ub, 0x7005_0000 + 999);
    assert_ne!(user_ns_of(pa), user_ns_of(pb));
}

#[test]
#[cfg_attr(not(subidd_root), ignore = "needs root")]
fn second_spawn_joins_and_grandchildren_inherit() {
    let mut lease = Lease::new(0x7006_0000);
    let first = lease.spawn(&sleeper()).unwrap();
    let (out, path) = lease.output("grandchild");
    let mut cmd = sh("sleep 30 & echo $!; wait");
    cmd.user(1000, 1000).stdout(out);
    let second = lease.spawn(&cmd).unwrap();
    let pin = lease.pin_inode();
    assert_eq!(user_ns_of(first), pin);
    assert_eq!(user_ns_of(second), pin);

    let text = wait_for_lines(&path, 1);
    let grandchild: i32 = text.trim().parse().unwrap();
    let gc = PidFd::open(grandchild).unwrap();
    let gc_proc = gc.proc_dir().unwrap();
    assert_eq!(user_ns_of(grandchild), pin);
    assert_eq!(gc_proc.ids().unwrap().uid, [0x7006_0000 + 1000; 4]);
    let _ = gc.send_signal(libc::SIGKILL);
}

#[test]
#[cfg_attr(not(subidd_root), ignore = "needs root")]
fn the_child_gets_nothing_of_the_daemon() {
    // What a daemon would have: SIGPIPE ignored (Rust does that), a blocked signal, a stray fd
    // without close-on-exec, supplementary groups, its own environment.
    // SAFETY: plain libc calls on this test thread; the fd is leaked on purpose.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
        libc::signal(libc::SIGUSR2, libc::SIG_IGN);
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGUSR1);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        assert!(libc::dup(2) > 2);
    }
    let script =
        "ls /proc/self/fd; env; grep -E 'Groups|CapInh|CapAmb|SigIgn|SigBlk' /proc/self/status";
    for (i, (uid, gid)) in [(0, 0), (999, 999)].into_iter().enumerate() {
        let mut lease = Lease::new(0x7008_0000 + i as u32 * 0x1_0000);
        // first spawn (create path) and a join, both probed
        for round in 0..2 {
            let (out, path) = lease.output(&format!("probe{round}"));
            let mut cmd = sh(script);
            cmd.env("FOO", "bar baz").user(uid, gid).stdout(out);
            let pid = lease.spawn(&cmd).unwrap();
            assert_eq!(lease.child(pid).wait().unwrap(), ExitStatus::Exited(0));
            let text = fs::read_to_string(&path).unwrap();
            let lines: Vec<&str> = text.lines().collect();
            // ls lists 0 1 2 and the directory fd it opened itself
            let fds: Vec<&str> = lines
                .iter()
                .take_while(|l| l.parse::<u32>().is_ok())
                .copied()
                .collect();
            assert_eq!(fds, ["0", "1", "2", "3"], "{text}");
            let env: Vec<&str> = lines[fds.len()..]
                .iter()
                .take_while(|l| !l.contains(":\t"))
                .filter(|l| {
                    !l.starts_with("PWD=") && !l.starts_with("SHLVL=") && !l.starts_with("_=")
                })
                .copied()
                .collect();
            assert_eq!(env, ["PATH=/usr/bin:/bin", "FOO=bar baz"], "{text}");
            for want in [
                "Groups:\t",
                "CapInh:\t0000000000000000",
                "CapAmb:\t0000000000000000",
                "SigIgn:\t0000000000000000",
                "SigBlk:\t0000000000000000",
            ] {
                assert!(
                    lines.iter().any(|l| l.trim_end() == want.trim_end()),
                    "{want:?} missing in {text}"
                );
            }
        }
    }
}

#[test]
#[cfg_attr(not(subidd_root), ignore = "needs root")]
fn umask_rlimits_and_cwd_are_applied() {
    use nix::sys::resource::Resource;
    let mut lease = Lease::new(0x700c_0000);
    for round in 0..2 {
        let (out, path) = lease.output(&format!("limits{round}"));
        let mut cmd = sh("ulimit -Sn; ulimit -Hn; umask; pwd");
        cmd.umask(0o027)
            .cwd("/tmp")
            .rlimit(Resource::RLIMIT_NOFILE, 100, 200)
            .user(5, 5)
            .stdout(out);
        let pid = lease.spawn(&cmd).unwrap();
        assert!(lease.child(pid).wait().unwrap().success());
        let text = fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines, ["100", "200", "0027", "/tmp"], "round {round}");
    }
}

#[test]
#[cfg_attr(not(subidd_root), ignore = "needs root")]
fn a_missing_binary_is_a_clear_error_and_leaves_nothing() {
    let mut lease = Lease::new(0x700e_0000);
    let missing = Command::new("/nonexistent/binary", ["binary"]);
    // first spawn: the namespace made for it goes away again
    let err = lease.spawn(&missing).unwrap_err();
    let SysError::ChildSetup {
        pid, step, source, ..
    } = &err
    else {
        panic!("unexpected {err:?}");
    };
    assert_eq!(
        (*step, *source),
        (ChildStep::Execve, Errno::ENOENT),
        "{err}"
    );
    assert!(err.to_string().contains("/nonexistent/binary"), "{err}");
    assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists());
    assert!(!lease.pin.exists());
    assert!(!mounted(&lease.pin));

    // a join: the namespace stays, the child does not
    lease.spawn(&sleeper()).unwrap();
    let err = lease.spawn(&missing).unwrap_err();
    let SysError::ChildSetup { pid, step, .. } = &err else {
        panic!("unexpected {err:?}");
    };
    assert_eq!(*step, ChildStep::Execve);
    assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists());
    assert!(mounted(&lease.pin));
}

#[test]
#[cfg_attr(not(subidd_root), ignore = "needs root")]
fn ids_outside_the_range_and_bad_cwd_fail_at_their_step() {
    let mut lease = Lease::new(0x7010_0000);
    lease.spawn(&sleeper()).unwrap();
    let mut cmd = sleeper();
    cmd.user(70000, 0);
    let err = lease.spawn(&cmd).unwrap_err();
    assert!(
        matches!(
            err,
            SysError::ChildSetup {
                step: ChildStep::Setresuid,
                source: Errno::EINVAL,
                ..
            }
        ),
        "{err}"
    );
    let mut cmd = sleeper();
    cmd.cwd("/nonexistent");
    let err = lease.spawn(&cmd).unwrap_err();
    assert!(
        matches!(
            err,
            SysError::ChildSetup {
                step: ChildStep::Chdir,
                source: Errno::ENOENT,
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn nul_bytes_are_rejected_before_anything_runs() {
    let spec = UserNsSpec::new(0x7012_0000, 65536);
    let dir = tempfile::tempdir().unwrap();
    let pin = dir.path().join("user");
    let cmd = Command::new("/bin/true", ["tr\0ue"]);
    let err = cmd
        .spawn(Namespace::Create {
            spec: &spec,
            pin: &pin,
        })
        .unwrap_err();
    assert!(
        matches!(err, SysError::InvalidInput { what: "argv", .. }),
        "{err}"
    );
    let mut cmd = Command::new("/bin/true", ["true"]);
    cmd.env("A=B", "c");
    let err = cmd
        .spawn(Namespace::Create {
            spec: &spec,
            pin: &pin,
        })
        .unwrap_err();
    assert!(
        matches!(err, SysError::InvalidInput { what: "env", .. }),
        "{err}"
    );
    assert!(!pin.exists());
}

#[test]
#[cfg_attr(not(subidd_root), ignore = "needs root")]
fn signals_reach_the_child_through_its_pidfd() {
    let mut lease = Lease::new(0x7014_0000);
    let pid = lease.spawn(&sleeper()).unwrap();
    let child = lease.child(pid);
    assert_eq!(child.try_wait().unwrap(), None);
    assert!(!child.has_exited().unwrap());
    child.send_signal(libc::SIGTERM).unwrap();
    assert_eq!(
        child.wait().unwrap(),
        ExitStatus::Signaled {
            signal: libc::SIGTERM,
            core_dumped: false
        }
    );
}

/// Runs a python that forks 30 sleepers as in-namespace root in a fresh lease and returns how
/// many forks succeeded. The process itself is allowed 1000.
fn forks_in_lease(base: u32, nproc_limit: Option<u64>) -> u32 {
    use nix::sys::resource::Resource;
    let mut lease = Lease::new(base);
    lease.spec.nproc_limit = nproc_limit;
    let forker = [
        "import os, time",
        "pids = []",
        "for _ in range(30):",
        "    try:",
        "        pid = os.fork()",
        "    except OSError:",
        "        continue",
        "    if pid == 0:",
        "        time.sleep(30)",
        "        os._exit(0)",
        "    pids.append(pid)",
        "print(len(pids), flush=True)",
        // reap here: zombies left to a slow init would still count against the owner
        "for pid in pids:",
        "    os.kill(pid, 9)",
        "    os.waitpid(pid, 0)",
    ]
    .join("\n");
    let (out, path) = lease.output("forks");
    let (err, err_path) = lease.output("forks.err");
    let mut cmd = Command::new("/usr/bin/python3", ["python3", "-c", &forker]);
    cmd.rlimit(Resource::RLIMIT_NPROC, 1000, 1000)
        .stdout(out)
        .stderr(err);
    let pid = lease.spawn(&cmd).unwrap();
    let status = lease.child(pid).wait().unwrap();
    let text = fs::read_to_string(&path).unwrap();
    let errors = fs::read_to_string(&err_path).unwrap();
    text.trim()
        .parse()
        .unwrap_or_else(|_| panic!("{status:?} {text:?} {errors}"))
}

#[test]
#[cfg_attr(not(subidd_root), ignore = "needs root")]
fn the_creators_nproc_limit_caps_the_whole_namespace() {
    let capped = forks_in_lease(0x7016_0000, Some(10));
    assert!(
        (5..15).contains(&capped),
        "{capped} forks under a cap of 10"
    );
    let free = forks_in_lease(0x7017_0000, None);
    assert_eq!(free, 30);
}

#[test]
#[cfg_attr(not(subidd_root), ignore = "needs root")]
fn spawns_from_many_threads_at_once() {
    let threads: Vec<_> = (0..4u32)
        .map(|t| {
            std::thread::spawn(move || {
                let mut lease = Lease::new(0x7040_0000 + t * 0x1_0000);
                for i in 0..25 {
                    let mut cmd = Command::new("/bin/true", ["true"]);
                    cmd.user(i, i);
                    let pid = lease.spawn(&cmd).unwrap();
                    assert!(lease.child(pid).wait().unwrap().success());
                }
                assert!(mounted(&lease.pin));
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

#[test]
#[cfg_attr(not(subidd_root), ignore = "needs root")]
fn the_creator_keeps_its_capabilities_effective() {
    // A process already runs as the base uid; a creator whose RLIMIT_NPROC is 1 can then only
    // clone the namespace's first member if it is capable (CAP_SYS_ADMIN or CAP_SYS_RESOURCE
    // in the *effective* set, kernel/fork.c) — which it is only if capset raised its kept caps
    // again after the switch to the base ids. The same holds for hosts that restrict
    // unprivileged user namespaces to CAP_SYS_ADMIN.
    let mut running = Lease::new(0x7066_0000);
    running.spawn(&sleeper()).unwrap();
    let mut second = Lease::new(0x7066_0000);
    second.spec.nproc_limit = Some(1);
    userns::create_pinned(&second.spec, &second.pin).unwrap();
    let fd = userns::open_pinned(&second.pin).unwrap();
    assert_eq!(userns::owner_uid(fd.as_fd()).unwrap(), 0x7066_0000);
}

/// What the spawn told its hooks, and when.
#[derive(Default)]
struct Told {
    cloned: Option<Instant>,
    slow: Option<Instant>,
}

impl subid_sys::SpawnHooks for Told {
    fn cloned(&mut self, _child: &subid_sys::PidFd) {
        self.cloned = Some(Instant::now());
    }
    fn patience(&self) -> Duration {
        PATIENCE
    }
    fn slow(&mut self) {
        self.slow = Some(Instant::now());
    }
}

const PATIENCE: Duration = Duration::from_millis(20);

/// A lease whose only process SIGSTOPs every process it may signal, as a lease's root may once
/// a spawning child has joined the lease's namespace: `kill(-1, SIGSTOP)`, one system call per
/// round, so that it catches a spawning child in the short time between its joining the
/// namespace and its exec.
fn stopped_lease(base: u32) -> Lease {
    let mut lease = Lease::new(base);
    let stopper = "import os, signal\nwhile True:\n    try:\n        os.kill(-1, signal.SIGSTOP)\n    except OSError:\n        pass\n";
    lease
        .spawn(&Command::new(
            "/usr/bin/python3",
            ["python3", "-c", stopper],
        ))
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    lease
}

/// A process of the lease that SIGSTOPs every process it may signal (as a lease's root may, once
/// a spawning child has joined the lease's namespace) never holds the spawning thread: each
/// spawn returns by its deadline plus the reaping grace, a stalled child is killed and reported
/// as `SpawnTimeout`, and nothing is left running. The caller's hooks hear of every stalled
/// child once their patience is over, long before the deadline, so that what they hold for the
/// child (the daemon: its uncommitted row) is let go.
#[test]
#[cfg_attr(not(subidd_root), ignore = "needs root")]
fn a_tenant_that_stops_spawning_children_cannot_hold_the_caller() {
    let mut lease = stopped_lease(0x7109_0000);
    let (mut timeouts, mut started) = (0, 0);
    for _ in 0..30 {
        let mut cmd = Command::new("/bin/sleep", ["sleep", "60"]);
        cmd.timeout(Duration::from_millis(300));
        let t0 = Instant::now();
        let mut told = Told::default();
        let result = lease.spawn_then(&cmd, &mut told);
        let took = t0.elapsed();
        assert!(took < Duration::from_secs(3), "a spawn took {took:?}");
        let cloned = told.cloned.expect("every child is shown to the hooks");
        if let Some(slow) = told.slow {
            assert!(
                slow - cloned >= PATIENCE,
                "told slow before its patience ran out"
            );
        }
        match result {
            Ok(_) => started += 1,
            Err(SysError::SpawnTimeout { .. }) => {
                timeouts += 1;
                assert!(
                    told.slow.is_some(),
                    "a stalled child was never reported slow"
                );
            }
            Err(other) => panic!("unexpected error: {other}"),
        }
    }
    eprintln!("{started} spawns reached exec, {timeouts} were stopped and killed at the deadline");
    assert!(timeouts > 0, "the stopper never caught a spawning child");
}

/// What a spawn's child held when its patience ran out: the pipe inodes among its open fds,
/// read from `/proc/<pid>/fd` while it was stopped before its exec.
#[derive(Default)]
struct HeldFds {
    pid: Option<i32>,
    /// `Some(links)` when the child was seen stopped (state `T`) once its patience was over.
    stopped_holding: Option<Vec<String>>,
}

impl subid_sys::SpawnHooks for HeldFds {
    fn cloned(&mut self, child: &subid_sys::PidFd) {
        self.pid = Some(child.pid());
    }
    fn patience(&self) -> Duration {
        PATIENCE
    }
    fn slow(&mut self) {
        let Some(pid) = self.pid else { return };
        let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // The state follows the command name's closing parenthesis.
        let state = stat
            .rsplit_once(") ")
            .and_then(|(_, rest)| rest.chars().next());
        if state != Some('T') {
            return;
        }
        let mut links = Vec::new();
        if let Ok(dir) = fs::read_dir(format!("/proc/{pid}/fd")) {
            for entry in dir.flatten() {
                if let Ok(target) = fs::read_link(entry.path()) {
                    links.push(target.to_string_lossy().into_owned());
                }
            }
        }
        self.stopped_holding = Some(links);
    }
}

/// A spawning child that a tenant stops after it has joined the lease's user namespace holds
/// none of its caller's fds: it drops them before it joins. Otherwise a tenant that stops its
/// own spawning children would hold, until their deadline, every fd the daemon had open at
/// their clone: other leases' spawns' error pipes among them, whose exec would then look like a
/// stall and be killed (`spawn_timeout`), and client connections the daemon has closed.
#[test]
#[cfg_attr(not(subidd_root), ignore = "needs root")]
fn a_child_a_tenant_stops_holds_none_of_the_callers_fds() {
    let mut lease = stopped_lease(0x7110_0000);
    // Files the caller holds open that no child of it has any business holding.
    let dir = tempfile::tempdir().unwrap();
    let _markers: Vec<fs::File> = (0..16)
        .map(|i| fs::File::create(dir.path().join(format!("marker-{i}"))).unwrap())
        .collect();
    let marker_dir = dir.path().to_string_lossy().into_owned();
    let mut caught = 0;
    for _ in 0..60 {
        let mut cmd = Command::new("/bin/sleep", ["sleep", "60"]);
        cmd.timeout(Duration::from_millis(500));
        let mut held = HeldFds::default();
        let _ = lease.spawn_then(&cmd, &mut held);
        let Some(links) = held.stopped_holding else {
            continue;
        };
        caught += 1;
        // Its own: stdin, stdout, stderr, its error pipe and the lease's namespaces.
        assert!(
            !links.iter().any(|l| l.starts_with(&marker_dir)) && links.len() <= 9,
            "a stopped child holds fds of its caller: {links:?}"
        );
        if caught >= 3 {
            break;
        }
    }
    assert!(caught > 0, "the stopper never caught a spawning child");
}
