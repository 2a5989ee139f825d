//! User-namespace id maps (`/proc/PID/uid_map`, `gid_map`): rendering, parsing and validation against
//! the kernel's rules in user_namespaces(7).

use std::fmt;

use crate::range::IdRange;

/// Most extents a map may hold (user_namespaces(7): 340 since Linux 4.15, 5 before).
pub const MAX_EXTENTS: usize = 340;

/// One map line: ids `inner..inner+count` inside the namespace are host ids `outer..outer+count`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub inner: u32,
    pub outer: u32,
    pub count: u32,
}

/// Renders extents in the kernel's format, one `"inner outer count\n"` per extent. The kernel wants the
/// whole map in a single write(2), so this builds it as one string.
pub fn render_map(extents: &[Extent]) -> String {
    let mut out = String::new();
    for e in extents {
        out.push_str(&format!("{} {} {}\n", e.inner, e.outer, e.count));
    }
    out
}

/// The map of a lease: namespace ids 0.. onto the lease's host range.
pub fn lease_map(base: u32, size: u32) -> Extent {
    Extent {
        inner: 0,
        outer: base,
        count: size,
    }
}

/// Parses map text as read back from /proc (the kernel right-aligns fields with runs of spaces).
/// Blank lines are skipped; an empty text is an empty (not yet written) map. Does not validate: see
/// [`validate_extents`].
pub fn parse_map(text: &str) -> Result<Vec<Extent>, MapError> {
    let mut extents = Vec::new();
    for (idx, raw) in text.lines().enumerate() {
        let line = idx.saturating_add(1);
        let fields: Vec<&str> = raw.split_ascii_whitespace().collect();
        if fields.is_empty() {
            continue;
        }
        let [inner, outer, count] = fields.as_slice() else {
            return Err(MapError::Parse {
                line,
                reason: format!("expected 3 fields, found {}", fields.len()),
            });
        };
        let num = |what: &str, s: &str| -> Result<u32, MapError> {
            if !s.bytes().all(|b| b.is_ascii_digit()) {
                return Err(MapError::Parse {
                    line,
                    reason: format!("{what} {s:?} is not a decimal number"),
                });
            }
            s.parse::<u32>().map_err(|_| MapError::Parse {
                line,
                reason: format!("{what} {s} is larger than {}", u32::MAX),
            })
        };
        extents.push(Extent {
            inner: num("inner id", inner)?,
            outer: num("outer id", outer)?,
            count: num("count", count)?,
        });
    }
    Ok(extents)
}

/// Checks a map before it is written: 1..=340 extents, each non-empty and not running past
/// `u32::MAX` on either side, every host range inside `allowed`, no host id 0 (a container must never
/// own the host's root), and no two extents overlapping on either side (the kernel refuses overlaps
/// with EINVAL; we refuse first so the error says which extents).
pub fn validate_extents(extents: &[Extent], allowed: IdRange) -> Result<(), MapError> {
    if extents.is_empty() {
        return Err(MapError::Empty);
    }
    if extents.len() > MAX_EXTENTS {
        return Err(MapError::TooMany {
            count: extents.len(),
        });
    }
    let mut inners = Vec::with_capacity(extents.len());
    let mut outers = Vec::with_capacity(extents.len());
    for (index, e) in extents.iter().enumerate() {
        if e.count == 0 {
            return Err(MapError::ZeroCount { index });
        }
        let (Ok(inner), Ok(outer)) = (
            IdRange::new(e.inner, e.count),
            IdRange::new(e.outer, e.count),
        ) else {
            return Err(MapError::Overflow { index, extent: *e });
        };
        if outer.contains(0) {
            return Err(MapError::MapsHostRoot { index });
        }
        if !allowed.contains_range(&outer) {
            return Err(MapError::OutsideAllowed {
                index,
                outer,
                allowed,
            });
        }
        inners.push((inner, index));
        outers.push((outer, index));
    }
    check_disjoint(&mut inners, MapSide::Inner)?;
    check_disjoint(&mut outers, MapSide::Outer)
}

