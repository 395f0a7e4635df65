//! Hostile requests: smuggling and framing confusion, Host/URL mismatch,
//! redirects to other hosts, hop-by-hop tricks to drop the injected header,
//! and SSRF through the forward proxy. Each has one safe behaviour, and no
//! credential goes anywhere policy does not name.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test stops at the first failed step, with its message"
)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use leash_tests::*;

const SVID_TTL: Duration = Duration::from_secs(600);

/// How many requests the upstream has received.
fn paths_seen(d: &Deployment) -> usize {
    d.seen.lock().unwrap().len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conflicting_framing_is_refused_and_nothing_is_smuggled() {
    let d = Deployment::start("10m", SVID_TTL).await;
    let proxy = d.sidecar.egress_addr;

    // CL + TE, with a second request hidden in the body.
    let smuggle = b"POST http://payments.leash.test/echo HTTP/1.1\r\nHost: payments.leash.test\r\n\
Content-Length: 44\r\nTransfer-Encoding: chunked\r\n\r\n\
0\r\n\r\nGET http://payments.leash.test/smuggled HTTP/1.1\r\nHost: x\r\n\r\n";
    let started = std::time::Instant::now();
    let first = raw(proxy, smuggle).await;
    // RFC 9112 §6.3: Transfer-Encoding wins, Content-Length is dropped, and
    // the connection is closed after the answer, so what follows the
    // chunked body is never read as a second request.
    assert!(first.starts_with("HTTP/1.1 200"), "{first}");
    assert_eq!(first.matches("HTTP/1.1 ").count(), 1, "{first}");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "connection closed, not left open"
    );
    // Two different Content-Lengths.
    let a = raw(
        proxy,
        b"POST http://payments.leash.test/echo HTTP/1.1\r\nHost: payments.leash.test\r\nContent-Length: 3\r\nContent-Length: 30\r\n\r\nabc",
    )
    .await;
    assert!(a.starts_with("HTTP/1.1 400"), "{a}");
    // An obfuscated Transfer-Encoding.
    let a = raw(
        proxy,
        b"POST http://payments.leash.test/echo HTTP/1.1\r\nHost: payments.leash.test\r\nTransfer-Encoding: xchunked\r\nContent-Length: 3\r\nConnection: close\r\n\r\nabc",
    )
    .await;
    assert!(!a.contains("smuggled"), "{a}");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let seen: Vec<String> = d
        .seen
        .lock()
        .unwrap()
        .iter()
        .map(|s| s.path.clone())
        .collect();
    assert!(
        !seen.iter().any(|p| p == "/smuggled"),
        "smuggled through: {seen:?}"
    );

    // And the connection-level parser did not desynchronise: still serving.
    let ok = d
        .client
        .get("http://payments.leash.test/whoami", &[])
        .await
        .unwrap();
    assert_eq!(ok.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_request_target_decides_the_route_and_host_is_rewritten() {
    let d = Deployment::start("10m", SVID_TTL).await;
    // Absolute URL names payments, Host names something else: routed to
    // payments, and the upstream sees its own Host, not the workload's.
    let a = d
        .client
        .get(
            "http://payments.leash.test/echo",
            &[("host", "evil.example")],
        )
        .await
        .unwrap();
    assert_eq!(a.status, 200);
    let echo = a.json();
    assert_eq!(echo["headers"]["host"], d.upstream.to_string());
    assert_eq!(echo["verified_sub"], APP_ID);
    // The upstream is an origin server, not a proxy: it gets origin-form,
    // whatever form the workload used.
    assert_eq!(echo["target"], "/echo");
    // Absolute URL names an unknown host, Host names payments: refused; the
    // Host header cannot pull the credential to an unnamed target.
    let before = paths_seen(&d);
    let a = d
        .client
        .get(
            "http://evil.example/steal",
            &[("host", "payments.leash.test")],
        )
        .await
        .unwrap();
    assert_eq!(a.status, 403);
    assert_eq!(a.json()["error"], "unknown_upstream");
    assert_eq!(paths_seen(&d), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_header_tricks_do_not_drop_the_injected_credential() {
    let d = Deployment::start("10m", SVID_TTL).await;
    let a = d
        .client
        .get(
            "http://payments.leash.test/echo",
            &[
                ("connection", "authorization, x-private, keep-alive"),
                ("authorization", "Bearer workload-own-secret"),
                ("x-private", "1"),
                ("keep-alive", "timeout=5"),
                ("proxy-authorization", "Basic cHJveHk6cGFzcw=="),
                ("te", "trailers"),
            ],
        )
        .await
        .unwrap();
    assert_eq!(a.status, 200);
    let echo = a.json();
    let h = &echo["headers"];
    // Leash's credential arrived and verifies; the workload's own did not.
    assert_eq!(echo["verified_sub"], APP_ID);
    assert!(
        !h["authorization"]
            .as_str()
            .unwrap()
            .contains("workload-own-secret")
    );
    for gone in ["x-private", "keep-alive", "proxy-authorization", "te"] {
        assert!(h.get(gone).is_none(), "{gone} forwarded: {h}");
    }
}

/// An upstream that answers every request with a redirect to `to`.
async fn redirecting_upstream(to: String) -> SocketAddr {
    let how = Canned::Answer {
        delay: Duration::ZERO,
        keep_alive: true,
    };
    canned_upstream(how, move || {
        http::Response::builder()
            .status(302)
            .header("location", to.as_str())
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .unwrap()
    })
    .await
    .0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redirect_to_another_host_is_not_followed_with_the_credential() {
    // The "attacker" counts every connection it gets.
    let hits = Arc::new(AtomicUsize::new(0));
    let attacker = listener().await;
    let attacker_addr = attacker.local_addr().unwrap();
    let counter = hits.clone();
    tokio::spawn(async move {
        while let Ok((_s, _)) = attacker.accept().await {
            counter.fetch_add(1, Ordering::Relaxed);
        }
    });
    let redirector = redirecting_upstream(format!("http://{attacker_addr}/steal")).await;
    let d = Deployment::start_with(
        move |up| {
            format!(
                r#"version: 1
upstreams:
  - name: payments
    hosts: [payments.leash.test]
    target: http://{up}
    credential: {{ kind: jwt, ttl: 10m }}
  - name: bouncer
    hosts: [bouncer.leash.test]
    target: http://{redirector}
    credential: {{ kind: jwt, ttl: 10m }}
grants:
  - workload: {APP_ID}
    upstreams: [payments, bouncer]
"#
            )
        },
        SVID_TTL,
        None,
    )
    .await;
    let a = d
        .client
        .get("http://bouncer.leash.test/login", &[])
        .await
        .unwrap();
    // Passed back as it came; the sidecar does not follow redirects.
    assert_eq!(a.status, 302);
    let location = a.headers["location"].to_str().unwrap().to_owned();
    assert_eq!(location, format!("http://{attacker_addr}/steal"));
    // A workload that follows it through the proxy is refused: policy does
    // not name that host, so no credential goes there.
    let a = d.client.get(&location, &[]).await.unwrap();
    assert_eq!(a.status, 403);
    assert_eq!(a.json()["error"], "unknown_upstream");
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        hits.load(Ordering::Relaxed),
        0,
        "nothing reached the other host"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_forward_proxy_is_not_an_ssrf_gadget() {
    let d = Deployment::start("10m", SVID_TTL).await;
    let targets = [
        format!("http://{}/config_dump", d.sidecar.admin_addr),
        format!("http://{}/logging", d.sidecar.admin_addr),
        format!("http://{}/v1/config_dump", d.cp.admin_addr),
        format!("http://{}/", d.cp.sidecar_addr),
        "http://169.254.169.254/latest/meta-data/iam/security-credentials/".into(),
        "http://metadata.google.internal/computeMetadata/v1/".into(),
        "http://[::1]:15000/config_dump".into(),
        "http://localhost:15000/config_dump".into(),
        "http://127.1/".into(),
        "http://0x7f000001/".into(),
        // The upstream's own address, but not by a name policy gives it.
        format!("http://{}/whoami", d.upstream),
    ];
    let before = paths_seen(&d);
    for t in &targets {
        let a = d.client.get(t, &[]).await.unwrap();
        assert_eq!(a.status, 403, "{t}: {}", String::from_utf8_lossy(&a.body));
        assert_eq!(a.json()["error"], "unknown_upstream", "{t}");
    }
    assert_eq!(paths_seen(&d), before, "nothing was forwarded");
}
