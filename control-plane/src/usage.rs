//! Usage as the sidecars saw it: stored per minute bucket, idempotent per
//! batch, and queried by credential, workload, upstream and time; the
//! dependency map; grants nobody uses; and uses of revoked credentials.

use std::collections::BTreeMap;

use leash_api::policy::{ValidPolicy, WorkloadMatcher};
use leash_api::revocation::RevocationKind;
use leash_api::v1::UsageBatch;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

pub use crate::store::{BUCKET_MS, Edge, UsageFilter as Filter, UsageRow};
use crate::store::{Store, StoreError, StoredRevocation, UsageScope, now_ms};

use leash_api::usage::{method_name, status_class_name};
const MAX_FIELD: usize = 512;

#[derive(Debug, PartialEq, Eq)]
pub enum Recorded {
    /// Stored now.
    New { requests: u64 },
    /// This batch was stored before (a resend): nothing counted again.
    Duplicate,
}

/// Checks a batch before anything of it is stored.
pub fn validate(batch: &UsageBatch) -> Result<(), String> {
    for r in &batch.records {
        let fields = [&r.credential_id, &r.upstream, &r.credential_kind];
        if fields.iter().any(|f| f.len() > MAX_FIELD) {
            return Err("a usage record field is longer than 512 bytes".into());
        }
        // Never stored: a control character (NUL above all, which
        // PostgreSQL's text refuses) would fail the batch on every resend.
        if fields.iter().any(|f| f.chars().any(char::is_control)) {
            return Err("a usage record field holds a control character".into());
        }
        if method_name(r.method).is_none() {
            return Err(format!("unknown method {} in a usage record", r.method));
        }
        if status_class_name(r.status_class).is_none() {
            return Err(format!(
                "unknown status class {} in a usage record",
                r.status_class
            ));
        }
    }
    Ok(())
}

/// Stores a batch once: a resent batch (same sidecar process, same
/// sequence) changes nothing.
pub async fn record(
    store: &Store,
    sidecar_id: &str,
    workload: &str,
    batch: &UsageBatch,
) -> Result<Recorded, StoreError> {
    let requests: u64 = batch.records.iter().map(|r| r.requests).sum();
    Ok(
        if store
            .record_usage(sidecar_id, workload, batch, requests)
            .await?
        {
            Recorded::New { requests }
        } else {
            Recorded::Duplicate
        },
    )
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[schema(as = UsageSummary)]
pub struct Summary {
    pub rows: Vec<UsageRow>,
    /// Requests in `rows`.
    pub requests: i64,
    /// Requests the sidecars counted but had to drop before delivering them
    /// (their buffer overflowed while the control plane was away), over the
    /// same time range by arrival; not attributable to a row.
    pub dropped_requests: i64,
}

/// Usage grouped by workload, upstream, credential, method and status class.
pub async fn summary(store: &Store, f: &Filter) -> Result<Summary, StoreError> {
    let rows = store.usage_rows(f).await?;
    let dropped_requests = store.dropped_requests(f).await?;
    Ok(Summary {
        requests: rows.iter().map(|r| r.requests).sum(),
        rows,
        dropped_requests,
    })
}

/// Usage over time: about [`TIMELINE_STEPS`] steps over the filter's range
/// (since 24 hours ago when it has none), each a whole number of buckets.
pub async fn timeline(store: &Store, f: &Filter) -> Result<Timeline, StoreError> {
    let until = f.until_ms.unwrap_or_else(crate::store::now_ms);
    let since = f.since_ms.unwrap_or(until - 86_400_000);
    let f = Filter {
        since_ms: Some(since),
        until_ms: Some(until),
        ..f.clone()
    };
    let span = (until - since).max(BUCKET_MS);
    let buckets = (span / TIMELINE_STEPS / BUCKET_MS).max(1);
    let step_ms = buckets * BUCKET_MS;
    Ok(Timeline {
        since_ms: since,
        until_ms: until,
        step_ms,
        points: store.usage_timeline(&f, step_ms).await?,
    })
}

/// How many steps a timeline has at most (about).
pub const TIMELINE_STEPS: i64 = 120;

/// `GET /v1/usage/timeline`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Timeline {
    pub since_ms: i64,
    pub until_ms: i64,
    /// Width of each step.
    pub step_ms: i64,
    /// Steps with any use, oldest first.
    pub points: Vec<crate::store::TimelinePoint>,
}

