//! Revocation propagation: from the admin API's answer to the moment every
//! connected sidecar session has applied the change and sent its
//! acknowledgement, for 1, 100 and 1,000 sessions; and the control plane's
//! memory per connected session.
//!
//! The control plane and the dev identity provider run as real release
//! processes; the sessions are real sidecar session clients
//! (`leash_proxy::control::ControlLink`, the code the sidecar runs), many in
//! this one process, sharing one SVID.
//!
//!   cargo build --release -p leash-control-plane
//!   cargo bench -p leash-benches --bench propagation -- [--sessions 1,100,1000] [--revocations 50]
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test and benchmark support: a failed setup step should stop the run with its message"
)]

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use leash_api::identity::IdentityConfig;
use leash_benches::{CP_ID, Proc, control_plane_binary, free_port, start_identity};
use leash_proxy::UpstreamTimeouts;
use leash_proxy::control::{ControlConfig, ControlLink};

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

async fn post(
    admin: SocketAddr,
    token: &str,
    body: serde_json::Value,
) -> anyhow::Result<serde_json::Value> {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let req = http::Request::post(format!("http://{admin}/v1/revocations"))
        .header("authorization", format!("Bearer {token}"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))?;
    let resp = client.request(req).await?;
    let status = resp.status();
    let body = resp.into_body().collect().await?.to_bytes();
    if status != 201 {
        bail!(
            "revoke answered {status}: {}",
            String::from_utf8_lossy(&body)
        );
    }
    Ok(serde_json::from_slice(&body)?)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

struct Row {
    sessions: usize,
    p50: Duration,
    p99: Duration,
    max: Duration,
    kib_per_session: f64,
    connect: Duration,
}

async fn run(sessions: usize, revocations: usize) -> anyhow::Result<Row> {
    let dir = tempfile::Builder::new().prefix("lshb").tempdir_in("/tmp")?;
    let d = dir.path();
    let bin = control_plane_binary()?;
    let _identity = start_identity(&bin, d).await?;
    std::fs::write(
        d.join("policy.yaml"),
        "version: 1\nupstreams:\n  - name: payments\n    hosts: [payments.leash.test]\n    target: http://127.0.0.1:9\n    credential: { kind: jwt }\ngrants:\n  - workload: spiffe://leash.test/ns/*\n    upstreams: [payments]\n",
    )?;
    let (api, admin) = (free_port(), free_port());
    let cp = Proc(
        Command::new(&bin)
            .arg("serve")
            .arg("--policy")
            .arg(d.join("policy.yaml"))
            .arg("--data-dir")
            .arg(d.join("data"))
            .args([
                "--listen",
                &api.to_string(),
                "--admin-listen",
                &admin.to_string(),
            ])
            .arg("--spiffe-endpoint")
            .arg(format!("unix://{}", d.join("cp.sock").display()))
            .arg("--insecure-dev")
            .env("RUST_LOG", "warn")
            .stderr(Stdio::null())
            .spawn()?,
    );
    let token_file = d.join("data/admin-token");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !token_file.exists() || tokio::net::TcpStream::connect(admin).await.is_err() {
        if Instant::now() > deadline {
            bail!("control plane did not start");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let token = std::fs::read_to_string(&token_file)?.trim().to_owned();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rss_before = rss_kib(cp.0.id());

    let source = leash_api::identity::x509_source(
        &format!("unix://{}", d.join("app.sock").display()),
        Duration::from_secs(10),
    )
    .await
    .context("bench identity")?;
    let config = ControlConfig {
        identity: IdentityConfig::Shared(source.clone()),
        control_planes: vec![api.to_string()],
        control_plane_id: CP_ID.into(),
        max_staleness: Duration::from_secs(60),
        call_timeout: Duration::from_secs(30),
        upstream: UpstreamTimeouts {
            connect: Duration::from_secs(1),
            pool_idle: Duration::from_secs(1),
            max_connections: 1024,
        },
        report_interval: Duration::from_secs(5),
        usage_buffer_records: 100_000,
    };
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let started = Instant::now();
    let links: Vec<Arc<ControlLink>> = (0..sessions)
        .map(|_| {
            let link = ControlLink::new(config.clone());
            tokio::spawn(link.clone().run(stop_rx.clone()));
            link
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(120);
    while !links.iter().all(|l| l.connected()) {
        if Instant::now() > deadline {
            bail!(
                "only {} of {sessions} sessions connected",
                links.iter().filter(|l| l.connected()).count()
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let connect = started.elapsed();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_after = rss_kib(cp.0.id());

    let mut latencies = Vec::with_capacity(revocations);
    for i in 0..revocations {
        let r = post(
            admin,
            &token,
            serde_json::json!({"kind": "workload", "workload": format!("spiffe://leash.test/bench/{i}/*"), "reason": "benchmark"}),
        )
        .await?;
        let answered = Instant::now();
        let seq = r["seq"].as_u64().context("seq")?;
        let watched = links.clone();
        // Poll from a plain thread so the measurement does not queue behind
        // the sessions' own tasks.
        let done = tokio::task::spawn_blocking(move || {
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                if watched
                    .iter()
                    .all(|l| l.revocations.applied_seq.load(Ordering::Acquire) >= seq)
                {
                    return Some(Instant::now());
                }
                if Instant::now() > deadline {
                    return None;
                }
                std::thread::sleep(Duration::from_micros(50));
            }
        })
        .await?
        .context("a session never applied the revocation")?;
        latencies.push(done.saturating_duration_since(answered));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = stop_tx.send(true);
    source.shutdown().await;
    latencies.sort();
    Ok(Row {
        sessions,
        p50: percentile(&latencies, 0.50),
        p99: percentile(&latencies, 0.99),
        max: *latencies.last().context("no samples")?,
        kib_per_session: rss_after.saturating_sub(rss_before) as f64 / sessions as f64,
        connect,
    })
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let flag = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let sessions: Vec<usize> = flag("--sessions")
        .unwrap_or_else(|| "1,100,1000".into())
        .split(',')
        .map(|s| s.parse())
        .collect::<Result<_, _>>()?;
    let revocations: usize = flag("--revocations").map_or(Ok(50), |s| s.parse())?;
    leash_api::identity::install_crypto_provider();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let mut rows = Vec::new();
    for n in sessions {
        eprintln!("propagation: {n} sessions, {revocations} revocations…");
        rows.push(runtime.block_on(run(n, revocations))?);
    }
    println!(
        "| sessions | p50 | p99 | max | control-plane RSS per session | all sessions connected in |"
    );
    println!("|---:|---:|---:|---:|---:|---:|");
    for r in rows {
        println!(
            "| {} | {:.2} ms | {:.2} ms | {:.2} ms | {:.1} KiB | {:.2} s |",
            r.sessions,
            r.p50.as_secs_f64() * 1e3,
            r.p99.as_secs_f64() * 1e3,
            r.max.as_secs_f64() * 1e3,
            r.kib_per_session,
            r.connect.as_secs_f64()
        );
    }
    Ok(())
}
