//! A gRPC-shaped upstream for the load benchmarks: HTTP/2 over TLS (ALPN
//! `h2` only, as a gRPC server), one thread. Every `POST` has its body read
//! to the end, then gets `200`, `content-type: application/grpc`, one
//! length-prefixed message (field 1 = "ok") and the trailer
//! `grpc-status: 0`. Plain HTTP/1.1 on `--stats` answers JSON counters, so
//! a harness can tell calls that reached this server (and carried an
//! `Authorization`) from answers a proxy made itself (a gRPC refusal is an
//! HTTP `200` too): calls served, calls with `authorization: Bearer …`, TLS
//! connections accepted, and each handshake's TLS version, suite, ALPN
//! protocol and kind (full or resumed).
//!
//!   grpcup --listen 127.0.0.1:19198 --cert up.pem --key up.key --stats 127.0.0.1:19203
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a benchmark tool: a failed setup step should stop the run with its message"
)]

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::Context as _;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response};
use http_body_util::{BodyExt as _, Full, combinators::UnsyncBoxBody};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;

/// The answer's message: `0` (not compressed), length 4, then field 1
/// (string) = "ok".
const MESSAGE: &[u8] = &[0, 0, 0, 0, 4, 0x0a, 0x02, b'o', b'k'];

#[derive(Default)]
struct Stats {
    served: AtomicU64,
    authorized: AtomicU64,
    connections: AtomicU64,
    handshakes: Mutex<BTreeMap<String, u64>>,
}

fn flag(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
}

type Body = UnsyncBoxBody<Bytes, Infallible>;

fn report(stats: &Stats) -> Response<Full<Bytes>> {
    let handshakes = stats
        .handshakes
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let json = serde_json::json!({
        "served": stats.served.load(Ordering::Relaxed),
        "authorized": stats.authorized.load(Ordering::Relaxed),
        "connections": stats.connections.load(Ordering::Relaxed),
        "handshakes": handshakes,
    });
    Response::new(Full::new(Bytes::from(json.to_string())))
}

fn answer(req: &Request<Incoming>, stats: &Stats) -> Response<Body> {
    stats.served.fetch_add(1, Ordering::Relaxed);
    let bearer = req
        .headers()
        .get(http::header::AUTHORIZATION)
        .is_some_and(|v| v.as_bytes().starts_with(b"Bearer "));
    if bearer {
        stats.authorized.fetch_add(1, Ordering::Relaxed);
    }
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", HeaderValue::from_static("0"));
    let body = Full::new(Bytes::from_static(MESSAGE))
        .with_trailers(std::future::ready(Some(Ok(trailers))))
        .boxed_unsync();
    Response::builder()
        .header(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        )
        .body(body)
        .expect("response")
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let listen = flag(&args, "--listen").context("--listen")?;
    let cert = flag(&args, "--cert").context("--cert")?;
    let key = flag(&args, "--key").context("--key")?;
    let stats = flag(&args, "--stats").context("--stats")?;
    let chain = CertificateDer::pem_file_iter(&cert)
        .with_context(|| cert.clone())?
        .collect::<Result<Vec<_>, _>>()?;
    let key = PrivateKeyDer::from_pem_file(&key).with_context(|| key.clone())?;
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_single_cert(chain, key)?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(serve(listen, acceptor, stats))
}

async fn serve(listen: String, acceptor: TlsAcceptor, stats_addr: String) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(&listen)
        .await
        .with_context(|| listen.clone())?;
    let stats_listener = tokio::net::TcpListener::bind(&stats_addr)
        .await
        .with_context(|| stats_addr.clone())?;
    let stats = Arc::new(Stats::default());
    let reporting = stats.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = stats_listener.accept().await {
            let stats = reporting.clone();
            let service = hyper::service::service_fn(move |_: Request<Incoming>| {
                std::future::ready(Ok::<_, Infallible>(report(&stats)))
            });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), service),
            );
        }
    });
    loop {
        let (tcp, _) = listener.accept().await?;
        let _ = tcp.set_nodelay(true);
        let (acceptor, stats) = (acceptor.clone(), stats.clone());
        tokio::spawn(async move {
            let Ok(tls) = acceptor.accept(tcp).await else {
                return;
            };
            stats.connections.fetch_add(1, Ordering::Relaxed);
            let c = tls.get_ref().1;
            let shape = format!(
                "{} {} {} {}",
                c.protocol_version()
                    .map_or_else(String::new, |v| format!("{v:?}")),
                c.negotiated_cipher_suite()
                    .map_or_else(String::new, |s| format!("{:?}", s.suite())),
                c.alpn_protocol()
                    .map_or_else(String::new, |p| String::from_utf8_lossy(p).into_owned()),
                c.handshake_kind()
                    .map_or_else(String::new, |k| format!("{k:?}")),
            );
            *stats
                .handshakes
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .entry(shape)
                .or_default() += 1;
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let stats = stats.clone();
                async move {
                    let resp = answer(&req, &stats);
                    // A unary call: the request's message is read before the answer.
                    let _ = req.into_body().collect().await;
                    Ok::<_, Infallible>(resp)
                }
            });
            let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .max_concurrent_streams(1000)
                .serve_connection(TokioIo::new(tls), service)
                .await;
        });
    }
}
