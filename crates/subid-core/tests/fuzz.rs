//! Fuzz-style tests on stable: every seed file of `tests/fuzz/corpus/<target>/`, then proptest
//! inputs (raw bytes and near-valid text), through the /etc/subuid parser, lease-name and label
//! validation, and id-map parsing, rendering and validation. Nothing may panic, and what parses
//! must render back to itself. `fuzz/` holds the same targets for cargo-fuzz on nightly.

use std::path::PathBuf;

use proptest::prelude::*;
use subid_core::{
    Extent, IdRange, MAX_EXTENTS, NAME_MAX, parse_map, parse_subid, render_map, render_subid_line,
    validate_extents, validate_label, validate_name,
};

/// The seed files of one target.
fn corpus(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fuzz/corpus")
        .join(target);
    let mut files: Vec<(PathBuf, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("read corpus {}: {e}", dir.display()))
        .map(|entry| {
            let path = entry.expect("corpus entry").path();
            let bytes = std::fs::read(&path).expect("read corpus file");
            (path, bytes)
        })
        .collect();
    files.sort();
    assert!(!files.is_empty(), "corpus {} is empty", dir.display());
    files
}

/// /etc/subuid: entries are well-formed and render back to themselves, a file of rendered entries
/// parses to the same entries, and every non-blank, non-comment line is an entry or an error.
fn check_subid(text: &str) {
    let (entries, errors) = parse_subid(text);
    let content_lines = text
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.trim().starts_with('#'))
        .count();
    assert_eq!(entries.len() + errors.len(), content_lines, "{text:?}");
    let mut rendered = String::new();
    for entry in &entries {
        let range = entry.range().expect("parsed entries have a valid range");
        let line = render_subid_line(&entry.owner, range);
        let (again, bad) = parse_subid(&line);
        assert!(bad.is_empty(), "{line:?} does not parse back");
        assert_eq!(
            again.first().map(|e| (&e.owner, e.start, e.count)),
            Some((&entry.owner, entry.start, entry.count)),
            "{line:?}"
        );
        rendered.push_str(&line);
        rendered.push('\n');
    }
    let (again, bad) = parse_subid(&rendered);
    assert!(bad.is_empty());
    let key = |e: &subid_core::SubidEntry| (e.owner.clone(), e.start, e.count);
    assert_eq!(
        again.iter().map(key).collect::<Vec<_>>(),
        entries.iter().map(key).collect::<Vec<_>>()
    );
}

/// Lease names: `validate_name` agrees with the documented rule, written out independently.
fn check_name(name: &str) {
    let rule = !name.is_empty()
        && name.chars().count() <= NAME_MAX
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
        && name.starts_with(|c: char| c.is_ascii_alphanumeric());
    assert_eq!(validate_name(name).is_ok(), rule, "{name:?}");
    // The same text as a label key and value never panics either.
    let _ = validate_label(name, name);
}

/// Id maps: what parses renders back to the same extents; validation never panics and what it
/// accepts really is disjoint, inside the allowed range and free of host id 0.
fn check_map_text(text: &str) {
    if let Ok(extents) = parse_map(text) {
        let rendered = render_map(&extents);
        assert_eq!(parse_map(&rendered).ok(), Some(extents.clone()), "{text:?}");
        if let Ok(allowed) = IdRange::new(1, u32::MAX) {
            check_extents(&extents, allowed);
        }
    }
}

fn check_extents(extents: &[Extent], allowed: IdRange) {
    if validate_extents(extents, allowed).is_err() {
        return;
    }
    assert!(!extents.is_empty() && extents.len() <= MAX_EXTENTS);
    let ranges: Vec<(IdRange, IdRange)> = extents
        .iter()
        .map(|e| {
            (
                IdRange::new(e.inner, e.count).expect("accepted inner range"),
                IdRange::new(e.outer, e.count).expect("accepted outer range"),
            )
        })
        .collect();
    for (i, (inner, outer)) in ranges.iter().enumerate() {
        assert!(!outer.contains(0), "maps host root: {extents:?}");
        assert!(
            allowed.contains_range(outer),
            "outside allowed: {extents:?}"
        );
        for (other_inner, other_outer) in &ranges[i + 1..] {
            assert!(!inner.overlaps(other_inner), "inner overlap: {extents:?}");
            assert!(!outer.overlaps(other_outer), "outer overlap: {extents:?}");
        }
    }
}

#[test]
fn fuzz_corpus_subid() {
    for (path, bytes) in corpus("subid") {
        eprintln!("{}", path.display());
        check_subid(&String::from_utf8_lossy(&bytes));
    }
}

#[test]
fn fuzz_corpus_lease_name() {
    for (path, bytes) in corpus("lease_name") {
        eprintln!("{}", path.display());
        check_name(&String::from_utf8_lossy(&bytes));
    }
}

#[test]
fn fuzz_corpus_idmap() {
    for (path, bytes) in corpus("idmap") {
        eprintln!("{}", path.display());
        check_map_text(&String::from_utf8_lossy(&bytes));
    }
}

/// Text close to a subid file: owners, numbers of every size, separators, comments, CR and junk.
fn subid_like() -> impl Strategy<Value = String> {
    let field = prop_oneof![
        "[a-z_][a-z0-9_-]{0,8}",
        any::<u32>().prop_map(|n| n.to_string()),
        any::<u64>().prop_map(|n| n.to_string()),
        "[0-9+ #:-]{0,4}",
        ".{0,6}",
    ];
    let line = prop::collection::vec(field, 0..5).prop_map(|fields| fields.join(":"));
    prop::collection::vec(line, 0..8).prop_map(|lines| lines.join("\n"))
}

/// Text close to a kernel id map.
fn map_like() -> impl Strategy<Value = String> {
    let field = prop_oneof![
        4 => any::<u32>().prop_map(|n| n.to_string()),
        1 => (0u32..70_000).prop_map(|n| n.to_string()),
        1 => any::<u64>().prop_map(|n| n.to_string()),
        1 => "[0-9 x-]{0,3}",
    ];
    let line = prop::collection::vec(field, 0..5).prop_map(|fields| fields.join("   "));
    prop::collection::vec(line, 0..6).prop_map(|lines| lines.join("\n"))
}

/// Small extents that often touch or overlap, so validation's accept path is reached too.
fn extents() -> impl Strategy<Value = Vec<Extent>> {
    let extent = (0u32..300, 0u32..300, 0u32..100).prop_map(|(inner, outer, count)| Extent {
        inner,
        outer,
        count,
    });
    prop::collection::vec(extent, 0..6)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    #[test]
    fn fuzz_random_subid(bytes in prop::collection::vec(any::<u8>(), 0..512), text in subid_like()) {
        check_subid(&String::from_utf8_lossy(&bytes));
        check_subid(&text);
    }

    #[test]
    fn fuzz_random_lease_name(bytes in prop::collection::vec(any::<u8>(), 0..160), name in "[A-Za-z0-9_.\\-/ ]{0,130}") {
        check_name(&String::from_utf8_lossy(&bytes));
        check_name(&name);
    }

    #[test]
    fn fuzz_random_idmap(bytes in prop::collection::vec(any::<u8>(), 0..256), text in map_like(), extents in extents(), start in 0u32..200, len in 1u32..300) {
        check_map_text(&String::from_utf8_lossy(&bytes));
        check_map_text(&text);
        if let Ok(allowed) = IdRange::new(start, len) {
            check_extents(&extents, allowed);
        }
    }
}
