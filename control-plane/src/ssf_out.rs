//! The control plane as an OpenID Shared Signals transmitter: when a
//! revocation is committed (by a responder, or a leaked value registered),
//! the receivers policy names (`ssf.receivers`) get a Security Event Token
//! signed with the control plane's key (verifiable against
//! `/.well-known/jwks.json`), pushed as RFC 8935 says:
//!
//! - a credential, an upstream: CAEP `credential-change` (`change_type`
//!   `revoke`);
//! - a workload or a grant: CAEP `session-revoked`;
//! - a leaked value: RISC `credential-compromise`.
//!
//! Each receiver has a bounded queue (1,024 SETs; beyond, new SETs are
//! dropped and counted) and one worker that pushes in order, retrying a
//! receiver that is down or answers 5xx (after 0.2 s, 1 s and 5 s), never
//! one that refused the SET (4xx: RFC 8935 says not to). A revocation that
//! came in as a security event is announced too (the `txn` claim names the
//! revocation; do not name a party as both transmitter and receiver of the
//! same events). Only the replica that committed a revocation sends its
//! event.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use leash_api::policy::SsfReceiverSpec;
use leash_api::v1::Revocation;
use tokio::sync::mpsc;

use crate::https::HttpsClient;
use crate::ssf::{CAEP_CREDENTIAL_CHANGE, CAEP_SESSION_REVOKED, RISC_CREDENTIAL_COMPROMISE};
use crate::state::ControlPlaneState;

pub const SSF_VERIFICATION: &str =
    "https://schemas.openid.net/secevent/ssf/event-type/verification";
/// SETs waiting for one receiver at most.
const QUEUE: usize = 1024;
const RETRIES: [Duration; 3] = [
    Duration::from_millis(200),
    Duration::from_secs(1),
    Duration::from_secs(5),
];

/// Counters of one receiver's stream.
#[derive(Default, Debug)]
pub struct StreamCounts {
    pub delivered: AtomicU64,
    pub refused: AtomicU64,
    pub failed: AtomicU64,
    pub dropped: AtomicU64,
}

struct Stream {
    endpoint: String,
    queue: mpsc::Sender<String>,
    counts: std::sync::Arc<StreamCounts>,
}

#[derive(Default)]
pub struct SsfOut {
    streams: Mutex<HashMap<String, Stream>>,
    client: std::sync::OnceLock<HttpsClient>,
}

/// The short names policy uses for the event types.
pub fn event_name(uri: &str) -> &str {
    uri.rsplit('/').next().unwrap_or(uri)
}

impl SsfOut {
    fn client(&self) -> &HttpsClient {
        self.client
            .get_or_init(|| crate::https::client(crate::https::system_trust(), None))
    }

    /// Counters per receiver name.
    pub fn counts(&self) -> HashMap<String, std::sync::Arc<StreamCounts>> {
        self.streams
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .map(|(k, s)| (k.clone(), s.counts.clone()))
            .collect()
    }

    /// The event a committed revocation is announced as, with its subject.
    fn event_for(r: &Revocation) -> (&'static str, serde_json::Value, serde_json::Value) {
        let reason = serde_json::json!({ "en": r.reason });
        use leash_api::revocation::RevocationKind as K;
        let at = r.revoked_at_ms / 1000;
        match K::of(r) {
            Some(K::Credential) => (
                CAEP_CREDENTIAL_CHANGE,
                serde_json::json!({"format": "opaque", "id": r.credential_id}),
                serde_json::json!({"credential_type": "bearer-token", "change_type": "revoke", "event_timestamp": at, "reason_admin": reason}),
            ),
            Some(K::Upstream) => (
                CAEP_CREDENTIAL_CHANGE,
                serde_json::json!({"format": "opaque", "id": format!("upstream:{}", r.upstream)}),
                serde_json::json!({"credential_type": "bearer-token", "change_type": "revoke", "event_timestamp": at, "reason_admin": reason}),
            ),
            Some(K::Leaked) => (
                RISC_CREDENTIAL_COMPROMISE,
                serde_json::json!({"format": "opaque", "id": format!("leaked:{}", r.id)}),
                serde_json::json!({"credential_type": "api-key", "event_timestamp": at, "reason_admin": reason}),
            ),
            // workload, grant
            _ => (
                CAEP_SESSION_REVOKED,
                serde_json::json!({"format": "uri", "uri": r.workload}),
                serde_json::json!({"event_timestamp": at, "reason_admin": reason}),
            ),
        }
    }

    /// Announces a committed revocation to every receiver that wants its
    /// event. Never waits: SETs are queued.
    pub fn revoked(&self, cp: &ControlPlaneState, r: &Revocation) {
        let (event, subject, body) = Self::event_for(r);
        let mut claims = serde_json::json!({
            "sub_id": subject,
            "events": { event: body },
            "txn": r.id,
        });
        if !r.upstream.is_empty() {
            claims["leash_upstream"] = r.upstream.clone().into();
        }
        self.send(cp, event, &claims);
    }

