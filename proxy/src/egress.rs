//! The request path. Reads top to bottom as the pipeline it is:
//! leak scan → route → deny by default → staleness → grant → revocation →
//! credential → body prefix scan → sanitize → inject → commit (the last
//! revocation, staleness and leak check, in the same synchronous step as the
//! hand-off to the upstream connection) → forward → strip hop-by-hop from the
//! answer. Bodies stream both ways and are cut when a revocation covers their
//! credential. Every refusal is a [`Refusal`], turned into a response in one
//! place.

use std::future::Future as _;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use leash_api::revocation::{RevocationKind, RevocationSet};
use leash_api::v1::Revocation;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName};
use http::{Method, Request, Response, Uri, Version};
use http_body_util::BodyExt as _;
use http_body_util::combinators::UnsyncBoxBody;

use crate::cache::{CachedCredential, CredentialCache, CredentialError, InjectValue};
use crate::conn::RequestBody;
use crate::control::ControlLink;
use crate::leak;
use crate::refusal::Refusal;
use crate::revocation::InflightGuard;
use crate::routes::{EgressRoute, InjectHow};
use crate::telemetry::{EgressOtel, TraceInfo};
use crate::upstream::UpstreamError;
use crate::usage;
use leash_api::v1::{LeakRefusal, SidecarMessage, sidecar_message};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type ProxyBody = UnsyncBoxBody<Bytes, BoxError>;

pub struct Egress {
    pub link: Arc<ControlLink>,
    pub cache: CredentialCache,
    pub response_timeout: Duration,
    pub max_header_bytes: usize,
    /// Spans and OTLP metrics, when an OTLP endpoint is configured.
    pub otel: Option<Arc<EgressOtel>>,
    pub usage_reporting: bool,
    /// Requests being proxied now, and the most allowed at once.
    pub in_flight: std::sync::atomic::AtomicUsize,
    pub max_in_flight: usize,
}

/// Counts a request as in flight until dropped.
struct InFlight<'a>(&'a std::sync::atomic::AtomicUsize);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Egress {
    /// Serves one request. `bound` is the upstream of a named listener;
    /// `timer` is the response timer of the workload connection it came on.
    pub(crate) async fn handle(
        &self,
        bound: Option<&str>,
        req: Request<RequestBody>,
        timer: &ResponseTimer,
    ) -> Response<ProxyBody> {
        let arrived = std::time::Instant::now();
        // Load shedding: past the limit, a clear 503 at once, not a queue.
        let n = self
            .in_flight
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let _in_flight = InFlight(&self.in_flight);
        if n >= self.max_in_flight {
            return self.refuse(Refusal::Overloaded {
                what: "requests in flight",
                limit: self.max_in_flight,
            });
        }
        if let Some(otel) = &self.otel {
            return Box::pin(self.handle_traced(otel, bound, req, arrived, timer)).await;
        }
        match self.forward(bound, req, arrived, timer, None).await {
            Ok(resp) => resp,
            Err(refusal) => self.refuse(refusal),
        }
    }

    fn refuse(&self, refusal: Refusal) -> Response<ProxyBody> {
        self.link.metrics.refused(&refusal);
        tracing::info!(code = refusal.code(), reason = %refusal, "request refused");
        refusal.into_response()
    }

    /// As `handle`, inside a span that continues the workload's trace.
    async fn handle_traced(
        &self,
        otel: &EgressOtel,
        bound: Option<&str>,
        req: Request<RequestBody>,
        arrived: std::time::Instant,
        timer: &ResponseTimer,
    ) -> Response<ProxyBody> {
        let mut info = otel.start(req.headers(), req.method(), self.link.workload_arc());
        let result = self
            .forward(bound, req, arrived, timer, Some(&mut info))
            .await;
        match result {
            Ok(resp) => {
                otel.finish(info, Ok(resp.status()));
                resp
            }
            Err(refusal) => {
                otel.finish(info, Err((refusal.code(), refusal.to_string())));
                self.refuse(refusal)
            }
        }
    }

