//! The store's own tests: corrupt data is an error, the upgrade from the
//! hand-written migration runner (SQLite only), one transaction per secret
//! revocation, and what each dialect difference must keep the same. Those
//! made with `store_test!` run on SQLite and on PostgreSQL.

use std::path::Path;
use std::sync::Arc;

use leash_api::v1::Revocation;

use super::test_db::{TestDb, store_test};
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

async fn set_fingerprint_key(db: &TestDb, value: &str) {
    db.exec(&format!(
        "UPDATE store_meta SET value = '{value}' WHERE key = 'fingerprint_key'"
    ))
    .await;
}

fn corrupt(e: StoreError) -> String {
    match e {
        StoreError::Corrupt(why) => why,
        other => panic!("expected Corrupt, got {other}"),
    }
}

store_test!(
    async fn corrupt_hex_in_the_fingerprint_key_is_an_error_never_a_shorter_key(db: &TestDb) {
        let store = db.open(None).await.unwrap();
        let key = store.fingerprint_key().await.unwrap();
        store.close().await;

        // 16 good bytes then a bad pair: dropping the pair would give a 16-byte key.
        set_fingerprint_key(db, &format!("{}zz", hex::encode(key))).await;
        let store = db.open(None).await.unwrap();
        let why = corrupt(store.fingerprint_key().await.unwrap_err());
        assert!(why.contains("store_meta.value"), "{why}");
        store.close().await;
        // Sealing it at open (a master key given) refuses it too.
        let why = corrupt(db.open(Some(master_key())).await.err().unwrap());
        assert!(why.contains("not valid hex"), "{why}");

        // An odd length, and valid hex of the wrong length.
        let whole = hex::encode(key);
        let short = hex::encode(&key[..15]);
        for value in [&whole[..31], short.as_str()] {
            set_fingerprint_key(db, value).await;
            let store = db.open(None).await.unwrap();
            store.fingerprint_key().await.unwrap_err();
            store.close().await;
        }
    }
);

store_test!(
    async fn corrupt_hex_in_a_sealed_key_is_an_error(db: &TestDb) {
        let master = master_key();
        let store = db.open(Some(master.clone())).await.unwrap();
        store.fingerprint_key().await.unwrap();
        let sealed = db
            .text("SELECT value FROM store_meta WHERE key = 'fingerprint_key'")
            .await;
        assert!(sealed.starts_with("sealed:"));
        store.close().await;

        set_fingerprint_key(db, &format!("{sealed}0")).await;
        let store = db.open(Some(master.clone())).await.unwrap();
        let why = corrupt(store.fingerprint_key().await.unwrap_err());
        assert!(why.contains("not valid hex"), "{why}");
        store.close().await;

        // Whole hex, one byte flipped: the seal does not open.
        let mut bytes = hex::decode(sealed.trim_start_matches("sealed:")).unwrap();
        if let Some(last) = bytes.last_mut() {
            *last ^= 1;
        }
        set_fingerprint_key(db, &format!("sealed:{}", hex::encode(bytes))).await;
        let store = db.open(Some(master)).await.unwrap();
        let why = corrupt(store.fingerprint_key().await.unwrap_err());
        assert!(why.contains("cannot be opened"), "{why}");
        store.close().await;
    }
);

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

store_test!(
    async fn a_corrupt_revocation_fingerprint_is_an_error(db: &TestDb) {
        let store = db.open(None).await.unwrap();
        let Inserted::New(seq) = store
            .insert_revocation(&leaked("rev-1", vec![0xab; 16]))
            .await
            .unwrap()
        else {
            panic!("a first revocation is new");
        };
        let read = store.revocation("rev-1").await.unwrap().unwrap();
        assert_eq!(read.revocation.fingerprint, vec![0xab; 16]);
        assert_eq!(read.revoke_seq, seq);

        db.exec("UPDATE revocations SET fingerprint = 'abx' WHERE id = 'rev-1'")
            .await;
        let why = corrupt(store.revocations(true).await.unwrap_err());
        assert!(why.contains("revocations.fingerprint of rev-1"), "{why}");
        corrupt(store.events_after(0).await.unwrap_err());
        store.close().await;
    }
);

