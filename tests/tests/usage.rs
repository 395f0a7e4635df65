//! Usage reporting end to end: what several sidecars forwarded arrives in
//! the control plane exactly once, across a control-plane restart; what a
//! sidecar had to drop is reported as dropped; the dependency map, unused
//! grants and uses after a revocation answer a scripted scenario.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test stops at the first failed step, with its message"
)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use leash_proxy::Sidecar;
use leash_tests::*;
use serde_json::{Value, json};

const SVID_TTL: Duration = Duration::from_secs(600);

/// payments and ledger for both workloads; archive granted to OTHER but never called.
fn policy(up: SocketAddr) -> String {
    format!(
        r#"version: 1
upstreams:
  - name: payments
    hosts: [payments.leash.test]
    target: http://{up}
    credential: {{ kind: jwt, ttl: 10m }}
  - name: ledger
    hosts: [ledger.leash.test]
    target: http://{up}
    credential: {{ kind: jwt, ttl: 10m, audience: payments }}
  - name: archive
    hosts: [archive.leash.test]
    target: http://{up}
    credential: {{ kind: jwt, ttl: 10m }}
grants:
  - workload: {APP_ID}
    upstreams: [payments, ledger]
  - workload: spiffe://leash.test/ns/other/*
    upstreams: [ledger, archive]
"#
    )
}

async fn send(client: &ProxyClient, host: &str, n: usize) -> usize {
    let mut ok = 0;
    for i in 0..n {
        let a = client
            .get(&format!("http://{host}/whoami?i={i}"), &[])
            .await
            .expect("request");
        assert!(
            a.status < 500,
            "{}: {}",
            a.status,
            String::from_utf8_lossy(&a.body)
        );
        ok += 1;
    }
    ok
}

async fn usage(admin: &Admin, query: &str) -> Value {
    let a = admin.get(&format!("/v1/usage{query}")).await;
    assert_eq!(a.status, 200, "{}", String::from_utf8_lossy(&a.body));
    a.json()
}

fn enc(s: &str) -> String {
    s.replace(':', "%3A").replace('/', "%2F")
}

