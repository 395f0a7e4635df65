//! Containment against a hostile workload (invariant I7): once a sidecar has
//! acknowledged a revocation, nothing it covers reaches an upstream again,
//! whatever the workload holds back, and however the credential cache moved
//! on; what the sidecar cannot enforce ends the session instead of being
//! enforced less; a silent control plane is left; snapshots of any size load.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test stops at the first failed step, with its message"
)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, StreamBody, combinators::BoxBody};
use hyper::body::Frame;
use leash_tests::*;
use serde_json::json;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

const SVID_TTL: Duration = Duration::from_secs(600);

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// What the recording upstream saw of one request.
#[derive(Debug, Clone)]
struct Seen {
    path: String,
    /// The `jti` of the bearer JWT it carried.
    jti: String,
    head_ms: i64,
    /// When its body was complete (never, if it was cut).
    complete_ms: Option<i64>,
}

struct Recorder {
    seen: Mutex<Vec<Seen>>,
    /// Streams whose receiver is still there.
    streams_open: AtomicUsize,
    /// While true, TLS handshakes on the TLS listener wait (a slow upstream).
    hold_handshakes: tokio::sync::watch::Sender<bool>,
    /// TCP connections accepted on the TLS listener.
    tls_accepted: AtomicUsize,
}

fn jti(authorization: Option<&http::HeaderValue>) -> String {
    let token = authorization
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default();
    let claims = token.split('.').nth(1).unwrap_or_default();
    let claims = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(claims)
        .unwrap_or_default();
    serde_json::from_slice::<serde_json::Value>(&claims)
        .ok()
        .and_then(|c| c["jti"].as_str().map(str::to_owned))
        .unwrap_or_default()
}

/// An upstream that records each request's head and completion, on a plain
/// listener and on a TLS one (certificate from `upstream_pki`) whose
/// handshakes can be held; `/stream` answers with a body that sends a chunk
/// every 20 ms for as long as someone reads it.
async fn recording_upstream(
    tls: tokio_rustls::TlsAcceptor,
) -> (SocketAddr, SocketAddr, Arc<Recorder>) {
    let plain = listener().await;
    let secure = listener().await;
    let addrs = (plain.local_addr().unwrap(), secure.local_addr().unwrap());
    let rec = Arc::new(Recorder {
        seen: Mutex::default(),
        streams_open: AtomicUsize::new(0),
        hold_handshakes: tokio::sync::watch::channel(false).0,
        tls_accepted: AtomicUsize::new(0),
    });
    let r = rec.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = plain.accept().await {
            tokio::spawn(serve_recorded(hyper_util::rt::TokioIo::new(tcp), r.clone()));
        }
    });
    let r = rec.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = secure.accept().await {
            r.tls_accepted.fetch_add(1, Ordering::SeqCst);
            let (r, tls) = (r.clone(), tls.clone());
            tokio::spawn(async move {
                let mut hold = r.hold_handshakes.subscribe();
                let _ = hold.wait_for(|h| !*h).await;
                if let Ok(stream) = tls.accept(tcp).await {
                    serve_recorded(hyper_util::rt::TokioIo::new(stream), r).await;
                }
            });
        }
    });
    (addrs.0, addrs.1, rec)
}

async fn serve_recorded<I>(io: I, rec: Arc<Recorder>)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let svc = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
        let rec = rec.clone();
        async move {
            let path = req.uri().path().to_owned();
            let index = {
                let mut seen = rec.seen.lock().unwrap();
                seen.push(Seen {
                    path: path.clone(),
                    jti: jti(req.headers().get(http::header::AUTHORIZATION)),
                    head_ms: now_ms(),
                    complete_ms: None,
                });
                seen.len() - 1
            };
            let complete = req.into_body().collect().await.is_ok();
            if complete {
                rec.seen.lock().unwrap()[index].complete_ms = Some(now_ms());
            }
            let body: BoxBody<Bytes, Infallible> = if path == "/stream" {
                let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Infallible>>(1);
                let rec = rec.clone();
                tokio::spawn(async move {
                    rec.streams_open.fetch_add(1, Ordering::SeqCst);
                    while tx
                        .send(Ok(Frame::data(Bytes::from_static(b"tick\n"))))
                        .await
                        .is_ok()
                    {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    rec.streams_open.fetch_sub(1, Ordering::SeqCst);
                });
                BoxBody::new(StreamBody::new(
                    tokio_stream::wrappers::ReceiverStream::new(rx),
                ))
            } else {
                BoxBody::new(Full::new(Bytes::from_static(b"{\"ok\":true}")))
            };
            Ok::<_, Infallible>(http::Response::new(body))
        }
    });
    let _ = hyper::server::conn::http1::Builder::new()
        .serve_connection(io, svc)
        .await;
}

