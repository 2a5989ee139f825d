//! Pool blocks whose ids a live process holds: found by scanning `/proc` and withheld from
//! allocation, so a lease is never issued a range that something still runs under.
//!
//! Processes of a lease can only hold ids of that lease (its namespace maps nothing else), and
//! a lease is released only once its cgroup is empty, so a process holding ids of a block that is
//! free or in quarantine comes from outside subidd's leases: a survivor left by an older version
//! or a crash, or a root process of the host. `LeaseService::create` refreshes the scan (new
//! processes only) before every create, and the pool re-check rescans every process.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use subid_core::Pool;
use subid_sys::idscan::IdScanner;

/// The environment variable that makes the scan ignore processes in other daemons' lease
/// cgroups, for tests only: the test suite runs many daemons with overlapping pools side by side
/// (each under its own cgroup parent below this cgroup path), which a host never does (see the
/// pool registry). Never set it in production.
pub const TEST_FOREIGN_CGROUPS_ENV: &str = "SUBIDD_TEST_FOREIGN_CGROUPS";

/// The id scanner, shared by the lease service and the pool re-check.
#[derive(Debug, Clone, Default)]
pub struct HoldScan {
    scanner: Arc<Mutex<Scanned>>,
    /// Tickets: each call takes one on arrival, and each scan one as it starts.
    tickets: Arc<AtomicU64>,
    /// Tests only: holders in cgroups below `.0` but not below `.1` (this daemon's parent) are
    /// other test daemons' lease processes, and not counted.
    foreign: Arc<Mutex<Option<(String, String)>>>,
}

/// The scanner and what its last scan found.
#[derive(Debug, Default)]
struct Scanned {
    scanner: IdScanner,
    /// Every call whose ticket is below this arrived before the last scan began: that scan's
    /// answer is as new as one of its own would be.
    covers_below: u64,
    /// The pool and the blocks the last scan found held.
    last: Option<(Pool, BTreeMap<u32, String>)>,
}

impl HoldScan {
    /// Scans `/proc` (every process when `full`, else only processes not seen before) and returns
    /// the pool blocks a live process holds ids of, each with who holds them. Blocks in place
    /// (`crate::blocking`). Calls that wait while another scan runs take the answer of the next scan
    /// that begins after they arrived: many creates at once cost a few scans, not one each.
    pub async fn holds(&self, pool: Pool, full: bool) -> std::io::Result<BTreeMap<u32, String>> {
        let ticket = self.tickets.fetch_add(1, Ordering::SeqCst);
        let scanner = Arc::clone(&self.scanner);
        let tickets = Arc::clone(&self.tickets);
        let foreign = self
            .foreign
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        crate::blocking::run(move || {
            let mut state = scanner.lock().unwrap_or_else(|e| e.into_inner());
            if !full
                && ticket < state.covers_below
                && let Some((scanned_pool, held)) = &state.last
                && *scanned_pool == pool
            {
                return Ok(held.clone());
            }
            let starts = tickets.fetch_add(1, Ordering::SeqCst);
            let scanned = if full {
                state.scanner.rescan()
            } else {
                state.scanner.refresh()
            };
            scanned.map_err(std::io::Error::other)?;
            let held = blocks_held(&state.scanner, &pool, foreign.as_ref());
            state.covers_below = starts;
            state.last = Some((pool, held.clone()));
            Ok(held)
        })
        .await
        .map_err(std::io::Error::other)?
    }

    /// Tests only (see [`TEST_FOREIGN_CGROUPS_ENV`]): ignore holders in cgroups below `prefix`
    /// except those below `own` (this daemon's cgroup parent, as a cgroup path).
    pub fn ignore_foreign_cgroups(&self, prefix: String, own: String) {
        tracing::warn!(%prefix, %own, "processes in other daemons' lease cgroups are not counted as id holders (tests only)");
        *self.foreign.lock().unwrap_or_else(|e| e.into_inner()) = Some((prefix, own));
    }
}

/// Whether process `pid` sits in a cgroup below `prefix` but not below `own`.
fn in_foreign_cgroup(pid: i32, (prefix, own): &(String, String)) -> bool {
    let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/cgroup")) else {
        return false;
    };
    text.lines()
        .filter_map(|l| l.splitn(3, ':').nth(2))
        .any(|path| {
            let under =
                |p: &str| path == p || path.starts_with(&format!("{}/", p.trim_end_matches('/')));
            under(prefix) && !under(own)
        })
}

/// The blocks of `pool` that a process of `scanner` holds an id of, each with the lowest pid's
/// description.
fn blocks_held(
    scanner: &IdScanner,
    pool: &Pool,
    foreign: Option<&(String, String)>,
) -> BTreeMap<u32, String> {
    let range = pool.range();
    let (lo, hi) = (u64::from(range.start()), range.end());
    let mut held = BTreeMap::new();
    let mut holders: Vec<_> = scanner.holders().collect();
    holders.sort_by_key(|h| h.pid);
    for h in holders {
        let in_pool = h
            .uids
            .iter()
            .chain(&h.gids)
            .any(|&id| (lo..hi).contains(&u64::from(id)));
        if !in_pool || foreign.is_some_and(|f| in_foreign_cgroup(h.pid, f)) {
            continue;
        }
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
