//! The revocation log: validates, commits (durably, with the next sequence),
//! then publishes each change to the sidecar sessions. Commit and publish
//! happen under one lock so that sessions see sequences in order.
//!
//! Replicas on one PostgreSQL database share one sequence. Each follows
//! the others: woken by a notification (or every poll), it reads every
//! change after the last one it applied and publishes them in order
//! ([`RevocationLog::catch_up`]). The time of its last successful read says
//! whether the replica may still vouch for its state ([`RevocationLog::in_sync`]):
//! one cut off from the database stops vouching, and its sidecars move.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use arc_swap::ArcSwap;
use leash_api::policy::{ValidPolicy, WorkloadMatcher};
use leash_api::revocation::{
    FingerprintKey, MIN_LEAKED_LEN, RevocationKind, RevocationSet, fingerprint, fingerprint_bytes,
};
use leash_api::v1::Revocation;
use serde::Deserialize;
use tokio::sync::{Mutex, broadcast};

use crate::metrics::Metrics;
use crate::store::{Inserted, Store, StoreError, StoredRevocation, now_ms};

/// A brokered secret's version whose lease a revocation cuts.
struct SecretVersionRef<'a> {
    upstream: &'a str,
    version: i64,
}

/// One committed change, as published to sessions.
#[derive(Debug, Clone)]
pub struct Change {
    pub seq: u64,
    pub revocation: Revocation,
    pub restored: bool,
    /// When the commit returned, for the propagation metric.
    pub committed_at: Instant,
}

/// What a commit did.
enum Committed {
    New(Box<StoredRevocation>),
    /// Nothing: this active revocation says the same.
    Existing(String),
}

/// The active set and the sequence it corresponds to, swapped together.
pub struct Snapshot {
    pub seq: u64,
    pub set: RevocationSet,
}

#[derive(Debug, thiserror::Error)]
pub enum RevokeError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A revocation as a responder asks for it.
#[derive(Debug, Clone, Default, Deserialize, serde::Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RevokeRequest {
    /// credential, grant, workload or upstream (leaked values: `POST /v1/leaked`).
    pub kind: String,
    /// SPIFFE ID, or a prefix ending in `/*` (grant, workload).
    #[serde(default)]
    pub workload: String,
    /// Upstream name from policy (grant, upstream).
    #[serde(default)]
    pub upstream: String,
    /// Issued credential id: a JWT's jti, a static lease, an OAuth2 token id (credential).
    #[serde(default)]
    pub credential_id: String,
    /// Why, 1 to 1024 bytes.
    pub reason: String,
}

const MAX_REASON: usize = 1024;

/// Every change says why: 1 to 1024 bytes, trimmed.
fn check_reason(reason: &str) -> Result<&str, RevokeError> {
    let reason = reason.trim();
    if reason.is_empty() || reason.len() > MAX_REASON {
        return Err(RevokeError::Invalid(format!(
            "reason is required (1-{MAX_REASON} bytes)"
        )));
    }
    Ok(reason)
}

pub struct RevocationLog {
    store: Store,
    pub store_id: String,
    pub fingerprint_key: FingerprintKey,
    state: ArcSwap<Snapshot>,
    changes: broadcast::Sender<Arc<Change>>,
    write: Mutex<()>,
    metrics: Arc<Metrics>,
    /// When the store was last read successfully (ms since `opened`).
    synced_ms: std::sync::atomic::AtomicU64,
    opened: Instant,
}

/// How often a replica reads the store for changes committed elsewhere when
/// no notification woke it: half a heartbeat, at most a second.
pub fn sync_poll(heartbeat: std::time::Duration) -> std::time::Duration {
    (heartbeat / 2).min(std::time::Duration::from_secs(1))
}

/// How long after its last successful read of the store a replica still
/// vouches for its state (heartbeats, new sessions): three missed polls and
/// a second of slack for a slow database.
pub fn sync_limit(heartbeat: std::time::Duration) -> std::time::Duration {
    sync_poll(heartbeat) * 3 + std::time::Duration::from_secs(1)
}

/// How long past its expiry a revoked credential stays enforced (clock
/// skew between hosts, a sidecar's lease ending late).
pub const EXPIRED_MARGIN: std::time::Duration = std::time::Duration::from_secs(300);

