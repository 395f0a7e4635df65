//! The sidecar's link to its identity and to the control plane: acquires the
//! X.509-SVID from the Workload API, dials the control plane over mTLS
//! (verifying its SPIFFE ID), and keeps the routing table current.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use arc_swap::{ArcSwap, ArcSwapOption};
use hyper_util::rt::TokioIo;
use leash_api::identity::{Identity, IdentityConfig};
use leash_api::v1::sidecar_api_client::SidecarApiClient;
use leash_api::v1::{Credential, GetRoutesRequest, IssueRequest, issue_response};
use rustls::pki_types::ServerName;
use spiffe::X509Source;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_rustls::TlsConnector;
use tonic::transport::{Channel, Endpoint};

use crate::routes::{RouteTable, UpstreamTimeouts};

#[derive(Debug, Clone, thiserror::Error)]
pub enum ControlError {
    #[error("no workload identity yet")]
    NoIdentity,
    #[error("control plane not connected")]
    NotConnected,
    #[error("control plane call failed: {0}")]
    Rpc(String),
    #[error("denied ({code}): {message}")]
    Denied { code: String, message: String },
    #[error("control plane sent an empty answer")]
    Empty,
}

#[derive(Debug, Clone)]
pub struct ControlConfig {
    /// Where the workload's SVID comes from.
    pub identity: IdentityConfig,
    /// `host:port` of the control plane's sidecar API (a name is resolved on
    /// every connect, so a Service whose address changes is followed).
    pub control_plane: String,
    /// The SPIFFE ID the control plane must present.
    pub control_plane_id: String,
    pub routes_refresh: Duration,
    pub call_timeout: Duration,
    pub upstream: UpstreamTimeouts,
}

/// Shared, lock-free view of identity, control-plane connection and routes.
pub struct ControlLink {
    config: ControlConfig,
    client: ArcSwapOption<SidecarApiClient<Channel>>,
    pub routes: ArcSwap<RouteTable>,
    identity_ready: AtomicBool,
    control_ready: AtomicBool,
    identity: ArcSwapOption<Identity>,
    /// Bumped whenever the routing table is replaced.
    routes_changed: watch::Sender<u64>,
}

impl ControlLink {
    pub fn new(config: ControlConfig) -> Arc<Self> {
        Arc::new(Self {
            config,
            client: ArcSwapOption::empty(),
            routes: ArcSwap::from_pointee(RouteTable::default()),
            identity_ready: AtomicBool::new(false),
            control_ready: AtomicBool::new(false),
            identity: ArcSwapOption::empty(),
            routes_changed: watch::channel(0).0,
        })
    }

    pub fn identity_ready(&self) -> bool {
        self.identity_ready.load(Ordering::Acquire)
    }

    pub fn control_ready(&self) -> bool {
        self.control_ready.load(Ordering::Acquire)
    }

