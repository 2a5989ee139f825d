//! Lease service tests: a real SQLite file, a manual clock (no test waits out real seconds).

use std::sync::Arc;
use std::time::Duration;

use subid_core::{LeaseState, PoolSpec};

use super::*;
use crate::clock::{Clock, ManualClock};

const BLOCK: u32 = 65536;
const BASE: u32 = 0x7000_0000;
const T0: i64 = 1_800_000_000_000;

async fn service(
    blocks: u32,
    quarantine: Duration,
) -> (tempfile::TempDir, LeaseService, Arc<ManualClock>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let (store, writer) = subid_store::open(&dir.path().join("subidd.db"))
        .await
        .expect("open store");
    let pool = Pool::new(PoolSpec {
        base: BASE,
        size: blocks * BLOCK,
        block: BLOCK,
    })
    .expect("pool");
    let clock = ManualClock::at(T0);
    let options = StartOptions {
        clock: clock.clone(),
        ..StartOptions::new(quarantine)
    };
    let leases = LeaseService::start_with(store, writer, pool, options)
        .await
        .expect("service");
    (dir, leases, clock)
}

fn spec_with_ttl(ttl: Option<u32>) -> LeaseSpec {
    LeaseSpec {
        ttl_seconds: ttl,
        ..LeaseSpec::default()
    }
}

async fn create(leases: &LeaseService, name: &str) -> Result<Created, ServiceError> {
    leases
        .create(
            name.into(),
            LeaseSpec::default(),
            CreateMode::Ensure,
            Some(0),
        )
        .await
}

/// An allocator that disagrees with the database about a lease being released must not turn a
/// committed release into an error, and must come back in line with the database.
#[tokio::test]
async fn a_release_the_allocator_disagrees_with_is_answered_and_memory_follows_the_database() {
    let (_dir, leases, _clock) = service(4, Duration::from_secs(3600)).await;
    let a = create(&leases, "a").await.expect("create a").lease;
    leases.forget_blocks(&a);
    assert_eq!(leases.pool_status().1.active, 0, "memory lost the lease");
    leases
        .release("a".into(), false, Some(0), ReleaseKind::Delete)
        .await
        .expect("the release is committed, so it is answered as done");
    let stored = leases
        .store()
        .get_lease("a")
        .await
        .expect("read")
        .expect("exists");
    assert_eq!(stored.state, LeaseState::Released, "the database has it");
    let counts = leases.pool_status().1;
    assert_eq!(
        (counts.active, counts.quarantined),
        (0, 1),
        "the allocator was rebuilt from the database: the range is in quarantine, not free"
    );
    // The quarantined range is not handed out again while blocks never used are left.
    for name in ["b", "c", "d"] {
        let lease = create(&leases, name).await.expect("create").lease;
        assert_ne!(
            lease.uid_base, a.uid_base,
            "{name} got the quarantined range"
        );
    }
    let err = create(&leases, "e").await.expect_err("pool exhausted");
    assert!(matches!(err, ServiceError::Exhausted { .. }), "{err:?}");
}

#[tokio::test]
async fn ttl_runs_out_on_the_service_clock() {
    let (_dir, leases, clock) = service(4, Duration::from_secs(3600)).await;
    let lease = leases
        .create(
            "t".into(),
            spec_with_ttl(Some(60)),
            CreateMode::Ensure,
            None,
        )
        .await
        .expect("create")
        .lease;
    assert_eq!(lease.expires_at, Some(T0 + 60_000));
    clock.advance(Duration::from_secs(30));
    let renewed = leases.renew("t".into(), None).await.expect("renew");
    assert_eq!(renewed.expires_at, Some(T0 + 90_000), "now + ttl");
    // Not due yet: an expiry pass leaves it alone.
    leases
        .release("t".into(), false, None, ReleaseKind::Expire)
        .await
        .expect("skipped");
    assert_eq!(
        leases
            .store()
            .expired_leases(clock.now_ms())
            .await
            .expect("due"),
        Vec::new()
    );
    clock.advance(Duration::from_secs(61));
    let err = leases.renew("t".into(), None).await.expect_err("expired");
    assert!(matches!(err, ServiceError::NotFound { .. }), "{err:?}");
    let err = leases
        .create(
            "t".into(),
            spec_with_ttl(Some(60)),
            CreateMode::Ensure,
            None,
        )
        .await
        .expect_err("being released");
    assert!(matches!(err, ServiceError::Conflict { .. }), "{err:?}");
    let due = leases
        .store()
        .expired_leases(clock.now_ms())
        .await
        .expect("due");
    assert_eq!(due.len(), 1);
    leases
        .release("t".into(), false, None, ReleaseKind::Expire)
        .await
        .expect("expire");
    // A second expiry pass (another host's, or a late one) finds nothing to do.
    leases
        .release("t".into(), false, None, ReleaseKind::Expire)
        .await
        .expect("nothing left to expire is no error");
    let kinds: Vec<String> = leases
        .store()
        .events("t")
        .await
        .expect("history")
        .into_iter()
        .map(|e| e.kind)
        .collect();
    assert_eq!(kinds, ["create", "renew", "expire"], "one expire event");
}

#[tokio::test]
async fn quarantine_ends_on_the_service_clock_and_names_are_sticky_within_it() {
    let (_dir, leases, clock) = service(2, Duration::from_secs(3600)).await;
    let a = create(&leases, "a").await.expect("a").lease;
    leases
        .release("a".into(), false, None, ReleaseKind::Delete)
        .await
        .expect("release a");
    let b = create(&leases, "b").await.expect("b").lease;
    assert_ne!(b.uid_base, a.uid_base);
    let err = create(&leases, "c")
        .await
        .expect_err("a's range is in quarantine");
    assert!(matches!(err, ServiceError::Exhausted { .. }), "{err:?}");
    // The same name within quarantine gets its own range back.
    let again = create(&leases, "a").await.expect("a again").lease;
    assert_eq!(again.uid_base, a.uid_base, "sticky");
    leases
        .release("a".into(), false, None, ReleaseKind::Delete)
        .await
        .expect("release a again");
    clock.advance(Duration::from_secs(3599));
    let err = create(&leases, "c").await.expect_err("one second short");
    assert!(matches!(err, ServiceError::Exhausted { .. }), "{err:?}");
    clock.advance(Duration::from_secs(1));
    let c = create(&leases, "c").await.expect("quarantine over").lease;
    assert_eq!(c.uid_base, a.uid_base);
}