    async fn forward(
        &self,
        bound: Option<&str>,
        req: Request<RequestBody>,
        arrived: std::time::Instant,
        timer: &ResponseTimer,
        mut trace: Option<&mut TraceInfo>,
    ) -> Result<Response<ProxyBody>, Refusal> {
        if req.method() == Method::CONNECT {
            return Err(Refusal::ConnectNotSupported);
        }
        // hyper's read buffer bounds the header block only loosely (a single
        // large read can overshoot it), so the limit is enforced exactly here.
        if header_block_len(&req) > self.max_header_bytes {
            return Err(Refusal::HeadersTooLarge {
                limit: self.max_header_bytes,
            });
        }
        // I2: a registered leaked value never leaves, whatever the host.
        // The set scanned against is kept: if it changes before the commit,
        // the outgoing request is scanned again against the new one.
        let scanned = self.link.revocations.set.load_full();
        self.refuse_leaked(bound, &req, &scanned)?;
        let route = self.route(bound, &req)?;
        if let Some(t) = trace.as_deref_mut() {
            t.upstream = Some(route.name.clone());
        }
        self.fresh_at(arrived)?;
        if !route.granted {
            return Err(Refusal::NotGranted {
                upstream: route.name.to_string(),
            });
        }
        // TRACE (and IIS's TRACK) reflect the request, injected credential
        // included, back to the workload.
        if let Some(method) = reflecting(req.method()) {
            return Err(Refusal::TraceRefused {
                method,
                upstream: route.name.to_string(),
            });
        }
        // A first check on arrival, for a fast refusal; the one that decides
        // is the commit's (see `commit`).
        self.not_revoked(&route, &scanned)?;
        let mut credential = self.credential(&route).await?;
        if credential_cut(&credential, &scanned) {
            // Only that instance is revoked, not the grant: use a fresh one.
            self.cache.invalidate(&route).await;
            credential = self.credential(&route).await?;
        }

        let (mut parts, body) = req.into_parts();
        let method = usage::method_index(&parts.method);
        let bytes_sent = http_body::Body::size_hint(&body).exact().unwrap_or(0);
        let body = if route.scan_body_bytes > 0 {
            let (prefix, body) = Box::pin(read_prefix(body, route.scan_body_bytes)).await?;
            self.refuse_leaked_body(&route, &parts, &prefix, &scanned)?;
            body.with_prefix(prefix, &credential)
        } else {
            UpstreamBody::direct(body, &credential)
        };
        let own_header = upstream_headers(&mut parts.headers, &route.inject, &credential.value);
        let (uri, own_param) = upstream_uri(&route, &parts.method, &parts.uri, &credential)?;
        parts.uri = uri;
        if own_header || own_param {
            route
                .stripped
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        parts.version = Version::HTTP_11;
        parts
            .headers
            .insert(header::HOST, route.host_header.clone());
        tracing::debug!(upstream = %route.name, credential_id = %credential.id, "forwarding");
        if let Some(t) = trace.as_deref_mut() {
            t.credential_id = Some(credential.id.clone());
            // The upstream sees the sidecar's span as the parent.
            leash_api::telemetry::propagation::inject(&t.cx, &mut parts.headers);
        }

        let at_ms = if self.usage_reporting {
            usage::now_ms()
        } else {
            0
        };
        let sent = std::time::Instant::now();
        route.metrics.injection.observe(sent - arrived);
        timer.arm(sent + self.response_timeout);
        let mut req = Request::from_parts(parts, body);
        let mut renewed = false;
        let answer = loop {
            let answer = {
                let commit = |r: &Request<UpstreamBody>| {
                    self.commit(bound, &route, &credential, &scanned, r)
                };
                let call = std::pin::pin!(route.client.request(req, commit));
                Deadline { call, timer }.await
            };
            match answer {
                // Only the credential instance was revoked on the way (a
                // rotated secret version, one leaked JWT), not the grant:
                // the request goes once more with a fresh one.
                Ok(Err(UpstreamError::Refused(refusal, back)))
                    if !renewed && refusal.code() == "revoked_credential" =>
                {
                    renewed = true;
                    self.cache.invalidate(&route).await;
                    credential = self.credential(&route).await?;
                    req = *back;
                    reinject(&mut req, &route, &credential)?;
                }
                other => break other,
            }
        };
        let upstream_time = sent.elapsed();
        route.metrics.upstream.observe(upstream_time);
        if let Some(t) = trace {
            t.upstream_time = Some(upstream_time);
        }
        let answer = match answer {
            // Refused at its commit: nothing was sent, so nothing was used.
            Ok(Err(UpstreamError::Refused(refusal, _))) => return Err(refusal),
            other => other,
        };
        let status = match &answer {
            Ok(Ok(resp)) => Some(resp.status()),
            _ => None,
        };
        let slot = if self.usage_reporting {
            let slot = usage::slot(method, status);
            credential.usage.record(slot, at_ms, bytes_sent);
            slot
        } else {
            usage::NO_SLOT
        };
        let resp = match answer {
            Ok(Ok(resp)) => resp,
            // The upload was cut because a revocation covered it.
            Ok(Err(_)) if credential.revoked.is_cancelled() => {
                return Err(self.cut_refusal(&route, &credential));
            }
            Ok(Err(e)) => {
                return Err(Refusal::UpstreamUnreachable {
                    upstream: route.name.to_string(),
                    reason: e.to_string(),
                });
            }
            Err(_) => {
                return Err(Refusal::UpstreamTimeout {
                    upstream: route.name.to_string(),
                    timeout_ms: u64::try_from(self.response_timeout.as_millis())
                        .unwrap_or(u64::MAX),
                });
            }
        };
        let (mut parts, body) = resp.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        // The credential never comes back to the workload (an echo, a
        // `Location` keeping a query token).
        remove_echoes(&mut parts.headers, &credential, &route);
        route
            .metrics
            .forwarded
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let body = Revocable {
            inner: body,
            credential,
            slot,
            wait: None,
        };
        Ok(Response::from_parts(parts, body.boxed_unsync()))
    }

    /// Refuses (and reports at once) a request carrying a leaked value in
    /// its headers or query.
    fn refuse_leaked(
        &self,
        bound: Option<&str>,
        req: &Request<RequestBody>,
        set: &RevocationSet,
    ) -> Result<(), Refusal> {
        if !set.has_leaked() {
            return Ok(());
        }
        let Some(key) = self.link.fingerprint_key.load_full() else {
            return Ok(());
        };
        match leak::scan_request(set, &key, req.headers(), req.uri()) {
            None => Ok(()),
            Some(hit) => {
                let host = request_host(req).unwrap_or_default().to_owned();
                let upstream = match bound {
                    Some(name) => name.to_owned(),
                    None => self
                        .link
                        .routes
                        .load()
                        .by_host(&host)
                        .map(|r| r.name.to_string())
                        .unwrap_or_default(),
                };
                Err(self.leaked(hit, upstream, host))
            }
        }
    }

    fn refuse_leaked_body(
        &self,
        route: &EgressRoute,
        parts: &http::request::Parts,
        prefix: &[Bytes],
        set: &RevocationSet,
    ) -> Result<(), Refusal> {
        if !set.has_leaked() {
            return Ok(());
        }
        let Some(key) = self.link.fingerprint_key.load_full() else {
            return Ok(());
        };
        let joined = zeroize::Zeroizing::new(prefix.concat());
        // Frames may overshoot the limit; scan_body scans at most the limit.
        match leak::scan_body(set, &key, &parts.headers, &joined, route.scan_body_bytes) {
            None => Ok(()),
            Some(hit) => {
                let host = parts.uri.host().unwrap_or_default().to_owned();
                Err(self.leaked(hit, route.name.to_string(), host))
            }
        }
    }

    fn leaked(&self, hit: leak::LeakHit, upstream: String, host: String) -> Refusal {
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
            .unwrap_or(0);
        self.link.report(SidecarMessage {
            msg: Some(sidecar_message::Msg::Leak(LeakRefusal {
                revocation_id: hit.revocation_id.clone(),
                upstream: upstream.clone(),
                host: host.clone(),
                location: hit.location.clone(),
                at_ms: now_ms,
            })),
        });
        Refusal::LeakedSecret {
            revocation_id: hit.revocation_id,
            location: hit.location,
            workload: self.link.workload_id().to_string(),
            upstream,
            host,
        }
    }

    /// The check that decides (I1, I3, I7): run by the upstream pool at the
    /// moment the request is handed to a connection, after its body prefix
    /// was read, its connection made and its credential fetched, inside the
    /// revocation gate and with no `.await` until the hand-off. The guard
    /// it returns is held until the request is on the connection.
    fn commit(
        &self,
        bound: Option<&str>,
        route: &EgressRoute,
        credential: &CachedCredential,
        scanned: &Arc<RevocationSet>,
        req: &Request<UpstreamBody>,
    ) -> Result<InflightGuard<'_>, Refusal> {
        let guard = self.link.revocations.gate.enter();
        let set = self.link.revocations.set.load();
        self.fresh_at(std::time::Instant::now())?;
        self.not_revoked(route, &set)?;
        if credential_cut(credential, &set) {
            return Err(self.cut_refusal(route, credential));
        }
        // Leaked values registered since the request was scanned: scan what
        // is about to leave.
        if !Arc::ptr_eq(&set, scanned) && set.has_leaked() {
            self.refuse_leaked_outgoing(bound, route, req, &set)?;
        }
        Ok(guard)
    }

