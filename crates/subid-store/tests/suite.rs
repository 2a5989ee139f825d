//! The store test suite, run against both back ends: an SQLite file in a temp dir, and a
//! PostgreSQL database in a cluster the tests start themselves (`tests/support/pg.rs`; ignored
//! where PostgreSQL is not installed).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use subid_core::LeaseState;
use subid_store::{
    Backend, EventKind, LeaseFilter, LeaseRecord, NewLease, PgConfig, PoolMeta, Store, StoreError,
    Writer,
};
use subidd_tests::pg::PgCluster;

const BLOCK: u32 = 65536;
const BASE: u32 = 0x7000_0000;

/// One store under test, with what keeps it alive.
struct Under {
    store: Store,
    writer: Writer,
    _dir: tempfile::TempDir,
    _cluster: Option<Arc<PgCluster>>,
}

async fn sqlite() -> Under {
    let dir = tempfile::tempdir().expect("tempdir");
    let (store, writer) = subid_store::open(&dir.path().join("subidd.db"))
        .await
        .expect("open");
    Under {
        store,
        writer,
        _dir: dir,
        _cluster: None,
    }
}

fn pg_config(url: String, host: &str) -> PgConfig {
    PgConfig {
        url,
        password: None,
        host_id: host.into(),
        timeout: Duration::from_secs(10),
        max_connections: 4,
    }
}

async fn postgres() -> Under {
    let cluster = PgCluster::shared().expect("start a PostgreSQL cluster");
    let url = cluster.create_db("suite").expect("create database");
    let dir = tempfile::tempdir().expect("tempdir");
    let (store, writer) =
        subid_store::open_fleet(&dir.path().join("local.db"), &pg_config(url, "h1"))
            .await
            .expect("open");
    assert_eq!(store.backend(), Backend::Postgres);
    Under {
        store,
        writer,
        _dir: dir,
        _cluster: Some(cluster),
    }
}

/// Each test twice: `sqlite_<name>` and `pg_<name>`.
macro_rules! both {
    ($($name:ident),* $(,)?) => {
        mod sqlite_backend {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name(super::sqlite().await).await;
                }
            )*
        }
        mod pg_backend {
            $(
                #[tokio::test]
                #[cfg_attr(not(subidd_postgres), ignore = "PostgreSQL is not installed")]
                async fn $name() {
                    super::$name(super::postgres().await).await;
                }
            )*
        }
    };
}

both!(
    insert_release_and_read_back,
    a_second_holder_of_a_block_is_refused,
    two_active_leases_of_one_name_are_refused,
    rollback_on_drop_leaves_nothing,
    lists_filter_by_state_and_labels_in_pages,
    renew_expire_and_the_pool_settles_once,
    purge_of_a_released_lease_frees_its_range,
    the_range_held_since_rule_skips_the_lease_itself,
    events_come_in_id_order,
    leases_outside_the_pool_are_found,
    a_group_of_leases_goes_in_together,
);

/// Other hosts' changes come in pages of 4096 block rows: a reader far behind gets every one.
#[tokio::test]
#[cfg_attr(not(subidd_postgres), ignore = "PostgreSQL is not installed")]
async fn pg_changes_far_behind_are_read_whole_and_names_in_one_group() {
    let mut u = postgres().await;
    let blocks: u32 = 5000;
    let big = insert(&mut u, &new_lease("big", BASE, blocks * BLOCK, 1_000)).await;
    let small = insert(
        &mut u,
        &new_lease("small", BASE + blocks * BLOCK, BLOCK, 1_001),
    )
    .await;
    let changes = u.writer.changes_since(0, 0).await.expect("changes");
    assert_eq!(changes.blocks.len(), blocks as usize + 1, "every block row");
    let of_big = changes
        .blocks
        .iter()
        .filter(|b| b.lease_id == Some(big.id))
        .count();
    assert_eq!(of_big, blocks as usize);
    let last = changes.blocks.last().expect("a row");
    assert_eq!(last.lease_id, Some(small.id), "oldest change first");
    assert!(changes.seq > 0);
    let again = u
        .writer
        .changes_since(changes.seq, changes.claims_seq)
        .await
        .expect("changes");
    assert!(again.blocks.is_empty(), "nothing after the last one read");
    assert_eq!(again.seq, changes.seq);
    // Under the lock, with the states of several names (one unknown).
    let names = ["big".to_string(), "small".to_string(), "none".to_string()];
    let (tx, found, states) = u
        .writer
        .begin_group(&names, Some((0, 0)))
        .await
        .expect("begin");
    drop(tx);
    assert_eq!(
        found.expect("changes asked for").blocks.len(),
        blocks as usize + 1
    );
    assert_eq!(states.len(), 3);
    assert_eq!(states["big"].active.as_ref(), Some(&big));
    assert_eq!(states["small"].active.as_ref(), Some(&small));
    assert!(states["none"].active.is_none() && states["none"].last_released.is_none());
}

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
        rlimits: BTreeMap::from([("nofile".to_string(), [64, 128])]),
        namespaces: vec!["uts".into()],
        pids_max: Some(10),
        max_processes: None,
    }
}

