//! Durable state in embedded SQLite: signing keys and issued-credential
//! metadata. Writes use `synchronous = FULL` so that an answer given to a
//! caller survives a crash right after it.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use leash_api::v1::Revocation;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Row, SqlitePool};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot create data directory {path}: {source}")]
    DataDir {
        path: String,
        source: std::io::Error,
    },
    #[error("database error: {0}")]
    Db(#[from] sqlx::Error),
    #[error("stored data cannot be used: {0}")]
    Corrupt(String),
    #[error(
        "{path} is readable by group or others (mode {mode:o}); it holds keys and tokens: chmod {} {path}",
        if *mode & 0o100 != 0 { "700" } else { "600" }
    )]
    NotPrivate { path: String, mode: u32 },
}

/// How a sealed key stored as text starts (hex of the sealed bytes follows).
const SEALED_TEXT: &str = "sealed:";

fn seal_text(key: &crate::secrets::MasterKey, clear: &[u8]) -> String {
    format!(
        "{SEALED_TEXT}{}",
        hex(&key.seal_key("fingerprint", "fingerprint_key", clear))
    )
}

/// Schema migrations, applied in order; each runs once.
const MIGRATIONS: &[(i64, &str)] = &[
    (1, include_str!("migrations/0001_init.sql")),
    (2, include_str!("migrations/0002_revocations.sql")),
    (3, include_str!("migrations/0003_leaked.sql")),
    (4, include_str!("migrations/0004_secrets.sql")),
    (5, include_str!("migrations/0005_usage.sql")),
    (6, include_str!("migrations/0006_audit_chain.sql")),
    (7, include_str!("migrations/0007_echoes.sql")),
    (8, include_str!("migrations/0008_audit_anchors.sql")),
];

#[derive(Clone)]
pub struct Store {
    pool: SqlitePool,
    /// Audit entries are chained: one append at a time.
    audit_lock: std::sync::Arc<tokio::sync::Mutex<()>>,
    /// Seals the control plane's own keys (JWT signing keys, the leak
    /// fingerprint key) at rest. None only with `--insecure-dev`.
    master_key: Option<std::sync::Arc<crate::secrets::MasterKey>>,
}

/// Files of the data directory that must be readable by their owner only.
pub const PRIVATE_FILES: [&str; 4] = ["leash.db", "leash.db-wal", "leash.db-shm", "admin-token"];

/// Refuses a data directory (or one of its files) that others can read:
/// it holds the signing keys, tokens' hashes and the audit log.
fn check_private(data_dir: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::PermissionsExt as _;
    let paths =
        std::iter::once(data_dir.to_owned()).chain(PRIVATE_FILES.iter().map(|f| data_dir.join(f)));
    for path in paths {
        let Ok(meta) = std::fs::metadata(&path) else {
            continue;
        };
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(StoreError::NotPrivate {
                path: path.display().to_string(),
                mode,
            });
        }
    }
    Ok(())
}

/// A JWT signing key as stored (the private key is PKCS#8 DER).
pub struct StoredKey {
    pub kid: String,
    pub pkcs8: zeroize::Zeroizing<Vec<u8>>,
    pub created_at_ms: i64,
}

/// Metadata of one issued credential; never the secret itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CredentialRecord {
    pub id: String,
    pub workload: String,
    pub upstream: String,
    pub kind: String,
    pub issued_at_ms: i64,
    pub expires_at_ms: i64,
}

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

#[derive(Debug, Clone)]
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

/// An admin API token; only a hash of its secret is kept.
#[derive(Debug, Clone)]
pub struct TokenRecord {
    pub id: String,
    pub name: String,
    pub role: String,
    pub secret_sha256: Vec<u8>,
    pub created_at_ms: i64,
    pub created_by: String,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct AuditEntry {
    pub at_ms: i64,
    pub actor: String,
    pub role: String,
    pub method: String,
    pub path: String,
    pub action: String,
    pub status: u16,
    pub detail: String,
}

impl Store {
    pub(crate) fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    /// Opens (creating if needed) `<data_dir>/leash.db` and migrates it.
    /// Opens (or creates) the store in `data_dir`: the directory 0700 and
    /// the database 0600, refused if others can read them. With a master
    /// key, keys still stored in the clear (from an `--insecure-dev` run or
    /// an older version) are sealed at once.
    pub async fn open(
        data_dir: &Path,
        master_key: Option<std::sync::Arc<crate::secrets::MasterKey>>,
    ) -> Result<Self, StoreError> {
        use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
        let dir_error = |source| StoreError::DataDir {
            path: data_dir.display().to_string(),
            source,
        };
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(data_dir)
            .map_err(dir_error)?;
        check_private(data_dir)?;
        // Created 0600 before SQLite opens it; SQLite gives its WAL and
        // shared-memory files the database file's mode.
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(data_dir.join("leash.db"))
            .map_err(dir_error)?;
        let opts = SqliteConnectOptions::from_str("sqlite:")?
            .filename(data_dir.join("leash.db"))
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            // Deleted or rewritten content (a key sealed after the fact) is
            // overwritten, not left in free pages.
            .pragma("secure_delete", "on")
            .busy_timeout(Duration::from_secs(5));
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(opts)
            .await?;
        let store = Self {
            pool,
            audit_lock: std::sync::Arc::default(),
            master_key,
        };
        store.migrate().await?;
        store.seal_clear_keys().await?;
        Ok(store)
    }

