//! The id pool the daemon hands out: its validation rules and block arithmetic.

use std::fmt;

use crate::range::{IdRange, wide_end};
use crate::subid::SubidEntry;

/// Ids per block: 65536 gives every container a full 16-bit id space, which is what most images expect.
pub const DEFAULT_BLOCK: u32 = 65536;
/// Default first host id, far above the ids distributions hand to real users and to /etc/subuid ranges.
pub const DEFAULT_BASE: u32 = 0x7000_0000;
/// Default block count: the pool then ends at 0x7FFE_0000, below 2^31 so ids stay positive in
/// software that still stores them as signed 32-bit integers.
pub const DEFAULT_BLOCKS: u32 = 4094;
/// Host ids a pool must never contain: root; 65535, the legacy 16-bit "nobody"/(uid_t)-1 that several
/// syscalls treat specially; and `u32::MAX`, which is (uid_t)-1, the "no change" value of setresuid(2)
/// and chown(2).
pub const FORBIDDEN_IDS: [u32; 3] = [0, 65535, u32::MAX];

/// Lowest permitted pool base: keeps the pool out of the range of ordinary system and human accounts.
const MIN_BASE: u32 = 65536;
/// Highest permitted exclusive end: the pool's last id is then at most `u32::MAX - 1`.
const MAX_END: u64 = u32::MAX as u64;

/// The configured shape of the pool, before validation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolSpec {
    /// First host id of the pool.
    pub base: u32,
    /// Number of ids (not blocks) in the pool.
    pub size: u32,
    /// Ids per block; leases are whole blocks.
    pub block: u32,
}

impl Default for PoolSpec {
    fn default() -> Self {
        PoolSpec {
            base: DEFAULT_BASE,
            // 4094 * 65536 = 0x0FFE_0000, which fits in u32.
            size: DEFAULT_BLOCKS * DEFAULT_BLOCK,
            block: DEFAULT_BLOCK,
        }
    }
}

/// Whether an id belongs to the user or the group database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdKind {
    Uid,
    Gid,
}

impl fmt::Display for IdKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            IdKind::Uid => "uid",
            IdKind::Gid => "gid",
        })
    }
}

/// A validated pool. Holds only the spec: every derived quantity is cheap to recompute.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pool {
    spec: PoolSpec,
    range: IdRange,
    blocks: u32,
}

impl Pool {
    /// Validates `spec`. Each rule has its own error so the operator is told exactly what to change.
    pub fn new(spec: PoolSpec) -> Result<Pool, PoolError> {
        let PoolSpec { base, size, block } = spec;
        if block == 0 {
            return Err(PoolError::ZeroBlock);
        }
        if base < MIN_BASE {
            return Err(PoolError::BaseTooLow { base });
        }
        // block != 0 was checked above; checked_rem keeps the division panic-free regardless.
        if base.checked_rem(block) != Some(0) {
            return Err(PoolError::BaseNotAligned { base, block });
        }
        if size == 0 {
            return Err(PoolError::ZeroSize);
        }
        if size.checked_rem(block) != Some(0) {
            return Err(PoolError::SizeNotAligned { size, block });
        }
        let end = wide_end(base, size);
        if end > MAX_END {
            return Err(PoolError::EndTooHigh { end });
        }
        let range = IdRange::new(base, size).map_err(|_| PoolError::EndTooHigh { end })?;
        // With the rules above no forbidden id can be inside (base >= 65536, end <= u32::MAX); checked
        // anyway so that loosening a rule later cannot silently hand out root or (uid_t)-1.
        if let Some(&id) = FORBIDDEN_IDS.iter().find(|&&id| range.contains(id)) {
            return Err(PoolError::ContainsForbidden { id });
        }
        Ok(Pool {
            spec,
            range,
            blocks: size.checked_div(block).unwrap_or(0),
        })
    }

    /// The spec this pool was built from.
    pub fn spec(&self) -> PoolSpec {
        self.spec
    }

