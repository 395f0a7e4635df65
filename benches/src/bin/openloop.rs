//! An open-loop HTTP/1.1 load generator: requests are scheduled at a fixed
//! rate whatever the server does, and each latency is measured from the
//! request's *scheduled* time, so a stall is counted for every request it
//! delays (no coordinated omission). Prints one JSON line.
//!
//!   openloop --url http://127.0.0.1:19192/ --rate 2000 --seconds 10 [--connections 32]
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a benchmark tool: a failed setup step should stop the run with its message"
)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty};
use hyper_util::rt::TokioIo;
use tokio::sync::{Mutex, mpsc};

fn flag(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
}

async fn connect(
    addr: &str,
) -> anyhow::Result<hyper::client::conn::http1::SendRequest<Empty<Bytes>>> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
    tokio::spawn(conn);
    Ok(send)
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let url: http::Uri = flag(&args, "--url").context("--url")?.parse()?;
    let rate: f64 = flag(&args, "--rate").context("--rate")?.parse()?;
    let seconds: f64 = flag(&args, "--seconds").map_or(Ok(10.0), |s| s.parse())?;
    let connections: usize = flag(&args, "--connections").map_or(Ok(32), |s| s.parse())?;
    if rate <= 0.0 {
        bail!("--rate must be positive");
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run(url, rate, seconds, connections))
}

async fn run(url: http::Uri, rate: f64, seconds: f64, connections: usize) -> anyhow::Result<()> {
    let addr = url.authority().context("URL has no host")?.to_string();
    let path = url.path_and_query().map_or("/", |p| p.as_str()).to_owned();
    let total = (rate * seconds) as usize;
    let (tx, rx) = mpsc::channel::<Instant>(total.max(1));
    let rx = Arc::new(Mutex::new(rx));
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<Result<Duration, ()>>();
    for _ in 0..connections {
        let (rx, done_tx, addr, path) = (rx.clone(), done_tx.clone(), addr.clone(), path.clone());
        tokio::spawn(async move {
            let mut send = None;
            loop {
                let Some(scheduled) = rx.lock().await.recv().await else {
                    return;
                };
                if send.is_none() {
                    send = connect(&addr).await.ok();
                }
                let result = match send.as_mut() {
                    Some(s) => {
                        let req = http::Request::get(path.as_str())
                            .header("host", addr.as_str())
                            .body(Empty::<Bytes>::new())
                            .expect("request");
                        match s.send_request(req).await {
                            Ok(resp) if resp.status().is_success() => resp
                                .into_body()
                                .collect()
                                .await
                                .map(|_| scheduled.elapsed())
                                .map_err(|_| ()),
                            _ => Err(()),
                        }
                    }
                    None => Err(()),
                };
                if result.is_err() {
                    send = None;
                }
                let _ = done_tx.send(result);
            }
        });
    }
    drop(done_tx);
    // The schedule: request i is due at start + i / rate.
    let start = Instant::now() + Duration::from_millis(50);
    let interval = Duration::from_secs_f64(1.0 / rate);
    tokio::spawn(async move {
        for i in 0..total {
            let due = start + interval.mul_f64(i as f64);
            tokio::time::sleep_until(due.into()).await;
            if tx.send(due).await.is_err() {
                return;
            }
        }
    });
    let mut latencies = Vec::with_capacity(total);
    let mut errors = 0usize;
    for _ in 0..total {
        match done_rx.recv().await {
            Some(Ok(l)) => latencies.push(l),
            Some(Err(())) => errors += 1,
            None => break,
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    latencies.sort();
    let pct = |p: f64| {
        latencies
            .get(((latencies.len() as f64 - 1.0) * p).round() as usize)
            .map_or(f64::NAN, |d| d.as_secs_f64() * 1e3)
    };
    println!(
        "{}",
        serde_json::json!({
            "rate": rate,
            "achieved": latencies.len() as f64 / elapsed,
            "requests": latencies.len(),
            "errors": errors,
            "p50_ms": pct(0.50),
            "p90_ms": pct(0.90),
            "p99_ms": pct(0.99),
            "p999_ms": pct(0.999),
            "max_ms": pct(1.0),
        })
    );
    Ok(())
}
