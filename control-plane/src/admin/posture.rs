//! `/v1/posture` and `/v1/policy/check`: posture after an incident (grants
//! nobody used, lifetimes far above their use, workloads still holding
//! their own secrets, and the policy edit), and which live consumers a
//! proposed policy would break.

use std::path::{Path, PathBuf};

use axum::Json;
use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use http_body_util::{BodyExt as _, LengthLimitError, Limited};
use leash_api::policy::PolicyError;

use super::types::{ErrorBody, PolicyCheck, PolicyCheckQuery, Posture, PostureQuery};
use super::{AdminState, ApiError, Viewer};
use crate::posture::PostureError;

/// Largest proposed policy `POST /v1/policy/check` reads.
const MAX_POLICY_BODY: usize = 1024 * 1024;

fn window(name: &str, since: Option<&str>) -> Result<i64, ApiError> {
    crate::posture::window_start(since).map_err(|e| ApiError::invalid(format!("{name}: {e}")))
}

/// Grants no matching workload used since `since`, credential lifetimes
/// far above how long their credentials were in use, workloads that still
/// send their own credential, and the policy with all of it taken back
/// (YAML and a unified diff). `since` defaults to 30d.
///
/// Role: viewer.
#[utoipa::path(get, path = "/v1/posture", tag = "usage",
    params(PostureQuery), security(("bearer" = [])),
    responses((status = 200, body = Posture), (status = 400, body = ErrorBody)))]
pub(super) async fn posture(
    State(s): State<AdminState>,
    _: Viewer,
    q: Result<Query<PostureQuery>, QueryRejection>,
) -> Result<Json<Posture>, ApiError> {
    let Query(q) = q.map_err(|e| ApiError::invalid(e.body_text()))?;
    let since_ms = window("since", q.since.as_deref())?;
    let snapshot = s.cp.policy.load();
    Ok(Json(
        crate::posture::posture(&s.cp.store, &snapshot, since_ms).await?,
    ))
}

/// Validates a proposed policy file (the body, YAML, at most 1 MiB) as
/// the control plane would load it, then lists every (workload, upstream)
/// pair with requests since `against_usage` (default 30d) that it would no
/// longer grant. Nothing is applied.
///
/// Role: viewer.
#[utoipa::path(post, path = "/v1/policy/check", tag = "usage",
    params(PolicyCheckQuery), security(("bearer" = [])),
    request_body(content = String, content_type = "application/yaml",
        description = "The proposed policy file"),
    responses((status = 200, body = PolicyCheck),
        (status = 400, description = "invalid: the proposal, naming each bad field and its line; or the window", body = ErrorBody),
        (status = 413, description = "bad_body: over 1 MiB", body = ErrorBody)))]
pub(super) async fn check(
    State(s): State<AdminState>,
    _: Viewer,
    q: Result<Query<PolicyCheckQuery>, QueryRejection>,
    body: Body,
) -> Result<Json<PolicyCheck>, ApiError> {
    let Query(q) = q.map_err(|e| ApiError::invalid(e.body_text()))?;
    let since_ms = window("against_usage", q.against_usage.as_deref())?;
    let text = read_policy(body).await?;
    // Relative ca_files resolve as they would in place of the file in force.
    let base =
        s.cp.policy_path
            .parent()
            .map_or_else(|| PathBuf::from("."), Path::to_owned);
    let proposed = leash_api::policy::parse(&text, &base).map_err(|issues| {
        ApiError::invalid(
            PolicyError {
                file: PathBuf::from("(proposed)"),
                issues,
            }
            .to_string(),
        )
    })?;
    let broken = crate::posture::check(&s.cp.store, &proposed, since_ms).await?;
    Ok(Json(PolicyCheck {
        since_ms,
        policy_version: s.cp.policy.load().version.clone(),
        upstreams: proposed.policy.upstreams.len(),
        grants: proposed.policy.grants.len(),
        broken,
    }))
}

/// The body as text, at most `MAX_POLICY_BODY` bytes (the `/v1` default
/// limit is for JSON requests; a policy file may be larger).
async fn read_policy(body: Body) -> Result<String, ApiError> {
    let bytes = match Limited::new(body, MAX_POLICY_BODY).collect().await {
        Ok(c) => c.to_bytes(),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "bad_body",
                format!("the proposed policy is over {MAX_POLICY_BODY} bytes"),
            ));
        }
        Err(e) => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "bad_body",
                format!("cannot read the body: {e}"),
            ));
        }
    };
    String::from_utf8(bytes.to_vec())
        .map_err(|_| ApiError::new(StatusCode::BAD_REQUEST, "bad_body", "the body is not UTF-8"))
}

impl From<PostureError> for ApiError {
    fn from(e: PostureError) -> Self {
        match e {
            PostureError::Store(e) => e.into(),
            PostureError::Yaml(e) => {
                tracing::error!(error = %e, "cannot write the proposed policy");
                Self::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    "cannot write the proposed policy",
                )
            }
        }
    }
}
