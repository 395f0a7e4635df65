//! Bodies on both sides of the sidecar: the workload's upload as it goes
//! upstream (its scanned prefix first, cut when its credential is revoked),
//! and the upstream's answer as it goes back (counted for usage, cut the
//! same way). Long-lived streams never outlive a revocation.

use std::future::Future as _;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body_util::BodyExt as _;
use http_body_util::combinators::UnsyncBoxBody;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use crate::conn::RequestBody;
use crate::credential::CachedCredential;
use crate::usage;

/// A request extension: the workload sent `TE: trailers`, which goes to an
/// HTTP/2 upstream (gRPC needs it) and nowhere else.
#[derive(Debug, Clone, Copy)]
pub struct TeTrailers;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// What the workload receives: an upstream's answer or a refusal.
pub type ProxyBody = UnsyncBoxBody<Bytes, BoxError>;

/// Why the start of a body could not be read for the leak scan.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PrefixError {
    #[error(
        "the request body starts with more whitespace than the leaked-value scan reads (64 KiB)"
    )]
    LeadingWhitespace,
    #[error("request body ended abruptly")]
    Aborted,
}

/// A response body that ends with an error as soon as the credential its
/// request carried is revoked: long-lived streams do not outlive a revocation.
pub struct Revocable<B> {
    inner: B,
    /// Its revocation cuts the stream; its usage counts the bytes.
    credential: Arc<CachedCredential>,
    slot: usize,
    /// Created only when the body has to wait, so short answers cost nothing.
    wait: Option<Pin<Box<WaitForCancellationFutureOwned>>>,
}

impl<B> Revocable<B> {
    /// `inner`, counted under usage `slot` of `credential` and cut with it.
    pub fn new(inner: B, credential: Arc<CachedCredential>, slot: usize) -> Self {
        Self {
            inner,
            credential,
            slot,
            wait: None,
        }
    }
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

/// Reads frames until `limit` bytes of body (or its end) have arrived.
/// Leading whitespace does not count against the limit (it would push a
/// value out of the scanned window), up to this much of it.
const MAX_LEADING_WHITESPACE: usize = 64 * 1024;

pub async fn read_prefix(
    mut body: RequestBody,
    limit: usize,
) -> Result<(Vec<Bytes>, PrefixRest), PrefixError> {
    let mut prefix = Vec::new();
    let mut trailers = None;
    let mut seen = 0;
    // Whitespace before the first other byte, while nothing else came yet.
    let mut leading = 0;
    let mut started = false;
    let mut ended = false;
    while seen - leading < limit {
        if !started && leading >= MAX_LEADING_WHITESPACE {
            return Err(PrefixError::LeadingWhitespace);
        }
        match body.frame().await {
            None => {
                ended = true;
                break;
            }
            Some(Err(_)) => return Err(PrefixError::Aborted),
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
                    ended = true;
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
            ended,
        },
    ))
}

/// The body after its scanned prefix.
pub struct PrefixRest {
    rest: RequestBody,
    trailers: Option<http_body::Frame<Bytes>>,
    /// The prefix is the whole body.
    ended: bool,
}

impl PrefixRest {
    /// Whether the body ended within the prefix read.
    pub fn ended(&self) -> bool {
        self.ended
    }

    pub fn with_prefix(self, prefix: Vec<Bytes>, credential: &CachedCredential) -> UpstreamBody {
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
    pub fn direct(body: RequestBody, credential: &CachedCredential) -> Self {
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
    /// Now carrying `credential` (a request re-sent with a fresh one).
    pub fn rebind(&mut self, credential: &CachedCredential) {
        self.revoked = credential.revoked.clone();
        self.wait = None;
    }

    pub fn prefix(&self) -> Vec<&[u8]> {
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
