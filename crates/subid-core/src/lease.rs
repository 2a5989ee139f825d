//! Lease names, labels and states: the validation rules shared by the API, the store and the CLI.

use std::fmt;

/// Longest lease name, in characters (all permitted characters are ASCII, so also bytes).
pub const NAME_MAX: usize = 128;
/// Most labels on one lease.
pub const LABELS_MAX: usize = 64;
/// Longest label key, in characters.
pub const LABEL_KEY_MAX: usize = 128;
/// Longest label value, in bytes (UTF-8).
pub const LABEL_VALUE_MAX: usize = 1024;

/// Longest slice of a rejected key quoted back in a message, so a megabyte key cannot bloat logs.
const QUOTE_MAX: usize = 64;

/// Checks a lease name: 1-128 characters of `[A-Za-z0-9_.-]`, the first a letter or digit.
///
/// Names end up in file names, cgroup paths and log lines, so the set is kept to characters that are
/// inert everywhere; requiring an alphanumeric first character refuses "." and ".." (path traversal)
/// and a leading '-' (option injection into helper commands). A 64-hex Docker id fits.
pub fn validate_name(name: &str) -> Result<(), LeaseError> {
    if name.is_empty() {
        return Err(LeaseError::NameEmpty);
    }
    let len = name.chars().count();
    if len > NAME_MAX {
        return Err(LeaseError::NameTooLong { len });
    }
    for (pos, ch) in name.chars().enumerate() {
        if !(ch.is_ascii_alphanumeric() || matches!(ch, '_' | '.' | '-')) {
            return Err(LeaseError::NameBadChar { ch, pos });
        }
    }
    match name.chars().next() {
        Some(ch) if !ch.is_ascii_alphanumeric() => Err(LeaseError::NameBadStart { ch }),
        _ => Ok(()),
    }
}

/// Checks one label: key 1-128 characters of `[A-Za-z0-9_./-]` starting with a letter or digit (the
/// shape of Kubernetes-style "example.com/role" keys); value at most 1024 bytes with no NUL or control
/// characters, which would corrupt log lines and terminal output.
pub fn validate_label(key: &str, value: &str) -> Result<(), LeaseError> {
    let key_err = |reason: &'static str| LeaseError::LabelKeyInvalid {
        key: quote(key),
        reason,
    };
    if key.is_empty() {
        return Err(key_err("is empty"));
    }
    if key.chars().count() > LABEL_KEY_MAX {
        return Err(key_err("is longer than 128 characters"));
    }
    if !key
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-' | '/'))
    {
        return Err(key_err(
            "may only contain letters, digits, '_', '.', '-' and '/'",
        ));
    }
    if !key.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        return Err(key_err("must start with a letter or digit"));
    }
    let value_err = |reason: &'static str| LeaseError::LabelValueInvalid {
        key: quote(key),
        reason,
    };
    if value.len() > LABEL_VALUE_MAX {
        return Err(value_err("is longer than 1024 bytes"));
    }
    // `is_control` covers NUL, the C0 and C1 sets and DEL.
    if value.chars().any(char::is_control) {
        return Err(value_err("contains a NUL or control character"));
    }
    Ok(())
}

/// Checks a whole label set: at most 64 labels, each valid. When there are too many, that is reported
/// (with the full count) in preference to a bad label, since it is the more basic mistake.
pub fn validate_labels<'a>(
    labels: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> Result<(), LeaseError> {
    let mut count: usize = 0;
    let mut first_error = None;
    for (key, value) in labels {
        count = count.saturating_add(1);
        if first_error.is_none() && count <= LABELS_MAX {
            first_error = validate_label(key, value).err();
        }
    }
    if count > LABELS_MAX {
        return Err(LeaseError::TooManyLabels { count });
    }
    first_error.map_or(Ok(()), Err)
}

/// Keeps at most `QUOTE_MAX` characters of a rejected key for the error message.
fn quote(key: &str) -> String {
    match key.char_indices().nth(QUOTE_MAX) {
        // `cut` comes from char_indices, so it is a char boundary; `get` keeps that panic-free anyway.
        Some((cut, _)) => format!("{}...", key.get(..cut).unwrap_or(key)),
        None => key.to_owned(),
    }
}

/// Lifecycle state of a lease as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LeaseState {
    Active,
    Released,
}

impl LeaseState {
    /// The stored/wire spelling.
    pub fn as_str(&self) -> &'static str {
        match self {
            LeaseState::Active => "active",
            LeaseState::Released => "released",
        }
    }

    /// Inverse of [`LeaseState::as_str`]; exact match only.
    pub fn parse(s: &str) -> Option<LeaseState> {
        match s {
            "active" => Some(LeaseState::Active),
            "released" => Some(LeaseState::Released),
            _ => None,
        }
    }
}

impl fmt::Display for LeaseState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a lease name or label was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseError {
    NameEmpty,
    NameTooLong { len: usize },
    NameBadChar { ch: char, pos: usize },
    NameBadStart { ch: char },
    TooManyLabels { count: usize },
    LabelKeyInvalid { key: String, reason: &'static str },
    LabelValueInvalid { key: String, reason: &'static str },
}

impl fmt::Display for LeaseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LeaseError::NameEmpty => write!(f, "lease name is empty"),
            LeaseError::NameTooLong { len } => write!(
                f,
                "lease name is {len} characters long; at most {NAME_MAX} are allowed"
            ),
            LeaseError::NameBadChar { ch, pos } => write!(
                f,
                "lease name has {ch:?} at position {pos}; only letters, digits, '_', '.' and '-' are allowed"
            ),
            LeaseError::NameBadStart { ch } => write!(
                f,
                "lease name starts with {ch:?}; it must start with a letter or digit"
            ),
            LeaseError::TooManyLabels { count } => {
                write!(f, "{count} labels given; at most {LABELS_MAX} are allowed")
            }
            // `{:?}` escapes control characters, so a hostile key cannot forge log lines.
            LeaseError::LabelKeyInvalid { key, reason } => write!(f, "label key {key:?} {reason}"),
            LeaseError::LabelValueInvalid { key, reason } => {
                write!(f, "value of label {key:?} {reason}")
            }
        }
    }
}