    /// A verification event (SSF 1.0 §8.1.4) to one receiver.
    pub fn verify(&self, cp: &ControlPlaneState, receiver: &str, state: Option<&str>) -> bool {
        let policy = cp.policy.load();
        let Some(spec) = policy
            .policy
            .policy
            .ssf
            .as_ref()
            .and_then(|s| s.receivers.iter().find(|r| r.name == receiver))
        else {
            return false;
        };
        let mut body = serde_json::json!({});
        if let Some(state) = state {
            body["state"] = state.into();
        }
        let claims = serde_json::json!({
            "sub_id": {"format": "opaque", "id": receiver},
            "events": { SSF_VERIFICATION: body },
        });
        self.queue(cp, spec, &claims);
        true
    }

    fn send(&self, cp: &ControlPlaneState, event: &str, claims: &serde_json::Value) {
        let policy = cp.policy.load();
        let Some(ssf) = policy.policy.policy.ssf.as_ref() else {
            return;
        };
        for spec in &ssf.receivers {
            let wanted =
                spec.events.is_empty() || spec.events.iter().any(|e| e == event_name(event));
            if wanted {
                self.queue(cp, spec, claims);
            }
        }
    }

    /// Signs `claims` for `spec` (iss, aud, iat, jti added) and queues it.
    fn queue(&self, cp: &ControlPlaneState, spec: &SsfReceiverSpec, claims: &serde_json::Value) {
        let mut claims = claims.clone();
        claims["iss"] = cp.issuer.issuer().into();
        claims["aud"] = spec.audience.clone().into();
        claims["iat"] = (crate::store::now_ms() / 1000).into();
        claims["jti"] = uuid::Uuid::new_v4().simple().to_string().into();
        let set = match cp.issuer.sign_set(&claims) {
            Ok(set) => set,
            Err(e) => {
                tracing::error!(receiver = %spec.name, error = %e, "cannot sign a security event");
                return;
            }
        };
        let mut streams = self
            .streams
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let stream = match streams.get(&spec.name) {
            Some(s) if s.endpoint == spec.endpoint_url && !s.queue.is_closed() => s,
            _ => {
                let (tx, rx) = mpsc::channel(QUEUE);
                let counts = std::sync::Arc::new(StreamCounts::default());
                let client = self.client().clone();
                tokio::spawn(push(
                    client,
                    spec.name.clone(),
                    spec.endpoint_url.clone(),
                    rx,
                    counts.clone(),
                ));
                streams.insert(
                    spec.name.clone(),
                    Stream {
                        endpoint: spec.endpoint_url.clone(),
                        queue: tx,
                        counts,
                    },
                );
                &streams[&spec.name]
            }
        };
        if stream.queue.try_send(set).is_err() {
            stream.counts.dropped.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(receiver = %spec.name, "security event dropped: the receiver's queue is full");
        }
    }
}

/// One receiver's worker: pushes its SETs in order (RFC 8935).
async fn push(
    client: HttpsClient,
    name: String,
    endpoint: String,
    mut queue: mpsc::Receiver<String>,
    counts: std::sync::Arc<StreamCounts>,
) {
    while let Some(set) = queue.recv().await {
        let mut attempt = 0;
        loop {
            let req = http::Request::post(&endpoint)
                .header(http::header::CONTENT_TYPE, "application/secevent+jwt")
                .header(http::header::ACCEPT, "application/json")
                .body(http_body_util::Full::new(bytes::Bytes::from(set.clone())));
            let Ok(req) = req else {
                counts.failed.fetch_add(1, Ordering::Relaxed);
                break;
            };
            let result = crate::oauth2::call(&client, req).await;
            match result {
                Ok((200..=299, _)) => {
                    counts.delivered.fetch_add(1, Ordering::Relaxed);
                    break;
                }
                Ok((status @ 400..=499, body)) => {
                    // Refused: sending it again would be refused again.
                    counts.refused.fetch_add(1, Ordering::Relaxed);
                    let err = serde_json::from_slice::<serde_json::Value>(&body)
                        .ok()
                        .and_then(|v| v.get("err").and_then(|e| e.as_str()).map(str::to_owned))
                        .unwrap_or_default();
                    tracing::warn!(receiver = %name, status, err, "the receiver refused a security event");
                    break;
                }
                other => {
                    if let Some(wait) = RETRIES.get(attempt) {
                        attempt += 1;
                        tracing::debug!(receiver = %name, ?other, "security event not delivered; retrying");
                        tokio::time::sleep(*wait).await;
                        continue;
                    }
                    counts.failed.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(receiver = %name, "security event not delivered after retries");
                    break;
                }
            }
        }
    }
}
