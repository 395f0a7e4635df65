//! The sidecar's OpenTelemetry: one span per proxied request (workload,
//! upstream, credential id, decision; never a secret), carried to the
//! upstream in `traceparent` as a child of the workload's own trace, and the
//! `/metrics` counters exported over OTLP as observable instruments (read
//! from the same atomics at export time, so the request path pays nothing
//! for them).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use leash_api::telemetry::Otel;
use opentelemetry::metrics::Histogram;
use opentelemetry::trace::{SpanKind, Status, TraceContextExt as _, Tracer as _};
use opentelemetry::{Context, KeyValue, Value};

use crate::metrics::Metrics;
use crate::revocation::RevocationState;
use crate::usage::Usage;

/// What the request path needs when tracing is on.
pub struct EgressOtel {
    pub otel: Otel,
    pub upstream_duration: Histogram<f64>,
}

/// Filled in by the request path as it learns things, for the span.
pub struct TraceInfo {
    pub cx: Context,
    pub upstream: Option<Arc<str>>,
    pub credential_id: Option<Arc<str>>,
    pub upstream_time: Option<Duration>,
}

impl EgressOtel {
    /// Exports `metrics`, `usage` and the revocation state's counters as
    /// observable instruments.
    pub fn new(otel: Otel, observed: &Observed) -> Self {
        register_observables(&otel.meter, observed);
        let upstream_duration = otel
            .meter
            .f64_histogram("leash.proxy.upstream.duration")
            .with_unit("s")
            .with_description("Forwarding a request to the upstream's response headers.")
            .build();
        Self {
            otel,
            upstream_duration,
        }
    }

    /// Starts the request's span as a child of the workload's trace context.
    pub fn start(
        &self,
        headers: &http::HeaderMap,
        method: &http::Method,
        workload: Arc<str>,
    ) -> TraceInfo {
        let parent = leash_api::telemetry::propagation::extract(headers);
        let method = match *method {
            http::Method::GET => Value::from("GET"),
            http::Method::POST => Value::from("POST"),
            http::Method::PUT => Value::from("PUT"),
            http::Method::DELETE => Value::from("DELETE"),
            _ => Value::from(method.as_str().to_owned()),
        };
        let span = self
            .otel
            .tracer
            .span_builder("leash.proxy")
            .with_kind(SpanKind::Client)
            .with_attributes([
                KeyValue::new("leash.workload", workload),
                KeyValue::new("http.request.method", method),
            ])
            .start_with_context(&self.otel.tracer, &parent);
        TraceInfo {
            cx: parent.with_span(span),
            upstream: None,
            credential_id: None,
            upstream_time: None,
        }
    }

    /// Ends the span with the request's outcome.
    pub fn finish(
        &self,
        info: TraceInfo,
        outcome: Result<http::StatusCode, (&'static str, String)>,
    ) {
        let span = info.cx.span();
        if let Some(u) = &info.upstream {
            span.set_attribute(KeyValue::new("leash.upstream", u.clone()));
        }
        if let Some(id) = info.credential_id {
            span.set_attribute(KeyValue::new("leash.credential_id", id));
        }
        match outcome {
            Ok(status) => {
                span.set_attribute(KeyValue::new("leash.decision", "forwarded"));
                span.set_attribute(KeyValue::new(
                    "http.response.status_code",
                    i64::from(status.as_u16()),
                ));
                if status.is_server_error() {
                    span.set_status(Status::error(status.to_string()));
                }
                if let (Some(t), Some(u)) = (info.upstream_time, &info.upstream) {
                    self.upstream_duration.record(
                        t.as_secs_f64(),
                        &[KeyValue::new("leash.upstream", u.clone())],
                    );
                }
            }
            Err((code, message)) => {
                span.set_attribute(KeyValue::new("leash.decision", "refused"));
                span.set_attribute(KeyValue::new("leash.refusal", code));
                span.set_status(Status::error(message));
            }
        }
        span.end();
    }
}

/// The counters exported over OTLP.
pub struct Observed {
    pub metrics: Arc<Metrics>,
    pub usage: Arc<Usage>,
    pub revocations: Arc<RevocationState>,
}

fn register_observables(meter: &opentelemetry::metrics::Meter, observed: &Observed) {
    let l = observed.metrics.clone();
    let _requests = meter
        .u64_observable_counter("leash.proxy.requests")
        .with_description("Requests handled, by upstream and decision.")
        .with_callback(move |o| {
            for (u, m) in l.by_upstream() {
                let u = u.to_string();
                o.observe(
                    m.forwarded.load(Ordering::Relaxed),
                    &[
                        KeyValue::new("leash.upstream", u.clone()),
                        KeyValue::new("leash.decision", "forwarded"),
                    ],
                );
                o.observe(
                    m.refused.load(Ordering::Relaxed),
                    &[
                        KeyValue::new("leash.upstream", u),
                        KeyValue::new("leash.decision", "refused"),
                    ],
                );
            }
            o.observe(
                l.refused_unrouted(),
                &[
                    KeyValue::new("leash.upstream", ""),
                    KeyValue::new("leash.decision", "refused"),
                ],
            );
        })
        .build();
    let l = observed.metrics.clone();
    let _refusals = meter
        .u64_observable_counter("leash.proxy.refusals")
        .with_description("Refused requests, by reason.")
        .with_callback(move |o| {
            for (reason, n) in l.refused_by_reason() {
                o.observe(n, &[KeyValue::new("leash.reason", reason)]);
            }
        })
        .build();
    let l = observed.metrics.clone();
    let _cache = meter
        .u64_observable_counter("leash.proxy.credential_cache")
        .with_description("Credential cache outcomes: hit, miss, refresh, fetch_error.")
        .with_callback(move |o| {
            let c = &l.cache;
            for (what, v) in [
                ("hit", &c.hits),
                ("miss", &c.misses),
                ("refresh", &c.refreshes),
                ("fetch_error", &c.fetch_errors),
            ] {
                o.observe(
                    v.load(Ordering::Relaxed),
                    &[KeyValue::new("leash.outcome", what)],
                );
            }
        })
        .build();
    let l = observed.usage.clone();
    let _usage = meter
        .u64_observable_counter("leash.proxy.usage.dropped_requests")
        .with_description("Requests whose usage was dropped before delivery.")
        .with_callback(move |o| o.observe(l.requests_dropped.load(Ordering::Relaxed), &[]))
        .build();
    let l = observed.revocations.clone();
    let _seq = meter
        .u64_observable_gauge("leash.proxy.revocation.seq")
        .with_description("Revocation sequence applied.")
        .with_callback(move |o| {
            o.observe(l.applied_seq.load(Ordering::Relaxed), &[]);
        })
        .build();
    let l = observed.revocations.clone();
    let _silence = meter
        .f64_observable_gauge("leash.proxy.control_plane.silence")
        .with_unit("s")
        .with_description("Seconds since the control plane was last heard.")
        .with_callback(move |o| o.observe(l.freshness.silence().as_secs_f64(), &[]))
        .build();
    let l = observed.revocations.clone();
    let _connected = meter
        .u64_observable_gauge("leash.proxy.control_plane.connected")
        .with_description("Whether a session with a control plane is open.")
        .with_callback(move |o| o.observe(u64::from(l.freshness.connected()), &[]))
        .build();
}
