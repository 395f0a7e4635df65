//! The control plane under a hostile network, all at once, with real
//! processes: 2,000 slowloris connections and 20,000 unauthenticated
//! requests with 60 KiB paths against the admin port, and 2,000 half-open
//! TLS handshakes against the sidecar port, from many attacking addresses,
//! while a sidecar (re)connects and a responder revokes. Reports how long
//! the revocation took to commit and to be acknowledged, how long the
//! sidecar took to be ready, and how much the database grew (after the
//! control plane's once-a-minute summary of refused calls).
//!
//!   cargo build --release -p leash-control-plane
//!   cargo bench -p leash-benches --bench hostile
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test and benchmark support: a failed setup step should stop the run with its message"
)]

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use leash_benches::{
    APP_ID, CP_ID, Proc, control_plane_binary, free_port, serve_command, start_identity, wait_ready,
};
use tokio::io::AsyncWriteExt as _;
use tokio::net::{TcpSocket, TcpStream};

async fn connect_from(to: SocketAddr, ip: [u8; 4]) -> Option<TcpStream> {
    let socket = TcpSocket::new_v4().ok()?;
    socket.bind(SocketAddr::from((ip, 0))).ok()?;
    socket.connect(to).await.ok()
}

fn db_bytes(data: &Path) -> u64 {
    ["leash.db", "leash.db-wal"]
        .iter()
        .map(|f| std::fs::metadata(data.join(f)).map_or(0, |m| m.len()))
        .sum()
}

