//! Durable state in embedded SQLite: signing keys and issued-credential
//! metadata. Writes use `synchronous = FULL` so that an answer given to a
//! caller survives a crash right after it.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

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
}

/// Schema migrations, applied in order; each runs once.
const MIGRATIONS: &[(i64, &str)] = &[(1, include_str!("migrations/0001_init.sql"))];

#[derive(Clone)]
pub struct Store {
    pool: SqlitePool,
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

impl Store {
    /// Opens (creating if needed) `<data_dir>/leash.db` and migrates it.
    pub async fn open(data_dir: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(data_dir).map_err(|source| StoreError::DataDir {
            path: data_dir.display().to_string(),
            source,
        })?;
        let opts = SqliteConnectOptions::from_str("sqlite:")?
            .filename(data_dir.join("leash.db"))
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(5));
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(opts)
            .await?;
        let store = Self { pool };
        store.migrate().await?;
        Ok(store)
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
        Ok(rows
            .into_iter()
            .map(|r| StoredKey {
                kid: r.get("kid"),
                pkcs8: zeroize::Zeroizing::new(r.get("pkcs8")),
                created_at_ms: r.get("created_at_ms"),
            })
            .collect())
    }

    pub async fn insert_signing_key(&self, key: &StoredKey) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO signing_keys (kid, alg, pkcs8, created_at_ms) VALUES (?, 'ES256', ?, ?)",
        )
        .bind(&key.kid)
        .bind(key.pkcs8.as_slice())
        .bind(key.created_at_ms)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn record_credential(&self, c: &CredentialRecord) -> Result<(), StoreError> {
        sqlx::query("INSERT INTO credentials (id, workload, upstream, kind, issued_at_ms, expires_at_ms) VALUES (?, ?, ?, ?, ?, ?)")
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

    pub async fn ping(&self) -> bool {
        sqlx::query("SELECT 1").execute(&self.pool).await.is_ok()
    }

    pub async fn close(&self) {
        self.pool.close().await;
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

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}