    /// Staleness (I3) at `now`.
    fn fresh_at(&self, now: std::time::Instant) -> Result<(), Refusal> {
        match self.link.stale_at(now) {
            Some(silence) => Err(Refusal::Stale {
                silence_secs: silence.as_secs(),
                max_secs: self.link.max_staleness().as_secs(),
            }),
            None => Ok(()),
        }
    }

    /// Revocations of the workload, its grant or the upstream (I1).
    fn not_revoked(&self, route: &EgressRoute, set: &RevocationSet) -> Result<(), Refusal> {
        if let Some(r) = set.check(&self.link.workload_id(), &route.name) {
            return Err(revoked(r, &route.name));
        }
        Ok(())
    }

    /// Why a credential that was cut (or is revoked) cannot be used.
    fn cut_refusal(&self, route: &EgressRoute, credential: &CachedCredential) -> Refusal {
        let set = self.link.revocations.set.load();
        if let Some(r) = set.check(&self.link.workload_id(), &route.name) {
            return revoked(r, &route.name);
        }
        let revocation = set
            .active()
            .find(|r| r.kind == "credential" && r.credential_id == *credential.id);
        Refusal::Revoked {
            code: "revoked_credential",
            what: format!("credential {}", credential.id),
            revocation_id: revocation.map(|r| r.id.clone()).unwrap_or_default(),
            reason: revocation.map_or_else(
                || "a revocation cut this credential while the request was on its way".into(),
                |r| r.reason.clone(),
            ),
            upstream: route.name.to_string(),
        }
    }

    /// The leak scan of a request as it will leave (headers as rewritten,
    /// the origin-form target, the scanned body prefix).
    fn refuse_leaked_outgoing(
        &self,
        bound: Option<&str>,
        route: &EgressRoute,
        req: &Request<UpstreamBody>,
        set: &RevocationSet,
    ) -> Result<(), Refusal> {
        let Some(key) = self.link.fingerprint_key.load_full() else {
            return Ok(());
        };
        let host = route.host_header.to_str().unwrap_or_default().to_owned();
        let upstream = bound.unwrap_or(&route.name).to_owned();
        if let Some(hit) = leak::scan_request(set, &key, req.headers(), req.uri()) {
            return Err(self.leaked(hit, upstream, host));
        }
        let prefix = req.body().prefix();
        if !prefix.is_empty() {
            let joined = zeroize::Zeroizing::new(prefix.concat());
            let hit = leak::scan_body(set, &key, req.headers(), &joined, route.scan_body_bytes);
            if let Some(hit) = hit {
                return Err(self.leaked(hit, upstream, host));
            }
        }
        Ok(())
    }

