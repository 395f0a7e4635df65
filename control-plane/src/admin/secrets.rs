//! `/v1/secrets/{upstream}`: brokered secrets: put a new version, list the
//! versions (never their values), revoke one, probe a revoked one at its
//! provider and read what it answered.

use axum::Json;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;

use super::revocations::revocation;
use super::types::{
    ErrorBody, ProbeResult, ProbeResults, ReasonRequest, Revocation, SecretRequest, SecretStored,
    SecretVersion, SecretVersions,
};
use super::{AdminRole, AdminState, ApiError, Audited, Responder, Viewer};
use crate::probes::ProbeError;
use crate::secrets::SecretError;

fn secret_error(e: SecretError) -> ApiError {
    match e {
        SecretError::NoMasterKey | SecretError::BadMasterKey(_) | SecretError::Decrypt { .. } => {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "no_master_key",
                e.to_string(),
            )
        }
        SecretError::Invalid(m) => ApiError::invalid(m),
        SecretError::Missing(_) => ApiError::not_found(e.to_string()),
        SecretError::CurrentRevoked { .. } => {
            ApiError::new(StatusCode::CONFLICT, "revoked", e.to_string())
        }
        SecretError::Store(e) => e.into(),
    }
}

/// Only upstreams whose credential is a brokered secret take one.
fn static_upstream(s: &AdminState, upstream: &str) -> Result<(), ApiError> {
    let policy = s.cp.policy.load();
    match policy.policy.upstream(upstream) {
        Some(u)
            if matches!(
                u.credential.kind,
                leash_api::policy::CredentialKind::Static
                    | leash_api::policy::CredentialKind::Oauth2ClientCredentials
                    | leash_api::policy::CredentialKind::AwsSigv4
            ) =>
        {
            Ok(())
        }
        Some(_) => Err(ApiError::invalid(format!(
            "upstream {upstream:?} does not use a static credential"
        ))),
        None => Err(ApiError::invalid(format!(
            "policy names no upstream {upstream:?}"
        ))),
    }
}

/// Store a new version of an upstream's secret and make it current
/// (`leashctl secret put` and `rotate`). Sidecars move to it as their
/// leases end, or at once when the old version is revoked.
///
/// Role: admin.
#[utoipa::path(post, path = "/v1/secrets/{upstream}", operation_id = "put_secret", tag = "secrets",
    params(("upstream" = String, Path, description = "Upstream name from policy")),
    request_body = SecretRequest, security(("bearer" = [])),
    responses((status = 201, body = SecretStored), (status = 400, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 503, body = ErrorBody,
        description = "no_master_key: the control plane runs without a master key")))]
pub(super) async fn put(
    State(s): State<AdminState>,
    Path(upstream): Path<String>,
    AdminRole(caller): AdminRole,
    body: Result<Json<SecretRequest>, JsonRejection>,
) -> Result<Audited<SecretStored>, ApiError> {
    static_upstream(&s, &upstream)?;
    // Never echoes the body: it holds the secret.
    let Json(req) = body.map_err(|_| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_body",
            "expected {\"value\": \"…\"}",
        )
    })?;
    let signed =
        s.cp.policy
            .load()
            .policy
            .upstream(&upstream)
            .is_some_and(|u| u.credential.kind == leash_api::policy::CredentialKind::AwsSigv4);
    if signed && let Err(reason) = leash_api::policy::AwsKey::parse(req.value.as_bytes()) {
        return Err(ApiError::invalid(format!(
            "{upstream:?} signs with an AWS key: {reason}"
        )));
    }
    let key =
        s.cp.master_key
            .as_ref()
            .ok_or_else(|| secret_error(SecretError::NoMasterKey))?;
    let version = crate::secrets::put(&s.cp.store, key, &upstream, &req.value, &caller.actor)
        .await
        .map_err(secret_error)?;
    let detail = format!("stored version {version} of {upstream}'s secret");
    Ok(Audited(
        StatusCode::CREATED,
        SecretStored { upstream, version },
        detail,
    ))
}

/// An upstream's secret versions, newest first, and which one is current.
///
/// Role: viewer.
#[utoipa::path(get, path = "/v1/secrets/{upstream}", operation_id = "list_secret_versions", tag = "secrets",
    params(("upstream" = String, Path, description = "Upstream name from policy")),
    security(("bearer" = [])), responses((status = 200, body = SecretVersions)))]