/// `payments` forwards bodies as they stream; `uploads` reads the first
/// bytes of each body to scan them before anything is sent; `slowtls` is
/// the TLS listener, whose handshakes can be held.
fn policy(up: SocketAddr, tls: SocketAddr, ca: &std::path::Path, ttl: &str) -> String {
    let ca = ca.display();
    format!(
        r#"version: 1
upstreams:
  - name: slowtls
    hosts: [slowtls.leash.test]
    target: https://{tls}
    tls: {{ ca_file: {ca}, ca_only: true, server_name: payments.internal }}
    credential: {{ kind: jwt, ttl: {ttl}, audience: payments }}
  - name: payments
    hosts: [payments.leash.test]
    target: http://{up}
    credential: {{ kind: jwt, ttl: {ttl} }}
  - name: uploads
    hosts: [uploads.leash.test]
    target: http://{up}
    credential: {{ kind: jwt, ttl: {ttl}, audience: payments }}
    scan_body_bytes: 64
grants:
  - workload: {APP_ID}
    upstreams: [payments, uploads, slowtls]
"#
    )
}

/// Identity, the recording upstream and a control plane.
struct Base {
    dir: tempfile::TempDir,
    ids: Identities,
    policy: std::path::PathBuf,
    cp: leash_control_plane::app::ControlPlane,
    rec: Arc<Recorder>,
}

impl Base {
    async fn start(ttl: &str) -> Self {
        init();
        let dir = short_tempdir();
        let ids = Identities::start(dir.path(), SVID_TTL, &[CP_ID, APP_ID]);
        let (up, tls, rec) = recording_upstream(upstream_pki(dir.path())).await;
        let ca = dir.path().join("upstream-ca.pem");
        let policy = write_policy(dir.path(), &policy(up, tls, &ca, ttl));
        let cp = start_control_plane(&ids, CP_ID, &policy, &dir.path().join("data")).await;
        Self {
            dir,
            ids,
            policy,
            cp,
            rec,
        }
    }
}

/// The base and a sidecar, ready.
struct Setup {
    dir: tempfile::TempDir,
    cp: leash_control_plane::app::ControlPlane,
    sidecar: leash_proxy::Sidecar,
    rec: Arc<Recorder>,
    ids: Identities,
}

impl Setup {
    async fn start(ttl: &str) -> Self {
        let Base {
            dir, ids, cp, rec, ..
        } = Base::start(ttl).await;
        let sidecar = start_sidecar(sidecar_config(ids.endpoint(APP_ID), cp.sidecar_addr)).await;
        wait_ready(sidecar.admin_addr).await;
        Self {
            dir,
            cp,
            sidecar,
            rec,
            ids,
        }
    }

    fn admin(&self) -> Admin {
        Admin::bootstrap(self.cp.admin_addr, &self.dir.path().join("data"))
    }

    /// When the sidecar's acknowledgement of `id` reached the control plane.
    async fn acked_at(&self, id: &str) -> i64 {
        let p = self.admin().wait_acknowledged(id, 1).await;
        p["acknowledged"][0]["acked_at_ms"]
            .as_i64()
            .unwrap_or_else(|| panic!("no ack time in {p}"))
    }