async fn insert(u: &mut Under, new: &NewLease) -> LeaseRecord {
    let mut tx = u.writer.begin().await.expect("begin");
    let lease = tx.insert_lease(new, BLOCK).await.expect("insert");
    tx.commit().await.expect("commit");
    lease
}

async fn insert_release_and_read_back(mut u: Under) {
    let lease = insert(&mut u, &new_lease("web-1", BASE, 2 * BLOCK, 1_000)).await;
    assert_eq!(lease.state, LeaseState::Active);
    let got = u
        .store
        .get_lease("web-1")
        .await
        .expect("get")
        .expect("exists");
    assert_eq!(got, lease, "what was committed reads back the same");
    assert_eq!(
        u.store.get_lease_by_id(lease.id).await.expect("by id"),
        Some(lease.clone())
    );
    let rows = u.writer.block_rows().await.expect("blocks");
    assert_eq!(rows.len(), 2, "one row per block");
    assert!(rows.iter().all(|r| r.lease_id == Some(lease.id)));
    assert_eq!(
        u.store.lease_holding(BASE + BLOCK).await.expect("holding"),
        Some(lease.clone())
    );
    assert_eq!(u.store.active_lease_count().await.expect("count"), 1);

    let mut tx = u.writer.begin().await.expect("begin");
    tx.release(&lease, EventKind::Release, false, 2_000, Some(7))
        .await
        .expect("release");
    tx.commit().await.expect("commit");
    let got = u
        .store
        .get_lease("web-1")
        .await
        .expect("get")
        .expect("exists");
    assert_eq!(got.state, LeaseState::Released);
    assert_eq!(got.released_at, Some(2_000));
    let rows = u.writer.block_rows().await.expect("blocks");
    assert!(
        rows.iter()
            .all(|r| r.lease_id.is_none() && r.released_at == Some(2_000))
    );
    assert_eq!(u.store.lease_holding(BASE).await.expect("holding"), None);
    let kinds: Vec<_> = u
        .store
        .events("web-1")
        .await
        .expect("events")
        .into_iter()
        .map(|e| (e.kind, e.caller_uid))
        .collect();
    assert_eq!(
        kinds,
        vec![("create".into(), Some(0)), ("release".into(), Some(7))]
    );
    // A second lease of the same name is a new row; the name reads as the active one.
    let again = insert(&mut u, &new_lease("web-1", BASE, 2 * BLOCK, 3_000)).await;
    assert_ne!(again.id, lease.id);
    let got = u
        .store
        .get_lease("web-1")
        .await
        .expect("get")
        .expect("exists");
    assert_eq!(got.id, again.id);
}

async fn a_second_holder_of_a_block_is_refused(mut u: Under) {
    let mut tx = u.writer.begin().await.expect("begin");
    tx.insert_lease(&new_lease("a", BASE, BLOCK, 1), BLOCK)
        .await
        .expect("first holder");
    let err = tx
        .insert_lease(&new_lease("b", BASE, BLOCK, 1), BLOCK)
        .await
        .expect_err("second holder of the same block must fail");
    assert!(
        matches!(err, StoreError::BlockHeld { start } if start == u64::from(BASE)),
        "{err:?}"
    );
    drop(tx);
    // Overlapping without the same first block: still refused.
    insert(&mut u, &new_lease("a", BASE, 2 * BLOCK, 1)).await;
    let mut tx = u.writer.begin().await.expect("begin");
    let err = tx
        .insert_lease(&new_lease("c", BASE + BLOCK, BLOCK, 1), BLOCK)
        .await
        .expect_err("overlap");
    assert!(matches!(err, StoreError::BlockHeld { .. }), "{err:?}");
}

async fn two_active_leases_of_one_name_are_refused(mut u: Under) {
    let mut tx = u.writer.begin().await.expect("begin");
    tx.insert_lease(&new_lease("a", BASE, BLOCK, 1), BLOCK)
        .await
        .expect("first");
    let err = tx
        .insert_lease(&new_lease("a", BASE + BLOCK, BLOCK, 1), BLOCK)
        .await
        .expect_err("same active name twice");
    assert!(
        matches!(err, StoreError::Unwritable { .. }) && err.is_constraint(),
        "{err:?}"
    );
}

