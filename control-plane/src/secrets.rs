//! Brokered static secrets: versions of an upstream's long-lived secret,
//! encrypted at rest with AES-256-GCM under a master key that never enters
//! the database, leased to granted sidecars (never to workloads).

use std::path::Path;

use base64::Engine as _;
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use ring::rand::{SecureRandom as _, SystemRandom};
use zeroize::Zeroizing;

use crate::store::{SecretVersion, Store, StoreError, now_ms};

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error(
        "no master key configured (--master-key-file or LEASH_MASTER_KEY): static secrets are unavailable"
    )]
    NoMasterKey,
    #[error("master key: {0}")]
    BadMasterKey(String),
    #[error("{0}")]
    Invalid(String),
    #[error("no secret stored for upstream {0:?}")]
    Missing(String),
    #[error(
        "the current secret version {version} of upstream {upstream:?} is revoked and no newer one was put; put a new version (older versions are never used again)"
    )]
    CurrentRevoked { upstream: String, version: i64 },
    #[error("secret version {version} of {upstream:?} cannot be decrypted (wrong master key?)")]
    Decrypt { upstream: String, version: i64 },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// How a sealed key starts in the store (a plaintext PKCS#8 key starts
/// with 0x30, a plaintext fingerprint key is hex).
pub const SEALED_KEY: &[u8] = b"lk1:";

/// The key that encrypts every stored secret (and from which the audit
/// anchor's signing key is derived).
pub struct MasterKey(LessSafeKey, Zeroizing<Vec<u8>>);

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MasterKey(<redacted>)")
    }
}

impl MasterKey {
    /// From 32 bytes, given base64-encoded (as in `LEASH_MASTER_KEY` or the key file).
    pub fn from_base64(text: &str) -> Result<Self, SecretError> {
        let raw = Zeroizing::new(
            base64::engine::general_purpose::STANDARD
                .decode(text.trim())
                .map_err(|_| SecretError::BadMasterKey("not base64".into()))?,
        );
        if raw.len() != 32 {
            return Err(SecretError::BadMasterKey(format!(
                "{} bytes; 32 are needed",
                raw.len()
            )));
        }
        let key = UnboundKey::new(&AES_256_GCM, &raw)
            .map_err(|_| SecretError::BadMasterKey("rejected".into()))?;
        Ok(Self(LessSafeKey::new(key), raw))
    }

    pub fn from_file(path: &Path) -> Result<Self, SecretError> {
        let text = Zeroizing::new(
            std::fs::read_to_string(path)
                .map_err(|e| SecretError::BadMasterKey(format!("{}: {e}", path.display())))?,
        );
        Self::from_base64(&text)
    }

