//! Test support: starts the real dev Workload API, control plane, sidecar and
//! example upstream in-process on 127.0.0.1 ephemeral ports, and offers an
//! `eventually` helper instead of sleeps.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test and benchmark support: a failed setup step should stop the run with its message"
)]

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use leash_api::identity::IdentityConfig;
use leash_control_plane::app::{ControlPlane, ServeConfig};
use leash_control_plane::devid::{DevCa, DevIdentityProvider};
use leash_proxy::{ControlConfig, Limits, Sidecar, SidecarConfig, UpstreamTimeouts};
use tokio::net::TcpListener;
use tokio::sync::watch;

pub const TRUST_DOMAIN: &str = "leash.test";
pub const CP_ID: &str = "spiffe://leash.test/leash/control-plane";
pub const APP_ID: &str = "spiffe://leash.test/ns/demo/sa/client";
pub const OTHER_ID: &str = "spiffe://leash.test/ns/other/sa/intruder";

/// Logs to the test output when `RUST_LOG` is set.
pub fn init() {
    leash_api::identity::install_crypto_provider();
    leash_api::process::init_test_logging();
}

/// Everything this test process logs from now on, at debug level: installs
/// the process-wide subscriber once (call it before anything that logs, in
/// every test of a binary that searches its logs).
pub fn captured_logs() -> Arc<std::sync::Mutex<Vec<u8>>> {
    #[derive(Clone)]
    struct Captured(Arc<std::sync::Mutex<Vec<u8>>>);
    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    static LOGS: std::sync::OnceLock<Arc<std::sync::Mutex<Vec<u8>>>> = std::sync::OnceLock::new();
    LOGS.get_or_init(|| {
        let buf = Arc::new(std::sync::Mutex::new(Vec::new()));
        let writer = Captured(buf.clone());
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new("debug"))
            .with_writer(move || writer.clone())
            .init();
        buf
    })
    .clone()
}

/// Asserts that no `(what, value)` appears in plaintext in the captured
/// logs or the SQLite files of `data_dir` (read after the control plane
/// shut down).
pub fn assert_nowhere(data_dir: &Path, values: &[(&str, &str)]) {
    let mut haystacks = vec![("logs".to_owned(), captured_logs().lock().unwrap().clone())];
    for file in ["leash.db", "leash.db-wal", "leash.db-shm"] {
        if let Ok(bytes) = std::fs::read(data_dir.join(file)) {
            haystacks.push((file.to_owned(), bytes));
        }
    }
    assert!(haystacks[0].1.len() > 1_000, "the logs were captured");
    for (name, bytes) in &haystacks {
        for (what, value) in values {
            assert!(
                !bytes.windows(value.len()).any(|w| w == value.as_bytes()),
                "{name} contains the {what} in plaintext"
            );
        }
    }
}

/// Polls `check` until it returns `Some`, or fails after `timeout`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

pub async fn listener() -> TcpListener {
    TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind 127.0.0.1:0")
}

/// A short temp dir (Unix socket paths are limited to 108 bytes).
pub fn short_tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("lsh")
        .tempdir_in("/tmp")
        .expect("tempdir")
}

/// The dev Workload API: one socket per SPIFFE ID.
pub struct Identities {
    pub provider: DevIdentityProvider,
    stop: watch::Sender<bool>,
    pub dir: PathBuf,
}

impl Identities {
    pub fn start(dir: &Path, svid_ttl: Duration, ids: &[&str]) -> Self {
        let ca = DevCa::new(TRUST_DOMAIN).expect("dev CA");
        let mut provider = DevIdentityProvider::new(ca, svid_ttl);
        let (stop, rx) = watch::channel(false);
        for id in ids {
            let path = dir.join(socket_name(id));
            provider
                .serve(&path, id, rx.clone())
                .expect("serve identity");
        }
        Self {
            provider,
            stop,
            dir: dir.to_owned(),
        }
    }

    pub fn socket(&self, id: &str) -> PathBuf {
        self.dir.join(socket_name(id))
    }

    pub fn endpoint(&self, id: &str) -> String {
        format!("unix://{}", self.socket(id).display())
    }

    pub fn stop(&self) {
        let _ = self.stop.send(true);
    }
}

fn socket_name(id: &str) -> String {
    let tail: String = id
        .rsplit('/')
        .next()
        .unwrap_or("id")
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .collect();
    format!("{tail}.sock")
}

/// Writes `policy` to `<dir>/policy.yaml` and returns the path.
pub fn write_policy(dir: &Path, policy: &str) -> PathBuf {
    let path = dir.join("policy.yaml");
    std::fs::write(&path, policy).expect("write policy");
    path
}

/// A policy file built in code: upstreams (a JWT credential with a 5-minute
/// lifetime unless changed) and grants, written as the YAML an operator
/// would write. Tests say what differs from the usual, not the whole file.
#[derive(Clone)]
pub struct PolicyBuilder {
    policy: leash_api::policy::Policy,
}

impl Default for PolicyBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl PolicyBuilder {
    pub fn new() -> Self {
        Self {
            policy: leash_api::policy::Policy {
                version: 1,
                upstreams: Vec::new(),
                grants: Vec::new(),
                ssf: None,
            },
        }
    }

