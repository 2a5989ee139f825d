//! Plain-text output for people: aligned columns and `KEY: value` listings.

use serde_json::Value;

/// Columns padded to their widest cell, separated by three spaces; the last is not padded.
pub fn render(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(cell.chars().count());
            }
        }
    }
    let mut out = String::new();
    let header: Vec<String> = headers.iter().map(|h| h.to_string()).collect();
    for row in std::iter::once(&header).chain(rows) {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            if i > 0 {
                line.push_str("   ");
            }
            line.push_str(cell);
            if i + 1 < row.len() {
                let pad = widths[i].saturating_sub(cell.chars().count());
                line.extend(std::iter::repeat_n(' ', pad));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// `KEY:` then the value, keys padded to the widest.
pub fn fields(pairs: &[(&str, String)]) -> String {
    let width = pairs.iter().map(|(k, _)| k.len() + 1).max().unwrap_or(0);
    let mut out = String::new();
    for (key, value) in pairs {
        out.push_str(&format!("{:<width$} {value}\n", format!("{key}:")));
    }
    out
}

/// A JSON value as a cell: strings bare, null as `-`.
pub fn cell(value: &Value) -> String {
    match value {
        Value::Null => "-".to_string(),
        Value::String(s) if s.is_empty() => "-".to_string(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// An object of strings as `k=v,k2=v2` (or `-`).
pub fn pairs(value: &Value) -> String {
    match value.as_object() {
        Some(map) if !map.is_empty() => map
            .iter()
            .map(|(k, v)| format!("{k}={}", cell(v)))
            .collect::<Vec<_>>()
            .join(","),
        _ => "-".to_string(),
    }
}

/// An array as `a,b` (or `-`).
pub fn list(value: &Value, sep: &str) -> String {
    match value.as_array() {
        Some(items) if !items.is_empty() => items.iter().map(cell).collect::<Vec<_>>().join(sep),
        _ => "-".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn aligns_columns() {
        let text = render(
            &["NAME", "STATE", "LABELS"],
            &[
                vec!["a".into(), "active".into(), "-".into()],
                vec!["longer".into(), "x".into(), "k=v".into()],
            ],
        );
        assert_eq!(
            text,
            "NAME     STATE    LABELS\na        active   -\nlonger   x        k=v\n"
        );
    }

    #[test]
    fn renders_cells() {
        assert_eq!(cell(&json!(null)), "-");
        assert_eq!(cell(&json!("x")), "x");
        assert_eq!(cell(&json!(3)), "3");
        assert_eq!(pairs(&json!({"a": "1", "b": "2"})), "a=1,b=2");
        assert_eq!(pairs(&json!({})), "-");
        assert_eq!(list(&json!(["mnt", "net"]), ","), "mnt,net");
        assert_eq!(
            fields(&[("A", "1".into()), ("BBB", "2".into())]),
            "A:   1\nBBB: 2\n"
        );
    }
}
