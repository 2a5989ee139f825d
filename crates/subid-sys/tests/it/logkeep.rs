//! The log keeper as a real process: floods stay bounded on disk, writers outlive their parent,
//! fallocate cannot reach the file, clients come and go, the keeper is killed and replaced,
//! SYNC, fairness, a full disk, and what it refuses.
//!
//! The keeper is the `subid-logkeeper` binary of this crate (the loop `subidd --log-keeper`
//! runs), started by `logkeep::launch` as the daemon starts it. The test plays the daemon: it
//! makes the pipes, hands the write ends to the writers, attaches the read ends, and keeps its
//! own copies of the read ends (the daemon's mirror).

use std::fs;
use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use nix::sys::socket::{
    AddressFamily, ControlMessage, MsgFlags, SockFlag, SockType, UnixAddr, connect, recv, sendmsg,
    socket,
};
use subid_sys::PidFd;
use subid_sys::logkeep::wire::{self, ErrorCode, Reply, Request};
use subid_sys::logkeep::{
    self, Client, KeeperConfig, KeeperError, Stream, StreamSet, connect_or_launch, slack,
};

use crate::support::{Lease, sh};

const KEEPER: &str = env!("CARGO_BIN_EXE_subid-logkeeper");

fn secs(n: u64) -> Instant {
    Instant::now() + Duration::from_secs(n)
}

/// A keeper on a temp socket and log dir; drop kills it (if a test has not stopped it) and
/// removes the dir.
struct Keeper {
    dir: tempfile::TempDir,
    config: KeeperConfig,
    pidfd: Option<PidFd>,
    /// Mounts made under `dir` for this keeper, undone on drop.
    mounts: Vec<PathBuf>,
}

impl Keeper {
    fn new(max_bytes: u64) -> Keeper {
        let dir = tempfile::Builder::new()
            .prefix("subid-logkeep")
            .tempdir()
            .expect("temp dir");
        let config = KeeperConfig::new(
            dir.path().join("logkeeper.sock"),
            dir.path().join("logs"),
            max_bytes,
        );
        Keeper {
            dir,
            config,
            pidfd: None,
            mounts: Vec::new(),
        }
    }

    /// Starts the keeper and returns a connection to it.
    fn start(&mut self) -> Client {
        let (client, pidfd) =
            connect_or_launch(Path::new(KEEPER), &self.config, secs(10)).expect("start the keeper");
        assert!(pidfd.is_some(), "a keeper was already running");
        self.pidfd = pidfd;
        client
    }

    fn started(max_bytes: u64) -> (Keeper, Client) {
        let mut keeper = Keeper::new(max_bytes);
        let client = keeper.start();
        (keeper, client)
    }

    fn pid(&self) -> i32 {
        self.pidfd.as_ref().expect("a keeper").pid()
    }

    /// SIGKILL, and reap.
    fn kill(&mut self) {
        let pidfd = self.pidfd.take().expect("a keeper");
        pidfd.send_signal(libc::SIGKILL).expect("kill the keeper");
        pidfd.wait().expect("reap the keeper");
    }

    fn path(&self, id: &str, stream: Stream) -> PathBuf {
        self.config
            .log_dir
            .join(format!("{id}.{}", stream.as_str()))
    }

    fn read(&self, id: &str, stream: Stream) -> Vec<u8> {
        fs::read(self.path(id, stream)).unwrap_or_default()
    }

    /// (size, bytes of disk blocks) of a log file.
    fn usage(&self, id: &str, stream: Stream) -> (u64, u64) {
        fs::metadata(self.path(id, stream)).map_or((0, 0), |m| (m.len(), m.blocks() * 512))
    }

