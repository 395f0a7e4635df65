//! The responder's web console, under `/console` on the admin port.
//!
//! Server-rendered HTML (maud: every value escaped by construction) and one
//! small script of our own for the live view; every asset is compiled into
//! the binary, so it works air-gapped and needs no JavaScript toolchain.
//! A page reads, and a form acts, through the admin API itself: each is
//! the same `/v1` call the CLI makes, dispatched in-process as the signed-in
//! session's token (`ConsoleCaller`), so roles, validation, errors and the
//! audit log are the API's. Only the live propagation stream reads the
//! store directly (it is not an action, and auditing each tick would flood
//! the log); it is authenticated like every page.
//!
//! Sessions: an admin token is exchanged for an `HttpOnly`, `SameSite=Strict`
//! cookie (`Secure` with TLS) whose hash is stored, expiring after
//! [`session::LIFETIME`] and ended for good on sign-out. Every form posts the
//! session's CSRF value, and a cross-origin `Origin` is refused. A strict
//! `Content-Security-Policy` allows only the console's own script and style.

mod map;
mod pages;
pub mod session;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{ConnectInfo, DefaultBodyLimit, Form, Path, Query, Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use http_body_util::BodyExt as _;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use tower::ServiceExt as _;

use crate::admin::ConsoleCaller;
use crate::admin::types::{
    Dependencies, ErrorBody, ReplicaList, Revocation, RevocationList, RevocationStatus, SidecarList,
};
use crate::auth::{Caller, Role};
use crate::state::ControlPlaneState;
use session::Signed;

/// What the console needs: the control plane, and the admin API to call.
pub struct ConsoleState {
    pub cp: Arc<ControlPlaneState>,
    /// The admin router, called in-process.
    api: Router,
    /// Cookies get `Secure` (the admin port serves TLS).
    secure: bool,
    /// The admin API's limiter of calls without a valid token: a sign-in
    /// with a wrong token counts against its address the same way.
    limiter: Arc<crate::unauthenticated::FailureLimiter>,
    /// Ends the live streams when the control plane stops (the browser
    /// reconnects to whichever answers next).
    shutdown: tokio::sync::watch::Receiver<bool>,
}

/// The console's routes, to merge into the admin router.
pub fn router(
    cp: Arc<ControlPlaneState>,
    api: Router,
    secure: bool,
    limiter: Arc<crate::unauthenticated::FailureLimiter>,
    shutdown: tokio::sync::watch::Receiver<bool>,
) -> Router {
    let state = Arc::new(ConsoleState {
        cp,
        api,
        secure,
        limiter,
        shutdown,
    });
    Router::new()
        .route("/console", get(home))
        .route("/console/", get(home))
        .route("/console/sign-in", get(sign_in_page).post(sign_in))
        .route("/console/sign-out", post(sign_out))
        .route("/console/fleet", get(fleet))
        .route("/console/revocations", get(revocations))
        .route("/console/revocations/{id}", get(revocation))
        .route("/console/revocations/{id}/live", get(live))
        .route("/console/revocations/{id}/restore", post(restore))
        .route("/console/revoke", get(revoke_form).post(revoke_preview))
        .route("/console/revoke/confirm", post(revoke_confirm))
        .route("/console/map", get(map))
        .route("/console/usage", get(usage))
        .route("/console/tokens", get(tokens_page).post(create_token))
        .route("/console/leaked", get(leaked))
        .route("/console/leaked/{id}", get(leaked_status))
        .route("/console/stripped", get(stripped))
        .route("/console/audit", get(audit))
        .route("/console/missions", get(missions))
        .route("/console/missions/{id}", get(mission))
        .route("/console/missions/{id}/evidence", get(evidence))
        .route("/console/assets/console.css", get(css))
        .route("/console/assets/console.js", get(js))
        .layer(middleware::from_fn(security_headers))
        .layer(DefaultBodyLimit::max(16 * 1024))
        .with_state(state)
}

/// Headers on every console answer: no script or style but the console's
/// own, no framing, no referrer to other origins, no caching of pages.
async fn security_headers(req: Request, next: Next) -> Response {
    let mut resp = next.run(req).await;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
             connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    // Same-origin only: Chromium sends `Origin: null` on a form post from a
    // page with `no-referrer`, which the origin check would refuse.
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    if !h.contains_key(header::CACHE_CONTROL) {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    resp
}

/// A page saying the store cannot be read (the console's own reads).
fn unavailable(e: &crate::store::StoreError) -> Response {
    tracing::error!(error = %e, "console: store error");
    (
        StatusCode::SERVICE_UNAVAILABLE,
        Html(
            pages::message(
                "Unavailable",
                "The store cannot be read; try again shortly.",
            )
            .into_string(),
        ),
    )
        .into_response()
}

/// An admin API call's refusal, as the page shows it.
#[derive(Debug)]
pub struct Refusal {
    pub status: StatusCode,
    pub body: ErrorBody,
}

impl ConsoleState {
    /// `GET path` of the admin API as `s`.
    async fn get<T: DeserializeOwned>(
        &self,
        s: &Signed,
        peer: SocketAddr,
        path: &str,
    ) -> Result<T, Refusal> {
        self.call(&s.caller, peer, Method::GET, path, None).await
    }

    /// Calls the admin API in-process as `caller` (the same handler, role
    /// check and audit entry as the CLI's call).
    async fn call<T: DeserializeOwned>(
        &self,
        caller: &Caller,
        peer: SocketAddr,
        method: Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<T, Refusal> {
        let mut req = axum::http::Request::builder().method(method).uri(path);
        if body.is_some() {
            req = req.header(header::CONTENT_TYPE, "application/json");
        }
        let body = body.map_or_else(Body::empty, |b| Body::from(b.to_string()));
        let internal = |message: String| Refusal {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            body: ErrorBody {
                error: "internal".into(),
                message,
            },
        };
        let mut req = req.body(body).map_err(|e| internal(e.to_string()))?;
        req.extensions_mut().insert(ConsoleCaller(caller.clone()));
        req.extensions_mut().insert(ConnectInfo(peer));
        let resp = self
            .api
            .clone()
            .oneshot(req)
            .await
            .map_err(|e| internal(e.to_string()))?;
        let status = resp.status();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| internal(e.to_string()))?
            .to_bytes();
        if status.is_success() {
            serde_json::from_slice(&bytes).map_err(|e| internal(e.to_string()))
        } else {
            let body = serde_json::from_slice(&bytes).unwrap_or_else(|_| ErrorBody {
                error: "internal".into(),
                message: String::from_utf8_lossy(&bytes).into_owned(),
            });
            Err(Refusal { status, body })
        }
    }
}

/// A refusal shown as a page of its own.
impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        (
            self.status,
            Html(pages::message(&self.body.error, &self.body.message).into_string()),
        )
            .into_response()
    }
}

