//! What other id owners hold in the pool: claims of /etc/subuid, /etc/subgid and the user
//! database, and ids live processes hold. Free blocks they touch are withheld from allocation;
//! claims on active leases are reported, never resolved by subidd.

use std::collections::{BTreeMap, BTreeSet};

use subid_core::{ClaimSource, ForeignClaim, IdRange};
use subid_store::{FleetClaim, StoreError};

use super::{LeaseService, lock};
use crate::holds::HoldScan;
use crate::service_error::ServiceError;

/// Most pool blocks tracked as claimed by other id owners (a claim over more, only possible with
/// tiny blocks, is cut here and logged).
const MAX_FOREIGN_BLOCKS: u64 = 1 << 20;

/// Every block withheld for an owner other than a lease, by where it comes from.
#[derive(Debug, Default)]
pub(super) struct Foreign {
    /// Blocks this host's last applied claims touch (see [`LeaseService::apply_claims`]).
    pub(super) claims: BTreeSet<u32>,
    /// Blocks, not active, where a live process of this host holds ids (see
    /// [`LeaseService::set_process_holds`]).
    pub(super) holds: BTreeMap<u32, String>,
    /// Other hosts' claims and holds, with a fleet's store.
    pub(super) fleet: Vec<FleetClaim>,
}

impl Foreign {
    /// All of them, for [`subid_core::Allocator::set_foreign`].
    pub(super) fn blocks(&self) -> BTreeSet<u32> {
        let mut all = self.claims.clone();
        all.extend(self.holds.keys().copied());
        all.extend(super::writer::claim_blocks(&self.fleet, MAX_FOREIGN_BLOCKS));
        all
    }
}

/// Another id owner claims ids of an active lease. Reported, never resolved by subidd: the
/// operator moves the other claim or releases the lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolWarning {
    /// The lease whose ids are claimed.
    pub lease: String,
    /// Who claims them, e.g. "/etc/subuid line 3 (alice:1879048192:65536)".
    pub claim: String,
}

/// What a claim of another id owner means for the pool, as last applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClaimStatus {
    /// A subid entry inside this active lease: the lease handed on (no conflict).
    HandsOn(String),
    /// It touches these active leases: reported as warnings.
    Conflicts(Vec<String>),
    /// It touches only blocks that are not active: those are withheld.
    Withheld,
}

/// One claim and its status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppliedClaim {
    pub claim: String,
    /// Pool blocks `(first, count)` it touches.
    pub blocks: (u32, u32),
    pub status: ClaimStatus,
}

