//! The control plane's listeners under a hostile network: every one has a
//! cap on connections (in all and per client address), and a bound on how
//! long a client may take to say something. A few thousand idle or
//! half-open connections get closed, not served, so responders and
//! sidecars keep getting in.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::{ConnectInfo, Request};
use axum::response::IntoResponse;
use http::StatusCode;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tower::ServiceExt as _;

/// Limits of the admin listener and of the sidecar-facing (mTLS) one.
#[derive(Debug, Clone, clap::Args, serde::Serialize)]
pub struct ListenerLimits {
    /// Admin API: connections open at once; more are closed at once.
    #[arg(long, default_value_t = 1024)]
    pub admin_max_connections: usize,
    /// Admin API: connections open at once from one client address.
    #[arg(long, default_value_t = 64)]
    pub admin_max_connections_per_address: usize,
    /// Admin API: time to send a request's header block (slowloris bound;
    /// also how long a kept-alive connection may sit idle).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    #[serde(with = "millis")]
    pub admin_header_timeout: Duration,
    /// Admin API: time to send the body and get the answer; past it, 408.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    #[serde(with = "millis")]
    pub admin_request_timeout: Duration,
    /// Sidecar API: TLS handshakes in progress at once; more are closed.
    #[arg(long, default_value_t = 256)]
    pub sidecar_max_handshakes: usize,
    /// Sidecar API: TLS handshakes in progress at once from one address.
    #[arg(long, default_value_t = 32)]
    pub sidecar_max_handshakes_per_address: usize,
    /// Sidecar API: time to complete the TLS handshake.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    #[serde(with = "millis")]
    pub sidecar_handshake_timeout: Duration,
    /// Sidecar API: verified connections open at once (one per sidecar).
    #[arg(long, default_value_t = 20_000)]
    pub sidecar_max_connections: usize,
}

impl Default for ListenerLimits {
    fn default() -> Self {
        Self {
            admin_max_connections: 1024,
            admin_max_connections_per_address: 64,
            admin_header_timeout: Duration::from_secs(10),
            admin_request_timeout: Duration::from_secs(30),
            sidecar_max_handshakes: 256,
            sidecar_max_handshakes_per_address: 32,
            sidecar_handshake_timeout: Duration::from_secs(5),
            sidecar_max_connections: 20_000,
        }
    }
}

mod millis {
    pub fn serialize<S: serde::Serializer>(
        d: &std::time::Duration,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }
}

/// Counts connections in all and per address. A slot is taken when a
/// connection is accepted and given back when it ends. At the total cap, a
/// new connection takes the slot of the oldest one that is *idle* (no
/// request being handled: sending its header slowly, or waiting between
/// requests), which is closed; only when every connection is busy is the new
/// one refused. So idle and slowloris connections, from however many
/// addresses, cannot keep a responder out. At the per-address cap the new
/// connection is refused.
pub struct ConnectionCaps {
    total: usize,
    per_address: usize,
    state: Mutex<CapsState>,
}

#[derive(Default)]
struct CapsState {
    next_id: u64,
    per_ip: HashMap<IpAddr, usize>,
    /// Open connections, oldest first.
    open: std::collections::BTreeMap<u64, Slot>,
}

struct Slot {
    ip: IpAddr,
    busy: Arc<std::sync::atomic::AtomicBool>,
    evict: tokio_util::sync::CancellationToken,
}

/// One admitted connection; frees its slot when dropped.
pub struct Admitted {
    caps: Arc<ConnectionCaps>,
    id: u64,
    /// Set while a request is being handled (never evicted then).
    pub busy: Arc<std::sync::atomic::AtomicBool>,
    /// Cancelled when a newer connection took this one's slot.
    pub evicted: tokio_util::sync::CancellationToken,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut state = self.caps.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(slot) = state.open.remove(&self.id) {
            release(&mut state.per_ip, slot.ip);
        }
    }
}

fn release(per_ip: &mut HashMap<IpAddr, usize>, ip: IpAddr) {
    if let Some(n) = per_ip.get_mut(&ip) {
        *n -= 1;
        if *n == 0 {
            per_ip.remove(&ip);
        }
    }
}

impl ConnectionCaps {
    pub fn new(total: usize, per_address: usize) -> Arc<Self> {
        Arc::new(Self {
            total,
            per_address,
            state: Mutex::default(),
        })
    }

