//! `/v1/revocations` and `/v1/sidecars`: revoke, restore, list, and where
//! each revocation has reached.

use leash_api::revocation::RevocationKind;

use axum::Json;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;

use super::types::{
    ErrorBody, Propagation, ReasonRequest, ReplicaInfo, ReplicaList, Restored, Revocation,
    RevocationList, RevocationListQuery, RevocationStatus, RevokeRequest, SidecarList,
};
use super::{AdminState, ApiError, Audited, Responder, Viewer};
use crate::store::StoredRevocation;

/// A stored revocation as the API shows it.
pub(super) fn revocation(r: &StoredRevocation) -> Revocation {
    Revocation {
        id: r.revocation.id.clone(),
        kind: r.revocation.kind().as_str().to_owned(),
        workload: r.revocation.workload.clone(),
        upstream: r.revocation.upstream.clone(),
        credential_id: r.revocation.credential_id.clone(),
        reason: r.revocation.reason.clone(),
        revoked_by: r.revocation.revoked_by.clone(),
        revoked_at_ms: r.revocation.revoked_at_ms,
        seq: r.revoke_seq,
        active: r.restored.is_none(),
        // A short public handle, not the fingerprint itself.
        fingerprint_id: r.revocation.fingerprint.get(..4).map(hex::encode),
        restored: r.restored.as_ref().map(|x| Restored {
            by: x.by.clone(),
            reason: x.reason.clone(),
            at_ms: x.at_ms,
            seq: x.seq,
        }),
    }
}

/// List revocations (active only unless `all=true`).
///
/// Role: viewer.
#[utoipa::path(get, path = "/v1/revocations", operation_id = "list_revocations", tag = "revocations",
    params(RevocationListQuery), security(("bearer" = [])),
    responses((status = 200, body = RevocationList)))]
pub(super) async fn list(
    State(s): State<AdminState>,
    Query(q): Query<RevocationListQuery>,
    _: Viewer,
) -> Result<Json<RevocationList>, ApiError> {
    let list = s.cp.store.revocations(!q.all).await?;
    Ok(Json(RevocationList {
        revocations: list.iter().map(revocation).collect(),
    }))
}

/// Revoke. Answered once committed durably with its sequence number.
///
/// Role: responder.
#[utoipa::path(post, path = "/v1/revocations", tag = "revocations",
    request_body = RevokeRequest, security(("bearer" = [])),
    responses((status = 201, body = Revocation),
        (status = 400, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub(super) async fn revoke(
    State(s): State<AdminState>,
    Responder(caller): Responder,
    body: Result<Json<RevokeRequest>, JsonRejection>,
) -> Result<Audited<Revocation>, ApiError> {
    let Json(req) = body?;
    let policy = s.cp.policy.load();
    let stored = if let Some((upstream, version)) = (req.kind
        == RevocationKind::Credential.as_str())
    .then(|| crate::secrets::parse_lease_id(&req.credential_id))
    .flatten()
    {
        // A static lease is a secret version: revoking it revokes the version.
        let stored =
            s.cp.revocations
                .revoke_secret_version(&upstream, version, &req.reason, &caller.actor)
                .await?;
        crate::probes::after_revocation(&s.cp, &upstream, version);
        stored
    } else {
        if req.kind == RevocationKind::Credential.as_str()
            && req.credential_id.starts_with("oauth2:")
        {
            // Dropped before the commit: the sidecars that refetch after the
            // revocation get a freshly exchanged token, never this one.
            s.cp.tokens.forget(&req.credential_id);
            s.cp.store.forget_shared_token(&req.credential_id).await?;
        }
        s.cp.revocations
            .revoke(req, &caller.actor, &policy.policy)
            .await?
    };
    crate::ssf_out::SsfOut::revoked(&s.cp, &stored.revocation, stored.revoke_seq);
    let detail = format!(
        "revoked {} {} seq {}: {}",
        stored.revocation.kind, stored.revocation.id, stored.revoke_seq, stored.revocation.reason
    );
    Ok(Audited(StatusCode::CREATED, revocation(&stored), detail))
}

/// One revocation with its propagation: which sidecars acknowledged it and
/// when, which connected ones have not.
///
/// Role: viewer.
#[utoipa::path(get, path = "/v1/revocations/{id}", operation_id = "revocation_status", tag = "revocations",
    params(("id" = String, Path, description = "Revocation id")), security(("bearer" = [])),
    responses((status = 200, body = RevocationStatus), (status = 404, body = ErrorBody)))]
