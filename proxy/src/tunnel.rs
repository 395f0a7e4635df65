//! `CONNECT` on the proxy port: what a client calling `https://` through
//! `HTTPS_PROXY` sends. Policy decides before anything reaches an upstream:
//!
//! - the target must be a host name (an IP literal names no policy host)
//!   that policy routes, to an upstream this workload is granted, not
//!   revoked, with a fresh revocation state (I3, I4);
//! - an upstream with `intercept: true`: the sidecar answers `200`, then
//!   terminates the workload's TLS with a leaf from its local CA
//!   (`intercept.rs`) for the hello's SNI, which must be the `CONNECT`
//!   host. Every request inside (HTTP/1.1, or HTTP/2 by ALPN) must name
//!   that host too (else `421`), and goes through the whole request path of
//!   `egress.rs` as a plain `http://` request would: strip, inject, leak
//!   scan, revocation, usage. No upstream connection is made until a
//!   request inside passes it. A tunnel that carries plain HTTP instead of
//!   TLS (a client calling `http://` or `ws://` through a proxy with
//!   `CONNECT`) is served the same way, the `CONNECT` host standing for
//!   the SNI;
//! - an upstream with `passthrough: true`: the sidecar connects to the
//!   policy's target (never to an address the workload names), checks the
//!   revocation state once more, answers `200` and carries bytes both ways,
//!   counting them. No credential goes in. A revocation that covers the
//!   tunnel closes it before the revocation is acknowledged
//!   (`LiveTunnels`);
//! - any other upstream: `403 connect_not_allowed`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Empty};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::TcpStream;

use crate::conn::{HeadWatch, RequestBody};
use crate::egress::{Egress, ProxyBody, ResponseTimer};
use crate::headers::{self, request_host};
use crate::refusal::Refusal;
use crate::revocation::TunnelHandle;
use crate::routes::EgressRoute;
use crate::serve::{self, ConnInfo};

/// What an accepted `CONNECT` becomes.
enum Tunnel {
    Intercept,
    /// The upstream connection, made before the `200`.
    Passthrough(TcpStream, Arc<TunnelHandle>),
}

impl Egress {
    /// Answers a `CONNECT` on the proxy port (see the module's comment).
    /// `conn` is kept by the tunnel: it holds the connection's place under
    /// the listener's budget.
    pub(crate) async fn connect(
        self: Arc<Self>,
        mut req: Request<RequestBody>,
        conn: Arc<ConnInfo>,
    ) -> Response<ProxyBody> {
        let arrived = Instant::now();
        let (route, host, tunnel) = match self.open(&req, arrived).await {
            Ok(opened) => opened,
            Err(refusal) => return self.refuse(refusal),
        };
        let upgrade = hyper::upgrade::on(&mut req);
        drop(req);
        tokio::spawn(async move {
            let upgraded = match upgrade.await {
                Ok(upgraded) => TokioIo::new(upgraded),
                Err(e) => {
                    tracing::debug!(error = %e, "CONNECT: the client left before the tunnel opened");
                    return;
                }
            };
            match tunnel {
                Tunnel::Passthrough(tcp, handle) => {
                    self.passthrough(upgraded, tcp, &route, &handle).await;
                }
                Tunnel::Intercept => self.intercept(upgraded, host, conn).await,
            }
        });
        Response::builder()
            .status(StatusCode::OK)
            .body(
                Empty::<Bytes>::new()
                    .map_err(|never| match never {})
                    .boxed_unsync(),
            )
            .unwrap_or_else(|_| Response::new(ProxyBody::default()))
    }

