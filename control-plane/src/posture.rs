//! Posture after an incident: what the policy in force allows beyond what
//! the window's usage needed (grants nobody used, credential lifetimes far
//! above their use, workloads still holding their own secrets), the policy
//! edit that takes it back, and which live consumers a proposed policy
//! would break.

use std::collections::BTreeMap;
use std::time::Duration;

use leash_api::policy::{Policy, ValidPolicy};

use crate::admin::types::{
    BrokenConsumer, OversizedTtl, PolicyDiff, Posture, UnusedGrant, WorkloadSpan,
};
use crate::state::PolicySnapshot;
use crate::store::{CredentialSpan, Edge, Store, StoreError, UsageFilter, now_ms};

/// The window when none is given.
pub const DEFAULT_WINDOW: &str = "30d";

/// A lifetime is flagged above this many times the longest use of one
/// credential…
const TTL_FACTOR: u64 = 4;
/// …and only above this: a few minutes is short-lived enough whatever the use.
const TTL_FLOOR: Duration = Duration::from_secs(5 * 60);

/// The lifetimes a suggestion is rounded up to.
const HUMANE_TTLS: [u64; 12] = [
    60, 120, 300, 600, 900, 1800, 3600, 7200, 14_400, 28_800, 43_200, 86_400,
];

#[derive(Debug, thiserror::Error)]
pub enum PostureError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot write the proposed policy as YAML: {0}")]
    Yaml(#[from] serde_yaml_ng::Error),
}

/// The start of a window, from `since` (default 30d ago): in the past and
/// not before 1970.
pub fn window_start(since: Option<&str>) -> Result<i64, String> {
    let since = since.unwrap_or(DEFAULT_WINDOW);
    let ms = crate::usage::parse_time(since)?;
    if ms < 0 {
        return Err(format!("{since:?} is before 1970"));
    }
    if ms > now_ms() {
        return Err(format!(
            "{since:?} is in the future: the window must start in the past (e.g. 30d)"
        ));
    }
    Ok(ms)
}

/// Every finding since `since_ms` about the policy in force, and the edit.
pub async fn posture(
    store: &Store,
    snapshot: &PolicySnapshot,
    since_ms: i64,
) -> Result<Posture, PostureError> {
    let policy = &snapshot.policy;
    let unused_grants = crate::usage::unused_grants(store, policy, since_ms).await?;
    let spans = store.credential_spans(since_ms).await?;
    let oversized_ttls = oversized_ttls(&policy.policy, &spans);
    let own_secrets = store.stripped(Some(since_ms)).await?;
    let proposed = narrowed(&policy.policy, &unused_grants, &oversized_ttls);
    let current_yaml = serde_yaml_ng::to_string(&policy.policy)?;
    let yaml = serde_yaml_ng::to_string(&proposed)?;
    let diff = unified_diff(
        &current_yaml,
        &yaml,
        &format!("policy {} (in force)", snapshot.version),
        "policy (proposed)",
    );
    Ok(Posture {
        since_ms,
        policy_version: snapshot.version.clone(),
        unused_grants,
        oversized_ttls,
        own_secrets,
        policy_diff: PolicyDiff {
            changed: !diff.is_empty(),
            yaml,
            diff,
        },
    })
}

/// Upstreams whose lifetime is above both 4× the longest use of one of
/// their credentials and 5 minutes. An upstream nobody used in the window
/// has no span to compare with: its grants show as unused instead.
fn oversized_ttls(policy: &Policy, spans: &[CredentialSpan]) -> Vec<OversizedTtl> {
    let mut out = Vec::new();
    for upstream in &policy.upstreams {
        let workloads: Vec<WorkloadSpan> = spans
            .iter()
            .filter(|s| s.upstream == upstream.name)
            .map(|s| WorkloadSpan {
                workload: s.workload.clone(),
                longest_span_ms: s.longest_span_ms,
                credentials: s.credentials,
                requests: s.requests,
            })
            .collect();
        let Some(longest_span_ms) = workloads.iter().map(|w| w.longest_span_ms).max() else {
            continue;
        };
        let ttl = upstream.credential.ttl;
        let longest = Duration::from_millis(u64::try_from(longest_span_ms.max(0)).unwrap_or(0));
        if ttl <= TTL_FLOOR || u128::from(TTL_FACTOR) * longest.as_millis() >= ttl.as_millis() {
            continue;
        }
        let suggested_ttl_secs = suggested_ttl(longest);
        if suggested_ttl_secs >= ttl.as_secs() {
            continue;
        }
        out.push(OversizedTtl {
            upstream: upstream.name.clone(),
            ttl_secs: ttl.as_secs(),
            longest_span_ms,
            suggested_ttl_secs,
            workloads,
        });
    }
    out
}