async fn rollback_on_drop_leaves_nothing(mut u: Under) {
    {
        let mut tx = u.writer.begin().await.expect("begin");
        tx.insert_lease(&new_lease("gone", BASE, BLOCK, 1), BLOCK)
            .await
            .expect("insert");
        // dropped without commit
    }
    assert_eq!(u.store.get_lease("gone").await.expect("get"), None);
    assert!(u.writer.block_rows().await.expect("blocks").is_empty());
    // The writer is usable again after the rollback.
    insert(&mut u, &new_lease("kept", BASE, BLOCK, 2)).await;
    assert!(u.store.get_lease("kept").await.expect("get").is_some());
}

async fn lists_filter_by_state_and_labels_in_pages(mut u: Under) {
    let a = insert(&mut u, &new_lease("a", BASE, BLOCK, 1)).await;
    let mut b = new_lease("b", BASE + BLOCK, BLOCK, 1);
    b.labels.insert("tier".into(), "db".into());
    insert(&mut u, &b).await;
    for i in 0..5u32 {
        insert(
            &mut u,
            &new_lease(&format!("p{i}"), BASE + (2 + i) * BLOCK, BLOCK, 1),
        )
        .await;
    }
    let mut tx = u.writer.begin().await.expect("begin");
    tx.release(&a, EventKind::Release, true, 5, None)
        .await
        .expect("release a");
    tx.commit().await.expect("commit");

    let names = |v: Vec<LeaseRecord>| v.into_iter().map(|l| l.name).collect::<Vec<_>>();
    let active = u
        .store
        .list_leases(Some(LeaseState::Active), &[])
        .await
        .expect("list");
    assert_eq!(names(active), ["b", "p0", "p1", "p2", "p3", "p4"]);
    assert_eq!(
        u.store.active_names().await.expect("names"),
        ["b", "p0", "p1", "p2", "p3", "p4"]
    );
    let all = u.store.list_leases(None, &[]).await.expect("list");
    assert_eq!(names(all).len(), 7);
    let labelled = u
        .store
        .list_leases(
            None,
            &[("app".into(), "b".into()), ("tier".into(), "db".into())],
        )
        .await
        .expect("list");
    assert_eq!(names(labelled), ["b"]);
    let none = u
        .store
        .list_leases(None, &[("tier".into(), "web".into())])
        .await
        .expect("list");
    assert!(none.is_empty());
    // Pages of 2, resumed after the last (name, id) seen: every lease once, in order.
    let filter = LeaseFilter {
        state: Some(LeaseState::Active),
        labels: Vec::new(),
    };
    let mut seen = Vec::new();
    let mut after: Option<(String, i64)> = None;
    loop {
        let page = u
            .store
            .list_leases_page(&filter, after.as_ref().map(|(n, i)| (n.as_str(), *i)), 2)
            .await
            .expect("page");
        assert!(page.len() <= 2);
        let Some(last) = page.last() else { break };
        after = Some((last.name.clone(), last.id));
        seen.extend(page.into_iter().map(|l| l.name));
    }
    assert_eq!(seen, ["b", "p0", "p1", "p2", "p3", "p4"]);
    // purge set the blocks' release time to 0
    let rows = u.writer.block_rows().await.expect("blocks");
    let a_row = rows.iter().find(|r| r.start == BASE).expect("a's block");
    assert_eq!(a_row.released_at, Some(0));
}

async fn renew_expire_and_the_pool_settles_once(mut u: Under) {
    let pool = PoolMeta {
        base: BASE,
        size: 16 * BLOCK,
        block: BLOCK,
    };
    assert_eq!(u.writer.settle_pool(pool).await.expect("settle"), pool);
    let other = PoolMeta {
        block: 1024,
        ..pool
    };
    let settled = u.writer.settle_pool(other).await.expect("settle");
    assert_eq!(settled.block, BLOCK, "the first block size sticks");
    let mut tx = u.writer.begin().await.expect("begin");
    let mut n = new_lease("t", BASE, BLOCK, 1_000);
    n.ttl_seconds = Some(10);
    n.expires_at = Some(11_000);
    let lease = tx.insert_lease(&n, BLOCK).await.expect("insert");
    assert!(tx.expired(10_999).await.expect("expired").is_empty());
    tx.renew(&lease, 20_000, 5_000, None).await.expect("renew");
    assert!(tx.expired(19_999).await.expect("expired").is_empty());
    assert_eq!(tx.expired(20_000).await.expect("expired").len(), 1);
    tx.commit().await.expect("commit");
    assert_eq!(
        u.store.expired_leases(20_000).await.expect("expired").len(),
        1
    );
    let mut tx = u.writer.begin().await.expect("begin");
    let err = tx
        .renew(
            &LeaseRecord {
                id: lease.id + 100,
                ..lease.clone()
            },
            1,
            1,
            None,
        )
        .await
        .expect_err("no such lease");
    assert!(matches!(err, StoreError::NotActive { .. }), "{err:?}");
}

