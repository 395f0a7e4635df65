//! The connection pool to one upstream: HTTP/1.1 connections (plain or
//! TLS, made by hyper-rustls's connector) over `hyper::client::conn::http1`,
//! kept alive and reused most-recently-used first; or, when a TLS target
//! chose HTTP/2 by ALPN, one multiplexed `hyper::client::conn::http2`
//! connection that every request shares (a new one when it closes).
//!
//! A connection goes back to the pool when its response body has been read
//! to the end, by the body itself: no task is spawned per request to watch
//! it. A body dropped early takes its connection with it (closed). A request
//! that an idle connection could not take (the upstream closed it meanwhile)
//! is retried on another connection, which is safe because hyper hands the
//! request back only when none of it was written.
//!
//! Every hand-off of a request to a connection is preceded, with no
//! `.await` in between, by the caller's *commit* check (the last revocation
//! and staleness check, see `revocation`): a retry is checked again.

use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, Uri};
use hyper::body::Incoming;
use hyper::client::conn::{http1::SendRequest, http2};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::{Connection as _, HttpConnector};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tower::ServiceExt as _;

use crate::body::UpstreamBody;
use crate::refusal::Refusal;

/// A connection's request sender, holding the connection's place under the
/// upstream's connection cap until it is dropped (which closes it).
struct Sender {
    inner: SendRequest<UpstreamBody>,
    _slot: Slot,
}

impl std::ops::Deref for Sender {
    type Target = SendRequest<UpstreamBody>;
    fn deref(&self) -> &Self::Target {
        &self.inner
    }
}

impl std::ops::DerefMut for Sender {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.inner
    }
}

/// One place under the cap; freeing it wakes requests waiting for one.
struct Slot {
    permit: Option<tokio::sync::OwnedSemaphorePermit>,
    pool: Weak<UpstreamClient>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        // The place is given back first, then the waiters woken: a woken
        // request finds it free.
        drop(self.permit.take());
        if let Some(pool) = self.pool.upgrade() {
            pool.wake_waiters();
        }
    }
}

/// Idle connections kept per upstream; more are closed when returned.
const MAX_IDLE: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("connection failed: {0}")]
    Connect(String),
    #[error("request failed: {}", chain(.0))]
    Request(#[from] hyper::Error),
    /// The commit check refused the request: nothing of it was sent, and
    /// it is handed back (a caller may retry it with another credential).
    #[error("{0}")]
    Refused(Refusal, Box<Request<UpstreamBody>>),
}

pub struct UpstreamClient {
    connector: HttpsConnector<HttpConnector>,
    /// `scheme://authority` of the target.
    target: Uri,
    /// Oldest first; checked out from the back (most recently used).
    idle: Mutex<std::collections::VecDeque<(Sender, Instant)>>,
    idle_timeout: Duration,
    /// Connections open at once (busy and idle); a request finding none
    /// idle and no room waits for one to come back or close.
    connections: Arc<tokio::sync::Semaphore>,
    /// Signalled when a connection is returned or closed, to the requests
    /// counted in `waiting`.
    changed: tokio::sync::Notify,
    waiting: std::sync::atomic::AtomicUsize,
    /// The shared HTTP/2 connection, once the target has chosen HTTP/2.
    h2: Mutex<Option<http2::SendRequest<UpstreamBody>>>,
    this: Weak<UpstreamClient>,
}

/// A new connection: an HTTP/1.1 one to use, or an HTTP/2 one now shared
/// in `UpstreamClient::h2`.
enum Connected {
    H1(Sender),
    H2,
}

impl UpstreamClient {
    pub fn new(
        connector: HttpsConnector<HttpConnector>,
        target: Uri,
        idle_timeout: Duration,
        max_connections: usize,
    ) -> Arc<Self> {
        Arc::new_cyclic(|this| Self {
            connector,
            target,
            idle: Mutex::new(std::collections::VecDeque::new()),
            idle_timeout,
            connections: Arc::new(tokio::sync::Semaphore::new(max_connections.max(1))),
            changed: tokio::sync::Notify::new(),
            waiting: std::sync::atomic::AtomicUsize::new(0),
            h2: Mutex::new(None),
            this: this.clone(),
        })
    }

    /// An idle connection, or a place for a new one, waiting (within the
    /// caller's response timeout) while the upstream is at its cap. The
    /// usual case (an idle connection, or room) takes no lock beyond the
    /// idle list's.
    async fn connection(&self) -> Result<Connected, UpstreamError> {
        use std::sync::atomic::Ordering::SeqCst;
        loop {
            if let Some(sender) = self.checkout() {
                return Ok(Connected::H1(sender));
            }
            if self.shared_h2().is_some() {
                return Ok(Connected::H2);
            }
            if let Ok(permit) = self.connections.clone().try_acquire_owned() {
                return self.connect(permit).await;
            }
            // At the cap: register, then look again, so that a connection
            // returned in between is not missed (see `wake_waiters`).
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            self.waiting.fetch_add(1, SeqCst);
            let found = match self.checkout() {
                Some(sender) => Some(Ok(Connected::H1(sender))),
                None => match self.connections.clone().try_acquire_owned() {
                    Ok(permit) => Some(self.connect(permit).await),
                    Err(_) => None,
                },
            };
            if found.is_none() {
                changed.await;
            }
            self.waiting.fetch_sub(1, SeqCst);
            if let Some(result) = found {
                return result;
            }
        }
    }