    /// The Ed25519 key that signs audit-chain heads: derived from the master
    /// key (HMAC-SHA256 under a fixed label), so it is stored nowhere, and
    /// anyone able to write the database still cannot sign a head.
    pub fn audit_anchor_key(&self) -> Option<ring::signature::Ed25519KeyPair> {
        let seed = ring::hmac::sign(
            &ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &self.1),
            b"leash audit anchor v1",
        );
        ring::signature::Ed25519KeyPair::from_seed_unchecked(seed.as_ref()).ok()
    }

    /// A fresh random key, base64-encoded (for `leash-control-plane master-key generate`).
    pub fn generate_base64() -> String {
        let mut raw = Zeroizing::new([0u8; 32]);
        let _ = SystemRandom::new().fill(&mut *raw);
        base64::engine::general_purpose::STANDARD.encode(*raw)
    }

    /// The additional data binds a ciphertext to its row: a version cannot be
    /// swapped for another upstream's or another version's.
    fn aad(upstream: &str, version: i64) -> Vec<u8> {
        format!("leash-secret\0{upstream}\0{version}").into_bytes()
    }

    /// Seals a key of the control plane's own (a JWT signing key, the
    /// leak fingerprint key) for storage: `lk1:` ‖ nonce ‖ ciphertext+tag,
    /// bound by its purpose and id, so one stored key cannot stand in for
    /// another.
    pub fn seal_key(&self, purpose: &str, id: &str, plaintext: &[u8]) -> Vec<u8> {
        let (nonce, ciphertext) = self.aead_seal(Self::key_aad(purpose, id), plaintext);
        [SEALED_KEY, &nonce, &ciphertext].concat()
    }

    /// Opens what [`Self::seal_key`] sealed; None for a wrong key or id.
    pub fn open_key(&self, purpose: &str, id: &str, sealed: &[u8]) -> Option<Zeroizing<Vec<u8>>> {
        let (nonce, ciphertext) = sealed.strip_prefix(SEALED_KEY)?.split_at_checked(12)?;
        self.aead_open(Self::key_aad(purpose, id), nonce, ciphertext)
    }

    fn key_aad(purpose: &str, id: &str) -> Vec<u8> {
        format!("leash-key\0{purpose}\0{id}").into_bytes()
    }

    fn seal(&self, upstream: &str, version: i64, plaintext: &[u8]) -> (Vec<u8>, Vec<u8>) {
        self.aead_seal(Self::aad(upstream, version), plaintext)
    }

    /// A stored version's value, decrypted (revoked or not: the caller decides).
    pub fn open(&self, v: &SecretVersion) -> Result<Zeroizing<Vec<u8>>, SecretError> {
        self.aead_open(Self::aad(&v.upstream, v.version), &v.nonce, &v.ciphertext)
            .ok_or_else(|| SecretError::Decrypt {
                upstream: v.upstream.clone(),
                version: v.version,
            })
    }

    /// AES-256-GCM with a fresh random nonce: (nonce, ciphertext ‖ tag).
    fn aead_seal(&self, aad: Vec<u8>, plaintext: &[u8]) -> (Vec<u8>, Vec<u8>) {
        let mut nonce = [0u8; 12];
        let _ = SystemRandom::new().fill(&mut nonce);
        let mut buf = plaintext.to_vec();
        // Sealing only fails for absurd lengths; values are bounded to 8 KiB.
        let _ = self.0.seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(aad),
            &mut buf,
        );
        (nonce.to_vec(), buf)
    }

    fn aead_open(
        &self,
        aad: Vec<u8>,
        nonce: &[u8],
        ciphertext: &[u8],
    ) -> Option<Zeroizing<Vec<u8>>> {
        let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
        let mut buf = Zeroizing::new(ciphertext.to_vec());
        let len = self
            .0
            .open_in_place(nonce, Aad::from(aad), &mut buf)
            .ok()?
            .len();
        buf.truncate(len);
        Some(buf)
    }
}

const MAX_SECRET: usize = 8192;

/// Stores `value` as the new current version of `upstream`'s secret.
pub async fn put(
    store: &Store,
    key: &MasterKey,
    upstream: &str,
    value: &str,
    by: &str,
) -> Result<i64, SecretError> {
    if value.is_empty() || value.len() > MAX_SECRET {
        return Err(SecretError::Invalid(format!(
            "a secret must be 1-{MAX_SECRET} bytes"
        )));
    }
    if value.chars().any(char::is_control) {
        return Err(SecretError::Invalid(
            "a secret must not contain control characters".into(),
        ));
    }
    let version = store.next_secret_version(upstream).await?;
    let (nonce, ciphertext) = key.seal(upstream, version, value.as_bytes());
    store
        .insert_secret_version(&SecretVersion {
            upstream: upstream.to_owned(),
            version,
            nonce,
            ciphertext,
            created_at_ms: now_ms(),
            created_by: by.to_owned(),
            revoked_at_ms: None,
        })
        .await?;
    Ok(version)
}

/// The current version (the newest one), decrypted; an error if it is
/// revoked: an older version is never silently used again.
pub async fn current(
    store: &Store,
    key: &MasterKey,
    upstream: &str,
) -> Result<(i64, Zeroizing<Vec<u8>>), SecretError> {
    let v = store
        .current_secret_version(upstream)
        .await?
        .ok_or_else(|| SecretError::Missing(upstream.to_owned()))?;
    if v.revoked_at_ms.is_some() {
        return Err(SecretError::CurrentRevoked {
            upstream: upstream.to_owned(),
            version: v.version,
        });
    }
    Ok((v.version, key.open(&v)?))
}

/// The credential id under which a version is leased (and revoked).
pub fn lease_id(upstream: &str, version: i64) -> String {
    format!("static:{upstream}:v{version}")
}

/// The (upstream, version) a static lease id names.
pub fn parse_lease_id(id: &str) -> Option<(String, i64)> {
    let (upstream, version) = id.strip_prefix("static:")?.rsplit_once(":v")?;
    Some((upstream.to_owned(), version.parse().ok()?))
}