pub(super) async fn status(
    State(s): State<AdminState>,
    Path(id): Path<String>,
    _: Viewer,
) -> Result<Json<RevocationStatus>, ApiError> {
    let stored =
        s.cp.store
            .revocation(&id)
            .await?
            .ok_or_else(|| ApiError::not_found(format!("no revocation {id:?}")))?;
    Ok(Json(RevocationStatus {
        revocation: revocation(&stored),
        propagation: propagation(&s, stored.revoke_seq).await?,
    }))
}

/// See [`crate::sessions::propagation`].
pub(super) async fn propagation(s: &AdminState, seq: u64) -> Result<Propagation, ApiError> {
    Ok(crate::sessions::propagation(&s.cp, seq).await?)
}

/// Restore a grant, workload or upstream revocation (credential
/// revocations are permanent).
///
/// Role: responder.
#[utoipa::path(post, path = "/v1/revocations/{id}/restore", tag = "revocations",
    params(("id" = String, Path, description = "Revocation id")),
    request_body = ReasonRequest, security(("bearer" = [])),
    responses((status = 200, body = Revocation), (status = 400, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody)))]
pub(super) async fn restore(
    State(s): State<AdminState>,
    Path(id): Path<String>,
    Responder(caller): Responder,
    body: Result<Json<ReasonRequest>, JsonRejection>,
) -> Result<Audited<Revocation>, ApiError> {
    let Json(req) = body?;
    let stored =
        s.cp.revocations
            .restore(&id, &caller.actor, &req.reason)
            .await?;
    let detail = format!("restored {id}: {}", req.reason.trim());
    Ok(Audited(StatusCode::OK, revocation(&stored), detail))
}

/// Connected sidecar sessions, on every live replica of the store.
///
/// Role: viewer.
#[utoipa::path(get, path = "/v1/sidecars", tag = "revocations",
    security(("bearer" = [])), responses((status = 200, body = SidecarList),
        (status = 503, body = ErrorBody, description = "the store cannot be read")))]
pub(super) async fn sidecars(
    State(s): State<AdminState>,
    _: Viewer,
) -> Result<Json<SidecarList>, ApiError> {
    Ok(Json(SidecarList {
        seq: s.cp.revocations.snapshot().seq,
        sidecars: crate::replicas::sidecars(&s.cp).await?,
    }))
}

/// The control-plane replicas on this store seen in the last hour: which
/// are live, which this is, and how many sidecar sessions each holds.
///
/// Role: viewer.
#[utoipa::path(get, path = "/v1/replicas", tag = "revocations",
    security(("bearer" = [])), responses((status = 200, body = ReplicaList),
        (status = 503, body = ErrorBody, description = "the store cannot be read")))]
pub(super) async fn replicas(
    State(s): State<AdminState>,
    _: Viewer,
) -> Result<Json<ReplicaList>, ApiError> {
    let live_since = s.cp.replica.live_since_ms();
    let rows =
        s.cp.store
            .replicas(crate::store::now_ms() - 3_600_000)
            .await?;
    let sidecars = crate::replicas::sidecars(&s.cp).await?;
    let replicas = rows
        .into_iter()
        .map(|r| ReplicaInfo {
            live: r.stopped_at_ms.is_none() && r.seen_at_ms >= live_since,
            this: r.id == s.cp.replica.id,
            sidecars: sidecars.iter().filter(|c| c.replica == r.id).count(),
            id: r.id,
            version: r.version,
            sidecar_addr: r.sidecar_addr,
            admin_addr: r.admin_addr,
            started_at_ms: r.started_at_ms,
            seen_at_ms: r.seen_at_ms,
            stopped_at_ms: r.stopped_at_ms,
        })
        .collect();
    Ok(Json(ReplicaList { replicas }))
}
