//! Tests of what only the SQLite file does (damaged files, process rows, old schemas), on a real
//! file in a temp dir. What both back ends do is tested by `tests/suite.rs` against each.

use std::collections::BTreeMap;
use std::str::FromStr;

use sqlx::Connection;
use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection};

use super::*;

const BLOCK: u32 = 65536;
const BASE: u32 = 0x7000_0000;

fn new_lease(name: &str, base: u32, size: u32, at: i64) -> NewLease {
    NewLease {
        name: name.into(),
        uid_base: base,
        gid_base: base,
        size,
        labels: BTreeMap::from([("app".to_string(), name.to_string())]),
        ttl_seconds: None,
        created_at: at,
        expires_at: None,
        created_by: Some(0),
        rlimits: BTreeMap::new(),
        namespaces: Vec::new(),
        pids_max: None,
        max_processes: None,
    }
}

async fn fresh() -> (tempfile::TempDir, Store, Writer) {
    let dir = tempfile::tempdir().expect("tempdir");
    let (store, writer) = open(&dir.path().join("subidd.db")).await.expect("open");
    (dir, store, writer)
}

#[tokio::test]
async fn a_foreign_file_is_refused_not_recreated() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("subidd.db");
    std::fs::write(&path, vec![0x42u8; 8192]).expect("write junk");
    let err = open(&path).await.expect_err("junk is not a database");
    assert!(err.is_damaged(), "{err:?}");
    assert!(err.to_string().contains("subidd.db"), "{err}");
    assert_eq!(
        std::fs::read(&path).expect("still there"),
        vec![0x42u8; 8192],
        "never recreated"
    );
}

#[tokio::test]
async fn process_rows_go_through_their_own_connection_and_leases_stay_full() {
    let (dir, store, mut writer) = fresh().await;
    let path = dir.path().join("subidd.db");
    let rows = ProcessWriter::open(&path).expect("process writer");
    let mut tx = writer.begin().await.expect("begin");
    let lease = tx
        .insert_lease(&new_lease("rows", BASE, BLOCK, 1_000), BLOCK)
        .await
        .expect("insert");
    tx.commit().await.expect("commit");
    rows.insert(&process("p1", &lease, 1_500), false)
        .expect("insert row");
    let got = store.get_process("p1").await.expect("get").expect("there");
    assert_eq!(got, process("p1", &lease, 1_500), "readers see it at once");
    rows.finish("p1", ProcessState::Exited, Some(3), None, 1_600, false)
        .expect("finish");
    let got = store.get_process("p1").await.expect("get").expect("there");
    assert_eq!(
        (got.state, got.exit_code, got.ended_at),
        (ProcessState::Exited, Some(3), Some(1_600))
    );
    // A row must name a lease (foreign keys are on for this connection too).
    let mut orphan = process("p2", &lease, 1_700);
    orphan.lease_id = 999;
    let err = rows.insert(&orphan, false).expect_err("no lease 999");
    assert!(matches!(err, StoreError::Unwritable { .. }), "{err:?}");
    // The lease writer keeps fsync'ing its commits.
    assert_eq!(synchronous(&mut writer).await, 2, "FULL for leases");
    let normal: i64 = rows
        .conn(false)
        .expect("free")
        .query_row("PRAGMA synchronous", [], |r| r.get(0))
        .expect("pragma");
    assert_eq!(normal, 1, "NORMAL for process rows");
}

