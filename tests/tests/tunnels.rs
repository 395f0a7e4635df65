//! `CONNECT` through the sidecar, as clients calling `https://` with
//! `HTTPS_PROXY` send it: curl, Python `requests` and `httpx` reach an
//! intercepted upstream and get the credential injected; a client that
//! trusts only the upstream's own CA (pinned) reaches a passthrough
//! upstream with nothing injected; and every way around policy is refused
//! before anything reaches an upstream.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test stops at the first failed step, with its message"
)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use leash_tests::*;
use rustls::pki_types::pem::PemObject as _;
use serde_json::json;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

const SVID_TTL: Duration = Duration::from_secs(600);

/// `payments` intercepted (its target speaks TLS with the test PKI's
/// certificate), `internal` passed through (called as `payments.internal`,
/// the name in the upstream's certificate), `plain` neither, `ledger`
/// intercepted but not granted.
fn policy(up: SocketAddr, upstream_ca: &Path) -> String {
    let ca = upstream_ca.display();
    let port = up.port();
    format!(
        r#"version: 1
upstreams:
  - name: payments
    hosts: [payments.leash.test]
    target: https://127.0.0.1:{port}
    tls: {{ ca_file: {ca}, ca_only: true, server_name: payments.internal }}
    intercept: true
  - name: internal
    hosts: [payments.internal]
    target: https://127.0.0.1:{port}
    passthrough: true
  - name: plain
    hosts: [plain.leash.test]
    target: https://127.0.0.1:{port}
    tls: {{ ca_file: {ca}, ca_only: true, server_name: payments.internal }}
    credential: {{ kind: jwt, ttl: 5m, audience: payments }}
  - name: ledger
    hosts: [ledger.leash.test]
    target: https://127.0.0.1:{port}
    tls: {{ ca_file: {ca}, ca_only: true, server_name: payments.internal }}
    intercept: true
grants:
  - workload: {APP_ID}
    upstreams: [payments, internal, plain]
"#
    )
}

struct Tunnels {
    d: Deployment,
    /// The sidecar's interception CA, as served at its `/ca.pem`.
    ca: PathBuf,
    upstream_ca: PathBuf,
    _pki: tempfile::TempDir,
}

async fn start() -> Tunnels {
    init();
    let pki = short_tempdir();
    let acceptor = upstream_pki(pki.path());
    let upstream_ca = pki.path().join("upstream-ca.pem");
    let for_policy = upstream_ca.clone();
    let d =
        Deployment::start_with(move |up| policy(up, &for_policy), SVID_TTL, Some(acceptor)).await;
    let pem = http_get(&format!("http://{}/ca.pem", d.sidecar.admin_addr))
        .await
        .unwrap();
    assert_eq!(pem.status, 200);
    assert_eq!(pem.headers["content-type"], "application/x-pem-file");
    let ca = d.dir.path().join("leash-ca.pem");
    std::fs::write(&ca, &pem.body).unwrap();
    Tunnels {
        d,
        ca,
        upstream_ca,
        _pki: pki,
    }
}

