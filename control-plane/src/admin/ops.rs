//! Operating the control plane: health and readiness probes, metrics, the
//! JWKS, this API's OpenAPI document (all public), and the log filter and
//! configuration dump (`/v1`).

use axum::extract::State;
use axum::extract::rejection::JsonRejection;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};

use super::types::{ConfigDump, ErrorBody, LogFilter, LoggingRequest};
use super::{AdminRole, AdminState, ApiError, Audited, OpenApiJson, Viewer};

/// Liveness.
///
/// Public.
#[utoipa::path(get, path = "/healthz", tag = "ops",
    responses((status = 200, body = String, content_type = "text/plain")))]
pub(super) async fn healthz() -> &'static str {
    "ok\n"
}

/// Readiness: identity, the store, and this replica's revocations read
/// from the store recently (see the follower in `revocations.rs`).
///
/// Public.
#[utoipa::path(get, path = "/readyz", tag = "ops",
    responses((status = 200, body = String, content_type = "text/plain"),
        (status = 503, body = String, content_type = "text/plain",
            description = "not ready, pending: what is missing")))]
pub(super) async fn readyz(State(s): State<AdminState>) -> (StatusCode, String) {
    let mut pending = Vec::new();
    if !s.source.is_healthy() {
        pending.push("identity");
    }
    if !s.cp.store.ping().await {
        pending.push("store");
    }
    if !s.cp.revocations.in_sync(s.cp.sync_limit) {
        pending.push("revocations-sync");
    }
    if pending.is_empty() {
        (StatusCode::OK, "ready\n".to_owned())
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready, pending: {}\n", pending.join(", ")),
        )
    }
}

/// Public keys of the JWT issuer, with an `ETag` (a hash of the key set)
/// so that verifiers can revalidate cheaply, and a short `max-age` so that
/// a rotation reaches them within a minute.
///
/// Public.
#[utoipa::path(get, path = "/.well-known/jwks.json", tag = "ops",
    responses((status = 200, body = Object, content_type = "application/json",
            description = "RFC 7517 JSON Web Key Set"),
        (status = 304, description = "If-None-Match matched the current ETag")))]
pub(super) async fn jwks(State(s): State<AdminState>, headers: HeaderMap) -> Response {
    let body = s.cp.issuer.jwks().to_string();
    let etag = format!(
        "\"{}\"",
        &hex::encode(ring::digest::digest(&ring::digest::SHA256, body.as_bytes()))[..32]
    );
    let cache = [
        (header::CACHE_CONTROL, "public, max-age=60".to_owned()),
        (header::ETAG, etag.clone()),
    ];
    let matches = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag || t.trim() == "*"));
    if matches {
        return (StatusCode::NOT_MODIFIED, cache).into_response();
    }
    (cache, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// Prometheus metrics (text format 0.0.4).
///
/// Public.
#[utoipa::path(get, path = "/metrics", tag = "ops",
    responses((status = 200, body = String, content_type = "text/plain; version=0.0.4")))]
pub(super) async fn metrics(State(s): State<AdminState>) -> impl IntoResponse {
    let body =
        s.cp.metrics
            .render(s.cp.sessions.len(), s.cp.revocations.snapshot().seq);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body)
}

/// This document, generated from the routes the server registers.
///
/// Public.
#[utoipa::path(get, path = "/openapi.json", tag = "ops",
    responses((status = 200, body = Object, content_type = "application/json",
        description = "OpenAPI 3.1 document")))]
pub(super) async fn openapi(Extension(doc): Extension<Option<OpenApiJson>>) -> Response {
    match doc {
        Some(OpenApiJson(json)) => (
            [(header::CONTENT_TYPE, "application/json")],
            json.to_string(),
        )
            .into_response(),
        None => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

/// The log filter in force (`RUST_LOG` syntax).
///
/// Role: viewer.
#[utoipa::path(get, path = "/v1/logging", tag = "ops",
    security(("bearer" = [])), responses((status = 200, body = LogFilter)))]
pub(super) async fn get_logging(_: Viewer) -> Json<LogFilter> {
    Json(LogFilter {
        filter: leash_api::process::log_filter(),
    })
}

/// Replace the log filter.
///
/// Role: admin.
#[utoipa::path(put, path = "/v1/logging", tag = "ops",
    request_body = LoggingRequest, security(("bearer" = [])),
    responses((status = 200, body = LogFilter), (status = 400, body = ErrorBody),
        (status = 403, body = ErrorBody)))]
pub(super) async fn set_logging(
    _: AdminRole,
    body: Result<Json<LoggingRequest>, JsonRejection>,
) -> Result<Audited<LogFilter>, ApiError> {
    let Json(req) = body?;
    let filter = leash_api::process::set_log_filter(&req.filter).map_err(ApiError::invalid)?;
    let detail = format!("log filter set to {filter:?}");
    Ok(Audited(
        StatusCode::OK,
        LogFilter {
            filter: Some(filter),
        },
        detail,
    ))
}

/// The effective configuration and live state, without secrets.
///
/// Role: admin.
#[utoipa::path(get, path = "/v1/config_dump", tag = "ops",
    security(("bearer" = [])),
    responses((status = 200, body = ConfigDump), (status = 403, body = ErrorBody)))]
pub(super) async fn config_dump(State(s): State<AdminState>, _: AdminRole) -> Json<ConfigDump> {
    let policy = s.cp.policy.load();
    Json(ConfigDump {
        config: s.config_dump.as_object().cloned().unwrap_or_default(),
        policy_version: policy.version.clone(),
        upstreams: policy.policy.policy.upstreams.len(),
        grants: policy.policy.policy.grants.len(),
        revocation_seq: s.cp.revocations.snapshot().seq,
        sessions: s.cp.sessions.len(),
        log_filter: leash_api::process::log_filter(),
    })
}
