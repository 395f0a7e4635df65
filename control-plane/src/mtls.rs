//! The sidecar-facing listener: TLS with client certificates verified as
//! X.509-SVIDs of our trust domain (by `spiffe-rustls`), and the verified
//! SPIFFE ID attached to every request as [`PeerIdentity`].

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tonic::transport::server::Connected;

/// The caller as proven by its certificate: the only source of identity the
/// control plane trusts.
#[derive(Debug, Clone)]
pub struct PeerIdentity {
    pub spiffe_id: Arc<str>,
    pub addr: SocketAddr,
}

/// A TLS connection whose peer certificate has been verified.
pub struct PeerStream {
    inner: TlsStream<TcpStream>,
    peer: PeerIdentity,
    /// Its place under `--sidecar-max-connections`, freed when it closes.
    _slot: crate::listeners::Admitted,
}

impl Connected for PeerStream {
    type ConnectInfo = PeerIdentity;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.peer.clone()
    }
}

impl AsyncRead for PeerStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for PeerStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Accepts TCP connections, completes the TLS handshake off the accept loop,
/// and yields the verified connections. Failed handshakes are logged (at
/// debug: a port scan should not flood the log) and dropped.
///
/// Bounded (see `ListenerLimits`): handshakes in progress in all and per
/// address, the time a handshake may take, and verified connections open;
/// a connection past a cap is closed at once.
pub fn incoming(
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
    limits: &crate::listeners::ListenerLimits,
    mut stop: watch::Receiver<bool>,
) -> tokio_stream::wrappers::ReceiverStream<io::Result<PeerStream>> {
    let (tx, rx) = mpsc::channel(64);
    let acceptor = TlsAcceptor::from(config);
    let handshakes = crate::listeners::ConnectionCaps::new(
        limits.sidecar_max_handshakes,
        limits.sidecar_max_handshakes_per_address,
    );
    let connections = crate::listeners::ConnectionCaps::new(
        limits.sidecar_max_connections,
        limits.sidecar_max_connections,
    );
    let handshake_timeout = limits.sidecar_handshake_timeout;
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                // Closing the listener on shutdown frees the port at once.
                _ = stop.wait_for(|s| *s) => return,
            };
            let (tcp, addr) = match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let (Some(slot), Some(handshaking)) =
                (connections.admit(addr.ip()), handshakes.admit(addr.ip()))
            else {
                tracing::debug!(peer = %addr, "sidecar connection refused: at a connection or handshake cap");
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = acceptor.clone();
            let conn_tx = tx.clone();
            slot.busy.store(true, std::sync::atomic::Ordering::Release);
            tokio::spawn(async move {
                let handshake = tokio::select! {
                    h = tokio::time::timeout(handshake_timeout, acceptor.accept(tcp)) => h,
                    () = handshaking.evicted.cancelled() => {
                        tracing::debug!(peer = %addr, "stalled handshake dropped for a newer one");
                        return;
                    }
                };
                drop(handshaking);
                let tls = match handshake {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(e)) => {
                        tracing::info!(peer = %addr, error = %e, "sidecar TLS handshake refused");
                        return;
                    }
                    Err(_) => {
                        tracing::info!(peer = %addr, "sidecar TLS handshake timed out");
                        return;
                    }
                };
                let Some(spiffe_id) = peer_spiffe_id(&tls) else {
                    // Unreachable with the SPIFFE verifier in place; refuse anyway.
                    tracing::warn!(peer = %addr, "verified peer has no SPIFFE ID");
                    return;
                };
                let stream = PeerStream {
                    inner: tls,
                    peer: PeerIdentity {
                        spiffe_id: spiffe_id.into(),
                        addr,
                    },
                    _slot: slot,
                };
                let _ = conn_tx.send(Ok(stream)).await;
            });
            if tx.is_closed() {
                return;
            }
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

fn peer_spiffe_id(tls: &TlsStream<TcpStream>) -> Option<String> {
    let leaf = tls.get_ref().1.peer_certificates()?.first()?;
    spiffe::cert::spiffe_id_from_der(leaf.as_ref())
        .ok()
        .map(|id| id.to_string())
}
