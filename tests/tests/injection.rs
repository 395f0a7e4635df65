//! Injection styles, TLS origination to the upstream, named listeners, and
//! the control plane's handling of an invalid policy.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test stops at the first failed step, with its message"
)]

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use base64::Engine as _;
use leash_tests::*;

const SVID_TTL: Duration = Duration::from_secs(600);

fn policy_all_styles(up: SocketAddr) -> String {
    format!(
        r#"version: 1
upstreams:
  - name: payments
    hosts: [payments.leash.test, "*.pay.leash.test"]
    target: http://{up}
    credential: {{ kind: jwt, ttl: 5m }}
    inject: {{ type: header, name: x-api-key, format: "Key {{token}}!" }}
  - name: basic
    hosts: [basic.leash.test]
    target: http://{up}
    credential: {{ kind: jwt, ttl: 5m, audience: payments }}
    inject: {{ type: basic, username: svc }}
  - name: query
    hosts: [query.leash.test]
    target: http://{up}
    credential: {{ kind: jwt, ttl: 5m, audience: payments }}
    inject: {{ type: query, param: access_token }}
grants:
  - workload: spiffe://leash.test/ns/demo/*
    upstreams: [payments, basic, query]
"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_basic_and_query_injection() {
    let d = Deployment::start_with(policy_all_styles, SVID_TTL, None).await;

    // Custom header with format; a wildcard host; the workload's own value is replaced.
    let a = d
        .client
        .get(
            "http://eu.pay.leash.test/echo",
            &[("x-api-key", "Key mine!")],
        )
        .await
        .unwrap()
        .json();
    let key = a["headers"]["x-api-key"].as_str().unwrap();
    let token = key
        .strip_prefix("Key ")
        .and_then(|k| k.strip_suffix('!'))
        .expect("formatted");
    assert_eq!(d.verify(token).await.unwrap().sub, APP_ID);

    // Basic auth: user "svc", password = the JWT.
    let a = d
        .client
        .get("http://basic.leash.test/echo", &[])
        .await
        .unwrap()
        .json();
    let basic = a["headers"]["authorization"].as_str().unwrap();
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(basic.strip_prefix("Basic ").unwrap())
        .unwrap();
    let (user, pass) = std::str::from_utf8(&decoded)
        .unwrap()
        .split_once(':')
        .unwrap();
    assert_eq!(user, "svc");
    assert_eq!(d.verify(pass).await.unwrap().sub, APP_ID);

    // Query: the workload's own access_token is replaced, other params kept.
    let a = d
        .client
        .get(
            "http://query.leash.test/echo?a=1&access_token=mine&b=2",
            &[],
        )
        .await
        .unwrap()
        .json();
    let query = a["query"].as_str().unwrap();
    assert!(query.starts_with("a=1&b=2&access_token="), "{query}");
    assert!(!query.contains("mine"));
    let token = query.rsplit_once("access_token=").unwrap().1;
    assert_eq!(d.verify(token).await.unwrap().sub, APP_ID);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_origination_with_policy_ca() {
    init();
    let pki_dir = short_tempdir();
    let acceptor = upstream_pki(pki_dir.path());
    let ca = pki_dir.path().join("upstream-ca.pem");
    let d = Deployment::start_with(
        |up| {
            format!(
                r#"version: 1
upstreams:
  - name: payments
    hosts: [payments.leash.test]
    target: https://127.0.0.1:{port}
    tls: {{ ca_file: {ca}, ca_only: true, server_name: payments.internal }}
    credential: {{ kind: jwt, ttl: 5m }}
  - name: untrusted
    hosts: [untrusted.leash.test]
    target: https://127.0.0.1:{port}
    credential: {{ kind: jwt, ttl: 5m, audience: payments }}
grants:
  - workload: {APP_ID}
    upstreams: [payments, untrusted]
"#,
                port = up.port(),
                ca = ca.display()
            )
        },
        SVID_TTL,
        Some(acceptor),
    )
    .await;
    let a = d
        .client
        .get("http://payments.leash.test/whoami", &[])
        .await
        .unwrap();
    assert_eq!(a.status, 200, "{}", String::from_utf8_lossy(&a.body));
    assert_eq!(a.json()["sub"], APP_ID);

    // Without the policy's CA the upstream's certificate is not trusted.
    let a = d
        .client
        .get("http://untrusted.leash.test/whoami", &[])
        .await
        .unwrap();
    assert_eq!(a.status, 502);
    let body = a.json();
    assert_eq!(body["error"], "upstream_unreachable");
    assert!(
        body["message"].as_str().unwrap().contains("certificate"),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn named_listener_routes_origin_form_requests() {
    let d = Deployment::start("5m", SVID_TTL).await;
    let named = listener().await;
    let sidecar = leash_proxy::Sidecar::start(
        sidecar_config(d.ids.endpoint(APP_ID), d.cp.sidecar_addr),
        listener().await,
        listener().await,
        vec![("payments".into(), named)],
    )
    .unwrap();
    wait_ready(sidecar.admin_addr).await;
    let addr = sidecar.named_addrs[0].1;
    // A plain origin-form request with an unrelated Host still goes to payments.
    let a = http_get(&format!("http://{addr}/whoami")).await.unwrap();
    assert_eq!(a.status, 200, "{}", String::from_utf8_lossy(&a.body));
    assert_eq!(a.json()["sub"], APP_ID);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_policy_is_refused_with_the_field() {
    init();
    let dir = short_tempdir();
    let ids = Identities::start(dir.path(), SVID_TTL, &[CP_ID]);
    let policy = write_policy(
        dir.path(),
        "version: 1\nupstreams:\n  - name: p\n    hosts: [p.test]\n    target: http://127.0.0.1:1\n    credential: { kind: jwt, ttl: forever }\n",
    );
    let source = leash_api::identity::x509_source(&ids.endpoint(CP_ID), Duration::from_secs(10))
        .await
        .unwrap();
    let err = leash_control_plane::app::ControlPlane::start(
        leash_control_plane::app::ServeConfig {
            policy: policy.clone(),
            data_dir: dir.path().join("data"),
            database_url: None,
            issuer: None,
            policy_poll: Duration::from_secs(1),
            heartbeat: Duration::from_secs(1),
            mission_interval: Duration::from_secs(1),
            master_key: None,
            otel: None,
            admin_auth_failures_per_minute: 10,
            limits: Default::default(),
            admin_tls: None,
            probe_timeout: leash_control_plane::probes::DEFAULT_TIMEOUT,
        },
        source,
        listener().await,
        listener().await,
    )
    .await
    .err()
    .expect("invalid policy refused");
    let msg = err.to_string();
    assert!(msg.contains(&policy.display().to_string()), "{msg}");
    assert!(msg.contains("upstreams[0].credential.ttl"), "{msg}");
    assert!(msg.contains("invalid duration"), "{msg}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_policy_edit_keeps_the_last_good_one() {
    let d = Deployment::start("5m", SVID_TTL).await;
    let before = d.cp.state.policy.load().version.clone();
    std::fs::write(d.dir.path().join("policy.yaml"), "version: 2\n").unwrap();
    eventually(Duration::from_secs(10), "the edit refused", || async {
        (d.cp.state.metrics.policy_rejected.load(Ordering::Relaxed) == 1).then_some(())
    })
    .await;
    assert_eq!(d.cp.state.policy.load().version, before);
    assert_eq!(d.cp.state.metrics.policy_reloads.load(Ordering::Relaxed), 0);
    let a = d
        .client
        .get("http://payments.leash.test/whoami", &[])
        .await
        .unwrap();
    assert_eq!(a.status, 200);
}
