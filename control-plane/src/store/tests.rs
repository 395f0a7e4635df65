//! The store's own tests: corrupt data is an error, the upgrade from the
//! hand-written migration runner, one transaction per secret revocation.

use std::path::Path;
use std::sync::Arc;

use leash_api::v1::Revocation;

use super::*;

fn master_key() -> Arc<crate::secrets::MasterKey> {
    Arc::new(
        crate::secrets::MasterKey::from_base64(&crate::secrets::MasterKey::generate_base64())
            .unwrap(),
    )
}

/// A connection to the store's database behind its back.
async fn raw(data_dir: &Path) -> SqlitePool {
    SqlitePool::connect(&format!("sqlite://{}", data_dir.join("leash.db").display()))
        .await
        .unwrap()
}

async fn set_fingerprint_key(data_dir: &Path, value: &str) {
    let db = raw(data_dir).await;
    sqlx::query("UPDATE store_meta SET value = ? WHERE key = 'fingerprint_key'")
        .bind(value)
        .execute(&db)
        .await
        .unwrap();
    db.close().await;
}

fn corrupt(e: StoreError) -> String {
    match e {
        StoreError::Corrupt(why) => why,
        other => panic!("expected Corrupt, got {other}"),
    }
}

#[tokio::test]
async fn corrupt_hex_in_the_fingerprint_key_is_an_error_never_a_shorter_key() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let store = Store::open(&data, None).await.unwrap();
    let key = store.fingerprint_key().await.unwrap();
    store.close().await;

    // 16 good bytes then a bad pair: dropping the pair would give a 16-byte key.
    set_fingerprint_key(&data, &format!("{}zz", hex::encode(key))).await;
    let store = Store::open(&data, None).await.unwrap();
    let why = corrupt(store.fingerprint_key().await.unwrap_err());
    assert!(why.contains("store_meta.value"), "{why}");
    store.close().await;
    // Sealing it at open (a master key given) refuses it too.
    let why = corrupt(Store::open(&data, Some(master_key())).await.err().unwrap());
    assert!(why.contains("not valid hex"), "{why}");

    // An odd length, and valid hex of the wrong length.
    let whole = hex::encode(key);
    let short = hex::encode(&key[..15]);
    for value in [&whole[..31], short.as_str()] {
        set_fingerprint_key(&data, value).await;
        let store = Store::open(&data, None).await.unwrap();
        store.fingerprint_key().await.unwrap_err();
        store.close().await;
    }
}

#[tokio::test]
async fn corrupt_hex_in_a_sealed_key_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let master = master_key();
    let store = Store::open(&data, Some(master.clone())).await.unwrap();
    store.fingerprint_key().await.unwrap();
    let db = raw(&data).await;
    let sealed: String =
        sqlx::query_scalar("SELECT value FROM store_meta WHERE key = 'fingerprint_key'")
            .fetch_one(&db)
            .await
            .unwrap();
    assert!(sealed.starts_with("sealed:"));
    store.close().await;
    db.close().await;

    set_fingerprint_key(&data, &format!("{sealed}0")).await;
    let store = Store::open(&data, Some(master.clone())).await.unwrap();
    let why = corrupt(store.fingerprint_key().await.unwrap_err());
    assert!(why.contains("not valid hex"), "{why}");
    store.close().await;

    // Whole hex, one byte flipped: the seal does not open.
    let mut bytes = hex::decode(sealed.trim_start_matches("sealed:")).unwrap();
    if let Some(last) = bytes.last_mut() {
        *last ^= 1;
    }
    set_fingerprint_key(&data, &format!("sealed:{}", hex::encode(bytes))).await;
    let store = Store::open(&data, Some(master)).await.unwrap();
    let why = corrupt(store.fingerprint_key().await.unwrap_err());
    assert!(why.contains("cannot be opened"), "{why}");
}

fn leaked(id: &str, fingerprint: Vec<u8>) -> Revocation {
    Revocation {
        id: id.into(),
        kind: leash_api::revocation::RevocationKind::Leaked.into(),
        reason: "test".into(),
        revoked_by: "test".into(),
        revoked_at_ms: 1,
        fingerprint,
        ..Default::default()
    }
}