async fn call(
    admin: SocketAddr,
    token: &str,
    method: &str,
    path: &str,
    body: Option<serde_json::Value>,
) -> anyhow::Result<(u16, serde_json::Value)> {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let req = http::Request::builder()
        .method(method)
        .uri(format!("http://{admin}{path}"))
        .header("authorization", format!("Bearer {token}"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(
            body.map(|b| b.to_string()).unwrap_or_default(),
        )))?;
    let resp = client.request(req).await?;
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await?.to_bytes();
    Ok((status, serde_json::from_slice(&body).unwrap_or_default()))
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    leash_api::identity::install_crypto_provider();
    let dir = tempfile::Builder::new().prefix("lshh").tempdir_in("/tmp")?;
    let d = dir.path();
    let bin = control_plane_binary()?;
    let _identity = start_identity(&bin, d).await?;
    std::fs::write(
        d.join("policy.yaml"),
        format!(
            "version: 1\nupstreams:\n  - name: payments\n    hosts: [payments.leash.test]\n    target: http://127.0.0.1:9\n    credential: {{ kind: jwt }}\ngrants:\n  - workload: {APP_ID}\n    upstreams: [payments]\n"
        ),
    )?;
    let key = d.join("master.key");
    let generated = Command::new(&bin).arg("master-key").output()?;
    std::fs::write(&key, &generated.stdout)?;
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    let (api, admin) = (free_port(), free_port());
    let data = d.join("data");
    let _cp = Proc(
        serve_command(&bin, d, &data, api, admin)
            .arg("--master-key-file")
            .arg(&key)
            .args(["--heartbeat-interval", "1s"])
            .env("RUST_LOG", "warn")
            .stderr(Stdio::null())
            .spawn()?,
    );
    wait_ready(admin, Duration::from_secs(20)).await?;
    let token = std::fs::read_to_string(data.join("admin-token"))?
        .trim()
        .to_owned();
    let before = db_bytes(&data);

    // The attack, all at once, from 127.0.{3,4,5}.x.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut attack = Vec::new();
    // 2,000 slowloris connections on the admin port, 100 per address, one
    // header byte a second; reconnecting when closed.
    for host in 1..=20u8 {
        let stop = stop.clone();
        attack.push(tokio::spawn(async move {
            let mut conns: Vec<Option<TcpStream>> = (0..100).map(|_| None).collect();
            while !stop.load(Ordering::Relaxed) {
                for c in &mut conns {
                    match c {
                        Some(s) => {
                            if s.write_all(b"X").await.is_err() {
                                *c = None;
                            }
                        }
                        None => *c = connect_from(admin, [127, 0, 3, host]).await,
                    }
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }));
    }
    // 2,000 half-open connections on the sidecar port (no ClientHello).
    for host in 1..=20u8 {
        let stop = stop.clone();
        attack.push(tokio::spawn(async move {
            let mut conns: Vec<Option<TcpStream>> = (0..100).map(|_| None).collect();
            while !stop.load(Ordering::Relaxed) {
                for c in &mut conns {
                    let closed = match c {
                        Some(s) => {
                            s.peer_addr().is_err()
                                || s.try_read(&mut [0u8; 1]).is_ok_and(|n| n == 0)
                        }
                        None => true,
                    };
                    if closed {
                        *c = connect_from(api, [127, 0, 5, host]).await;
                    }
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }));
    }
    // 20,000 unauthenticated requests with 60 KiB paths, 64 at a time.
    let sent = Arc::new(AtomicU64::new(0));
    // Answers seen: 401, 429, anything else, no answer (closed at a cap).
    let outcomes = Arc::new([0, 0, 0, 0].map(AtomicU64::new));
    let path = format!("/v1/revocations/{}", "x".repeat(60 * 1024));
    for worker in 0..64u8 {
        let (sent, path, outcomes) = (sent.clone(), path.clone(), outcomes.clone());
        attack.push(tokio::spawn(async move {
            let mut http = HttpConnector::new();
            http.set_local_address(Some([127, 0, 4, worker % 20 + 1].into()));
            let client = Client::builder(TokioExecutor::new()).build::<_, Empty<Bytes>>(http);
            while sent.fetch_add(1, Ordering::Relaxed) < 20_000 {
                if let Ok(uri) = format!("http://{admin}{path}").parse::<http::Uri>() {
                    let i = match client.get(uri).await.map(|r| r.status().as_u16()) {
                        Ok(401) => 0,
                        Ok(429) => 1,
                        Ok(_) => 2,
                        Err(_) => 3,
                    };
                    outcomes[i].fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;

    // Under attack: a sidecar connects (and, stopped and started, reconnects),
    // and a responder revokes.
    let config = |endpoint: String| leash_proxy::SidecarConfig {
        control: leash_proxy::ControlConfig {
            identity: leash_api::identity::IdentityConfig::WorkloadApi(endpoint),
            control_planes: vec![api.to_string()],
            control_plane_id: CP_ID.into(),
            max_staleness: Duration::from_secs(30),
            report_interval: Duration::from_secs(5),
            usage_buffer_records: 100_000,
            call_timeout: Duration::from_secs(5),
            upstream: leash_proxy::UpstreamTimeouts {
                connect: Duration::from_secs(2),
                pool_idle: Duration::from_secs(30),
                max_connections: 1024,
            },
        },
        limits: leash_proxy::Limits::default(),
        upstream_response_timeout: Duration::from_secs(10),
        otel: None,
        usage_reporting: true,
        intercept_ca_file: None,
    };
    let endpoint = format!("unix://{}", d.join("app.sock").display());
    let ready = |sidecar: &leash_proxy::Sidecar| sidecar.link.pending().is_empty();
    let mut ready_times = Vec::new();
    let mut sidecar = None;
    for _ in 0..2 {
        if let Some(s) = sidecar.take() {
            leash_proxy::Sidecar::shutdown(s, Duration::from_secs(1)).await;
        }
        let started = Instant::now();
        let s = leash_proxy::Sidecar::start(
            config(endpoint.clone()),
            tokio::net::TcpListener::bind("127.0.0.1:0").await?,
            tokio::net::TcpListener::bind("127.0.0.1:0").await?,
            Vec::new(),
        )?;
        while !ready(&s) {
            if started.elapsed() > Duration::from_secs(30) {
                bail!("sidecar not ready within 30 s under attack");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        ready_times.push(started.elapsed());
        sidecar = Some(s);
    }
    let t0 = Instant::now();
    let (status, r) = call(
        admin,
        &token,
        "POST",
        "/v1/revocations",
        Some(serde_json::json!({"kind": "upstream", "upstream": "payments", "reason": "bench"})),
    )
    .await?;
    let committed = t0.elapsed();
    if status != 201 {
        bail!("revoke answered {status}: {r}");
    }
    let id = r["id"].as_str().context("revocation id")?.to_owned();
    let acked = loop {
        let (_, v) = call(admin, &token, "GET", &format!("/v1/revocations/{id}"), None).await?;
        if v["propagation"]["acknowledged"]
            .as_array()
            .is_some_and(|a| !a.is_empty())
        {
            break t0.elapsed();
        }
        if t0.elapsed() > Duration::from_secs(30) {
            bail!("not acknowledged within 30 s under attack");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    // Let the unauthenticated flood finish, then the minute's summary land.
    while sent.load(Ordering::Relaxed) < 20_000 {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let flood_done = t0.elapsed();
    tokio::time::sleep(Duration::from_secs(62)).await;
    let grown = db_bytes(&data).saturating_sub(before);
    let (_, audit) = call(admin, &token, "GET", "/v1/audit?limit=10000", None).await?;
    let entries = audit["entries"].as_array().cloned().unwrap_or_default();
    let summaries: Vec<&serde_json::Value> = entries
        .iter()
        .filter(|e| {
            e["actor"]
                .as_str()
                .is_some_and(|a| a.starts_with("anonymous@"))
        })
        .collect();
    let summarised: u64 = summaries
        .iter()
        .filter_map(|e| {
            e["action"]
                .as_str()?
                .strip_prefix("refused ")?
                .split(' ')
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum();
    for a in attack {
        a.abort();
    }
    if let Some(s) = sidecar {
        leash_proxy::Sidecar::shutdown(s, Duration::from_secs(1)).await;
    }
    println!("| what | figure |");
    println!("|---|---|");
    println!(
        "| revocation committed (admin API answered) | {:.1} ms |",
        committed.as_secs_f64() * 1e3
    );
    println!(
        "| revocation acknowledged by the sidecar | {:.1} ms |",
        acked.as_secs_f64() * 1e3
    );
    println!(
        "| new sidecar ready (first connect) | {:.0} ms |",
        ready_times[0].as_secs_f64() * 1e3
    );
    println!(
        "| sidecar ready again after a restart | {:.0} ms |",
        ready_times[1].as_secs_f64() * 1e3
    );
    println!(
        "| the 20,000-call flood ended, counted from the revocation | {:.1} s |",
        flood_done.as_secs_f64()
    );
    let o: Vec<u64> = outcomes.iter().map(|a| a.load(Ordering::Relaxed)).collect();
    println!(
        "| their answers: 401 / 429 / other / closed at a cap | {} / {} / {} / {} |",
        o[0], o[1], o[2], o[3]
    );
    println!(
        "| audit rows for all refused calls (calls they summarise) | {} ({summarised}) |",
        summaries.len()
    );
    println!(
        "| audit rows in all (responder's calls included) | {} |",
        entries.len()
    );
    println!(
        "| database + WAL growth, summaries included | {:.1} KiB |",
        grown as f64 / 1024.0
    );
    Ok(())
}
