//! The built-in `jwt` credential: ES256-signed JWTs bound to the caller's
//! SPIFFE ID, with the public keys published as a JWKS.
//!
//! Signing uses `ring` directly (the one crypto provider of the tree); the
//! token format is plain RFC 7519 / 7515 so that any JWT library can verify
//! it from `/.well-known/jwks.json`.

use std::sync::Arc;

use arc_swap::ArcSwap;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair as _};
use serde::Serialize;

use crate::store::{Store, StoreError, StoredKey, now_ms};

/// How many keys stay in the JWKS after a rotation: the active one plus the
/// previous ones whose tokens may still be in use.
const PUBLISHED_KEYS: usize = 3;

#[derive(Debug, thiserror::Error)]
pub enum JwtError {
    #[error("signing key {kid} is unusable: {reason}")]
    BadKey { kid: String, reason: String },
    #[error("signing failed")]
    Sign,
    #[error(transparent)]
    Store(#[from] StoreError),
}

struct SigningKey {
    kid: String,
    pair: EcdsaKeyPair,
    /// base64url of the raw header `{"alg":"ES256","typ":"JWT","kid":...}`.
    header_b64: String,
    jwk: serde_json::Value,
}

impl SigningKey {
    fn from_stored(k: &StoredKey) -> Result<Self, JwtError> {
        let rng = SystemRandom::new();
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &k.pkcs8, &rng)
            .map_err(|e| JwtError::BadKey {
                kid: k.kid.clone(),
                reason: e.to_string(),
            })?;
        // Uncompressed point: 0x04 || X (32 bytes) || Y (32 bytes).
        let point = pair.public_key().as_ref();
        if point.len() != 65 || point[0] != 4 {
            return Err(JwtError::BadKey {
                kid: k.kid.clone(),
                reason: "not an uncompressed P-256 point".into(),
            });
        }
        let jwk = serde_json::json!({
            "kty": "EC",
            "crv": "P-256",
            "x": B64.encode(&point[1..33]),
            "y": B64.encode(&point[33..65]),
            "use": "sig",
            "alg": "ES256",
            "kid": k.kid,
        });
        let header = serde_json::json!({"alg": "ES256", "typ": "JWT", "kid": k.kid});
        Ok(Self {
            kid: k.kid.clone(),
            pair,
            header_b64: B64.encode(header.to_string()),
            jwk,
        })
    }
}

struct KeyRing {
    /// Newest first; the first is the one that signs.
    keys: Vec<SigningKey>,
}

/// Claims of an issued credential.
#[derive(Debug, Serialize)]
pub struct Claims<'a> {
    pub iss: &'a str,
    pub sub: &'a str,
    pub aud: &'a str,
    pub jti: &'a str,
    pub iat: i64,
    pub exp: i64,
}

pub struct JwtIssuer {
    issuer: String,
    ring: ArcSwap<KeyRing>,
    rng: SystemRandom,
    /// Signs evidence bundles; published beside the signing keys.
    evidence: SigningKey,
}

impl JwtIssuer {
    /// Loads the signing keys from the store, creating the first one if there is none.
    pub async fn load_or_create(store: &Store, issuer: String) -> Result<Self, JwtError> {
        if store.signing_keys().await?.is_empty() {
            rotate(store).await?;
        }
        let ring = load_ring(store).await?;
        let evidence = SigningKey::from_stored(&store.evidence_key().await?)?;
        Ok(Self {
            issuer,
            ring: ArcSwap::from_pointee(ring),
            rng: SystemRandom::new(),
            evidence,
        })
    }

    /// Picks up keys rotated by another process (`leash-control-plane keys rotate`).
    pub async fn reload(&self, store: &Store) -> Result<(), JwtError> {
        let ring = load_ring(store).await?;
        let changed = {
            let current = self.ring.load();
            current.keys.first().map(|k| &k.kid) != ring.keys.first().map(|k| &k.kid)
        };
        if changed {
            tracing::info!(
                kid = ring.keys.first().map(|k| k.kid.as_str()),
                "signing key rotated"
            );
            self.ring.store(Arc::new(ring));
        }
        Ok(())
    }

    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    pub fn active_kid(&self) -> String {
        self.ring
            .load()
            .keys
            .first()
            .map(|k| k.kid.clone())
            .unwrap_or_default()
    }

    /// Signs `claims` with the active key, returning the compact JWS.
    pub fn sign(&self, claims: &Claims<'_>) -> Result<String, JwtError> {
        let ring = self.ring.load();
        let key = ring.keys.first().ok_or(JwtError::Sign)?;
        let payload = serde_json::to_vec(claims).map_err(|_| JwtError::Sign)?;
        let mut token = String::with_capacity(key.header_b64.len() + payload.len() * 4 / 3 + 100);
        token.push_str(&key.header_b64);
        token.push('.');
        B64.encode_string(&payload, &mut token);
        let sig = key
            .pair
            .sign(&self.rng, token.as_bytes())
            .map_err(|_| JwtError::Sign)?;
        token.push('.');
        B64.encode_string(sig.as_ref(), &mut token);
        Ok(token)
    }

    /// Signs a Security Event Token (RFC 8417): `claims` as they are, the
    /// header's `typ` `secevent+jwt`, with the active key.
    pub fn sign_set(&self, claims: &serde_json::Value) -> Result<String, JwtError> {
        let ring = self.ring.load();
        let key = ring.keys.first().ok_or(JwtError::Sign)?;
        let header = serde_json::json!({"alg": "ES256", "kid": key.kid, "typ": "secevent+jwt"});
        let mut token = B64.encode(header.to_string());
        token.push('.');
        B64.encode_string(claims.to_string(), &mut token);
        let sig = key
            .pair
            .sign(&self.rng, token.as_bytes())
            .map_err(|_| JwtError::Sign)?;
        token.push('.');
        B64.encode_string(sig.as_ref(), &mut token);
        Ok(token)
    }

