//! `/v1/missions`: remediation missions — created, added to, read with
//! their criteria computed now, closed or reopened by hand (the criteria
//! close and reopen them on their own, see `crate::missions`).

use axum::Json;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;

use super::types::{
    ChainHead, ErrorBody, Evidence, FindingEntry, FindingView, FindingsRequest, MissionChangeView,
    MissionList, MissionRequest, MissionSummary, MissionView, ReasonRequest, RevocationEvidence,
    SignedEvidence,
};
use super::{AdminState, ApiError, Audited, Responder, Viewer};
use crate::missions::{self, Finding, MissionError};
use crate::store::{MissionRow, now_ms};

impl From<MissionError> for ApiError {
    fn from(e: MissionError) -> Self {
        match e {
            MissionError::Invalid(m) => Self::invalid(m),
            MissionError::NotFound(id) => Self::not_found(format!("no mission {id}")),
            MissionError::Store(e) => e.into(),
        }
    }
}

/// Open a mission: an objective, an owner, a deadline and the findings it
/// groups. Its criteria follow from the findings.
///
/// Role: responder.
#[utoipa::path(post, path = "/v1/missions", operation_id = "create_mission", tag = "missions",
    request_body = MissionRequest, security(("bearer" = [])),
    responses((status = 201, body = MissionView), (status = 400, body = ErrorBody),
        (status = 403, body = ErrorBody)))]
pub(super) async fn create(
    State(s): State<AdminState>,
    Responder(caller): Responder,
    body: Result<Json<MissionRequest>, JsonRejection>,
) -> Result<Audited<MissionView>, ApiError> {
    let Json(req) = body?;
    let objective = bounded("objective", &req.objective, 1024)?;
    let owner = bounded("owner", &req.owner, 256)?;
    let now = now_ms();
    let deadline_ms = req
        .deadline
        .as_deref()
        .map(|d| deadline(d, now))
        .transpose()?;
    let window_ms = window(req.window.as_deref())?;
    let findings = checked(&s, &req.findings).await?;
    let row = MissionRow {
        id: format!("m-{}", uuid::Uuid::new_v4().simple()),
        objective: objective.to_owned(),
        owner: owner.to_owned(),
        deadline_ms,
        window_ms,
        state: "open".into(),
        closed_by_hand: false,
        created_at_ms: now,
        created_by: caller.actor.clone(),
        changed_at_ms: now,
    };
    s.cp.store.insert_mission(&row, &findings).await?;
    let detail = format!(
        "mission {} opened with {} finding(s): {}",
        row.id,
        findings.len(),
        row.objective
    );
    Ok(Audited(StatusCode::CREATED, view(&s, row).await?, detail))
}

/// Every mission, newest first, with how many of its criteria hold now.
///
/// Role: viewer.
#[utoipa::path(get, path = "/v1/missions", operation_id = "list_missions", tag = "missions",
    security(("bearer" = [])), responses((status = 200, body = MissionList)))]
pub(super) async fn list(
    State(s): State<AdminState>,
    _: Viewer,
) -> Result<Json<MissionList>, ApiError> {
    let now = now_ms();
    let mut out = Vec::new();
    for m in s.cp.store.missions().await? {
        let checks = missions::evaluate(&s.cp, &m).await?;
        out.push(MissionSummary {
            findings: s.cp.store.findings(&m.id).await?.len(),
            criteria: checks.len(),
            criteria_holding: checks.iter().filter(|c| c.holds).count(),
            overdue: overdue(&m, now),
            id: m.id,
            objective: m.objective,
            owner: m.owner,
            state: m.state,
            deadline_ms: m.deadline_ms,
        });
    }
    Ok(Json(MissionList { missions: out }))
}

/// One mission: its findings, every criterion as computed now with the
/// data it was computed from, and every change of its state.
///
/// Role: viewer.
#[utoipa::path(get, path = "/v1/missions/{id}", operation_id = "mission", tag = "missions",
    params(("id" = String, Path, description = "Mission id")),
    security(("bearer" = [])),
    responses((status = 200, body = MissionView), (status = 404, body = ErrorBody)))]
pub(super) async fn show(
    State(s): State<AdminState>,
    _: Viewer,
    Path(id): Path<String>,
) -> Result<Json<MissionView>, ApiError> {
    let m = mission(&s, &id).await?;
    Ok(Json(view(&s, m).await?))
}