#[tokio::test]
async fn a_corrupt_revocation_fingerprint_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let store = Store::open(&data, None).await.unwrap();
    let seq = store
        .insert_revocation(&leaked("rev-1", vec![0xab; 16]))
        .await
        .unwrap();
    let read = store.revocation("rev-1").await.unwrap().unwrap();
    assert_eq!(read.revocation.fingerprint, vec![0xab; 16]);
    assert_eq!(read.revoke_seq, seq);

    let db = raw(&data).await;
    sqlx::query("UPDATE revocations SET fingerprint = 'abx' WHERE id = 'rev-1'")
        .execute(&db)
        .await
        .unwrap();
    let why = corrupt(store.revocations(true).await.unwrap_err());
    assert!(why.contains("revocations.fingerprint of rev-1"), "{why}");
    corrupt(store.events_after(0).await.unwrap_err());
}

#[tokio::test]
async fn a_secret_version_and_its_revocation_commit_together() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("data"), None).await.unwrap();
    for version in [1, 2] {
        store
            .insert_secret_version(&SecretVersion {
                upstream: "payments".into(),
                version,
                nonce: vec![0; 12],
                ciphertext: vec![1; 20],
                created_at_ms: 1,
                created_by: "test".into(),
                revoked_at_ms: None,
            })
            .await
            .unwrap();
    }
    let revocation = |id: &str, version: i64| Revocation {
        id: id.into(),
        kind: leash_api::revocation::RevocationKind::Credential.into(),
        credential_id: crate::secrets::lease_id("payments", version),
        reason: "test".into(),
        revoked_by: "test".into(),
        revoked_at_ms: 5,
        ..Default::default()
    };
    let seq = store
        .revoke_secret_version("payments", 1, &revocation("rev-1", 1))
        .await
        .unwrap();
    assert_eq!(seq, Some(1));
    // Already revoked, or no such version: nothing written.
    for (upstream, version) in [("payments", 1), ("payments", 9), ("other", 2)] {
        let none = store
            .revoke_secret_version(upstream, version, &revocation("rev-x", version))
            .await
            .unwrap();
        assert_eq!(none, None);
    }
    assert!(store.revocation("rev-x").await.unwrap().is_none());
    // The revocation cannot be written (its id is taken): the version is
    // not left marked revoked without it.
    store
        .revoke_secret_version("payments", 2, &revocation("rev-1", 2))
        .await
        .unwrap_err();
    let versions = store.secret_versions("payments").await.unwrap();
    let revoked: Vec<_> = versions
        .iter()
        .map(|v| (v.version, v.revoked_at_ms))
        .collect();
    assert_eq!(revoked, [(2, None), (1, Some(5))]);
    assert_eq!(store.current_seq().await.unwrap(), 1);
}

/// The migrations as the hand-written runner that preceded `migrate!`
/// applied them: each file's SQL and a row in `schema_migrations`.
async fn migrate_the_old_way(data_dir: &Path, up_to: i64) {
    use std::os::unix::fs::DirBuilderExt as _;
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(data_dir)
        .unwrap();
    create_database_file(data_dir).unwrap();
    let db = SqlitePool::connect_with(
        SqliteConnectOptions::new()
            .filename(data_dir.join("leash.db"))
            .create_if_missing(true),
    )
    .await
    .unwrap();
    sqlx::query("CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, applied_at_ms INTEGER NOT NULL)")
        .execute(&db)
        .await
        .unwrap();
    for m in MIGRATOR.iter().filter(|m| m.version <= up_to) {
        let mut tx = db.begin().await.unwrap();
        sqlx::raw_sql(sqlx::AssertSqlSafe(m.sql.as_str().to_owned()))
            .execute(&mut *tx)
            .await
            .unwrap();
        sqlx::query("INSERT INTO schema_migrations (version, applied_at_ms) VALUES (?, ?)")
            .bind(m.version)
            .bind(now_ms())
            .execute(&mut *tx)
            .await
            .unwrap();
        tx.commit().await.unwrap();
    }
    db.close().await;
}

async fn sqlx_migrations(data_dir: &Path) -> Vec<(i64, bool, Vec<u8>)> {
    let db = raw(data_dir).await;
    let rows =
        sqlx::query_as("SELECT version, success, checksum FROM _sqlx_migrations ORDER BY version")
            .fetch_all(&db)
            .await
            .unwrap();
    db.close().await;
    rows
}