    /// An upstream `name` reached at `target` (`http://host:port` or an
    /// address, taken as plain HTTP), called as `<name>.leash.test`.
    pub fn upstream(mut self, name: &str, target: impl std::fmt::Display) -> Self {
        let target = target.to_string();
        let target = if target.contains("://") {
            target
        } else {
            format!("http://{target}")
        };
        self.policy.upstreams.push(leash_api::policy::Upstream {
            name: name.to_owned(),
            hosts: vec![format!("{name}.leash.test")],
            target,
            tls: None,
            credential: leash_api::policy::CredentialSpec {
                kind: leash_api::policy::CredentialKind::Jwt,
                ttl: Duration::from_secs(300),
                audience: None,
                token_url: None,
                client_id: None,
                scopes: Vec::new(),
                role_arn: None,
                sts_url: None,
                resource: None,
            },
            inject: leash_api::policy::InjectSpec::default(),
            scan_body_bytes: 0,
            deactivation_probe: None,
            intercept: false,
            passthrough: false,
        });
        self
    }

    /// Changes the upstream added last.
    pub fn with(mut self, change: impl FnOnce(&mut leash_api::policy::Upstream)) -> Self {
        let last = self
            .policy
            .upstreams
            .last_mut()
            .expect("with() follows upstream()");
        change(last);
        self
    }

    /// The last upstream's credential lifetime (`"5m"`, `"2s"`).
    pub fn ttl(self, ttl: &str) -> Self {
        let ttl = humantime_parse(ttl);
        self.with(|u| u.credential.ttl = ttl)
    }

    /// The last upstream's credential is a brokered static secret.
    pub fn static_secret(self) -> Self {
        self.with(|u| u.credential.kind = leash_api::policy::CredentialKind::Static)
    }

    /// The last upstream's credential goes in `header` as `format`
    /// (`"{token}"`, `"Bearer {token}"`).
    pub fn header(self, header: &str, format: &str) -> Self {
        let inject = leash_api::policy::InjectSpec::Header {
            name: header.to_owned(),
            format: format.to_owned(),
        };
        self.with(|u| u.inject = inject)
    }

    /// Scan this many bytes of the last upstream's request bodies.
    pub fn scan_body(self, bytes: u32) -> Self {
        self.with(|u| u.scan_body_bytes = bytes)
    }

    /// Grants `workload` (an ID or a `/*` prefix) the named upstreams.
    pub fn grant(mut self, workload: &str, upstreams: &[&str]) -> Self {
        self.policy.grants.push(leash_api::policy::Grant {
            workload: workload.to_owned(),
            upstreams: upstreams.iter().map(|u| (*u).to_owned()).collect(),
        });
        self
    }

    pub fn yaml(&self) -> String {
        serde_yaml_ng::to_string(&self.policy).expect("policy serialises")
    }

    /// Writes `<dir>/policy.yaml`.
    pub fn write(&self, dir: &Path) -> PathBuf {
        write_policy(dir, &self.yaml())
    }
}

fn humantime_parse(s: &str) -> Duration {
    humantime::parse_duration(s).unwrap_or_else(|e| panic!("duration {s:?}: {e}"))
}

/// A policy with a `payments` upstream at `upstream`, granted to APP_ID, and
/// a `ledger` upstream granted to nobody.
pub fn standard_policy(upstream: SocketAddr, ttl: &str) -> String {
    PolicyBuilder::new()
        .upstream("payments", upstream)
        .ttl(ttl)
        .upstream("ledger", upstream)
        .ttl(ttl)
        .grant(APP_ID, &["payments"])
        .yaml()
}

pub async fn start_control_plane(
    ids: &Identities,
    cp_id: &str,
    policy: &Path,
    data_dir: &Path,
) -> ControlPlane {
    start_control_plane_on(ids, cp_id, policy, data_dir, listener().await).await
}

pub async fn start_control_plane_on(
    ids: &Identities,
    cp_id: &str,
    policy: &Path,
    data_dir: &Path,
    sidecar_listener: TcpListener,
) -> ControlPlane {
    start_control_plane_full(ids, cp_id, policy, data_dir, sidecar_listener, None).await
}

/// As `start_control_plane_on`, exporting OpenTelemetry when `otel` is given.
pub async fn start_control_plane_full(
    ids: &Identities,
    cp_id: &str,
    policy: &Path,
    data_dir: &Path,
    sidecar_listener: TcpListener,
    otel: Option<leash_api::telemetry::Otel>,
) -> ControlPlane {
    start_control_plane_limited(
        ids,
        cp_id,
        policy,
        data_dir,
        sidecar_listener,
        otel,
        Default::default(),
    )
    .await
}

/// As `start_control_plane_full`, with the listeners' caps and timeouts.
pub async fn start_control_plane_limited(
    ids: &Identities,
    cp_id: &str,
    policy: &Path,
    data_dir: &Path,
    sidecar_listener: TcpListener,
    otel: Option<leash_api::telemetry::Otel>,
    limits: leash_control_plane::listeners::ListenerLimits,
) -> ControlPlane {
    start_control_plane_configured(ids, cp_id, policy, data_dir, sidecar_listener, |c| {
        c.otel = otel;
        c.limits = limits;
    })
    .await
}

