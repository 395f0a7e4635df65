//! The control plane's own keys at rest: JWT signing keys (`signing_keys`)
//! and the leak fingerprint key (`store_meta`), sealed under the master key
//! when there is one; and the store's identity.

use zeroize::Zeroizing;

use super::{Pool, Store, StoreError, unhex};

/// A JWT signing key as stored (the private key is PKCS#8 DER).
pub struct StoredKey {
    pub kid: String,
    pub pkcs8: Zeroizing<Vec<u8>>,
    pub created_at_ms: i64,
}

/// How a sealed key stored as text starts (hex of the sealed bytes follows).
const SEALED_TEXT: &str = "sealed:";

/// Bytes of the leak fingerprint key.
const FINGERPRINT_KEY_LEN: usize = 16;

fn seal_text(key: &crate::secrets::MasterKey, clear: &[u8]) -> String {
    format!(
        "{SEALED_TEXT}{}",
        hex::encode(key.seal_key("fingerprint", "fingerprint_key", clear))
    )
}

impl Store {
    /// Seals keys stored in the clear, when there is a master key.
    pub(super) async fn seal_clear_keys(&self) -> Result<(), StoreError> {
        let Some(key) = &self.master_key else {
            return Ok(());
        };
        let mut sealed = 0;
        let rows: Vec<(String, Vec<u8>)> = db!(&self.pool, |p| sqlx::query_as(
            self.sql("SELECT kid, pkcs8 FROM signing_keys")
        )
        .fetch_all(p)
        .await)?;
        for (kid, stored) in rows {
            let stored = Zeroizing::new(stored);
            if stored.starts_with(crate::secrets::SEALED_KEY) {
                continue;
            }
            db!(&self.pool, |p| sqlx::query(
                self.sql("UPDATE signing_keys SET pkcs8 = ? WHERE kid = ?")
            )
            .bind(key.seal_key("jwt-signing", &kid, &stored))
            .bind(&kid)
            .execute(p)
            .await
            .map(drop))?;
            sealed += 1;
        }
        let value: Option<String> = db!(&self.pool, |p| sqlx::query_scalar(
            self.sql("SELECT value FROM store_meta WHERE key = 'fingerprint_key'")
        )
        .fetch_optional(p)
        .await)?;
        if let Some(value) = value.filter(|v| !v.starts_with(SEALED_TEXT)) {
            let clear = Zeroizing::new(unhex("store_meta.value", "fingerprint_key", &value)?);
            fingerprint_key_of(&clear)?;
            db!(&self.pool, |p| sqlx::query(self.sql(
                "UPDATE store_meta SET value = ? WHERE key = 'fingerprint_key'"
            ))
            .bind(seal_text(key, &clear))
            .execute(p)
            .await
            .map(drop))?;
            sealed += 1;
        }
        // The evidence key, `kid hex(pkcs8)`: one made without a master key
        // is sealed like the others.
        let value: Option<String> = db!(&self.pool, |p| sqlx::query_scalar(
            self.sql("SELECT value FROM store_meta WHERE key = 'evidence_key'")
        )
        .fetch_optional(p)
        .await)?;
        if let Some((kid, stored)) = value.as_deref().and_then(|v| v.split_once(' ')) {
            let stored = Zeroizing::new(unhex("store_meta.value", "evidence_key", stored)?);
            if !stored.starts_with(crate::secrets::SEALED_KEY) {
                let sealed_key = key.seal_key("evidence-signing", kid, &stored);
                db!(&self.pool, |p| sqlx::query(self.sql(
                    "UPDATE store_meta SET value = ? WHERE key = 'evidence_key'"
                ))
                .bind(format!("{kid} {}", hex::encode(&sealed_key)))
                .execute(p)
                .await
                .map(drop))?;
                sealed += 1;
            }
        }
        if sealed > 0 {
            // The clear pages leave the write-ahead log too.
            // The clear pages leave the write-ahead log too (SQLite; a
            // PostgreSQL server's WAL and free space are its own to manage).
            if let Pool::Sqlite(p) = &self.pool {
                sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
                    .execute(p)
                    .await?;
            }
            tracing::info!(
                keys = sealed,
                "keys stored in the clear are now sealed under the master key"
            );
        }
        Ok(())
    }