pub async fn dependencies(store: &Store, f: &Filter) -> Result<Vec<Edge>, StoreError> {
    store.usage_edges(f).await
}

/// A grant of the current policy that no matching workload used since T.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, ToSchema)]
pub struct UnusedGrant {
    /// As the policy writes it (an exact SPIFFE ID or a `/*` prefix).
    pub workload: String,
    pub upstream: String,
    /// The last use ever recorded, if any (before `since`).
    pub last_used_ms: Option<i64>,
}

pub async fn unused_grants(
    store: &Store,
    policy: &ValidPolicy,
    since_ms: i64,
) -> Result<Vec<UnusedGrant>, StoreError> {
    let mut out = Vec::new();
    for grant in &policy.policy.grants {
        let Ok(matcher) = WorkloadMatcher::parse(&grant.workload) else {
            continue;
        };
        for upstream in &grant.upstreams {
            let last = store.last_use(upstream, &matcher).await?;
            if last.is_none_or(|l| l < since_ms) {
                out.push(UnusedGrant {
                    workload: grant.workload.clone(),
                    upstream: upstream.clone(),
                    last_used_ms: last,
                });
            }
        }
    }
    Ok(out)
}

/// Use of what a revocation covers after it was issued.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct UseAfterRevocation {
    pub revocation_id: String,
    pub kind: String,
    pub revoked_at_ms: i64,
    pub workload: String,
    pub upstream: String,
    pub credential_id: String,
    pub requests: i64,
    pub last_seen_ms: i64,
    /// When the last of this workload's sidecars acknowledged the
    /// revocation (None: none has yet).
    pub acknowledged_at_ms: Option<i64>,
    /// Used after the workload's sidecars had acknowledged it (or when none
    /// has): the revocation did not hold. Uses between the revocation and
    /// the acknowledgement are requests that were already admitted.
    pub violation: bool,
}

pub async fn after_revocation(store: &Store) -> Result<Vec<UseAfterRevocation>, StoreError> {
    let mut out = Vec::new();
    for stored in store.revocations(false).await? {
        out.extend(uses_after(store, &stored).await?);
    }
    Ok(out)
}

/// Use of what one revocation covers after it was issued, per workload,
/// upstream and credential.
pub async fn uses_after(
    store: &Store,
    stored: &StoredRevocation,
) -> Result<Vec<UseAfterRevocation>, StoreError> {
    let r = &stored.revocation;
    let Some(kind) = RevocationKind::of(r) else {
        return Ok(Vec::new());
    };
    let workload = || WorkloadMatcher::parse(&r.workload);
    let scope = match kind {
        RevocationKind::Credential => UsageScope::Credential(r.credential_id.clone()),
        RevocationKind::Upstream => UsageScope::Upstream(r.upstream.clone()),
        RevocationKind::Grant => {
            let Ok(m) = workload() else {
                return Ok(Vec::new());
            };
            UsageScope::Grant {
                upstream: r.upstream.clone(),
                workload: m,
            }
        }
        RevocationKind::Workload => {
            let Ok(m) = workload() else {
                return Ok(Vec::new());
            };
            UsageScope::Workload(m)
        }
        // Leaked values are refused before any credential is used.
        _ => return Ok(Vec::new()),
    };
    let rows = store
        .usage_after(
            &scope,
            r.revoked_at_ms,
            stored.restored.as_ref().map(|restore| restore.at_ms),
        )
        .await?;
    if rows.is_empty() {
        return Ok(Vec::new());
    }
    // The latest acknowledgement per workload.
    let mut acked: BTreeMap<String, i64> = BTreeMap::new();
    for (session, at) in store.acks_for(stored.revoke_seq).await? {
        let e = acked.entry(session.spiffe_id).or_insert(at);
        *e = (*e).max(at);
    }
    Ok(rows
        .into_iter()
        .map(|row| {
            let acknowledged_at_ms = acked.get(&row.workload).copied();
            UseAfterRevocation {
                revocation_id: r.id.clone(),
                kind: r.kind().as_str().to_owned(),
                revoked_at_ms: r.revoked_at_ms,
                upstream: row.upstream,
                credential_id: row.credential_id,
                requests: row.requests,
                violation: acknowledged_at_ms.is_none_or(|a| row.last_seen_ms > a),
                acknowledged_at_ms,
                last_seen_ms: row.last_seen_ms,
                workload: row.workload,
            }
        })
        .collect())
}

