//! Parsing and rendering of `/etc/subuid` and `/etc/subgid` (format of subuid(5)), as pure text functions.

use std::fmt;

use crate::range::{IdRange, wide_end};

/// One well-formed `owner:start:count` line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubidEntry {
    /// User name or numeric uid, exactly as written.
    pub owner: String,
    /// First subordinate id.
    pub start: u32,
    /// Number of subordinate ids.
    pub count: u32,
    /// 1-based line number in the file, for operator messages.
    pub line: usize,
}

impl SubidEntry {
    /// The ids this entry grants, or `None` if `count` is 0 or the range runs past `u32::MAX`
    /// (never the case for entries returned by [`parse_subid`], which refuses such lines).
    pub fn range(&self) -> Option<IdRange> {
        IdRange::new(self.start, self.count).ok()
    }
}

/// A line of a subid file that was skipped because it is malformed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubidParseError {
    /// 1-based line number.
    pub line: usize,
    /// What is wrong with it.
    pub reason: String,
}

impl fmt::Display for SubidParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}: {}", self.line, self.reason)
    }
}

impl std::error::Error for SubidParseError {}

/// Parses a subid file. Well-formed entries and malformed lines are returned side by side: the file is
/// owned by the administrator, so one bad line must not hide the others (the caller decides whether a
/// bad line is fatal). Never panics.
pub fn parse_subid(text: &str) -> (Vec<SubidEntry>, Vec<SubidParseError>) {
    let mut entries = Vec::new();
    let mut errors = Vec::new();
    // `lines()` splits on "\n" and strips a "\r" before it, so CRLF files parse too.
    for (idx, raw) in text.lines().enumerate() {
        let line = idx.saturating_add(1);
        // Surrounding whitespace is never part of a name or a number; trimming both ends also treats
        // an indented comment as a comment.
        let trimmed = raw.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        match parse_line(trimmed, line) {
            Ok(entry) => entries.push(entry),
            Err(reason) => errors.push(SubidParseError { line, reason }),
        }
    }
    (entries, errors)
}

fn parse_line(text: &str, line: usize) -> Result<SubidEntry, String> {
    let fields: Vec<&str> = text.split(':').collect();
    let [owner, start, count] = fields.as_slice() else {
        return Err(format!(
            "expected 3 fields \"owner:start:count\", found {}",
            fields.len()
        ));
    };
    if owner.is_empty() {
        return Err("owner is empty".to_owned());
    }
    let start = parse_u32("start", start)?;
    let count = parse_u32("count", count)?;
    if count == 0 {
        return Err("count is 0".to_owned());
    }
    if IdRange::new(start, count).is_err() {
        return Err(format!(
            "start {start} + count {count} = {} runs past the last id {}",
            wide_end(start, count),
            u32::MAX
        ));
    }
    Ok(SubidEntry {
        owner: (*owner).to_owned(),
        start,
        count,
        line,
    })
}

/// Strict decimal: ASCII digits only. `u32::from_str` alone would also take a leading '+', which
/// shadow-utils' own tools do not write, so such a line is more likely damage than intent.
fn parse_u32(what: &str, field: &str) -> Result<u32, String> {
    if field.is_empty() {
        return Err(format!("{what} is empty"));
    }
    if !field.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("{what} {field:?} is not a decimal number"));
    }
    field
        .parse::<u32>()
        .map_err(|_| format!("{what} {field} is larger than {}", u32::MAX))
}

/// First entry of `owner`, the one shadow-utils' lookups would see first.
pub fn find_entry<'a>(entries: &'a [SubidEntry], owner: &str) -> Option<&'a SubidEntry> {
    entries.iter().find(|e| e.owner == owner)
}

/// Renders `owner:start:count` without a trailing newline.
pub fn render_subid_line(owner: &str, range: IdRange) -> String {
    format!("{owner}:{}:{}", range.start(), range.len())
}

/// Another owner's entry that a range to be registered would overlap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubidOverlap {
    /// 1-based line number of the other entry.
    pub line: usize,
    pub owner: String,
    pub start: u32,
    pub count: u32,
}

