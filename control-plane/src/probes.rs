//! Deactivation probes: proof that a provider itself refuses a revoked
//! secret version, not only the sidecars. After a revocation the control
//! plane (which still holds the version, sealed) sends the upstream's
//! `deactivation_probe` once to its `target`, with the old value injected as
//! the policy injects it, and records the answer's status. A probe is never
//! retried, never sent with a version that is not revoked, and rate-limited
//! per version and per upstream.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::Full;
use leash_api::policy::{DeactivationProbe, InjectSpec, Upstream, ValidPolicy};
use zeroize::Zeroizing;

use crate::secrets::SecretError;
use crate::state::ControlPlaneState;
use crate::store::{ProbeResult, StoreError, now_ms};

/// How long a provider has to answer, unless `--probe-timeout` says otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// One probe of a version per this long (the automatic one included).
pub const PER_VERSION_EVERY: Duration = Duration::from_secs(60);
/// Probes of one upstream per minute, all versions together.
pub const PER_UPSTREAM_PER_MINUTE: usize = 10;

/// What a probe found; `Limited` is a probe not sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The provider answered with a status the policy expects: refused.
    Dead,
    /// Any other status: the provider may still accept the value.
    Alive,
    /// No answer (unreachable, TLS failure, timeout).
    Error,
    /// Not sent: over a rate limit.
    Limited,
}

