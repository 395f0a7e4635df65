//! The store's tests run on both backends: `store_test!` makes a SQLite
//! and a PostgreSQL variant of a test, each given its own `TestDb`.

use std::path::PathBuf;
use std::sync::Arc;

use sqlx::AssertSqlSafe;

use super::fresh_pg::FreshDatabase;
use super::{Backend, DatabaseUrl, Store, StoreError};

/// Where one test's store lives: the SQLite file in a temporary data
/// directory, or a database of its own on the test PostgreSQL server.
pub(crate) struct TestDb {
    dir: tempfile::TempDir,
    pg: Option<(FreshDatabase, DatabaseUrl)>,
}

impl TestDb {
    pub(crate) fn sqlite() -> Self {
        Self {
            dir: tempdir(),
            pg: None,
        }
    }

    /// None when `LEASH_TEST_DATABASE_URL` is not set (the test says it
    /// was skipped).
    pub(crate) async fn postgres(test: &str) -> Option<Self> {
        let db = FreshDatabase::create(test).await?;
        let url = DatabaseUrl::parse(&db.url).unwrap();
        Some(Self {
            dir: tempdir(),
            pg: Some((db, url)),
        })
    }

    pub(crate) fn backend(&self) -> Backend {
        if self.pg.is_some() {
            Backend::Postgres
        } else {
            Backend::Sqlite
        }
    }

    /// The data directory (the SQLite database's; on PostgreSQL, files only).
    pub(crate) fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Opens (again) the store, as `leash-control-plane serve` would.
    pub(crate) async fn open(
        &self,
        master_key: Option<Arc<crate::secrets::MasterKey>>,
    ) -> Result<Store, StoreError> {
        let url = self.pg.as_ref().map(|(_, url)| url);
        Store::open_at(&self.data_dir(), url, master_key).await
    }

    /// Runs `sql` behind the store's back (to corrupt what it wrote).
    pub(crate) async fn exec(&self, sql: &str) {
        self.try_exec(sql).await.unwrap();
    }

    /// Runs `sql` behind the store's back; the database's answer.
    pub(crate) async fn try_exec(&self, sql: &str) -> Result<(), sqlx::Error> {
        match &self.pg {
            None => {
                let db = sqlx::SqlitePool::connect(&format!(
                    "sqlite://{}",
                    self.data_dir().join("leash.db").display()
                ))
                .await
                .unwrap();
                let done = sqlx::raw_sql(AssertSqlSafe(sql.to_owned()))
                    .execute(&db)
                    .await
                    .map(drop);
                db.close().await;
                done
            }
            Some((pg, _)) => {
                let db = sqlx::PgPool::connect(&pg.url).await.unwrap();
                let done = sqlx::raw_sql(AssertSqlSafe(sql.to_owned()))
                    .execute(&db)
                    .await
                    .map(drop);
                db.close().await;
                done
            }
        }
    }

    /// One text value read behind the store's back.
    pub(crate) async fn text(&self, sql: &str) -> String {
        match &self.pg {
            None => {
                let db = sqlx::SqlitePool::connect(&format!(
                    "sqlite://{}",
                    self.data_dir().join("leash.db").display()
                ))
                .await
                .unwrap();
                let v = sqlx::query_scalar(AssertSqlSafe(sql.to_owned()))
                    .fetch_one(&db)
                    .await
                    .unwrap();
                db.close().await;
                v
            }
            Some((pg, _)) => {
                let db = sqlx::PgPool::connect(&pg.url).await.unwrap();
                let v = sqlx::query_scalar(AssertSqlSafe(sql.to_owned()))
                    .fetch_one(&db)
                    .await
                    .unwrap();
                db.close().await;
                v
            }
        }
    }

    /// Drops the PostgreSQL database (the directory goes with `self`).
    pub(crate) async fn finish(self) {
        if let Some((pg, _)) = self.pg {
            pg.drop_database().await;
        }
    }
}

fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

/// `store_test!(async fn name(db: &TestDb) { … })`: the test, once on
/// SQLite (`name::sqlite`) and once on PostgreSQL (`name::postgres`,
/// skipped with a line when `LEASH_TEST_DATABASE_URL` is unset). The body
/// gets the `TestDb` and its database is dropped after it passes.
macro_rules! store_test {
    ($(#[$meta:meta])* async fn $name:ident($db:ident: &TestDb) $body:block) => {
        $(#[$meta])*
        mod $name {
            #[allow(unused_imports, reason = "the test's own module sees its parent's items")]
            use super::*;
            use $crate::store::test_db::TestDb;

            async fn run($db: &TestDb) $body

            #[tokio::test]
            async fn sqlite() {
                let db = TestDb::sqlite();
                run(&db).await;
                db.finish().await;
            }

            #[tokio::test]
            async fn postgres() {
                let Some(db) = TestDb::postgres(concat!(module_path!(), "::postgres")).await else {
                    return;
                };
                run(&db).await;
                db.finish().await;
            }
        }
    };
}
pub(crate) use store_test;
