//! What the sidecars report, at rest: usage per minute bucket and the
//! batches it came in (`usage`, `usage_batches`), leaked-value sightings
//! (`leak_sightings`), stripped and echoed credentials.

use leash_api::policy::WorkloadMatcher;
use leash_api::v1::UsageBatch;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use sqlx::{Database, Encode, Type};

use super::{Store, StoreError, i64_of, now_ms};

/// Usage is stored in buckets of this width (of the batch's first use).
pub const BUCKET_MS: i64 = 60_000;

/// One (leaked value, workload, upstream, place) seen, with how often and when.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, utoipa::ToSchema, sqlx::FromRow)]
pub struct Sighting {
    pub revocation_id: String,
    pub workload: String,
    pub upstream: String,
    pub host: String,
    pub location: String,
    pub count: i64,
    pub first_seen_ms: i64,
    pub last_seen_ms: i64,
}

/// Requests in one step of a usage timeline.
#[derive(
    Debug,
    Clone,
    PartialEq,
    Eq,
    serde::Serialize,
    serde::Deserialize,
    sqlx::FromRow,
    utoipa::ToSchema,
)]
pub struct TimelinePoint {
    /// Start of the step, Unix ms.
    pub at_ms: i64,
    pub requests: i64,
    /// Of which answered 5xx or failed.
    pub errors: i64,
}

/// A workload that sent its own credential to a managed upstream (the
/// sidecar stripped it): how often since first seen, and when.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, sqlx::FromRow)]
pub struct Stripped {
    pub workload: String,
    pub upstream: String,
    pub count: i64,
    pub first_seen_ms: i64,
    pub last_seen_ms: i64,
}

/// Which usage a query covers. Times are Unix milliseconds.
#[derive(Debug, Default, Clone)]
pub struct UsageFilter {
    pub credential: Option<String>,
    pub workload: Option<String>,
    pub upstream: Option<String>,
    pub since_ms: Option<i64>,
    pub until_ms: Option<i64>,
}

impl UsageFilter {
    fn push_where<DB: Database>(&self, q: &mut sqlx::QueryBuilder<DB>)
    where
        String: for<'q> Encode<'q, DB> + Type<DB>,
        i64: for<'q> Encode<'q, DB> + Type<DB>,
    {
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

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, ToSchema, sqlx::FromRow)]
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

/// One edge of the dependency map: this workload calls this upstream.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, ToSchema, sqlx::FromRow)]
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

/// How long the credentials one workload used for one upstream were in
/// use: per credential, its last use minus its first (within the window).
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct CredentialSpan {
    pub upstream: String,
    pub workload: String,
    /// The longest span of any one credential.
    pub longest_span_ms: i64,
    /// Distinct credentials used.
    pub credentials: i64,
    pub requests: i64,
}

/// Which usage a revocation covers (see `Store::usage_after`).
#[derive(Debug, Clone)]
pub enum UsageScope {
    Credential(String),
    Upstream(String),
    Grant {
        upstream: String,
        workload: WorkloadMatcher,
    },
    Workload(WorkloadMatcher),
}

/// Usage of one (workload, upstream, credential) after a time.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct UsedAfter {
    pub workload: String,
    pub upstream: String,
    pub credential_id: String,
    pub requests: i64,
    pub last_seen_ms: i64,
}

/// SQL condition selecting the workloads a matcher matches.
fn push_workload_match<DB: Database>(q: &mut sqlx::QueryBuilder<DB>, m: &WorkloadMatcher)
where
    String: for<'q> Encode<'q, DB> + Type<DB>,
    i64: for<'q> Encode<'q, DB> + Type<DB>,
{
    match m {
        WorkloadMatcher::Exact(id) => {
            q.push(" workload = ").push_bind(id.clone());
        }
        WorkloadMatcher::Prefix(prefix) => {
            // Compared as a substring, not with LIKE: no escaping to get wrong.
            q.push(" (length(workload) > ")
                .push_bind(i64::try_from(prefix.len()).unwrap_or(i64::MAX))
                // An INTEGER for PostgreSQL's substr (it has no BIGINT form).
                .push(" AND substr(workload, 1, CAST(")
                .push_bind(i64::try_from(prefix.len()).unwrap_or(i64::MAX))
                .push(" AS INTEGER)) = ")
                .push_bind(prefix.clone())
                .push(")");
        }
    }
}

