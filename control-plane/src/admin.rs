//! The admin HTTP listener: the authenticated, audited `/v1` API for
//! responders and operators, plus public health, readiness, metrics, the
//! JWKS and the OpenAPI description.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};
use spiffe::X509Source;

use crate::auth::{self, AuthError, Caller, Role};
use crate::revocations::{RevokeError, RevokeRequest};
use crate::state::ControlPlaneState;
use crate::store::{AuditEntry, StoredRevocation, now_ms};

/// Largest request body the admin API reads.
const MAX_BODY: usize = 16 * 1024;

#[derive(Clone)]
pub struct AdminState {
    pub cp: Arc<ControlPlaneState>,
    pub source: X509Source,
    /// The effective configuration, without secrets.
    pub config_dump: Arc<Value>,
    pub limiter: Arc<crate::unauthenticated::FailureLimiter>,
}

pub fn router(state: AdminState) -> Router {
    let api = Router::new()
        .route("/v1/revocations", get(list_revocations).post(revoke))
        .route("/v1/revocations/{id}", get(get_revocation))
        .route("/v1/revocations/{id}/restore", post(restore))
        .route("/v1/sidecars", get(sidecars))
        .route("/v1/leaked", get(list_leaked).post(register_leaked))
        .route("/v1/leaked/{id}", get(get_leaked))
        .route("/v1/stripped", get(stripped))
        .route("/v1/usage", get(usage))
        .route("/v1/usage/dependencies", get(usage_dependencies))
        .route("/v1/usage/unused-grants", get(usage_unused_grants))
        .route("/v1/usage/after-revocation", get(usage_after_revocation))
        .route(
            "/v1/secrets/{upstream}",
            get(list_secret_versions).post(put_secret),
        )
        .route(
            "/v1/secrets/{upstream}/versions/{version}/revoke",
            post(revoke_secret_version),
        )
        .route("/v1/audit", get(audit))
        .route("/v1/audit/verify", get(audit_verify))
        .route("/v1/audit/head", get(audit_head))
        .route("/v1/logging", get(get_logging).put(set_logging))
        .route("/v1/config_dump", get(config_dump))
        .route("/v1/tokens", post(create_token))
        .layer(middleware::from_fn_with_state(state.clone(), audited))
        .layer(DefaultBodyLimit::max(MAX_BODY));
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/.well-known/jwks.json", get(jwks))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(openapi))
        .merge(api)
        .with_state(state)
}

/// An error as the API returns it: a status and `{"error": code, "message": …}`.
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let detail = AuditDetail(format!("{}: {}", self.code, self.message));
        let mut resp = (
            self.status,
            Json(json!({"error": self.code, "message": self.message})),
        )
            .into_response();
        resp.extensions_mut().insert(detail);
        resp
    }
}

impl From<RevokeError> for ApiError {
    fn from(e: RevokeError) -> Self {
        match e {
            RevokeError::Invalid(m) => Self::new(StatusCode::BAD_REQUEST, "invalid", m),
            RevokeError::NotFound(m) => Self::new(StatusCode::NOT_FOUND, "not_found", m),
            RevokeError::Conflict(m) => Self::new(StatusCode::CONFLICT, "conflict", m),
            RevokeError::Store(e) => {
                tracing::error!(error = %e, "store error");
                Self::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "store_unavailable",
                    "the store refused the write",
                )
            }
        }
    }
}

impl From<crate::store::StoreError> for ApiError {
    fn from(e: crate::store::StoreError) -> Self {
        RevokeError::from(e).into()
    }
}

impl From<JsonRejection> for ApiError {
    fn from(e: JsonRejection) -> Self {
        let status = if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            StatusCode::PAYLOAD_TOO_LARGE
        } else {
            StatusCode::BAD_REQUEST
        };
        Self::new(status, "bad_body", e.body_text())
    }
}

/// What the audit entry should say about a call, set by the handler.
#[derive(Clone)]
struct AuditDetail(String);

fn require(caller: &Caller, role: Role) -> Result<(), ApiError> {
    if caller.role >= role {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!(
                "this call needs the {} role; the token has {}",
                role.as_str(),
                caller.role.as_str()
            ),
        ))
    }
}