    /// Asserts that nothing carrying one of `covered` (jtis; all if None)
    /// arrived at, or completed at, the upstream after `acked_ms`.
    fn assert_nothing_after(&self, acked_ms: i64, covered: Option<&str>) {
        let seen = self.rec.seen.lock().unwrap();
        let late: Vec<_> = seen
            .iter()
            .filter(|s| covered.is_none_or(|j| s.jti == j))
            .filter(|s| s.head_ms > acked_ms || s.complete_ms.is_some_and(|c| c > acked_ms))
            .collect();
        assert!(
            late.is_empty(),
            "{} requests reached the upstream after the acknowledgement at {acked_ms}: {:?}",
            late.len(),
            &late[..late.len().min(5)]
        );
    }

    async fn after_revocation_violations(&self) -> u64 {
        // Usage reaches the control plane within a report interval or two.
        eventually(Duration::from_secs(10), "usage reported", || async {
            (self.sidecar.link.usage.pending() == 0).then_some(())
        })
        .await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let a = self.admin().get("/v1/usage/after-revocation").await;
        assert_eq!(a.status, 200);
        let v = a.json();
        if v["violations"].as_u64() != Some(0) {
            eprintln!("after-revocation: {v:#}");
        }
        v["violations"].as_u64().unwrap()
    }
}

/// Writes the head of a request whose body (`len` bytes) is held back.
async fn held(proxy: SocketAddr, host: &str, path: &str, len: usize) -> TcpStream {
    let mut s = TcpStream::connect(proxy).await.unwrap();
    let head = format!(
        "POST http://{host}{path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: {len}\r\n\r\n"
    );
    s.write_all(head.as_bytes()).await.unwrap();
    s
}

