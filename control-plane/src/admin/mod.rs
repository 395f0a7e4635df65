//! The admin HTTP listener: the router, its shared state and error type, and
//! the OpenAPI document generated from the same route registrations. The
//! handlers live in one submodule per resource; `access` authenticates,
//! authorises and audits every `/v1` call.

use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::extract::rejection::JsonRejection;
use axum::http::StatusCode;
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json, Router};
use serde_json::Value;
use spiffe::X509Source;
use utoipa::OpenApi as _;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::revocations::RevokeError;

mod access;
mod audit;
mod leaked;
mod missions;
mod ops;
mod posture;
mod revocations;
mod secrets;
mod ssf;
mod tokens;
pub mod types;
mod usage;

pub use access::{AdminRole, ConsoleCaller, Responder, Viewer};
use types::ErrorBody;

/// Largest request body the admin API reads.
const MAX_BODY: usize = 16 * 1024;

#[derive(Clone)]
pub struct AdminState {
    pub cp: Arc<ControlPlaneState>,
    pub source: X509Source,
    /// The effective configuration, without secrets.
    pub config_dump: Arc<Value>,
    pub limiter: Arc<crate::unauthenticated::FailureLimiter>,
}

use crate::state::ControlPlaneState;

/// The document's fixed part; paths and schemas come from the routes.
#[derive(utoipa::OpenApi)]
#[openapi(
    info(
        title = "Leash control plane admin API",
        version = "1",
        description = "Revocations and their propagation to sidecars, leaked values, usage, brokered secrets, tokens and the audit log. Every /v1 call needs `Authorization: Bearer lsh_…` and is written to the audit log, refused calls included (those without a valid token as bounded per-address summaries). Roles: viewer < responder < admin; each operation states the least it needs. Generated from the server's own types and routes."
    ),
    servers((url = "http://127.0.0.1:8080")),
    components(schemas(ErrorBody)),
    modifiers(&BearerScheme)
)]
struct ApiDoc;

/// The name operations use in `security(("bearer" = []))`.
pub const BEARER: &str = "bearer";

struct BearerScheme;

impl utoipa::Modify for BearerScheme {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        openapi
            .components
            .get_or_insert_with(Default::default)
            .add_security_scheme(
                BEARER,
                SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
            );
    }
}

/// Public routes: probes, metrics, the JWKS and this document.
fn public_routes() -> OpenApiRouter<AdminState> {
    OpenApiRouter::new()
        .routes(routes!(ops::healthz))
        .routes(routes!(ops::readyz))
        .routes(routes!(ops::jwks))
        .routes(routes!(ops::metrics))
        .routes(routes!(ops::openapi))
        .routes(routes!(ssf::push))
        .routes(routes!(ssf::poll))
        .routes(routes!(ssf::configuration))
}

/// The authenticated `/v1` API. A route exists only by being registered
/// here with its `#[utoipa::path]`, so none can be left out of the document.
fn v1_routes() -> OpenApiRouter<AdminState> {
    OpenApiRouter::new()
        .routes(routes!(revocations::list, revocations::revoke))
        .routes(routes!(revocations::status))
        .routes(routes!(revocations::restore))
        .routes(routes!(revocations::sidecars))
        .routes(routes!(revocations::replicas))
        .routes(routes!(leaked::list, leaked::register))
        .routes(routes!(leaked::status))
        .routes(routes!(leaked::stripped))
        .routes(routes!(usage::summary))
        .routes(routes!(usage::dependencies))
        .routes(routes!(usage::timeline))
        .routes(routes!(usage::unused_grants))
        .routes(routes!(usage::after_revocation))
        .routes(routes!(posture::posture))
        .routes(routes!(posture::check))
        .routes(routes!(secrets::list, secrets::put))
        .routes(routes!(secrets::revoke_version))
        .routes(routes!(secrets::probe_version))
        .routes(routes!(secrets::probes))
        .routes(routes!(audit::entries))
        .routes(routes!(audit::verify))
        .routes(routes!(audit::head))
        .routes(routes!(ops::get_logging, ops::set_logging))
        .routes(routes!(ops::config_dump))
        .routes(routes!(tokens::create))
        .routes(routes!(missions::list, missions::create))
        .routes(routes!(missions::show))
        .routes(routes!(missions::add))
        .routes(routes!(missions::close))
        .routes(routes!(missions::reopen))
        .routes(routes!(missions::evidence))
        .routes(routes!(
            ssf::streams,
            ssf::create_stream,
            ssf::update_stream,
            ssf::replace_stream,
            ssf::delete_stream
        ))
        .routes(routes!(ssf::status, ssf::set_status))
        .routes(routes!(ssf::verify))
}

fn api() -> OpenApiRouter<AdminState> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
}

/// The OpenAPI document of every admin route, as served at `/openapi.json`.
pub fn openapi() -> utoipa::openapi::OpenApi {
    let mut doc = api()
        .merge(public_routes())
        .merge(v1_routes())
        .into_openapi();
    add_access_refusals(&mut doc);
    doc
}

