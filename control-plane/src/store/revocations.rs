//! The revocation log at rest: revocations (`revocations`), their monotonic
//! sequence (`revocation_events`), sidecar sessions (`sessions`) and their
//! acknowledgements (`acks`).

use super::{Store, StoreError, Tx, i64_of, unhex, unsigned};
use leash_api::revocation::RevocationKind;
use leash_api::v1::Revocation;

/// A revocation as stored, with its sequence and restore, if any.
#[derive(Debug, Clone)]
pub struct StoredRevocation {
    pub revocation: Revocation,
    pub revoke_seq: u64,
    pub restored: Option<Restore>,
}

#[derive(Debug, Clone)]
pub struct Restore {
    pub by: String,
    pub reason: String,
    pub at_ms: i64,
    pub seq: u64,
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct SessionRecord {
    pub id: String,
    pub spiffe_id: String,
    pub version: String,
    pub connected_at_ms: i64,
}

#[derive(Debug, Clone)]
pub struct AckRecord {
    pub session_id: String,
    pub from_seq: u64,
    pub to_seq: u64,
    pub acked_at_ms: i64,
}

const REVOCATION_SELECT: &str = "SELECT id, kind, workload, upstream, credential_id, reason, revoked_by, revoked_at_ms, \
     revoke_seq, restored_by, restore_reason, restored_at_ms, restore_seq, fingerprint FROM revocations";

/// A `revocations` row as read.
#[derive(sqlx::FromRow)]
struct RevocationRow {
    id: String,
    kind: String,
    workload: String,
    upstream: String,
    credential_id: String,
    reason: String,
    revoked_by: String,
    revoked_at_ms: i64,
    revoke_seq: i64,
    restored_by: Option<String>,
    restore_reason: Option<String>,
    restored_at_ms: Option<i64>,
    restore_seq: Option<i64>,
    /// Hex of the keyed fingerprint (leaked values), empty otherwise.
    fingerprint: String,
}

impl TryFrom<RevocationRow> for StoredRevocation {
    type Error = StoreError;

    fn try_from(r: RevocationRow) -> Result<Self, StoreError> {
        let restored = match r.restore_seq {
            Some(seq) => Some(Restore {
                by: r.restored_by.unwrap_or_default(),
                reason: r.restore_reason.unwrap_or_default(),
                at_ms: r.restored_at_ms.unwrap_or(0),
                seq: unsigned("revocations.restore_seq", seq)?,
            }),
            None => None,
        };
        let kind = RevocationKind::parse(&r.kind).ok_or_else(|| {
            StoreError::Corrupt(format!(
                "revocations.kind of {}: unknown kind {:?}",
                r.id, r.kind
            ))
        })?;
        Ok(StoredRevocation {
            revoke_seq: unsigned("revocations.revoke_seq", r.revoke_seq)?,
            restored,
            revocation: Revocation {
                fingerprint: unhex("revocations.fingerprint", &r.id, &r.fingerprint)?,
                id: r.id,
                kind: kind.into(),
                workload: r.workload,
                upstream: r.upstream,
                credential_id: r.credential_id,
                reason: r.reason,
                revoked_by: r.revoked_by,
                revoked_at_ms: r.revoked_at_ms,
            },
        })
    }
}

/// A `revocation_events` row joined with its revocation.
#[derive(sqlx::FromRow)]
struct EventRow {
    event_seq: i64,
    event_restored: bool,
    #[sqlx(flatten)]
    revocation: RevocationRow,
}

/// An acknowledgement joined with its session.
#[derive(sqlx::FromRow)]
struct AckRow {
    #[sqlx(flatten)]
    session: SessionRecord,
    acked_at_ms: i64,
}

/// The PostgreSQL channel notified (with the sequence) at each committed
/// change: other replicas wake up and read the change from the table. A
/// notification is only a wake-up: one missed (a replica reconnecting) is
/// made up by reading every sequence after the last one applied.
pub const CHANGES_CHANNEL: &str = "leash_revocations";

/// What inserting a revocation did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inserted {
    /// Committed with this sequence.
    New(u64),
    /// Nothing committed: this active revocation (committed by any replica)
    /// already says the same.
    Existing(String),
}