async fn restart(
    cp: leash_control_plane::app::ControlPlane,
    ids: &Identities,
    dir: &std::path::Path,
) -> leash_control_plane::app::ControlPlane {
    let addr = cp.sidecar_addr;
    cp.shutdown(Duration::from_secs(5)).await;
    let l = tokio::net::TcpListener::bind(addr).await.expect("rebind");
    start_control_plane_on(ids, CP_ID, &dir.join("policy.yaml"), &dir.join("data"), l).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_counts_are_exact_across_a_control_plane_restart() {
    let d = Deployment::start_with(policy, SVID_TTL, None).await;
    let second = start_sidecar(sidecar_config(d.ids.endpoint(APP_ID), d.cp.sidecar_addr)).await;
    let other = start_sidecar(sidecar_config(d.ids.endpoint(OTHER_ID), d.cp.sidecar_addr)).await;
    for s in [&second, &other] {
        wait_ready(s.admin_addr).await;
    }
    let clients = [
        ProxyClient::new(d.sidecar.egress_addr),
        ProxyClient::new(second.egress_addr),
        ProxyClient::new(other.egress_addr),
    ];
    let Deployment {
        cp,
        ids,
        dir,
        sidecar,
        seen,
        ..
    } = d;

    let mut sent = [0usize; 3];
    sent[0] += send(&clients[0], "payments.leash.test", 40).await;
    sent[1] += send(&clients[1], "ledger.leash.test", 30).await;
    sent[2] += send(&clients[2], "ledger.leash.test", 20).await;
    // Some batches are in flight, some not yet made, when the control plane goes.
    let cp = restart(cp, &ids, dir.path()).await;
    sent[0] += send(&clients[0], "payments.leash.test", 25).await;
    sent[2] += send(&clients[2], "ledger.leash.test", 15).await;
    let admin = Admin::bootstrap(cp.admin_addr, &dir.path().join("data"));
    // Cached credentials served while it was away; the sidecars reconnect.
    let cp = restart(cp, &ids, dir.path()).await;
    sent[1] += send(&clients[1], "ledger.leash.test", 10).await;
    let admin = Admin {
        addr: cp.admin_addr,
        ..admin
    };

    let total: usize = sent.iter().sum();
    assert_eq!(
        seen.lock().unwrap().len(),
        total,
        "the upstream saw them all"
    );
    let v = eventually(Duration::from_secs(15), "every request reported", || {
        let admin = admin.clone();
        async move {
            let v = usage(&admin, "").await;
            (v["requests"].as_u64() == Some(total as u64)).then_some(v)
        }
    })
    .await;
    assert_eq!(v["dropped_requests"], 0);
    // Stays exact: nothing resent is counted twice.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let v = usage(&admin, "").await;
    assert_eq!(v["requests"].as_u64(), Some(total as u64));
    let app = usage(&admin, &format!("?workload={}", enc(APP_ID))).await;
    assert_eq!(app["requests"].as_u64(), Some((sent[0] + sent[1]) as u64));
    let other_v = usage(&admin, &format!("?workload={}", enc(OTHER_ID))).await;
    assert_eq!(other_v["requests"].as_u64(), Some(sent[2] as u64));
    for row in v["rows"].as_array().unwrap() {
        assert_eq!(row["method"], "GET");
        assert_eq!(row["status_class"], "2xx");
        assert!(row["bytes_received"].as_u64().unwrap() > 0);
        assert!(row["first_seen_ms"].as_i64() <= row["last_seen_ms"].as_i64());
    }
    // By credential: the payments credential's rows hold exactly its requests.
    let payments = usage(&admin, "?upstream=payments").await;
    assert_eq!(payments["requests"].as_u64(), Some(sent[0] as u64));
    let cred = payments["rows"][0]["credential_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let by_cred = usage(&admin, &format!("?credential={cred}")).await;
    assert_eq!(by_cred["requests"].as_u64(), Some(sent[0] as u64));
    // A time range after everything: nothing.
    let later = usage(&admin, "?since=2999-01-01T00:00:00Z").await;
    assert_eq!(later["requests"], 0);
    let bad = admin.get("/v1/usage?since=yesterday").await;
    assert_eq!(bad.status, 400);
    assert!(
        bad.json()["message"]
            .as_str()
            .unwrap()
            .contains("not a time")
    );
    let bad = admin.get("/v1/usage?color=blue").await;
    assert_eq!(bad.status, 400);

    // Shutting a sidecar down ships its last counts.
    sent[2] += send(&clients[2], "ledger.leash.test", 7).await;
    other.shutdown(Duration::from_secs(5)).await;
    let other_v = usage(&admin, &format!("?workload={}", enc(OTHER_ID))).await;
    assert_eq!(other_v["requests"].as_u64(), Some(sent[2] as u64));
    drop((sidecar, second));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overflowing_the_buffer_reports_what_was_dropped() {
    let d = Deployment::start_with(policy, SVID_TTL, None).await;
    let mut config = sidecar_config(d.ids.endpoint(OTHER_ID), d.cp.sidecar_addr);
    config.control.report_interval = Duration::from_millis(100);
    config.control.usage_buffer_records = 1;
    let small: Sidecar = start_sidecar(config).await;
    wait_ready(small.admin_addr).await;
    let client = ProxyClient::new(small.egress_addr);
    let Deployment { cp, ids, dir, .. } = d;

    let mut sent = send(&client, "ledger.leash.test", 3).await;
    let addr = cp.sidecar_addr;
    cp.shutdown(Duration::from_secs(5)).await;
    // Away: one batch (one record) per interval, and room for one.
    for _ in 0..8 {
        sent += send(&client, "ledger.leash.test", 2).await;
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    let l = tokio::net::TcpListener::bind(addr).await.unwrap();
    let cp = start_control_plane_on(
        &ids,
        CP_ID,
        &dir.path().join("policy.yaml"),
        &dir.path().join("data"),
        l,
    )
    .await;
    let admin = Admin::bootstrap(cp.admin_addr, &dir.path().join("data"));
    let q = format!("?workload={}", enc(OTHER_ID));
    let v = eventually(Duration::from_secs(15), "usage and drops reconcile", || {
        let (admin, q) = (admin.clone(), q.clone());
        async move {
            let v = usage(&admin, &q).await;
            let stored = v["requests"].as_u64()?;
            let dropped = v["dropped_requests"].as_u64()?;
            (stored + dropped == sent as u64).then_some(v)
        }
    })
    .await;
    let dropped = v["dropped_requests"].as_u64().unwrap();
    assert!(dropped > 0, "the buffer overflowed: {v}");
    assert!(
        v["requests"].as_u64().unwrap() > 0,
        "the newest batch survived"
    );
    assert_eq!(
        small
            .link
            .usage
            .requests_dropped
            .load(std::sync::atomic::Ordering::Relaxed),
        dropped
    );
    let metrics = http_get(&format!("http://{}/metrics", cp.admin_addr))
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&metrics.body).into_owned();
    assert!(
        text.contains(&format!("leash_cp_usage_dropped_requests_total {dropped}")),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dependency_map_and_unused_grants_match_the_traffic() {
    let d = Deployment::start_with(policy, SVID_TTL, None).await;
    let other = start_sidecar(sidecar_config(d.ids.endpoint(OTHER_ID), d.cp.sidecar_addr)).await;
    wait_ready(other.admin_addr).await;
    let other_client = ProxyClient::new(other.egress_addr);
    let admin = d.admin();

    send(&d.client, "payments.leash.test", 3).await;
    send(&d.client, "ledger.leash.test", 1).await;
    send(&other_client, "ledger.leash.test", 2).await;
    // Refused (not granted): no credential used, no usage.
    let a = other_client
        .get("http://payments.leash.test/whoami", &[])
        .await
        .unwrap();
    assert_eq!(a.status, 403);

    let edges = eventually(Duration::from_secs(10), "edges reported", || {
        let admin = admin.clone();
        async move {
            let v = admin.get("/v1/usage/dependencies").await.json();
            let total: u64 = v["edges"]
                .as_array()?
                .iter()
                .map(|e| e["requests"].as_u64().unwrap_or(0))
                .sum();
            (total == 6).then_some(v["edges"].clone())
        }
    })
    .await;
    let got: Vec<(String, String, String, u64, u64)> = edges
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["workload"].as_str().unwrap().to_owned(),
                e["upstream"].as_str().unwrap().to_owned(),
                e["credential_kind"].as_str().unwrap().to_owned(),
                e["requests"].as_u64().unwrap(),
                e["credentials"].as_u64().unwrap(),
            )
        })
        .collect();
    let expected = vec![
        (APP_ID.into(), "ledger".into(), "jwt".into(), 1, 1),
        (APP_ID.into(), "payments".into(), "jwt".into(), 3, 1),
        (OTHER_ID.into(), "ledger".into(), "jwt".into(), 2, 1),
    ];
    assert_eq!(got, expected);
    for e in edges.as_array().unwrap() {
        assert!(e["last_used_ms"].as_i64().unwrap() > 0);
        assert_eq!(e["errors"], 0);
    }

    let unused = admin.get("/v1/usage/unused-grants?since=1h").await.json();
    let unused: Vec<(String, String)> = unused["unused"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| {
            (
                u["workload"].as_str().unwrap().to_owned(),
                u["upstream"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        unused,
        vec![(
            "spiffe://leash.test/ns/other/*".to_owned(),
            "archive".to_owned()
        )]
    );
    // Since a time after every use: every grant is a cleanup candidate.
    let all = admin
        .get("/v1/usage/unused-grants?since=2999-01-01T00:00:00Z")
        .await
        .json();
    assert_eq!(all["unused"].as_array().unwrap().len(), 4);
    let missing = admin.get("/v1/usage/unused-grants").await;
    assert_eq!(missing.status, 400);
    // Viewer role is enough; no token is not.
    assert_eq!(
        admin
            .with_token(None)
            .get("/v1/usage/dependencies")
            .await
            .status,
        401
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uses_after_a_revocation_are_shown_and_violations_flagged() {
    let d = Deployment::start_with(policy, SVID_TTL, None).await;
    let admin = d.admin();
    send(&d.client, "payments.leash.test", 5).await;
    let old = d.seen.lock().unwrap()[0].jti.clone().expect("jti");
    let r = admin
        .revoke(json!({"kind": "credential", "credential_id": old, "reason": "leaked in CI logs"}))
        .await;
    let id = r["id"].as_str().unwrap().to_owned();
    admin.wait_acknowledged(&id, 1).await;
    send(&d.client, "payments.leash.test", 5).await;
    eventually(Duration::from_secs(10), "usage reported", || {
        let admin = admin.clone();
        async move { (usage(&admin, "").await["requests"] == 10).then_some(()) }
    })
    .await;
    let v = admin.get("/v1/usage/after-revocation").await.json();
    assert_eq!(v["violations"], 0, "{v}");
    assert!(
        v["uses"]
            .as_array()
            .unwrap()
            .iter()
            .all(|u| u["credential_id"] != old.as_str() || u["violation"] == false),
        "{v}"
    );

    // A sidecar that ignores the revocation (an old build, a patched
    // binary) keeps using the credential: its own report convicts it.
    let rogue = leash_proxy::control::ControlLink::new(
        sidecar_config(d.ids.endpoint(APP_ID), d.cp.sidecar_addr).control,
    );
    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(rogue.clone().run(stop_rx));
    let link = rogue.clone();
    eventually(Duration::from_secs(10), "rogue connected", || {
        let link = link.clone();
        async move { link.connected().then_some(()) }
    })
    .await;
    // It acknowledges like any sidecar (a use is judged against the
    // workload's latest acknowledgement), and uses the credential after.
    admin.wait_acknowledged(&id, 2).await;
    tokio::time::sleep(Duration::from_millis(2)).await;
    let cell = rogue.usage.cell(&old, &Arc::from("payments"), "jwt");
    cell.record(
        leash_proxy::usage::slot(0, Some(http::StatusCode::OK)),
        leash_proxy::usage::now_ms(),
        0,
    );
    rogue.usage.collect();
    let v = eventually(Duration::from_secs(10), "violation shown", || {
        let admin = admin.clone();
        async move {
            let v = admin.get("/v1/usage/after-revocation").await.json();
            (v["violations"] == 1).then_some(v)
        }
    })
    .await;
    let hit = v["uses"]
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["violation"] == true)
        .unwrap();
    assert_eq!(hit["credential_id"], old.as_str());
    assert_eq!(hit["revocation_id"], id.as_str());
    assert_eq!(hit["workload"], APP_ID);
    assert!(hit["last_seen_ms"].as_i64() > hit["acknowledged_at_ms"].as_i64());
    let _ = stop.send(true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_sidecar_picks_up_where_it_left_off() {
    let d = Deployment::start_with(policy, SVID_TTL, None).await;
    let admin = d.admin();
    let Deployment {
        cp, ids, sidecar, ..
    } = d;
    let client = ProxyClient::new(sidecar.egress_addr);
    let mut sent = send(&client, "payments.leash.test", 6).await;
    let r = admin
        .revoke(
            json!({"kind": "grant", "workload": APP_ID, "upstream": "ledger", "reason": "drill"}),
        )
        .await;
    admin.wait_acknowledged(r["id"].as_str().unwrap(), 1).await;
    // A graceful stop ships the last usage; the new process starts from a
    // snapshot and enforces the revocation from its first request.
    sidecar.shutdown(Duration::from_secs(5)).await;
    let again = start_sidecar(sidecar_config(ids.endpoint(APP_ID), cp.sidecar_addr)).await;
    wait_ready(again.admin_addr).await;
    let client = ProxyClient::new(again.egress_addr);
    let a = client.get("http://ledger.leash.test/", &[]).await.unwrap();
    assert_eq!(a.json()["error"], "revoked_grant");
    sent += send(&client, "payments.leash.test", 4).await;
    eventually(
        Duration::from_secs(10),
        "usage of both processes stored",
        || {
            let admin = admin.clone();
            async move { (usage(&admin, "").await["requests"] == sent as u64).then_some(()) }
        },
    )
    .await;
}
