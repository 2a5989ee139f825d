//! The HTTP API, v1: router, shared state, and the extractors that turn bad input into
//! `invalid_request` instead of axum's plain-text rejections.

mod attach;
mod leases;
mod model;
mod namespace;
mod observe;
pub mod openapi;
mod processes;

pub use model::rfc3339;
pub use observe::observe;

use std::collections::BTreeMap;

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Request, State};
use axum::http::header::{HeaderName, HeaderValue, SERVER};
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, delete, get, post, put};
use axum::{Extension, Router, middleware};
use serde::de::DeserializeOwned;

use crate::error::ApiError;
use crate::lease::LeaseService;
use crate::pool::Source;
use crate::process::ProcessService;

pub use crate::auth::Caller;
pub use crate::wire::{API_VERSION, parse_bool};
/// The largest request body accepted; larger ones get 413 `payload_too_large`.
pub const BODY_LIMIT: usize = 64 * 1024;

/// Everything a handler needs; cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub leases: LeaseService,
    pub processes: ProcessService,
    pub pool_source: Source,
    pub quarantine_seconds: u64,
}

/// Every operation of the API: method, path, handler. [`router`] is built from this list, and
/// tests check that each answers its method and that `/openapi.json` describes exactly these.
pub fn routes() -> Vec<(&'static str, &'static str, MethodRouter<AppState>)> {
    vec![
        ("GET", "/_ping", get(ping)),
        ("GET", "/openapi.json", get(openapi::serve)),
        ("GET", "/metrics", get(observe::metrics)),
        ("GET", "/v1/events", get(observe::events)),
        ("GET", "/v1/pool", get(leases::pool)),
        ("GET", "/v1/leases", get(leases::list)),
        ("POST", "/v1/leases", post(leases::post)),
        ("GET", "/v1/leases/{name}", get(leases::get_one)),
        ("PUT", "/v1/leases/{name}", put(leases::put)),
        ("DELETE", "/v1/leases/{name}", delete(leases::delete)),
        ("POST", "/v1/leases/{name}/renew", post(leases::renew)),
        ("GET", "/v1/leases/{name}/idmap", get(leases::idmap)),
        ("GET", "/v1/leases/{name}/events", get(leases::events)),
        ("PUT", "/v1/leases/{name}/namespace", put(namespace::put)),
        ("GET", "/v1/leases/{name}/attach", get(attach::list)),
        ("POST", "/v1/leases/{name}/attach", post(attach::post)),
        (
            "DELETE",
            "/v1/leases/{name}/attach/{id}",
            delete(attach::delete),
        ),
        ("GET", "/v1/lookup", get(leases::lookup)),
        ("GET", "/v1/leases/{name}/processes", get(processes::list)),
        (
            "POST",
            "/v1/leases/{name}/processes",
            post(processes::spawn),
        ),
        ("GET", "/v1/processes/{id}", get(processes::get_one)),
        ("POST", "/v1/processes/{id}/wait", post(processes::wait)),
        ("POST", "/v1/processes/{id}/signal", post(processes::signal)),
        ("GET", "/v1/processes/{id}/logs", get(processes::logs)),
    ]
}

/// The API routes with their state. Authentication is layered on by the server per transport.
pub fn router(state: AppState) -> Router {
    // Routing one path again adds its method to the path's method router.
    routes()
        .into_iter()
        .fold(Router::new(), |router, (_, path, method_router)| {
            router.route(path, method_router)
        })
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::extract::DefaultBodyLimit::max(BODY_LIMIT))
        .layer(middleware::from_fn(observe::echo_caller))
        .layer(middleware::map_response(stamp_headers))
        .with_state(state)
}

/// Liveness: answers `OK` as long as the daemon serves requests.
#[utoipa::path(get, path = "/_ping", tag = "daemon", operation_id = "ping",
    responses((status = 200, description = "`OK`", body = String, content_type = "text/plain")))]
async fn ping() -> &'static str {
    "OK"
}

async fn not_found() -> ApiError {
    ApiError::NotFound("no such endpoint; see docs/API.md".into())
}

async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed("method not allowed on this endpoint".into())
}

