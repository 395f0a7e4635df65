//! Control-plane metrics in Prometheus text format: counters and a
//! fixed-bucket histogram built on atomics (no lock on any path).

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds in seconds; chosen around the "milliseconds" promise.
const BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0,
];

#[derive(Default)]
pub struct Histogram {
    counts: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        if let Some(i) = BUCKETS.iter().position(|b| secs <= *b) {
            self.counts[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micros.fetch_add(
            u64::try_from(d.as_micros()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (bound, n) in BUCKETS.iter().zip(&self.counts) {
            cumulative += n.load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {cumulative}");
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum {sum}\n{name}_count {count}");
    }
}

#[derive(Default)]
pub struct Metrics {
    pub credentials_issued: AtomicU64,
    pub issue_denied: AtomicU64,
    pub revocations_committed: AtomicU64,
    pub usage_batches: AtomicU64,
    pub usage_duplicate_batches: AtomicU64,
    pub usage_rejected_batches: AtomicU64,
    pub usage_requests: AtomicU64,
    pub usage_dropped_requests: AtomicU64,
    /// Commit of a revocation → a sidecar's acknowledgement of it.
    pub revocation_propagation: Histogram,
}

fn counter(out: &mut String, name: &str, help: &str, v: &AtomicU64) {
    let _ = writeln!(
        out,
        "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
        v.load(Ordering::Relaxed)
    );
}

impl Metrics {
    pub fn render(&self, sessions: usize, seq: u64) -> String {
        let mut out = String::with_capacity(2048);
        counter(
            &mut out,
            "leash_cp_credentials_issued_total",
            "Credentials issued to sidecars.",
            &self.credentials_issued,
        );
        counter(
            &mut out,
            "leash_cp_issue_denied_total",
            "Issue calls answered with a denial.",
            &self.issue_denied,
        );
        counter(
            &mut out,
            "leash_cp_revocations_committed_total",
            "Revocations and restores committed.",
            &self.revocations_committed,
        );
        counter(
            &mut out,
            "leash_cp_usage_batches_total",
            "Usage batches stored.",
            &self.usage_batches,
        );
        counter(
            &mut out,
            "leash_cp_usage_duplicate_batches_total",
            "Usage batches received again after a reconnect (not counted twice).",
            &self.usage_duplicate_batches,
        );
        counter(
            &mut out,
            "leash_cp_usage_rejected_batches_total",
            "Usage batches refused as malformed.",
            &self.usage_rejected_batches,
        );
        counter(
            &mut out,
            "leash_cp_usage_requests_total",
            "Proxied requests reported by sidecars.",
            &self.usage_requests,
        );
        counter(
            &mut out,
            "leash_cp_usage_dropped_requests_total",
            "Requests sidecars counted but dropped before delivery (buffer overflow).",
            &self.usage_dropped_requests,
        );
        let _ = writeln!(
            out,
            "# HELP leash_cp_sessions Connected sidecar sessions.\n# TYPE leash_cp_sessions gauge\nleash_cp_sessions {sessions}"
        );
        let _ = writeln!(
            out,
            "# HELP leash_cp_revocation_seq Newest committed revocation sequence.\n# TYPE leash_cp_revocation_seq gauge\nleash_cp_revocation_seq {seq}"
        );
        self.revocation_propagation.render(
            &mut out,
            "leash_cp_revocation_propagation_seconds",
            "Time from committing a revocation to each sidecar's acknowledgement.",
        );
        out
    }
}
