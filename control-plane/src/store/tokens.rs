//! Admin API tokens (`admin_tokens`): only a hash of each secret is kept.

use super::{Store, StoreError};

/// An admin API token; only a hash of its secret is kept.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct TokenRecord {
    pub id: String,
    pub name: String,
    pub role: String,
    pub secret_sha256: Vec<u8>,
    pub created_at_ms: i64,
    pub created_by: String,
}

impl Store {
    pub async fn insert_token(&self, t: &TokenRecord) -> Result<(), StoreError> {
        db!(&self.pool, |p| {
            sqlx::query(self.sql("INSERT INTO admin_tokens (id, name, role, secret_sha256, created_at_ms, created_by) VALUES (?, ?, ?, ?, ?, ?)"))
            .bind(&t.id)
            .bind(&t.name)
            .bind(&t.role)
            .bind(&t.secret_sha256)
            .bind(t.created_at_ms)
            .bind(&t.created_by)
            .execute(p)
            .await
            .map(drop)
        })?;
        Ok(())
    }

    pub async fn token(&self, id: &str) -> Result<Option<TokenRecord>, StoreError> {
        Ok(db!(&self.pool, |p| {
            sqlx::query_as(self.sql("SELECT id, name, role, secret_sha256, created_at_ms, created_by FROM admin_tokens WHERE id = ?"))
            .bind(id)
            .fetch_optional(p)
            .await
        })?)
    }

    pub async fn token_count(&self) -> Result<i64, StoreError> {
        Ok(db!(&self.pool, |p| sqlx::query_scalar(
            self.sql("SELECT COUNT(*) FROM admin_tokens")
        )
        .fetch_one(p)
        .await)?)
    }
}
