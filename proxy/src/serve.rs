//! Serving one workload connection: HTTP/1.1 with the per-connection header
//! timer (`conn.rs`), or HTTP/2 (inside an intercepted tunnel, by ALPN).
//! Listeners (`app.rs`) and intercepted tunnels (`tunnel.rs`) both hand
//! their connections here.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use http::{Request, Response};
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};

use crate::conn::{HeadWatch, RequestBody, Watched};
use crate::egress::{ProxyBody, ResponseTimer};

/// What a handler knows of the connection a request came on. It holds the
/// connection's place under the listener's connection budget: a `CONNECT`
/// tunnel keeps a clone for as long as it is open.
pub struct ConnInfo {
    pub peer: SocketAddr,
    pub(crate) _permit: Option<tokio::sync::OwnedSemaphorePermit>,
}

/// Most streams open at once on one HTTP/2 connection from a workload.
pub const H2_MAX_CONCURRENT_STREAMS: u32 = 100;

/// The HTTP/1.1 server settings of a workload connection.
pub fn http1_builder(max_header_bytes: usize, max_headers: usize) -> http1::Builder {
    let mut builder = http1::Builder::new();
    builder
        // Timed per connection by `HeadWatch` instead.
        .header_read_timeout(None)
        .max_buf_size(max_header_bytes.max(8192))
        .max_headers(max_headers)
        .keep_alive(true);
    builder
}

/// The service of one HTTP/1.1 connection: each request's bodies report to
/// the connection's [`HeadWatch`], and its requests share one response
/// timer (they come one after another).
pub(crate) fn http1_service<F, Fut>(
    handler: F,
    info: Arc<ConnInfo>,
    watch: Arc<HeadWatch>,
) -> impl hyper::service::Service<
    Request<hyper::body::Incoming>,
    Response = Response<Watched<ProxyBody>>,
    Error = Infallible,
    Future = impl Future<Output = Result<Response<Watched<ProxyBody>>, Infallible>> + Send,
> + Send
where
    F: Fn(Request<RequestBody>, Arc<ConnInfo>, Arc<ResponseTimer>) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Response<ProxyBody>> + Send + 'static,
{
    let timer = Arc::new(ResponseTimer::default());
    service_fn(move |req: Request<hyper::body::Incoming>| {
        // Called by hyper once the header block is complete.
        let request = watch.request_started();
        let req = req.map(|body| Watched::new(body, watch.clone(), request));
        let handler = handler.clone();
        let timer = timer.clone();
        let watch = watch.clone();
        let info = info.clone();
        async move {
            let resp = handler(req, info, timer).await;
            Ok::<_, Infallible>(resp.map(|body| Watched::new(body, watch, request)))
        }
    })
}

/// Drives an HTTP/1.1 connection to its end, closing it once a header
/// block has been awaited for `timeout` (see `HeadWatch`).
pub(crate) async fn drive_http1<C>(
    conn: C,
    watch: Arc<HeadWatch>,
    timeout: Duration,
    peer: SocketAddr,
) where
    C: Future<Output = hyper::Result<()>>,
{
    let mut conn = std::pin::pin!(conn);
    let mut sleep = std::pin::pin!(tokio::time::sleep(timeout));
    let mut registered = false;
    let finished = std::future::poll_fn(|cx| {
        if let Poll::Ready(result) = conn.as_mut().poll(cx) {
            return Poll::Ready(Some(result));
        }
        // The timer is looked at only once it has fired (an atomic
        // load), not polled at every wake-up of the connection.
        if registered && !sleep.is_elapsed() {
            return Poll::Pending;
        }
        // Unconstrained: a sleep polled with the task's budget spent
        // answers Pending without registering, and would never fire.
        while std::pin::pin!(tokio::task::coop::unconstrained(sleep.as_mut()))
            .poll(cx)
            .is_ready()
        {
            match watch.next_deadline(tokio::time::Instant::now(), timeout) {
                Some(next) => sleep.as_mut().reset(next),
                None => return Poll::Ready(None),
            }
        }
        registered = true;
        Poll::Pending
    })
    .await;
    match finished {
        Some(Ok(())) => {}
        Some(Err(e)) => tracing::debug!(error = %e, "connection ended with an error"),
        // Dropping the connection closes it, as hyper does on its own
        // header timeout: no answer to a request never complete.
        None => tracing::debug!(?peer, "header read timeout: connection closed"),
    }
}

