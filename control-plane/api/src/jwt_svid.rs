//! JWT-SVIDs for the dev Workload API (the JWT half: `FetchJWTSVID`,
//! `FetchJWTBundles`, `ValidateJWTSVID`), per the SPIFFE JWT-SVID spec:
//! ES256, a `kid` in the header, `sub` the SPIFFE ID, `aud` the audiences
//! asked for, `exp`, `iat`, and a `jti` in every one so that a JWT-SVID can
//! be named and revoked. The trust domain's JWT bundle is a JWKS with that
//! key (`use: jwt-svid`).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair as _};

/// How long a JWT-SVID is valid.
pub const JWT_SVID_TTL: Duration = Duration::from_secs(300);

pub struct JwtSvidAuthority {
    trust_domain: String,
    kid: String,
    encoding: EncodingKey,
    decoding: DecodingKey,
    jwks: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
pub enum JwtSvidError {
    #[error("generating the JWT-SVID key: {0}")]
    Key(String),
    #[error("{0}")]
    Invalid(String),
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Claims {
    sub: String,
    aud: Vec<String>,
    exp: u64,
    iat: u64,
    jti: String,
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

impl JwtSvidAuthority {
    /// A new ES256 key for `trust_domain` (held in memory only).
    pub fn generate(trust_domain: &str) -> Result<Self, JwtSvidError> {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
            .map_err(|e| JwtSvidError::Key(e.to_string()))?;
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng)
            .map_err(|e| JwtSvidError::Key(e.to_string()))?;
        // Uncompressed point: 0x04 || x || y.
        let point = pair.public_key().as_ref();
        let (x, y) = (b64(&point[1..33]), b64(&point[33..65]));
        let mut kid_bytes = [0u8; 12];
        ring::rand::SecureRandom::fill(&rng, &mut kid_bytes)
            .map_err(|e| JwtSvidError::Key(e.to_string()))?;
        let kid = b64(&kid_bytes);
        let decoding = DecodingKey::from_ec_components(&x, &y)
            .map_err(|e| JwtSvidError::Key(e.to_string()))?;
        let jwks = serde_json::to_vec(&serde_json::json!({
            "keys": [{"kty": "EC", "crv": "P-256", "x": x, "y": y, "kid": kid, "use": "jwt-svid", "alg": "ES256"}]
        }))
        .map_err(|e| JwtSvidError::Key(e.to_string()))?;
        Ok(Self {
            trust_domain: trust_domain.to_owned(),
            kid,
            encoding: EncodingKey::from_ec_der(pkcs8.as_ref()),
            decoding,
            jwks,
        })
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The trust domain's JWT bundle (a JWKS document).
    pub fn jwks(&self) -> &[u8] {
        &self.jwks
    }

    /// A JWT-SVID for `spiffe_id` with these audiences (at least one).
    pub fn sign(&self, spiffe_id: &str, audience: &[String]) -> Result<String, JwtSvidError> {
        if audience.is_empty() || audience.iter().any(String::is_empty) {
            return Err(JwtSvidError::Invalid(
                "a JWT-SVID needs at least one audience".into(),
            ));
        }
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(self.kid.clone());
        header.typ = Some("JWT".into());
        let claims = Claims {
            sub: spiffe_id.to_owned(),
            aud: audience.to_vec(),
            exp: now + JWT_SVID_TTL.as_secs(),
            iat: now,
            jti: uuid_like(),
        };
        jsonwebtoken::encode(&header, &claims, &self.encoding)
            .map_err(|e| JwtSvidError::Key(e.to_string()))
    }

    /// Validates `token` for `audience`: signature by this trust domain's
    /// key, not expired, the audience among its `aud`, a SPIFFE ID of this
    /// trust domain as `sub`. Returns the SPIFFE ID and every claim.
    pub fn validate(
        &self,
        token: &str,
        audience: &str,
    ) -> Result<(String, serde_json::Map<String, serde_json::Value>), JwtSvidError> {
        let invalid = |e: &dyn std::fmt::Display| JwtSvidError::Invalid(e.to_string());
        let header = jsonwebtoken::decode_header(token).map_err(|e| invalid(&e))?;
        if header.kid.as_deref() != Some(&self.kid) {
            return Err(JwtSvidError::Invalid(
                "the JWT-SVID's kid is not in this trust domain's bundle".into(),
            ));
        }
        let mut validation = Validation::new(Algorithm::ES256);
        validation.set_audience(&[audience]);
        validation.set_required_spec_claims(&["exp", "aud", "sub"]);
        let data = jsonwebtoken::decode::<serde_json::Map<String, serde_json::Value>>(
            token,
            &self.decoding,
            &validation,
        )
        .map_err(|e| invalid(&e))?;
        let sub = data
            .claims
            .get("sub")
            .and_then(|s| s.as_str())
            .unwrap_or_default()
            .to_owned();
        let td = format!("spiffe://{}/", self.trust_domain);
        if !sub.starts_with(&td) {
            return Err(JwtSvidError::Invalid(format!(
                "sub {sub:?} is not a SPIFFE ID of {}",
                self.trust_domain
            )));
        }
        Ok((sub, data.claims))
    }
}

/// A random identifier (128 bits, hex).
fn uuid_like() -> String {
    let mut bytes = [0u8; 16];
    let _ = ring::rand::SecureRandom::fill(&SystemRandom::new(), &mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// JSON claims as a protobuf `Struct` (what `ValidateJWTSVID` answers).
pub fn to_struct(claims: serde_json::Map<String, serde_json::Value>) -> prost_types::Struct {
    fn value(v: serde_json::Value) -> prost_types::Value {
        use prost_types::value::Kind;
        let kind = match v {
            serde_json::Value::Null => Kind::NullValue(0),
            serde_json::Value::Bool(b) => Kind::BoolValue(b),
            serde_json::Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(0.0)),
            serde_json::Value::String(s) => Kind::StringValue(s),
            serde_json::Value::Array(a) => Kind::ListValue(prost_types::ListValue {
                values: a.into_iter().map(value).collect(),
            }),
            serde_json::Value::Object(o) => Kind::StructValue(to_struct(o)),
        };
        prost_types::Value { kind: Some(kind) }
    }
    prost_types::Struct {
        fields: claims.into_iter().map(|(k, v)| (k, value(v))).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signed_svids_validate_for_their_audience_only() {
        let a = JwtSvidAuthority::generate("leash.test").unwrap();
        let t = a
            .sign(
                "spiffe://leash.test/ns/a",
                &["svc-b".into(), "svc-c".into()],
            )
            .unwrap();
        let (id, claims) = a.validate(&t, "svc-c").unwrap();
        assert_eq!(id, "spiffe://leash.test/ns/a");
        assert!(claims["jti"].as_str().is_some_and(|j| j.len() == 32));
        assert!(a.validate(&t, "svc-x").is_err(), "another audience");
        let other = JwtSvidAuthority::generate("leash.test").unwrap();
        assert!(other.validate(&t, "svc-b").is_err(), "another key");
        assert!(a.sign("spiffe://leash.test/ns/a", &[]).is_err());
        let jwks: serde_json::Value = serde_json::from_slice(a.jwks()).unwrap();
        assert_eq!(jwks["keys"][0]["use"], "jwt-svid");
    }
}
