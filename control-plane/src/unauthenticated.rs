//! Admin-API calls without a valid token, from a network that may be
//! hostile: one per-address limiter for every such call (no token or a
//! wrong one), which never refuses a valid token; and their audit as
//! bounded summaries, so that no amount of them grows the store faster than
//! a stated bound (see README, "Admin API under attack").

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use moka::policy::EvictionPolicy;

use crate::store::{AuditEntry, Store, StoreError, now_ms};

/// Addresses the limiter remembers at once; past it the least recently seen
/// is forgotten (an attacker with more addresses than this gets a fresh
/// allowance on some of them, never a way to lock others out).
pub const TRACKED_ADDRESSES: u64 = 10_000;

/// Addresses summarised one row each per interval; calls from any further
/// address share one overflow row.
pub const SUMMARISED_ADDRESSES: usize = 100;

/// Longest path kept in an audit row (bytes, cut at a character boundary).
pub const AUDIT_PATH_BYTES: usize = 256;

/// Counts calls without a valid token per client address: past `max`
/// within `window`, further ones from that address get 429 instead of 401.
/// A valid token is never refused: it is checked first, and only failures
/// count. O(1) per call, bounded memory.
pub struct FailureLimiter {
    max: u32,
    window: Duration,
    failures: moka::sync::Cache<IpAddr, Arc<Mutex<(Instant, u32)>>>,
}

impl FailureLimiter {
    pub fn new(max: u32, window: Duration) -> Self {
        Self {
            max,
            window,
            failures: moka::sync::Cache::builder()
                .max_capacity(TRACKED_ADDRESSES)
                .time_to_idle(window)
                .eviction_policy(EvictionPolicy::lru())
                .build(),
        }
    }

    /// Counts one failed call from `ip`; returns how long the address stays
    /// limited, if this call is past the allowance.
    pub fn failed(&self, ip: IpAddr) -> Option<Duration> {
        let slot = self
            .failures
            .get_with(ip, || Arc::new(Mutex::new((Instant::now(), 0))));
        let mut entry = slot.lock().unwrap_or_else(|p| p.into_inner());
        if entry.0.elapsed() >= self.window {
            *entry = (Instant::now(), 0);
        }
        entry.1 = entry.1.saturating_add(1);
        (entry.1 > self.max).then(|| self.window.saturating_sub(entry.0.elapsed()))
    }
}

/// What was refused from one address during one interval.
#[derive(Debug, Clone)]
struct Summary {
    first_ms: i64,
    last_ms: i64,
    count: u64,
    unauthenticated: u64,
    limited: u64,
    /// The first call's method and path (cut), as a sample.
    method: String,
    path: String,
}

/// Refused calls gathered between flushes: one row per address per
/// interval, at most [`SUMMARISED_ADDRESSES`] addresses plus one overflow
/// row, each with a bounded size.
#[derive(Default)]
pub struct RefusedCalls {
    by_address: Mutex<HashMap<IpAddr, Summary>>,
    overflow: Mutex<Option<Summary>>,
}

impl RefusedCalls {
    pub fn record(&self, ip: IpAddr, method: &str, path: &str, status: u16) {
        let now = now_ms();
        let add = |s: &mut Summary| {
            s.last_ms = now;
            s.count += 1;
            if status == 429 {
                s.limited += 1;
            } else {
                s.unauthenticated += 1;
            }
        };
        let fresh = || Summary {
            first_ms: now,
            last_ms: now,
            count: 0,
            unauthenticated: 0,
            limited: 0,
            method: audit_method(method),
            path: audit_path(path),
        };
        let mut by_address = self.by_address.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = by_address.get_mut(&ip) {
            add(s);
            return;
        }
        if by_address.len() < SUMMARISED_ADDRESSES {
            let mut s = fresh();
            add(&mut s);
            by_address.insert(ip, s);
            return;
        }
        drop(by_address);
        // Distinct addresses are not tracked here (that would grow); the
        // row says how many calls, not from how many.
        let mut overflow = self.overflow.lock().unwrap_or_else(|p| p.into_inner());
        add(overflow.get_or_insert_with(fresh));
    }

