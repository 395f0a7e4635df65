//! The sidecar's link to the control plane: dials it over mTLS (verifying
//! its SPIFFE ID) with the workload's SVID, and keeps one session open on
//! which routes, revocations and heartbeats arrive and acknowledgements,
//! usage and reports go back. It owns none of the state it updates: each
//! consumer holds only the handle it needs (`WorkloadIdentity`, the route
//! table, `RevocationState`, `Reports`, `Usage`, `Issuer`).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use arc_swap::{ArcSwap, ArcSwapOption};
use hyper_util::rt::TokioIo;
use leash_api::identity::IdentityConfig;
use leash_api::revocation::{FingerprintKey, RevocationSet};
use leash_api::v1::sidecar_api_client::SidecarApiClient;
use leash_api::v1::{
    Ack, ControlMessage, Credential, EchoReport, Heartbeat, Hello, IssueRequest, RevocationEvent,
    RouteSet, SidecarMessage, Snapshot, StripReport, control_message, issue_response,
    sidecar_message,
};
use rustls::pki_types::ServerName;
use spiffe::X509Source;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio_rustls::TlsConnector;
use tonic::transport::{Channel, Endpoint};

use crate::identity::WorkloadIdentity;
use crate::metrics::Metrics;
use crate::reports::Reports;
use crate::revocation::RevocationState;
use crate::routes::{RouteTable, UpstreamTimeouts};
use crate::usage::Usage;