/// The refusals `access::audited` gives any `/v1` call before its handler
/// runs, added to every operation that needs the bearer token.
fn add_access_refusals(doc: &mut utoipa::openapi::OpenApi) {
    use utoipa::openapi::{ContentBuilder, Ref, ResponseBuilder};
    let refusal = |description: &str| {
        ResponseBuilder::new()
            .description(description)
            .content(
                "application/json",
                ContentBuilder::new()
                    .schema(Some(Ref::from_schema_name("ErrorBody")))
                    .build(),
            )
            .build()
    };
    for item in doc.paths.paths.values_mut() {
        for op in [
            &mut item.get,
            &mut item.put,
            &mut item.post,
            &mut item.delete,
            &mut item.patch,
        ]
        .into_iter()
        .flatten()
        {
            if op.security.is_none() {
                continue;
            }
            let responses = &mut op.responses.responses;
            for (status, description) in [
                ("401", "unauthenticated: no valid bearer token"),
                (
                    "429",
                    "too_many_failures: too many calls without a valid token from this address (Retry-After)",
                ),
                (
                    "503",
                    "store_unavailable, or audit_unavailable: a change is refused when it cannot be audited",
                ),
            ] {
                responses
                    .entry(status.to_owned())
                    .or_insert_with(|| refusal(description).into());
            }
        }
    }
}

/// The document as served, rendered once.
#[derive(Clone)]
struct OpenApiJson(Arc<str>);

pub fn router(state: AdminState) -> Router {
    let v1 = v1_routes()
        .layer(middleware::from_fn_with_state(
            state.clone(),
            access::audited,
        ))
        .layer(DefaultBodyLimit::max(MAX_BODY));
    let (router, mut doc) = api().merge(public_routes()).merge(v1).split_for_parts();
    add_access_refusals(&mut doc);
    let doc = match doc.to_json() {
        Ok(json) => Some(OpenApiJson(json.into())),
        Err(e) => {
            tracing::error!(error = %e, "cannot render the OpenAPI document");
            None
        }
    };
    router.layer(Extension(doc)).with_state(state)
}

/// An error as the API returns it: a status and `{"error": code, "message": …}`.
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    /// Seconds, for a `Retry-After` header.
    retry_after: Option<u64>,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            retry_after: None,
        }
    }

    fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid", message)
    }

    fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let detail = AuditDetail(format!("{}: {}", self.code, self.message));
        let body = ErrorBody {
            error: self.code.to_owned(),
            message: self.message,
        };
        let mut resp = (self.status, Json(body)).into_response();
        if let Some(secs) = self.retry_after {
            resp.headers_mut()
                .insert(axum::http::header::RETRY_AFTER, secs.into());
        }
        with_detail(resp, detail.0)
    }
}

impl From<RevokeError> for ApiError {
    fn from(e: RevokeError) -> Self {
        match e {
            RevokeError::Invalid(m) => Self::invalid(m),
            RevokeError::NotFound(m) => Self::not_found(m),
            RevokeError::Conflict(m) => Self::new(StatusCode::CONFLICT, "conflict", m),
            RevokeError::Store(e) => {
                tracing::error!(error = %e, "store error");
                Self::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "store_unavailable",
                    "the store refused the write",
                )
            }
        }
    }
}

impl From<crate::store::StoreError> for ApiError {
    fn from(e: crate::store::StoreError) -> Self {
        RevokeError::from(e).into()
    }
}

impl From<JsonRejection> for ApiError {
    fn from(e: JsonRejection) -> Self {
        Self::new(body_status(&e), "bad_body", e.body_text())
    }
}

/// 413 for a body over the limit, else 400.
fn body_status(e: &JsonRejection) -> StatusCode {
    if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
        StatusCode::PAYLOAD_TOO_LARGE
    } else {
        StatusCode::BAD_REQUEST
    }
}

/// What the audit entry should say about a call, set by the handler.
#[derive(Clone)]
struct AuditDetail(String);

fn with_detail(mut resp: Response, detail: String) -> Response {
    resp.extensions_mut().insert(AuditDetail(detail));
    resp
}

/// A handler's answer with what its audit entry says.
struct Audited<T>(StatusCode, T, String);

impl<T: serde::Serialize> IntoResponse for Audited<T> {
    fn into_response(self) -> Response {
        with_detail((self.0, Json(self.1)).into_response(), self.2)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every operation says who may call it, and the document's security
    /// matches: `/v1` needs the bearer token, the rest is public.
    #[test]
    fn every_operation_states_its_role_and_security() {
        let doc = serde_json::to_value(openapi()).unwrap();
        assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
        assert_eq!(
            doc["components"]["securitySchemes"][BEARER]["scheme"],
            "bearer"
        );
        let mut operations = 0;
        for (path, item) in doc["paths"].as_object().unwrap() {
            for (method, op) in item.as_object().unwrap() {
                operations += 1;
                let description = op["description"].as_str().unwrap_or_default();
                let security = &op["security"];
                if path.starts_with("/v1/") {
                    assert!(
                        ["Role: viewer.", "Role: responder.", "Role: admin."]
                            .iter()
                            .any(|r| description.contains(r)),
                        "{method} {path}: no role in {description:?}"
                    );
                    assert_eq!(
                        security[0][BEARER],
                        serde_json::json!([]),
                        "{method} {path}"
                    );
                    assert!(op["responses"]["401"].is_object(), "{method} {path}");
                } else {
                    assert_eq!(description, "Public.", "{method} {path}");
                    assert!(security.is_null(), "{method} {path}");
                }
            }
        }
        assert!(operations >= 29, "{operations} operations");
        let mut ids: Vec<&str> = doc["paths"]
            .as_object()
            .unwrap()
            .values()
            .flat_map(|item| item.as_object().unwrap().values())
            .map(|op| op["operationId"].as_str().unwrap())
            .collect();
        ids.sort_unstable();
        let before = ids.len();
        ids.dedup();
        assert_eq!(ids.len(), before, "operation ids are unique: {ids:?}");
    }
}
