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
#[utoipa::path(post, path = "/ssf/events", tag = "ssf",
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
