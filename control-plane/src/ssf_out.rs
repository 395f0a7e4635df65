//! The control plane as an OpenID Shared Signals transmitter: when a
//! revocation is committed (by a responder, a leaked value registered, or a
//! security event received), every stream that asked for its event gets a
//! Security Event Token signed with the control plane's key (verifiable
//! against `/.well-known/jwks.json`):
//!
//! - a credential, an upstream: CAEP `credential-change` (`change_type`
//!   `revoke`);
//! - a workload or a grant: CAEP `session-revoked`;
//! - a leaked value: RISC `credential-compromise`, and again (with
//!   `leash_sighting`) each time it is first seen from a workload, to a
//!   host, at a location.
//!
//! Once every connected sidecar has acknowledged the revocation (or after
//! [`ACK_WAIT`] at the latest), the same streams get a second SET: the same
//! event and `txn`, with a `leash_acknowledgement` claim saying whether the
//! revocation is in effect everywhere (`complete`), and how many sidecars
//! acknowledged it.
//!
//! Streams come from policy (`ssf.receivers`) or from receivers, through the
//! stream configuration API (SSF 1.0 §8.1.1, stored in `ssf_streams`).
//!
//! - **Push** (RFC 8935): each stream has a bounded queue (1,024 SETs;
//!   beyond, new SETs are dropped and counted) and one worker that pushes
//!   in order, retrying a receiver that is down or answers 5xx (after
//!   0.2 s, 1 s and 5 s), never one that refused the SET (4xx: RFC 8935 says
//!   not to).
//! - **Poll** (RFC 8936): SETs are held in the store (`ssf_outbox`, at most
//!   [`HOLD`] per stream) until the receiver acknowledges them or reports an
//!   error for them; any replica answers a poll, authenticated by the
//!   stream's own bearer token (so one receiver cannot take another's SETs).
//!
//! A paused stream's SETs are held the same way and pushed when it is
//! enabled again; a disabled stream's are not made. Only the replica that
//! committed a revocation sends its events. A revocation that came in as a
//! security event is announced too (do not name a party as both
//! transmitter and receiver of the same events).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use leash_api::policy::{SsfDelivery, SsfReceiverSpec};
use leash_api::v1::Revocation;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use crate::https::HttpsClient;
use crate::ssf::{CAEP_CREDENTIAL_CHANGE, CAEP_SESSION_REVOKED, RISC_CREDENTIAL_COMPROMISE};
use crate::state::ControlPlaneState;
use crate::store::{SsfStreamRow, StoreError, now_ms};

pub const SSF_VERIFICATION: &str =
    "https://schemas.openid.net/secevent/ssf/event-type/verification";
/// The delivery methods (SSF 1.0 §8.1.1).
pub const PUSH: &str = "urn:ietf:rfc:8935";
pub const POLL: &str = "urn:ietf:rfc:8936";
/// The events Leash transmits.
pub const EVENTS_SUPPORTED: [&str; 3] = [
    CAEP_CREDENTIAL_CHANGE,
    CAEP_SESSION_REVOKED,
    RISC_CREDENTIAL_COMPROMISE,
];
/// SETs waiting for one push receiver at most, in memory.
const QUEUE: usize = 1024;
/// SETs held in the store for one stream at most (poll, or paused).
pub const HOLD: i64 = 10_000;
/// How long the acknowledgement SET waits for every connected sidecar.
pub const ACK_WAIT: Duration = Duration::from_secs(60);
/// The longest a poll that asked to wait is held open.
pub const POLL_WAIT: Duration = Duration::from_secs(25);
const RETRIES: [Duration; 3] = [
    Duration::from_millis(200),
    Duration::from_secs(1),
    Duration::from_secs(5),
];

/// Counters of one stream. For a poll stream, `delivered` counts SETs
/// the receiver acknowledged and `refused` those it reported errors for.
#[derive(Default, Debug)]
pub struct StreamCounts {
    pub delivered: AtomicU64,
    pub refused: AtomicU64,
    pub failed: AtomicU64,
    pub dropped: AtomicU64,
}