/// Sends the held body and reads whatever comes back until close or 5 s.
async fn release(mut s: TcpStream, body: &[u8]) -> String {
    let _ = s.write_all(body).await;
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_millis(500), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => {
                out.extend_from_slice(&buf[..n]);
                if out.windows(4).any(|w| w == b"\r\n\r\n")
                    && String::from_utf8_lossy(&out).contains('}')
                {
                    break;
                }
            }
            Err(_) => {}
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Opens `/stream` through the sidecar; the task returns how the stream
/// ended (`Err` when cut) once it ends.
async fn open_stream(proxy: SocketAddr) -> tokio::task::JoinHandle<Result<usize, String>> {
    let stream = TcpStream::connect(proxy).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = http::Request::get("http://payments.leash.test/stream")
        .header("host", "payments.leash.test")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let first = body.frame().await;
    assert!(matches!(first, Some(Ok(_))), "the stream flows");
    tokio::spawn(async move {
        let mut frames = 1;
        loop {
            match body.frame().await {
                None => return Ok(frames),
                Some(Ok(_)) => frames += 1,
                Some(Err(e)) => return Err(e.to_string()),
            }
        }
    })
}

/// The adversarial workload: 1,000 requests in flight (bodies held back on
/// a scanned route and on a streamed one, requests stuck in the upstream's
/// TLS handshake, open response streams), a revocation of the workload in
/// the middle, then every held body sent and every handshake completed after
/// the acknowledgement. Nothing reaches the upstream after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_reaches_the_upstream_after_the_acknowledgement() {
    let s = Setup::start("5m").await;
    let proxy = s.sidecar.egress_addr;
    let client = ProxyClient::new(proxy);
    for host in ["payments", "uploads"] {
        let a = client
            .get(&format!("http://{host}.leash.test/warm"), &[])
            .await
            .unwrap();
        assert_eq!(a.status, 200, "{}", String::from_utf8_lossy(&a.body));
    }

    let mut streams = Vec::new();
    for _ in 0..100 {
        streams.push(open_stream(proxy).await);
    }
    // Requests stuck in the upstream's TLS handshake.
    s.rec.hold_handshakes.send_replace(true);
    let mut slow = Vec::new();
    for i in 0..100 {
        let client = ProxyClient::new(proxy);
        slow.push(tokio::spawn(async move {
            client
                .get(&format!("http://slowtls.leash.test/slow-{i}"), &[])
                .await
        }));
    }
    let mut scanned = Vec::new();
    let mut streamed = Vec::new();
    for i in 0..400 {
        scanned.push(held(proxy, "uploads.leash.test", &format!("/held-scan-{i}"), 2).await);
        streamed.push(
            held(
                proxy,
                "payments.leash.test",
                &format!("/held-stream-{i}"),
                2,
            )
            .await,
        );
    }
    // The streamed route forwards heads at once: wait for all of them. The
    // scanned route holds its requests in the sidecar, waiting for bodies.
    eventually(
        Duration::from_secs(20),
        "streamed heads forwarded",
        || async {
            let n = s
                .rec
                .seen
                .lock()
                .unwrap()
                .iter()
                .filter(|x| x.path.starts_with("/held-stream-"))
                .count();
            (n == 400).then_some(())
        },
    )
    .await;
    eventually(Duration::from_secs(20), "handshakes started", || async {
        (s.rec.tls_accepted.load(Ordering::SeqCst) >= 100).then_some(())
    })
    .await;

    let r = s
        .admin()
        .revoke(json!({"kind": "workload", "workload": APP_ID, "reason": "contained"}))
        .await;
    let acked = s.acked_at(r["id"].as_str().unwrap()).await;

    // The handshakes complete after the acknowledgement: refused at commit.
    s.rec.hold_handshakes.send_replace(false);
    for r in slow {
        let a = r.await.unwrap().unwrap();
        assert_eq!(a.status, 403, "{}", String::from_utf8_lossy(&a.body));
        assert_eq!(a.json()["error"], "revoked_workload");
    }
    // Every stream is cut, and the upstream stops being read.
    for st in streams {
        let ended = tokio::time::timeout(Duration::from_secs(5), st)
            .await
            .expect("stream cut after the acknowledgement")
            .unwrap();
        assert!(
            ended.is_err(),
            "a stream ended cleanly instead of being cut"
        );
    }
    // The bodies arrive after the acknowledgement: refused, never forwarded.
    let mut refused = 0;
    for c in scanned.into_iter().chain(streamed) {
        let answer = release(c, b"ok").await;
        if answer.starts_with("HTTP/1.1 403") && answer.contains("revoked_workload") {
            refused += 1;
        } else {
            assert!(
                !answer.starts_with("HTTP/1.1 200"),
                "a held request was answered by the upstream: {answer}"
            );
        }
    }
    assert_eq!(refused, 800, "every held request refused as revoked");
    tokio::time::sleep(Duration::from_millis(300)).await;
    s.assert_nothing_after(acked, None);
    let scanned_seen = s
        .rec
        .seen
        .lock()
        .unwrap()
        .iter()
        .filter(|x| x.path.starts_with("/held-scan-"))
        .count();
    assert_eq!(
        scanned_seen, 0,
        "a held scanned request reached the upstream"
    );
    let slow_seen = s
        .rec
        .seen
        .lock()
        .unwrap()
        .iter()
        .filter(|x| x.path.starts_with("/slow-"))
        .count();
    assert_eq!(
        slow_seen, 0,
        "a request stuck in a TLS handshake reached the upstream"
    );
    assert_eq!(s.after_revocation_violations().await, 0);
    s.sidecar.shutdown(Duration::from_secs(2)).await;
}

/// A stream opened with a credential that the cache has since replaced
/// (refreshed at 75 % of its life, the old one evicted) is still cut when
/// that credential is revoked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replaced_credential_is_still_cut() {
    let s = Setup::start("4s").await;
    let proxy = s.sidecar.egress_addr;
    let stream = open_stream(proxy).await;
    let old = s.rec.seen.lock().unwrap()[0].jti.clone();
    assert!(!old.is_empty());
    // Refreshed at 3 s: the route's credential is a new one.
    let client = ProxyClient::new(proxy);
    eventually(Duration::from_secs(10), "credential refreshed", || async {
        let a = client.get("http://payments.leash.test/x", &[]).await.ok()?;
        assert_eq!(a.status, 200);
        let seen = s.rec.seen.lock().unwrap();
        (seen.last()?.jti != old).then_some(())
    })
    .await;
    assert!(!stream.is_finished(), "the old stream still flows");

    let r = s
        .admin()
        .revoke(json!({"kind": "credential", "credential_id": old, "reason": "leaked jwt"}))
        .await;
    let acked = s.acked_at(r["id"].as_str().unwrap()).await;
    let ended = tokio::time::timeout(Duration::from_secs(5), stream)
        .await
        .expect("the replaced credential's stream is cut")
        .unwrap();
    assert!(ended.is_err());
    // The fresh credential is unaffected.
    let a = client
        .get("http://payments.leash.test/y", &[])
        .await
        .unwrap();
    assert_eq!(a.status, 200);
    s.assert_nothing_after(acked, Some(&old));
    s.sidecar.shutdown(Duration::from_secs(2)).await;
}

