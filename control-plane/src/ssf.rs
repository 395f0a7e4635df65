//! The control plane as an OpenID Shared Signals receiver: Security Event
//! Tokens (RFC 8417) pushed by the transmitters policy names (RFC 8935),
//! each verified against its transmitter's JWKS (signature, `iss`, `aud`,
//! `iat` within a window, `jti` never seen before on any replica), then
//! mapped to a revocation by policy (`ssf.subjects`) and committed as any
//! other: same sequence, acknowledgements and audit, its reason naming the
//! event, the issuer and the `jti`.
//!
//! Events: RISC `credential-compromise` revokes what its subject maps to
//! (a credential, a grant or a workload); CAEP `session-revoked`,
//! `credential-change` and RISC `account-disabled` revoke a workload.
//! Anything else is refused with RFC 8935's error codes, and audited.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use leash_api::policy::{SsfSpec, SsfTarget, SsfTransmitter, ValidPolicy};

use crate::https::HttpsClient;
use crate::revocations::RevokeRequest;
use crate::state::ControlPlaneState;

pub const RISC_CREDENTIAL_COMPROMISE: &str =
    "https://schemas.openid.net/secevent/risc/event-type/credential-compromise";
pub const RISC_ACCOUNT_DISABLED: &str =
    "https://schemas.openid.net/secevent/risc/event-type/account-disabled";
pub const CAEP_SESSION_REVOKED: &str =
    "https://schemas.openid.net/secevent/caep/event-type/session-revoked";
pub const CAEP_CREDENTIAL_CHANGE: &str =
    "https://schemas.openid.net/secevent/caep/event-type/credential-change";

/// Largest SET accepted.
pub const MAX_SET_BYTES: usize = 64 * 1024;
/// How old (or how far ahead) a SET's `iat` may be.
const IAT_WINDOW: Duration = Duration::from_secs(300);
const IAT_AHEAD: Duration = Duration::from_secs(60);
/// A transmitter's JWKS is fetched again after this, or at once for a
/// `kid` it does not hold.
const JWKS_FRESH: Duration = Duration::from_secs(300);

/// A refusal, as RFC 8935 §2.4 words it.
#[derive(Debug)]
pub struct SsfError {
    pub err: &'static str,
    pub description: String,
    /// The transmitter, when known (for the audit log).
    pub transmitter: Option<String>,
    /// A SET received before: in effect already, or still being committed
    /// (a poll acknowledges the first, and leaves the second to come again).
    pub replay: Option<Replay>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Replay {
    InEffect,
    InProgress,
}

pub(crate) fn refuse(err: &'static str, description: impl Into<String>) -> SsfError {
    SsfError {
        err,
        description: description.into(),
        transmitter: None,
        replay: None,
    }
}

/// An accepted event.
pub struct Accepted {
    pub transmitter: String,
    pub issuer: String,
    pub jti: String,
    pub event_type: String,
    pub revocation_id: String,
    pub revoke_seq: u64,
}

#[derive(Default)]
pub struct SsfReceiver {
    keys: Mutex<HashMap<String, (Instant, JwkSet)>>,
    clients: crate::https::ClientCache,
}

/// The CA PEM policy trusts for a transmitter (its `ca_file`), if any.
fn transmitter_ca<'a>(policy: &'a ValidPolicy, t: &SsfTransmitter) -> Option<&'a str> {
    policy
        .ssf_ca_pems
        .get(&format!("transmitter:{}", t.name))
        .map(String::as_str)
}

impl SsfReceiver {
    fn client(&self, ca_pem: Option<&str>) -> Result<HttpsClient, String> {
        self.clients.get(ca_pem)
    }