    /// Seals keys stored in the clear, when there is a master key.
    async fn seal_clear_keys(&self) -> Result<(), StoreError> {
        let Some(key) = &self.master_key else {
            return Ok(());
        };
        let mut sealed = 0;
        let rows = sqlx::query("SELECT kid, pkcs8 FROM signing_keys")
            .fetch_all(&self.pool)
            .await?;
        for r in rows {
            let kid: String = r.get("kid");
            let stored = zeroize::Zeroizing::new(r.get::<Vec<u8>, _>("pkcs8"));
            if stored.starts_with(crate::secrets::SEALED_KEY) {
                continue;
            }
            sqlx::query("UPDATE signing_keys SET pkcs8 = ? WHERE kid = ?")
                .bind(key.seal_key("jwt-signing", &kid, &stored))
                .bind(&kid)
                .execute(&self.pool)
                .await?;
            sealed += 1;
        }
        let value: Option<String> =
            sqlx::query_scalar("SELECT value FROM store_meta WHERE key = 'fingerprint_key'")
                .fetch_optional(&self.pool)
                .await?;
        if let Some(value) = value.filter(|v| !v.starts_with(SEALED_TEXT)) {
            let clear = zeroize::Zeroizing::new(unhex(&value));
            sqlx::query("UPDATE store_meta SET value = ? WHERE key = 'fingerprint_key'")
                .bind(seal_text(key, &clear))
                .execute(&self.pool)
                .await?;
            sealed += 1;
        }
        if sealed > 0 {
            // The clear pages leave the write-ahead log too.
            sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
                .execute(&self.pool)
                .await?;
            tracing::info!(
                keys = sealed,
                "keys stored in the clear are now sealed under the master key"
            );
        }
        Ok(())
    }

    /// Opens a stored key: sealed ones need the master key.
    fn open_key(
        &self,
        purpose: &str,
        id: &str,
        stored: &[u8],
    ) -> Result<zeroize::Zeroizing<Vec<u8>>, StoreError> {
        if !stored.starts_with(crate::secrets::SEALED_KEY) {
            return Ok(zeroize::Zeroizing::new(stored.to_vec()));
        }
        let key = self.master_key.as_ref().ok_or_else(|| {
            StoreError::Corrupt(format!(
                "{purpose} key {id} is sealed under a master key and none was given"
            ))
        })?;
        key.open_key(purpose, id, stored).ok_or_else(|| {
            StoreError::Corrupt(format!(
                "{purpose} key {id} cannot be opened with this master key (a different one sealed it?)"
            ))
        })
    }

    async fn migrate(&self) -> Result<(), StoreError> {
        sqlx::query("CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, applied_at_ms INTEGER NOT NULL)")
            .execute(&self.pool)
            .await?;
        for (version, sql) in MIGRATIONS {
            let mut tx = self.pool.begin().await?;
            let done: Option<i64> =
                sqlx::query_scalar("SELECT version FROM schema_migrations WHERE version = ?")
                    .bind(version)
                    .fetch_optional(&mut *tx)
                    .await?;
            if done.is_none() {
                // Migrations are compile-time constants of this crate.
                sqlx::raw_sql(sqlx::AssertSqlSafe(*sql))
                    .execute(&mut *tx)
                    .await?;
                sqlx::query("INSERT INTO schema_migrations (version, applied_at_ms) VALUES (?, ?)")
                    .bind(version)
                    .bind(now_ms())
                    .execute(&mut *tx)
                    .await?;
            }
            tx.commit().await?;
        }
        Ok(())
    }

