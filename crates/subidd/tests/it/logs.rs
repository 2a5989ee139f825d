//! `logs::Logs` with the real `subidd --log-keeper`: the spawn path's pipes, a daemon restart,
//! a keeper killed or stopped and replaced, a keeper of another limit replaced at start,
//! refusals, removal.

use std::collections::HashSet;
use std::fs;
use std::io::Write;
use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use subid_sys::logkeep::Client;
use subidd::logs::{Logs, LogsConfig, LogsError};

const SUBIDD: &str = env!("CARGO_BIN_EXE_subidd");

fn secs(n: u64) -> Instant {
    Instant::now() + Duration::from_secs(n)
}

/// A daemon's directories; drop stops whatever keeper serves its socket (also after a failed
/// assertion).
struct Dirs {
    dir: tempfile::TempDir,
}

impl Dirs {
    fn new() -> Dirs {
        Dirs {
            dir: tempfile::Builder::new()
                .prefix("subidd-logs")
                .tempdir()
                .expect("temp dir"),
        }
    }

    fn config(&self, max_bytes: u64) -> LogsConfig {
        let mut config = LogsConfig::new(
            &self.dir.path().join("run"),
            self.dir.path().join("logs"),
            max_bytes,
        );
        config.program = PathBuf::from(SUBIDD);
        config.keeper.idle_timeout = Duration::from_secs(2);
        config.health_interval = Duration::from_millis(200);
        // Long enough that a busy machine does not make a healthy keeper look wedged.
        config.health_timeout = Duration::from_secs(5);
        config
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("run").join("logkeeper.sock")
    }

    fn read(&self, id: &str, stream: &str) -> String {
        let path = self.dir.path().join("logs").join(format!("{id}.{stream}"));
        String::from_utf8(fs::read(path).unwrap_or_default()).unwrap()
    }
}

impl Drop for Dirs {
    fn drop(&mut self) {
        if let Ok(client) = Client::connect(&self.socket(), secs(5))
            && client.shutdown(secs(5)).is_err()
            && let Ok(pidfd) = client.keeper_pidfd()
        {
            let _ = pidfd.send_signal(nix::sys::signal::Signal::SIGKILL as i32);
        }
    }
}

fn start(dirs: &Dirs, max_bytes: u64) -> Logs {
    fs::create_dir_all(dirs.dir.path().join("run")).unwrap();
    Logs::start_with(dirs.config(max_bytes)).expect("start the log service")
}

/// A writer in its own process group with the given write ends; drop kills the group.
struct Writer(Child);

impl Writer {
    fn new(script: &str, (stdout, stderr): (OwnedFd, OwnedFd)) -> Writer {
        let child = std::process::Command::new("/bin/sh")
            .args(["-c", script])
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .stdin(Stdio::null())
            .stdout(Stdio::from(stdout))
            .stderr(Stdio::from(stderr))
            .process_group(0)
            .spawn()
            .expect("spawn a writer");
        Writer(child)
    }

    fn signal_group(&self, signal: nix::sys::signal::Signal) {
        let pgid = nix::unistd::Pid::from_raw(i32::try_from(self.0.id()).unwrap());
        nix::sys::signal::killpg(pgid, signal).unwrap();
    }

    fn wait(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.0.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "the writer did not finish");
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        let pgid = nix::unistd::Pid::from_raw(i32::try_from(self.0.id()).unwrap_or(0));
        let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
        let _ = self.0.wait();
    }
}

