//! The `subidctl` binary against the real `subidd` binary on a temp socket, state and runtime
//! dir: output in table and `--json` form, and the exit codes scripts rely on.

#![forbid(unsafe_code)]

use std::process::{Command, Output, Stdio};

use serde_json::Value;

/// The pool's first id and block size when no subuid entry and no pool config say otherwise.
const BASE: u64 = 1_879_048_192;
const BLOCK: u64 = 65_536;

/// A running `subidd` on temp paths, started by the tests' shared harness: on drop it is
/// killed and its namespace pins, log keeper and lease cgroups go with it, also when a test
/// fails.
struct Daemon(subidd_tests::Daemon);

impl std::ops::Deref for Daemon {
    type Target = subidd_tests::Daemon;

    fn deref(&self) -> &subidd_tests::Daemon {
        &self.0
    }
}

impl Daemon {
    fn start() -> Daemon {
        Daemon(subidd_tests::Daemon::start("").expect("start subidd"))
    }

    fn log(&self) -> String {
        self.0.log_text()
    }

    /// Runs `subidctl --socket <ours> ARGS`.
    fn ctl(&self, args: &[&str]) -> Run {
        let mut all = vec!["--socket", self.socket.to_str().expect("utf-8 socket path")];
        all.extend_from_slice(args);
        ctl(&all)
    }
}

/// What one `subidctl` run did.
#[derive(Debug)]
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Run {
    fn ok(self) -> Run {
        assert_eq!(self.code, Some(0), "subidctl failed: {self:?}");
        self
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {self:?}"))
    }
}

fn ctl(args: &[&str]) -> Run {
    ctl_with(args, &[])
}

fn ctl_with(args: &[&str], env: &[(&str, &str)]) -> Run {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_subidctl"));
    cmd.args(args)
        .env_remove("SUBIDD_SOCKET")
        .stdin(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let Output {
        status,
        stdout,
        stderr,
    } = cmd.output().expect("run subidctl");
    Run {
        code: status.code(),
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
    }
}

/// The whitespace-split cells of the table row whose first cell is `first`.
fn row<'a>(table: &'a str, first: &str) -> Option<Vec<&'a str>> {
    table
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|cells| cells.first() == Some(&first))
}

#[test]
fn lease_round_trip_in_tables() {
    let daemon = Daemon::start();
    let put = daemon
        .ctl(&["lease", "put", "web-1", "--label", "team=a", "--ttl", "600"])
        .ok();
    assert!(put.stdout.contains("name:"), "{put:?}");
    assert!(
        put.stdout
            .contains(&format!("uid_map:       0 {BASE} {BLOCK}")),
        "{put:?}"
    );

    let get = daemon.ctl(&["lease", "get", "web-1"]).ok();
    assert_eq!(
        row(&get.stdout, "state:"),
        Some(vec!["state:", "active"]),
        "{get:?}"
    );
    assert_eq!(
        row(&get.stdout, "labels:"),
        Some(vec!["labels:", "team=a"]),
        "{get:?}"
    );

    let ls = daemon.ctl(&["lease", "ls"]).ok();
    let mut lines = ls.stdout.lines();
    let header: Vec<&str> = lines
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert_eq!(
        header,
        ["NAME", "STATE", "UID_BASE", "SIZE", "EXPIRES", "LABELS"],
        "{ls:?}"
    );
    let cells = row(&ls.stdout, "web-1").expect("web-1 listed");
    assert_eq!(cells[1], "active", "{ls:?}");
    assert_eq!(cells[2], BASE.to_string(), "{ls:?}");
    assert_eq!(cells[3], BLOCK.to_string(), "{ls:?}");
    assert!(
        cells[4].ends_with('Z'),
        "expiry is an RFC 3339 time: {ls:?}"
    );
    assert_eq!(cells[5], "team=a", "{ls:?}");
    // Columns are aligned: every line has STATE where the header has it.
    let at = ls.stdout.find("STATE").expect("STATE column");
    assert_eq!(
        ls.stdout.lines().nth(1).map(|l| &l[at..at + 6]),
        Some("active"),
        "{ls:?}"
    );

    let filtered = daemon.ctl(&["lease", "ls", "--label", "team=b"]).ok();
    assert!(row(&filtered.stdout, "web-1").is_none(), "{filtered:?}");

    let rm = daemon.ctl(&["lease", "rm", "web-1"]).ok();
    assert_eq!(rm.stdout, "lease web-1 released\n");
    let after = daemon.ctl(&["lease", "ls"]).ok();
    assert!(row(&after.stdout, "web-1").is_none(), "{after:?}");
    let all = daemon.ctl(&["lease", "ls", "--state", "all"]).ok();
    assert_eq!(
        row(&all.stdout, "web-1").map(|c| c[1]),
        Some("released"),
        "{all:?}"
    );
}