/// Add findings to a mission (one it already holds is left as it is).
///
/// Role: responder.
#[utoipa::path(post, path = "/v1/missions/{id}/findings", operation_id = "add_findings",
    tag = "missions", params(("id" = String, Path, description = "Mission id")),
    request_body = FindingsRequest, security(("bearer" = [])),
    responses((status = 200, body = MissionView), (status = 400, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub(super) async fn add(
    State(s): State<AdminState>,
    Responder(caller): Responder,
    Path(id): Path<String>,
    body: Result<Json<FindingsRequest>, JsonRejection>,
) -> Result<Audited<MissionView>, ApiError> {
    let Json(req) = body?;
    let m = mission(&s, &id).await?;
    let held = s.cp.store.findings(&id).await?.len();
    if held + req.findings.len() > missions::MAX_FINDINGS {
        return Err(ApiError::invalid(format!(
            "a mission holds at most {} findings",
            missions::MAX_FINDINGS
        )));
    }
    let findings = checked(&s, &req.findings).await?;
    let added =
        s.cp.store
            .add_findings(&id, &findings, now_ms(), &caller.actor)
            .await?;
    let detail = format!("mission {id}: {added} finding(s) added");
    Ok(Audited(StatusCode::OK, view(&s, m).await?, detail))
}

/// Close a mission by hand, whatever its criteria say (it is marked so,
/// and stays closed until reopened by hand).
///
/// Role: responder.
#[utoipa::path(post, path = "/v1/missions/{id}/close", operation_id = "close_mission",
    tag = "missions", params(("id" = String, Path, description = "Mission id")),
    request_body = ReasonRequest, security(("bearer" = [])),
    responses((status = 200, body = MissionView), (status = 400, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody)))]
pub(super) async fn close(
    State(s): State<AdminState>,
    Responder(caller): Responder,
    Path(id): Path<String>,
    body: Result<Json<ReasonRequest>, JsonRejection>,
) -> Result<Audited<MissionView>, ApiError> {
    set_state(&s, &caller.actor, &id, body, "closed").await
}

/// Reopen a mission by hand; its criteria may close it again.
///
/// Role: responder.
#[utoipa::path(post, path = "/v1/missions/{id}/reopen", operation_id = "reopen_mission",
    tag = "missions", params(("id" = String, Path, description = "Mission id")),
    request_body = ReasonRequest, security(("bearer" = [])),
    responses((status = 200, body = MissionView), (status = 400, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody)))]
pub(super) async fn reopen(
    State(s): State<AdminState>,
    Responder(caller): Responder,
    Path(id): Path<String>,
    body: Result<Json<ReasonRequest>, JsonRejection>,
) -> Result<Audited<MissionView>, ApiError> {
    set_state(&s, &caller.actor, &id, body, "open").await
}

/// The mission's evidence, signed (ES256, the evidence key in the JWKS,
/// flattened JWS): findings, each criterion with its inputs, each
/// revocation with every sidecar's acknowledgement and latency, and every
/// audit entry about them with its chain hash. Verify it offline with
/// `leashctl evidence verify FILE --jwks URL|FILE`. An open mission's
/// evidence says so (`open: true`).
///
/// Role: viewer.
#[utoipa::path(get, path = "/v1/missions/{id}/evidence", operation_id = "mission_evidence",
    tag = "missions", params(("id" = String, Path, description = "Mission id")),
    security(("bearer" = [])),
    responses((status = 200, body = SignedEvidence), (status = 404, body = ErrorBody)))]
pub(super) async fn evidence(
    State(s): State<AdminState>,
    _: Viewer,
    Path(id): Path<String>,
) -> Result<Json<SignedEvidence>, ApiError> {
    let m = mission(&s, &id).await?;
    let mission = view(&s, m).await?;
    let mut ids: Vec<String> = Vec::new();
    for f in &mission.findings {
        if let Finding::Leaked { revocation_id }
        | Finding::Revocation { revocation_id }
        | Finding::Sighting { revocation_id, .. } = &f.finding
        {
            ids.push(revocation_id.clone());
        }
    }
    for c in &mission.criteria {
        if let Some(id) = c.inputs["revocation_id"].as_str() {
            ids.push(id.to_owned());
        }
    }
    ids.sort();
    ids.dedup();
    let mut revocations = Vec::new();
    for rid in &ids {
        if let Some(stored) = s.cp.store.revocation(rid).await? {
            revocations.push(RevocationEvidence {
                propagation: super::revocations::propagation(&s, stored.revoke_seq).await?,
                revocation: super::revocations::revocation(&stored),
            });
        }
    }
    let mut needles = ids.clone();
    needles.push(mission.id.clone());
    let audit = s.cp.store.audit_mentioning(&needles).await?;
    let verdict = s.cp.store.verify_audit().await?;
    // A broken chain has no signed head (the verdict says it is broken).
    let signed = s.cp.store.signed_head().await?.unwrap_or_default();
    let bundle = Evidence {
        format: "leash-evidence/1".into(),
        generated_at_ms: now_ms(),
        issuer: s.cp.issuer.issuer().to_owned(),
        open: mission.state == "open",
        mission,
        revocations,
        audit,
        audit_chain: ChainHead {
            verified: verdict.ok,
            head_id: verdict.head_id,
            head: verdict.head,
            signed,
        },
    };
    let payload = serde_json::to_vec(&bundle)
        .map_err(|_| ApiError::invalid("the evidence cannot be encoded"))?;
    let signed = s.cp.issuer.sign_evidence(&payload).map_err(|e| {
        tracing::error!(error = %e, "cannot sign evidence");
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "signing_unavailable",
            "the evidence key cannot sign",
        )
    })?;
    Ok(Json(signed))
}

