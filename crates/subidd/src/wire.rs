//! Small facts of the wire that the API layer and the layers below it share, kept here so that
//! nothing below `api/` reaches up into it: the API's version and booleans as people type them in
//! a query, and times as RFC 3339.

use crate::error::ApiError;

/// The version every response names in its `Api-Version` header.
pub const API_VERSION: &str = "1";

/// Parses a boolean query value the way people type it.
pub fn parse_bool(key: &str, value: &str) -> Result<bool, ApiError> {
    match value {
        "true" | "1" | "yes" | "" => Ok(true),
        "false" | "0" | "no" => Ok(false),
        other => Err(ApiError::InvalidRequest(format!(
            "{key}={other:?}: expected true or false"
        ))),
    }
}

/// Unix milliseconds as RFC 3339 UTC with milliseconds.
pub fn rfc3339(ms: i64) -> String {
    let t =
        std::time::UNIX_EPOCH + std::time::Duration::from_millis(u64::try_from(ms).unwrap_or(0));
    humantime::format_rfc3339_millis(t).to_string()
}