#[test]
fn lease_round_trip_in_json() {
    let daemon = Daemon::start();
    let put = daemon
        .ctl(&[
            "--json",
            "lease",
            "put",
            "db",
            "--size",
            &(2 * BLOCK).to_string(),
            "--label",
            "team=b",
            "--rlimit",
            "nofile=64:128",
            "--namespace",
            "net",
        ])
        .ok();
    let lease = put.json();
    assert_eq!(lease["name"], "db");
    assert_eq!(lease["size"], 2 * BLOCK);
    assert_eq!(lease["labels"]["team"], "b");
    assert_eq!(lease["rlimits"]["nofile"], serde_json::json!([64, 128]));
    assert_eq!(lease["namespaces"], serde_json::json!(["net"]));

    // The same put again is idempotent.
    let again = daemon
        .ctl(&[
            "lease",
            "put",
            "db",
            "--json",
            "--size",
            &(2 * BLOCK).to_string(),
            "--label",
            "team=b",
            "--rlimit",
            "nofile=64:128",
            "--namespace",
            "net",
        ])
        .ok();
    assert_eq!(again.json(), lease);

    let get = daemon.ctl(&["lease", "get", "db", "--json"]).ok();
    assert_eq!(get.json(), lease, "get shows what put answered");

    let ls = daemon.ctl(&["--json", "lease", "ls"]).ok();
    assert_eq!(ls.json()["leases"][0]["name"], "db", "{ls:?}");

    let rm = daemon.ctl(&["--json", "lease", "rm", "db", "--purge"]).ok();
    assert_eq!(rm.stdout, "", "204 has no body to print");
    let all = daemon
        .ctl(&["--json", "lease", "ls", "--state", "all"])
        .ok();
    assert_eq!(all.json()["leases"][0]["state"], "released", "{all:?}");
    // Purged: the range is free at once, so the pool shows no quarantined block.
    let pool = daemon.ctl(&["--json", "pool"]).ok();
    assert_eq!(pool.json()["blocks"]["quarantined"], 0, "{pool:?}");
}

#[test]
fn idmap_lookup_pool_and_version() {
    let daemon = Daemon::start();
    daemon.ctl(&["lease", "put", "box"]).ok();
    let uid_map = daemon
        .ctl(&["lease", "idmap", "box", "--format", "uid_map"])
        .ok();
    assert_eq!(uid_map.stdout, format!("0 {BASE} {BLOCK}\n"));
    let podman = daemon
        .ctl(&["lease", "idmap", "box", "--format", "podman"])
        .ok();
    assert_eq!(
        podman.stdout,
        format!("--uidmap=0:{BASE}:{BLOCK} --gidmap=0:{BASE}:{BLOCK}\n")
    );
    let oci = daemon
        .ctl(&["lease", "idmap", "box", "--format", "oci"])
        .ok();
    assert_eq!(oci.json()["uidMappings"][0]["hostID"], BASE);
    let summary = daemon.ctl(&["lease", "idmap", "box"]).ok();
    assert!(
        summary
            .stdout
            .contains(&format!("subuid:  box:{BASE}:{BLOCK}")),
        "{summary:?}"
    );

    let lookup = daemon
        .ctl(&[
            "--json",
            "lease",
            "lookup",
            "--gid",
            &(BASE + 7).to_string(),
        ])
        .ok();
    let found = lookup.json();
    assert_eq!(found["lease"]["name"], "box");
    assert_eq!(found["inner_id"], 7);

    let pool = daemon.ctl(&["pool"]).ok();
    assert_eq!(
        row(&pool.stdout, "base:"),
        Some(vec!["base:", &BASE.to_string()]),
        "{pool:?}"
    );
    assert!(pool.stdout.contains("1 active"), "{pool:?}");

    let version = daemon.ctl(&["version", "--json"]).ok();
    let v = version.json();
    assert_eq!(v["client"], concat!("subidctl/", env!("CARGO_PKG_VERSION")));
    assert!(
        v["server"]
            .as_str()
            .is_some_and(|s| s.starts_with("subidd/")),
        "{version:?}"
    );
}

