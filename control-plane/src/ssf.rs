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
use std::sync::Mutex;
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
}

fn refuse(err: &'static str, description: impl Into<String>) -> SsfError {
    SsfError {
        err,
        description: description.into(),
        transmitter: None,
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
    client: std::sync::OnceLock<HttpsClient>,
}

impl SsfReceiver {
    fn client(&self) -> &HttpsClient {
        self.client
            .get_or_init(|| crate::https::client(crate::https::system_trust(), None))
    }

    /// Verifies, maps and commits one pushed SET.
    pub async fn receive(&self, cp: &ControlPlaneState, body: &[u8]) -> Result<Accepted, SsfError> {
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
            .find(|t| t.issuer == claimed_iss)
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
            .verify(token, &header, transmitter, ssf)
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
        let key = self.key(t, header.kid.as_deref()).await?;
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
    async fn key(&self, t: &SsfTransmitter, kid: Option<&str>) -> Result<DecodingKey, SsfError> {
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
                let set = self.fetch_jwks(t).await?;
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

    async fn fetch_jwks(&self, t: &SsfTransmitter) -> Result<JwkSet, SsfError> {
        let unavailable = |why: String| SsfError {
            err: "invalid_key",
            description: format!("{}'s JWKS could not be read: {why}", t.name),
            transmitter: None,
        };
        let req = http::Request::get(&t.jwks_url)
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .map_err(|e| unavailable(e.to_string()))?;
        let (status, body) = crate::oauth2::call(self.client(), req)
            .await
            .map_err(|e| unavailable(e.to_string()))?;
        if status != 200 {
            return Err(unavailable(format!("HTTP {status}")));
        }
        serde_json::from_slice(&body).map_err(|e| unavailable(e.to_string()))
    }

    async fn commit(
        &self,
        cp: &ControlPlaneState,
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
            return Err(refuse(
                "invalid_request",
                format!("jti {jti:?} from {:?} was received before", t.issuer),
            ));
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
                cp.ssf_out.revoked(cp, &stored.revocation);
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
