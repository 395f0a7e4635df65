//! What the sidecar tells the control plane besides acknowledgements and
//! usage: leaked values refused. Queued without waiting, sent on the open
//! session; bounded, so that a control plane away for long costs a count of
//! what was dropped, not memory.

use std::sync::atomic::{AtomicU64, Ordering};

use leash_api::v1::SidecarMessage;
use tokio::sync::{Mutex, MutexGuard, mpsc};

/// Reports held while no session is open.
const QUEUED: usize = 4096;

pub struct Reports {
    tx: mpsc::Sender<SidecarMessage>,
    rx: Mutex<mpsc::Receiver<SidecarMessage>>,
    dropped: AtomicU64,
}

impl Default for Reports {
    fn default() -> Self {
        let (tx, rx) = mpsc::channel(QUEUED);
        Self {
            tx,
            rx: Mutex::new(rx),
            dropped: AtomicU64::new(0),
        }
    }
}

impl Reports {
    /// Queues a report for the control plane (sent at once when connected).
    pub fn report(&self, msg: SidecarMessage) {
        if self.tx.try_send(msg).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Reports dropped because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// The queue's receiving end, for the one session open at a time.
    pub async fn receiver(&self) -> MutexGuard<'_, mpsc::Receiver<SidecarMessage>> {
        self.rx.lock().await
    }
}
