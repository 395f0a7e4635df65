//! The sidecar's metrics, served as Prometheus text on the admin port's
//! `/metrics` (and read by the OTLP exporter when that is on). Counters are
//! atomics; what the hot path touches is reached through the route (one
//! `Arc` per upstream, no map lookup per request).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use leash_api::metrics::{Histogram, LATENCY_BUCKETS, escape, header, single};

use crate::refusal::{Code, Refusal};

/// Per upstream (labels come from policy names only, never from what a
/// client sends, so their number is bounded by the policy).
pub struct UpstreamMetrics {
    pub forwarded: AtomicU64,
    pub refused: AtomicU64,
    /// Arrival of the request to the moment it is sent upstream: the
    /// sidecar's own cost, including a credential fetch on a cache miss.
    pub injection: Histogram,
    /// Sent upstream to the upstream's response headers.
    pub upstream: Histogram,
    /// `CONNECT` tunnels opened, intercepted and passed through.
    pub tunnels_intercepted: AtomicU64,
    pub tunnels_passthrough: AtomicU64,
    /// Bytes carried by passthrough tunnels, to and from the upstream.
    pub passthrough_bytes_sent: AtomicU64,
    pub passthrough_bytes_received: AtomicU64,
}

impl UpstreamMetrics {
    fn new() -> Self {
        Self {
            forwarded: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            injection: Histogram::new(LATENCY_BUCKETS),
            upstream: Histogram::new(LATENCY_BUCKETS),
            tunnels_intercepted: AtomicU64::new(0),
            tunnels_passthrough: AtomicU64::new(0),
            passthrough_bytes_sent: AtomicU64::new(0),
            passthrough_bytes_received: AtomicU64::new(0),
        }
    }
}

#[derive(Default)]
pub struct CacheMetrics {
    /// The route's current credential (one atomic load) or the cache.
    pub hits: AtomicU64,
    /// Fetched from the control plane because none was cached.
    pub misses: AtomicU64,
    /// Refreshed in the background ahead of expiry.
    pub refreshes: AtomicU64,
    /// Fetches (misses or refreshes) that failed.
    pub fetch_errors: AtomicU64,
}

#[derive(Default)]
pub struct Metrics {
    refused: [AtomicU64; Code::ALL.len()],
    /// Refusals before an upstream was known (no route, no host, ...).
    refused_unrouted: AtomicU64,
    upstreams: RwLock<HashMap<Arc<str>, Arc<UpstreamMetrics>>>,
    pub cache: CacheMetrics,
    /// Sessions established with a control plane since start.
    pub sessions: AtomicU64,
}

/// What `/metrics` reports besides the counters.
pub struct Gauges {
    pub ready: bool,
    pub connected: bool,
    pub applied_seq: u64,
    pub silence_secs: f64,
    pub usage_reported: u64,
    pub usage_dropped: u64,
    pub usage_pending_batches: usize,
    pub reports_dropped: u64,
}

impl Metrics {
    /// The counters of upstream `name` (created on first use; kept across
    /// policy changes so that counters never go backwards).
    pub fn upstream(&self, name: &Arc<str>) -> Arc<UpstreamMetrics> {
        if let Some(m) = self
            .upstreams
            .read()
            .ok()
            .and_then(|u| u.get(name).cloned())
        {
            return m;
        }
        let mut map = match self.upstreams.write() {
            Ok(m) => m,
            Err(poisoned) => poisoned.into_inner(),
        };
        map.entry(name.clone())
            .or_insert_with(|| Arc::new(UpstreamMetrics::new()))
            .clone()
    }

    pub fn refused(&self, r: &Refusal) {
        self.refused[r.code() as usize].fetch_add(1, Ordering::Relaxed);
        // Only names that are in the routing table get a series.
        let known = r
            .upstream()
            .and_then(|u| self.upstreams.read().ok().and_then(|m| m.get(u).cloned()));
        match known {
            Some(m) => m.refused.fetch_add(1, Ordering::Relaxed),
            None => self.refused_unrouted.fetch_add(1, Ordering::Relaxed),
        };
    }

    pub fn refused_by_reason(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        Code::ALL
            .iter()
            .zip(&self.refused)
            .map(|(c, n)| (c.as_str(), n.load(Ordering::Relaxed)))
    }