    /// Wakes requests waiting for a connection, if any (a connection came
    /// back or closed).
    fn wake_waiters(&self) {
        if self.waiting.load(std::sync::atomic::Ordering::SeqCst) > 0 {
            self.changed.notify_waiters();
        }
    }

    /// Sends `req` on a pooled connection, or a new one. `commit` runs
    /// right before each hand-off to a connection (the guard it returns is
    /// dropped once the request is on the connection's queue); its refusal
    /// ends the call with nothing sent.
    pub async fn request<G>(
        &self,
        mut req: Request<UpstreamBody>,
        mut commit: impl FnMut(&Request<UpstreamBody>) -> Result<G, Refusal>,
    ) -> Result<Response<PooledBody>, UpstreamError> {
        loop {
            if let Some(h2) = self.shared_h2() {
                match self.request_h2(h2, req, &mut commit).await {
                    Ok(done) => return done,
                    // Never sent: the connection closed meanwhile.
                    Err(back) => {
                        req = back;
                        continue;
                    }
                }
            }
            // An idle connection, at once; the rest (connect, wait at the
            // cap) out of line, so that its large future is not part of
            // every request's.
            let mut sender = match self.checkout() {
                Some(sender) => sender,
                None => match Box::pin(self.connection()).await? {
                    Connected::H1(sender) => sender,
                    Connected::H2 => continue,
                },
            };
            if sender.ready().await.is_err() {
                continue;
            }
            let sent = {
                let _committed = match commit(&req) {
                    Ok(guard) => guard,
                    Err(refusal) => {
                        // Nothing was written: the connection stays usable.
                        self.checkin(sender);
                        return Err(UpstreamError::Refused(refusal, Box::new(req)));
                    }
                };
                // Queued on the connection synchronously, under the guard.
                sender.try_send_request(req)
            };
            match sent.await {
                Ok(resp) => return Ok(self.wrap(resp, sender)),
                Err(mut e) => match e.take_message() {
                    // Never written (an idle connection the upstream had
                    // closed): try another connection.
                    Some(back) => req = back,
                    None => return Err(UpstreamError::Request(e.into_error())),
                },
            }
        }
    }

    /// The shared HTTP/2 connection, if there is one still open.
    fn shared_h2(&self) -> Option<http2::SendRequest<UpstreamBody>> {
        let mut h2 = self.h2.lock().unwrap_or_else(|p| p.into_inner());
        match h2.as_ref() {
            Some(sender) if !sender.is_closed() => Some(sender.clone()),
            Some(_) => {
                *h2 = None;
                None
            }
            None => None,
        }
    }

    /// One request on the shared HTTP/2 connection, committed right before
    /// it is queued on it, as on HTTP/1.1. `Err` hands back a request that
    /// was never sent (the connection closed meanwhile).
    async fn request_h2<G>(
        &self,
        mut h2: http2::SendRequest<UpstreamBody>,
        mut req: Request<UpstreamBody>,
        commit: &mut impl FnMut(&Request<UpstreamBody>) -> Result<G, Refusal>,
    ) -> Result<Result<Response<PooledBody>, UpstreamError>, Request<UpstreamBody>> {
        if h2.ready().await.is_err() {
            return Err(req);
        }
        let sent = {
            let _committed = match commit(&req) {
                Ok(guard) => guard,
                Err(refusal) => {
                    return Ok(Err(UpstreamError::Refused(refusal, Box::new(req))));
                }
            };
            // HTTP/2 carries the target in `:scheme` and `:authority`.
            self.absolute(&mut req);
            h2.try_send_request(req)
        };
        match sent.await {
            Ok(resp) => {
                let (parts, inner) = resp.into_parts();
                Ok(Ok(Response::from_parts(
                    parts,
                    PooledBody { inner, back: None },
                )))
            }
            Err(mut e) => match e.take_message() {
                Some(mut back) => {
                    origin_form(&mut back, &self.target);
                    Err(back)
                }
                None => Ok(Err(UpstreamError::Request(e.into_error()))),
            },
        }
    }

    /// The request target in absolute form, for HTTP/2 (`Host` goes: the
    /// authority says it).
    fn absolute(&self, req: &mut Request<UpstreamBody>) {
        let mut parts = req.uri().clone().into_parts();
        parts.scheme = self.target.scheme().cloned();
        parts.authority = self.target.authority().cloned();
        if let Ok(uri) = Uri::from_parts(parts) {
            *req.uri_mut() = uri;
            req.headers_mut().remove(http::header::HOST);
        }
        if req.extensions().get::<crate::body::TeTrailers>().is_some() {
            req.headers_mut()
                .insert(http::header::TE, http::HeaderValue::from_static("trailers"));
        }
    }

