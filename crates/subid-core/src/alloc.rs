//! The in-memory block allocator: which blocks of the pool are never used, active or released, and
//! which to hand out next. The store rebuilds it from the database at start and commits its decisions.
//!
//! Memory is proportional to the number of active, released and withheld blocks plus the number of
//! never-used runs, never to the pool size: with a block of 1 a pool may span billions of blocks.
//!
//! Blocks that another id owner claims (an /etc/subuid entry, a user of the host) are *foreign*: a
//! foreign block that is not active is *withheld* and never handed out until the claim goes away; a
//! foreign active block is a conflict the caller reports, never silently resolved.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt;

use crate::pool::Pool;
use crate::range::wide_end;

/// Release key of a released block: `None` for a purged release (no quarantine), `Some(ms)` for an
/// ordinary release at `ms`. The derived order (`None` first, then by time) is exactly "least recently
/// released first", with purged blocks ahead of all others.
///
/// Purge is kept apart from the time rather than encoded as time 0 so that "reusable at once" holds
/// whatever clock the caller uses, and a genuine release at time 0 still gets its quarantine.
type RelKey = Option<u64>;

/// State of one block, as reported by [`Allocator::block_state`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockState {
    /// Never handed out since the allocator was built.
    Free,
    /// Part of an active lease.
    Active,
    /// Released at this time in ms (0 for a purged release, which has no quarantine).
    Released(u64),
    /// Not active and claimed by another id owner: never handed out while the claim lasts.
    Withheld,
}

/// Block tallies for metrics and status output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolCounts {
    /// All blocks of the pool.
    pub total: u32,
    /// Blocks of active leases.
    pub active: u32,
    /// Released blocks still in quarantine.
    pub quarantined: u32,
    /// Blocks another id owner claims, held back from allocation.
    pub withheld: u32,
    /// Never-used blocks plus released blocks whose quarantine is over, minus withheld ones.
    pub free: u32,
}

/// Why an allocator operation was refused. Block numbers are indices into the pool, not host ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AllocError {
    /// No run of `count` consecutive available blocks exists.
    Exhausted { count: u32 },
    /// The blocks `first..first+count` are not all inside the pool.
    OutOfPool { first: u32, count: u32 },
    /// `block` is already part of an active lease.
    Busy { block: u32 },
    /// A count of 0 blocks was asked for.
    ZeroCount,
    /// `block` is withheld: another id owner claims its ids.
    Withheld { block: u32 },
    /// `block` was expected to be active (to be released) but is not.
    NotActive { block: u32 },
}

impl fmt::Display for AllocError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AllocError::Exhausted { count } => write!(
                f,
                "pool exhausted: no {count} consecutive free block(s) outside quarantine"
            ),
            AllocError::OutOfPool { first, count } => write!(
                f,
                "blocks {first}..{} are outside the pool",
                wide_end(*first, *count)
            ),
            AllocError::Busy { block } => write!(f, "block {block} is already leased"),
            AllocError::ZeroCount => write!(f, "a lease must span at least one block"),
            AllocError::Withheld { block } => write!(
                f,
                "block {block} is withheld: another id owner (/etc/subuid or a user) claims its ids"
            ),
            AllocError::NotActive { block } => write!(f, "block {block} is not leased"),
        }
    }
}

impl std::error::Error for AllocError {}

/// The allocator. See the module docs for the memory bound; costs are given per method.
#[derive(Debug, Clone)]
pub struct Allocator {
    pool: Pool,
    quarantine_ms: u64,
    /// Never-used blocks as maximal disjoint runs, start -> length. Released blocks keep their release
    /// time and never come back here; only a withheld never-used block returns when its claim ends.
    never_used: BTreeMap<u32, u32>,
    /// Blocks of active leases.
    active: BTreeSet<u32>,
    /// Released blocks, index -> release key.
    released: BTreeMap<u32, RelKey>,
    /// The same blocks ordered for reuse: least recently released first.
    released_order: BTreeSet<(RelKey, u32)>,
    /// Blocks another id owner claims, whatever their state.
    foreign: BTreeSet<u32>,
    /// Foreign blocks that are not active, index -> what they were: `None` never used, `Some(key)`
    /// released with that key. They are in neither `never_used` nor `released`.
    withheld: BTreeMap<u32, Option<RelKey>>,
}

impl Allocator {
    /// An allocator with every block of `pool` never used.
    pub fn new(pool: Pool, quarantine_ms: u64) -> Allocator {
        let mut never_used = BTreeMap::new();
        // A valid pool has at least one block; the guard keeps the "no empty runs" invariant even so.
        if pool.blocks() > 0 {
            never_used.insert(0, pool.blocks());
        }
        Allocator {
            pool,
            quarantine_ms,
            never_used,
            active: BTreeSet::new(),
            released: BTreeMap::new(),
            released_order: BTreeSet::new(),
            foreign: BTreeSet::new(),
            withheld: BTreeMap::new(),
        }
    }

    /// The pool this allocator hands out.
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// How long a released block is withheld before reuse, so that files a dead container left behind
    /// are not inherited by the next tenant of the same ids.
    pub fn quarantine_ms(&self) -> u64 {
        self.quarantine_ms
    }

    /// Rebuild: records `first..first+count` as active. Err(Busy) if a block is already active,
    /// Err(OutOfPool) outside the pool. Replay released leases before active ones: a block that was
    /// released and later leased again ends up active.
    pub fn mark_active(&mut self, first: u32, count: u32) -> Result<(), AllocError> {
        self.claim(first, count)
    }