#[tokio::test]
async fn a_database_migrated_by_the_old_runner_opens_with_its_data() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    migrate_the_old_way(&data, 8).await;
    // Data written by the old version, in tables of several migrations.
    let db = raw(&data).await;
    for sql in [
        "INSERT INTO credentials VALUES ('c1', 'spiffe://t/w', 'payments', 'jwt', 1, 2)",
        "INSERT INTO store_meta VALUES ('store_id', 'old-store')",
        "INSERT INTO revocations (id, kind, credential_id, reason, revoked_by, revoked_at_ms, revoke_seq) \
         VALUES ('rev-1', 'credential', 'c1', 'r', 'me', 3, 1)",
        "INSERT INTO revocation_events (revocation_id, restored, at_ms) VALUES ('rev-1', 0, 3)",
        "INSERT INTO echoed_credentials VALUES ('spiffe://t/w', 'payments', 'x-token', 2, 4, 5)",
        "INSERT INTO audit_anchors VALUES (1000, 'h', 6, 'k', 's')",
    ] {
        sqlx::query(sql).execute(&db).await.unwrap();
    }
    db.close().await;

    let store = Store::open(&data, None).await.unwrap();
    assert_eq!(store.store_id().await.unwrap(), "old-store");
    assert_eq!(
        store.credential("c1").await.unwrap().unwrap().upstream,
        "payments"
    );
    assert_eq!(store.current_seq().await.unwrap(), 1);
    assert_eq!(
        store.revocations(true).await.unwrap()[0].revocation.id,
        "rev-1"
    );
    assert_eq!(store.echoes().await.unwrap().len(), 1);
    assert_eq!(store.anchors().await.unwrap().len(), 1);
    store.close().await;

    // Recorded as applied (not run again: a re-run CREATE TABLE would have
    // failed), with the checksums sqlx checks; the old table is gone.
    let expected: Vec<_> = MIGRATOR
        .iter()
        .map(|m| (m.version, true, m.checksum.to_vec()))
        .collect();
    // Every migration of this build: 1-8 recorded, the later ones run.
    assert!(expected.len() > 8, "{} migrations", expected.len());
    assert_eq!(sqlx_migrations(&data).await, expected);
    let db = raw(&data).await;
    let old: Option<String> = sqlx::query_scalar(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name = 'schema_migrations'",
    )
    .fetch_optional(&db)
    .await
    .unwrap();
    assert_eq!(old, None);
    db.close().await;
    // And it opens again as an ordinary sqlx-migrated database.
    let store = Store::open(&data, None).await.unwrap();
    assert_eq!(store.store_id().await.unwrap(), "old-store");
}

#[tokio::test]
async fn an_old_database_behind_by_some_migrations_gets_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    migrate_the_old_way(&data, 5).await;
    let store = Store::open(&data, None).await.unwrap();
    // Tables of migrations 6-8 and 10 exist now.
    store.echoes().await.unwrap();
    store.anchors().await.unwrap();
    store.probe_results("payments", 1).await.unwrap();
    store.close().await;
    let versions: Vec<i64> = sqlx_migrations(&data).await.iter().map(|m| m.0).collect();
    let all: Vec<i64> = MIGRATOR.iter().map(|m| m.version).collect();
    assert_eq!(versions, all);
    assert!(all.starts_with(&[1, 2, 3, 4, 5, 6, 7, 8]), "{all:?}");
}

#[tokio::test]
async fn an_old_bookkeeping_table_with_gaps_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    migrate_the_old_way(&data, 3).await;
    let db = raw(&data).await;
    sqlx::query("DELETE FROM schema_migrations WHERE version = 2")
        .execute(&db)
        .await
        .unwrap();
    db.close().await;
    let why = corrupt(Store::open(&data, None).await.err().unwrap());
    assert!(why.contains("schema_migrations"), "{why}");
}

#[tokio::test]
async fn probe_results_come_newest_first_and_a_bad_status_is_corrupt() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let store = Store::open(&data, None).await.unwrap();
    let result = |at_ms, status, outcome: &str| ProbeResult {
        upstream: "vault-api".into(),
        version: 1,
        at_ms,
        status,
        outcome: outcome.into(),
        detail: "d".into(),
    };
    store
        .insert_probe_result(&result(10, Some(401), "dead"))
        .await
        .unwrap();
    store
        .insert_probe_result(&result(20, None, "error"))
        .await
        .unwrap();
    store
        .insert_probe_result(&ProbeResult {
            version: 2,
            ..result(30, Some(200), "alive")
        })
        .await
        .unwrap();
    assert_eq!(
        store.probe_results("vault-api", 1).await.unwrap(),
        [result(20, None, "error"), result(10, Some(401), "dead")]
    );
    assert!(store.probe_results("other", 1).await.unwrap().is_empty());
    store.close().await;

    let db = raw(&data).await;
    sqlx::query("UPDATE deactivation_probes SET status = 70000 WHERE version = 2")
        .execute(&db)
        .await
        .unwrap();
    db.close().await;
    let store = Store::open(&data, None).await.unwrap();
    let why = corrupt(store.probe_results("vault-api", 2).await.unwrap_err());
    assert!(why.contains("70000"), "{why}");
}
