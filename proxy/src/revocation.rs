//! The sidecar's revocation state and the in-flight gate that makes an
//! acknowledgement mean something: when the sidecar acknowledges a change,
//! every request checked against the state before it has finished sending.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use leash_api::revocation::RevocationSet;

/// Counts requests in flight per state generation (two slots suffice because
/// changes are applied one at a time, each waiting for the previous slot to
/// drain).
#[derive(Default)]
pub struct InflightGate {
    generation: AtomicU64,
    inflight: [AtomicUsize; 2],
}

/// Held by a request from its revocation check until its upstream request
/// has been sent (the upstream's response head arrived) or failed.
pub struct InflightGuard<'a> {
    gate: &'a InflightGate,
    slot: usize,
}

impl Drop for InflightGuard<'_> {
    fn drop(&mut self) {
        self.gate.inflight[self.slot].fetch_sub(1, Ordering::SeqCst);
    }
}

impl InflightGate {
    /// Registers a request; call before reading the revocation state.
    pub fn enter(&self) -> InflightGuard<'_> {
        loop {
            let generation = self.generation.load(Ordering::SeqCst);
            let slot = (generation & 1) as usize;
            self.inflight[slot].fetch_add(1, Ordering::SeqCst);
            // A change was published between the two loads: register again in
            // the new slot so the change's drain does not wait on us forever
            // and we read the new state.
            if self.generation.load(Ordering::SeqCst) == generation {
                return InflightGuard { gate: self, slot };
            }
            self.inflight[slot].fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// Call after publishing a new state: waits (at most `bound`) until every
    /// request registered before it is done. Returns whether it drained.
    pub async fn advance_and_drain(&self, bound: Duration) -> bool {
        let old = self.generation.fetch_add(1, Ordering::SeqCst);
        let slot = (old & 1) as usize;
        let deadline = Instant::now() + bound;
        while self.inflight[slot].load(Ordering::SeqCst) != 0 {
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
        true
    }
}

/// What the sidecar enforces, with where it came from.
#[derive(Default)]
pub struct RevocationState {
    pub set: ArcSwap<RevocationSet>,
    pub gate: InflightGate,
    /// The last sequence applied, reported back to the control plane.
    pub applied_seq: AtomicU64,
    /// Snapshots and single changes applied since start.
    pub snapshots_applied: AtomicU64,
    pub changes_applied: AtomicU64,
}