    /// Verifies, maps and commits one SET: pushed (`polled` is `None`), or
    /// polled from a transmitter, whose issuer it must then carry.
    pub async fn receive(
        &self,
        cp: &Arc<ControlPlaneState>,
        body: &[u8],
        polled: Option<&SsfTransmitter>,
    ) -> Result<Accepted, SsfError> {
        let snapshot = cp.policy.load();
        let policy = &snapshot.policy;
        let Some(ssf) = &policy.policy.ssf else {
            return Err(refuse(
                "access_denied",
                "this control plane receives no security events (no ssf: in policy)",
            ));
        };
        if body.len() > MAX_SET_BYTES {
            return Err(refuse(
                "invalid_request",
                format!("a SET of more than {MAX_SET_BYTES} bytes"),
            ));
        }
        let token = std::str::from_utf8(body)
            .map_err(|_| refuse("invalid_request", "the body is not a compact JWT"))?
            .trim();
        let header = jsonwebtoken::decode_header(token)
            .map_err(|e| refuse("invalid_request", format!("not a JWT: {e}")))?;
        if !header
            .typ
            .as_deref()
            .is_some_and(|t| t.eq_ignore_ascii_case("secevent+jwt"))
        {
            return Err(refuse(
                "invalid_request",
                "a SET's typ is secevent+jwt (RFC 8417 §2.3)",
            ));
        }
        let claimed_iss = unverified_issuer(token)
            .ok_or_else(|| refuse("invalid_request", "the SET has no iss"))?;
        let transmitter = ssf
            .transmitters
            .iter()
            .find(|t| t.issuer == claimed_iss && polled.is_none_or(|p| p.name == t.name))
            .ok_or_else(|| {
                refuse(
                    "invalid_issuer",
                    format!("{claimed_iss:?} is not a transmitter this receiver trusts"),
                )
            })?;
        let named = |mut e: SsfError| {
            e.transmitter = Some(transmitter.name.clone());
            e
        };
        let claims = self
            .verify(
                token,
                &header,
                transmitter,
                ssf,
                transmitter_ca(policy, transmitter),
            )
            .await
            .map_err(named)?;
        let (event_type, target, jti) = event_of(&claims, ssf).map_err(named)?;
        self.commit(cp, policy, transmitter, &event_type, &target, &jti)
            .await
            .map_err(named)
    }

    async fn verify(
        &self,
        token: &str,
        header: &jsonwebtoken::Header,
        t: &SsfTransmitter,
        ssf: &SsfSpec,
        ca_pem: Option<&str>,
    ) -> Result<serde_json::Map<String, serde_json::Value>, SsfError> {
        const ALLOWED: [Algorithm; 7] = [
            Algorithm::RS256,
            Algorithm::RS384,
            Algorithm::RS512,
            Algorithm::PS256,
            Algorithm::ES256,
            Algorithm::ES384,
            Algorithm::EdDSA,
        ];
        if !ALLOWED.contains(&header.alg) {
            return Err(refuse(
                "invalid_key",
                format!("algorithm {:?} is not accepted", header.alg),
            ));
        }
        let key = self.key(t, header.kid.as_deref(), ca_pem).await?;
        let mut validation = Validation::new(header.alg);
        validation.set_audience(&[&ssf.audience]);
        validation.set_issuer(&[&t.issuer]);
        // SETs carry no exp (RFC 8417 §2.2): iat is checked below.
        validation.validate_exp = false;
        validation.set_required_spec_claims(&["iss", "aud", "iat", "jti"]);
        let data = jsonwebtoken::decode::<serde_json::Map<String, serde_json::Value>>(
            token,
            &key,
            &validation,
        )
        .map_err(|e| {
            use jsonwebtoken::errors::ErrorKind as K;
            match e.kind() {
                K::InvalidAudience => refuse(
                    "invalid_audience",
                    format!("the SET is not for {:?}", ssf.audience),
                ),
                K::InvalidIssuer => refuse("invalid_issuer", "iss does not match"),
                K::InvalidSignature | K::InvalidEcdsaKey | K::InvalidRsaKey(_) => {
                    refuse("invalid_key", "the signature does not verify")
                }
                _ => refuse("invalid_request", format!("the SET does not validate: {e}")),
            }
        })?;
        let iat = data
            .claims
            .get("iat")
            .and_then(serde_json::Value::as_i64)
            .unwrap_or(0);
        let now = crate::store::now_ms() / 1000;
        let window = i64::try_from(IAT_WINDOW.as_secs()).unwrap_or(300);
        let ahead = i64::try_from(IAT_AHEAD.as_secs()).unwrap_or(60);
        if iat < now - window || iat > now + ahead {
            return Err(refuse(
                "invalid_request",
                format!("iat {iat} is outside the accepted window (now {now}, {window} s)"),
            ));
        }
        Ok(data.claims)
    }

