//! This control-plane replica among the others on one store: registered at
//! start, seen while its follower reads the store, stopped at shutdown. The
//! fleet's sidecar sessions are this replica's (live, from memory) and every
//! live replica's (from the store), so that `connected` and `pending` in a
//! revocation's proof are the same whichever replica is asked.

use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::admin::types::{PendingSidecar, Sidecar};
use crate::state::ControlPlaneState;
use crate::store::{ReplicaRow, StoreError, now_ms};

/// This replica's identity among the others.
#[derive(Debug, Clone)]
pub struct Replica {
    pub id: String,
    /// A replica not seen for this long is taken for dead: its sessions are
    /// no longer counted (see [`crate::revocations::sync_limit`]: twice the
    /// time a replica vouches for its state without reading the store).
    pub liveness: Duration,
}

impl Replica {
    pub fn new(heartbeat: Duration) -> Self {
        Self {
            id: format!("cp-{}", uuid::Uuid::new_v4().simple()),
            liveness: crate::revocations::sync_limit(heartbeat) * 2,
        }
    }

    /// The oldest `seen_at_ms` of a live replica, now.
    pub fn live_since_ms(&self) -> i64 {
        now_ms().saturating_sub(i64::try_from(self.liveness.as_millis()).unwrap_or(i64::MAX))
    }
}

/// Registers this replica in the store.
pub async fn register(
    cp: &ControlPlaneState,
    sidecar_addr: std::net::SocketAddr,
    admin_addr: std::net::SocketAddr,
) -> Result<(), StoreError> {
    let now = now_ms();
    cp.store
        .register_replica(&ReplicaRow {
            id: cp.replica.id.clone(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            sidecar_addr: sidecar_addr.to_string(),
            admin_addr: admin_addr.to_string(),
            started_at_ms: now,
            seen_at_ms: now,
            stopped_at_ms: None,
        })
        .await
}

/// Every sidecar session connected to a live replica: this one's first.
pub async fn sidecars(cp: &ControlPlaneState) -> Result<Vec<Sidecar>, StoreError> {
    let mut all: Vec<Sidecar> = cp
        .sessions
        .list()
        .iter()
        .map(|c| Sidecar {
            session_id: c.id.clone(),
            spiffe_id: c.spiffe_id.to_string(),
            version: c.version.clone(),
            connected_at_ms: c.connected_at_ms,
            last_ack_seq: c.last_ack_seq.load(Ordering::Relaxed),
            last_ack_at_ms: c.last_ack_at_ms.load(Ordering::Relaxed),
            last_heard_ms: c.last_heard_ms.load(Ordering::Relaxed),
            replica: cp.replica.id.clone(),
        })
        .collect();
    let elsewhere = cp
        .store
        .open_sessions_elsewhere(&cp.replica.id, cp.replica.live_since_ms())
        .await?;
    all.extend(elsewhere.into_iter().map(|s| Sidecar {
        session_id: s.id,
        spiffe_id: s.spiffe_id,
        version: s.version,
        connected_at_ms: s.connected_at_ms,
        last_ack_seq: s.last_ack_seq,
        last_ack_at_ms: s.last_ack_at_ms,
        // What its replica last vouched for: the session was alive then.
        last_heard_ms: s.replica_seen_at_ms,
        replica: s.replica_id,
    }));
    Ok(all)
}

/// The connected sidecars (on any live replica) that have not acknowledged
/// `seq`, and how many are connected.
pub async fn pending(
    cp: &ControlPlaneState,
    seq: u64,
) -> Result<(usize, Vec<PendingSidecar>), StoreError> {
    let all = sidecars(cp).await?;
    let pending = all
        .iter()
        .filter(|c| c.last_ack_seq < seq)
        .map(|c| PendingSidecar {
            session_id: c.session_id.clone(),
            spiffe_id: c.spiffe_id.clone(),
            version: c.version.clone(),
            last_ack_seq: c.last_ack_seq,
            last_heard_ms: c.last_heard_ms,
            replica: c.replica.clone(),
        })
        .collect();
    Ok((all.len(), pending))
}
