//! Where a process gets its X.509-SVID: the SPIFFE Workload API (SPIRE in
//! production), or SVID files on disk that are re-read when they change.
//!
//! Either way the result is a `spiffe::X509Source`, so the TLS code built on
//! it (`spiffe-rustls`) follows rotation the same way. Files are served to
//! the process's own source over a private Workload API socket.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivatePkcs8KeyDer};
use spiffe::X509Source;
use tokio::sync::watch;

use crate::workload::{X509svid, X509svidResponse};

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error(
        "no identity configured: set SPIFFE_ENDPOINT_SOCKET (or --spiffe-endpoint), or give --svid-cert, --svid-key and --svid-bundle"
    )]
    NoEndpoint,
    #[error("Workload API at {endpoint}: {source}")]
    Source {
        endpoint: String,
        source: spiffe::X509SourceError,
    },
    #[error("SVID file {path}: {reason}")]
    File { path: PathBuf, reason: String },
    #[error("cannot serve SVID files: {0}")]
    Io(#[from] std::io::Error),
}

/// PEM files of an X.509-SVID: the certificate chain (leaf first), its
/// PKCS#8 private key, and the trust bundle (CA certificates).
#[derive(Debug, Clone)]
pub struct SvidFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub bundle: PathBuf,
}

#[derive(Debug, Clone)]
pub enum IdentityConfig {
    /// `unix:///path`, `unix:/path`, a bare `/path`, or `tcp://ip:port`.
    WorkloadApi(String),
    Files(SvidFiles),
    /// A source owned by the embedding program (several sidecar links in one
    /// process, as the propagation benchmark runs them); never shut down here.
    Shared(X509Source),
}

impl IdentityConfig {
    /// From the usual flags: an endpoint, or all three files.
    pub fn from_flags(
        endpoint: Option<String>,
        cert: Option<PathBuf>,
        key: Option<PathBuf>,
        bundle: Option<PathBuf>,
    ) -> Result<Self, IdentityError> {
        match (endpoint.filter(|e| !e.is_empty()), cert, key, bundle) {
            (_, Some(cert), Some(key), Some(bundle)) => {
                Ok(Self::Files(SvidFiles { cert, key, bundle }))
            }
            (Some(endpoint), None, None, None) => Ok(Self::WorkloadApi(endpoint)),
            _ => Err(IdentityError::NoEndpoint),
        }
    }
}

/// A live identity. Dropping it stops the private server of file mode.
pub struct Identity {
    pub source: X509Source,
    _files: Option<FilesServer>,
    shared: bool,
}

impl Identity {
    /// Shuts the source down, unless it belongs to someone else.
    pub async fn shutdown(&self) {
        if !self.shared {
            self.source.shutdown().await;
        }
    }
}

struct FilesServer {
    stop: watch::Sender<bool>,
    _dir: tempfile::TempDir,
}

impl Drop for FilesServer {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

/// Connects the configured identity, waiting at most `initial_sync` for the first SVID.
pub async fn connect(
    config: &IdentityConfig,
    initial_sync: Duration,
) -> Result<Identity, IdentityError> {
    match config {
        IdentityConfig::WorkloadApi(endpoint) => Ok(Identity {
            source: x509_source(endpoint, initial_sync).await?,
            _files: None,
            shared: false,
        }),
        IdentityConfig::Shared(source) => Ok(Identity {
            source: source.clone(),
            _files: None,
            shared: true,
        }),
        IdentityConfig::Files(files) => {
            let first = read_svid_files(files)?;
            let dir = tempfile::Builder::new().prefix("leash-svid").tempdir()?;
            let socket = dir.path().join("workload.sock");
            let listener = tokio::net::UnixListener::bind(&socket)?;
            let (tx, rx) = watch::channel(Arc::new(first));
            let (stop, stop_rx) = watch::channel(false);
            crate::workload_server::serve_unix(listener, socket.clone(), rx, None, stop_rx.clone());
            tokio::spawn(watch_files(files.clone(), tx, stop_rx));
            let source = x509_source(&format!("unix://{}", socket.display()), initial_sync).await?;
            Ok(Identity {
                source,
                _files: Some(FilesServer { stop, _dir: dir }),
                shared: false,
            })
        }
    }
}

/// Re-reads the files when any of them changes. A half-written set (during
/// rotation by another tool) fails to parse and is retried on the next tick;
/// the last good SVID stays in use meanwhile.
async fn watch_files(
    files: SvidFiles,
    tx: watch::Sender<Arc<X509svidResponse>>,
    mut stop: watch::Receiver<bool>,
) {
    let stamp = |f: &SvidFiles| -> Vec<Option<SystemTime>> {
        [&f.cert, &f.key, &f.bundle]
            .iter()
            .map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
            .collect()
    };
    let mut last = stamp(&files);
    let mut pending = false;
    loop {
        tokio::select! {
            () = tokio::time::sleep(Duration::from_millis(500)) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        let now = stamp(&files);
        if now == last && !pending {
            continue;
        }
        last = now;
        match read_svid_files(&files) {
            Ok(next) => {
                pending = false;
                if **tx.borrow() != next {
                    tracing::info!(cert = %files.cert.display(), "SVID files changed; identity reloaded");
                    tx.send_replace(Arc::new(next));
                }
            }
            Err(e) => {
                pending = true;
                tracing::warn!(error = %e, "SVID files unreadable; keeping the current SVID");
            }
        }
    }
}

fn file_error(path: &Path, reason: impl std::fmt::Display) -> IdentityError {
    IdentityError::File {
        path: path.to_owned(),
        reason: reason.to_string(),
    }
}

fn read_certs(path: &Path) -> Result<Vec<u8>, IdentityError> {
    let pem = std::fs::read(path).map_err(|e| file_error(path, e))?;
    let mut der = Vec::new();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        der.extend_from_slice(cert.map_err(|e| file_error(path, e))?.as_ref());
    }
    if der.is_empty() {
        return Err(file_error(path, "no CERTIFICATE block"));
    }
    Ok(der)
}

/// Reads the three PEM files into the Workload API's encoding.
pub fn read_svid_files(files: &SvidFiles) -> Result<X509svidResponse, IdentityError> {
    let chain = read_certs(&files.cert)?;
    let bundle = read_certs(&files.bundle)?;
    let key = PrivatePkcs8KeyDer::from_pem_file(&files.key).map_err(|e| {
        file_error(
            &files.key,
            format!("{e} (a PKCS#8 \"PRIVATE KEY\" PEM block is required)"),
        )
    })?;
    let leaf = CertificateDer::pem_file_iter(&files.cert)
        .map_err(|e| file_error(&files.cert, e))?
        .next()
        .ok_or_else(|| file_error(&files.cert, "empty"))?
        .map_err(|e| file_error(&files.cert, e))?;
    let spiffe_id = spiffe::cert::spiffe_id_from_der(leaf.as_ref())
        .map_err(|e| file_error(&files.cert, format!("leaf is not an X.509-SVID: {e}")))?;
    Ok(X509svidResponse {
        svids: vec![X509svid {
            spiffe_id: spiffe_id.to_string(),
            x509_svid: chain,
            x509_svid_key: key.secret_pkcs8_der().to_vec(),
            bundle,
            hint: String::new(),
        }],
        crl: Vec::new(),
        federated_bundles: Default::default(),
    })
}

/// Builds an `X509Source` on `endpoint`, waiting at most `initial_sync` for
/// the first SVID.
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