impl fmt::Display for SubidOverlap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "line {}: {}:{}:{} overlaps it",
            self.line, self.owner, self.start, self.count
        )
    }
}

impl std::error::Error for SubidOverlap {}

/// The text of a subid file with `owner:start:count` registered for `range`: the first line of
/// `owner` is replaced in place (other lines of `owner` are dropped: the pool is one range),
/// or the entry is appended; every other line, comments and malformed ones included, is kept
/// byte for byte. `Ok(None)` when the file already says exactly that. Refused when `range`
/// overlaps another owner's entry, which belongs to someone's rootless containers.
pub fn register_subid(
    text: &str,
    owner: &str,
    range: IdRange,
) -> Result<Option<String>, SubidOverlap> {
    let (entries, _malformed) = parse_subid(text);
    if let Some(other) = entries
        .iter()
        .filter(|e| e.owner != owner)
        .find(|e| e.range().is_some_and(|r| r.overlaps(&range)))
    {
        return Err(SubidOverlap {
            line: other.line,
            owner: other.owner.clone(),
            start: other.start,
            count: other.count,
        });
    }
    let own: Vec<&SubidEntry> = entries.iter().filter(|e| e.owner == owner).collect();
    if let [only] = own.as_slice()
        && (only.start, only.count) == (range.start(), range.len())
    {
        return Ok(None);
    }
    let rendered = render_subid_line(owner, range);
    let mut out = String::with_capacity(text.len() + rendered.len() + 1);
    let mut written = false;
    // `split_inclusive` numbers lines as `parse_subid` (`str::lines`) does.
    for (idx, raw) in text.split_inclusive('\n').enumerate() {
        let line = idx.saturating_add(1);
        if !own.iter().any(|e| e.line == line) {
            out.push_str(raw);
            continue;
        }
        if !written {
            out.push_str(&rendered);
            out.push_str(if raw.ends_with("\r\n") { "\r\n" } else { "\n" });
            written = true;
        }
    }
    if !written {
        if !out.is_empty() && !out.ends_with('\n') {
            out.push('\n');
        }
        out.push_str(&rendered);
        out.push('\n');
    }
    Ok(Some(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(owner: &str, start: u32, count: u32, line: usize) -> SubidEntry {
        SubidEntry {
            owner: owner.to_owned(),
            start,
            count,
            line,
        }
    }

    #[test]
    fn parses_good_lines_and_skips_comments() {
        let text = "# comment\n\nalice:100000:65536\n   # indented comment\r\n1001:165536:65536\r\nbob:4294901760:65535   \n\t\n";
        let (entries, errors) = parse_subid(text);
        assert_eq!(errors, vec![]);
        assert_eq!(
            entries,
            vec![
                entry("alice", 100000, 65536, 3),
                entry("1001", 165536, 65536, 5),
                entry("bob", 4294901760, 65535, 6),
            ]
        );
    }

    #[test]
    fn bad_lines_are_reported_and_skipped() {
        let cases: &[(&str, &str)] = &[
            ("alice:100000", "expected 3 fields"),
            ("alice:1:2:3", "found 4"),
            (":100000:65536", "owner is empty"),
            ("alice::65536", "start is empty"),
            ("alice:abc:65536", "not a decimal"),
            ("alice:+5:65536", "not a decimal"),
            ("alice:-5:65536", "not a decimal"),
            ("alice:100000:0", "count is 0"),
            ("alice:4294967296:1", "larger than"),
            ("alice:99999999999999999999999:1", "larger than"),
            ("alice:1:4294967296", "larger than"),
            ("alice:4294967295:2", "runs past"),
            ("alice:2:4294967295", "runs past"),
            ("alice:1 000:5", "not a decimal"),
            ("ålice:1:ünicode", "not a decimal"),
        ];
        for &(line, want) in cases {
            let text = format!("ok:1:1\n{line}\n");
            let (entries, errors) = parse_subid(&text);
            assert_eq!(entries, vec![entry("ok", 1, 1, 1)], "{line}");
            assert_eq!(errors.len(), 1, "{line}");
            assert_eq!(errors[0].line, 2, "{line}");
            assert!(
                errors[0].reason.contains(want),
                "{line}: {:?} should mention {want:?}",
                errors[0].reason
            );
            assert!(errors[0].to_string().starts_with("line 2: "));
        }
    }

    #[test]
    fn edge_ranges_accepted() {
        let (entries, errors) = parse_subid("a:4294967295:1\nb:1:4294967295\nc:2:4294967295\n");
        assert_eq!(entries.len(), 2);
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].line, 3);
        assert_eq!(
            entries[0].range(),
            Some(IdRange::new(u32::MAX, 1).expect("valid"))
        );
    }

    #[test]
    fn empty_and_garbage_never_panic() {
        assert_eq!(parse_subid(""), (vec![], vec![]));
        let (e, errs) = parse_subid("\u{0}\u{feff}:::\n::\n\r\r\n:");
        assert!(e.is_empty());
        // The lone "\r" line trims to blank and is skipped; the other three are errors.
        assert_eq!(errs.len(), 3);
    }

    #[test]
    fn find_and_render() {
        let (entries, _) = parse_subid("a:1:2\nb:3:4\na:5:6\n");
        assert_eq!(find_entry(&entries, "a"), Some(&entry("a", 1, 2, 1)));
        assert_eq!(find_entry(&entries, "c"), None);
        let r = IdRange::new(100000, 65536).expect("valid");
        assert_eq!(render_subid_line("subidd", r), "subidd:100000:65536");
        let (back, errs) = parse_subid(&render_subid_line("subidd", r));
        assert!(errs.is_empty());
        assert_eq!(back[0].range(), Some(r));
        assert_eq!(entry("x", 1, 0, 1).range(), None);
    }

    #[test]
    fn register_writes_replaces_keeps_and_refuses() {
        let pool = IdRange::new(1_879_048_192, 655_360).expect("valid");
        let line = "subidd:1879048192:655360";
        let cases: &[(&str, Option<&str>)] = &[
            // (file before, file after; None = unchanged)
            ("", Some("subidd:1879048192:655360\n")),
            (
                "# users\nalice:100000:65536\n",
                Some("# users\nalice:100000:65536\nsubidd:1879048192:655360\n"),
            ),
            (
                "alice:100000:65536",
                Some("alice:100000:65536\nsubidd:1879048192:655360\n"),
            ),
            ("alice:100000:65536\nsubidd:1879048192:655360\n", None),
            (
                "subidd:5:5\nalice:100000:65536\n",
                Some("subidd:1879048192:655360\nalice:100000:65536\n"),
            ),
            (
                "a:1:1\r\nsubidd:5:5\r\nb:2:1\r\nsubidd:9:9\r\n",
                Some("a:1:1\r\nsubidd:1879048192:655360\r\nb:2:1\r\n"),
            ),
            (
                "subidd:1879048192:655360\nsubidd:1879048192:655360\n",
                Some("subidd:1879048192:655360\n"),
            ),
            (
                "broken line\n  # note\nbob:1879703552:65536\n",
                Some("broken line\n  # note\nbob:1879703552:65536\nsubidd:1879048192:655360\n"),
            ),
            (
                "bob:1878982656:65536\n",
                Some("bob:1878982656:65536\nsubidd:1879048192:655360\n"),
            ),
        ];
        for &(before, after) in cases {
            let got = register_subid(before, "subidd", pool).expect("no overlap");
            assert_eq!(got.as_deref(), after, "{before:?}");
            if let Some(text) = &got {
                assert_eq!(
                    register_subid(text, "subidd", pool).expect("again"),
                    None,
                    "registering twice changes nothing: {text:?}"
                );
                assert!(text.lines().any(|l| l == line));
            }
        }
        let refused =
            register_subid("x:1:1\nbob:1879048191:2\n", "subidd", pool).expect_err("overlap");
        assert_eq!(
            refused,
            SubidOverlap {
                line: 2,
                owner: "bob".into(),
                start: 1_879_048_191,
                count: 2
            }
        );
        assert_eq!(refused.to_string(), "line 2: bob:1879048191:2 overlaps it");
        let end = register_subid("carol:1879703551:1\n", "subidd", pool).expect_err("last id");
        assert_eq!(end.owner, "carol");
    }
}
