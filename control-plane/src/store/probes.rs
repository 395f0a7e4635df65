//! Results of deactivation probes (`deactivation_probes`): what a provider
//! answered when sent a revoked secret version, newest first.

use sqlx::Row as _;

use super::{Store, StoreError};

/// One probe of a revoked secret version at its provider.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct ProbeResult {
    pub upstream: String,
    pub version: i64,
    /// When the probe was sent (Unix ms).
    pub at_ms: i64,
    /// The provider's HTTP status; null when it did not answer.
    pub status: Option<u16>,
    /// `dead` (the status is one the policy expects: refused), `alive`
    /// (any other status: the provider may still accept the value) or
    /// `error` (no answer).
    pub outcome: String,
    /// Why, in words; never holds the value.
    pub detail: String,
}

impl Store {
    pub async fn insert_probe_result(&self, r: &ProbeResult) -> Result<(), StoreError> {
        db!(&self.pool, |p| {
            sqlx::query(
            self.sql("INSERT INTO deactivation_probes (upstream, version, at_ms, status, outcome, detail) VALUES (?, ?, ?, ?, ?, ?)"),
        )
        .bind(&r.upstream)
        .bind(r.version)
        .bind(r.at_ms)
        .bind(r.status.map(i64::from))
        .bind(&r.outcome)
        .bind(&r.detail)
        .execute(p)
        .await
        .map(drop)
        })?;
        Ok(())
    }

    /// The probes of one secret version, newest first.
    pub async fn probe_results(
        &self,
        upstream: &str,
        version: i64,
    ) -> Result<Vec<ProbeResult>, StoreError> {
        let sql = self.sql(
            "SELECT upstream, version, at_ms, status, outcome, detail FROM deactivation_probes \
             WHERE upstream = ? AND version = ? ORDER BY at_ms DESC, id DESC",
        );
        db!(&self.pool, |p| {
            let rows = sqlx::query(sql)
                .bind(upstream)
                .bind(version)
                .fetch_all(p)
                .await?;
            rows.iter()
                .map(|row| {
                    let status: Option<i64> = row.try_get("status")?;
                    let status = status
                        .map(|s| {
                            u16::try_from(s).map_err(|_| {
                                StoreError::Corrupt(format!(
                                    "deactivation_probes.status {s} is not an HTTP status"
                                ))
                            })
                        })
                        .transpose()?;
                    Ok(ProbeResult {
                        upstream: row.try_get("upstream")?,
                        version: row.try_get("version")?,
                        at_ms: row.try_get("at_ms")?,
                        status,
                        outcome: row.try_get("outcome")?,
                        detail: row.try_get("detail")?,
                    })
                })
                .collect()
        })
    }
}