    /// The transmitter's key for `kid` (its only key when the SET names
    /// none), its JWKS fetched when stale or when the kid is new.
    async fn key(
        &self,
        t: &SsfTransmitter,
        kid: Option<&str>,
        ca_pem: Option<&str>,
    ) -> Result<DecodingKey, SsfError> {
        let find = |set: &JwkSet| match kid {
            Some(kid) => set.find(kid).cloned(),
            None if set.keys.len() == 1 => set.keys.first().cloned(),
            None => None,
        };
        let cached = self
            .keys
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&t.name)
            .filter(|(at, _)| at.elapsed() < JWKS_FRESH)
            .and_then(|(_, set)| find(set));
        let jwk = match cached {
            Some(jwk) => jwk,
            None => {
                let set = self.fetch_jwks(t, ca_pem).await?;
                let jwk = find(&set);
                self.keys
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .insert(t.name.clone(), (Instant::now(), set));
                jwk.ok_or_else(|| {
                    refuse(
                        "invalid_key",
                        format!("no key {kid:?} in {}'s JWKS", t.name),
                    )
                })?
            }
        };
        DecodingKey::from_jwk(&jwk).map_err(|e| refuse("invalid_key", e.to_string()))
    }

    async fn fetch_jwks(
        &self,
        t: &SsfTransmitter,
        ca_pem: Option<&str>,
    ) -> Result<JwkSet, SsfError> {
        let unavailable = |why: String| SsfError {
            err: "invalid_key",
            description: format!("{}'s JWKS could not be read: {why}", t.name),
            transmitter: None,
            replay: None,
        };
        let req = http::Request::get(&t.jwks_url)
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .map_err(|e| unavailable(e.to_string()))?;
        let client = self.client(ca_pem).map_err(&unavailable)?;
        let (status, body) = crate::oauth2::call(&client, req)
            .await
            .map_err(|e| unavailable(e.to_string()))?;
        if status != 200 {
            return Err(unavailable(format!("HTTP {status}")));
        }
        serde_json::from_slice(&body).map_err(|e| unavailable(e.to_string()))
    }

    async fn commit(
        &self,
        cp: &Arc<ControlPlaneState>,
        policy: &ValidPolicy,
        t: &SsfTransmitter,
        event_type: &str,
        target: &SsfTarget,
        jti: &str,
    ) -> Result<Accepted, SsfError> {
        let store_error = |e: crate::store::StoreError| refuse("invalid_request", e.to_string());
        let now = crate::store::now_ms();
        if !cp
            .store
            .record_ssf_event(&t.issuer, jti, event_type, now)
            .await
            .map_err(store_error)?
        {
            let in_effect = cp
                .store
                .ssf_event(&t.issuer, jti)
                .await
                .map_err(store_error)?
                .is_some_and(|e| e.revocation_id.is_some());
            let mut e = refuse(
                "invalid_request",
                format!("jti {jti:?} from {:?} was received before", t.issuer),
            );
            e.replay = Some(if in_effect {
                Replay::InEffect
            } else {
                Replay::InProgress
            });
            return Err(e);
        }
        let kind = if !target.credential_id.is_empty() {
            "credential"
        } else if !target.upstream.is_empty() {
            "grant"
        } else {
            "workload"
        };
        let short = event_type.rsplit('/').next().unwrap_or(event_type);
        let req = RevokeRequest {
            kind: kind.to_owned(),
            workload: target.workload.clone(),
            upstream: target.upstream.clone(),
            credential_id: target.credential_id.clone(),
            reason: format!("SSF {short} from {} (jti {jti})", t.issuer),
        };
        let by = format!("ssf:{}", t.name);
        match cp.revocations.revoke(req, &by, policy).await {
            Ok(stored) => {
                crate::ssf_out::SsfOut::revoked(cp, &stored.revocation, stored.revoke_seq);
                let id = stored.revocation.id.clone();
                if let Err(e) = cp.store.set_ssf_revocation(&t.issuer, jti, &id).await {
                    tracing::warn!(error = %e, "cannot record which revocation a SET became");
                }
                Ok(Accepted {
                    transmitter: t.name.clone(),
                    issuer: t.issuer.clone(),
                    jti: jti.to_owned(),
                    event_type: event_type.to_owned(),
                    revocation_id: id,
                    revoke_seq: stored.revoke_seq,
                })
            }
            Err(e) => {
                // Not in effect: the transmitter may send it again.
                let _ = cp.store.forget_ssf_event(&t.issuer, jti).await;
                Err(refuse("invalid_request", format!("not revoked: {e}")))
            }
        }
    }
}

