//! `/v1/leaked` and `/v1/stripped`: leaked values (registered, listed, with
//! the workloads still sending them) and credentials workloads sent or
//! upstreams echoed.

use axum::Json;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use leash_api::revocation::RevocationKind;

use super::revocations::{propagation, revocation};
use super::types::{
    Echoed, ErrorBody, LeakedList, LeakedRequest, LeakedStatus, Revocation, StrippedReport,
};
use super::{AdminState, ApiError, Audited, Responder, Viewer, body_status};

/// Register a leaked value; only a keyed fingerprint is kept, and sidecars
/// refuse requests carrying it.
///
/// Role: responder.
#[utoipa::path(post, path = "/v1/leaked", operation_id = "register_leaked", tag = "leaked",
    request_body = LeakedRequest, security(("bearer" = [])),
    responses((status = 201, body = Revocation),
        (status = 200, body = Revocation, description = "Registered already (with `existing_ok`)"),
        (status = 400, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub(super) async fn register(
    State(s): State<AdminState>,
    Responder(caller): Responder,
    body: Result<Json<LeakedRequest>, JsonRejection>,
) -> Result<Audited<Revocation>, ApiError> {
    // A malformed body is reported without echoing it (it may hold the value).
    let Json(req) = body.map_err(|e| {
        ApiError::new(
            body_status(&e),
            "bad_body",
            "expected {\"value\": \"…\", \"reason\": \"…\"}",
        )
    })?;
    let (stored, new) =
        s.cp.revocations
            .register_leaked(req.value, &req.reason, &caller.actor, req.existing_ok)
            .await?;
    if !new {
        let detail = format!(
            "leaked value already registered as {}",
            stored.revocation.id
        );
        return Ok(Audited(StatusCode::OK, revocation(&stored), detail));
    }
    crate::ssf_out::SsfOut::revoked(&s.cp, &stored.revocation, stored.revoke_seq);
    let detail = format!(
        "registered leaked value {} seq {}: {}",
        stored.revocation.id, stored.revoke_seq, stored.revocation.reason
    );
    Ok(Audited(StatusCode::CREATED, revocation(&stored), detail))
}

/// Registered leaked values (fingerprint handles only).
///
/// Role: viewer.
#[utoipa::path(get, path = "/v1/leaked", operation_id = "list_leaked", tag = "leaked",
    security(("bearer" = [])), responses((status = 200, body = LeakedList)))]
pub(super) async fn list(
    State(s): State<AdminState>,
    _: Viewer,
) -> Result<Json<LeakedList>, ApiError> {
    let list = s.cp.store.revocations(false).await?;
    Ok(Json(LeakedList {
        leaked: list
            .iter()
            .filter(|r| r.revocation.kind() == RevocationKind::Leaked)
            .map(revocation)
            .collect(),
    }))
}

/// One registration with its sightings (the forgotten consumers: every
/// workload that sent the value since, to which upstream, how often, first
/// and last seen) and its propagation.
///
/// Role: viewer.
#[utoipa::path(get, path = "/v1/leaked/{id}", operation_id = "leaked_status", tag = "leaked",
    params(("id" = String, Path, description = "Revocation id of the registration")),
    security(("bearer" = [])),
    responses((status = 200, body = LeakedStatus), (status = 404, body = ErrorBody)))]
pub(super) async fn status(
    State(s): State<AdminState>,
    Path(id): Path<String>,
    _: Viewer,
) -> Result<Json<LeakedStatus>, ApiError> {
    let stored =
        s.cp.store
            .revocation(&id)
            .await?
            .filter(|r| r.revocation.kind() == RevocationKind::Leaked)
            .ok_or_else(|| ApiError::not_found(format!("no leaked value {id:?}")))?;
    Ok(Json(LeakedStatus {
        revocation: revocation(&stored),
        sightings: s.cp.store.sightings(&id).await?,
        propagation: propagation(&s, stored.revoke_seq).await?,
    }))
}

/// Workloads that still send their own credential to a managed upstream,
/// and injected credentials upstreams sent back.
///
/// Role: viewer.
#[utoipa::path(get, path = "/v1/stripped", tag = "leaked",
    security(("bearer" = [])), responses((status = 200, body = StrippedReport)))]
pub(super) async fn stripped(
    State(s): State<AdminState>,
    _: Viewer,
) -> Result<Json<StrippedReport>, ApiError> {
    let stripped = s.cp.store.stripped(None).await?;
    let echoed =
        s.cp.store
            .echoes()
            .await?
            .into_iter()
            .map(|(workload, upstream, header, count, last_seen_ms)| Echoed {
                workload,
                upstream,
                header,
                count,
                last_seen_ms,
            })
            .collect();
    Ok(Json(StrippedReport { stripped, echoed }))
}
