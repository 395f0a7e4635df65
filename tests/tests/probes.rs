//! Deactivation probes: after a secret version is revoked, the control
//! plane sends the upstream's `deactivation_probe` once to the provider
//! itself with the old value, and records what it answered. Never with a
//! live version, never in a loop, and the value never in logs or tables.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test stops at the first failed step, with its message"
)]

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use leash_control_plane::admin::types::ProbeResults;
use leash_control_plane::app::ControlPlane;
use leash_tests::*;
use serde_json::json;

/// One request the provider received: method, request target, and the
/// credential it carried (the `x-api-key` header or the `key` parameter).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Received {
    method: String,
    target: String,
    credential: Option<String>,
}

/// A provider that accepts only the values in `accepts` (200) and answers
/// 401 to anything else, recording every request.
async fn provider(accepts: &[&str]) -> (SocketAddr, Arc<Mutex<Vec<Received>>>) {
    let accepts: Arc<Vec<String>> = Arc::new(accepts.iter().map(|a| (*a).to_owned()).collect());
    let received = Arc::new(Mutex::new(Vec::new()));
    let l = listener().await;
    let addr = l.local_addr().unwrap();
    let log = received.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = l.accept().await {
            let accepts = accepts.clone();
            let log = log.clone();
            let svc =
                hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let header = req
                        .headers()
                        .get("x-api-key")
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_owned);
                    let query = req.uri().query().and_then(|q| {
                        q.split('&')
                            .find_map(|p| p.strip_prefix("key="))
                            .map(str::to_owned)
                    });
                    let credential = header.or(query);
                    let ok = credential.as_ref().is_some_and(|c| accepts.contains(c));
                    log.lock().unwrap().push(Received {
                        method: req.method().to_string(),
                        target: req.uri().to_string(),
                        credential,
                    });
                    let status = if ok { 200 } else { 401 };
                    async move {
                        Ok::<_, std::convert::Infallible>(
                            http::Response::builder()
                                .status(status)
                                .body(Full::new(Bytes::new()))
                                .unwrap(),
                        )
                    }
                });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc),
            );
        }
    });
    (addr, received)
}

fn policy(target: SocketAddr, inject: &str) -> String {
    format!(
        r#"version: 1
upstreams:
  - name: vault-api
    hosts: [vault.leash.test]
    target: http://{target}
    credential: {{ kind: static, ttl: 30s }}
    inject: {inject}
    deactivation_probe: {{ method: GET, path: /v1/me, expect: [401, 403] }}
grants:
  - workload: {APP_ID}
    upstreams: [vault-api]
"#
    )
}

const HEADER: &str = r#"{ type: header, name: x-api-key, format: "{token}" }"#;
const QUERY: &str = "{ type: query, param: key }";

/// A control plane alone (no sidecar needs to acknowledge anything here).
struct Plane {
    dir: tempfile::TempDir,
    _ids: Identities,
    cp: ControlPlane,
    admin: Admin,
}

async fn plane(policy: &str, probe_timeout: Duration) -> Plane {
    let _ = captured_logs();
    init();
    let dir = short_tempdir();
    let ids = Identities::start(dir.path(), Duration::from_secs(600), &[CP_ID]);
    let file = write_policy(dir.path(), policy);
    let data = dir.path().join("data");
    let cp = start_control_plane_configured(&ids, CP_ID, &file, &data, listener().await, |c| {
        c.probe_timeout = probe_timeout;
    })
    .await;
    let admin = Admin::bootstrap(cp.admin_addr, &data);
    Plane {
        dir,
        _ids: ids,
        cp,
        admin,
    }
}

async fn put(admin: &Admin, value: &str) {
    let r = admin
        .post("/v1/secrets/vault-api", json!({ "value": value }))
        .await;
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
}

/// Waits for the first recorded probe of `version`.
async fn first_probe(admin: &Admin, version: i64, within: Duration) -> serde_json::Value {
    eventually(within, "a probe result", || async {
        let r = admin
            .get(&format!("/v1/secrets/vault-api/versions/{version}/probes"))
            .await;
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        r.json()["probes"].as_array()?.first().cloned()
    })
    .await
}

async fn probe_metric(admin_addr: SocketAddr, outcome: &str) -> f64 {
    let text = http_get(&format!("http://{admin_addr}/metrics"))
        .await
        .unwrap()
        .body;
    let samples = parse_prometheus(&String::from_utf8_lossy(&text));
    sample(
        &samples,
        "leash_cp_deactivation_probes_total",
        &[("outcome", outcome)],
    )
    .unwrap()
}