impl RevocationLog {
    pub async fn open(store: Store, metrics: Arc<Metrics>) -> Result<Self, StoreError> {
        let store_id = store.store_id().await?;
        let fingerprint_key = FingerprintKey(store.fingerprint_key().await?);
        let seq = store.current_seq().await?;
        let active = store.revocations(true).await?;
        let set = RevocationSet::new(active.into_iter().map(|r| r.revocation))
            .map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let (changes, _) = broadcast::channel(4096);
        Ok(Self {
            store,
            store_id,
            fingerprint_key,
            state: ArcSwap::from_pointee(Snapshot { seq, set }),
            changes,
            write: Mutex::new(()),
            metrics,
            synced_ms: std::sync::atomic::AtomicU64::new(0),
            opened: Instant::now(),
        })
    }

    /// Whether the store was read successfully within `limit`: what this
    /// replica enforces and sends is then at most that old.
    pub fn in_sync(&self, limit: std::time::Duration) -> bool {
        let synced = self.synced_ms.load(Ordering::Acquire);
        let now = u64::try_from(self.opened.elapsed().as_millis()).unwrap_or(u64::MAX);
        now.saturating_sub(synced) <= u64::try_from(limit.as_millis()).unwrap_or(u64::MAX)
    }

    fn mark_synced(&self) {
        let now = u64::try_from(self.opened.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.synced_ms.fetch_max(now, Ordering::AcqRel);
    }

    /// Applies and publishes, in order, every change committed (by any
    /// replica) after the sequence this one enforces. Returns how many.
    pub async fn catch_up(&self) -> Result<usize, StoreError> {
        let _write = self.write.lock().await;
        self.catch_up_locked().await
    }

    /// [`Self::catch_up`], with the write lock held by the caller.
    async fn catch_up_locked(&self) -> Result<usize, StoreError> {
        let after = self.state.load().seq;
        let events = self.store.events_after(after).await?;
        self.mark_synced();
        let n = events.len();
        for (seq, stored, restored) in events {
            let set = self
                .state
                .load()
                .set
                .with_change(stored.revocation.clone(), restored)
                .map_err(|e| {
                    StoreError::Corrupt(format!("change {seq} cannot be enforced: {e}"))
                })?;
            self.publish(set, seq, stored.revocation, restored);
        }
        if n > 0 {
            tracing::debug!(after, changes = n, "applied changes committed elsewhere");
        }
        Ok(n)
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.state.load_full()
    }

    /// Drops from the enforced set the credential revocations whose
    /// credential expired more than [`EXPIRED_MARGIN`] before `now_ms`, so
    /// that the set (and every new sidecar's snapshot) stays bounded by the
    /// credentials still alive, not by every credential ever revoked. Sidecars
    /// already holding them keep them until their next snapshot: harmless.
    /// Returns how many were dropped.
    pub async fn prune_expired(&self, now_ms: i64) -> Result<usize, StoreError> {
        let margin = i64::try_from(EXPIRED_MARGIN.as_millis()).unwrap_or(i64::MAX);
        let expired = self
            .store
            .expired_credential_revocations(now_ms.saturating_sub(margin))
            .await?;
        if expired.is_empty() {
            return Ok(0);
        }
        let _write = self.write.lock().await;
        let current = self.state.load_full();
        let expired: std::collections::HashSet<&str> = expired.iter().map(String::as_str).collect();
        let before = current.set.len();
        let set = RevocationSet::new(
            current
                .set
                .active()
                .filter(|r| !expired.contains(r.id.as_str()))
                .cloned(),
        )
        .map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let dropped = before - set.len();
        if dropped > 0 {
            self.state.store(Arc::new(Snapshot {
                seq: current.seq,
                set,
            }));
            tracing::info!(
                dropped,
                "revocations of expired credentials no longer enforced"
            );
        }
        Ok(dropped)
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Change>> {
        self.changes.subscribe()
    }

    /// Validates and commits a revocation. Returns once it is durable.
    pub async fn revoke(
        &self,
        req: RevokeRequest,
        by: &str,
        policy: &ValidPolicy,
    ) -> Result<StoredRevocation, RevokeError> {
        let kind = RevocationKind::parse(&req.kind)
            .filter(|k| *k != RevocationKind::Leaked)
            .ok_or_else(|| {
                RevokeError::Invalid(format!(
                    "unknown revocation kind {:?}: use credential, grant, workload or upstream (leaked values: POST /v1/leaked)",
                    req.kind
                ))
            })?;
        let reason = check_reason(&req.reason)?;
        let needs = |field: &str, value: &str, wanted: bool| -> Result<(), RevokeError> {
            match (wanted, value.is_empty()) {
                (true, true) => Err(RevokeError::Invalid(format!(
                    "a {} revocation needs {field}",
                    kind.as_str()
                ))),
                (false, false) => Err(RevokeError::Invalid(format!(
                    "a {} revocation takes no {field}",
                    kind.as_str()
                ))),
                _ => Ok(()),
            }
        };
        needs(
            "workload",
            &req.workload,
            matches!(kind, RevocationKind::Grant | RevocationKind::Workload),
        )?;
        needs(
            "upstream",
            &req.upstream,
            matches!(kind, RevocationKind::Grant | RevocationKind::Upstream),
        )?;
        needs(
            "credential_id",
            &req.credential_id,
            kind == RevocationKind::Credential,
        )?;
        if !req.workload.is_empty() {
            WorkloadMatcher::parse(&req.workload).map_err(RevokeError::Invalid)?;
        }
        if !req.upstream.is_empty() && policy.upstream(&req.upstream).is_none() {
            return Err(RevokeError::Invalid(format!(
                "policy names no upstream {:?}",
                req.upstream
            )));
        }
        if kind == RevocationKind::Credential
            && self.store.credential(&req.credential_id).await?.is_none()
        {
            return Err(RevokeError::NotFound(format!(
                "no credential {:?} was issued",
                req.credential_id
            )));
        }

        let _write = self.write.lock().await;
        let current = self.state.load_full();
        let revocation = Revocation {
            id: format!("rev-{}", uuid::Uuid::new_v4().simple()),
            kind: kind.into(),
            workload: req.workload,
            upstream: req.upstream,
            credential_id: req.credential_id,
            reason: reason.to_owned(),
            revoked_by: by.to_owned(),
            revoked_at_ms: now_ms(),
            fingerprint: Vec::new(),
        };
        match self.commit(current, revocation, None).await? {
            Committed::New(stored) => Ok(*stored),
            Committed::Existing(id) => {
                Err(RevokeError::Conflict(format!("already revoked by {id}")))
            }
        }
    }

    /// Registers a leaked value: only its keyed fingerprint is kept, and it is
    /// refused by every sidecar wherever it appears. The caller's copy of the
    /// value is zeroized when dropped.
    /// Registers a leaked value. One registered already is a conflict, or,
    /// with `existing_ok`, that registration (the second value says new).
    pub async fn register_leaked(
        &self,
        value: zeroize::Zeroizing<String>,
        reason: &str,
        by: &str,
        existing_ok: bool,
    ) -> Result<(StoredRevocation, bool), RevokeError> {
        let value = value.trim();
        if value.len() < MIN_LEAKED_LEN {
            return Err(RevokeError::Invalid(format!(
                "a leaked value must be at least {MIN_LEAKED_LEN} bytes: shorter ones would match ordinary words"
            )));
        }
        if value.len() > 8192 {
            return Err(RevokeError::Invalid(
                "a leaked value must be at most 8192 bytes".into(),
            ));
        }
        let reason = check_reason(reason)?;
        let fp = fingerprint_bytes(fingerprint(&self.fingerprint_key, value.as_bytes()));
        let _write = self.write.lock().await;
        let current = self.state.load_full();
        let revocation = Revocation {
            id: format!("rev-{}", uuid::Uuid::new_v4().simple()),
            kind: RevocationKind::Leaked.into(),
            reason: reason.to_owned(),
            revoked_by: by.to_owned(),
            revoked_at_ms: now_ms(),
            fingerprint: fp,
            ..Default::default()
        };
        match self.commit(current, revocation, None).await? {
            Committed::New(stored) => Ok((*stored, true)),
            Committed::Existing(id) => {
                if existing_ok && let Some(stored) = self.store.revocation(&id).await? {
                    return Ok((stored, false));
                }
                Err(RevokeError::Conflict(format!("already registered as {id}")))
            }
        }
    }

    /// Revokes one version of a brokered secret: it is marked revoked (no
    /// longer leased) and its lease id is revoked like any credential, so
    /// sidecars drop it at once and fetch the current version. Both commit
    /// in one transaction.
    pub async fn revoke_secret_version(
        &self,
        upstream: &str,
        version: i64,
        reason: &str,
        by: &str,
    ) -> Result<StoredRevocation, RevokeError> {
        let reason = check_reason(reason)?;
        let _write = self.write.lock().await;
        let current = self.state.load_full();
        let revocation = Revocation {
            id: format!("rev-{}", uuid::Uuid::new_v4().simple()),
            kind: RevocationKind::Credential.into(),
            credential_id: crate::secrets::lease_id(upstream, version),
            reason: reason.to_owned(),
            revoked_by: by.to_owned(),
            revoked_at_ms: now_ms(),
            ..Default::default()
        };
        match self
            .commit(
                current,
                revocation,
                Some(SecretVersionRef { upstream, version }),
            )
            .await?
        {
            Committed::New(stored) => Ok(*stored),
            Committed::Existing(id) => {
                Err(RevokeError::Conflict(format!("already revoked by {id}")))
            }
        }
    }

    /// Commits and publishes; the write lock is held by the caller. With
    /// `secret_version`, that version is marked revoked in the same
    /// transaction (not found: nothing is committed). An active revocation
    /// saying the same, committed by any replica, commits nothing.
    async fn commit(
        &self,
        current: Arc<Snapshot>,
        revocation: Revocation,
        secret_version: Option<SecretVersionRef<'_>>,
    ) -> Result<Committed, RevokeError> {
        let by = revocation.revoked_by.clone();
        // Compiled before the commit: what sidecars could not enforce is
        // never committed.
        let set = current
            .set
            .with_change(revocation.clone(), false)
            .map_err(|e| RevokeError::Invalid(e.to_string()))?;
        let seq = match secret_version {
            None => match self.store.insert_revocation(&revocation).await? {
                Inserted::New(seq) => seq,
                Inserted::Existing(id) => return Ok(Committed::Existing(id)),
            },
            Some(SecretVersionRef { upstream, version }) => self
                .store
                .revoke_secret_version(upstream, version, &revocation)
                .await?
                .ok_or_else(|| {
                    RevokeError::NotFound(format!(
                        "no unrevoked version {version} of {upstream:?}'s secret"
                    ))
                })?,
        };
        if seq == current.seq + 1 {
            self.publish(set, seq, revocation.clone(), false);
        } else {
            // Another replica committed in between: its changes come first.
            self.catch_up_locked().await?;
        }
        tracing::info!(
            revocation_id = %revocation.id,
            kind = %revocation.kind,
            seq,
            by = %by,
            "revocation committed"
        );
        Ok(Committed::New(Box::new(StoredRevocation {
            revocation,
            revoke_seq: seq,
            restored: None,
        })))
    }

    /// Restores an active grant, workload or upstream revocation.
    pub async fn restore(
        &self,
        id: &str,
        by: &str,
        reason: &str,
    ) -> Result<StoredRevocation, RevokeError> {
        let reason = check_reason(reason)?;
        let _write = self.write.lock().await;
        let stored = self
            .store
            .revocation(id)
            .await?
            .ok_or_else(|| RevokeError::NotFound(format!("no revocation {id:?}")))?;
        if !RevocationKind::of(&stored.revocation).is_some_and(RevocationKind::restorable) {
            return Err(RevokeError::Conflict(
                "a revoked credential stays revoked; issue a new one".into(),
            ));
        }
        let at_ms = now_ms();
        let seq = self
            .store
            .restore_revocation(id, by, reason, at_ms)
            .await?
            .ok_or_else(|| RevokeError::Conflict(format!("revocation {id} is already restored")))?;
        let current = self.state.load_full();
        if seq == current.seq + 1 {
            let set = current
                .set
                .with_change(stored.revocation.clone(), true)
                .map_err(|e| RevokeError::Invalid(e.to_string()))?;
            self.publish(set, seq, stored.revocation.clone(), true);
        } else {
            self.catch_up_locked().await?;
        }
        tracing::info!(revocation_id = %id, seq, by, "revocation restored");
        self.store
            .revocation(id)
            .await?
            .ok_or_else(|| RevokeError::NotFound(format!("no revocation {id:?}")))
    }

    /// Called with the write lock held, right after the commit.
    fn publish(&self, set: RevocationSet, seq: u64, revocation: Revocation, restored: bool) {
        self.state.store(Arc::new(Snapshot { seq, set }));
        self.metrics
            .revocations_committed
            .fetch_add(1, Ordering::Relaxed);
        // No receivers is fine: no sidecar is connected.
        let _ = self.changes.send(Arc::new(Change {
            seq,
            revocation,
            restored,
            committed_at: Instant::now(),
        }));
    }

    pub fn store(&self) -> &Store {
        &self.store
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::test_db::store_test;
    use std::time::Duration;
    use zeroize::Zeroizing;

    fn leaked(v: &str) -> Zeroizing<String> {
        Zeroizing::new(v.to_owned())
    }

    store_test!(
        /// Two replicas on one database: one sequence, one truth.
        async fn replicas_share_one_sequence_and_one_set(db: &TestDb) {
            let a = RevocationLog::open(db.open(None).await.unwrap(), Arc::default())
                .await
                .unwrap();
            let b = RevocationLog::open(db.open(None).await.unwrap(), Arc::default())
                .await
                .unwrap();
            let wakeups = b.store().change_wakeups();
            let mut seen_by_b = b.subscribe();

            let (first, new) = a
                .register_leaked(leaked("sk_live_first_leaked_value"), "r", "t", false)
                .await
                .unwrap();
            assert!(new);
            assert_eq!(first.revoke_seq, 1);
            if db.backend() == crate::store::Backend::Postgres {
                // The commit notifies the other replica.
                tokio::time::timeout(Duration::from_secs(10), wakeups.notified())
                    .await
                    .expect("a commit on one replica wakes the other");
            }

            // B has not read it yet; the store still refuses the duplicate.
            assert_eq!(b.snapshot().seq, 0);
            let dup = b
                .register_leaked(leaked("sk_live_first_leaked_value"), "r", "t", false)
                .await
                .unwrap_err();
            assert!(
                matches!(&dup, RevokeError::Conflict(m) if m.contains(&first.revocation.id)),
                "{dup:?}"
            );
            let (existing, new) = b
                .register_leaked(leaked("sk_live_first_leaked_value"), "r", "t", true)
                .await
                .unwrap();
            assert!(!new);
            assert_eq!(existing.revocation.id, first.revocation.id);

            // B's own commit comes after A's: B publishes both, in order.
            let (second, _) = b
                .register_leaked(leaked("sk_live_second_leaked_value"), "r", "t", false)
                .await
                .unwrap();
            assert_eq!(second.revoke_seq, 2);
            for want in [1, 2] {
                let change = seen_by_b.try_recv().unwrap();
                assert_eq!(change.seq, want);
            }
            assert_eq!(b.snapshot().seq, 2);
            assert_eq!(b.snapshot().set.len(), 2);

            // A catches up with B's commit.
            assert_eq!(a.snapshot().seq, 1);
            assert_eq!(a.catch_up().await.unwrap(), 1);
            assert_eq!(a.snapshot().seq, 2);
            assert!(a.snapshot().set.get(&second.revocation.id).is_some());
            a.store().close().await;
            b.store().close().await;
        }
    );

    store_test!(
        /// A replica vouches for its state only while it reads the store.
        async fn a_replica_that_cannot_read_the_store_falls_out_of_sync(db: &TestDb) {
            let log = RevocationLog::open(db.open(None).await.unwrap(), Arc::default())
                .await
                .unwrap();
            log.catch_up().await.unwrap();
            assert!(log.in_sync(Duration::from_secs(5)));
            log.store().close().await;
            assert!(log.catch_up().await.is_err());
            tokio::time::sleep(Duration::from_millis(20)).await;
            assert!(!log.in_sync(Duration::from_millis(10)));
            assert!(
                log.in_sync(Duration::from_secs(5)),
                "the last good read still counts"
            );
        }
    );
}
