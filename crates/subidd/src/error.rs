//! `ApiError`: every failure a client can see, with its HTTP status and stable code.

use axum::http::StatusCode;
use axum::http::header::{HeaderValue, WWW_AUTHENTICATE};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use subid_store::StoreError;

use crate::service_error::ServiceError;
use utoipa::ToSchema;
use utoipa::openapi::schema::{ObjectBuilder, Type};

/// An error answered to a client as `{"code": "...", "message": "..."}`.
///
/// Codes are stable: scripts match on them. `docs/API.md` says what each means and what to do.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    InvalidRequest(String),
    #[error("missing or wrong bearer token")]
    Unauthorized,
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    MethodNotAllowed(String),
    #[error("lease {0} already exists")]
    LeaseExists(String),
    #[error("{0}")]
    LeaseConflict(String),
    #[error("{0}")]
    PoolExhausted(String),
    #[error("{0}")]
    LeaseBusy(String),
    #[error("{0}")]
    ProcessExited(String),
    #[error("{0}")]
    NotInLease(String),
    #[error("{0}")]
    ProcessLimit(String),
    #[error("{0}")]
    ExecutableNotFound(String),
    #[error("{0}")]
    ExecFailed(String),
    #[error("{0}")]
    PidsUnsupported(String),
    #[error("request body larger than {limit} bytes")]
    PayloadTooLarge { limit: usize },
    #[error("the database disk is full; free space in the state directory, then retry")]
    StorageFull,
    #[error("{0}")]
    SpawnTimeout(String),
    #[error("{0}")]
    CgroupsUnavailable(String),
    #[error("{0}")]
    Unavailable(&'static str),
    #[error("{0}")]
    StoreUnavailable(&'static str),
    /// Not a failure: a forced release is recorded and carried out as other hosts of a fleet
    /// stop the lease's processes (202).
    #[error("{0}")]
    ReleasePending(String),
    #[error("internal error; the daemon log has the details")]
    Internal(String),
}

impl ApiError {
    /// The HTTP status of this error.
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::InvalidRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::LeaseExists(_)
            | ApiError::LeaseConflict(_)
            | ApiError::PoolExhausted(_)
            | ApiError::LeaseBusy(_)
            | ApiError::ProcessExited(_)
            | ApiError::NotInLease(_)
            | ApiError::ProcessLimit(_) => StatusCode::CONFLICT,
            ApiError::ExecutableNotFound(_) | ApiError::ExecFailed(_) => StatusCode::BAD_REQUEST,
            ApiError::PidsUnsupported(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::ReleasePending(_) => StatusCode::ACCEPTED,
            ApiError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::StorageFull => StatusCode::INSUFFICIENT_STORAGE,
            ApiError::SpawnTimeout(_)
            | ApiError::CgroupsUnavailable(_)
            | ApiError::Unavailable(_)
            | ApiError::StoreUnavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The stable, snake_case code of this error.
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::InvalidRequest(_) => "invalid_request",
            ApiError::Unauthorized => "unauthorized",
            ApiError::Forbidden(_) => "forbidden",
            ApiError::NotFound(_) => "not_found",
            ApiError::MethodNotAllowed(_) => "method_not_allowed",
            ApiError::LeaseExists(_) => "lease_exists",
            ApiError::LeaseConflict(_) => "lease_conflict",
            ApiError::PoolExhausted(_) => "pool_exhausted",
            ApiError::LeaseBusy(_) => "lease_busy",
            ApiError::ProcessExited(_) => "process_exited",
            ApiError::NotInLease(_) => "not_in_lease",
            ApiError::ProcessLimit(_) => "process_limit",
            ApiError::ExecutableNotFound(_) => "executable_not_found",
            ApiError::ExecFailed(_) => "exec_failed",
            ApiError::PidsUnsupported(_) => "pids_unsupported",
            ApiError::PayloadTooLarge { .. } => "payload_too_large",
            ApiError::StorageFull => "storage_full",
            ApiError::SpawnTimeout(_) => "spawn_timeout",
            ApiError::CgroupsUnavailable(_) => "cgroups_unavailable",
            ApiError::Unavailable(_) => "unavailable",
            ApiError::StoreUnavailable(_) => "store_unavailable",
            ApiError::ReleasePending(_) => "release_pending",
            ApiError::Internal(_) => "internal",
        }
    }
}

/// Every code [`ApiError::code`] can return, in the order `docs/API.md` lists them.
pub const ERROR_CODES: [&str; 23] = [
    "invalid_request",
    "unauthorized",
    "forbidden",
    "not_found",
    "method_not_allowed",
    "lease_exists",
    "lease_conflict",
    "pool_exhausted",
    "lease_busy",
    "process_exited",
    "not_in_lease",
    "process_limit",
    "executable_not_found",
    "exec_failed",
    "pids_unsupported",
    "payload_too_large",
    "storage_full",
    "spawn_timeout",
    "cgroups_unavailable",
    "unavailable",
    "store_unavailable",
    "release_pending",
    "internal",
];

/// The body of every error answer.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    /// Stable and snake_case: scripts match on it.
    #[schema(schema_with = error_code_schema)]
    pub code: &'static str,
    /// For people; the wording may change.
    pub message: String,
}

