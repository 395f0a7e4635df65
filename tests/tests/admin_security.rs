//! The admin API under attack: token guessing is rate-limited per client
//! address, and the audit log is a hash chain that shows where it was
//! tampered with, even by someone who edits the database file directly.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test stops at the first failed step, with its message"
)]

use std::time::Duration;

use leash_tests::*;
use serde_json::json;

const SVID_TTL: Duration = Duration::from_secs(600);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_without_a_valid_token_are_limited_per_address_and_never_lock_out_a_valid_one() {
    let d = Deployment::start("10m", SVID_TTL).await;
    let admin = d.admin();
    let real = admin.token.clone().unwrap();
    // The right id with a secret one character off, then random ones.
    let (id_part, secret) = real.rsplit_once('_').unwrap();
    let mut near = secret.to_owned();
    let last = near.pop().unwrap();
    near.push(if last == 'A' { 'B' } else { 'A' });
    let near = format!("{id_part}_{near}");
    // Ten calls without a valid token a minute (the test setting): calls
    // with no token count as much as guesses.
    for _ in 0..5 {
        assert_eq!(admin.with_token(None).get("/v1/sidecars").await.status, 401);
    }
    assert_eq!(
        admin
            .with_token(Some(&near))
            .get("/v1/sidecars")
            .await
            .status,
        401
    );
    for i in 1..5 {
        let guess = format!("lsh_{i:012x}_guess{i}");
        let a = admin.with_token(Some(&guess)).get("/v1/sidecars").await;
        assert_eq!(a.status, 401, "guess {i}");
    }
    for token in [None, Some("lsh_000000000000_x")] {
        let a = admin.with_token(token).get("/v1/sidecars").await;
        assert_eq!(a.status, 429);
        assert_eq!(a.json()["error"], "too_many_failures");
        let retry: u64 = a.headers["retry-after"].to_str().unwrap().parse().unwrap();
        assert!((1..=60).contains(&retry));
    }
    // A valid token from the same address (a responder behind the same NAT
    // or ingress) is never refused.
    assert_eq!(admin.get("/v1/sidecars").await.status, 200);
    // Public endpoints are not affected.
    assert_eq!(
        http_get(&format!("http://{}/healthz", d.cp.admin_addr))
            .await
            .unwrap()
            .status,
        200
    );
    // The refusals are in the audit log as one summary row for the address.
    assert_eq!(
        d.cp.state.refused.flush(&d.cp.state.store).await.unwrap(),
        1
    );
    let entries = d.cp.state.store.audit(50).await.unwrap();
    let summary: Vec<_> = entries
        .iter()
        .filter(|e| e.actor == "anonymous@127.0.0.1")
        .collect();
    assert_eq!(summary.len(), 1, "{entries:?}");
    assert_eq!(summary[0].status, 429);
    assert_eq!(summary[0].action, "refused 12 calls without a valid token");
    assert!(
        summary[0]
            .detail
            .starts_with("10 unauthenticated (401), 2 limited (429)")
    );
    // No secret, real or guessed, was written down.
    let text = format!("{entries:?}");
    assert!(!text.contains(secret) && !text.contains("guess3"));
}

/// A flood of calls without a token, with 60 KiB paths, grows the store by
/// no more than the bound the README states: one bounded summary row per
/// address and minute, not a row (with the path twice) per call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_unauthenticated_calls_cannot_fill_the_disk() {
    let d = Deployment::start("10m", SVID_TTL).await;
    let data = d.dir.path().join("data");
    let size = || {
        ["leash.db", "leash.db-wal"]
            .iter()
            .map(|f| std::fs::metadata(data.join(f)).map_or(0, |m| m.len()))
            .sum::<u64>()
    };
    d.cp.state.refused.flush(&d.cp.state.store).await.unwrap();
    let before = size();
    let path = format!("/v1/revocations/{}", "x".repeat(60 * 1024));
    let addr = d.cp.admin_addr;
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let path = path.clone();
        tasks.push(tokio::spawn(async move {
            let client: hyper_util::client::legacy::Client<_, http_body_util::Empty<bytes::Bytes>> =
                hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                    .build_http();
            let mut statuses = [0u32; 2];
            for _ in 0..125 {
                let resp = client
                    .get(format!("http://{addr}{path}").parse().unwrap())
                    .await
                    .unwrap();
                match resp.status().as_u16() {
                    401 => statuses[0] += 1,
                    429 => statuses[1] += 1,
                    other => panic!("unexpected {other}"),
                }
            }
            statuses
        }));
    }
    let mut limited = 0;
    for t in tasks {
        limited += t.await.unwrap()[1];
    }
    assert!(limited >= 1_990, "all but the allowance limited: {limited}");
    // Responders are not locked out meanwhile.
    assert_eq!(d.admin().get("/v1/sidecars").await.status, 200);
    assert_eq!(
        d.cp.state.refused.flush(&d.cp.state.store).await.unwrap(),
        1
    );
    let grown = size().saturating_sub(before);
    // One summary row (~1 KiB) and the responder's call, not 2,000 × 120 KiB.
    assert!(grown < 64 * 1024, "the store grew by {grown} bytes");
    let entries = d.cp.state.store.audit(5).await.unwrap();
    assert!(entries.iter().all(|e| e.path.len() <= 260), "paths are cut");
}

