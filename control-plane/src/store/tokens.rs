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

/// An upstream's access token as shared between replicas.
#[derive(Clone)]
pub struct SharedToken {
    pub id: String,
    pub token: zeroize::Zeroizing<String>,
    pub use_until_ms: i64,
}

const TOKEN_PURPOSE: &str = "oauth2-token";

impl Store {
    /// The access token stored for `upstream`, if any (and if this store
    /// has the master key that sealed it).
    pub async fn shared_token(&self, upstream: &str) -> Result<Option<SharedToken>, StoreError> {
        let Some(key) = &self.master_key else {
            return Ok(None);
        };
        let row: Option<(String, Vec<u8>, i64)> = db!(&self.pool, |p| sqlx::query_as(
            self.sql("SELECT token_id, sealed, use_until_ms FROM oauth2_tokens WHERE upstream = ?")
        )
        .bind(upstream)
        .fetch_optional(p)
        .await)?;
        let Some((id, sealed, use_until_ms)) = row else {
            return Ok(None);
        };
        let opened = key.open_key(TOKEN_PURPOSE, &id, &sealed).ok_or_else(|| {
            StoreError::Corrupt(format!(
                "oauth2_tokens.sealed of {upstream} cannot be opened with this master key"
            ))
        })?;
        let token = String::from_utf8(opened.to_vec()).map_err(|_| {
            StoreError::Corrupt(format!("oauth2_tokens.sealed of {upstream} is not text"))
        })?;
        Ok(Some(SharedToken {
            id,
            token: zeroize::Zeroizing::new(token),
            use_until_ms,
        }))
    }

    /// Stores `t` as `upstream`'s access token for every replica (sealed;
    /// nothing is stored without the master key).
    pub async fn put_shared_token(
        &self,
        upstream: &str,
        t: &SharedToken,
    ) -> Result<(), StoreError> {
        let Some(key) = &self.master_key else {
            return Ok(());
        };
        let sealed = key.seal_key(TOKEN_PURPOSE, &t.id, t.token.as_bytes());
        db!(&self.pool, |p| {
            sqlx::query(self.sql(
            "INSERT INTO oauth2_tokens (upstream, token_id, sealed, use_until_ms) VALUES (?, ?, ?, ?) \
             ON CONFLICT (upstream) DO UPDATE SET token_id = excluded.token_id, \
             sealed = excluded.sealed, use_until_ms = excluded.use_until_ms"
        ))
        .bind(upstream)
        .bind(&t.id)
        .bind(sealed)
        .bind(t.use_until_ms)
        .execute(p)
        .await
        .map(drop)
        })?;
        Ok(())
    }

    /// Drops the shared token whose id is `id` (it was revoked).
    pub async fn forget_shared_token(&self, id: &str) -> Result<(), StoreError> {
        db!(&self.pool, |p| sqlx::query(
            self.sql("DELETE FROM oauth2_tokens WHERE token_id = ?")
        )
        .bind(id)
        .execute(p)
        .await
        .map(drop))?;
        Ok(())
    }
}