/// Runs a command; returns its standard output, failing with its output
/// when it fails.
fn run(cmd: &mut std::process::Command) -> String {
    let out = cmd.output().expect("run");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

fn curl(proxy: SocketAddr, cacert: &Path, extra: &[&str], url: &str) -> std::process::Output {
    std::process::Command::new("curl")
        .args(["-sS", "--max-time", "20", "-x"])
        .arg(format!("http://{proxy}"))
        .arg("--cacert")
        .arg(cacert)
        .args(["-w", "\n%{http_code} %{http_version}"])
        .args(extra)
        .arg(url)
        .env_remove("HTTPS_PROXY")
        .env_remove("https_proxy")
        .output()
        .expect("curl runs")
}

/// Splits curl's output into the body and "status version".
fn split(out: &std::process::Output) -> (String, String) {
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, tail) = text.rsplit_once('\n').unwrap_or(("", &text));
    (body.to_owned(), tail.to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_clients_reach_an_intercepted_upstream_with_the_credential_injected() {
    let t = start().await;
    let proxy = t.d.sidecar.egress_addr;

    // curl, over HTTP/1.1 and HTTP/2 (ALPN) inside the tunnel; the
    // workload's own Authorization is stripped and Leash's JWT injected.
    for (flag, version) in [("--http1.1", "1.1"), ("--http2", "2")] {
        let out = curl(
            proxy,
            &t.ca,
            &[flag, "-H", "Authorization: Bearer my-own-old-key"],
            "https://payments.leash.test/whoami",
        );
        let (body, tail) = split(&out);
        assert_eq!(
            tail,
            format!("200 {version}"),
            "{body} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let who: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(who["sub"], APP_ID, "{body}");
    }
    let seen = t.d.seen.lock().unwrap().clone();
    assert!(seen.len() >= 2);
    for s in &seen {
        let token = s
            .credential
            .as_deref()
            .unwrap()
            .strip_prefix("Bearer ")
            .unwrap();
        assert_ne!(token, "my-own-old-key");
        assert_eq!(t.d.verify(token).await.unwrap().sub, APP_ID);
    }

    // Python requests and httpx, with HTTPS_PROXY and the CA file, as an
    // SDK would be configured.
    let script = r#"
import os, ssl, sys, requests, httpx
url = "https://payments.leash.test/whoami"
r = requests.get(url, proxies={"https": os.environ["PROXY"]}, verify=os.environ["CA"], timeout=20)
print("requests", r.status_code, r.json()["sub"])
ctx = ssl.create_default_context(cafile=os.environ["CA"])
with httpx.Client(proxy=os.environ["PROXY"], verify=ctx, timeout=20) as c:
    r = c.get(url)
    print("httpx", r.status_code, r.json()["sub"], r.http_version)
"#;
    let out = run(
        std::process::Command::new(python_with("requests, httpx", "requests httpx"))
            .args(["-c", script])
            .env("PROXY", format!("http://{proxy}"))
            .env("CA", &t.ca),
    );
    assert!(out.contains(&format!("requests 200 {APP_ID}")), "{out}");
    assert!(out.contains(&format!("httpx 200 {APP_ID}")), "{out}");

    // Without the sidecar's CA the client refuses the tunnel's certificate:
    // interception is never silent.
    let out = curl(
        proxy,
        &t.upstream_ca,
        &[],
        "https://payments.leash.test/whoami",
    );
    assert!(!out.status.success(), "{out:?}");

    // Counted per upstream, with usage as for plain HTTP.
    let metrics = http_get(&format!("http://{}/metrics", t.d.sidecar.admin_addr))
        .await
        .unwrap();
    let samples = parse_prometheus(&String::from_utf8_lossy(&metrics.body));
    let tunnels = sample(
        &samples,
        "leash_proxy_tunnels_total",
        &[("upstream", "payments"), ("mode", "intercept")],
    )
    .unwrap();
    assert!(tunnels >= 4.0, "{tunnels}");
    let forwarded = sample(
        &samples,
        "leash_proxy_requests_total",
        &[("upstream", "payments"), ("decision", "forwarded")],
    )
    .unwrap();
    assert!(forwarded >= 4.0, "{forwarded}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pinned_client_reaches_a_passthrough_upstream_with_nothing_injected() {
    let t = start().await;
    let proxy = t.d.sidecar.egress_addr;
    // The client trusts only the upstream's own CA: it would refuse the
    // sidecar's. Its TLS goes end to end.
    let out = curl(
        proxy,
        &t.upstream_ca,
        &["-H", "Authorization: Bearer workload-own"],
        "https://payments.internal/whoami",
    );
    let (body, tail) = split(&out);
    assert!(tail.starts_with("401 "), "{tail} {body} {out:?}");
    let seen = t.d.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 1);
    assert_eq!(
        seen[0].credential.as_deref(),
        Some("Bearer workload-own"),
        "the tunnel carries the workload's bytes as they are"
    );
    let metrics = http_get(&format!("http://{}/metrics", t.d.sidecar.admin_addr))
        .await
        .unwrap();
    let samples = parse_prometheus(&String::from_utf8_lossy(&metrics.body));
    let count = |name: &str, labels: &[(&str, &str)]| sample(&samples, name, labels).unwrap();
    assert_eq!(
        count(
            "leash_proxy_tunnels_total",
            &[("upstream", "internal"), ("mode", "passthrough")]
        ),
        1.0
    );
    for dir in ["sent", "received"] {
        let bytes = count(
            "leash_proxy_passthrough_bytes_total",
            &[("upstream", "internal"), ("direction", dir)],
        );
        assert!(bytes > 100.0, "{dir}: {bytes}");
    }

    // Plain HTTP to a passthrough upstream is refused: nothing could be
    // injected into it.
    let a =
        t.d.client
            .get("http://payments.internal/whoami", &[])
            .await
            .unwrap();
    assert_eq!(a.status, 403);
    assert_eq!(a.json()["error"], "passthrough_only");
}

/// Sends a raw `CONNECT` and returns the answer's head (and body, if the
/// sidecar closes), with the connection for what follows a `200`.
async fn connect(proxy: SocketAddr, target: &str) -> (String, tokio::net::TcpStream) {
    let mut s = tokio::net::TcpStream::connect(proxy).await.unwrap();
    s.write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if s.read(&mut byte).await.unwrap() == 0 {
            break;
        }
        head.push(byte[0]);
    }
    let mut head = String::from_utf8_lossy(&head).into_owned();
    if !head.starts_with("HTTP/1.1 200") {
        let mut rest = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest)).await;
        head.push_str(&String::from_utf8_lossy(&rest));
    }
    (head, s)
}

