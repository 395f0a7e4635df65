//! The audit log (`audit`): append-only entries chained by hash, and the
//! signed anchors of the chain (`audit_anchors`).

use std::collections::BTreeMap;

use crate::anchor::SignedHead;

use super::{Backend, Store, StoreError, now_ms};

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, utoipa::ToSchema, sqlx::FromRow)]
pub struct AuditEntry {
    pub at_ms: i64,
    pub actor: String,
    pub role: String,
    pub method: String,
    pub path: String,
    pub action: String,
    #[sqlx(try_from = "i64")]
    pub status: u16,
    pub detail: String,
}

/// An `audit` row as the chain walk reads it: the status as stored, so
/// that one edited out of range is a broken entry, not a failed walk.
#[derive(sqlx::FromRow)]
struct ChainRow {
    id: i64,
    at_ms: i64,
    actor: String,
    role: String,
    method: String,
    path: String,
    action: String,
    status: i64,
    detail: String,
    prev_hash: Option<String>,
    hash: Option<String>,
}

impl Store {
    /// Appends an entry chained to the previous one (see `audit_hash`).
    pub async fn append_audit(&self, e: &AuditEntry) -> Result<(), StoreError> {
        // One append at a time: the newest entry cannot change between
        // reading it and inserting the next. In process, this lock queues
        // appends; the write transaction holds the database's write lock
        // (SQLite's, or the advisory lock on PostgreSQL, which also covers
        // another process on the same database). The entry and its anchor
        // commit together.
        let _one_at_a_time = self.audit_lock.lock().await;
        let mut tx = self.write().await?;
        let b = tx.backend();
        let last: Option<(i64, Option<String>)> = tx!(&mut tx, |c| sqlx::query_as(
            "SELECT id, hash FROM audit ORDER BY id DESC LIMIT 1"
        )
        .fetch_optional(c)
        .await)?;
        let (id, prev) = match last {
            Some((id, hash)) => (id + 1, hash.unwrap_or_default()),
            None => (1, String::new()),
        };
        let hash = audit_hash(&prev, id, e);
        tx!(&mut tx, |c| {
            sqlx::query(b.sql(
            "INSERT INTO audit (id, at_ms, actor, role, method, path, action, status, detail, prev_hash, hash) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
        ))
        .bind(id)
        .bind(e.at_ms)
        .bind(&e.actor)
        .bind(&e.role)
        .bind(&e.method)
        .bind(&e.path)
        .bind(&e.action)
        .bind(i64::from(e.status))
        .bind(&e.detail)
        .bind(&prev)
        .bind(&hash)
        .execute(c)
        .await
        .map(drop)
        })?;
        if id % crate::anchor::ANCHOR_EVERY == 0
            && let Some(key) = self.master_key.as_ref().and_then(|m| m.audit_anchor_key())
        {
            let head = SignedHead::sign(&key, id, &hash, e.at_ms);
            tx!(&mut tx, |c| {
                sqlx::query(b.sql(
                "INSERT INTO audit_anchors (id, hash, at_ms, public_key, signature) VALUES (?, ?, ?, ?, ?)"
            ))
            .bind(head.id)
            .bind(&head.hash)
            .bind(head.at_ms)
            .bind(&head.public_key)
            .bind(&head.signature)
            .execute(c)
            .await
            .map(drop)
            })?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// The current head of the chain, signed with the master key's anchor
    /// key (None without a master key or with an empty chain). Signed only
    /// if the chain verifies: a broken chain's head is never blessed.
    pub async fn signed_head(
        &self,
    ) -> Result<Result<Option<SignedHead>, AuditVerdict>, StoreError> {
        let verdict = self.verify_audit().await?;
        if !verdict.ok {
            return Ok(Err(verdict));
        }
        let (Some(key), Some(hash)) = (
            self.master_key.as_ref().and_then(|m| m.audit_anchor_key()),
            verdict.head.clone(),
        ) else {
            return Ok(Ok(None));
        };
        let id: i64 = db!(&self.pool, |p| sqlx::query_scalar(
            self.sql("SELECT MAX(id) FROM audit")
        )
        .fetch_one(p)
        .await)?;
        Ok(Ok(Some(SignedHead::sign(&key, id, &hash, now_ms()))))
    }

    /// The hash of audit entry `id`, if it exists.
    pub async fn audit_entry_hash(&self, id: i64) -> Result<Option<String>, StoreError> {
        Ok(db!(&self.pool, |p| sqlx::query_scalar::<_, Option<String>>(
            self.sql("SELECT hash FROM audit WHERE id = ?")
        )
        .bind(id)
        .fetch_optional(p)
        .await)?
        .flatten())
    }

    /// The stored anchors, by entry id.
    pub(super) async fn anchors(&self) -> Result<BTreeMap<i64, SignedHead>, StoreError> {
        let rows: Vec<(i64, String, i64, String, String)> =
            db!(&self.pool, |p| sqlx::query_as(self.sql(
                "SELECT id, hash, at_ms, public_key, signature FROM audit_anchors ORDER BY id"
            ),)
            .fetch_all(p)
            .await)?;
        Ok(rows
            .into_iter()
            .map(|(id, hash, at_ms, public_key, signature)| {
                let head = SignedHead {
                    id,
                    hash,
                    at_ms,
                    public_key,
                    signature,
                };
                (head.id, head)
            })
            .collect())
    }

    /// Walks the whole audit chain.
    pub async fn verify_audit(&self) -> Result<AuditVerdict, StoreError> {
        let rows: Vec<ChainRow> = db!(&self.pool, |p| {
            sqlx::query_as(self.sql("SELECT id, at_ms, actor, role, method, path, action, status, detail, prev_hash, hash FROM audit ORDER BY id"))
            .fetch_all(p)
            .await
        })?;
        let mut verdict = AuditVerdict::default();
        let anchors = self.anchors().await?;
        let anchor_key = self.master_key.as_ref().and_then(|m| m.audit_anchor_key());
        let mut prev: Option<String> = None;
        let mut last_id = 0;
        for r in rows {
            let id = r.id;
            let hash = r.hash;
            let Some(hash) = hash else {
                if prev.is_some() {
                    verdict.broken(id, "an entry without a hash inside the chain");
                    return Ok(verdict);
                }
                verdict.unchained += 1;
                last_id = id;
                continue;
            };
            let stored_prev = r.prev_hash.unwrap_or_default();
            if prev.is_none() && (!stored_prev.is_empty() || id != last_id + 1) {
                verdict.broken(id, "entries are missing before this one");
                return Ok(verdict);
            }
            if let Some(p) = &prev {
                if id != last_id + 1 {
                    verdict.broken(id, "entries are missing before this one");
                    return Ok(verdict);
                }
                if &stored_prev != p {
                    verdict.broken(id, "does not follow the entry before it");
                    return Ok(verdict);
                }
            }
            let Ok(status) = u16::try_from(r.status) else {
                verdict.broken(id, "its content does not match its hash");
                return Ok(verdict);
            };
            let entry = AuditEntry {
                at_ms: r.at_ms,
                actor: r.actor,
                role: r.role,
                method: r.method,
                path: r.path,
                action: r.action,
                status,
                detail: r.detail,
            };
            if audit_hash(&stored_prev, id, &entry) != hash {
                verdict.broken(id, "its content does not match its hash");
                return Ok(verdict);
            }
            if let Some(anchor) = anchors.get(&id) {
                let signed = match &anchor_key {
                    Some(key) => anchor.signed_by(key),
                    None => anchor.verify(),
                };
                if !signed || anchor.hash != hash {
                    verdict.broken(
                        id,
                        "the chain was rewritten: its signed anchor at this entry does not match",
                    );
                    return Ok(verdict);
                }
                verdict.anchors += 1;
            } else if id % crate::anchor::ANCHOR_EVERY == 0
                && anchors.keys().next().is_some_and(|first| *first < id)
            {
                verdict.broken(id, "the signed anchor at this entry was removed");
                return Ok(verdict);
            }
            verdict.chained += 1;
            prev = Some(hash);
            last_id = id;
        }
        if let Some((id, _)) = anchors.range(last_id + 1..).next() {
            verdict.broken(
                *id,
                "entries were cut off the end: a signed anchor names an entry that is gone",
            );
            return Ok(verdict);
        }
        verdict.ok = true;
        verdict.head = prev;
        verdict.head_id = (last_id > 0).then_some(last_id);
        Ok(verdict)
    }

    /// The newest `limit` audit entries, newest first.
    pub async fn audit(&self, limit: i64) -> Result<Vec<AuditEntry>, StoreError> {
        Ok(db!(&self.pool, |p| {
            sqlx::query_as(self.sql("SELECT at_ms, actor, role, method, path, action, status, detail FROM audit ORDER BY id DESC LIMIT ?"))
            .bind(limit)
            .fetch_all(p)
            .await
        })?)
    }
}

/// The outcome of walking the audit chain.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct AuditVerdict {
    pub ok: bool,
    /// Entries whose hash and link check out.
    pub chained: u64,
    /// Entries written before the chain existed (oldest first, no hash).
    pub unchained: u64,
    /// The first entry that fails, and why.
    pub first_bad_id: Option<i64>,
    pub problem: Option<String>,
    /// Hash of the newest entry: keep it elsewhere to detect truncation.
    pub head: Option<String>,
    /// Id of the newest entry.
    pub head_id: Option<i64>,
    /// Signed anchors checked along the chain.
    pub anchors: u64,
}

impl AuditVerdict {
    fn broken(&mut self, id: i64, why: &str) {
        self.first_bad_id = Some(id);
        self.problem = Some(why.to_owned());
    }
}

/// `hex(SHA-256(prev_hash "\n" JSON[id, at_ms, actor, role, method, path,
/// action, status, detail]))`: unambiguous whatever the fields contain.
pub fn audit_hash(prev: &str, id: i64, e: &AuditEntry) -> String {
    let body = serde_json::json!([
        id, e.at_ms, e.actor, e.role, e.method, e.path, e.action, e.status, e.detail
    ]);
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(prev.as_bytes());
    ctx.update(b"\n");
    ctx.update(body.to_string().as_bytes());
    hex::encode(ctx.finish())
}

/// An audit entry with its place in the chain.
#[derive(Debug, Clone, sqlx::FromRow, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct ChainedEntry {
    pub id: i64,
    #[sqlx(flatten)]
    #[serde(flatten)]
    pub entry: AuditEntry,
    /// The entry's hash in the chain (None: written before the chain).
    pub hash: Option<String>,
}

impl Store {
    /// Audit entries whose path or detail names any of `needles`, oldest
    /// first (at most 10,000).
    pub async fn audit_mentioning(
        &self,
        needles: &[String],
    ) -> Result<Vec<ChainedEntry>, StoreError> {
        if needles.is_empty() {
            return Ok(Vec::new());
        }
        // `instr` in SQLite is `strpos` in PostgreSQL: a substring test
        // with no LIKE escaping to get wrong.
        let find = match self.backend() {
            Backend::Sqlite => "instr",
            Backend::Postgres => "strpos",
        };
        Ok(db!(&self.pool, |p| {
            let mut q = sqlx::QueryBuilder::new(
                "SELECT id, at_ms, actor, role, method, path, action, status, detail, hash FROM audit WHERE FALSE",
            );
            for n in needles {
                q.push(format!(" OR {find}(path, "))
                    .push_bind(n.clone())
                    .push(format!(") > 0 OR {find}(detail, "))
                    .push_bind(n.clone())
                    .push(") > 0");
            }
            q.push(" ORDER BY id LIMIT 10000");
            q.build_query_as().fetch_all(p).await
        })?)
    }
}