store_test!(
    async fn a_secret_version_and_its_revocation_commit_together(db: &TestDb) {
        let store = db.open(None).await.unwrap();
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
        assert_eq!(versions[0].nonce, vec![0; 12]);
        assert_eq!(versions[0].ciphertext, vec![1; 20]);
        let revoked: Vec<_> = versions
            .iter()
            .map(|v| (v.version, v.revoked_at_ms))
            .collect();
        assert_eq!(revoked, [(2, None), (1, Some(5))]);
        assert_eq!(store.current_seq().await.unwrap(), 1);
        // The failed attempts took no sequence number: the next change is 2
        // (sidecars resync on a gap).
        let next = store
            .insert_revocation(&leaked("rev-2", vec![1; 16]))
            .await
            .unwrap();
        assert_eq!(next, Inserted::New(2));
        assert_eq!(
            store.restore_revocation("nope", "t", "r", 6).await.unwrap(),
            None
        );
        assert_eq!(
            store
                .restore_revocation("rev-2", "t", "r", 6)
                .await
                .unwrap(),
            Some(3)
        );
        let events: Vec<_> = store
            .events_after(0)
            .await
            .unwrap()
            .into_iter()
            .map(|(seq, r, restored)| (seq, r.revocation.id, restored))
            .collect();
        assert_eq!(
            events,
            [
                (1, "rev-1".to_owned(), false),
                (2, "rev-2".to_owned(), false),
                (3, "rev-2".to_owned(), true)
            ]
        );
        store.close().await;
    }
);

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

store_test!(
    async fn probe_results_come_newest_first_and_a_bad_status_is_corrupt(db: &TestDb) {
        let store = db.open(None).await.unwrap();
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

        db.exec("UPDATE deactivation_probes SET status = 70000 WHERE version = 2")
            .await;
        let store = db.open(None).await.unwrap();
        let why = corrupt(store.probe_results("vault-api", 2).await.unwrap_err());
        assert!(why.contains("70000"), "{why}");
        store.close().await;
    }
);

fn usage_record(
    credential: &str,
    status_class: leash_api::v1::StatusClass,
    requests: u64,
    first: i64,
    last: i64,
) -> leash_api::v1::UsageRecord {
    leash_api::v1::UsageRecord {
        credential_id: credential.into(),
        upstream: "payments".into(),
        credential_kind: "jwt".into(),
        method: 0,
        status_class: status_class.into(),
        requests,
        bytes_sent: 1,
        bytes_received: 10 * requests,
        first_seen_ms: first,
        last_seen_ms: last,
    }
}