    /// Opens a stored key: sealed ones need the master key.
    fn open_key(
        &self,
        purpose: &str,
        id: &str,
        stored: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, StoreError> {
        if !stored.starts_with(crate::secrets::SEALED_KEY) {
            return Ok(Zeroizing::new(stored.to_vec()));
        }
        let key = self.master_key.as_ref().ok_or_else(|| {
            StoreError::Corrupt(format!(
                "{purpose} key {id} is sealed under a master key and none was given"
            ))
        })?;
        key.open_key(purpose, id, stored).ok_or_else(|| {
            StoreError::Corrupt(format!(
                "{purpose} key {id} cannot be opened with this master key (a different one sealed it?)"
            ))
        })
    }

    /// Signing keys, newest first.
    pub async fn signing_keys(&self) -> Result<Vec<StoredKey>, StoreError> {
        let rows: Vec<(String, Vec<u8>, i64)> = db!(&self.pool, |p| sqlx::query_as(
            self.sql("SELECT kid, pkcs8, created_at_ms FROM signing_keys ORDER BY rowid DESC"),
        )
        .fetch_all(p)
        .await)?;
        rows.into_iter()
            .map(|(kid, stored, created_at_ms)| {
                let stored = Zeroizing::new(stored);
                Ok(StoredKey {
                    pkcs8: self.open_key("jwt-signing", &kid, &stored)?,
                    kid,
                    created_at_ms,
                })
            })
            .collect()
    }

    pub async fn insert_signing_key(&self, key: &StoredKey) -> Result<(), StoreError> {
        db!(&self.pool, |p| sqlx::query(self.sql(
            "INSERT INTO signing_keys (kid, alg, pkcs8, created_at_ms) VALUES (?, 'ES256', ?, ?)"
        ),)
        .bind(&key.kid)
        .bind(match &self.master_key {
            Some(m) => m.seal_key("jwt-signing", &key.kid, &key.pkcs8),
            None => key.pkcs8.to_vec(),
        })
        .bind(key.created_at_ms)
        .execute(p)
        .await
        .map(drop))?;
        Ok(())
    }

    /// This store's identity, created on first use.
    pub async fn store_id(&self) -> Result<String, StoreError> {
        let fresh = uuid::Uuid::new_v4().to_string();
        db!(&self.pool, |p| sqlx::query(self.sql(
            "INSERT INTO store_meta (key, value) VALUES ('store_id', ?) ON CONFLICT DO NOTHING",
        ))
        .bind(&fresh)
        .execute(p)
        .await
        .map(drop))?;
        Ok(db!(&self.pool, |p| sqlx::query_scalar(self.sql(
            "SELECT value FROM store_meta WHERE key = 'store_id'"
        ))
        .fetch_one(p)
        .await)?)
    }

    /// The key of leaked-value fingerprints, created on first use.
    pub async fn fingerprint_key(&self) -> Result<[u8; FINGERPRINT_KEY_LEN], StoreError> {
        let mut fresh = [0u8; FINGERPRINT_KEY_LEN];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut fresh)
            .map_err(|_| StoreError::NoEntropy)?;
        let stored = match &self.master_key {
            Some(key) => seal_text(key, &fresh),
            None => hex::encode(fresh),
        };
        db!(&self.pool, |p| {
            sqlx::query(self.sql(
            "INSERT INTO store_meta (key, value) VALUES ('fingerprint_key', ?) ON CONFLICT DO NOTHING",
        ))
            .bind(stored)
            .execute(p)
            .await
            .map(drop)
        })?;
        let value: String = db!(&self.pool, |p| sqlx::query_scalar(
            self.sql("SELECT value FROM store_meta WHERE key = 'fingerprint_key'")
        )
        .fetch_one(p)
        .await)?;
        let clear = match value.strip_prefix(SEALED_TEXT) {
            Some(sealed) => self.open_key(
                "fingerprint",
                "fingerprint_key",
                &unhex("store_meta.value", "fingerprint_key", sealed)?,
            )?,
            None => Zeroizing::new(unhex("store_meta.value", "fingerprint_key", &value)?),
        };
        fingerprint_key_of(&clear)
    }
}

fn fingerprint_key_of(clear: &[u8]) -> Result<[u8; FINGERPRINT_KEY_LEN], StoreError> {
    clear.try_into().map_err(|_| {
        StoreError::Corrupt(format!(
            "store_meta.value of fingerprint_key is {} bytes, not {FINGERPRINT_KEY_LEN}",
            clear.len()
        ))
    })
}

impl Store {
    /// The key that signs evidence bundles (`evidence-…`), created on first
    /// use and sealed under the master key like the signing keys.
    pub async fn evidence_key(&self) -> Result<StoredKey, StoreError> {
        let rng = ring::rand::SystemRandom::new();
        let fresh = ring::signature::EcdsaKeyPair::generate_pkcs8(
            &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            &rng,
        )
        .map_err(|_| StoreError::NoEntropy)?;
        let kid = format!("evidence-{}", uuid::Uuid::new_v4().simple());
        let sealed = match &self.master_key {
            Some(m) => m.seal_key("evidence-signing", &kid, fresh.as_ref()),
            None => fresh.as_ref().to_vec(),
        };
        db!(&self.pool, |p| sqlx::query(self.sql(
            "INSERT INTO store_meta (key, value) VALUES ('evidence_key', ?) ON CONFLICT DO NOTHING",
        ))
        .bind(format!("{kid} {}", hex::encode(sealed)))
        .execute(p)
        .await
        .map(drop))?;
        let value: String = db!(&self.pool, |p| sqlx::query_scalar(
            self.sql("SELECT value FROM store_meta WHERE key = 'evidence_key'")
        )
        .fetch_one(p)
        .await)?;
        let (kid, stored) = value.split_once(' ').ok_or_else(|| {
            StoreError::Corrupt("store_meta.value of evidence_key has no kid".into())
        })?;
        let stored = Zeroizing::new(unhex("store_meta.value", "evidence_key", stored)?);
        Ok(StoredKey {
            pkcs8: self.open_key("evidence-signing", kid, &stored)?,
            kid: kid.to_owned(),
            created_at_ms: 0,
        })
    }
}