/// A TCP relay that forwards until told to black-hole: then it keeps every
/// connection open and passes nothing, as a stuck peer or middlebox would.
async fn relay(target: SocketAddr) -> (SocketAddr, Arc<AtomicBool>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let hole = Arc::new(AtomicBool::new(false));
    let h = hole.clone();
    tokio::spawn(async move {
        while let Ok((client, _)) = l.accept().await {
            let Ok(server) = TcpStream::connect(target).await else {
                continue;
            };
            let (cr, cw) = client.into_split();
            let (sr, sw) = server.into_split();
            for (mut from, mut to) in [(cr, sw), (sr, cw)].map(|(a, b)| {
                (
                    Box::new(a) as Box<dyn tokio::io::AsyncRead + Send + Unpin>,
                    b,
                )
            }) {
                let hole = h.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 16 * 1024];
                    loop {
                        let n = match from.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        if hole.load(Ordering::SeqCst) {
                            // Swallow everything, close nothing.
                            std::future::pending::<()>().await;
                        }
                        if to.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                });
            }
        }
    });
    (addr, hole)
}

/// A control plane that goes silent behind an open connection is left for
/// the next address within two heartbeat intervals, and the session
/// there counts as established even though nothing was missed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_control_plane_is_left_for_the_next_address() {
    let Base { dir, ids, cp, .. } = Base::start("5m").await;
    let (relay_addr, hole) = relay(cp.sidecar_addr).await;
    let mut config = sidecar_config(ids.endpoint(APP_ID), cp.sidecar_addr);
    config.control.control_planes = vec![relay_addr.to_string(), cp.sidecar_addr.to_string()];
    let sidecar = start_sidecar(config).await;
    wait_ready(sidecar.admin_addr).await;
    let admin = Admin::bootstrap(cp.admin_addr, &dir.path().join("data"));
    let sidecars = admin.get("/v1/sidecars").await.json();
    assert_eq!(sidecars["sidecars"].as_array().unwrap().len(), 1);

    // A heartbeat or two has told the sidecar how often they come.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let established = || sidecar.link.metrics.sessions.load(Ordering::SeqCst);
    assert_eq!(established(), 1);
    hole.store(true, Ordering::SeqCst);
    // Heartbeats every 500 ms: gone from the relay within 1 s, and a
    // second session established directly (well within max_staleness,
    // 30 s), though nothing was missed: it resumes from the same sequence,
    // gets no event, and counts as established on the first heartbeat.
    eventually(
        Duration::from_secs(10),
        "second session established",
        || async { (established() == 2).then_some(()) },
    )
    .await;
    assert!(sidecar.link.connected());
    assert!(sidecar.link.stale().is_none());
    // And it enforces what comes next there. (The black-holed session stays
    // listed as pending until the control plane's HTTP/2 keepalive ends it.)
    let r = admin
        .revoke(json!({"kind": "upstream", "upstream": "uploads", "reason": "r"}))
        .await;
    let id = r["id"].as_str().unwrap();
    eventually(Duration::from_secs(10), "acknowledged directly", || async {
        let p = admin.get(&format!("/v1/revocations/{id}")).await.json();
        (p["propagation"]["acknowledged"].as_array()?.len() == 1).then_some(())
    })
    .await;
    hole.store(false, Ordering::SeqCst);
    sidecar.shutdown(Duration::from_secs(2)).await;
}