/// Parses a time bound: Unix milliseconds, an RFC 3339 timestamp, or a
/// duration meaning that long ago ("15m", "24h", "7d").
pub fn parse_time(s: &str) -> Result<i64, String> {
    let s = s.trim();
    if let Ok(ms) = s.parse::<i64>() {
        return Ok(ms);
    }
    if let Ok(t) = humantime::parse_rfc3339_weak(s) {
        return t
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
            .map_err(|_| format!("{s:?} is before 1970"));
    }
    if let Ok(d) = humantime::parse_duration(s) {
        return Ok(now_ms() - i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
    }
    Err(format!(
        "{s:?} is not a time: use Unix milliseconds, RFC 3339 (2026-11-22T10:00:00Z) or a duration ago (15m, 24h)"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::test_db::store_test;

    fn record(
        credential: &str,
        method: &str,
        requests: u64,
        at: i64,
    ) -> leash_api::v1::UsageRecord {
        leash_api::v1::UsageRecord {
            credential_id: credential.into(),
            upstream: "payments".into(),
            credential_kind: "jwt".into(),
            method: leash_api::usage::METHODS
                .iter()
                .position(|m| *m == method)
                .map_or(99, leash_api::usage::wire),
            status_class: leash_api::v1::StatusClass::StatusClass2xx.into(),
            requests,
            bytes_sent: 0,
            bytes_received: 10 * requests,
            first_seen_ms: at,
            last_seen_ms: at + 5,
        }
    }

    store_test!(
        async fn a_resent_batch_is_not_counted_twice(db: &TestDb) {
            let store = db.open(None).await.unwrap();
            let batch = UsageBatch {
                batch_seq: 1,
                records: vec![
                    record("c1", "GET", 3, 1_000),
                    record("c1", "POST", 1, 1_000),
                ],
                dropped_requests: 2,
                dropped_records: 1,
                created_at_ms: 2_000,
            };
            let w = "spiffe://leash.test/ns/demo/sa/client";
            assert_eq!(
                record_batch(&store, "s1", w, &batch).await,
                Recorded::New { requests: 4 }
            );
            assert_eq!(
                record_batch(&store, "s1", w, &batch).await,
                Recorded::Duplicate
            );
            // Another sidecar process may use the same sequence number.
            assert_eq!(
                record_batch(&store, "s2", w, &batch).await,
                Recorded::New { requests: 4 }
            );
            // The same minute bucket accumulates.
            let next = UsageBatch {
                batch_seq: 2,
                records: vec![record("c1", "GET", 2, 1_500)],
                ..UsageBatch::default()
            };
            record_batch(&store, "s1", w, &next).await;
            let s = summary(&store, &Filter::default()).await.unwrap();
            assert_eq!((s.requests, s.dropped_requests), (10, 4));
            let get = s.rows.iter().find(|r| r.method == "GET").unwrap();
            assert_eq!(
                (
                    get.requests,
                    get.first_seen_ms,
                    get.last_seen_ms,
                    get.bytes_received
                ),
                (8, 1_000, 1_505, 80)
            );
            store.close().await;
        }
    );

    async fn record_batch(store: &Store, sidecar: &str, w: &str, b: &UsageBatch) -> Recorded {
        super::record(store, sidecar, w, b).await.unwrap()
    }

    #[test]
    fn malformed_records_are_refused() {
        let mut b = UsageBatch {
            records: vec![record("c", "BREW", 1, 1)],
            ..UsageBatch::default()
        };
        assert!(validate(&b).unwrap_err().contains("unknown method 99"));
        b.records[0].method = leash_api::v1::Method::Get.into();
        b.records[0].status_class = 7;
        assert!(validate(&b).is_err());
        b.records[0].status_class = leash_api::v1::StatusClass::NoAnswer.into();
        assert!(validate(&b).is_ok());
        b.records[0].credential_id = "x".repeat(600);
        assert!(validate(&b).is_err());
        b.records[0].credential_id = "c".into();
        b.records[0].upstream = "pay\0ments".into();
        assert!(validate(&b).unwrap_err().contains("control character"));
    }

    #[test]
    fn times_parse_three_ways() {
        assert_eq!(parse_time("1700000000000"), Ok(1_700_000_000_000));
        assert_eq!(parse_time("2023-11-14T22:13:20Z"), Ok(1_700_000_000_000));
        let ago = parse_time("1h").unwrap();
        assert!((now_ms() - ago - 3_600_000).abs() < 5_000);
        assert!(parse_time("yesterday").unwrap_err().contains("not a time"));
    }
}