/// A stream's status (SSF 1.0 §8.1.2).
pub const STATUSES: [&str; 3] = ["enabled", "paused", "disabled"];

/// One stream, from policy or created by a receiver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamConfig {
    pub stream_id: String,
    pub audience: String,
    pub poll: bool,
    /// The push endpoint (empty for a poll stream).
    pub endpoint_url: String,
    /// Event-type URIs; empty asks for every event Leash transmits.
    pub events_requested: Vec<String>,
    pub description: Option<String>,
    /// `enabled`, `paused` or `disabled`.
    pub status: String,
    pub reason: Option<String>,
    /// Named in policy (`ssf.receivers`): changed by editing the policy.
    pub from_policy: bool,
    /// What a poll stream's receiver authenticates with.
    pub poll_token: PollToken,
    /// CA certificates (PEM) trusted for `endpoint_url` besides the
    /// system's (policy's `ca_file`).
    pub ca_pem: Option<String>,
}

/// The bearer token a poll stream's receiver presents.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum PollToken {
    #[default]
    None,
    /// Created through the API: the token's SHA-256 (the token was shown
    /// once, at creation).
    Sha256(Vec<u8>),
    /// Named in policy: the file holding it, read at every poll.
    File(std::path::PathBuf),
}

impl PollToken {
    /// A fresh token and its record.
    pub fn generate() -> (String, Self) {
        let token = crate::auth::random_secret("lss_");
        let hash = crate::auth::sha256(&token);
        (token, Self::Sha256(hash))
    }

    /// Whether `presented` is this stream's token (compared in constant
    /// time, as SHA-256 digests).
    pub fn admits(&self, presented: &str) -> bool {
        let expected = match self {
            Self::None => return false,
            Self::Sha256(hash) => hash.clone(),
            Self::File(path) => match leash_api::policy::read_token_file(path) {
                Ok(token) => crate::auth::sha256(&token),
                Err(e) => {
                    tracing::error!(error = %e, "cannot read a poll stream's token");
                    return false;
                }
            },
        };
        crate::auth::same(&crate::auth::sha256(presented), &expected)
    }
}

impl StreamConfig {
    /// A stream policy names; `dir` is the policy file's, `ca_pem` its
    /// `ca_file`'s contents.
    pub fn from_policy(r: &SsfReceiverSpec, dir: &std::path::Path, ca_pem: Option<&str>) -> Self {
        Self {
            stream_id: r.name.clone(),
            audience: r.audience.clone(),
            poll: r.delivery == SsfDelivery::Poll,
            endpoint_url: r.endpoint_url.clone(),
            events_requested: EVENTS_SUPPORTED
                .iter()
                .filter(|e| r.events.iter().any(|n| n == event_name(e)))
                .map(|e| (*e).to_owned())
                .collect(),
            description: None,
            status: "enabled".into(),
            reason: None,
            from_policy: true,
            poll_token: r
                .poll_token_file
                .as_ref()
                .map_or(PollToken::None, |f| PollToken::File(dir.join(f))),
            ca_pem: ca_pem.map(str::to_owned),
        }
    }

    pub fn from_row(row: &SsfStreamRow) -> Self {
        Self {
            stream_id: row.stream_id.clone(),
            audience: row.audience.clone(),
            poll: row.delivery_method == POLL,
            endpoint_url: row.endpoint_url.clone().unwrap_or_default(),
            events_requested: serde_json::from_str(&row.events_requested).unwrap_or_default(),
            description: row.description.clone(),
            status: row.status.clone(),
            reason: row.reason.clone(),
            from_policy: false,
            poll_token: row
                .poll_token_sha256
                .clone()
                .map_or(PollToken::None, PollToken::Sha256),
            ca_pem: None,
        }
    }