/// Authenticates every `/v1` call and writes it to the audit log, whatever
/// the outcome (refused calls included).
async fn audited(
    State(s): State<AdminState>,
    axum::extract::ConnectInfo(peer): axum::extract::ConnectInfo<std::net::SocketAddr>,
    mut req: Request,
    next: Next,
) -> Response {
    let method = req.method().to_string();
    let path = req.uri().path().to_owned();
    let authorization = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let span = s.cp.otel.as_ref().map(|otel| {
        crate::telemetry::server_span(
            otel,
            format!("leash.admin {method}"),
            req.headers(),
            vec![
                opentelemetry::KeyValue::new("http.request.method", method.clone()),
                opentelemetry::KeyValue::new("url.path", path.clone()),
            ],
        )
    });
    // A valid token is checked first and never refused by the limiter;
    // calls without one count against their address and are audited as
    // one bounded summary per address and interval, not a row each.
    let (actor, role, response) = match auth::authenticate(&s.cp.store, authorization.as_deref())
        .await
    {
        Ok(caller) => {
            let (actor, role) = (caller.actor.clone(), caller.role.as_str());
            req.extensions_mut().insert(caller);
            (actor, role, next.run(req).await)
        }
        Err(e @ (AuthError::Missing | AuthError::Invalid)) => {
            let refused = match s.limiter.failed(peer.ip()) {
                Some(left) => {
                    let secs = left.as_secs() + 1;
                    let mut r = ApiError::new(
                        StatusCode::TOO_MANY_REQUESTS,
                        "too_many_failures",
                        format!(
                            "too many calls without a valid token from {}; try again in {secs} s",
                            peer.ip()
                        ),
                    )
                    .into_response();
                    if let Ok(v) = header::HeaderValue::from_str(&secs.to_string()) {
                        r.headers_mut().insert(header::RETRY_AFTER, v);
                    }
                    r
                }
                None => {
                    let mut r =
                        ApiError::new(StatusCode::UNAUTHORIZED, "unauthenticated", e.to_string())
                            .into_response();
                    r.headers_mut().insert(
                        header::WWW_AUTHENTICATE,
                        header::HeaderValue::from_static("Bearer"),
                    );
                    r
                }
            };
            s.cp.refused
                .record(peer.ip(), &method, &path, refused.status().as_u16());
            if let Some(cx) = &span {
                crate::telemetry::end(
                    cx,
                    vec![opentelemetry::KeyValue::new(
                        "http.response.status_code",
                        i64::from(refused.status().as_u16()),
                    )],
                    None,
                );
            }
            return refused;
        }
        Err(e @ AuthError::Store(_)) => {
            let r = ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "store_unavailable",
                e.to_string(),
            )
            .into_response();
            ("anonymous".to_owned(), "", r)
        }
    };
    let detail = response
        .extensions()
        .get::<AuditDetail>()
        .map(|d| d.0.clone())
        .unwrap_or_default();
    let (method, path) = (
        crate::unauthenticated::audit_method(&method),
        crate::unauthenticated::audit_path(&path),
    );
    let entry = AuditEntry {
        at_ms: now_ms(),
        actor,
        role: role.to_owned(),
        action: format!("{method} {path}"),
        method,
        path,
        status: response.status().as_u16(),
        detail,
    };
    if let Some(cx) = &span {
        let status = entry.status;
        crate::telemetry::end(
            cx,
            vec![
                opentelemetry::KeyValue::new("leash.actor", entry.actor.clone()),
                opentelemetry::KeyValue::new("leash.role", entry.role.clone()),
                opentelemetry::KeyValue::new("http.response.status_code", i64::from(status)),
            ],
            (status >= 500).then(|| entry.detail.clone()),
        );
    }
    if let Err(e) = s.cp.store.append_audit(&entry).await {
        s.cp.metrics
            .audit_write_failures
            .fetch_add(1, Ordering::Relaxed);
        tracing::error!(error = %e, action = %entry.action, actor = %entry.actor, "cannot write the audit log");
        // A read still answers (a full or read-only store must not blind
        // responders); a change must not look successful unaudited.
        if entry.method == "GET" || entry.method == "HEAD" {
            return response;
        }
        return ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "audit_unavailable",
            "the audit log is not writable",
        )
        .into_response();
    }
    response
}

fn with_detail(mut resp: Response, detail: String) -> Response {
    resp.extensions_mut().insert(AuditDetail(detail));
    resp
}

