//! The dev identity provider: a local CA that issues short-lived X.509-SVIDs
//! and a SPIFFE Workload API server that hands them out over Unix sockets.
//!
//! SPIRE attests a caller by its process; the dev provider attests by socket:
//! each configured socket serves exactly one SPIFFE ID. That keeps it simple
//! and still exercises the real Workload API client path (the `spiffe` crate)
//! in the quickstart and the tests. Production deployments use SPIRE.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use leash_api::workload::{X509svid, X509svidResponse};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};
use spiffe::{SpiffeId, TrustDomain};
use time::OffsetDateTime;
use tokio::sync::watch;

#[derive(Debug, thiserror::Error)]
pub enum DevIdError {
    #[error("invalid SPIFFE ID {0:?}: {1}")]
    SpiffeId(String, spiffe::SpiffeIdError),
    #[error("SPIFFE ID {id} is not in trust domain {trust_domain}")]
    ForeignId { id: String, trust_domain: String },
    #[error("certificate generation failed: {0}")]
    Cert(#[from] rcgen::Error),
    #[error("socket {path}: {source}")]
    Socket {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The key and certificates of one X.509-SVID, in the Workload API's encoding.
#[derive(Clone)]
pub struct SvidMaterial {
    pub spiffe_id: String,
    /// DER certificate chain, leaf first.
    pub chain_der: Vec<u8>,
    pub leaf_der: Vec<u8>,
    /// PKCS#8 DER private key.
    pub key_pkcs8: zeroize::Zeroizing<Vec<u8>>,
    pub not_after: OffsetDateTime,
}

/// A self-signed CA for one trust domain.
pub struct DevCa {
    trust_domain: TrustDomain,
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl DevCa {
    pub fn new(trust_domain: &str) -> Result<Self, DevIdError> {
        let td = TrustDomain::new(trust_domain)
            .map_err(|e| DevIdError::SpiffeId(trust_domain.to_owned(), e))?;
        let mut params = CertificateParams::default();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params
            .distinguished_name
            .push(DnType::CommonName, format!("Leash dev CA for {td}"));
        params.subject_alt_names = vec![SanType::URI(format!("spiffe://{td}").try_into()?)];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::minutes(5);
        params.not_after = now + time::Duration::days(365);
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let issuer = CertifiedIssuer::self_signed(params, key)?;
        Ok(Self {
            trust_domain: td,
            issuer,
        })
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The trust bundle: the CA certificate in DER.
    pub fn bundle_der(&self) -> &[u8] {
        self.issuer.der()
    }

    pub fn bundle_pem(&self) -> String {
        self.issuer.pem()
    }

    /// Issues an X.509-SVID valid from a little before now for `ttl`.
    pub fn issue(&self, spiffe_id: &str, ttl: Duration) -> Result<SvidMaterial, DevIdError> {
        let now = OffsetDateTime::now_utc();
        let ttl = time::Duration::try_from(ttl).unwrap_or(time::Duration::hours(1));
        // Back-date a little so that peers with a slightly slow clock accept it.
        self.issue_between(spiffe_id, now - time::Duration::seconds(30), now + ttl)
    }

    /// Issues an X.509-SVID with an explicit validity window (tests use this
    /// to make expired certificates).
    pub fn issue_between(
        &self,
        spiffe_id: &str,
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> Result<SvidMaterial, DevIdError> {
        let id =
            SpiffeId::new(spiffe_id).map_err(|e| DevIdError::SpiffeId(spiffe_id.to_owned(), e))?;
        if !id.is_member_of(&self.trust_domain) {
            return Err(DevIdError::ForeignId {
                id: spiffe_id.to_owned(),
                trust_domain: self.trust_domain.to_string(),
            });
        }
        let mut params = CertificateParams::default();
        // The X.509-SVID spec: CA=false present, digitalSignature, one URI SAN.
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.subject_alt_names = vec![SanType::URI(id.to_string().try_into()?)];
        params
            .distinguished_name
            .push(DnType::CommonName, id.path());
        params.not_before = not_before;
        params.not_after = not_after;
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let cert = params.signed_by(&key, &self.issuer)?;
        let leaf_der = cert.der().to_vec();
        Ok(SvidMaterial {
            spiffe_id: id.to_string(),
            chain_der: leaf_der.clone(),
            leaf_der,
            key_pkcs8: zeroize::Zeroizing::new(key.serialize_der()),
            not_after,
        })
    }
}

/// One identity served on one socket, re-issued before it expires.
struct ServedIdentity {
    current: watch::Sender<Arc<X509svidResponse>>,
}

/// A Workload API server for a set of (socket, SPIFFE ID) pairs.
pub struct DevIdentityProvider {
    ca: Arc<DevCa>,
    svid_ttl: Duration,
    identities: HashMap<PathBuf, ServedIdentity>,
    /// The trust domain's JWT-SVID key (the JWT half of the Workload API).
    jwt: Option<Arc<leash_api::jwt_svid::JwtSvidAuthority>>,
}

impl DevIdentityProvider {
    pub fn new(ca: DevCa, svid_ttl: Duration) -> Self {
        let jwt = match leash_api::jwt_svid::JwtSvidAuthority::generate(ca.trust_domain().as_ref())
        {
            Ok(a) => Some(Arc::new(a)),
            Err(e) => {
                tracing::warn!(error = %e, "no JWT-SVIDs: the key could not be made");
                None
            }
        };
        Self {
            ca: Arc::new(ca),
            svid_ttl,
            identities: HashMap::new(),
            jwt,
        }
    }

    pub fn ca(&self) -> &Arc<DevCa> {
        &self.ca
    }

    fn response(&self, spiffe_id: &str) -> Result<X509svidResponse, DevIdError> {
        svid_response(&self.ca, spiffe_id, self.svid_ttl)
    }

    /// Binds `socket` and serves `spiffe_id` on it until `shutdown` resolves.
    /// Returns once the socket is listening.
    pub fn serve(
        &mut self,
        socket: &Path,
        spiffe_id: &str,
        shutdown: watch::Receiver<bool>,
    ) -> Result<tokio::task::JoinHandle<()>, DevIdError> {
        let first = self.response(spiffe_id)?;
        let (tx, rx) = watch::channel(Arc::new(first));
        // A stale socket file from a previous run would make bind fail.
        if socket.exists() {
            let _ = std::fs::remove_file(socket);
        }
        let listener =
            tokio::net::UnixListener::bind(socket).map_err(|source| DevIdError::Socket {
                path: socket.to_owned(),
                source,
            })?;
        tracing::info!(socket = %socket.display(), spiffe_id, ttl = ?self.svid_ttl, "serving dev identity");

        // Rotate at half-life, as SPIRE does by default.
        let rotate = RotationTask {
            ca: self.ca.clone(),
            spiffe_id: spiffe_id.to_owned(),
            ttl: self.svid_ttl,
            tx: tx.clone(),
        };
        let mut stop_rotation = shutdown.clone();
        tokio::spawn(async move {
            tokio::select! {
                () = rotate.run() => {}
                _ = stop_rotation.wait_for(|s| *s) => {}
            }
        });
        self.identities
            .insert(socket.to_owned(), ServedIdentity { current: tx });

        Ok(leash_api::workload_server::serve_unix(
            listener,
            socket.to_owned(),
            rx,
            self.jwt.clone(),
            shutdown,
        ))
    }

    /// Re-issues the SVID on `socket` now (tests use this to force rotation).
    pub fn rotate_now(&self, socket: &Path) -> Result<(), DevIdError> {
        if let Some(served) = self.identities.get(socket) {
            let id = served.current.borrow().svids[0].spiffe_id.clone();
            let next = self.response(&id)?;
            served.current.send_replace(Arc::new(next));
        }
        Ok(())
    }
}

fn svid_response(
    ca: &DevCa,
    spiffe_id: &str,
    ttl: Duration,
) -> Result<X509svidResponse, DevIdError> {
    let m = ca.issue(spiffe_id, ttl)?;
    Ok(X509svidResponse {
        svids: vec![X509svid {
            spiffe_id: m.spiffe_id,
            x509_svid: m.chain_der,
            x509_svid_key: m.key_pkcs8.to_vec(),
            bundle: ca.bundle_der().to_vec(),
            hint: String::new(),
        }],
        crl: Vec::new(),
        federated_bundles: HashMap::new(),
    })
}

struct RotationTask {
    ca: Arc<DevCa>,
    spiffe_id: String,
    ttl: Duration,
    tx: watch::Sender<Arc<X509svidResponse>>,
}

impl RotationTask {
    async fn run(self) {
        loop {
            tokio::time::sleep(self.ttl / 2).await;
            match svid_response(&self.ca, &self.spiffe_id, self.ttl) {
                Ok(next) => {
                    self.tx.send_replace(Arc::new(next));
                    tracing::debug!(spiffe_id = %self.spiffe_id, "rotated dev SVID");
                }
                Err(e) => {
                    tracing::error!(spiffe_id = %self.spiffe_id, error = %e, "SVID rotation failed")
                }
            }
        }
    }
}