/// Appends the event of a revocation (restored or not) in `tx`; returns
/// its sequence. The next sequence is one more than the newest: never a
/// gap, as sidecars apply events in order and resync on a gap. SQLite's
/// AUTOINCREMENT gives that (a rolled-back insert takes its number back);
/// a PostgreSQL sequence would not (a rolled-back `nextval` is gone), so
/// there the number is the newest plus one, read under the write lock.
async fn insert_event_in(
    tx: &mut Tx,
    revocation_id: &str,
    restored: bool,
    at_ms: i64,
) -> Result<i64, StoreError> {
    Ok(match tx {
        Tx::Sqlite(t) => sqlx::query(
            "INSERT INTO revocation_events (revocation_id, restored, at_ms) VALUES (?, ?, ?)",
        )
        .bind(revocation_id)
        .bind(restored)
        .bind(at_ms)
        .execute(&mut **t)
        .await?
        .last_insert_rowid(),
        Tx::Postgres(t) => {
            let seq: i64 = sqlx::query_scalar(
                "INSERT INTO revocation_events (seq, revocation_id, restored, at_ms) \
                 SELECT COALESCE(MAX(seq), 0) + 1, $1, $2, $3 FROM revocation_events RETURNING seq",
            )
            .bind(revocation_id)
            .bind(restored)
            .bind(at_ms)
            .fetch_one(&mut **t)
            .await?;
            // Delivered at commit, to every replica listening.
            sqlx::query("SELECT pg_notify($1, $2)")
                .bind(CHANGES_CHANNEL)
                .bind(seq.to_string())
                .execute(&mut **t)
                .await?;
            seq
        }
    })
}

/// Inserts a revocation and its event in `tx`; returns the event's sequence.
pub(super) async fn insert_revocation_in(tx: &mut Tx, r: &Revocation) -> Result<u64, StoreError> {
    let seq = insert_event_in(tx, &r.id, false, r.revoked_at_ms).await?;
    let sql = tx.backend().sql(
        "INSERT INTO revocations (id, kind, workload, upstream, credential_id, reason, revoked_by, revoked_at_ms, revoke_seq, fingerprint) \
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
    );
    tx!(tx, |c| sqlx::query(sql)
        .bind(&r.id)
        .bind(r.kind().as_str())
        .bind(&r.workload)
        .bind(&r.upstream)
        .bind(&r.credential_id)
        .bind(&r.reason)
        .bind(&r.revoked_by)
        .bind(r.revoked_at_ms)
        .bind(seq)
        .bind(hex::encode(&r.fingerprint))
        .execute(c)
        .await
        .map(drop))?;
    unsigned("revocation_events.seq", seq)
}

/// The active revocation that says what `r` says (same kind and target,
/// or the same leaked value), read in `tx`: under the write lock, so that
/// two replicas asked the same at once commit it once.
async fn active_duplicate_in(tx: &mut Tx, r: &Revocation) -> Result<Option<String>, StoreError> {
    let kind = r.kind();
    let sql = if kind == RevocationKind::Leaked {
        "SELECT id FROM revocations WHERE kind = ? AND fingerprint = ? AND restore_seq IS NULL LIMIT 1"
    } else {
        "SELECT id FROM revocations WHERE kind = ? AND workload = ? AND upstream = ? AND credential_id = ? \
         AND restore_seq IS NULL LIMIT 1"
    };
    let sql = tx.backend().sql(sql);
    Ok(tx!(tx, |c| {
        let q = sqlx::query_scalar(sql).bind(kind.as_str());
        let q = if kind == RevocationKind::Leaked {
            q.bind(hex::encode(&r.fingerprint))
        } else {
            q.bind(&r.workload).bind(&r.upstream).bind(&r.credential_id)
        };
        q.fetch_optional(c).await
    })?)
}