    async fn credential(&self, route: &Arc<EgressRoute>) -> Result<Arc<CachedCredential>, Refusal> {
        self.cache.get(route).await.map_err(|e| match e {
            CredentialError::Denied { code, message } => Refusal::Denied {
                upstream: route.name.to_string(),
                code,
                message,
            },
            CredentialError::Unavailable(reason) => Refusal::CredentialUnavailable {
                upstream: route.name.to_string(),
                reason,
            },
        })
    }

    /// Finds the upstream: by listener binding, else by the request's host.
    fn route(
        &self,
        bound: Option<&str>,
        req: &Request<RequestBody>,
    ) -> Result<Arc<EgressRoute>, Refusal> {
        let table = self.link.routes.load();
        if !table.loaded {
            return Err(if self.link.identity_ready() {
                Refusal::ControlPlaneUnavailable
            } else {
                Refusal::IdentityUnavailable
            });
        }
        if let Some(name) = bound {
            return table
                .by_name(name)
                .cloned()
                .ok_or_else(|| Refusal::UnknownUpstream {
                    host: format!("(listener for {name})"),
                });
        }
        let host = request_host(req).ok_or(Refusal::NoHost)?;
        table
            .by_host(host)
            .cloned()
            .ok_or_else(|| Refusal::UnknownUpstream {
                host: host.to_owned(),
            })
    }
}

/// The upstream response timer of one workload connection. Its requests
/// come one after another, so one timer entry serves them all: re-arming a
/// registered timer for a later deadline is a compare-and-swap in tokio,
/// where a timeout per request inserts into and removes from the timer
/// wheel every time.
#[derive(Default)]
pub struct ResponseTimer(std::sync::Mutex<Option<Pin<Box<tokio::time::Sleep>>>>);

impl ResponseTimer {
    fn arm(&self, deadline: std::time::Instant) {
        let deadline = tokio::time::Instant::from_std(deadline);
        let mut sleep = self.0.lock().unwrap_or_else(|p| p.into_inner());
        match sleep.as_mut() {
            Some(sleep) => sleep.as_mut().reset(deadline),
            None => *sleep = Some(Box::pin(tokio::time::sleep_until(deadline))),
        }
    }

    /// Whether the deadline last armed has passed (registers the waker).
    fn poll_expired(&self, cx: &mut Context<'_>) -> bool {
        let mut sleep = self.0.lock().unwrap_or_else(|p| p.into_inner());
        sleep
            .as_mut()
            .is_some_and(|sleep| sleep.as_mut().poll(cx).is_ready())
    }
}

/// `call`, or `Err(())` once its connection's response timer expires.
struct Deadline<'a, F> {
    call: F,
    timer: &'a ResponseTimer,
}

impl<F: std::future::Future + Unpin> std::future::Future for Deadline<'_, F> {
    type Output = Result<F::Output, ()>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        if let Poll::Ready(out) = Pin::new(&mut self.call).poll(cx) {
            return Poll::Ready(Ok(out));
        }
        if self.timer.poll_expired(cx) {
            return Poll::Ready(Err(()));
        }
        Poll::Pending
    }
}

/// Puts `credential` into a request built for another one (see `forward`).
fn reinject(
    req: &mut Request<UpstreamBody>,
    route: &EgressRoute,
    credential: &CachedCredential,
) -> Result<(), Refusal> {
    inject_credential(req.headers_mut(), &route.inject, &credential.value);
    let (uri, _) = upstream_uri(route, req.method(), req.uri(), credential)?;
    *req.uri_mut() = uri;
    let body = req.body_mut();
    body.revoked = credential.revoked.clone();
    body.wait = None;
    Ok(())
}

/// Whether `credential` was cut by a revocation or is revoked in `set`.
fn credential_cut(credential: &CachedCredential, set: &RevocationSet) -> bool {
    credential.revoked.is_cancelled() || set.credential_revoked(&credential.id)
}

fn revoked(r: &Revocation, upstream: &str) -> Refusal {
    let kind = RevocationKind::parse(&r.kind);
    let what = match kind {
        Some(RevocationKind::Upstream) => format!("upstream {}", r.upstream),
        Some(RevocationKind::Grant) => format!("the grant of {} to {}", r.upstream, r.workload),
        _ => format!("workload {}", r.workload),
    };
    Refusal::Revoked {
        code: kind.map_or("revoked", RevocationKind::refusal_code),
        what,
        revocation_id: r.id.clone(),
        reason: r.reason.clone(),
        upstream: upstream.to_owned(),
    }
}

/// A response body that ends with an error as soon as the credential its
/// request carried is revoked: long-lived streams do not outlive a revocation.
struct Revocable<B> {
    inner: B,
    /// Its revocation cuts the stream; its usage counts the bytes.
    credential: Arc<CachedCredential>,
    slot: usize,
    /// Created only when the body has to wait, so short answers cost nothing.
    wait: Option<Pin<Box<WaitForCancellationFutureOwned>>>,
}

