//! `/v1/usage`: what each workload used, the dependency map, unused grants
//! and uses after a revocation.

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};

use super::types::{
    AfterRevocation, Dependencies, ErrorBody, UnusedGrants, UsageQuery, UsageSummary,
};
use super::{AdminState, ApiError, Viewer};

/// The filter, or 400 `invalid` naming what is wrong with it.
fn filter(q: Result<Query<UsageQuery>, QueryRejection>) -> Result<crate::usage::Filter, ApiError> {
    let Query(q) = q.map_err(|e| ApiError::invalid(e.body_text()))?;
    let time = |s: Option<String>| {
        s.map(|s| crate::usage::parse_time(&s))
            .transpose()
            .map_err(ApiError::invalid)
    };
    Ok(crate::usage::Filter {
        since_ms: time(q.since)?,
        until_ms: time(q.until)?,
        credential: q.credential,
        workload: q.workload,
        upstream: q.upstream,
    })
}

/// Usage grouped by workload, upstream, credential, method and status
/// class; with the requests sidecars dropped before delivery.
///
/// Role: viewer.
#[utoipa::path(get, path = "/v1/usage", operation_id = "usage_summary", tag = "usage",
    params(UsageQuery), security(("bearer" = [])),
    responses((status = 200, body = UsageSummary), (status = 400, body = ErrorBody)))]
pub(super) async fn summary(
    State(s): State<AdminState>,
    _: Viewer,
    q: Result<Query<UsageQuery>, QueryRejection>,
) -> Result<Json<UsageSummary>, ApiError> {
    let filter = filter(q)?;
    Ok(Json(crate::usage::summary(&s.cp.store, &filter).await?))
}

/// Requests over time (steps of whole minutes, about 120 over the range;
/// since 24 hours ago by default), with errors.
///
/// Role: viewer.
#[utoipa::path(get, path = "/v1/usage/timeline", tag = "usage",
    params(UsageQuery), security(("bearer" = [])),
    responses((status = 200, body = crate::usage::Timeline), (status = 400, body = ErrorBody)))]
pub(super) async fn timeline(
    State(s): State<AdminState>,
    _: Viewer,
    q: Result<Query<UsageQuery>, QueryRejection>,
) -> Result<Json<crate::usage::Timeline>, ApiError> {
    let filter = filter(q)?;
    Ok(Json(crate::usage::timeline(&s.cp.store, &filter).await?))
}

/// The dependency map: workload → upstream edges.
///
/// Role: viewer.
#[utoipa::path(get, path = "/v1/usage/dependencies", tag = "usage",
    params(UsageQuery), security(("bearer" = [])),
    responses((status = 200, body = Dependencies), (status = 400, body = ErrorBody)))]
pub(super) async fn dependencies(
    State(s): State<AdminState>,
    _: Viewer,
    q: Result<Query<UsageQuery>, QueryRejection>,
) -> Result<Json<Dependencies>, ApiError> {
    let filter = filter(q)?;
    Ok(Json(Dependencies {
        edges: crate::usage::dependencies(&s.cp.store, &filter).await?,
    }))
}

/// Grants of the current policy no matching workload used since `since`
/// (required).
///
/// Role: viewer.
#[utoipa::path(get, path = "/v1/usage/unused-grants", tag = "usage",
    params(UsageQuery), security(("bearer" = [])),
    responses((status = 200, body = UnusedGrants), (status = 400, body = ErrorBody)))]
pub(super) async fn unused_grants(
    State(s): State<AdminState>,
    _: Viewer,
    q: Result<Query<UsageQuery>, QueryRejection>,
) -> Result<Json<UnusedGrants>, ApiError> {
    let filter = filter(q)?;
    let Some(since_ms) = filter.since_ms else {
        return Err(ApiError::invalid(
            "since is required: grants unused since when? (e.g. since=30d)",
        ));
    };
    let policy = s.cp.policy.load();
    let unused = crate::usage::unused_grants(&s.cp.store, &policy.policy, since_ms).await?;
    Ok(Json(UnusedGrants {
        since_ms,
        policy_version: policy.version.clone(),
        unused,
    }))
}

/// Uses of what each revocation covers after it was issued; `violation`
/// when after the workload's sidecars acknowledged it.
///
/// Role: viewer.
#[utoipa::path(get, path = "/v1/usage/after-revocation", tag = "usage",
    security(("bearer" = [])), responses((status = 200, body = AfterRevocation)))]
pub(super) async fn after_revocation(
    State(s): State<AdminState>,
    _: Viewer,
) -> Result<Json<AfterRevocation>, ApiError> {
    let uses = crate::usage::after_revocation(&s.cp.store).await?;
    Ok(Json(AfterRevocation {
        violations: uses.iter().filter(|u| u.violation).count(),
        uses,
    }))
}