/// Waits until the service is connected to a keeper other than `old`.
fn wait_for_new_keeper(logs: &Logs, old: i32) -> i32 {
    let deadline = secs(20);
    loop {
        if let Some(pid) = logs.keeper_pid()
            && pid != old
        {
            return pid;
        }
        assert!(Instant::now() < deadline, "no new keeper");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// SIGKILLs the keeper `old`, runs `then`, and waits until the replacement has the whole mirror
/// attached again (the restart is counted then); returns the replacement's pid.
fn replace_keeper(logs: &Logs, old: i32, then: impl FnOnce()) -> i32 {
    let restarts = logs.restarts();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(old),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    then();
    let replacement = wait_for_new_keeper(logs, old);
    let deadline = secs(10);
    while logs.restarts() == restarts {
        assert!(Instant::now() < deadline, "the restart never finished");
        std::thread::sleep(Duration::from_millis(5));
    }
    replacement
}

fn lines(n: usize) -> String {
    (0..n).map(|i| format!("line {i}\n")).collect()
}

#[test]
#[cfg_attr(not(subidd_root), ignore = "needs root")]
fn the_spawn_path_gets_two_pipes_and_the_keeper_fills_the_files() {
    let dirs = Dirs::new();
    let logs = start(&dirs, 1 << 20);
    let id = Logs::new_id();
    let mut writer = Writer::new("echo out; echo err >&2", logs.attach(&id).unwrap());
    assert!(writer.wait(Duration::from_secs(10)).success());
    let stats = logs.sync(&id, secs(10)).unwrap();
    assert_eq!(dirs.read(&id, "stdout"), "out\n");
    assert_eq!(dirs.read(&id, "stderr"), "err\n");
    assert!(
        !stats.streams[0].open && !stats.streams[1].open,
        "{stats:?}"
    );
    // The keeper made the files 0640 (the daemon made none).
    use std::os::unix::fs::PermissionsExt;
    let mode = fs::metadata(logs.path(&id, "stdout"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o640);
    assert!(logs.holds(&id));
    logs.forget(&id);
    assert!(!logs.holds(&id));
    assert_eq!(logs.attached(), 0);
}

/// Pipes made for a spawn reach the keeper only when sent (the spawn path sends once its child
/// exists). A keeper that replaces a dead one in between takes them from the daemon's mirror, and
/// the send after that hands nothing over twice: the output is written once.
#[test]
#[cfg_attr(not(subidd_root), ignore = "needs root")]
fn pipes_made_unsent_reach_a_replacement_keeper_once() {
    let dirs = Dirs::new();
    let logs = start(&dirs, 1 << 20);
    let id = Logs::new_id();
    let mut writer = Writer::new("echo early", logs.attach_unsent(&id).unwrap());
    assert!(writer.wait(Duration::from_secs(10)).success());
    assert!(
        !logs.path(&id, "stdout").exists(),
        "no keeper has the pipes before they are sent"
    );
    let keeper = logs.keeper_pid().unwrap();
    replace_keeper(&logs, keeper, || {});
    logs.send(&id);
    logs.sync(&id, secs(10)).unwrap();
    assert_eq!(dirs.read(&id, "stdout"), "early\n");
    assert_eq!(dirs.read(&id, "stderr"), "");
}

#[test]
#[cfg_attr(not(subidd_root), ignore = "needs root")]
fn a_restarted_daemon_takes_the_ids_back_and_survives_a_killed_keeper() {
    let dirs = Dirs::new();
    let first = start(&dirs, 1 << 20);
    let id = Logs::new_id();
    let mut writer = Writer::new(
        "i=0; while [ $i -lt 300 ]; do echo line $i; i=$((i+1)); sleep 0.003; done",
        first.attach(&id).unwrap(),
    );
    let keeper = first.keeper_pid().unwrap();
    std::thread::sleep(Duration::from_millis(100));
    // The daemon stops; its keeper stays, and the next daemon finds it.
    drop(first);
    let logs = start(&dirs, 1 << 20);
    assert_eq!(logs.keeper_pid(), Some(keeper));
    assert!(logs.holds(&id));
    // Kill the keeper while it waits (writer paused, pipe drained): no chunk in flight.
    writer.signal_group(nix::sys::signal::Signal::SIGSTOP);
    logs.sync(&id, secs(10)).unwrap();
    let replacement = replace_keeper(&logs, keeper, || {
        writer.signal_group(nix::sys::signal::Signal::SIGCONT);
    });
    assert_eq!(logs.restarts(), 1);
    assert!(
        writer.wait(Duration::from_secs(20)).success(),
        "no EPIPE, no SIGPIPE"
    );
    logs.sync(&id, secs(10)).unwrap();
    assert_eq!(dirs.read(&id, "stdout"), lines(300));
    assert_eq!(logs.keeper_pid(), Some(replacement));
}

#[test]
#[cfg_attr(not(subidd_root), ignore = "needs root")]
fn a_stopped_keeper_is_killed_and_replaced() {
    let dirs = Dirs::new();
    let mut config = dirs.config(1 << 20);
    config.health_timeout = Duration::from_secs(2);
    fs::create_dir_all(dirs.dir.path().join("run")).unwrap();
    let logs = Logs::start_with(config).unwrap();
    let id = Logs::new_id();
    let (out, _err) = logs.attach(&id).unwrap();
    let mut out = fs::File::from(out);
    out.write_all(b"before\n").unwrap();
    logs.sync(&id, secs(10)).unwrap();
    let keeper = logs.keeper_pid().unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(keeper),
        nix::sys::signal::Signal::SIGSTOP,
    )
    .unwrap();
    out.write_all(b"while stopped\n").unwrap();
    // A SYNC to a stopped keeper ends at its deadline, with an error saying so.
    let err = logs
        .sync(&id, Instant::now() + Duration::from_millis(300))
        .unwrap_err();
    assert!(matches!(err, LogsError::Request { .. }), "{err}");
    // The health check gives up on it (2 s here), kills it, and starts another.
    wait_for_new_keeper(&logs, keeper);
    out.write_all(b"after\n").unwrap();
    logs.sync(&id, secs(10)).unwrap();
    assert_eq!(dirs.read(&id, "stdout"), "before\nwhile stopped\nafter\n");
    let status = fs::read_to_string(format!("/proc/{keeper}/status"));
    assert!(
        status.is_err() || status.unwrap().contains("State:\tZ"),
        "the stopped keeper was killed"
    );
}

#[test]
#[cfg_attr(not(subidd_root), ignore = "needs root")]
fn a_keeper_with_another_limit_is_replaced_at_start_and_keeps_the_ids() {
    let dirs = Dirs::new();
    let first = start(&dirs, 1 << 20);
    let id = Logs::new_id();
    let (out, _err) = first.attach(&id).unwrap();
    let mut out = fs::File::from(out);
    out.write_all(b"a\n").unwrap();
    let old = first.keeper_pid().unwrap();
    drop(first);
    let logs = start(&dirs, 2 << 20);
    let new = logs.keeper_pid().unwrap();
    assert_ne!(new, old);
    let client = Client::connect(&dirs.socket(), secs(5)).unwrap();
    assert_eq!(client.hello().max_bytes, 2 << 20);
    assert_eq!(client.hello().log_dir, dirs.dir.path().join("logs"));
    assert!(logs.holds(&id));
    out.write_all(b"b\n").unwrap();
    logs.sync(&id, secs(10)).unwrap();
    assert_eq!(dirs.read(&id, "stdout"), "a\nb\n");
}

#[test]
#[cfg_attr(not(subidd_root), ignore = "needs root")]
fn full_duplicate_and_bad_ids_are_refused_before_any_spawn() {
    let dirs = Dirs::new();
    let mut config = dirs.config(4096);
    config.keeper.max_ids = Some(2);
    fs::create_dir_all(dirs.dir.path().join("run")).unwrap();
    let logs = Logs::start_with(config).unwrap();
    let _a = logs.attach("aaaa").unwrap();
    let _b = logs.attach("bbbb").unwrap();
    assert!(matches!(
        logs.attach("cccc"),
        Err(LogsError::Full { capacity: 2 })
    ));
    assert!(matches!(
        logs.attach("aaaa"),
        Err(LogsError::Duplicate { .. })
    ));
    for bad in ["", "../x", "a.b", &"x".repeat(65)] {
        assert!(
            matches!(logs.attach(bad), Err(LogsError::BadId(_))),
            "{bad:?}"
        );
        assert!(
            matches!(logs.sync(bad, secs(1)), Err(LogsError::BadId(_))),
            "{bad:?}"
        );
    }
}

#[test]
#[cfg_attr(not(subidd_root), ignore = "needs root")]
fn removing_a_process_logs_detaches_it_and_unlinks_its_files() {
    let dirs = Dirs::new();
    let logs = start(&dirs, 4096);
    let id = Logs::new_id();
    let (out, err) = logs.attach(&id).unwrap();
    nix::unistd::write(&out, b"x\n").unwrap();
    nix::unistd::write(&err, b"e\n").unwrap();
    logs.sync(&id, secs(10)).unwrap();
    assert_eq!(
        logs.remove_files(std::slice::from_ref(&id), secs(10))
            .unwrap(),
        2
    );
    assert!(!logs.path(&id, "stdout").exists() && !logs.path(&id, "stderr").exists());
    assert!(!logs.holds(&id));
    assert!(!logs.sync(&id, secs(10)).unwrap().attached);
    // Nobody reads the pipes any more: the writer gets EPIPE rather than a file.
    assert_eq!(
        nix::unistd::write(&out, b"y"),
        Err(nix::errno::Errno::EPIPE)
    );
    drop(err);
    assert!(!logs.path(&id, "stdout").exists());
    // Bad ids are reported, and the good ones still go.
    let other = Logs::new_id();
    let _pipes = logs.attach(&other).unwrap();
    logs.sync(&other, secs(10)).unwrap();
    let result = logs.remove_files(&["../etc".to_string(), other.clone()], secs(10));
    assert!(matches!(result, Err(LogsError::BadId(_))), "{result:?}");
    assert!(!logs.path(&other, "stdout").exists());
}

#[test]
#[cfg_attr(not(subidd_root), ignore = "needs root")]
fn orphan_files_go_and_held_or_known_ones_stay() {
    let dirs = Dirs::new();
    let logs = start(&dirs, 4096);
    let held = Logs::new_id();
    let pipes = logs.attach(&held).unwrap();
    // A file is made with the first bytes written.
    nix::unistd::write(&pipes.0, b"held\n").unwrap();
    logs.sync(&held, secs(10)).unwrap();
    let (known, orphan) = (Logs::new_id(), Logs::new_id());
    for id in [&known, &orphan] {
        for stream in ["stdout", "stderr"] {
            fs::write(logs.path(id, stream), "old").unwrap();
        }
    }
    let known_set: HashSet<String> = [known.clone()].into();
    assert_eq!(logs.remove_orphans(&known_set).unwrap(), 2);
    assert!(logs.path(&held, "stdout").exists());
    assert!(logs.path(&known, "stderr").exists());
    assert!(!logs.path(&orphan, "stdout").exists());
}

#[test]
fn the_keeper_entry_is_hidden_and_checks_its_arguments() {
    let help = std::process::Command::new(SUBIDD)
        .arg("--help")
        .output()
        .unwrap();
    assert!(help.status.success());
    assert!(!String::from_utf8_lossy(&help.stdout).contains("keeper"));
    let bad = std::process::Command::new(SUBIDD)
        .args([
            "--log-keeper",
            "--socket",
            "relative.sock",
            "--log-dir",
            "/nonexistent",
        ])
        .args(["--max-bytes", "1"])
        .env_clear()
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("absolute"),
        "{bad:?}"
    );
    assert!(!Path::new("/nonexistent").exists());
}

#[test]
#[cfg_attr(not(subidd_root), ignore = "needs root")]
fn the_keeper_subidd_starts_runs_clean_in_its_own_session() {
    let dirs = Dirs::new();
    let logs = start(&dirs, 4096);
    let pid = logs.keeper_pid().unwrap();
    assert_eq!(fs::read(format!("/proc/{pid}/environ")).unwrap(), b"");
    let exe = fs::read_link(format!("/proc/{pid}/exe")).unwrap();
    assert_eq!(exe, fs::canonicalize(Path::new(SUBIDD)).unwrap());
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    assert_eq!(fields[3], pid.to_string(), "its own session");
    let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    assert!(cmdline.split(|b| *b == 0).any(|a| a == b"--log-keeper"));
    logs.shutdown_keeper(secs(10)).unwrap();
    assert!(!dirs.socket().exists());
}