    /// Every check made before a `CONNECT` is answered `200`.
    async fn open(
        &self,
        req: &Request<RequestBody>,
        arrived: Instant,
    ) -> Result<(Arc<EgressRoute>, String, Tunnel), Refusal> {
        if headers::header_block_len(req) > self.max_header_bytes {
            return Err(Refusal::HeadersTooLarge {
                limit: self.max_header_bytes,
            });
        }
        let host = match req.uri().authority() {
            Some(a) if req.uri().path_and_query().is_none_or(|p| p.as_str() == "/") => {
                a.host().trim_end_matches('.').to_ascii_lowercase()
            }
            _ => return Err(Refusal::BadRequest("CONNECT needs a host:port target")),
        };
        if host.starts_with('[') || host.parse::<std::net::IpAddr>().is_ok() {
            return Err(Refusal::ConnectToIp { host });
        }
        let scanned = self.revocations.set.load_full();
        self.scan(None, req, &scanned)?;
        let route = self.route(None, req)?;
        if !route.intercept && !route.passthrough {
            return Err(Refusal::ConnectNotAllowed {
                host,
                upstream: route.name.to_string(),
            });
        }
        self.authorize(&route, &Method::CONNECT, arrived, &scanned)?;
        if route.intercept {
            route
                .metrics
                .tunnels_intercepted
                .fetch_add(1, Ordering::Relaxed);
            return Ok((route, host, Tunnel::Intercept));
        }
        let tcp = self.dial(&route).await?;
        // Registered before the last check: a revocation published after
        // it finds the tunnel and closes it.
        let handle = self.revocations.tunnels.register(route.name.clone());
        {
            let _guard = self.revocations.gate.enter();
            let set = self.revocations.set.load();
            self.fresh_at(Instant::now())?;
            self.not_revoked(&route, &set)?;
        }
        route
            .metrics
            .tunnels_passthrough
            .fetch_add(1, Ordering::Relaxed);
        Ok((route, host, Tunnel::Passthrough(tcp, handle)))
    }

    /// Connects to a passthrough upstream's target (policy's, not the
    /// workload's choice of address).
    async fn dial(&self, route: &EgressRoute) -> Result<TcpStream, Refusal> {
        let addr = route.target_addr();
        let unreachable = |reason: String| Refusal::UpstreamUnreachable {
            upstream: route.name.to_string(),
            reason,
        };
        match tokio::time::timeout(self.tunnels.connect_timeout, TcpStream::connect(&addr)).await {
            Ok(Ok(tcp)) => {
                let _ = tcp.set_nodelay(true);
                Ok(tcp)
            }
            Ok(Err(e)) => Err(unreachable(format!("connecting to {addr}: {e}"))),
            Err(_) => Err(unreachable(format!(
                "connecting to {addr}: no answer within {} ms",
                self.tunnels.connect_timeout.as_millis()
            ))),
        }
    }

    /// Carries bytes both ways until either side closes, a revocation
    /// covers the tunnel, or the sidecar stops.
    async fn passthrough<C>(
        &self,
        client: C,
        upstream: TcpStream,
        route: &EgressRoute,
        handle: &TunnelHandle,
    ) where
        C: AsyncRead + AsyncWrite + Unpin,
    {
        let (client_r, client_w) = tokio::io::split(client);
        let (up_r, up_w) = upstream.into_split();
        let m = &route.metrics;
        let both = async {
            tokio::try_join!(
                pump(client_r, up_w, &m.passthrough_bytes_sent),
                pump(up_r, client_w, &m.passthrough_bytes_received),
            )
        };
        let mut stop = self.tunnels.stop.clone();
        tokio::select! {
            result = both => {
                if let Err(e) = result {
                    tracing::debug!(upstream = %route.name, error = %e, "passthrough tunnel ended with an error");
                }
            }
            () = handle.cut.cancelled() => {
                tracing::info!(upstream = %route.name, "passthrough tunnel closed: a revocation covers it");
            }
            () = leash_api::process::stopped(&mut stop) => {}
        }
    }