/// The refusal of a form post that is not the session's own (a wrong or
/// missing CSRF value, or another origin); None for one that is.
fn foreign_post(s: &Signed, headers: &axum::http::HeaderMap, csrf: &str) -> Option<Response> {
    let host = headers.get(header::HOST).and_then(|v| v.to_str().ok());
    let origin = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok());
    let cross_origin = match (origin, host) {
        (Some(o), Some(h)) => o.split_once("://").map(|(_, rest)| rest) != Some(h),
        (Some(_), None) => true,
        (None, _) => false,
    };
    if cross_origin || !s.csrf_ok(csrf) {
        return Some((
            StatusCode::FORBIDDEN,
            Html(
                pages::message(
                    "Refused",
                    "This form did not come from your console session (missing or wrong CSRF token, or another origin).",
                )
                .into_string(),
            ),
        )
            .into_response());
    }
    None
}

async fn home() -> Redirect {
    Redirect::to("/console/fleet")
}

#[derive(Deserialize)]
struct Why {
    why: Option<String>,
}

async fn sign_in_page(Query(q): Query<Why>) -> Html<String> {
    let why = match q.why.as_deref() {
        Some("expired") => Some("Your session expired. Sign in again."),
        Some("signed-out") => Some("That session was signed out. Sign in again."),
        Some("token-gone") => Some("The token of that session no longer exists."),
        Some("unknown") => Some("That session is not known here. Sign in again."),
        _ => None,
    };
    Html(pages::sign_in(why, None).into_string())
}

#[derive(Deserialize)]
struct SignInForm {
    token: String,
}