fn revocation_json(r: &StoredRevocation) -> Value {
    json!({
        "id": r.revocation.id,
        "kind": r.revocation.kind,
        "workload": r.revocation.workload,
        "upstream": r.revocation.upstream,
        "credential_id": r.revocation.credential_id,
        "reason": r.revocation.reason,
        "revoked_by": r.revocation.revoked_by,
        "revoked_at_ms": r.revocation.revoked_at_ms,
        "seq": r.revoke_seq,
        "active": r.restored.is_none(),
        "fingerprint_id": if r.revocation.fingerprint.len() < 4 {
            Value::Null
        } else {
            // A short public handle, not the fingerprint itself.
            json!(crate::store::hex(&r.revocation.fingerprint[..4]))
        },
        "restored": r.restored.as_ref().map(|x| json!({
            "by": x.by, "reason": x.reason, "at_ms": x.at_ms, "seq": x.seq,
        })),
    })
}

#[derive(Deserialize)]
struct ListQuery {
    #[serde(default)]
    all: bool,
}

async fn list_revocations(
    State(s): State<AdminState>,
    Extension(caller): Extension<Caller>,
    Query(q): Query<ListQuery>,
) -> Result<Response, ApiError> {
    require(&caller, Role::Viewer)?;
    let list =
        s.cp.store
            .revocations(!q.all)
            .await
            .map_err(RevokeError::from)?;
    let body = json!({"revocations": list.iter().map(revocation_json).collect::<Vec<_>>()});
    Ok(Json(body).into_response())
}

async fn revoke(
    State(s): State<AdminState>,
    Extension(caller): Extension<Caller>,
    body: Result<Json<RevokeRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    require(&caller, Role::Responder)?;
    let Json(req) = body?;
    let policy = s.cp.policy.load();
    let stored = if let Some((upstream, version)) = (req.kind == "credential")
        .then(|| crate::secrets::parse_lease_id(&req.credential_id))
        .flatten()
    {
        // A static lease is a secret version: revoking it revokes the version.
        s.cp.revocations
            .revoke_secret_version(&upstream, version, &req.reason, &caller.actor)
            .await?
    } else {
        if req.kind == "credential" && req.credential_id.starts_with("oauth2:") {
            // Dropped before the commit: the sidecars that refetch after the
            // revocation get a freshly exchanged token, never this one.
            s.cp.tokens.forget(&req.credential_id);
        }
        s.cp.revocations
            .revoke(req, &caller.actor, &policy.policy)
            .await?
    };
    let detail = format!(
        "revoked {} {} seq {}: {}",
        stored.revocation.kind, stored.revocation.id, stored.revoke_seq, stored.revocation.reason
    );
    Ok(with_detail(
        (StatusCode::CREATED, Json(revocation_json(&stored))).into_response(),
        detail,
    ))
}

async fn get_revocation(
    State(s): State<AdminState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    require(&caller, Role::Viewer)?;
    let stored =
        s.cp.store
            .revocation(&id)
            .await
            .map_err(RevokeError::from)?
            .ok_or_else(|| {
                ApiError::new(
                    StatusCode::NOT_FOUND,
                    "not_found",
                    format!("no revocation {id:?}"),
                )
            })?;
    let mut body = revocation_json(&stored);
    body["propagation"] = propagation(&s, stored.revoke_seq).await?;
    Ok(Json(body).into_response())
}

