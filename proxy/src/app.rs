//! Wiring: builds the sidecar from its config and bound listeners, so that
//! tests run the real sidecar in-process on ephemeral ports.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::{BodyExt as _, Full};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::cache::{CacheHandles, CredentialCache};
use crate::conn::{HeadWatch, RequestBody};
use crate::control::{ControlConfig, ControlLink};
use crate::egress::{Egress, ProxyBody, ResponseTimer};
use crate::metrics::{Gauges, Metrics};
use crate::serve::{self, ConnInfo};

#[derive(Debug, Clone)]
pub struct SidecarConfig {
    pub control: ControlConfig,
    pub limits: Limits,
    pub upstream_response_timeout: Duration,
    /// OpenTelemetry export (None: off).
    pub otel: Option<leash_api::telemetry::Otel>,
    /// Count usage and ship it to the control plane (on by default; off
    /// only to measure what it costs).
    pub usage_reporting: bool,
    /// Where to write the interception CA's certificate (PEM) for the
    /// workload's trust store; it is also served at the admin port's
    /// `/ca.pem`. None: not written.
    pub intercept_ca_file: Option<std::path::PathBuf>,
}

/// Limits on what a workload may send.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest request line plus header block; beyond it: 431.
    pub max_header_bytes: usize,
    /// Most header fields in one request.
    pub max_headers: usize,
    /// Time allowed to send a complete header block (slowloris bound); also
    /// how long a keep-alive connection may sit idle between requests (the
    /// wait for the next request's headers is timed from the end of the
    /// previous response). See `HeadWatch`.
    pub header_read_timeout: Duration,
    /// Workload connections open at once (all egress listeners together);
    /// one more gets a 503 and is closed.
    pub max_connections: usize,
    /// Requests waiting for an upstream answer at once; one more gets 503.
    pub max_in_flight: usize,
    /// Largest WebSocket frame a workload may send; a larger one closes
    /// the connection with code 1009.
    pub max_websocket_frame_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_header_bytes: 64 * 1024,
            max_headers: 100,
            header_read_timeout: Duration::from_secs(10),
            max_connections: 10_000,
            max_in_flight: 10_000,
            max_websocket_frame_bytes: 1024 * 1024,
        }
    }
}

/// A running sidecar.
pub struct Sidecar {
    pub egress_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub named_addrs: Vec<(String, SocketAddr)>,
    pub link: Arc<ControlLink>,
    shutdown: watch::Sender<bool>,
    tasks: JoinSet<()>,
    /// The control-plane link stops last, after the final usage batch.
    link_stop: watch::Sender<bool>,
    link_task: tokio::task::JoinHandle<()>,
}