/// Twice the longest use (room for a longer burst; a credential that ends
/// during one is refreshed ahead anyway), rounded up to a humane value.
fn suggested_ttl(longest: Duration) -> u64 {
    let want = longest.as_secs_f64() * 2.0;
    HUMANE_TTLS
        .into_iter()
        .find(|t| *t as f64 >= want)
        .unwrap_or(HUMANE_TTLS[HUMANE_TTLS.len() - 1])
}

/// The policy with the unused (grant workload, upstream) pairs removed (a
/// grant left with no upstream is dropped) and the oversized lifetimes
/// lowered to their suggestions.
fn narrowed(policy: &Policy, unused: &[UnusedGrant], ttls: &[OversizedTtl]) -> Policy {
    let mut out = policy.clone();
    for grant in &mut out.grants {
        grant.upstreams.retain(|u| {
            !unused
                .iter()
                .any(|x| x.workload == grant.workload && x.upstream == *u)
        });
    }
    out.grants.retain(|g| !g.upstreams.is_empty());
    for upstream in &mut out.upstreams {
        if let Some(t) = ttls.iter().find(|t| t.upstream == upstream.name) {
            upstream.credential.ttl = Duration::from_secs(t.suggested_ttl_secs);
        }
    }
    out
}

/// The (workload, upstream) pairs with requests since `since_ms` that
/// `proposed` would refuse.
pub async fn check(
    store: &Store,
    proposed: &ValidPolicy,
    since_ms: i64,
) -> Result<Vec<BrokenConsumer>, StoreError> {
    let edges = store
        .usage_edges(&UsageFilter {
            since_ms: Some(since_ms),
            ..UsageFilter::default()
        })
        .await?;
    Ok(broken(proposed, &edges))
}

fn broken(proposed: &ValidPolicy, edges: &[Edge]) -> Vec<BrokenConsumer> {
    // Edges are per credential kind too; a consumer is the pair.
    let mut pairs: BTreeMap<(&str, &str), (i64, i64)> = BTreeMap::new();
    for e in edges {
        let p = pairs
            .entry((e.workload.as_str(), e.upstream.as_str()))
            .or_insert((0, 0));
        p.0 += e.requests;
        p.1 = p.1.max(e.last_used_ms);
    }
    pairs
        .into_iter()
        .filter_map(|((workload, upstream), (requests, last_used_ms))| {
            let reason = if proposed.upstream(upstream).is_none() {
                "upstream_removed"
            } else if !proposed.is_granted(workload, upstream) {
                "not_granted"
            } else {
                return None;
            };
            Some(BrokenConsumer {
                workload: workload.to_owned(),
                upstream: upstream.to_owned(),
                reason: reason.to_owned(),
                requests,
                last_used_ms,
            })
        })
        .collect()
}

/// Lines of context around each change in a unified diff.
const CONTEXT: usize = 3;
/// Above this many cells the changed middle is shown as replaced whole
/// rather than aligned line by line (policy files are far smaller).
const MAX_CELLS: usize = 4_000_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Same,
    Removed,
    Added,
}

/// A unified diff of two texts by line (empty when they are equal).
pub fn unified_diff(old: &str, new: &str, old_name: &str, new_name: &str) -> String {
    let a: Vec<&str> = old.lines().collect();
    let b: Vec<&str> = new.lines().collect();
    let ops = line_ops(&a, &b);
    if ops.iter().all(|(op, _)| *op == Op::Same) {
        return String::new();
    }
    // Where each op starts in either text.
    let mut at = Vec::with_capacity(ops.len());
    let (mut i, mut j) = (0usize, 0usize);
    for (op, _) in &ops {
        at.push((i, j));
        match op {
            Op::Same => (i, j) = (i + 1, j + 1),
            Op::Removed => i += 1,
            Op::Added => j += 1,
        }
    }
    let changes: Vec<usize> = (0..ops.len()).filter(|k| ops[*k].0 != Op::Same).collect();
    let mut out = format!("--- {old_name}\n+++ {new_name}\n");
    let mut k = 0;
    while k < changes.len() {
        let lo = changes[k].saturating_sub(CONTEXT);
        let mut last = changes[k];
        while k + 1 < changes.len() && changes[k + 1] <= last + 2 * CONTEXT + 1 {
            k += 1;
            last = changes[k];
        }
        let hi = (last + CONTEXT + 1).min(ops.len());
        let hunk = &ops[lo..hi];
        let old_len = hunk.iter().filter(|(op, _)| *op != Op::Added).count();
        let new_len = hunk.iter().filter(|(op, _)| *op != Op::Removed).count();
        let start = |first: usize, len: usize| if len == 0 { first } else { first + 1 };
        out.push_str(&format!(
            "@@ -{},{old_len} +{},{new_len} @@\n",
            start(at[lo].0, old_len),
            start(at[lo].1, new_len)
        ));
        for (op, line) in hunk {
            let sign = match op {
                Op::Same => ' ',
                Op::Removed => '-',
                Op::Added => '+',
            };
            out.push(sign);
            out.push_str(line);
            out.push('\n');
        }
        k += 1;
    }
    out
}

