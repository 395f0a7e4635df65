//! Helpers shared by the process-level tests: real binaries, ports, polling.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test stops at the first failed step, with its message"
)]
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty};
use hyper_util::rt::TokioIo;

pub mod pg;

pub const CP_ID: &str = "spiffe://leash.test/leash/control-plane";
pub const APP_ID: &str = "spiffe://leash.test/ns/demo/sa/client";

thread_local! {
    static LOGS: std::cell::RefCell<Vec<std::path::PathBuf>> = const { std::cell::RefCell::new(Vec::new()) };
}

pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
        // A test failing: show the logs of the processes it started.
        if std::thread::panicking() {
            LOGS.with(|l| {
                for path in l.borrow().iter() {
                    if let Ok(text) = std::fs::read_to_string(path) {
                        let tail: Vec<&str> = text.lines().rev().take(30).collect();
                        eprintln!("--- last lines of {}:", path.display());
                        for line in tail.iter().rev() {
                            eprintln!("{line}");
                        }
                    }
                }
            });
        }
    }
}

pub fn free_port() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

pub fn spawn(args: &[&str], log: &Path) -> Proc {
    // Where a test that fails can be read after the temporary directory
    // is gone: printed by the panic hook below.
    LOGS.with(|l| l.borrow_mut().push(log.to_owned()));
    let log = std::fs::File::create(log).unwrap();
    Proc(
        Command::new(env!("CARGO_BIN_EXE_leash-control-plane"))
            .args(args)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    )
}

pub async fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !f() {
        assert!(Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub async fn get(addr: SocketAddr, url: &str) -> Option<(u16, serde_json::Value)> {
    let tcp = tokio::net::TcpStream::connect(addr).await.ok()?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .ok()?;
    tokio::spawn(conn);
    let uri: http::Uri = url.parse().ok()?;
    let host = uri.authority()?.to_string();
    let req = http::Request::get(uri)
        .header("host", host)
        .body(Empty::<Bytes>::new())
        .ok()?;
    let resp = send.send_request(req).await.ok()?;
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.ok()?.to_bytes();
    Some((status, serde_json::from_slice(&body).unwrap_or_default()))
}

pub fn leashctl(admin: SocketAddr, token: Option<&str>, args: &[&str]) -> (i32, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_leashctl"));
    cmd.arg("--addr")
        .arg(format!("http://{admin}"))
        .env_remove("LEASH_TOKEN");
    if let Some(t) = token {
        cmd.arg("--token").arg(t);
    }
    let out = cmd.args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The dev Workload API as a real process, serving the control plane's and
/// the app's sockets in `dir`.
pub async fn start_identity(dir: &Path, svid_ttl: &str, log: &str) -> Proc {
    let _ = std::fs::remove_file(dir.join("app.sock"));
    let _ = std::fs::remove_file(dir.join("cp.sock"));
    let p = spawn(
        &[
            "dev-identity",
            "--svid-ttl",
            svid_ttl,
            "--socket",
            &format!("{}={CP_ID}", dir.join("cp.sock").display()),
            "--socket",
            &format!("{}={APP_ID}", dir.join("app.sock").display()),
        ],
        &dir.join(log),
    );
    wait_until("identity sockets", || {
        dir.join("app.sock").exists() && dir.join("cp.sock").exists()
    })
    .await;
    p
}

/// An upstream answering `{}` to anything, counting the requests that
/// carried a credential.
pub async fn counting_upstream() -> (SocketAddr, std::sync::Arc<std::sync::atomic::AtomicU64>) {
    let upstream = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = upstream.local_addr().unwrap();
    let count = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let seen = count.clone();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = upstream.accept().await else {
                continue;
            };
            let seen = seen.clone();
            tokio::spawn(hyper::server::conn::http1::Builder::new().serve_connection(
                TokioIo::new(tcp),
                hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    if req.headers().contains_key("authorization") {
                        seen.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    async {
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(
                            http_body_util::Full::new(Bytes::from("{}")),
                        ))
                    }
                }),
            ));
        }
    });
    (addr, count)
}