    /// Signing keys, newest first.
    pub async fn signing_keys(&self) -> Result<Vec<StoredKey>, StoreError> {
        let rows =
            sqlx::query("SELECT kid, pkcs8, created_at_ms FROM signing_keys ORDER BY rowid DESC")
                .fetch_all(&self.pool)
                .await?;
        rows.into_iter()
            .map(|r| {
                let kid: String = r.get("kid");
                let stored = zeroize::Zeroizing::new(r.get::<Vec<u8>, _>("pkcs8"));
                Ok(StoredKey {
                    pkcs8: self.open_key("jwt-signing", &kid, &stored)?,
                    kid,
                    created_at_ms: r.get("created_at_ms"),
                })
            })
            .collect()
    }

    pub async fn insert_signing_key(&self, key: &StoredKey) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO signing_keys (kid, alg, pkcs8, created_at_ms) VALUES (?, 'ES256', ?, ?)",
        )
        .bind(&key.kid)
        .bind(match &self.master_key {
            Some(m) => m.seal_key("jwt-signing", &key.kid, &key.pkcs8),
            None => key.pkcs8.to_vec(),
        })
        .bind(key.created_at_ms)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Records an issued credential (never its value). A lease handed out
    /// again under the same id (a static secret version, a cached OAuth2
    /// token) keeps its first record, with the latest expiry.
    pub async fn record_credential(&self, c: &CredentialRecord) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO credentials (id, workload, upstream, kind, issued_at_ms, expires_at_ms) VALUES (?, ?, ?, ?, ?, ?) \
             ON CONFLICT (id) DO UPDATE SET expires_at_ms = MAX(expires_at_ms, excluded.expires_at_ms)",
        )
            .bind(&c.id)
            .bind(&c.workload)
            .bind(&c.upstream)
            .bind(&c.kind)
            .bind(c.issued_at_ms)
            .bind(c.expires_at_ms)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn credential(&self, id: &str) -> Result<Option<CredentialRecord>, StoreError> {
        let row = sqlx::query("SELECT id, workload, upstream, kind, issued_at_ms, expires_at_ms FROM credentials WHERE id = ?")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.as_ref().map(credential_from_row))
    }

    /// Credentials issued to `workload`, newest first.
    pub async fn credentials_for(
        &self,
        workload: &str,
    ) -> Result<Vec<CredentialRecord>, StoreError> {
        let rows = sqlx::query("SELECT id, workload, upstream, kind, issued_at_ms, expires_at_ms FROM credentials WHERE workload = ? ORDER BY issued_at_ms DESC")
            .bind(workload)
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.iter().map(credential_from_row).collect())
    }

    /// This store's identity, created on first use.
    pub async fn store_id(&self) -> Result<String, StoreError> {
        let fresh = uuid::Uuid::new_v4().to_string();
        sqlx::query("INSERT OR IGNORE INTO store_meta (key, value) VALUES ('store_id', ?)")
            .bind(&fresh)
            .execute(&self.pool)
            .await?;
        Ok(
            sqlx::query_scalar("SELECT value FROM store_meta WHERE key = 'store_id'")
                .fetch_one(&self.pool)
                .await?,
        )
    }

    /// Commits a new revocation and its event; returns the event's sequence.
    pub async fn insert_revocation(&self, r: &Revocation) -> Result<u64, StoreError> {
        let mut tx = self.pool.begin().await?;
        let seq = sqlx::query(
            "INSERT INTO revocation_events (revocation_id, restored, at_ms) VALUES (?, 0, ?)",
        )
        .bind(&r.id)
        .bind(r.revoked_at_ms)
        .execute(&mut *tx)
        .await?
        .last_insert_rowid();
        sqlx::query(
            "INSERT INTO revocations (id, kind, workload, upstream, credential_id, reason, revoked_by, revoked_at_ms, revoke_seq, fingerprint) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(&r.id)
        .bind(r.kind().as_str())
        .bind(&r.workload)
        .bind(&r.upstream)
        .bind(&r.credential_id)
        .bind(&r.reason)
        .bind(&r.revoked_by)
        .bind(r.revoked_at_ms)
        .bind(seq)
        .bind(hex(&r.fingerprint))
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(u64::try_from(seq).unwrap_or(0))
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
        let mut tx = self.pool.begin().await?;
        let seq = sqlx::query(
            "INSERT INTO revocation_events (revocation_id, restored, at_ms) VALUES (?, 1, ?)",
        )
        .bind(id)
        .bind(at_ms)
        .execute(&mut *tx)
        .await?
        .last_insert_rowid();
        let updated = sqlx::query(
            "UPDATE revocations SET restored_by = ?, restore_reason = ?, restored_at_ms = ?, restore_seq = ? \
             WHERE id = ? AND restore_seq IS NULL",
        )
        .bind(by)
        .bind(reason)
        .bind(at_ms)
        .bind(seq)
        .bind(id)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if updated == 0 {
            tx.rollback().await?;
            return Ok(None);
        }
        tx.commit().await?;
        Ok(Some(u64::try_from(seq).unwrap_or(0)))
    }

    pub async fn revocation(&self, id: &str) -> Result<Option<StoredRevocation>, StoreError> {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "{REVOCATION_SELECT} WHERE id = ?"
        )))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.as_ref().map(revocation_from_row))
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
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "{REVOCATION_SELECT}{filter} ORDER BY revoke_seq DESC"
        )))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(revocation_from_row).collect())
    }

    /// Active credential revocations whose credential expired before
    /// `before_ms`: no sidecar can use it any more, so enforcing them is
    /// dead weight (the record stays, for the audit trail and `usage`).
    pub async fn expired_credential_revocations(
        &self,
        before_ms: i64,
    ) -> Result<Vec<String>, StoreError> {
        Ok(sqlx::query_scalar(
            "SELECT r.id FROM revocations r JOIN credentials c ON c.id = r.credential_id \
             WHERE r.kind = 'credential' AND r.restore_seq IS NULL AND c.expires_at_ms < ?",
        )
        .bind(before_ms)
        .fetch_all(&self.pool)
        .await?)
    }

    /// The newest sequence committed (0 if none).
    pub async fn current_seq(&self) -> Result<u64, StoreError> {
        let seq: Option<i64> = sqlx::query_scalar("SELECT MAX(seq) FROM revocation_events")
            .fetch_one(&self.pool)
            .await?;
        Ok(seq.and_then(|s| u64::try_from(s).ok()).unwrap_or(0))
    }

    /// The changes after `after`, in order, as (seq, revocation, restored).
    pub async fn events_after(
        &self,
        after: u64,
    ) -> Result<Vec<(u64, StoredRevocation, bool)>, StoreError> {
        let rows = sqlx::query(
            "SELECT e.seq AS event_seq, e.restored AS event_restored, r.id, r.kind, r.workload, r.upstream, r.credential_id, \
             r.reason, r.revoked_by, r.revoked_at_ms, r.revoke_seq, r.restored_by, r.restore_reason, r.restored_at_ms, r.restore_seq, r.fingerprint \
             FROM revocation_events e JOIN revocations r ON r.id = e.revocation_id WHERE e.seq > ? ORDER BY e.seq",
        )
        .bind(i64::try_from(after).unwrap_or(i64::MAX))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .iter()
            .map(|r| {
                let seq: i64 = r.get("event_seq");
                let restored: i64 = r.get("event_restored");
                (
                    u64::try_from(seq).unwrap_or(0),
                    revocation_from_row(r),
                    restored != 0,
                )
            })
            .collect())
    }

    pub async fn insert_session(&self, s: &SessionRecord) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO sessions (id, spiffe_id, version, connected_at_ms) VALUES (?, ?, ?, ?)",
        )
        .bind(&s.id)
        .bind(&s.spiffe_id)
        .bind(&s.version)
        .bind(s.connected_at_ms)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn end_session(&self, id: &str, at_ms: i64) -> Result<(), StoreError> {
        sqlx::query("UPDATE sessions SET disconnected_at_ms = ? WHERE id = ?")
            .bind(at_ms)
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Records acknowledgements in one transaction, many rows per statement
    /// (a revocation acknowledged by a thousand sidecars is a thousand rows).
    pub async fn insert_acks(&self, acks: &[AckRecord]) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        for chunk in acks.chunks(200) {
            let mut q = sqlx::QueryBuilder::new(
                "INSERT OR IGNORE INTO acks (session_id, from_seq, to_seq, acked_at_ms) ",
            );
            q.push_values(chunk, |mut row, a| {
                row.push_bind(&a.session_id)
                    .push_bind(i64::try_from(a.from_seq).unwrap_or(i64::MAX))
                    .push_bind(i64::try_from(a.to_seq).unwrap_or(i64::MAX))
                    .push_bind(a.acked_at_ms);
            });
            q.build().execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Sessions that acknowledged `seq`, with when.
    pub async fn acks_for(&self, seq: u64) -> Result<Vec<(SessionRecord, i64)>, StoreError> {
        let rows = sqlx::query(
            "SELECT s.id, s.spiffe_id, s.version, s.connected_at_ms, a.acked_at_ms FROM acks a \
             JOIN sessions s ON s.id = a.session_id WHERE a.from_seq < ? AND a.to_seq >= ? ORDER BY a.acked_at_ms",
        )
        .bind(i64::try_from(seq).unwrap_or(i64::MAX))
        .bind(i64::try_from(seq).unwrap_or(i64::MAX))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .iter()
            .map(|r| {
                (
                    SessionRecord {
                        id: r.get("id"),
                        spiffe_id: r.get("spiffe_id"),
                        version: r.get("version"),
                        connected_at_ms: r.get("connected_at_ms"),
                    },
                    r.get("acked_at_ms"),
                )
            })
            .collect())
    }

    pub async fn insert_token(&self, t: &TokenRecord) -> Result<(), StoreError> {
        sqlx::query("INSERT INTO admin_tokens (id, name, role, secret_sha256, created_at_ms, created_by) VALUES (?, ?, ?, ?, ?, ?)")
            .bind(&t.id)
            .bind(&t.name)
            .bind(&t.role)
            .bind(&t.secret_sha256)
            .bind(t.created_at_ms)
            .bind(&t.created_by)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn token(&self, id: &str) -> Result<Option<TokenRecord>, StoreError> {
        let row = sqlx::query("SELECT id, name, role, secret_sha256, created_at_ms, created_by FROM admin_tokens WHERE id = ?")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|r| TokenRecord {
            id: r.get("id"),
            name: r.get("name"),
            role: r.get("role"),
            secret_sha256: r.get("secret_sha256"),
            created_at_ms: r.get("created_at_ms"),
            created_by: r.get("created_by"),
        }))
    }

    pub async fn token_count(&self) -> Result<i64, StoreError> {
        Ok(sqlx::query_scalar("SELECT COUNT(*) FROM admin_tokens")
            .fetch_one(&self.pool)
            .await?)
    }

    /// Appends an entry chained to the previous one (see `audit_hash`).
    pub async fn append_audit(&self, e: &AuditEntry) -> Result<(), StoreError> {
        // Every append goes through this lock, so the newest entry cannot
        // change between reading it and inserting the next: one INSERT,
        // no read-then-write transaction to upgrade.
        let _one_at_a_time = self.audit_lock.lock().await;
        let last: Option<(i64, Option<String>)> =
            sqlx::query_as("SELECT id, hash FROM audit ORDER BY id DESC LIMIT 1")
                .fetch_optional(&self.pool)
                .await?;
        let (id, prev) = match last {
            Some((id, hash)) => (id + 1, hash.unwrap_or_default()),
            None => (1, String::new()),
        };
        let hash = audit_hash(&prev, id, e);
        sqlx::query("INSERT INTO audit (id, at_ms, actor, role, method, path, action, status, detail, prev_hash, hash) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")
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
            .execute(&self.pool)
            .await?;
        if id % crate::anchor::ANCHOR_EVERY == 0
            && let Some(key) = self.master_key.as_ref().and_then(|m| m.audit_anchor_key())
        {
            let head = crate::anchor::SignedHead::sign(&key, id, &hash, e.at_ms);
            sqlx::query("INSERT INTO audit_anchors (id, hash, at_ms, public_key, signature) VALUES (?, ?, ?, ?, ?)")
                .bind(head.id)
                .bind(&head.hash)
                .bind(head.at_ms)
                .bind(&head.public_key)
                .bind(&head.signature)
                .execute(&self.pool)
                .await?;
        }
        Ok(())
    }

    /// The current head of the chain, signed with the master key's anchor
    /// key (None without a master key or with an empty chain). Signed only
    /// if the chain verifies: a broken chain's head is never blessed.
    pub async fn signed_head(
        &self,
    ) -> Result<Result<Option<crate::anchor::SignedHead>, AuditVerdict>, StoreError> {
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
        let id: i64 = sqlx::query_scalar("SELECT MAX(id) FROM audit")
            .fetch_one(&self.pool)
            .await?;
        Ok(Ok(Some(crate::anchor::SignedHead::sign(
            &key,
            id,
            &hash,
            now_ms(),
        ))))
    }

    /// The hash of audit entry `id`, if it exists.
    pub async fn audit_entry_hash(&self, id: i64) -> Result<Option<String>, StoreError> {
        Ok(
            sqlx::query_scalar::<_, Option<String>>("SELECT hash FROM audit WHERE id = ?")
                .bind(id)
                .fetch_optional(&self.pool)
                .await?
                .flatten(),
        )
    }

    /// The stored anchors, by entry id.
    async fn anchors(
        &self,
    ) -> Result<std::collections::BTreeMap<i64, crate::anchor::SignedHead>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, hash, at_ms, public_key, signature FROM audit_anchors ORDER BY id",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .iter()
            .map(|r| {
                let head = crate::anchor::SignedHead {
                    id: r.get("id"),
                    hash: r.get("hash"),
                    at_ms: r.get("at_ms"),
                    public_key: r.get("public_key"),
                    signature: r.get("signature"),
                };
                (head.id, head)
            })
            .collect())
    }

    /// Walks the whole audit chain.
    pub async fn verify_audit(&self) -> Result<AuditVerdict, StoreError> {
        let rows = sqlx::query("SELECT id, at_ms, actor, role, method, path, action, status, detail, prev_hash, hash FROM audit ORDER BY id")
            .fetch_all(&self.pool)
            .await?;
        let mut verdict = AuditVerdict::default();
        let anchors = self.anchors().await?;
        let anchor_key = self.master_key.as_ref().and_then(|m| m.audit_anchor_key());
        let mut prev: Option<String> = None;
        let mut last_id = 0;
        for r in &rows {
            let id: i64 = r.get("id");
            let hash: Option<String> = r.get("hash");
            let Some(hash) = hash else {
                if prev.is_some() {
                    verdict.broken(id, "an entry without a hash inside the chain");
                    return Ok(verdict);
                }
                verdict.unchained += 1;
                last_id = id;
                continue;
            };
            let entry = audit_from_row(r);
            let stored_prev: String = r.get::<Option<String>, _>("prev_hash").unwrap_or_default();
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
        let rows = sqlx::query("SELECT at_ms, actor, role, method, path, action, status, detail FROM audit ORDER BY id DESC LIMIT ?")
            .bind(limit)
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.iter().map(audit_from_row).collect())
    }

    /// The key of leaked-value fingerprints, created on first use.
    pub async fn fingerprint_key(&self) -> Result<[u8; 16], StoreError> {
        let mut fresh = [0u8; 16];
        // SystemRandom only fails without an OS entropy source.
        let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut fresh);
        let stored = match &self.master_key {
            Some(key) => seal_text(key, &fresh),
            None => hex(&fresh),
        };
        sqlx::query("INSERT OR IGNORE INTO store_meta (key, value) VALUES ('fingerprint_key', ?)")
            .bind(stored)
            .execute(&self.pool)
            .await?;
        let value: String =
            sqlx::query_scalar("SELECT value FROM store_meta WHERE key = 'fingerprint_key'")
                .fetch_one(&self.pool)
                .await?;
        let clear = match value.strip_prefix(SEALED_TEXT) {
            Some(sealed) => self.open_key("fingerprint", "fingerprint_key", &unhex(sealed))?,
            None => zeroize::Zeroizing::new(unhex(&value)),
        };
        clear
            .as_slice()
            .try_into()
            .map_err(|_| StoreError::Corrupt("the fingerprint key is not 16 bytes".into()))
    }

    /// Counts one sighting of a leaked value.
    pub async fn record_sighting(&self, s: &Sighting) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO leak_sightings (revocation_id, workload, upstream, host, location, count, first_seen_ms, last_seen_ms) \
             VALUES (?, ?, ?, ?, ?, 1, ?, ?) ON CONFLICT (revocation_id, workload, upstream, host, location) \
             DO UPDATE SET count = count + 1, last_seen_ms = MAX(last_seen_ms, excluded.last_seen_ms)",
        )
        .bind(&s.revocation_id)
        .bind(&s.workload)
        .bind(&s.upstream)
        .bind(&s.host)
        .bind(&s.location)
        .bind(s.first_seen_ms)
        .bind(s.last_seen_ms)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn sightings(&self, revocation_id: &str) -> Result<Vec<Sighting>, StoreError> {
        let rows = sqlx::query(
            "SELECT revocation_id, workload, upstream, host, location, count, first_seen_ms, last_seen_ms \
             FROM leak_sightings WHERE revocation_id = ? ORDER BY last_seen_ms DESC",
        )
        .bind(revocation_id)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .iter()
            .map(|r| Sighting {
                revocation_id: r.get("revocation_id"),
                workload: r.get("workload"),
                upstream: r.get("upstream"),
                host: r.get("host"),
                location: r.get("location"),
                count: r.get("count"),
                first_seen_ms: r.get("first_seen_ms"),
                last_seen_ms: r.get("last_seen_ms"),
            })
            .collect())
    }

    pub async fn record_stripped(
        &self,
        workload: &str,
        upstream: &str,
        count: u64,
        at_ms: i64,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO stripped_credentials (workload, upstream, count, first_seen_ms, last_seen_ms) VALUES (?, ?, ?, ?, ?) \
             ON CONFLICT (workload, upstream) DO UPDATE SET count = count + excluded.count, last_seen_ms = excluded.last_seen_ms",
        )
        .bind(workload)
        .bind(upstream)
        .bind(i64::try_from(count).unwrap_or(i64::MAX))
        .bind(at_ms)
        .bind(at_ms)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn record_echo(
        &self,
        workload: &str,
        upstream: &str,
        header: &str,
        count: u64,
        at_ms: i64,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO echoed_credentials (workload, upstream, header, count, first_seen_ms, last_seen_ms) VALUES (?, ?, ?, ?, ?, ?) \
             ON CONFLICT (workload, upstream, header) DO UPDATE SET count = count + excluded.count, last_seen_ms = excluded.last_seen_ms",
        )
        .bind(workload)
        .bind(upstream)
        .bind(header)
        .bind(i64::try_from(count).unwrap_or(i64::MAX))
        .bind(at_ms)
        .bind(at_ms)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// (workload, upstream, header, count, last seen), most recent first.
    pub async fn echoes(&self) -> Result<Vec<(String, String, String, i64, i64)>, StoreError> {
        let rows = sqlx::query(
            "SELECT workload, upstream, header, count, last_seen_ms FROM echoed_credentials ORDER BY last_seen_ms DESC",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .iter()
            .map(|r| {
                (
                    r.get("workload"),
                    r.get("upstream"),
                    r.get("header"),
                    r.get("count"),
                    r.get("last_seen_ms"),
                )
            })
            .collect())
    }

    /// (workload, upstream, count, first seen, last seen), most recent first.
    pub async fn stripped(&self) -> Result<Vec<(String, String, i64, i64, i64)>, StoreError> {
        let rows = sqlx::query(
            "SELECT workload, upstream, count, first_seen_ms, last_seen_ms FROM stripped_credentials ORDER BY last_seen_ms DESC",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .iter()
            .map(|r| {
                (
                    r.get("workload"),
                    r.get("upstream"),
                    r.get("count"),
                    r.get("first_seen_ms"),
                    r.get("last_seen_ms"),
                )
            })
            .collect())
    }

    pub async fn next_secret_version(&self, upstream: &str) -> Result<i64, StoreError> {
        let max: Option<i64> =
            sqlx::query_scalar("SELECT MAX(version) FROM secret_versions WHERE upstream = ?")
                .bind(upstream)
                .fetch_one(&self.pool)
                .await?;
        Ok(max.unwrap_or(0) + 1)
    }

    pub async fn insert_secret_version(&self, v: &SecretVersion) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO secret_versions (upstream, version, nonce, ciphertext, created_at_ms, created_by) VALUES (?, ?, ?, ?, ?, ?)",
        )
        .bind(&v.upstream)
        .bind(v.version)
        .bind(&v.nonce)
        .bind(&v.ciphertext)
        .bind(v.created_at_ms)
        .bind(&v.created_by)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Versions of an upstream's secret, newest first.
    pub async fn secret_versions(&self, upstream: &str) -> Result<Vec<SecretVersion>, StoreError> {
        let rows = sqlx::query(
            "SELECT upstream, version, nonce, ciphertext, created_at_ms, created_by, revoked_at_ms FROM secret_versions \
             WHERE upstream = ? ORDER BY version DESC",
        )
        .bind(upstream)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .iter()
            .map(|r| SecretVersion {
                upstream: r.get("upstream"),
                version: r.get("version"),
                nonce: r.get("nonce"),
                ciphertext: r.get("ciphertext"),
                created_at_ms: r.get("created_at_ms"),
                created_by: r.get("created_by"),
                revoked_at_ms: r.get("revoked_at_ms"),
            })
            .collect())
    }

    /// The newest version, revoked or not: revoking it never makes an older
    /// one current again (a new version must be put).
    pub async fn current_secret_version(
        &self,
        upstream: &str,
    ) -> Result<Option<SecretVersion>, StoreError> {
        Ok(self.secret_versions(upstream).await?.into_iter().next())
    }

    /// Marks a version revoked; false if it does not exist or already was.
    pub async fn revoke_secret_version(
        &self,
        upstream: &str,
        version: i64,
        at_ms: i64,
    ) -> Result<bool, StoreError> {
        let n = sqlx::query(
            "UPDATE secret_versions SET revoked_at_ms = ? WHERE upstream = ? AND version = ? AND revoked_at_ms IS NULL",
        )
        .bind(at_ms)
        .bind(upstream)
        .bind(version)
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(n == 1)
    }

    pub async fn ping(&self) -> bool {
        sqlx::query("SELECT 1").execute(&self.pool).await.is_ok()
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }
}