/// Exchanges a token for a session. A wrong token counts against the
/// address like a call without a valid token to the API (past the
/// allowance: 429 with `Retry-After`), and is summarised in the audit log
/// the same way; a valid token is never refused.
async fn sign_in(
    State(state): State<Arc<ConsoleState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Form(f): Form<SignInForm>,
) -> Response {
    let token = zeroize::Zeroizing::new(f.token);
    match crate::auth::authenticate_token(&state.cp.store, &token).await {
        Ok((caller, token_id)) => match session::open(&state, &token_id).await {
            Ok(secret) => {
                tracing::info!(actor = %caller.actor, "console session opened");
                let mut resp = Redirect::to("/console/fleet").into_response();
                resp.headers_mut().insert(
                    header::SET_COOKIE,
                    session::set_cookie(Some(&secret), state.secure),
                );
                resp
            }
            Err(e) => unavailable(&e),
        },
        Err(crate::auth::AuthError::Store(e)) => unavailable(&e),
        Err(_) => {
            let resp = match state.limiter.failed(peer.ip()) {
                Some(left) => {
                    let secs = left.as_secs() + 1;
                    let text =
                        format!("Too many wrong tokens from your address; try again in {secs} s.");
                    let mut r = (
                        StatusCode::TOO_MANY_REQUESTS,
                        Html(pages::sign_in(None, Some(&text)).into_string()),
                    )
                        .into_response();
                    r.headers_mut().insert(header::RETRY_AFTER, secs.into());
                    r
                }
                None => (
                    StatusCode::UNAUTHORIZED,
                    Html(pages::sign_in(None, Some("That token is not valid.")).into_string()),
                )
                    .into_response(),
            };
            state.cp.refused.record(
                peer.ip(),
                "POST",
                "/console/sign-in",
                resp.status().as_u16(),
            );
            resp
        }
    }
}

#[derive(Deserialize)]
struct CsrfForm {
    #[serde(default)]
    csrf: String,
}

async fn sign_out(
    State(state): State<Arc<ConsoleState>>,
    s: Signed,
    headers: axum::http::HeaderMap,
    Form(f): Form<CsrfForm>,
) -> Response {
    if let Some(r) = foreign_post(&s, &headers, &f.csrf) {
        return r;
    }
    if let Err(e) = state
        .cp
        .store
        .end_console_session(&s.id_sha256, crate::store::now_ms())
        .await
    {
        return unavailable(&e);
    }
    tracing::info!(actor = %s.caller.actor, "console session signed out");
    let mut resp = Redirect::to("/console/sign-in").into_response();
    resp.headers_mut()
        .insert(header::SET_COOKIE, session::set_cookie(None, state.secure));
    resp
}

async fn fleet(
    State(state): State<Arc<ConsoleState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    s: Signed,
) -> Result<Html<String>, Refusal> {
    let sidecars: SidecarList = state.get(&s, peer, "/v1/sidecars").await?;
    let replicas: ReplicaList = state.get(&s, peer, "/v1/replicas").await?;
    let stale_after_ms = i64::try_from(state.cp.sync_limit.as_millis()).unwrap_or(i64::MAX);
    Ok(Html(
        pages::fleet(&s, &sidecars, &replicas, stale_after_ms).into_string(),
    ))
}

#[derive(Deserialize)]
struct ListQuery {
    #[serde(default)]
    all: bool,
}

async fn revocations(
    State(state): State<Arc<ConsoleState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    s: Signed,
    Query(q): Query<ListQuery>,
) -> Result<Html<String>, Refusal> {
    let path = if q.all {
        "/v1/revocations?all=true"
    } else {
        "/v1/revocations"
    };
    let list: RevocationList = state.get(&s, peer, path).await?;
    Ok(Html(pages::revocations(&s, &list, q.all).into_string()))
}

async fn revocation(
    State(state): State<Arc<ConsoleState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    s: Signed,
    Path(id): Path<String>,
) -> Result<Html<String>, Refusal> {
    let path = format!("/v1/revocations/{}", encode(&id));
    let status: RevocationStatus = state.get(&s, peer, &path).await?;
    Ok(Html(pages::revocation(&s, &status).into_string()))
}

/// One path segment, percent-encoded.
fn encode(segment: &str) -> String {
    percent_encoding::utf8_percent_encode(segment, percent_encoding::NON_ALPHANUMERIC).to_string()
}

