//! Per-connection timing of the wait for a request's header block (the
//! slowloris bound and the idle limit of a kept-alive connection).
//!
//! One timer per connection, looked at when it fires and re-armed from the
//! state then, where hyper's own header timeout allocates and registers a
//! timer for every request. The clock runs from the connection's start, and
//! from the moment the previous request is done with: its request body read
//! to the end (or dropped) and its response body handed to the connection.
//! That is when hyper's own timer would start: a response tail still in the
//! connection's write buffer when the limit is reached is not waited for.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::body::Incoming;
use tokio::time::Instant;

/// A workload's request body, counted by its connection's [`HeadWatch`].
pub type RequestBody = Watched<Incoming>;

/// The state of one connection's wait for headers.
pub(crate) struct HeadWatch {
    state: Mutex<State>,
}

struct State {
    /// Requests seen on the connection; a body reports with the number of
    /// its request, so a late report from an earlier one counts for nothing.
    request: u64,
    /// Bodies of the current request not yet done with (request, response).
    open: u8,
    /// `Some(since)` while waiting for a header block.
    waiting_since: Option<Instant>,
}

impl HeadWatch {
    pub(crate) fn new() -> Self {
        Self {
            state: Mutex::new(State {
                request: 0,
                open: 0,
                waiting_since: Some(Instant::now()),
            }),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A header block is complete: no limit until both bodies of that
    /// request are done with. Returns the request's number for them.
    pub(crate) fn request_started(&self) -> u64 {
        let mut s = self.state();
        s.request += 1;
        s.open = 2;
        s.waiting_since = None;
        s.request
    }

    fn body_done(&self, request: u64) {
        let mut s = self.state();
        if s.request != request || s.open == 0 {
            return;
        }
        s.open -= 1;
        if s.open == 0 {
            s.waiting_since = Some(Instant::now());
        }
    }

    /// Called when the timer fires: `None` once a header block has been
    /// awaited for `timeout`, else when to look again.
    pub(crate) fn next_deadline(&self, now: Instant, timeout: Duration) -> Option<Instant> {
        match self.state().waiting_since {
            Some(since) if now >= since + timeout => None,
            Some(since) => Some(since + timeout),
            // Busy: nothing can expire before a full timeout from now.
            None => Some(now + timeout),
        }
    }
}

/// A body that tells its connection's [`HeadWatch`] when it is done with:
/// read to the end, or dropped before (hyper drops a response body once the
/// last of it is in the connection's write buffer; a request body read to
/// its end may be kept by an upstream connection that stopped reading).
pub struct Watched<B> {
    inner: B,
    watch: Arc<HeadWatch>,
    request: u64,
    done: bool,
}

impl<B> Watched<B> {
    pub(crate) fn new(inner: B, watch: Arc<HeadWatch>, request: u64) -> Self {
        Self {
            inner,
            watch,
            request,
            done: false,
        }
    }

    fn finish(&mut self) {
        if !self.done {
            self.done = true;
            self.watch.body_done(self.request);
        }
    }
}

impl<B> Drop for Watched<B> {
    fn drop(&mut self) {
        self.finish();
    }
}

impl<B: http_body::Body + Unpin> http_body::Body for Watched<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<B::Data>, B::Error>>> {
        let frame = Pin::new(&mut self.inner).poll_frame(cx);
        if ended(&self.inner, &frame) {
            self.finish();
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

/// What polling a body for a frame gives.
type Polled<B> = Poll<
    Option<Result<http_body::Frame<<B as http_body::Body>::Data>, <B as http_body::Body>::Error>>,
>;

/// Whether `frame`, just polled from `body`, was its end: no more frames,
/// or a last frame after which the body says it has ended.
pub(crate) fn ended<B: http_body::Body>(body: &B, frame: &Polled<B>) -> bool {
    match frame {
        Poll::Ready(None) => true,
        Poll::Ready(Some(Ok(_))) => body.is_end_stream(),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Duration = Duration::from_secs(10);

    fn waiting_since(w: &HeadWatch) -> Option<Instant> {
        w.state().waiting_since
    }

    #[test]
    fn the_wait_starts_when_both_bodies_are_done_with() {
        let w = Arc::new(HeadWatch::new());
        assert!(waiting_since(&w).is_some(), "a new connection waits");
        let n = w.request_started();
        let req = Watched::new((), w.clone(), n);
        let resp = Watched::new((), w.clone(), n);
        drop(resp);
        assert_eq!(waiting_since(&w), None, "the request body is still read");
        let later = Instant::now() + 5 * T;
        assert_eq!(w.next_deadline(later, T), Some(later + T), "busy");
        drop(req);
        let since = waiting_since(&w).expect("waiting once both are done");
        assert_eq!(w.next_deadline(since + T / 2, T), Some(since + T));
        assert_eq!(w.next_deadline(since + T, T), None, "idle for the limit");
    }

    #[test]
    fn a_late_body_of_an_earlier_request_counts_for_nothing() {
        let w = Arc::new(HeadWatch::new());
        let first = w.request_started();
        let late = Watched::new((), w.clone(), first);
        drop(Watched::new((), w.clone(), first));
        let second = w.request_started();
        let _req = Watched::new((), w.clone(), second);
        drop(late);
        drop(Watched::new((), w.clone(), second));
        assert_eq!(waiting_since(&w), None, "the second request body is open");
    }
}
