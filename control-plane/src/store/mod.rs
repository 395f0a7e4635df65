//! Durable state, in embedded SQLite (the default) or in PostgreSQL: opening,
//! pragmas, migrations and the private-file checks; each table group lives
//! in its own submodule. Queries are written once, with `?` placeholders,
//! and run on the backend's own sqlx driver (`db!`, `tx!`); where the
//! dialects differ the submodule picks per `Backend`. Writes are durable
//! before they are answered (`synchronous = FULL` on SQLite, PostgreSQL's
//! default `synchronous_commit = on`).

/// Runs `$body` on the store's pool, type-checked once per backend: `$p` is
/// the `SqlitePool` or the `PgPool`.
macro_rules! db {
    ($pool:expr, |$p:ident| $body:expr) => {
        match $pool {
            $crate::store::Pool::Sqlite($p) => $body,
            $crate::store::Pool::Postgres($p) => $body,
        }
    };
}

/// Runs `$body` in a write transaction (`Tx`): `$c` is the backend's
/// connection, `&mut SqliteConnection` or `&mut PgConnection`.
macro_rules! tx {
    ($tx:expr, |$c:ident| $body:expr) => {
        match $tx {
            $crate::store::Tx::Sqlite(t) => {
                let $c = &mut **t;
                $body
            }
            $crate::store::Tx::Postgres(t) => {
                let $c = &mut **t;
                $body
            }
        }
    };
}

mod audit;
mod console;
mod credentials;
mod feed;
mod keys;
mod lease;
mod missions;
mod probes;
mod replicas;
mod revocations;
mod secrets;
mod ssf;
mod tokens;
mod url;
mod usage;

use std::borrow::Cow;
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{AssertSqlSafe, SqlitePool};

pub use audit::{AuditEntry, AuditVerdict, ChainedEntry, audit_hash};
pub use console::ConsoleSession;
pub use credentials::CredentialRecord;
pub use keys::StoredKey;
pub use lease::{Job, Lease};
pub use missions::{FindingRow, MissionChange, MissionRow};
pub use probes::ProbeResult;
pub use replicas::{OpenSession, ReplicaRow};
pub use revocations::{
    AckRecord, CHANGES_CHANNEL, Inserted, Restore, SessionRecord, StoredRevocation,
};
pub use secrets::SecretVersion;
pub use ssf::{SsfEvent, SsfStreamRow};
pub use tokens::{SharedToken, TokenRecord};
pub use url::{DatabaseUrl, numbered_placeholders};
pub use usage::{
    BUCKET_MS, CredentialSpan, Edge, Sighting, Stripped, TimelinePoint, UsageFilter, UsageRow,
    UsageScope, UsedAfter,
};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot create data directory {path}: {source}")]
    DataDir {
        path: String,
        source: std::io::Error,
    },
    #[error("database error: {0}")]
    Db(#[from] sqlx::Error),
    #[error("cannot migrate the database: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("the operating system gave no random bytes for a new key")]
    NoEntropy,
    #[error("stored data cannot be used: {0}")]
    Corrupt(String),
    #[error(
        "{path} is readable by group or others (mode {mode:o}); it holds keys and tokens: chmod {} {path}",
        if *mode & 0o100 != 0 { "700" } else { "600" }
    )]
    NotPrivate { path: String, mode: u32 },
}

/// Decodes hex read from `table.column` (of row `id`): anything but whole,
/// valid hex is corrupt, never a shorter value.
fn unhex(table_column: &str, id: &str, text: &str) -> Result<Vec<u8>, StoreError> {
    hex::decode(text)
        .map_err(|e| StoreError::Corrupt(format!("{table_column} of {id} is not valid hex: {e}")))
}

/// A sequence or count read back from the database: never negative.
fn unsigned(table_column: &str, value: i64) -> Result<u64, StoreError> {
    u64::try_from(value)
        .map_err(|_| StoreError::Corrupt(format!("{table_column} is negative ({value})")))
}

