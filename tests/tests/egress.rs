//! The sidecar's egress path end to end: real dev Workload API, control
//! plane over SPIFFE mTLS, sidecar and an upstream that verifies the JWT
//! against the published JWKS with a standard JWT library.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test stops at the first failed step, with its message"
)]

use std::time::Duration;

use leash_tests::{APP_ID, Deployment, eventually, http_get, parse_prometheus, raw, sample};

const SVID_TTL: Duration = Duration::from_secs(600);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn injected_jwt_verifies_and_is_reused() {
    let d = Deployment::start("5m", SVID_TTL).await;
    let first = d
        .client
        .get("http://payments.leash.test/whoami", &[])
        .await
        .unwrap();
    assert_eq!(first.status, 200, "{:?}", first.body);
    let first = first.json();
    assert_eq!(first["sub"], APP_ID);
    assert_eq!(first["aud"], "payments");

    let second = d
        .client
        .get("http://payments.leash.test/whoami", &[])
        .await
        .unwrap()
        .json();
    assert_eq!(
        second["jti"], first["jti"],
        "second request reuses the cached credential"
    );

    // The control plane recorded exactly that one issuance.
    let issued = d.cp.state.store.credentials_for(APP_ID).await.unwrap();
    assert_eq!(issued.len(), 1);
    assert_eq!(issued[0].id, first["jti"].as_str().unwrap());
    assert_eq!(issued[0].upstream, "payments");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workload_supplied_credential_never_reaches_upstream() {
    let d = Deployment::start("5m", SVID_TTL).await;
    let echo = d
        .client
        .get(
            "http://payments.leash.test/echo?x=1",
            &[
                ("authorization", "Bearer leaked-by-the-workload"),
                ("x-trace", "keep-me"),
            ],
        )
        .await
        .unwrap();
    assert_eq!(echo.status, 200);
    let echo = echo.json();
    let auth = echo["headers"]["authorization"].as_str().unwrap();
    assert!(
        !auth.contains("leaked-by-the-workload"),
        "workload credential forwarded: {auth}"
    );
    assert_eq!(
        echo["verified_sub"], APP_ID,
        "the upstream got Leash's JWT instead"
    );
    assert_eq!(echo["headers"]["x-trace"], "keep-me", "other headers pass");
    assert_eq!(echo["query"], "x=1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deny_by_default_with_reasons() {
    let d = Deployment::start("5m", SVID_TTL).await;

    let not_granted = d
        .client
        .get("http://ledger.leash.test/", &[])
        .await
        .unwrap();
    assert_eq!(not_granted.status, 403);
    let body = not_granted.json();
    assert_eq!(body["error"], "not_granted");
    assert_eq!(body["upstream"], "ledger");

    let unknown = d.client.get("http://example.com/", &[]).await.unwrap();
    assert_eq!(unknown.status, 403);
    assert_eq!(unknown.json()["error"], "unknown_upstream");

    // Nothing was issued for the refused upstream.
    let issued = d.cp.state.store.credentials_for(APP_ID).await.unwrap();
    assert!(issued.iter().all(|c| c.upstream != "ledger"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_malformed_and_oversized_requests() {
    let d = Deployment::start("5m", SVID_TTL).await;
    let proxy = d.sidecar.egress_addr;

    let connect = raw(
        proxy,
        b"CONNECT payments.leash.test:443 HTTP/1.1\r\nHost: payments.leash.test:443\r\nConnection: close\r\n\r\n",
    )
    .await;
    // `payments` is not intercepted: tunnels.rs has the rest.
    assert!(connect.starts_with("HTTP/1.1 403"), "{connect}");
    assert!(connect.contains("connect_not_allowed"), "{connect}");
    assert!(
        connect.contains("http://") && connect.contains("intercept"),
        "explains what to do: {connect}"
    );

    let garbage = raw(proxy, b"GET / HTTP/1.1\r\nHost payments\r\n\r\n").await;
    assert!(garbage.starts_with("HTTP/1.1 400"), "{garbage}");

    let big = format!(
        "GET http://payments.leash.test/ HTTP/1.1\r\nHost: payments.leash.test\r\nX-Big: {}\r\nConnection: close\r\n\r\n",
        "a".repeat(70 * 1024)
    );
    let oversized = raw(proxy, big.as_bytes()).await;
    assert!(oversized.starts_with("HTTP/1.1 431"), "{oversized}");

    // The sidecar is still serving.
    let ok = d
        .client
        .get("http://payments.leash.test/whoami", &[])
        .await
        .unwrap();
    assert_eq!(ok.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_down_is_a_502_with_json() {
    let d = Deployment::start("5m", SVID_TTL).await;
    // Point the policy at a port nobody listens on.
    let dead = leash_tests::listener().await.local_addr().unwrap();
    let policy = leash_tests::standard_policy(dead, "5m");
    std::fs::write(d.dir.path().join("policy.yaml"), policy).unwrap();
    let resp = eventually(
        Duration::from_secs(10),
        "policy change reaches the sidecar",
        || async {
            let a = d
                .client
                .get("http://payments.leash.test/whoami", &[])
                .await
                .ok()?;
            (a.status == 502).then_some(a)
        },
    )
    .await;
    let body = resp.json();
    assert_eq!(body["error"], "upstream_unreachable");
    assert_eq!(body["upstream"], "payments");
    assert!(
        !resp.body.windows(6).any(|w| w == b"Bearer"),
        "no credential in the error body"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credential_is_refreshed_before_it_expires() {
    // 2 s credentials; the upstream verifies `exp` with zero leeway.
    let d = Deployment::start("2s", SVID_TTL).await;
    let mut jtis = std::collections::BTreeSet::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let mut n = 0;
    while tokio::time::Instant::now() < deadline {
        let a = d
            .client
            .get("http://payments.leash.test/whoami", &[])
            .await
            .unwrap();
        assert_eq!(
            a.status,
            200,
            "request {n} failed: {:?}",
            String::from_utf8_lossy(&a.body)
        );
        jtis.insert(a.json()["jti"].as_str().unwrap().to_owned());
        n += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        jtis.len() >= 3,
        "credentials were refreshed: {} distinct over {n} requests",
        jtis.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_endpoints() {
    let d = Deployment::start("5m", SVID_TTL).await;
    let admin = d.sidecar.admin_addr;
    assert_eq!(
        http_get(&format!("http://{admin}/healthz"))
            .await
            .unwrap()
            .status,
        200
    );
    let _ = d
        .client
        .get("http://payments.leash.test/whoami", &[])
        .await
        .unwrap();
    let _ = d.client.get("http://example.com/", &[]).await.unwrap();
    let metrics = http_get(&format!("http://{admin}/metrics")).await.unwrap();
    let samples = parse_prometheus(&String::from_utf8_lossy(&metrics.body));
    let requests = |u, d| {
        sample(
            &samples,
            "leash_proxy_requests_total",
            &[("upstream", u), ("decision", d)],
        )
    };
    assert_eq!(requests("payments", "forwarded"), Some(1.0));
    assert_eq!(requests("", "refused"), Some(1.0));
    let reason = |r| sample(&samples, "leash_proxy_refusals_total", &[("reason", r)]);
    assert_eq!(reason("unknown_upstream"), Some(1.0));

    let jwks = http_get(&format!("http://{}/.well-known/jwks.json", d.cp.admin_addr))
        .await
        .unwrap()
        .json();
    let key = &jwks["keys"][0];
    assert_eq!(key["kty"], "EC");
    assert_eq!(key["alg"], "ES256");
    assert!(key.get("d").is_none(), "no private part in the JWKS");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_body_streams_through() {
    use http_body_util::BodyExt as _;
    type Chunk = Result<hyper::body::Frame<bytes::Bytes>, std::io::Error>;
    let d = Deployment::start("5m", SVID_TTL).await;
    // 8 MiB sent in 64 KiB chunks as a stream; the upstream counts what arrives.
    let (tx, rx) = tokio::sync::mpsc::channel::<Chunk>(4);
    let body = http_body_util::StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    let stream = tokio::net::TcpStream::connect(d.sidecar.egress_addr)
        .await
        .unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = http::Request::post("http://payments.leash.test/echo")
        .header("host", "payments.leash.test")
        .body(body)
        .unwrap();
    let send = tokio::spawn(async move { sender.send_request(req).await });
    for _ in 0..128 {
        tx.send(Ok(hyper::body::Frame::data(bytes::Bytes::from(
            vec![7u8; 64 * 1024],
        ))))
        .await
        .unwrap();
    }
    drop(tx);
    let resp = send.await.unwrap().unwrap();
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let echo: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(echo["body_bytes"], 8 * 1024 * 1024);
    assert_eq!(
        echo["headers"]["transfer-encoding"], "chunked",
        "streamed, not buffered into a length"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_connections_are_pooled_and_replaced_when_the_upstream_closes_them() {
    // An upstream that closes every connection after one answer.
    let closes = leash_tests::Canned::Answer {
        delay: Duration::ZERO,
        keep_alive: false,
    };
    let (closer_addr, accepted) = leash_tests::canned_upstream(closes, || {
        http::Response::new(http_body_util::Full::new(bytes::Bytes::from_static(
            b"once\n",
        )))
    })
    .await;
    let d = Deployment::start_with(
        move |up| {
            leash_tests::PolicyBuilder::new()
                .upstream("payments", up)
                .upstream("ledger", up)
                .upstream("closer", closer_addr)
                .grant(APP_ID, &["payments", "closer"])
                .yaml()
        },
        SVID_TTL,
        None,
    )
    .await;
    // Keep-alive upstream: sequential requests share one connection.
    for _ in 0..20 {
        let a = d
            .client
            .get("http://payments.leash.test/whoami", &[])
            .await
            .unwrap();
        assert_eq!(a.status, 200);
    }
    let routes = d.sidecar.link.routes.load();
    let payments = routes.by_name("payments").unwrap();
    assert_eq!(
        payments.client.idle_connections(),
        1,
        "one connection, reused"
    );
    // Concurrent requests open more, and all come back.
    let mut all = Vec::new();
    for _ in 0..8 {
        let c = leash_tests::ProxyClient::new(d.sidecar.egress_addr);
        all.push(tokio::spawn(async move {
            c.get("http://payments.leash.test/whoami", &[])
                .await
                .unwrap()
                .status
        }));
    }
    for t in all {
        assert_eq!(t.await.unwrap(), 200);
    }
    let idle = payments.client.idle_connections();
    assert!((1..=8).contains(&idle), "{idle}");
    // An upstream that closes after each answer: every request still
    // succeeds, each on a fresh connection.
    for i in 0..20 {
        let a = d
            .client
            .get("http://closer.leash.test/", &[])
            .await
            .unwrap();
        assert_eq!(
            a.status,
            200,
            "request {i}: {}",
            String::from_utf8_lossy(&a.body)
        );
    }
    assert_eq!(
        accepted.load(std::sync::atomic::Ordering::Relaxed),
        20,
        "one connection per request"
    );
}