store_test!(
    async fn usage_adds_up_in_its_bucket_and_widens_first_and_last_seen(db: &TestDb) {
        use leash_api::v1::{StatusClass, UsageBatch};
        let store = db.open(None).await.unwrap();
        let w = "spiffe://leash.test/ns/demo/sa/client";
        let batch = |seq, records| UsageBatch {
            batch_seq: seq,
            records,
            dropped_requests: 2,
            dropped_records: 1,
            created_at_ms: 0,
        };
        let ok = StatusClass::StatusClass2xx;
        let b1 = batch(1, vec![usage_record("c1", ok, 3, 60_010, 60_020)]);
        assert!(store.record_usage("s1", w, &b1, 3).await.unwrap());
        // Resent: not counted twice, not even to another replica (another
        // process on the same database, after a failover).
        assert!(!store.record_usage("s1", w, &b1, 3).await.unwrap());
        let other_replica = db.open(None).await.unwrap();
        assert!(!other_replica.record_usage("s1", w, &b1, 3).await.unwrap());
        other_replica.close().await;
        // The same bucket, earlier first and later last use; and a 5xx.
        let b2 = batch(
            2,
            vec![
                usage_record("c1", ok, 4, 60_005, 60_050),
                usage_record("c2", StatusClass::StatusClass5xx, 2, 60_100, 180_000),
            ],
        );
        assert!(store.record_usage("s1", w, &b2, 6).await.unwrap());

        // Over time: minute buckets, or wider steps of whole buckets.
        let minutes = store
            .usage_timeline(&UsageFilter::default(), BUCKET_MS)
            .await
            .unwrap();
        let at = |p: &TimelinePoint| (p.at_ms, p.requests, p.errors);
        assert_eq!(minutes.iter().map(at).collect::<Vec<_>>(), [(60_000, 9, 2)]);
        let wide = store
            .usage_timeline(&UsageFilter::default(), 3 * BUCKET_MS)
            .await
            .unwrap();
        assert_eq!(wide.iter().map(at).collect::<Vec<_>>(), [(0, 9, 2)]);
        let rows = store.usage_rows(&UsageFilter::default()).await.unwrap();
        let c1: Vec<_> = rows.iter().filter(|r| r.credential_id == "c1").collect();
        assert_eq!(c1.len(), 1, "{rows:?}");
        assert_eq!(
            (c1[0].requests, c1[0].bytes_sent, c1[0].bytes_received),
            (7, 2, 70)
        );
        assert_eq!((c1[0].first_seen_ms, c1[0].last_seen_ms), (60_005, 60_050));
        assert_eq!(
            store
                .dropped_requests(&UsageFilter::default())
                .await
                .unwrap(),
            4
        );
        let edges = store.usage_edges(&UsageFilter::default()).await.unwrap();
        assert_eq!(edges.len(), 1);
        assert_eq!(
            (edges[0].requests, edges[0].credentials, edges[0].errors),
            (9, 2, 2)
        );
        assert_eq!(edges[0].last_used_ms, 180_000);
        let spans = store.credential_spans(0).await.unwrap();
        assert_eq!(spans.len(), 1);
        assert_eq!(
            (
                spans[0].longest_span_ms,
                spans[0].credentials,
                spans[0].requests
            ),
            (119_900, 2, 9)
        );
        let prefix = WorkloadMatcher::Prefix("spiffe://leash.test/ns/demo/".into());
        assert_eq!(
            store.last_use("payments", &prefix).await.unwrap(),
            Some(180_000)
        );
        let other = WorkloadMatcher::Prefix("spiffe://leash.test/ns/prod/".into());
        assert_eq!(store.last_use("payments", &other).await.unwrap(), None);
        let after = store
            .usage_after(&UsageScope::Workload(prefix), 60_040, None)
            .await
            .unwrap();
        let mut after: Vec<_> = after
            .iter()
            .map(|u| (u.credential_id.clone(), u.requests))
            .collect();
        after.sort();
        assert_eq!(after, [("c1".to_owned(), 7), ("c2".to_owned(), 2)]);
        store.close().await;
    }
);

use leash_api::policy::WorkloadMatcher;

store_test!(
    async fn upserts_keep_the_latest_expiry_and_count_what_was_seen(db: &TestDb) {
        let store = db.open(None).await.unwrap();
        let credential = |expires_at_ms| CredentialRecord {
            id: "lease-1".into(),
            workload: "w".into(),
            upstream: "payments".into(),
            kind: "static".into(),
            issued_at_ms: 1,
            expires_at_ms,
        };
        for expiry in [50, 90, 70] {
            store.record_credential(&credential(expiry)).await.unwrap();
        }
        assert_eq!(
            store.credential("lease-1").await.unwrap(),
            Some(credential(90))
        );
        let sighting = |at| Sighting {
            revocation_id: "rev-1".into(),
            workload: "w".into(),
            upstream: "payments".into(),
            host: "api.example".into(),
            location: "header:authorization".into(),
            count: 1,
            first_seen_ms: at,
            last_seen_ms: at,
        };
        for (at, first) in [(10, true), (30, false), (20, false)] {
            assert_eq!(store.record_sighting(&sighting(at)).await.unwrap(), first);
        }
        let seen = store.sightings("rev-1").await.unwrap();
        assert_eq!(seen.len(), 1);
        assert_eq!(
            (seen[0].count, seen[0].first_seen_ms, seen[0].last_seen_ms),
            (3, 10, 30)
        );
        store.record_stripped("w", "payments", 2, 5).await.unwrap();
        store.record_stripped("w", "payments", 3, 8).await.unwrap();
        let stripped = store.stripped(None).await.unwrap();
        assert_eq!(
            (
                stripped[0].count,
                stripped[0].first_seen_ms,
                stripped[0].last_seen_ms
            ),
            (5, 5, 8)
        );
        store
            .record_echo("w", "payments", "x-token", 1, 5)
            .await
            .unwrap();
        store
            .record_echo("w", "payments", "x-token", 4, 9)
            .await
            .unwrap();
        assert_eq!(
            store.echoes().await.unwrap(),
            [("w".into(), "payments".into(), "x-token".into(), 5, 9)]
        );
        // Acknowledgements are recorded once, however often sent.
        store
            .insert_session(
                &SessionRecord {
                    id: "s1".into(),
                    spiffe_id: "w".into(),
                    version: "t".into(),
                    connected_at_ms: 1,
                },
                "cp-test",
            )
            .await
            .unwrap();
        let ack = |to_seq, at| AckRecord {
            session_id: "s1".into(),
            from_seq: 0,
            to_seq,
            acked_at_ms: at,
        };
        store.insert_acks(&[ack(2, 10), ack(2, 11)]).await.unwrap();
        store.insert_acks(&[ack(2, 12), ack(3, 13)]).await.unwrap();
        let acks = store.acks_for(2).await.unwrap();
        assert_eq!(
            acks.iter()
                .map(|(s, at)| (s.id.as_str(), *at))
                .collect::<Vec<_>>(),
            [("s1", 10), ("s1", 13)]
        );
        // The store's identity is made once.
        let id = store.store_id().await.unwrap();
        assert_eq!(store.store_id().await.unwrap(), id);
        store.close().await;
    }
);

