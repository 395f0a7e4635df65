//! Limits and timeouts: each has a default (see `Limits::default` and
//! `leash-proxy --help`) and a test here with a small value that proves it
//! holds, and that the answer is a clear status with a reason, not a hang.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test stops at the first failed step, with its message"
)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use http_body_util::BodyExt as _;
use leash_proxy::Sidecar;
use leash_tests::*;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

const SVID_TTL: Duration = Duration::from_secs(600);

/// An upstream that waits `delay` before answering `200 slow`, or, with
/// `reset`, resets every connection as soon as it is accepted.
async fn odd_upstream(delay: Duration, reset: bool) -> SocketAddr {
    let how = if reset {
        Canned::Reset
    } else {
        Canned::Answer {
            delay,
            keep_alive: true,
        }
    };
    canned_upstream(how, || {
        http::Response::new(http_body_util::Full::new(bytes::Bytes::from_static(
            b"slow\n",
        )))
    })
    .await
    .0
}

/// An upstream that answers `200 early` at once and reads the request body
/// afterwards; returns its address and the body bytes it has read.
async fn early_upstream() -> (SocketAddr, Arc<AtomicUsize>) {
    let l = listener().await;
    let addr = l.local_addr().unwrap();
    let read = Arc::new(AtomicUsize::new(0));
    let count = read.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = l.accept().await {
            let count = count.clone();
            let svc =
                hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let count = count.clone();
                    tokio::spawn(async move {
                        let mut body = req.into_body();
                        while let Some(Ok(frame)) = body.frame().await {
                            if let Some(data) = frame.data_ref() {
                                count.fetch_add(data.len(), Ordering::SeqCst);
                            }
                        }
                    });
                    let early = http::Response::new(http_body_util::Full::new(
                        bytes::Bytes::from_static(b"early\n"),
                    ));
                    async { Ok::<_, std::convert::Infallible>(early) }
                });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc),
            );
        }
    });
    (addr, read)
}

/// payments (the example upstream), slow (answers after 2 s) and flaky
/// (resets every connection), all granted.
async fn deployment() -> Deployment {
    deployment_and_early().await.0
}

/// The same, with early (answers before reading the body: `early_upstream`).
async fn deployment_and_early() -> (Deployment, Arc<AtomicUsize>) {
    let slow = odd_upstream(Duration::from_secs(2), false).await;
    let flaky = odd_upstream(Duration::ZERO, true).await;
    let (early, early_read) = early_upstream().await;
    let d = Deployment::start_with(
        move |up| {
            format!(
                r#"version: 1
upstreams:
  - name: payments
    hosts: [payments.leash.test]
    target: http://{up}
    credential: {{ kind: jwt, ttl: 10m }}
  - name: slow
    hosts: [slow.leash.test]
    target: http://{slow}
    credential: {{ kind: jwt, ttl: 10m }}
  - name: flaky
    hosts: [flaky.leash.test]
    target: http://{flaky}
    credential: {{ kind: jwt, ttl: 10m }}
  - name: early
    hosts: [early.leash.test]
    target: http://{early}
    credential: {{ kind: jwt, ttl: 10m }}
grants:
  - workload: {APP_ID}
    upstreams: [payments, slow, flaky, early]
"#
            )
        },
        SVID_TTL,
        None,
    )
    .await;
    (d, early_read)
}

async fn sidecar_with(
    d: &Deployment,
    tune: impl FnOnce(&mut leash_proxy::SidecarConfig),
) -> Sidecar {
    let mut config = sidecar_config(d.ids.endpoint(APP_ID), d.cp.sidecar_addr);
    tune(&mut config);
    let s = start_sidecar(config).await;
    wait_ready(s.admin_addr).await;
    s
}

type Sender = hyper::client::conn::http1::SendRequest<http_body_util::Empty<bytes::Bytes>>;

/// One kept-alive client connection to `addr`, and the task driving it
/// (finished once the connection is closed).
async fn kept_alive(addr: SocketAddr) -> (Sender, tokio::task::JoinHandle<hyper::Result<()>>) {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    (sender, tokio::spawn(conn))
}

