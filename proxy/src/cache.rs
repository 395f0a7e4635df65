//! Short-lived credentials, cached per upstream and refreshed ahead of
//! expiry. One fetch is in flight per upstream at a time (moka coalesces
//! concurrent misses); a hit costs a hash lookup and an `Arc` clone, and the
//! header value is pre-built so the hot path allocates nothing for it.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use moka::Expiry;
use moka::future::Cache;

use crate::control::{ControlError, ControlLink, Issuer};
pub use crate::credential::CachedCredential;
use crate::credential::RenderError;
use crate::identity::WorkloadIdentity;
use crate::metrics::Metrics;
use crate::revocation::RevocationState;
use crate::routes::EgressRoute;
use crate::usage::Usage;

struct UseUntil;

impl Expiry<Arc<str>, Arc<CachedCredential>> for UseUntil {
    fn expire_after_create(
        &self,
        _: &Arc<str>,
        value: &Arc<CachedCredential>,
        now: Instant,
    ) -> Option<Duration> {
        Some(value.use_until.saturating_duration_since(now))
    }
}

#[derive(Clone)]
pub struct CredentialCache {
    cache: Cache<Arc<str>, Arc<CachedCredential>>,
    handles: Arc<CacheHandles>,
}

impl CredentialCache {
    pub fn new(handles: CacheHandles) -> Self {
        Self {
            cache: Cache::builder()
                .max_capacity(10_000)
                .expire_after(UseUntil)
                .build(),
            handles: Arc::new(handles),
        }
    }

    pub async fn get(
        &self,
        route: &Arc<EgressRoute>,
    ) -> Result<Arc<CachedCredential>, CredentialError> {
        // Fast path: the route's current credential, while it needs no refresh.
        if let Some(c) = route.current.load().as_ref()
            && Instant::now() < c.refresh_at
            && !c.revoked.is_cancelled()
        {
            self.handles
                .metrics
                .cache
                .hits
                .fetch_add(1, Ordering::Relaxed);
            return Ok(c.clone());
        }
        // Boxed: the slow path's future (moka's) is large, and keeping it out
        // of line keeps every request's future small and cheap to move.
        let c = Box::pin(self.get_slow(route)).await?;
        route.current.store(Some(c.clone()));
        Ok(c)
    }

    async fn get_slow(
        &self,
        route: &Arc<EgressRoute>,
    ) -> Result<Arc<CachedCredential>, CredentialError> {
        let metrics = &self.handles.metrics.cache;
        if let Some(c) = self.cache.get(&route.name).await
            && (c.revoked.is_cancelled() || c.route_generation != route.generation)
        {
            // Cut by a revocation (perhaps one since restored), or rendered
            // for a route a policy edit has since changed: never used again.
            self.cache.invalidate(&route.name).await;
        } else if let Some(c) = self.cache.get(&route.name).await {
            metrics.hits.fetch_add(1, Ordering::Relaxed);
            if Instant::now() >= c.refresh_at && !c.refreshing.swap(true, Ordering::AcqRel) {
                let this = self.clone();
                let route = route.clone();
                tokio::spawn(async move {
                    let metrics = &this.handles.metrics.cache;
                    match this.handles.fetch(&route).await {
                        Ok(fresh) => {
                            metrics.refreshes.fetch_add(1, Ordering::Relaxed);
                            this.cache.insert(route.name.clone(), fresh).await
                        }
                        Err(e) => {
                            metrics.fetch_errors.fetch_add(1, Ordering::Relaxed);
                            tracing::warn!(upstream = %route.name, error = %e, "credential refresh failed; will retry");
                            // Let the next hit try again.
                            if let Some(c) = this.cache.get(&route.name).await {
                                c.refreshing.store(false, Ordering::Release);
                            }
                        }
                    }
                });
            }
            return Ok(c);
        }
        // Counted inside: of concurrent misses only one fetches.
        let fetch_counted = async {
            metrics.misses.fetch_add(1, Ordering::Relaxed);
            let r = self.handles.fetch(route).await;
            if r.is_err() {
                metrics.fetch_errors.fetch_add(1, Ordering::Relaxed);
            }
            r
        };
        self.cache
            .try_get_with(route.name.clone(), fetch_counted)
            .await
            .map_err(|e: Arc<CredentialError>| (*e).clone())
    }

    /// Drops the cached credential of `route`, so the next request fetches a new one.
    pub async fn invalidate(&self, route: &EgressRoute) {
        route.current.store(None);
        self.cache.invalidate(&route.name).await;
    }

    /// Drops every cached credential that a revocation cut (they are
    /// already refused at every commit; this frees the cache slot so the
    /// next request fetches anew). Returns how many.
    pub async fn drop_cut(&self) -> usize {
        let mut n = 0;
        for (key, cred) in self.cache.iter() {
            if cred.revoked.is_cancelled() {
                self.cache.invalidate(&*key).await;
                n += 1;
            }
        }
        n
    }
}

/// Why no credential could be had for a route.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CredentialError {
    /// The control plane refused (no grant, revoked, no secret stored).
    #[error("denied ({code}): {message}")]
    Denied { code: String, message: String },
    #[error(transparent)]
    Control(ControlError),
    #[error(transparent)]
    Render(#[from] RenderError),
}

/// What fetching a credential needs: the control plane to ask, the state a
/// new credential is registered with for revocation, and its usage cell.
pub struct CacheHandles {
    pub issuer: Arc<Issuer>,
    pub identity: Arc<WorkloadIdentity>,
    pub revocations: Arc<RevocationState>,
    pub usage: Arc<Usage>,
    pub metrics: Arc<Metrics>,
}

impl CacheHandles {
    /// The handles a sidecar's link keeps current.
    pub fn of(link: &ControlLink) -> Self {
        Self {
            issuer: link.issuer.clone(),
            identity: link.identity.clone(),
            revocations: link.revocations.clone(),
            usage: link.usage.clone(),
            metrics: link.metrics.clone(),
        }
    }

    async fn fetch(&self, route: &EgressRoute) -> Result<Arc<CachedCredential>, CredentialError> {
        let cred = self.issuer.issue(&route.name).await.map_err(|e| match e {
            ControlError::Denied { code, message } => CredentialError::Denied { code, message },
            other => CredentialError::Control(other),
        })?;
        let usage = self.usage.cell(&cred.id, &route.name, &cred.kind);
        let credential = CachedCredential::from_issued(cred, route.render_for(), usage)?;
        // Tracked until its last stream ends, whatever the cache does with it.
        self.revocations.live.register(&credential);
        // Fetched while a revocation covering it was being applied: the
        // revocation's cut may have run before the registration above.
        let set = self.revocations.set.load();
        if set.credential_revoked(&credential.id)
            || set
                .check(&self.identity.id(), &credential.upstream)
                .is_some()
        {
            credential.revoked.cancel();
        }
        Ok(credential)
    }
}
