//! The Leash control plane: loads policy, issues short-lived credentials to
//! sidecars over SPIFFE mTLS, publishes the JWKS, and (as a dev tool) serves
//! SPIFFE identities from a local CA.
#![warn(clippy::unwrap_used, clippy::expect_used)]

pub mod admin;
pub mod app;
pub mod devid;
pub mod jwt;
pub mod mtls;
pub mod sidecar_api;
pub mod state;
pub mod store;

/// Resolves when the process is asked to stop (Ctrl-C or SIGTERM).
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

/// Sets up `tracing` output: `text` (default) or `json`, filtered by `RUST_LOG`.
pub fn init_logging(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}
