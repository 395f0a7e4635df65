//! Signed heads of the audit chain. The chain alone shows an edit to anyone
//! who re-walks it, but someone who can write the database can recompute
//! it; a head signed with a key derived from the master key (never stored)
//! cannot be recomputed. The control plane signs the head every
//! [`ANCHOR_EVERY`] entries (kept beside the chain) and on demand
//! (`GET /v1/audit/head`); a head saved elsewhere is checked with
//! `leashctl audit verify --head FILE`.

use base64::Engine as _;
use ring::signature::{ED25519, KeyPair as _, UnparsedPublicKey};

/// Entries between two stored anchors.
pub const ANCHOR_EVERY: i64 = 1000;

/// The head of the chain at entry `id`, signed.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct SignedHead {
    pub id: i64,
    pub hash: String,
    pub at_ms: i64,
    /// Ed25519 public key (base64) of the signer.
    pub public_key: String,
    /// Ed25519 signature (base64) of [`message`].
    pub signature: String,
}

/// What is signed: unambiguous, and labelled so it is never anything else.
pub fn message(id: i64, hash: &str, at_ms: i64) -> Vec<u8> {
    format!("leash-audit-head\n{id}\n{hash}\n{at_ms}").into_bytes()
}

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

impl SignedHead {
    pub fn sign(key: &ring::signature::Ed25519KeyPair, id: i64, hash: &str, at_ms: i64) -> Self {
        Self {
            id,
            hash: hash.to_owned(),
            at_ms,
            public_key: B64.encode(key.public_key().as_ref()),
            signature: B64.encode(key.sign(&message(id, hash, at_ms)).as_ref()),
        }
    }

    /// Whether the signature is valid under the head's own public key.
    pub fn verify(&self) -> bool {
        let (Ok(public), Ok(sig)) = (B64.decode(&self.public_key), B64.decode(&self.signature))
        else {
            return false;
        };
        UnparsedPublicKey::new(&ED25519, public)
            .verify(&message(self.id, &self.hash, self.at_ms), &sig)
            .is_ok()
    }

    /// Whether it was signed by `key` (the current master key's).
    pub fn signed_by(&self, key: &ring::signature::Ed25519KeyPair) -> bool {
        self.verify() && self.public_key == B64.encode(key.public_key().as_ref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secrets::MasterKey;

    #[test]
    fn a_head_verifies_and_any_change_breaks_it() {
        let m = MasterKey::from_base64(&MasterKey::generate_base64()).unwrap();
        let key = m.audit_anchor_key().unwrap();
        let head = SignedHead::sign(&key, 42, "abc", 7);
        assert!(head.verify() && head.signed_by(&key));
        for changed in [
            SignedHead {
                id: 43,
                ..head.clone()
            },
            SignedHead {
                hash: "abd".into(),
                ..head.clone()
            },
            SignedHead {
                at_ms: 8,
                ..head.clone()
            },
        ] {
            assert!(!changed.verify());
        }
        // Derived from the master key: the same key signs the same way, another does not.
        let again = MasterKey::from_base64(&MasterKey::generate_base64()).unwrap();
        assert!(!head.signed_by(&again.audit_anchor_key().unwrap()));
    }
}