/// Shuts the control plane down and asserts that none of `values` is in
/// the logs or in any database file.
async fn shut_down_and_find_nowhere(p: Plane, values: &[&str]) {
    let Plane { dir, cp, .. } = p;
    cp.shutdown(Duration::from_secs(5)).await;
    let named: Vec<(&str, &str)> = values.iter().map(|v| ("secret", *v)).collect();
    assert_nowhere(&dir.path().join("data"), &named);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_version_is_proved_dead_at_the_provider_once() {
    const V1: &str = "probe-secret-v1-RGVhZCBvbmU";
    const V2: &str = "probe-secret-v2-Q3VycmVudA";
    let (addr, received) = provider(&[V2]).await;
    let p = plane(&policy(addr, HEADER), probe_timeout()).await;
    let admin = p.admin.clone();
    put(&admin, V1).await;
    put(&admin, V2).await;

    // A live version is never sent to prove anything.
    let r = admin
        .post("/v1/secrets/vault-api/versions/1/probe", json!({}))
        .await;
    assert_eq!(r.status, 409, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["error"], "not_revoked");
    assert!(received.lock().unwrap().is_empty());

    let r = admin
        .post(
            "/v1/secrets/vault-api/versions/1/revoke",
            json!({"reason": "rotated"}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    let result = first_probe(&admin, 1, Duration::from_secs(10)).await;
    assert_eq!(result["outcome"], "dead", "{result}");
    assert_eq!(result["status"], 401, "{result}");
    assert_eq!(result["upstream"], "vault-api");
    assert_eq!(result["version"], 1);
    assert!(result["at_ms"].as_i64().unwrap() > 0);

    // Within the minute: refused, and nothing more reaches the provider.
    let again = admin
        .post("/v1/secrets/vault-api/versions/1/probe", json!({}))
        .await;
    assert_eq!(
        again.status,
        429,
        "{}",
        String::from_utf8_lossy(&again.body)
    );
    assert_eq!(again.json()["error"], "probe_limited");
    let retry: u64 = again.headers["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry), "{retry}");
    assert_eq!(
        admin
            .post("/v1/secrets/vault-api/versions/2/probe", json!({}))
            .await
            .status,
        409,
        "the current version is not revoked"
    );
    assert_eq!(
        admin
            .post("/v1/secrets/vault-api/versions/7/probe", json!({}))
            .await
            .status,
        404
    );
    assert_eq!(
        *received.lock().unwrap(),
        [Received {
            method: "GET".into(),
            target: "/v1/me".into(),
            credential: Some(V1.into()),
        }],
        "exactly one probe, carrying v1 where the policy injects it"
    );
    // As leashctl reads it: the typed contract.
    let list: ProbeResults = serde_json::from_slice(
        &admin
            .get("/v1/secrets/vault-api/versions/1/probes")
            .await
            .body,
    )
    .unwrap();
    assert_eq!(list.probes.len(), 1);
    assert_eq!(list.probes[0].status, Some(401));
    assert_eq!(list.probes[0].outcome, "dead");
    // The mission engine's view: the same, from the store.
    assert_eq!(
        p.cp.state
            .store
            .probe_results("vault-api", 1)
            .await
            .unwrap(),
        list.probes
    );
    assert_eq!(probe_metric(p.cp.admin_addr, "dead").await, 1.0);
    assert_eq!(probe_metric(p.cp.admin_addr, "limited").await, 1.0);
    assert_eq!(probe_metric(p.cp.admin_addr, "alive").await, 0.0);
    // The manual probe was audited like every admin call.
    let audit = admin.get("/v1/audit?limit=50").await;
    assert!(
        String::from_utf8_lossy(&audit.body).contains("probe_limited"),
        "{}",
        String::from_utf8_lossy(&audit.body)
    );
    shut_down_and_find_nowhere(p, &[V1, V2]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_that_still_accepts_the_old_value_is_alive() {
    const V1: &str = "probe-secret-v1-U3RpbGwgYWxpdmU";
    const V2: &str = "probe-secret-v2-TmV3ZXI";
    let (addr, received) = provider(&[V1, V2]).await;
    let p = plane(&policy(addr, QUERY), probe_timeout()).await;
    put(&p.admin, V1).await;
    put(&p.admin, V2).await;
    // Revoked by its lease id, as any credential.
    p.admin
        .revoke(json!({"kind": "credential", "credential_id": "static:vault-api:v1", "reason": "exposed"}))
        .await;
    let result = first_probe(&p.admin, 1, Duration::from_secs(10)).await;
    assert_eq!(result["outcome"], "alive", "{result}");
    assert_eq!(result["status"], 200, "{result}");
    assert!(
        result["detail"]
            .as_str()
            .unwrap()
            .contains("may still accept"),
        "{result}"
    );
    let seen = received.lock().unwrap().clone();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].target, format!("/v1/me?key={V1}"));
    assert_eq!(probe_metric(p.cp.admin_addr, "alive").await, 1.0);
    shut_down_and_find_nowhere(p, &[V1, V2]).await;
}

/// Short enough for a test; the default is 10 s.
fn probe_timeout() -> Duration {
    Duration::from_secs(1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_that_does_not_answer_is_an_error_after_the_timeout() {
    const V1: &str = "probe-secret-v1-U2lsZW50";
    let (addr, accepted) = canned_upstream(
        Canned::Answer {
            delay: Duration::from_secs(3600),
            keep_alive: false,
        },
        || http::Response::new(Full::new(Bytes::new())),
    )
    .await;
    let p = plane(&policy(addr, HEADER), probe_timeout()).await;
    put(&p.admin, V1).await;
    put(&p.admin, "probe-secret-v2-TmV4dA").await;
    let revoked = Instant::now();
    let r = p
        .admin
        .post(
            "/v1/secrets/vault-api/versions/1/revoke",
            json!({"reason": "rotated"}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    assert!(
        revoked.elapsed() < probe_timeout(),
        "the revocation does not wait for the probe"
    );
    let result = first_probe(&p.admin, 1, Duration::from_secs(10)).await;
    assert!(revoked.elapsed() >= probe_timeout());
    assert_eq!(result["outcome"], "error", "{result}");
    assert!(result["status"].is_null(), "{result}");
    assert!(
        result["detail"].as_str().unwrap().contains("within 1s"),
        "{result}"
    );
    assert_eq!(accepted.load(std::sync::atomic::Ordering::Relaxed), 1);
    assert_eq!(probe_metric(p.cp.admin_addr, "error").await, 1.0);
    shut_down_and_find_nowhere(p, &[V1]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_probe_is_refused_with_its_field() {
    let _ = captured_logs();
    init();
    let dir = short_tempdir();
    let text = policy("127.0.0.1:9".parse().unwrap(), HEADER)
        .replace("path: /v1/me", "path: v1/me")
        .replace("expect: [401, 403]", "expect: []")
        .replace("kind: static", "kind: jwt");
    let issues = leash_api::policy::parse(&text, Path::new(".")).unwrap_err();
    let fields: Vec<&str> = issues.iter().map(|i| i.field.as_str()).collect();
    assert_eq!(
        fields,
        [
            "upstreams[0].deactivation_probe",
            "upstreams[0].deactivation_probe.path",
            "upstreams[0].deactivation_probe.expect",
        ],
        "{issues:?}"
    );
    // As the control plane reports it when it loads the file.
    let file = write_policy(dir.path(), &text);
    let err = leash_api::policy::load(&file).unwrap_err().to_string();
    assert!(
        err.contains("upstreams[0].deactivation_probe.path: \"v1/me\" must be a path"),
        "{err}"
    );
}

/// A mission to retire a secret version closes itself once the version is
/// rotated, revoked, acknowledged, unused for the window and proved dead at
/// the provider; before that it says which of those is missing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mission_to_retire_a_version_closes_once_the_provider_refuses_it() {
    const V1: &str = "probe-secret-v1-TWlzc2lvbiBvbmU";
    const V2: &str = "probe-secret-v2-TWlzc2lvbiB0d28";
    let (provider_addr, _) = provider(&[V2]).await;
    let p = plane(&policy(provider_addr, HEADER), Duration::from_secs(5)).await;
    put(&p.admin, V1).await;
    let r = p
        .admin
        .post(
            "/v1/missions",
            json!({
                "objective": "retire the exposed vault-api key",
                "owner": "platform",
                "window": "1s",
                "findings": [{"finding": {"kind": "secret-version", "upstream": "vault-api", "version": 1}}],
            }),
        )
        .await;
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    let m = r.json();
    let id = m["id"].as_str().unwrap().to_owned();
    let criteria: Vec<(String, bool)> = m["criteria"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["criterion"].as_str().unwrap().to_owned(),
                c["holds"] == true,
            )
        })
        .collect();
    assert_eq!(
        criteria,
        [
            ("rotated".to_owned(), false),
            ("acknowledged".to_owned(), false),
            ("no-use".to_owned(), false),
            ("deactivated-at-source".to_owned(), false),
        ]
    );
    put(&p.admin, V2).await;
    let r = p
        .admin
        .post(
            "/v1/secrets/vault-api/versions/1/revoke",
            json!({"reason": "exposed in a CI log"}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    let closed = eventually(Duration::from_secs(20), "the mission closed", || async {
        let m = p.admin.get(&format!("/v1/missions/{id}")).await.json();
        (m["state"] == "closed").then_some(m)
    })
    .await;
    let source = closed["criteria"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["criterion"] == "deactivated-at-source")
        .unwrap()
        .clone();
    assert_eq!(source["inputs"]["probes"][0]["status"], 401, "{source}");
    assert_eq!(source["inputs"]["probes"][0]["outcome"], "dead");
    assert!(!closed.to_string().contains(V1));
    shut_down_and_find_nowhere(p, &[V1, V2]).await;
}
