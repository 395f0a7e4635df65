//! The sidecar's revocation state, the credentials it has ever handed out
//! that are still in use, and the commit gate that makes an acknowledgement
//! mean enforced (invariant I7).
//!
//! A request is checked against the revocation state twice: on arrival (a
//! fast refusal) and again at its *commit*, the synchronous moment its head
//! is handed to an upstream connection, after its body prefix was read, its
//! connection made and its credential fetched. Only that second check
//! decides, and it runs inside the gate, with no `.await` between the check
//! and the hand-off. Applying a change publishes the new state, cuts every
//! live credential it covers, then waits for the commits that read the old
//! state: a few microseconds, since no commit can wait on anything. So when
//! the acknowledgement is sent, every request the change covers was either
//! handed to its upstream before, or will be refused at its commit; no
//! timeout turns waiting into acknowledging, and a workload that holds its
//! body back holds nothing of the gate.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use arc_swap::{ArcSwap, ArcSwapOption};
use leash_api::revocation::{FingerprintKey, RevocationSet};

use crate::credential::CachedCredential;

/// Counts commits in progress per state generation (two slots suffice:
/// changes are applied one at a time, each waiting for the previous slot to
/// drain).
#[derive(Default)]
pub struct InflightGate {
    generation: AtomicU64,
    inflight: [AtomicUsize; 2],
}

/// Held by a commit from its last revocation check until its request has
/// been handed to the upstream connection (or refused). Never held across
/// an `.await`.
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
    /// Registers a commit; call before reading the revocation state.
    pub fn enter(&self) -> InflightGuard<'_> {
        loop {
            let generation = self.generation.load(Ordering::SeqCst);
            let slot = (generation & 1) as usize;
            self.inflight[slot].fetch_add(1, Ordering::SeqCst);
            // A change was published between the two loads: register again in
            // the new slot so the change's drain does not wait on us and we
            // read the new state.
            if self.generation.load(Ordering::SeqCst) == generation {
                return InflightGuard { gate: self, slot };
            }
            self.inflight[slot].fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// Call after publishing a new state: returns once every commit that
    /// may have read the previous state has handed off or been refused.
    /// Commits hold the gate only for a synchronous check and hand-off, so
    /// this takes microseconds; it has no timeout because none is needed.
    pub async fn advance_and_drain(&self) {
        let old = self.generation.fetch_add(1, Ordering::SeqCst);
        let slot = (old & 1) as usize;
        let mut spins = 0u32;
        while self.inflight[slot].load(Ordering::SeqCst) != 0 {
            spins += 1;
            if spins < 64 {
                tokio::task::yield_now().await;
            } else {
                tokio::time::sleep(Duration::from_micros(100)).await;
            }
        }
    }
}

/// Every credential instance the sidecar has fetched that something still
/// holds: the cache, a route's fast path, a request on its way, or a stream
/// (request or response body) still flowing. A revocation cuts them all,
/// whatever the cache did with them meanwhile (refreshed, evicted).
#[derive(Default)]
pub struct LiveCredentials {
    held: Mutex<Vec<Weak<CachedCredential>>>,
}

impl LiveCredentials {
    pub fn register(&self, credential: &Arc<CachedCredential>) {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        // Amortised pruning: the list is at most twice what is alive.
        if held.len() >= 16 && held.len().is_power_of_two() {
            held.retain(|w| w.strong_count() > 0);
        }
        held.push(Arc::downgrade(credential));
    }

    /// Marks revoked every live credential `covered` selects, which cuts the
    /// streams opened with it. Returns how many.
    pub fn cut(&self, covered: impl Fn(&CachedCredential) -> bool) -> usize {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        held.retain(|w| w.strong_count() > 0);
        let mut n = 0;
        for c in held.iter().filter_map(Weak::upgrade) {
            if !c.revoked.is_cancelled() && covered(&c) {
                c.revoked.cancel();
                n += 1;
            }
        }
        n
    }
}

/// The passthrough tunnels open now, each with the token that closes it: a
/// revocation of the workload, its grant or the upstream closes them before
/// it is acknowledged, as it cuts credentials.
#[derive(Default)]
pub struct LiveTunnels {
    open: Mutex<Vec<Weak<TunnelHandle>>>,
}

/// One passthrough tunnel: closed when `cut` is cancelled.
pub struct TunnelHandle {
    pub upstream: Arc<str>,
    pub cut: tokio_util::sync::CancellationToken,
}

impl LiveTunnels {
    /// Registers a tunnel (before its last revocation check: a change
    /// published after that check finds it here).
    pub fn register(&self, upstream: Arc<str>) -> Arc<TunnelHandle> {
        let handle = Arc::new(TunnelHandle {
            upstream,
            cut: tokio_util::sync::CancellationToken::new(),
        });
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        if open.len() >= 16 && open.len().is_power_of_two() {
            open.retain(|w| w.strong_count() > 0);
        }
        open.push(Arc::downgrade(&handle));
        handle
    }