    /// (upstream, forwarded, refused) for every upstream seen.
    pub fn by_upstream(&self) -> Vec<(Arc<str>, Arc<UpstreamMetrics>)> {
        let mut v: Vec<_> = self
            .upstreams
            .read()
            .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    pub fn refused_unrouted(&self) -> u64 {
        self.refused_unrouted.load(Ordering::Relaxed)
    }

    pub fn render(&self, g: &Gauges) -> String {
        let mut out = String::with_capacity(8192);
        let upstreams = self.by_upstream();

        let name = "leash_proxy_requests_total";
        header(
            &mut out,
            name,
            "counter",
            "Requests handled, by upstream and decision (upstream \"\" when none was matched).",
        );
        for (u, m) in &upstreams {
            let u = escape(u);
            let _ = writeln!(
                out,
                "{name}{{upstream=\"{u}\",decision=\"forwarded\"}} {}",
                m.forwarded.load(Ordering::Relaxed)
            );
            let _ = writeln!(
                out,
                "{name}{{upstream=\"{u}\",decision=\"refused\"}} {}",
                m.refused.load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(
            out,
            "{name}{{upstream=\"\",decision=\"refused\"}} {}",
            self.refused_unrouted()
        );

        let name = "leash_proxy_tunnels_total";
        header(
            &mut out,
            name,
            "counter",
            "CONNECT tunnels opened, by upstream and mode (intercept, passthrough).",
        );
        for (u, m) in &upstreams {
            let u = escape(u);
            for (mode, n) in [
                ("intercept", &m.tunnels_intercepted),
                ("passthrough", &m.tunnels_passthrough),
            ] {
                let _ = writeln!(
                    out,
                    "{name}{{upstream=\"{u}\",mode=\"{mode}\"}} {}",
                    n.load(Ordering::Relaxed)
                );
            }
        }
        let name = "leash_proxy_passthrough_bytes_total";
        header(
            &mut out,
            name,
            "counter",
            "Bytes carried by passthrough tunnels, by upstream and direction (sent: to the upstream).",
        );
        for (u, m) in &upstreams {
            let u = escape(u);
            for (dir, n) in [
                ("sent", &m.passthrough_bytes_sent),
                ("received", &m.passthrough_bytes_received),
            ] {
                let _ = writeln!(
                    out,
                    "{name}{{upstream=\"{u}\",direction=\"{dir}\"}} {}",
                    n.load(Ordering::Relaxed)
                );
            }
        }

        let name = "leash_proxy_refusals_total";
        header(&mut out, name, "counter", "Refused requests, by reason.");
        for (code, n) in self.refused_by_reason() {
            let _ = writeln!(out, "{name}{{reason=\"{code}\"}} {n}");
        }

        let name = "leash_proxy_injection_seconds";
        header(
            &mut out,
            name,
            "histogram",
            "Arrival of a request to its forwarding upstream (the sidecar's own time, credential fetches included).",
        );
        for (u, m) in &upstreams {
            m.injection
                .render(&mut out, name, &format!("upstream=\"{}\"", escape(u)));
        }
        let name = "leash_proxy_upstream_seconds";
        header(
            &mut out,
            name,
            "histogram",
            "Forwarding a request to the upstream's response headers.",
        );
        for (u, m) in &upstreams {
            m.upstream
                .render(&mut out, name, &format!("upstream=\"{}\"", escape(u)));
        }

        let c = &self.cache;
        for (name, help, v) in [
            (
                "leash_proxy_credential_cache_hits_total",
                "Requests served a cached credential.",
                &c.hits,
            ),
            (
                "leash_proxy_credential_cache_misses_total",
                "Credentials fetched because none was cached.",
                &c.misses,
            ),
            (
                "leash_proxy_credential_cache_refreshes_total",
                "Credentials refreshed ahead of expiry.",
                &c.refreshes,
            ),
            (
                "leash_proxy_credential_fetch_errors_total",
                "Credential fetches that failed.",
                &c.fetch_errors,
            ),
            (
                "leash_proxy_control_plane_sessions_total",
                "Sessions established with a control plane.",
                &self.sessions,
            ),
        ] {
            single(&mut out, name, "counter", help, v.load(Ordering::Relaxed));
        }
        single(
            &mut out,
            "leash_proxy_ready",
            "gauge",
            "Whether identity and control plane are up.",
            u8::from(g.ready),
        );
        single(
            &mut out,
            "leash_proxy_control_plane_connected",
            "gauge",
            "Whether a session with a control plane is open.",
            u8::from(g.connected),
        );
        single(
            &mut out,
            "leash_proxy_control_plane_silence_seconds",
            "gauge",
            "Seconds since the control plane was last heard.",
            format!("{:.3}", g.silence_secs),
        );
        single(
            &mut out,
            "leash_proxy_revocation_seq",
            "gauge",
            "Revocation sequence applied.",
            g.applied_seq,
        );
        single(
            &mut out,
            "leash_proxy_usage_reported_requests_total",
            "counter",
            "Requests whose usage the control plane has stored.",
            g.usage_reported,
        );
        single(
            &mut out,
            "leash_proxy_usage_dropped_requests_total",
            "counter",
            "Requests whose usage was dropped (buffer full while the control plane was away); reported as dropped.",
            g.usage_dropped,
        );
        single(
            &mut out,
            "leash_proxy_usage_pending_batches",
            "gauge",
            "Usage batches waiting for the control plane's acknowledgement.",
            g.usage_pending_batches,
        );
        single(
            &mut out,
            "leash_proxy_reports_dropped_total",
            "counter",
            "Leak and strip reports dropped while the control plane was away.",
            g.reports_dropped,
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every refusal is counted under its own code, including ones added
    /// after the counters were written (TRACE refusals once went uncounted).
    #[test]
    fn each_refusal_is_counted_under_its_code() {
        let m = Metrics::default();
        m.refused(&Refusal::TraceRefused {
            method: "TRACE",
            upstream: "payments".into(),
        });
        m.refused(&Refusal::NoHost);
        m.refused(&Refusal::NoHost);
        let counts: HashMap<_, _> = m.refused_by_reason().collect();
        assert_eq!(counts["trace_refused"], 1);
        assert_eq!(counts["no_host"], 2);
        assert_eq!(counts.len(), Code::ALL.len());
        assert_eq!(counts.values().sum::<u64>(), 3);
    }
}