/// What is bound for a `u64` (sequences, counts): SQLite integers are i64.
fn i64_of(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// Schema migrations, one history per backend, embedded at build time:
/// `control-plane/migrations/sqlite/` and `control-plane/migrations/postgres/`
/// hold the same schema version for version.
static MIGRATOR: Migrator = sqlx::migrate!("migrations/sqlite");
static PG_MIGRATOR: Migrator = sqlx::migrate!("migrations/postgres");

/// Which database the store is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    /// SQL written with `?` placeholders, as this backend takes it.
    fn sql(self, sql: impl Into<Cow<'static, str>>) -> AssertSqlSafe<Cow<'static, str>> {
        let sql = sql.into();
        AssertSqlSafe(match self {
            Backend::Sqlite => sql,
            Backend::Postgres => Cow::Owned(numbered_placeholders(&sql)),
        })
    }

    /// The larger of two values (SQLite's two-argument `MAX`).
    fn greatest(self) -> &'static str {
        match self {
            Backend::Sqlite => "MAX",
            Backend::Postgres => "GREATEST",
        }
    }

    /// The smaller of two values (SQLite's two-argument `MIN`).
    fn least(self) -> &'static str {
        match self {
            Backend::Sqlite => "MIN",
            Backend::Postgres => "LEAST",
        }
    }
}

