//! Control-plane metrics in Prometheus text format: counters and a
//! fixed-bucket histogram built on atomics (no lock on any path).

use leash_api::metrics::{self, Histogram, PROPAGATION_BUCKETS};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::probes::Outcome;

pub struct Metrics {
    pub credentials_issued: AtomicU64,
    pub issue_denied: AtomicU64,
    pub revocations_committed: AtomicU64,
    pub usage_batches: AtomicU64,
    pub usage_duplicate_batches: AtomicU64,
    pub usage_rejected_batches: AtomicU64,
    /// Sidecar reports (leak refusals, stripped and echoed counts) refused
    /// as malformed: oversized or control characters, unknown names.
    pub reports_rejected: AtomicU64,
    pub usage_requests: AtomicU64,
    pub usage_dropped_requests: AtomicU64,
    pub audit_write_failures: AtomicU64,
    /// Edits of the policy file applied, and refused as invalid (the last
    /// valid policy stays in force).
    pub policy_reloads: AtomicU64,
    pub policy_rejected: AtomicU64,
    /// Commit of a revocation → a sidecar's acknowledgement of it.
    pub revocation_propagation: Histogram,
    pub missions: crate::missions::MissionMetrics,
    /// Deactivation probes by outcome, in `probes::Outcome::ALL` order.
    deactivation_probes: [AtomicU64; 4],
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            credentials_issued: AtomicU64::new(0),
            issue_denied: AtomicU64::new(0),
            revocations_committed: AtomicU64::new(0),
            usage_batches: AtomicU64::new(0),
            usage_duplicate_batches: AtomicU64::new(0),
            usage_rejected_batches: AtomicU64::new(0),
            reports_rejected: AtomicU64::new(0),
            usage_requests: AtomicU64::new(0),
            usage_dropped_requests: AtomicU64::new(0),
            audit_write_failures: AtomicU64::new(0),
            policy_reloads: AtomicU64::new(0),
            policy_rejected: AtomicU64::new(0),
            revocation_propagation: Histogram::new(PROPAGATION_BUCKETS),
            missions: crate::missions::MissionMetrics::default(),
            deactivation_probes: Default::default(),
        }
    }
}

fn counter(out: &mut String, name: &str, help: &str, v: &AtomicU64) {
    let _ = writeln!(
        out,
        "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
        v.load(Ordering::Relaxed)
    );
}

impl Metrics {
    pub fn count_probe(&self, outcome: Outcome) {
        let i = Outcome::ALL.iter().position(|o| *o == outcome).unwrap_or(0);
        self.deactivation_probes[i].fetch_add(1, Ordering::Relaxed);
    }

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
            "leash_cp_audit_write_failures_total",
            "Admin calls whose audit entry could not be written (reads were still answered, changes refused).",
            &self.audit_write_failures,
        );
        let m = &self.missions;
        let _ = writeln!(
            out,
            "# HELP leash_cp_missions Remediation missions by state (overdue: open past the deadline).\n# TYPE leash_cp_missions gauge\n\
             leash_cp_missions{{state=\"open\"}} {}\nleash_cp_missions{{state=\"closed\"}} {}\nleash_cp_missions{{state=\"overdue\"}} {}",
            m.open.load(Ordering::Relaxed),
            m.closed.load(Ordering::Relaxed),
            m.overdue.load(Ordering::Relaxed),
        );
        let _ = writeln!(
            out,
            "# HELP leash_cp_mission_changes_total Missions closed and reopened by their criteria.\n# TYPE leash_cp_mission_changes_total counter\n\
             leash_cp_mission_changes_total{{to=\"closed\"}} {}\nleash_cp_mission_changes_total{{to=\"open\"}} {}",
            m.closed_total.load(Ordering::Relaxed),
            m.reopened_total.load(Ordering::Relaxed),
        );
        counter(
            &mut out,
            "leash_cp_policy_reloads_total",
            "Edits of the policy file applied.",
            &self.policy_reloads,
        );
        counter(
            &mut out,
            "leash_cp_policy_rejected_total",
            "Edits of the policy file refused as invalid (the last valid policy stays in force; the error is logged).",
            &self.policy_rejected,
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
            "leash_cp_reports_rejected_total",
            "Sidecar reports refused as malformed (oversized strings, control characters, unknown names).",
            &self.reports_rejected,
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
        let name = "leash_cp_deactivation_probes_total";
        metrics::header(
            &mut out,
            name,
            "counter",
            "Deactivation probes of revoked secret versions by outcome: dead (refused by the provider), alive, error (no answer), limited (not sent: rate limit).",
        );
        for (outcome, n) in Outcome::ALL.iter().zip(&self.deactivation_probes) {
            let _ = writeln!(
                out,
                "{name}{{outcome=\"{}\"}} {}",
                outcome.as_str(),
                n.load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(
            out,
            "# HELP leash_cp_sessions Connected sidecar sessions.\n# TYPE leash_cp_sessions gauge\nleash_cp_sessions {sessions}"
        );
        let _ = writeln!(
            out,
            "# HELP leash_cp_revocation_seq Newest committed revocation sequence.\n# TYPE leash_cp_revocation_seq gauge\nleash_cp_revocation_seq {seq}"
        );
        let name = "leash_cp_revocation_propagation_seconds";
        metrics::header(
            &mut out,
            name,
            "histogram",
            "Time from committing a revocation to each sidecar's acknowledgement.",
        );
        self.revocation_propagation.render(&mut out, name, "");
        out
    }
}