#[test]
fn socket_comes_from_the_environment() {
    let daemon = Daemon::start();
    let socket = daemon.socket.to_str().expect("utf-8");
    let run = ctl_with(&["lease", "ls"], &[("SUBIDD_SOCKET", socket)]).ok();
    assert!(run.stdout.starts_with("NAME"), "{run:?}");
}

#[test]
fn daemon_errors_exit_1_with_code_and_message() {
    let daemon = Daemon::start();
    daemon.ctl(&["lease", "put", "app"]).ok();
    // PUT of the same name with another size: 409. The daemon's code for PUT is
    // `lease_conflict` (`lease_exists` is POST /v1/leases's).
    let conflict = daemon.ctl(&["lease", "put", "app", "--size", &(2 * BLOCK).to_string()]);
    assert_eq!(conflict.code, Some(1), "{conflict:?}");
    assert!(
        conflict
            .stderr
            .starts_with("subidctl: lease_conflict: lease app exists"),
        "{conflict:?}"
    );
    assert_eq!(conflict.stdout, "", "{conflict:?}");

    let missing = daemon.ctl(&["lease", "get", "nope"]);
    assert_eq!(missing.code, Some(1), "{missing:?}");
    assert_eq!(missing.stderr, "subidctl: not_found: no lease named nope\n");

    let missing = daemon.ctl(&["--json", "logs", "0123456789abcdef"]);
    assert_eq!(missing.code, Some(1), "{missing:?}");
    let error = json_error(&missing);
    assert_eq!(error["code"], "not_found", "{missing:?}");
    assert_eq!(missing.stdout, "");
}