/// Serves one HTTP/2 connection to its end. Streams are concurrent, so
/// each request has its own response timer; the header list, the streams
/// open at once and reset floods are bounded by hyper's `h2`.
pub(crate) async fn serve_http2<I, F, Fut>(
    io: I,
    max_header_bytes: usize,
    info: Arc<ConnInfo>,
    handler: F,
    mut drain: tokio::sync::watch::Receiver<bool>,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    F: Fn(Request<RequestBody>, Arc<ConnInfo>, Arc<ResponseTimer>) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Response<ProxyBody>> + Send + 'static,
{
    // Only to give request bodies their type: HTTP/2 has no header wait
    // between requests to time.
    let watch = Arc::new(HeadWatch::new());
    let peer = info.peer;
    let service = service_fn(move |req: Request<hyper::body::Incoming>| {
        let request = watch.request_started();
        let req = req.map(|body| Watched::new(body, watch.clone(), request));
        let handler = handler.clone();
        let info = info.clone();
        async move {
            let resp = handler(req, info, Arc::new(ResponseTimer::default())).await;
            Ok::<_, Infallible>(resp)
        }
    });
    let mut builder = http2::Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(max_header_bytes).unwrap_or(u32::MAX))
        .max_concurrent_streams(H2_MAX_CONCURRENT_STREAMS)
        // RFC 8441: WebSockets over HTTP/2 (extended CONNECT).
        .enable_connect_protocol()
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .keep_alive_timeout(Duration::from_secs(20));
    let conn = builder.serve_connection(TokioIo::new(io), service);
    let mut conn = std::pin::pin!(conn);
    let ended = tokio::select! {
        ended = conn.as_mut() => ended,
        () = leash_api::process::stopped(&mut drain) => {
            // GOAWAY: streams open now finish, no new ones start.
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = ended {
        tracing::debug!(error = %e, ?peer, "HTTP/2 connection ended with an error");
    }
}

/// The HTTP/2 connection preface (RFC 9113 §3.4), which a client speaking
/// HTTP/2 with prior knowledge sends first.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Whether a new connection starts with the HTTP/2 preface, looked at
/// without consuming anything (`peek`). `None`: the peer sent nothing
/// decisive within `timeout`, or closed.
pub(crate) async fn starts_with_h2_preface(
    tcp: &tokio::net::TcpStream,
    timeout: Duration,
) -> Option<bool> {
    let mut buf = [0u8; H2_PREFACE.len()];
    let deadline = tokio::time::Instant::now() + timeout;
    let mut wait = Duration::from_millis(1);
    loop {
        let n = tokio::time::timeout_at(deadline, tcp.peek(&mut buf))
            .await
            .ok()?
            .ok()?;
        if n == 0 {
            return None;
        }
        if buf[..n] != H2_PREFACE[..n] {
            return Some(false);
        }
        if n == H2_PREFACE.len() {
            return Some(true);
        }
        // A prefix of the preface so far (it is normally sent in one
        // write): look again shortly, within the header timeout.
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(Duration::from_millis(50));
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
    }
}

/// An I/O that gives back bytes already read from it before reading on
/// (what was read to tell TLS from plain HTTP in a tunnel).
pub(crate) struct Rewind<I> {
    prefix: bytes::Bytes,
    inner: I,
}

impl<I> Rewind<I> {
    pub(crate) fn new(prefix: bytes::Bytes, inner: I) -> Self {
        Self { prefix, inner }
    }
}

impl<I: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Rewind<I> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            let head = self.prefix.split_to(n);
            buf.put_slice(&head);
            return Poll::Ready(Ok(()));
        }
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<I: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Rewind<I> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}