/// The propagation of one revocation, live: an `ack` event for each
/// acknowledgement as it is recorded, and `state` with the counts. The
/// browser's `EventSource` reconnects by itself (a restarted control plane)
/// and is sent everything again.
async fn live(
    State(state): State<Arc<ConsoleState>>,
    _s: Signed,
    Path(id): Path<String>,
) -> Response {
    let stored = match state.cp.store.revocation(&id).await {
        Ok(Some(r)) => r,
        Ok(None) => return (StatusCode::NOT_FOUND, "no such revocation").into_response(),
        Err(e) => return unavailable(&e),
    };
    let seq = stored
        .restored
        .as_ref()
        .map_or(stored.revoke_seq, |r| r.seq);
    let (tx, rx) = tokio::sync::mpsc::channel::<Event>(64);
    let cp = state.cp.clone();
    let mut stop = state.shutdown.clone();
    tokio::spawn(async move {
        let mut sent = std::collections::HashSet::new();
        let mut last_state = String::new();
        loop {
            match crate::sessions::propagation(&cp, seq).await {
                Ok(p) => {
                    for a in &p.acknowledged {
                        if sent.insert(a.session_id.clone()) {
                            let data = serde_json::json!({
                                "session_id": a.session_id,
                                "spiffe_id": a.spiffe_id,
                                "version": a.version,
                                "latency_ms": a.latency_ms,
                                "acked_at_ms": a.acked_at_ms,
                            });
                            if tx
                                .send(Event::default().event("ack").data(data.to_string()))
                                .await
                                .is_err()
                            {
                                return;
                            }
                        }
                    }
                    let now = serde_json::json!({
                        "connected": p.connected,
                        "acknowledged": p.acknowledged.len(),
                        "pending": p.pending.len(),
                    })
                    .to_string();
                    if now != last_state {
                        if tx
                            .send(Event::default().event("state").data(now.clone()))
                            .await
                            .is_err()
                        {
                            return;
                        }
                        last_state = now;
                    }
                }
                Err(e) => tracing::warn!(error = %e, "console: cannot read propagation"),
            }
            tokio::select! {
                () = tokio::time::sleep(Duration::from_millis(250)) => {}
                () = leash_api::process::stopped(&mut stop) => return,
            }
            if tx.is_closed() {
                return;
            }
        }
    });
    let stream =
        tokio_stream::StreamExt::map(tokio_stream::wrappers::ReceiverStream::new(rx), |e| {
            Ok::<_, std::convert::Infallible>(e)
        });
    Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response()
}

#[derive(Deserialize)]
struct RestoreForm {
    #[serde(default)]
    csrf: String,
    reason: String,
}

async fn restore(
    State(state): State<Arc<ConsoleState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    s: Signed,
    headers: axum::http::HeaderMap,
    Path(id): Path<String>,
    Form(f): Form<RestoreForm>,
) -> Response {
    if let Some(r) = foreign_post(&s, &headers, &f.csrf) {
        return r;
    }
    let path = format!("/v1/revocations/{}/restore", encode(&id));
    let body = serde_json::json!({ "reason": f.reason });
    match state
        .call::<Revocation>(&s.caller, peer, Method::POST, &path, Some(body))
        .await
    {
        Ok(r) => Redirect::to(&format!("/console/revocations/{}", encode(&r.id))).into_response(),
        Err(r) => r.into_response(),
    }
}

/// What a responder asks to revoke, as the form sends it.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct RevokeForm {
    #[serde(default)]
    pub csrf: String,
    #[serde(default)]
    pub kind: String,
    #[serde(default)]
    pub workload: String,
    #[serde(default)]
    pub upstream: String,
    #[serde(default)]
    pub credential_id: String,
    #[serde(default)]
    pub reason: String,
}

impl RevokeForm {
    fn request(&self) -> serde_json::Value {
        serde_json::json!({
            "kind": self.kind,
            "workload": self.workload.trim(),
            "upstream": self.upstream.trim(),
            "credential_id": self.credential_id.trim(),
            "reason": self.reason,
        })
    }
}

async fn revoke_form(s: Signed, Query(prefill): Query<RevokeForm>) -> Response {
    if s.caller.role < Role::Responder {
        return Refusal {
            status: StatusCode::FORBIDDEN,
            body: ErrorBody {
                error: "forbidden".into(),
                message: "revoking needs a responder token".into(),
            },
        }
        .into_response();
    }
    Html(pages::revoke_form(&s, &prefill, None).into_string()).into_response()
}