    pub fn to_row(&self, created_at_ms: i64, created_by: &str) -> SsfStreamRow {
        SsfStreamRow {
            stream_id: self.stream_id.clone(),
            audience: self.audience.clone(),
            delivery_method: if self.poll { POLL } else { PUSH }.to_owned(),
            endpoint_url: (!self.poll).then(|| self.endpoint_url.clone()),
            poll_token_sha256: match &self.poll_token {
                PollToken::Sha256(hash) if self.poll => Some(hash.clone()),
                _ => None,
            },
            events_requested: serde_json::to_string(&self.events_requested)
                .unwrap_or_else(|_| "[]".into()),
            description: self.description.clone(),
            status: self.status.clone(),
            reason: self.reason.clone(),
            created_at_ms,
            created_by: created_by.to_owned(),
        }
    }

    /// The events this stream gets: those requested that Leash transmits.
    pub fn events_delivered(&self) -> Vec<&'static str> {
        EVENTS_SUPPORTED
            .into_iter()
            .filter(|e| {
                self.events_requested.is_empty() || self.events_requested.iter().any(|r| r == e)
            })
            .collect()
    }

    /// The stream configuration as SSF 1.0 §8.1.1 shows it; `base` is the
    /// admin API's URL (for a poll stream's endpoint).
    pub fn to_json(&self, issuer: &str, base: &str) -> Value {
        let delivery = if self.poll {
            json!({"method": POLL, "endpoint_url": format!("{base}/ssf/poll/{}", self.stream_id)})
        } else {
            json!({"method": PUSH, "endpoint_url": self.endpoint_url})
        };
        let mut v = json!({
            "stream_id": self.stream_id,
            "iss": issuer,
            "aud": self.audience,
            "delivery": delivery,
            "events_supported": EVENTS_SUPPORTED,
            "events_requested": if self.events_requested.is_empty() && self.from_policy {
                EVENTS_SUPPORTED.iter().map(|e| (*e).to_owned()).collect()
            } else {
                self.events_requested.clone()
            },
            "events_delivered": self.events_delivered(),
            "status": self.status,
            "leash_from_policy": self.from_policy,
        });
        if let Some(d) = &self.description {
            v["description"] = d.clone().into();
        }
        if let Some(r) = &self.reason {
            v["reason"] = r.clone().into();
        }
        v
    }
}

struct PushStream {
    endpoint: String,
    ca_pem: Option<String>,
    queue: mpsc::Sender<String>,
}

#[derive(Default)]
pub struct SsfOut {
    push: Mutex<HashMap<String, PushStream>>,
    counts: Mutex<HashMap<String, Arc<StreamCounts>>>,
    clients: crate::https::ClientCache,
    /// Woken when a SET is held for a poll stream on this replica.
    held: tokio::sync::Notify,
}

/// The streams policy names (`ssf.receivers`) whose name passes `which`.
fn policy_streams(cp: &ControlPlaneState, which: impl Fn(&str) -> bool) -> Vec<StreamConfig> {
    let policy = cp.policy.load();
    let dir = cp.policy_path.parent().unwrap_or(std::path::Path::new("."));
    policy
        .policy
        .policy
        .ssf
        .iter()
        .flat_map(|s| &s.receivers)
        .filter(|r| which(&r.name))
        .map(|r| {
            let ca = policy
                .policy
                .ssf_ca_pems
                .get(&format!("receiver:{}", r.name));
            StreamConfig::from_policy(r, dir, ca.map(String::as_str))
        })
        .collect()
}

/// The short names policy uses for the event types.
pub fn event_name(uri: &str) -> &str {
    uri.rsplit('/').next().unwrap_or(uri)
}

/// A poll (RFC 8936 §2.4).
#[derive(Debug, Default, serde::Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PollRequest {
    /// The most SETs to return (default 100, at most 1,000; 0 only
    /// acknowledges).
    #[serde(default)]
    pub max_events: Option<usize>,
    /// Answer at once even when no SET waits (else wait up to 25 s).
    #[serde(default)]
    pub return_immediately: bool,
    /// The `jti`s of SETs received and kept.
    #[serde(default)]
    pub ack: Vec<String>,
    /// SETs received and refused: `jti` → `{err, description}`.
    #[serde(default)]
    pub set_errs: HashMap<String, SetErr>,
}

#[derive(Debug, Default, serde::Deserialize, utoipa::ToSchema)]
pub struct SetErr {
    #[serde(default)]
    pub err: String,
    #[serde(default)]
    pub description: String,
}

