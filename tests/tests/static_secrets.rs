//! Brokered static secrets: encrypted at rest, leased to sidecars, rotated
//! under traffic with nothing failing, and a revoked version gone at once.
//! This file also checks that no secret reaches the logs or the database.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test stops at the first failed step, with its message"
)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use leash_tests::*;
use serde_json::json;

const V1: &str = "static-secret-v1-Q2xvdWRz";
const V2: &str = "static-secret-v2-UmFpbmJv";
const LEAKED: &str = "leaked-value-V2hhdCBhIHNlY3JldA";

fn policy(up: SocketAddr) -> String {
    format!(
        r#"version: 1
upstreams:
  - name: vault-api
    hosts: [static.leash.test]
    target: http://{up}
    credential: {{ kind: static, ttl: 30s }}
    inject: {{ type: header, name: x-api-key, format: "{{token}}" }}
  - name: payments
    hosts: [payments.leash.test]
    target: http://{up}
    credential: {{ kind: jwt, ttl: 5m }}
grants:
  - workload: {APP_ID}
    upstreams: [vault-api, payments]
"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotate_under_traffic_then_revoke_old_version_and_nothing_leaks() {
    let logs = captured_logs();
    let d = Deployment::start_with(policy, Duration::from_secs(600), None).await;
    let admin = d.admin();

    let a = d
        .client
        .get("http://static.leash.test/echo", &[])
        .await
        .unwrap();
    assert_eq!(a.status, 403, "no secret stored yet");
    assert!(String::from_utf8_lossy(&a.body).contains("no_secret"));
    let put = admin
        .post("/v1/secrets/vault-api", json!({"value": V1}))
        .await;
    assert_eq!(put.status, 201, "{}", String::from_utf8_lossy(&put.body));
    assert_eq!(put.json()["version"], 1);
    assert_eq!(
        admin
            .post("/v1/secrets/payments", json!({"value": V1}))
            .await
            .status,
        400,
        "not a static upstream"
    );
    let first = eventually(Duration::from_secs(5), "v1 leased", || async {
        let a = d
            .client
            .get("http://static.leash.test/echo", &[])
            .await
            .ok()?;
        (a.status == 200).then_some(a)
    })
    .await;
    assert_eq!(first.json()["headers"]["x-api-key"], V1);

    let load = Load::start(
        d.sidecar.egress_addr,
        2,
        "http://static.leash.test/echo",
        |a| a.status == 200,
    );
    load.advance(20).await;
    assert_eq!(
        admin
            .post("/v1/secrets/vault-api", json!({"value": V2}))
            .await
            .json()["version"],
        2
    );
    load.advance(20).await;
    let r = admin
        .post(
            "/v1/secrets/vault-api/versions/1/revoke",
            json!({"reason": "rotated after exposure"}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    let id = r.json()["id"].as_str().unwrap().to_owned();
    admin.wait_acknowledged(&id, 1).await;
    let acked = Instant::now();
    load.advance(50).await;
    let (ok, failed) = load.stop().await;
    assert!(ok >= 90, "{ok} answered");
    assert_eq!(failed, 0, "rotation failed requests");
    let seen = d.seen.lock().unwrap().clone();
    assert!(
        seen.iter()
            .any(|s| s.credential.as_deref() == Some(V1) && s.at < acked)
    );
    assert!(seen.iter().any(|s| s.credential.as_deref() == Some(V2)));
    let late_v1 = seen
        .iter()
        .filter(|s| s.at > acked && s.credential.as_deref() == Some(V1))
        .count();
    assert_eq!(
        late_v1, 0,
        "requests with the revoked version after the acknowledgement"
    );
    let versions = admin.get("/v1/secrets/vault-api").await.json();
    assert_eq!(versions["versions"][0]["current"], true);
    assert!(!versions["versions"][1]["revoked_at_ms"].is_null());

    // Also in this process: a JWT, a leaked value and the admin token.
    let jwt = d
        .client
        .get("http://payments.leash.test/echo", &[])
        .await
        .unwrap()
        .json()["headers"]["authorization"]
        .as_str()
        .unwrap()
        .strip_prefix("Bearer ")
        .unwrap()
        .to_owned();
    assert_eq!(
        admin
            .post("/v1/leaked", json!({"value": LEAKED, "reason": "r"}))
            .await
            .status,
        201
    );
    let token = admin.token.clone().unwrap();
    // `lsh_<id>_<secret>`; the secret itself may contain `_`.
    let token_secret = token
        .strip_prefix("lsh_")
        .unwrap()
        .split_once('_')
        .unwrap()
        .1
        .to_owned();
    assert!(token_secret.len() >= 40);

    let Deployment {
        cp, dir, sidecar, ..
    } = d;
    sidecar.shutdown(Duration::from_secs(2)).await;
    cp.shutdown(Duration::from_secs(5)).await;
    assert!(
        logs.lock().unwrap().len() > 10_000,
        "the logs were captured"
    );
    assert_nowhere(
        &dir.path().join("data"),
        &[
            ("v1", V1),
            ("v2", V2),
            ("leaked value", LEAKED),
            ("JWT", jwt.as_str()),
            ("admin token", token_secret.as_str()),
        ],
    );
}
