//! Request counters for `/metrics` (Prometheus text). Full telemetry lands
//! with the usage-reporting work; these are the counts operators need first.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::refusal::Refusal;

const CODES: [&str; 18] = [
    "unknown_upstream",
    "no_host",
    "not_granted",
    "denied_by_control_plane",
    "connect_not_supported",
    "identity_unavailable",
    "control_plane_unavailable",
    "credential_unavailable",
    "upstream_unreachable",
    "bad_request",
    "headers_too_large",
    "revoked_credential",
    "revoked_grant",
    "revoked_workload",
    "revoked_upstream",
    "revoked",
    "stale_revocation_state",
    "leaked_secret",
];

#[derive(Default)]
pub struct Metrics {
    forwarded: AtomicU64,
    refused: [AtomicU64; CODES.len()],
}

impl Metrics {
    pub fn forwarded(&self) {
        self.forwarded.fetch_add(1, Ordering::Relaxed);
    }

    pub fn refused(&self, r: &Refusal) {
        if let Some(i) = CODES.iter().position(|c| *c == r.code()) {
            self.refused[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn render(&self, ready: bool, applied_seq: u64, silence: std::time::Duration) -> String {
        let mut out = String::with_capacity(1024);
        out.push_str("# HELP leash_proxy_requests_total Requests handled, by decision.\n");
        out.push_str("# TYPE leash_proxy_requests_total counter\n");
        let _ = writeln!(
            out,
            "leash_proxy_requests_total{{decision=\"forwarded\",reason=\"\"}} {}",
            self.forwarded.load(Ordering::Relaxed)
        );
        for (code, n) in CODES.iter().zip(&self.refused) {
            let _ = writeln!(
                out,
                "leash_proxy_requests_total{{decision=\"refused\",reason=\"{code}\"}} {}",
                n.load(Ordering::Relaxed)
            );
        }
        out.push_str("# HELP leash_proxy_ready Whether identity and control plane are up.\n");
        out.push_str("# TYPE leash_proxy_ready gauge\n");
        let _ = writeln!(out, "leash_proxy_ready {}", u8::from(ready));
        let _ = writeln!(
            out,
            "# HELP leash_proxy_revocation_seq Revocation sequence applied.\n# TYPE leash_proxy_revocation_seq gauge\nleash_proxy_revocation_seq {applied_seq}"
        );
        let _ = writeln!(
            out,
            "# HELP leash_proxy_control_plane_silence_seconds Seconds since the control plane was last heard.\n# TYPE leash_proxy_control_plane_silence_seconds gauge\nleash_proxy_control_plane_silence_seconds {:.3}",
            silence.as_secs_f64()
        );
        out
    }
}
