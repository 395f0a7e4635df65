//! Control-plane replicas on one store (`replicas`) and the sidecar sessions
//! each holds: what a responder asking any replica sees as connected and
//! pending is the whole fleet's, not only that replica's.

use super::{Store, StoreError, unsigned};

/// A replica, as registered and last seen.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ReplicaRow {
    pub id: String,
    pub version: String,
    pub sidecar_addr: String,
    pub admin_addr: String,
    pub started_at_ms: i64,
    pub seen_at_ms: i64,
    pub stopped_at_ms: Option<i64>,
}

/// A session open on a live replica, with its newest acknowledgement as
/// recorded.
#[derive(Debug, Clone)]
pub struct OpenSession {
    pub id: String,
    pub spiffe_id: String,
    pub version: String,
    pub connected_at_ms: i64,
    pub replica_id: String,
    /// When its replica last read the store: the session was alive then.
    pub replica_seen_at_ms: i64,
    pub last_ack_seq: u64,
    pub last_ack_at_ms: i64,
}

#[derive(sqlx::FromRow)]
struct OpenSessionRow {
    id: String,
    spiffe_id: String,
    version: String,
    connected_at_ms: i64,
    replica_id: String,
    replica_seen_at_ms: i64,
    last_ack_seq: i64,
    last_ack_at_ms: i64,
}

impl Store {
    pub async fn register_replica(&self, r: &ReplicaRow) -> Result<(), StoreError> {
        db!(&self.pool, |p| {
            sqlx::query(self.sql(
            "INSERT INTO replicas (id, version, sidecar_addr, admin_addr, started_at_ms, seen_at_ms) \
             VALUES (?, ?, ?, ?, ?, ?)"
        ))
        .bind(&r.id)
        .bind(&r.version)
        .bind(&r.sidecar_addr)
        .bind(&r.admin_addr)
        .bind(r.started_at_ms)
        .bind(r.seen_at_ms)
        .execute(p)
        .await
        .map(drop)
        })?;
        Ok(())
    }

    /// The replica `id` is alive and reading the store at `at_ms`.
    pub async fn replica_seen(&self, id: &str, at_ms: i64) -> Result<(), StoreError> {
        db!(&self.pool, |p| sqlx::query(self.sql(
            "UPDATE replicas SET seen_at_ms = ? WHERE id = ? AND stopped_at_ms IS NULL"
        ))
        .bind(at_ms)
        .bind(id)
        .execute(p)
        .await
        .map(drop))?;
        Ok(())
    }

    /// The replica `id` stopped (its sessions were ended one by one).
    pub async fn replica_stopped(&self, id: &str, at_ms: i64) -> Result<(), StoreError> {
        db!(&self.pool, |p| sqlx::query(
            self.sql("UPDATE replicas SET stopped_at_ms = ? WHERE id = ?")
        )
        .bind(at_ms)
        .bind(id)
        .execute(p)
        .await
        .map(drop))?;
        Ok(())
    }

    /// Every replica that ran in the last `since_ms`, newest first.
    pub async fn replicas(&self, since_ms: i64) -> Result<Vec<ReplicaRow>, StoreError> {
        Ok(db!(&self.pool, |p| {
            sqlx::query_as(self.sql(
            "SELECT id, version, sidecar_addr, admin_addr, started_at_ms, seen_at_ms, stopped_at_ms \
             FROM replicas WHERE seen_at_ms >= ? ORDER BY started_at_ms DESC, id"
        ))
        .bind(since_ms)
        .fetch_all(p)
        .await
        })?)
    }

    /// Sessions open on replicas other than `me` that were seen at or after
    /// `live_since_ms` and have not stopped, with each one's newest
    /// recorded acknowledgement.
    pub async fn open_sessions_elsewhere(
        &self,
        me: &str,
        live_since_ms: i64,
    ) -> Result<Vec<OpenSession>, StoreError> {
        let rows: Vec<OpenSessionRow> = db!(&self.pool, |p| {
            sqlx::query_as(self.sql(
            "SELECT s.id, s.spiffe_id, s.version, s.connected_at_ms, s.replica_id, \
             r.seen_at_ms AS replica_seen_at_ms, \
             COALESCE((SELECT MAX(a.to_seq) FROM acks a WHERE a.session_id = s.id), 0) AS last_ack_seq, \
             COALESCE((SELECT MAX(a.acked_at_ms) FROM acks a WHERE a.session_id = s.id), 0) AS last_ack_at_ms \
             FROM sessions s JOIN replicas r ON r.id = s.replica_id \
             WHERE s.disconnected_at_ms IS NULL AND s.replica_id <> ? \
             AND r.stopped_at_ms IS NULL AND r.seen_at_ms >= ? \
             ORDER BY s.connected_at_ms, s.id"
        ))
        .bind(me)
        .bind(live_since_ms)
        .fetch_all(p)
        .await
        })?;
        rows.into_iter()
            .map(|r| {
                Ok(OpenSession {
                    last_ack_seq: unsigned("acks.to_seq", r.last_ack_seq)?,
                    id: r.id,
                    spiffe_id: r.spiffe_id,
                    version: r.version,
                    connected_at_ms: r.connected_at_ms,
                    replica_id: r.replica_id,
                    replica_seen_at_ms: r.replica_seen_at_ms,
                    last_ack_at_ms: r.last_ack_at_ms,
                })
            })
            .collect()
    }

    /// Ends, as of `at_ms`, the sessions still open on replicas that are
    /// gone (stopped, or not seen since `live_since_ms`: killed), other
    /// than `me`. Returns how many.
    pub async fn end_sessions_of_gone_replicas(
        &self,
        me: &str,
        live_since_ms: i64,
        at_ms: i64,
    ) -> Result<u64, StoreError> {
        Ok(db!(&self.pool, |p| sqlx::query(self.sql(
            "UPDATE sessions SET disconnected_at_ms = ? WHERE disconnected_at_ms IS NULL \
             AND replica_id <> ? AND replica_id NOT IN \
             (SELECT id FROM replicas WHERE stopped_at_ms IS NULL AND seen_at_ms >= ?)"
        ))
        .bind(at_ms)
        .bind(me)
        .bind(live_since_ms)
        .execute(p)
        .await
        .map(|done| done.rows_affected()))?)
    }
}
