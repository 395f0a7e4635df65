//! Wake-ups for the revocation follower: on PostgreSQL, a `LISTEN` on
//! [`CHANGES_CHANNEL`] that fires when any replica commits a change. The
//! content is always read from the table, by sequence; a notification lost
//! while the listening connection was down is made up by the follower's
//! periodic read, and a lost connection is itself a wake-up.

use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::PgListener;
use tokio::sync::Notify;

use super::{CHANGES_CHANNEL, Pool, Store};

/// How long the listener waits before connecting again after a failure.
const RECONNECT: Duration = Duration::from_secs(1);

impl Store {
    /// Notified when another process may have committed a change. On
    /// SQLite (one process) never: the follower's periodic read suffices.
    /// The listening task ends when the store closes.
    pub fn change_wakeups(&self) -> Arc<Notify> {
        let wake = Arc::new(Notify::new());
        if let Pool::Postgres(pool) = &self.pool {
            tokio::spawn(listen(pool.clone(), wake.clone()));
        }
        wake
    }
}

async fn listen(pool: sqlx::PgPool, wake: Arc<Notify>) {
    let mut listening = false;
    loop {
        if pool.is_closed() {
            return;
        }
        let mut listener = match PgListener::connect_with(&pool).await {
            Ok(l) => l,
            Err(e) => {
                if listening {
                    tracing::warn!(error = %e, "cannot listen for changes from other replicas; reading them periodically");
                    listening = false;
                }
                tokio::time::sleep(RECONNECT).await;
                continue;
            }
        };
        if let Err(e) = listener.listen(CHANGES_CHANNEL).await {
            tracing::warn!(error = %e, "cannot listen for changes from other replicas; reading them periodically");
            tokio::time::sleep(RECONNECT).await;
            continue;
        }
        if !listening {
            tracing::debug!(
                channel = CHANGES_CHANNEL,
                "listening for changes from other replicas"
            );
            listening = true;
        }
        // Changes committed before the LISTEN took effect were missed.
        wake.notify_one();
        loop {
            match listener.try_recv().await {
                Ok(Some(_)) => {
                    // One read covers every change committed so far.
                    while listener.next_buffered().is_some() {}
                    wake.notify_one();
                }
                // The connection dropped (and was made again): what was
                // notified in between is lost, so read.
                Ok(None) => wake.notify_one(),
                Err(sqlx::Error::PoolClosed) => return,
                Err(e) => {
                    tracing::warn!(error = %e, "lost the listening connection; reconnecting");
                    wake.notify_one();
                    tokio::time::sleep(RECONNECT).await;
                    break;
                }
            }
        }
    }
}