/// The one JSON object a `--json` run printed on stderr for its error.
fn json_error(run: &Run) -> Value {
    assert_eq!(
        run.stderr.lines().count(),
        1,
        "one line of JSON on stderr: {run:?}"
    );
    let value: Value = serde_json::from_str(&run.stderr)
        .unwrap_or_else(|e| panic!("stderr is not JSON ({e}): {run:?}"));
    assert!(
        value["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{value}"
    );
    value
}

#[test]
fn with_json_every_error_is_json_on_stderr() {
    let daemon = Daemon::start();
    let missing = daemon.ctl(&["--json", "lease", "get", "nope"]);
    assert_eq!(missing.code, Some(1));
    assert_eq!(json_error(&missing)["code"], "not_found");

    let unreachable = ctl(&["--json", "--socket", "/nonexistent/s.sock", "lease", "ls"]);
    assert_eq!(unreachable.code, Some(1));
    let error = json_error(&unreachable);
    assert_eq!(error["code"], "cannot_connect");
    assert!(
        error["message"]
            .as_str()
            .is_some_and(|m| m.contains("/nonexistent/s.sock")),
        "{error}"
    );

    for args in [
        &["lease", "put"][..],
        &["run", "box", "id"],
        &["lease", "put", "x", "--ttl", "soon"],
    ] {
        let run = daemon.ctl(&[&["--json"], args].concat());
        assert_eq!(run.code, Some(2), "{args:?}: {run:?}");
        assert_eq!(json_error(&run)["code"], "usage", "{args:?}");
    }
    let register = daemon.ctl(&["pool", "register", "--json"]);
    assert_eq!(register.code, Some(2));
    assert_eq!(json_error(&register)["code"], "usage");
}

#[test]
fn ttl_takes_durations_as_the_daemon_writes_them() {
    let daemon = Daemon::start();
    for (i, (ttl, seconds)) in [("1h", 3600), ("90s", 90), ("2d", 172_800), ("600", 600)]
        .into_iter()
        .enumerate()
    {
        let name = format!("t{i}");
        let put = daemon
            .ctl(&["--json", "lease", "put", &name, "--ttl", ttl])
            .ok();
        assert_eq!(put.json()["ttl_seconds"], seconds, "--ttl {ttl}");
    }
    let bad = daemon.ctl(&["lease", "put", "x", "--ttl", "soon"]);
    assert_eq!(bad.code, Some(2), "{bad:?}");
    assert!(
        bad.stderr.contains("90s") && bad.stderr.contains("seconds"),
        "says what a duration looks like: {bad:?}"
    );
}

#[test]
fn run_asks_for_numeric_ids_and_hints_at_the_dashes() {
    let named = ctl(&[
        "--socket",
        "/nonexistent",
        "run",
        "box",
        "-u",
        "root",
        "--",
        "id",
    ]);
    assert_eq!(named.code, Some(2), "{named:?}");
    assert!(
        named
            .stderr
            .contains("numeric uid inside the lease's user namespace")
            && named.stderr.contains("/etc/passwd")
            && !named.stderr.contains("invalid digit"),
        "says a number is needed and why: {named:?}"
    );
    let group = ctl(&[
        "--socket",
        "/nonexistent",
        "run",
        "box",
        "-g",
        "mysql",
        "--",
        "id",
    ]);
    assert_eq!(group.code, Some(2), "{group:?}");
    assert!(group.stderr.contains("numeric gid"), "{group:?}");

    for args in [
        &["run", "box", "id"][..],
        &["run", "box"],
        &["run", "box", "ls", "-l"],
    ] {
        let run = ctl(&[&["--socket", "/nonexistent"], args].concat());
        assert_eq!(run.code, Some(2), "{args:?}: {run:?}");
        assert!(
            run.stderr.starts_with("error: ")
                && run
                    .stderr
                    .contains("tip: the program and its arguments go after `--`")
                && run.stderr.contains("-- PROGRAM"),
            "{args:?}: {run:?}"
        );
    }
    // Other usage errors get no such tip.
    let other = ctl(&["--socket", "/nonexistent", "lease", "put"]);
    assert!(!other.stderr.contains("tip:"), "{other:?}");
}

#[test]
fn output_into_a_closed_pipe_is_not_a_panic() {
    // `subidctl generate completions bash | head -1`: the reader is gone before the writer
    // writes (its end is closed before the start), so every write fails with EPIPE.
    for args in [
        &["generate", "completions", "bash"][..],
        &["--help"],
        &["--socket", "/nonexistent", "--version"],
    ] {
        let (reader, writer) = std::io::pipe().expect("pipe");
        drop(reader);
        let output = Command::new(env!("CARGO_BIN_EXE_subidctl"))
            .args(args)
            .stdin(Stdio::null())
            .stdout(writer)
            .stderr(Stdio::piped())
            .output()
            .expect("run subidctl");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            !stderr.contains("panicked") && output.status.code() != Some(101),
            "{args:?}: {:?} {stderr}",
            output.status
        );
    }
    let (reader, writer) = std::io::pipe().expect("pipe");
    drop(reader);
    let completions = Command::new(env!("CARGO_BIN_EXE_subidctl"))
        .args(["generate", "completions", "bash"])
        .stdout(writer)
        .status()
        .expect("run subidctl");
    assert_eq!(
        completions.code(),
        Some(0),
        "a reader that left is not an error"
    );
}

#[test]
#[cfg_attr(not(subidd_root), ignore = "needs root (runs subidctl as another uid)")]
fn a_user_outside_the_socket_group_is_told_how_to_get_in() {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    let daemon = Daemon::start();
    // Let uid 4242 reach the socket's directory; the socket itself stays 0660 root:root (the
    // test daemon's group, subidd, does not exist here).
    for dir in [
        daemon.dir.path().to_path_buf(),
        daemon.dir.path().join("run"),
    ] {
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    let output = Command::new(env!("CARGO_BIN_EXE_subidctl"))
        .args([
            "--socket",
            daemon.socket.to_str().expect("utf-8"),
            "lease",
            "ls",
        ])
        .uid(4242)
        .gid(4242)
        .stdin(Stdio::null())
        .output()
        .expect("run subidctl as 4242");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    for part in [
        "Permission denied",
        "groupadd --system subidd",
        "usermod -aG subidd USER",
        "restart subidd",
        "allowed_uids",
    ] {
        assert!(stderr.contains(part), "{part}: {stderr}");
    }
}

#[test]
fn usage_errors_exit_2() {
    for args in [
        &["lease", "put"][..],
        &["lease", "bogus"],
        &["lease", "lookup"],
        &["lease", "lookup", "--uid", "1", "--gid", "1"],
        &["lease", "idmap", "x", "--format", "yaml"],
        &["lease", "put", "x", "--label", "novalue"],
        &["lease", "put", "x", "--rlimit", "nofile=1"],
        &["lease", "put", "x", "--namespace", "pid"],
        &["run", "box"],
        &["lease", "ls", "--state", "gone"],
    ] {
        let run = ctl(&[&["--socket", "/nonexistent/subidd.sock"], args].concat());
        assert_eq!(run.code, Some(2), "{args:?}: {run:?}");
        assert!(run.stderr.starts_with("error: "), "{args:?}: {run:?}");
    }
    assert_eq!(ctl(&["--help"]).code, Some(0));
}

#[test]
fn a_missing_socket_exits_1_and_says_what_to_check() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("none.sock");
    let socket = socket.to_str().expect("utf-8");
    let run = ctl(&["--socket", socket, "lease", "ls"]);
    assert_eq!(run.code, Some(1), "{run:?}");
    assert_eq!(run.stdout, "");
    assert!(
        run.stderr
            .starts_with(&format!("subidctl: cannot connect to subidd at {socket}: ")),
        "{run:?}"
    );
    assert!(run.stderr.contains("is subidd running"), "{run:?}");
    assert!(run.stderr.contains("SUBIDD_SOCKET"), "{run:?}");
}