    /// A slot for a connection from `ip`, evicting the oldest idle
    /// connection at the total cap; None at the per-address cap, or when
    /// every connection is busy.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Option<Admitted> {
        use std::sync::atomic::Ordering;
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if state.per_ip.get(&ip).copied().unwrap_or(0) >= self.per_address {
            return None;
        }
        if state.open.len() >= self.total {
            let oldest_idle = state
                .open
                .iter()
                .find(|(_, s)| !s.busy.load(Ordering::Acquire))
                .map(|(id, _)| *id)?;
            if let Some(slot) = state.open.remove(&oldest_idle) {
                slot.evict.cancel();
                release(&mut state.per_ip, slot.ip);
            }
        }
        state.next_id += 1;
        let id = state.next_id;
        let busy = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let evict = tokio_util::sync::CancellationToken::new();
        *state.per_ip.entry(ip).or_insert(0) += 1;
        state.open.insert(
            id,
            Slot {
                ip,
                busy: busy.clone(),
                evict: evict.clone(),
            },
        );
        Some(Admitted {
            caps: self.clone(),
            id,
            busy,
            evicted: evict,
        })
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.state.lock().map(|s| s.open.len()).unwrap_or(0)
    }
}

/// The admin port's certificate and key files (PEM), re-read when they
/// change (a renewed certificate is picked up without a restart).
#[derive(Debug, Clone, serde::Serialize)]
pub struct AdminTls {
    pub cert: std::path::PathBuf,
    pub key: std::path::PathBuf,
}

/// How often the certificate files are checked for a change.
const CERT_RELOAD_EVERY: Duration = Duration::from_secs(2);

/// Serves whatever certificate the files held when last read.
#[derive(Debug)]
pub struct ReloadingCert {
    files: AdminTls,
    current: arc_swap::ArcSwap<rustls::sign::CertifiedKey>,
    seen: Mutex<Option<(std::time::SystemTime, std::time::SystemTime)>>,
}

impl ReloadingCert {
    pub fn load(files: AdminTls) -> Result<Arc<Self>, String> {
        let key = Self::read(&files)?;
        let this = Arc::new(Self {
            seen: Mutex::new(Self::mtimes(&files)),
            files,
            current: arc_swap::ArcSwap::from_pointee(key),
        });
        Ok(this)
    }

    fn mtimes(files: &AdminTls) -> Option<(std::time::SystemTime, std::time::SystemTime)> {
        let m = |p: &std::path::Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
        Some((m(&files.cert)?, m(&files.key)?))
    }

    fn read(files: &AdminTls) -> Result<rustls::sign::CertifiedKey, String> {
        use rustls::pki_types::pem::PemObject as _;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let certs = CertificateDer::pem_file_iter(&files.cert)
            .and_then(|i| i.collect::<Result<Vec<_>, _>>())
            .map_err(|e| format!("{}: {e}", files.cert.display()))?;
        if certs.is_empty() {
            return Err(format!("{}: no certificate", files.cert.display()));
        }
        let key = PrivateKeyDer::from_pem_file(&files.key)
            .map_err(|e| format!("{}: {e}", files.key.display()))?;
        let key = rustls::crypto::ring::sign::any_supported_type(&key)
            .map_err(|e| format!("{}: {e}", files.key.display()))?;
        Ok(rustls::sign::CertifiedKey::new(certs, key))
    }

    /// Re-reads the files if either changed; a bad pair is logged and the
    /// certificate in use kept.
    pub fn refresh(&self) {
        let now = Self::mtimes(&self.files);
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        if now.is_none() || *seen == now {
            return;
        }
        match Self::read(&self.files) {
            Ok(key) => {
                self.current.store(Arc::new(key));
                *seen = now;
                tracing::info!(cert = %self.files.cert.display(), "admin TLS certificate reloaded");
            }
            Err(e) => {
                tracing::warn!(error = %e, "admin TLS certificate not reloaded; keeping the current one")
            }
        }
    }
}

impl rustls::server::ResolvesServerCert for ReloadingCert {
    fn resolve(
        &self,
        _: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.current.load_full())
    }
}

/// A rustls server configuration for the admin port (HTTP/2 and HTTP/1.1).
pub fn admin_tls_config(cert: Arc<ReloadingCert>) -> Arc<rustls::ServerConfig> {
    let mut config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_cert_resolver(cert);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Arc::new(config)
}