impl LeaseService {
    /// Applies the claims other id owners hold on the pool now: free blocks they touch are
    /// withheld, blocks no longer claimed come back, and claims on active leases (other than a
    /// subid entry inside one lease, which hands that lease on) become warnings, logged when they
    /// appear and when they clear. Returns each claim with its status.
    pub async fn apply_claims(
        &self,
        claims: &[ForeignClaim],
    ) -> Result<Vec<AppliedClaim>, StoreError> {
        let mut blocks = BTreeSet::new();
        let mut tracked = 0u64;
        for claim in claims {
            let (first, count) = claim.blocks;
            tracked = tracked.saturating_add(u64::from(count));
            if tracked > MAX_FOREIGN_BLOCKS {
                tracing::error!(
                    claim = %claim.source,
                    "claims of other id owners span more than {MAX_FOREIGN_BLOCKS} blocks; \
                     the rest is not withheld: use a larger pool block"
                );
                break;
            }
            blocks.extend(first..first.saturating_add(count));
        }
        let (pool, conflicts, withheld) = {
            let mut allocator = lock(&self.inner.allocator);
            let mut foreign = lock(&self.inner.foreign);
            foreign.claims = blocks;
            let conflicts = allocator.set_foreign(&foreign.blocks());
            let withheld = allocator.counts(self.now_ms_u64()).withheld;
            (*allocator.pool(), conflicts, withheld)
        };
        let mut applied = Vec::new();
        for claim in claims {
            let status = match self.delegated_to(claim).await? {
                Some(lease) => ClaimStatus::HandsOn(lease),
                None => {
                    let (first, count) = claim.blocks;
                    let end = first.saturating_add(count);
                    let mut named = BTreeSet::new();
                    for &block in conflicts.iter().filter(|&&b| (first..end).contains(&b)) {
                        let Some(start) = pool.block_start(block) else {
                            continue;
                        };
                        if let Some(lease) = self.inner.store.lease_holding(start).await? {
                            named.insert(lease.name);
                        }
                    }
                    if named.is_empty() {
                        ClaimStatus::Withheld
                    } else {
                        ClaimStatus::Conflicts(named.into_iter().collect())
                    }
                }
            };
            applied.push(AppliedClaim {
                claim: claim.source.to_string(),
                blocks: claim.blocks,
                status,
            });
        }
        let old = warnings_of(&std::mem::replace(
            &mut *lock(&self.inner.claims),
            applied.clone(),
        ));
        let warnings = warnings_of(&applied);
        for w in warnings.iter().filter(|w| !old.contains(w)) {
            tracing::error!(
                lease = %w.lease,
                claim = %w.claim,
                "another id owner claims ids of an active lease; subidd does not resolve this: \
                 remove or move the other claim, or release the lease"
            );
        }
        for w in old.iter().filter(|w| !warnings.contains(w)) {
            tracing::info!(lease = %w.lease, claim = %w.claim, "claim on lease ids is gone");
        }
        if withheld > 0 {
            tracing::debug!(withheld, "pool blocks withheld for other id owners");
        }
        Ok(applied)
    }

    /// Withholds the blocks where a live process of the host holds ids (`holds`: block index ->
    /// who, e.g. "process 4242 (sleep) holds uid 1879048200"), so no lease is issued a range
    /// whose ids something still uses; blocks no longer held come back. Holds on active blocks
    /// are ignored: the processes of a lease hold its ids. Returns the holds kept.
    pub fn set_process_holds(&self, mut holds: BTreeMap<u32, String>) -> BTreeMap<u32, String> {
        let (old, kept) = {
            let mut allocator = lock(&self.inner.allocator);
            holds.retain(|&block, _| {
                !matches!(
                    allocator.block_state(block),
                    Some(subid_core::BlockState::Active) | None
                )
            });
            let mut foreign = lock(&self.inner.foreign);
            let old = std::mem::replace(&mut foreign.holds, holds.clone());
            allocator.set_foreign(&foreign.blocks());
            (old, holds)
        };
        for (block, who) in kept.iter().filter(|(b, _)| !old.contains_key(b)) {
            tracing::warn!(block, holder = %who, "a live process holds ids of a pool block that is not leased; the block is withheld until it is gone");
        }
        for block in old.keys().filter(|b| !kept.contains_key(b)) {
            tracing::info!(
                block,
                "no process holds ids of the block any more; it is free again"
            );
        }
        kept
    }

    /// Scans `/proc` (every process when `full`, else the new ones) and withholds the blocks
    /// whose ids a live process holds; see [`crate::holds`].
    pub async fn check_holds(&self, full: bool) -> std::io::Result<()> {
        let pool = *lock(&self.inner.allocator).pool();
        let holds = self.inner.holds.holds(pool, full).await?;
        self.set_process_holds(holds);
        Ok(())
    }

    /// The scanner behind [`LeaseService::check_holds`].
    pub fn hold_scan(&self) -> &HoldScan {
        &self.inner.holds
    }

    /// [`LeaseService::check_holds`] of the new processes, before a block can be issued.
    pub(super) async fn check_new_holds(&self) -> Result<(), ServiceError> {
        self.check_holds(false)
            .await
            .map_err(|error| ServiceError::Kernel {
                what: "cannot check which ids live processes hold (scanning /proc)".into(),
                source: Box::new(error),
            })
    }

