//! A closed-loop HTTPS load generator (HTTP/1.1 keep-alive inside TLS), for
//! the paths wrk cannot drive: through a proxy's `CONNECT` (once per
//! connection, then TLS to the named host through the tunnel), or straight
//! to a TLS server. Each of `--connections` connections sends its next
//! request as soon as the previous answer's body is read, for `--seconds`
//! after every connection has finished its handshake. Prints one JSON line:
//! requests, errors, req/s, p50/p99/p99.9, the TLS version, cipher suite
//! and ALPN protocol of the last handshake, and the generator's own CPU.
//!
//!   tlsload --url https://api.bench.test/ --connect-proxy 127.0.0.1:19193 --cafile ca.pem
//!   tlsload --url https://bench.internal/ --connect-to 127.0.0.1:19195 --cafile ca.pem
//!           [--connections 16] [--seconds 10]
//!
//! One thread (a current-thread runtime), as `wrk -t1`: pin it to a core
//! of its own.
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
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

fn flag(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
}

struct Target {
    /// Host name: SNI, certificate name, `CONNECT` target and `Host`.
    host: String,
    port: u16,
    /// The `Host` header: the host, with the port unless it is 443.
    authority: String,
    path: String,
    /// Where to open TCP connections: the proxy, `--connect-to` or the URL's.
    dial: String,
    proxied: bool,
    tls: TlsConnector,
}

/// What a connection's handshake negotiated.
#[derive(Clone, Default)]
struct Negotiated {
    version: String,
    suite: String,
    alpn: String,
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let url: http::Uri = flag(&args, "--url").context("--url")?.parse()?;
    if url.scheme_str() != Some("https") {
        bail!("--url must be https://");
    }
    let host = url.host().context("URL has no host")?.to_owned();
    let port = url.port_u16().unwrap_or(443);
    let authority = if port == 443 {
        host.clone()
    } else {
        format!("{host}:{port}")
    };
    let path = url.path_and_query().map_or("/", |p| p.as_str()).to_owned();
    let proxy = flag(&args, "--connect-proxy");
    let dial = proxy
        .clone()
        .or_else(|| flag(&args, "--connect-to"))
        .unwrap_or_else(|| format!("{host}:{port}"));
    let cafile = flag(&args, "--cafile").context("--cafile")?;
    let connections: usize = flag(&args, "--connections").map_or(Ok(16), |s| s.parse())?;
    let seconds: f64 = flag(&args, "--seconds").map_or(Ok(10.0), |s| s.parse())?;

    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(&cafile).with_context(|| cafile.clone())? {
        roots.add(cert?)?;
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let target = Arc::new(Target {
        host,
        port,
        authority,
        path,
        dial,
        proxied: proxy.is_some(),
        tls: TlsConnector::from(Arc::new(config)),
    });
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run(target, connections, Duration::from_secs_f64(seconds)))
}

/// TCP, then `CONNECT` when proxied, then TLS and an HTTP/1.1 connection.
async fn open(t: &Target) -> anyhow::Result<(SendRequest<Empty<Bytes>>, Negotiated)> {
    let mut tcp = TcpStream::connect(&t.dial)
        .await
        .with_context(|| format!("connecting to {}", t.dial))?;
    tcp.set_nodelay(true)?;
    if t.proxied {
        let (host, port) = (&t.host, t.port);
        tcp.write_all(
            format!("CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n").as_bytes(),
        )
        .await?;
        // The proxy sends nothing after its answer until the ClientHello,
        // so reading up to the blank line cannot take TLS bytes.
        let mut head = Vec::with_capacity(256);
        let mut buf = [0u8; 256];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = tcp.read(&mut buf).await?;
            if n == 0 || head.len() > 16 * 1024 {
                bail!("CONNECT: the proxy closed or sent too much");
            }
            head.extend_from_slice(&buf[..n]);
        }
        if !head.starts_with(b"HTTP/1.1 200") && !head.starts_with(b"HTTP/1.0 200") {
            let line = head.split(|b| *b == b'\r').next().unwrap_or_default();
            bail!("CONNECT refused: {}", String::from_utf8_lossy(line));
        }
    }
    let name = ServerName::try_from(t.host.clone())?;
    let tls = t.tls.connect(name, tcp).await?;
    let c = tls.get_ref().1;
    let negotiated = Negotiated {
        version: c
            .protocol_version()
            .map_or_else(String::new, |v| format!("{v:?}")),
        suite: c
            .negotiated_cipher_suite()
            .map_or_else(String::new, |s| format!("{:?}", s.suite())),
        alpn: c
            .alpn_protocol()
            .map_or_else(String::new, |p| String::from_utf8_lossy(p).into_owned()),
    };
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
    tokio::spawn(conn);
    Ok((send, negotiated))
}

