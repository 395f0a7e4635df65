//! Brokered secret versions: the newest is the current one, and revoking
//! it never brings an older one back. (Apart from static_secrets.rs, whose
//! test installs the process-wide log capture.)
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test stops at the first failed step, with its message"
)]

use std::net::SocketAddr;
use std::time::Duration;

use leash_tests::*;
use serde_json::json;

const V1: &str = "static-secret-v1-Q2xvdWRz";
const V2: &str = "static-secret-v2-UmFpbmJv";

fn policy(up: SocketAddr) -> String {
    format!(
        r#"version: 1
upstreams:
  - name: vault-api
    hosts: [static.leash.test]
    target: http://{up}
    credential: {{ kind: static, ttl: 30s }}
    inject: {{ type: header, name: x-api-key, format: "{{token}}" }}
grants:
  - workload: {APP_ID}
    upstreams: [vault-api]
"#
    )
}

/// Revoking the current version never brings an older one back: the
/// upstream has no secret (503 credential_unavailable, said in `secret
/// list`) until a new version is put.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_the_current_version_never_falls_back() {
    let d = Deployment::start_with(policy, Duration::from_secs(600), None).await;
    let admin = d.admin();
    for v in [V1, V2] {
        let r = admin
            .post("/v1/secrets/vault-api", json!({"value": v}))
            .await;
        assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    }
    let a = d
        .client
        .get("http://static.leash.test/echo", &[])
        .await
        .unwrap();
    assert_eq!(a.json()["headers"]["x-api-key"], V2);
    // Revoked by its lease id, as any credential: that is the version.
    let r = admin
        .post(
            "/v1/revocations",
            json!({"kind": "credential", "credential_id": "static:vault-api:v2", "reason": "exposed"}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    admin
        .wait_acknowledged(r.json()["id"].as_str().unwrap(), 1)
        .await;
    let before = d.seen.lock().unwrap().len();
    let a = d
        .client
        .get("http://static.leash.test/echo", &[])
        .await
        .unwrap();
    assert_eq!(a.status, 503, "{}", String::from_utf8_lossy(&a.body));
    let body = a.json();
    assert_eq!(body["error"], "credential_unavailable");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("is revoked and no newer one was put"),
        "{body}"
    );
    let list = admin.get("/v1/secrets/vault-api").await.json();
    assert!(list["current"].is_null(), "{list}");
    assert!(
        list["state"].as_str().unwrap().contains("revoked"),
        "{list}"
    );
    assert_eq!(
        d.seen.lock().unwrap().len(),
        before,
        "nothing was sent with an older version"
    );

    let v3 = "static-secret-v3-TmV3IG9uZQ";
    let r = admin
        .post("/v1/secrets/vault-api", json!({"value": v3}))
        .await;
    assert_eq!(r.json()["version"], 3);
    let a = eventually(Duration::from_secs(10), "v3 leased", || async {
        let a = d
            .client
            .get("http://static.leash.test/echo", &[])
            .await
            .ok()?;
        (a.status == 200).then_some(a)
    })
    .await;
    assert_eq!(a.json()["headers"]["x-api-key"], v3);
}