/// Sorting by start means only neighbours can overlap; O(n log n) instead of pairwise.
fn check_disjoint(ranges: &mut [(IdRange, usize)], side: MapSide) -> Result<(), MapError> {
    ranges.sort_unstable();
    for pair in ranges.windows(2) {
        // Nested rather than a let-chain: the workspace's rust-version (1.85) predates let-chains.
        if let [(a, ia), (b, ib)] = pair
            && a.overlaps(b)
        {
            return Err(MapError::Overlap {
                side,
                first: (*ia).min(*ib),
                second: (*ia).max(*ib),
            });
        }
    }
    Ok(())
}

/// Which side of a map two extents overlap on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MapSide {
    /// Ids inside the namespace.
    Inner,
    /// Host ids.
    Outer,
}

impl fmt::Display for MapSide {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            MapSide::Inner => "namespace",
            MapSide::Outer => "host",
        })
    }
}

/// Why map text could not be parsed or a map was refused. `index` is the 0-based extent position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MapError {
    Parse {
        line: usize,
        reason: String,
    },
    Empty,
    TooMany {
        count: usize,
    },
    ZeroCount {
        index: usize,
    },
    Overflow {
        index: usize,
        extent: Extent,
    },
    MapsHostRoot {
        index: usize,
    },
    OutsideAllowed {
        index: usize,
        outer: IdRange,
        allowed: IdRange,
    },
    Overlap {
        side: MapSide,
        first: usize,
        second: usize,
    },
}

impl fmt::Display for MapError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MapError::Parse { line, reason } => write!(f, "id map line {line}: {reason}"),
            MapError::Empty => write!(f, "id map has no extents"),
            MapError::TooMany { count } => write!(
                f,
                "id map has {count} extents; the kernel accepts at most {MAX_EXTENTS}"
            ),
            MapError::ZeroCount { index } => write!(f, "id map extent {index} has a count of 0"),
            MapError::Overflow { index, extent } => write!(
                f,
                "id map extent {index} ({} {} {}) runs past id {}",
                extent.inner,
                extent.outer,
                extent.count,
                u32::MAX
            ),
            MapError::MapsHostRoot { index } => {
                write!(f, "id map extent {index} maps host id 0 (root)")
            }
            MapError::OutsideAllowed {
                index,
                outer,
                allowed,
            } => write!(
                f,
                "id map extent {index} uses host ids {outer}, outside the leased range {allowed}"
            ),
            MapError::Overlap {
                side,
                first,
                second,
            } => write!(
                f,
                "id map extents {first} and {second} overlap on the {side} side"
            ),
        }
    }
}

impl std::error::Error for MapError {}

#[cfg(test)]
mod tests {
    use super::*;

    fn ext(inner: u32, outer: u32, count: u32) -> Extent {
        Extent {
            inner,
            outer,
            count,
        }
    }

    #[test]
    fn render_and_parse_round_trip() {
        let m = vec![lease_map(0x7000_0000, 65536), ext(65536, 100, 1)];
        let text = render_map(&m);
        assert_eq!(text, "0 1879048192 65536\n65536 100 1\n");
        assert_eq!(parse_map(&text), Ok(m));
        assert_eq!(render_map(&[]), "");
    }