async fn request(t: &Target, send: &mut SendRequest<Empty<Bytes>>) -> anyhow::Result<()> {
    send.ready().await?;
    let req = http::Request::get(t.path.as_str())
        .header(http::header::HOST, t.authority.as_str())
        .body(Empty::<Bytes>::new())?;
    let resp = send.send_request(req).await?;
    let status = resp.status();
    resp.into_body().collect().await?;
    if !status.is_success() {
        bail!("status {status}");
    }
    Ok(())
}

#[derive(Default)]
struct Tally {
    latencies: Vec<Duration>,
    errors: usize,
    connects: usize,
    first_error: Option<String>,
    negotiated: Negotiated,
}

/// One connection's closed loop: opens (and after an error reopens) its
/// connection, then requests until `end`.
async fn worker(
    t: Arc<Target>,
    first: anyhow::Result<(SendRequest<Empty<Bytes>>, Negotiated)>,
    end: Instant,
) -> Tally {
    let mut tally = Tally::default();
    let fail = |tally: &mut Tally, e: anyhow::Error| {
        tally.errors += 1;
        tally.first_error.get_or_insert_with(|| format!("{e:#}"));
    };
    let mut send = match first {
        Ok((s, n)) => {
            tally.connects += 1;
            tally.negotiated = n;
            Some(s)
        }
        Err(e) => {
            fail(&mut tally, e);
            None
        }
    };
    while Instant::now() < end {
        let Some(s) = send.as_mut() else {
            match open(&t).await {
                Ok((s, n)) => {
                    tally.connects += 1;
                    tally.negotiated = n;
                    send = Some(s);
                }
                Err(e) => {
                    fail(&mut tally, e);
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
            continue;
        };
        let sent = Instant::now();
        match request(&t, s).await {
            Ok(()) => tally.latencies.push(sent.elapsed()),
            Err(e) => {
                fail(&mut tally, e);
                send = None;
            }
        }
    }
    tally
}

/// CPU time this process has run, from the scheduler's own account.
fn cpu_seconds() -> f64 {
    std::fs::read_to_string("/proc/self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .map_or(f64::NAN, |ns| ns as f64 / 1e9)
}

async fn run(t: Arc<Target>, connections: usize, duration: Duration) -> anyhow::Result<()> {
    // Every handshake first, so the measured window is requests only.
    let mut opened = Vec::with_capacity(connections);
    for _ in 0..connections {
        let t = t.clone();
        opened.push(tokio::spawn(async move { open(&t).await }));
    }
    let mut firsts = Vec::with_capacity(connections);
    for o in opened {
        firsts.push(o.await?);
    }
    let cpu_start = cpu_seconds();
    let start = Instant::now();
    let end = start + duration;
    let workers: Vec<_> = firsts
        .into_iter()
        .map(|first| tokio::spawn(worker(t.clone(), first, end)))
        .collect();
    let mut all = Tally::default();
    for w in workers {
        let tally = w.await?;
        all.latencies.extend(tally.latencies);
        all.errors += tally.errors;
        all.connects += tally.connects;
        if all.first_error.is_none() {
            all.first_error = tally.first_error;
        }
        if !tally.negotiated.version.is_empty() {
            all.negotiated = tally.negotiated;
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    let cpu = cpu_seconds() - cpu_start;
    let mut latencies = all.latencies;
    latencies.sort_unstable();
    let pct = |p: f64| {
        latencies
            .get(((latencies.len() as f64 - 1.0) * p).round() as usize)
            .map_or(f64::NAN, |d| d.as_secs_f64() * 1e3)
    };
    println!(
        "{}",
        serde_json::json!({
            "requests": latencies.len(),
            "errors": all.errors,
            "first_error": all.first_error,
            "rps": latencies.len() as f64 / elapsed,
            "seconds": elapsed,
            "p50_ms": pct(0.50),
            "p99_ms": pct(0.99),
            "p999_ms": pct(0.999),
            "connections": connections,
            "connects": all.connects,
            "tls": format!("{} {}", all.negotiated.version, all.negotiated.suite),
            "alpn": all.negotiated.alpn,
            "client_cpu_busy": cpu / elapsed,
        })
    );
    Ok(())
}
