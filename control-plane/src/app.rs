//! Wiring: builds the control plane from its config, an identity source and
//! bound listeners, so that tests run the real thing in-process.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use leash_api::v1::sidecar_api_server::SidecarApiServer;
use spiffe::X509Source;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::admin::{self, AdminState};
use crate::jwt::JwtIssuer;
use crate::metrics::Metrics;
use crate::revocations::RevocationLog;
use crate::sessions::SessionRegistry;
use crate::sidecar_api::SidecarService;
use crate::state::{ControlPlaneState, PolicySnapshot};
use crate::store::Store;

#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub policy: PathBuf,
    pub data_dir: PathBuf,
    /// The store's PostgreSQL database; None: SQLite in `data_dir`.
    pub database_url: Option<crate::store::DatabaseUrl>,
    /// `iss` of issued JWTs; defaults to `http://<admin address>`.
    pub issuer: Option<String>,
    /// How often the policy file is checked for changes.
    pub policy_poll: Duration,
    /// How often each sidecar session gets a heartbeat.
    pub heartbeat: Duration,
    /// How often every mission's criteria are computed (closing and
    /// reopening missions).
    pub mission_interval: Duration,
    /// Encrypts brokered secrets; without it, `static` upstreams are denied.
    pub master_key: Option<Arc<crate::secrets::MasterKey>>,
    /// OpenTelemetry export (None: off).
    pub otel: Option<leash_api::telemetry::Otel>,
    /// Invalid admin tokens one client address may present per minute.
    pub admin_auth_failures_per_minute: u32,
    /// Caps and timeouts of both listeners.
    pub limits: crate::listeners::ListenerLimits,
    /// TLS on the admin port (admin API, JWKS, metrics); None: plain HTTP.
    pub admin_tls: Option<crate::listeners::AdminTls>,
    /// How long a provider has to answer a deactivation probe.
    pub probe_timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Policy(#[from] leash_api::policy::PolicyError),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error(transparent)]
    Jwt(#[from] crate::jwt::JwtError),
    #[error("admin TLS: {0}")]
    AdminTls(String),
    #[error("TLS setup: {0}")]
    Tls(#[from] spiffe_rustls::Error),
    #[error("no SVID from the Workload API: {0}")]
    Identity(String),
    #[error("listener: {0}")]
    Io(#[from] std::io::Error),
}

/// On first start (no token in the store) creates an admin token and writes
/// it to `<data_dir>/admin-token`, readable by the owner only.
async fn bootstrap_admin_token(
    store: &Store,
    data_dir: &std::path::Path,
) -> Result<(), StartError> {
    if store.token_count().await? > 0 {
        return Ok(());
    }
    let token = crate::auth::create_token(
        store,
        "bootstrap",
        crate::auth::Role::Admin,
        "leash-control-plane",
    )
    .await?;
    let path = data_dir.join("admin-token");
    write_private(&path, &token)?;
    tracing::info!(path = %path.display(), "created the first admin token");
    Ok(())
}

fn write_private(path: &std::path::Path, text: &str) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(text.as_bytes())?;
    f.write_all(b"\n")
}

/// The store as logged and dumped: the password of a PostgreSQL URL redacted.
fn database_shown(url: Option<&crate::store::DatabaseUrl>) -> String {
    url.map_or_else(
        || "sqlite (leash.db in data_dir)".to_owned(),
        |u| u.redacted(),
    )
}

/// A running control plane.
pub struct ControlPlane {
    pub sidecar_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub state: Arc<ControlPlaneState>,
    /// The admin API's router as served (for in-process tests without a
    /// socket; calls need a `ConnectInfo<SocketAddr>` extension).
    pub admin_router: axum::Router,
    shutdown: watch::Sender<bool>,
    tasks: JoinSet<()>,
    /// Flushed after the sessions end, before the store closes.
    ack_writer: crate::sessions::AckWriter,
}

/// How often refused admin calls are summarised into the audit log.
pub const REFUSED_AUDIT_INTERVAL: Duration = Duration::from_secs(60);

impl ControlPlane {
    pub async fn start(
        config: ServeConfig,
        source: X509Source,
        sidecar_listener: TcpListener,
        admin_listener: TcpListener,
    ) -> Result<Self, StartError> {
        let sidecar_addr = sidecar_listener.local_addr()?;
        let admin_addr = admin_listener.local_addr()?;
        let snapshot = PolicySnapshot::load(&config.policy)?;
        let store = Store::open_at(
            &config.data_dir,
            config.database_url.as_ref(),
            config.master_key.clone(),
        )
        .await?;
        let admin_cert = match &config.admin_tls {
            Some(files) => Some(
                crate::listeners::ReloadingCert::load(files.clone())
                    .map_err(StartError::AdminTls)?,
            ),
            None => None,
        };
        let scheme = if admin_cert.is_some() {
            "https"
        } else {
            "http"
        };
        let issuer_name = config
            .issuer
            .clone()
            .unwrap_or_else(|| format!("{scheme}://{admin_addr}"));
        // Replicas starting at once on an empty store: one creates the first
        // signing key and admin token, the others find them.
        let first_start = store.lease(crate::store::Job::FirstStart).await?;
        let issuer = JwtIssuer::load_or_create(&store, issuer_name).await?;
        bootstrap_admin_token(&store, &config.data_dir).await?;
        first_start.release().await;
        tracing::info!(
            policy = %config.policy.display(),
            policy_version = %snapshot.version,
            upstreams = snapshot.policy.policy.upstreams.len(),
            grants = snapshot.policy.policy.grants.len(),
            data_dir = %config.data_dir.display(),
            database = %database_shown(config.database_url.as_ref()),
            issuer = issuer.issuer(),
            kid = %issuer.active_kid(),
            "control plane starting"
        );
        let metrics = Arc::new(Metrics::default());
        let revocations = RevocationLog::open(store.clone(), metrics.clone()).await?;
        let (sessions, ack_writer) = SessionRegistry::new(store.clone());
        let state = Arc::new(ControlPlaneState {
            policy_path: config.policy.clone(),
            policy: ArcSwap::from_pointee(snapshot),
            policy_changed: watch::channel(()).0,
            issuer,
            store,
            revocations,
            sessions,
            metrics,
            master_key: config.master_key.clone(),
            tokens: crate::oauth2::TokenCache::default(),
            sts: crate::sts::StsCache::default(),
            ssf: crate::ssf::SsfReceiver::default(),
            ssf_out: crate::ssf_out::SsfOut::default(),
            otel: config.otel.clone(),
            refused: crate::unauthenticated::RefusedCalls::default(),
            prober: crate::probes::Prober::new(config.probe_timeout),
            sync_limit: crate::revocations::sync_limit(config.heartbeat),
            replica: crate::replicas::Replica::new(config.heartbeat),
        });
        // Read once before serving: sessions open only on a replica in sync.
        state.revocations.catch_up().await?;
        crate::replicas::register(&state, sidecar_addr, admin_addr).await?;
        if let Some(otel) = &config.otel {
            crate::telemetry::register_observables(otel, &state);
        }
        let (shutdown, _) = watch::channel(false);
        let mut tasks = JoinSet::new();

        // Sidecars must present an SVID of our own trust domain; which upstreams
        // each may use is decided per call from policy.
        let trust_domain = source
            .svid()
            .map_err(|e| StartError::Identity(e.to_string()))?
            .spiffe_id()
            .trust_domain()
            .clone();
        let tls = spiffe_rustls::mtls_server(source.clone())
            .authorize(spiffe_rustls::authorizer::any())
            .trust_domain_policy(spiffe_rustls::LocalOnly(trust_domain))
            .with_alpn_protocols([b"h2"])
            .build()?;
        let incoming = crate::mtls::incoming(
            sidecar_listener,
            Arc::new(tls),
            &config.limits,
            shutdown.subscribe(),
        );
        let service = SidecarService::new(state.clone(), config.heartbeat, shutdown.subscribe());
        let mut stop = shutdown.subscribe();
        tasks.spawn(async move {
            let result = tonic::transport::Server::builder()
                .http2_keepalive_interval(Some(Duration::from_secs(20)))
                .add_service(
                    SidecarApiServer::new(service)
                        .max_decoding_message_size(leash_api::MAX_MESSAGE_BYTES)
                        .max_encoding_message_size(leash_api::MAX_MESSAGE_BYTES),
                )
                .serve_with_incoming_shutdown(incoming, async move {
                    let _ = stop.wait_for(|s| *s).await;
                })
                .await;
            if let Err(e) = result {
                tracing::error!(error = %e, "sidecar API server failed");
            }
        });

        let config_dump = serde_json::json!({
            "version": env!("CARGO_PKG_VERSION"),
            "policy": config.policy,
            "data_dir": config.data_dir,
            "database": database_shown(config.database_url.as_ref()),
            "issuer": state.issuer.issuer(),
            "policy_poll_ms": u64::try_from(config.policy_poll.as_millis()).unwrap_or(u64::MAX),
            "heartbeat_ms": u64::try_from(config.heartbeat.as_millis()).unwrap_or(u64::MAX),
            "master_key": if config.master_key.is_some() { "configured" } else { "absent" },
            "otlp": config.otel.is_some(),
            "listeners": {"sidecar_api": sidecar_addr, "admin": admin_addr},
            "limits": config.limits,
            "admin_tls": config.admin_tls,
            "probe_timeout_ms": u64::try_from(config.probe_timeout.as_millis()).unwrap_or(u64::MAX),
        });
        let limiter = Arc::new(crate::unauthenticated::FailureLimiter::new(
            config.admin_auth_failures_per_minute,
            Duration::from_secs(60),
        ));
        let router = admin::router(AdminState {
            cp: state.clone(),
            source,
            config_dump: Arc::new(config_dump),
            limiter: limiter.clone(),
        });
        // The web console, on the admin port: its pages call the router
        // above in-process.
        let router = router.clone().merge(crate::console::router(
            state.clone(),
            router,
            admin_cert.is_some(),
            limiter,
            shutdown.subscribe(),
        ));
        tasks.spawn(crate::listeners::serve_admin(
            admin_listener,
            router.clone(),
            config.limits.clone(),
            admin_cert,
            shutdown.subscribe(),
        ));

        let mut stop = shutdown.subscribe();
        let watcher = state.clone();
        let poll = config.policy_poll;
        tasks.spawn(async move {
            tokio::select! {
                () = watcher.watch_policy(poll) => {}
                _ = stop.wait_for(|s| *s) => {}
            }
        });

        // Security events polled from the transmitters policy names.
        let mut stop = shutdown.subscribe();
        let poller = state.clone();
        tasks.spawn(async move {
            tokio::select! {
                () = crate::ssf::poll_transmitters(poller) => {}
                _ = stop.wait_for(|s| *s) => {}
            }
        });

        // Refused admin calls go to the audit log as one summary per
        // address and minute (and what is pending at shutdown, below).
        let mut stop = shutdown.subscribe();
        let refused = state.clone();
        tasks.spawn(async move {
            loop {
                let stopped = tokio::select! {
                    () = tokio::time::sleep(REFUSED_AUDIT_INTERVAL) => false,
                    _ = stop.wait_for(|s| *s) => true,
                };
                if let Err(e) = refused.refused.flush(&refused.store).await {
                    tracing::warn!(error = %e, "cannot write the summary of refused admin calls");
                }
                if stopped {
                    return;
                }
            }
        });

        // Changes committed by other replicas (PostgreSQL): applied as
        // they are notified, and read every poll in any case.
        let mut stop = shutdown.subscribe();
        let follow = state.clone();
        let wake = state.store.change_wakeups();
        let poll = crate::revocations::sync_poll(config.heartbeat);
        tasks.spawn(async move {
            let mut failing = false;
            let mut seen = tokio::time::Instant::now();
            loop {
                tokio::select! {
                    () = wake.notified() => {}
                    () = tokio::time::sleep(poll) => {}
                    _ = stop.wait_for(|s| *s) => return,
                }
                let caught_up = follow.revocations.catch_up().await;
                // Seen by the other replicas while it reads the store (at
                // most once a second).
                if caught_up.is_ok() && seen.elapsed() >= Duration::from_secs(1) {
                    seen = tokio::time::Instant::now();
                    if let Err(e) = follow
                        .store
                        .replica_seen(&follow.replica.id, crate::store::now_ms())
                        .await
                    {
                        tracing::warn!(error = %e, "cannot record that this replica is alive");
                    }
                }
                match caught_up {
                    Ok(_) if failing => {
                        failing = false;
                        tracing::info!("reading the store again; sidecar sessions resume here");
                    }
                    Ok(_) => {}
                    Err(e) if !failing => {
                        failing = true;
                        tracing::error!(error = %e, "cannot read the store; this replica stops vouching for sidecars' state once it is out of sync");
                    }
                    Err(_) => {}
                }
            }
        });

        // The enforced set stays bounded: revocations of credentials that
        // have expired everywhere are dropped from it (and from snapshots).
        let mut stop = shutdown.subscribe();
        let prune = state.clone();
        tasks.spawn(async move {
            loop {
                if let Err(e) = prune
                    .revocations
                    .prune_expired(crate::store::now_ms())
                    .await
                {
                    tracing::warn!(error = %e, "cannot prune revocations of expired credentials");
                }
                // SETs held for streams removed from policy.
                match prune.ssf_out.sweep(&prune).await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(sets = n, "dropped the SETs of SSF streams gone"),
                    Err(e) => tracing::warn!(error = %e, "cannot sweep the SSF outbox"),
                }
                // Sessions a killed replica left open are ended.
                match prune
                    .store
                    .end_sessions_of_gone_replicas(
                        &prune.replica.id,
                        prune.replica.live_since_ms(),
                        crate::store::now_ms(),
                    )
                    .await
                {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(sessions = n, "ended the sessions of replicas gone"),
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot end the sessions of replicas gone")
                    }
                }
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_secs(60)) => {}
                    _ = stop.wait_for(|s| *s) => return,
                }
            }
        });

        // Missions close and reopen themselves as their criteria change.
        let mut stop = shutdown.subscribe();
        let sweep = state.clone();
        let every = config.mission_interval;
        tasks.spawn(async move {
            loop {
                tokio::select! {
                    () = tokio::time::sleep(every) => {}
                    _ = stop.wait_for(|s| *s) => return,
                }
                // One replica at a time; the others skip this round.
                let lease = match sweep.store.try_lease(crate::store::Job::MissionSweep).await {
                    Ok(Some(lease)) => lease,
                    Ok(None) => continue,
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot compute the missions' criteria");
                        continue;
                    }
                };
                if let Err(e) = crate::missions::sweep(&sweep, &sweep.metrics.missions).await {
                    tracing::warn!(error = %e, "cannot compute the missions' criteria");
                }
                lease.release().await;
            }
        });

        let mut stop = shutdown.subscribe();
        let keys = state.clone();
        tasks.spawn(async move {
            loop {
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_secs(5)) => {}
                    _ = stop.wait_for(|s| *s) => return,
                }
                if let Err(e) = keys.issuer.reload(&keys.store).await {
                    tracing::warn!(error = %e, "cannot reload signing keys");
                }
            }
        });

        tracing::info!(%sidecar_addr, %admin_addr, "control plane ready");
        Ok(Self {
            sidecar_addr,
            admin_addr,
            state,
            admin_router: router,
            shutdown,
            tasks,
            ack_writer,
        })
    }

    /// Stops accepting, lets in-flight calls finish, records the
    /// acknowledgements still queued (all within `drain`), closes the store.
    pub async fn shutdown(mut self, drain: Duration) {
        let deadline = tokio::time::Instant::now() + drain;
        let _ = self.shutdown.send(true);
        let drained = tokio::time::timeout_at(deadline, async {
            while self.tasks.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            tracing::warn!("drain timed out; aborting remaining tasks");
            self.tasks.abort_all();
        }
        // The sessions have ended: no acknowledgement arrives after this.
        self.ack_writer
            .flush(deadline.saturating_duration_since(tokio::time::Instant::now()))
            .await;
        if let Err(e) = self
            .state
            .store
            .replica_stopped(&self.state.replica.id, crate::store::now_ms())
            .await
        {
            tracing::warn!(error = %e, "cannot record that this replica stopped");
        }
        self.state.store.close().await;
    }
}