async fn set_state(
    s: &AdminState,
    actor: &str,
    id: &str,
    body: Result<Json<ReasonRequest>, JsonRejection>,
    state: &str,
) -> Result<Audited<MissionView>, ApiError> {
    let Json(req) = body?;
    let reason = bounded("reason", &req.reason, 1024)?;
    let m = mission(s, id).await?;
    if m.state == state {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "conflict",
            format!("mission {id} is already {state}"),
        ));
    }
    missions::change(&s.cp, id, state, state == "closed", reason, actor).await?;
    let m = mission(s, id).await?;
    let detail = format!("mission {id} {state} by hand: {reason}");
    Ok(Audited(StatusCode::OK, view(s, m).await?, detail))
}

async fn mission(s: &AdminState, id: &str) -> Result<MissionRow, ApiError> {
    s.cp.store
        .mission(id)
        .await?
        .ok_or_else(|| MissionError::NotFound(id.to_owned()).into())
}

/// The findings as stored (JSON, note), each checked against what exists.
async fn checked(
    s: &AdminState,
    entries: &[FindingEntry],
) -> Result<Vec<(String, String)>, ApiError> {
    if entries.len() > missions::MAX_FINDINGS {
        return Err(ApiError::invalid(format!(
            "a mission holds at most {} findings",
            missions::MAX_FINDINGS
        )));
    }
    let mut out = Vec::with_capacity(entries.len());
    for (i, e) in entries.iter().enumerate() {
        missions::validate(&s.cp, &e.finding)
            .await
            .map_err(|err| match err {
                MissionError::Invalid(m) => ApiError::invalid(format!("finding {}: {m}", i + 1)),
                other => other.into(),
            })?;
        let finding = serde_json::to_string(&e.finding)
            .map_err(|_| ApiError::invalid(format!("finding {}", i + 1)))?;
        out.push((finding, e.note.to_string()));
    }
    Ok(out)
}

async fn view(s: &AdminState, m: MissionRow) -> Result<MissionView, ApiError> {
    let criteria = missions::evaluate(&s.cp, &m).await?;
    let findings =
        s.cp.store
            .findings(&m.id)
            .await?
            .into_iter()
            .map(|f| {
                Ok(FindingView {
                    seq: f.seq,
                    finding: serde_json::from_str::<Finding>(&f.finding).map_err(|_| {
                        crate::store::StoreError::Corrupt(format!("finding {} of {}", f.seq, m.id))
                    })?,
                    note: serde_json::from_str(&f.note).unwrap_or(serde_json::Value::Null),
                    added_at_ms: f.added_at_ms,
                    added_by: f.added_by,
                })
            })
            .collect::<Result<Vec<_>, crate::store::StoreError>>()?;
    let changes =
        s.cp.store
            .mission_changes(&m.id)
            .await?
            .into_iter()
            .map(|c| MissionChangeView {
                at_ms: c.at_ms,
                state: c.state,
                reason: c.reason,
                actor: c.actor,
            })
            .collect();
    Ok(MissionView {
        all_hold: !criteria.is_empty() && criteria.iter().all(|c| c.holds),
        overdue: overdue(&m, now_ms()),
        id: m.id,
        objective: m.objective,
        owner: m.owner,
        deadline_ms: m.deadline_ms,
        window_ms: m.window_ms,
        state: m.state,
        closed_by_hand: m.closed_by_hand,
        created_at_ms: m.created_at_ms,
        created_by: m.created_by,
        changed_at_ms: m.changed_at_ms,
        findings,
        criteria,
        changes,
    })
}

fn overdue(m: &MissionRow, now: i64) -> bool {
    m.state == "open" && m.deadline_ms.is_some_and(|d| d < now)
}

fn bounded<'a>(field: &str, value: &'a str, max: usize) -> Result<&'a str, ApiError> {
    let v = value.trim();
    if v.is_empty() || v.len() > max || v.chars().any(char::is_control) {
        return Err(ApiError::invalid(format!(
            "{field}: 1 to {max} bytes without control characters"
        )));
    }
    Ok(v)
}

/// A deadline: a duration from now, RFC 3339, or Unix milliseconds.
fn deadline(s: &str, now: i64) -> Result<i64, ApiError> {
    if let Ok(d) = humantime::parse_duration(s) {
        let ms = i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
        return Ok(now.saturating_add(ms));
    }
    crate::usage::parse_time(s).map_err(|e| ApiError::invalid(format!("deadline: {e}")))
}

/// The criteria window, within its bounds.
fn window(s: Option<&str>) -> Result<i64, ApiError> {
    let Some(s) = s else {
        return Ok(24 * 3600 * 1000);
    };
    let d = humantime::parse_duration(s)
        .map_err(|e| ApiError::invalid(format!("window {s:?}: {e} (use e.g. 30s, 15m, 24h)")))?;
    let ms = i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
    if !(missions::MIN_WINDOW_MS..=missions::MAX_WINDOW_MS).contains(&ms) {
        return Err(ApiError::invalid(format!(
            "window {s:?} is out of range: 1s to 90d"
        )));
    }
    Ok(ms)
}
