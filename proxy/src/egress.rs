//! The request path, as the stages `Egress::forward` runs in order:
//!
//! 1. **admit**: `CONNECT` refused (it is answered by `tunnel.rs` on the
//!    proxy port only), the header block's size checked exactly
//!    (load shedding is in `handle`, before any of this);
//! 2. **scan**: a registered leaked value in the headers, path or query is
//!    refused and reported (I2), whatever the host;
//! 3. **route**: by named listener or host; what policy does not name is
//!    refused (I4), and so is plain HTTP to a passthrough upstream; inside
//!    an intercepted tunnel the host has been checked against the SNI and
//!    the upstream must still be intercepted;
//! 4. **authorize**: staleness against the arrival instant (I3), the grant,
//!    methods that reflect the request (TRACE), and a first revocation check;
//! 5. **credential**: the route's current credential, never one cut by a
//!    revocation (I1);
//! 6. **prepare**: the body's prefix read and scanned (routes with
//!    `scan_body_bytes`), headers and target rewritten (`headers.rs`): the
//!    workload's own credential stripped, Leash's injected;
//! 7. **send**: the *commit* (`Egress::commit`: revocations, staleness, the
//!    credential and, if the set changed, the leak scan again, in the same
//!    synchronous step as the hand-off to the upstream connection; I1, I7),
//!    then the upstream's answer under the connection's response timer; a
//!    request whose own credential was revoked on the way goes once more
//!    with a fresh one;
//! 8. **answer**: usage recorded, hop-by-hop headers and echoed credentials
//!    removed, the body wrapped so that a revocation cuts it (`body.rs`).
//!
//! Every refusal is a [`Refusal`], turned into a response in one place
//! (`Egress::refuse`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use http::{Method, Request, Response, Version, header};
use http_body_util::BodyExt as _;
use leash_api::revocation::{FingerprintKey, RevocationKind, RevocationSet};
use leash_api::v1::{LeakRefusal, Revocation, SidecarMessage, sidecar_message};
use std::future::Future as _;
use std::pin::Pin;
use std::task::{Context, Poll};

pub use crate::body::{BoxError, ProxyBody};
use crate::body::{PrefixError, Revocable, UpstreamBody, read_prefix};
use crate::cache::{CredentialCache, CredentialError};
use crate::conn::RequestBody;
use crate::credential::{CachedCredential, InjectHow};
use crate::headers::{self, request_host};
use crate::identity::WorkloadIdentity;
use crate::leak;
use crate::metrics::Metrics;
use crate::refusal::{Code, Refusal};
use crate::reports::Reports;
use crate::revocation::{InflightGuard, RevocationState};
use crate::routes::{EgressRoute, RouteTable};
use crate::telemetry::{EgressOtel, TraceInfo};
use crate::upstream::UpstreamError;
use crate::usage;

pub struct Egress {
    pub identity: Arc<WorkloadIdentity>,
    /// The policy in force.
    pub routes: Arc<ArcSwap<RouteTable>>,
    pub revocations: Arc<RevocationState>,
    /// Leaked values refused are reported to the control plane at once.
    pub reports: Arc<Reports>,
    pub metrics: Arc<Metrics>,
    pub cache: CredentialCache,
    pub response_timeout: Duration,
    pub max_header_bytes: usize,
    /// The CA and limits of `CONNECT` tunnels (`tunnel.rs`).
    pub tunnels: crate::intercept::TunnelConfig,
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

/// A request made ready for its upstream by the prepare stage.
struct Prepared {
    req: Request<UpstreamBody>,
    /// Usage's method index and the upload's size, when known.
    method: usize,
    bytes_sent: u64,
}

impl Egress {
    /// Serves one request. `bound` is the upstream of a named listener;
    /// `intercepted` says it came inside an intercepted tunnel (its host
    /// already checked against the tunnel's SNI); `timer` is the response
    /// timer of the workload connection it came on.
    pub(crate) async fn handle(
        &self,
        bound: Option<&str>,
        intercepted: bool,
        req: Request<RequestBody>,
        timer: &ResponseTimer,
    ) -> Response<ProxyBody> {
        let arrived = Instant::now();
        let grpc = is_grpc(&req);
        // Load shedding: past the limit, a clear 503 at once, not a queue.
        let n = self
            .in_flight
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let _in_flight = InFlight(&self.in_flight);
        if n >= self.max_in_flight {
            return self.refuse_to(
                grpc,
                Refusal::Overloaded {
                    what: "requests in flight",
                    limit: self.max_in_flight,
                },
            );
        }
        if let Some(otel) = &self.otel {
            return Box::pin(self.handle_traced(otel, bound, intercepted, req, arrived, timer))
                .await;
        }
        match self
            .forward(bound, intercepted, req, arrived, timer, None)
            .await
        {
            Ok(resp) => resp,
            Err(refusal) => self.refuse_to(grpc, refusal),
        }
    }