/// `GET http://{host}/whoami` on that connection: status and time taken.
async fn get_on(sender: &mut Sender, host: &str) -> (u16, Duration) {
    let req = http::Request::get(format!("http://{host}/whoami"))
        .header(http::header::HOST, host)
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let started = Instant::now();
    sender.ready().await.expect("connection still open");
    let resp = sender.send_request(req).await.expect("answered");
    let status = resp.status().as_u16();
    http_body_util::BodyExt::collect(resp.into_body())
        .await
        .unwrap();
    (status, started.elapsed())
}

/// Reads until the peer closes; returns what came and how long it took.
async fn read_until_closed(s: &mut tokio::net::TcpStream, within: Duration) -> (String, Duration) {
    let started = Instant::now();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(within, s.read_to_end(&mut out)).await;
    (
        String::from_utf8_lossy(&out).into_owned(),
        started.elapsed(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_count_and_request_line_limits() {
    let d = deployment().await;
    let proxy = d.sidecar.egress_addr;
    let mut many =
        String::from("GET http://payments.leash.test/ HTTP/1.1\r\nHost: payments.leash.test\r\n");
    for i in 0..101 {
        many.push_str(&format!("X-H{i}: v\r\n"));
    }
    many.push_str("Connection: close\r\n\r\n");
    let a = raw(proxy, many.as_bytes()).await;
    assert!(a.starts_with("HTTP/1.1 431"), "101 headers: {a}");
    // The request line counts toward the header block limit (64 KiB).
    let long = format!(
        "GET http://payments.leash.test/{} HTTP/1.1\r\nHost: payments.leash.test\r\nConnection: close\r\n\r\n",
        "a".repeat(70 * 1024)
    );
    let a = raw(proxy, long.as_bytes()).await;
    assert!(
        a.starts_with("HTTP/1.1 431") || a.starts_with("HTTP/1.1 414"),
        "70 KiB request line: {}",
        a.lines().next().unwrap_or("")
    );
    // Under both limits: fine.
    let ok = d
        .client
        .get("http://payments.leash.test/whoami", &[("x-a", "1")])
        .await
        .unwrap();
    assert_eq!(ok.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_headers_and_idle_connections_are_closed() {
    let d = deployment().await;
    let s = sidecar_with(&d, |c| {
        c.limits.header_read_timeout = Duration::from_millis(800)
    })
    .await;

    // Slowloris: half a header block, then nothing.
    let mut slow = tokio::net::TcpStream::connect(s.egress_addr).await.unwrap();
    slow.write_all(b"GET http://payments.leash.test/ HTTP/1.1\r\nHost: pay")
        .await
        .unwrap();
    let (_, took) = read_until_closed(&mut slow, Duration::from_secs(5)).await;
    assert!(
        took >= Duration::from_millis(700) && took < Duration::from_secs(3),
        "closed after the header timeout, took {took:?}"
    );

    // Idle keep-alive: one request, then silence.
    let mut idle = tokio::net::TcpStream::connect(s.egress_addr).await.unwrap();
    idle.write_all(
        b"GET http://payments.leash.test/whoami HTTP/1.1\r\nHost: payments.leash.test\r\n\r\n",
    )
    .await
    .unwrap();
    let (answer, took) = read_until_closed(&mut idle, Duration::from_secs(5)).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        took < Duration::from_secs(3),
        "idle connection closed, took {took:?}"
    );
}

/// The header timeout times only the wait for a header block: a connection
/// that keeps sending requests, or waits on a slow upstream for longer than
/// the timeout, stays open; once idle it is closed after the timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_header_timeout_counts_only_the_wait_for_headers() {
    let d = deployment().await;
    let timeout = Duration::from_millis(800);
    let s = sidecar_with(&d, |c| c.limits.header_read_timeout = timeout).await;
    let (mut sender, connection) = kept_alive(s.egress_addr).await;
    let mut get = async |host: &str| get_on(&mut sender, host).await.0;
    // Requests 300 ms apart for 2.4 s: three times the timeout in all.
    for _ in 0..8 {
        assert_eq!(get("payments.leash.test").await, 200);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // The slow upstream answers after 2 s: serving is not waiting for headers.
    assert_eq!(get("slow.leash.test").await, 200);
    assert_eq!(get("payments.leash.test").await, 200);
    // Idle now: closed after the timeout.
    let idle = Instant::now();
    let closed = tokio::time::timeout(Duration::from_secs(5), connection)
        .await
        .expect("idle connection closed");
    let took = idle.elapsed();
    assert!(closed.is_ok());
    assert!(
        took >= timeout - Duration::from_millis(100) && took < Duration::from_secs(3),
        "idle connection closed after {took:?}"
    );
}

/// Reads from `s` until what has come ends with `end`.
async fn read_through(s: &mut (impl tokio::io::AsyncRead + Unpin), end: &str) -> String {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !got.ends_with(end.as_bytes()) {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .expect("answered in time")
            .unwrap();
        assert!(
            n > 0,
            "closed early, after: {}",
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&got).into_owned()
}

/// A request body still being uploaded after the upstream has answered is
/// not a wait for headers: it arrives in full however much longer than the
/// header timeout it takes, and the connection then carries the next request.
/// Once that one is done with too (its body read, its answer written), the
/// connection is idle and closed after the timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_answered_early_is_not_cut_by_the_header_timeout() {
    let (d, upstream_read) = deployment_and_early().await;
    let timeout = Duration::from_millis(300);
    let s = sidecar_with(&d, |c| c.limits.header_read_timeout = timeout).await;
    const CHUNK: usize = 4096;
    const CHUNKS: usize = 12;
    let post = |len: usize| {
        format!(
            "POST http://early.leash.test/upload HTTP/1.1\r\nHost: early.leash.test\r\nContent-Length: {len}\r\n\r\n"
        )
    };
    let tcp = tokio::net::TcpStream::connect(s.egress_addr).await.unwrap();
    let (mut rd, mut wr) = tcp.into_split();
    wr.write_all(post(CHUNK * CHUNKS).as_bytes()).await.unwrap();
    let answer = read_through(&mut rd, "early\n").await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    // 1.2 s of upload after the answer: four times the header timeout.
    for i in 0..CHUNKS {
        tokio::time::sleep(Duration::from_millis(100)).await;
        wr.write_all(&[b'x'; CHUNK])
            .await
            .unwrap_or_else(|e| panic!("chunk {i}: {e}"));
    }
    // The next request right behind it, with a body of its own.
    wr.write_all(format!("{}hello", post(5)).as_bytes())
        .await
        .unwrap();
    let next = read_through(&mut rd, "early\n").await;
    assert!(next.starts_with("HTTP/1.1 200"), "{next}");
    eventually(Duration::from_secs(3), "both bodies upstream", || {
        let read = upstream_read.load(Ordering::SeqCst);
        async move { (read == CHUNK * CHUNKS + 5).then_some(()) }
    })
    .await;
    // Both requests done with: idle, and closed after the timeout.
    let idle = Instant::now();
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), rd.read_to_end(&mut rest)).await;
    let took = idle.elapsed();
    assert!(closed.is_ok(), "idle connection not closed");
    assert!(rest.is_empty(), "{}", String::from_utf8_lossy(&rest));
    assert!(
        took < Duration::from_secs(3),
        "idle connection closed after {took:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_resetting_upstreams_get_clear_answers() {
    let d = deployment().await;
    let s = sidecar_with(&d, |c| {
        c.upstream_response_timeout = Duration::from_millis(500)
    })
    .await;
    let client = ProxyClient::new(s.egress_addr);
    let started = Instant::now();
    let a = client.get("http://slow.leash.test/", &[]).await.unwrap();
    assert_eq!(a.status, 504);
    assert_eq!(a.json()["error"], "upstream_timeout");
    assert_eq!(a.json()["upstream"], "slow");
    assert!(started.elapsed() < Duration::from_millis(1900));
    let a = client.get("http://flaky.leash.test/", &[]).await.unwrap();
    assert_eq!(a.status, 502);
    assert_eq!(a.json()["error"], "upstream_unreachable");
    assert!(!String::from_utf8_lossy(&a.body).contains("Bearer"));
    // Others are unaffected.
    let a = client
        .get("http://payments.leash.test/whoami", &[])
        .await
        .unwrap();
    assert_eq!(a.status, 200);
}

/// The response timer is one per workload connection, re-armed for each
/// request: on one kept-alive connection every slow request still times out
/// after the limit (not before, not never), and the requests after a
/// timeout, or after an idle spell longer than the limit, are not cut short.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_response_timeout_holds_for_each_request_on_a_kept_alive_connection() {
    let d = deployment().await;
    let limit = Duration::from_millis(500);
    let s = sidecar_with(&d, |c| c.upstream_response_timeout = limit).await;
    let (mut sender, connection) = kept_alive(s.egress_addr).await;
    let mut get = async |host: &str| get_on(&mut sender, host).await;
    for round in 0..2 {
        let (status, _) = get("payments.leash.test").await;
        assert_eq!(status, 200, "round {round}: fast request before");
        let (status, took) = get("slow.leash.test").await;
        assert_eq!(status, 504, "round {round}: slow request");
        assert!(
            took >= limit - Duration::from_millis(50) && took < Duration::from_millis(1900),
            "round {round}: timed out after {took:?}, limit {limit:?}"
        );
        let (status, _) = get("payments.leash.test").await;
        assert_eq!(status, 200, "round {round}: fast request after a timeout");
        // Idle past the deadline armed by the last request.
        tokio::time::sleep(limit + Duration::from_millis(200)).await;
    }
    assert!(!connection.is_finished(), "one connection throughout");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_flight_requests_past_the_limit_are_shed() {
    let d = deployment().await;
    let s = sidecar_with(&d, |c| c.limits.max_in_flight = 1).await;
    let client = std::sync::Arc::new(ProxyClient::new(s.egress_addr));
    let c = client.clone();
    let first = tokio::spawn(async move { c.get("http://slow.leash.test/", &[]).await.unwrap() });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    let shed = client
        .get("http://payments.leash.test/whoami", &[])
        .await
        .unwrap();
    assert_eq!(shed.status, 503);
    assert_eq!(shed.json()["error"], "overloaded");
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "shed at once, not queued"
    );
    assert_eq!(first.await.unwrap().status, 200);
    let a = client
        .get("http://payments.leash.test/whoami", &[])
        .await
        .unwrap();
    assert_eq!(a.status, 200, "room again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_limit_get_a_503_and_are_closed() {
    let d = deployment().await;
    let s = sidecar_with(&d, |c| c.limits.max_connections = 2).await;
    let held1 = tokio::net::TcpStream::connect(s.egress_addr).await.unwrap();
    let held2 = tokio::net::TcpStream::connect(s.egress_addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut third = tokio::net::TcpStream::connect(s.egress_addr).await.unwrap();
    let (answer, took) = read_until_closed(&mut third, Duration::from_secs(3)).await;
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.contains("\"overloaded\""), "{answer}");
    assert!(took < Duration::from_secs(1));
    drop((held1, held2));
    let client = ProxyClient::new(s.egress_addr);
    let a = eventually(Duration::from_secs(5), "a slot frees up", || {
        let client = &client;
        async move {
            let a = client
                .get("http://payments.leash.test/whoami", &[])
                .await
                .ok()?;
            (a.status == 200).then_some(a)
        }
    })
    .await;
    assert_eq!(a.status, 200);
}

/// Connections to one upstream are capped (`--upstream-max-connections`):
/// requests beyond the cap wait for a connection to come back instead of
/// opening more, and all of them are answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_to_one_upstream_are_capped_and_requests_wait() {
    let (busy, accepted) = canned_upstream(
        Canned::Answer {
            delay: Duration::from_millis(200),
            keep_alive: true,
        },
        || {
            http::Response::new(http_body_util::Full::new(bytes::Bytes::from_static(
                b"ok\n",
            )))
        },
    )
    .await;
    let d = Deployment::start_with(
        move |_| {
            format!(
                r#"version: 1
upstreams:
  - name: busy
    hosts: [busy.leash.test]
    target: http://{busy}
    credential: {{ kind: jwt, ttl: 10m }}
grants:
  - workload: {APP_ID}
    upstreams: [busy]
"#
            )
        },
        SVID_TTL,
        None,
    )
    .await;
    let s = sidecar_with(&d, |c| c.control.upstream.max_connections = 2).await;
    let client = Arc::new(ProxyClient::new(s.egress_addr));
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let c = client.clone();
        tasks.push(tokio::spawn(async move {
            c.get("http://busy.leash.test/", &[]).await.unwrap().status
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200);
    }
    assert!(
        accepted.load(std::sync::atomic::Ordering::SeqCst) <= 2,
        "{} connections opened",
        accepted.load(std::sync::atomic::Ordering::SeqCst)
    );
}