/// The variable that runs the end-to-end suite on PostgreSQL: a server URL
/// (any database; a role that may create databases). Each data directory
/// gets a database of its own there, so a control plane restarted on the
/// same directory finds its store. `.ci/run` runs the suite once on SQLite
/// and once with this set.
pub const E2E_DATABASE_URL: &str = "LEASH_E2E_DATABASE_URL";

/// Whether this run keeps the control planes' stores in PostgreSQL (tests
/// that read the SQLite file itself skip, saying so).
pub fn on_postgres() -> bool {
    std::env::var_os(E2E_DATABASE_URL).is_some()
}

/// The PostgreSQL database of `data_dir`, created on first use, when the
/// suite runs on PostgreSQL.
async fn e2e_database(data_dir: &Path) -> Option<leash_control_plane::store::DatabaseUrl> {
    use sqlx::Connection as _;
    let server = std::env::var(E2E_DATABASE_URL).ok()?;
    let digest = ring::digest::digest(
        &ring::digest::SHA256,
        data_dir.display().to_string().as_bytes(),
    );
    let name = format!("leash_e2e_{}", hex::encode(&digest.as_ref()[..10]));
    let mut conn = sqlx::PgConnection::connect(&server)
        .await
        .unwrap_or_else(|e| panic!("cannot reach {E2E_DATABASE_URL}: {e}"));
    let exists: Option<i32> = sqlx::query_scalar("SELECT 1 FROM pg_database WHERE datname = $1")
        .bind(&name)
        .fetch_optional(&mut conn)
        .await
        .unwrap();
    if exists.is_none() {
        // Byte-order collation, as SQLite compares text.
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "CREATE DATABASE {name} TEMPLATE template0 ENCODING 'UTF8' LC_COLLATE 'C' LC_CTYPE 'C'"
        )))
        .execute(&mut conn)
        .await
        .unwrap_or_else(|e| panic!("cannot create database {name}: {e}"));
    }
    let _ = conn.close().await;
    let (base, _) = server
        .rsplit_once('/')
        .expect("a database in the server URL");
    let url = format!("{base}/{name}");
    Some(leash_control_plane::store::DatabaseUrl::parse(&url).unwrap())
}

/// The control plane's configuration as tests run it.
pub async fn test_config(policy: &Path, data_dir: &Path) -> ServeConfig {
    ServeConfig {
        policy: policy.to_owned(),
        data_dir: data_dir.to_owned(),
        database_url: e2e_database(data_dir).await,
        issuer: Some("leash-test".into()),
        policy_poll: Duration::from_millis(100),
        heartbeat: Duration::from_millis(500),
        mission_interval: Duration::from_millis(200),
        master_key: Some(std::sync::Arc::new(test_master_key(data_dir))),
        otel: None,
        admin_auth_failures_per_minute: 10,
        limits: Default::default(),
        admin_tls: None,
        probe_timeout: leash_control_plane::probes::DEFAULT_TIMEOUT,
    }
}

/// The control plane as tests run it, with `configure` applied to its
/// configuration first.
pub async fn start_control_plane_configured(
    ids: &Identities,
    cp_id: &str,
    policy: &Path,
    data_dir: &Path,
    sidecar_listener: TcpListener,
    configure: impl FnOnce(&mut ServeConfig),
) -> ControlPlane {
    let source = leash_api::identity::x509_source(&ids.endpoint(cp_id), Duration::from_secs(10))
        .await
        .expect("control plane identity");
    let mut config = test_config(policy, data_dir).await;
    configure(&mut config);
    ControlPlane::start(config, source, sidecar_listener, listener().await)
        .await
        .expect("control plane starts")
}

impl Deployment {
    /// Stops the control plane and starts it again on the same data
    /// directory and the same two addresses: a restart, as a responder's
    /// browser and the sidecars see it.
    pub async fn restart_control_plane(self) -> Self {
        let Self {
            seen,
            dir,
            ids,
            cp,
            sidecar,
            upstream,
            client,
        } = self;
        let (sidecar_addr, admin_addr) = (cp.sidecar_addr, cp.admin_addr);
        cp.shutdown(Duration::from_secs(5)).await;
        let source =
            leash_api::identity::x509_source(&ids.endpoint(CP_ID), Duration::from_secs(10))
                .await
                .expect("control plane identity");
        let policy = dir.path().join("policy.yaml");
        let data = dir.path().join("data");
        let cp = ControlPlane::start(
            test_config(&policy, &data).await,
            source,
            TcpListener::bind(sidecar_addr)
                .await
                .expect("the sidecar API address again"),
            TcpListener::bind(admin_addr)
                .await
                .expect("the admin address again"),
        )
        .await
        .expect("control plane restarts");
        Self {
            seen,
            dir,
            ids,
            cp,
            sidecar,
            upstream,
            client,
        }
    }
}

/// The deployment's master key, kept beside its data directory so that a
/// restarted control plane can still decrypt what it stored.
pub fn test_master_key(data_dir: &Path) -> leash_control_plane::secrets::MasterKey {
    use leash_control_plane::secrets::MasterKey;
    let file = data_dir.with_file_name("master.key");
    if !file.exists() {
        std::fs::write(&file, MasterKey::generate_base64()).expect("write master key");
    }
    MasterKey::from_file(&file).expect("master key")
}