const REVOCATION_SELECT: &str = "SELECT id, kind, workload, upstream, credential_id, reason, revoked_by, revoked_at_ms, \
     revoke_seq, restored_by, restore_reason, restored_at_ms, restore_seq, fingerprint FROM revocations";

fn revocation_from_row(r: &sqlx::sqlite::SqliteRow) -> StoredRevocation {
    StoredRevocation {
        revocation: Revocation {
            id: r.get("id"),
            kind: stored_kind(&r.get::<String, _>("kind")),
            workload: r.get("workload"),
            upstream: r.get("upstream"),
            credential_id: r.get("credential_id"),
            reason: r.get("reason"),
            revoked_by: r.get("revoked_by"),
            revoked_at_ms: r.get("revoked_at_ms"),
            fingerprint: unhex(&r.get::<String, _>("fingerprint")),
        },
        revoke_seq: u64::try_from(r.get::<i64, _>("revoke_seq")).unwrap_or(0),
        restored: r.get::<Option<i64>, _>("restore_seq").map(|seq| Restore {
            by: r
                .get::<Option<String>, _>("restored_by")
                .unwrap_or_default(),
            reason: r
                .get::<Option<String>, _>("restore_reason")
                .unwrap_or_default(),
            at_ms: r.get::<Option<i64>, _>("restored_at_ms").unwrap_or(0),
            seq: u64::try_from(seq).unwrap_or(0),
        }),
    }
}