    /// First host id of the pool.
    pub fn base(&self) -> u32 {
        self.spec.base
    }

    /// Ids per block.
    pub fn block(&self) -> u32 {
        self.spec.block
    }

    /// Number of blocks.
    pub fn blocks(&self) -> u32 {
        self.blocks
    }

    /// All host ids of the pool.
    pub fn range(&self) -> IdRange {
        self.range
    }

    /// Host id where block `idx` begins, `None` past the last block.
    pub fn block_start(&self, idx: u32) -> Option<u32> {
        if idx >= self.blocks {
            return None;
        }
        idx.checked_mul(self.spec.block)?
            .checked_add(self.spec.base)
    }

    /// Host ids of `count` blocks starting at block `first`; `None` if `count` is 0 or any block lies
    /// outside the pool.
    pub fn blocks_range(&self, first: u32, count: u32) -> Option<IdRange> {
        if count == 0 {
            return None;
        }
        let end = first.checked_add(count)?;
        if end > self.blocks {
            return None;
        }
        let start = self.block_start(first)?;
        let len = count.checked_mul(self.spec.block)?;
        IdRange::new(start, len).ok()
    }

    /// Index of the block holding host id `id`, `None` outside the pool.
    pub fn block_of(&self, id: u32) -> Option<u32> {
        if !self.range.contains(id) {
            return None;
        }
        id.checked_sub(self.spec.base)?.checked_div(self.spec.block)
    }

    /// Refuses a pool containing an id of the user (or group) database: a container root mapped onto a
    /// real account would own that account's files. Names the lowest conflicting id.
    pub fn check_id_conflicts(&self, kind: IdKind, ids: &[u32]) -> Result<(), PoolError> {
        match self.id_claims(kind, ids).into_iter().next() {
            Some(claim) => Err(claim.into_error()),
            None => Ok(()),
        }
    }

    /// Every entry of another owner that reaches into the pool, in file order, with the blocks it
    /// touches.
    pub fn subid_claims(
        &self,
        file: &str,
        entries: &[SubidEntry],
        own_name: &str,
    ) -> Vec<ForeignClaim> {
        entries
            .iter()
            .filter(|e| e.owner != own_name)
            .filter_map(|e| {
                // A hand-built entry may be unrepresentable; clamp it to the id space rather than
                // ignore it, so a malformed entry still counts as a claim on the ids it names.
                let room = (1u64 << 32).saturating_sub(u64::from(e.start));
                let len = u32::try_from(u64::from(e.count).min(room)).ok()?;
                let range = IdRange::new(e.start, len).ok()?;
                let blocks = self.blocks_touching(&range)?;
                Some(ForeignClaim {
                    source: ClaimSource::Subid {
                        file: file.to_owned(),
                        line: e.line,
                        owner: e.owner.clone(),
                        start: e.start,
                        count: e.count,
                    },
                    blocks,
                })
            })
            .collect()
    }

    /// Every id of the user (or group) database inside the pool, lowest first.
    pub fn id_claims(&self, kind: IdKind, ids: &[u32]) -> Vec<ForeignClaim> {
        let mut inside: Vec<u32> = ids
            .iter()
            .copied()
            .filter(|&id| self.range.contains(id))
            .collect();
        inside.sort_unstable();
        inside.dedup();
        inside
            .into_iter()
            .filter_map(|id| {
                Some(ForeignClaim {
                    source: ClaimSource::Id { kind, id },
                    blocks: (self.block_of(id)?, 1),
                })
            })
            .collect()
    }

    /// The blocks `(first, count)` that `range` overlaps, `None` when it misses the pool.
    pub fn blocks_touching(&self, range: &IdRange) -> Option<(u32, u32)> {
        if range.is_empty() || !range.overlaps(&self.range) {
            return None;
        }
        let first = self.block_of(range.start().max(self.range.start()))?;
        let last = self.block_of(range.last().min(self.range.last()))?;
        Some((first, last.checked_sub(first)?.checked_add(1)?))
    }
}

