//! Metadata of issued credentials (`credentials`): never the secret itself.

use super::{Store, StoreError};

/// Metadata of one issued credential; never the secret itself.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct CredentialRecord {
    pub id: String,
    pub workload: String,
    pub upstream: String,
    pub kind: String,
    pub issued_at_ms: i64,
    pub expires_at_ms: i64,
}

impl Store {
    /// Records an issued credential (never its value). A lease handed out
    /// again under the same id (a static secret version, a cached OAuth2
    /// token) keeps its first record, with the latest expiry.
    pub async fn record_credential(&self, c: &CredentialRecord) -> Result<(), StoreError> {
        let sql = self.sql(format!(
            "INSERT INTO credentials (id, workload, upstream, kind, issued_at_ms, expires_at_ms) VALUES (?, ?, ?, ?, ?, ?) \
             ON CONFLICT (id) DO UPDATE SET expires_at_ms = {}(credentials.expires_at_ms, excluded.expires_at_ms)",
            self.backend().greatest()
        ));
        db!(&self.pool, |p| sqlx::query(sql)
            .bind(&c.id)
            .bind(&c.workload)
            .bind(&c.upstream)
            .bind(&c.kind)
            .bind(c.issued_at_ms)
            .bind(c.expires_at_ms)
            .execute(p)
            .await
            .map(drop))?;
        Ok(())
    }

    pub async fn credential(&self, id: &str) -> Result<Option<CredentialRecord>, StoreError> {
        Ok(db!(&self.pool, |p| {
            sqlx::query_as(self.sql("SELECT id, workload, upstream, kind, issued_at_ms, expires_at_ms FROM credentials WHERE id = ?"))
            .bind(id)
            .fetch_optional(p)
            .await
        })?)
    }

    /// Credentials issued to `workload`, newest first.
    pub async fn credentials_for(
        &self,
        workload: &str,
    ) -> Result<Vec<CredentialRecord>, StoreError> {
        Ok(db!(&self.pool, |p| {
            sqlx::query_as(self.sql("SELECT id, workload, upstream, kind, issued_at_ms, expires_at_ms FROM credentials WHERE workload = ? ORDER BY issued_at_ms DESC"))
            .bind(workload)
            .fetch_all(p)
            .await
        })?)
    }
}