#[test]
fn generate_writes_a_man_page_per_command_and_completions() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("man1");
    ctl(&["generate", "man", out.to_str().expect("utf-8")]).ok();
    let mut pages: Vec<String> = std::fs::read_dir(&out)
        .expect("read man dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    pages.sort();
    for name in [
        "subidctl",
        "lease",
        "lease-put",
        "lease-get",
        "lease-ls",
        "lease-rm",
        "lease-renew",
        "lease-idmap",
        "lease-lookup",
        "run",
        "ps",
        "wait",
        "kill",
        "logs",
        "pool",
        "version",
    ] {
        let page = if name == "subidctl" {
            "subidctl.1".to_string()
        } else {
            format!("subidctl-{name}.1")
        };
        assert!(pages.contains(&page), "{page} missing from {pages:?}");
    }
    assert!(
        pages.contains(&"subidctl-generate.1".to_string()),
        "generate is a visible command with a page: {pages:?}"
    );
    let help = ctl(&["--help"]).ok();
    assert!(
        help.stdout.contains("generate"),
        "--help lists it: {help:?}"
    );
    let put = std::fs::read_to_string(out.join("subidctl-lease-put.1")).expect("read page");
    assert!(put.contains(".TH"), "a roff page: {put}");
    assert!(put.contains("rlimit"), "documents the flags: {put}");

    for shell in ["bash", "zsh", "fish"] {
        let run = ctl(&["generate", "completions", shell]).ok();
        assert!(run.stdout.contains("subidctl"), "{shell}: {run:?}");
        assert!(run.stdout.contains("lookup"), "{shell} knows subcommands");
    }
}

#[test]
#[cfg_attr(not(subidd_root), ignore = "needs root")]
fn run_wait_prints_output_and_exits_with_the_process_status() {
    let daemon = Daemon::start();
    daemon.ctl(&["lease", "put", "box"]).ok();
    let run = daemon.ctl(&[
        "run",
        "box",
        "--wait",
        "--env",
        "WHO=hi",
        "--",
        "/bin/sh",
        "-c",
        "echo $WHO; echo oops >&2; exit 3",
    ]);
    assert_eq!(run.code, Some(3), "{run:?}\n{}", daemon.log());
    assert_eq!(run.stdout, "hi\n");
    assert_eq!(run.stderr, "oops\n");

    // With --json: the process and what it wrote, in one object; still its exit status.
    let json = daemon.ctl(&[
        "--json",
        "run",
        "box",
        "--wait",
        "--",
        "/bin/sh",
        "-c",
        "echo out; echo err >&2; exit 4",
    ]);
    assert_eq!(json.code, Some(4), "{json:?}");
    let process = json.json();
    assert_eq!(process["stdout"], "out\n", "{process}");
    assert_eq!(process["stderr"], "err\n", "{process}");
    assert_eq!(process["exit_code"], 4, "{process}");
    assert_eq!(process["state"], "exited", "{process}");
    assert_eq!(json.stderr, "", "nothing else on stderr: {json:?}");

    let killed = daemon.ctl(&[
        "run",
        "box",
        "--wait",
        "--",
        "/bin/sh",
        "-c",
        "kill -KILL $$",
    ]);
    assert_eq!(killed.code, Some(128 + 9), "{killed:?}");
}

