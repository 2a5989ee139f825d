//! Pool blocks whose ids a live process holds: found by scanning `/proc` and withheld from
//! allocation, so a lease is never issued a range that something still runs under.
//!
//! Processes of a lease can only hold ids of that lease (its namespace maps nothing else), and
//! a lease is released only once its cgroup is empty, so a process holding ids of a block that is
//! free or in quarantine comes from outside subidd's leases: a survivor left by an older version
//! or a crash, or a root process of the host. `LeaseService::create` refreshes the scan (new
//! processes only) before every create, and the pool re-check rescans every process.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use subid_core::Pool;
use subid_sys::idscan::IdScanner;

/// The id scanner, shared by the lease service and the pool re-check.
#[derive(Debug, Clone, Default)]
pub struct HoldScan {
    scanner: Arc<Mutex<IdScanner>>,
}

impl HoldScan {
    /// Scans `/proc` (every process when `full`, else only processes not seen before) and returns
    /// the pool blocks a live process holds ids of, each with who holds them. Runs on the
    /// blocking pool.
    pub async fn holds(&self, pool: Pool, full: bool) -> std::io::Result<BTreeMap<u32, String>> {
        let scanner = Arc::clone(&self.scanner);
        tokio::task::spawn_blocking(move || {
            let mut scanner = scanner.lock().unwrap_or_else(|e| e.into_inner());
            let scanned = if full {
                scanner.rescan()
            } else {
                scanner.refresh()
            };
            scanned.map_err(std::io::Error::other)?;
            Ok(blocks_held(&scanner, &pool))
        })
        .await
        .map_err(std::io::Error::other)?
    }
}

/// The blocks of `pool` that a process of `scanner` holds an id of, each with the lowest pid's
/// description.
fn blocks_held(scanner: &IdScanner, pool: &Pool) -> BTreeMap<u32, String> {
    let range = pool.range();
    let (lo, hi) = (u64::from(range.start()), range.end());
    let mut held = BTreeMap::new();
    let mut holders: Vec<_> = scanner.holders().collect();
    holders.sort_by_key(|h| h.pid);
    for h in holders {
        let ids = h.uids.iter().map(|&id| ("uid", id));
        for (kind, id) in ids.chain(h.gids.iter().map(|&id| ("gid", id))) {
            if !(lo..hi).contains(&u64::from(id)) {
                continue;
            }
            if let Some(block) = pool.block_of(id) {
                held.entry(block)
                    .or_insert_with(|| format!("process {} ({}) holds {kind} {id}", h.pid, h.name));
            }
        }
    }
    held
}