/// 200,000 active revocations (written straight into the store, as years
/// of credential and leaked-value revocations would leave them): a new
/// sidecar loads the snapshot, in parts, and enforces all of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_of_200k_revocations_loads() {
    if on_postgres() {
        eprintln!(
            "skipped on PostgreSQL: writes 200,000 revocations straight into the SQLite file"
        );
        return;
    }
    let Base {
        dir,
        ids,
        policy,
        cp,
        ..
    } = Base::start("5m").await;
    let data = dir.path().join("data");
    cp.shutdown(Duration::from_secs(2)).await;
    let db = sqlx::SqlitePool::connect(&format!("sqlite://{}", data.join("leash.db").display()))
        .await
        .unwrap();
    let mut tx = db.begin().await.unwrap();
    // Parents first: the events' foreign key is checked by the parent's
    // primary key (the other way round, each check scans the events).
    sqlx::query(
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 200000) \
         INSERT INTO revocations (id, kind, credential_id, reason, revoked_by, revoked_at_ms, revoke_seq) \
         SELECT 'rev-bulk-' || i, 'credential', 'cred-bulk-' || i, 'rotated out of a leaked CI variable', 'responder@example', 0, i FROM n",
    )
    .execute(&mut *tx)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO revocation_events (seq, revocation_id, restored, at_ms) \
         SELECT revoke_seq, id, 0, 0 FROM revocations WHERE id LIKE 'rev-bulk-%'",
    )
    .execute(&mut *tx)
    .await
    .unwrap();
    tx.commit().await.unwrap();
    db.close().await;

    let cp = start_control_plane(&ids, CP_ID, &policy, &data).await;
    let started = Instant::now();
    let sidecar = start_sidecar(sidecar_config(ids.endpoint(APP_ID), cp.sidecar_addr)).await;
    wait_ready(sidecar.admin_addr).await;
    // Printed for BENCHMARKS.md; not asserted (timings are for benches).
    eprintln!(
        "200k-revocation snapshot: sidecar ready in {:?}",
        started.elapsed()
    );
    let set = sidecar.link.revocations.set.load();
    assert_eq!(set.len(), 200_000);
    assert!(set.credential_revoked("cred-bulk-1"));
    assert!(set.credential_revoked("cred-bulk-200000"));
    let a = ProxyClient::new(sidecar.egress_addr)
        .get("http://payments.leash.test/x", &[])
        .await
        .unwrap();
    assert_eq!(a.status, 200);
    sidecar.shutdown(Duration::from_secs(2)).await;
}

/// The enforced set stays bounded: a credential revocation is dropped from
/// it (and from every new sidecar's snapshot) once the credential expired
/// everywhere, past a margin; never before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocations_of_expired_credentials_leave_the_enforced_set() {
    let s = Setup::start("5m").await;
    let client = ProxyClient::new(s.sidecar.egress_addr);
    assert_eq!(
        client
            .get("http://payments.leash.test/a", &[])
            .await
            .unwrap()
            .status,
        200
    );
    let old = s.rec.seen.lock().unwrap()[0].jti.clone();
    let r = s
        .admin()
        .revoke(json!({"kind": "credential", "credential_id": old, "reason": "r"}))
        .await;
    s.acked_at(r["id"].as_str().unwrap()).await;
    let log = &s.cp.state.revocations;
    assert_eq!(
        log.prune_expired(now_ms()).await.unwrap(),
        0,
        "not expired yet"
    );
    assert_eq!(
        log.prune_expired(now_ms() + 5 * 60_000 + 1_000)
            .await
            .unwrap(),
        0,
        "expired, but within the margin"
    );
    let later = now_ms()
        + 5 * 60_000
        + leash_control_plane::revocations::EXPIRED_MARGIN.as_millis() as i64
        + 1_000;
    assert_eq!(log.prune_expired(later).await.unwrap(), 1);
    assert_eq!(log.snapshot().set.len(), 0);
    // A new sidecar's snapshot no longer carries it.
    let fresh = start_sidecar(sidecar_config(s.ids.endpoint(APP_ID), s.cp.sidecar_addr)).await;
    wait_ready(fresh.admin_addr).await;
    assert_eq!(fresh.link.revocations.set.load().len(), 0);
    // The record is kept.
    let kept = s
        .admin()
        .get(&format!("/v1/revocations/{}", r["id"].as_str().unwrap()))
        .await;
    assert_eq!(kept.status, 200);
    fresh.shutdown(Duration::from_secs(2)).await;
    s.sidecar.shutdown(Duration::from_secs(2)).await;
}
