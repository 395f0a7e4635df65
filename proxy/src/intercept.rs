//! The sidecar's local CA for intercepted `CONNECT` tunnels: generated at
//! start, its private key held in memory only (a restart makes a new one),
//! its certificate written to a file and served at the admin port's
//! `/ca.pem` for the workload's trust store. It mints one short-lived leaf
//! per server name on demand, cached until shortly before it expires.
//!
//! The TLS server side of a tunnel reads the ClientHello first
//! ([`tokio_rustls::LazyConfigAcceptor`]): a hello without SNI, or naming
//! another host than the `CONNECT`, is refused with a TLS alert before any
//! certificate is minted.

use std::sync::Arc;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use time::OffsetDateTime;

/// How long a minted leaf is valid, and how long it is served from the
/// cache (then minted anew, well before it expires).
const LEAF_LIFETIME: Duration = Duration::from_secs(3600);
const LEAF_CACHED: Duration = Duration::from_secs(1800);
/// Server names with a leaf in the cache at once.
const LEAF_CACHE_CAPACITY: u64 = 10_000;
/// The CA outlives any sidecar process it belongs to.
const CA_LIFETIME_DAYS: i64 = 365;

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("generating the interception CA: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("writing the interception CA certificate to {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
}

/// What `CONNECT` tunnels need besides the request path: the CA and TLS
/// settings of intercepted ones, the limits of the connections inside, and
/// the sidecar's stop signal (tunnels close when it stops).
pub struct TunnelConfig {
    pub ca: Arc<LocalCa>,
    pub tls: Arc<rustls::ServerConfig>,
    pub refusing: Arc<rustls::ServerConfig>,
    pub stop: tokio::sync::watch::Receiver<bool>,
    /// Time allowed for the ClientHello and handshake, and for each header
    /// block inside (as on the listener).
    pub header_read_timeout: Duration,
    pub max_header_bytes: usize,
    pub max_headers: usize,
    /// Connecting a passthrough tunnel to its upstream.
    pub connect_timeout: Duration,
    /// Largest WebSocket frame a workload may send (`websocket.rs`).
    pub max_websocket_frame_bytes: u64,
}

impl TunnelConfig {
    pub fn new(
        ca: Arc<LocalCa>,
        stop: tokio::sync::watch::Receiver<bool>,
        header_read_timeout: Duration,
        max_header_bytes: usize,
        max_headers: usize,
        connect_timeout: Duration,
        max_websocket_frame_bytes: u64,
    ) -> Self {
        Self {
            tls: ca.server_config(),
            refusing: LocalCa::refusing_config(),
            ca,
            stop,
            header_read_timeout,
            max_header_bytes,
            max_headers,
            connect_timeout,
            max_websocket_frame_bytes,
        }
    }
}

/// The local CA, and the leaves it has minted.
pub struct LocalCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
    pem: String,
    leaves: moka::sync::Cache<String, Arc<CertifiedKey>>,
}

impl std::fmt::Debug for LocalCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalCa").finish_non_exhaustive()
    }
}

impl LocalCa {
    /// A new CA whose certificate names this sidecar's workload.
    pub fn generate(label: &str) -> Result<Self, CaError> {
        let mut params = CertificateParams::default();
        // Path length 0: it signs leaves, never another CA.
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.distinguished_name.push(
            DnType::CommonName,
            format!("Leash sidecar interception CA ({label})"),
        );
        params
            .distinguished_name
            .push(DnType::OrganizationName, "Leash");
        let now = OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::minutes(5);
        params.not_after = now + time::Duration::days(CA_LIFETIME_DAYS);
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let issuer = CertifiedIssuer::self_signed(params, key)?;
        let pem = issuer.pem();
        Ok(Self {
            issuer,
            pem,
            leaves: moka::sync::Cache::builder()
                .max_capacity(LEAF_CACHE_CAPACITY)
                .time_to_live(LEAF_CACHED)
                .build(),
        })
    }

    /// The CA certificate, PEM.
    pub fn pem(&self) -> &str {
        &self.pem
    }

