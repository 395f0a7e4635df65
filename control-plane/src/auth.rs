//! Admin API tokens: `lsh_<id>_<secret>`, of which only a SHA-256 of the
//! secret is stored. Three roles, each including the ones below it.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use ring::digest;
use ring::rand::{SecureRandom as _, SystemRandom};

use crate::store::{Store, StoreError, TokenRecord, now_ms};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    /// Read revocations, sidecars, propagation.
    Viewer,
    /// Also revoke and restore.
    Responder,
    /// Also manage tokens and read the audit log.
    Admin,
}

impl Role {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "viewer" => Some(Self::Viewer),
            "responder" => Some(Self::Responder),
            "admin" => Some(Self::Admin),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Viewer => "viewer",
            Self::Responder => "responder",
            Self::Admin => "admin",
        }
    }
}

/// Who is calling, once authenticated.
#[derive(Debug, Clone)]
pub struct Caller {
    /// `token:<name>/<id>`, as written to the audit log and `revoked_by`.
    pub actor: String,
    pub role: Role,
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("missing bearer token (Authorization: Bearer lsh_…)")]
    Missing,
    #[error("invalid token")]
    Invalid,
    #[error(transparent)]
    Store(#[from] StoreError),
}

pub(crate) fn sha256(secret: &str) -> Vec<u8> {
    digest::digest(&digest::SHA256, secret.as_bytes())
        .as_ref()
        .to_vec()
}

/// Compares in constant time, so timing does not tell how much matched.
pub(crate) fn same(a: &[u8], b: &[u8]) -> bool {
    use subtle::ConstantTimeEq as _;
    a.ct_eq(b).into()
}

/// `prefix` and 32 random bytes (base64url): a secret to show once.
pub(crate) fn random_secret(prefix: &str) -> String {
    let mut secret = [0u8; 32];
    // SystemRandom only fails if the OS has no entropy source at all.
    let _ = SystemRandom::new().fill(&mut secret);
    format!("{prefix}{}", B64.encode(secret))
}

/// Creates a token; returns the secret string (shown once) and its record.
pub async fn create_token(
    store: &Store,
    name: &str,
    role: Role,
    created_by: &str,
) -> Result<String, StoreError> {
    let rng = SystemRandom::new();
    let mut id = [0u8; 6];
    let mut secret = [0u8; 32];
    // SystemRandom only fails if the OS has no entropy source at all.
    let _ = rng.fill(&mut id);
    let _ = rng.fill(&mut secret);
    let id: String = id.iter().map(|b| format!("{b:02x}")).collect();
    let secret = B64.encode(secret);
    store
        .insert_token(&TokenRecord {
            id: id.clone(),
            name: name.to_owned(),
            role: role.as_str().to_owned(),
            secret_sha256: sha256(&secret),
            created_at_ms: now_ms(),
            created_by: created_by.to_owned(),
        })
        .await?;
    Ok(format!("lsh_{id}_{secret}"))
}

/// Checks an `Authorization` header value.
pub async fn authenticate(store: &Store, authorization: Option<&str>) -> Result<Caller, AuthError> {
    let token = authorization
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .ok_or(AuthError::Missing)?;
    authenticate_token(store, token)
        .await
        .map(|(caller, _)| caller)
}

/// Checks a token (`lsh_<id>_<secret>`); the caller and the token's id.
pub async fn authenticate_token(store: &Store, token: &str) -> Result<(Caller, String), AuthError> {
    let (id, secret) = token
        .trim()
        .strip_prefix("lsh_")
        .and_then(|t| t.split_once('_'))
        .ok_or(AuthError::Invalid)?;
    let record = store.token(id).await?.ok_or(AuthError::Invalid)?;
    if !same(&sha256(secret), &record.secret_sha256) {
        return Err(AuthError::Invalid);
    }
    Ok((caller(&record)?, record.id))
}

/// The caller a token record stands for.
fn caller(record: &TokenRecord) -> Result<Caller, AuthError> {
    let role = Role::parse(&record.role).ok_or(AuthError::Invalid)?;
    Ok(Caller {
        actor: format!("token:{}/{}", record.name, record.id),
        role,
    })
}

/// The caller of the token `id`, if it still exists (a console session
/// acts as the token it was opened with).
pub async fn caller_of(store: &Store, id: &str) -> Result<Caller, AuthError> {
    let record = store.token(id).await?.ok_or(AuthError::Invalid)?;
    caller(&record)
}