impl Sidecar {
    pub fn start(
        config: SidecarConfig,
        egress: TcpListener,
        admin: TcpListener,
        named: Vec<(String, TcpListener)>,
    ) -> std::io::Result<Self> {
        let egress_addr = egress.local_addr()?;
        let admin_addr = admin.local_addr()?;
        let link = ControlLink::new(config.control.clone());
        let cache = CredentialCache::new(CacheHandles::of(&link));
        let metrics = link.metrics.clone();
        let (shutdown, _) = watch::channel(false);
        let mut tasks = JoinSet::new();

        let (link_stop, _) = watch::channel(false);
        let link_task = tokio::spawn(link.clone().run(link_stop.subscribe()));
        // Usage is drained into a batch every report interval.
        let usage = link.usage.clone();
        let every = config.control.report_interval;
        let mut stop = shutdown.subscribe();
        tasks.spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tokio::select! {
                    _ = tick.tick() => usage.collect(),
                    () = leash_api::process::stopped(&mut stop) => return,
                }
            }
        });
        // Revocations cut credentials when they are applied (before the
        // acknowledgement, see `RevocationState::enforce`); this only frees
        // the cache slots they held, so that the next request fetches anew.
        {
            let mut applied = link.applied();
            let purge = cache.clone();
            let routes = link.routes.clone();
            let mut stop = shutdown.subscribe();
            tasks.spawn(async move {
                loop {
                    tokio::select! {
                        changed = applied.changed() => if changed.is_err() { return },
                        _ = stop.wait_for(|s| *s) => return,
                    }
                    let n = purge.drop_cut().await;
                    for route in routes.load().routes() {
                        if route
                            .current
                            .load()
                            .as_ref()
                            .is_some_and(|c| c.revoked.is_cancelled())
                        {
                            route.current.store(None);
                        }
                    }
                    if n > 0 {
                        tracing::debug!(
                            credentials = n,
                            "dropped revoked credentials from the cache"
                        );
                    }
                }
            });
        }

        // The interception CA: its key never leaves this process.
        let ca = Arc::new(
            crate::intercept::LocalCa::generate(&format!("pid {}", std::process::id()))
                .map_err(std::io::Error::other)?,
        );
        if let Some(path) = &config.intercept_ca_file {
            ca.write_pem(path).map_err(std::io::Error::other)?;
            tracing::info!(path = %path.display(), "interception CA certificate written");
        }
        let ca_pem: Arc<str> = ca.pem().into();
        let tunnels = crate::intercept::TunnelConfig::new(
            ca,
            shutdown.subscribe(),
            config.limits.header_read_timeout,
            config.limits.max_header_bytes,
            config.limits.max_headers,
            config.control.upstream.connect,
            config.limits.max_websocket_frame_bytes,
        );
        let egress_service = Arc::new(Egress {
            tunnels,
            identity: link.identity.clone(),
            routes: link.routes.clone(),
            revocations: link.revocations.clone(),
            reports: link.reports.clone(),
            metrics: link.metrics.clone(),
            cache,
            response_timeout: config.upstream_response_timeout,
            max_header_bytes: config.limits.max_header_bytes,
            usage_reporting: config.usage_reporting,
            in_flight: std::sync::atomic::AtomicUsize::new(0),
            max_in_flight: config.limits.max_in_flight,
            otel: config.otel.clone().map(|o| {
                let observed = crate::telemetry::Observed {
                    metrics: link.metrics.clone(),
                    usage: link.usage.clone(),
                    revocations: link.revocations.clone(),
                };
                Arc::new(crate::telemetry::EgressOtel::new(o, &observed))
            }),
        });
        let mut named_addrs = Vec::new();
        // One budget for every workload-facing listener.
        let connections = Arc::new(tokio::sync::Semaphore::new(config.limits.max_connections));
        for (name, listener) in named {
            named_addrs.push((name.clone(), listener.local_addr()?));
            let svc = egress_service.clone();
            let name: Arc<str> = name.into();
            tasks.spawn(serve_http(
                listener,
                config.limits.clone(),
                connections.clone(),
                shutdown.subscribe(),
                move |req, _conn, timer| {
                    let svc = svc.clone();
                    let name = name.clone();
                    async move { svc.handle(Some(&name), false, req, &timer).await }
                },
            ));
        }
        let svc = egress_service;
        tasks.spawn(serve_http(
            egress,
            config.limits.clone(),
            connections,
            shutdown.subscribe(),
            move |req: Request<RequestBody>, conn, timer| {
                let svc = svc.clone();
                async move {
                    // A tunnel; an extended CONNECT (a WebSocket over
                    // HTTP/2) is a request like any other.
                    if req.method() == http::Method::CONNECT
                        && !crate::headers::is_websocket_connect(&req)
                    {
                        return svc.connect(req, conn).await;
                    }
                    svc.handle(None, false, req, &timer).await
                }
            },
        ));

        let admin_link = link.clone();
        let dump = Arc::new(ConfigDump {
            config: config.clone(),
            egress: egress_addr,
            admin: admin_addr,
            named: named_addrs.clone(),
            ca_pem,
        });
        tasks.spawn(serve_http(
            admin,
            Limits::default(),
            Arc::new(tokio::sync::Semaphore::new(64)),
            shutdown.subscribe(),
            move |req, conn: Arc<ConnInfo>, _timer| {
                let peer = conn.peer;
                let link = admin_link.clone();
                let metrics = metrics.clone();
                let dump = dump.clone();
                async move { admin_response(&link, &metrics, &dump, req, peer).await }
            },
        ));

        tracing::info!(%egress_addr, %admin_addr, ?named_addrs, "sidecar listening");
        Ok(Self {
            egress_addr,
            admin_addr,
            named_addrs,
            link,
            shutdown,
            tasks,
            link_stop,
            link_task,
        })
    }

    /// Serves `/healthz` and `/readyz` (nothing else) on `listener`, for the
    /// kubelet or a load balancer: its own connection budget and a short
    /// header timeout, so that idle connections from the pod network cannot
    /// starve the probes, and the admin port can stay on localhost.
    pub fn serve_probes(&mut self, listener: TcpListener) -> std::io::Result<SocketAddr> {
        let addr = listener.local_addr()?;
        let link = self.link.clone();
        let limits = Limits {
            header_read_timeout: PROBE_HEADER_TIMEOUT,
            max_connections: PROBE_MAX_CONNECTIONS,
            max_header_bytes: 8 * 1024,
            ..Limits::default()
        };
        self.tasks.spawn(serve_http(
            listener,
            limits,
            Arc::new(tokio::sync::Semaphore::new(PROBE_MAX_CONNECTIONS)),
            self.shutdown.subscribe(),
            move |req, _conn, _timer| {
                let link = link.clone();
                async move { probe_response(&link, req.uri().path()) }
            },
        ));
        tracing::info!(%addr, "probes listening");
        Ok(addr)
    }

    /// Stops accepting, lets open requests finish within `drain`, ships the
    /// last usage counts (waiting for the control plane's acknowledgement,
    /// within `drain` too), then stops.
    pub async fn shutdown(mut self, drain: Duration) {
        let started = tokio::time::Instant::now();
        let _ = self.shutdown.send(true);
        if tokio::time::timeout(drain, async {
            while self.tasks.join_next().await.is_some() {}
        })
        .await
        .is_err()
        {
            tracing::warn!("drain timed out; closing remaining connections");
            self.tasks.abort_all();
        }
        // Connected: wait for the acknowledgement. Cut off: give a
        // reconnect a moment, not the whole drain time.
        let mut left = drain.saturating_sub(started.elapsed());
        if !self.link.connected() {
            left = left.min(Duration::from_secs(1));
        }
        if !self.link.usage.flush(left).await {
            tracing::warn!(
                batches = self.link.usage.pending(),
                "the control plane did not acknowledge the last usage batches before shutdown"
            );
        }
        let _ = self.link_stop.send(true);
        let _ = self.link_task.await;
    }
}

