//! The control plane's OpenTelemetry: a span per admin API call and per
//! credential issued (or denied), and its counters as OTLP metrics
//! (observable instruments read from the `/metrics` atomics at export time).

use std::sync::Arc;
use std::sync::atomic::Ordering;

use leash_api::telemetry::Otel;
use opentelemetry::trace::{SpanKind, Status, TraceContextExt as _, Tracer as _};
use opentelemetry::{Context, KeyValue};

use crate::state::ControlPlaneState;

/// Starts a server span continuing the caller's trace context, if any.
pub fn server_span(
    otel: &Otel,
    name: String,
    headers: &http::HeaderMap,
    attributes: Vec<KeyValue>,
) -> Context {
    let parent = leash_api::telemetry::propagation::extract(headers);
    let span = otel
        .tracer
        .span_builder(name)
        .with_kind(SpanKind::Server)
        .with_attributes(attributes)
        .start_with_context(&otel.tracer, &parent);
    parent.with_span(span)
}

/// Ends the span of `cx` with its final attributes (and an error status).
pub fn end(cx: &Context, attributes: Vec<KeyValue>, error: Option<String>) {
    let span = cx.span();
    for kv in attributes {
        span.set_attribute(kv);
    }
    if let Some(e) = error {
        span.set_status(Status::error(e));
    }
    span.end();
}

pub fn register_observables(otel: &Otel, state: &Arc<ControlPlaneState>) {
    let meter = &otel.meter;
    let s = state.clone();
    let _counters = meter
        .u64_observable_counter("leash.cp.events")
        .with_description("Control-plane events: credentials issued, issues denied, revocations committed, usage batches and requests.")
        .with_callback(move |o| {
            let m = &s.metrics;
            for (what, v) in [
                ("credential_issued", &m.credentials_issued),
                ("issue_denied", &m.issue_denied),
                ("revocation_committed", &m.revocations_committed),
                ("usage_batch", &m.usage_batches),
                ("usage_duplicate_batch", &m.usage_duplicate_batches),
                ("usage_request", &m.usage_requests),
                ("usage_dropped_request", &m.usage_dropped_requests),
            ] {
                o.observe(v.load(Ordering::Relaxed), &[KeyValue::new("leash.event", what)]);
            }
        })
        .build();
    let s = state.clone();
    let _sessions = meter
        .u64_observable_gauge("leash.cp.sessions")
        .with_description("Connected sidecar sessions.")
        .with_callback(move |o| o.observe(s.sessions.len() as u64, &[]))
        .build();
    let s = state.clone();
    let _seq = meter
        .u64_observable_gauge("leash.cp.revocation.seq")
        .with_description("Newest committed revocation sequence.")
        .with_callback(move |o| o.observe(s.revocations.snapshot().seq, &[]))
        .build();
}