fn client_tls(ca: &Path, sni: bool) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let mut config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.enable_sni = sni;
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

fn name(n: &str) -> rustls::pki_types::ServerName<'static> {
    rustls::pki_types::ServerName::try_from(n.to_owned()).unwrap()
}

/// One HTTP/1.1 request over an open TLS tunnel; returns the raw answer.
async fn request_over<S>(tls: &mut S, host: &str, path: &str) -> String
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    tls.write_all(format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    // Read until a complete answer (content-length) or the end.
    loop {
        let n = match tokio::time::timeout(Duration::from_secs(10), tls.read(&mut buf)).await {
            Ok(Ok(n)) => n,
            _ => 0,
        };
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&out);
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let len = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length: ")
                        .map(|v| v.trim().parse::<usize>().unwrap())
                })
                .unwrap_or(0);
            if body.len() >= len {
                break;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connects_around_policy_are_refused_before_any_upstream_is_reached() {
    let t = start().await;
    let proxy = t.d.sidecar.egress_addr;
    let refused = |head: &str, status: &str, code: &str| {
        assert!(head.starts_with(&format!("HTTP/1.1 {status}")), "{head}");
        assert!(head.contains(&format!("\"error\":\"{code}\"")), "{head}");
    };
    let (h, _) = connect(proxy, "127.0.0.1:443").await;
    refused(&h, "403", "connect_to_ip");
    let (h, _) = connect(proxy, "[::1]:443").await;
    refused(&h, "403", "connect_to_ip");
    let (h, _) = connect(proxy, "example.com:443").await;
    refused(&h, "403", "unknown_upstream");
    let (h, _) = connect(proxy, "plain.leash.test:443").await;
    refused(&h, "403", "connect_not_allowed");
    assert!(h.contains("intercept"), "says how to allow it: {h}");
    let (h, _) = connect(proxy, "ledger.leash.test:443").await;
    refused(&h, "403", "not_granted");
    assert!(
        t.d.seen.lock().unwrap().is_empty(),
        "no upstream was reached"
    );

    // A ClientHello without SNI, or naming another host than the CONNECT:
    // a TLS alert, no certificate minted, counted.
    let (h, tcp) = connect(proxy, "payments.leash.test:443").await;
    assert!(h.starts_with("HTTP/1.1 200"), "{h}");
    let no_sni = client_tls(&t.ca, false)
        .connect(name("payments.leash.test"), tcp)
        .await;
    assert!(no_sni.is_err(), "a hello without SNI is refused");
    let (_, tcp) = connect(proxy, "payments.leash.test:443").await;
    let other = client_tls(&t.ca, true)
        .connect(name("ledger.leash.test"), tcp)
        .await;
    let Err(err) = other else {
        panic!("an SNI other than the CONNECT host is refused")
    };
    assert!(err.to_string().to_lowercase().contains("alert"), "{err}");

    // Inside a tunnel, a request for another host than the SNI: 421.
    let (_, tcp) = connect(proxy, "payments.leash.test:443").await;
    let mut tls = client_tls(&t.ca, true)
        .connect(name("payments.leash.test"), tcp)
        .await
        .unwrap();
    let a = request_over(&mut tls, "ledger.leash.test", "/whoami").await;
    assert!(a.starts_with("HTTP/1.1 421"), "{a}");
    assert!(a.contains("misdirected_request"), "{a}");
    // The same tunnel still serves its own host.
    let a = request_over(&mut tls, "payments.leash.test", "/whoami").await;
    assert!(a.starts_with("HTTP/1.1 200"), "{a}");
    assert!(a.contains(APP_ID), "{a}");

    let metrics = http_get(&format!("http://{}/metrics", t.d.sidecar.admin_addr))
        .await
        .unwrap();
    let samples = parse_prometheus(&String::from_utf8_lossy(&metrics.body));
    for code in [
        "connect_to_ip",
        "connect_not_allowed",
        "tls_no_sni",
        "sni_mismatch",
        "misdirected_request",
    ] {
        let n = sample(&samples, "leash_proxy_refusals_total", &[("reason", code)]).unwrap();
        assert!(n >= 1.0, "{code}: {n}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocations_and_leaked_values_apply_inside_tunnels() {
    let t = start().await;
    let proxy = t.d.sidecar.egress_addr;
    let admin = Admin::bootstrap(t.d.cp.admin_addr, &t.d.dir.path().join("data"));

    // An intercepted tunnel open before the leaked value is registered.
    let (_, tcp) = connect(proxy, "payments.leash.test:443").await;
    let mut tls = client_tls(&t.ca, true)
        .connect(name("payments.leash.test"), tcp)
        .await
        .unwrap();
    let a = request_over(&mut tls, "payments.leash.test", "/whoami").await;
    assert!(a.starts_with("HTTP/1.1 200"), "{a}");
    let leaked = "ghp_leakedInsideTunnel0123456789";
    let r = admin
        .post(
            "/v1/leaked",
            json!({"value": leaked, "reason": "in a CI log"}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    let id = r.json()["id"].as_str().unwrap().to_owned();
    admin.wait_acknowledged(&id, 1).await;
    let a = request_over(&mut tls, "payments.leash.test", &format!("/x?key={leaked}")).await;
    assert!(a.starts_with("HTTP/1.1 403"), "{a}");
    assert!(a.contains("leaked_secret"), "{a}");
    assert!(!a.contains(leaked), "the refusal does not repeat the value");

    // A passthrough tunnel open when its grant is revoked is closed before
    // the revocation is acknowledged.
    let (h, tcp) = connect(proxy, "payments.internal:443").await;
    assert!(h.starts_with("HTTP/1.1 200"), "{h}");
    let mut pinned = client_tls(&t.upstream_ca, true)
        .connect(name("payments.internal"), tcp)
        .await
        .unwrap();
    let a = request_over(&mut pinned, "payments.internal", "/whoami").await;
    assert!(a.starts_with("HTTP/1.1 401"), "reached the upstream: {a}");
    let r = admin
        .revoke(json!({"kind": "grant", "workload": APP_ID, "upstream": "internal", "reason": "pinned client compromised"}))
        .await;
    let rid = r["id"].as_str().unwrap().to_owned();
    admin.wait_acknowledged(&rid, 1).await;
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(Duration::from_secs(5), pinned.read(&mut buf)).await;
    assert!(
        matches!(read, Ok(Ok(0)) | Ok(Err(_))),
        "the tunnel is closed by the time the revocation is acknowledged: {read:?}"
    );
    let (h, _) = connect(proxy, "payments.internal:443").await;
    assert!(h.starts_with("HTTP/1.1 403"), "{h}");
    assert!(h.contains("revoked_grant"), "{h}");

    // Revoking the intercepted upstream's grant: the open tunnel's next
    // request is refused with the revocation.
    let r = admin
        .revoke(json!({"kind": "grant", "workload": APP_ID, "upstream": "payments", "reason": "rotate"}))
        .await;
    let rid = r["id"].as_str().unwrap().to_owned();
    admin.wait_acknowledged(&rid, 1).await;
    let a = request_over(&mut tls, "payments.leash.test", "/whoami").await;
    assert!(a.starts_with("HTTP/1.1 403"), "{a}");
    assert!(a.contains("revoked_grant"), "{a}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_interception_ca_is_written_where_asked_and_is_new_per_start() {
    let t = start().await;
    let path = t.d.dir.path().join("written-ca.pem");
    let mut config = sidecar_config(t.d.ids.endpoint(APP_ID), t.d.cp.sidecar_addr);
    config.intercept_ca_file = Some(path.clone());
    let other = start_sidecar(config).await;
    let written = std::fs::read_to_string(&path).unwrap();
    assert!(
        written.starts_with("-----BEGIN CERTIFICATE-----"),
        "{written}"
    );
    let served = http_get(&format!("http://{}/ca.pem", other.admin_addr))
        .await
        .unwrap();
    assert_eq!(written.as_bytes(), &served.body[..]);
    assert_ne!(
        written,
        std::fs::read_to_string(&t.ca).unwrap(),
        "each sidecar makes its own CA"
    );
    assert!(!written.contains("PRIVATE KEY"));
}