/// Adds `Api-Version` and `Server` to every response.
pub async fn stamp_headers(mut response: Response) -> Response {
    let headers = response.headers_mut();
    headers.insert(
        HeaderName::from_static("api-version"),
        HeaderValue::from_static(API_VERSION),
    );
    headers.insert(
        SERVER,
        HeaderValue::from_static(concat!("subidd/", env!("CARGO_PKG_VERSION"))),
    );
    response
}

/// The caller, or nobody when no authentication layer ran (handler tests).
fn caller_uid(caller: Option<Extension<Caller>>) -> Option<u32> {
    caller.and_then(|Extension(c)| c.uid)
}

/// A JSON body read whatever the `Content-Type` (curl's `-d` says form-urlencoded), with
/// unknown fields refused by the target type. An empty body is `None`.
pub struct JsonBody<T>(pub Option<T>);

impl<S, T> FromRequest<S> for JsonBody<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = Bytes::from_request(req, state).await.map_err(|rejection| {
            if rejection.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::PayloadTooLarge { limit: BODY_LIMIT }
            } else {
                ApiError::InvalidRequest(format!("cannot read request body: {rejection}"))
            }
        })?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(JsonBody(None));
        }
        serde_json::from_slice(&bytes)
            .map(|v| JsonBody(Some(v)))
            .map_err(|e| ApiError::InvalidRequest(format!("invalid JSON body: {e}")))
    }
}

/// The `{name}` of a lease path, validated.
#[derive(utoipa::IntoParams)]
#[into_params(names("name"), parameter_in = Path)]
pub struct LeaseName(
    /// 1-128 characters of `[A-Za-z0-9_.-]`, the first a letter or digit.
    #[param(pattern = "^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")]
    pub String,
);

impl<S: Send + Sync> FromRequestParts<S> for LeaseName {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let axum::extract::Path(name) =
            axum::extract::Path::<String>::from_request_parts(parts, state)
                .await
                .map_err(|e| ApiError::InvalidRequest(format!("bad path: {e}")))?;
        subid_core::validate_name(&name)
            .map_err(|e| ApiError::InvalidRequest(format!("invalid lease name: {e}")))?;
        Ok(LeaseName(name))
    }
}

/// Query parameters, each key at most once unless the endpoint allows repeats; keys the
/// endpoint does not know are refused.
pub struct QueryParams(pub Vec<(String, String)>);

impl<S: Send + Sync> FromRequestParts<S> for QueryParams {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let query = parts.uri.query().unwrap_or("");
        Ok(QueryParams(
            form_urlencoded::parse(query.as_bytes())
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect(),
        ))
    }
}

impl QueryParams {
    /// Refuses keys outside `known` and repeats of keys not in `repeatable`; returns the
    /// single-valued ones as a map.
    pub fn check(
        &self,
        known: &[&str],
        repeatable: &[&str],
    ) -> Result<BTreeMap<&str, &str>, ApiError> {
        let mut single = BTreeMap::new();
        for (key, value) in &self.0 {
            if !known.contains(&key.as_str()) {
                return Err(ApiError::InvalidRequest(format!(
                    "unknown query parameter {key:?}; this endpoint takes {known:?}"
                )));
            }
            if !repeatable.contains(&key.as_str())
                && single.insert(key.as_str(), value.as_str()).is_some()
            {
                return Err(ApiError::InvalidRequest(format!(
                    "query parameter {key:?} given twice"
                )));
            }
        }
        Ok(single)
    }

    /// All values of a repeatable key.
    pub fn all<'a>(&'a self, key: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.0
            .iter()
            .filter(move |(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// Helper so handlers can return either JSON or an error.
pub type ApiResult<T = Response> = Result<T, ApiError>;

/// Wraps a serialisable value as a JSON response with a status.
pub fn json<T: serde::Serialize>(status: axum::http::StatusCode, value: &T) -> Response {
    (status, axum::Json(value)).into_response()
}

/// State extractor alias, to keep handler signatures short.
pub type St = State<AppState>;

#[cfg(test)]
mod fuzz;
#[cfg(test)]
mod tests;