    /// Rebuild: records `first..first+count` as released at `released_at_ms`. Err(Busy) if a block is
    /// active. A block released several times keeps its newest release time, since the quarantine is
    /// about its most recent tenant.
    pub fn mark_released(
        &mut self,
        first: u32,
        count: u32,
        released_at_ms: u64,
    ) -> Result<(), AllocError> {
        let end = self.span(first, count)?;
        if let Some(block) = self.first_active(first, end) {
            return Err(AllocError::Busy { block });
        }
        if let Some((&block, _)) = self.withheld.range(first..end).next() {
            return Err(AllocError::Withheld { block });
        }
        self.carve_never_used(first, end);
        for idx in first..end {
            let key = match self.released.get(&idx) {
                Some(&old) => old.max(Some(released_at_ms)),
                None => Some(released_at_ms),
            };
            self.set_released(idx, key);
        }
        Ok(())
    }

    /// Picks `count` consecutive blocks and marks them Active. Preference: never-used blocks first
    /// (lowest first-fit); then released blocks whose quarantine is over (released_at_ms +
    /// quarantine_ms <= now_ms, or purged), the least recently released first. Never returns an Active
    /// block or one still in quarantine. Err(Exhausted) when nothing fits.
    ///
    /// Cost for `count == 1`: O(log n). For `count > 1`: O(never-used runs) for the first-fit, then,
    /// only if that fails, one pass over the never-used runs and released blocks that picks, among all
    /// windows of `count` available blocks, the one whose newest release is oldest (lowest start on
    /// ties): O(runs + released).
    pub fn allocate(&mut self, count: u32, now_ms: u64) -> Result<u32, AllocError> {
        if count == 0 {
            return Err(AllocError::ZeroCount);
        }
        let first = self
            .pick_never_used(count)
            .or_else(|| self.pick_released(count, now_ms))
            .ok_or(AllocError::Exhausted { count })?;
        // The pick lies inside the pool by construction; `span` re-checks rather than trusts that.
        let end = self.span(first, count)?;
        self.take(first, end);
        Ok(first)
    }

    /// Takes exactly these blocks (sticky re-use of a released name's old range, quarantine ignored:
    /// the same tenant gets its own ids back) if none is Active; else Err(Busy{block}) naming the lowest
    /// active block.
    ///
    /// Rebuilding (`mark_active`) also comes here: a withheld block is refused with
    /// Err(Withheld{block}), so apply [`Allocator::set_foreign`] after a rebuild, not before.
    pub fn claim(&mut self, first: u32, count: u32) -> Result<(), AllocError> {
        let end = self.span(first, count)?;
        if let Some(block) = self.first_active(first, end) {
            return Err(AllocError::Busy { block });
        }
        if let Some((&block, _)) = self.withheld.range(first..end).next() {
            return Err(AllocError::Withheld { block });
        }
        self.take(first, end);
        Ok(())
    }

    /// Active -> Released(now_ms); with `purge`, released without quarantine so they are reusable at
    /// once (still after never-used blocks). Err(NotActive{block}) naming the lowest block that is not
    /// active, and then nothing changes.
    pub fn release(
        &mut self,
        first: u32,
        count: u32,
        now_ms: u64,
        purge: bool,
    ) -> Result<(), AllocError> {
        let end = self.span(first, count)?;
        if let Some(block) = (first..end).find(|idx| !self.active.contains(idx)) {
            return Err(AllocError::NotActive { block });
        }
        let key = if purge { None } else { Some(now_ms) };
        for idx in first..end {
            self.active.remove(&idx);
            if self.foreign.contains(&idx) {
                self.withheld.insert(idx, Some(key));
            } else {
                self.set_released(idx, key);
            }
        }
        Ok(())
    }

    /// Ends the quarantine of released blocks in `first..first+count` (an operator's "this range is
    /// clean"): they become reusable at once, still after never-used blocks. Never-used blocks stay
    /// as they are. Err(Busy{block}) if a block is Active, and then nothing changes.
    pub fn purge(&mut self, first: u32, count: u32) -> Result<(), AllocError> {
        let end = self.span(first, count)?;
        if let Some(block) = self.first_active(first, end) {
            return Err(AllocError::Busy { block });
        }
        for idx in first..end {
            if self.released.contains_key(&idx) {
                self.set_released(idx, None);
            }
            if let Some(prior @ Some(_)) = self.withheld.get_mut(&idx) {
                *prior = Some(None);
            }
        }
        Ok(())
    }

    /// Replaces the set of foreign blocks (indices; those outside the pool are ignored). Newly
    /// foreign blocks that are not active become withheld; blocks no longer foreign return to what
    /// they were. Returns the foreign blocks that are active: conflicts for the caller to report.
    /// O((old + new foreign) log n).
    pub fn set_foreign(&mut self, blocks: &BTreeSet<u32>) -> Vec<u32> {
        let total = self.pool.blocks();
        let fresh: BTreeSet<u32> = blocks.range(..total).copied().collect();
        let gone: Vec<u32> = self.foreign.difference(&fresh).copied().collect();
        for idx in gone {
            match self.withheld.remove(&idx) {
                Some(None) => self.add_never_used(idx),
                Some(Some(key)) => self.set_released(idx, key),
                None => {}
            }
        }
        for &idx in &fresh {
            if self.active.contains(&idx) || self.withheld.contains_key(&idx) {
                continue;
            }
            if let Some(key) = self.released.remove(&idx) {
                self.released_order.remove(&(key, idx));
                self.withheld.insert(idx, Some(key));
            } else {
                self.carve_never_used(idx, idx.saturating_add(1));
                self.withheld.insert(idx, None);
            }
        }
        self.foreign = fresh;
        self.conflicts()
    }

