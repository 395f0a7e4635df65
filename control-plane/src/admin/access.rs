//! Who may call the `/v1` API: the middleware that authenticates every call
//! (a valid token first; calls without one counted per address by the
//! limiter and audited as bounded summaries) and writes it to the audit log,
//! and the role extractors (`Viewer`, `Responder`, `AdminRole`) that
//! handlers name in their signatures.

use std::sync::atomic::Ordering;

use axum::extract::{ConnectInfo, FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::{AdminState, ApiError, AuditDetail};
use crate::auth::{self, AuthError, Caller, Role};
use crate::store::{AuditEntry, now_ms};

/// The answer to a call without a valid token (an admin token, or a poll
/// stream's): `401`, or `429` once its address is past the allowance of
/// failures. Counted for the audit log's summary of refused calls.
pub(super) fn unauthenticated(
    s: &AdminState,
    ip: std::net::IpAddr,
    method: &str,
    path: &str,
    why: String,
) -> Response {
    let refused = match s.limiter.failed(ip) {
        Some(left) => {
            let secs = left.as_secs() + 1;
            let mut r = ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_failures",
                format!("too many calls without a valid token from {ip}; try again in {secs} s"),
            )
            .into_response();
            if let Ok(v) = header::HeaderValue::from_str(&secs.to_string()) {
                r.headers_mut().insert(header::RETRY_AFTER, v);
            }
            r
        }
        None => {
            let mut r =
                ApiError::new(StatusCode::UNAUTHORIZED, "unauthenticated", why).into_response();
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
            r
        }
    };
    s.cp.refused
        .record(ip, method, path, refused.status().as_u16());
    refused
}

/// A call the web console makes in-process on behalf of a signed-in
/// session: authenticated as the session's token, audited like any other.
#[derive(Clone)]
pub struct ConsoleCaller(pub Caller);

/// Authenticates every `/v1` call and writes it to the audit log, whatever
/// the outcome (refused calls included).
pub(super) async fn audited(
    State(s): State<AdminState>,
    ConnectInfo(peer): ConnectInfo<std::net::SocketAddr>,
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
    // The console's own calls, made in-process for a signed-in session
    // (a request extension: nothing from the network can set it).
    let console = req.extensions_mut().remove::<ConsoleCaller>();
    let authenticated = match console {
        Some(ConsoleCaller(caller)) => Ok(caller),
        None => auth::authenticate(&s.cp.store, authorization.as_deref()).await,
    };
    let (actor, role, response) = match authenticated {
        Ok(caller) => {
            let (actor, role) = (caller.actor.clone(), caller.role.as_str());
            req.extensions_mut().insert(caller);
            (actor, role, next.run(req).await)
        }
        Err(e @ (AuthError::Missing | AuthError::Invalid)) => {
            let refused = unauthenticated(&s, peer.ip(), &method, &path, e.to_string());
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

/// The authenticated caller if its role is at least `role`.
fn authorize(parts: &Parts, role: Role) -> Result<Caller, ApiError> {
    // `audited` puts the caller there before any handler runs; a route
    // outside it has no caller, and is refused rather than trusted.
    let Some(caller) = parts.extensions.get::<Caller>() else {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthenticated",
            AuthError::Missing.to_string(),
        ));
    };
    if caller.role >= role {
        Ok(caller.clone())
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

/// Defines an extractor that admits callers with at least one role.
macro_rules! role_extractor {
    ($(#[$doc:meta])* $name:ident, $role:expr) => {
        $(#[$doc])*
        pub struct $name(pub Caller);

        impl<S: Send + Sync> FromRequestParts<S> for $name {
            type Rejection = ApiError;

            async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
                authorize(parts, $role).map(Self)
            }
        }
    };
}

role_extractor!(
    /// A caller with the viewer role or above: reads.
    Viewer,
    Role::Viewer
);
role_extractor!(
    /// A caller with the responder role or above: revoke, restore, register leaks.
    Responder,
    Role::Responder
);
role_extractor!(
    /// A caller with the admin role: secrets, tokens, the audit log, logging, config.
    AdminRole,
    Role::Admin
);
