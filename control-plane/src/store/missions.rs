//! Remediation missions (`missions`, `mission_findings`,
//! `mission_changes`): what a mission groups and every change of its state.
//! The criteria are not stored: they are computed from runtime data each
//! time (`crate::missions`).

use super::{Store, StoreError, Tx};

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct MissionRow {
    pub id: String,
    pub objective: String,
    pub owner: String,
    pub deadline_ms: Option<i64>,
    pub window_ms: i64,
    pub state: String,
    pub closed_by_hand: bool,
    pub created_at_ms: i64,
    pub created_by: String,
    pub changed_at_ms: i64,
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct FindingRow {
    pub seq: i64,
    /// The finding as JSON.
    pub finding: String,
    /// Its metadata as JSON.
    pub note: String,
    pub added_at_ms: i64,
    pub added_by: String,
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct MissionChange {
    pub at_ms: i64,
    pub state: String,
    pub reason: String,
    pub actor: String,
}

impl Store {
    /// Creates a mission with its first findings and its first change, in
    /// one transaction.
    pub async fn insert_mission(
        &self,
        m: &MissionRow,
        findings: &[(String, String)],
    ) -> Result<(), StoreError> {
        let mut tx = self.write().await?;
        let sql = self.sql(
            "INSERT INTO missions (id, objective, owner, deadline_ms, window_ms, state, closed_by_hand, \
             created_at_ms, created_by, changed_at_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        );
        tx!(&mut tx, |c| sqlx::query(sql)
            .bind(&m.id)
            .bind(&m.objective)
            .bind(&m.owner)
            .bind(m.deadline_ms)
            .bind(m.window_ms)
            .bind(&m.state)
            .bind(m.closed_by_hand)
            .bind(m.created_at_ms)
            .bind(&m.created_by)
            .bind(m.changed_at_ms)
            .execute(c)
            .await
            .map(drop))?;
        insert_findings(&mut tx, &m.id, findings, m.created_at_ms, &m.created_by).await?;
        insert_change(
            &mut tx,
            &m.id,
            m.created_at_ms,
            "open",
            "created",
            &m.created_by,
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    pub async fn mission(&self, id: &str) -> Result<Option<MissionRow>, StoreError> {
        Ok(db!(&self.pool, |p| sqlx::query_as(self.sql(
            "SELECT id, objective, owner, deadline_ms, window_ms, state, closed_by_hand, \
                 created_at_ms, created_by, changed_at_ms FROM missions WHERE id = ?"
        ),)
        .bind(id)
        .fetch_optional(p)
        .await)?)
    }

    /// Every mission, newest first.
    pub async fn missions(&self) -> Result<Vec<MissionRow>, StoreError> {
        Ok(db!(&self.pool, |p| sqlx::query_as(self.sql(
            "SELECT id, objective, owner, deadline_ms, window_ms, state, closed_by_hand, \
             created_at_ms, created_by, changed_at_ms FROM missions ORDER BY created_at_ms DESC, id"
        ),)
        .fetch_all(p)
        .await)?)
    }

    /// Adds findings (one already in the mission is left as it is).
    /// Returns how many were new.
    pub async fn add_findings(
        &self,
        mission_id: &str,
        findings: &[(String, String)],
        at_ms: i64,
        by: &str,
    ) -> Result<usize, StoreError> {
        let mut tx = self.write().await?;
        let added = insert_findings(&mut tx, mission_id, findings, at_ms, by).await?;
        tx.commit().await?;
        Ok(added)
    }

    pub async fn findings(&self, mission_id: &str) -> Result<Vec<FindingRow>, StoreError> {
        Ok(db!(&self.pool, |p| sqlx::query_as(self.sql(
            "SELECT seq, finding, note, added_at_ms, added_by FROM mission_findings \
             WHERE mission_id = ? ORDER BY seq"
        ),)
        .bind(mission_id)
        .fetch_all(p)
        .await)?)
    }

    /// Moves a mission to `state` and records why, in one transaction.
    pub async fn change_mission(
        &self,
        mission_id: &str,
        state: &str,
        by_hand: bool,
        reason: &str,
        actor: &str,
        at_ms: i64,
    ) -> Result<(), StoreError> {
        let mut tx = self.write().await?;
        let sql = self.sql(
            "UPDATE missions SET state = ?, closed_by_hand = ?, changed_at_ms = ? WHERE id = ?",
        );
        tx!(&mut tx, |c| sqlx::query(sql)
            .bind(state)
            .bind(by_hand)
            .bind(at_ms)
            .bind(mission_id)
            .execute(c)
            .await
            .map(drop))?;
        insert_change(&mut tx, mission_id, at_ms, state, reason, actor).await?;
        tx.commit().await?;
        Ok(())
    }

    /// A mission's changes of state, oldest first.
    pub async fn mission_changes(
        &self,
        mission_id: &str,
    ) -> Result<Vec<MissionChange>, StoreError> {
        Ok(db!(&self.pool, |p| sqlx::query_as(self.sql(
            "SELECT at_ms, state, reason, actor FROM mission_changes WHERE mission_id = ? \
             ORDER BY at_ms, rowid"
        ),)
        .bind(mission_id)
        .fetch_all(p)
        .await)?)
    }
}

async fn insert_findings(
    tx: &mut Tx,
    mission_id: &str,
    findings: &[(String, String)],
    at_ms: i64,
    by: &str,
) -> Result<usize, StoreError> {
    let mut added = 0;
    let b = tx.backend();
    for (finding, note) in findings {
        let next: i64 = tx!(&mut *tx, |c| sqlx::query_scalar(b.sql(
            "SELECT COALESCE(MAX(seq), 0) + 1 FROM mission_findings WHERE mission_id = ?"
        ))
        .bind(mission_id)
        .fetch_one(c)
        .await)?;
        let done = tx!(&mut *tx, |c| {
            sqlx::query(b.sql(
            "INSERT INTO mission_findings (mission_id, seq, finding, note, added_at_ms, added_by) \
             VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (mission_id, finding) DO NOTHING",
        ))
        .bind(mission_id)
        .bind(next)
        .bind(finding)
        .bind(note)
        .bind(at_ms)
        .bind(by)
        .execute(c)
        .await
        .map(|done| done.rows_affected())
        })?;
        added += usize::try_from(done).unwrap_or(0);
    }
    Ok(added)
}

async fn insert_change(
    tx: &mut Tx,
    mission_id: &str,
    at_ms: i64,
    state: &str,
    reason: &str,
    actor: &str,
) -> Result<(), StoreError> {
    let sql = tx.backend().sql(
        "INSERT INTO mission_changes (mission_id, at_ms, state, reason, actor) VALUES (?, ?, ?, ?, ?)",
    );
    tx!(tx, |c| sqlx::query(sql)
        .bind(mission_id)
        .bind(at_ms)
        .bind(state)
        .bind(reason)
        .bind(actor)
        .execute(c)
        .await
        .map(drop))?;
    Ok(())
}
