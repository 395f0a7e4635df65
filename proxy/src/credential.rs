//! A credential as the sidecar injects it: how a route puts it into a
//! request, the pre-rendered value (zeroized when the last reference goes),
//! the forms in which it could echo back, its lifetimes on the monotonic
//! clock, and the token that cuts every stream using it when it is revoked.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use bytes::Bytes;
use http::{HeaderName, HeaderValue};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC};
use tokio_util::sync::CancellationToken;

use crate::usage::UsageCell;

/// How the credential goes into the request.
#[derive(Debug, Clone)]
pub enum InjectHow {
    /// `name: {prefix}{token}{suffix}`.
    Header {
        name: HeaderName,
        prefix: String,
        suffix: String,
    },
    Basic {
        username: String,
    },
    Query {
        param: String,
    },
    /// Each request signed (AWS SigV4) with the credential.
    SigV4(crate::sigv4::SigV4Spec),
}

impl InjectHow {
    /// The header the credential is written to, if any.
    pub fn header(&self) -> Option<&HeaderName> {
        match self {
            Self::Header { name, .. } => Some(name),
            Self::Basic { .. } => Some(&http::header::AUTHORIZATION),
            Self::SigV4(spec) if !spec.query => Some(&http::header::AUTHORIZATION),
            Self::Query { .. } | Self::SigV4(_) => None,
        }
    }
}

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
    pub usage: Arc<UsageCell>,
    /// The build of the route it was rendered for (see `EgressRoute::generation`).
    pub(crate) route_generation: u64,
    /// After this, hits trigger a background refresh.
    pub(crate) refresh_at: Instant,
    /// After this, the credential is never used (it leaves the cache).
    pub(crate) use_until: Instant,
    pub(crate) refreshing: AtomicBool,
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
    /// The key requests are signed with.
    Aws(crate::sigv4::AwsSecret),
}

/// Why an issued credential cannot be used as it came.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RenderError {
    #[error("credential is not valid in a header")]
    NotHeaderSafe,
    #[error("credential arrived already expired (clock skew?)")]
    AlreadyExpired,
}

impl CachedCredential {
    /// Renders a credential the control plane issued for a route into its
    /// injected form, with the times it is refreshed at and used until.
    /// The caller registers it for revocation (see `CredentialCache`).
    pub fn from_issued(
        cred: leash_api::v1::Credential,
        route: RenderFor<'_>,
        usage: Arc<UsageCell>,
    ) -> Result<Arc<Self>, RenderError> {
        let secret = zeroize::Zeroizing::new(cred.secret);
        let value = render(route.inject, &secret).ok_or(RenderError::NotHeaderSafe)?;
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
            return Err(RenderError::AlreadyExpired);
        }
        tracing::debug!(credential_id = %cred.id, upstream = %route.upstream, ?remaining, "credential cached");
        Ok(Arc::new(CachedCredential {
            usage,
            id: cred.id.into(),
            upstream: route.upstream.clone(),
            value,
            echo_forms,
            revoked: CancellationToken::new(),
            refresh_at,
            use_until,
            refreshing: AtomicBool::new(false),
            route_generation: route.generation,
        }))
    }
}

/// The route a credential is rendered for.
#[derive(Clone, Copy)]
pub struct RenderFor<'a> {
    pub upstream: &'a Arc<str>,
    pub inject: &'a InjectHow,
    /// See `EgressRoute::generation`.
    pub generation: u64,
}

/// Everything but RFC 3986's unreserved characters is percent-encoded in
/// an injected query value.
const QUERY_VALUE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// Shortest secret looked for in responses: shorter ones would match by chance.
const MIN_ECHO_LEN: usize = 8;

fn echo_forms(secret: &[u8], value: &InjectValue) -> Vec<Bytes> {
    let owned = |b: &[u8]| Bytes::from_owner(zeroize::Zeroizing::new(b.to_vec()));
    let mut forms = Vec::new();
    if let InjectValue::Aws(key) = value {
        // Only the signature is sent; the key itself must never come back.
        return key
            .secrets()
            .filter(|s| s.len() >= MIN_ECHO_LEN)
            .map(owned)
            .collect();
    }
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
        InjectValue::Query(_) | InjectValue::Aws(_) => {}
    }
    forms
}

/// Builds the injected bytes once, in a buffer that is zeroized on drop.
fn render(how: &InjectHow, secret: &[u8]) -> Option<InjectValue> {
    if let InjectHow::SigV4(_) = how {
        return crate::sigv4::AwsSecret::parse(secret).map(InjectValue::Aws);
    }
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
        InjectHow::SigV4(_) => return None,
        InjectHow::Query { .. } => {
            let encoded = percent_encoding::utf8_percent_encode(token, QUERY_VALUE).to_string();
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