/// The edit from `a` to `b`: common prefix and suffix kept, the middle
/// aligned by a longest common subsequence.
fn line_ops<'t>(a: &[&'t str], b: &[&'t str]) -> Vec<(Op, &'t str)> {
    let prefix = a.iter().zip(b).take_while(|(x, y)| x == y).count();
    let suffix = a[prefix..]
        .iter()
        .rev()
        .zip(b[prefix..].iter().rev())
        .take_while(|(x, y)| x == y)
        .count();
    let (ma, mb) = (&a[prefix..a.len() - suffix], &b[prefix..b.len() - suffix]);
    let mut ops: Vec<(Op, &str)> = a[..prefix].iter().map(|l| (Op::Same, *l)).collect();
    let (n, m) = (ma.len(), mb.len());
    if (n + 1).saturating_mul(m + 1) > MAX_CELLS {
        ops.extend(ma.iter().map(|l| (Op::Removed, *l)));
        ops.extend(mb.iter().map(|l| (Op::Added, *l)));
    } else {
        // lcs[i][j]: the longest common subsequence of ma[i..] and mb[j..].
        let mut lcs = vec![0u32; (n + 1) * (m + 1)];
        let cell = |i: usize, j: usize| i * (m + 1) + j;
        for i in (0..n).rev() {
            for j in (0..m).rev() {
                lcs[cell(i, j)] = if ma[i] == mb[j] {
                    lcs[cell(i + 1, j + 1)] + 1
                } else {
                    lcs[cell(i + 1, j)].max(lcs[cell(i, j + 1)])
                };
            }
        }
        let (mut i, mut j) = (0, 0);
        while i < n && j < m {
            if ma[i] == mb[j] {
                ops.push((Op::Same, ma[i]));
                (i, j) = (i + 1, j + 1);
            } else if lcs[cell(i + 1, j)] >= lcs[cell(i, j + 1)] {
                ops.push((Op::Removed, ma[i]));
                i += 1;
            } else {
                ops.push((Op::Added, mb[j]));
                j += 1;
            }
        }
        ops.extend(ma[i..].iter().map(|l| (Op::Removed, *l)));
        ops.extend(mb[j..].iter().map(|l| (Op::Added, *l)));
    }
    ops.extend(a[a.len() - suffix..].iter().map(|l| (Op::Same, *l)));
    ops
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    const POLICY: &str = r#"version: 1
upstreams:
  - name: payments
    hosts: [payments.leash.test]
    target: http://127.0.0.1:9
    credential: { kind: jwt, ttl: 1h }
  - name: ledger
    hosts: [ledger.leash.test]
    target: http://127.0.0.1:9
    credential: { kind: jwt, ttl: 5m }
grants:
  - workload: spiffe://leash.test/ns/demo/sa/client
    upstreams: [payments, ledger]
  - workload: spiffe://leash.test/ns/batch/*
    upstreams: [ledger]
"#;

    fn valid(text: &str) -> ValidPolicy {
        leash_api::policy::parse(text, Path::new(".")).unwrap()
    }

    fn span(upstream: &str, workload: &str, ms: i64) -> CredentialSpan {
        CredentialSpan {
            upstream: upstream.into(),
            workload: workload.into(),
            longest_span_ms: ms,
            credentials: 1,
            requests: 10,
        }
    }

    #[test]
    fn suggestions_round_up_to_humane_lifetimes() {
        let s = |secs: f64| suggested_ttl(Duration::from_secs_f64(secs));
        assert_eq!(s(0.2), 60);
        assert_eq!(s(30.0), 60);
        assert_eq!(s(31.0), 120);
        assert_eq!(s(100.0), 300);
        assert_eq!(s(1000.0), 3600);
        assert_eq!(s(90_000.0), 86_400);
    }

    #[test]
    fn a_lifetime_is_flagged_above_four_spans_and_five_minutes() {
        let p = valid(POLICY).policy;
        let app = "spiffe://leash.test/ns/demo/sa/client";
        // payments 1h: used 3s and 14m (the longest counts): 4×14m < 1h.
        let found = oversized_ttls(&p, &[span("payments", app, 3_000)]);
        assert_eq!(found.len(), 1);
        assert_eq!((found[0].suggested_ttl_secs, found[0].ttl_secs), (60, 3600));
        let long = [
            span("payments", app, 3_000),
            span("payments", "x", 14 * 60_000),
        ];
        assert_eq!(oversized_ttls(&p, &long)[0].suggested_ttl_secs, 1800);
        let longer = [span("payments", app, 16 * 60_000)];
        assert!(oversized_ttls(&p, &longer).is_empty());
        // ledger 5m: never above the floor, however short the use.
        assert!(oversized_ttls(&p, &[span("ledger", app, 10)]).is_empty());
    }

    #[test]
    fn narrowing_keeps_used_upstreams_and_drops_empty_grants() {
        let p = valid(POLICY).policy;
        let unused = [
            UnusedGrant {
                workload: "spiffe://leash.test/ns/demo/sa/client".into(),
                upstream: "ledger".into(),
                last_used_ms: None,
            },
            UnusedGrant {
                workload: "spiffe://leash.test/ns/batch/*".into(),
                upstream: "ledger".into(),
                last_used_ms: None,
            },
        ];
        let ttls = oversized_ttls(&p, &[span("payments", "x", 1_000)]);
        let n = narrowed(&p, &unused, &ttls);
        assert_eq!(n.grants.len(), 1);
        assert_eq!(n.grants[0].upstreams, ["payments"]);
        assert_eq!(n.upstreams[0].credential.ttl, Duration::from_secs(60));
        // Still a valid policy.
        valid(&serde_yaml_ng::to_string(&n).unwrap());
    }

    #[test]
    fn the_diff_is_unified_with_context() {
        let old = "a\nb\nc\nd\ne\nf\ng\nh\ni\nj\n";
        let new = "a\nb\nc\nd\nE\nf\ng\nh\ni\nj\nk\n";
        assert_eq!(
            unified_diff(old, new, "old", "new"),
            "--- old\n+++ new\n@@ -2,9 +2,10 @@\n b\n c\n d\n-e\n+E\n f\n g\n h\n i\n j\n+k\n"
        );
        assert_eq!(unified_diff(old, old, "old", "new"), "");
        assert_eq!(
            unified_diff("", "x\n", "old", "new"),
            "--- old\n+++ new\n@@ -0,0 +1,1 @@\n+x\n"
        );
        // Far-apart changes make separate hunks.
        let many: String = (0..30).map(|i| format!("{i}\n")).collect();
        let edited: String = (0..30)
            .filter(|i| *i != 25)
            .map(|i| {
                if i == 2 {
                    "two\n".to_owned()
                } else {
                    format!("{i}\n")
                }
            })
            .collect();
        let d = unified_diff(&many, &edited, "o", "n");
        assert_eq!(d.matches("@@ -").count(), 2, "{d}");
        assert!(
            d.contains("@@ -23,7 +23,6 @@\n 22\n 23\n 24\n-25\n 26\n"),
            "{d}"
        );
    }

    #[test]
    fn broken_consumers_are_pairs_with_a_reason() {
        let proposed = valid(
            &POLICY
                .replace("upstreams: [payments, ledger]", "upstreams: [ledger]")
                .replace(
                    "  - workload: spiffe://leash.test/ns/batch/*\n    upstreams: [ledger]\n",
                    "",
                ),
        );
        let edge = |w: &str, u: &str, kind: &str, requests, last| Edge {
            workload: w.into(),
            upstream: u.into(),
            credential_kind: kind.into(),
            requests,
            credentials: 1,
            errors: 0,
            first_seen_ms: 0,
            last_used_ms: last,
        };
        let app = "spiffe://leash.test/ns/demo/sa/client";
        let batch = "spiffe://leash.test/ns/batch/sa/nightly";
        let edges = [
            edge(app, "payments", "jwt", 3, 10),
            edge(app, "payments", "static", 2, 20),
            edge(app, "ledger", "jwt", 5, 30),
            edge(batch, "ledger", "jwt", 1, 40),
            edge(app, "gone", "jwt", 1, 50),
        ];
        let b = broken(&proposed, &edges);
        let got: Vec<_> = b
            .iter()
            .map(|c| {
                (
                    c.workload.as_str(),
                    c.upstream.as_str(),
                    c.reason.as_str(),
                    c.requests,
                    c.last_used_ms,
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                (batch, "ledger", "not_granted", 1, 40),
                (app, "gone", "upstream_removed", 1, 50),
                (app, "payments", "not_granted", 5, 20),
            ]
        );
    }

    #[test]
    fn windows_start_in_the_past() {
        let since = window_start(None).unwrap();
        assert!((now_ms() - since - 30 * 86_400_000).abs() < 5_000);
        assert!(
            window_start(Some("2999-01-01T00:00:00Z"))
                .unwrap_err()
                .contains("future")
        );
        assert!(
            window_start(Some("-5"))
                .unwrap_err()
                .contains("before 1970")
        );
        assert!(
            window_start(Some("soon"))
                .unwrap_err()
                .contains("not a time")
        );
    }
}
