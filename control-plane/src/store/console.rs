//! Web console sessions (`console_sessions`): only a hash of each cookie's
//! secret is kept.

use super::{Store, StoreError};

/// A console session as stored.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ConsoleSession {
    pub id_sha256: String,
    pub token_id: String,
    pub csrf: String,
    pub created_at_ms: i64,
    pub expires_at_ms: i64,
    pub ended_at_ms: Option<i64>,
}

impl Store {
    pub async fn insert_console_session(&self, s: &ConsoleSession) -> Result<(), StoreError> {
        db!(&self.pool, |p| {
            sqlx::query(self.sql(
            "INSERT INTO console_sessions (id_sha256, token_id, csrf, created_at_ms, expires_at_ms) \
             VALUES (?, ?, ?, ?, ?)"
        ))
        .bind(&s.id_sha256)
        .bind(&s.token_id)
        .bind(&s.csrf)
        .bind(s.created_at_ms)
        .bind(s.expires_at_ms)
        .execute(p)
        .await
        .map(drop)
        })?;
        Ok(())
    }

    /// The session whose secret hashes to `id_sha256`, ended or not.
    pub async fn console_session(
        &self,
        id_sha256: &str,
    ) -> Result<Option<ConsoleSession>, StoreError> {
        Ok(db!(&self.pool, |p| sqlx::query_as(self.sql(
            "SELECT id_sha256, token_id, csrf, created_at_ms, expires_at_ms, ended_at_ms \
             FROM console_sessions WHERE id_sha256 = ?"
        ))
        .bind(id_sha256)
        .fetch_optional(p)
        .await)?)
    }

    /// Signs a session out (for good: its cookie is refused from then on).
    pub async fn end_console_session(&self, id_sha256: &str, at_ms: i64) -> Result<(), StoreError> {
        db!(&self.pool, |p| {
            sqlx::query(self.sql(
            "UPDATE console_sessions SET ended_at_ms = ? WHERE id_sha256 = ? AND ended_at_ms IS NULL"
        ))
        .bind(at_ms)
        .bind(id_sha256)
        .execute(p)
        .await
        .map(drop)
        })?;
        Ok(())
    }
}
