//! `ApiError`: every failure a client can see, with its HTTP status and stable code.

use axum::http::StatusCode;
use axum::http::header::{HeaderValue, WWW_AUTHENTICATE};
use axum::response::{IntoResponse, Response};
use subid_store::StoreError;

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
    Unavailable(&'static str),
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
            | ApiError::ProcessExited(_) => StatusCode::CONFLICT,
            ApiError::ExecutableNotFound(_) | ApiError::ExecFailed(_) => StatusCode::BAD_REQUEST,
            ApiError::PidsUnsupported(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::StorageFull => StatusCode::INSUFFICIENT_STORAGE,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
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
            ApiError::ExecutableNotFound(_) => "executable_not_found",
            ApiError::ExecFailed(_) => "exec_failed",
            ApiError::PidsUnsupported(_) => "pids_unsupported",
            ApiError::PayloadTooLarge { .. } => "payload_too_large",
            ApiError::StorageFull => "storage_full",
            ApiError::Unavailable(_) => "unavailable",
            ApiError::Internal(_) => "internal",
        }
    }
}

/// The code of an error answer, on the response's extensions for the request log and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ErrorCode(pub &'static str);

/// What a client hears when the store failed; the log has the details.
pub const STORE_UNAVAILABLE: &str = "the lease store cannot be used right now; retry later";

impl From<&StoreError> for ApiError {
    fn from(error: &StoreError) -> ApiError {
        if error.is_full() {
            ApiError::StorageFull
        } else {
            ApiError::Unavailable(STORE_UNAVAILABLE)
        }
    }
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
        let body = serde_json::json!({ "code": self.code(), "message": self.to_string() });
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
