//! The OpenAPI description of the API, generated from the handlers' annotations and served at
//! `GET /openapi.json`; `docs/openapi.json` is a committed copy a test keeps current.

use std::sync::LazyLock;

use axum::http::StatusCode;
use axum::http::header::CONTENT_TYPE;
use axum::response::{IntoResponse, Response};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{ContentBuilder, OpenApi as Document, Ref, ResponseBuilder};
use utoipa::{Modify, OpenApi};

use super::{leases, model, processes};
use crate::error::ErrorBody;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "subidd",
        description = "Per-container host uid/gid ranges (leases) and processes in their user \
            namespaces. Served on a unix socket (peer credentials decide; no token) and \
            optionally on a loopback TCP listener (bearer token). Every error answers \
            `{\"code\", \"message\"}` with a stable code; `docs/API.md` says what each means."
    ),
    paths(
        super::ping,
        serve,
        super::observe::metrics,
        super::observe::events,
        leases::pool,
        leases::list,
        leases::post,
        leases::get_one,
        leases::put,
        leases::delete,
        leases::renew,
        leases::idmap,
        leases::events,
        leases::lookup,
        super::namespace::put,
        super::attach::post,
        super::attach::list,
        super::attach::delete,
        processes::list,
        processes::spawn,
        processes::get_one,
        processes::wait,
        processes::signal,
        processes::logs,
    ),
    components(schemas(ErrorBody, model::LeaseStateName, processes::ProcessStateName)),
    modifiers(&Transport),
    tags(
        (name = "daemon", description = "liveness, this description, metrics and the event feed"),
        (name = "leases", description = "the pool, leases, their id maps and history"),
        (name = "processes", description = "processes started in a lease's user namespace"),
    )
)]
pub struct ApiDoc;

/// What the transports add to every operation: the bearer scheme of the TCP listener and the
/// errors any request can meet before or after its handler.
struct Transport;

/// Answers every operation can give, whatever its handler does.
const TRANSPORT_ERRORS: [(&str, &str); 4] = [
    (
        "401",
        "unauthorized: TCP only, the bearer token is missing or wrong",
    ),
    (
        "403",
        "forbidden: the unix peer's uid/gid is not allowed, or over TCP the Host header does \
         not name loopback",
    ),
    (
        "500",
        "internal: a bug or an unexpected kernel answer; the daemon log has the details",
    ),
    (
        "503",
        "unavailable: the lease store cannot be used right now; retry later",
    ),
];

impl Modify for Transport {
    fn modify(&self, openapi: &mut Document) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearerAuth",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "TCP listener only: the token of `token_file`. The unix socket needs none.",
                    ))
                    .build(),
            ),
        );
        // Either no credentials (unix socket) or the bearer token (TCP).
        openapi.security = Some(vec![
            SecurityRequirement::default(),
            SecurityRequirement::new("bearerAuth", Vec::<String>::new()),
        ]);
        for item in openapi.paths.paths.values_mut() {
            for operation in [
                &mut item.get,
                &mut item.put,
                &mut item.post,
                &mut item.delete,
            ]
            .into_iter()
            .flatten()
            {
                optional_body_is_absent_not_null(operation);
                for (status, description) in TRANSPORT_ERRORS {
                    let response = ResponseBuilder::new()
                        .description(description)
                        .content(
                            "application/json",
                            ContentBuilder::new()
                                .schema(Some(Ref::from_schema_name("ErrorBody")))
                                .build(),
                        )
                        .build();
                    operation
                        .responses
                        .responses
                        .entry(status.to_string())
                        .or_insert(response.into());
                }
            }
        }
    }
}

/// utoipa describes an `Option<T>` body as `oneOf: [null, T]` (not required). The handlers take
/// no body or a `T`; a JSON `null` is refused: keep `T` alone, still not required.
fn optional_body_is_absent_not_null(operation: &mut utoipa::openapi::path::Operation) {
    use utoipa::openapi::RefOr;
    use utoipa::openapi::schema::{Schema, SchemaType, Type};
    let is_null = |item: &RefOr<Schema>| matches!(item, RefOr::T(Schema::Object(o)) if o.schema_type == SchemaType::Type(Type::Null));
    let Some(body) = operation.request_body.as_mut() else {
        return;
    };
    for content in body.content.values_mut() {
        if let Some(RefOr::T(Schema::OneOf(one_of))) = &content.schema
            && one_of.items.len() == 2
            && one_of.items.iter().any(is_null)
        {
            content.schema = one_of.items.iter().find(|i| !is_null(i)).cloned();
        }
    }
}

