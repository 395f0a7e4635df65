//! Connecting to the SPIFFE Workload API, shared by both processes.

use std::time::Duration;

use spiffe::X509Source;

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error(
        "no Workload API endpoint: set SPIFFE_ENDPOINT_SOCKET or pass --spiffe-endpoint (e.g. unix:///run/spire/agent.sock)"
    )]
    NoEndpoint,
    #[error("Workload API at {endpoint}: {source}")]
    Source {
        endpoint: String,
        source: spiffe::X509SourceError,
    },
}

/// Builds an `X509Source` on `endpoint` (`unix:///path`, `unix:/path` or
/// `tcp://ip:port`), waiting at most `initial_sync` for the first SVID.
///
/// The source then follows rotations by itself and reconnects with backoff
/// when the Workload API restarts; it keeps serving the last good SVID meanwhile.
pub async fn x509_source(
    endpoint: &str,
    initial_sync: Duration,
) -> Result<X509Source, IdentityError> {
    if endpoint.is_empty() {
        return Err(IdentityError::NoEndpoint);
    }
    let endpoint = normalize_endpoint(endpoint);
    X509Source::builder()
        .endpoint(&endpoint)
        .initial_sync_timeout(initial_sync)
        .reconnect_backoff(Duration::from_millis(100), Duration::from_secs(5))
        .shutdown_timeout(Some(Duration::from_secs(2)))
        .build()
        .await
        .map_err(|source| IdentityError::Source { endpoint, source })
}

/// A bare path is taken as a Unix socket, as SPIRE's tools do.
pub fn normalize_endpoint(endpoint: &str) -> String {
    if endpoint.starts_with('/') {
        format!("unix://{endpoint}")
    } else {
        endpoint.to_owned()
    }
}

/// Installs ring as the process-wide rustls provider; a second call is a no-op.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
