//! The control plane's live state, shared by its servers.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use leash_api::policy::{self, PolicyError, ValidPolicy};
use ring::digest;

use tokio::sync::watch;

use crate::jwt::JwtIssuer;
use crate::metrics::Metrics;
use crate::revocations::RevocationLog;
use crate::sessions::SessionRegistry;
use crate::store::Store;

/// A validated policy and a short content hash that names its version.
pub struct PolicySnapshot {
    pub policy: ValidPolicy,
    pub version: String,
}

impl PolicySnapshot {
    pub fn load(path: &Path) -> Result<Self, PolicyError> {
        let policy = policy::load(path)?;
        let text = std::fs::read(path).unwrap_or_default();
        let hash = digest::digest(&digest::SHA256, &text);
        let version = hash.as_ref()[..8]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        Ok(Self { policy, version })
    }
}

pub struct ControlPlaneState {
    pub policy_path: PathBuf,
    pub policy: ArcSwap<PolicySnapshot>,
    /// Signalled after each policy reload (sessions push new routes).
    pub policy_changed: watch::Sender<()>,
    pub issuer: JwtIssuer,
    pub store: Store,
    pub revocations: RevocationLog,
    pub sessions: Arc<SessionRegistry>,
    pub metrics: Arc<Metrics>,
    pub master_key: Option<Arc<crate::secrets::MasterKey>>,
    pub tokens: crate::oauth2::TokenCache,
    /// Temporary AWS credentials per (upstream, workload).
    pub sts: crate::sts::StsCache,
    /// Security events received from SSF transmitters.
    pub ssf: crate::ssf::SsfReceiver,
    /// Security events this control plane transmits.
    pub ssf_out: crate::ssf_out::SsfOut,
    pub otel: Option<leash_api::telemetry::Otel>,
    /// Admin-API calls refused for want of a valid token, summarised into
    /// the audit log once a minute.
    pub refused: crate::unauthenticated::RefusedCalls,
    /// Deactivation probes of revoked secret versions and their limits.
    pub prober: crate::probes::Prober,
    /// How long after its last read of the store this replica still vouches
    /// for its state (see [`crate::revocations::sync_limit`]).
    pub sync_limit: Duration,
    /// This replica among the others on the store.
    pub replica: crate::replicas::Replica,
}

impl ControlPlaneState {
    /// Re-reads the policy file whenever its modification time changes. An
    /// invalid edit is logged and the last good policy stays in force.
    pub async fn watch_policy(self: Arc<Self>, every: Duration) {
        let mtime = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
        let mut last: Option<SystemTime> = mtime(&self.policy_path);
        loop {
            tokio::time::sleep(every).await;
            let now = mtime(&self.policy_path);
            if now == last {
                continue;
            }
            last = now;
            match PolicySnapshot::load(&self.policy_path) {
                Ok(snapshot) => {
                    tracing::info!(version = %snapshot.version, "policy reloaded");
                    self.policy.store(Arc::new(snapshot));
                    self.policy_changed.send_replace(());
                    self.metrics.policy_reloads.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => {
                    tracing::error!("{e}; keeping policy {}", self.policy.load().version);
                    self.metrics.policy_rejected.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
}
