//! Versions of brokered upstream secrets (`secret_versions`), encrypted
//! under the master key, and their revocation.

use leash_api::v1::Revocation;

use super::revocations::insert_revocation_in;
use super::{Store, StoreError};

/// One version of a brokered secret, as stored: encrypted.
#[derive(Clone, sqlx::FromRow)]
pub struct SecretVersion {
    pub upstream: String,
    pub version: i64,
    pub nonce: Vec<u8>,
    pub ciphertext: Vec<u8>,
    pub created_at_ms: i64,
    pub created_by: String,
    pub revoked_at_ms: Option<i64>,
}

impl Store {
    pub async fn next_secret_version(&self, upstream: &str) -> Result<i64, StoreError> {
        let max: Option<i64> = db!(&self.pool, |p| sqlx::query_scalar(
            self.sql("SELECT MAX(version) FROM secret_versions WHERE upstream = ?")
        )
        .bind(upstream)
        .fetch_one(p)
        .await)?;
        Ok(max.unwrap_or(0) + 1)
    }

    pub async fn insert_secret_version(&self, v: &SecretVersion) -> Result<(), StoreError> {
        db!(&self.pool, |p| {
            sqlx::query(
            self.sql("INSERT INTO secret_versions (upstream, version, nonce, ciphertext, created_at_ms, created_by) VALUES (?, ?, ?, ?, ?, ?)"),
        )
        .bind(&v.upstream)
        .bind(v.version)
        .bind(&v.nonce)
        .bind(&v.ciphertext)
        .bind(v.created_at_ms)
        .bind(&v.created_by)
        .execute(p)
        .await
        .map(drop)
        })?;
        Ok(())
    }

    /// Versions of an upstream's secret, newest first.
    pub async fn secret_versions(&self, upstream: &str) -> Result<Vec<SecretVersion>, StoreError> {
        Ok(db!(&self.pool, |p| {
            sqlx::query_as(
            self.sql("SELECT upstream, version, nonce, ciphertext, created_at_ms, created_by, revoked_at_ms FROM secret_versions \
             WHERE upstream = ? ORDER BY version DESC"),
        )
        .bind(upstream)
        .fetch_all(p)
        .await
        })?)
    }

    /// One version, revoked or not.
    pub async fn secret_version(
        &self,
        upstream: &str,
        version: i64,
    ) -> Result<Option<SecretVersion>, StoreError> {
        Ok(db!(&self.pool, |p| {
            sqlx::query_as(
            self.sql("SELECT upstream, version, nonce, ciphertext, created_at_ms, created_by, revoked_at_ms FROM secret_versions \
             WHERE upstream = ? AND version = ?"),
        )
        .bind(upstream)
        .bind(version)
        .fetch_optional(p)
        .await
        })?)
    }

    /// The newest version, revoked or not: revoking it never makes an older
    /// one current again (a new version must be put).
    pub async fn current_secret_version(
        &self,
        upstream: &str,
    ) -> Result<Option<SecretVersion>, StoreError> {
        Ok(self.secret_versions(upstream).await?.into_iter().next())
    }

    /// Marks a version revoked and commits `revocation` (of its lease) in
    /// the same transaction: neither without the other. Returns the
    /// revocation's sequence, or `None` (nothing written) if the version does
    /// not exist or already was revoked.
    pub async fn revoke_secret_version(
        &self,
        upstream: &str,
        version: i64,
        revocation: &Revocation,
    ) -> Result<Option<u64>, StoreError> {
        let mut tx = self.write().await?;
        let sql = self.sql(
            "UPDATE secret_versions SET revoked_at_ms = ? WHERE upstream = ? AND version = ? AND revoked_at_ms IS NULL",
        );
        let n = tx!(&mut tx, |c| sqlx::query(sql)
            .bind(revocation.revoked_at_ms)
            .bind(upstream)
            .bind(version)
            .execute(c)
            .await
            .map(|done| done.rows_affected()))?;
        if n != 1 {
            tx.rollback().await?;
            return Ok(None);
        }
        let seq = insert_revocation_in(&mut tx, revocation).await?;
        tx.commit().await?;
        Ok(Some(seq))
    }
}