/// `serve` arguments for a control plane in `dir`.
pub fn serve_args(dir: &Path, sidecar_api: SocketAddr, admin: SocketAddr) -> Vec<String> {
    [
        "serve",
        "--policy",
        &dir.join("policy.yaml").display().to_string(),
        "--data-dir",
        &dir.join("data").display().to_string(),
        "--listen",
        &sidecar_api.to_string(),
        "--admin-listen",
        &admin.to_string(),
        "--spiffe-endpoint",
        &format!("unix://{}", dir.join("cp.sock").display()),
        "--heartbeat-interval",
        "500ms",
        "--insecure-dev",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

pub async fn wait_ready(admin: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ready = get(admin, &format!("http://{admin}/readyz")).await;
        if matches!(ready, Some((200, _))) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "control plane at {admin} not ready; its last /readyz: {ready:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A sidecar configured exactly as the binary would be from `flags`.
pub async fn sidecar(dir: &Path, sidecar_api: SocketAddr, flags: &[&str]) -> leash_proxy::Sidecar {
    let mut args = vec![
        "leash-proxy".to_owned(),
        "--spiffe-endpoint".to_owned(),
        format!("unix://{}", dir.join("app.sock").display()),
        "--control-plane".to_owned(),
        sidecar_api.to_string(),
    ];
    args.extend(flags.iter().map(|s| s.to_string()));
    let cli = <leash_proxy::cli::Cli as clap::Parser>::try_parse_from(args).unwrap();
    leash_proxy::Sidecar::start(
        cli.config().unwrap(),
        tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
        tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
        Vec::new(),
    )
    .unwrap()
}

pub struct Traffic {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// One request loop per sidecar (GET `url`), counting outcomes.
pub fn traffic(url: &'static str, proxies: &[std::net::SocketAddr]) -> Traffic {
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let tasks = proxies
        .iter()
        .map(|&proxy| {
            let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    match get(proxy, url).await {
                        Some((200, _)) => ok.fetch_add(1, Ordering::Relaxed),
                        other => {
                            eprintln!("request failed: {other:?}");
                            failed.fetch_add(1, Ordering::Relaxed)
                        }
                    };
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            })
        })
        .collect();
    Traffic {
        stop,
        ok,
        failed,
        tasks,
    }
}

impl Traffic {
    pub async fn stop(self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            let _ = t.await;
        }
        (
            self.ok.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
        )
    }
}

/// Waits until `leashctl status` shows at least `n` acknowledgements of
/// `id` and no connected sidecar pending. (Sessions from before a crash
/// whose acknowledgements were already written count too.)
pub async fn acknowledged_by(admin: std::net::SocketAddr, token: &str, id: &str, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (code, out, err) = leashctl(admin, Some(token), &["status", id]);
        let acked = out
            .split("acknowledged by ")
            .nth(1)
            .and_then(|s| s.split(' ').next())
            .and_then(|s| s.parse::<usize>().ok());
        if code == 0 && acked >= Some(n) && out.contains("; 0 connected sidecar(s) pending") {
            return;
        }
        assert!(Instant::now() < deadline, "{id}: {out}{err}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub fn usage_requests(admin: std::net::SocketAddr, token: &str) -> (u64, u64) {
    let (code, out, err) = leashctl(admin, Some(token), &["--json", "usage"]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    (
        v["requests"].as_u64().unwrap(),
        v["dropped_requests"].as_u64().unwrap(),
    )
}

/// The bootstrap admin token a control plane wrote to `data_dir`.
pub fn read_token(data_dir: &Path) -> String {
    std::fs::read_to_string(data_dir.join("admin-token"))
        .unwrap()
        .trim()
        .to_owned()
}

/// Waits until `s` forwards a GET of `url` (its identity, session and
/// routes are in place).
pub async fn forwarding(s: &leash_proxy::Sidecar, url: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while get(s.egress_addr, url).await.map(|r| r.0) != Some(200) {
        assert!(Instant::now() < deadline, "sidecar never forwarded");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `leashctl --json revoke grant` of the app's grant to `upstream`.
pub fn revoke_grant(
    admin: SocketAddr,
    token: &str,
    upstream: &str,
    reason: &str,
) -> (i32, String, String) {
    leashctl(
        admin,
        Some(token),
        &[
            "--json",
            "revoke",
            "grant",
            "--workload",
            APP_ID,
            "--upstream",
            upstream,
            "--reason",
            reason,
        ],
    )
}
