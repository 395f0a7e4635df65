//! Tests' PostgreSQL: a fresh database per test on the server
//! `LEASH_TEST_DATABASE_URL` names, created and dropped by the test (and
//! per row by the propagation benchmark). No `crate::` paths: the
//! end-to-end tests and the benchmark include this file too.

use sqlx::{AssertSqlSafe, Connection as _, PgConnection};

/// The variable naming the test server (any database on it; a role that may
/// create databases). `.ci/run` always sets it.
pub const TEST_DATABASE_URL: &str = "LEASH_TEST_DATABASE_URL";

/// A database of its own for one test.
pub struct FreshDatabase {
    server: String,
    name: String,
    /// The database's URL, for `--database-url` or `Store::open_postgres`.
    pub url: String,
}

impl FreshDatabase {
    /// A new, empty database; None (and a line saying `test` was skipped)
    /// when `LEASH_TEST_DATABASE_URL` is not set.
    pub async fn create(test: &str) -> Option<Self> {
        let Ok(server) = std::env::var(TEST_DATABASE_URL) else {
            eprintln!("skipped {test} on PostgreSQL: {TEST_DATABASE_URL} is not set");
            return None;
        };
        Some(Self::create_on(server, "leash_test").await)
    }

    /// A new, empty database named `prefix`_(random) on `server` (a
    /// postgres:// URL naming any database there, with a role that may
    /// create databases).
    pub async fn create_on(server: String, prefix: &str) -> Self {
        let name = format!("{prefix}_{}", uuid::Uuid::new_v4().simple());
        let mut conn = PgConnection::connect(&server)
            .await
            .unwrap_or_else(|e| panic!("cannot reach the PostgreSQL server: {e}"));
        // Byte-order collation, as SQLite compares text: the same ORDER BY
        // gives the same order on both backends.
        sqlx::raw_sql(AssertSqlSafe(format!(
            "CREATE DATABASE {name} TEMPLATE template0 ENCODING 'UTF8' LC_COLLATE 'C' LC_CTYPE 'C'"
        )))
        .execute(&mut conn)
        .await
        .unwrap_or_else(|e| panic!("cannot create database {name}: {e}"));
        let _ = conn.close().await;
        let url = with_database(&server, &name);
        Self { server, name, url }
    }

    /// Drops the database (connections still open to it are ended).
    pub async fn drop_database(self) {
        let mut conn = PgConnection::connect(&self.server)
            .await
            .unwrap_or_else(|e| panic!("cannot reach the PostgreSQL server: {e}"));
        sqlx::raw_sql(AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.name
        )))
        .execute(&mut conn)
        .await
        .unwrap_or_else(|e| panic!("cannot drop database {}: {e}", self.name));
        let _ = conn.close().await;
    }
}

/// `server` (a postgres:// URL) naming database `name` instead of its own.
pub fn with_database(server: &str, name: &str) -> String {
    let (scheme, rest) = server.split_once("://").unwrap_or(("postgres", server));
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let query = tail.find('?').map_or("", |q| &tail[q..]);
    format!("{scheme}://{authority}/{name}{query}")
}