    /// Mounts a tmpfs of `size` on the log dir (before the keeper starts).
    fn tmpfs_logs(&mut self, size: &str) {
        use nix::mount::{MsFlags, mount};
        fs::create_dir_all(&self.config.log_dir).unwrap();
        mount(
            Some("tmpfs"),
            &self.config.log_dir,
            Some("tmpfs"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some(format!("size={size},mode=0750").as_str()),
        )
        .expect("mount tmpfs");
        self.mounts.push(self.config.log_dir.clone());
    }
}

impl Drop for Keeper {
    fn drop(&mut self) {
        if let Some(pidfd) = self.pidfd.take() {
            let _ = pidfd.send_signal(libc::SIGKILL);
            let _ = pidfd.wait();
        }
        for dir in self.mounts.drain(..) {
            if let Err(e) = nix::mount::umount2(&dir, nix::mount::MntFlags::MNT_DETACH) {
                eprintln!("cleanup: umount {dir:?}: {e}");
            }
        }
    }
}

/// The two pipes of one process: the test keeps the read ends (the mirror).
struct Pipes {
    stdout_r: OwnedFd,
    stderr_r: OwnedFd,
    stdout_w: Option<OwnedFd>,
    stderr_w: Option<OwnedFd>,
}

fn pipes() -> Pipes {
    let flags = nix::fcntl::OFlag::O_CLOEXEC;
    let (stdout_r, stdout_w) = nix::unistd::pipe2(flags).expect("pipe2");
    let (stderr_r, stderr_w) = nix::unistd::pipe2(flags).expect("pipe2");
    Pipes {
        stdout_r,
        stderr_r,
        stdout_w: Some(stdout_w),
        stderr_w: Some(stderr_w),
    }
}

impl Pipes {
    fn attach(&self, client: &Client, id: &str) {
        client
            .attach(id, Some(self.stdout_r.as_fd()), Some(self.stderr_r.as_fd()))
            .expect("attach");
    }

    /// `script` under /bin/sh with the write ends as its stdout and stderr (the test's copies
    /// are handed over), in a process group of its own so that its background children can be
    /// killed with it.
    fn run(&mut self, script: &str) -> Writer {
        let mut command = std::process::Command::new("/bin/sh");
        command
            .args(["-c", script])
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .stdin(Stdio::null())
            .stdout(Stdio::from(self.stdout_w.take().expect("stdout write end")))
            .stderr(Stdio::from(self.stderr_w.take().expect("stderr write end")))
            .process_group(0);
        let child = command.spawn().expect("spawn a writer");
        Writer { child }
    }
}

/// A writer and its process group; drop kills the group and reaps the child.
struct Writer {
    child: Child,
}

impl Writer {
    fn pgid(&self) -> nix::unistd::Pid {
        nix::unistd::Pid::from_raw(i32::try_from(self.child.id()).unwrap())
    }

