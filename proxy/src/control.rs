//! The sidecar's link to its identity and to the control plane: acquires the
//! X.509-SVID, dials the control plane over mTLS (verifying its SPIFFE ID),
//! and keeps one session open on which routes, revocations and heartbeats
//! arrive and acknowledgements go back.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use arc_swap::{ArcSwap, ArcSwapOption};
use hyper_util::rt::TokioIo;
use leash_api::identity::{Identity, IdentityConfig};
use leash_api::revocation::{FingerprintKey, RevocationSet};
use leash_api::v1::sidecar_api_client::SidecarApiClient;
use leash_api::v1::{
    Ack, ControlMessage, Credential, EchoReport, Hello, IssueRequest, SidecarMessage, Snapshot,
    StripReport, control_message, issue_response, sidecar_message,
};
use rustls::pki_types::ServerName;
use spiffe::X509Source;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio_rustls::TlsConnector;
use tonic::transport::{Channel, Endpoint};

use crate::revocation::RevocationState;
use crate::routes::{RouteTable, UpstreamTimeouts};
use crate::usage::Usage;

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
    #[error("session: {0}")]
    Session(String),
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

/// Shared, lock-free view of identity, control-plane session, routes and revocations.
pub struct ControlLink {
    config: ControlConfig,
    client: ArcSwapOption<SidecarApiClient<Channel>>,
    pub routes: ArcSwap<RouteTable>,
    pub revocations: RevocationState,
    identity_ready: AtomicBool,
    /// A session delivered its revocation state and routes at least once.
    synced: AtomicBool,
    connected: AtomicBool,
    identity: ArcSwapOption<Identity>,
    /// The workload's SPIFFE ID, for revocation checks on the hot path.
    workload_id: ArcSwap<Arc<str>>,
    /// Milliseconds since `epoch` when the control plane was last heard.
    last_heard_ms: AtomicU64,
    epoch: Instant,
    store_id: std::sync::Mutex<String>,
    /// Key of the leaked-value fingerprints (from the snapshot).
    pub fingerprint_key: ArcSwapOption<FingerprintKey>,
    /// Leak refusals and strip reports for the control plane. Bounded: when
    /// the control plane is away for long, the excess is dropped and counted.
    reports: mpsc::Sender<SidecarMessage>,
    reports_rx: tokio::sync::Mutex<mpsc::Receiver<SidecarMessage>>,
    pub reports_dropped: AtomicU64,
    /// Bumped after each applied revocation change or snapshot.
    applied: watch::Sender<u64>,
    /// Usage counters and the batches waiting for the control plane.
    pub usage: Arc<Usage>,
    pub metrics: Arc<crate::metrics::Metrics>,
}

impl ControlLink {
    pub fn new(config: ControlConfig) -> Arc<Self> {
        let (reports, reports_rx) = mpsc::channel(4096);
        Arc::new(Self {
            client: ArcSwapOption::empty(),
            routes: ArcSwap::from_pointee(RouteTable::default()),
            revocations: RevocationState::default(),
            identity_ready: AtomicBool::new(false),
            synced: AtomicBool::new(false),
            connected: AtomicBool::new(false),
            identity: ArcSwapOption::empty(),
            workload_id: ArcSwap::from_pointee(Arc::from("")),
            last_heard_ms: AtomicU64::new(0),
            epoch: Instant::now(),
            store_id: std::sync::Mutex::new(String::new()),
            fingerprint_key: ArcSwapOption::empty(),
            reports,
            reports_rx: tokio::sync::Mutex::new(reports_rx),
            reports_dropped: AtomicU64::new(0),
            applied: watch::channel(0).0,
            usage: Arc::new(Usage::new(config.usage_buffer_records)),
            metrics: Arc::new(crate::metrics::Metrics::default()),
            config,
        })
    }