impl<B> http_body::Body for Revocable<B>
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        // What has already arrived is delivered (the upstream answered before
        // the revocation was acknowledged); a stream that has to wait for more
        // is cut once its credential is revoked.
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref()
                    && this.slot != usage::NO_SLOT
                {
                    this.credential.usage.received(this.slot, data.len() as u64);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(frame) => Poll::Ready(frame.map(|f| f.map_err(Into::into))),
            Poll::Pending => {
                let wait = this.wait.get_or_insert_with(|| {
                    Box::pin(this.credential.revoked.clone().cancelled_owned())
                });
                match wait.as_mut().poll(cx) {
                    Poll::Ready(()) => {
                        Poll::Ready(Some(Err("stream cut: its credential was revoked".into())))
                    }
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Size of the request line and header block as sent (near enough: the
/// method/version framing is a few bytes either way).
fn header_block_len(req: &Request<RequestBody>) -> usize {
    let uri = req.uri();
    let target = uri.scheme_str().map_or(0, |s| s.len() + 3)
        + uri.authority().map_or(0, |a| a.as_str().len())
        + uri.path_and_query().map_or(1, |p| p.as_str().len());
    let line = req.method().as_str().len() + target + 12;
    req.headers()
        .iter()
        .fold(line, |n, (k, v)| n + k.as_str().len() + v.len() + 4)
}

/// The host of an absolute-form request (forward proxy), else of `Host`.
fn request_host(req: &Request<RequestBody>) -> Option<&str> {
    if let Some(host) = req.uri().host() {
        return Some(host.trim_end_matches('.'));
    }
    let host = req.headers().get(header::HOST)?.to_str().ok()?;
    // Strip a port, keeping bracketed IPv6 literals intact.
    let end = if host.starts_with('[') {
        host.find(']').map_or(host.len(), |i| i + 1)
    } else {
        host.rfind(':').unwrap_or(host.len())
    };
    Some(host[..end].trim_end_matches('.'))
}

static HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::UPGRADE,
];

/// Where `name` is in [`HOP_BY_HOP`] (a match on the lowercase name: cheaper
/// than comparing with each entry).
fn hop_by_hop_index(name: &HeaderName) -> Option<usize> {
    hop_by_hop_lowercase(name.as_str().as_bytes())
}

/// As [`hop_by_hop_index`], for a `Connection` token in any case.
fn hop_by_hop_token(token: &[u8]) -> Option<usize> {
    let mut lower = [0u8; 19];
    let buf = lower.get_mut(..token.len())?;
    for (d, s) in buf.iter_mut().zip(token) {
        *d = s.to_ascii_lowercase();
    }
    hop_by_hop_lowercase(buf)
}

fn hop_by_hop_lowercase(name: &[u8]) -> Option<usize> {
    Some(match name {
        b"connection" => 0,
        b"keep-alive" => 1,
        b"proxy-connection" => 2,
        b"proxy-authorization" => 3,
        b"te" => 4,
        b"trailer" => 5,
        b"upgrade" => 6,
        _ => return None,
    })
}

/// The workload's headers made into the upstream's: connection-level ones
/// removed, the credential injected (see `inject_credential`). Returns
/// whether the workload had sent a credential of its own.
pub fn upstream_headers(headers: &mut HeaderMap, inject: &InjectHow, value: &InjectValue) -> bool {
    strip_hop_by_hop(headers);
    inject_credential(headers, inject, value)
}

/// Removes connection-level headers, including any that `Connection` names.
/// (`Transfer-Encoding` is handled by hyper's codec on each side.)
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // One pass over the (few) headers notes which hop-by-hop ones are there
    // (usually none, or an upstream's `Connection: keep-alive`): only those
    // are then looked up and removed.
    let mut present = 0u8;
    for k in headers.keys() {
        if let Some(i) = hop_by_hop_index(k) {
            present |= 1 << i;
        }
    }
    if present == 0 {
        return;
    }
    // HOP_BY_HOP[0] is `Connection`: what it names goes too, unless it is
    // one of the hop-by-hop headers removed below anyway.
    if present & 1 != 0
        && let http::header::Entry::Occupied(connection) = headers.entry(header::CONNECTION)
    {
        // Taken out with one lookup; the removal loop below skips it.
        present &= !1;
        let (_, values) = connection.remove_entry_mult();
        let mut named = Vec::new();
        let mut close = false;
        for value in values {
            for token in value.as_bytes().split(|b| *b == b',') {
                let token = token.trim_ascii();
                // The common tokens (`keep-alive`, `close`) are checked
                // without building a header name (which allocates).
                if token.is_empty() || hop_by_hop_token(token).is_some() {
                    continue;
                }
                if token.eq_ignore_ascii_case(b"close") {
                    close = true;
                } else if let Ok(name) = HeaderName::from_bytes(token) {
                    named.push(name);
                }
            }
        }
        if close {
            headers.remove("close");
        }
        for name in named {
            headers.remove(name);
        }
    }
    for (i, name) in HOP_BY_HOP.iter().enumerate() {
        if present & (1 << i) != 0 {
            headers.remove(name);
        }
    }
}

/// Puts Leash's credential where the route says. A managed upstream only
/// ever sees Leash's credential: whatever the workload put there, and any
/// `Authorization` of its own, is replaced or removed. Returns whether there
/// was anything (the workload still holds a secret of its own).
fn inject_credential(headers: &mut HeaderMap, inject: &InjectHow, value: &InjectValue) -> bool {
    let mut stripped = false;
    let target = inject.header();
    if let (Some(name), InjectValue::Header(value)) = (target, value) {
        // `insert` replaces every value the workload sent under that name.
        stripped |= headers.insert(name.clone(), value.clone()).is_some();
    } else if let Some(name) = target {
        stripped |= headers.remove(name).is_some();
    }
    if target != Some(&header::AUTHORIZATION) {
        stripped |= headers.remove(header::AUTHORIZATION).is_some();
    }
    stripped
}

/// Reads frames until `limit` bytes of body (or its end) have arrived.
/// Leading whitespace does not count against the limit (it would push a
/// value out of the scanned window), up to this much of it.
const MAX_LEADING_WHITESPACE: usize = 64 * 1024;

async fn read_prefix(
    mut body: RequestBody,
    limit: usize,
) -> Result<(Vec<Bytes>, PrefixRest), Refusal> {
    let mut prefix = Vec::new();
    let mut trailers = None;
    let mut seen = 0;
    // Whitespace before the first other byte, while nothing else came yet.
    let mut leading = 0;
    let mut started = false;
    while seen - leading < limit {
        if !started && leading >= MAX_LEADING_WHITESPACE {
            return Err(Refusal::BadRequest(
                "the request body starts with more whitespace than the leaked-value scan reads (64 KiB)",
            ));
        }
        match body.frame().await {
            None => break,
            Some(Err(_)) => return Err(Refusal::BadRequest("request body ended abruptly")),
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => {
                    if !started {
                        let ws = data.iter().take_while(|b| b.is_ascii_whitespace()).count();
                        leading += ws;
                        started = ws < data.len();
                    }
                    seen += data.len();
                    prefix.push(data);
                }
                Err(frame) => {
                    trailers = Some(frame);
                    break;
                }
            },
        }
    }
    Ok((
        prefix,
        PrefixRest {
            rest: body,
            trailers,
        },
    ))
}

/// The body after its scanned prefix.
pub struct PrefixRest {
    rest: RequestBody,
    trailers: Option<http_body::Frame<Bytes>>,
}

impl PrefixRest {
    fn with_prefix(self, prefix: Vec<Bytes>, credential: &CachedCredential) -> UpstreamBody {
        let mut frames: std::collections::VecDeque<_> =
            prefix.into_iter().map(http_body::Frame::data).collect();
        let done = self.trailers.is_some();
        frames.extend(self.trailers);
        UpstreamBody {
            frames,
            rest: self.rest,
            rest_done: done,
            revoked: credential.revoked.clone(),
            wait: None,
        }
    }
}

/// The body sent upstream: the scanned start of the workload's body (if
/// any was read), then the rest as it streams in. An upload still arriving
/// when its credential is revoked is cut: the upstream never receives a
/// complete request after the acknowledgement.
pub struct UpstreamBody {
    frames: std::collections::VecDeque<http_body::Frame<Bytes>>,
    rest: RequestBody,
    rest_done: bool,
    revoked: CancellationToken,
    /// Created only when the body has to wait, so short bodies cost nothing.
    wait: Option<Pin<Box<WaitForCancellationFutureOwned>>>,
}

impl UpstreamBody {
    fn direct(body: RequestBody, credential: &CachedCredential) -> Self {
        Self {
            frames: std::collections::VecDeque::new(),
            rest: body,
            rest_done: false,
            revoked: credential.revoked.clone(),
            wait: None,
        }
    }

    /// The scanned start of the body still to be sent (all of it before
    /// the request is handed to a connection).
    fn prefix(&self) -> Vec<&[u8]> {
        self.frames
            .iter()
            .filter_map(|f| f.data_ref().map(|d| &d[..]))
            .collect()
    }
}

impl http_body::Body for UpstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if this.revoked.is_cancelled() {
            return Poll::Ready(Some(Err(UPLOAD_CUT.into())));
        }
        if let Some(f) = this.frames.pop_front() {
            return Poll::Ready(Some(Ok(f)));
        }
        if this.rest_done {
            return Poll::Ready(None);
        }
        match Pin::new(&mut this.rest).poll_frame(cx) {
            Poll::Ready(frame) => Poll::Ready(frame.map(|f| f.map_err(Into::into))),
            Poll::Pending => {
                let revoked = &this.revoked;
                let wait = this
                    .wait
                    .get_or_insert_with(|| Box::pin(revoked.clone().cancelled_owned()));
                match wait.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Some(Err(UPLOAD_CUT.into()))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.frames.is_empty() && (self.rest_done || self.rest.is_end_stream())
    }

    fn size_hint(&self) -> http_body::SizeHint {
        let buffered: u64 = self
            .frames
            .iter()
            .filter_map(|f| f.data_ref())
            .map(|d| d.len() as u64)
            .sum();
        let rest = if self.rest_done {
            http_body::SizeHint::with_exact(0)
        } else {
            self.rest.size_hint()
        };
        let mut hint = http_body::SizeHint::new();
        hint.set_lower(rest.lower() + buffered);
        if let Some(upper) = rest.upper() {
            hint.set_upper(upper + buffered);
        }
        hint
    }
}

impl std::fmt::Debug for UpstreamBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamBody")
            .field("buffered_frames", &self.frames.len())
            .finish_non_exhaustive()
    }
}