    /// Foreign blocks that are active, lowest first.
    pub fn conflicts(&self) -> Vec<u32> {
        self.foreign.intersection(&self.active).copied().collect()
    }

    /// The foreign blocks, as last given to [`Allocator::set_foreign`].
    pub fn foreign(&self) -> &BTreeSet<u32> {
        &self.foreign
    }

    /// Whether `first..first+count` lies in the pool with no Active block (quarantine ignored, as for
    /// [`Allocator::claim`]). False for a count of 0.
    pub fn is_free_for(&self, first: u32, count: u32) -> bool {
        match self.span(first, count) {
            Ok(end) => {
                self.first_active(first, end).is_none()
                    && self.withheld.range(first..end).next().is_none()
            }
            Err(_) => false,
        }
    }

    /// Block tallies at `now_ms`. O(released).
    pub fn counts(&self, now_ms: u64) -> PoolCounts {
        let total = self.pool.blocks();
        // Both are bounded by `total` (a u32) because every tracked block is inside the pool.
        let active = u32::try_from(self.active.len()).unwrap_or(u32::MAX);
        let quarantined = u32::try_from(
            self.released
                .values()
                .filter(|&&key| !self.quarantine_over(key, now_ms))
                .count(),
        )
        .unwrap_or(u32::MAX);
        let withheld = u32::try_from(self.withheld.len()).unwrap_or(u32::MAX);
        let free = total
            .saturating_sub(active)
            .saturating_sub(quarantined)
            .saturating_sub(withheld);
        PoolCounts {
            total,
            active,
            quarantined,
            withheld,
            free,
        }
    }

    /// State of block `idx`, `None` outside the pool. O(log n).
    pub fn block_state(&self, idx: u32) -> Option<BlockState> {
        if idx >= self.pool.blocks() {
            return None;
        }
        if self.active.contains(&idx) {
            return Some(BlockState::Active);
        }
        if let Some(&key) = self.released.get(&idx) {
            return Some(BlockState::Released(key.unwrap_or(0)));
        }
        if self.withheld.contains_key(&idx) {
            return Some(BlockState::Withheld);
        }
        Some(BlockState::Free)
    }

    /// Validates a span and returns its exclusive end.
    fn span(&self, first: u32, count: u32) -> Result<u32, AllocError> {
        if count == 0 {
            return Err(AllocError::ZeroCount);
        }
        match first.checked_add(count) {
            Some(end) if end <= self.pool.blocks() => Ok(end),
            _ => Err(AllocError::OutOfPool { first, count }),
        }
    }

    fn first_active(&self, first: u32, end: u32) -> Option<u32> {
        self.active.range(first..end).next().copied()
    }

    fn quarantine_over(&self, key: RelKey, now_ms: u64) -> bool {
        match key {
            None => true,
            // An end of quarantine past u64::MAX is never reached.
            Some(at) => at
                .checked_add(self.quarantine_ms)
                .is_some_and(|over_at| over_at <= now_ms),
        }
    }

    fn set_released(&mut self, idx: u32, key: RelKey) {
        if let Some(old) = self.released.insert(idx, key) {
            self.released_order.remove(&(old, idx));
        }
        self.released_order.insert((key, idx));
    }

    /// Marks `first..end` active, whatever their previous state.
    fn take(&mut self, first: u32, end: u32) {
        self.carve_never_used(first, end);
        let reused: Vec<(u32, RelKey)> = self
            .released
            .range(first..end)
            .map(|(&idx, &key)| (idx, key))
            .collect();
        for (idx, key) in reused {
            self.released.remove(&idx);
            self.released_order.remove(&(key, idx));
        }
        self.active.extend(first..end);
    }

    /// Removes `first..end` from the never-used runs, splitting runs that straddle either edge.
    fn carve_never_used(&mut self, first: u32, end: u32) {
        // A run that starts before `first` may reach into the span.
        if let Some((&start, &len)) = self.never_used.range(..first).next_back() {
            let run_end = run_end(start, len);
            if run_end > u64::from(first) {
                // first > start here, so the left part is non-empty.
                self.never_used.insert(start, first.saturating_sub(start));
                self.insert_tail(end, run_end);
            }
        }
        let inside: Vec<(u32, u32)> = self
            .never_used
            .range(first..end)
            .map(|(&s, &l)| (s, l))
            .collect();
        for (start, len) in inside {
            self.never_used.remove(&start);
            self.insert_tail(end, run_end(start, len));
        }
    }

    /// Returns one block to the never-used runs, merging it with the runs on either side so runs
    /// stay maximal.
    fn add_never_used(&mut self, idx: u32) {
        let mut start = idx;
        let mut len = 1u32;
        if let Some((&s, &l)) = self.never_used.range(..idx).next_back()
            && run_end(s, l) == u64::from(idx)
        {
            start = s;
            len = l.saturating_add(1);
        }
        if let Some(next) = idx.checked_add(1)
            && let Some(l) = self.never_used.remove(&next)
        {
            len = len.saturating_add(l);
        }
        self.never_used.insert(start, len);
    }

    /// Re-inserts the part `end..run_end` of a carved run, if any.
    fn insert_tail(&mut self, end: u32, run_end: u64) {
        if let Some(len) = run_end
            .checked_sub(u64::from(end))
            .and_then(|l| u32::try_from(l).ok())
            .filter(|&l| l > 0)
        {
            self.never_used.insert(end, len);
        }
    }