/// The store's connection pool, on one backend or the other.
#[derive(Clone)]
pub(crate) enum Pool {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

impl Pool {
    fn backend(&self) -> Backend {
        match self {
            Pool::Sqlite(_) => Backend::Sqlite,
            Pool::Postgres(_) => Backend::Postgres,
        }
    }
}

/// A write transaction (see `Store::write`).
pub(crate) enum Tx {
    Sqlite(sqlx::Transaction<'static, sqlx::Sqlite>),
    Postgres(sqlx::Transaction<'static, sqlx::Postgres>),
}

impl Tx {
    fn backend(&self) -> Backend {
        match self {
            Tx::Sqlite(_) => Backend::Sqlite,
            Tx::Postgres(_) => Backend::Postgres,
        }
    }

    async fn commit(self) -> Result<(), sqlx::Error> {
        match self {
            Tx::Sqlite(t) => t.commit().await,
            Tx::Postgres(t) => t.commit().await,
        }
    }

    async fn rollback(self) -> Result<(), sqlx::Error> {
        match self {
            Tx::Sqlite(t) => t.rollback().await,
            Tx::Postgres(t) => t.rollback().await,
        }
    }
}

/// The PostgreSQL advisory lock every write transaction holds (see
/// `Store::write`): one key for the whole store, as SQLite has one writer.
const PG_WRITE_LOCK: i64 = 0x6c65_6173_6877; // "leashw"

/// The bookkeeping table of the hand-written runner that preceded
/// `sqlx::migrate!` (one row per applied version).
const OLD_MIGRATIONS_TABLE: &str = "schema_migrations";

#[derive(Clone)]
pub struct Store {
    pool: Pool,
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

/// Creates the data directory 0700 (if missing) and refuses it, or a file
/// in it, if others can read it.
fn prepare_data_dir(data_dir: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::DirBuilderExt as _;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(data_dir)
        .map_err(|source| StoreError::DataDir {
            path: data_dir.display().to_string(),
            source,
        })?;
    check_private(data_dir)
}

/// Creates `leash.db` 0600 (if missing) before SQLite opens it; SQLite
/// gives its WAL and shared-memory files the database file's mode.
fn create_database_file(data_dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt as _;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(data_dir.join("leash.db"))
        .map(drop)
}

impl Store {
    /// Opens (or creates) the store in `data_dir`: the directory 0700 and
    /// the database 0600, refused if others can read them, then migrates
    /// it. With a master key, keys still stored in the clear (from an
    /// `--insecure-dev` run or an older version) are sealed at once.
    pub async fn open(
        data_dir: &Path,
        master_key: Option<std::sync::Arc<crate::secrets::MasterKey>>,
    ) -> Result<Self, StoreError> {
        prepare_data_dir(data_dir)?;
        create_database_file(data_dir).map_err(|source| StoreError::DataDir {
            path: data_dir.display().to_string(),
            source,
        })?;
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
            pool: Pool::Sqlite(pool),
            audit_lock: std::sync::Arc::default(),
            master_key,
        };
        store.migrate().await?;
        store.seal_clear_keys().await?;
        Ok(store)
    }

    /// Opens the store in `database_url` (a PostgreSQL database, or the
    /// SQLite file in `data_dir` when None) and migrates it.
    pub async fn open_at(
        data_dir: &Path,
        database_url: Option<&DatabaseUrl>,
        master_key: Option<std::sync::Arc<crate::secrets::MasterKey>>,
    ) -> Result<Self, StoreError> {
        match database_url {
            None => Self::open(data_dir, master_key).await,
            Some(url) => {
                // The directory still holds the control plane's files.
                prepare_data_dir(data_dir)?;
                Self::open_postgres(url, master_key).await
            }
        }
    }

    /// Opens the store in a PostgreSQL database and migrates it. The
    /// database must exist; its schema is the store's.
    pub async fn open_postgres(
        url: &DatabaseUrl,
        master_key: Option<std::sync::Arc<crate::secrets::MasterKey>>,
    ) -> Result<Self, StoreError> {
        let opts = PgConnectOptions::from_str(url.expose())?;
        let pool = PgPoolOptions::new()
            .max_connections(8)
            .acquire_timeout(Duration::from_secs(5))
            .connect_with(opts)
            .await?;
        // sqlx takes an advisory lock while it migrates: two processes
        // starting on one database apply each version once.
        PG_MIGRATOR.run(&pool).await?;
        let store = Self {
            pool: Pool::Postgres(pool),
            audit_lock: std::sync::Arc::default(),
            master_key,
        };
        store.seal_clear_keys().await?;
        Ok(store)
    }

    /// Which database the store is in.
    pub fn backend(&self) -> Backend {
        self.pool.backend()
    }

    /// `sql` (with `?` placeholders) as this store's backend takes it.
    fn sql(&self, sql: impl Into<Cow<'static, str>>) -> AssertSqlSafe<Cow<'static, str>> {
        self.backend().sql(sql)
    }

    /// Applies the pending migrations. A database the old hand-written
    /// runner migrated has its applied versions recorded for sqlx first
    /// (marked applied, not run again), then loses the old table.
    async fn migrate(&self) -> Result<(), StoreError> {
        let Pool::Sqlite(pool) = &self.pool else {
            return Err(StoreError::Corrupt(
                "the SQLite migrations were asked of another backend".into(),
            ));
        };
        let mut conn = pool.acquire().await?;
        let old: Option<String> =
            sqlx::query_scalar("SELECT name FROM sqlite_master WHERE type = 'table' AND name = ?")
                .bind(OLD_MIGRATIONS_TABLE)
                .fetch_optional(&mut *conn)
                .await?;
        if old.is_some() {
            let versions: Vec<i64> =
                sqlx::query_scalar("SELECT version FROM schema_migrations ORDER BY version")
                    .fetch_all(&mut *conn)
                    .await?;
            // The old runner applied versions in order, one transaction each:
            // what it recorded is always 1..=n.
            let applied = versions.last().copied().unwrap_or(0);
            if versions.iter().copied().ne(1..=applied)
                || (applied > 0 && !MIGRATOR.version_exists(applied))
            {
                return Err(StoreError::Corrupt(format!(
                    "schema_migrations records versions {versions:?}, not 1..=n of this build's migrations"
                )));
            }
            if applied > 0 {
                MIGRATOR.skip(&mut *conn, Some(applied)).await?;
            }
            // Dropped only once sqlx has the versions: a crash in between
            // repeats the (idempotent) skip.
            sqlx::query("DROP TABLE schema_migrations")
                .execute(&mut *conn)
                .await?;
            tracing::info!(
                versions = applied,
                "migration bookkeeping moved from schema_migrations to _sqlx_migrations"
            );
        }
        MIGRATOR.run(&mut *conn).await?;
        Ok(())
    }

    /// A write transaction, holding the store's write lock from its start.
    /// On SQLite, its write lock (`BEGIN IMMEDIATE`): one that reads and
    /// then writes would otherwise fail at once with "database is locked"
    /// when another connection wrote in between (the busy timeout does not
    /// apply to that upgrade). On PostgreSQL, a transaction-scoped advisory
    /// lock: writers run one at a time as on SQLite, so what one reads
    /// (the next revocation sequence, the audit chain's head) is still
    /// true when it writes, even from another process on the same database.
    async fn write(&self) -> Result<Tx, StoreError> {
        Ok(match &self.pool {
            Pool::Sqlite(p) => Tx::Sqlite(p.begin_with("BEGIN IMMEDIATE").await?),
            Pool::Postgres(p) => {
                let mut t = p.begin().await?;
                sqlx::query("SELECT pg_advisory_xact_lock($1)")
                    .bind(PG_WRITE_LOCK)
                    .execute(&mut *t)
                    .await?;
                Tx::Postgres(t)
            }
        })
    }

    pub async fn ping(&self) -> bool {
        db!(&self.pool, |p| sqlx::query("SELECT 1")
            .execute(p)
            .await
            .is_ok())
    }

    pub async fn close(&self) {
        db!(&self.pool, |p| p.close().await);
    }
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
pub(crate) mod fresh_pg;
#[cfg(test)]
pub(crate) mod test_db;
#[cfg(test)]
mod tests;