    /// The published keys as an RFC 7517 JWK Set: the credential signing
    /// keys and the evidence key.
    pub fn jwks(&self) -> serde_json::Value {
        let ring = self.ring.load();
        let keys: Vec<_> = ring
            .keys
            .iter()
            .map(|k| k.jwk.clone())
            .chain(std::iter::once(self.evidence.jwk.clone()))
            .collect();
        serde_json::json!({ "keys": keys })
    }

    /// Signs `payload` as a flattened JWS JSON serialization (RFC 7515
    /// §7.2.2), ES256, with the evidence key: verifiable offline against
    /// the published JWKS.
    pub fn sign_evidence(&self, payload: &[u8]) -> Result<SignedEvidence, JwtError> {
        let header = serde_json::json!({
            "alg": "ES256",
            "kid": self.evidence.kid,
            "typ": EVIDENCE_TYPE,
        });
        let protected = B64.encode(header.to_string());
        let payload = B64.encode(payload);
        let input = format!("{protected}.{payload}");
        let sig = self
            .evidence
            .pair
            .sign(&self.rng, input.as_bytes())
            .map_err(|_| JwtError::Sign)?;
        Ok(SignedEvidence {
            protected,
            payload,
            signature: B64.encode(sig.as_ref()),
        })
    }
}

async fn load_ring(store: &Store) -> Result<KeyRing, JwtError> {
    let stored = store.signing_keys().await?;
    let keys = stored
        .iter()
        .take(PUBLISHED_KEYS)
        .map(SigningKey::from_stored)
        .collect::<Result<Vec<_>, _>>()?;
    Ok(KeyRing { keys })
}

/// The JWS `typ` of an evidence bundle.
pub const EVIDENCE_TYPE: &str = "leash-evidence+json";

/// A flattened JWS (RFC 7515 §7.2.2): base64url of the protected header,
/// of the payload, and of the signature over `protected.payload`.
#[derive(Debug, Clone, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct SignedEvidence {
    pub protected: String,
    pub payload: String,
    pub signature: String,
}

/// Why a bundle does not verify.
#[derive(Debug, thiserror::Error)]
pub enum EvidenceError {
    #[error("not a flattened JWS: {0}")]
    Malformed(String),
    #[error("signed with {0:?}, which the JWKS does not hold")]
    UnknownKey(String),
    #[error("the signature does not match the content (changed since it was signed?)")]
    BadSignature,
}

/// Verifies a bundle against a JWK Set; returns the payload and the kid.
pub fn verify_evidence(
    bundle: &SignedEvidence,
    jwks: &serde_json::Value,
) -> Result<(Vec<u8>, String), EvidenceError> {
    let bad = |m: &str| EvidenceError::Malformed(m.to_owned());
    let header: serde_json::Value = serde_json::from_slice(
        &B64.decode(&bundle.protected)
            .map_err(|_| bad("protected is not base64url"))?,
    )
    .map_err(|_| bad("protected is not JSON"))?;
    if header["alg"] != "ES256" || header["typ"] != EVIDENCE_TYPE {
        return Err(bad("not an ES256 Leash evidence bundle"));
    }
    let kid = header["kid"]
        .as_str()
        .ok_or_else(|| bad("no kid"))?
        .to_owned();
    let jwk = jwks["keys"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|k| k["kid"] == kid.as_str() && k["kty"] == "EC" && k["crv"] == "P-256")
        .ok_or_else(|| EvidenceError::UnknownKey(kid.clone()))?;
    let coordinate = |name: &str| {
        jwk[name]
            .as_str()
            .and_then(|c| B64.decode(c).ok())
            .filter(|c| c.len() == 32)
            .ok_or_else(|| bad("the JWK's point is not P-256"))
    };
    let mut point = vec![4u8];
    point.extend(coordinate("x")?);
    point.extend(coordinate("y")?);
    let signature = B64
        .decode(&bundle.signature)
        .map_err(|_| bad("signature is not base64url"))?;
    let input = format!("{}.{}", bundle.protected, bundle.payload);
    ring::signature::UnparsedPublicKey::new(&ring::signature::ECDSA_P256_SHA256_FIXED, &point)
        .verify(input.as_bytes(), &signature)
        .map_err(|_| EvidenceError::BadSignature)?;
    let payload = B64
        .decode(&bundle.payload)
        .map_err(|_| bad("payload is not base64url"))?;
    Ok((payload, kid))
}

/// Generates a new ES256 key and makes it the active one. Returns its `kid`.
pub async fn rotate(store: &Store) -> Result<String, JwtError> {
    let rng = SystemRandom::new();
    let pkcs8 =
        EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).map_err(|_| {
            JwtError::BadKey {
                kid: "(new)".into(),
                reason: "key generation failed".into(),
            }
        })?;
    let created_at_ms = now_ms();
    let kid = format!("leash-{}", uuid::Uuid::new_v4().simple());
    store
        .insert_signing_key(&StoredKey {
            kid: kid.clone(),
            pkcs8: zeroize::Zeroizing::new(pkcs8.as_ref().to_vec()),
            created_at_ms,
        })
        .await?;
    Ok(kid)
}
