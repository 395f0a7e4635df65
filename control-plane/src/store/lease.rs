//! Work that one replica does at a time. On PostgreSQL, a session-level
//! advisory lock on a key derived from the job's name, held by a connection
//! taken out of the pool for as long as the [`Lease`] lives: a replica that
//! dies (or loses the database) loses its connection, and the lock with it,
//! so the job moves to another replica. On SQLite one process owns the
//! store: a lease is always granted.

use sqlx::pool::PoolConnection;

use super::{Pool, Store, StoreError};

/// Jobs done by one replica at a time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Job<'a> {
    /// Creating what an empty store needs (the first signing key, the
    /// bootstrap admin token): two replicas starting at once create one.
    FirstStart,
    /// Computing the missions' criteria and closing or reopening them.
    MissionSweep,
    /// Exchanging an upstream's client secret for an access token (one
    /// exchange per upstream, shared by every replica).
    TokenExchange(&'a str),
}

impl Job<'_> {
    fn name(self) -> String {
        match self {
            Job::FirstStart => "first-start".into(),
            Job::MissionSweep => "mission-sweep".into(),
            Job::TokenExchange(upstream) => format!("token-exchange:{upstream}"),
        }
    }

    /// The advisory-lock key: the first 8 bytes of SHA-256("leash:<name>"),
    /// the same in every replica and build.
    fn key(self) -> i64 {
        let digest = ring::digest::digest(
            &ring::digest::SHA256,
            format!("leash:{}", self.name()).as_bytes(),
        );
        let mut first = [0u8; 8];
        first.copy_from_slice(&digest.as_ref()[..8]);
        i64::from_be_bytes(first)
    }
}

/// The right to do a [`Job`] until released or dropped.
#[must_use = "the job is exclusive only while the lease is held"]
pub struct Lease {
    key: i64,
    conn: Option<PoolConnection<sqlx::Postgres>>,
}

impl Lease {
    /// Gives the job up for another replica to take.
    pub async fn release(mut self) {
        if let Some(mut conn) = self.conn.take() {
            let unlocked = sqlx::query("SELECT pg_advisory_unlock($1)")
                .bind(self.key)
                .execute(&mut *conn)
                .await;
            if unlocked.is_err() {
                // Closing the session releases its locks.
                conn.close_on_drop();
            }
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        // Not released (an error path, a cancelled task): the connection is
        // closed rather than returned to the pool still holding the lock.
        if let Some(mut conn) = self.conn.take() {
            conn.close_on_drop();
        }
    }
}

impl Store {
    /// The lease of `job`, waiting while another replica holds it.
    pub async fn lease(&self, job: Job<'_>) -> Result<Lease, StoreError> {
        let key = job.key();
        let conn = match &self.pool {
            Pool::Sqlite(_) => None,
            Pool::Postgres(p) => {
                let mut conn = p.acquire().await?;
                sqlx::query("SELECT pg_advisory_lock($1)")
                    .bind(key)
                    .execute(&mut *conn)
                    .await?;
                Some(conn)
            }
        };
        Ok(Lease { key, conn })
    }

    /// The lease of `job`, or None if another replica holds it now.
    pub async fn try_lease(&self, job: Job<'_>) -> Result<Option<Lease>, StoreError> {
        let key = job.key();
        match &self.pool {
            Pool::Sqlite(_) => Ok(Some(Lease { key, conn: None })),
            Pool::Postgres(p) => {
                let mut conn = p.acquire().await?;
                let got: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
                    .bind(key)
                    .fetch_one(&mut *conn)
                    .await?;
                Ok(got.then_some(Lease {
                    key,
                    conn: Some(conn),
                }))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::test_db::store_test;

    store_test!(
        /// Two replicas: one holds a job, the other cannot take it until
        /// it is released, or until the holder's connection is gone.
        async fn a_job_is_held_by_one_replica_at_a_time(db: &TestDb) {
            let a = db.open(None).await.unwrap();
            let b = db.open(None).await.unwrap();
            let held = a.try_lease(Job::MissionSweep).await.unwrap().unwrap();
            let other = b.try_lease(Job::MissionSweep).await.unwrap();
            if db.backend() == crate::store::Backend::Sqlite {
                // One process owns a SQLite store: always granted.
                assert!(other.is_some());
                return;
            }
            assert!(other.is_none(), "held by the other replica");
            // Another job is not held.
            let first = b.try_lease(Job::FirstStart).await.unwrap().unwrap();
            first.release().await;
            held.release().await;
            let taken = b.try_lease(Job::MissionSweep).await.unwrap().unwrap();
            // Dropped without release (a task cancelled): its connection
            // closes, and the job is free again.
            drop(taken);
            let again = tokio::time::timeout(
                std::time::Duration::from_secs(10),
                a.lease(Job::MissionSweep),
            )
            .await
            .expect("a dropped lease frees the job")
            .unwrap();
            again.release().await;
            a.close().await;
            b.close().await;
        }
    );

    /// Replicas of different versions (a rolling update) must derive the
    /// same key for a job, or both would do it.
    #[test]
    fn keys_are_pinned_and_distinct() {
        assert_eq!(Job::FirstStart.key(), -8_580_902_359_895_511_246);
        assert_eq!(Job::MissionSweep.key(), -28_295_796_523_301_488);
        assert_ne!(Job::TokenExchange("a").key(), Job::TokenExchange("b").key());
    }
}