impl Store {
    /// Commits a new revocation and its event, unless an active one says
    /// the same already.
    pub async fn insert_revocation(&self, r: &Revocation) -> Result<Inserted, StoreError> {
        let mut tx = self.write().await?;
        if let Some(existing) = active_duplicate_in(&mut tx, r).await? {
            tx.rollback().await?;
            return Ok(Inserted::Existing(existing));
        }
        let seq = insert_revocation_in(&mut tx, r).await?;
        tx.commit().await?;
        Ok(Inserted::New(seq))
    }

    /// Commits the restore of an active revocation; returns the event's sequence,
    /// or `None` if it was not active.
    pub async fn restore_revocation(
        &self,
        id: &str,
        by: &str,
        reason: &str,
        at_ms: i64,
    ) -> Result<Option<u64>, StoreError> {
        let mut tx = self.write().await?;
        let seq = insert_event_in(&mut tx, id, true, at_ms).await?;
        let sql = self.sql(
            "UPDATE revocations SET restored_by = ?, restore_reason = ?, restored_at_ms = ?, restore_seq = ? \
             WHERE id = ? AND restore_seq IS NULL",
        );
        let updated = tx!(&mut tx, |c| sqlx::query(sql)
            .bind(by)
            .bind(reason)
            .bind(at_ms)
            .bind(seq)
            .bind(id)
            .execute(c)
            .await
            .map(|done| done.rows_affected()))?;
        if updated == 0 {
            tx.rollback().await?;
            return Ok(None);
        }
        tx.commit().await?;
        Ok(Some(unsigned("revocation_events.seq", seq)?))
    }

    pub async fn revocation(&self, id: &str) -> Result<Option<StoredRevocation>, StoreError> {
        let row: Option<RevocationRow> = db!(&self.pool, |p| sqlx::query_as(
            self.sql(format!("{REVOCATION_SELECT} WHERE id = ?"))
        )
        .bind(id)
        .fetch_optional(p)
        .await)?;
        row.map(StoredRevocation::try_from).transpose()
    }

    /// All revocations, newest first; only the active ones if `active_only`.
    pub async fn revocations(
        &self,
        active_only: bool,
    ) -> Result<Vec<StoredRevocation>, StoreError> {
        let filter = if active_only {
            " WHERE restore_seq IS NULL"
        } else {
            ""
        };
        let rows: Vec<RevocationRow> = db!(&self.pool, |p| sqlx::query_as(self.sql(format!(
            "{REVOCATION_SELECT}{filter} ORDER BY revoke_seq DESC"
        )))
        .fetch_all(p)
        .await)?;
        rows.into_iter().map(StoredRevocation::try_from).collect()
    }

    /// Active credential revocations whose credential expired before
    /// `before_ms`: no sidecar can use it any more, so enforcing them is
    /// dead weight (the record stays, for the audit trail and `usage`).
    pub async fn expired_credential_revocations(
        &self,
        before_ms: i64,
    ) -> Result<Vec<String>, StoreError> {
        Ok(db!(&self.pool, |p| sqlx::query_scalar(self.sql(
            "SELECT r.id FROM revocations r JOIN credentials c ON c.id = r.credential_id \
             WHERE r.kind = 'credential' AND r.restore_seq IS NULL AND c.expires_at_ms < ?"
        ),)
        .bind(before_ms)
        .fetch_all(p)
        .await)?)
    }

    /// The newest sequence committed (0 if none).
    pub async fn current_seq(&self) -> Result<u64, StoreError> {
        let seq: Option<i64> = db!(&self.pool, |p| sqlx::query_scalar(
            self.sql("SELECT MAX(seq) FROM revocation_events")
        )
        .fetch_one(p)
        .await)?;
        seq.map_or(Ok(0), |s| unsigned("revocation_events.seq", s))
    }