async fn purge_of_a_released_lease_frees_its_range(mut u: Under) {
    let lease = insert(&mut u, &new_lease("q", BASE, 2 * BLOCK, 1)).await;
    let mut tx = u.writer.begin().await.expect("begin");
    tx.release(&lease, EventKind::Release, false, 100, None)
        .await
        .expect("release");
    tx.commit().await.expect("commit");
    let released = u.store.get_lease("q").await.expect("get").expect("exists");
    let mut tx = u.writer.begin().await.expect("begin");
    let state = tx.name_state("q").await.expect("state");
    assert_eq!(state.active, None);
    assert_eq!(state.last_released, Some(released.clone()));
    tx.purge_released(&released, 200, Some(3))
        .await
        .expect("purge");
    tx.commit().await.expect("commit");
    let rows = u.writer.block_rows().await.expect("blocks");
    assert!(rows.iter().all(|r| r.released_at == Some(0)), "{rows:?}");
    let kinds: Vec<String> = u
        .store
        .events("q")
        .await
        .expect("events")
        .into_iter()
        .map(|e| e.kind)
        .collect();
    assert_eq!(kinds, ["create", "release", "purge"]);
}

async fn the_range_held_since_rule_skips_the_lease_itself(mut u: Under) {
    let old = insert(&mut u, &new_lease("s", BASE, BLOCK, 500)).await;
    let mut tx = u.writer.begin().await.expect("begin");
    tx.release(&old, EventKind::Release, false, 500, None)
        .await
        .expect("release");
    // Created and released in the same millisecond: its own row does not count.
    assert!(!tx.range_held_since(&old, 500).await.expect("held"));
    let other = tx
        .insert_lease(&new_lease("o", BASE, BLOCK, 600), BLOCK)
        .await
        .expect("another tenant");
    assert!(tx.range_held_since(&old, 500).await.expect("held"));
    tx.release(&other, EventKind::Release, false, 700, None)
        .await
        .expect("release other");
    assert!(
        tx.range_held_since(&old, 500).await.expect("held"),
        "it was held since, even if released again"
    );
    tx.commit().await.expect("commit");
}

async fn events_come_in_id_order(mut u: Under) {
    assert_eq!(u.writer.last_event_id().await.expect("last id"), 0);
    assert_eq!(u.store.last_event_id().await.expect("last id"), 0);
    let lease = insert(&mut u, &new_lease("feed", BASE, BLOCK, 1_000)).await;
    let mut tx = u.writer.begin().await.expect("begin");
    tx.renew(&lease, 9_000, 1_500, Some(1))
        .await
        .expect("renew");
    tx.release(&lease, EventKind::Expire, true, 2_000, None)
        .await
        .expect("release");
    tx.commit().await.expect("commit");
    let all = u.store.events_after(0, 100).await.expect("feed");
    let kinds: Vec<&str> = all.iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(kinds, ["create", "renew", "expire", "purge"]);
    assert!(all.windows(2).all(|w| w[0].id < w[1].id), "ids increase");
    let created: serde_json::Value =
        serde_json::from_str(all[0].detail.as_deref().expect("detail")).expect("json");
    assert_eq!(created["uid_base"], BASE, "{created}");
    assert_eq!(u.writer.last_event_id().await.expect("last"), all[3].id);
    assert_eq!(u.store.last_event_id().await.expect("last"), all[3].id);
    let page = u.store.events_after(all[0].id, 2).await.expect("page");
    assert_eq!(
        page.iter().map(|e| e.id).collect::<Vec<_>>(),
        [all[1].id, all[2].id]
    );
    assert_eq!(u.store.active_lease_count().await.expect("count"), 0);
}

async fn leases_outside_the_pool_are_found(mut u: Under) {
    let inside = insert(&mut u, &new_lease("in", BASE + BLOCK, BLOCK, 1)).await;
    let end = u64::from(BASE) + 4 * u64::from(BLOCK);
    assert_eq!(
        u.writer
            .first_active_outside(BASE, end, BLOCK)
            .await
            .expect("check"),
        None
    );
    // A pool that starts above it, or a block size it is not cut in.
    assert_eq!(
        u.writer
            .first_active_outside(BASE + 2 * BLOCK, end, BLOCK)
            .await
            .expect("check"),
        Some(inside.clone())
    );
    assert_eq!(
        u.writer
            .first_active_outside(BASE, end, 2 * BLOCK)
            .await
            .expect("check"),
        Some(inside)
    );
}