store_test!(
    async fn the_audit_chain_is_append_only_and_searchable(db: &TestDb) {
        let store = db.open(Some(master_key())).await.unwrap();
        let entry = |path: &str, detail: &str| AuditEntry {
            at_ms: 1,
            actor: "admin".into(),
            role: "admin".into(),
            method: "POST".into(),
            path: path.into(),
            action: "revoke".into(),
            status: 200,
            detail: detail.into(),
        };
        store
            .append_audit(&entry("/v1/revocations", "rev-1 by 'me'?"))
            .await
            .unwrap();
        store.append_audit(&entry("/v1/tokens", "t")).await.unwrap();
        store
            .append_audit(&entry("/v1/revocations/rev-1", "restore"))
            .await
            .unwrap();
        let verdict = store.verify_audit().await.unwrap();
        assert!(verdict.ok, "{verdict:?}");
        assert_eq!((verdict.chained, verdict.head_id), (3, Some(3)));
        let found = store
            .audit_mentioning(&["rev-1".into(), "'me'?".into()])
            .await
            .unwrap();
        assert_eq!(found.iter().map(|e| e.id).collect::<Vec<_>>(), [1, 3]);
        assert_eq!(
            store.audit(2).await.unwrap()[0].path,
            "/v1/revocations/rev-1"
        );
        // The database itself refuses edits and deletions.
        for sql in [
            "UPDATE audit SET detail = 'x' WHERE id = 2",
            "DELETE FROM audit WHERE id = 2",
        ] {
            let e = db.try_exec(sql).await.unwrap_err();
            assert!(e.to_string().contains("append-only"), "{sql}: {e}");
        }
        if db.backend() == Backend::Postgres {
            let e = db.try_exec("TRUNCATE audit").await.unwrap_err();
            assert!(e.to_string().contains("append-only"), "{e}");
        }
        assert!(store.verify_audit().await.unwrap().ok);
        store.close().await;
    }
);