    /// Lowest first-fit among never-used runs.
    fn pick_never_used(&self, count: u32) -> Option<u32> {
        if count == 1 {
            // Runs are never empty, so the first run's start is the lowest never-used block.
            return self.never_used.keys().next().copied();
        }
        self.never_used
            .iter()
            .find(|&(_, &len)| len >= count)
            .map(|(&start, _)| start)
    }

    /// Best window of `count` available blocks that includes released ones.
    fn pick_released(&self, count: u32, now_ms: u64) -> Option<u32> {
        if count == 1 {
            // The least recently released block is the first in order; if its quarantine is not over,
            // no other block's is either (purged blocks sort first and are always over).
            let &(key, idx) = self.released_order.first()?;
            return self.quarantine_over(key, now_ms).then_some(idx);
        }
        self.scan_windows(count, now_ms)
    }

    /// Walks the available blocks (never-used runs and released blocks out of quarantine) in index
    /// order, grouping them into maximal runs, and scores each window of `count` blocks by its newest
    /// release. Returns the start of the window with the oldest newest-release, lowest start on ties.
    fn scan_windows(&self, count: u32, now_ms: u64) -> Option<u32> {
        let mut runs = self.never_used.iter().map(|(&s, &l)| (s, l)).peekable();
        let mut rels = self
            .released
            .iter()
            .filter(|&(_, &key)| self.quarantine_over(key, now_ms))
            .map(|(&idx, &key)| (idx, key))
            .peekable();
        let mut best: Option<(Option<RelKey>, u32)> = None;
        // Current maximal run of available blocks: [start, end) and its released blocks in order.
        let mut cur: Option<(u32, u64)> = None;
        let mut cur_rels: Vec<(u32, RelKey)> = Vec::new();
        loop {
            // Next segment in index order; never-used runs and released blocks are disjoint.
            let take_run = match (runs.peek(), rels.peek()) {
                (Some(&(s, _)), Some(&(i, _))) => s < i,
                (Some(_), None) => true,
                (None, Some(_)) => false,
                (None, None) => break,
            };
            let (seg_start, seg_end, rel) = if take_run {
                let Some((s, l)) = runs.next() else { break };
                (s, run_end(s, l), None)
            } else {
                let Some((i, key)) = rels.next() else { break };
                (i, wide_end(i, 1), Some((i, key)))
            };
            match cur {
                Some((start, end)) if end == u64::from(seg_start) => cur = Some((start, seg_end)),
                _ => {
                    if let Some((start, end)) = cur {
                        best_in_run(start, end, &cur_rels, count, &mut best);
                    }
                    cur = Some((seg_start, seg_end));
                    cur_rels.clear();
                }
            }
            if let Some(r) = rel {
                cur_rels.push(r);
            }
        }
        if let Some((start, end)) = cur {
            best_in_run(start, end, &cur_rels, count, &mut best);
        }
        best.map(|(_, start)| start)
    }
}

fn run_end(start: u32, len: u32) -> u64 {
    wide_end(start, len)
}