    fn wait_timeout(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        let _ = nix::sys::signal::killpg(self.pgid(), nix::sys::signal::Signal::SIGKILL);
        let _ = self.child.wait();
    }
}

/// Samples both files of `id` every few ms for `how_long`; panics at the first sample past
/// the bound, returns the largest (size, disk bytes) seen.
fn watch_bound(keeper: &Keeper, id: &str, how_long: Duration) -> (u64, u64) {
    let max = keeper.config.max_bytes;
    let size_bound = max + slack(max);
    // The last block is allocated whole, and a file of many extents may need an index block.
    let disk_bound = size_bound + 8192;
    let end = Instant::now() + how_long;
    let mut seen = (0, 0);
    let mut samples = 0;
    while Instant::now() < end {
        for stream in Stream::ALL {
            let (size, disk) = keeper.usage(id, stream);
            assert!(size <= size_bound, "{stream:?} size {size} > {size_bound}");
            assert!(
                disk <= disk_bound,
                "{stream:?} uses {disk} bytes of disk > {disk_bound}"
            );
            seen = (seen.0.max(size), seen.1.max(disk));
        }
        samples += 1;
        std::thread::sleep(Duration::from_millis(2));
    }
    assert!(samples > 100, "only {samples} samples");
    seen
}

fn total_written(client: &Client, id: &str) -> u64 {
    let stats = client.sync(id, secs(10)).expect("sync");
    stats.streams.iter().map(|s| s.written).sum()
}

#[test]
#[cfg_attr(not(subidd_root), ignore = "needs root")]
fn a_flood_never_takes_a_file_past_its_bound_in_size_or_blocks() {
    let (keeper, client) = Keeper::started(1 << 20);
    let mut p = pipes();
    p.attach(&client, "flood");
    let _writer = p.run("cat /dev/zero & exec cat /dev/zero >&2");
    let seen = watch_bound(&keeper, "flood", Duration::from_secs(3));
    let stats = client.sync("flood", secs(10)).unwrap();
    for s in stats.streams {
        // The flood went through the file many times over, and was cut, not dropped.
        assert!(s.written > 8 << 20, "{s:?}");
        assert!(s.trimmed > 0 && s.dropped == 0, "{s:?}");
    }
    eprintln!(
        "flood 3 s: largest file {} bytes, {} bytes of disk (bound {}); {:?}",
        seen.0,
        seen.1,
        (1 << 20) + slack(1 << 20),
        stats.streams
    );
}

#[test]
#[cfg_attr(not(subidd_root), ignore = "needs root")]
fn the_bound_holds_where_ranges_cannot_be_collapsed() {
    // tmpfs has no COLLAPSE_RANGE: the keeper copies the tail instead.
    let mut keeper = Keeper::new(256 << 10);
    keeper.tmpfs_logs("16m");
    let client = keeper.start();
    let mut p = pipes();
    p.attach(&client, "tmpfs");
    let _writer = p.run("exec cat /dev/zero");
    watch_bound(&keeper, "tmpfs", Duration::from_secs(2));
    let stats = client.sync("tmpfs", secs(10)).unwrap();
    assert!(stats.streams[0].written > 4 << 20, "{stats:?}");
    assert_eq!(stats.streams[0].dropped, 0);
}

#[test]
#[cfg_attr(not(subidd_root), ignore = "needs root")]
fn a_writer_that_outlives_its_parent_stays_bounded() {
    let (keeper, client) = Keeper::started(256 << 10);
    let mut p = pipes();
    p.attach(&client, "orphan");
    // The recorded process exits at once; its background child keeps the write end.
    let mut writer = p.run("cat /dev/zero & exit 0");
    let status = writer
        .wait_timeout(Duration::from_secs(10))
        .expect("parent exits");
    assert!(status.success());
    let before = total_written(&client, "orphan");
    watch_bound(&keeper, "orphan", Duration::from_secs(2));
    let after = total_written(&client, "orphan");
    assert!(
        after > before + (4 << 20),
        "the orphan kept writing: {before} -> {after}"
    );
}

#[test]
#[cfg_attr(not(subidd_root), ignore = "needs root")]
fn fallocate_on_the_output_fails_and_takes_no_disk() {
    let (keeper, client) = Keeper::started(1 << 20);
    let mut p = pipes();
    p.attach(&client, "falloc");
    // What a tenant holds is a pipe: no fallocate, no truncate, no seek.
    let w = p.stdout_w.as_ref().unwrap();
    let e = nix::fcntl::fallocate(
        w,
        nix::fcntl::FallocateFlags::FALLOC_FL_KEEP_SIZE,
        0,
        2 << 30,
    );
    assert_eq!(e, Err(nix::errno::Errno::ESPIPE));
    assert!(nix::unistd::ftruncate(w, 1 << 30).is_err());
    assert_eq!(
        nix::unistd::lseek(w, 1 << 30, nix::unistd::Whence::SeekSet),
        Err(nix::errno::Errno::ESPIPE)
    );
    // The same from a tenant inside a lease's user namespace, through /proc/self/fd/1 too.
    let mut lease = Lease::new(0x7080_0000);
    let mut cmd = sh(
        "fallocate --keep-size -l 2G /proc/self/fd/1; echo fallocate=$?; \
         fallocate -o 0 -l 2G /proc/self/fd/1 2>&1; echo done",
    );
    cmd.stdout(p.stdout_w.take().unwrap());
    cmd.stderr(p.stderr_w.take().unwrap());
    let pid = lease.spawn(&cmd).expect("spawn in the lease");
    let status = lease
        .child(pid)
        .wait_timeout(Duration::from_secs(10))
        .unwrap();
    assert_eq!(status, Some(subid_sys::ExitStatus::Exited(0)));
    client.sync("falloc", secs(10)).unwrap();
    let out = String::from_utf8_lossy(&keeper.read("falloc", Stream::Stdout)).into_owned();
    let err = String::from_utf8_lossy(&keeper.read("falloc", Stream::Stderr)).into_owned();
    assert!(
        out.contains("fallocate=1") && out.ends_with("done\n"),
        "{out:?}"
    );
    assert!(err.contains("fallocate"), "{err:?}");
    for stream in Stream::ALL {
        let (size, disk) = keeper.usage("falloc", stream);
        assert!(
            size < 4096 && disk <= 4096,
            "{stream:?}: {size} bytes, {disk} on disk"
        );
    }
}

#[test]
#[cfg_attr(not(subidd_root), ignore = "needs root")]
fn output_survives_a_client_that_leaves_and_the_next_one_lists_it_back() {
    let mut keeper = Keeper::new(1 << 20);
    keeper.config.idle_timeout = Duration::from_millis(200);
    let first = keeper.start();
    let mut a = pipes();
    let b = pipes();
    a.attach(&first, "aaaa");
    b.attach(&first, "bbbb");
    let mut a_out = fs::File::from(a.stdout_w.take().unwrap());
    a_out.write_all(b"before\n").unwrap();
    first.sync("aaaa", secs(10)).unwrap();
    drop(first);
    // No client now; the keeper keeps copying, and does not go idle while ids are attached.
    a_out.write_all(b"between\n").unwrap();
    std::thread::sleep(Duration::from_millis(600));
    assert!(!keeper.pidfd.as_ref().unwrap().has_exited().unwrap());
    assert_eq!(keeper.read("aaaa", Stream::Stdout), b"before\nbetween\n");

    let second = Client::connect(&keeper.config.socket, secs(10)).expect("reconnect");
    assert_eq!(second.keeper_pid(), keeper.pid());
    assert_eq!(second.hello().attached, 2);
    let mut listed = second.list(secs(10)).unwrap();
    listed.sort_by(|x, y| x.id.cmp(&y.id));
    assert_eq!(
        listed.iter().map(|l| l.id.as_str()).collect::<Vec<_>>(),
        ["aaaa", "bbbb"]
    );
    // The listed fds are the same pipes' read ends.
    let ino = |fd: &OwnedFd| nix::sys::stat::fstat(fd).unwrap().st_ino;
    assert_eq!(ino(listed[0].stdout.as_ref().unwrap()), ino(&a.stdout_r));
    assert_eq!(ino(listed[1].stderr.as_ref().unwrap()), ino(&b.stderr_r));
    a_out.write_all(b"after\n").unwrap();
    second.sync("aaaa", secs(10)).unwrap();
    assert_eq!(
        keeper.read("aaaa", Stream::Stdout),
        b"before\nbetween\nafter\n"
    );
    // Attaching the same pipes again (a daemon that re-attaches its mirror) changes nothing.
    a.attach(&second, "aaaa");
    a_out.write_all(b"again\n").unwrap();
    second.sync("aaaa", secs(10)).unwrap();
    assert_eq!(
        keeper.read("aaaa", Stream::Stdout),
        b"before\nbetween\nafter\nagain\n"
    );
    assert!(second.take_refusals().is_empty());
}

#[test]
#[cfg_attr(not(subidd_root), ignore = "needs root")]
fn a_killed_keeper_fails_no_writer_and_the_next_one_continues_the_file() {
    let (mut keeper, client) = Keeper::started(1 << 20);
    let mut p = pipes();
    p.attach(&client, "steady");
    let mut writer =
        p.run("i=0; while [ $i -lt 300 ]; do echo line $i; i=$((i+1)); sleep 0.002; done");
    std::thread::sleep(Duration::from_millis(200));
    // Kill the keeper while it waits (the writer paused and its pipe drained), so that no
    // chunk is in flight: then not a byte may be lost.
    nix::sys::signal::killpg(writer.pgid(), nix::sys::signal::Signal::SIGSTOP).unwrap();
    client.sync("steady", secs(10)).unwrap();
    let old_pid = keeper.pid();
    keeper.kill();
    assert!(
        client.pump(Duration::from_secs(5)).is_err(),
        "the connection ends with the keeper"
    );
    nix::sys::signal::killpg(writer.pgid(), nix::sys::signal::Signal::SIGCONT).unwrap();
    // With no keeper, the writer goes on into the pipe (our read ends keep it open).
    std::thread::sleep(Duration::from_millis(100));
    let client = keeper.start();
    assert_ne!(keeper.pid(), old_pid);
    p.attach(&client, "steady");
    let status = writer
        .wait_timeout(Duration::from_secs(20))
        .expect("the writer finishes");
    assert!(status.success(), "the writer failed: {status:?}");
    client.sync("steady", secs(10)).unwrap();
    let text = String::from_utf8(keeper.read("steady", Stream::Stdout)).unwrap();
    let want: String = (0..300).map(|i| format!("line {i}\n")).collect();
    assert_eq!(text, want);
}

#[test]
#[cfg_attr(not(subidd_root), ignore = "needs root")]
fn without_the_mirror_a_killed_keeper_takes_the_writer_with_it() {
    // What the mirror is for: when nobody else holds a read end, the writer dies of SIGPIPE.
    let (mut keeper, client) = Keeper::started(1 << 20);
    let Pipes {
        stdout_r,
        stderr_r,
        stdout_w,
        stderr_w,
    } = pipes();
    client
        .attach("bare", Some(stdout_r.as_fd()), Some(stderr_r.as_fd()))
        .unwrap();
    let mut command = std::process::Command::new("/bin/sh");
    command
        .args(["-c", "while :; do echo x; sleep 0.01; done"])
        .stdout(Stdio::from(stdout_w.unwrap()))
        .stderr(Stdio::from(stderr_w.unwrap()))
        .process_group(0);
    let mut writer = Writer {
        child: command.spawn().unwrap(),
    };
    client.sync("bare", secs(10)).unwrap();
    // The keeper's copies become the only read ends.
    drop(stdout_r);
    drop(stderr_r);
    keeper.kill();
    let status = writer
        .wait_timeout(Duration::from_secs(10))
        .expect("the writer dies");
    assert_eq!(status.signal(), Some(libc::SIGPIPE));
}

#[test]
#[cfg_attr(not(subidd_root), ignore = "needs root")]
fn sync_makes_what_was_just_written_visible() {
    let (keeper, client) = Keeper::started(1 << 20);
    let mut p = pipes();
    p.attach(&client, "synced");
    let mut out = fs::File::from(p.stdout_w.take().unwrap());
    let mut want = Vec::new();
    for i in 0..200 {
        let line = format!("line {i}\n");
        out.write_all(line.as_bytes()).unwrap();
        want.extend_from_slice(line.as_bytes());
        let stats = client.sync("synced", secs(10)).unwrap();
        assert!(stats.attached && stats.streams[0].open);
        assert_eq!(
            keeper.read("synced", Stream::Stdout),
            want,
            "after line {i}"
        );
    }
    // A process that writes and exits: after SYNC its last words are there, and the id is
    // forgotten once its pipes are at EOF.
    for i in 0..20 {
        let id = format!("quick{i}");
        let mut q = pipes();
        q.attach(&client, &id);
        let mut writer = q.run(&format!("echo out {i}; echo err {i} >&2"));
        assert!(
            writer
                .wait_timeout(Duration::from_secs(10))
                .unwrap()
                .success()
        );
        let stats = client.sync(&id, secs(10)).unwrap();
        assert_eq!(
            keeper.read(&id, Stream::Stdout),
            format!("out {i}\n").as_bytes()
        );
        assert_eq!(
            keeper.read(&id, Stream::Stderr),
            format!("err {i}\n").as_bytes()
        );
        assert!(
            !stats.streams[0].open && !stats.streams[1].open,
            "{stats:?}"
        );
        assert!(!client.sync(&id, secs(10)).unwrap().attached);
    }
}

#[test]
#[cfg_attr(not(subidd_root), ignore = "needs root")]
fn floods_do_not_starve_a_quiet_stream() {
    let (keeper, client) = Keeper::started(1 << 20);
    let mut floods = Vec::new();
    let mut writers = Vec::new();
    for i in 0..4 {
        let mut p = pipes();
        p.attach(&client, &format!("flood{i}"));
        writers.push(p.run("exec cat /dev/zero"));
        floods.push(p);
    }
    let quiet = pipes();
    quiet.attach(&client, "quiet");
    let mut out = fs::File::from(quiet.stdout_w.as_ref().unwrap().try_clone().unwrap());
    std::thread::sleep(Duration::from_millis(300));
    let mut latencies = Vec::new();
    let mut want = Vec::new();
    for i in 0..10 {
        let line = format!("quiet {i}\n");
        want.extend_from_slice(line.as_bytes());
        let t0 = Instant::now();
        out.write_all(line.as_bytes()).unwrap();
        // No SYNC: the loop itself must get to it while four pipes are always ready.
        while keeper.read("quiet", Stream::Stdout) != want {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "line {i} never landed"
            );
            std::thread::sleep(Duration::from_micros(200));
        }
        latencies.push(t0.elapsed());
        std::thread::sleep(Duration::from_millis(20));
    }
    for i in 0..4 {
        assert!(total_written(&client, &format!("flood{i}")) > 1 << 20);
    }
    latencies.sort();
    eprintln!(
        "quiet line under 4 floods: median {:?}, max {:?}",
        latencies[latencies.len() / 2],
        latencies[latencies.len() - 1]
    );
}

