//! Storage failures: a full disk answers `storage_full` and heals once space is freed; a
//! read-only, immutable or corrupt database is refused at start, by name, and left untouched.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use hyper::StatusCode;
use sqlx::sqlite::SqliteConnectOptions;
use sqlx::{ConnectOptions, Connection};
use subidd_tests::Daemon;

use crate::util::{assert_error, assert_status, pool_config};

/// A small tmpfs mounted on a temp dir for the test's life; unmounted (lazily, so a process
/// still holding it cannot keep it) on drop, also when the test fails.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Tmpfs {
        let dir = tempfile::tempdir().expect("tempdir");
        let status = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(dir.path())
            .status()
            .expect("run mount");
        assert!(status.success(), "mount tmpfs on {}", dir.path().display());
        Tmpfs { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn remount(&self, options: &str) {
        let status = Command::new("mount")
            .args(["-o", &format!("remount,{options}")])
            .arg(self.path())
            .status()
            .expect("run mount");
        assert!(
            status.success(),
            "remount {options} {}",
            self.path().display()
        );
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.path()).status();
    }
}

/// Writes zeros to `path` until the file system is full; returns the bytes written.
fn fill(path: &Path) -> u64 {
    let mut file = std::fs::File::create(path).expect("create filler");
    let chunk = vec![0u8; 16 * 1024];
    let mut written = 0u64;
    loop {
        match file.write(&chunk) {
            Ok(0) => break,
            Ok(n) => written += n as u64,
            Err(e) => {
                assert_eq!(
                    e.raw_os_error(),
                    Some(libc::ENOSPC),
                    "filling stops at ENOSPC: {e}"
                );
                break;
            }
        }
    }
    // Small writes may still fit in the last partial page: top it off byte by byte.
    while file.write(&[0u8]).is_ok_and(|n| n == 1) {
        written += 1;
    }
    let _ = file.sync_all();
    written
}

/// The names of active leases in the database, read with a connection of our own.
async fn active_names(database: &Path) -> Vec<String> {
    let mut conn = SqliteConnectOptions::new()
        .filename(database)
        .read_only(true)
        .connect()
        .await
        .expect("open the database read-only");
    sqlx::query_scalar::<_, String>("SELECT name FROM lease WHERE state = 'active' ORDER BY name")
        .fetch_all(&mut conn)
        .await
        .expect("query leases")
}

