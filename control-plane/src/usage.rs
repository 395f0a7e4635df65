//! Usage as the sidecars saw it: stored per minute bucket, idempotent per
//! batch, and queried by credential, workload, upstream and time; the
//! dependency map; grants nobody uses; and uses of revoked credentials.

use std::collections::BTreeMap;

use leash_api::policy::{ValidPolicy, WorkloadMatcher};
use leash_api::revocation::RevocationKind;
use leash_api::v1::UsageBatch;
use serde::{Deserialize, Serialize};
use sqlx::Row as _;
use utoipa::ToSchema;

use crate::store::{Store, StoreError, now_ms};

/// Usage is stored in buckets of this width (of the batch's first use).
pub const BUCKET_MS: i64 = 60_000;

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
        if r.credential_id.len() > MAX_FIELD || r.upstream.len() > MAX_FIELD {
            return Err("a usage record field is longer than 512 bytes".into());
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

fn i64_of(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// Stores a batch once: the batch row and its counts commit together, so a
/// resent batch (same sidecar process, same sequence) changes nothing.
pub async fn record(
    store: &Store,
    sidecar_id: &str,
    workload: &str,
    batch: &UsageBatch,
) -> Result<Recorded, StoreError> {
    let requests: u64 = batch.records.iter().map(|r| r.requests).sum();
    let mut tx = store.pool().begin().await?;
    let inserted = sqlx::query(
        "INSERT INTO usage_batches (sidecar_id, batch_seq, workload, received_at_ms, requests, dropped_requests, dropped_records) \
         VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
    )
    .bind(sidecar_id)
    .bind(i64_of(batch.batch_seq))
    .bind(workload)
    .bind(now_ms())
    .bind(i64_of(requests))
    .bind(i64_of(batch.dropped_requests))
    .bind(i64_of(batch.dropped_records))
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if inserted == 0 {
        return Ok(Recorded::Duplicate);
    }
    for chunk in batch.records.chunks(100) {
        let mut q = sqlx::QueryBuilder::new(
            "INSERT INTO usage (bucket_ms, workload, upstream, credential_id, credential_kind, method, status_class, \
             requests, bytes_sent, bytes_received, first_seen_ms, last_seen_ms) ",
        );
        q.push_values(chunk, |mut row, r| {
            row.push_bind(r.first_seen_ms - r.first_seen_ms.rem_euclid(BUCKET_MS))
                .push_bind(workload)
                .push_bind(&r.upstream)
                .push_bind(&r.credential_id)
                .push_bind(&r.credential_kind)
                .push_bind(method_name(r.method).unwrap_or_default())
                .push_bind(status_class_name(r.status_class).unwrap_or_default())
                .push_bind(i64_of(r.requests))
                .push_bind(i64_of(r.bytes_sent))
                .push_bind(i64_of(r.bytes_received))
                .push_bind(r.first_seen_ms)
                .push_bind(r.last_seen_ms);
        });
        q.push(
            " ON CONFLICT (bucket_ms, workload, upstream, credential_id, method, status_class) DO UPDATE SET \
             requests = requests + excluded.requests, bytes_sent = bytes_sent + excluded.bytes_sent, \
             bytes_received = bytes_received + excluded.bytes_received, \
             first_seen_ms = min(first_seen_ms, excluded.first_seen_ms), \
             last_seen_ms = max(last_seen_ms, excluded.last_seen_ms)",
        );
        q.build().execute(&mut *tx).await?;
    }
    tx.commit().await?;
    Ok(Recorded::New { requests })
}

/// Which usage a query covers. Times are Unix milliseconds.
#[derive(Debug, Default, Clone)]
pub struct Filter {
    pub credential: Option<String>,
    pub workload: Option<String>,
    pub upstream: Option<String>,
    pub since_ms: Option<i64>,
    pub until_ms: Option<i64>,
}

impl Filter {
    fn push_where(&self, q: &mut sqlx::QueryBuilder<sqlx::Sqlite>) {
        q.push(" WHERE 1 = 1");
        if let Some(c) = &self.credential {
            q.push(" AND credential_id = ").push_bind(c.clone());
        }
        if let Some(w) = &self.workload {
            q.push(" AND workload = ").push_bind(w.clone());
        }
        if let Some(u) = &self.upstream {
            q.push(" AND upstream = ").push_bind(u.clone());
        }
        if let Some(s) = self.since_ms {
            q.push(" AND last_seen_ms >= ").push_bind(s);
        }
        if let Some(u) = self.until_ms {
            q.push(" AND first_seen_ms < ").push_bind(u);
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, ToSchema)]
pub struct UsageRow {
    pub workload: String,
    pub upstream: String,
    pub credential_id: String,
    pub credential_kind: String,
    pub method: String,
    pub status_class: String,
    pub requests: i64,
    pub bytes_sent: i64,
    pub bytes_received: i64,
    pub first_seen_ms: i64,
    pub last_seen_ms: i64,
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
    let mut q = sqlx::QueryBuilder::new(
        "SELECT workload, upstream, credential_id, credential_kind, method, status_class, \
         SUM(requests) AS requests, SUM(bytes_sent) AS bytes_sent, SUM(bytes_received) AS bytes_received, \
         MIN(first_seen_ms) AS first_seen_ms, MAX(last_seen_ms) AS last_seen_ms FROM usage",
    );
    f.push_where(&mut q);
    q.push(
        " GROUP BY workload, upstream, credential_id, credential_kind, method, status_class \
         ORDER BY workload, upstream, last_seen_ms DESC, method, status_class LIMIT 10000",
    );
    let rows: Vec<UsageRow> = q
        .build()
        .fetch_all(store.pool())
        .await?
        .iter()
        .map(|r| UsageRow {
            workload: r.get("workload"),
            upstream: r.get("upstream"),
            credential_id: r.get("credential_id"),
            credential_kind: r.get("credential_kind"),
            method: r.get("method"),
            status_class: r.get("status_class"),
            requests: r.get("requests"),
            bytes_sent: r.get("bytes_sent"),
            bytes_received: r.get("bytes_received"),
            first_seen_ms: r.get("first_seen_ms"),
            last_seen_ms: r.get("last_seen_ms"),
        })
        .collect();
    let mut d = sqlx::QueryBuilder::new(
        "SELECT COALESCE(SUM(dropped_requests), 0) FROM usage_batches WHERE 1 = 1",
    );
    if let Some(w) = &f.workload {
        d.push(" AND workload = ").push_bind(w.clone());
    }
    if let Some(s) = f.since_ms {
        d.push(" AND received_at_ms >= ").push_bind(s);
    }
    if let Some(u) = f.until_ms {
        d.push(" AND received_at_ms < ").push_bind(u);
    }
    let dropped_requests: i64 = d.build_query_scalar().fetch_one(store.pool()).await?;
    Ok(Summary {
        requests: rows.iter().map(|r| r.requests).sum(),
        rows,
        dropped_requests,
    })
}

/// One edge of the dependency map: this workload calls this upstream.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, ToSchema)]
pub struct Edge {
    pub workload: String,
    pub upstream: String,
    pub credential_kind: String,
    pub requests: i64,
    /// Distinct credentials used on this edge.
    pub credentials: i64,
    pub errors: i64,
    pub first_seen_ms: i64,
    pub last_used_ms: i64,
}

pub async fn dependencies(store: &Store, f: &Filter) -> Result<Vec<Edge>, StoreError> {
    let mut q = sqlx::QueryBuilder::new(
        "SELECT workload, upstream, credential_kind, SUM(requests) AS requests, \
         COUNT(DISTINCT credential_id) AS credentials, \
         SUM(CASE WHEN status_class IN ('5xx', 'error') THEN requests ELSE 0 END) AS errors, \
         MIN(first_seen_ms) AS first_seen_ms, MAX(last_seen_ms) AS last_used_ms FROM usage",
    );
    f.push_where(&mut q);
    q.push(" GROUP BY workload, upstream, credential_kind ORDER BY workload, upstream");
    Ok(q.build()
        .fetch_all(store.pool())
        .await?
        .iter()
        .map(|r| Edge {
            workload: r.get("workload"),
            upstream: r.get("upstream"),
            credential_kind: r.get("credential_kind"),
            requests: r.get("requests"),
            credentials: r.get("credentials"),
            errors: r.get("errors"),
            first_seen_ms: r.get("first_seen_ms"),
            last_used_ms: r.get("last_used_ms"),
        })
        .collect())
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

/// SQL condition selecting the workloads a matcher matches.
fn push_workload_match(q: &mut sqlx::QueryBuilder<sqlx::Sqlite>, m: &WorkloadMatcher) {
    match m {
        WorkloadMatcher::Exact(id) => {
            q.push(" workload = ").push_bind(id.clone());
        }
        WorkloadMatcher::Prefix(prefix) => {
            // Compared as a substring, not with LIKE: no escaping to get wrong.
            q.push(" (length(workload) > ")
                .push_bind(i64::try_from(prefix.len()).unwrap_or(i64::MAX))
                .push(" AND substr(workload, 1, ")
                .push_bind(i64::try_from(prefix.len()).unwrap_or(i64::MAX))
                .push(") = ")
                .push_bind(prefix.clone())
                .push(")");
        }
    }
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
            let mut q = sqlx::QueryBuilder::new(
                "SELECT MAX(last_seen_ms) AS last_used FROM usage WHERE upstream = ",
            );
            q.push_bind(upstream.clone()).push(" AND");
            push_workload_match(&mut q, &matcher);
            let last: Option<i64> = q.build_query_scalar().fetch_one(store.pool()).await?;
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
        let r = &stored.revocation;
        let Some(kind) = RevocationKind::of(r) else {
            continue;
        };
        let mut q = sqlx::QueryBuilder::new(
            "SELECT workload, upstream, credential_id, SUM(requests) AS requests, MAX(last_seen_ms) AS last_seen_ms \
             FROM usage WHERE last_seen_ms > ",
        );
        q.push_bind(r.revoked_at_ms);
        if let Some(restore) = &stored.restored {
            q.push(" AND first_seen_ms < ").push_bind(restore.at_ms);
        }
        let workload = || WorkloadMatcher::parse(&r.workload);
        match kind {
            RevocationKind::Credential => {
                q.push(" AND credential_id = ")
                    .push_bind(r.credential_id.clone());
            }
            RevocationKind::Upstream => {
                q.push(" AND upstream = ").push_bind(r.upstream.clone());
            }
            RevocationKind::Grant => {
                let Ok(m) = workload() else { continue };
                q.push(" AND upstream = ")
                    .push_bind(r.upstream.clone())
                    .push(" AND");
                push_workload_match(&mut q, &m);
            }
            RevocationKind::Workload => {
                let Ok(m) = workload() else { continue };
                q.push(" AND");
                push_workload_match(&mut q, &m);
            }
            // Leaked values are refused before any credential is used.
            _ => continue,
        }
        q.push(" GROUP BY workload, upstream, credential_id");
        let rows = q.build().fetch_all(store.pool()).await?;
        if rows.is_empty() {
            continue;
        }
        // The latest acknowledgement per workload.
        let mut acked: BTreeMap<String, i64> = BTreeMap::new();
        for (session, at) in store.acks_for(stored.revoke_seq).await? {
            let e = acked.entry(session.spiffe_id).or_insert(at);
            *e = (*e).max(at);
        }
        for row in rows {
            let workload: String = row.get("workload");
            let last_seen_ms: i64 = row.get("last_seen_ms");
            let acknowledged_at_ms = acked.get(&workload).copied();
            out.push(UseAfterRevocation {
                revocation_id: r.id.clone(),
                kind: r.kind().as_str().to_owned(),
                revoked_at_ms: r.revoked_at_ms,
                upstream: row.get("upstream"),
                credential_id: row.get("credential_id"),
                requests: row.get("requests"),
                violation: acknowledged_at_ms.is_none_or(|a| last_seen_ms > a),
                acknowledged_at_ms,
                last_seen_ms,
                workload,
            });
        }
    }
    Ok(out)
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

    #[tokio::test]
    async fn a_resent_batch_is_not_counted_twice() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("data"), None).await.unwrap();
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
    }

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
