//! `POST /ssf/events`: Security Event Tokens pushed by transmitters (RFC
//! 8935). Authenticated by the SET's own signature (the transmitter's
//! JWKS), not by an admin token; every event, accepted or refused, is
//! audited.

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use http_body_util::BodyExt as _;

use super::AdminState;
use super::types::SsfErrorBody;
use crate::ssf::{MAX_SET_BYTES, SsfError};
use crate::store::{AuditEntry, now_ms};

// `202` once the revocation it maps to is committed, else `400` with RFC
// 8935's error code (`invalid_request`, `invalid_key`, `invalid_issuer`,
// `invalid_audience`, `access_denied`). Authenticated by the SET's
// signature, not by an admin token.
/// Receive one Security Event Token (RFC 8935 push delivery).
///
/// Public.
#[utoipa::path(post, path = "/ssf/events", operation_id = "ssf_push", tag = "ssf",
    request_body(content = String, content_type = "application/secevent+jwt",
        description = "A SET (RFC 8417), compact JWS"),
    responses((status = 202, description = "accepted: the revocation is committed"),
        (status = 400, body = SsfErrorBody,
            description = "refused: invalid_request, invalid_key, invalid_issuer, invalid_audience or access_denied")))]
pub(super) async fn push(State(s): State<AdminState>, headers: HeaderMap, body: Body) -> Response {
    let typed = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/secevent+jwt"));
    let outcome = if typed {
        match http_body_util::Limited::new(body, MAX_SET_BYTES)
            .collect()
            .await
        {
            Ok(bytes) => s.cp.ssf.receive(&s.cp, &bytes.to_bytes()).await,
            Err(_) => Err(SsfError {
                err: "invalid_request",
                description: format!("a SET of more than {MAX_SET_BYTES} bytes"),
                transmitter: None,
            }),
        }
    } else {
        Err(SsfError {
            err: "invalid_request",
            description: "Content-Type must be application/secevent+jwt".into(),
            transmitter: None,
        })
    };
    let (status, actor, detail) = match &outcome {
        Ok(a) => (
            StatusCode::ACCEPTED,
            format!("ssf:{}", a.transmitter),
            format!(
                "accepted {} jti {} from {} as revocation {} (seq {})",
                a.event_type, a.jti, a.issuer, a.revocation_id, a.revoke_seq
            ),
        ),
        Err(e) => (
            StatusCode::BAD_REQUEST,
            format!("ssf:{}", e.transmitter.as_deref().unwrap_or("unknown")),
            format!("refused {}: {}", e.err, e.description),
        ),
    };
    tracing::info!(%actor, status = status.as_u16(), detail = %detail, "security event");
    let entry = AuditEntry {
        at_ms: now_ms(),
        actor,
        role: "ssf".into(),
        method: "POST".into(),
        path: "/ssf/events".into(),
        action: "POST /ssf/events".into(),
        status: status.as_u16(),
        detail: detail.chars().take(1024).collect(),
    };
    if let Err(e) = s.cp.store.append_audit(&entry).await {
        tracing::error!(error = %e, "cannot write the audit log");
    }
    match outcome {
        Ok(_) => StatusCode::ACCEPTED.into_response(),
        Err(e) => (
            StatusCode::BAD_REQUEST,
            axum::Json(SsfErrorBody {
                err: e.err.to_owned(),
                description: e.description,
            }),
        )
            .into_response(),
    }
}

/// The transmitter's metadata (SSF 1.0 §7.1): issuer, JWKS, delivery
/// methods, the stream and verification endpoints.
///
/// Public.
#[utoipa::path(get, path = "/.well-known/ssf-configuration", operation_id = "ssf_configuration", tag = "ssf",
    responses((status = 200, body = Object, content_type = "application/json",
        description = "SSF transmitter configuration metadata")))]
pub(super) async fn configuration(State(s): State<AdminState>, headers: HeaderMap) -> Response {
    let scheme = if s.config_dump["admin_tls"].is_null() || s.config_dump["admin_tls"] == false {
        "http"
    } else {
        "https"
    };
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("localhost");
    let base = format!("{scheme}://{host}");
    axum::Json(serde_json::json!({
        "spec_version": "1_0",
        "issuer": s.cp.issuer.issuer(),
        "jwks_uri": format!("{base}/.well-known/jwks.json"),
        "delivery_methods_supported": ["urn:ietf:rfc:8935"],
        "configuration_endpoint": format!("{base}/v1/ssf/streams"),
        "verification_endpoint": format!("{base}/v1/ssf/verify"),
        "authorization_schemes": [{"spec_urn": "urn:ietf:rfc:6750"}],
    }))
    .into_response()
}

/// The streams this control plane transmits on (from policy's
/// `ssf.receivers`), with what each delivered, was refused, failed and
/// dropped.
///
/// Role: viewer.
#[utoipa::path(get, path = "/v1/ssf/streams", operation_id = "ssf_streams", tag = "ssf", security(("bearer" = [])),
    responses((status = 200, body = Object, content_type = "application/json")))]
pub(super) async fn streams(
    State(s): State<AdminState>,
    _: super::Viewer,
) -> axum::Json<serde_json::Value> {
    use std::sync::atomic::Ordering::Relaxed;
    let policy = s.cp.policy.load();
    let counts = s.cp.ssf_out.counts();
    let streams: Vec<_> = policy
        .policy
        .policy
        .ssf
        .iter()
        .flat_map(|ssf| &ssf.receivers)
        .map(|r| {
            let c = counts.get(&r.name);
            let n = |f: fn(&crate::ssf_out::StreamCounts) -> &std::sync::atomic::AtomicU64| {
                c.map_or(0, |c| f(c).load(Relaxed))
            };
            let all = [
                "credential-change",
                "session-revoked",
                "credential-compromise",
            ];
            let events: Vec<String> = if r.events.is_empty() {
                all.iter().map(|e| (*e).to_owned()).collect()
            } else {
                r.events.clone()
            };
            serde_json::json!({
                "stream_id": r.name,
                "iss": s.cp.issuer.issuer(),
                "aud": r.audience,
                "delivery": {"method": "urn:ietf:rfc:8935", "endpoint_url": r.endpoint_url},
                "events_delivered": events,
                "delivered": n(|c| &c.delivered),
                "refused": n(|c| &c.refused),
                "failed": n(|c| &c.failed),
                "dropped": n(|c| &c.dropped),
            })
        })
        .collect();
    axum::Json(serde_json::json!({ "streams": streams }))
}

/// Ask for a verification event (SSF 1.0 §8.1.4) on a stream.
///
/// Role: admin.
#[utoipa::path(post, path = "/v1/ssf/verify", operation_id = "ssf_verify", tag = "ssf", security(("bearer" = [])),
    request_body(content = Object, description = "{\"stream_id\": \"…\", \"state\": \"…\"}"),
    responses((status = 204, description = "queued"), (status = 404, body = super::types::ErrorBody)))]
pub(super) async fn verify(
    State(s): State<AdminState>,
    _: super::AdminRole,
    axum::Json(req): axum::Json<serde_json::Value>,
) -> Result<StatusCode, super::ApiError> {
    let stream = req["stream_id"].as_str().unwrap_or_default();
    if s.cp.ssf_out.verify(&s.cp, stream, req["state"].as_str()) {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(super::ApiError::not_found(format!(
            "no stream {stream:?} (policy's ssf.receivers)"
        )))
    }
}