fn running(daemon: &Daemon) -> bool {
    let pid = daemon.pid().expect("daemon pid");
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z "))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(not(subidd_root), ignore = "needs root")]
async fn full_disk_answers_storage_full_keeps_reading_and_heals() {
    let fs = Tmpfs::mount("3m");
    let state = fs.path().to_str().expect("utf-8 path").to_string();
    let daemon = Daemon::start_with(&pool_config(4000, 0), &["--state-dir", &state], &[])
        .expect("start daemon on the tmpfs");
    let client = daemon.client();
    for name in ["before-1", "before-2"] {
        let reply = client
            .put(&format!("/v1/leases/{name}"), None)
            .await
            .expect("PUT");
        assert_status(&reply, StatusCode::CREATED, name);
    }
    let filler = fs.path().join("filler");
    let filled = fill(&filler);
    // The WAL may still have room from earlier commits: create until the disk says no.
    let mut failed = Vec::new();
    let mut created_while_full = Vec::new();
    let mut full = 0;
    for i in 0..3000 {
        let name = format!("full-{i}");
        let reply = client
            .put(&format!("/v1/leases/{name}"), Some(r#"{"labels":{"pad":"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"}}"#))
            .await
            .expect("PUT while full");
        match reply.status {
            StatusCode::CREATED => created_while_full.push(name),
            StatusCode::INSUFFICIENT_STORAGE => {
                assert_error(
                    &reply,
                    StatusCode::INSUFFICIENT_STORAGE,
                    "storage_full",
                    "PUT on a full disk",
                );
                let message = reply.json()["message"].as_str().unwrap_or("").to_string();
                assert!(
                    message.contains("full"),
                    "the message says the disk is full: {message}"
                );
                full += 1;
                failed.push(name);
            }
            StatusCode::SERVICE_UNAVAILABLE => {
                assert_error(
                    &reply,
                    StatusCode::SERVICE_UNAVAILABLE,
                    "unavailable",
                    "PUT on a full disk",
                );
                failed.push(name);
            }
            other => panic!("PUT {name} on a full disk: {other} {}", reply.text()),
        }
        if failed.len() >= 5 {
            break;
        }
    }
    assert!(
        failed.len() >= 5,
        "creates kept succeeding on a full disk ({} created after writing {filled} filler bytes)",
        created_while_full.len()
    );
    assert_eq!(
        full,
        failed.len(),
        "every refusal on a full disk says storage_full"
    );
    // Reads keep working and the daemon stays up.
    let ping = client.get("/_ping").await.expect("ping");
    assert_status(&ping, StatusCode::OK, "/_ping on a full disk");
    let one = client.get("/v1/leases/before-1").await.expect("GET");
    assert_status(&one, StatusCode::OK, "GET lease on a full disk");
    let list = client.get("/v1/leases").await.expect("list");
    assert_status(&list, StatusCode::OK, "list on a full disk");
    let pool = client.get("/v1/pool").await.expect("pool");
    assert_status(&pool, StatusCode::OK, "pool on a full disk");
    for name in &failed {
        let reply = client
            .get(&format!("/v1/leases/{name}"))
            .await
            .expect("GET");
        assert_status(
            &reply,
            StatusCode::NOT_FOUND,
            "a refused create left nothing",
        );
    }
    // A delete works on a full disk: the release reserve's space lets it through.
    let delete = client.delete("/v1/leases/before-2").await.expect("DELETE");
    assert_status(&delete, StatusCode::NO_CONTENT, "DELETE on a full disk");
    let deleted = true;
    // A spawn on a full disk: its log files cannot grow and its row may not fit. Either it is
    // recorded and runs, or it is refused with nothing started; the daemon carries on.
    let spawn = client
        .post(
            "/v1/leases/before-1/processes?wait=true&timeout_seconds=10",
            Some(r#"{"argv":["/bin/sh","-c","yes output | head -c 200000; echo done >&2"]}"#),
        )
        .await
        .expect("spawn on a full disk");
    assert!(
        spawn.status == StatusCode::CREATED
            || spawn.status == StatusCode::INSUFFICIENT_STORAGE
            || spawn.status == StatusCode::SERVICE_UNAVAILABLE,
        "spawn on a full disk: {} {}",
        spawn.status,
        spawn.text()
    );
    let spawned = spawn.status == StatusCode::CREATED;
    assert!(running(&daemon), "the daemon is still up on a full disk");

    std::fs::remove_file(&filler).expect("free the space");
    let mut healed = None;
    let mut last = String::new();
    for _ in 0..50 {
        let reply = client.put("/v1/leases/after", None).await.expect("PUT");
        if reply.status == StatusCode::CREATED {
            healed = Some(reply);
            break;
        }
        last = format!("{} {}", reply.status, reply.text());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let healed = healed.unwrap_or_else(|| {
        panic!(
            "allocation works again once space is freed; last answer {last}; log:\n{}",
            daemon.log_text()
        )
    });
    assert_status(&healed, StatusCode::CREATED, "PUT after freeing space");
    let retried = client
        .put(&format!("/v1/leases/{}", failed[0]), None)
        .await
        .expect("PUT");
    assert_status(
        &retried,
        StatusCode::CREATED,
        "a refused name can be created now",
    );
    if !deleted {
        let delete = client.delete("/v1/leases/before-2").await.expect("DELETE");
        assert_status(
            &delete,
            StatusCode::NO_CONTENT,
            "DELETE after freeing space",
        );
    }

    // Nothing half-created: the database holds exactly the acknowledged leases.
    let mut expected: Vec<String> = ["before-1", "after", failed[0].as_str()]
        .iter()
        .map(|s| s.to_string())
        .chain(created_while_full.iter().cloned())
        .collect();
    expected.sort();
    let database = fs.path().join("subidd.db");
    assert_eq!(
        active_names(&database).await,
        expected,
        "active leases in the database"
    );
    let listed = crate::util::list_names(&client, "/v1/leases").await;
    assert_eq!(listed, expected, "active leases in the API");
    println!(
        "full disk: {} creates refused with storage_full after {filled} filler bytes ({} still fit), \
         spawn answered {}, daemon up, healed after freeing space",
        failed.len(),
        created_while_full.len(),
        if spawned { "201" } else { "507/503" }
    );
    drop(daemon);
}

/// The operator can always evict a tenant: a forced release of a lease whose process runs
/// answers 204 on a full state directory (the release reserve's space takes the write), the
/// process is gone, and the daemon makes its reserve again once there is room.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(not(subidd_root), ignore = "needs root")]
async fn a_forced_release_works_on_a_full_disk() {
    let fs = Tmpfs::mount("4m");
    let state = fs.path().to_str().expect("utf-8 path").to_string();
    let daemon = Daemon::start_with(
        &format!("kill_grace_ms = 200\n{}", pool_config(4000, 0)),
        &["--state-dir", &state],
        &[],
    )
    .expect("start daemon on the tmpfs");
    let client = daemon.client();
    let reserve = fs.path().join("release-reserve");
    assert!(reserve.exists(), "the reserve is made at start");
    let lease = client.put("/v1/leases/hog", None).await.expect("PUT");
    assert_status(&lease, StatusCode::CREATED, "PUT hog");
    let spawned = client
        .post(
            "/v1/leases/hog/processes",
            Some(r#"{"argv":["/bin/sleep","1000"]}"#),
        )
        .await
        .expect("spawn");
    assert_status(&spawned, StatusCode::CREATED, "spawn in hog");
    let pid = spawned.json()["pid"].as_i64().expect("pid");
    let filler = fs.path().join("filler");
    fill(&filler);
    // Writes fail now (until the WAL's slack is used up).
    let mut refused = false;
    for i in 0..3000 {
        let reply = client
            .put(&format!("/v1/leases/full-{i}"), None)
            .await
            .expect("PUT");
        if reply.status != StatusCode::CREATED {
            assert_error(
                &reply,
                StatusCode::INSUFFICIENT_STORAGE,
                "storage_full",
                "PUT on a full disk",
            );
            refused = true;
            break;
        }
    }
    assert!(refused, "the disk filled up");
    let evicted = client
        .delete("/v1/leases/hog?force=true")
        .await
        .expect("DELETE");
    assert_status(
        &evicted,
        StatusCode::NO_CONTENT,
        "forced release on a full disk",
    );
    assert!(crate::util::gone(pid).await, "the tenant's process is gone");
    let gone = client.get("/v1/leases/hog").await.expect("GET").json();
    assert_eq!(gone["state"], "released", "{gone}");
    assert!(
        daemon.log_text().contains("release reserve"),
        "the log says the reserve was used"
    );
    // Room again: the next release makes the reserve anew.
    std::fs::remove_file(&filler).expect("free the space");
    let again = client.put("/v1/leases/again", None).await.expect("PUT");
    assert_status(&again, StatusCode::CREATED, "PUT after freeing space");
    let released = client.delete("/v1/leases/again").await.expect("DELETE");
    assert_status(&released, StatusCode::NO_CONTENT, "release");
    assert!(reserve.exists(), "the reserve is made again");
}

/// A process that ends while the disk refuses to record it is answered as ended (from memory)
/// by `wait` and `GET` for as long as that lasts, never as `running`; its row is written once
/// the disk has room again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(not(subidd_root), ignore = "needs root")]
async fn an_exit_the_disk_refuses_is_still_known_and_recorded_later() {
    let fs = Tmpfs::mount("4m");
    let state = fs.path().to_str().expect("utf-8 path").to_string();
    let daemon = Daemon::start_with(&pool_config(4000, 0), &["--state-dir", &state], &[])
        .expect("start daemon on the tmpfs");
    let client = daemon.client();
    let lease = client.put("/v1/leases/late", None).await.expect("PUT");
    assert_status(&lease, StatusCode::CREATED, "PUT late");
    let spawned = client
        .post(
            "/v1/leases/late/processes",
            Some(r#"{"argv":["/bin/sleep","3"]}"#),
        )
        .await
        .expect("spawn");
    assert_status(&spawned, StatusCode::CREATED, "spawn");
    let id = spawned.json()["id"].as_str().expect("id").to_string();
    let filler = fs.path().join("filler");
    fill(&filler);
    // Use up what the write-ahead log still has room for.
    for i in 0..3000 {
        let reply = client
            .put(&format!("/v1/leases/pad-{i}"), None)
            .await
            .expect("PUT");
        if reply.status != StatusCode::CREATED {
            break;
        }
    }
    let done = client
        .post(&format!("/v1/processes/{id}/wait?timeout_seconds=20"), None)
        .await
        .expect("wait")
        .json();
    assert_eq!(done["state"], "exited", "wait answers the end: {done}");
    // Longer than the five tries an older version made before it gave up.
    tokio::time::sleep(Duration::from_secs(8)).await;
    let got = client
        .get(&format!("/v1/processes/{id}"))
        .await
        .expect("GET")
        .json();
    assert_eq!(got["state"], "exited", "GET answers the end too: {got}");
    assert_eq!(got["exit_code"], 0, "{got}");
    assert!(
        daemon.log_text().contains("cannot record exit status"),
        "the disk did refuse the exit: {}",
        daemon.log_text()
    );
    std::fs::remove_file(&filler).expect("free the space");
    let database = fs.path().join("subidd.db");
    let deadline = std::time::Instant::now() + Duration::from_secs(45);
    loop {
        let mut conn = SqliteConnectOptions::new()
            .filename(&database)
            .read_only(true)
            .connect()
            .await
            .expect("open the database read-only");
        let stored: String = sqlx::query_scalar("SELECT state FROM process WHERE id = ?")
            .bind(&id)
            .fetch_one(&mut conn)
            .await
            .expect("the process row");
        if stored == "exited" {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the exit was never written: {stored}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// A stopped daemon's state on a tmpfs, holding lease `kept`.
async fn stopped_state(fs: &Tmpfs) -> Daemon {
    // (The WAL may still hold the last commits: SQLite folds it in at the next open.)
    let state = fs.path().to_str().expect("utf-8 path").to_string();
    let mut daemon =
        Daemon::start_with("", &["--state-dir", &state], &[]).expect("start daemon on the tmpfs");
    let reply = daemon
        .client()
        .put("/v1/leases/kept", None)
        .await
        .expect("PUT");
    assert_status(&reply, StatusCode::CREATED, "PUT kept");
    assert_eq!(daemon.stop().expect("stop"), Some(0), "clean stop");
    daemon
}

/// Runs the binary on `daemon`'s config and `state` dir expecting a refusal; returns stderr.
fn refused(daemon: &Daemon, state: &Path) -> String {
    let output = Command::new(subidd_tests::subidd_bin().expect("binary"))
        .arg("--config")
        .arg(&daemon.config)
        .arg("--state-dir")
        .arg(state)
        .env_remove("SUBIDD_CONFIG")
        .output()
        .expect("run subidd");
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(
        !output.status.success() && output.status.code().is_some(),
        "subidd must exit non-zero: {:?} {stderr}",
        output.status
    );
    stderr
}

/// Every file in `dir` with its bytes.
fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut files: Vec<(PathBuf, Vec<u8>)> = std::fs::read_dir(dir)
        .expect("read dir")
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .map(|e| (e.path(), std::fs::read(e.path()).expect("read file")))
        .collect();
    files.sort();
    files
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(not(subidd_root), ignore = "needs root")]
async fn read_only_or_immutable_database_is_refused_by_name() {
    let fs = Tmpfs::mount("16m");
    let daemon = stopped_state(&fs).await;
    let database = fs.path().join("subidd.db");

    // A read-only file system.
    fs.remount("ro");
    let before = snapshot(fs.path());
    let stderr = refused(&daemon, fs.path());
    assert!(
        stderr.contains(&database.display().to_string()) && stderr.contains("read-only"),
        "the refusal names the database and says it is read-only: {stderr}"
    );
    assert_eq!(snapshot(fs.path()), before, "nothing on the disk changed");
    fs.remount("rw");

    // An immutable file (chattr +i).
    let status = Command::new("chattr")
        .arg("+i")
        .arg(&database)
        .status()
        .expect("run chattr");
    assert!(status.success(), "chattr +i {}", database.display());
    let before = snapshot(fs.path());
    let stderr = refused(&daemon, fs.path());
    let _ = Command::new("chattr").arg("-i").arg(&database).status();
    assert!(
        stderr.contains(&database.display().to_string()),
        "the refusal names the database: {stderr}"
    );
    assert_eq!(
        snapshot(fs.path()),
        before,
        "the immutable database is untouched"
    );

    // The original settings start again, and the lease is there.
    let mut daemon = daemon;
    let state = fs.path().to_str().expect("utf-8").to_string();
    drop(std::mem::replace(
        &mut daemon,
        Daemon::start_with("", &["--state-dir", &state], &[]).expect("start again"),
    ));
    let kept = daemon.client().get("/v1/leases/kept").await.expect("GET");
    assert_status(&kept, StatusCode::OK, "kept survives the refused starts");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(not(subidd_root), ignore = "needs root")]
async fn truncated_database_is_refused_and_left_as_it_was() {
    let fs = Tmpfs::mount("16m");
    let daemon = stopped_state(&fs).await;
    let database = fs.path().join("subidd.db");
    // Fold the WAL into the file, so that the file alone holds everything.
    let mut conn = SqliteConnectOptions::new()
        .filename(&database)
        .connect()
        .await
        .expect("open the database");
    sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
        .execute(&mut conn)
        .await
        .expect("checkpoint");
    conn.close().await.expect("close");
    let bytes = std::fs::read(&database).expect("read database");
    assert!(
        bytes.len() > 8192,
        "database has some pages: {}",
        bytes.len()
    );
    for side in ["subidd.db-wal", "subidd.db-shm"] {
        let _ = std::fs::remove_file(fs.path().join(side));
    }
    for cut in [bytes.len() / 2, 100] {
        std::fs::write(&database, &bytes[..cut]).expect("truncate database");
        let before = snapshot(fs.path());
        let stderr = refused(&daemon, fs.path());
        assert!(
            stderr.contains(&database.display().to_string())
                && (stderr.contains("malformed") || stderr.contains("not a database")),
            "the refusal names the database and says it is damaged ({cut} bytes): {stderr}"
        );
        assert!(
            stderr.contains("never recreates"),
            "the refusal says it is not recreated: {stderr}"
        );
        assert_eq!(
            snapshot(fs.path()),
            before,
            "the truncated database ({cut} bytes) is left as it was"
        );
    }
}