    fn checkout(&self) -> Option<Sender> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        while let Some((sender, since)) = idle.pop_back() {
            if !sender.is_closed() && since.elapsed() < self.idle_timeout {
                return Some(sender);
            }
        }
        None
    }

    fn checkin(&self, sender: Sender) {
        if sender.is_closed() {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        // Close what has idled too long or was closed by the upstream
        // (dropping a sender closes its connection).
        while idle
            .front()
            .is_some_and(|(s, since)| s.is_closed() || since.elapsed() >= self.idle_timeout)
        {
            idle.pop_front();
        }
        if idle.len() < MAX_IDLE {
            idle.push_back((sender, Instant::now()));
        }
        drop(idle);
        self.wake_waiters();
    }

    async fn connect(
        &self,
        permit: tokio::sync::OwnedSemaphorePermit,
    ) -> Result<Connected, UpstreamError> {
        let io = self
            .connector
            .clone()
            .oneshot(self.target.clone())
            .await
            .map_err(|e| UpstreamError::Connect(chain(&*e)))?;
        if io.connected().is_negotiated_h2() {
            let (sender, conn) = http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .handshake(io)
                .await
                .map_err(|e| UpstreamError::Connect(chain(&e)))?;
            let slot = Slot {
                permit: Some(permit),
                pool: self.this.clone(),
            };
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    tracing::debug!(error = %e, "upstream HTTP/2 connection ended with an error");
                }
                // Its place under the cap is free once it has closed.
                drop(slot);
            });
            *self.h2.lock().unwrap_or_else(|p| p.into_inner()) = Some(sender);
            return Ok(Connected::H2);
        }
        let (sender, conn) = hyper::client::conn::http1::Builder::new()
            .handshake(io)
            .await
            .map_err(|e| UpstreamError::Connect(chain(&e)))?;
        tokio::spawn(async move {
            // With upgrades: a WebSocket handshake's connection is handed
            // to its relay.
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(error = %e, "upstream connection ended with an error");
            }
        });
        Ok(Connected::H1(Sender {
            inner: sender,
            _slot: Slot {
                permit: Some(permit),
                pool: self.this.clone(),
            },
        }))
    }

    fn wrap(&self, resp: Response<Incoming>, sender: Sender) -> Response<PooledBody> {
        if resp.status() == http::StatusCode::SWITCHING_PROTOCOLS {
            // Upgraded: the connection never comes back to the pool; its
            // place under the cap is held by whoever relays it.
            let (mut parts, inner) = resp.into_parts();
            parts
                .extensions
                .insert(HeldConnection(Arc::new(std::sync::Mutex::new(sender))));
            return Response::from_parts(parts, PooledBody { inner, back: None });
        }
        let (parts, inner) = resp.into_parts();
        let mut body = PooledBody {
            inner,
            back: Some((sender, self.this.clone())),
        };
        if http_body::Body::is_end_stream(&body.inner) {
            body.release();
        }
        Response::from_parts(parts, body)
    }

    /// Idle connections now (tests and diagnostics).
    pub fn idle_connections(&self) -> usize {
        self.idle.lock().map(|i| i.len()).unwrap_or(0)
    }
}

/// An upgraded connection's place under its upstream's cap, carried in the
/// `101` response's extensions to whoever relays the connection.
#[derive(Clone)]
pub struct HeldConnection(
    #[allow(dead_code, reason = "held, not read")] Arc<std::sync::Mutex<Sender>>,
);

/// Back to origin form (a request the HTTP/2 connection handed back goes
/// on HTTP/1.1): path and query, and `Host` from the target.
fn origin_form(req: &mut Request<UpstreamBody>, target: &Uri) {
    if let Some(pq) = req.uri().path_and_query().cloned() {
        *req.uri_mut() = Uri::from(pq);
    }
    if let Some(host) = target
        .authority()
        .and_then(|a| http::HeaderValue::from_str(a.as_str()).ok())
    {
        req.headers_mut().insert(http::header::HOST, host);
    }
}

fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut msg = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        source = s.source();
    }
    msg
}

/// A response body that returns its connection to the pool when read to
/// the end.
pub struct PooledBody {
    inner: Incoming,
    back: Option<(Sender, Weak<UpstreamClient>)>,
}

impl PooledBody {
    fn release(&mut self) {
        if let Some((sender, pool)) = self.back.take()
            && let Some(pool) = pool.upgrade()
        {
            pool.checkin(sender);
        }
    }
}

impl http_body::Body for PooledBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let frame = Pin::new(&mut this.inner).poll_frame(cx);
        if crate::conn::ended(&this.inner, &frame) {
            this.release();
        } else if let Poll::Ready(Some(Err(_))) = frame {
            // An error: the connection is not reusable.
            this.back = None;
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