impl SsfOut {
    /// A stream's counters.
    pub fn counts(&self, stream_id: &str) -> Arc<StreamCounts> {
        self.counts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(stream_id.to_owned())
            .or_default()
            .clone()
    }

    /// Every stream: policy's, then those receivers created.
    pub async fn streams(&self, cp: &ControlPlaneState) -> Result<Vec<StreamConfig>, StoreError> {
        let mut streams = policy_streams(cp, |_| true);
        for row in cp.store.ssf_streams().await? {
            if !streams.iter().any(|s| s.stream_id == row.stream_id) {
                streams.push(StreamConfig::from_row(&row));
            }
        }
        Ok(streams)
    }

    /// One stream: policy's of that name, else the one a receiver created.
    pub async fn stream(
        &self,
        cp: &ControlPlaneState,
        stream_id: &str,
    ) -> Result<Option<StreamConfig>, StoreError> {
        if let Some(s) = policy_streams(cp, |name| name == stream_id).pop() {
            return Ok(Some(s));
        }
        Ok(cp
            .store
            .ssf_stream(stream_id)
            .await?
            .map(|row| StreamConfig::from_row(&row)))
    }

    /// The event a committed revocation is announced as, with its subject.
    fn event_for(r: &Revocation) -> (&'static str, Value, Value) {
        let reason = json!({ "en": r.reason });
        use leash_api::revocation::RevocationKind as K;
        let at = r.revoked_at_ms / 1000;
        match K::of(r) {
            Some(K::Credential) => (
                CAEP_CREDENTIAL_CHANGE,
                json!({"format": "opaque", "id": r.credential_id}),
                json!({"credential_type": "bearer-token", "change_type": "revoke", "event_timestamp": at, "reason_admin": reason}),
            ),
            Some(K::Upstream) => (
                CAEP_CREDENTIAL_CHANGE,
                json!({"format": "opaque", "id": format!("upstream:{}", r.upstream)}),
                json!({"credential_type": "bearer-token", "change_type": "revoke", "event_timestamp": at, "reason_admin": reason}),
            ),
            Some(K::Leaked) => (
                RISC_CREDENTIAL_COMPROMISE,
                json!({"format": "opaque", "id": format!("leaked:{}", r.id)}),
                json!({"credential_type": "api-key", "event_timestamp": at, "reason_admin": reason}),
            ),
            // workload, grant
            _ => (
                CAEP_SESSION_REVOKED,
                json!({"format": "uri", "uri": r.workload}),
                json!({"event_timestamp": at, "reason_admin": reason}),
            ),
        }
    }

    /// Announces a committed revocation to every stream that wants its
    /// event, then its acknowledgement status once every connected sidecar
    /// has it. Never waits: the work is a task of its own.
    pub fn revoked(cp: &Arc<ControlPlaneState>, r: &Revocation, seq: u64) {
        let cp = cp.clone();
        let r = r.clone();
        tokio::spawn(async move {
            let (event, subject, body) = Self::event_for(&r);
            let mut claims = json!({
                "sub_id": subject,
                "events": { event: body },
                "txn": r.id,
            });
            if !r.upstream.is_empty() {
                claims["leash_upstream"] = r.upstream.clone().into();
            }
            let streams = cp.ssf_out.wanting(&cp, event).await;
            if streams.is_empty() {
                return;
            }
            for s in &streams {
                cp.ssf_out.deliver(&cp, s, &claims).await;
            }
            claims["leash_acknowledgement"] = acknowledgement(&cp, seq).await;
            for s in &streams {
                // Read again: the stream may have changed while we waited.
                match cp.ssf_out.stream(&cp, &s.stream_id).await {
                    Ok(Some(s)) if s.status != "disabled" => {
                        cp.ssf_out.deliver(&cp, &s, &claims).await;
                    }
                    Ok(_) => {}
                    Err(e) => tracing::error!(error = %e, "cannot read the SSF streams"),
                }
            }
        });
    }

