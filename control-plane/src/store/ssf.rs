//! Security Event Tokens received (`ssf_events`): the replay record.

use super::{Store, StoreError};

impl Store {
    /// Records a SET as received; `false` when its (issuer, jti) was
    /// received before (a replay), on this replica or another.
    pub async fn record_ssf_event(
        &self,
        issuer: &str,
        jti: &str,
        event_type: &str,
        at_ms: i64,
    ) -> Result<bool, StoreError> {
        let done = db!(&self.pool, |p| {
            sqlx::query(self.sql(
            "INSERT INTO ssf_events (issuer, jti, event_type, received_at_ms) VALUES (?, ?, ?, ?) \
             ON CONFLICT (issuer, jti) DO NOTHING"
        ))
        .bind(issuer)
        .bind(jti)
        .bind(event_type)
        .bind(at_ms)
        .execute(p)
        .await
        .map(|r| r.rows_affected())
        })?;
        Ok(done == 1)
    }

    /// The revocation a received SET became.
    pub async fn set_ssf_revocation(
        &self,
        issuer: &str,
        jti: &str,
        revocation_id: &str,
    ) -> Result<(), StoreError> {
        db!(&self.pool, |p| sqlx::query(self.sql(
            "UPDATE ssf_events SET revocation_id = ? WHERE issuer = ? AND jti = ?"
        ))
        .bind(revocation_id)
        .bind(issuer)
        .bind(jti)
        .execute(p)
        .await
        .map(drop))?;
        Ok(())
    }

    /// Forgets a received SET that could not take effect (the transmitter
    /// may send it again).
    pub async fn forget_ssf_event(&self, issuer: &str, jti: &str) -> Result<(), StoreError> {
        db!(&self.pool, |p| sqlx::query(self.sql(
            "DELETE FROM ssf_events WHERE issuer = ? AND jti = ? AND revocation_id IS NULL"
        ))
        .bind(issuer)
        .bind(jti)
        .execute(p)
        .await
        .map(drop))?;
        Ok(())
    }
}

/// A received SET as recorded.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct SsfEvent {
    pub event_type: String,
    pub received_at_ms: i64,
    pub revocation_id: Option<String>,
}

impl Store {
    pub async fn ssf_event(&self, issuer: &str, jti: &str) -> Result<Option<SsfEvent>, StoreError> {
        Ok(db!(&self.pool, |p| {
            sqlx::query_as(self.sql(
            "SELECT event_type, received_at_ms, revocation_id FROM ssf_events WHERE issuer = ? AND jti = ?"
        ))
        .bind(issuer)
        .bind(jti)
        .fetch_optional(p)
        .await
        })?)
    }
}
