//! The admin HTTP listener: health, readiness, the public JWKS and metrics.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use spiffe::X509Source;

use crate::state::ControlPlaneState;

/// Counters exported on `/metrics`.
#[derive(Default)]
pub struct Metrics {
    pub credentials_issued: AtomicU64,
    pub issue_denied: AtomicU64,
}

#[derive(Clone)]
pub struct AdminState {
    pub cp: Arc<ControlPlaneState>,
    pub source: X509Source,
    pub metrics: Arc<Metrics>,
}

pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/.well-known/jwks.json", get(jwks))
        .route("/metrics", get(metrics))
        .with_state(state)
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

async fn jwks(State(s): State<AdminState>) -> impl IntoResponse {
    (
        [(header::CACHE_CONTROL, "public, max-age=60")],
        Json(s.cp.issuer.jwks()),
    )
}

async fn metrics(State(s): State<AdminState>) -> impl IntoResponse {
    let m = &s.metrics;
    let body = format!(
        "# HELP leash_cp_credentials_issued_total Credentials issued to sidecars.\n\
         # TYPE leash_cp_credentials_issued_total counter\n\
         leash_cp_credentials_issued_total {}\n\
         # HELP leash_cp_issue_denied_total Issue calls answered with a denial.\n\
         # TYPE leash_cp_issue_denied_total counter\n\
         leash_cp_issue_denied_total {}\n",
        m.credentials_issued.load(Ordering::Relaxed),
        m.issue_denied.load(Ordering::Relaxed),
    );
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body)
}