/// Another id owner's claim on ids of the pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForeignClaim {
    pub source: ClaimSource,
    /// The pool blocks it touches: `(first, count)`.
    pub blocks: (u32, u32),
}

/// Who claims ids of the pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClaimSource {
    /// A line of /etc/subuid or /etc/subgid giving ids to another owner.
    Subid {
        file: String,
        line: usize,
        owner: String,
        start: u32,
        count: u32,
    },
    /// An id of the user or group database.
    Id { kind: IdKind, id: u32 },
}

impl ForeignClaim {
    /// The start-up refusal for this claim.
    pub fn into_error(self) -> PoolError {
        match self.source {
            ClaimSource::Subid {
                file,
                line,
                owner,
                start,
                count,
            } => PoolError::OverlapsSubid {
                file,
                line,
                owner,
                start,
                count,
            },
            ClaimSource::Id { kind, id } => PoolError::OverlapsUser { kind, id },
        }
    }
}

impl fmt::Display for ClaimSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClaimSource::Subid {
                file,
                line,
                owner,
                start,
                count,
            } => write!(f, "{file} line {line} ({owner}:{start}:{count})"),
            ClaimSource::Id {
                kind: IdKind::Uid,
                id,
            } => write!(f, "uid {id} (a user of the host)"),
            ClaimSource::Id {
                kind: IdKind::Gid,
                id,
            } => write!(f, "gid {id} (a group of the host)"),
        }
    }
}

/// Why a pool spec was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PoolError {
    ZeroBlock,
    BaseNotAligned {
        base: u32,
        block: u32,
    },
    BaseTooLow {
        base: u32,
    },
    ZeroSize,
    SizeNotAligned {
        size: u32,
        block: u32,
    },
    EndTooHigh {
        end: u64,
    },
    ContainsForbidden {
        id: u32,
    },
    OverlapsSubid {
        file: String,
        line: usize,
        owner: String,
        start: u32,
        count: u32,
    },
    OverlapsUser {
        kind: IdKind,
        id: u32,
    },
}

impl fmt::Display for PoolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PoolError::ZeroBlock => write!(
                f,
                "pool block size is 0; set the block size to at least 1 (usually {DEFAULT_BLOCK})"
            ),
            PoolError::BaseNotAligned { base, block } => write!(
                f,
                "pool base {base} is not a multiple of the block size {block}; set the base to a \
                 multiple of {block}, e.g. {}",
                base.div_ceil(*block).saturating_mul(*block)
            ),
            PoolError::BaseTooLow { base } => write!(
                f,
                "pool base {base} is below {MIN_BASE}; set the base to at least {MIN_BASE} so the pool \
                 stays clear of root, nobody (65535) and ordinary accounts (default {DEFAULT_BASE})"
            ),
            PoolError::ZeroSize => write!(
                f,
                "pool size is 0 ids; set the size to a non-zero multiple of the block size"
            ),
            PoolError::SizeNotAligned { size, block } => write!(
                f,
                "pool size {size} is not a multiple of the block size {block}; set the size to a \
                 multiple of {block}, e.g. {}",
                size.checked_div(*block)
                    .unwrap_or(0)
                    .saturating_mul(*block)
                    .max(*block)
            ),
            PoolError::EndTooHigh { end } => write!(
                f,
                "pool ends at {end} (exclusive), past {MAX_END}; lower the base or the size so the \
                 pool never reaches {} ((uid_t)-1)",
                u32::MAX
            ),
            PoolError::ContainsForbidden { id } => write!(
                f,
                "pool contains the reserved id {id}; move the base or shrink the size so that \
                 ids 0, 65535 and {} stay outside",
                u32::MAX
            ),
            PoolError::OverlapsSubid {
                file,
                line,
                owner,
                start,
                count,
            } => write!(
                f,
                "pool overlaps {file} line {line} ({owner}:{start}:{count}), which gives those ids to \
                 {owner:?}; move the pool base or remove that entry"
            ),
            PoolError::OverlapsUser { kind, id } => write!(
                f,
                "pool contains {kind} {id}, which exists in the {} database; move the pool base \
                 or shrink the size so it excludes {id}",
                match kind {
                    IdKind::Uid => "user",
                    IdKind::Gid => "group",
                }
            ),
        }
    }
}