    /// The streams, not disabled, that get `event`.
    async fn wanting(&self, cp: &ControlPlaneState, event: &str) -> Vec<StreamConfig> {
        match self.streams(cp).await {
            Ok(streams) => streams
                .into_iter()
                .filter(|s| s.status != "disabled" && s.events_delivered().contains(&event))
                .collect(),
            Err(e) => {
                tracing::error!(error = %e, "cannot read the SSF streams; no event sent");
                Vec::new()
            }
        }
    }

    /// A leaked value seen for the first time in a request from a workload
    /// to a host at a location: RISC `credential-compromise` again, its
    /// `txn` the registration, `leash_sighting` saying who sent it where.
    /// (Only first sightings: a forgotten consumer retrying sends one.)
    pub fn seen(cp: &Arc<ControlPlaneState>, s: &crate::store::Sighting) {
        let cp = cp.clone();
        let reason = format!(
            "seen in a request from {} to {} ({})",
            s.workload, s.host, s.location
        );
        let claims = json!({
            "sub_id": {"format": "opaque", "id": format!("leaked:{}", s.revocation_id)},
            "events": { RISC_CREDENTIAL_COMPROMISE: {
                "credential_type": "api-key",
                "event_timestamp": s.first_seen_ms / 1000,
                "reason_admin": {"en": reason},
            }},
            "txn": s.revocation_id,
            "leash_sighting": {
                "workload": s.workload,
                "upstream": s.upstream,
                "host": s.host,
                "location": s.location,
            },
        });
        tokio::spawn(async move {
            for stream in cp.ssf_out.wanting(&cp, RISC_CREDENTIAL_COMPROMISE).await {
                cp.ssf_out.deliver(&cp, &stream, &claims).await;
            }
        });
    }

    /// A verification event (SSF 1.0 §8.1.4) on one stream.
    pub async fn verify(&self, cp: &ControlPlaneState, stream: &StreamConfig, state: Option<&str>) {
        let mut body = json!({});
        if let Some(state) = state {
            body["state"] = state.into();
        }
        let claims = json!({
            "sub_id": {"format": "opaque", "id": stream.stream_id},
            "events": { SSF_VERIFICATION: body },
        });
        self.deliver(cp, stream, &claims).await;
    }

    /// Signs `claims` for `stream` (iss, aud, iat, jti added), then queues
    /// it for pushing, or holds it in the store (poll, or paused).
    async fn deliver(&self, cp: &ControlPlaneState, stream: &StreamConfig, claims: &Value) {
        let counts = self.counts(&stream.stream_id);
        let mut claims = claims.clone();
        let jti = uuid::Uuid::new_v4().simple().to_string();
        claims["iss"] = cp.issuer.issuer().into();
        claims["aud"] = stream.audience.clone().into();
        claims["iat"] = (now_ms() / 1000).into();
        claims["jti"] = jti.clone().into();
        let set = match cp.issuer.sign_set(&claims) {
            Ok(set) => set,
            Err(e) => {
                counts.failed.fetch_add(1, Ordering::Relaxed);
                tracing::error!(stream = %stream.stream_id, error = %e, "cannot sign a security event");
                return;
            }
        };
        if !stream.poll && stream.status == "enabled" {
            self.push(stream, set, &counts);
            return;
        }
        match cp
            .store
            .hold_ssf_set(&stream.stream_id, &jti, &set, now_ms(), HOLD)
            .await
        {
            Ok(true) => self.held.notify_waiters(),
            Ok(false) => {
                counts.dropped.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(stream = %stream.stream_id, "security event dropped: the stream already holds {HOLD} SETs");
            }
            Err(e) => {
                counts.failed.fetch_add(1, Ordering::Relaxed);
                tracing::error!(stream = %stream.stream_id, error = %e, "cannot hold a security event");
            }
        }
    }

