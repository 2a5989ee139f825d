//! Small facts of the wire that the API layer and the layers below it share, kept here so that
//! nothing below `api/` reaches up into it: the API's version and booleans as people type them in
//! a query.

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