    /// Closes every tunnel to an upstream `covered` selects; returns how many.
    pub fn cut(&self, covered: impl Fn(&str) -> bool) -> usize {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        open.retain(|w| w.strong_count() > 0);
        let mut n = 0;
        for t in open.iter().filter_map(Weak::upgrade) {
            if !t.cut.is_cancelled() && covered(&t.upstream) {
                t.cut.cancel();
                n += 1;
            }
        }
        n
    }
}

/// What the sidecar enforces, with where it came from.
pub struct RevocationState {
    pub set: ArcSwap<RevocationSet>,
    /// Key of the leaked-value fingerprints (from the snapshot).
    pub fingerprint_key: ArcSwapOption<FingerprintKey>,
    pub gate: InflightGate,
    pub live: LiveCredentials,
    pub tunnels: LiveTunnels,
    /// Whether the set can still be trusted to be current (I3).
    pub freshness: Freshness,
    /// The last sequence applied, reported back to the control plane.
    pub applied_seq: AtomicU64,
    /// Snapshots and single changes applied since start.
    pub snapshots_applied: AtomicU64,
    pub changes_applied: AtomicU64,
}

impl RevocationState {
    pub fn new(max_staleness: Duration) -> Self {
        Self {
            set: ArcSwap::default(),
            fingerprint_key: ArcSwapOption::empty(),
            gate: InflightGate::default(),
            live: LiveCredentials::default(),
            tunnels: LiveTunnels::default(),
            freshness: Freshness::new(max_staleness),
            applied_seq: AtomicU64::new(0),
            snapshots_applied: AtomicU64::new(0),
            changes_applied: AtomicU64::new(0),
        }
    }

    /// Publishes `set` and cuts every live credential it covers for
    /// `workload`, then waits for the commits that read the previous state.
    /// When this returns, the change is enforced (I7).
    pub async fn enforce(&self, set: RevocationSet, workload: &str) -> usize {
        let set = Arc::new(set);
        self.set.store(set.clone());
        let cut = self
            .live
            .cut(|c| set.credential_revoked(&c.id) || set.check(workload, &c.upstream).is_some());
        self.tunnels
            .cut(|upstream| set.check(workload, upstream).is_some());
        self.gate.advance_and_drain().await;
        cut
    }
}

/// How current the revocation state is: when the control plane was last
/// heard, and whether a session ever delivered the state. Past
/// `max_staleness` of silence after that, nothing is injected (I3).
pub struct Freshness {
    max_staleness: Duration,
    epoch: Instant,
    /// Milliseconds since `epoch` when the control plane was last heard.
    last_heard_ms: AtomicU64,
    /// A session delivered its revocation state and routes at least once.
    synced: AtomicBool,
    /// A session is open and established now.
    connected: AtomicBool,
}

impl Freshness {
    fn new(max_staleness: Duration) -> Self {
        Self {
            max_staleness,
            epoch: Instant::now(),
            last_heard_ms: AtomicU64::new(0),
            synced: AtomicBool::new(false),
            connected: AtomicBool::new(false),
        }
    }

    pub fn max_staleness(&self) -> Duration {
        self.max_staleness
    }

    /// The control plane was heard from just now.
    pub fn heard(&self) {
        let now = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_heard_ms.store(now, Ordering::Release);
    }

    /// Time since the control plane was last heard from.
    pub fn silence(&self) -> Duration {
        self.silence_at(Instant::now())
    }

    fn silence_at(&self, now: Instant) -> Duration {
        let now = u64::try_from(now.saturating_duration_since(self.epoch).as_millis())
            .unwrap_or(u64::MAX);
        Duration::from_millis(now.saturating_sub(self.last_heard_ms.load(Ordering::Acquire)))
    }

    /// Past `max_staleness` without news: the revocation state can no longer
    /// be trusted to be current (invariant I3).
    pub fn stale(&self) -> Option<Duration> {
        self.stale_at(Instant::now())
    }

    /// As [`Self::stale`], at `now` (a request's arrival: no second clock read).
    pub fn stale_at(&self, now: Instant) -> Option<Duration> {
        let silence = self.silence_at(now);
        (self.synced() && silence > self.max_staleness).then_some(silence)
    }

    pub fn synced(&self) -> bool {
        self.synced.load(Ordering::Acquire)
    }

    pub fn connected(&self) -> bool {
        self.connected.load(Ordering::Acquire)
    }

    /// A session has delivered the state: returns whether it was already
    /// counted as established.
    pub fn establish(&self) -> bool {
        let was = self.connected.swap(true, Ordering::AcqRel);
        self.synced.store(true, Ordering::Release);
        was
    }

    /// The session ended: returns whether it had been established.
    pub fn disconnect(&self) -> bool {
        self.connected.swap(false, Ordering::AcqRel)
    }
}