/// Serves the admin router on `listener` within `limits` until `stop`,
/// then lets open requests finish. With `tls`, over TLS only.
pub async fn serve_admin(
    listener: TcpListener,
    router: Router,
    limits: ListenerLimits,
    tls: Option<Arc<ReloadingCert>>,
    mut stop: watch::Receiver<bool>,
) {
    let acceptor = tls.as_ref().map(|cert| {
        let reloading = cert.clone();
        let mut stop = stop.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = tokio::time::sleep(CERT_RELOAD_EVERY) => reloading.refresh(),
                    _ = stop.wait_for(|s| *s) => return,
                }
            }
        });
        tokio_rustls::TlsAcceptor::from(admin_tls_config(cert.clone()))
    });
    let caps = ConnectionCaps::new(
        limits.admin_max_connections,
        limits.admin_max_connections_per_address,
    );
    let request_timeout = limits.admin_request_timeout;
    let router = router.layer(axum::middleware::from_fn(
        move |req: Request, next: axum::middleware::Next| async move {
            match tokio::time::timeout(request_timeout, next.run(req)).await {
                Ok(resp) => resp,
                Err(_) => (
                    StatusCode::REQUEST_TIMEOUT,
                    axum::Json(serde_json::json!({
                        "error": "request_timeout",
                        "message": format!("the request was not complete within {request_timeout:?}"),
                    })),
                )
                    .into_response(),
            }
        },
    ));
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.admin_header_timeout)
        .max_buf_size(256 * 1024);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(Duration::from_secs(20)))
        .max_concurrent_streams(64);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    // Cancelled when the graceful shutdown's time is up: every connection
    // still open (a console's event stream, a slow client) is then closed,
    // not left running without its server.
    let closing = tokio_util::sync::CancellationToken::new();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stop.wait_for(|s| *s) => break,
        };
        let (tcp, peer) = match accepted {
            Ok(conn) => conn,
            Err(e) => {
                tracing::warn!(error = %e, "admin accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Some(slot) = caps.admit(peer.ip()) else {
            // Closed at once: a full listener must not queue.
            tracing::debug!(%peer, open = caps.open(), "admin connection refused: at the connection cap");
            continue;
        };
        let busy = slot.busy.clone();
        let router = router.clone();
        let svc = tower::service_fn(move |req: http::Request<hyper::body::Incoming>| {
            let mut req = req.map(axum::body::Body::new);
            req.extensions_mut().insert(ConnectInfo::<SocketAddr>(peer));
            let router = router.clone();
            let busy = busy.clone();
            async move {
                // Handling a request: this connection is not idle, and
                // cannot be evicted for a newer one until it answers.
                busy.store(true, std::sync::atomic::Ordering::Release);
                let resp = router.oneshot(req).await;
                busy.store(false, std::sync::atomic::Ordering::Release);
                resp.map_err(|e: Infallible| match e {})
            }
        });
        let svc = hyper_util::service::TowerToHyperService::new(svc);
        let evicted = slot.evicted.clone();
        let closing = closing.clone();
        match &acceptor {
            None => {
                let conn = builder.serve_connection_with_upgrades(TokioIo::new(tcp), svc);
                let conn = graceful.watch(conn.into_owned());
                tokio::spawn(async move {
                    let _slot = slot;
                    tokio::select! {
                        r = conn => if let Err(e) = r {
                            tracing::debug!(%peer, error = %e, "admin connection ended");
                        },
                        () = evicted.cancelled() => {
                            tracing::debug!(%peer, "idle admin connection closed for a newer one");
                        }
                        () = closing.cancelled() => {}
                    }
                });
            }
            Some(acceptor) => {
                // The handshake is timed like a header block: a client that
                // stalls it holds its slot no longer.
                let handshake =
                    tokio::time::timeout(limits.admin_header_timeout, acceptor.accept(tcp));
                let builder = builder.clone();
                let watcher = graceful.watcher();
                tokio::spawn(async move {
                    let _slot = slot;
                    let serve = async {
                        let tls = match handshake.await {
                            Ok(Ok(tls)) => tls,
                            Ok(Err(e)) => {
                                tracing::debug!(%peer, error = %e, "admin TLS handshake failed");
                                return;
                            }
                            Err(_) => return,
                        };
                        let conn = builder.serve_connection_with_upgrades(TokioIo::new(tls), svc);
                        if let Err(e) = watcher.watch(conn.into_owned()).await {
                            tracing::debug!(%peer, error = %e, "admin connection ended");
                        }
                    };
                    tokio::select! {
                        () = serve => {}
                        () = evicted.cancelled() => {
                            tracing::debug!(%peer, "idle admin connection closed for a newer one");
                        }
                        () = closing.cancelled() => {}
                    }
                });
            }
        }
    }
    drop(listener);
    if tokio::time::timeout(Duration::from_secs(5), graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("admin connections still open after 5 s; closing them");
    }
    closing.cancel();
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;

    #[test]
    fn at_the_cap_the_oldest_idle_connection_makes_room() {
        let caps = ConnectionCaps::new(2, 2);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let first = caps.admit(a).unwrap();
        let second = caps.admit(a).unwrap();
        assert!(
            caps.admit(a).is_none(),
            "per-address cap: refused, nothing evicted"
        );
        first.busy.store(true, Ordering::Release);
        let third = caps.admit(b).unwrap();
        assert!(
            second.evicted.is_cancelled(),
            "the oldest idle one made room"
        );
        assert!(!first.evicted.is_cancelled(), "a busy one is never evicted");
        third.busy.store(true, Ordering::Release);
        assert!(caps.admit(b).is_none(), "every connection busy: refused");
        assert_eq!(caps.open(), 2);
        drop(second);
        assert_eq!(caps.open(), 2, "an evicted slot is not freed twice");
        drop(first);
        assert_eq!(caps.open(), 1);
    }
}