    /// Queues a signed SET on a push stream's worker.
    fn push(&self, stream: &StreamConfig, set: String, counts: &Arc<StreamCounts>) {
        let mut push = self
            .push
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let worker = match push.get(&stream.stream_id) {
            Some(s)
                if s.endpoint == stream.endpoint_url
                    && s.ca_pem == stream.ca_pem
                    && !s.queue.is_closed() =>
            {
                s
            }
            _ => {
                let client = match self.clients.get(stream.ca_pem.as_deref()) {
                    Ok(client) => client,
                    Err(e) => {
                        counts.failed.fetch_add(1, Ordering::Relaxed);
                        tracing::error!(stream = %stream.stream_id, error = %e, "cannot trust the stream's CA");
                        return;
                    }
                };
                let (tx, rx) = mpsc::channel(QUEUE);
                tokio::spawn(push_worker(
                    client,
                    stream.stream_id.clone(),
                    stream.endpoint_url.clone(),
                    rx,
                    counts.clone(),
                ));
                push.insert(
                    stream.stream_id.clone(),
                    PushStream {
                        endpoint: stream.endpoint_url.clone(),
                        ca_pem: stream.ca_pem.clone(),
                        queue: tx,
                    },
                );
                &push[&stream.stream_id]
            }
        };
        if worker.queue.try_send(set).is_err() {
            counts.dropped.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(stream = %stream.stream_id, "security event dropped: the stream's queue is full");
        }
    }

    /// A push stream enabled again: what was held while it was paused is
    /// pushed, in order.
    pub async fn resume(
        &self,
        cp: &ControlPlaneState,
        stream: &StreamConfig,
    ) -> Result<(), StoreError> {
        if stream.poll || stream.status != "enabled" {
            return Ok(());
        }
        let counts = self.counts(&stream.stream_id);
        let max = usize::try_from(HOLD).unwrap_or(usize::MAX);
        let (held, _) = cp.store.held_ssf_sets(&stream.stream_id, max).await?;
        let jtis: Vec<String> = held.iter().map(|(jti, _)| jti.clone()).collect();
        for (_, set) in held {
            self.push(stream, set, &counts);
        }
        cp.store.release_ssf_sets(&stream.stream_id, &jtis).await?;
        Ok(())
    }

    /// Answers one poll (RFC 8936 §2.4): lets go of the SETs acknowledged
    /// or reported in error, then returns those still held, oldest first,
    /// waiting up to [`POLL_WAIT`] for one unless asked not to.
    pub async fn poll(
        &self,
        cp: &ControlPlaneState,
        stream: &StreamConfig,
        req: PollRequest,
    ) -> Result<Value, StoreError> {
        let counts = self.counts(&stream.stream_id);
        let acked = cp
            .store
            .release_ssf_sets(&stream.stream_id, &req.ack)
            .await?;
        counts.delivered.fetch_add(acked, Ordering::Relaxed);
        for (jti, e) in &req.set_errs {
            let released = cp
                .store
                .release_ssf_sets(&stream.stream_id, std::slice::from_ref(jti))
                .await?;
            if released > 0 {
                counts.refused.fetch_add(released, Ordering::Relaxed);
                let err: String = e.err.chars().take(64).collect();
                let description: String = e.description.chars().take(256).collect();
                tracing::warn!(stream = %stream.stream_id, jti, err, description, "the receiver refused a security event");
            }
        }
        let max = req.max_events.unwrap_or(100).min(1000);
        let deadline = tokio::time::Instant::now()
            + if req.return_immediately || max == 0 {
                Duration::ZERO
            } else {
                POLL_WAIT
            };
        if max == 0 || stream.status == "paused" {
            // A paused stream's receiver waits as if nothing were held,
            // rather than polling again at once.
            tokio::time::sleep_until(deadline).await;
            return Ok(json!({"sets": {}}));
        }
        loop {
            let held = self.held.notified();
            tokio::pin!(held);
            held.as_mut().enable();
            let (sets, more) = cp.store.held_ssf_sets(&stream.stream_id, max).await?;
            let now = tokio::time::Instant::now();
            if !sets.is_empty() || now >= deadline {
                let sets: serde_json::Map<String, Value> = sets
                    .into_iter()
                    .map(|(jti, set)| (jti, set.into()))
                    .collect();
                let mut answer = json!({ "sets": sets });
                if more {
                    answer["moreAvailable"] = true.into();
                }
                return Ok(answer);
            }
            // SETs held by another replica are seen within a second.
            let wait = (deadline - now).min(Duration::from_secs(1));
            tokio::select! {
                () = held => {}
                () = tokio::time::sleep(wait) => {}
            }
        }
    }
}