/// `code` of [`ErrorBody`]: a string from [`ERROR_CODES`].
fn error_code_schema() -> utoipa::openapi::Object {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .enum_values(Some(ERROR_CODES))
        .description(Some("Stable and snake_case: scripts match on it."))
        .build()
}
/// The code of an error answer, on the response's extensions for the request log and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ErrorCode(pub &'static str);

/// What a client hears when the store failed; the log has the details.
pub const STORE_UNAVAILABLE: &str = "the lease store cannot be used right now; retry later";
/// What a client hears when the lease store cannot be reached.
pub const STORE_UNREACHABLE: &str = "the lease store cannot be reached; nothing was written \
     (leases this host knows can still be read and spawned into); retry later";

impl From<&StoreError> for ApiError {
    fn from(error: &StoreError) -> ApiError {
        if error.is_full() {
            ApiError::StorageFull
        } else if error.is_unreachable() {
            ApiError::StoreUnavailable(STORE_UNREACHABLE)
        } else {
            ApiError::Unavailable(STORE_UNAVAILABLE)
        }
    }
}

/// The one place a service's error becomes an HTTP answer. Failures of the daemon's own (store,
/// kernel, bugs) are logged here with their whole chain of causes; the body says little.
impl From<ServiceError> for ApiError {
    fn from(error: ServiceError) -> ApiError {
        match error {
            ServiceError::NotFound { what } => ApiError::NotFound(what),
            ServiceError::Invalid { reason } => ApiError::InvalidRequest(reason),
            ServiceError::Exists { lease } => ApiError::LeaseExists(lease),
            ServiceError::Conflict { reason } => ApiError::LeaseConflict(reason),
            // The reason names the hosts with live processes when there are other hosts.
            ServiceError::Busy { reason, .. } => ApiError::LeaseBusy(reason),
            ServiceError::Exhausted { reason } => ApiError::PoolExhausted(reason),
            ServiceError::ProcessLimit { reason } => ApiError::ProcessLimit(reason),
            pending @ ServiceError::ReleasePending { .. } => {
                ApiError::ReleasePending(pending.to_string())
            }
            ServiceError::StoreFull { source }
            | ServiceError::StoreUnavailable { source }
            | ServiceError::Store { source } => {
                tracing::error!(error = %chain(&*source), "store failure");
                ApiError::from(&*source)
            }
            ServiceError::Kernel { what, source } => {
                tracing::error!(%what, error = %chain(&*source), "kernel refusal");
                ApiError::Unavailable(
                    "the kernel refused an operation the request needs; see the daemon log",
                )
            }
            ServiceError::Internal { what, source } => match source.as_deref() {
                Some(cause) => ApiError::Internal(format!("{what}: {}", chain(cause))),
                None => ApiError::Internal(what),
            },
            ServiceError::ShuttingDown => ApiError::Unavailable("the daemon is shutting down"),
            ServiceError::NotInLease { reason } => ApiError::NotInLease(reason),
            ServiceError::ProcessExited { reason } => ApiError::ProcessExited(reason),
            ServiceError::ExecFailed { reason } => ApiError::ExecFailed(reason),
            ServiceError::SpawnTimeout { reason } => ApiError::SpawnTimeout(reason),
            ServiceError::CgroupsUnavailable { reason } => ApiError::CgroupsUnavailable(reason),
            ServiceError::PidsUnsupported { reason } => ApiError::PidsUnsupported(reason),
            ServiceError::Unavailable { reason } => ApiError::Unavailable(reason),
        }
    }
}

/// An error and its causes, for the log: `a: b: c`.
fn chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let next = cause.to_string();
        if !text.contains(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        source = cause.source();
    }
    text
}

impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> ApiError {
        tracing::error!(%error, "store failure");
        ApiError::from(&error)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() {
            // 5xx bodies say little; the log says all.
            tracing::error!(code = self.code(), error = ?self, "request failed");
        }
        let body = ErrorBody {
            code: self.code(),
            message: self.to_string(),
        };
        let mut response = (status, axum::Json(body)).into_response();
        response.extensions_mut().insert(ErrorCode(self.code()));
        if matches!(self, ApiError::Unauthorized) {
            response
                .headers_mut()
                .insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_is_listed_once() {
        let all = [
            ApiError::InvalidRequest(String::new()),
            ApiError::Unauthorized,
            ApiError::Forbidden(String::new()),
            ApiError::NotFound(String::new()),
            ApiError::MethodNotAllowed(String::new()),
            ApiError::LeaseExists(String::new()),
            ApiError::LeaseConflict(String::new()),
            ApiError::PoolExhausted(String::new()),
            ApiError::LeaseBusy(String::new()),
            ApiError::ProcessExited(String::new()),
            ApiError::NotInLease(String::new()),
            ApiError::ProcessLimit(String::new()),
            ApiError::ExecutableNotFound(String::new()),
            ApiError::ExecFailed(String::new()),
            ApiError::PidsUnsupported(String::new()),
            ApiError::PayloadTooLarge { limit: 1 },
            ApiError::StorageFull,
            ApiError::SpawnTimeout(String::new()),
            ApiError::CgroupsUnavailable(String::new()),
            ApiError::Unavailable(""),
            ApiError::StoreUnavailable(""),
            ApiError::ReleasePending(String::new()),
            ApiError::Internal(String::new()),
        ];
        let codes: Vec<&str> = all.iter().map(ApiError::code).collect();
        assert_eq!(codes, ERROR_CODES);
    }
}