    #[test]
    fn parse_table() {
        let proc_text = "         0 1879048192      65536\n     65536       1000          1\n";
        let cases: Vec<(&str, Result<Vec<Extent>, &str>)> = vec![
            (
                proc_text,
                Ok(vec![ext(0, 1879048192, 65536), ext(65536, 1000, 1)]),
            ),
            ("", Ok(vec![])),
            ("\n  \n", Ok(vec![])),
            ("0 0 4294967295", Ok(vec![ext(0, 0, u32::MAX)])),
            ("0\t1\t2\r\n", Ok(vec![ext(0, 1, 2)])),
            ("0 1", Err("line 1: expected 3 fields, found 2")),
            ("0 1 2\n0 1 2 3", Err("line 2: expected 3 fields, found 4")),
            ("0 x 2", Err("not a decimal")),
            ("0 -1 2", Err("not a decimal")),
            ("0 1 4294967296", Err("larger than")),
        ];
        for (text, want) in cases {
            match (parse_map(text), want) {
                (Ok(got), Ok(want)) => assert_eq!(got, want, "{text:?}"),
                (Err(got), Err(want)) => {
                    let msg = got.to_string();
                    assert!(msg.contains(want), "{msg:?} should contain {want:?}");
                }
                (got, want) => panic!("{text:?}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn validate_table() {
        let allowed = IdRange::new(0x7000_0000, 0x2_0000).expect("valid");
        let base = 0x7000_0000;
        let too_many = vec![ext(0, base, 1); 341];
        let many: Vec<Extent> = (0..340).map(|i| ext(i, base + i, 1)).collect();
        let cases: Vec<(Vec<Extent>, Result<(), MapError>)> = vec![
            (vec![lease_map(base, 0x2_0000)], Ok(())),
            (vec![ext(0, base, 1), ext(1, base + 0x1_FFFF, 1)], Ok(())),
            (many, Ok(())),
            (vec![], Err(MapError::Empty)),
            (too_many, Err(MapError::TooMany { count: 341 })),
            (
                vec![ext(0, base, 1), ext(1, base + 1, 0)],
                Err(MapError::ZeroCount { index: 1 }),
            ),
            (
                vec![ext(u32::MAX, base, 2)],
                Err(MapError::Overflow {
                    index: 0,
                    extent: ext(u32::MAX, base, 2),
                }),
            ),
            (
                vec![ext(0, u32::MAX, 2)],
                Err(MapError::Overflow {
                    index: 0,
                    extent: ext(0, u32::MAX, 2),
                }),
            ),
            (
                vec![lease_map(base, 0x2_0001)],
                Err(MapError::OutsideAllowed {
                    index: 0,
                    outer: IdRange::new(base, 0x2_0001).expect("valid"),
                    allowed,
                }),
            ),
            (
                vec![ext(0, base - 1, 2)],
                Err(MapError::OutsideAllowed {
                    index: 0,
                    outer: IdRange::new(base - 1, 2).expect("valid"),
                    allowed,
                }),
            ),
            (
                vec![ext(0, base, 10), ext(5, base + 10, 10)],
                Err(MapError::Overlap {
                    side: MapSide::Inner,
                    first: 0,
                    second: 1,
                }),
            ),
            (
                vec![ext(100, base + 5, 10), ext(0, base, 10)],
                Err(MapError::Overlap {
                    side: MapSide::Outer,
                    first: 0,
                    second: 1,
                }),
            ),
            (
                vec![
                    ext(0, base, 10),
                    ext(10, base + 10, 10),
                    ext(20, base + 19, 1),
                ],
                Err(MapError::Overlap {
                    side: MapSide::Outer,
                    first: 1,
                    second: 2,
                }),
            ),
        ];
        for (extents, want) in cases {
            assert_eq!(validate_extents(&extents, allowed), want, "{extents:?}");
        }
    }

    #[test]
    fn host_root_refused_even_if_allowed() {
        let allowed = IdRange::new(0, 100).expect("valid");
        assert_eq!(
            validate_extents(&[ext(0, 0, 1)], allowed),
            Err(MapError::MapsHostRoot { index: 0 })
        );
        assert_eq!(validate_extents(&[ext(0, 1, 99)], allowed), Ok(()));
        let msg = MapError::MapsHostRoot { index: 0 }.to_string();
        assert!(msg.contains("root"));
        let msg = MapError::Overlap {
            side: MapSide::Outer,
            first: 1,
            second: 2,
        }
        .to_string();
        assert!(
            msg.contains("extents 1 and 2") && msg.contains("host"),
            "{msg}"
        );
    }
}