pub fn sidecar_config(endpoint: String, cp_addr: SocketAddr) -> SidecarConfig {
    sidecar_config_with(IdentityConfig::WorkloadApi(endpoint), cp_addr)
}

pub fn sidecar_config_with(identity: IdentityConfig, cp_addr: SocketAddr) -> SidecarConfig {
    SidecarConfig {
        control: ControlConfig {
            identity,
            control_planes: vec![cp_addr.to_string()],
            control_plane_id: CP_ID.into(),
            max_staleness: Duration::from_secs(30),
            report_interval: Duration::from_millis(200),
            usage_buffer_records: 100_000,
            call_timeout: Duration::from_secs(5),
            upstream: UpstreamTimeouts {
                connect: Duration::from_secs(2),
                pool_idle: Duration::from_secs(30),
                max_connections: 1024,
            },
        },
        limits: Limits::default(),
        upstream_response_timeout: Duration::from_secs(10),
        otel: None,
        usage_reporting: true,
        intercept_ca_file: None,
    }
}

pub async fn start_sidecar(config: SidecarConfig) -> Sidecar {
    Sidecar::start(config, listener().await, listener().await, Vec::new()).expect("sidecar starts")
}

/// A plain HTTP client that sends every request through `proxy`
/// (absolute-form), on a new connection per request, or on one connection
/// kept alive (`kept_alive`) as SDKs do.
pub struct ProxyClient {
    proxy: SocketAddr,
    /// The kept-alive connection, when this client keeps one.
    kept: Option<tokio::sync::Mutex<Option<Sender>>>,
}

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

pub struct Answer {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

impl Answer {
    async fn read(resp: http::Response<hyper::body::Incoming>) -> anyhow::Result<Self> {
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = resp.into_body().collect().await?.to_bytes();
        Ok(Self {
            status,
            headers,
            body,
        })
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", String::from_utf8_lossy(&self.body)))
    }
}

impl ProxyClient {
    pub fn new(proxy: SocketAddr) -> Self {
        Self { proxy, kept: None }
    }

    /// A client that sends its requests one after another on one
    /// connection, opening a new one only when the sidecar closed it.
    pub fn kept_alive(proxy: SocketAddr) -> Self {
        Self {
            proxy,
            kept: Some(tokio::sync::Mutex::new(None)),
        }
    }

    async fn connect(&self) -> anyhow::Result<Sender> {
        let stream = tokio::net::TcpStream::connect(self.proxy).await?;
        let (sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        Ok(sender)
    }

    /// `url` is absolute (`http://host/path`); headers are added as given.
    pub async fn get(&self, url: &str, headers: &[(&str, &str)]) -> anyhow::Result<Answer> {
        self.send("GET", url, headers, Bytes::new()).await
    }

    /// As `get`, with any method and a body (sent with its length).
    pub async fn send(
        &self,
        method: &str,
        url: &str,
        headers: &[(&str, &str)],
        body: Bytes,
    ) -> anyhow::Result<Answer> {
        // A forward proxy gets the absolute URL as the request target, as
        // clients honouring HTTP_PROXY send it; hyper's connection API writes
        // the URI as given.
        let uri: http::Uri = url.parse()?;
        let mut req = http::Request::builder()
            .method(method)
            .uri(uri.clone())
            .header(
                http::header::HOST,
                uri.authority().map(|a| a.as_str()).unwrap_or(""),
            );
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req.body(Full::new(body))?;
        let resp = match &self.kept {
            None => self.connect().await?.send_request(req).await,
            Some(kept) => {
                let mut kept = kept.lock().await;
                let mut sender = match kept.take() {
                    Some(mut s) => match s.ready().await {
                        Ok(()) => s,
                        Err(_) => self.connect().await?,
                    },
                    None => self.connect().await?,
                };
                let resp = sender.send_request(req).await;
                *kept = Some(sender);
                resp
            }
        };
        Answer::read(resp.context("send")?).await
    }
}

/// Requests sent in a loop through a sidecar by `clients` kept-alive
/// clients until stopped, counting what was answered as `ok` says and what
/// was not: the background traffic of the "under load" tests.
pub struct Load {
    stop: Arc<std::sync::atomic::AtomicBool>,
    pub ok: Arc<std::sync::atomic::AtomicU64>,
    pub failed: Arc<std::sync::atomic::AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    pub fn start(
        proxy: SocketAddr,
        clients: usize,
        url: &str,
        ok: impl Fn(&Answer) -> bool + Send + Sync + 'static,
    ) -> Self {
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        let stop = Arc::new(AtomicBool::new(false));
        let (good, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let judge = Arc::new(ok);
        let tasks = (0..clients)
            .map(|_| {
                let (stop, good, failed, judge) =
                    (stop.clone(), good.clone(), failed.clone(), judge.clone());
                let client = ProxyClient::kept_alive(proxy);
                let url = url.to_owned();
                tokio::spawn(async move {
                    while !stop.load(Ordering::Relaxed) {
                        match client.get(&url, &[]).await {
                            Ok(a) if judge(&a) => good.fetch_add(1, Ordering::Relaxed),
                            _ => failed.fetch_add(1, Ordering::Relaxed),
                        };
                    }
                })
            })
            .collect();
        Self {
            stop,
            ok: good,
            failed,
            tasks,
        }
    }

    /// Requests answered so far, as judged and not.
    pub fn done(&self) -> u64 {
        use std::sync::atomic::Ordering;
        self.ok.load(Ordering::Relaxed) + self.failed.load(Ordering::Relaxed)
    }

    /// Waits until `n` more requests have been answered (an observation
    /// window measured in requests, not in time).
    pub async fn advance(&self, n: u64) {
        let until = self.done() + n;
        eventually(
            Duration::from_secs(30),
            &format!("{n} more requests"),
            || async { (self.done() >= until).then_some(()) },
        )
        .await;
    }

    /// Stops the clients; returns (ok, failed).
    pub async fn stop(self) -> (u64, u64) {
        use std::sync::atomic::Ordering;
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            let _ = t.await;
        }
        (
            self.ok.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
        )
    }
}

/// Everything for one end-to-end scenario.
pub struct Deployment {
    /// Every request the upstream received, in order.
    pub seen: std::sync::Arc<std::sync::Mutex<Vec<leash_examples::Seen>>>,
    pub dir: tempfile::TempDir,
    pub ids: Identities,
    pub cp: ControlPlane,
    pub sidecar: Sidecar,
    pub upstream: SocketAddr,
    pub client: ProxyClient,
}

impl Deployment {
    /// Identity, control plane, upstream and sidecar, with credentials of `ttl`.
    pub async fn start(ttl: &str, svid_ttl: Duration) -> Self {
        let ttl = ttl.to_owned();
        Self::start_with(move |up| standard_policy(up, &ttl), svid_ttl, None).await
    }

