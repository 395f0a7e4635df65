//! The control plane's outbound HTTP(S) clients (token endpoints, probes of
//! upstreams): trust anchors are the system's unless an upstream's policy
//! says `ca_only`, plus its `ca_file`; SNI and verification use its
//! `server_name` when set.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

use bytes::Bytes;
use http_body_util::Full;
use hyper_rustls::{FixedServerNameResolver, HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, ServerName};

pub type HttpsClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// How to trust one upstream (its policy's `tls`, with `ca_file` read).
#[derive(Default)]
pub struct Trust<'a> {
    /// PEM certificates trusted besides (or, with `ca_only`, instead of)
    /// the system's.
    pub ca_pem: Option<&'a str>,
    pub ca_only: bool,
    pub server_name: Option<&'a str>,
}

/// The platform's trust anchors, loaded once per process.
fn system_roots() -> &'static [CertificateDer<'static>] {
    static ROOTS: OnceLock<Vec<CertificateDer<'static>>> = OnceLock::new();
    ROOTS.get_or_init(|| {
        let loaded = rustls_native_certs::load_native_certs();
        for e in &loaded.errors {
            tracing::warn!(error = %e, "problem loading system trust anchors");
        }
        loaded.certs
    })
}

/// The system's trust anchors as a root store.
pub fn system_trust() -> rustls::RootCertStore {
    let mut roots = rustls::RootCertStore::empty();
    let (_added, _ignored) = roots.add_parsable_certificates(system_roots().iter().cloned());
    roots
}

/// The trust anchors and server name for one upstream.
pub fn upstream_trust(
    trust: &Trust<'_>,
) -> Result<(rustls::RootCertStore, Option<ServerName<'static>>), String> {
    let mut roots = if trust.ca_only {
        rustls::RootCertStore::empty()
    } else {
        system_trust()
    };
    if let Some(pem) = trust.ca_pem {
        for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
            let cert = cert.map_err(|e| format!("bad CA PEM: {e}"))?;
            roots
                .add(cert)
                .map_err(|e| format!("bad CA certificate: {e}"))?;
        }
    }
    let name = trust
        .server_name
        .map(|n| ServerName::try_from(n.to_owned()).map_err(|e| format!("bad server_name: {e}")))
        .transpose()?;
    Ok((roots, name))
}

/// A client for `http://` and `https://` URLs trusting `roots`, verifying
/// `server_name` (when given) instead of the URL's host.
pub fn client(
    roots: rustls::RootCertStore,
    server_name: Option<ServerName<'static>>,
) -> HttpsClient {
    let tls = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    let builder = HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http();
    let connector = match server_name {
        Some(name) => builder
            .with_server_name_resolver(FixedServerNameResolver::new(name))
            .enable_http1()
            .wrap_connector(http),
        None => builder.enable_http1().wrap_connector(http),
    };
    Client::builder(TokioExecutor::new()).build(connector)
}

/// Clients trusting the system's anchors plus one CA PEM (or none), made
/// once per PEM: for the SSF transmitters and receivers policy names.
#[derive(Default)]
pub struct ClientCache {
    clients: Mutex<HashMap<Option<String>, HttpsClient>>,
}

impl ClientCache {
    pub fn get(&self, ca_pem: Option<&str>) -> Result<HttpsClient, String> {
        let key = ca_pem.map(str::to_owned);
        let mut clients = self
            .clients
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(c) = clients.get(&key) {
            return Ok(c.clone());
        }
        let (roots, _) = upstream_trust(&Trust {
            ca_pem,
            ..Trust::default()
        })?;
        let c = client(roots, None);
        // Policy edits that change PEMs leave old clients behind: bounded.
        if clients.len() >= 32 {
            clients.clear();
        }
        clients.insert(key, c.clone());
        Ok(c)
    }
}