/// How long SETs held for a stream that no longer exists are kept (a
/// replica whose policy still names the stream may yet serve it).
const ORPHAN_AFTER: Duration = Duration::from_secs(3600);

impl SsfOut {
    /// Drops the SETs held for streams that no longer exist (removed from
    /// policy), once they are [`ORPHAN_AFTER`] old; how many.
    pub async fn sweep(&self, cp: &ControlPlaneState) -> Result<u64, StoreError> {
        // Holders first: a stream holding SETs existed before them, so it
        // is among the streams read next unless it is gone.
        let holding = cp.store.ssf_streams_holding().await?;
        if holding.is_empty() {
            return Ok(0);
        }
        let streams = self.streams(cp).await?;
        let before = now_ms() - i64::try_from(ORPHAN_AFTER.as_millis()).unwrap_or(i64::MAX);
        let mut dropped = 0;
        for id in holding {
            if !streams.iter().any(|s| s.stream_id == id) {
                dropped += cp.store.drop_held_ssf_sets(&id, before).await?;
            }
        }
        Ok(dropped)
    }
}

/// Whether every sidecar connected now has acknowledged `seq`, waiting up
/// to [`ACK_WAIT`] for it: the `leash_acknowledgement` claim.
async fn acknowledgement(cp: &ControlPlaneState, seq: u64) -> Value {
    let deadline = tokio::time::Instant::now() + ACK_WAIT;
    loop {
        let written = cp.sessions.acks_written().notified();
        tokio::pin!(written);
        written.as_mut().enable();
        let late = tokio::time::Instant::now() >= deadline;
        // What `sessions::propagation` says, without reading every
        // revocation to find when this one was committed.
        let read = async {
            let acked = cp.store.acks_for(seq).await?;
            let (connected, pending) = crate::replicas::pending(cp, seq).await?;
            Ok::<_, StoreError>((acked, connected, pending))
        };
        match read.await {
            // Complete once the acknowledgements are recorded (not only
            // received): the SET says what the proof holds.
            Ok((acked, connected, pending))
                if (pending.is_empty() && acked.len() >= connected) || late =>
            {
                let complete = pending.is_empty() && acked.len() >= connected;
                let last = acked.iter().map(|(_, at)| *at).max();
                return json!({
                    "status": if complete { "complete" } else { "incomplete" },
                    "seq": seq,
                    "acknowledged": acked.len(),
                    "connected": connected,
                    "pending": pending.len(),
                    "last_acknowledged_at": last.map(|ms| ms / 1000),
                });
            }
            Ok(_) => {}
            Err(e) if late => {
                tracing::error!(error = %e, seq, "cannot read the acknowledgements");
                return json!({"status": "unknown", "seq": seq});
            }
            Err(e) => tracing::warn!(error = %e, seq, "cannot read the acknowledgements"),
        }
        // Acknowledgements written by other replicas are seen within 0.5 s.
        tokio::select! {
            () = written => {}
            () = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
    }
}

/// One push stream's worker: pushes its SETs in order (RFC 8935).
async fn push_worker(
    client: HttpsClient,
    name: String,
    endpoint: String,
    mut queue: mpsc::Receiver<String>,
    counts: Arc<StreamCounts>,
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
                    let err = serde_json::from_slice::<Value>(&body)
                        .ok()
                        .and_then(|v| v.get("err").and_then(|e| e.as_str()).map(str::to_owned))
                        .unwrap_or_default();
                    tracing::warn!(stream = %name, status, err, "the receiver refused a security event");
                    break;
                }
                other => {
                    if let Some(wait) = RETRIES.get(attempt) {
                        attempt += 1;
                        tracing::debug!(stream = %name, ?other, "security event not delivered; retrying");
                        tokio::time::sleep(*wait).await;
                        continue;
                    }
                    counts.failed.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(stream = %name, "security event not delivered after retries");
                    break;
                }
            }
        }
    }
}