#[test]
#[cfg_attr(not(subidd_root), ignore = "needs root")]
fn a_full_disk_drops_and_counts_and_never_blocks_the_writer() {
    let mut keeper = Keeper::new(1 << 20);
    keeper.tmpfs_logs("256k");
    let client = keeper.start();
    let mut p = pipes();
    p.attach(&client, "full");
    // 64 MiB into a 256 KiB filesystem: all of it must go through (the writer then waits,
    // so that the id and its counters are still there to be asked for).
    let _writer = p.run("head -c 67108864 /dev/zero; exec sleep 60");
    let deadline = Instant::now() + Duration::from_secs(60);
    let out = loop {
        let out = client.sync("full", secs(10)).unwrap().streams[0];
        // Every byte read was either written (and maybe cut since) or dropped.
        if out.written + out.dropped == 64 << 20 {
            break out;
        }
        assert!(Instant::now() < deadline, "the writer is stuck: {out:?}");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(out.dropped > 32 << 20, "{out:?}");
    assert!(out.written > 0, "{out:?}");
    let (size, _) = keeper.usage("full", Stream::Stdout);
    assert!(size <= 256 << 10);
}

#[test]
#[cfg_attr(not(subidd_root), ignore = "needs root")]
fn a_keeper_at_capacity_refuses_attach_and_lets_go_of_the_fds() {
    let mut keeper = Keeper::new(1 << 20);
    keeper.config.max_ids = Some(2);
    let client = keeper.start();
    assert_eq!(client.hello().capacity, 2);
    let held: Vec<Pipes> = (0..3).map(|_| pipes()).collect();
    for (i, p) in held.iter().enumerate() {
        p.attach(&client, &format!("id{i}"));
    }
    // The SYNC is answered after the ATTACHes before it: the refusal is in by then.
    client.sync("id0", secs(10)).unwrap();
    let refusals = client.take_refusals();
    assert_eq!(refusals.len(), 1, "{refusals:?}");
    assert_eq!(
        (refusals[0].id.as_str(), refusals[0].code),
        ("id2", ErrorCode::Full)
    );
    // The keeper closed its copies: with ours gone, the pipe has no reader.
    let Pipes {
        stdout_r, stdout_w, ..
    } = held.into_iter().nth(2).unwrap();
    drop(stdout_r);
    assert_eq!(
        nix::unistd::write(stdout_w.as_ref().unwrap(), b"x"),
        Err(nix::errno::Errno::EPIPE)
    );
}

#[test]
#[cfg_attr(not(subidd_root), ignore = "needs root")]
fn the_keeper_starts_clean_and_leaves_when_idle() {
    // An fd of this process without close-on-exec must not reach the keeper.
    let sentinel = tempfile::tempfile().unwrap();
    nix::fcntl::fcntl(
        &sentinel,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
    )
    .unwrap();
    let sentinel_ino = sentinel.metadata().unwrap().ino();
    let mut keeper = Keeper::new(4096);
    keeper.config.idle_timeout = Duration::from_millis(300);
    let client = keeper.start();
    let pid = keeper.pid();
    assert_eq!(fs::read(format!("/proc/{pid}/environ")).unwrap(), b"");
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    assert_eq!(
        fields[3],
        pid.to_string(),
        "session id is its own pid: {stat}"
    );
    for fd in ["0", "1"] {
        let target = fs::read_link(format!("/proc/{pid}/fd/{fd}")).unwrap();
        assert_eq!(target, Path::new("/dev/null"));
    }
    for entry in fs::read_dir(format!("/proc/{pid}/fd")).unwrap() {
        let path = entry.unwrap().path();
        if let Ok(meta) = fs::metadata(&path) {
            assert_ne!(
                meta.ino(),
                sentinel_ino,
                "the keeper holds the test's fd {path:?}"
            );
        }
    }
    let sock = fs::symlink_metadata(&keeper.config.socket).unwrap();
    assert_eq!(sock.permissions().mode() & 0o777, 0o600);
    drop(client);
    let status = keeper
        .pidfd
        .as_ref()
        .unwrap()
        .wait_timeout(Duration::from_secs(10))
        .unwrap();
    assert_eq!(status, Some(subid_sys::ExitStatus::Exited(0)));
    keeper.pidfd = None;
    assert!(
        !keeper.config.socket.exists(),
        "the socket file went with it"
    );
}

#[test]
#[cfg_attr(not(subidd_root), ignore = "needs root")]
fn a_second_keeper_for_the_same_socket_steps_aside() {
    let (keeper, client) = Keeper::started(4096);
    let second = logkeep::launch(Path::new(KEEPER), &keeper.config).unwrap();
    let status = second.wait_timeout(Duration::from_secs(20)).unwrap();
    assert_eq!(status, Some(subid_sys::ExitStatus::Exited(3)));
    // The first one still serves.
    assert!(!client.sync("nothing", secs(10)).unwrap().attached);
    // And connect_or_launch finds it instead of starting another.
    let (again, child) = connect_or_launch(Path::new(KEEPER), &keeper.config, secs(10)).unwrap();
    assert!(child.is_none());
    assert_eq!(again.keeper_pid(), keeper.pid());
}

#[test]
#[cfg_attr(not(subidd_root), ignore = "needs root")]
fn shutdown_hands_the_pipes_to_the_next_keeper() {
    let (mut keeper, client) = Keeper::started(1 << 20);
    let mut p = pipes();
    p.attach(&client, "handover");
    let mut out = fs::File::from(p.stdout_w.take().unwrap());
    out.write_all(b"one\n").unwrap();
    let listed = client.list(secs(10)).unwrap();
    assert_eq!(listed.len(), 1);
    client.shutdown(secs(10)).unwrap();
    assert!(client.wait_closed(secs(10)));
    let status = keeper
        .pidfd
        .take()
        .unwrap()
        .wait_timeout(Duration::from_secs(10))
        .unwrap();
    assert_eq!(status, Some(subid_sys::ExitStatus::Exited(0)));
    assert_eq!(keeper.read("handover", Stream::Stdout), b"one\n");
    out.write_all(b"two\n").unwrap();
    let next = keeper.start();
    let l = &listed[0];
    next.attach(
        &l.id,
        l.stdout.as_ref().map(|f| f.as_fd()),
        l.stderr.as_ref().map(|f| f.as_fd()),
    )
    .unwrap();
    next.sync("handover", secs(10)).unwrap();
    assert_eq!(keeper.read("handover", Stream::Stdout), b"one\ntwo\n");
    assert!(matches!(
        client.sync("handover", secs(1)),
        Err(KeeperError::Closed)
    ));
}

/// A raw connection, for requests the client would never send.
fn raw(keeper: &Keeper) -> OwnedFd {
    let fd = socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .unwrap();
    connect(
        fd.as_raw_fd(),
        &UnixAddr::new(&keeper.config.socket).unwrap(),
    )
    .unwrap();
    let timeout = nix::sys::time::TimeVal::new(10, 0);
    nix::sys::socket::setsockopt(&fd, nix::sys::socket::sockopt::ReceiveTimeout, &timeout).unwrap();
    fd
}

fn send_raw(fd: &OwnedFd, bytes: &[u8], fds: &[i32]) {
    let iov = [std::io::IoSlice::new(bytes)];
    let cmsg = [ControlMessage::ScmRights(fds)];
    let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &cmsg };
    sendmsg::<()>(fd.as_raw_fd(), &iov, cmsgs, MsgFlags::empty(), None).unwrap();
}