    /// As `start`, with the policy made from the upstream's address, and the
    /// upstream serving HTTPS when `upstream_tls` is given.
    pub async fn start_with(
        policy: impl FnOnce(SocketAddr) -> String,
        svid_ttl: Duration,
        upstream_tls: Option<tokio_rustls::TlsAcceptor>,
    ) -> Self {
        init();
        let dir = short_tempdir();
        let ids = Identities::start(dir.path(), svid_ttl, &[CP_ID, APP_ID, OTHER_ID]);
        // The upstream needs the JWKS URL, which needs the control plane's
        // admin port, and the policy needs the upstream's port: bind first.
        let up_listener = listener().await;
        let upstream = up_listener.local_addr().expect("addr");
        let policy = write_policy(dir.path(), &policy(upstream));
        let cp = start_control_plane(&ids, CP_ID, &policy, &dir.path().join("data")).await;
        let seen = leash_examples::Observer::default();
        tokio::spawn(leash_examples::serve_observed(
            up_listener,
            upstream_config(cp.admin_addr),
            upstream_tls,
            Some(seen.clone()),
        ));
        let sidecar = start_sidecar(sidecar_config(ids.endpoint(APP_ID), cp.sidecar_addr)).await;
        let client = ProxyClient::new(sidecar.egress_addr);
        wait_ready(sidecar.admin_addr).await;
        Self {
            seen,
            dir,
            ids,
            cp,
            sidecar,
            upstream,
            client,
        }
    }

    /// Verifies a Leash JWT the way an upstream would (JWKS, `aud` payments).
    pub async fn verify(&self, token: &str) -> Result<leash_examples::LeashClaims, String> {
        leash_examples::Verifier::new(upstream_config(self.cp.admin_addr))
            .verify(token)
            .await
    }
}

pub fn upstream_config(cp_admin: SocketAddr) -> leash_examples::UpstreamConfig {
    leash_examples::UpstreamConfig {
        jwks_url: format!("http://{cp_admin}/.well-known/jwks.json"),
        audience: "payments".into(),
        issuer: Some("leash-test".into()),
    }
}

/// Plain GET, no proxy.
pub async fn http_get(url: &str) -> anyhow::Result<Answer> {
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    Answer::read(client.get(url.parse()?).await?).await
}

pub async fn wait_ready(admin: SocketAddr) {
    eventually(Duration::from_secs(15), "sidecar ready", || async move {
        match http_get(&format!("http://{admin}/readyz")).await {
            Ok(a) if a.status == 200 => Some(()),
            _ => None,
        }
    })
    .await;
}

fn pem(label: &str, der: &[u8]) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).unwrap_or_default());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// Writes an SVID issued by `ca` as PEM files (cert, PKCS#8 key, bundle),
/// replacing each file atomically as a rotation tool would.
pub fn write_svid_files(
    dir: &Path,
    ca: &leash_control_plane::devid::DevCa,
    id: &str,
    ttl: Duration,
) -> leash_api::identity::SvidFiles {
    let m = ca.issue(id, ttl).expect("issue SVID");
    let files = leash_api::identity::SvidFiles {
        cert: dir.join("svid.pem"),
        key: dir.join("svid-key.pem"),
        bundle: dir.join("bundle.pem"),
    };
    let write = |path: &Path, text: String| {
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, text).expect("write");
        std::fs::rename(&tmp, path).expect("rename");
    };
    write(&files.key, pem("PRIVATE KEY", &m.key_pkcs8));
    write(&files.bundle, ca.bundle_pem());
    write(&files.cert, pem("CERTIFICATE", &m.leaf_der));
    files
}