#[test]
#[cfg_attr(not(subidd_root), ignore = "needs root")]
fn run_ps_kill_wait_logs() {
    let daemon = Daemon::start();
    daemon.ctl(&["lease", "put", "box"]).ok();
    let started = daemon
        .ctl(&[
            "run",
            "box",
            "--",
            "/bin/sh",
            "-c",
            "echo started; exec sleep 60",
        ])
        .ok();
    let id = started.stdout.trim().to_string();
    assert_eq!(id.len(), 16, "run prints the process id: {started:?}");

    let ps = daemon.ctl(&["ps", "box"]).ok();
    assert_eq!(
        row(&ps.stdout, &id).map(|c| c[2]),
        Some("running"),
        "{ps:?}"
    );

    // Removing a lease with a running process is refused (exit 1 with the daemon's code).
    let busy = daemon.ctl(&["lease", "rm", "box"]);
    assert_eq!(busy.code, Some(1), "{busy:?}");
    assert!(
        busy.stderr.starts_with("subidctl: lease_busy: "),
        "{busy:?}"
    );

    daemon.ctl(&["kill", &id, "--signal", "KILL"]).ok();
    let waited = daemon.ctl(&["--json", "wait", &id, "--timeout", "10"]).ok();
    let process = waited.json();
    assert_eq!(process["state"], "exited", "{waited:?}");
    assert_eq!(process["signal"], 9, "{waited:?}");

    let logs = daemon.ctl(&["logs", &id]).ok();
    assert_eq!(logs.stdout, "started\n");
    let errs = daemon.ctl(&["logs", &id, "--stream", "stderr"]).ok();
    assert_eq!(errs.stdout, "");
    daemon.ctl(&["lease", "rm", "box"]).ok();
}

#[test]
fn events_print_the_history_and_pool_register_points_at_subidd() {
    let daemon = Daemon::start();
    daemon.ctl(&["lease", "put", "ev-1"]).ok();
    daemon.ctl(&["lease", "rm", "ev-1"]).ok();
    let json = daemon
        .ctl(&["--json", "events", "--since", "0", "--no-follow"])
        .ok();
    let types: Vec<String> = json
        .stdout
        .lines()
        .map(|l| {
            let event: Value = serde_json::from_str(l).expect("a JSON line");
            event["type"].as_str().expect("type").to_string()
        })
        .collect();
    assert_eq!(types, ["lease.created", "lease.released"], "{json:?}");
    let table = daemon
        .ctl(&["events", "--since", "0", "--no-follow", "--lease", "ev-1"])
        .ok();
    assert_eq!(table.stdout.lines().count(), 2, "{table:?}");
    assert!(table.stdout.contains("lease.created"), "{table:?}");
    let bad = daemon.ctl(&["events", "--lease", "no/such"]);
    assert_eq!(bad.code, Some(1), "{bad:?}");
    assert!(bad.stderr.contains("invalid_request"), "{bad:?}");

    let register = daemon.ctl(&["pool", "register"]);
    assert_eq!(register.code, Some(2), "{register:?}");
    assert!(
        register.stderr.contains("subidd --register"),
        "{register:?}"
    );
}

/// `lease ls` follows the daemon's pages (1000 leases each) to the end: every lease is listed
/// once, in order, in both forms.
#[test]
fn lease_ls_follows_every_page() {
    const LEASES: usize = 1003;
    let daemon = Daemon::start();
    let client = daemon.client();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        for i in 0..LEASES {
            let reply = client
                .put(&format!("/v1/leases/p-{i:04}"), None)
                .await
                .expect("PUT");
            assert_eq!(reply.status.as_u16(), 201, "{}", reply.text());
        }
    });
    let listed = daemon.ctl(&["--json", "lease", "ls"]).ok().json();
    let names: Vec<String> = listed["leases"]
        .as_array()
        .expect("leases")
        .iter()
        .map(|l| l["name"].as_str().unwrap_or_default().to_string())
        .collect();
    let expected: Vec<String> = (0..LEASES).map(|i| format!("p-{i:04}")).collect();
    assert_eq!(names, expected);
    let table = daemon.ctl(&["lease", "ls"]).ok();
    assert_eq!(
        table.stdout.lines().count(),
        LEASES + 1,
        "a header and one row each"
    );
}