/// Which sidecars have acknowledged `seq` (durable record) and which of the
/// connected ones have not yet.
async fn propagation(s: &AdminState, seq: u64) -> Result<Value, ApiError> {
    let committed_at =
        s.cp.store
            .revocations(false)
            .await
            .map_err(RevokeError::from)?
            .into_iter()
            .find_map(|r| {
                if r.revoke_seq == seq {
                    Some(r.revocation.revoked_at_ms)
                } else {
                    r.restored.filter(|x| x.seq == seq).map(|x| x.at_ms)
                }
            })
            .unwrap_or(0);
    let acked = s.cp.store.acks_for(seq).await.map_err(RevokeError::from)?;
    let acknowledged: Vec<Value> = acked
        .iter()
        .map(|(session, at)| {
            json!({
                "session_id": session.id,
                "spiffe_id": session.spiffe_id,
                "version": session.version,
                "acked_at_ms": at,
                "latency_ms": (at - committed_at).max(0),
            })
        })
        .collect();
    let connected = s.cp.sessions.list();
    let pending: Vec<Value> = connected
        .iter()
        .filter(|c| c.last_ack_seq.load(Ordering::Relaxed) < seq)
        .map(|c| {
            json!({
                "session_id": c.id,
                "spiffe_id": &*c.spiffe_id,
                "version": c.version,
                "last_ack_seq": c.last_ack_seq.load(Ordering::Relaxed),
                "last_heard_ms": c.last_heard_ms.load(Ordering::Relaxed),
            })
        })
        .collect();
    Ok(json!({
        "seq": seq,
        "connected": connected.len(),
        "acknowledged": acknowledged,
        "pending": pending,
    }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RestoreRequest {
    reason: String,
}

async fn restore(
    State(s): State<AdminState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    body: Result<Json<RestoreRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    require(&caller, Role::Responder)?;
    let Json(req) = body?;
    let stored =
        s.cp.revocations
            .restore(&id, &caller.actor, &req.reason)
            .await?;
    let detail = format!("restored {id}: {}", req.reason.trim());
    Ok(with_detail(
        Json(revocation_json(&stored)).into_response(),
        detail,
    ))
}

async fn sidecars(
    State(s): State<AdminState>,
    Extension(caller): Extension<Caller>,
) -> Result<Response, ApiError> {
    require(&caller, Role::Viewer)?;
    let list: Vec<Value> =
        s.cp.sessions
            .list()
            .iter()
            .map(|c| {
                json!({
                    "session_id": c.id,
                    "spiffe_id": &*c.spiffe_id,
                    "version": c.version,
                    "connected_at_ms": c.connected_at_ms,
                    "last_ack_seq": c.last_ack_seq.load(Ordering::Relaxed),
                    "last_ack_at_ms": c.last_ack_at_ms.load(Ordering::Relaxed),
                    "last_heard_ms": c.last_heard_ms.load(Ordering::Relaxed),
                })
            })
            .collect();
    Ok(Json(json!({"seq": s.cp.revocations.snapshot().seq, "sidecars": list})).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LeakedRequest {
    /// The leaked value itself. Fingerprinted, then zeroized; never stored or logged.
    value: zeroize::Zeroizing<String>,
    reason: String,
}

async fn register_leaked(
    State(s): State<AdminState>,
    Extension(caller): Extension<Caller>,
    body: Result<Json<LeakedRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    require(&caller, Role::Responder)?;
    // A malformed body is reported without echoing it (it may hold the value).
    let Json(req) = body.map_err(|e| {
        let status = if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            StatusCode::PAYLOAD_TOO_LARGE
        } else {
            StatusCode::BAD_REQUEST
        };
        ApiError::new(
            status,
            "bad_body",
            "expected {\"value\": \"…\", \"reason\": \"…\"}",
        )
    })?;
    let stored =
        s.cp.revocations
            .register_leaked(req.value, &req.reason, &caller.actor)
            .await?;
    let detail = format!(
        "registered leaked value {} seq {}: {}",
        stored.revocation.id, stored.revoke_seq, stored.revocation.reason
    );
    Ok(with_detail(
        (StatusCode::CREATED, Json(revocation_json(&stored))).into_response(),
        detail,
    ))
}

async fn list_leaked(
    State(s): State<AdminState>,
    Extension(caller): Extension<Caller>,
) -> Result<Response, ApiError> {
    require(&caller, Role::Viewer)?;
    let list =
        s.cp.store
            .revocations(false)
            .await
            .map_err(RevokeError::from)?;
    let leaked: Vec<Value> = list
        .iter()
        .filter(|r| r.revocation.kind == "leaked")
        .map(revocation_json)
        .collect();
    Ok(Json(json!({"leaked": leaked})).into_response())
}

/// A registration with its forgotten consumers: every workload that sent the
/// value since, to which upstream, how often, first and last seen.
async fn get_leaked(
    State(s): State<AdminState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    require(&caller, Role::Viewer)?;
    let stored =
        s.cp.store
            .revocation(&id)
            .await
            .map_err(RevokeError::from)?
            .filter(|r| r.revocation.kind == "leaked")
            .ok_or_else(|| {
                ApiError::new(
                    StatusCode::NOT_FOUND,
                    "not_found",
                    format!("no leaked value {id:?}"),
                )
            })?;
    let mut body = revocation_json(&stored);
    body["sightings"] = json!(s.cp.store.sightings(&id).await.map_err(RevokeError::from)?);
    body["propagation"] = propagation(&s, stored.revoke_seq).await?;
    Ok(Json(body).into_response())
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct UsageQuery {
    credential: Option<String>,
    workload: Option<String>,
    upstream: Option<String>,
    since: Option<String>,
    until: Option<String>,
}

impl UsageQuery {
    fn filter(self) -> Result<crate::usage::Filter, ApiError> {
        let time = |s: Option<String>| {
            s.map(|s| crate::usage::parse_time(&s))
                .transpose()
                .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid", e))
        };
        Ok(crate::usage::Filter {
            since_ms: time(self.since)?,
            until_ms: time(self.until)?,
            credential: self.credential,
            workload: self.workload,
            upstream: self.upstream,
        })
    }
}

type UsageParams = Result<Query<UsageQuery>, axum::extract::rejection::QueryRejection>;

fn usage_query(q: UsageParams) -> Result<crate::usage::Filter, ApiError> {
    let Query(q) =
        q.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid", e.body_text()))?;
    q.filter()
}

async fn usage(
    State(s): State<AdminState>,
    Extension(caller): Extension<Caller>,
    q: UsageParams,
) -> Result<Response, ApiError> {
    require(&caller, Role::Viewer)?;
    let filter = usage_query(q)?;
    let summary = crate::usage::summary(&s.cp.store, &filter).await?;
    Ok(Json(summary).into_response())
}

async fn usage_dependencies(
    State(s): State<AdminState>,
    Extension(caller): Extension<Caller>,
    q: UsageParams,
) -> Result<Response, ApiError> {
    require(&caller, Role::Viewer)?;
    let filter = usage_query(q)?;
    let edges = crate::usage::dependencies(&s.cp.store, &filter).await?;
    Ok(Json(json!({"edges": edges})).into_response())
}

async fn usage_unused_grants(
    State(s): State<AdminState>,
    Extension(caller): Extension<Caller>,
    q: UsageParams,
) -> Result<Response, ApiError> {
    require(&caller, Role::Viewer)?;
    let filter = usage_query(q)?;
    let Some(since_ms) = filter.since_ms else {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid",
            "since is required: grants unused since when? (e.g. since=30d)",
        ));
    };
    let policy = s.cp.policy.load();
    let unused = crate::usage::unused_grants(&s.cp.store, &policy.policy, since_ms).await?;
    Ok(
        Json(json!({"since_ms": since_ms, "policy_version": policy.version, "unused": unused}))
            .into_response(),
    )
}

async fn usage_after_revocation(
    State(s): State<AdminState>,
    Extension(caller): Extension<Caller>,
) -> Result<Response, ApiError> {
    require(&caller, Role::Viewer)?;
    let uses = crate::usage::after_revocation(&s.cp.store).await?;
    let violations = uses.iter().filter(|u| u.violation).count();
    Ok(Json(json!({"violations": violations, "uses": uses})).into_response())
}

async fn get_logging(Extension(caller): Extension<Caller>) -> Result<Response, ApiError> {
    require(&caller, Role::Viewer)?;
    Ok(Json(json!({"filter": leash_api::process::log_filter()})).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LoggingRequest {
    filter: String,
}

async fn set_logging(
    Extension(caller): Extension<Caller>,
    body: Result<Json<LoggingRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    require(&caller, Role::Admin)?;
    let Json(req) = body?;
    let filter = leash_api::process::set_log_filter(&req.filter)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid", e))?;
    Ok(with_detail(
        Json(json!({"filter": filter})).into_response(),
        format!("log filter set to {filter:?}"),
    ))
}

async fn config_dump(
    State(s): State<AdminState>,
    Extension(caller): Extension<Caller>,
) -> Result<Response, ApiError> {
    require(&caller, Role::Admin)?;
    let mut dump = (*s.config_dump).clone();
    let policy = s.cp.policy.load();
    dump["policy_version"] = json!(policy.version);
    dump["upstreams"] = json!(policy.policy.policy.upstreams.len());
    dump["grants"] = json!(policy.policy.policy.grants.len());
    dump["revocation_seq"] = json!(s.cp.revocations.snapshot().seq);
    dump["sessions"] = json!(s.cp.sessions.len());
    dump["log_filter"] = json!(leash_api::process::log_filter());
    Ok(Json(dump).into_response())
}

async fn stripped(
    State(s): State<AdminState>,
    Extension(caller): Extension<Caller>,
) -> Result<Response, ApiError> {
    require(&caller, Role::Viewer)?;
    let rows: Vec<Value> = s
        .cp
        .store
        .stripped()
        .await
        .map_err(RevokeError::from)?
        .into_iter()
        .map(|(workload, upstream, count, first, last)| {
            json!({"workload": workload, "upstream": upstream, "count": count, "first_seen_ms": first, "last_seen_ms": last})
        })
        .collect();
    let echoed: Vec<Value> = s
        .cp
        .store
        .echoes()
        .await
        .map_err(RevokeError::from)?
        .into_iter()
        .map(|(workload, upstream, header, count, last)| {
            json!({"workload": workload, "upstream": upstream, "header": header, "count": count, "last_seen_ms": last})
        })
        .collect();
    Ok(Json(json!({"stripped": rows, "echoed": echoed})).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SecretRequest {
    /// The secret value. Encrypted at once; never stored in the clear or logged.
    value: zeroize::Zeroizing<String>,
}

fn secret_error(e: crate::secrets::SecretError) -> ApiError {
    use crate::secrets::SecretError as E;
    match e {
        E::NoMasterKey | E::BadMasterKey(_) | E::Decrypt { .. } => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "no_master_key",
            e.to_string(),
        ),
        E::Invalid(m) => ApiError::new(StatusCode::BAD_REQUEST, "invalid", m),
        E::Missing(_) => ApiError::new(StatusCode::NOT_FOUND, "not_found", e.to_string()),
        E::CurrentRevoked { .. } => ApiError::new(StatusCode::CONFLICT, "revoked", e.to_string()),
        E::Store(e) => RevokeError::from(e).into(),
    }
}

fn static_upstream(s: &AdminState, upstream: &str) -> Result<(), ApiError> {
    let policy = s.cp.policy.load();
    match policy.policy.upstream(upstream) {
        Some(u)
            if matches!(
                u.credential.kind,
                leash_api::policy::CredentialKind::Static
                    | leash_api::policy::CredentialKind::Oauth2ClientCredentials
            ) =>
        {
            Ok(())
        }
        Some(_) => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid",
            format!("upstream {upstream:?} does not use a static credential"),
        )),
        None => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid",
            format!("policy names no upstream {upstream:?}"),
        )),
    }
}

/// Stores a new version of an upstream's secret and makes it current
/// (`leashctl secret put` and `rotate`). Sidecars move to it as their leases
/// end, or at once when the old version is revoked.
async fn put_secret(
    State(s): State<AdminState>,
    Extension(caller): Extension<Caller>,
    Path(upstream): Path<String>,
    body: Result<Json<SecretRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    require(&caller, Role::Admin)?;
    static_upstream(&s, &upstream)?;
    let Json(req) = body.map_err(|_| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_body",
            "expected {\"value\": \"…\"}",
        )
    })?;
    let key =
        s.cp.master_key
            .as_ref()
            .ok_or_else(|| secret_error(crate::secrets::SecretError::NoMasterKey))?;
    let version = crate::secrets::put(&s.cp.store, key, &upstream, &req.value, &caller.actor)
        .await
        .map_err(secret_error)?;
    Ok(with_detail(
        (
            StatusCode::CREATED,
            Json(json!({"upstream": upstream, "version": version})),
        )
            .into_response(),
        format!("stored version {version} of {upstream}'s secret"),
    ))
}