    /// The changes after `after`, in order, as (seq, revocation, restored).
    pub async fn events_after(
        &self,
        after: u64,
    ) -> Result<Vec<(u64, StoredRevocation, bool)>, StoreError> {
        let rows: Vec<EventRow> = db!(&self.pool, |p| {
            sqlx::query_as(
            self.sql("SELECT e.seq AS event_seq, e.restored AS event_restored, r.id, r.kind, r.workload, r.upstream, r.credential_id, \
             r.reason, r.revoked_by, r.revoked_at_ms, r.revoke_seq, r.restored_by, r.restore_reason, r.restored_at_ms, r.restore_seq, r.fingerprint \
             FROM revocation_events e JOIN revocations r ON r.id = e.revocation_id WHERE e.seq > ? ORDER BY e.seq"),
        )
        .bind(i64_of(after))
        .fetch_all(p)
        .await
        })?;
        rows.into_iter()
            .map(|r| {
                Ok((
                    unsigned("revocation_events.seq", r.event_seq)?,
                    StoredRevocation::try_from(r.revocation)?,
                    r.event_restored,
                ))
            })
            .collect()
    }

    /// Records a session opened on replica `replica_id`.
    pub async fn insert_session(
        &self,
        s: &SessionRecord,
        replica_id: &str,
    ) -> Result<(), StoreError> {
        db!(&self.pool, |p| {
            sqlx::query(self.sql(
            "INSERT INTO sessions (id, spiffe_id, version, connected_at_ms, replica_id) VALUES (?, ?, ?, ?, ?)"
        ),)
        .bind(&s.id)
        .bind(&s.spiffe_id)
        .bind(&s.version)
        .bind(s.connected_at_ms)
        .bind(replica_id)
        .execute(p)
        .await
        .map(drop)
        })?;
        Ok(())
    }

    pub async fn end_session(&self, id: &str, at_ms: i64) -> Result<(), StoreError> {
        db!(&self.pool, |p| sqlx::query(self.sql(
            "UPDATE sessions SET disconnected_at_ms = ? WHERE id = ?"
        ))
        .bind(at_ms)
        .bind(id)
        .execute(p)
        .await
        .map(drop))?;
        Ok(())
    }

    /// Records acknowledgements in one transaction, many rows per statement
    /// (a revocation acknowledged by a thousand sidecars is a thousand rows).
    pub async fn insert_acks(&self, acks: &[AckRecord]) -> Result<(), StoreError> {
        let mut tx = self.write().await?;
        for chunk in acks.chunks(200) {
            tx!(&mut tx, |c| {
                let mut q = sqlx::QueryBuilder::new(
                    "INSERT INTO acks (session_id, from_seq, to_seq, acked_at_ms) ",
                );
                q.push_values(chunk, |mut row, a| {
                    row.push_bind(&a.session_id)
                        .push_bind(i64_of(a.from_seq))
                        .push_bind(i64_of(a.to_seq))
                        .push_bind(a.acked_at_ms);
                });
                q.push(" ON CONFLICT DO NOTHING");
                q.build().execute(c).await.map(drop)
            })?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Sessions that acknowledged `seq`, with when.
    pub async fn acks_for(&self, seq: u64) -> Result<Vec<(SessionRecord, i64)>, StoreError> {
        let rows: Vec<AckRow> = db!(&self.pool, |p| {
            sqlx::query_as(
            self.sql("SELECT s.id, s.spiffe_id, s.version, s.connected_at_ms, a.acked_at_ms FROM acks a \
             JOIN sessions s ON s.id = a.session_id WHERE a.from_seq < ? AND a.to_seq >= ? ORDER BY a.acked_at_ms"),
        )
        .bind(i64_of(seq))
        .bind(i64_of(seq))
        .fetch_all(p)
        .await
        })?;
        Ok(rows
            .into_iter()
            .map(|r| (r.session, r.acked_at_ms))
            .collect())
    }
}
