//! `IdRange`: a non-empty run of consecutive 32-bit ids, with arithmetic that cannot wrap.

use std::fmt;

/// Exclusive upper bound of the id space: ids are `u32`, so a range may end at 2^32 but not beyond.
const ID_SPACE_END: u64 = 1 << 32;

/// Exclusive end of `len` ids from `start`, in u64 where the sum of two u32 cannot overflow; the one
/// place the crate adds ids unchecked.
pub(crate) fn wide_end(start: u32, len: u32) -> u64 {
    u64::from(start) + u64::from(len)
}

/// A non-empty run of `len` consecutive ids starting at `start`.
///
/// The invariant `len >= 1 && start + len <= 2^32` is enforced by [`IdRange::new`], so `last()` never
/// wraps and `end()` always fits in a `u64`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IdRange {
    start: u32,
    len: u32,
}

impl IdRange {
    /// Builds the range `[start, start + len)`; refuses an empty range and one running past `u32::MAX`.
    pub fn new(start: u32, len: u32) -> Result<IdRange, RangeError> {
        if len == 0 {
            return Err(RangeError::Empty);
        }
        // Computed in u64 so the check itself cannot wrap.
        if wide_end(start, len) > ID_SPACE_END {
            return Err(RangeError::Overflow { start, len });
        }
        Ok(IdRange { start, len })
    }

    /// First id of the range.
    pub fn start(&self) -> u32 {
        self.start
    }

    /// Number of ids in the range (always at least 1).
    pub fn len(&self) -> u32 {
        self.len
    }

    /// Always false: an `IdRange` holds at least one id. Present so `len` has its usual companion.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Exclusive end, as `u64` because a range may end at exactly 2^32.
    pub fn end(&self) -> u64 {
        wide_end(self.start, self.len)
    }

    /// Last id of the range (inclusive).
    pub fn last(&self) -> u32 {
        // `new` guarantees len >= 1 and start + len <= 2^32, so start + (len - 1) <= u32::MAX and the
        // saturating forms never actually saturate; they only remove a panic path.
        self.start.saturating_add(self.len.saturating_sub(1))
    }

    /// Whether `id` lies inside the range.
    pub fn contains(&self, id: u32) -> bool {
        id >= self.start && u64::from(id) < self.end()
    }

    /// Whether the two ranges share at least one id.
    pub fn overlaps(&self, other: &IdRange) -> bool {
        u64::from(self.start) < other.end() && u64::from(other.start) < self.end()
    }

    /// Whether every id of `other` lies inside `self`.
    pub fn contains_range(&self, other: &IdRange) -> bool {
        self.start <= other.start && other.end() <= self.end()
    }
}

impl fmt::Display for IdRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Inclusive bounds read best in operator messages ("ids 100000..=165535").
        write!(f, "{}..={} ({} ids)", self.start, self.last(), self.len)
    }
}

/// Why a range could not be built.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RangeError {
    /// A range of zero ids was requested.
    Empty,
    /// `start + len` runs past the last 32-bit id.
    Overflow { start: u32, len: u32 },
}

impl fmt::Display for RangeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RangeError::Empty => write!(
                f,
                "an id range must hold at least one id, got a length of 0"
            ),
            RangeError::Overflow { start, len } => write!(
                f,
                "id range starting at {start} with {len} ids ends at {}, past the last 32-bit id {}",
                wide_end(*start, *len),
                u32::MAX
            ),
        }
    }
}

impl std::error::Error for RangeError {}

#[cfg(test)]
mod tests {
    use super::*;

    /// (start, len, expected (last, end) or error).
    type NewCase = (u32, u32, Result<(u32, u64), RangeError>);
    /// ((start, len), (start, len), overlaps).
    type OverlapCase = ((u32, u32), (u32, u32), bool);

    #[test]
    fn new_table() {
        let cases: &[NewCase] = &[
            (0, 1, Ok((0, 1))),
            (5, 10, Ok((14, 15))),
            (u32::MAX, 1, Ok((u32::MAX, 1 << 32))),
            (0, u32::MAX, Ok((u32::MAX - 1, u64::from(u32::MAX)))),
            (1, u32::MAX, Ok((u32::MAX, 1 << 32))),
            (7, 0, Err(RangeError::Empty)),
            (
                2,
                u32::MAX,
                Err(RangeError::Overflow {
                    start: 2,
                    len: u32::MAX,
                }),
            ),
            (
                u32::MAX,
                2,
                Err(RangeError::Overflow {
                    start: u32::MAX,
                    len: 2,
                }),
            ),
        ];
        for &(start, len, ref want) in cases {
            let got = IdRange::new(start, len).map(|r| (r.last(), r.end()));
            assert_eq!(&got, want, "IdRange::new({start}, {len})");
        }
    }

    #[test]
    fn contains_and_overlaps() {
        let r = IdRange::new(100, 10).expect("valid");
        assert!(!r.contains(99));
        assert!(r.contains(100));
        assert!(r.contains(109));
        assert!(!r.contains(110));
        let top = IdRange::new(u32::MAX, 1).expect("valid");
        assert!(top.contains(u32::MAX));
        assert!(!top.contains(u32::MAX - 1));

        let cases: &[OverlapCase] = &[
            ((100, 10), (110, 5), false),
            ((100, 10), (109, 5), true),
            ((100, 10), (90, 10), false),
            ((100, 10), (90, 11), true),
            ((100, 10), (102, 1), true),
            ((0, u32::MAX), (u32::MAX, 1), false),
            ((1, u32::MAX), (u32::MAX, 1), true),
        ];
        for &((a0, a1), (b0, b1), want) in cases {
            let a = IdRange::new(a0, a1).expect("valid");
            let b = IdRange::new(b0, b1).expect("valid");
            assert_eq!(a.overlaps(&b), want, "{a} vs {b}");
            assert_eq!(b.overlaps(&a), want, "{b} vs {a}");
        }
        assert!(r.contains_range(&IdRange::new(100, 10).expect("valid")));
        assert!(!r.contains_range(&IdRange::new(101, 10).expect("valid")));
    }

    #[test]
    fn display_is_clear() {
        assert!(RangeError::Empty.to_string().contains("at least one"));
        let msg = RangeError::Overflow {
            start: u32::MAX,
            len: 2,
        }
        .to_string();
        assert!(msg.contains("4294967297"), "{msg}");
    }
}