/// An admin API client with a token.
#[derive(Clone)]
pub struct Admin {
    pub addr: SocketAddr,
    pub token: Option<String>,
}

impl Admin {
    /// The bootstrap admin token the control plane wrote to its data dir.
    pub fn bootstrap(addr: SocketAddr, data_dir: &Path) -> Self {
        let token =
            std::fs::read_to_string(data_dir.join("admin-token")).expect("admin-token file");
        Self {
            addr,
            token: Some(token.trim().to_owned()),
        }
    }

    pub fn with_token(&self, token: Option<&str>) -> Self {
        Self {
            addr: self.addr,
            token: token.map(str::to_owned),
        }
    }

    pub async fn call(&self, method: &str, path: &str, body: Option<String>) -> Answer {
        let client: Client<HttpConnector, Full<Bytes>> =
            Client::builder(TokioExecutor::new()).build_http();
        let mut req = http::Request::builder()
            .method(method)
            .uri(format!("http://{}{path}", self.addr))
            .header("content-type", "application/json");
        if let Some(t) = &self.token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        let req = req
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .expect("request");
        Answer::read(client.request(req).await.expect("admin API reachable"))
            .await
            .expect("admin API answer")
    }

    pub async fn get(&self, path: &str) -> Answer {
        self.call("GET", path, None).await
    }

    pub async fn post(&self, path: &str, body: serde_json::Value) -> Answer {
        self.call("POST", path, Some(body.to_string())).await
    }

    /// Revokes and returns the revocation's JSON; panics unless 201.
    pub async fn revoke(&self, body: serde_json::Value) -> serde_json::Value {
        let a = self.post("/v1/revocations", body).await;
        assert_eq!(
            a.status,
            201,
            "revoke failed: {}",
            String::from_utf8_lossy(&a.body)
        );
        a.json()
    }

    /// Waits until `sessions` sidecars have acknowledged revocation `id` and
    /// none is pending; returns the propagation JSON.
    pub async fn wait_acknowledged(&self, id: &str, sessions: usize) -> serde_json::Value {
        eventually(
            Duration::from_secs(10),
            "acknowledged by every sidecar",
            || async {
                let a = self.get(&format!("/v1/revocations/{id}")).await;
                let p = a.json()["propagation"].clone();
                let acked = p["acknowledged"].as_array().map_or(0, Vec::len);
                let pending = p["pending"].as_array().map_or(1, Vec::len);
                (acked >= sessions && pending == 0).then_some(p)
            },
        )
        .await
    }
}

impl Deployment {
    pub fn admin(&self) -> Admin {
        Admin::bootstrap(self.cp.admin_addr, &self.dir.path().join("data"))
    }
}

/// One sample of a Prometheus text exposition.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: std::collections::BTreeMap<String, String>,
    pub value: f64,
}

/// Parses the Prometheus text format (0.0.4) strictly: every line must be a
/// `# HELP`/`# TYPE` comment or a sample of a declared family, names and
/// label names must be valid, label values properly quoted and escaped, and
/// each histogram's buckets cumulative and ending in `+Inf` = `_count`.
/// Panics with the offending line otherwise.
pub fn parse_prometheus(text: &str) -> Vec<Sample> {
    fn name_ok(n: &str, colon: bool) -> bool {
        let mut chars = n.chars();
        chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || (colon && c == ':'))
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || (colon && c == ':'))
    }
    let mut types: std::collections::HashMap<String, String> = Default::default();
    let mut samples = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let bad = |why: &str| -> ! { panic!("line {}: {why}: {line:?}", i + 1) };
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# ") {
            let mut parts = rest.splitn(3, ' ');
            match (parts.next(), parts.next(), parts.next()) {
                (Some("HELP"), Some(n), Some(_)) if name_ok(n, true) => {}
                (Some("TYPE"), Some(n), Some(t)) if name_ok(n, true) => {
                    if !["counter", "gauge", "histogram", "summary", "untyped"].contains(&t) {
                        bad("unknown type");
                    }
                    if types.insert(n.to_owned(), t.to_owned()).is_some() {
                        bad("family declared twice");
                    }
                }
                _ => bad("malformed comment"),
            }
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| bad("no value"));
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v.parse().unwrap_or_else(|_| bad("value is not a number")),
        };
        let (name, labels) = match series.split_once('{') {
            None => (series, std::collections::BTreeMap::new()),
            Some((name, rest)) => {
                let body = rest
                    .strip_suffix('}')
                    .unwrap_or_else(|| bad("unclosed labels"));
                let mut labels = std::collections::BTreeMap::new();
                let mut chars = body.chars().peekable();
                while chars.peek().is_some() {
                    let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
                    if !name_ok(&key, false) {
                        bad("bad label name");
                    }
                    if chars.next() != Some('"') {
                        bad("label value not quoted");
                    }
                    let mut v = String::new();
                    loop {
                        match chars.next() {
                            Some('\\') => match chars.next() {
                                Some('n') => v.push('\n'),
                                Some(c @ ('\\' | '"')) => v.push(c),
                                _ => bad("bad escape"),
                            },
                            Some('"') => break,
                            Some(c) => v.push(c),
                            None => bad("unterminated label value"),
                        }
                    }
                    if labels.insert(key, v).is_some() {
                        bad("label repeated");
                    }
                    match chars.next() {
                        None | Some(',') => {}
                        _ => bad("junk after a label"),
                    }
                }
                (name, labels)
            }
        };
        if !name_ok(name, true) {
            bad("bad metric name");
        }
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| {
                name.strip_suffix(s)
                    .filter(|f| types.get(*f).is_some_and(|t| t == "histogram"))
            })
            .unwrap_or(name);
        if !types.contains_key(family) {
            bad("sample of a family with no # TYPE before it");
        }
        samples.push(Sample {
            name: name.to_owned(),
            labels,
            value,
        });
    }
    // Histograms: cumulative buckets ending in +Inf == _count.
    for (family, _) in types.iter().filter(|(_, t)| *t == "histogram") {
        let bucket = format!("{family}_bucket");
        let mut series: std::collections::BTreeMap<_, Vec<(f64, f64)>> = Default::default();
        for s in samples.iter().filter(|s| s.name == bucket) {
            let mut key = s.labels.clone();
            let le = key.remove("le").expect("bucket without le");
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().expect("le")
            };
            series.entry(key).or_default().push((le, s.value));
        }
        for (key, buckets) in series {
            assert!(
                buckets
                    .windows(2)
                    .all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1),
                "{family}{key:?}: buckets not cumulative"
            );
            let last = buckets.last().expect("buckets");
            assert!(last.0.is_infinite(), "{family}{key:?}: no +Inf bucket");
            let count = samples
                .iter()
                .find(|s| s.name == format!("{family}_count") && s.labels == key)
                .unwrap_or_else(|| panic!("{family}{key:?}: no _count"));
            assert_eq!(last.1, count.value, "{family}{key:?}: +Inf != _count");
        }
    }
    samples
}