store_test!(
    async fn keys_and_mission_changes_come_in_the_order_written(db: &TestDb) {
        let store = db.open(Some(master_key())).await.unwrap();
        // Same creation time: only the order written tells them apart.
        for kid in ["k-b", "k-c", "k-a"] {
            store
                .insert_signing_key(&StoredKey {
                    kid: kid.into(),
                    pkcs8: zeroize::Zeroizing::new(vec![7; 40]),
                    created_at_ms: 5,
                })
                .await
                .unwrap();
        }
        let keys = store.signing_keys().await.unwrap();
        assert_eq!(
            keys.iter().map(|k| k.kid.as_str()).collect::<Vec<_>>(),
            ["k-a", "k-c", "k-b"]
        );
        assert_eq!(*keys[0].pkcs8, vec![7; 40]);

        let mission = MissionRow {
            id: "m1".into(),
            objective: "o".into(),
            owner: "me".into(),
            deadline_ms: None,
            window_ms: 10,
            state: "open".into(),
            closed_by_hand: false,
            created_at_ms: 5,
            created_by: "me".into(),
            changed_at_ms: 5,
        };
        let findings = vec![("f1".to_owned(), "{}".to_owned())];
        store.insert_mission(&mission, &findings).await.unwrap();
        let more = vec![
            ("f1".to_owned(), "{}".to_owned()),
            ("f2".to_owned(), "{}".to_owned()),
        ];
        assert_eq!(store.add_findings("m1", &more, 5, "me").await.unwrap(), 1);
        store
            .change_mission("m1", "closed", true, "done", "me", 5)
            .await
            .unwrap();
        store
            .change_mission("m1", "open", false, "again", "me", 5)
            .await
            .unwrap();
        let changes: Vec<_> = store
            .mission_changes("m1")
            .await
            .unwrap()
            .into_iter()
            .map(|c| c.reason)
            .collect();
        assert_eq!(changes, ["created", "done", "again"]);
        let seqs: Vec<_> = store
            .findings("m1")
            .await
            .unwrap()
            .into_iter()
            .map(|f| (f.seq, f.finding))
            .collect();
        assert_eq!(seqs, [(1, "f1".to_owned()), (2, "f2".to_owned())]);
        store
            .change_mission("m1", "closed", true, "by hand", "me", 6)
            .await
            .unwrap();
        let m = store.mission("m1").await.unwrap().unwrap();
        assert!(m.closed_by_hand);
        assert_eq!(m.state, "closed");
        store.close().await;
    }
);

store_test!(
    async fn ssf_streams_and_held_sets_round_trip(db: &TestDb) {
        let store = db.open(None).await.unwrap();
        let row = SsfStreamRow {
            stream_id: "s1".into(),
            audience: "https://soc".into(),
            delivery_method: "urn:ietf:rfc:8936".into(),
            endpoint_url: None,
            poll_token_sha256: Some(vec![7; 32]),
            events_requested: "[]".into(),
            description: Some("SOC".into()),
            status: "enabled".into(),
            reason: None,
            created_at_ms: 1,
            created_by: "admin".into(),
        };
        assert!(store.put_ssf_stream(&row, false).await.unwrap());
        assert!(
            store.put_ssf_stream(&row, false).await.is_err(),
            "the id is taken"
        );
        let paused = SsfStreamRow {
            status: "paused".into(),
            reason: Some("night".into()),
            ..row.clone()
        };
        assert!(store.put_ssf_stream(&paused, true).await.unwrap());
        assert_eq!(store.ssf_stream("s1").await.unwrap(), Some(paused.clone()));
        let ghost = SsfStreamRow {
            stream_id: "ghost".into(),
            ..row.clone()
        };
        assert!(!store.put_ssf_stream(&ghost, true).await.unwrap());

        // Held in order up to the cap; a jti held twice is held once.
        for (i, jti) in ["a", "b", "c"].iter().enumerate() {
            let at = i64::try_from(i).unwrap();
            assert!(
                store
                    .hold_ssf_set("s1", jti, &format!("set-{jti}"), at, 3)
                    .await
                    .unwrap()
            );
        }
        assert!(
            !store.hold_ssf_set("s1", "d", "set-d", 9, 3).await.unwrap(),
            "over the cap"
        );
        let (two, more) = store.held_ssf_sets("s1", 2).await.unwrap();
        assert_eq!(
            two,
            [("a".into(), "set-a".into()), ("b".into(), "set-b".into())]
        );
        assert!(more);
        let released = store
            .release_ssf_sets("s1", &["a".into(), "zz".into()])
            .await
            .unwrap();
        assert_eq!(released, 1);
        let (rest, more) = store.held_ssf_sets("s1", 10).await.unwrap();
        assert_eq!(rest.len(), 2);
        assert!(!more);
        assert_eq!(store.ssf_streams_holding().await.unwrap(), ["s1"]);
        // Only the SETs held before the time given are dropped.
        assert_eq!(store.drop_held_ssf_sets("s1", 2).await.unwrap(), 1);
        assert_eq!(store.held_ssf_sets("s1", 10).await.unwrap().0.len(), 1);
        assert!(store.delete_ssf_stream("s1").await.unwrap());
        assert!(store.held_ssf_sets("s1", 10).await.unwrap().0.is_empty());
        assert!(store.ssf_streams_holding().await.unwrap().is_empty());
        assert!(!store.delete_ssf_stream("s1").await.unwrap());
        assert!(store.ssf_streams().await.unwrap().is_empty());
        store.close().await;
    }
);