async fn list_secret_versions(
    State(s): State<AdminState>,
    Extension(caller): Extension<Caller>,
    Path(upstream): Path<String>,
) -> Result<Response, ApiError> {
    require(&caller, Role::Viewer)?;
    let versions =
        s.cp.store
            .secret_versions(&upstream)
            .await
            .map_err(RevokeError::from)?;
    // The newest version is the current one; if it is revoked the upstream
    // has no usable secret until a new version is put.
    let current = versions
        .first()
        .filter(|v| v.revoked_at_ms.is_none())
        .map(|v| v.version);
    let list: Vec<Value> = versions
        .iter()
        .map(|v| {
            json!({
                "version": v.version,
                "current": Some(v.version) == current,
                "created_at_ms": v.created_at_ms,
                "created_by": v.created_by,
                "revoked_at_ms": v.revoked_at_ms,
            })
        })
        .collect();
    let state = match (versions.first(), current) {
        (None, _) => "no secret stored",
        (Some(_), Some(_)) => "ok",
        (Some(_), None) => {
            "the newest version is revoked: no secret is leased (sidecars answer 503 credential_unavailable) until a new version is put"
        }
    };
    Ok(
        Json(json!({"upstream": upstream, "current": current, "state": state, "versions": list}))
            .into_response(),
    )
}