/// The value of the sample `name` with exactly these labels.
pub fn sample(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let want: std::collections::BTreeMap<String, String> = labels
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    samples
        .iter()
        .find(|s| s.name == name && s.labels == want)
        .map(|s| s.value)
}

/// An OTLP/gRPC collector for tests: the real opentelemetry-proto services,
/// keeping every export request it receives.
pub mod otlp {
    use std::net::SocketAddr;
    use std::sync::{Arc, Mutex};

    use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{
        MetricsService, MetricsServiceServer,
    };
    use opentelemetry_proto::tonic::collector::metrics::v1::{
        ExportMetricsServiceRequest, ExportMetricsServiceResponse,
    };
    use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
        TraceService, TraceServiceServer,
    };
    use opentelemetry_proto::tonic::collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
    };
    use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
    use opentelemetry_proto::tonic::metrics::v1::Metric;
    use opentelemetry_proto::tonic::trace::v1::Span;

    #[derive(Clone, Default)]
    pub struct Collector {
        pub traces: Arc<Mutex<Vec<ExportTraceServiceRequest>>>,
        pub metrics: Arc<Mutex<Vec<ExportMetricsServiceRequest>>>,
    }

    #[tonic::async_trait]
    impl TraceService for Collector {
        async fn export(
            &self,
            request: tonic::Request<ExportTraceServiceRequest>,
        ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
            if let Ok(mut t) = self.traces.lock() {
                t.push(request.into_inner());
            }
            Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
        }
    }

    #[tonic::async_trait]
    impl MetricsService for Collector {
        async fn export(
            &self,
            request: tonic::Request<ExportMetricsServiceRequest>,
        ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
            if let Ok(mut m) = self.metrics.lock() {
                m.push(request.into_inner());
            }
            Ok(tonic::Response::new(ExportMetricsServiceResponse::default()))
        }
    }

    impl Collector {
        /// Serves on 127.0.0.1 (ephemeral port) until the test ends.
        pub async fn start() -> (Self, SocketAddr) {
            let listener = super::listener().await;
            let addr = listener.local_addr().expect("addr");
            let c = Self::default();
            let svc = c.clone();
            tokio::spawn(async move {
                let _ = tonic::transport::Server::builder()
                    .add_service(TraceServiceServer::new(svc.clone()))
                    .add_service(MetricsServiceServer::new(svc))
                    .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
                    .await;
            });
            (c, addr)
        }

        /// Every span received so far, with its resource's service name.
        pub fn spans(&self) -> Vec<(String, Span)> {
            let traces = self.traces.lock().map(|t| t.clone()).unwrap_or_default();
            let mut out = Vec::new();
            for req in traces {
                for rs in req.resource_spans {
                    let service = rs
                        .resource
                        .as_ref()
                        .and_then(|r| attr(&r.attributes, "service.name"))
                        .unwrap_or_default();
                    for ss in rs.scope_spans {
                        for s in ss.spans {
                            out.push((service.clone(), s));
                        }
                    }
                }
            }
            out
        }

        /// Every metric received so far (newest export last).
        pub fn metrics(&self) -> Vec<Metric> {
            let metrics = self.metrics.lock().map(|m| m.clone()).unwrap_or_default();
            metrics
                .into_iter()
                .flat_map(|r| r.resource_metrics)
                .flat_map(|rm| rm.scope_metrics)
                .flat_map(|sm| sm.metrics)
                .collect()
        }
    }

    /// A string (or integer, as text) attribute.
    pub fn attr(attrs: &[KeyValue], key: &str) -> Option<String> {
        let v = attrs.iter().find(|kv| kv.key == key)?.value.as_ref()?;
        match v {
            AnyValue {
                value: Some(any_value::Value::StringValue(s)),
                ..
            } => Some(s.clone()),
            AnyValue {
                value: Some(any_value::Value::IntValue(i)),
                ..
            } => Some(i.to_string()),
            _ => None,
        }
    }
}