impl std::error::Error for LeaseError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        let docker_id = "0123456789abcdef".repeat(4);
        let n128 = "a".repeat(128);
        let n129 = "a".repeat(129);
        let cases: Vec<(&str, Result<(), LeaseError>)> = vec![
            ("web-1", Ok(())),
            ("A.b_c-9", Ok(())),
            ("0", Ok(())),
            (&docker_id, Ok(())),
            (&n128, Ok(())),
            (&n129, Err(LeaseError::NameTooLong { len: 129 })),
            ("", Err(LeaseError::NameEmpty)),
            (".", Err(LeaseError::NameBadStart { ch: '.' })),
            ("..", Err(LeaseError::NameBadStart { ch: '.' })),
            (".hidden", Err(LeaseError::NameBadStart { ch: '.' })),
            ("-rf", Err(LeaseError::NameBadStart { ch: '-' })),
            ("_x", Err(LeaseError::NameBadStart { ch: '_' })),
            ("a/b", Err(LeaseError::NameBadChar { ch: '/', pos: 1 })),
            ("a b", Err(LeaseError::NameBadChar { ch: ' ', pos: 1 })),
            ("a\0", Err(LeaseError::NameBadChar { ch: '\0', pos: 1 })),
            ("é", Err(LeaseError::NameBadChar { ch: 'é', pos: 0 })),
            ("ab\ncd", Err(LeaseError::NameBadChar { ch: '\n', pos: 2 })),
        ];
        for (name, want) in cases {
            assert_eq!(validate_name(name), want, "{name:?}");
        }
    }

    #[test]
    fn labels() {
        let k128 = "k".repeat(128);
        let k129 = "k".repeat(129);
        let v1024 = "v".repeat(1024);
        let v1025 = "v".repeat(1025);
        let cases: Vec<(&str, &str, Option<&str>)> = vec![
            ("role", "web", None),
            ("example.com/team", "a b c ünïcode", None),
            ("k", "", None),
            (&k128, &v1024, None),
            ("", "x", Some("key \"\" is empty")),
            (&k129, "x", Some("longer than 128")),
            ("/abs", "x", Some("must start with a letter or digit")),
            ("-x", "x", Some("must start")),
            ("a b", "x", Some("may only contain")),
            ("a=b", "x", Some("may only contain")),
            ("ok", &v1025, Some("longer than 1024 bytes")),
            ("ok", "a\0b", Some("control")),
            ("ok", "line\nbreak", Some("control")),
            ("ok", "del\u{7f}", Some("control")),
            ("ok", "c1\u{85}", Some("control")),
        ];
        for (key, value, want) in cases {
            let got = validate_label(key, value);
            match want {
                None => assert_eq!(got, Ok(()), "{key:?}={value:?}"),
                Some(text) => {
                    let msg = got.expect_err("must be refused").to_string();
                    assert!(msg.contains(text), "{msg:?} should contain {text:?}");
                }
            }
        }
        // A huge key is quoted back truncated, and control characters escaped.
        let long = format!("\n{}", "x".repeat(10_000));
        let msg = validate_label(&long, "").expect_err("bad").to_string();
        assert!(msg.len() < 200, "{msg}");
        assert!(!msg.contains('\n'));
    }

    #[test]
    fn label_sets() {
        let keys: Vec<String> = (0..70).map(|i| format!("k{i}")).collect();
        let set = |n: usize| keys.iter().take(n).map(|k| (k.as_str(), "v"));
        assert_eq!(validate_labels(set(0)), Ok(()));
        assert_eq!(validate_labels(set(64)), Ok(()));
        assert_eq!(
            validate_labels(set(70)),
            Err(LeaseError::TooManyLabels { count: 70 })
        );
        assert!(matches!(
            validate_labels([("ok", "v"), ("bad key", "v"), ("", "")]),
            Err(LeaseError::LabelKeyInvalid { ref key, .. }) if key == "bad key"
        ));
        assert!(matches!(
            validate_labels([("ok", "v\0")]),
            Err(LeaseError::LabelValueInvalid { .. })
        ));
    }

    #[test]
    fn states() {
        for s in [LeaseState::Active, LeaseState::Released] {
            assert_eq!(LeaseState::parse(s.as_str()), Some(s));
            assert_eq!(s.to_string(), s.as_str());
        }
        assert_eq!(LeaseState::Active.as_str(), "active");
        assert_eq!(LeaseState::Released.as_str(), "released");
        assert_eq!(LeaseState::parse("Active"), None);
        assert_eq!(LeaseState::parse(""), None);
    }

    #[test]
    fn error_messages() {
        assert!(
            LeaseError::NameTooLong { len: 129 }
                .to_string()
                .contains("129")
        );
        assert!(
            LeaseError::NameBadChar { ch: '/', pos: 3 }
                .to_string()
                .contains("position 3")
        );
        assert!(LeaseError::NameEmpty.to_string().contains("empty"));
    }
}
