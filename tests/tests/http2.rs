//! HTTP/2 from the workload with prior knowledge (h2c) on the proxy port,
//! as curl sends it, and what a hostile HTTP/2 client can do: a `SETTINGS`
//! flood and a rapid-reset flood leave the sidecar serving everyone else.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test stops at the first failed step, with its message"
)]

use std::time::{Duration, Instant};

use leash_tests::*;
use tokio::io::AsyncWriteExt as _;

const SVID_TTL: Duration = Duration::from_secs(600);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_speaks_h2c_with_prior_knowledge_and_gets_the_credential_injected() {
    let d = Deployment::start("5m", SVID_TTL).await;
    let out = std::process::Command::new("curl")
        .args(["-sS", "--max-time", "20", "--http2-prior-knowledge"])
        .args(["-H", "Host: payments.leash.test"])
        .args(["-H", "Authorization: Bearer mine"])
        .args(["-w", "\n%{http_code} %{http_version}"])
        .arg(format!("http://{}/whoami", d.sidecar.egress_addr))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let (body, tail) = text.rsplit_once('\n').unwrap();
    assert_eq!(
        tail,
        "200 2",
        "{text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let who: serde_json::Value = serde_json::from_str(body).unwrap();
    assert_eq!(who["sub"], APP_ID);
    let seen = d.seen.lock().unwrap().clone();
    let token = seen[0].credential.as_deref().unwrap();
    assert_ne!(
        token, "Bearer mine",
        "the workload's own credential was stripped"
    );
}

/// An HTTP/2 connection to the sidecar, driven in the background.
async fn h2_client(addr: std::net::SocketAddr) -> h2::client::SendRequest<bytes::Bytes> {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (send, conn) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    send
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_and_rapid_reset_floods_leave_the_sidecar_serving_others() {
    let d = Deployment::start("5m", SVID_TTL).await;
    let proxy = d.sidecar.egress_addr;

    // A SETTINGS flood that never reads the acknowledgements: the sidecar
    // keeps one pending acknowledgement and stops reading, so the flood
    // backs up in the flooder's own socket instead of the sidecar's memory.
    let mut flood = tokio::net::TcpStream::connect(proxy).await.unwrap();
    flood
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    // An empty SETTINGS frame: length 0, type 4, flags 0, stream 0.
    let frame = [0u8, 0, 0, 4, 0, 0, 0, 0, 0];
    let many: Vec<u8> = frame
        .iter()
        .copied()
        .cycle()
        .take(frame.len() * 4096)
        .collect();
    let started = Instant::now();
    let mut written = 0usize;
    while started.elapsed() < Duration::from_secs(3) && written < 64 * 1024 * 1024 {
        match tokio::time::timeout(Duration::from_millis(500), flood.write_all(&many)).await {
            Ok(Ok(())) => written += many.len(),
            _ => break,
        }
    }
    assert!(
        written < 64 * 1024 * 1024,
        "the sidecar read a 64 MiB SETTINGS flood without pushing back"
    );

    // Meanwhile, and after, another client is served.
    let a = d
        .client
        .get("http://payments.leash.test/whoami", &[])
        .await
        .unwrap();
    assert_eq!(a.status, 200);

    // Rapid reset: streams opened and reset at once, as fast as the client
    // can. hyper's h2 answers with GOAWAY (ENHANCE_YOUR_CALM) once resets
    // of streams not yet accepted pile up; either way nothing is left
    // running and others are served.
    let mut send = h2_client(proxy).await;
    let mut opened = 0u32;
    let mut refused_by_server = false;
    for _ in 0..20_000 {
        let req = http::Request::get("http://payments.leash.test/whoami")
            .body(())
            .unwrap();
        let ready = match tokio::time::timeout(Duration::from_secs(5), send.ready()).await {
            Ok(Ok(ready)) => ready,
            _ => {
                refused_by_server = true;
                break;
            }
        };
        send = ready;
        match send.send_request(req, true) {
            Ok((_resp, mut stream)) => {
                stream.send_reset(h2::Reason::CANCEL);
                opened += 1;
            }
            Err(_) => {
                refused_by_server = true;
                break;
            }
        }
    }
    assert!(opened > 0);
    eprintln!(
        "settings flood written: {written} bytes; rapid reset: {opened} streams, refused by server: {refused_by_server}"
    );
    let a = d
        .client
        .get("http://payments.leash.test/whoami", &[])
        .await
        .unwrap();
    assert_eq!(a.status, 200, "served after the flood");
    // Every reset request was let go: a fresh HTTP/2 client gets its
    // answer too (no stream slot or in-flight place is left taken).
    let mut fresh = h2_client(proxy).await;
    fresh = fresh.ready().await.unwrap();
    let (resp, _) = fresh
        .send_request(
            http::Request::get("http://payments.leash.test/whoami")
                .body(())
                .unwrap(),
            true,
        )
        .unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(10), resp)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(resp.status(), 200);
}