/// A Python that can import `modules` (`LEASH_TEST_PYTHON`, else
/// `python3`); fails saying what to install when there is none.
pub fn python_with(modules: &str, install: &str) -> String {
    let python = std::env::var("LEASH_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
    let ok = std::process::Command::new(&python)
        .args(["-c", &format!("import {modules}")])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "{python} cannot import {modules}: pip install {install}, or point LEASH_TEST_PYTHON at a Python that has them (.ci/run does)"
    );
    python
}

/// Runs a Python script that prints the port it listens on as its first
/// line; returns the child (killed when dropped) and the port.
pub fn python_server(mut cmd: std::process::Command) -> (KillOnDrop, u16) {
    use std::io::BufRead as _;
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python runs");
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("the port line");
    let port = line
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("not a port: {line:?}"));
    (KillOnDrop(child), port)
}

/// A child process killed (and reaped) when dropped.
pub struct KillOnDrop(pub std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The test gRPC service (`tests/proto/echo.proto`).
#[allow(clippy::all, clippy::pedantic, reason = "generated code")]
pub mod echo {
    tonic::include_proto!("leash.test.echo");
}

/// A CA (written to `dir/upstream-ca.pem`) and a server certificate for
/// `payments.internal` and 127.0.0.1 (written to `dir/upstream-cert.pem`
/// and `dir/upstream-key.pem`, for servers not in Rust), as an upstream's
/// TLS acceptor.
pub fn upstream_pki(dir: &Path) -> tokio_rustls::TlsAcceptor {
    tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(upstream_tls_config(dir)))
}

/// As [`upstream_pki`], offering HTTP/2 by ALPN (as gRPC servers do).
pub fn upstream_pki_h2(dir: &Path) -> tokio_rustls::TlsAcceptor {
    let mut config = upstream_tls_config(dir);
    config.alpn_protocols = vec![b"h2".to_vec()];
    tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config))
}

fn upstream_tls_config(dir: &Path) -> rustls::ServerConfig {
    use rcgen::{
        BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair, KeyUsagePurpose,
        SanType,
    };
    let mut ca_params = CertificateParams::default();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    // Distinct names: OpenSSL takes a leaf whose issuer is its own subject
    // for a self-signed certificate.
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "Leash test upstream CA");
    let ca =
        CertifiedIssuer::self_signed(ca_params, KeyPair::generate().expect("key")).expect("CA");
    std::fs::write(dir.join("upstream-ca.pem"), ca.pem()).expect("write CA");
    let mut params = CertificateParams::new(vec!["payments.internal".to_owned()]).expect("params");
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "payments.internal");
    params
        .subject_alt_names
        .push(SanType::IpAddress([127, 0, 0, 1].into()));
    let key = KeyPair::generate().expect("key");
    let cert = params.signed_by(&key, &ca).expect("cert");
    std::fs::write(dir.join("upstream-cert.pem"), cert.pem()).expect("write cert");
    std::fs::write(dir.join("upstream-key.pem"), key.serialize_pem()).expect("write key");
    rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .expect("server config")
}

/// Writes `request` as raw bytes to `addr` and returns everything read back
/// until the peer closes (or 5 s pass).
pub async fn raw(addr: SocketAddr, request: &[u8]) -> String {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(request).await.expect("write");
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// How a [`canned_upstream`] behaves.
#[derive(Clone, Copy)]
pub enum Canned {
    /// Answer every request after `delay`, keeping connections alive or not.
    Answer { delay: Duration, keep_alive: bool },
    /// Reset every connection as soon as it is accepted.
    Reset,
}

/// A test upstream on 127.0.0.1 giving `answer()` to every request; returns
/// its address and the number of connections it has accepted.
pub async fn canned_upstream<F>(
    how: Canned,
    answer: F,
) -> (SocketAddr, std::sync::Arc<std::sync::atomic::AtomicUsize>)
where
    F: Fn() -> http::Response<Full<Bytes>> + Clone + Send + Sync + 'static,
{
    let l = listener().await;
    let addr = l.local_addr().expect("addr");
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = l.accept().await {
            count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let Canned::Answer { delay, keep_alive } = how else {
                let _ = tcp.set_zero_linger();
                continue;
            };
            let answer = answer.clone();
            let svc = hyper::service::service_fn(move |_req| {
                let answer = answer.clone();
                async move {
                    tokio::time::sleep(delay).await;
                    Ok::<_, std::convert::Infallible>(answer())
                }
            });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .keep_alive(keep_alive)
                    .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc),
            );
        }
    });
    (addr, accepted)
}