/// Writes what became of one received SET to the audit log: accepted
/// (`202`, the revocation it became) or refused (`400`, the RFC's code).
/// `path` is where it came from: `/ssf/events`, or the polled URL.
pub async fn audit(cp: &ControlPlaneState, path: &str, outcome: &Result<Accepted, SsfError>) {
    let (status, actor, detail) = match outcome {
        Ok(a) => (
            202,
            format!("ssf:{}", a.transmitter),
            format!(
                "accepted {} jti {} from {} as revocation {} (seq {})",
                a.event_type, a.jti, a.issuer, a.revocation_id, a.revoke_seq
            ),
        ),
        Err(e) => (
            400,
            format!("ssf:{}", e.transmitter.as_deref().unwrap_or("unknown")),
            format!("refused {}: {}", e.err, e.description),
        ),
    };
    tracing::info!(%actor, status, detail = %detail, "security event");
    let entry = crate::store::AuditEntry {
        at_ms: crate::store::now_ms(),
        actor,
        role: "ssf".into(),
        method: "POST".into(),
        path: path.to_owned(),
        action: format!("POST {path}"),
        status,
        detail: detail.chars().take(1024).collect(),
    };
    if let Err(e) = cp.store.append_audit(&entry).await {
        tracing::error!(error = %e, "cannot write the audit log");
    }
}

/// How long one poll of a transmitter may take (it may hold it open).
const POLL_TIMEOUT: Duration = Duration::from_secs(60);
/// The SETs asked for in one poll.
const POLL_MAX_EVENTS: usize = 50;
/// The largest poll answer read.
const POLL_MAX_BODY: usize = POLL_MAX_EVENTS * MAX_SET_BYTES;

/// Polls each transmitter policy gives a `poll_url` (RFC 8936), one task
/// each, restarted when the policy changes it; the tasks end with this
/// future.
pub async fn poll_transmitters(cp: Arc<ControlPlaneState>) {
    struct Running(SsfTransmitter, tokio::task::JoinHandle<()>);
    impl Drop for Running {
        fn drop(&mut self) {
            self.1.abort();
        }
    }
    let mut changed = cp.policy_changed.subscribe();
    let mut running: HashMap<String, Running> = HashMap::new();
    loop {
        let wanted: Vec<SsfTransmitter> = cp
            .policy
            .load()
            .policy
            .policy
            .ssf
            .iter()
            .flat_map(|s| &s.transmitters)
            .filter(|t| t.poll_url.is_some())
            .cloned()
            .collect();
        running.retain(|_, r| wanted.contains(&r.0));
        for t in wanted {
            if !running.contains_key(&t.name) {
                let task = tokio::spawn(poll_transmitter(cp.clone(), t.clone()));
                running.insert(t.name.clone(), Running(t, task));
            }
        }
        if changed.changed().await.is_err() {
            return;
        }
    }
}

