//! `/v1/audit`: the audit log, the verification of its hash chain, and its
//! signed head.

use axum::Json;
use axum::extract::{Query, State};
use axum::http::StatusCode;

use super::types::{AuditLog, AuditQuery, AuditVerdict, ErrorBody, SignedHead, VerifyQuery};
use super::{AdminRole, AdminState, ApiError};

/// Newest audit entries.
///
/// Role: admin.
#[utoipa::path(get, path = "/v1/audit", operation_id = "audit_entries", tag = "audit",
    params(AuditQuery), security(("bearer" = [])),
    responses((status = 200, body = AuditLog), (status = 403, body = ErrorBody)))]
pub(super) async fn entries(
    State(s): State<AdminState>,
    Query(q): Query<AuditQuery>,
    _: AdminRole,
) -> Result<Json<AuditLog>, ApiError> {
    let entries = s.cp.store.audit(q.limit.clamp(1, 10_000)).await?;
    Ok(Json(AuditLog { entries }))
}

/// Walk the audit log's hash chain and its signed anchors; with `id` and
/// `hash` of a head saved earlier, also check that it is still in the
/// chain. `ok: false` names the first bad entry.
///
/// Role: admin.
#[utoipa::path(get, path = "/v1/audit/verify", tag = "audit",
    params(VerifyQuery), security(("bearer" = [])),
    responses((status = 200, body = AuditVerdict), (status = 403, body = ErrorBody)))]
pub(super) async fn verify(
    State(s): State<AdminState>,
    Query(q): Query<VerifyQuery>,
    _: AdminRole,
) -> Result<Json<AuditVerdict>, ApiError> {
    let mut verdict = s.cp.store.verify_audit().await?;
    if verdict.ok
        && let (Some(id), Some(hash)) = (q.id, &q.hash)
        && s.cp.store.audit_entry_hash(id).await?.as_deref() != Some(hash.as_str())
    {
        verdict.ok = false;
        verdict.first_bad_id = Some(id);
        verdict.problem = Some(
            "the saved head is not in the chain: entries were rewritten or cut off after it was saved"
                .into(),
        );
    }
    if !verdict.ok {
        tracing::error!(entry = ?verdict.first_bad_id, problem = ?verdict.problem, "the audit log's hash chain is broken");
    }
    Ok(Json(verdict))
}

/// The current head of the audit chain, signed with a key derived from the
/// master key: save it elsewhere and check later with `leashctl audit
/// verify --head FILE`.
///
/// Role: admin.
#[utoipa::path(get, path = "/v1/audit/head", tag = "audit",
    security(("bearer" = [])),
    responses((status = 200, body = SignedHead), (status = 403, body = ErrorBody),
        (status = 409, body = ErrorBody, description = "audit_broken: the chain is broken"),
        (status = 503, body = ErrorBody, description = "no_master_key")))]
pub(super) async fn head(
    State(s): State<AdminState>,
    _: AdminRole,
) -> Result<Json<SignedHead>, ApiError> {
    match s.cp.store.signed_head().await? {
        Ok(Some(head)) => Ok(Json(head)),
        Ok(None) => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "no_master_key",
            "no signed head without a master key (or with an empty audit log)",
        )),
        Err(verdict) => Err(ApiError::new(
            StatusCode::CONFLICT,
            "audit_broken",
            format!(
                "the audit chain is broken at entry {:?} ({}): its head is not signed",
                verdict.first_bad_id,
                verdict.problem.unwrap_or_default()
            ),
        )),
    }
}