#[tokio::test]
async fn a_row_written_ahead_shows_only_once_committed_and_leaves_nothing_when_dropped() {
    let (dir, store, mut writer) = fresh().await;
    let rows = ProcessWriter::open(&dir.path().join("subidd.db")).expect("process writer");
    let mut tx = writer.begin().await.expect("begin");
    let lease = tx
        .insert_lease(&new_lease("ahead", BASE, BLOCK, 1_000), BLOCK)
        .await
        .expect("insert");
    tx.commit().await.expect("commit");
    let before = writer.last_event_id().await.expect("last id");

    let pending = rows
        .begin_insert(&process("execd", &lease, 1_500))
        .expect("begin");
    assert_eq!(
        store.get_process("execd").await.expect("get"),
        None,
        "readers do not see it before the commit"
    );
    assert!(
        matches!(
            rows.insert(&process("other", &lease, 1_550), false),
            Err(StoreError::Contended)
        ),
        "the connection is held meanwhile"
    );
    pending.commit().expect("commit");
    assert_eq!(
        store.get_process("execd").await.expect("get"),
        Some(process("execd", &lease, 1_500))
    );

    // A child that never exec'd: dropped, rolled back, row and event alike.
    drop(
        rows.begin_insert(&process("failed", &lease, 1_600))
            .expect("begin"),
    );
    assert_eq!(store.get_process("failed").await.expect("get"), None);
    let kinds: Vec<String> = store
        .events_after(before, 100)
        .await
        .expect("feed")
        .into_iter()
        .map(|e| e.kind)
        .collect();
    assert_eq!(kinds, ["process_start"], "only the committed row's event");
    // The connection is free again.
    rows.insert(&process("next", &lease, 1_700), false)
        .expect("insert after");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn process_rows_wait_for_a_lease_commit_holding_the_write_lock() {
    let (dir, _store, mut writer) = fresh().await;
    let path = dir.path().join("subidd.db");
    let rows = std::sync::Arc::new(ProcessWriter::open(&path).expect("process writer"));
    let mut tx = writer.begin().await.expect("begin");
    let lease = tx
        .insert_lease(&new_lease("busy", BASE, BLOCK, 1_000), BLOCK)
        .await
        .expect("insert");
    tx.commit().await.expect("commit");
    // The lease writer holds the write lock (BEGIN IMMEDIATE) while a row is written: a write
    // that must not wait says so at once; one that may wait gets through after the commit.
    let held = writer.begin().await.expect("begin");
    let err = rows
        .insert(&process("eager", &lease, 1_400), false)
        .expect_err("the lock is held");
    assert!(err.is_contended(), "{err:?}");
    // Ordered by a flag set just before the commit, not by how long the insert took: an insert
    // that got through while the lock was held finds the flag unset.
    let committing = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (writer_rows, row_lease) = (std::sync::Arc::clone(&rows), lease.clone());
    let seen = std::sync::Arc::clone(&committing);
    let insert = std::thread::spawn(move || {
        writer_rows
            .insert(&process("waited", &row_lease, 1_500), true)
            .map(|()| seen.load(std::sync::atomic::Ordering::SeqCst))
    });
    // Gives the insert the time to reach the lock (it must wait however long this is).
    std::thread::sleep(std::time::Duration::from_millis(100));
    committing.store(true, std::sync::atomic::Ordering::SeqCst);
    held.commit().await.expect("commit");
    let after_commit = insert
        .join()
        .expect("thread")
        .expect("insert after the commit");
    assert!(
        after_commit,
        "the row was written while the lease writer held the lock"
    );
}

async fn synchronous(w: &mut Writer) -> i64 {
    match &mut w.inner {
        WriterInner::Sqlite(w) => w.pragma_synchronous(),
        WriterInner::Postgres(_) => unreachable!("an SQLite test"),
    }
}

fn process(id: &str, lease: &LeaseRecord, at: i64) -> ProcessRecord {
    ProcessRecord {
        id: id.into(),
        lease_id: lease.id,
        lease_name: lease.name.clone(),
        pid: 4242,
        start_ticks: 7,
        boot_id: "boot".into(),
        host_uid: lease.uid_base,
        host_gid: lease.gid_base,
        argv: vec!["/bin/true".into()],
        state: ProcessState::Running,
        exit_code: None,
        signal: None,
        started_at: at,
        ended_at: None,
    }
}

#[tokio::test]
async fn event_feed_has_lease_and_process_events_in_id_order() {
    let (_dir, store, mut writer) = fresh().await;
    assert_eq!(writer.last_event_id().await.expect("last id"), 0);
    let mut tx = writer.begin().await.expect("begin");
    let lease = tx
        .insert_lease(&new_lease("feed", BASE, BLOCK, 1_000), BLOCK)
        .await
        .expect("insert");
    tx.commit().await.expect("commit");
    let rows = ProcessWriter::open(&_dir.path().join("subidd.db")).expect("process writer");
    rows.insert(&process("p1", &lease, 1_500), true)
        .expect("insert process");
    rows.finish("p1", ProcessState::Exited, Some(3), None, 1_600, true)
        .expect("finish process");
    // A second finish changes nothing, so it records nothing.
    rows.finish("p1", ProcessState::Lost, None, None, 1_700, true)
        .expect("finish again");
    let mut tx = writer.begin().await.expect("begin");
    tx.release(&lease, EventKind::Release, true, 2_000, None)
        .await
        .expect("release");
    tx.commit().await.expect("commit");

    let all = store.events_after(0, 100).await.expect("feed");
    let kinds: Vec<&str> = all.iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(
        kinds,
        [
            "create",
            "process_start",
            "process_exit",
            "release",
            "purge"
        ]
    );
    assert!(all.windows(2).all(|w| w[0].id < w[1].id), "ids increase");
    let exit: serde_json::Value =
        serde_json::from_str(all[2].detail.as_deref().expect("detail")).expect("json");
    assert_eq!(exit["exit_code"], 3, "{exit}");
    assert_eq!(exit["process"], "p1", "{exit}");
    let created: serde_json::Value =
        serde_json::from_str(all[0].detail.as_deref().expect("detail")).expect("json");
    assert_eq!(created["uid_base"], BASE, "{created}");
    assert_eq!(
        writer.last_event_id().await.expect("last"),
        all[4].id,
        "the writer sees the newest id"
    );
    let page = store.events_after(all[1].id, 2).await.expect("page");
    assert_eq!(
        page.iter().map(|e| e.id).collect::<Vec<_>>(),
        [all[2].id, all[3].id]
    );
    // The per-name history stays lease events only.
    let history = store.events("feed").await.expect("history");
    assert_eq!(history.len(), 3, "{history:?}");
    assert_eq!(store.active_lease_count().await.expect("count"), 0);
}

#[tokio::test]
async fn the_event_feed_migration_keeps_an_old_history() {
    let dir = tempfile::tempdir().expect("tempdir");
    // The schema as a daemon before the event feed left it: migrations 0001-0003 only.
    let old = dir.path().join("old-migrations");
    std::fs::create_dir(&old).expect("mkdir");
    let all = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../migrations");
    for entry in std::fs::read_dir(&all).expect("read migrations") {
        let path = entry.expect("entry").path();
        let name = path
            .file_name()
            .expect("name")
            .to_string_lossy()
            .into_owned();
        if name.as_str() < "0004" {
            std::fs::copy(&path, old.join(&name)).expect("copy migration");
        }
    }
    let db = dir.path().join("subidd.db");
    let options = SqliteConnectOptions::from_str("sqlite://")
        .expect("options")
        .filename(&db)
        .create_if_missing(true)
        .foreign_keys(true);
    let mut conn = SqliteConnection::connect_with(&options)
        .await
        .expect("connect");
    sqlx::migrate::Migrator::new(old.as_path())
        .await
        .expect("old migrator")
        .run(&mut conn)
        .await
        .expect("old schema");
    sqlx::query(
        "INSERT INTO lease (id, name, uid_base, gid_base, size, state, created_at) \
         VALUES (1, 'old', 1879048192, 1879048192, 65536, 'active', 10)",
    )
    .execute(&mut conn)
    .await
    .expect("old lease");
    for (id, kind) in [(1, "create"), (2, "renew")] {
        sqlx::query(
            "INSERT INTO event (id, at, kind, lease_id, lease_name, caller_uid) \
             VALUES (?, 10, ?, 1, 'old', 0)",
        )
        .bind(id)
        .bind(kind)
        .execute(&mut conn)
        .await
        .expect("old event");
    }
    conn.close().await.expect("close");

    let (store, mut writer) = open(&db).await.expect("open migrates");
    let kept = store.events_after(0, 10).await.expect("feed");
    assert_eq!(
        kept.iter()
            .map(|e| (e.id, e.kind.as_str()))
            .collect::<Vec<_>>(),
        [(1, "create"), (2, "renew")],
        "ids and rows survive the rebuild"
    );
    assert_eq!(writer.last_event_id().await.expect("last"), 2);
    let lease = store.get_lease("old").await.expect("get").expect("exists");
    let mut tx = writer.begin().await.expect("begin");
    tx.release(&lease, EventKind::Release, false, 20, None)
        .await
        .expect("release");
    tx.commit().await.expect("commit");
    let after = store.events_after(2, 10).await.expect("feed");
    assert_eq!(after.len(), 1);
    assert_eq!(after[0].id, 3, "new ids continue after the old ones");
    assert_eq!(store.events("old").await.expect("history").len(), 3);
}

/// A crash during a checkpoint leaves page 1 (with the new size) ahead of pages still in the
/// write-ahead log: not damage while that log is there to replay; truncation when it is not.
#[test]
fn header_size_beyond_the_file_is_damage_only_without_a_log_to_replay() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("subidd.db");
    let mut page1 = vec![0u8; 4096];
    page1[..16].copy_from_slice(b"SQLite format 3\0");
    page1[16..18].copy_from_slice(&4096u16.to_be_bytes());
    page1[24..28].copy_from_slice(&7u32.to_be_bytes());
    page1[28..32].copy_from_slice(&55u32.to_be_bytes());
    page1[92..96].copy_from_slice(&7u32.to_be_bytes());
    let mut file = page1.clone();
    file.resize(41 * 4096, 0);
    std::fs::write(&db, &file).expect("write db");
    let refused = crate::sqlite::open::inspect(&db)
        .map(drop)
        .expect_err("41 of 55 pages, no log");
    assert!(refused.to_string().contains("55 pages"), "{refused}");
    std::fs::write(dir.path().join("subidd.db-wal"), [1u8; 32]).expect("write wal");
    crate::sqlite::open::inspect(&db)
        .map(drop)
        .expect("the log holds the rest");
    std::fs::write(dir.path().join("subidd.db-wal"), []).expect("empty wal");
    crate::sqlite::open::inspect(&db)
        .map(drop)
        .expect_err("an empty log replays nothing");
}