    /// The one place a refusal becomes a response (counted and logged).
    pub(crate) fn refuse(&self, refusal: Refusal) -> Response<ProxyBody> {
        self.refuse_to(false, refusal)
    }

    /// As `refuse`, as a gRPC status for a gRPC client.
    pub(crate) fn refuse_to(&self, grpc: bool, refusal: Refusal) -> Response<ProxyBody> {
        self.metrics.refused(&refusal);
        tracing::info!(code = refusal.code().as_str(), reason = %refusal, "request refused");
        if grpc {
            refusal.into_grpc_response()
        } else {
            refusal.into_response()
        }
    }

    /// As `handle`, inside a span that continues the workload's trace.
    async fn handle_traced(
        &self,
        otel: &EgressOtel,
        bound: Option<&str>,
        intercepted: bool,
        req: Request<RequestBody>,
        arrived: Instant,
        timer: &ResponseTimer,
    ) -> Response<ProxyBody> {
        let grpc = is_grpc(&req);
        let mut info = otel.start(req.headers(), req.method(), self.identity.id_arc());
        let result = self
            .forward(bound, intercepted, req, arrived, timer, Some(&mut info))
            .await;
        match result {
            Ok(resp) => {
                otel.finish(info, Ok(resp.status()));
                resp
            }
            Err(refusal) => {
                otel.finish(info, Err((refusal.code().as_str(), refusal.to_string())));
                self.refuse_to(grpc, refusal)
            }
        }
    }

    /// The stages of the module's opening comment, in order.
    async fn forward(
        &self,
        bound: Option<&str>,
        intercepted: bool,
        req: Request<RequestBody>,
        arrived: Instant,
        timer: &ResponseTimer,
        mut trace: Option<&mut TraceInfo>,
    ) -> Result<Response<ProxyBody>, Refusal> {
        self.admit(&req)?;
        let mut req = req;
        // A WebSocket handshake: the workload's side of the upgrade is kept
        // for when the upstream answers 101 (`websocket.rs`).
        let websocket = headers::is_websocket_upgrade(&req).then(|| WebSocket {
            key: headers::is_websocket_connect(&req).then(crate::websocket::new_key),
            workload: hyper::upgrade::on(&mut req),
        });
        // The set scanned against is kept: if it changes before the commit,
        // the outgoing request is scanned again against the new one.
        let scanned = self.revocations.set.load_full();
        self.scan(bound, &req, &scanned)?;
        let route = self.route(bound, &req)?;
        if intercepted && !route.intercept {
            // The policy changed since the tunnel opened.
            return Err(Refusal::ConnectNotAllowed {
                host: request_host(&req).unwrap_or_default().to_owned(),
                upstream: route.name.to_string(),
            });
        }
        if route.passthrough {
            return Err(Refusal::PassthroughOnly {
                upstream: route.name.to_string(),
            });
        }
        if let Some(t) = trace.as_deref_mut() {
            t.upstream = Some(route.name.clone());
        }
        self.authorize(&route, req.method(), arrived, &scanned)?;
        let credential = self.credential(&route, &scanned).await?;
        let Prepared {
            mut req,
            method,
            bytes_sent,
        } = self
            .prepare(
                &route,
                req,
                &credential,
                &scanned,
                websocket.as_ref().map(|w| w.key.as_deref()),
            )
            .await?;
        tracing::debug!(upstream = %route.name, credential_id = %credential.id, "forwarding");
        if let Some(t) = trace.as_deref_mut() {
            t.credential_id = Some(credential.id.clone());
            // The upstream sees the sidecar's span as the parent.
            leash_api::telemetry::propagation::inject(&t.cx, req.headers_mut());
        }
        let at_ms = if self.usage_reporting {
            usage::now_ms()
        } else {
            0
        };
        let sent = Instant::now();
        route.metrics.injection.observe(sent - arrived);
        timer.arm(sent + self.response_timeout);
        let (answer, credential) = self
            .send(bound, &route, req, credential, &scanned, timer)
            .await?;
        let upstream_time = sent.elapsed();
        route.metrics.upstream.observe(upstream_time);
        if let Some(t) = trace {
            t.upstream_time = Some(upstream_time);
        }
        let slot = if self.usage_reporting {
            let status = match &answer {
                Ok(Ok(resp)) => Some(resp.status()),
                _ => None,
            };
            let slot = usage::slot(method, status);
            credential.usage.record(slot, at_ms, bytes_sent);
            slot
        } else {
            usage::NO_SLOT
        };
        self.answer(&route, credential, answer, slot, websocket)
    }

