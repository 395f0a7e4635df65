//! The routing table: which upstream a request's host selects, where that
//! upstream lives, how its credential is injected, and the HTTP client
//! (with its TLS settings and connection pool) used to reach it.

use std::collections::HashMap;

/// Looked up on every request; the keys come from policy, not from clients'
/// choice of many colliding names, so a fast non-DoS-resistant hash is fine.
type FastMap<K, V> = HashMap<K, V, foldhash::fast::FixedState>;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use http::HeaderName;
use http::uri::{Authority, Scheme};
use hyper_rustls::{FixedServerNameResolver, HttpsConnectorBuilder};
use hyper_util::client::legacy::connect::HttpConnector;
use leash_api::v1::{Route, RouteSet, injection};
use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject};

use crate::credential::{CachedCredential, InjectHow, RenderFor};
use crate::metrics::{Metrics, UpstreamMetrics};
pub use crate::upstream::UpstreamClient;

#[derive(Debug, Clone, thiserror::Error)]
pub enum RouteError {
    #[error("route {upstream}: {reason}")]
    Invalid { upstream: String, reason: String },
}

pub struct EgressRoute {
    pub name: Arc<str>,
    /// The route as the control plane sent it (encoded): a policy edit
    /// that leaves it unchanged keeps this route, its pool and credential.
    spec: Vec<u8>,
    /// Unique per built route: a credential cached for an older build of
    /// the same upstream (injected differently, say) is never used.
    pub generation: u64,
    /// Bytes of request body scanned for leaked values (0: none).
    pub scan_body_bytes: usize,
    /// Credentials the workload sent itself and the sidecar stripped, since
    /// the last report.
    pub stripped: AtomicU64,
    /// Response headers that carried the injected credential back (removed
    /// before the workload saw them), by header name, since the last report.
    pub echoed: std::sync::Mutex<std::collections::HashMap<String, u64>>,
    pub granted: bool,
    /// `CONNECT` to the route's hosts is terminated and handled inside.
    pub intercept: bool,
    /// `CONNECT` to the route's hosts is tunnelled as bytes to the target.
    pub passthrough: bool,
    pub scheme: Scheme,
    /// `host:port` of the target; also sent as `Host`.
    pub authority: Authority,
    pub host_header: http::HeaderValue,
    /// The credential in use, read without touching the cache's map: the
    /// hot path is one atomic load while it is fresh.
    pub current: arc_swap::ArcSwapOption<CachedCredential>,
    pub inject: InjectHow,
    pub client: Arc<UpstreamClient>,
    /// This upstream's counters and latency histograms.
    pub metrics: Arc<UpstreamMetrics>,
}

impl EgressRoute {
    /// `host:port` of the target, the port defaulting by scheme (where a
    /// passthrough tunnel goes).
    pub fn target_addr(&self) -> String {
        let port = self
            .authority
            .port_u16()
            .unwrap_or(if self.scheme == Scheme::HTTPS {
                443
            } else {
                80
            });
        format!("{}:{port}", self.authority.host())
    }

    /// What a credential for this route is rendered for.
    pub fn render_for(&self) -> RenderFor<'_> {
        RenderFor {
            upstream: &self.name,
            inject: &self.inject,
            generation: self.generation,
        }
    }
}

/// Host → route, plus name → route for named listeners.
#[derive(Default)]
pub struct RouteTable {
    pub policy_version: String,
    by_host: FastMap<String, Arc<EgressRoute>>,
    /// `*.suffix` patterns as (".suffix", route), longest first.
    wildcards: Vec<(String, Arc<EgressRoute>)>,
    by_name: FastMap<String, Arc<EgressRoute>>,
    pub loaded: bool,
}

impl RouteTable {
    /// Builds the table for `set`, keeping every route of `previous` that
    /// the control plane sent unchanged (its connection pool, its current
    /// credential and its counters): a policy edit rebuilds only what it
    /// changed. A changed route is replaced as a whole; a removed one is
    /// dropped once the requests still holding it are done.
    pub fn build(
        set: RouteSet,
        previous: &RouteTable,
        timeouts: &UpstreamTimeouts,
        metrics: &Metrics,
    ) -> Result<Self, RouteError> {
        use prost::Message as _;
        let mut table = Self {
            policy_version: set.policy_version,
            loaded: true,
            ..Self::default()
        };
        for route in set.routes {
            let hosts = route.hosts.clone();
            let spec = route.encode_to_vec();
            let r = match previous.by_name(&route.upstream) {
                Some(kept) if kept.spec == spec => kept.clone(),
                _ => Arc::new(build_route(route, spec, timeouts, metrics)?),
            };
            for host in hosts {
                match host.strip_prefix('*') {
                    Some(suffix) => table.wildcards.push((suffix.to_owned(), r.clone())),
                    None => {
                        table.by_host.insert(host, r.clone());
                    }
                }
            }
            table.by_name.insert(r.name.to_string(), r);
        }
        table
            .wildcards
            .sort_by_key(|(s, _)| std::cmp::Reverse(s.len()));
        Ok(table)
    }

    /// Looks a host up (case-insensitively; no port).
    pub fn by_host(&self, host: &str) -> Option<&Arc<EgressRoute>> {
        if let Some(r) = self.by_host.get(host) {
            return Some(r);
        }
        if host.bytes().any(|b| b.is_ascii_uppercase()) {
            return self.by_host(&host.to_ascii_lowercase());
        }
        self.wildcards
            .iter()
            .find(|(suffix, _)| host.len() > suffix.len() && host.ends_with(suffix.as_str()))
            .map(|(_, r)| r)
    }

    pub fn by_name(&self, name: &str) -> Option<&Arc<EgressRoute>> {
        self.by_name.get(name)
    }