/// Scores the windows of `count` blocks inside one maximal available run `[start, end)`, whose
/// released blocks are `rels` (sorted by index), updating `best` with `(newest release, start)`.
///
/// Only the run's start and the positions just after a released block can be the lowest start of a
/// best window: moving a window right by one can only lower its newest release when a released block
/// leaves it. A monotonic deque gives each candidate's maximum in amortised O(1), so the run costs
/// O(released in run), independent of its length.
fn best_in_run(
    start: u32,
    end: u64,
    rels: &[(u32, RelKey)],
    count: u32,
    best: &mut Option<(Option<RelKey>, u32)>,
) {
    let count = u64::from(count);
    let candidates =
        std::iter::once(u64::from(start)).chain(rels.iter().map(|&(idx, _)| wide_end(idx, 1)));
    // Indices into `rels`, their keys strictly decreasing from front to back.
    let mut deque: VecDeque<usize> = VecDeque::new();
    let mut hi = 0;
    for p in candidates {
        // p <= 2^32 and count < 2^32, so this never saturates.
        let window_end = p.saturating_add(count);
        if window_end > end {
            // Candidates only grow, so no later one fits either.
            break;
        }
        while let Some(&(idx, key)) = rels.get(hi) {
            if u64::from(idx) >= window_end {
                break;
            }
            while deque
                .back()
                .and_then(|&b| rels.get(b))
                .is_some_and(|&(_, k)| k <= key)
            {
                deque.pop_back();
            }
            deque.push_back(hi);
            hi = hi.saturating_add(1);
        }
        while deque
            .front()
            .and_then(|&f| rels.get(f))
            .is_some_and(|&(idx, _)| u64::from(idx) < p)
        {
            deque.pop_front();
        }
        let newest = deque.front().and_then(|&f| rels.get(f)).map(|&(_, k)| k);
        let Ok(p32) = u32::try_from(p) else { break };
        if best.is_none_or(|b| (newest, p32) < b) {
            *best = Some((newest, p32));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool::{FORBIDDEN_IDS, PoolSpec};
    use proptest::prelude::*;

    fn pool(blocks: u32) -> Pool {
        Pool::new(PoolSpec {
            base: 65536,
            size: blocks,
            block: 1,
        })
        .expect("valid pool")
    }

    #[test]
    fn never_used_first_then_oldest_release() {
        let mut a = Allocator::new(pool(4), 100);
        assert_eq!(a.allocate(1, 0), Ok(0));
        assert_eq!(a.allocate(2, 0), Ok(1));
        assert_eq!(a.release(0, 1, 10, false), Ok(()));
        // Block 3 is never used: preferred over released block 0 even after its quarantine.
        assert_eq!(a.allocate(1, 1000), Ok(3));
        assert_eq!(a.release(1, 2, 20, false), Ok(()));
        // 0 in quarantine until 110, 1-2 until 120.
        assert_eq!(a.allocate(1, 109), Err(AllocError::Exhausted { count: 1 }));
        assert_eq!(a.allocate(1, 110), Ok(0));
        assert_eq!(a.allocate(2, 119), Err(AllocError::Exhausted { count: 2 }));
        assert_eq!(a.allocate(2, 120), Ok(1));
        assert_eq!(
            a.allocate(1, 10_000),
            Err(AllocError::Exhausted { count: 1 })
        );
        assert_eq!(
            a.counts(10_000),
            PoolCounts {
                total: 4,
                active: 4,
                quarantined: 0,
                withheld: 0,
                free: 0
            }
        );
    }

    #[test]
    fn purge_is_reusable_at_once_even_at_time_zero() {
        let mut a = Allocator::new(pool(2), 1000);
        assert_eq!(a.allocate(2, 0), Ok(0));
        assert_eq!(a.release(1, 1, 0, true), Ok(()));
        assert_eq!(a.release(0, 1, 0, false), Ok(()));
        assert_eq!(a.block_state(0), Some(BlockState::Released(0)));
        assert_eq!(a.block_state(1), Some(BlockState::Released(0)));
        assert_eq!(
            a.counts(0),
            PoolCounts {
                total: 2,
                active: 0,
                quarantined: 1,
                withheld: 0,
                free: 1
            }
        );
        assert_eq!(a.allocate(1, 0), Ok(1));
        assert_eq!(a.allocate(1, 999), Err(AllocError::Exhausted { count: 1 }));
        assert_eq!(a.allocate(1, 1000), Ok(0));
    }

    #[test]
    fn errors_table() {
        let mut a = Allocator::new(pool(5), 0);
        assert_eq!(a.allocate(2, 0), Ok(0));
        type Case = (&'static str, Result<(), AllocError>, Result<(), AllocError>);
        let cases: Vec<Case> = vec![
            ("zero", a.clone().claim(0, 0), Err(AllocError::ZeroCount)),
            (
                "outside",
                a.clone().claim(4, 2),
                Err(AllocError::OutOfPool { first: 4, count: 2 }),
            ),
            (
                "wrapping",
                a.clone().claim(u32::MAX, 2),
                Err(AllocError::OutOfPool {
                    first: u32::MAX,
                    count: 2,
                }),
            ),
            (
                "busy",
                a.clone().claim(1, 3),
                Err(AllocError::Busy { block: 1 }),
            ),
            ("claim free", a.clone().claim(2, 3), Ok(())),
            (
                "mark busy",
                a.clone().mark_active(0, 1),
                Err(AllocError::Busy { block: 0 }),
            ),
            (
                "mark released busy",
                a.clone().mark_released(1, 2, 5),
                Err(AllocError::Busy { block: 1 }),
            ),
            (
                "release not active",
                a.clone().release(1, 2, 5, false),
                Err(AllocError::NotActive { block: 2 }),
            ),
            (
                "release zero",
                a.clone().release(0, 0, 5, false),
                Err(AllocError::ZeroCount),
            ),
            (
                "release outside",
                a.clone().release(5, 1, 5, false),
                Err(AllocError::OutOfPool { first: 5, count: 1 }),
            ),
            ("release ok", a.clone().release(0, 2, 5, true), Ok(())),
        ];
        for (name, got, want) in cases {
            assert_eq!(got, want, "{name}");
        }
        assert_eq!(a.clone().allocate(0, 0), Err(AllocError::ZeroCount));
        assert_eq!(
            a.clone().allocate(4, 0),
            Err(AllocError::Exhausted { count: 4 })
        );
        assert_eq!(
            a.clone().allocate(u32::MAX, 0),
            Err(AllocError::Exhausted { count: u32::MAX })
        );
        // A failed release changes nothing.
        let before = a.counts(0);
        assert!(a.release(0, 3, 0, false).is_err());
        assert_eq!(a.counts(0), before);
        assert!(a.is_free_for(2, 3));
        assert!(!a.is_free_for(1, 1));
        assert!(!a.is_free_for(2, 0));
        assert!(!a.is_free_for(4, 2));
        for e in [
            AllocError::Exhausted { count: 3 },
            AllocError::OutOfPool { first: 4, count: 2 },
            AllocError::Busy { block: 7 },
            AllocError::ZeroCount,
            AllocError::NotActive { block: 9 },
            AllocError::Withheld { block: 3 },
        ] {
            assert!(!e.to_string().is_empty());
        }
    }

    #[test]
    fn sticky_claim_ignores_quarantine() {
        let mut a = Allocator::new(pool(3), 1_000_000);
        assert_eq!(a.allocate(2, 0), Ok(0));
        assert_eq!(a.release(0, 2, 10, false), Ok(()));
        assert!(a.is_free_for(0, 2));
        assert_eq!(a.claim(0, 2), Ok(()));
        assert_eq!(a.block_state(0), Some(BlockState::Active));
        assert_eq!(a.block_state(2), Some(BlockState::Free));
        assert_eq!(a.block_state(3), None);
    }

    #[test]
    fn purge_ends_quarantine_of_released_blocks_only() {
        let mut a = Allocator::new(pool(3), 1_000);
        assert_eq!(a.allocate(1, 10), Ok(0));
        assert_eq!(a.allocate(1, 10), Ok(1));
        assert_eq!(a.release(0, 1, 20, false), Ok(()));
        assert_eq!(a.allocate(1, 30), Ok(2), "never-used first");
        assert_eq!(a.allocate(1, 30), Err(AllocError::Exhausted { count: 1 }));
        assert_eq!(
            a.purge(0, 2),
            Err(AllocError::Busy { block: 1 }),
            "block 1 is active"
        );
        assert_eq!(a.purge(0, 1), Ok(()));
        assert_eq!(a.block_state(0), Some(BlockState::Released(0)));
        assert_eq!(
            a.allocate(1, 30),
            Ok(0),
            "purged block reusable before its quarantine ends"
        );
    }

    #[test]
    fn rebuild_keeps_newest_release() {
        let mut a = Allocator::new(pool(6), 50);
        assert_eq!(a.mark_released(0, 3, 100), Ok(()));
        assert_eq!(a.mark_released(1, 1, 10), Ok(()));
        assert_eq!(a.mark_released(2, 2, 200), Ok(()));
        assert_eq!(a.mark_active(1, 1), Ok(()));
        assert_eq!(a.mark_active(1, 1), Err(AllocError::Busy { block: 1 }));
        assert_eq!(
            a.mark_active(5, 2),
            Err(AllocError::OutOfPool { first: 5, count: 2 })
        );
        let states: Vec<_> = (0..6).filter_map(|i| a.block_state(i)).collect();
        assert_eq!(
            states,
            vec![
                BlockState::Released(100),
                BlockState::Active,
                BlockState::Released(200),
                BlockState::Released(200),
                BlockState::Free,
                BlockState::Free,
            ]
        );
        assert_eq!(a.allocate(2, 0), Ok(4));
        assert_eq!(a.allocate(1, 149), Err(AllocError::Exhausted { count: 1 }));
        assert_eq!(a.allocate(1, 150), Ok(0));
    }

    #[test]
    fn multi_block_reuse_prefers_oldest_newest_release() {
        // Released at: 0:10 1:50 2:20 3:30 4:40; all out of quarantine at 1000.
        let mut a = Allocator::new(pool(5), 0);
        for (idx, at) in [(0, 10), (1, 50), (2, 20), (3, 30), (4, 40)] {
            assert_eq!(a.mark_released(idx, 1, at), Ok(()));
        }
        // Windows of 2: [0,1]=50 [1,2]=50 [2,3]=30 [3,4]=40 -> 2.
        assert_eq!(a.clone().allocate(2, 1000), Ok(2));
        // Windows of 3: 50, 50, 40 -> 2.
        assert_eq!(a.clone().allocate(3, 1000), Ok(2));
        assert_eq!(a.clone().allocate(5, 1000), Ok(0));
        assert_eq!(a.allocate(1, 1000), Ok(0));
    }

    #[test]
    fn foreign_blocks_are_withheld_and_come_back() {
        let mut a = Allocator::new(pool(5), 100);
        assert_eq!(a.allocate(2, 0), Ok(0));
        assert_eq!(a.release(1, 1, 10, false), Ok(()));
        // 0 active (conflict), 1 released, 2 never used: 1 and 2 withheld.
        let foreign = BTreeSet::from([0, 1, 2, 99]);
        assert_eq!(a.set_foreign(&foreign), vec![0]);
        assert_eq!(a.block_state(0), Some(BlockState::Active));
        assert_eq!(a.block_state(1), Some(BlockState::Withheld));
        assert_eq!(a.block_state(2), Some(BlockState::Withheld));
        assert_eq!(a.counts(1000).withheld, 2);
        assert_eq!(a.counts(1000).free, 2);
        assert_eq!(
            a.allocate(1, 1000),
            Ok(3),
            "withheld never-used block skipped"
        );
        assert_eq!(a.claim(1, 1), Err(AllocError::Withheld { block: 1 }));
        assert!(!a.is_free_for(2, 1));
        // Releasing the conflicting lease withholds its block instead of freeing it.
        assert_eq!(a.release(0, 1, 20, false), Ok(()));
        assert_eq!(a.block_state(0), Some(BlockState::Withheld));
        assert_eq!(a.conflicts(), Vec::<u32>::new());
        assert_eq!(a.allocate(1, 1000), Ok(4));
        assert_eq!(a.allocate(1, 1000), Err(AllocError::Exhausted { count: 1 }));
        // The claim goes away: each block is back as it was (2 never used, 0 and 1 released).
        assert_eq!(a.set_foreign(&BTreeSet::new()), Vec::<u32>::new());
        assert_eq!(a.block_state(0), Some(BlockState::Released(20)));
        assert_eq!(a.block_state(1), Some(BlockState::Released(10)));
        assert_eq!(a.block_state(2), Some(BlockState::Free));
        assert_eq!(a.allocate(1, 1000), Ok(2), "never-used first");
        assert_eq!(a.allocate(1, 1000), Ok(1), "then least recently released");
    }

    #[test]
    fn big_pool_stays_small() {
        // A block size of 1 over most of the id space: nothing may be sized by the pool.
        let p = Pool::new(PoolSpec {
            base: 65536,
            size: u32::MAX - 65536,
            block: 1,
        })
        .expect("valid");
        let mut a = Allocator::new(p, 0);
        for i in 0..1000 {
            assert_eq!(a.allocate(1, 0), Ok(i));
        }
        assert_eq!(a.release(500, 1, 0, false), Ok(()));
        assert_eq!(a.allocate(3, 0), Ok(1000));
        let c = a.counts(0);
        assert_eq!(c.total, u32::MAX - 65536);
        assert_eq!(c.active, 1002);
        assert_eq!(c.free, u32::MAX - 65536 - 1002);
    }

    // ---- model-based property test ----

    #[derive(Debug, Clone, Copy, PartialEq)]
    enum M {
        Free,
        Active,
        Rel(RelKey),
    }

    #[derive(Debug, Clone)]
    enum Op {
        Alloc(u32),
        Release(usize, bool),
        ClaimOld(usize),
        ClaimAny(u32, u32),
        ReleaseAny(u32, u32),
        Advance(u64),
        Rebuild,
        Foreign(Vec<u32>),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (1u32..=4).prop_map(Op::Alloc),
            3 => (any::<usize>(), any::<bool>()).prop_map(|(i, p)| Op::Release(i, p)),
            1 => any::<usize>().prop_map(Op::ClaimOld),
            1 => (0u32..45, 0u32..=5).prop_map(|(f, c)| Op::ClaimAny(f, c)),
            1 => (0u32..45, 0u32..=5).prop_map(|(f, c)| Op::ReleaseAny(f, c)),
            2 => (0u64..=60).prop_map(Op::Advance),
            1 => Just(Op::Rebuild),
            1 => prop::collection::vec(0u32..45, 0..4).prop_map(Op::Foreign),
        ]
    }

    /// (blocks, block size, base) for a valid pool, sometimes right at the top of the id space.
    fn pool_params() -> impl Strategy<Value = (u32, u32, u32)> {
        (
            1u32..=40,
            prop::sample::select(vec![1u32, 7, 65536]),
            0u32..=1000,
            any::<bool>(),
        )
            .prop_map(|(blocks, block, off, top)| {
                let size = blocks * block;
                let min_k = 65536u32.div_ceil(block);
                let max_k = (u32::MAX - size) / block;
                let k = if top { max_k } else { (min_k + off).min(max_k) };
                (blocks, block, k * block)
            })
    }

    struct Model {
        q: u64,
        blocks: Vec<M>,
        leases: Vec<(u32, u32)>,
        history: Vec<(u32, u32)>,
        foreign: BTreeSet<u32>,
    }

    impl Model {
        fn withheld(&self, i: u32) -> bool {
            self.foreign.contains(&i) && self.blocks[i as usize] != M::Active
        }

        fn clear(&self, p: u32, count: u32) -> bool {
            (p..p + count).all(|i| !self.foreign.contains(&i))
        }

        fn over(&self, m: M, now: u64) -> bool {
            match m {
                M::Free => true,
                M::Active => false,
                M::Rel(None) => true,
                M::Rel(Some(at)) => at.checked_add(self.q).is_some_and(|t| t <= now),
            }
        }

        fn window(&self, p: u32, count: u32) -> &[M] {
            &self.blocks[p as usize..(p + count) as usize]
        }

        /// Brute force over every window: never-used lowest first, else (newest release, start).
        fn expect_alloc(&self, count: u32, now: u64) -> Option<u32> {
            let n = self.blocks.len() as u32;
            if count > n {
                return None;
            }
            let starts = 0..=(n - count);
            if let Some(p) = starts.clone().find(|&p| {
                self.clear(p, count) && self.window(p, count).iter().all(|&m| m == M::Free)
            }) {
                return Some(p);
            }
            starts
                .filter(|&p| {
                    self.clear(p, count) && self.window(p, count).iter().all(|&m| self.over(m, now))
                })
                .map(|p| {
                    let newest = self
                        .window(p, count)
                        .iter()
                        .filter_map(|&m| match m {
                            M::Rel(k) => Some(k),
                            _ => None,
                        })
                        .max();
                    (newest, p)
                })
                .min()
                .map(|(_, p)| p)
        }

        fn counts(&self, now: u64) -> PoolCounts {
            let total = self.blocks.len() as u32;
            let active = self.blocks.iter().filter(|&&m| m == M::Active).count() as u32;
            let withheld = (0..total).filter(|&i| self.withheld(i)).count() as u32;
            let quarantined = (0..total)
                .filter(|&i| {
                    let m = self.blocks[i as usize];
                    !self.withheld(i) && matches!(m, M::Rel(_)) && !self.over(m, now)
                })
                .count() as u32;
            PoolCounts {
                total,
                active,
                quarantined,
                withheld,
                free: total - active - quarantined - withheld,
            }
        }

        fn span_err(&self, first: u32, count: u32) -> Option<AllocError> {
            if count == 0 {
                Some(AllocError::ZeroCount)
            } else if first as usize + count as usize > self.blocks.len() {
                Some(AllocError::OutOfPool { first, count })
            } else {
                None
            }
        }

        fn expect_claim(&self, first: u32, count: u32) -> Result<(), AllocError> {
            if let Some(e) = self.span_err(first, count) {
                return Err(e);
            }
            if let Some(block) =
                (first..first + count).find(|&i| self.blocks[i as usize] == M::Active)
            {
                return Err(AllocError::Busy { block });
            }
            match (first..first + count).find(|&i| self.withheld(i)) {
                Some(block) => Err(AllocError::Withheld { block }),
                None => Ok(()),
            }
        }

        fn set(&mut self, first: u32, count: u32, m: M) {
            for i in first..first + count {
                self.blocks[i as usize] = m;
            }
        }
    }

    fn check(a: &Allocator, m: &Model, now: u64) -> Result<(), TestCaseError> {
        let pool = a.pool();
        for (i, &want) in m.blocks.iter().enumerate() {
            let want = match want {
                _ if m.withheld(i as u32) => BlockState::Withheld,
                M::Free => BlockState::Free,
                M::Active => BlockState::Active,
                M::Rel(k) => BlockState::Released(k.unwrap_or(0)),
            };
            prop_assert_eq!(a.block_state(i as u32), Some(want), "block {}", i);
        }
        prop_assert_eq!(a.counts(now), m.counts(now));
        let mut ranges = Vec::new();
        for &(first, count) in &m.leases {
            let r = pool.blocks_range(first, count);
            prop_assert!(r.is_some(), "lease {}+{} outside pool", first, count);
            let r = r.ok_or_else(|| TestCaseError::fail("unreachable"))?;
            prop_assert!(pool.range().contains_range(&r));
            for id in FORBIDDEN_IDS {
                prop_assert!(!r.contains(id), "lease {} holds forbidden id {}", r, id);
            }
            for other in &ranges {
                prop_assert!(!r.overlaps(other), "{} overlaps {}", r, other);
            }
            ranges.push(r);
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]
        #[test]
        fn allocator_matches_model(
            (blocks, block, base) in pool_params(),
            q in 0u64..=100,
            ops in prop::collection::vec(op(), 1..80),
        ) {
            let pool = Pool::new(PoolSpec { base, size: blocks * block, block })
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(pool.blocks(), blocks);
            let mut a = Allocator::new(pool, q);
            let mut m = Model {
                q,
                blocks: vec![M::Free; blocks as usize],
                leases: vec![],
                history: vec![],
                foreign: BTreeSet::new(),
            };
            let mut now = 0u64;
            for op in ops {
                match op {
                    Op::Alloc(count) => {
                        let want = m.expect_alloc(count, now);
                        let got = a.allocate(count, now);
                        match want {
                            None => prop_assert_eq!(got, Err(AllocError::Exhausted { count })),
                            Some(p) => {
                                prop_assert_eq!(got, Ok(p));
                                let win = m.window(p, count).to_vec();
                                prop_assert!(win.iter().all(|&b| m.over(b, now)), "quarantined block handed out");
                                prop_assert!(m.clear(p, count), "withheld block handed out");
                                let any_free_fit = (0..=blocks - count)
                                    .any(|s| m.clear(s, count) && m.window(s, count).iter().all(|&b| b == M::Free));
                                if any_free_fit {
                                    prop_assert!(win.iter().all(|&b| b == M::Free), "released preferred over never-used");
                                }
                                m.set(p, count, M::Active);
                                m.leases.push((p, count));
                            }
                        }
                    }
                    Op::Release(i, purge) => {
                        if m.leases.is_empty() { continue; }
                        let (first, count) = m.leases.remove(i % m.leases.len());
                        prop_assert_eq!(a.release(first, count, now, purge), Ok(()));
                        m.set(first, count, M::Rel(if purge { None } else { Some(now) }));
                        m.history.push((first, count));
                    }
                    Op::ClaimOld(i) => {
                        if m.history.is_empty() { continue; }
                        let (first, count) = m.history[i % m.history.len()];
                        let want = m.expect_claim(first, count);
                        prop_assert_eq!(a.is_free_for(first, count), want.is_ok());
                        prop_assert_eq!(a.claim(first, count), want);
                        if want.is_ok() {
                            m.set(first, count, M::Active);
                            m.leases.push((first, count));
                        }
                    }
                    Op::ClaimAny(first, count) => {
                        let want = m.expect_claim(first, count);
                        prop_assert_eq!(a.is_free_for(first, count), want.is_ok());
                        prop_assert_eq!(a.claim(first, count), want);
                        if want.is_ok() {
                            m.set(first, count, M::Active);
                            m.leases.push((first, count));
                        }
                    }
                    Op::ReleaseAny(first, count) => {
                        let want = match m.span_err(first, count) {
                            Some(e) => e,
                            None => match (first..first + count).find(|&i| m.blocks[i as usize] != M::Active) {
                                Some(block) => AllocError::NotActive { block },
                                // All active: possibly parts of several leases; not modelled.
                                None => continue,
                            },
                        };
                        prop_assert_eq!(a.release(first, count, now, false), Err(want));
                    }
                    Op::Advance(dt) => now += dt,
                    Op::Rebuild => {
                        // What the store does at start: released history first, then active leases.
                        let mut b = Allocator::new(pool, q);
                        for (i, s) in m.blocks.iter_mut().enumerate() {
                            if let M::Rel(k) = *s {
                                // The store keeps a purge as time 0; after a restart that is an
                                // ordinary release at 0.
                                let at = k.unwrap_or(0);
                                prop_assert_eq!(b.mark_released(i as u32, 1, at), Ok(()));
                                *s = M::Rel(Some(at));
                            }
                        }
                        for &(first, count) in &m.leases {
                            prop_assert_eq!(b.mark_active(first, count), Ok(()));
                        }
                        // What the lease service does after a rebuild: the watcher's claims again.
                        b.set_foreign(&m.foreign);
                        a = b;
                    }
                    Op::Foreign(picks) => {
                        let fresh: BTreeSet<u32> = picks.into_iter().filter(|&i| i < blocks).collect();
                        m.foreign = fresh.clone();
                        let want: Vec<u32> = fresh
                            .iter()
                            .copied()
                            .filter(|&i| m.blocks[i as usize] == M::Active)
                            .collect();
                        // Indices past the pool are ignored.
                        let mut given = fresh;
                        given.insert(blocks + 3);
                        prop_assert_eq!(a.set_foreign(&given), want);
                        prop_assert_eq!(a.foreign(), &m.foreign);
                    }
                }
                check(&a, &m, now)?;
            }
        }
    }
}
