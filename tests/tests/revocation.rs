//! Revocation end to end: pushed to every sidecar, acknowledged, enforced;
//! caught up after a disconnect; bounded by max_staleness under partition;
//! and an admin API that refuses and audits what it should.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test stops at the first failed step, with its message"
)]

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use leash_proxy::Sidecar;
use leash_tests::*;
use serde_json::json;

const SVID_TTL: Duration = Duration::from_secs(600);

/// payments and ledger, both granted to everything under /ns/.
fn policy_for_all(up: SocketAddr) -> String {
    PolicyBuilder::new()
        .upstream("payments", up)
        .upstream("ledger", up)
        .with(|u| u.credential.audience = Some("payments".into()))
        .grant("spiffe://leash.test/ns/*", &["payments", "ledger"])
        .yaml()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_credential_never_reaches_the_upstream_after_acknowledgement() {
    let d = Deployment::start_with(policy_for_all, SVID_TTL, None).await;
    let mut sidecars: Vec<Sidecar> = Vec::new();
    for id in [OTHER_ID, APP_ID] {
        let s = start_sidecar(sidecar_config(d.ids.endpoint(id), d.cp.sidecar_addr)).await;
        wait_ready(s.admin_addr).await;
        sidecars.push(s);
    }
    let admin = d.admin();
    let whoami = "http://payments.leash.test/whoami";
    let mut load = vec![Load::start(d.sidecar.egress_addr, 1, whoami, |a| {
        a.status == 200
    })];
    for s in &sidecars {
        load.push(Load::start(s.egress_addr, 1, whoami, |a| a.status == 200));
    }

    // The credential the first sidecar is using right now.
    let jti = d
        .client
        .get("http://payments.leash.test/whoami", &[])
        .await
        .unwrap()
        .json()["jti"]
        .as_str()
        .unwrap()
        .to_owned();
    for l in &load {
        l.advance(10).await;
    }
    let r = admin
        .revoke(json!({"kind": "credential", "credential_id": jti, "reason": "leaked in a CI log"}))
        .await;
    let id = r["id"].as_str().unwrap();
    let propagation = admin.wait_acknowledged(id, 3).await;
    let acked_at = Instant::now();
    assert_eq!(propagation["connected"], 3);
    for a in propagation["acknowledged"].as_array().unwrap() {
        assert!(a["latency_ms"].as_i64().unwrap() < 5_000, "{a}");
    }

    for l in &load {
        l.advance(20).await;
    }
    let (mut ok, mut failed) = (0, 0);
    for l in load {
        let (o, f) = l.stop().await;
        (ok, failed) = (ok + o, failed + f);
    }
    let seen = d.seen.lock().unwrap().clone();
    let late: Vec<_> = seen
        .iter()
        .filter(|s| s.at > acked_at && s.jti.as_deref() == Some(&jti))
        .collect();
    assert!(
        late.is_empty(),
        "{} requests with the revoked credential after the acks",
        late.len()
    );
    assert!(
        seen.iter().any(|s| s.jti.as_deref() == Some(&jti)),
        "the credential was in use before"
    );
    // Only one instance was revoked: the sidecar fetched a fresh credential
    // instead of refusing, so nothing failed.
    assert_eq!(failed, 0, "ok: {ok}");
    assert!(
        seen.iter()
            .any(|s| s.at > acked_at && s.sub.as_deref() == Some(APP_ID))
    );

    // The control plane counted the propagation.
    let metrics = http_get(&format!("http://{}/metrics", d.cp.admin_addr))
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&metrics.body);
    assert!(
        text.contains("leash_cp_revocation_propagation_seconds_count"),
        "{text}"
    );

    // A credential revocation cannot be undone.
    let restore = admin
        .post(
            &format!("/v1/revocations/{id}/restore"),
            json!({"reason": "oops"}),
        )
        .await;
    assert_eq!(restore.status, 409);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grant_workload_and_upstream_revocations_refuse_then_restore() {
    let d = Deployment::start_with(policy_for_all, SVID_TTL, None).await;
    let admin = d.admin();
    let get = |host: &'static str| {
        let c = &d.client;
        async move { c.get(&format!("http://{host}/whoami"), &[]).await.unwrap() }
    };
    assert_eq!(get("payments.leash.test").await.status, 200);

    let cases = [
        (
            json!({"kind": "grant", "workload": APP_ID, "upstream": "payments", "reason": "r"}),
            "revoked_grant",
            "ledger.leash.test",
        ),
        (
            json!({"kind": "workload", "workload": "spiffe://leash.test/ns/demo/*", "reason": "r"}),
            "revoked_workload",
            "",
        ),
        (
            json!({"kind": "upstream", "upstream": "payments", "reason": "r"}),
            "revoked_upstream",
            "ledger.leash.test",
        ),
    ];
    for (body, code, still_ok) in cases {
        let r = admin.revoke(body).await;
        let id = r["id"].as_str().unwrap().to_owned();
        admin.wait_acknowledged(&id, 1).await;
        let refused = get("payments.leash.test").await;
        assert_eq!(refused.status, 403, "{code}");
        let j = refused.json();
        assert_eq!(j["error"], code);
        assert_eq!(j["revocation_id"], id.as_str());
        if !still_ok.is_empty() {
            assert_eq!(
                get(still_ok).await.status,
                200,
                "{code} hits only what it names"
            );
        }
        let restored = admin
            .post(
                &format!("/v1/revocations/{id}/restore"),
                json!({"reason": "false alarm"}),
            )
            .await;
        assert_eq!(
            restored.status,
            200,
            "{}",
            String::from_utf8_lossy(&restored.body)
        );
        eventually(Duration::from_secs(5), "restore applied", || async {
            (get("payments.leash.test").await.status == 200).then_some(())
        })
        .await;
    }

    // The control plane refuses to issue for a revoked workload too.
    admin
        .revoke(json!({"kind": "workload", "workload": OTHER_ID, "reason": "compromised"}))
        .await;
    let other = start_sidecar(sidecar_config(d.ids.endpoint(OTHER_ID), d.cp.sidecar_addr)).await;
    wait_ready(other.admin_addr).await;
    let a = ProxyClient::new(other.egress_addr)
        .get("http://payments.leash.test/whoami", &[])
        .await
        .unwrap();
    assert_eq!(a.status, 403);
    assert_eq!(a.json()["error"], "revoked_workload");
    assert!(
        d.cp.state
            .store
            .credentials_for(OTHER_ID)
            .await
            .unwrap()
            .is_empty()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnected_sidecar_catches_up_without_gap_or_repeat() {
    let d = Deployment::start_with(policy_for_all, SVID_TTL, None).await;
    let Deployment {
        cp,
        ids,
        dir,
        sidecar,
        client,
        ..
    } = d;
    let cp_addr = cp.sidecar_addr;
    let data = dir.path().join("data");
    let policy = dir.path().join("policy.yaml");
    let before = sidecar.link.revocations.applied_seq.load(Ordering::Relaxed);
    let snapshots = sidecar
        .link
        .revocations
        .snapshots_applied
        .load(Ordering::Relaxed);
    // Bound before the first control plane goes, so it cannot take over its port.
    let unreachable = listener().await;
    cp.shutdown(Duration::from_secs(5)).await;

    // Meanwhile, on a control plane this sidecar cannot reach, two revocations.
    let elsewhere = start_control_plane_on(&ids, CP_ID, &policy, &data, unreachable).await;
    let admin = Admin::bootstrap(elsewhere.admin_addr, &data);
    let r1 = admin
        .revoke(
            json!({"kind": "grant", "workload": APP_ID, "upstream": "payments", "reason": "one"}),
        )
        .await;
    let r2 = admin
        .revoke(json!({"kind": "upstream", "upstream": "ledger", "reason": "two"}))
        .await;
    assert_eq!(r2["seq"].as_u64().unwrap(), r1["seq"].as_u64().unwrap() + 1);
    elsewhere.shutdown(Duration::from_secs(5)).await;

    let l = tokio::net::TcpListener::bind(cp_addr).await.unwrap();
    let _cp = start_control_plane_on(&ids, CP_ID, &policy, &data, l).await;
    let link = &sidecar.link;
    eventually(Duration::from_secs(15), "sidecar caught up", || async {
        (link.revocations.applied_seq.load(Ordering::Relaxed) == r2["seq"].as_u64().unwrap())
            .then_some(())
    })
    .await;
    assert_eq!(
        link.revocations.changes_applied.load(Ordering::Relaxed),
        2,
        "exactly the two missed changes"
    );
    assert_eq!(
        link.revocations.snapshots_applied.load(Ordering::Relaxed),
        snapshots,
        "no snapshot needed"
    );
    assert_eq!(before, r1["seq"].as_u64().unwrap() - 1);
    let a = client
        .get("http://payments.leash.test/whoami", &[])
        .await
        .unwrap();
    assert_eq!(a.json()["error"], "revoked_grant");
    let a = client
        .get("http://ledger.leash.test/whoami", &[])
        .await
        .unwrap();
    assert_eq!(a.json()["error"], "revoked_upstream");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitioned_sidecar_refuses_after_max_staleness_and_recovers() {
    let d = Deployment::start_with(policy_for_all, SVID_TTL, None).await;
    let mut config = sidecar_config(d.ids.endpoint(APP_ID), d.cp.sidecar_addr);
    config.control.max_staleness = Duration::from_secs(2);
    let s = start_sidecar(config).await;
    wait_ready(s.admin_addr).await;
    let client = ProxyClient::new(s.egress_addr);
    assert_eq!(
        client
            .get("http://payments.leash.test/whoami", &[])
            .await
            .unwrap()
            .status,
        200
    );

    let Deployment { cp, ids, dir, .. } = d;
    let cp_addr = cp.sidecar_addr;
    cp.shutdown(Duration::from_secs(5)).await;
    let cut = Instant::now();
    // Within the bound the cached credential keeps serving.
    let a = client
        .get("http://payments.leash.test/whoami", &[])
        .await
        .unwrap();
    assert_eq!(
        a.status,
        200,
        "within max_staleness: {:?}",
        String::from_utf8_lossy(&a.body)
    );
    let refused = eventually(
        Duration::from_secs(10),
        "refusal after max_staleness",
        || async {
            let a = client
                .get("http://payments.leash.test/whoami", &[])
                .await
                .ok()?;
            (a.status == 503).then_some(a)
        },
    )
    .await;
    assert!(
        cut.elapsed() >= Duration::from_millis(1500),
        "refused too early: {:?}",
        cut.elapsed()
    );
    assert_eq!(refused.json()["error"], "stale_revocation_state");
    let ready = http_get(&format!("http://{}/readyz", s.admin_addr))
        .await
        .unwrap();
    assert_eq!(ready.status, 503);

    let l = tokio::net::TcpListener::bind(cp_addr).await.unwrap();
    let _cp = start_control_plane_on(
        &ids,
        CP_ID,
        &dir.path().join("policy.yaml"),
        &dir.path().join("data"),
        l,
    )
    .await;
    eventually(Duration::from_secs(15), "recovered on its own", || async {
        let a = client
            .get("http://payments.leash.test/whoami", &[])
            .await
            .ok()?;
        (a.status == 200).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_api_authenticates_authorizes_validates_and_audits() {
    let d = Deployment::start("5m", SVID_TTL).await;
    let admin = d.admin();
    let anonymous = admin.with_token(None);
    let wrong = admin.with_token(Some("lsh_000000000000_nope"));
    assert_eq!(anonymous.get("/v1/revocations").await.status, 401);
    assert_eq!(wrong.get("/v1/revocations").await.status, 401);

    let viewer_token = admin
        .post("/v1/tokens", json!({"name": "dashboard", "role": "viewer"}))
        .await
        .json()["token"]
        .as_str()
        .unwrap()
        .to_owned();
    let viewer = admin.with_token(Some(&viewer_token));
    assert_eq!(viewer.get("/v1/revocations").await.status, 200);
    let refused = viewer
        .post(
            "/v1/revocations",
            json!({"kind": "upstream", "upstream": "payments", "reason": "r"}),
        )
        .await;
    assert_eq!(refused.status, 403);
    assert_eq!(refused.json()["error"], "forbidden");
    assert_eq!(viewer.get("/v1/audit").await.status, 403);

    // Bad input: clear 4xx, nothing stored.
    let bad = [
        (
            json!({"kind": "everything", "reason": "r"}),
            400,
            "unknown revocation kind",
        ),
        (
            json!({"kind": "workload", "workload": "not-a-spiffe-id", "reason": "r"}),
            400,
            "SPIFFE ID",
        ),
        (
            json!({"kind": "upstream", "upstream": "nope", "reason": "r"}),
            400,
            "no upstream",
        ),
        (
            json!({"kind": "upstream", "upstream": "payments"}),
            400,
            "reason",
        ),
        (
            json!({"kind": "upstream", "upstream": "payments", "reason": "r", "extra": 1}),
            400,
            "unknown field",
        ),
        (
            json!({"kind": "credential", "credential_id": "no-such", "reason": "r"}),
            404,
            "no credential",
        ),
        (
            json!({"kind": "upstream", "upstream": "payments", "reason": "x".repeat(20_000)}),
            413,
            "",
        ),
    ];
    for (body, status, text) in bad {
        let a = admin.post("/v1/revocations", body.clone()).await;
        assert_eq!(
            a.status,
            status,
            "{body}: {}",
            String::from_utf8_lossy(&a.body)
        );
        assert!(
            String::from_utf8_lossy(&a.body).contains(text),
            "{body}: {}",
            String::from_utf8_lossy(&a.body)
        );
    }
    let listed = admin.get("/v1/revocations?all=true").await.json();
    assert_eq!(
        listed["revocations"].as_array().unwrap().len(),
        0,
        "nothing stored"
    );
    assert_eq!(admin.get("/v1/revocations/rev-nope").await.status, 404);

    // Calls without a token are summarised into the audit log once a minute.
    d.cp.state.refused.flush(&d.cp.state.store).await.unwrap();
    let audit = admin.get("/v1/audit?limit=100").await.json();
    let entries = audit["entries"].as_array().unwrap();
    let statuses: Vec<u64> = entries
        .iter()
        .map(|e| e["status"].as_u64().unwrap())
        .collect();
    assert!(
        statuses.contains(&401)
            && statuses.contains(&403)
            && statuses.contains(&400)
            && statuses.contains(&413)
    );
    let forbidden = entries
        .iter()
        .find(|e| e["status"] == 403 && e["action"] == "POST /v1/revocations")
        .unwrap();
    assert!(
        forbidden["actor"]
            .as_str()
            .unwrap()
            .starts_with("token:dashboard/")
    );
    let anon = entries.iter().find(|e| e["status"] == 401).unwrap();
    assert_eq!(anon["actor"], "anonymous@127.0.0.1");
    assert!(anon["action"].as_str().unwrap().starts_with("refused "));
    // Tokens never reach the audit log.
    assert!(!audit.to_string().contains(&viewer_token));

    let openapi = http_get(&format!("http://{}/openapi.json", d.cp.admin_addr))
        .await
        .unwrap()
        .json();
    // Generated (utoipa): OpenAPI 3.1; tests/openapi.rs walks every path.
    assert_eq!(openapi["openapi"], "3.1.0");
    assert!(openapi["paths"]["/v1/revocations/{id}"].is_object());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_log_is_append_only_in_the_store() {
    if on_postgres() {
        eprintln!(
            "skipped on PostgreSQL: writes to the SQLite file; PostgreSQL's triggers are tested by the store tests"
        );
        return;
    }
    let d = Deployment::start("5m", SVID_TTL).await;
    assert_eq!(d.admin().get("/v1/sidecars").await.status, 200);
    // Someone with write access to the database file tries to rewrite history.
    let url = format!("sqlite://{}", d.dir.path().join("data/leash.db").display());
    let pool = sqlx::SqlitePool::connect(&url).await.unwrap();
    for sql in [
        "UPDATE audit SET actor = 'someone else'",
        "DELETE FROM audit",
    ] {
        let err = sqlx::query(sql).execute(&pool).await.unwrap_err();
        assert!(err.to_string().contains("append-only"), "{sql}: {err}");
    }
    let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM audit")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(n >= 1);
}