async fn revoke_secret_version(
    State(s): State<AdminState>,
    Extension(caller): Extension<Caller>,
    Path((upstream, version)): Path<(String, i64)>,
    body: Result<Json<RestoreRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    require(&caller, Role::Responder)?;
    let Json(req) = body?;
    let stored =
        s.cp.revocations
            .revoke_secret_version(&upstream, version, &req.reason, &caller.actor)
            .await?;
    let detail = format!(
        "revoked version {version} of {upstream}'s secret as {}",
        stored.revocation.id
    );
    Ok(with_detail(
        (StatusCode::CREATED, Json(revocation_json(&stored))).into_response(),
        detail,
    ))
}

#[derive(Deserialize)]
struct AuditQuery {
    #[serde(default = "default_limit")]
    limit: i64,
}

fn default_limit() -> i64 {
    100
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct VerifyQuery {
    /// A head saved earlier (`GET /v1/audit/head`): its entry must still be
    /// in the chain with this hash.
    id: Option<i64>,
    hash: Option<String>,
}

async fn audit_verify(
    State(s): State<AdminState>,
    Extension(caller): Extension<Caller>,
    Query(q): Query<VerifyQuery>,
) -> Result<Response, ApiError> {
    require(&caller, Role::Admin)?;
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
    Ok(Json(verdict).into_response())
}

/// The current head of the audit chain, signed with a key derived from
/// the master key: save it elsewhere and check later with `leashctl audit
/// verify --head FILE`.
async fn audit_head(
    State(s): State<AdminState>,
    Extension(caller): Extension<Caller>,
) -> Result<Response, ApiError> {
    require(&caller, Role::Admin)?;
    match s.cp.store.signed_head().await? {
        Ok(Some(head)) => Ok(Json(head).into_response()),
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

async fn audit(
    State(s): State<AdminState>,
    Extension(caller): Extension<Caller>,
    Query(q): Query<AuditQuery>,
) -> Result<Response, ApiError> {
    require(&caller, Role::Admin)?;
    let entries =
        s.cp.store
            .audit(q.limit.clamp(1, 10_000))
            .await
            .map_err(RevokeError::from)?;
    Ok(Json(json!({"entries": entries})).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenRequest {
    name: String,
    role: String,
}

async fn create_token(
    State(s): State<AdminState>,
    Extension(caller): Extension<Caller>,
    body: Result<Json<TokenRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    require(&caller, Role::Admin)?;
    let Json(req) = body?;
    let role = Role::parse(&req.role).ok_or_else(|| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid",
            "role must be viewer, responder or admin",
        )
    })?;
    if req.name.is_empty() || req.name.len() > 64 {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid",
            "name must be 1-64 bytes",
        ));
    }
    let token = auth::create_token(&s.cp.store, &req.name, role, &caller.actor)
        .await
        .map_err(RevokeError::from)?;
    // The audit entry names the token, never its secret.
    let detail = format!("created {} token {:?}", role.as_str(), req.name);
    Ok(with_detail(
        (
            StatusCode::CREATED,
            Json(json!({"name": req.name, "role": role.as_str(), "token": token})),
        )
            .into_response(),
        detail,
    ))
}

async fn readyz(State(s): State<AdminState>) -> impl IntoResponse {
    let mut pending = Vec::new();
    if !s.source.is_healthy() {
        pending.push("identity");
    }
    if !s.cp.store.ping().await {
        pending.push("store");
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

/// The public JWKS, with an `ETag` (a hash of the key set) so that
/// verifiers can revalidate cheaply, and a short `max-age` so that a
/// rotation reaches them within a minute.
async fn jwks(State(s): State<AdminState>, headers: header::HeaderMap) -> Response {
    let body = s.cp.issuer.jwks().to_string();
    let etag = format!(
        "\"{}\"",
        &crate::store::hex(ring::digest::digest(&ring::digest::SHA256, body.as_bytes()).as_ref())
            [..32]
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

async fn metrics(State(s): State<AdminState>) -> impl IntoResponse {
    let body =
        s.cp.metrics
            .render(s.cp.sessions.len(), s.cp.revocations.snapshot().seq);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body)
}

async fn openapi(_headers: HeaderMap) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/json")],
        include_str!("openapi.json"),
    )
}