/// As someone with write access to the database file would: the
/// append-only triggers dropped, entry `id`'s detail rewritten. Returns the
/// open connection for more.
async fn rewrite_audit_entry(d: &Deployment, id: i64) -> sqlx::SqlitePool {
    let db = sqlx::SqlitePool::connect(&format!(
        "sqlite://{}",
        d.dir.path().join("data/leash.db").display()
    ))
    .await
    .unwrap();
    sqlx::query("DROP TRIGGER IF EXISTS audit_no_update")
        .execute(&db)
        .await
        .unwrap();
    sqlx::query("UPDATE audit SET detail = 'nothing happened' WHERE id = ?")
        .bind(id)
        .execute(&db)
        .await
        .unwrap();
    db
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_chain_shows_where_it_was_tampered_with() {
    if on_postgres() {
        eprintln!(
            "skipped on PostgreSQL: rewrites audit rows in the SQLite file; the PostgreSQL chain is checked by the store tests"
        );
        return;
    }
    let d = Deployment::start("10m", SVID_TTL).await;
    let admin = d.admin();
    let r = admin
        .revoke(json!({"kind": "upstream", "upstream": "ledger", "reason": "drill"}))
        .await;
    let id = r["id"].as_str().unwrap();
    admin
        .post(
            &format!("/v1/revocations/{id}/restore"),
            json!({"reason": "drill over"}),
        )
        .await;
    admin.get("/v1/sidecars").await;
    admin.get("/v1/revocations").await;

    let v = admin.get("/v1/audit/verify").await.json();
    assert_eq!(v["ok"], true, "{v}");
    assert!(v["chained"].as_u64().unwrap() >= 4, "{v}");
    assert_eq!(v["unchained"], 0);
    // Only admins may check (and the check itself is audited).
    let viewer = admin
        .post("/v1/tokens", json!({"name": "dash", "role": "viewer"}))
        .await
        .json()["token"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(
        admin
            .with_token(Some(&viewer))
            .get("/v1/audit/verify")
            .await
            .status,
        403
    );

    // Someone with the database file drops the append-only triggers and
    // rewrites history: the chain breaks exactly there.
    let db = rewrite_audit_entry(&d, 2).await;
    let v = admin.get("/v1/audit/verify").await.json();
    assert_eq!(v["ok"], false);
    assert_eq!(v["first_bad_id"], 2);
    assert!(v["problem"].as_str().unwrap().contains("hash"), "{v}");

    // Recomputing that entry's hash does not help: the next link breaks.
    let row: (i64, String, String, String, String, String, String, i64, String, String) =
        sqlx::query_as("SELECT id, CAST(at_ms AS TEXT), actor, role, method, path, action, status, detail, prev_hash FROM audit WHERE id = 2")
            .fetch_one(&db)
            .await
            .unwrap();
    let entry = leash_control_plane::store::AuditEntry {
        at_ms: row.1.parse().unwrap(),
        actor: row.2,
        role: row.3,
        method: row.4,
        path: row.5,
        action: row.6,
        status: u16::try_from(row.7).unwrap(),
        detail: row.8,
    };
    let forged = leash_control_plane::store::audit_hash(&row.9, 2, &entry);
    sqlx::query("UPDATE audit SET hash = ? WHERE id = 2")
        .bind(&forged)
        .execute(&db)
        .await
        .unwrap();
    let v = admin.get("/v1/audit/verify").await.json();
    assert_eq!(v["ok"], false);
    assert_eq!(v["first_bad_id"], 3, "{v}");

    // Deleting an entry shows too.
    sqlx::query("DROP TRIGGER audit_no_delete")
        .execute(&db)
        .await
        .unwrap();
    sqlx::query("DELETE FROM audit WHERE id = 1")
        .execute(&db)
        .await
        .unwrap();
    let v = admin.get("/v1/audit/verify").await.json();
    assert_eq!(v["ok"], false);
    assert_eq!(v["first_bad_id"], 2, "{v}");
    assert!(v["problem"].as_str().unwrap().contains("missing"), "{v}");
}

/// Someone who can write the database rewrites an entry and recomputes the
/// whole chain, so that it walks clean. The signed anchors (every 1,000
/// entries, signed with a key derived from the master key) and a head saved
/// elsewhere both expose it; so does cutting entries off the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recomputed_chain_is_caught_by_its_signed_anchors_and_a_saved_head() {
    if on_postgres() {
        eprintln!(
            "skipped on PostgreSQL: rewrites audit rows in the SQLite file; the PostgreSQL chain is checked by the store tests"
        );
        return;
    }
    use leash_control_plane::anchor::SignedHead;
    let d = Deployment::start("10m", SVID_TTL).await;
    let admin = d.admin();
    let store = &d.cp.state.store;
    for i in 0..1_010 {
        store
            .append_audit(&leash_control_plane::store::AuditEntry {
                at_ms: i,
                actor: "token:ops/1".into(),
                role: "admin".into(),
                method: "GET".into(),
                path: "/v1/sidecars".into(),
                action: "GET /v1/sidecars".into(),
                status: 200,
                detail: String::new(),
            })
            .await
            .unwrap();
    }
    let head: SignedHead =
        serde_json::from_value(admin.get("/v1/audit/head").await.json()).unwrap();
    assert!(
        head.verify(),
        "the saved head's signature checks out offline"
    );
    let verify = |q: String| {
        let admin = admin.clone();
        async move { admin.get(&format!("/v1/audit/verify{q}")).await.json() }
    };
    let with_head = format!("?id={}&hash={}", head.id, head.hash);
    let v = verify(with_head.clone()).await;
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(v["anchors"], 1, "{v}");

    // Rewrite entry 10 and recompute every hash after it, as an attacker
    // with the file (and the chain's public algorithm) can.
    let db = rewrite_audit_entry(&d, 10).await;
    type Row = (
        i64,
        i64,
        String,
        String,
        String,
        String,
        String,
        i64,
        String,
    );
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT id, at_ms, actor, role, method, path, action, status, detail FROM audit ORDER BY id",
    )
    .fetch_all(&db)
    .await
    .unwrap();
    let mut prev = String::new();
    for (id, at_ms, actor, role, method, path, action, status, detail) in rows {
        let e = leash_control_plane::store::AuditEntry {
            at_ms,
            actor,
            role,
            method,
            path,
            action,
            status: status as u16,
            detail,
        };
        let hash = leash_control_plane::store::audit_hash(&prev, id, &e);
        sqlx::query("UPDATE audit SET prev_hash = ?, hash = ? WHERE id = ?")
            .bind(&prev)
            .bind(&hash)
            .bind(id)
            .execute(&db)
            .await
            .unwrap();
        prev = hash;
    }
    // The chain walks clean, but the anchor at 1,000 no longer matches...
    let v = verify(String::new()).await;
    assert_eq!(v["ok"], false, "{v}");
    assert_eq!(v["first_bad_id"], 1000, "{v}");
    // ...and, with the anchors deleted too, the saved head still tells.
    sqlx::query("DELETE FROM audit_anchors")
        .execute(&db)
        .await
        .unwrap();
    let v = verify(String::new()).await;
    assert_eq!(
        v["ok"], true,
        "without anchors or a saved head it walks clean: {v}"
    );
    let v = verify(with_head).await;
    assert_eq!(v["ok"], false, "{v}");
    assert!(v["problem"].as_str().unwrap().contains("saved head"), "{v}");
    // A forged head (another key, or an edited one) does not verify offline.
    let forged = SignedHead {
        hash: v["head"].as_str().unwrap_or("x").to_owned(),
        ..head.clone()
    };
    assert!(!forged.verify());
    db.close().await;
}