    /// Stage 1: what is refused before anything is looked up.
    fn admit(&self, req: &Request<RequestBody>) -> Result<(), Refusal> {
        if req.method() == Method::CONNECT && !headers::is_websocket_connect(req) {
            return Err(Refusal::ConnectNotSupported);
        }
        // hyper's read buffer bounds the header block only loosely (a single
        // large read can overshoot it), so the limit is enforced exactly here.
        if headers::header_block_len(req) > self.max_header_bytes {
            return Err(Refusal::HeadersTooLarge {
                limit: self.max_header_bytes,
            });
        }
        Ok(())
    }

    /// Stage 2 (I2): a registered leaked value never leaves, whatever the
    /// host. Refused and reported at once.
    pub(crate) fn scan(
        &self,
        bound: Option<&str>,
        req: &Request<RequestBody>,
        set: &RevocationSet,
    ) -> Result<(), Refusal> {
        let Some(key) = self.leak_key(set) else {
            return Ok(());
        };
        match leak::scan_request(set, &key, req.headers(), req.uri()) {
            None => Ok(()),
            Some(hit) => {
                let host = request_host(req).unwrap_or_default().to_owned();
                let upstream = match bound {
                    Some(name) => name.to_owned(),
                    None => self
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

    /// Stage 3 (I4): the route policy names, or a refusal.
    pub(crate) fn route(
        &self,
        bound: Option<&str>,
        req: &Request<RequestBody>,
    ) -> Result<Arc<EgressRoute>, Refusal> {
        let table = self.routes.load();
        if !table.loaded {
            return Err(if self.identity.ready() {
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

    /// Stage 4: fresh state (I3), the grant, no reflecting method, and a
    /// first revocation check for a fast refusal (the commit's decides).
    pub(crate) fn authorize(
        &self,
        route: &EgressRoute,
        method: &Method,
        arrived: Instant,
        scanned: &RevocationSet,
    ) -> Result<(), Refusal> {
        self.fresh_at(arrived)?;
        if !route.granted {
            return Err(Refusal::NotGranted {
                upstream: route.name.to_string(),
            });
        }
        // TRACE (and IIS's TRACK) reflect the request, injected credential
        // included, back to the workload.
        if let Some(method) = reflecting(method) {
            return Err(Refusal::TraceRefused {
                method,
                upstream: route.name.to_string(),
            });
        }
        self.not_revoked(route, scanned)
    }

    /// Stage 5: the route's credential, never one a revocation cut.
    async fn credential(
        &self,
        route: &Arc<EgressRoute>,
        scanned: &RevocationSet,
    ) -> Result<Arc<CachedCredential>, Refusal> {
        let credential = self.fetch(route).await?;
        if !credential_cut(&credential, scanned) {
            return Ok(credential);
        }
        // Only that instance is revoked, not the grant: use a fresh one.
        self.cache.invalidate(route).await;
        self.fetch(route).await
    }

    async fn fetch(&self, route: &Arc<EgressRoute>) -> Result<Arc<CachedCredential>, Refusal> {
        self.cache.get(route).await.map_err(|e| match e {
            CredentialError::Denied { code, message } => Refusal::Denied {
                upstream: route.name.to_string(),
                code,
                message,
            },
            other => Refusal::CredentialUnavailable {
                upstream: route.name.to_string(),
                reason: other.to_string(),
            },
        })
    }

    /// Stage 6: the body's prefix scanned, the request rewritten for the
    /// upstream with the credential injected.
    async fn prepare(
        &self,
        route: &EgressRoute,
        req: Request<RequestBody>,
        credential: &CachedCredential,
        scanned: &RevocationSet,
        websocket: Option<Option<&str>>,
    ) -> Result<Prepared, Refusal> {
        let (mut parts, body) = req.into_parts();
        let method = usage::method_index(&parts.method);
        let bytes_sent = http_body::Body::size_hint(&body).exact().unwrap_or(0);
        let signed_payload =
            matches!(&route.inject, InjectHow::SigV4(spec) if !spec.unsigned_payload);
        let body = if signed_payload {
            // The whole body is read: its hash is signed.
            let limit = crate::sigv4::MAX_SIGNED_BODY;
            let (whole, rest) = Box::pin(read_prefix(body, limit + 1))
                .await
                .map_err(|e| match e {
                    PrefixError::LeadingWhitespace => Refusal::BadRequest(
                        "the request body starts with more whitespace than the sidecar reads (64 KiB)",
                    ),
                    PrefixError::Aborted => Refusal::BadRequest("request body ended abruptly"),
                })?;
            if !rest.ended() || whole.iter().map(bytes::Bytes::len).sum::<usize>() > limit {
                return Err(Refusal::BodyTooLargeToSign {
                    upstream: route.name.to_string(),
                    limit,
                });
            }
            if route.scan_body_bytes > 0 {
                self.scan_body(route, &parts, &whole, scanned)?;
            }
            parts.extensions.insert(crate::sigv4::payload_hash(&whole));
            rest.with_prefix(whole, credential)
        } else if route.scan_body_bytes > 0 {
            let (prefix, body) = Box::pin(read_prefix(body, route.scan_body_bytes))
                .await
                .map_err(|e| match e {
                    PrefixError::LeadingWhitespace => Refusal::BadRequest(
                        "the request body starts with more whitespace than the leaked-value scan reads (64 KiB)",
                    ),
                    PrefixError::Aborted => Refusal::BadRequest("request body ended abruptly"),
                })?;
            self.scan_body(route, &parts, &prefix, scanned)?;
            body.with_prefix(prefix, credential)
        } else {
            UpstreamBody::direct(body, credential)
        };
        let own_header = headers::upstream_headers(
            &mut parts.headers,
            &mut parts.extensions,
            &route.inject,
            &credential.value,
        );
        let (uri, own_param) = headers::upstream_uri(route, &parts.method, &parts.uri, credential)?;
        parts.uri = uri;
        if own_header || own_param {
            route
                .stripped
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        if let Some(key) = websocket {
            headers::ask_websocket_upgrade(&mut parts.headers);
            // RFC 8441 → RFC 6455: the extended CONNECT becomes the
            // HTTP/1.1 handshake, with a key of the sidecar's.
            if let Some(key) = key {
                parts.method = Method::GET;
                parts.extensions.remove::<hyper::ext::Protocol>();
                if let Ok(key) = http::HeaderValue::from_str(key) {
                    parts.headers.insert("sec-websocket-key", key);
                }
            }
        }
        parts.version = Version::HTTP_11;
        parts
            .headers
            .insert(header::HOST, route.host_header.clone());
        let mut req = Request::from_parts(parts, body);
        // Signed last: the signature covers the request as it leaves.
        sign(&mut req, route, credential)?;
        Ok(Prepared {
            req,
            method,
            bytes_sent,
        })
    }

    /// Stage 7: commit and hand-off over the upstream pool, then the answer
    /// under the response timer. Returns the answer and the credential it
    /// was sent with.
    async fn send(
        &self,
        bound: Option<&str>,
        route: &Arc<EgressRoute>,
        mut req: Request<UpstreamBody>,
        mut credential: Arc<CachedCredential>,
        scanned: &Arc<RevocationSet>,
        timer: &ResponseTimer,
    ) -> Result<(Answer, Arc<CachedCredential>), Refusal> {
        let mut renewed = false;
        loop {
            let answer = {
                let commit =
                    |r: &Request<UpstreamBody>| self.commit(bound, route, &credential, scanned, r);
                let call = std::pin::pin!(route.client.request(req, commit));
                Deadline { call, timer }.await
            };
            match answer {
                // Only the credential instance was revoked on the way (a
                // rotated secret version, one leaked JWT), not the grant:
                // the request goes once more with a fresh one.
                Ok(Err(UpstreamError::Refused(refusal, back)))
                    if !renewed && refusal.code() == Code::RevokedCredential =>
                {
                    renewed = true;
                    self.cache.invalidate(route).await;
                    credential = self.fetch(route).await?;
                    req = *back;
                    reinject(&mut req, route, &credential)?;
                }
                // Refused at its commit: nothing was sent, so nothing was used.
                Ok(Err(UpstreamError::Refused(refusal, _))) => return Err(refusal),
                other => return Ok((other, credential)),
            }
        }
    }

    /// Stage 8: the upstream's answer made safe for the workload.
    fn answer(
        &self,
        route: &EgressRoute,
        credential: Arc<CachedCredential>,
        answer: Answer,
        slot: usize,
        websocket: Option<WebSocket>,
    ) -> Result<Response<ProxyBody>, Refusal> {
        let resp = match answer {
            Ok(Ok(resp)) => resp,
            // The upload was cut because a revocation covered it.
            Ok(Err(_)) if credential.revoked.is_cancelled() => {
                return Err(self.cut_refusal(route, &credential));
            }
            Ok(Err(e)) => {
                return Err(Refusal::UpstreamUnreachable {
                    upstream: route.name.to_string(),
                    reason: e.to_string(),
                });
            }
            Err(()) => {
                return Err(Refusal::UpstreamTimeout {
                    upstream: route.name.to_string(),
                    timeout_ms: u64::try_from(self.response_timeout.as_millis())
                        .unwrap_or(u64::MAX),
                });
            }
        };
        if resp.status() == http::StatusCode::SWITCHING_PROTOCOLS {
            return self.switch(route, credential, resp, websocket);
        }
        let (mut parts, body) = resp.into_parts();
        headers::strip_hop_by_hop(&mut parts.headers);
        // The credential never comes back to the workload (an echo, a
        // `Location` keeping a query token).
        headers::remove_echoes(&mut parts.headers, &credential, route);
        route
            .metrics
            .forwarded
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let body = Revocable::new(body, credential, slot);
        Ok(Response::from_parts(parts, body.boxed_unsync()))
    }

    /// The upstream accepted a WebSocket handshake: the workload gets the
    /// `101`, and the two upgraded connections are relayed, cut with close
    /// code 1008 when a revocation covers the credential the handshake
    /// carried (`websocket.rs`).
    fn switch(
        &self,
        route: &EgressRoute,
        credential: Arc<CachedCredential>,
        mut resp: Response<crate::upstream::PooledBody>,
        websocket: Option<WebSocket>,
    ) -> Result<Response<ProxyBody>, Refusal> {
        let bad = |reason: &str| Refusal::UpstreamUnreachable {
            upstream: route.name.to_string(),
            reason: reason.into(),
        };
        // Only a WebSocket handshake is sent upstream with `Upgrade`.
        let Some(WebSocket { key, workload }) = websocket else {
            return Err(bad("the upstream switched protocols unasked"));
        };
        let upstream = hyper::upgrade::on(&mut resp);
        let held = resp
            .extensions_mut()
            .remove::<crate::upstream::HeldConnection>();
        let (mut parts, _) = resp.into_parts();
        headers::strip_hop_by_hop(&mut parts.headers);
        headers::remove_echoes(&mut parts.headers, &credential, route);
        match key {
            None => headers::ask_websocket_upgrade(&mut parts.headers),
            // RFC 8441: the handshake the sidecar made is checked here, and
            // the workload's extended CONNECT answered 200.
            Some(key) => {
                let accepted = parts
                    .headers
                    .remove("sec-websocket-accept")
                    .is_some_and(|a| {
                        a.as_bytes() == crate::websocket::accept_key(key.as_bytes()).as_bytes()
                    });
                if !accepted {
                    return Err(bad(
                        "the upstream's Sec-WebSocket-Accept does not match the key",
                    ));
                }
                parts.status = http::StatusCode::OK;
            }
        }
        route
            .metrics
            .forwarded
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let limit = self.tunnels.max_websocket_frame_bytes;
        let stop = self.tunnels.stop.clone();
        let name = route.name.clone();
        tokio::spawn(async move {
            // Held until the relay ends: the upstream connection's place.
            let _held = held;
            let (workload, upstream) = match tokio::try_join!(workload, upstream) {
                Ok(both) => both,
                Err(e) => {
                    tracing::debug!(upstream = %name, error = %e, "WebSocket upgrade failed");
                    return;
                }
            };
            let ended = crate::websocket::relay(
                hyper_util::rt::TokioIo::new(workload),
                hyper_util::rt::TokioIo::new(upstream),
                credential.revoked.clone(),
                limit,
                stop,
            )
            .await;
            tracing::info!(upstream = %name, ?ended, "WebSocket connection ended");
        });
        Ok(Response::from_parts(parts, ProxyBody::default()))
    }

    /// The commit: the last revocation, staleness, credential and leak
    /// check, run inside the revocation gate in the same synchronous step
    /// as the hand-off to the upstream connection (I1, I7). The guard is
    /// held until the request is on the connection's queue.
    fn commit(
        &self,
        bound: Option<&str>,
        route: &EgressRoute,
        credential: &CachedCredential,
        scanned: &Arc<RevocationSet>,
        req: &Request<UpstreamBody>,
    ) -> Result<InflightGuard<'_>, Refusal> {
        let guard = self.revocations.gate.enter();
        let set = self.revocations.set.load();
        self.fresh_at(Instant::now())?;
        self.not_revoked(route, &set)?;
        if credential_cut(credential, &set) {
            return Err(self.cut_refusal(route, credential));
        }
        if !Arc::ptr_eq(&set, scanned) && set.has_leaked() {
            self.scan_outgoing(bound, route, req, &set)?;
        }
        Ok(guard)
    }

    pub(crate) fn fresh_at(&self, now: Instant) -> Result<(), Refusal> {
        let freshness = &self.revocations.freshness;
        match freshness.stale_at(now) {
            Some(silence) => Err(Refusal::Stale {
                silence_secs: silence.as_secs(),
                max_secs: freshness.max_staleness().as_secs(),
            }),
            None => Ok(()),
        }
    }

    pub(crate) fn not_revoked(
        &self,
        route: &EgressRoute,
        set: &RevocationSet,
    ) -> Result<(), Refusal> {
        if let Some(r) = set.check(&self.identity.id(), &route.name) {
            return Err(revoked(r, &route.name));
        }
        Ok(())
    }

    /// Why a request's credential was cut: the revocation that covers it.
    fn cut_refusal(&self, route: &EgressRoute, credential: &CachedCredential) -> Refusal {
        let set = self.revocations.set.load();
        if let Some(r) = set.check(&self.identity.id(), &route.name) {
            return revoked(r, &route.name);
        }
        let revocation = set
            .active()
            .find(|r| r.kind() == RevocationKind::Credential && r.credential_id == *credential.id);
        Refusal::Revoked {
            code: Code::RevokedCredential,
            what: format!("credential {}", credential.id),
            revocation_id: revocation.map(|r| r.id.clone()).unwrap_or_default(),
            reason: revocation.map_or_else(
                || "a revocation cut this credential while the request was on its way".into(),
                |r| r.reason.clone(),
            ),
            upstream: route.name.to_string(),
        }
    }

    fn scan_body(
        &self,
        route: &EgressRoute,
        parts: &http::request::Parts,
        prefix: &[bytes::Bytes],
        set: &RevocationSet,
    ) -> Result<(), Refusal> {
        let Some(key) = self.leak_key(set) else {
            return Ok(());
        };
        let joined = zeroize::Zeroizing::new(prefix.concat());
        match leak::scan_body(set, &key, &parts.headers, &joined, route.scan_body_bytes) {
            None => Ok(()),
            Some(hit) => {
                let host = parts.uri.host().unwrap_or_default().to_owned();
                Err(self.leaked(hit, route.name.to_string(), host))
            }
        }
    }

    /// The request as it leaves (headers, target, scanned body prefix),
    /// scanned against a set that changed since the first scan.
    fn scan_outgoing(
        &self,
        bound: Option<&str>,
        route: &EgressRoute,
        req: &Request<UpstreamBody>,
        set: &RevocationSet,
    ) -> Result<(), Refusal> {
        let Some(key) = self.revocations.fingerprint_key.load_full() else {
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

    /// The fingerprint key, when `set` has leaked values to scan for.
    fn leak_key(&self, set: &RevocationSet) -> Option<Arc<FingerprintKey>> {
        if !set.has_leaked() {
            return None;
        }
        self.revocations.fingerprint_key.load_full()
    }

    /// Reports a leaked value to the control plane, and refuses.
    fn leaked(&self, hit: leak::LeakHit, upstream: String, host: String) -> Refusal {
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
            .unwrap_or(0);
        self.reports.report(SidecarMessage {
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
            workload: self.identity.id().to_string(),
            upstream,
            host,
        }
    }
}

/// A WebSocket handshake on its way: the workload's side of the upgrade,
/// and the key the sidecar sent upstream when it translated an HTTP/2
/// extended `CONNECT` (RFC 8441) into an HTTP/1.1 handshake.
struct WebSocket {
    key: Option<String>,
    workload: hyper::upgrade::OnUpgrade,
}

/// The upstream's answer, a failure to reach it, or the timer's expiry.
type Answer = Result<Result<Response<crate::upstream::PooledBody>, UpstreamError>, ()>;

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

/// Puts `credential` into a request built for another one (see `send`).
fn reinject(
    req: &mut Request<UpstreamBody>,
    route: &EgressRoute,
    credential: &CachedCredential,
) -> Result<(), Refusal> {
    headers::inject_credential(req.headers_mut(), &route.inject, &credential.value);
    let (uri, _) = headers::upstream_uri(route, req.method(), req.uri(), credential)?;
    *req.uri_mut() = uri;
    req.body_mut().rebind(credential);
    sign(req, route, credential)
}

/// Signs `req` for a route that signs (AWS SigV4); nothing for others.
fn sign(
    req: &mut Request<UpstreamBody>,
    route: &EgressRoute,
    credential: &CachedCredential,
) -> Result<(), Refusal> {
    let (InjectHow::SigV4(spec), crate::credential::InjectValue::Aws(key)) =
        (&route.inject, &credential.value)
    else {
        return Ok(());
    };
    crate::sigv4::sign_request(req, spec, key).map_err(|e| Refusal::SigningFailed {
        upstream: route.name.to_string(),
        reason: e.to_string(),
    })
}

/// Whether `credential` was cut by a revocation or is revoked in `set`.
fn credential_cut(credential: &CachedCredential, set: &RevocationSet) -> bool {
    credential.revoked.is_cancelled() || set.credential_revoked(&credential.id)
}

fn revoked(r: &Revocation, upstream: &str) -> Refusal {
    let kind = RevocationKind::of(r);
    let what = match kind {
        Some(RevocationKind::Upstream) => format!("upstream {}", r.upstream),
        Some(RevocationKind::Grant) => format!("the grant of {} to {}", r.upstream, r.workload),
        _ => format!("workload {}", r.workload),
    };
    Refusal::Revoked {
        code: Code::revoked(kind),
        what,
        revocation_id: r.id.clone(),
        reason: r.reason.clone(),
        upstream: upstream.to_owned(),
    }
}

/// Whether `req` is a gRPC call (its refusals are gRPC statuses).
pub(crate) fn is_grpc<B>(req: &Request<B>) -> bool {
    req.headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
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