    /// What readiness still waits for.
    pub fn pending(&self) -> Vec<&'static str> {
        let mut p = Vec::new();
        if !self.identity_ready() {
            p.push("identity");
        }
        if !self.control_ready() {
            p.push("control-plane");
        }
        p
    }

    pub fn routes_changed(&self) -> watch::Receiver<u64> {
        self.routes_changed.subscribe()
    }

    pub fn spiffe_id(&self) -> Option<String> {
        let identity = self.identity.load_full()?;
        identity
            .source
            .svid()
            .ok()
            .map(|s| s.spiffe_id().to_string())
    }

    /// DER of the current SVID's leaf certificate (diagnostics and tests).
    pub fn svid_leaf(&self) -> Option<Vec<u8>> {
        let identity = self.identity.load_full()?;
        identity
            .source
            .svid()
            .ok()
            .map(|s| s.leaf().as_bytes().to_vec())
    }

    /// A client on the shared channel (cheap: the channel is reference-counted).
    fn client(&self) -> Result<SidecarApiClient<Channel>, ControlError> {
        Ok(self
            .client
            .load_full()
            .ok_or(ControlError::NotConnected)?
            .as_ref()
            .clone())
    }

    /// Bounds a call by the configured timeout and flattens its errors.
    async fn call<T>(
        &self,
        call: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    ) -> Result<T, ControlError> {
        tokio::time::timeout(self.config.call_timeout, call)
            .await
            .map_err(|_| ControlError::Rpc("timed out".into()))?
            .map(tonic::Response::into_inner)
            .map_err(|s| ControlError::Rpc(format!("{}: {}", s.code(), s.message())))
    }

    pub async fn issue(&self, upstream: &str) -> Result<Credential, ControlError> {
        let mut client = self.client()?;
        let response = self
            .call(client.issue(IssueRequest {
                upstream: upstream.to_owned(),
            }))
            .await?;
        match response.result {
            Some(issue_response::Result::Credential(c)) => Ok(c),
            Some(issue_response::Result::Denial(d)) => Err(ControlError::Denied {
                code: d.code,
                message: d.message,
            }),
            None => Err(ControlError::Empty),
        }
    }

    async fn refresh_routes(&self) -> Result<(), ControlError> {
        let mut client = self.client()?;
        let set = self
            .call(client.get_routes(GetRoutesRequest {
                sidecar_version: env!("CARGO_PKG_VERSION").to_owned(),
            }))
            .await?;
        if self.routes.load().loaded && self.routes.load().policy_version == set.policy_version {
            return Ok(());
        }
        let version = set.policy_version.clone();
        let table = RouteTable::build(set, &self.config.upstream)
            .map_err(|e| ControlError::Rpc(e.to_string()))?;
        self.routes.store(Arc::new(table));
        self.routes_changed.send_modify(|v| *v += 1);
        tracing::info!(policy_version = %version, "routes updated");
        Ok(())
    }

    /// Runs until `stop`: acquire identity, connect, then keep routes fresh.
    pub async fn run(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let work = async {
            let source = self.acquire_identity().await;
            let channel = match self.channel(source.clone()) {
                Ok(c) => c,
                Err(e) => {
                    tracing::error!(error = %e, "cannot configure control-plane TLS");
                    return;
                }
            };
            self.client
                .store(Some(Arc::new(SidecarApiClient::new(channel))));
            let mut backoff = Duration::from_millis(100);
            loop {
                match self.refresh_routes().await {
                    Ok(()) => {
                        if !self.control_ready.swap(true, Ordering::AcqRel) {
                            tracing::info!(control_plane = %self.config.control_plane, "control plane connected");
                        }
                        backoff = Duration::from_millis(100);
                        tokio::time::sleep(self.config.routes_refresh).await;
                    }
                    Err(e) => {
                        if self.control_ready.swap(false, Ordering::AcqRel) {
                            tracing::warn!(error = %e, "lost the control plane");
                        } else {
                            tracing::debug!(error = %e, "control plane not reachable yet");
                        }
                        tokio::time::sleep(jitter(backoff)).await;
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                    }
                }
            }
        };
        tokio::select! {
            () = work => {}
            _ = stop.wait_for(|s| *s) => {}
        }
        if let Some(identity) = self.identity.load_full() {
            identity.source.shutdown().await;
        }
    }

    async fn acquire_identity(&self) -> X509Source {
        let mut logged = false;
        loop {
            match leash_api::identity::connect(&self.config.identity, Duration::from_secs(5)).await
            {
                Ok(identity) => {
                    if let Ok(svid) = identity.source.svid() {
                        tracing::info!(spiffe_id = %svid.spiffe_id(), "workload identity acquired");
                    }
                    let source = identity.source.clone();
                    self.identity.store(Some(Arc::new(identity)));
                    self.identity_ready.store(true, Ordering::Release);
                    return source;
                }
                Err(e) => {
                    if !logged {
                        tracing::warn!(error = %e, "waiting for workload identity");
                        logged = true;
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
    }

    fn channel(&self, source: X509Source) -> Result<Channel, ControlError> {
        let trust_domain = source
            .svid()
            .map_err(|_| ControlError::NoIdentity)?
            .spiffe_id()
            .trust_domain()
            .clone();
        let authorizer = spiffe_rustls::authorizer::exact([self.config.control_plane_id.as_str()])
            .map_err(|e| ControlError::Rpc(format!("bad --control-plane-id: {e}")))?;
        let tls = spiffe_rustls::mtls_client(source)
            .authorize(authorizer)
            .trust_domain_policy(spiffe_rustls::LocalOnly(trust_domain))
            .with_alpn_protocols([b"h2"])
            .build()
            .map_err(|e| ControlError::Rpc(e.to_string()))?;
        let connector = TlsConnector::from(Arc::new(tls));
        let addr = self.config.control_plane.clone();
        let authority: http::uri::Authority = addr.parse().map_err(|_| {
            ControlError::Rpc(format!("control plane address {addr:?} is not host:port"))
        })?;
        // The control plane is verified by its SPIFFE ID, not by name; SNI is
        // only a hint.
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']');
        let server_name = match host.parse::<std::net::IpAddr>() {
            Ok(ip) => ServerName::from(ip),
            Err(_) => ServerName::try_from(host.to_owned())
                .map_err(|_| ControlError::Rpc(format!("bad control plane host {host:?}")))?,
        };
        let connect = tower::service_fn(move |_uri: http::Uri| {
            let connector = connector.clone();
            let server_name = server_name.clone();
            let addr = addr.clone();
            async move {
                let tcp = TcpStream::connect(addr.as_str()).await?;
                tcp.set_nodelay(true)?;
                let tls = connector.connect(server_name, tcp).await?;
                Ok::<_, std::io::Error>(TokioIo::new(tls))
            }
        });
        // `http://` because TLS is done by the connector above.
        let endpoint = Endpoint::from_shared(format!("http://{authority}"))
            .map_err(|e| ControlError::Rpc(e.to_string()))?
            .connect_timeout(Duration::from_secs(3))
            .http2_keep_alive_interval(Duration::from_secs(20))
            .keep_alive_while_idle(true);
        Ok(endpoint.connect_with_connector_lazy(connect))
    }
}

/// ±20% so that many sidecars do not retry in step.
fn jitter(d: Duration) -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|t| t.subsec_nanos())
        .unwrap_or(0);
    let factor = 0.8 + f64::from(nanos % 1000) / 1000.0 * 0.4;
    d.mul_f64(factor)
}