    /// Writes the CA certificate to `path` (readable by all: it is public),
    /// replacing the file atomically.
    pub fn write_pem(&self, path: &std::path::Path) -> Result<(), CaError> {
        let err = |source| CaError::Write {
            path: path.display().to_string(),
            source,
        };
        let tmp = path.with_extension("pem.tmp");
        std::fs::write(&tmp, self.pem.as_bytes()).map_err(err)?;
        std::fs::rename(&tmp, path).map_err(err)
    }

    /// The leaf for `name` (a DNS name, already checked against the
    /// `CONNECT`), minted on first use.
    pub fn leaf(&self, name: &str) -> Result<Arc<CertifiedKey>, rcgen::Error> {
        let name = name.to_ascii_lowercase();
        if let Some(leaf) = self.leaves.get(&name) {
            return Ok(leaf);
        }
        let leaf = Arc::new(self.mint(&name)?);
        self.leaves.insert(name, leaf.clone());
        Ok(leaf)
    }

    fn mint(&self, name: &str) -> Result<CertifiedKey, rcgen::Error> {
        let mut params = CertificateParams::new(vec![name.to_owned()])?;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.distinguished_name.push(DnType::CommonName, name);
        let now = OffsetDateTime::now_utc();
        // Back-dated a little for clients whose clock is slightly behind.
        params.not_before = now - time::Duration::minutes(1);
        params.not_after = now + LEAF_LIFETIME;
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let cert = params.signed_by(&key, &self.issuer)?;
        let chain = vec![cert.der().clone(), self.issuer.der().clone()];
        let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let signing = rustls::crypto::ring::sign::any_supported_type(&key_der)
            .map_err(|_| rcgen::Error::CouldNotParseKeyPair)?;
        Ok(CertifiedKey::new(chain, signing))
    }

    /// The TLS server configuration of intercepted tunnels: the leaf for
    /// the hello's server name, HTTP/2 and HTTP/1.1 by ALPN.
    pub fn server_config(self: &Arc<Self>) -> Arc<rustls::ServerConfig> {
        let mut config = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(Minting(self.clone())));
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Arc::new(config)
    }

    /// A configuration that resolves no certificate: the handshake ends
    /// with a TLS alert (a refused hello).
    pub fn refusing_config() -> Arc<rustls::ServerConfig> {
        Arc::new(
            rustls::ServerConfig::builder()
                .with_no_client_auth()
                .with_cert_resolver(Arc::new(Refusing)),
        )
    }

    /// The CA certificate, DER (tests).
    pub fn der(&self) -> &CertificateDer<'static> {
        self.issuer.der()
    }
}

#[derive(Debug)]
struct Minting(Arc<LocalCa>);

impl ResolvesServerCert for Minting {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let name = hello.server_name()?;
        match self.0.leaf(name) {
            Ok(leaf) => Some(leaf),
            Err(e) => {
                tracing::warn!(error = %e, server_name = name, "could not mint an interception certificate");
                None
            }
        }
    }
}

#[derive(Debug)]
struct Refusing;

impl ResolvesServerCert for Refusing {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leaves_chain_to_the_ca_and_are_cached_per_name() {
        use rustls::client::danger::ServerCertVerifier as _;
        let ca = LocalCa::generate("test").unwrap();
        let a = ca.leaf("API.example.com").unwrap();
        let b = ca.leaf("api.example.com").unwrap();
        assert!(Arc::ptr_eq(&a, &b), "one leaf per name, case-insensitively");
        assert_eq!(a.cert.len(), 2, "leaf then CA");
        assert_eq!(a.cert[1], *ca.der());
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.der().clone()).unwrap();
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            Arc::new(rustls::crypto::ring::default_provider()),
        )
        .build()
        .unwrap();
        let name = rustls::pki_types::ServerName::try_from("api.example.com").unwrap();
        let now = rustls::pki_types::UnixTime::now();
        verifier
            .verify_server_cert(&a.cert[0], &a.cert[1..], &name, &[], now)
            .expect("the leaf verifies for its name under the CA");
        let other = rustls::pki_types::ServerName::try_from("other.example.com").unwrap();
        assert!(
            verifier
                .verify_server_cert(&a.cert[0], &a.cert[1..], &other, &[], now)
                .is_err(),
            "and for no other name"
        );
    }
}