fn reply_raw(fd: &OwnedFd) -> (u32, Reply) {
    let mut buf = [0u8; wire::MAX_MESSAGE];
    let n = recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty()).expect("a reply");
    wire::decode_reply(&buf[..n]).expect("a reply the client can read")
}

fn error_code(reply: Reply) -> (ErrorCode, String) {
    match reply {
        Reply::Error { code, id, .. } => (code, id),
        other => panic!("not an error: {other:?}"),
    }
}

#[test]
#[cfg_attr(not(subidd_root), ignore = "needs root")]
fn bad_requests_get_a_coded_error_and_the_keeper_serves_on() {
    let (keeper, client) = Keeper::started(4096);
    let fd = raw(&keeper);
    let attach = |id: &str, streams| {
        wire::encode_request(
            5,
            &Request::Attach {
                id: id.into(),
                streams,
            },
        )
    };

    send_raw(&fd, b"xyz", &[]);
    assert_eq!(
        reply_raw(&fd),
        (
            0,
            Reply::Error {
                code: ErrorCode::BadMessage,
                id: String::new(),
                message: "3 bytes is shorter than a header".into(),
            }
        )
    );
    let mut version = wire::encode_request(6, &Request::Hello);
    version[0] = 9;
    send_raw(&fd, &version, &[]);
    assert_eq!(error_code(reply_raw(&fd).1).0, ErrorCode::Version);
    send_raw(&fd, &vec![1u8; wire::MAX_MESSAGE + 100], &[]);
    assert_eq!(error_code(reply_raw(&fd).1).0, ErrorCode::BadMessage);

    // Not a pipe; a write end; too few fds for the streams; fds with a SYNC.
    let file = tempfile::tempfile().unwrap();
    send_raw(
        &fd,
        &attach("file", StreamSet::only(Stream::Stdout)),
        &[file.as_raw_fd()],
    );
    assert_eq!(
        error_code(reply_raw(&fd).1),
        (ErrorCode::BadFds, "file".into())
    );
    let (r, w) = nix::unistd::pipe().unwrap();
    send_raw(
        &fd,
        &attach("wend", StreamSet::only(Stream::Stdout)),
        &[w.as_raw_fd()],
    );
    assert_eq!(
        error_code(reply_raw(&fd).1),
        (ErrorCode::BadFds, "wend".into())
    );
    send_raw(&fd, &attach("few", StreamSet::BOTH), &[r.as_raw_fd()]);
    assert_eq!(
        error_code(reply_raw(&fd).1),
        (ErrorCode::BadFds, "few".into())
    );
    send_raw(
        &fd,
        &wire::encode_request(7, &Request::Sync { id: "x".into() }),
        &[r.as_raw_fd()],
    );
    assert_eq!(
        reply_raw(&fd),
        (
            7,
            Reply::Error {
                code: ErrorCode::BadFds,
                id: String::new(),
                message: "fds with a request that takes none".into(),
            }
        )
    );
    // Attached, then the same id with another pipe.
    send_raw(
        &fd,
        &attach("mine", StreamSet::only(Stream::Stdout)),
        &[r.as_raw_fd()],
    );
    let (r2, _w2) = nix::unistd::pipe().unwrap();
    send_raw(
        &fd,
        &attach("mine", StreamSet::only(Stream::Stdout)),
        &[r2.as_raw_fd()],
    );
    assert_eq!(
        error_code(reply_raw(&fd).1),
        (ErrorCode::Conflict, "mine".into())
    );
    // A bad id never reaches the file system.
    let mut evil = wire::encode_request(
        8,
        &Request::Sync {
            id: "abcdef".into(),
        },
    );
    evil[wire::HEADER + 1..].copy_from_slice(b"../../");
    send_raw(&fd, &evil, &[]);
    assert_eq!(error_code(reply_raw(&fd).1).0, ErrorCode::BadId);

    // Many ids, then a client that asks for the list and leaves before reading it.
    let many: Vec<Pipes> = (0..300).map(|_| pipes()).collect();
    for (i, p) in many.iter().enumerate() {
        p.attach(&client, &format!("m{i}"));
    }
    let quitter = raw(&keeper);
    send_raw(&quitter, &wire::encode_request(1, &Request::List), &[]);
    drop(quitter);
    // Everyone else is still served, and the list is whole.
    let listed = client.list(secs(10)).unwrap();
    assert_eq!(listed.len(), 301);
    assert!(
        listed
            .iter()
            .any(|l| l.id == "mine" && l.stdout.is_some() && l.stderr.is_none())
    );
    assert_eq!(client.hello().pid, u32::try_from(keeper.pid()).unwrap());
    assert!(client.take_refusals().is_empty());
}

#[test]
#[cfg_attr(not(subidd_root), ignore = "needs root")]
fn only_root_may_talk_to_the_keeper() {
    let (keeper, client) = Keeper::started(4096);
    // Open the way on purpose: only the peer check is left.
    fs::set_permissions(keeper.dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    fs::set_permissions(&keeper.config.socket, fs::Permissions::from_mode(0o666)).unwrap();
    let script = r#"
        use Socket; $SIG{PIPE} = 'IGNORE';
        socket(my $s, AF_UNIX, SOCK_SEQPACKET, 0) or die "socket: $!";
        connect($s, pack_sockaddr_un($ARGV[0])) or die "connect: $!";
        send($s, pack("CCCCV", 1, 1, 0, 0, 7), 0);
        my $r = recv($s, my $buf, 100, 0);
        print defined($r) ? "got " . length($buf) : "error";
    "#;
    let out = std::process::Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "perl",
            "-e",
            script,
        ])
        .arg(&keeper.config.socket)
        .output()
        .expect("run perl as nobody");
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said == "got 0" || said == "error",
        "nobody was answered: {said:?} {out:?}"
    );
    assert!(client.sync("x", secs(10)).is_ok(), "root still is");
}