impl std::error::Error for PoolError {}

#[cfg(test)]
mod tests {
    use super::*;

    /// What start-up refuses for these entries: the first claim, as an error.
    fn first_subid_conflict(
        pool: &Pool,
        file: &str,
        entries: &[SubidEntry],
        own: &str,
    ) -> Result<(), PoolError> {
        match pool.subid_claims(file, entries, own).into_iter().next() {
            Some(claim) => Err(claim.into_error()),
            None => Ok(()),
        }
    }

    fn spec(base: u32, size: u32, block: u32) -> PoolSpec {
        PoolSpec { base, size, block }
    }

    #[test]
    fn foreign_claims_name_the_blocks_they_touch() {
        // Blocks of 100 ids: 0 = 100000..100099, 1 = 100100..100199, 2 = 100200..100299.
        let pool = Pool::new(spec(100_000, 300, 100)).expect("valid");
        let entry = |owner: &str, start, count, line| SubidEntry {
            owner: owner.into(),
            start,
            count,
            line,
        };
        let entries = [
            entry("alice", 99_950, 100, 1),   // reaches into block 0
            entry("subidd", 100_000, 300, 2), // our own entry
            entry("bob", 100_150, 100, 3),    // blocks 1 and 2
            entry("carol", 100_300, 10, 4),   // just past the pool
        ];
        let shown = |claims: Vec<ForeignClaim>| -> Vec<(String, (u32, u32))> {
            claims
                .into_iter()
                .map(|c| (c.source.to_string(), c.blocks))
                .collect()
        };
        assert_eq!(
            shown(pool.subid_claims("/etc/subuid", &entries, "subidd")),
            vec![
                ("/etc/subuid line 1 (alice:99950:100)".to_string(), (0, 1)),
                ("/etc/subuid line 3 (bob:100150:100)".to_string(), (1, 2)),
            ]
        );
        assert_eq!(
            shown(pool.id_claims(IdKind::Uid, &[5, 100_299, 100_001, 100_001])),
            vec![
                ("uid 100001 (a user of the host)".to_string(), (0, 1)),
                ("uid 100299 (a user of the host)".to_string(), (2, 1)),
            ]
        );
        assert_eq!(
            pool.check_id_conflicts(IdKind::Gid, &[100_250, 100_120]),
            Err(PoolError::OverlapsUser {
                kind: IdKind::Gid,
                id: 100_120
            })
        );
        let whole = IdRange::new(0, u32::MAX).expect("range");
        assert_eq!(pool.blocks_touching(&whole), Some((0, 3)));
        let outside = IdRange::new(100_300, 5).expect("range");
        assert_eq!(pool.blocks_touching(&outside), None);
    }

    #[test]
    fn default_pool_is_valid() {
        let pool = Pool::new(PoolSpec::default()).expect("default pool valid");
        assert_eq!(pool.base(), DEFAULT_BASE);
        assert_eq!(pool.block(), DEFAULT_BLOCK);
        assert_eq!(pool.blocks(), DEFAULT_BLOCKS);
        assert_eq!(pool.range().end(), 0x7FFE_0000);
        assert_eq!(pool.spec(), PoolSpec::default());
    }