    /// Queues a report for the control plane (sent at once when connected).
    pub fn report(&self, msg: SidecarMessage) {
        if self.reports.try_send(msg).is_err() {
            self.reports_dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Changes whenever a revocation change or snapshot has been applied.
    pub fn applied(&self) -> watch::Receiver<u64> {
        self.applied.subscribe()
    }

    pub fn identity_ready(&self) -> bool {
        self.identity_ready.load(Ordering::Acquire)
    }

    pub fn synced(&self) -> bool {
        self.synced.load(Ordering::Acquire)
    }

    pub fn connected(&self) -> bool {
        self.connected.load(Ordering::Acquire)
    }

    /// Time since the control plane was last heard from.
    pub fn silence(&self) -> Duration {
        self.silence_at(Instant::now())
    }

    fn silence_at(&self, now: Instant) -> Duration {
        let now = u64::try_from(now.saturating_duration_since(self.epoch).as_millis())
            .unwrap_or(u64::MAX);
        Duration::from_millis(now.saturating_sub(self.last_heard_ms.load(Ordering::Acquire)))
    }

    /// Past `max_staleness` without news: the revocation state can no longer
    /// be trusted to be current (invariant I3).
    pub fn stale(&self) -> Option<Duration> {
        self.stale_at(Instant::now())
    }

    /// As [`Self::stale`], at `now` (a request's arrival: no second clock read).
    pub fn stale_at(&self, now: Instant) -> Option<Duration> {
        let silence = self.silence_at(now);
        (self.synced() && silence > self.config.max_staleness).then_some(silence)
    }

    pub fn max_staleness(&self) -> Duration {
        self.config.max_staleness
    }

    fn heard(&self) {
        let now = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_heard_ms.store(now, Ordering::Release);
    }

    /// What readiness still waits for.
    pub fn pending(&self) -> Vec<&'static str> {
        let mut p = Vec::new();
        if !self.identity_ready() {
            p.push("identity");
        }
        if !self.synced() || self.stale().is_some() {
            p.push("control-plane");
        }
        p
    }

    /// The workload's SPIFFE ID ("" until the identity is acquired).
    pub fn workload_id(&self) -> arc_swap::Guard<Arc<Arc<str>>> {
        self.workload_id.load()
    }

    /// The same, as an owned handle (for span attributes).
    pub fn workload_arc(&self) -> Arc<str> {
        Arc::clone(&self.workload_id.load())
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

    /// Runs until `stop`: acquire identity, then keep a session to a control plane.
    pub async fn run(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let work = async {
            let source = self.acquire_identity().await;
            self.session_loop(source).await;
        };
        tokio::select! {
            () = work => {}
            _ = stop.wait_for(|s| *s) => {}
        }
        if let Some(identity) = self.identity.load_full() {
            identity.shutdown().await;
        }
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
                    self.client.store(Some(Arc::new(client.clone())));
                    self.run_session(client, addr).await
                }
                Err(e) => Err(e),
            };
            if self.connected.swap(false, Ordering::AcqRel) {
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

    async fn run_session(
        &self,
        mut client: SidecarApiClient<Channel>,
        addr: &str,
    ) -> Result<(), ControlError> {
        let (tx, rx) = mpsc::channel::<SidecarMessage>(64);
        let store_id = self.store_id.lock().map(|s| s.clone()).unwrap_or_default();
        let applied = self.revocations.applied_seq.load(Ordering::Acquire);
        let hello = SidecarMessage {
            msg: Some(sidecar_message::Msg::Hello(Hello {
                sidecar_version: env!("CARGO_PKG_VERSION").to_owned(),
                store_id,
                last_applied_seq: applied,
                instance_id: self.usage.instance_id.clone(),
            })),
        };
        tx.send(hello)
            .await
            .map_err(|_| ControlError::NotConnected)?;
        let open = client.session(tokio_stream::wrappers::ReceiverStream::new(rx));
        let mut inbound = tokio::time::timeout(self.config.call_timeout, open)
            .await
            .map_err(|_| ControlError::Rpc("session open timed out".into()))?
            .map_err(|s| ControlError::Rpc(format!("{}: {}", s.code(), s.message())))?
            .into_inner();
        let (mut have_state, mut have_routes) = (false, false);
        // Only one session runs at a time, so this lock is never contended.
        let mut reports = self.reports_rx.lock().await;
        let mut strip_tick = tokio::time::interval(self.config.report_interval);
        // Every batch not yet acknowledged is (re)sent on a new session.
        let mut usage = UsageSent {
            upto: 0,
            at: Instant::now(),
        };
        self.send_usage(&tx, &mut usage).await?;
        // Silence: a control plane whose connection stays open but that
        // sends nothing is left for the next address. One deadline, moved
        // only by what arrives (heartbeats come every interval; three missed
        // ones, or `max_staleness` before the first says how often they come).
        let mut silence_limit = self.config.max_staleness;
        let silence = tokio::time::sleep(silence_limit);
        tokio::pin!(silence);
        // A snapshot arriving in parts, applied once complete.
        let mut partial: Option<Snapshot> = None;
        loop {
            let next = tokio::select! {
                next = inbound.message() => next,
                () = &mut silence => {
                    return Err(ControlError::Session(format!(
                        "nothing heard for {silence_limit:?}; trying the next control plane"
                    )));
                }
                Some(report) = reports.recv() => {
                    tx.send(report).await.map_err(|_| ControlError::NotConnected)?;
                    continue;
                }
                () = self.usage.queued.notified() => {
                    self.send_usage(&tx, &mut usage).await?;
                    continue;
                }
                _ = strip_tick.tick() => {
                    // Sent and never acknowledged (the control plane could
                    // not store them): send again; it ignores what it has.
                    if self.usage.pending() > 0 && usage.at.elapsed() > self.config.report_interval * 6 {
                        usage.upto = 0;
                        self.send_usage(&tx, &mut usage).await?;
                    }
                    let routes = self.routes.load();
                    for (upstream, count) in routes.take_strip_counts() {
                        let msg = SidecarMessage {
                            msg: Some(sidecar_message::Msg::Stripped(StripReport { upstream, count })),
                        };
                        tx.send(msg).await.map_err(|_| ControlError::NotConnected)?;
                    }
                    for (upstream, header, count) in routes.take_echo_counts() {
                        let msg = SidecarMessage {
                            msg: Some(sidecar_message::Msg::Echoed(EchoReport { upstream, header, count })),
                        };
                        tx.send(msg).await.map_err(|_| ControlError::NotConnected)?;
                    }
                    continue;
                }
            };
            let next =
                next.map_err(|s| ControlError::Session(format!("{}: {}", s.code(), s.message())))?;
            let Some(ControlMessage { msg: Some(msg) }) = next else {
                return Ok(());
            };
            self.heard();
            silence
                .as_mut()
                .reset(tokio::time::Instant::now() + silence_limit);
            match msg {
                control_message::Msg::Snapshot(part) => {
                    let Some(snapshot) = gather(&mut partial, part)? else {
                        continue;
                    };
                    if let Ok(mut id) = self.store_id.lock() {
                        id.clone_from(&snapshot.store_id);
                    }
                    if let Some(key) = FingerprintKey::from_slice(&snapshot.fingerprint_key) {
                        self.fingerprint_key.store(Some(Arc::new(key)));
                    }
                    let set = RevocationSet::new(snapshot.active).map_err(|e| {
                        tracing::error!(error = %e, "revocation snapshot refused; resyncing");
                        ControlError::Session(e.to_string())
                    })?;
                    tracing::info!(
                        seq = snapshot.seq,
                        active = set.len(),
                        "revocation snapshot applied"
                    );
                    self.apply(set, snapshot.seq, &tx).await?;
                    self.revocations
                        .snapshots_applied
                        .fetch_add(1, Ordering::Relaxed);
                    have_state = true;
                }
                control_message::Msg::Event(event) => {
                    let applied = self.revocations.applied_seq.load(Ordering::Acquire);
                    if event.seq <= applied {
                        continue;
                    }
                    if event.seq != applied + 1 {
                        return Err(ControlError::Session(format!(
                            "gap: got change {} after {applied}; resyncing",
                            event.seq
                        )));
                    }
                    let revocation = event.revocation.ok_or(ControlError::Empty)?;
                    let set = self
                        .revocations
                        .set
                        .load()
                        .with_change(revocation.clone(), event.restored)
                        .map_err(|e| {
                            tracing::error!(seq = event.seq, error = %e, "revocation change refused; resyncing");
                            ControlError::Session(e.to_string())
                        })?;
                    tracing::info!(
                        seq = event.seq,
                        revocation_id = %revocation.id,
                        kind = %revocation.kind,
                        restored = event.restored,
                        "revocation change applied"
                    );
                    self.apply(set, event.seq, &tx).await?;
                    self.revocations
                        .changes_applied
                        .fetch_add(1, Ordering::Relaxed);
                    have_state = true;
                }
                control_message::Msg::Heartbeat(hb) => {
                    let applied = self.revocations.applied_seq.load(Ordering::Acquire);
                    if hb.seq > applied {
                        return Err(ControlError::Session(format!(
                            "control plane is at {} but {applied} was applied; resyncing",
                            hb.seq
                        )));
                    }
                    // Resumed with nothing missed: the state is current.
                    have_state = true;
                    if hb.interval_ms > 0 {
                        silence_limit = (Duration::from_millis(hb.interval_ms) * 3)
                            .min(self.config.max_staleness);
                        silence
                            .as_mut()
                            .reset(tokio::time::Instant::now() + silence_limit);
                    }
                }
                control_message::Msg::UsageAck(ack) => self.usage.ack(ack.batch_seq),
                control_message::Msg::Routes(set) => {
                    if !(self.routes.load().loaded
                        && self.routes.load().policy_version == set.policy_version)
                    {
                        let version = set.policy_version.clone();
                        let table = RouteTable::build(
                            set,
                            &self.routes.load(),
                            &self.config.upstream,
                            &self.metrics,
                        )
                        .map_err(|e| ControlError::Session(e.to_string()))?;
                        self.routes.store(Arc::new(table));
                        tracing::info!(policy_version = %version, "routes updated");
                    }
                    have_routes = true;
                }
            }
            if have_state && have_routes && !self.connected.swap(true, Ordering::AcqRel) {
                self.synced.store(true, Ordering::Release);
                self.metrics.sessions.fetch_add(1, Ordering::Relaxed);
                tracing::info!(control_plane = %addr, "control plane session established");
            }
        }
    }

    /// Sends the usage batches queued after `sent.upto`.
    async fn send_usage(
        &self,
        tx: &mpsc::Sender<SidecarMessage>,
        sent: &mut UsageSent,
    ) -> Result<(), ControlError> {
        for batch in self.usage.pending_after(sent.upto) {
            sent.upto = batch.batch_seq;
            sent.at = Instant::now();
            let msg = SidecarMessage {
                msg: Some(sidecar_message::Msg::Usage(batch)),
            };
            tx.send(msg).await.map_err(|_| ControlError::NotConnected)?;
        }
        Ok(())
    }

    /// Enforces a new revocation state (see `RevocationState::enforce`),
    /// then acknowledges: the acknowledgement means enforced (I7).
    async fn apply(
        &self,
        set: RevocationSet,
        seq: u64,
        tx: &mpsc::Sender<SidecarMessage>,
    ) -> Result<(), ControlError> {
        let workload = self.workload_arc();
        let cut = self.revocations.enforce(set, &workload).await;
        if cut > 0 {
            tracing::info!(seq, credentials = cut, "revoked credentials cut");
        }
        self.applied.send_modify(|v| *v += 1);
        self.revocations.applied_seq.store(seq, Ordering::Release);
        let ack = SidecarMessage {
            msg: Some(sidecar_message::Msg::Ack(Ack { seq })),
        };
        tx.send(ack).await.map_err(|_| ControlError::NotConnected)
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
                    if let Ok(svid) = source.svid() {
                        self.workload_id
                            .store(Arc::new(svid.spiffe_id().to_string().into()));
                    }
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

    fn channel(&self, source: X509Source, addr: &str) -> Result<Channel, ControlError> {
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
        let addr = addr.to_owned();
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
                return Err(ControlError::Session(format!(
                    "snapshot part for {}@{} while gathering {}@{}",
                    part.store_id, part.seq, so_far.store_id, so_far.seq
                )));
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