/// Step one: who will break. The usage of what is about to be revoked
/// (workloads, requests, last use over 30 days), then a confirmation.
/// Malformed input is caught here, next to its field, before anything.
async fn revoke_preview(
    State(state): State<Arc<ConsoleState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    s: Signed,
    headers: axum::http::HeaderMap,
    Form(f): Form<RevokeForm>,
) -> Response {
    if let Some(r) = foreign_post(&s, &headers, &f.csrf) {
        return r;
    }
    if let Err(field_error) = validate(&f) {
        return (
            StatusCode::BAD_REQUEST,
            Html(pages::revoke_form(&s, &f, Some(field_error)).into_string()),
        )
            .into_response();
    }
    let mut path = "/v1/usage/dependencies?since=30d".to_owned();
    if f.kind == "credential" {
        path.push_str(&format!("&credential={}", encode(f.credential_id.trim())));
    }
    let deps: Dependencies = match state.get(&s, peer, &path).await {
        Ok(d) => d,
        Err(r) => return r.into_response(),
    };
    let breaks = map::affected(&f, &deps.edges);
    Html(pages::revoke_confirm(&s, &f, &breaks).into_string()).into_response()
}

/// The fields a kind needs, and a workload that parses: the error names the
/// field it belongs to.
fn validate(f: &RevokeForm) -> Result<(), (&'static str, String)> {
    let workload = f.workload.trim();
    let needs_workload = matches!(f.kind.as_str(), "grant" | "workload");
    let needs_upstream = matches!(f.kind.as_str(), "grant" | "upstream");
    if !matches!(
        f.kind.as_str(),
        "credential" | "grant" | "workload" | "upstream"
    ) {
        return Err(("kind", "choose what to revoke".into()));
    }
    if needs_workload {
        if workload.is_empty() {
            return Err((
                "workload",
                "a SPIFFE ID (or a prefix ending in /*) is required".into(),
            ));
        }
        leash_api::policy::WorkloadMatcher::parse(workload).map_err(|e| ("workload", e))?;
    }
    if needs_upstream && f.upstream.trim().is_empty() {
        return Err(("upstream", "an upstream name is required".into()));
    }
    if f.kind == "credential" && f.credential_id.trim().is_empty() {
        return Err(("credential_id", "a credential id is required".into()));
    }
    if f.reason.trim().is_empty() {
        return Err(("reason", "say why (it goes in the audit log)".into()));
    }
    Ok(())
}

/// Step two: the same `POST /v1/revocations` the CLI makes. The API's
/// refusal is shown next to the field it names.
async fn revoke_confirm(
    State(state): State<Arc<ConsoleState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    s: Signed,
    headers: axum::http::HeaderMap,
    Form(f): Form<RevokeForm>,
) -> Response {
    if let Some(r) = foreign_post(&s, &headers, &f.csrf) {
        return r;
    }
    match state
        .call::<Revocation>(
            &s.caller,
            peer,
            Method::POST,
            "/v1/revocations",
            Some(f.request()),
        )
        .await
    {
        Ok(r) => Redirect::to(&format!("/console/revocations/{}", encode(&r.id))).into_response(),
        Err(r) => {
            let field = ["workload", "upstream", "credential_id", "reason", "kind"]
                .into_iter()
                .find(|field| r.body.message.contains(field))
                .unwrap_or("kind");
            (
                r.status,
                Html(pages::revoke_form(&s, &f, Some((field, r.body.message))).into_string()),
            )
                .into_response()
        }
    }
}

#[derive(Deserialize)]
struct MapQuery {
    since: Option<String>,
}

async fn map(
    State(state): State<Arc<ConsoleState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    s: Signed,
    Query(q): Query<MapQuery>,
) -> Result<Html<String>, Refusal> {
    let since = q.since.unwrap_or_else(|| "7d".into());
    let path = format!("/v1/usage/dependencies?since={}", encode(&since));
    let deps: Dependencies = state.get(&s, peer, &path).await?;
    let revoked: RevocationList = state.get(&s, peer, "/v1/revocations").await?;
    let svg = map::svg(&deps.edges, &revoked.revocations);
    Ok(Html(pages::map(&s, &since, svg).into_string()))
}

async fn tokens_page(s: Signed) -> Html<String> {
    Html(pages::tokens(&s, None, None).into_string())
}

#[derive(Deserialize)]
struct TokenForm {
    #[serde(default)]
    csrf: String,
    name: String,
    role: String,
}