pub(super) async fn list(
    State(s): State<AdminState>,
    Path(upstream): Path<String>,
    _: Viewer,
) -> Result<Json<SecretVersions>, ApiError> {
    let versions = s.cp.store.secret_versions(&upstream).await?;
    // The newest version is the current one; if it is revoked the upstream
    // has no usable secret until a new version is put.
    let current = versions
        .first()
        .filter(|v| v.revoked_at_ms.is_none())
        .map(|v| v.version);
    let state = match (versions.first(), current) {
        (None, _) => "no secret stored",
        (Some(_), Some(_)) => "ok",
        (Some(_), None) => {
            "the newest version is revoked: no secret is leased (sidecars answer 503 credential_unavailable) until a new version is put"
        }
    };
    Ok(Json(SecretVersions {
        current,
        state: state.to_owned(),
        versions: versions
            .iter()
            .map(|v| SecretVersion {
                version: v.version,
                current: Some(v.version) == current,
                created_at_ms: v.created_at_ms,
                created_by: v.created_by.clone(),
                revoked_at_ms: v.revoked_at_ms,
            })
            .collect(),
        upstream,
    }))
}

/// Revoke one version of an upstream's secret: its leases are cut at once.
///
/// Role: responder.
#[utoipa::path(post, path = "/v1/secrets/{upstream}/versions/{version}/revoke", tag = "secrets",
    params(("upstream" = String, Path, description = "Upstream name from policy"),
        ("version" = i64, Path, description = "Secret version")),
    request_body = ReasonRequest, security(("bearer" = [])),
    responses((status = 201, body = Revocation), (status = 400, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody)))]
pub(super) async fn revoke_version(
    State(s): State<AdminState>,
    Path((upstream, version)): Path<(String, i64)>,
    Responder(caller): Responder,
    body: Result<Json<ReasonRequest>, JsonRejection>,
) -> Result<Audited<Revocation>, ApiError> {
    let Json(req) = body?;
    let stored =
        s.cp.revocations
            .revoke_secret_version(&upstream, version, &req.reason, &caller.actor)
            .await?;
    crate::probes::after_revocation(&s.cp, &upstream, version);
    let detail = format!(
        "revoked version {version} of {upstream}'s secret as {}",
        stored.revocation.id
    );
    Ok(Audited(StatusCode::CREATED, revocation(&stored), detail))
}

fn probe_error(e: ProbeError) -> ApiError {
    match e {
        ProbeError::UnknownUpstream(_) | ProbeError::NoProbe(_) => ApiError::invalid(e.to_string()),
        ProbeError::NoVersion { .. } => ApiError::not_found(e.to_string()),
        ProbeError::NotRevoked { .. } => {
            ApiError::new(StatusCode::CONFLICT, "not_revoked", e.to_string())
        }
        ProbeError::Limited { retry_after, .. } => {
            let mut api = ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "probe_limited",
                e.to_string(),
            );
            api.retry_after = Some(retry_after.as_secs().max(1));
            api
        }
        ProbeError::Secret(e) => secret_error(e),
        ProbeError::Store(e) => e.into(),
    }
}

/// Send a revoked version's `deactivation_probe` to its provider again, and
/// record and return what it answered. Never for a version that is not
/// revoked; at most once a minute per version and ten times a minute per
/// upstream. Answers when the probe ends (within `--probe-timeout`).
///
/// Role: responder.
#[utoipa::path(post, path = "/v1/secrets/{upstream}/versions/{version}/probe", tag = "secrets",
    params(("upstream" = String, Path, description = "Upstream name from policy"),
        ("version" = i64, Path, description = "Secret version")),
    security(("bearer" = [])),
    responses((status = 201, body = ProbeResult), (status = 400, body = ErrorBody,
        description = "invalid: the policy declares no deactivation_probe for the upstream"),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody, description = "not_revoked: a live secret is never sent"),
        (status = 429, body = ErrorBody, description = "probe_limited (Retry-After)")))]
pub(super) async fn probe_version(
    State(s): State<AdminState>,
    Path((upstream, version)): Path<(String, i64)>,
    Responder(_): Responder,
) -> Result<Audited<ProbeResult>, ApiError> {
    let result = crate::probes::probe(&s.cp, &upstream, version)
        .await
        .map_err(probe_error)?;
    let detail = format!(
        "probed version {version} of {upstream}'s secret: {} ({})",
        result.outcome, result.detail
    );
    Ok(Audited(StatusCode::CREATED, result, detail))
}

/// What the provider answered each time a revoked version was probed,
/// newest first.
///
/// Role: viewer.
#[utoipa::path(get, path = "/v1/secrets/{upstream}/versions/{version}/probes", operation_id = "list_probes", tag = "secrets",
    params(("upstream" = String, Path, description = "Upstream name from policy"),
        ("version" = i64, Path, description = "Secret version")),
    security(("bearer" = [])), responses((status = 200, body = ProbeResults)))]
pub(super) async fn probes(
    State(s): State<AdminState>,
    Path((upstream, version)): Path<(String, i64)>,
    _: Viewer,
) -> Result<Json<ProbeResults>, ApiError> {
    let probes = s.cp.store.probe_results(&upstream, version).await?;
    Ok(Json(ProbeResults {
        upstream,
        version,
        probes,
    }))
}