/// The document as served and committed: pretty-printed JSON with a final newline.
pub fn document() -> String {
    let mut text = ApiDoc::openapi()
        .to_pretty_json()
        .unwrap_or_else(|e| format!("{{\"error\": \"cannot render the OpenAPI document: {e}\"}}"));
    text.push('\n');
    text
}

static DOCUMENT: LazyLock<String> = LazyLock::new(document);

/// This description of the API.
#[utoipa::path(get, path = "/openapi.json", tag = "daemon", operation_id = "openapi",
    responses((status = 200, description = "an OpenAPI 3.1 document", body = Object)))]
pub async fn serve() -> Response {
    (
        StatusCode::OK,
        [(CONTENT_TYPE, "application/json")],
        DOCUMENT.as_str(),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    /// The committed copy, from this crate's directory.
    const COMMITTED: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/openapi.json");

    #[test]
    fn openapi_committed_copy_is_current() {
        let generated = document();
        if std::env::var_os("SUBIDD_UPDATE_OPENAPI").is_some_and(|v| v == "1") {
            std::fs::write(COMMITTED, &generated).expect("write docs/openapi.json");
        }
        let committed = std::fs::read_to_string(COMMITTED).unwrap_or_default();
        assert!(
            committed == generated,
            "docs/openapi.json differs from the document the code generates; regenerate it \
             with `SUBIDD_UPDATE_OPENAPI=1 cargo test -p subidd openapi` and commit it"
        );
    }

    fn operations(doc: &serde_json::Value) -> BTreeSet<(String, String)> {
        let mut found = BTreeSet::new();
        for (path, item) in doc["paths"].as_object().expect("paths") {
            for method in item.as_object().expect("path item").keys() {
                found.insert((method.to_uppercase(), path.clone()));
            }
        }
        found
    }

    #[test]
    fn openapi_describes_every_route_and_nothing_else() {
        let doc: serde_json::Value = serde_json::from_str(&document()).expect("valid JSON");
        let routes: BTreeSet<(String, String)> = crate::api::routes()
            .into_iter()
            .map(|(method, path, _)| (method.to_string(), path.to_string()))
            .collect();
        assert_eq!(
            operations(&doc),
            routes,
            "every route in api::routes() needs a #[utoipa::path] listed in ApiDoc"
        );
    }

    #[test]
    fn openapi_operations_declare_params_success_and_errors() {
        let doc: serde_json::Value = serde_json::from_str(&document()).expect("valid JSON");
        let codes = doc["components"]["schemas"]["ErrorBody"]["properties"]["code"]["enum"]
            .as_array()
            .expect("ErrorBody.code enum")
            .len();
        assert_eq!(codes, crate::error::ERROR_CODES.len());
        for (path, item) in doc["paths"].as_object().expect("paths") {
            for (method, op) in item.as_object().expect("path item") {
                let at = format!("{method} {path}");
                let names: BTreeSet<&str> = op["parameters"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|p| p["in"] == "path")
                    .filter_map(|p| p["name"].as_str())
                    .collect();
                let in_template: BTreeSet<&str> = path
                    .split('/')
                    .filter_map(|s| s.strip_prefix('{')?.strip_suffix('}'))
                    .collect();
                assert_eq!(names, in_template, "{at}: path parameters");
                let responses = op["responses"].as_object().expect("responses");
                assert!(
                    responses.keys().any(|s| s.starts_with('2')),
                    "{at}: a success answer"
                );
                for (status, response) in responses {
                    if status.starts_with('2') {
                        continue;
                    }
                    assert_eq!(
                        response["content"]["application/json"]["schema"]["$ref"],
                        "#/components/schemas/ErrorBody",
                        "{at} {status}: errors answer ErrorBody"
                    );
                }
                for status in ["401", "403", "500", "503"] {
                    assert!(responses.contains_key(status), "{at}: {status}");
                }
            }
        }
    }
}