    /// Writes one audit row per address (and one for the overflow), then
    /// starts a new interval. Returns the rows written.
    pub async fn flush(&self, store: &Store) -> Result<usize, StoreError> {
        let by_address =
            std::mem::take(&mut *self.by_address.lock().unwrap_or_else(|p| p.into_inner()));
        let overflow = self
            .overflow
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        let rows = by_address
            .into_iter()
            .map(|(ip, s)| (format!("anonymous@{ip}"), s))
            .chain(overflow.map(|s| ("anonymous@(other addresses)".to_owned(), s)));
        let mut n = 0;
        for (actor, s) in rows {
            store
                .append_audit(&AuditEntry {
                    at_ms: s.last_ms,
                    actor,
                    role: String::new(),
                    method: s.method.clone(),
                    path: s.path.clone(),
                    action: format!("refused {} calls without a valid token", s.count),
                    status: if s.limited > 0 { 429 } else { 401 },
                    detail: format!(
                        "{} unauthenticated (401), {} limited (429), from {} to {} (Unix ms); first: {} {}",
                        s.unauthenticated, s.limited, s.first_ms, s.last_ms, s.method, s.path
                    ),
                })
                .await?;
            n += 1;
        }
        Ok(n)
    }
}

/// A method as it goes into the audit log: a token of at most 16 bytes.
pub fn audit_method(method: &str) -> String {
    if method.len() <= 16
        && method
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
    {
        method.to_owned()
    } else {
        "(invalid)".to_owned()
    }
}

/// A path as it goes into the audit log: at most [`AUDIT_PATH_BYTES`].
pub fn audit_path(path: &str) -> String {
    if path.len() <= AUDIT_PATH_BYTES {
        return path.to_owned();
    }
    let mut end = AUDIT_PATH_BYTES;
    while !path.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &path[..end])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::test_db::store_test;

    #[test]
    fn the_limiter_counts_per_address_and_forgets_after_the_window() {
        let l = FailureLimiter::new(3, Duration::from_millis(200));
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        assert!(l.failed(a).is_none());
        assert!(l.failed(a).is_none());
        assert!(l.failed(a).is_none());
        assert!(l.failed(a).is_some(), "the fourth failure is limited");
        assert!(l.failed(b).is_none(), "other addresses are not");
        std::thread::sleep(Duration::from_millis(250));
        assert!(l.failed(a).is_none(), "a new window");
    }

    store_test!(
        /// The README's bound: whatever the number of addresses, one interval
        /// writes at most SUMMARISED_ADDRESSES + 1 rows, each of bounded size.
        async fn a_flood_from_many_addresses_writes_a_bounded_number_of_rows(db: &TestDb) {
            let store = db.open(None).await.unwrap();
            let refused = RefusedCalls::default();
            let long = format!("/v1/{}", "x".repeat(60 * 1024));
            for i in 0..1_000u32 {
                let ip = IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i));
                for _ in 0..3 {
                    refused.record(ip, "GET", &long, 401);
                }
            }
            assert_eq!(
                refused.flush(&store).await.unwrap(),
                SUMMARISED_ADDRESSES + 1
            );
            let rows = store.audit(1_000).await.unwrap();
            assert_eq!(rows.len(), SUMMARISED_ADDRESSES + 1);
            let other = rows
                .iter()
                .find(|r| r.actor == "anonymous@(other addresses)")
                .unwrap();
            assert_eq!(other.action, "refused 2700 calls without a valid token");
            for r in &rows {
                let size =
                    r.actor.len() + r.method.len() + r.path.len() + r.action.len() + r.detail.len();
                assert!(size < 1024, "a summary row of {size} bytes");
            }
            // The next interval starts empty.
            assert_eq!(refused.flush(&store).await.unwrap(), 0);
            store.close().await;
        }
    );

    #[test]
    fn paths_and_methods_are_cut() {
        assert_eq!(audit_path("/v1/x"), "/v1/x");
        let long = format!("/v1/{}", "é".repeat(200));
        let cut = audit_path(&long);
        assert!(cut.len() <= AUDIT_PATH_BYTES + "…".len(), "{}", cut.len());
        assert!(cut.ends_with('…'));
        assert_eq!(audit_method("GET"), "GET");
        assert_eq!(audit_method("GET\u{0}X"), "(invalid)");
        assert_eq!(audit_method(&"A".repeat(17)), "(invalid)");
    }
}