fn text(status: StatusCode, body: String) -> Response<ProxyBody> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(
            Full::new(Bytes::from(body))
                .map_err(|never| match never {})
                .boxed_unsync(),
        )
        .unwrap_or_else(|_| Response::new(ProxyBody::default()))
}

/// What `/config_dump` shows: the effective configuration and the state
/// it produced, without any secret.
struct ConfigDump {
    config: SidecarConfig,
    egress: SocketAddr,
    admin: SocketAddr,
    named: Vec<(String, SocketAddr)>,
    /// The interception CA's certificate, served at `/ca.pem`.
    ca_pem: Arc<str>,
}

impl ConfigDump {
    fn render(&self, link: &ControlLink) -> serde_json::Value {
        use serde_json::json;
        let c = &self.config;
        let identity = match &c.control.identity {
            leash_api::identity::IdentityConfig::WorkloadApi(e) => json!({"workload_api": e}),
            leash_api::identity::IdentityConfig::Files(f) => json!({"svid_files": {
                "cert": f.cert, "key": f.key, "bundle": f.bundle,
            }}),
            leash_api::identity::IdentityConfig::Shared(_) => json!("shared"),
        };
        let table = link.routes.load();
        let mut routes: Vec<_> = table
            .routes()
            .map(|r| {
                let inject = match &r.inject {
                    crate::credential::InjectHow::Header { name, .. } => {
                        json!({"header": name.as_str()})
                    }
                    crate::credential::InjectHow::Basic { username } => json!({"basic": username}),
                    crate::credential::InjectHow::Query { param } => json!({"query": param}),
                    crate::credential::InjectHow::SigV4(spec) => json!({"aws_sigv4": {
                        "region": spec.region,
                        "service": spec.service,
                        "unsigned_payload": spec.unsigned_payload,
                        "query": spec.query,
                    }}),
                };
                json!({
                    "upstream": &*r.name,
                    "target": format!("{}://{}", r.scheme, r.authority),
                    "granted": r.granted,
                    "inject": inject,
                    "scan_body_bytes": r.scan_body_bytes,
                    "intercept": r.intercept,
                    "passthrough": r.passthrough,
                    "credential_id": r.current.load().as_ref().map(|c| c.id.to_string()),
                })
            })
            .collect();
        routes.sort_by(|a, b| a["upstream"].as_str().cmp(&b["upstream"].as_str()));
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        json!({
            "version": env!("CARGO_PKG_VERSION"),
            "workload": link.identity.id().to_string(),
            "listeners": {
                "egress": self.egress,
                "admin": self.admin,
                "upstream_listeners": self.named.iter().map(|(n, a)| json!({"upstream": n, "addr": a})).collect::<Vec<_>>(),
            },
            "identity": identity,
            "control_plane": {
                "addresses": c.control.control_planes,
                "spiffe_id": c.control.control_plane_id,
                "connected": link.connected(),
                "max_staleness_ms": ms(c.control.max_staleness),
                "call_timeout_ms": ms(c.control.call_timeout),
                "report_interval_ms": ms(c.control.report_interval),
                "usage_buffer_records": c.control.usage_buffer_records,
            },
            "upstream": {
                "connect_timeout_ms": ms(c.control.upstream.connect),
                "pool_idle_ms": ms(c.control.upstream.pool_idle),
                "max_connections_per_upstream": c.control.upstream.max_connections,
                "response_timeout_ms": ms(c.upstream_response_timeout),
            },
            "limits": {
                "max_header_bytes": c.limits.max_header_bytes,
                "max_headers": c.limits.max_headers,
                "header_read_timeout_ms": ms(c.limits.header_read_timeout),
                "max_connections": c.limits.max_connections,
                "max_in_flight": c.limits.max_in_flight,
            },
            "telemetry": {
                "otlp": c.otel.is_some(),
                "log_filter": leash_api::process::log_filter(),
            },
            "policy_version": table.policy_version,
            "revocation_seq": link.revocations.applied_seq.load(std::sync::atomic::Ordering::Relaxed),
            "active_revocations": link.revocations.set.load().len(),
            "routes": routes,
        })
    }
}