/// Polls one transmitter for ever: each SET it returns is verified and
/// committed as a pushed one would be, then acknowledged in the next poll,
/// or reported with its RFC 8935 error code (`setErrs`). A SET another
/// replica is still committing is left to come again.
async fn poll_transmitter(cp: Arc<ControlPlaneState>, t: SsfTransmitter) {
    let Some(url) = t.poll_url.clone() else {
        return;
    };
    let mut ack: Vec<String> = Vec::new();
    let mut errs = serde_json::Map::new();
    let mut backoff = Duration::from_secs(1);
    loop {
        let started = Instant::now();
        let sets = match cp.ssf.poll_once(&cp, &t, &url, &ack, &errs).await {
            Ok(sets) => sets,
            Err(why) => {
                tracing::warn!(transmitter = %t.name, url, why, "cannot poll the transmitter");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(30));
                continue;
            }
        };
        backoff = Duration::from_secs(1);
        ack.clear();
        errs.clear();
        let none = sets.is_empty();
        for (jti, set) in sets {
            let outcome = match set.as_str() {
                Some(set) => cp.ssf.receive(&cp, set.as_bytes(), Some(&t)).await,
                None => Err(SsfError {
                    transmitter: Some(t.name.clone()),
                    ..refuse("invalid_request", "a SET is a compact JWT string")
                }),
            };
            audit(&cp, &url, &outcome).await;
            match outcome {
                Ok(_) => ack.push(jti),
                Err(e) => match e.replay {
                    Some(Replay::InEffect) => ack.push(jti),
                    Some(Replay::InProgress) => {}
                    None => {
                        errs.insert(
                            jti,
                            serde_json::json!({"err": e.err, "description": e.description}),
                        );
                    }
                },
            }
        }
        // A transmitter that answers at once, though asked to wait.
        if none && started.elapsed() < Duration::from_secs(1) {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}

impl SsfReceiver {
    /// One poll: acknowledges `ack`, reports `errs`, returns the SETs by
    /// `jti`.
    async fn poll_once(
        &self,
        cp: &ControlPlaneState,
        t: &SsfTransmitter,
        url: &str,
        ack: &[String],
        errs: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<serde_json::Map<String, serde_json::Value>, String> {
        let body = serde_json::json!({
            "ack": ack,
            "setErrs": errs,
            "maxEvents": POLL_MAX_EVENTS,
            "returnImmediately": false,
        });
        let mut req = http::Request::post(url)
            .header(http::header::CONTENT_TYPE, "application/json")
            .header(http::header::ACCEPT, "application/json");
        if let Some(file) = &t.poll_token_file {
            let dir = cp.policy_path.parent().unwrap_or(std::path::Path::new("."));
            let path = dir.join(file);
            let token = std::fs::read_to_string(&path)
                .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
            let value = http::HeaderValue::from_str(&format!("Bearer {}", token.trim()))
                .map_err(|_| format!("{} is not a bearer token", path.display()))?;
            req = req.header(http::header::AUTHORIZATION, value);
        }
        let req = req
            .body(http_body_util::Full::new(bytes::Bytes::from(
                body.to_string(),
            )))
            .map_err(|e| e.to_string())?;
        let client = self.client(transmitter_ca(&cp.policy.load().policy, t))?;
        let (status, body) = crate::oauth2::call_within(&client, req, POLL_TIMEOUT, POLL_MAX_BODY)
            .await
            .map_err(|e| e.to_string())?;
        if status != 200 {
            return Err(format!("HTTP {status}"));
        }
        let answer: serde_json::Value =
            serde_json::from_slice(&body).map_err(|e| format!("not JSON: {e}"))?;
        answer
            .get("sets")
            .and_then(serde_json::Value::as_object)
            .cloned()
            .ok_or_else(|| "the answer has no sets".to_owned())
    }
}

/// The `iss` claim before anything is verified (to choose the keys).
fn unverified_issuer(token: &str) -> Option<String> {
    use base64::Engine as _;
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    claims.get("iss")?.as_str().map(str::to_owned)
}

/// The one event of a SET, what its subject maps to, and the SET's jti.
fn event_of(
    claims: &serde_json::Map<String, serde_json::Value>,
    ssf: &SsfSpec,
) -> Result<(String, SsfTarget, String), SsfError> {
    let jti = claims
        .get("jti")
        .and_then(|j| j.as_str())
        .filter(|j| !j.is_empty() && j.len() <= 256)
        .ok_or_else(|| refuse("invalid_request", "jti must be a string"))?
        .to_owned();
    let events = claims
        .get("events")
        .and_then(|e| e.as_object())
        .filter(|e| e.len() == 1)
        .ok_or_else(|| refuse("invalid_request", "a SET carries exactly one event"))?;
    let (event_type, event) = events
        .iter()
        .next()
        .ok_or_else(|| refuse("invalid_request", "no event"))?;
    let workload_only = match event_type.as_str() {
        RISC_CREDENTIAL_COMPROMISE => false,
        CAEP_SESSION_REVOKED | CAEP_CREDENTIAL_CHANGE | RISC_ACCOUNT_DISABLED => true,
        other => {
            return Err(refuse(
                "invalid_request",
                format!("event type {other:?} is not one this receiver acts on"),
            ));
        }
    };
    // SSF 1.0 puts the subject in `sub_id`; earlier profiles in the event.
    let subject = claims
        .get("sub_id")
        .or_else(|| event.get("subject"))
        .ok_or_else(|| refuse("invalid_request", "the event has no subject"))?;
    let target = map_subject(subject, ssf).ok_or_else(|| {
        refuse(
            "invalid_request",
            format!("the subject {subject} maps to nothing in policy"),
        )
    })?;
    if workload_only && (target.workload.is_empty() || !target.credential_id.is_empty()) {
        return Err(refuse(
            "invalid_request",
            "this event revokes a workload, and its subject maps to something else",
        ));
    }
    Ok((event_type.clone(), target, jti))
}

/// What a subject identifier (RFC 9493) means, by policy.
fn map_subject(subject: &serde_json::Value, ssf: &SsfSpec) -> Option<SsfTarget> {
    let field = |name: &str| subject.get(name).and_then(|v| v.as_str());
    let format = field("format")?;
    if let Some(m) = ssf.subjects.iter().find(|m| {
        m.format == format
            && match format {
                "iss_sub" => m.iss.as_deref() == field("iss") && m.sub.as_deref() == field("sub"),
                "opaque" => m.id.as_deref() == field("id"),
                "uri" => m.uri.as_deref() == field("uri"),
                _ => false,
            }
    }) {
        return Some(m.revoke.clone());
    }
    // A SPIFFE ID as a URI subject is that workload.
    let uri = field("uri").filter(|_| format == "uri")?;
    spiffe::SpiffeId::new(uri).ok().map(|_| SsfTarget {
        workload: uri.to_owned(),
        ..SsfTarget::default()
    })
}