    pub fn routes(&self) -> impl Iterator<Item = &Arc<EgressRoute>> {
        self.by_name.values()
    }

    /// Takes (and resets) the per-upstream counts of stripped credentials.
    pub fn take_strip_counts(&self) -> Vec<(String, u64)> {
        self.by_name
            .values()
            .filter_map(|r| {
                let n = r.stripped.swap(0, Ordering::Relaxed);
                (n > 0).then(|| (r.name.to_string(), n))
            })
            .collect()
    }

    /// Takes (and resets) the counts of credentials echoed back, as
    /// (upstream, header, count).
    pub fn take_echo_counts(&self) -> Vec<(String, String, u64)> {
        let mut out = Vec::new();
        for r in self.by_name.values() {
            let mut echoed = r.echoed.lock().unwrap_or_else(|p| p.into_inner());
            for (header, n) in echoed.drain() {
                out.push((r.name.to_string(), header, n));
            }
        }
        out
    }
}

/// How the sidecar connects to each upstream.
#[derive(Debug, Clone)]
pub struct UpstreamTimeouts {
    pub connect: Duration,
    pub pool_idle: Duration,
    /// Connections open to one upstream at once, busy and idle; requests
    /// beyond wait for one (within the response timeout).
    pub max_connections: usize,
}

fn invalid(route: &Route, reason: impl Into<String>) -> RouteError {
    RouteError::Invalid {
        upstream: route.upstream.clone(),
        reason: reason.into(),
    }
}

fn build_route(
    route: Route,
    spec: Vec<u8>,
    timeouts: &UpstreamTimeouts,
    metrics: &Metrics,
) -> Result<EgressRoute, RouteError> {
    static GENERATION: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    let target: http::Uri = route
        .target
        .parse()
        .map_err(|e| invalid(&route, format!("bad target: {e}")))?;
    let scheme = target
        .scheme()
        .cloned()
        .ok_or_else(|| invalid(&route, "target has no scheme"))?;
    let authority = target
        .authority()
        .cloned()
        .ok_or_else(|| invalid(&route, "target has no host"))?;
    let inject = match route.inject.as_ref().and_then(|i| i.how.as_ref()) {
        Some(injection::How::Header(h)) => {
            let name = HeaderName::from_bytes(h.name.as_bytes())
                .map_err(|_| invalid(&route, "bad header name"))?;
            let (prefix, suffix) = h
                .format
                .split_once("{token}")
                .ok_or_else(|| invalid(&route, "format lacks {token}"))?;
            InjectHow::Header {
                name,
                prefix: prefix.to_owned(),
                suffix: suffix.to_owned(),
            }
        }
        Some(injection::How::Basic(b)) => InjectHow::Basic {
            username: b.username.clone(),
        },
        Some(injection::How::Query(q)) => InjectHow::Query {
            param: q.param.clone(),
        },
        Some(injection::How::Sigv4(v)) => InjectHow::SigV4(crate::sigv4::SigV4Spec {
            region: v.region.clone(),
            service: v.service.clone(),
            unsigned_payload: v.unsigned_payload,
            query: v.query,
        }),
        None => return Err(invalid(&route, "no injection")),
    };

    let tls = tls_config(&route)?;
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(timeouts.connect));
    let builder = HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http();
    let server_name = route
        .tls
        .as_ref()
        .map(|t| t.server_name.clone())
        .unwrap_or_default();
    let builder = if server_name.is_empty() {
        builder
    } else {
        let name = ServerName::try_from(server_name)
            .map_err(|e| invalid(&route, format!("bad server_name: {e}")))?;
        builder.with_server_name_resolver(FixedServerNameResolver::new(name))
    };
    // HTTP/2 when the target offers it by ALPN (gRPC needs it), else HTTP/1.1.
    let connector = builder.enable_all_versions().wrap_connector(http);
    let base = http::Uri::builder()
        .scheme(scheme.clone())
        .authority(authority.clone())
        .path_and_query("/")
        .build()
        .map_err(|e| invalid(&route, format!("bad target: {e}")))?;
    let client = UpstreamClient::new(
        connector,
        base,
        timeouts.pool_idle,
        timeouts.max_connections,
    );

    let host_header = http::HeaderValue::from_str(authority.as_str())
        .map_err(|_| invalid(&route, "bad target host"))?;
    let name: Arc<str> = route.upstream.as_str().into();
    Ok(EgressRoute {
        spec,
        generation: GENERATION.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        host_header,
        current: arc_swap::ArcSwapOption::empty(),
        metrics: metrics.upstream(&name),
        name,
        scan_body_bytes: route.scan_body_bytes.min(65_536) as usize,
        stripped: AtomicU64::new(0),
        echoed: std::sync::Mutex::default(),
        granted: route.granted,
        intercept: route.intercept,
        passthrough: route.passthrough,
        scheme,
        authority,
        inject,
        client,
    })
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

fn tls_config(route: &Route) -> Result<rustls::ClientConfig, RouteError> {
    let mut roots = rustls::RootCertStore::empty();
    let tls = route.tls.clone().unwrap_or_default();
    if !tls.ca_only {
        let (_added, _ignored) = roots.add_parsable_certificates(system_roots().iter().cloned());
    }
    if !tls.ca_pem.is_empty() {
        for cert in CertificateDer::pem_slice_iter(tls.ca_pem.as_bytes()) {
            let cert = cert.map_err(|e| invalid(route, format!("bad CA PEM: {e}")))?;
            roots
                .add(cert)
                .map_err(|e| invalid(route, format!("bad CA certificate: {e}")))?;
        }
    }
    Ok(rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth())
}