#[derive(Debug, Clone, thiserror::Error)]
pub enum ControlError {
    #[error("no workload identity yet")]
    NoIdentity,
    #[error("control plane not connected")]
    NotConnected,
    #[error("control plane call timed out ({0})")]
    Timeout(&'static str),
    #[error("control plane call failed: {}: {}", .0.code(), .0.message())]
    Rpc(tonic::Status),
    #[error("bad control plane setting: {0}")]
    Config(String),
    #[error("TLS setup for the control plane failed: {0}")]
    Tls(String),
    #[error("denied ({code}): {message}")]
    Denied { code: String, message: String },
    #[error("control plane sent an empty answer")]
    Empty,
    #[error("session: {0}")]
    Session(#[from] SessionError),
}

/// Why a session was ended by the sidecar (it reconnects and resyncs).
#[derive(Debug, Clone, thiserror::Error)]
pub enum SessionError {
    #[error("nothing heard for {0:?}; trying the next control plane")]
    Silent(Duration),
    #[error("gap: got change {got} after {applied}; resyncing")]
    Gap { got: u64, applied: u64 },
    #[error("control plane is at {at} but {applied} was applied; resyncing")]
    Behind { at: u64, applied: u64 },
    #[error("snapshot part for {got} while gathering {gathering}")]
    MixedSnapshot { got: String, gathering: String },
    #[error("revocation refused, resyncing: {0}")]
    Revocation(#[from] leash_api::revocation::InvalidRevocation),
    #[error("routes refused: {0}")]
    Routes(#[from] crate::routes::RouteError),
}

#[derive(Debug, Clone)]
pub struct ControlConfig {
    /// Where the workload's SVID comes from.
    pub identity: IdentityConfig,
    /// `host:port` of each control plane replica's sidecar API, tried in turn
    /// (a name is resolved on every connect).
    pub control_planes: Vec<String>,
    /// The SPIFFE ID the control plane must present.
    pub control_plane_id: String,
    /// Refuse to inject after this long without hearing from the control plane.
    pub max_staleness: Duration,
    pub call_timeout: Duration,
    pub upstream: UpstreamTimeouts,
    /// How often usage and stripped-credential counts are reported.
    pub report_interval: Duration,
    /// Usage records kept while the control plane is away; beyond this the
    /// oldest batches are dropped (and reported as dropped).
    pub usage_buffer_records: usize,
}

/// Asks the control plane for credentials, on the session's channel.
pub struct Issuer {
    client: ArcSwapOption<SidecarApiClient<Channel>>,
    call_timeout: Duration,
}

impl Issuer {
    fn new(call_timeout: Duration) -> Self {
        Self {
            client: ArcSwapOption::empty(),
            call_timeout,
        }
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

    pub async fn issue(&self, upstream: &str) -> Result<Credential, ControlError> {
        let mut client = self.client()?;
        let call = client.issue(IssueRequest {
            upstream: upstream.to_owned(),
        });
        let response = tokio::time::timeout(self.call_timeout, call)
            .await
            .map_err(|_| ControlError::Timeout("issue"))?
            .map(tonic::Response::into_inner)
            .map_err(ControlError::Rpc)?;
        match response.result {
            Some(issue_response::Result::Credential(c)) => Ok(c),
            Some(issue_response::Result::Denial(d)) => Err(ControlError::Denied {
                code: d.code,
                message: d.message,
            }),
            None => Err(ControlError::Empty),
        }
    }
}

/// The session with the control plane, and the handles it keeps current.
pub struct ControlLink {
    config: ControlConfig,
    pub identity: Arc<WorkloadIdentity>,
    pub issuer: Arc<Issuer>,
    /// The policy in force, as routes.
    pub routes: Arc<ArcSwap<RouteTable>>,
    pub revocations: Arc<RevocationState>,
    pub reports: Arc<Reports>,
    /// Usage counters and the batches waiting for the control plane.
    pub usage: Arc<Usage>,
    pub metrics: Arc<Metrics>,
    store_id: std::sync::Mutex<String>,
    /// Bumped after each applied revocation change or snapshot.
    applied: watch::Sender<u64>,
}

impl ControlLink {
    pub fn new(config: ControlConfig) -> Arc<Self> {
        Arc::new(Self {
            identity: Arc::default(),
            issuer: Arc::new(Issuer::new(config.call_timeout)),
            routes: Arc::default(),
            revocations: Arc::new(RevocationState::new(config.max_staleness)),
            reports: Arc::default(),
            usage: Arc::new(Usage::new(config.usage_buffer_records)),
            metrics: Arc::default(),
            store_id: std::sync::Mutex::new(String::new()),
            applied: watch::channel(0).0,
            config,
        })
    }

    /// Changes whenever a revocation change or snapshot has been applied.
    pub fn applied(&self) -> watch::Receiver<u64> {
        self.applied.subscribe()
    }

    pub fn connected(&self) -> bool {
        self.revocations.freshness.connected()
    }

    /// Time since the control plane was last heard from.
    pub fn silence(&self) -> Duration {
        self.revocations.freshness.silence()
    }

    /// See [`crate::revocation::Freshness::stale`].
    pub fn stale(&self) -> Option<Duration> {
        self.revocations.freshness.stale()
    }

    /// DER of the current SVID's leaf certificate (diagnostics and tests).
    pub fn svid_leaf(&self) -> Option<Vec<u8>> {
        self.identity.svid_leaf()
    }

    /// What readiness still waits for.
    pub fn pending(&self) -> Vec<&'static str> {
        let mut p = Vec::new();
        if !self.identity.ready() {
            p.push("identity");
        }
        let freshness = &self.revocations.freshness;
        if !freshness.synced() || freshness.stale().is_some() {
            p.push("control-plane");
        }
        p
    }

    /// Runs until `stop`: acquire identity, then keep a session to a control plane.
    pub async fn run(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let work = async {
            let source = self.identity.acquire(&self.config.identity).await;
            self.session_loop(source).await;
        };
        tokio::select! {
            () = work => {}
            _ = stop.wait_for(|s| *s) => {}
        }
        self.identity.shutdown().await;
    }

    /// Keeps a session open, moving to the next control plane address and
    /// backing off (with jitter) after each failure.
    async fn session_loop(&self, source: X509Source) {
        let mut backoff = Duration::from_millis(100);
        let mut attempt = 0usize;
        loop {
            let addr = &self.config.control_planes[attempt % self.config.control_planes.len()];
            attempt += 1;
            let started = Instant::now();
            let result = match self.channel(source.clone(), addr) {
                Ok(channel) => {
                    let client = SidecarApiClient::new(channel)
                        .max_decoding_message_size(leash_api::MAX_MESSAGE_BYTES)
                        .max_encoding_message_size(leash_api::MAX_MESSAGE_BYTES);
                    self.issuer.client.store(Some(Arc::new(client.clone())));
                    self.run_session(client, addr).await
                }
                Err(e) => Err(e),
            };
            if self.revocations.freshness.disconnect() {
                match &result {
                    Ok(()) => {
                        tracing::warn!(control_plane = %addr, "control plane closed the session")
                    }
                    Err(e) => {
                        tracing::warn!(control_plane = %addr, error = %e, "lost the control plane")
                    }
                }
            } else if let Err(e) = &result {
                tracing::debug!(control_plane = %addr, error = %e, "control plane not reachable");
            }
            if started.elapsed() > Duration::from_secs(10) {
                backoff = Duration::from_millis(100);
            }
            tokio::time::sleep(jitter(backoff)).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }

    /// One session: `Hello`, then every message handled by its own handler
    /// (`Session::on_*`), interleaved with what the sidecar sends (reports,
    /// usage) until the stream ends, fails, or falls silent.
    async fn run_session(
        &self,
        mut client: SidecarApiClient<Channel>,
        addr: &str,
    ) -> Result<(), ControlError> {
        let (tx, rx) = mpsc::channel::<SidecarMessage>(64);
        let store_id = self.store_id.lock().map(|s| s.clone()).unwrap_or_default();
        let hello = SidecarMessage {
            msg: Some(sidecar_message::Msg::Hello(Hello {
                sidecar_version: env!("CARGO_PKG_VERSION").to_owned(),
                store_id,
                last_applied_seq: self.revocations.applied_seq.load(Ordering::Acquire),
                instance_id: self.usage.instance_id.clone(),
            })),
        };
        tx.send(hello)
            .await
            .map_err(|_| ControlError::NotConnected)?;
        let open = client.session(tokio_stream::wrappers::ReceiverStream::new(rx));
        let mut inbound = tokio::time::timeout(self.config.call_timeout, open)
            .await
            .map_err(|_| ControlError::Timeout("session open"))?
            .map_err(ControlError::Rpc)?
            .into_inner();
        // Only one session runs at a time, so this lock is never contended.
        let mut reports = self.reports.receiver().await;
        let mut report_tick = tokio::time::interval(self.config.report_interval);
        let mut session = Session {
            link: self,
            tx,
            have_state: false,
            have_routes: false,
            partial: None,
            usage: UsageSent {
                upto: 0,
                at: Instant::now(),
            },
            silence_limit: self.config.max_staleness,
        };
        // Every batch not yet acknowledged is (re)sent on a new session.
        session.send_usage().await?;
        // Silence: a control plane whose connection stays open but that
        // sends nothing is left for the next address. One deadline, moved
        // only by what arrives (heartbeats come every interval: two intervals
        // without one, or `max_staleness` before the first says how often
        // they come). A replica cut off from its database stops them, and
        // ends its sessions, so its sidecars move to another.
        let silence = tokio::time::sleep(session.silence_limit);
        tokio::pin!(silence);
        loop {
            let next = tokio::select! {
                next = inbound.message() => next,
                () = &mut silence => {
                    return Err(SessionError::Silent(session.silence_limit).into());
                }
                Some(report) = reports.recv() => {
                    session.send(report).await?;
                    continue;
                }
                () = self.usage.queued.notified() => {
                    session.send_usage().await?;
                    continue;
                }
                _ = report_tick.tick() => {
                    session.on_report_tick().await?;
                    continue;
                }
            };
            let next = next.map_err(ControlError::Rpc)?;
            let Some(ControlMessage { msg: Some(msg) }) = next else {
                return Ok(());
            };
            self.revocations.freshness.heard();
            match msg {
                control_message::Msg::Snapshot(part) => session.on_snapshot(part).await?,
                control_message::Msg::Event(event) => session.on_event(event).await?,
                control_message::Msg::Heartbeat(hb) => session.on_heartbeat(&hb)?,
                control_message::Msg::UsageAck(ack) => self.usage.ack(ack.batch_seq),
                control_message::Msg::Routes(set) => session.on_routes(set)?,
            }
            silence
                .as_mut()
                .reset(tokio::time::Instant::now() + session.silence_limit);
            if session.have_state && session.have_routes && !self.revocations.freshness.establish()
            {
                self.metrics.sessions.fetch_add(1, Ordering::Relaxed);
                tracing::info!(control_plane = %addr, "control plane session established");
            }
        }
    }

    fn channel(&self, source: X509Source, addr: &str) -> Result<Channel, ControlError> {
        let trust_domain = source
            .svid()
            .map_err(|_| ControlError::NoIdentity)?
            .spiffe_id()
            .trust_domain()
            .clone();
        let authorizer = spiffe_rustls::authorizer::exact([self.config.control_plane_id.as_str()])
            .map_err(|e| ControlError::Config(format!("--control-plane-id: {e}")))?;
        let tls = spiffe_rustls::mtls_client(source)
            .authorize(authorizer)
            .trust_domain_policy(spiffe_rustls::LocalOnly(trust_domain))
            .with_alpn_protocols([b"h2"])
            .build()
            .map_err(|e| ControlError::Tls(e.to_string()))?;
        let connector = TlsConnector::from(Arc::new(tls));
        let addr = addr.to_owned();
        let authority: http::uri::Authority = addr.parse().map_err(|_| {
            ControlError::Config(format!("control plane address {addr:?} is not host:port"))
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
                .map_err(|_| ControlError::Config(format!("control plane host {host:?}")))?,
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
            .map_err(|e| ControlError::Config(e.to_string()))?
            .connect_timeout(Duration::from_secs(3))
            .http2_keep_alive_interval(Duration::from_secs(20))
            .keep_alive_while_idle(true);
        Ok(endpoint.connect_with_connector_lazy(connect))
    }
}

/// The state of one session, and one handler per message that arrives.
struct Session<'a> {
    link: &'a ControlLink,
    tx: mpsc::Sender<SidecarMessage>,
    /// The revocation state is known current (snapshot, events, or a
    /// heartbeat saying nothing was missed).
    have_state: bool,
    have_routes: bool,
    /// A snapshot arriving in parts, applied once complete.
    partial: Option<Snapshot>,
    usage: UsageSent,
    /// Left for the next control plane after this long without a message.
    silence_limit: Duration,
}

impl Session<'_> {
    async fn send(&self, msg: SidecarMessage) -> Result<(), ControlError> {
        self.tx
            .send(msg)
            .await
            .map_err(|_| ControlError::NotConnected)
    }

    /// A part of a snapshot; the whole replaces the revocation state.
    async fn on_snapshot(&mut self, part: Snapshot) -> Result<(), ControlError> {
        let Some(snapshot) = gather(&mut self.partial, part)? else {
            return Ok(());
        };
        let link = self.link;
        if let Ok(mut id) = link.store_id.lock() {
            id.clone_from(&snapshot.store_id);
        }
        if let Some(key) = FingerprintKey::from_slice(&snapshot.fingerprint_key) {
            link.revocations.fingerprint_key.store(Some(Arc::new(key)));
        }
        let set = RevocationSet::new(snapshot.active).map_err(|e| {
            tracing::error!(error = %e, "revocation snapshot refused; resyncing");
            SessionError::Revocation(e)
        })?;
        tracing::info!(
            seq = snapshot.seq,
            active = set.len(),
            "revocation snapshot applied"
        );
        self.apply(set, snapshot.seq).await?;
        link.revocations
            .snapshots_applied
            .fetch_add(1, Ordering::Relaxed);
        self.have_state = true;
        Ok(())
    }

    /// One revocation change, applied in sequence (a gap resyncs).
    async fn on_event(&mut self, event: RevocationEvent) -> Result<(), ControlError> {
        let revocations = &self.link.revocations;
        let applied = revocations.applied_seq.load(Ordering::Acquire);
        if event.seq <= applied {
            return Ok(());
        }
        if event.seq != applied + 1 {
            return Err(SessionError::Gap {
                got: event.seq,
                applied,
            }
            .into());
        }
        let revocation = event.revocation.ok_or(ControlError::Empty)?;
        let set = revocations
            .set
            .load()
            .with_change(revocation.clone(), event.restored)
            .map_err(|e| {
                tracing::error!(seq = event.seq, error = %e, "revocation change refused; resyncing");
                SessionError::Revocation(e)
            })?;
        tracing::info!(
            seq = event.seq,
            revocation_id = %revocation.id,
            kind = %revocation.kind,
            restored = event.restored,
            "revocation change applied"
        );
        self.apply(set, event.seq).await?;
        revocations.changes_applied.fetch_add(1, Ordering::Relaxed);
        self.have_state = true;
        Ok(())
    }

    /// The control plane's sequence (one ahead of ours resyncs) and how
    /// often it will speak.
    fn on_heartbeat(&mut self, hb: &Heartbeat) -> Result<(), ControlError> {
        let applied = self.link.revocations.applied_seq.load(Ordering::Acquire);
        if hb.seq > applied {
            return Err(SessionError::Behind {
                at: hb.seq,
                applied,
            }
            .into());
        }
        // Resumed with nothing missed: the state is current.
        self.have_state = true;
        if hb.interval_ms > 0 {
            self.silence_limit =
                (Duration::from_millis(hb.interval_ms) * 2).min(self.link.config.max_staleness);
        }
        Ok(())
    }

    /// The routes of the policy in force: only what changed is rebuilt.
    fn on_routes(&mut self, set: RouteSet) -> Result<(), ControlError> {
        let link = self.link;
        let current = link.routes.load();
        if !(current.loaded && current.policy_version == set.policy_version) {
            let version = set.policy_version.clone();
            let table = RouteTable::build(set, &current, &link.config.upstream, &link.metrics)
                .map_err(SessionError::Routes)?;
            link.routes.store(Arc::new(table));
            tracing::info!(policy_version = %version, "routes updated");
        }
        self.have_routes = true;
        Ok(())
    }

    /// Periodic reports: usage sent and never acknowledged, and the counts
    /// of stripped and echoed credentials.
    async fn on_report_tick(&mut self) -> Result<(), ControlError> {
        let link = self.link;
        // Sent and never acknowledged (the control plane could not store
        // them): send again; it ignores what it has.
        if link.usage.pending() > 0 && self.usage.at.elapsed() > link.config.report_interval * 6 {
            self.usage.upto = 0;
            self.send_usage().await?;
        }
        let routes = link.routes.load();
        for (upstream, count) in routes.take_strip_counts() {
            let msg = sidecar_message::Msg::Stripped(StripReport { upstream, count });
            self.send(SidecarMessage { msg: Some(msg) }).await?;
        }
        for (upstream, header, count) in routes.take_echo_counts() {
            let msg = sidecar_message::Msg::Echoed(EchoReport {
                upstream,
                header,
                count,
            });
            self.send(SidecarMessage { msg: Some(msg) }).await?;
        }
        Ok(())
    }

    /// Sends the usage batches queued after the last one sent.
    async fn send_usage(&mut self) -> Result<(), ControlError> {
        for batch in self.link.usage.pending_after(self.usage.upto) {
            self.usage.upto = batch.batch_seq;
            self.usage.at = Instant::now();
            let msg = sidecar_message::Msg::Usage(batch);
            self.send(SidecarMessage { msg: Some(msg) }).await?;
        }
        Ok(())
    }

    /// Enforces a new revocation state (see `RevocationState::enforce`),
    /// then acknowledges: the acknowledgement means enforced (I7).
    async fn apply(&self, set: RevocationSet, seq: u64) -> Result<(), ControlError> {
        let link = self.link;
        let workload = link.identity.id_arc();
        let cut = link.revocations.enforce(set, &workload).await;
        if cut > 0 {
            tracing::info!(seq, credentials = cut, "revoked credentials cut");
        }
        link.applied.send_modify(|v| *v += 1);
        link.revocations.applied_seq.store(seq, Ordering::Release);
        let ack = sidecar_message::Msg::Ack(Ack { seq });
        self.send(SidecarMessage { msg: Some(ack) }).await
    }
}

/// Adds a snapshot part to what has arrived of it; returns the snapshot
/// once its last part is in. Parts of another snapshot than the one being
/// gathered end the session (the control plane restarts it on reconnect).
fn gather(
    partial: &mut Option<Snapshot>,
    part: Snapshot,
) -> Result<Option<Snapshot>, ControlError> {
    let more = part.more;
    let whole = match partial.take() {
        None => part,
        Some(mut so_far) => {
            if so_far.store_id != part.store_id || so_far.seq != part.seq {
                return Err(SessionError::MixedSnapshot {
                    got: format!("{}@{}", part.store_id, part.seq),
                    gathering: format!("{}@{}", so_far.store_id, so_far.seq),
                }
                .into());
            }
            so_far.active.extend(part.active);
            so_far
        }
    };
    if more {
        *partial = Some(whole);
        return Ok(None);
    }
    Ok(Some(whole))
}

/// The newest usage batch sent on this session, and when.
struct UsageSent {
    upto: u64,
    at: Instant,
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