    #[test]
    fn rules_table() {
        let top = u32::MAX - 65535; // 0xFFFF_0000
        let cases: &[(PoolSpec, Result<u64, PoolError>)] = &[
            (spec(65536, 65536, 0), Err(PoolError::ZeroBlock)),
            (
                spec(0, 65536, 65536),
                Err(PoolError::BaseTooLow { base: 0 }),
            ),
            (spec(0, 10, 1), Err(PoolError::BaseTooLow { base: 0 })),
            (
                spec(65535, 1, 1),
                Err(PoolError::BaseTooLow { base: 65535 }),
            ),
            (spec(65536, 1, 1), Ok(65537)),
            (
                spec(100_000, 65536, 65536),
                Err(PoolError::BaseNotAligned {
                    base: 100_000,
                    block: 65536,
                }),
            ),
            (spec(65536 * 2, 0, 65536), Err(PoolError::ZeroSize)),
            (
                spec(65536 * 2, 1000, 65536),
                Err(PoolError::SizeNotAligned {
                    size: 1000,
                    block: 65536,
                }),
            ),
            // Ends at exactly 2^32 - 1 exclusive: last id is u32::MAX - 1, accepted.
            (spec(top, 65535, 1), Ok(u64::from(u32::MAX))),
            (spec(65536, u32::MAX - 65536, 1), Ok(u64::from(u32::MAX))),
            (spec(0x8000_0000, 0x7FFF_FFFF, 1), Ok(u64::from(u32::MAX))),
            // Reaching u32::MAX is refused.
            (
                spec(top, 65536, 65536),
                Err(PoolError::EndTooHigh { end: 1 << 32 }),
            ),
            (
                spec(top, 65536, 1),
                Err(PoolError::EndTooHigh { end: 1 << 32 }),
            ),
            (
                spec(0xF000_0000, 0xF000_0000, 1),
                Err(PoolError::EndTooHigh { end: 0x1_E000_0000 }),
            ),
            (spec(7 * 10_000, 7 * 3, 7), Ok(70_021)),
        ];
        for (s, want) in cases {
            let got = Pool::new(*s).map(|p| p.range().end());
            assert_eq!(&got, want, "{s:?}");
        }
    }

    #[test]
    fn messages_name_value_and_remedy() {
        let cases: Vec<(PoolError, &[&str])> = vec![
            (PoolError::ZeroBlock, &["0", "set the block size"]),
            (
                PoolError::BaseNotAligned {
                    base: 100_000,
                    block: 65536,
                },
                &["100000", "65536", "131072", "set the base"],
            ),
            (
                PoolError::BaseTooLow { base: 5 },
                &[" 5 ", "at least 65536"],
            ),
            (PoolError::ZeroSize, &["0", "set the size"]),
            (
                PoolError::SizeNotAligned {
                    size: 1000,
                    block: 65536,
                },
                &["1000", "65536", "set the size"],
            ),
            (
                PoolError::EndTooHigh { end: 1 << 32 },
                &["4294967296", "lower the base"],
            ),
            (
                PoolError::ContainsForbidden { id: 65535 },
                &["65535", "move the base"],
            ),
            (
                PoolError::OverlapsSubid {
                    file: "/etc/subuid".into(),
                    line: 3,
                    owner: "alice".into(),
                    start: 100_000,
                    count: 65536,
                },
                &[
                    "/etc/subuid",
                    "line 3",
                    "alice:100000:65536",
                    "move the pool base",
                ],
            ),
            (
                PoolError::OverlapsUser {
                    kind: IdKind::Gid,
                    id: 70_000,
                },
                &["gid 70000", "group", "move the pool base"],
            ),
        ];
        for (err, wants) in cases {
            let msg = err.to_string();
            for want in wants {
                assert!(msg.contains(want), "{msg:?} should contain {want:?}");
            }
        }
        assert_eq!(IdKind::Uid.to_string(), "uid");
        assert_eq!(IdKind::Gid.to_string(), "gid");
    }