impl Outcome {
    pub const ALL: [Self; 4] = [Self::Dead, Self::Alive, Self::Error, Self::Limited];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Dead => "dead",
            Self::Alive => "alive",
            Self::Error => "error",
            Self::Limited => "limited",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("policy names no upstream {0:?}")]
    UnknownUpstream(String),
    #[error("upstream {0:?} declares no deactivation_probe in policy")]
    NoProbe(String),
    #[error("no version {version} of {upstream:?}'s secret")]
    NoVersion { upstream: String, version: i64 },
    #[error(
        "version {version} of {upstream:?}'s secret is not revoked: Leash never sends a live secret to prove anything"
    )]
    NotRevoked { upstream: String, version: i64 },
    #[error("{why}; try again in {}s", retry_after.as_secs().max(1))]
    Limited { why: String, retry_after: Duration },
    #[error(transparent)]
    Secret(#[from] SecretError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Sends probes and keeps their rate limits (in memory: a restart allows
/// one more probe of a version, never a loop).
pub struct Prober {
    timeout: Duration,
    limits: Mutex<Limits>,
}

#[derive(Default)]
struct Limits {
    /// When each (upstream, version) was last probed.
    last: HashMap<(String, i64), Instant>,
    /// When each upstream was probed within the last minute, oldest first.
    recent: HashMap<String, VecDeque<Instant>>,
}

impl Prober {
    pub fn new(timeout: Duration) -> Self {
        Self {
            timeout,
            limits: Mutex::default(),
        }
    }

    /// Takes a slot for one probe of `upstream`'s `version` now, or says
    /// which limit refuses it.
    fn admit(&self, upstream: &str, version: i64) -> Result<(), ProbeError> {
        let now = Instant::now();
        let mut limits = self
            .limits
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let key = (upstream.to_owned(), version);
        if let Some(last) = limits.last.get(&key)
            && now.duration_since(*last) < PER_VERSION_EVERY
        {
            return Err(ProbeError::Limited {
                why: format!(
                    "version {version} of {upstream:?} was probed {}s ago (at most once a minute)",
                    now.duration_since(*last).as_secs()
                ),
                retry_after: PER_VERSION_EVERY - now.duration_since(*last),
            });
        }
        let minute = Duration::from_secs(60);
        let recent = limits.recent.entry(upstream.to_owned()).or_default();
        while recent
            .front()
            .is_some_and(|t| now.duration_since(*t) >= minute)
        {
            recent.pop_front();
        }
        if recent.len() >= PER_UPSTREAM_PER_MINUTE
            && let Some(oldest) = recent.front()
        {
            return Err(ProbeError::Limited {
                why: format!(
                    "{upstream:?} was probed {PER_UPSTREAM_PER_MINUTE} times in the last minute"
                ),
                retry_after: minute - now.duration_since(*oldest),
            });
        }
        recent.push_back(now);
        limits.last.insert(key, now);
        // Versions probed over a minute ago no longer limit anything.
        limits
            .last
            .retain(|_, at| now.duration_since(*at) < PER_VERSION_EVERY);
        Ok(())
    }
}

/// After `upstream`'s `version` was revoked: one probe in the background,
/// if the upstream declares one. The revocation does not wait for it.
pub fn after_revocation(cp: &Arc<ControlPlaneState>, upstream: &str, version: i64) {
    let declared = cp
        .policy
        .load()
        .policy
        .upstream(upstream)
        .is_some_and(|u| u.deactivation_probe.is_some());
    if !declared {
        return;
    }
    let cp = cp.clone();
    let upstream = upstream.to_owned();
    tokio::spawn(async move {
        if let Err(e) = probe(&cp, &upstream, version).await {
            tracing::warn!(%upstream, version, error = %e, "deactivation probe not sent");
        }
    });
}

/// Probes a revoked version once (subject to the limits) and records the
/// result.
pub async fn probe(
    cp: &ControlPlaneState,
    upstream: &str,
    version: i64,
) -> Result<ProbeResult, ProbeError> {
    let snapshot = cp.policy.load_full();
    let up = snapshot
        .policy
        .upstream(upstream)
        .ok_or_else(|| ProbeError::UnknownUpstream(upstream.to_owned()))?;
    let spec = up
        .deactivation_probe
        .as_ref()
        .ok_or_else(|| ProbeError::NoProbe(upstream.to_owned()))?;
    let stored = cp
        .store
        .secret_version(upstream, version)
        .await?
        .ok_or_else(|| ProbeError::NoVersion {
            upstream: upstream.to_owned(),
            version,
        })?;
    if stored.revoked_at_ms.is_none() {
        return Err(ProbeError::NotRevoked {
            upstream: upstream.to_owned(),
            version,
        });
    }
    let key = cp.master_key.as_ref().ok_or(SecretError::NoMasterKey)?;
    if let Err(e) = cp.prober.admit(upstream, version) {
        cp.metrics.count_probe(Outcome::Limited);
        return Err(e);
    }
    let value = key.open(&stored)?;
    let at_ms = now_ms();
    let (status, outcome, detail) =
        send(&snapshot.policy, up, spec, &value, cp.prober.timeout).await;
    drop(value);
    let result = ProbeResult {
        upstream: upstream.to_owned(),
        version,
        at_ms,
        status,
        outcome: outcome.as_str().to_owned(),
        detail,
    };
    cp.metrics.count_probe(outcome);
    tracing::info!(
        upstream,
        version,
        status,
        outcome = outcome.as_str(),
        detail = %result.detail,
        "deactivation probe"
    );
    cp.store.insert_probe_result(&result).await?;
    Ok(result)
}

/// Sends the probe with `value` and judges the answer: (status, outcome,
/// detail). The detail never holds the value.
async fn send(
    policy: &ValidPolicy,
    up: &Upstream,
    spec: &DeactivationProbe,
    value: &[u8],
    timeout: Duration,
) -> (Option<u16>, Outcome, String) {
    let attempt = async {
        let request = request(up, spec, value)?;
        let trust = up.tls.as_ref().map(|t| crate::https::Trust {
            ca_pem: policy.ca_pems.get(&up.name).map(String::as_str),
            ca_only: t.ca_only,
            server_name: t.server_name.as_deref(),
        });
        let (roots, name) = crate::https::upstream_trust(&trust.unwrap_or_default())?;
        let client = crate::https::client(roots, name);
        // Only the status is read; the body (which could echo the value)
        // is dropped unread with the connection.
        let response = client.request(request).await.map_err(|e| chain(&e))?;
        Ok::<_, String>(response.status().as_u16())
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(Ok(status)) if spec.expect.contains(&status) => (
            Some(status),
            Outcome::Dead,
            format!(
                "HTTP {status}: refused by the provider (expected {:?})",
                spec.expect
            ),
        ),
        Ok(Ok(status)) => (
            Some(status),
            Outcome::Alive,
            format!(
                "HTTP {status} is not among the expected refusals {:?}: the provider may still accept this version",
                spec.expect
            ),
        ),
        Ok(Err(e)) => (
            None,
            Outcome::Error,
            redact(&format!("no answer from {}: {e}", up.target), value),
        ),
        Err(_) => (
            None,
            Outcome::Error,
            format!("no answer from {} within {timeout:?}", up.target),
        ),
    }
}

/// The probe as the sidecar would send it: the policy's method and path on
/// the upstream's target, the value injected as `inject` says. Every buffer
/// holding the value is zeroized when dropped.
fn request(
    up: &Upstream,
    spec: &DeactivationProbe,
    value: &[u8],
) -> Result<http::Request<Full<Bytes>>, String> {
    let method = http::Method::from_bytes(spec.method.as_bytes())
        .map_err(|_| format!("{:?} is not an HTTP method", spec.method))?;
    let mut uri = Zeroizing::new(Vec::with_capacity(up.target.len() + spec.path.len() + 64));
    uri.extend_from_slice(up.target.trim_end_matches('/').as_bytes());
    uri.extend_from_slice(spec.path.as_bytes());
    let mut header = None;
    match &up.inject {
        InjectSpec::Header { name, format } => {
            let (prefix, suffix) = format.split_once("{token}").unwrap_or((format, ""));
            header = Some((
                name.as_str(),
                [prefix.as_bytes(), value, suffix.as_bytes()].concat(),
            ));
        }
        InjectSpec::Basic { username } => {
            let mut raw = Zeroizing::new(Vec::with_capacity(username.len() + 1 + value.len()));
            raw.extend_from_slice(username.as_bytes());
            raw.push(b':');
            raw.extend_from_slice(value);
            let encoded = Zeroizing::new(base64::engine::general_purpose::STANDARD.encode(&*raw));
            header = Some(("authorization", [b"Basic ", encoded.as_bytes()].concat()));
        }
        // Policy allows probes for `static` credentials only.
        InjectSpec::AwsSigv4 { .. } => {
            return Err("a signed (aws-sigv4) credential cannot be probed".to_owned());
        }
        InjectSpec::Query { param } => {
            uri.push(if spec.path.contains('?') { b'&' } else { b'?' });
            uri.extend_from_slice(param.as_bytes());
            uri.push(b'=');
            for part in percent_encoding::percent_encode(value, QUERY_VALUE) {
                uri.extend_from_slice(part.as_bytes());
            }
        }
    }
    let uri = http::Uri::from_maybe_shared(Bytes::from_owner(uri))
        .map_err(|_| "the probe's URL is not valid".to_owned())?;
    let mut builder = http::Request::builder()
        .method(method)
        .uri(uri)
        .header(http::header::USER_AGENT, "leash-deactivation-probe");
    if let Some((name, rendered)) = header {
        let mut v =
            http::HeaderValue::from_maybe_shared(Bytes::from_owner(Zeroizing::new(rendered)))
                .map_err(|_| "the value cannot be sent in a header".to_owned())?;
        v.set_sensitive(true);
        builder = builder.header(name, v);
    }
    builder
        .body(Full::new(Bytes::new()))
        .map_err(|_| "the probe request cannot be built".to_owned())
}

/// What a query value leaves as it is (as the sidecar encodes it).
const QUERY_VALUE: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// An error and its sources, as one line.
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// `text` with every occurrence of the value (raw or percent-encoded)
/// replaced: errors from the HTTP stack are not ours to trust.
fn redact(text: &str, value: &[u8]) -> String {
    let Ok(raw) = std::str::from_utf8(value) else {
        return text.to_owned();
    };
    if raw.is_empty() {
        return text.to_owned();
    }
    let encoded = Zeroizing::new(percent_encoding::percent_encode(value, QUERY_VALUE).to_string());
    text.replace(raw, "<redacted>")
        .replace(encoded.as_str(), "<redacted>")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upstream(inject: &str) -> Upstream {
        let yaml = format!(
            "version: 1\nupstreams:\n  - name: p\n    hosts: [p.test]\n    target: http://127.0.0.1:9/\n    credential: {{ kind: static }}\n    inject: {inject}\n    deactivation_probe: {{ method: GET, path: /v1/me?x=1, expect: [401] }}\n"
        );
        leash_api::policy::parse(&yaml, std::path::Path::new("."))
            .unwrap()
            .policy
            .upstreams
            .remove(0)
    }

    fn built(inject: &str, value: &str) -> http::Request<Full<Bytes>> {
        let up = upstream(inject);
        request(
            &up,
            up.deactivation_probe.as_ref().unwrap(),
            value.as_bytes(),
        )
        .unwrap()
    }

    #[test]
    fn the_value_goes_where_the_policy_injects_it() {
        let r = built(
            "{ type: header, name: x-api-key, format: \"k={token};\" }",
            "s3cr3t",
        );
        assert_eq!(r.uri(), "http://127.0.0.1:9/v1/me?x=1");
        assert_eq!(r.headers()["x-api-key"], "k=s3cr3t;");
        assert!(r.headers()["x-api-key"].is_sensitive());
        let r = built("{ type: basic, username: svc }", "s3cr3t");
        assert_eq!(r.headers()["authorization"], "Basic c3ZjOnMzY3IzdA==");
        let r = built("{ type: query, param: key }", "s3 cr/t");
        assert_eq!(r.uri(), "http://127.0.0.1:9/v1/me?x=1&key=s3%20cr%2Ft");
        assert!(r.headers().get("authorization").is_none());
    }

    #[test]
    fn errors_never_hold_the_value() {
        assert_eq!(
            redact("bad uri /v1?key=s3%20cr%2Ft and s3 cr/t", b"s3 cr/t"),
            "bad uri /v1?key=<redacted> and <redacted>"
        );
    }

    #[test]
    fn limits_once_a_minute_per_version_and_ten_per_upstream() {
        let p = Prober::new(DEFAULT_TIMEOUT);
        p.admit("a", 1).unwrap();
        assert!(matches!(p.admit("a", 1), Err(ProbeError::Limited { .. })));
        for v in 2..=10 {
            p.admit("a", v).unwrap();
        }
        let e = p.admit("a", 11).unwrap_err().to_string();
        assert!(e.contains("10 times"), "{e}");
        p.admit("b", 1).unwrap();
    }
}