async fn a_group_of_leases_goes_in_together(mut u: Under) {
    let news: Vec<NewLease> = (0..3u32)
        .map(|i| {
            new_lease(
                &format!("g{i}"),
                BASE + 2 * i * BLOCK,
                2 * BLOCK,
                100 + i64::from(i),
            )
        })
        .collect();
    let mut tx = u.writer.begin().await.expect("begin");
    let records = tx.insert_leases(&news, BLOCK).await.expect("insert");
    tx.commit().await.expect("commit");
    assert_eq!(records.len(), 3);
    for (record, new) in records.iter().zip(&news) {
        assert_eq!(record.name, new.name);
        let stored = u
            .store
            .get_lease(&new.name)
            .await
            .expect("get")
            .expect("there");
        assert_eq!(&stored, record, "each record reads back with its id");
    }
    assert_eq!(u.writer.block_rows().await.expect("blocks").len(), 6);
    let names: Vec<String> = u
        .store
        .events_after(0, 10)
        .await
        .expect("feed")
        .into_iter()
        .map(|e| e.lease_name)
        .collect();
    assert_eq!(names, ["g0", "g1", "g2"], "events in the group's order");
    // One lease of a group on a held block: the whole group is refused.
    let clash = [
        new_lease("h0", BASE + 8 * BLOCK, BLOCK, 200),
        new_lease("h1", BASE + 2 * BLOCK, BLOCK, 200),
    ];
    let mut tx = u.writer.begin().await.expect("begin");
    let err = tx
        .insert_leases(&clash, BLOCK)
        .await
        .expect_err("a held block");
    assert!(matches!(err, StoreError::BlockHeld { .. }), "{err:?}");
    drop(tx);
    assert_eq!(
        u.store.get_lease("h0").await.expect("get"),
        None,
        "nothing went in"
    );
}

/// What a group beginning with the watermark `(seq, claims_seq)` reads of other hosts' changes.
async fn changes_under_lock(w: &mut Writer, seq: i64, claims_seq: i64) -> subid_store::Changes {
    let (tx, found, _) = w
        .begin_group(&[], Some((seq, claims_seq)))
        .await
        .expect("begin");
    drop(tx);
    found.expect("changes asked for")
}

/// A group that starts where this host's last commit left the fleet reads no changes; once
/// another host commits, it reads that host's blocks.
#[tokio::test]
#[cfg_attr(not(subidd_postgres), ignore = "PostgreSQL is not installed")]
async fn pg_a_group_reads_changes_only_after_another_host_committed() {
    let cluster = PgCluster::shared().expect("start a PostgreSQL cluster");
    let url = cluster.create_db("suite").expect("create database");
    let dir = tempfile::tempdir().expect("tempdir");
    let (_s1, mut w1) =
        subid_store::open_fleet(&dir.path().join("h1.db"), &pg_config(url.clone(), "h1"))
            .await
            .expect("open h1");
    let (_s2, mut w2) = subid_store::open_fleet(&dir.path().join("h2.db"), &pg_config(url, "h2"))
        .await
        .expect("open h2");
    // h1 commits a lease; its watermark is the commit's change number.
    let (mut tx, found, _) = w1.begin_group(&[], Some((0, 0))).await.expect("begin");
    let claims = found.expect("changes").claims_seq;
    tx.insert_lease(&new_lease("a", BASE, BLOCK, 1), BLOCK)
        .await
        .expect("insert");
    let at = tx
        .commit_seq()
        .await
        .expect("commit")
        .expect("a change number");
    // Nobody committed since: nothing to read.
    let found = changes_under_lock(&mut w1, at, claims).await;
    assert!(
        found.blocks.is_empty() && found.claims.is_none(),
        "{found:?}"
    );
    assert_eq!(found.seq, at);
    // h2 commits a lease: h1's next group reads its block, and only it.
    let mut tx = w2.begin().await.expect("begin");
    let b = tx
        .insert_lease(&new_lease("b", BASE + 4 * BLOCK, BLOCK, 2), BLOCK)
        .await
        .expect("insert");
    tx.commit().await.expect("commit");
    let found = changes_under_lock(&mut w1, at, claims).await;
    assert_eq!(found.blocks.len(), 1, "{found:?}");
    assert_eq!(found.blocks[0].lease_id, Some(b.id));
    assert!(found.seq > at);
}