const UPLOAD_CUT: &str = "upload cut: its credential was revoked";

/// The request target sent upstream: the workload's path and query, with
/// the credential added to the query when the route injects it there. Also
/// says whether the workload had put a parameter of that name itself.
fn upstream_uri(
    route: &EgressRoute,
    method: &Method,
    uri: &Uri,
    credential: &CachedCredential,
) -> Result<(Uri, bool), Refusal> {
    let query = match (&route.inject, &credential.value) {
        (InjectHow::Query { param }, InjectValue::Query(value)) => Some((param.as_str(), value)),
        _ => None,
    };
    request_target(method, uri, query)
}

/// Origin-form (RFC 9112 §3.2.1): the connection already goes to the
/// route's target, and hyper writes the request target as given. `query`
/// is the parameter and (percent-encoded) value to set in the query; any
/// parameter the workload sent whose *decoded* name is the same (`access%5Ftoken`,
/// one after a `;`) is removed, and the second value says there was one.
fn request_target(
    method: &Method,
    uri: &Uri,
    query: Option<(&str, &Bytes)>,
) -> Result<(Uri, bool), Refusal> {
    // OPTIONS to the server as a whole (asterisk-form) stays so. An
    // absolute-form target with an empty path, which RFC 9112 §3.2.4 would
    // also send as `*`, parses the same as `/` and is sent as `/`.
    if uri.path() == "*" {
        return match (method, query) {
            (&Method::OPTIONS, None) => Ok((Uri::from_static("*"), false)),
            (&Method::OPTIONS, Some(_)) => Err(Refusal::BadRequest(
                "OPTIONS * has no query to carry this route's credential: send OPTIONS to a path",
            )),
            _ => Err(Refusal::BadRequest(
                "the request target * is for OPTIONS only",
            )),
        };
    }
    let Some((param, value)) = query else {
        let pq = uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
        return Ok((Uri::from(pq), false));
    };
    let mut pq = String::with_capacity(uri.path().len() + value.len() + param.len() + 64);
    pq.push_str(if uri.path().is_empty() {
        "/"
    } else {
        uri.path()
    });
    pq.push('?');
    let mut own = false;
    if let Some(query) = uri.query() {
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            // Some servers also split on `;`: each part is looked at.
            let mut kept = String::new();
            for part in pair.split(';') {
                let key = part.split_once('=').map_or(part, |(k, _)| k);
                let decoded: String = form_urlencoded::parse(key.as_bytes())
                    .map(|(k, _)| k)
                    .collect();
                if decoded == param {
                    own = true;
                } else {
                    if !kept.is_empty() {
                        kept.push(';');
                    }
                    kept.push_str(part);
                }
            }
            if !kept.is_empty() {
                pq.push_str(&kept);
                pq.push('&');
            }
        }
    }
    pq.push_str(param);
    pq.push('=');
    // Percent-encoded ASCII by construction.
    pq.push_str(
        std::str::from_utf8(value).map_err(|_| Refusal::BadRequest("credential encoding"))?,
    );
    let bytes = Bytes::from_owner(zeroize::Zeroizing::new(pq.into_bytes()));
    let pq = http::uri::PathAndQuery::from_maybe_shared(bytes)
        .map_err(|_| Refusal::BadRequest("invalid path"))?;
    Ok((Uri::from(pq), own))
}