impl Store {
    /// Stores a batch once: the batch row and its counts commit together, so
    /// a resent batch (same sidecar process, same sequence) changes nothing.
    /// False if it was stored before.
    pub async fn record_usage(
        &self,
        sidecar_id: &str,
        workload: &str,
        batch: &UsageBatch,
        requests: u64,
    ) -> Result<bool, StoreError> {
        let mut tx = self.write().await?;
        let sql = self.sql(
            "INSERT INTO usage_batches (sidecar_id, batch_seq, workload, received_at_ms, requests, dropped_requests, dropped_records) \
             VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
        );
        let inserted = tx!(&mut tx, |c| sqlx::query(sql)
            .bind(sidecar_id)
            .bind(i64_of(batch.batch_seq))
            .bind(workload)
            .bind(now_ms())
            .bind(i64_of(requests))
            .bind(i64_of(batch.dropped_requests))
            .bind(i64_of(batch.dropped_records))
            .execute(c)
            .await
            .map(|done| done.rows_affected()))?;
        if inserted == 0 {
            return Ok(false);
        }
        // The counts add up in the row of their bucket; first and last seen
        // widen (SQLite's two-argument MIN/MAX, PostgreSQL's LEAST/GREATEST).
        let on_conflict = format!(
            " ON CONFLICT (bucket_ms, workload, upstream, credential_id, method, status_class) DO UPDATE SET \
             requests = usage.requests + excluded.requests, bytes_sent = usage.bytes_sent + excluded.bytes_sent, \
             bytes_received = usage.bytes_received + excluded.bytes_received, \
             first_seen_ms = {least}(usage.first_seen_ms, excluded.first_seen_ms), \
             last_seen_ms = {greatest}(usage.last_seen_ms, excluded.last_seen_ms)",
            least = self.backend().least(),
            greatest = self.backend().greatest(),
        );
        for chunk in batch.records.chunks(100) {
            tx!(&mut tx, |c| {
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
                        .push_bind(leash_api::usage::method_name(r.method).unwrap_or_default())
                        .push_bind(
                            leash_api::usage::status_class_name(r.status_class).unwrap_or_default(),
                        )
                        .push_bind(i64_of(r.requests))
                        .push_bind(i64_of(r.bytes_sent))
                        .push_bind(i64_of(r.bytes_received))
                        .push_bind(r.first_seen_ms)
                        .push_bind(r.last_seen_ms);
                });
                q.push(&on_conflict);
                q.build().execute(c).await.map(drop)
            })?;
        }
        tx.commit().await?;
        Ok(true)
    }

    // Sums are cast to BIGINT: PostgreSQL sums BIGINTs as NUMERIC (SQLite's
    // integer sum is unchanged by the cast).

    /// Usage grouped by workload, upstream, credential, method and status
    /// class (at most 10,000 rows).
    pub async fn usage_rows(&self, f: &UsageFilter) -> Result<Vec<UsageRow>, StoreError> {
        Ok(db!(&self.pool, |p| {
            let mut q = sqlx::QueryBuilder::new(
                "SELECT workload, upstream, credential_id, credential_kind, method, status_class, \
                 CAST(SUM(requests) AS BIGINT) AS requests, CAST(SUM(bytes_sent) AS BIGINT) AS bytes_sent, \
                 CAST(SUM(bytes_received) AS BIGINT) AS bytes_received, \
                 MIN(first_seen_ms) AS first_seen_ms, MAX(last_seen_ms) AS last_seen_ms FROM usage",
            );
            f.push_where(&mut q);
            q.push(
                " GROUP BY workload, upstream, credential_id, credential_kind, method, status_class \
                 ORDER BY workload, upstream, last_seen_ms DESC, method, status_class LIMIT 10000",
            );
            q.build_query_as().fetch_all(p).await
        })?)
    }

    /// Requests the sidecars counted but dropped, by the batches' arrival
    /// (the filter's workload and time range; credential and upstream are
    /// not known for them).
    pub async fn dropped_requests(&self, f: &UsageFilter) -> Result<i64, StoreError> {
        Ok(db!(&self.pool, |p| {
            let mut d = sqlx::QueryBuilder::new(
                "SELECT CAST(COALESCE(SUM(dropped_requests), 0) AS BIGINT) FROM usage_batches WHERE 1 = 1",
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
            d.build_query_scalar().fetch_one(p).await
        })?)
    }

    /// The dependency map: usage grouped by workload, upstream and kind.
    pub async fn usage_edges(&self, f: &UsageFilter) -> Result<Vec<Edge>, StoreError> {
        Ok(db!(&self.pool, |p| {
            let mut q = sqlx::QueryBuilder::new(
                "SELECT workload, upstream, credential_kind, CAST(SUM(requests) AS BIGINT) AS requests, \
                 COUNT(DISTINCT credential_id) AS credentials, \
                 CAST(SUM(CASE WHEN status_class IN ('5xx', 'error') THEN requests ELSE 0 END) AS BIGINT) AS errors, \
                 MIN(first_seen_ms) AS first_seen_ms, MAX(last_seen_ms) AS last_used_ms FROM usage",
            );
            f.push_where(&mut q);
            q.push(" GROUP BY workload, upstream, credential_kind ORDER BY workload, upstream");
            q.build_query_as().fetch_all(p).await
        })?)
    }

    /// Requests (and errors) over time, in steps of `step_ms` (a multiple of
    /// [`BUCKET_MS`]), oldest first.
    pub async fn usage_timeline(
        &self,
        f: &UsageFilter,
        step_ms: i64,
    ) -> Result<Vec<TimelinePoint>, StoreError> {
        Ok(db!(&self.pool, |p| {
            let mut q = sqlx::QueryBuilder::new("SELECT (bucket_ms / ");
            q.push_bind(step_ms)
                .push(") * ")
                .push_bind(step_ms)
                .push(
                    " AS at_ms, CAST(SUM(requests) AS BIGINT) AS requests, \
                     CAST(SUM(CASE WHEN status_class IN ('5xx', 'error') THEN requests ELSE 0 END) AS BIGINT) AS errors \
                     FROM usage",
                );
            f.push_where(&mut q);
            q.push(" GROUP BY 1 ORDER BY 1 LIMIT 10000");
            q.build_query_as().fetch_all(p).await
        })?)
    }

    /// The last use of `upstream` by any workload `workload` matches.
    pub async fn last_use(
        &self,
        upstream: &str,
        workload: &WorkloadMatcher,
    ) -> Result<Option<i64>, StoreError> {
        Ok(db!(&self.pool, |p| {
            let mut q = sqlx::QueryBuilder::new(
                "SELECT MAX(last_seen_ms) AS last_used FROM usage WHERE upstream = ",
            );
            q.push_bind(upstream.to_owned()).push(" AND");
            push_workload_match(&mut q, workload);
            q.build_query_scalar().fetch_one(p).await
        })?)
    }

    /// Per upstream and workload, how long each credential was in use
    /// (its buckets seen at or after `since_ms`).
    pub async fn credential_spans(&self, since_ms: i64) -> Result<Vec<CredentialSpan>, StoreError> {
        let sql = self.sql(
            "SELECT upstream, workload, MAX(span) AS longest_span_ms, COUNT(*) AS credentials, \
             CAST(SUM(requests) AS BIGINT) AS requests FROM ( \
               SELECT upstream, workload, credential_id, MAX(last_seen_ms) - MIN(first_seen_ms) AS span, \
               SUM(requests) AS requests FROM usage WHERE last_seen_ms >= ? \
               GROUP BY upstream, workload, credential_id) AS spans \
             GROUP BY upstream, workload ORDER BY upstream, workload",
        );
        Ok(db!(&self.pool, |p| sqlx::query_as(sql)
            .bind(since_ms)
            .fetch_all(p)
            .await)?)
    }

    /// Usage in `scope` seen after `after_ms` (and begun before `until_ms`,
    /// if given), per workload, upstream and credential.
    pub async fn usage_after(
        &self,
        scope: &UsageScope,
        after_ms: i64,
        until_ms: Option<i64>,
    ) -> Result<Vec<UsedAfter>, StoreError> {
        Ok(db!(&self.pool, |p| {
            let mut q = sqlx::QueryBuilder::new(
                "SELECT workload, upstream, credential_id, CAST(SUM(requests) AS BIGINT) AS requests, \
                 MAX(last_seen_ms) AS last_seen_ms FROM usage WHERE last_seen_ms > ",
            );
            q.push_bind(after_ms);
            if let Some(until) = until_ms {
                q.push(" AND first_seen_ms < ").push_bind(until);
            }
            match scope {
                UsageScope::Credential(id) => {
                    q.push(" AND credential_id = ").push_bind(id.clone());
                }
                UsageScope::Upstream(upstream) => {
                    q.push(" AND upstream = ").push_bind(upstream.clone());
                }
                UsageScope::Grant { upstream, workload } => {
                    q.push(" AND upstream = ")
                        .push_bind(upstream.clone())
                        .push(" AND");
                    push_workload_match(&mut q, workload);
                }
                UsageScope::Workload(workload) => {
                    q.push(" AND");
                    push_workload_match(&mut q, workload);
                }
            }
            q.push(" GROUP BY workload, upstream, credential_id");
            q.build_query_as().fetch_all(p).await
        })?)
    }

    /// Counts one sighting of a leaked value.
    /// Records one sighting; `true` when it is the first of its (leaked
    /// value, workload, upstream, host, location).
    pub async fn record_sighting(&self, s: &Sighting) -> Result<bool, StoreError> {
        let sql = self.sql(format!(
            "INSERT INTO leak_sightings (revocation_id, workload, upstream, host, location, count, first_seen_ms, last_seen_ms) \
             VALUES (?, ?, ?, ?, ?, 1, ?, ?) ON CONFLICT (revocation_id, workload, upstream, host, location) \
             DO UPDATE SET count = leak_sightings.count + 1, \
             last_seen_ms = {}(leak_sightings.last_seen_ms, excluded.last_seen_ms) \
             RETURNING count",
            self.backend().greatest()
        ));
        let count: i64 = db!(&self.pool, |p| sqlx::query_scalar(sql)
            .bind(&s.revocation_id)
            .bind(&s.workload)
            .bind(&s.upstream)
            .bind(&s.host)
            .bind(&s.location)
            .bind(s.first_seen_ms)
            .bind(s.last_seen_ms)
            .fetch_one(p)
            .await)?;
        Ok(count == 1)
    }

    pub async fn sightings(&self, revocation_id: &str) -> Result<Vec<Sighting>, StoreError> {
        Ok(db!(&self.pool, |p| {
            sqlx::query_as(
            self.sql("SELECT revocation_id, workload, upstream, host, location, count, first_seen_ms, last_seen_ms \
             FROM leak_sightings WHERE revocation_id = ? ORDER BY last_seen_ms DESC"),
        )
        .bind(revocation_id)
        .fetch_all(p)
        .await
        })?)
    }

    pub async fn record_stripped(
        &self,
        workload: &str,
        upstream: &str,
        count: u64,
        at_ms: i64,
    ) -> Result<(), StoreError> {
        db!(&self.pool, |p| {
            sqlx::query(
            self.sql("INSERT INTO stripped_credentials (workload, upstream, count, first_seen_ms, last_seen_ms) VALUES (?, ?, ?, ?, ?) \
             ON CONFLICT (workload, upstream) DO UPDATE SET count = stripped_credentials.count + excluded.count, last_seen_ms = excluded.last_seen_ms"),
        )
        .bind(workload)
        .bind(upstream)
        .bind(i64_of(count))
        .bind(at_ms)
        .bind(at_ms)
        .execute(p)
        .await
        .map(drop)
        })?;
        Ok(())
    }

    pub async fn record_echo(
        &self,
        workload: &str,
        upstream: &str,
        header: &str,
        count: u64,
        at_ms: i64,
    ) -> Result<(), StoreError> {
        db!(&self.pool, |p| {
            sqlx::query(
            self.sql("INSERT INTO echoed_credentials (workload, upstream, header, count, first_seen_ms, last_seen_ms) VALUES (?, ?, ?, ?, ?, ?) \
             ON CONFLICT (workload, upstream, header) DO UPDATE SET count = echoed_credentials.count + excluded.count, last_seen_ms = excluded.last_seen_ms"),
        )
        .bind(workload)
        .bind(upstream)
        .bind(header)
        .bind(i64_of(count))
        .bind(at_ms)
        .bind(at_ms)
        .execute(p)
        .await
        .map(drop)
        })?;
        Ok(())
    }

    /// (workload, upstream, header, count, last seen), most recent first.
    pub async fn echoes(&self) -> Result<Vec<(String, String, String, i64, i64)>, StoreError> {
        Ok(db!(&self.pool, |p| {
            sqlx::query_as(
            self.sql("SELECT workload, upstream, header, count, last_seen_ms FROM echoed_credentials ORDER BY last_seen_ms DESC"),
        )
        .fetch_all(p)
        .await
        })?)
    }

    /// Stripped credentials last seen at or after `since_ms` (all when
    /// None), most recent first.
    pub async fn stripped(&self, since_ms: Option<i64>) -> Result<Vec<Stripped>, StoreError> {
        Ok(db!(&self.pool, |p| {
            sqlx::query_as(
            self.sql("SELECT workload, upstream, count, first_seen_ms, last_seen_ms FROM stripped_credentials \
             WHERE last_seen_ms >= ? ORDER BY last_seen_ms DESC"),
        )
        .bind(since_ms.unwrap_or(i64::MIN))
        .fetch_all(p)
        .await
        })?)
    }
}