    /// The blocks withheld because a live process holds their ids, as last set.
    pub fn process_holds(&self) -> BTreeMap<u32, String> {
        lock(&self.inner.foreign).holds.clone()
    }

    /// Other hosts' claims and holds on the pool, as last read from a fleet's store.
    pub fn fleet_claims(&self) -> Vec<FleetClaim> {
        lock(&self.inner.foreign).fleet.clone()
    }

    /// The active leases holding any of the pool blocks `first..first+count`.
    pub async fn active_leases_in(
        &self,
        first: u32,
        count: u32,
    ) -> Result<Vec<String>, StoreError> {
        let active: Vec<u32> = {
            let allocator = lock(&self.inner.allocator);
            (first..first.saturating_add(count))
                .filter(|&b| {
                    matches!(
                        allocator.block_state(b),
                        Some(subid_core::BlockState::Active)
                    )
                })
                .take(64)
                .collect()
        };
        let (pool, _) = self.pool_status();
        let mut names = BTreeSet::new();
        for block in active {
            if let Some(start) = pool.block_start(block)
                && let Some(lease) = self.inner.store.lease_holding(start).await?
            {
                names.insert(lease.name);
            }
        }
        Ok(names.into_iter().collect())
    }

    /// This host's claims and holds, as the fleet's store is to have them.
    pub fn own_claims(&self) -> Vec<FleetClaim> {
        let host = self.inner.store.host_id().unwrap_or_default().to_string();
        let mut own: Vec<FleetClaim> = lock(&self.inner.claims)
            .iter()
            .filter(|a| !matches!(a.status, ClaimStatus::HandsOn(_)))
            .map(|a| FleetClaim {
                host: host.clone(),
                first: a.blocks.0,
                count: a.blocks.1,
                process: false,
                source: a.claim.clone(),
            })
            .collect();
        own.extend(
            lock(&self.inner.foreign)
                .holds
                .iter()
                .map(|(&block, who)| FleetClaim {
                    host: host.clone(),
                    first: block,
                    count: 1,
                    process: true,
                    source: who.clone(),
                }),
        );
        own
    }

    /// The active lease an /etc/subuid or /etc/subgid entry hands on, when the entry lies wholly
    /// inside one (as `idmap?format=subuid` renders it). Such an entry is no conflict while the
    /// lease is active; once the lease is released its blocks are withheld like any claimed ones.
    pub async fn delegated_to(&self, claim: &ForeignClaim) -> Result<Option<String>, StoreError> {
        let ClaimSource::Subid { start, count, .. } = claim.source else {
            return Ok(None);
        };
        let Ok(ids) = IdRange::new(start, count) else {
            return Ok(None);
        };
        let (pool, _) = self.pool_status();
        let Some(first) = pool.block_start(claim.blocks.0) else {
            return Ok(None);
        };
        let Some(lease) = self.inner.store.lease_holding(first).await? else {
            return Ok(None);
        };
        let inside =
            IdRange::new(lease.uid_base, lease.size).is_ok_and(|held| held.contains_range(&ids));
        Ok(inside.then_some(lease.name))
    }

    /// Every claim of another id owner on the pool, as last applied.
    pub fn pool_claims(&self) -> Vec<AppliedClaim> {
        lock(&self.inner.claims).clone()
    }

    /// The conflicts found by the last [`LeaseService::apply_claims`].
    pub fn pool_warnings(&self) -> Vec<PoolWarning> {
        warnings_of(&lock(&self.inner.claims))
    }
}

/// One warning per claim and active lease it touches.
fn warnings_of(claims: &[AppliedClaim]) -> Vec<PoolWarning> {
    claims
        .iter()
        .flat_map(|a| match &a.status {
            ClaimStatus::Conflicts(leases) => leases
                .iter()
                .map(|lease| PoolWarning {
                    lease: lease.clone(),
                    claim: a.claim.clone(),
                })
                .collect(),
            ClaimStatus::HandsOn(_) | ClaimStatus::Withheld => Vec::new(),
        })
        .collect()
}