fn json_response(status: StatusCode, body: &serde_json::Value) -> Response<ProxyBody> {
    let mut resp = text(status, format!("{body:#}\n"));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    resp
}

/// `GET /logging` shows the filter; `POST /logging?level=SPEC` (or the
/// spec as the body) replaces it.
async fn logging(req: Request<RequestBody>) -> Response<ProxyBody> {
    use serde_json::json;
    match *req.method() {
        http::Method::GET => json_response(
            StatusCode::OK,
            &json!({"filter": leash_api::process::log_filter()}),
        ),
        http::Method::POST | http::Method::PUT => {
            let from_query = req.uri().query().and_then(|q| {
                form_urlencoded::parse(q.as_bytes())
                    .find(|(k, _)| k == "level")
                    .map(|(_, v)| v.into_owned())
            });
            let spec = match from_query {
                Some(s) => s,
                None => match http_body_util::Limited::new(req.into_body(), 4096)
                    .collect()
                    .await
                {
                    Ok(b) => String::from_utf8_lossy(&b.to_bytes()).trim().to_owned(),
                    Err(_) => String::new(),
                },
            };
            if spec.is_empty() {
                return json_response(
                    StatusCode::BAD_REQUEST,
                    &json!({"error": "bad_request", "message": "give the filter as ?level=debug (RUST_LOG syntax, e.g. info,leash_proxy=debug)"}),
                );
            }
            match leash_api::process::set_log_filter(&spec) {
                Ok(filter) => json_response(StatusCode::OK, &json!({"filter": filter})),
                Err(e) => json_response(
                    StatusCode::BAD_REQUEST,
                    &json!({"error": "bad_request", "message": e}),
                ),
            }
        }
        _ => json_response(
            StatusCode::METHOD_NOT_ALLOWED,
            &json!({"error": "method_not_allowed", "message": "GET or POST /logging"}),
        ),
    }
}

/// Connections the probe listener serves at once.
const PROBE_MAX_CONNECTIONS: usize = 1024;
/// A probe sends its request at once; anything slower is closed.
const PROBE_HEADER_TIMEOUT: Duration = Duration::from_secs(2);

/// Liveness (the process answers) and readiness (identity, control-plane
/// state, not stale), as on the admin port; nothing else.
fn probe_response(link: &ControlLink, path: &str) -> Response<ProxyBody> {
    match path {
        "/healthz" | "/live" => text(StatusCode::OK, "ok\n".into()),
        "/readyz" | "/ready" => readiness(link),
        _ => text(
            StatusCode::NOT_FOUND,
            "the probe port serves /healthz and /readyz only\n".into(),
        ),
    }
}

fn readiness(link: &ControlLink) -> Response<ProxyBody> {
    let pending = link.pending();
    if pending.is_empty() {
        text(StatusCode::OK, "ready\n".into())
    } else {
        text(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready, pending: {}\n", pending.join(", ")),
        )
    }
}