/// Removes every response header whose value carries the injected
/// credential in one of its forms, and counts it for the control plane.
fn remove_echoes(headers: &mut HeaderMap, credential: &CachedCredential, route: &EgressRoute) {
    if credential.echo_forms.is_empty() {
        return;
    }
    let mut echoed: Vec<HeaderName> = Vec::new();
    for (name, value) in headers.iter() {
        let v = value.as_bytes();
        if credential
            .echo_forms
            .iter()
            .any(|form| form.len() <= v.len() && memchr::memmem::find(v, form).is_some())
            && !echoed.contains(name)
        {
            echoed.push(name.clone());
        }
    }
    if echoed.is_empty() {
        return;
    }
    let mut counts = route.echoed.lock().unwrap_or_else(|p| p.into_inner());
    for name in echoed {
        headers.remove(&name);
        *counts.entry(name.as_str().to_owned()).or_default() += 1;
        tracing::warn!(upstream = %route.name, header = %name, credential_id = %credential.id, "the upstream sent the injected credential back; header removed");
    }
}

/// The name of a method that reflects the request back, if it is one.
fn reflecting(method: &Method) -> Option<&'static str> {
    if method == Method::TRACE {
        Some("TRACE")
    } else if method.as_str().eq_ignore_ascii_case("TRACK") {
        Some("TRACK")
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        h
    }

    #[test]
    fn hop_by_hop_index_matches_the_list() {
        for (i, name) in HOP_BY_HOP.iter().enumerate() {
            assert_eq!(hop_by_hop_index(name), Some(i), "{name}");
        }
        assert_eq!(hop_by_hop_index(&header::CONTENT_LENGTH), None);
        assert_eq!(hop_by_hop_index(&HeaderName::from_static("x-te")), None);
        assert_eq!(hop_by_hop_token(b"Keep-Alive"), Some(1));
        assert_eq!(hop_by_hop_token(b"PROXY-AUTHORIZATION"), Some(3));
        assert_eq!(hop_by_hop_token(b"proxy-authorization-x"), None);
        assert_eq!(hop_by_hop_token(b"close"), None);
    }

    #[test]
    fn hop_by_hop_headers_and_what_connection_names_are_removed() {
        let mut h = headers(&[
            ("connection", "Keep-Alive, X-Private"),
            ("connection", " x-other ,close"),
            ("keep-alive", "timeout=5"),
            ("close", "a header named by a connection option"),
            ("x-private", "1"),
            ("x-other", "2"),
            ("te", "trailers"),
            ("upgrade", "websocket"),
            ("proxy-authorization", "Basic eA=="),
            ("x-kept", "3"),
            ("content-type", "text/plain"),
        ]);
        strip_hop_by_hop(&mut h);
        let mut left: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
        left.sort_unstable();
        assert_eq!(left, ["content-type", "x-kept"]);

        // An answer with only `Connection: keep-alive` keeps everything else.
        let mut h = headers(&[("connection", "keep-alive"), ("content-length", "3")]);
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key(header::CONTENT_LENGTH));
    }

    #[test]
    fn the_injected_credential_replaces_the_workloads() {
        let value = InjectValue::Header("Bearer leash".parse().unwrap());
        let bearer = InjectHow::Basic {
            username: "u".into(),
        };
        let mut h = headers(&[("authorization", "Bearer own"), ("authorization", "x")]);
        assert!(inject_credential(&mut h, &bearer, &value));
        let all: Vec<_> = h.get_all(header::AUTHORIZATION).iter().collect();
        assert_eq!(all, ["Bearer leash"]);

        let api_key = InjectHow::Header {
            name: HeaderName::from_static("x-api-key"),
            prefix: String::new(),
            suffix: String::new(),
        };
        let mut h = headers(&[("authorization", "Bearer own")]);
        assert!(inject_credential(&mut h, &api_key, &value));
        assert!(h.get(header::AUTHORIZATION).is_none());
        assert_eq!(h["x-api-key"], "Bearer leash");
        let mut h = headers(&[("accept", "*/*")]);
        assert!(!inject_credential(&mut h, &api_key, &value));

        let query = InjectHow::Query {
            param: "key".into(),
        };
        let mut h = headers(&[("authorization", "Bearer own")]);
        assert!(inject_credential(
            &mut h,
            &query,
            &InjectValue::Query(Bytes::from_static(b"k"))
        ));
        assert!(h.is_empty());
    }

    #[test]
    fn the_request_target_is_origin_form() {
        let target = |method: Method, uri: &str, query: Option<(&str, &Bytes)>| {
            request_target(&method, &uri.parse().unwrap(), query).map(|(u, _)| u.to_string())
        };
        let key = Bytes::from_static(b"s%20k");
        let q = Some(("key", &key));
        assert_eq!(
            target(Method::GET, "http://h:1/a?b=1", None).unwrap(),
            "/a?b=1"
        );
        assert_eq!(target(Method::GET, "http://h", None).unwrap(), "/");
        assert_eq!(target(Method::GET, "/a", None).unwrap(), "/a");
        assert_eq!(
            target(Method::GET, "http://h/a?key=own&b=1&key=2", q).unwrap(),
            "/a?b=1&key=s%20k"
        );
        assert_eq!(target(Method::GET, "http://h", q).unwrap(), "/?key=s%20k");
        // OPTIONS to the whole server stays `*`, and cannot carry a query.
        assert_eq!(target(Method::OPTIONS, "*", None).unwrap(), "*");
        assert!(matches!(
            target(Method::GET, "*", None),
            Err(Refusal::BadRequest(_))
        ));
        assert!(matches!(
            target(Method::GET, "*", q),
            Err(Refusal::BadRequest(_))
        ));
        assert_eq!(target(Method::OPTIONS, "http://h/", None).unwrap(), "/");
        assert!(matches!(
            target(Method::OPTIONS, "*", q),
            Err(Refusal::BadRequest(_))
        ));
        assert_eq!(
            target(Method::OPTIONS, "http://h/", q).unwrap(),
            "/?key=s%20k"
        );
        // The workload's own parameter of that name, however it is encoded
        // or separated, is removed (and reported as stripped).
        for own in [
            "http://h/a?k%65y=own&b=1",
            "http://h/a?b=1;key=own",
            "http://h/a?b=1&%6B%65%79=own",
        ] {
            let (uri, stripped) = request_target(&Method::GET, &own.parse().unwrap(), q).unwrap();
            assert!(stripped, "{own}");
            assert!(!uri.to_string().contains("own"), "{own} -> {uri}");
        }
        let (_, stripped) =
            request_target(&Method::GET, &"http://h/a?b=1&keys=x".parse().unwrap(), q).unwrap();
        assert!(!stripped);
    }
}