/// `POST /v1/tokens` (admin): the new token is on the answer page only.
async fn create_token(
    State(state): State<Arc<ConsoleState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    s: Signed,
    headers: axum::http::HeaderMap,
    Form(f): Form<TokenForm>,
) -> Response {
    if let Some(r) = foreign_post(&s, &headers, &f.csrf) {
        return r;
    }
    let body = serde_json::json!({ "name": f.name, "role": f.role });
    match state
        .call::<crate::admin::types::TokenCreated>(
            &s.caller,
            peer,
            Method::POST,
            "/v1/tokens",
            Some(body),
        )
        .await
    {
        Ok(created) => Html(pages::tokens(&s, Some(&created), None).into_string()).into_response(),
        Err(r) => (
            r.status,
            Html(pages::tokens(&s, None, Some(&r.body.message)).into_string()),
        )
            .into_response(),
    }
}

async fn usage(
    State(state): State<Arc<ConsoleState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    s: Signed,
    Query(q): Query<MapQuery>,
) -> Result<Html<String>, Refusal> {
    let since = q.since.unwrap_or_else(|| "1d".into());
    let path = format!("/v1/usage/timeline?since={}", encode(&since));
    let timeline = state.get(&s, peer, &path).await?;
    Ok(Html(pages::usage(&s, &since, &timeline).into_string()))
}

async fn leaked(
    State(state): State<Arc<ConsoleState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    s: Signed,
) -> Result<Html<String>, Refusal> {
    let list = state.get(&s, peer, "/v1/leaked").await?;
    Ok(Html(pages::leaked(&s, &list).into_string()))
}

async fn leaked_status(
    State(state): State<Arc<ConsoleState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    s: Signed,
    Path(id): Path<String>,
) -> Result<Html<String>, Refusal> {
    let path = format!("/v1/leaked/{}", encode(&id));
    let status = state.get(&s, peer, &path).await?;
    Ok(Html(pages::leaked_status(&s, &status).into_string()))
}

async fn stripped(
    State(state): State<Arc<ConsoleState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    s: Signed,
) -> Result<Html<String>, Refusal> {
    let report = state.get(&s, peer, "/v1/stripped").await?;
    Ok(Html(pages::stripped(&s, &report).into_string()))
}

#[derive(Deserialize)]
struct AuditPageQuery {
    #[serde(default)]
    verify: bool,
}

/// The audit log (admin tokens: the API refuses the others), and the
/// chain's verification on request.
async fn audit(
    State(state): State<Arc<ConsoleState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    s: Signed,
    Query(q): Query<AuditPageQuery>,
) -> Result<Html<String>, Refusal> {
    let log = state.get(&s, peer, "/v1/audit?limit=200").await?;
    let verdict = if q.verify {
        Some(state.get(&s, peer, "/v1/audit/verify").await?)
    } else {
        None
    };
    Ok(Html(pages::audit(&s, &log, verdict.as_ref()).into_string()))
}

async fn missions(
    State(state): State<Arc<ConsoleState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    s: Signed,
) -> Result<Html<String>, Refusal> {
    let list = state.get(&s, peer, "/v1/missions").await?;
    Ok(Html(pages::missions(&s, &list).into_string()))
}

async fn mission(
    State(state): State<Arc<ConsoleState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    s: Signed,
    Path(id): Path<String>,
) -> Result<Html<String>, Refusal> {
    let path = format!("/v1/missions/{}", encode(&id));
    let view = state.get(&s, peer, &path).await?;
    Ok(Html(pages::mission(&s, &view).into_string()))
}

/// The mission's signed evidence, as a file to keep
/// (`leashctl evidence verify` checks it).
async fn evidence(
    State(state): State<Arc<ConsoleState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    s: Signed,
    Path(id): Path<String>,
) -> Result<Response, Refusal> {
    let path = format!("/v1/missions/{}/evidence", encode(&id));
    let bundle: serde_json::Value = state.get(&s, peer, &path).await?;
    let name = format!(
        "attachment; filename=\"leash-evidence-{}.json\"",
        id.chars()
            .filter(char::is_ascii_alphanumeric)
            .collect::<String>()
    );
    let mut resp = (
        [(header::CONTENT_TYPE, "application/json")],
        bundle.to_string(),
    )
        .into_response();
    if let Ok(v) = HeaderValue::from_str(&name) {
        resp.headers_mut().insert(header::CONTENT_DISPOSITION, v);
    }
    Ok(resp)
}

async fn css() -> Response {
    asset(
        "text/css; charset=utf-8",
        include_str!("../../console/console.css"),
    )
}

async fn js() -> Response {
    asset(
        "text/javascript; charset=utf-8",
        include_str!("../../console/console.js"),
    )
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "max-age=300"),
        ],
        body,
    )
        .into_response()
}