    /// Terminates the workload's TLS (SNI checked against the `CONNECT`
    /// host) and serves the requests inside. A tunnel whose first byte is
    /// not a TLS handshake carries plain HTTP (a client calling `http://`
    /// or `ws://` through a proxy with `CONNECT`): served the same way,
    /// the `CONNECT` host standing for the SNI.
    async fn intercept<C>(self: Arc<Self>, mut client: C, host: String, conn: Arc<ConnInfo>)
    where
        C: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let cfg = &self.tunnels;
        let timeout = cfg.header_read_timeout;
        let mut first = [0u8; 1];
        match tokio::time::timeout(timeout, client.read(&mut first)).await {
            Ok(Ok(1)) => {}
            _ => {
                tracing::debug!(%host, "intercepted tunnel: closed or silent before its first byte");
                return;
            }
        }
        let client = serve::Rewind::new(Bytes::copy_from_slice(&first), client);
        // 0x16: a TLS handshake record.
        if first[0] != 0x16 {
            self.serve_tunnel(client, false, host, conn).await;
            return;
        }
        let acceptor =
            tokio_rustls::LazyConfigAcceptor::new(rustls::server::Acceptor::default(), client);
        let start = match tokio::time::timeout(timeout, acceptor).await {
            Ok(Ok(start)) => start,
            Ok(Err(e)) => {
                tracing::debug!(error = %e, %host, "intercepted tunnel: no TLS ClientHello");
                return;
            }
            Err(_) => {
                tracing::debug!(%host, "intercepted tunnel: no TLS ClientHello in time");
                return;
            }
        };
        let sni = start
            .client_hello()
            .server_name()
            .map(|s| s.trim_end_matches('.').to_ascii_lowercase());
        let refusal = match &sni {
            None => Some(Refusal::TlsNoSni { host: host.clone() }),
            Some(sni) if *sni != host => Some(Refusal::SniMismatch {
                sni: sni.clone(),
                host: host.clone(),
            }),
            Some(_) => None,
        };
        if let Some(refusal) = refusal {
            self.metrics.refused(&refusal);
            tracing::info!(code = refusal.code().as_str(), reason = %refusal, "TLS handshake refused");
            // A config with no certificate: the client gets a TLS alert.
            let _ = tokio::time::timeout(timeout, start.into_stream(cfg.refusing.clone())).await;
            return;
        }
        let tls = match tokio::time::timeout(timeout, start.into_stream(cfg.tls.clone())).await {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => {
                tracing::info!(error = %e, %host, "intercepted tunnel: TLS handshake failed");
                return;
            }
            Err(_) => {
                tracing::debug!(%host, "intercepted tunnel: TLS handshake not done in time");
                return;
            }
        };
        let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
        self.serve_tunnel(tls, h2, host, conn).await;
    }

    /// Serves the requests inside a tunnel to `host`, each checked against
    /// it, then taken through the whole request path.
    async fn serve_tunnel<I>(self: Arc<Self>, io: I, h2: bool, host: String, conn: Arc<ConnInfo>)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let cfg = &self.tunnels;
        let sni: Arc<str> = host.into();
        let egress = self.clone();
        let handler =
            move |req: Request<RequestBody>, _conn: Arc<ConnInfo>, timer: Arc<ResponseTimer>| {
                let egress = egress.clone();
                let sni = sni.clone();
                async move { egress.tunnelled(&sni, req, &timer).await }
            };
        let mut stop = cfg.stop.clone();
        let peer = conn.peer;
        if h2 {
            serve::serve_http2(io, cfg.max_header_bytes, conn, handler, stop).await;
            return;
        }
        let watch = Arc::new(HeadWatch::new());
        let service = serve::http1_service(handler, conn, watch.clone());
        // With upgrades: a WebSocket handshake inside the tunnel.
        let served = serve::http1_builder(cfg.max_header_bytes, cfg.max_headers)
            .serve_connection(TokioIo::new(io), service)
            .with_upgrades();
        tokio::select! {
            () = serve::drive_http1(served, watch, cfg.header_read_timeout, peer) => {}
            () = leash_api::process::stopped(&mut stop) => {}
        }
    }

    /// One request inside an intercepted tunnel: its host must be the
    /// tunnel's (SNI), then the whole request path applies.
    async fn tunnelled(
        &self,
        sni: &str,
        req: Request<RequestBody>,
        timer: &ResponseTimer,
    ) -> Response<ProxyBody> {
        let host = request_host(&req).map(str::to_ascii_lowercase);
        if host.as_deref() != Some(sni) {
            return self.refuse_to(
                crate::egress::is_grpc(&req),
                Refusal::Misdirected {
                    sni: sni.to_owned(),
                    host: host.unwrap_or_default(),
                },
            );
        }
        self.handle(None, true, req, timer).await
    }
}

/// Copies `from` to `to` until `from` ends (then closes `to`'s write side),
/// counting what was carried.
async fn pump<R, W>(mut from: R, mut to: W, counted: &AtomicU64) -> std::io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = from.read(&mut buf).await?;
        if n == 0 {
            return to.shutdown().await;
        }
        to.write_all(&buf[..n]).await?;
        counted.fetch_add(n as u64, Ordering::Relaxed);
    }
}
