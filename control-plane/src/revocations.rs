//! The revocation log: validates, commits (durably, with the next sequence),
//! then publishes each change to the sidecar sessions. Commit and publish
//! happen under one lock so that sessions see sequences in order.

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
use crate::store::{Store, StoreError, StoredRevocation, now_ms};

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
        })
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
        if let Some(dup) = current.set.active().find(|r| {
            r.kind() == kind
                && r.workload == req.workload
                && r.upstream == req.upstream
                && r.credential_id == req.credential_id
        }) {
            return Err(RevokeError::Conflict(format!(
                "already revoked by {}",
                dup.id
            )));
        }
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
        self.commit(current, revocation, None).await
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
        if let Some(dup) = current
            .set
            .active()
            .find(|r| r.kind() == RevocationKind::Leaked && r.fingerprint == fp)
        {
            if existing_ok && let Some(stored) = self.store.revocation(&dup.id).await? {
                return Ok((stored, false));
            }
            return Err(RevokeError::Conflict(format!(
                "already registered as {}",
                dup.id
            )));
        }
        let revocation = Revocation {
            id: format!("rev-{}", uuid::Uuid::new_v4().simple()),
            kind: RevocationKind::Leaked.into(),
            reason: reason.to_owned(),
            revoked_by: by.to_owned(),
            revoked_at_ms: now_ms(),
            fingerprint: fp,
            ..Default::default()
        };
        Ok((self.commit(current, revocation, None).await?, true))
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
        self.commit(
            current,
            revocation,
            Some(SecretVersionRef { upstream, version }),
        )
        .await
    }

    /// Commits and publishes; the write lock is held by the caller. With
    /// `secret_version`, that version is marked revoked in the same
    /// transaction (not found: nothing is committed).
    async fn commit(
        &self,
        current: Arc<Snapshot>,
        revocation: Revocation,
        secret_version: Option<SecretVersionRef<'_>>,
    ) -> Result<StoredRevocation, RevokeError> {
        let by = revocation.revoked_by.clone();
        // Compiled before the commit: what sidecars could not enforce is
        // never committed.
        let set = current
            .set
            .with_change(revocation.clone(), false)
            .map_err(|e| RevokeError::Invalid(e.to_string()))?;
        let seq = match secret_version {
            None => self.store.insert_revocation(&revocation).await?,
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
        self.publish(set, seq, revocation.clone(), false);
        tracing::info!(
            revocation_id = %revocation.id,
            kind = %revocation.kind,
            seq,
            by = %by,
            "revocation committed"
        );
        Ok(StoredRevocation {
            revocation,
            revoke_seq: seq,
            restored: None,
        })
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
        let set = current
            .set
            .with_change(stored.revocation.clone(), true)
            .map_err(|e| RevokeError::Invalid(e.to_string()))?;
        self.publish(set, seq, stored.revocation.clone(), true);
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