    #[test]
    fn block_maths() {
        let pool = Pool::new(spec(0x1_0000 * 7, 0x1_0000 * 4, 0x1_0000)).expect("valid");
        assert_eq!(pool.blocks(), 4);
        assert_eq!(pool.block_start(0), Some(0x7_0000));
        assert_eq!(pool.block_start(3), Some(0xA_0000));
        assert_eq!(pool.block_start(4), None);
        assert_eq!(pool.block_start(u32::MAX), None);
        assert_eq!(
            pool.blocks_range(1, 2),
            Some(IdRange::new(0x8_0000, 0x2_0000).expect("valid"))
        );
        assert_eq!(pool.blocks_range(0, 4), Some(pool.range()));
        assert_eq!(pool.blocks_range(0, 0), None);
        assert_eq!(pool.blocks_range(3, 2), None);
        assert_eq!(pool.blocks_range(u32::MAX, 2), None);
        assert_eq!(pool.block_of(0x6_FFFF), None);
        assert_eq!(pool.block_of(0x7_0000), Some(0));
        assert_eq!(pool.block_of(0x8_FFFF), Some(1));
        assert_eq!(pool.block_of(0xA_FFFF), Some(3));
        assert_eq!(pool.block_of(0xB_0000), None);

        // A pool reaching the top of the permitted space.
        let top = Pool::new(spec(0xFFFF_0000 - 65536, 65536 * 2 - 1, 1)).expect("valid");
        assert_eq!(top.block_of(u32::MAX - 1), Some(65536 * 2 - 2));
        assert_eq!(top.block_of(u32::MAX), None);
        assert_eq!(
            top.blocks_range(65536 * 2 - 2, 1),
            Some(IdRange::new(u32::MAX - 1, 1).expect("valid"))
        );
    }

    #[test]
    fn subid_conflicts() {
        let pool = Pool::new(spec(0x7000_0000, 0x10_0000, 0x1_0000)).expect("valid");
        let e = |owner: &str, start: u32, count: u32, line: usize| SubidEntry {
            owner: owner.into(),
            start,
            count,
            line,
        };
        let entries = vec![
            e("alice", 100_000, 65536, 1),
            e("subidd", 0x7000_0000, 0x10_0000, 2),
            e("bob", 0x6FFF_0000, 0x1_0000, 3), // ends exactly at base: no overlap
            e("carol", 0x7010_0000, 5, 4),      // starts exactly at end: no overlap
        ];
        assert_eq!(
            first_subid_conflict(&pool, "/etc/subuid", &entries, "subidd"),
            Ok(())
        );
        let mut bad = entries.clone();
        bad.push(e("dave", 0x700F_FFFF, 1, 5));
        bad.push(e("erin", 0x7000_0000, 1, 6));
        assert_eq!(
            first_subid_conflict(&pool, "/etc/subgid", &bad, "subidd"),
            Err(PoolError::OverlapsSubid {
                file: "/etc/subgid".into(),
                line: 5,
                owner: "dave".into(),
                start: 0x700F_FFFF,
                count: 1,
            })
        );
        // Our own entry is refused when the daemon runs under another name.
        assert!(first_subid_conflict(&pool, "/etc/subuid", &entries, "other").is_err());
        // Unrepresentable hand-built entries still count, clamped to the id space.
        let wide = vec![e("x", 0x6000_0000, u32::MAX, 9), e("y", 1, 0, 10)];
        assert!(matches!(
            first_subid_conflict(&pool, "/etc/subuid", &wide, "subidd"),
            Err(PoolError::OverlapsSubid { line: 9, .. })
        ));
        assert_eq!(
            first_subid_conflict(&pool, "/etc/subuid", &wide[1..], "subidd"),
            Ok(())
        );
    }

    #[test]
    fn user_conflicts() {
        let pool = Pool::new(spec(0x7000_0000, 0x10_0000, 0x1_0000)).expect("valid");
        assert_eq!(
            pool.check_id_conflicts(IdKind::Uid, &[0, 1000, 65534, 0x6FFF_FFFF, 0x7010_0000]),
            Ok(())
        );
        assert_eq!(
            pool.check_id_conflicts(IdKind::Gid, &[0, 0x7000_0100, 1000, 0x7000_0005]),
            Err(PoolError::OverlapsUser {
                kind: IdKind::Gid,
                id: 0x7000_0005
            })
        );
        assert_eq!(pool.check_id_conflicts(IdKind::Uid, &[]), Ok(()));
    }
}
