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

/// A stream a receiver created through the stream configuration API.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct SsfStreamRow {
    pub stream_id: String,
    pub audience: String,
    /// `urn:ietf:rfc:8935` (push) or `urn:ietf:rfc:8936` (poll).
    pub delivery_method: String,
    /// The receiver's push endpoint; `None` for a poll stream.
    pub endpoint_url: Option<String>,
    /// SHA-256 of a poll stream's bearer token.
    pub poll_token_sha256: Option<Vec<u8>>,
    /// A JSON array of event-type URIs.
    pub events_requested: String,
    pub description: Option<String>,
    /// `enabled`, `paused` or `disabled`.
    pub status: String,
    pub reason: Option<String>,
    pub created_at_ms: i64,
    pub created_by: String,
}

const STREAM_COLUMNS: &str = "stream_id, audience, delivery_method, endpoint_url, \
     poll_token_sha256, events_requested, description, status, reason, created_at_ms, created_by";

impl Store {
    pub async fn ssf_streams(&self) -> Result<Vec<SsfStreamRow>, StoreError> {
        let sql =
            format!("SELECT {STREAM_COLUMNS} FROM ssf_streams ORDER BY created_at_ms, stream_id");
        Ok(db!(&self.pool, |p| sqlx::query_as(self.sql(sql))
            .fetch_all(p)
            .await)?)
    }

    pub async fn ssf_stream(&self, stream_id: &str) -> Result<Option<SsfStreamRow>, StoreError> {
        let sql = format!("SELECT {STREAM_COLUMNS} FROM ssf_streams WHERE stream_id = ?");
        Ok(db!(&self.pool, |p| sqlx::query_as(self.sql(sql))
            .bind(stream_id)
            .fetch_optional(p)
            .await)?)
    }

    /// Creates `s`, or (when `replace`) replaces the stream of that id;
    /// `false` when replacing a stream that does not exist.
    pub async fn put_ssf_stream(
        &self,
        s: &SsfStreamRow,
        replace: bool,
    ) -> Result<bool, StoreError> {
        let sql = if replace {
            "UPDATE ssf_streams SET audience = ?, delivery_method = ?, endpoint_url = ?, \
             poll_token_sha256 = ?, events_requested = ?, description = ?, status = ?, reason = ? \
             WHERE stream_id = ?"
        } else {
            "INSERT INTO ssf_streams (audience, delivery_method, endpoint_url, poll_token_sha256, \
             events_requested, description, status, reason, stream_id, created_at_ms, created_by) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
        };
        let done = db!(&self.pool, |p| {
            let q = sqlx::query(self.sql(sql))
                .bind(&s.audience)
                .bind(&s.delivery_method)
                .bind(&s.endpoint_url)
                .bind(&s.poll_token_sha256)
                .bind(&s.events_requested)
                .bind(&s.description)
                .bind(&s.status)
                .bind(&s.reason)
                .bind(&s.stream_id);
            let q = if replace {
                q
            } else {
                q.bind(s.created_at_ms).bind(&s.created_by)
            };
            q.execute(p).await.map(|r| r.rows_affected())
        })?;
        Ok(done == 1)
    }

    /// Deletes a stream and the SETs waiting on it; `false` when there was
    /// no such stream.
    pub async fn delete_ssf_stream(&self, stream_id: &str) -> Result<bool, StoreError> {
        db!(&self.pool, |p| sqlx::query(
            self.sql("DELETE FROM ssf_outbox WHERE stream_id = ?")
        )
        .bind(stream_id)
        .execute(p)
        .await
        .map(drop))?;
        let done = db!(&self.pool, |p| sqlx::query(
            self.sql("DELETE FROM ssf_streams WHERE stream_id = ?")
        )
        .bind(stream_id)
        .execute(p)
        .await
        .map(|r| r.rows_affected()))?;
        Ok(done == 1)
    }

    /// Holds a SET for a stream; `false` when the stream already holds
    /// `cap` SETs (the SET is not held).
    pub async fn hold_ssf_set(
        &self,
        stream_id: &str,
        jti: &str,
        set: &str,
        at_ms: i64,
        cap: i64,
    ) -> Result<bool, StoreError> {
        let held: i64 = db!(&self.pool, |p| sqlx::query_scalar(
            self.sql("SELECT COUNT(*) FROM ssf_outbox WHERE stream_id = ?")
        )
        .bind(stream_id)
        .fetch_one(p)
        .await)?;
        if held >= cap {
            return Ok(false);
        }
        db!(&self.pool, |p| sqlx::query(self.sql(
            "INSERT INTO ssf_outbox (stream_id, jti, set_jwt, created_at_ms) VALUES (?, ?, ?, ?) \
             ON CONFLICT (stream_id, jti) DO NOTHING"
        ))
        .bind(stream_id)
        .bind(jti)
        .bind(set)
        .bind(at_ms)
        .execute(p)
        .await
        .map(drop))?;
        Ok(true)
    }

    /// The oldest `max` SETs held for a stream, and whether more wait.
    pub async fn held_ssf_sets(
        &self,
        stream_id: &str,
        max: usize,
    ) -> Result<(Vec<(String, String)>, bool), StoreError> {
        let limit = i64::try_from(max.saturating_add(1)).unwrap_or(i64::MAX);
        let mut rows: Vec<(String, String)> = db!(&self.pool, |p| sqlx::query_as(self.sql(
            "SELECT jti, set_jwt FROM ssf_outbox WHERE stream_id = ? \
             ORDER BY created_at_ms, jti LIMIT ?"
        ))
        .bind(stream_id)
        .bind(limit)
        .fetch_all(p)
        .await)?;
        let more = rows.len() > max;
        rows.truncate(max);
        Ok((rows, more))
    }

    /// Lets go of held SETs (acknowledged, or reported in error, by the
    /// receiver; or pushed). Returns how many were held.
    pub async fn release_ssf_sets(
        &self,
        stream_id: &str,
        jtis: &[String],
    ) -> Result<u64, StoreError> {
        let mut released = 0;
        for jti in jtis {
            released += db!(&self.pool, |p| sqlx::query(
                self.sql("DELETE FROM ssf_outbox WHERE stream_id = ? AND jti = ?")
            )
            .bind(stream_id)
            .bind(jti)
            .execute(p)
            .await
            .map(|r| r.rows_affected()))?;
        }
        Ok(released)
    }
}

impl Store {
    /// The streams SETs are held for.
    pub async fn ssf_streams_holding(&self) -> Result<Vec<String>, StoreError> {
        Ok(db!(&self.pool, |p| sqlx::query_scalar(self.sql(
            "SELECT DISTINCT stream_id FROM ssf_outbox ORDER BY stream_id"
        ))
        .fetch_all(p)
        .await)?)
    }

    /// Drops the SETs held for `stream_id` before `before_ms`; how many.
    pub async fn drop_held_ssf_sets(
        &self,
        stream_id: &str,
        before_ms: i64,
    ) -> Result<u64, StoreError> {
        Ok(db!(&self.pool, |p| sqlx::query(self.sql(
            "DELETE FROM ssf_outbox WHERE stream_id = ? AND created_at_ms < ?"
        ))
        .bind(stream_id)
        .bind(before_ms)
        .execute(p)
        .await
        .map(|r| r.rows_affected()))?)
    }
}
