//! Short-lived credentials, cached per upstream and refreshed ahead of
//! expiry. One fetch is in flight per upstream at a time (moka coalesces
//! concurrent misses); a hit costs a hash lookup and an `Arc` clone, and the
//! header value is pre-built so the hot path allocates nothing for it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use bytes::Bytes;
use http::HeaderValue;
use moka::Expiry;
use moka::future::Cache;
use tokio_util::sync::CancellationToken;

use crate::control::{ControlError, ControlLink};
use crate::routes::{EgressRoute, InjectHow};

/// The credential as it will be injected.
pub struct CachedCredential {
    pub id: Arc<str>,
    pub upstream: Arc<str>,
    pub value: InjectValue,
    /// The forms in which the credential could come back in a response
    /// header (the raw secret, percent-encoded, Basic's base64), looked for
    /// in every response and removed (zeroized on drop).
    pub echo_forms: Vec<Bytes>,
    /// Cancelled when the credential is revoked: streams opened with it are cut.
    pub revoked: CancellationToken,
    /// What was forwarded with it.
    pub usage: Arc<crate::usage::UsageCell>,
    /// The build of the route it was rendered for (see `EgressRoute::generation`).
    route_generation: u64,
    /// After this, hits trigger a background refresh.
    refresh_at: Instant,
    /// After this, the credential is never used (it leaves the cache).
    use_until: Instant,
    refreshing: AtomicBool,
}

impl std::fmt::Debug for CachedCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CachedCredential")
            .field("id", &self.id)
            .field("value", &"<redacted>")
            .finish_non_exhaustive()
    }
}

/// Pre-rendered injection. The buffers behind both variants are zeroized
/// when the last reference is dropped.
pub enum InjectValue {
    Header(HeaderValue),
    /// Already percent-encoded query value.
    Query(Bytes),
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum CredentialError {
    #[error("denied ({code}): {message}")]
    Denied { code: String, message: String },
    #[error("{0}")]
    Unavailable(String),
}

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
    link: Arc<ControlLink>,
}