async fn admin_response(
    link: &ControlLink,
    metrics: &Metrics,
    dump: &ConfigDump,
    req: Request<RequestBody>,
    peer: SocketAddr,
) -> Response<ProxyBody> {
    let path = req.uri().path();
    // Changing the log level and reading the configuration are for the
    // node's operator, even when the admin port is exposed for scraping.
    if matches!(path, "/logging" | "/config_dump") && !peer.ip().is_loopback() {
        return json_response(
            StatusCode::FORBIDDEN,
            &serde_json::json!({"error": "forbidden", "message": format!("{path} is served to localhost only")}),
        );
    }
    match path {
        "/logging" => logging(req).await,
        "/config_dump" => json_response(StatusCode::OK, &dump.render(link)),
        "/healthz" | "/live" => text(StatusCode::OK, "ok\n".into()),
        "/ca.pem" => {
            let mut resp = text(StatusCode::OK, dump.ca_pem.to_string());
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/x-pem-file"),
            );
            resp
        }
        "/readyz" | "/ready" => readiness(link),
        "/metrics" => {
            use std::sync::atomic::Ordering::Relaxed;
            let gauges = Gauges {
                ready: link.pending().is_empty(),
                connected: link.connected(),
                applied_seq: link.revocations.applied_seq.load(Relaxed),
                silence_secs: link.silence().as_secs_f64(),
                usage_reported: link.usage.requests_reported.load(Relaxed),
                usage_dropped: link.usage.requests_dropped.load(Relaxed),
                usage_pending_batches: link.usage.pending(),
                reports_dropped: link.reports.dropped(),
            };
            let mut resp = text(StatusCode::OK, metrics.render(&gauges));
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                http::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            resp
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: try /healthz, /readyz, /metrics, /ca.pem, /config_dump or /logging\n"
                .into(),
        ),
    }
}

/// Over the connection limit: a 503 that says so, then close (no queue, no hang).
async fn refuse_connection(mut tcp: tokio::net::TcpStream, limit: usize) {
    use tokio::io::AsyncWriteExt as _;
    tracing::warn!(limit, "connection refused: at the connection limit");
    let body = format!(
        "{{\"error\":\"overloaded\",\"message\":\"the sidecar is at its limit of {limit} connections; try again shortly\"}}\n"
    );
    let head = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nx-leash-refusal: overloaded\r\nconnection: close\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    let write = async {
        tcp.write_all(head.as_bytes()).await?;
        tcp.write_all(body.as_bytes()).await?;
        tcp.shutdown().await
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), write).await;
}

/// Accepts HTTP/1.1 connections until `stop`, then drains them.
async fn serve_http<F, Fut>(
    listener: TcpListener,
    limits: Limits,
    connections: Arc<tokio::sync::Semaphore>,
    mut stop: watch::Receiver<bool>,
    handler: F,
) where
    F: Fn(Request<RequestBody>, Arc<ConnInfo>, Arc<ResponseTimer>) -> Fut
        + Clone
        + Send
        + Sync
        + 'static,
    Fut: std::future::Future<Output = Response<ProxyBody>> + Send + 'static,
{
    let builder = serve::http1_builder(limits.max_header_bytes, limits.max_headers);
    // Every connection task holds a receiver: at stop, each is asked to
    // finish (hyper's graceful shutdown), and the channel closes when the
    // last has.
    let (drain, draining) = watch::channel(false);
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    // Typically EMFILE: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = leash_api::process::stopped(&mut stop) => break,
        };
        let _ = tcp.set_nodelay(true);
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            tokio::spawn(refuse_connection(tcp, limits.max_connections));
            continue;
        };
        // The connection's place under the budget goes when the last of
        // the connection (a CONNECT tunnel's included) does.
        let info = Arc::new(ConnInfo {
            peer,
            _permit: Some(permit),
        });
        let handler = handler.clone();
        let builder = builder.clone();
        let mut draining = draining.clone();
        let limits = limits.clone();
        tokio::spawn(async move {
            // HTTP/2 with prior knowledge (h2c) starts with its preface.
            match serve::starts_with_h2_preface(&tcp, limits.header_read_timeout).await {
                None => return,
                Some(true) => {
                    let max = limits.max_header_bytes;
                    return serve::serve_http2(tcp, max, info, handler, draining).await;
                }
                Some(false) => {}
            }
            let watch = Arc::new(HeadWatch::new());
            let service = serve::http1_service(handler, info, watch.clone());
            // With upgrades: a CONNECT's connection is handed to its tunnel.
            let conn = builder
                .serve_connection(TokioIo::new(tcp), service)
                .with_upgrades();
            let conn = async move {
                let mut conn = std::pin::pin!(conn);
                tokio::select! {
                    ended = conn.as_mut() => return ended,
                    () = leash_api::process::stopped(&mut draining) => {}
                }
                conn.as_mut().graceful_shutdown();
                conn.await
            };
            serve::drive_http1(conn, watch, limits.header_read_timeout, peer).await;
        });
    }
    drop(listener);
    let _ = drain.send(true);
    drop(draining);
    drain.closed().await;
}