fn credential_from_row(r: &sqlx::sqlite::SqliteRow) -> CredentialRecord {
    CredentialRecord {
        id: r.get("id"),
        workload: r.get("workload"),
        upstream: r.get("upstream"),
        kind: r.get("kind"),
        issued_at_ms: r.get("issued_at_ms"),
        expires_at_ms: r.get("expires_at_ms"),
    }
}

/// One version of a brokered secret, as stored: encrypted.
#[derive(Clone)]
pub struct SecretVersion {
    pub upstream: String,
    pub version: i64,
    pub nonce: Vec<u8>,
    pub ciphertext: Vec<u8>,
    pub created_at_ms: i64,
    pub created_by: String,
    pub revoked_at_ms: Option<i64>,
}

/// One (leaked value, workload, upstream, place) seen, with how often and when.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct Sighting {
    pub revocation_id: String,
    pub workload: String,
    pub upstream: String,
    pub host: String,
    pub location: String,
    pub count: i64,
    pub first_seen_ms: i64,
    pub last_seen_ms: i64,
}

fn audit_from_row(r: &sqlx::sqlite::SqliteRow) -> AuditEntry {
    AuditEntry {
        at_ms: r.get("at_ms"),
        actor: r.get("actor"),
        role: r.get("role"),
        method: r.get("method"),
        path: r.get("path"),
        action: r.get("action"),
        status: u16::try_from(r.get::<i64, _>("status")).unwrap_or(0),
        detail: r.get("detail"),
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
    hex(ctx.finish().as_ref())
}

/// A revocation kind as stored (its name). One this build does not know
/// reads as unspecified, which every enforcement point refuses.
fn stored_kind(name: &str) -> i32 {
    leash_api::revocation::RevocationKind::parse(name).map_or(0, i32::from)
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

pub fn unhex(s: &str) -> Vec<u8> {
    (0..s.len() / 2)
        .filter_map(|i| {
            s.get(2 * i..2 * i + 2)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        })
        .collect()
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}
