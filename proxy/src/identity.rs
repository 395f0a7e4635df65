//! The workload's identity: its X.509-SVID from the Workload API and the
//! SPIFFE ID read from it, which every revocation check on the hot path
//! compares against.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use arc_swap::{ArcSwap, ArcSwapOption};
use leash_api::identity::{Identity, IdentityConfig};
use spiffe::X509Source;

pub struct WorkloadIdentity {
    ready: AtomicBool,
    /// The SPIFFE ID ("" until acquired), read on every request.
    id: ArcSwap<Arc<str>>,
    identity: ArcSwapOption<Identity>,
}

impl Default for WorkloadIdentity {
    fn default() -> Self {
        Self {
            ready: AtomicBool::new(false),
            id: ArcSwap::from_pointee(Arc::from("")),
            identity: ArcSwapOption::empty(),
        }
    }
}

impl WorkloadIdentity {
    pub fn ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// The workload's SPIFFE ID ("" until the identity is acquired).
    pub fn id(&self) -> arc_swap::Guard<Arc<Arc<str>>> {
        self.id.load()
    }

    /// The same, as an owned handle (for span attributes).
    pub fn id_arc(&self) -> Arc<str> {
        Arc::clone(&self.id.load())
    }

    /// DER of the current SVID's leaf certificate (diagnostics and tests).
    pub fn svid_leaf(&self) -> Option<Vec<u8>> {
        let identity = self.identity.load_full()?;
        identity
            .source
            .svid()
            .ok()
            .map(|s| s.leaf().as_bytes().to_vec())
    }

    /// Waits for the Workload API to hand out an SVID (retrying every
    /// 500 ms), then keeps its source (rotations are picked up by it).
    pub async fn acquire(&self, config: &IdentityConfig) -> X509Source {
        let mut logged = false;
        loop {
            match leash_api::identity::connect(config, Duration::from_secs(5)).await {
                Ok(identity) => {
                    let source = identity.source.clone();
                    if let Ok(svid) = source.svid() {
                        tracing::info!(spiffe_id = %svid.spiffe_id(), "workload identity acquired");
                        self.id.store(Arc::new(svid.spiffe_id().to_string().into()));
                    }
                    self.identity.store(Some(Arc::new(identity)));
                    self.ready.store(true, Ordering::Release);
                    return source;
                }
                Err(e) => {
                    if !logged {
                        tracing::warn!(error = %e, "waiting for workload identity");
                        logged = true;
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
    }

    pub async fn shutdown(&self) {
        if let Some(identity) = self.identity.load_full() {
            identity.shutdown().await;
        }
    }
}