impl CredentialCache {
    pub fn new(link: Arc<ControlLink>) -> Self {
        Self {
            cache: Cache::builder()
                .max_capacity(10_000)
                .expire_after(UseUntil)
                .build(),
            link,
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
            self.link.metrics.cache.hits.fetch_add(1, Ordering::Relaxed);
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
        let metrics = &self.link.metrics.cache;
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
                    let metrics = &this.link.metrics.cache;
                    match fetch(&this.link, &route).await {
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
            let r = fetch(&self.link, route).await;
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

async fn fetch(
    link: &ControlLink,
    route: &EgressRoute,
) -> Result<Arc<CachedCredential>, CredentialError> {
    let cred = link.issue(&route.name).await.map_err(|e| match e {
        ControlError::Denied { code, message } => CredentialError::Denied { code, message },
        other => CredentialError::Unavailable(other.to_string()),
    })?;
    CachedCredential::from_issued(link, route, cred)
}

impl CachedCredential {
    /// Renders a credential the control plane issued for `route` into its
    /// injected form, with the times it is refreshed at and used until.
    pub fn from_issued(
        link: &ControlLink,
        route: &EgressRoute,
        cred: leash_api::v1::Credential,
    ) -> Result<Arc<Self>, CredentialError> {
        let secret = zeroize::Zeroizing::new(cred.secret);
        let value = render(&route.inject, &secret).ok_or_else(|| {
            CredentialError::Unavailable("credential is not valid in a header".into())
        })?;
        let echo_forms = echo_forms(&secret, &value);

        // Times come as Unix milliseconds; map them onto the monotonic clock.
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
            .unwrap_or(0);
        let lifetime = Duration::from_millis(
            u64::try_from(cred.expires_at_unix_ms - cred.issued_at_unix_ms).unwrap_or(0),
        );
        let remaining =
            Duration::from_millis(u64::try_from(cred.expires_at_unix_ms - now_ms).unwrap_or(0));
        // Stop using a credential a little before it expires (10% of its life, at
        // most 5 s) so that a request in flight does not arrive with an expired one,
        // and start refreshing at 75% of its life.
        let margin = (lifetime / 10).min(Duration::from_secs(5));
        let now = Instant::now();
        let use_until = now + remaining.saturating_sub(margin);
        let refresh_at = now + remaining.saturating_sub(lifetime / 4);
        if use_until <= now {
            return Err(CredentialError::Unavailable(
                "credential arrived already expired (clock skew?)".into(),
            ));
        }
        tracing::debug!(credential_id = %cred.id, upstream = %route.name, ?remaining, "credential cached");
        let credential = Arc::new(CachedCredential {
            usage: link.usage.cell(&cred.id, &route.name, &cred.kind),
            id: cred.id.into(),
            upstream: route.name.clone(),
            value,
            echo_forms,
            revoked: CancellationToken::new(),
            refresh_at,
            use_until,
            refreshing: AtomicBool::new(false),
            route_generation: route.generation,
        });
        // Tracked until its last stream ends, whatever the cache does with it.
        link.revocations.live.register(&credential);
        // Fetched while a revocation covering it was being applied: the
        // revocation's cut may have run before the registration above.
        let set = link.revocations.set.load();
        if set.credential_revoked(&credential.id)
            || set
                .check(&link.workload_id(), &credential.upstream)
                .is_some()
        {
            credential.revoked.cancel();
        }
        Ok(credential)
    }
}

/// Shortest secret looked for in responses: shorter ones would match by chance.
const MIN_ECHO_LEN: usize = 8;

fn echo_forms(secret: &[u8], value: &InjectValue) -> Vec<Bytes> {
    let owned = |b: &[u8]| Bytes::from_owner(zeroize::Zeroizing::new(b.to_vec()));
    let mut forms = Vec::new();
    if secret.len() >= MIN_ECHO_LEN {
        forms.push(owned(secret));
    }
    match value {
        InjectValue::Query(encoded) if encoded.as_ref() != secret => forms.push(encoded.clone()),
        InjectValue::Header(v) => {
            if let Some(b64) = v.as_bytes().strip_prefix(b"Basic ") {
                forms.push(owned(b64));
            }
        }
        InjectValue::Query(_) => {}
    }
    forms
}

/// Builds the injected bytes once, in a buffer that is zeroized on drop.
fn render(how: &InjectHow, secret: &[u8]) -> Option<InjectValue> {
    let token = std::str::from_utf8(secret).ok()?;
    let rendered: Vec<u8> = match how {
        InjectHow::Header { prefix, suffix, .. } => {
            [prefix.as_bytes(), secret, suffix.as_bytes()].concat()
        }
        InjectHow::Basic { username } => {
            let mut raw =
                zeroize::Zeroizing::new(Vec::with_capacity(username.len() + 1 + secret.len()));
            raw.extend_from_slice(username.as_bytes());
            raw.push(b':');
            raw.extend_from_slice(secret);
            let mut v = b"Basic ".to_vec();
            v.extend_from_slice(
                base64::engine::general_purpose::STANDARD
                    .encode(&*raw)
                    .as_bytes(),
            );
            v
        }
        InjectHow::Query { .. } => {
            let encoded: String = token
                .bytes()
                .flat_map(|b| {
                    if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                        vec![b as char]
                    } else {
                        format!("%{b:02X}").chars().collect()
                    }
                })
                .collect();
            return Some(InjectValue::Query(Bytes::from_owner(
                zeroize::Zeroizing::new(encoded.into_bytes()),
            )));
        }
    };
    let bytes = Bytes::from_owner(zeroize::Zeroizing::new(rendered));
    let mut value = HeaderValue::from_maybe_shared(bytes).ok()?;
    value.set_sensitive(true);
    Some(InjectValue::Header(value))
}
