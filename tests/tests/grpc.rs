//! gRPC through the sidecar: a tonic client speaking HTTP/2 with prior
//! knowledge (h2c) to the proxy port, a tonic server behind TLS that chose
//! HTTP/2 by ALPN and checks the Leash JWT on every call. Unary and
//! bidirectional streaming work with the credential injected per request,
//! refusals arrive as gRPC statuses, and a revocation ends a running stream
//! (its own stream only) by the time it is acknowledged.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test stops at the first failed step, with its message"
)]

use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use leash_tests::echo::echo_client::EchoClient;
use leash_tests::echo::echo_server::{Echo, EchoServer};
use leash_tests::echo::{EchoReply, EchoRequest};
use leash_tests::*;
use serde_json::json;
use tokio_stream::StreamExt as _;
use tonic::{Code, Request, Response, Status, Streaming};

const SVID_TTL: Duration = Duration::from_secs(600);

/// The upstream: verifies the Leash JWT of every call, as a real service
/// would, and answers with its subject.
struct EchoService {
    verifier: Arc<leash_examples::Verifier>,
}

impl EchoService {
    async fn subject(&self, metadata: &tonic::metadata::MetadataMap) -> Result<String, Status> {
        let token = metadata
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or_else(|| Status::unauthenticated("no bearer token"))?;
        let claims = self
            .verifier
            .verify(token)
            .await
            .map_err(Status::unauthenticated)?;
        Ok(claims.sub)
    }
}

type ChatStream = Pin<Box<dyn tokio_stream::Stream<Item = Result<EchoReply, Status>> + Send>>;

#[tonic::async_trait]
impl Echo for EchoService {
    async fn unary(&self, req: Request<EchoRequest>) -> Result<Response<EchoReply>, Status> {
        let subject = self.subject(req.metadata()).await?;
        Ok(Response::new(EchoReply {
            text: req.into_inner().text,
            subject,
        }))
    }

    type ChatStream = ChatStream;

    async fn chat(
        &self,
        req: Request<Streaming<EchoRequest>>,
    ) -> Result<Response<Self::ChatStream>, Status> {
        let subject = self.subject(req.metadata()).await?;
        let mut inbound = req.into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        tokio::spawn(async move {
            while let Some(Ok(m)) = inbound.next().await {
                let reply = EchoReply {
                    text: m.text,
                    subject: subject.clone(),
                };
                if tx.send(Ok(reply)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}

/// Serves the echo service over TLS (HTTP/2 by ALPN) on `listener`.
fn serve_grpc_tls(
    listener: tokio::net::TcpListener,
    tls: tokio_rustls::TlsAcceptor,
    cp_admin: SocketAddr,
) {
    let verifier = Arc::new(leash_examples::Verifier::new(upstream_config(cp_admin)));
    let routes = tonic::service::Routes::new(EchoServer::new(EchoService { verifier }));
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let tls = tls.clone();
            let routes = routes.clone();
            tokio::spawn(async move {
                let Ok(stream) = tls.accept(tcp).await else {
                    return;
                };
                assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
                let svc = hyper::service::service_fn(move |req| {
                    tower::ServiceExt::oneshot(routes.clone(), req)
                });
                let _ =
                    hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                        .await;
            });
        }
    });
}

fn policy(up: SocketAddr, ca: &Path) -> String {
    let ca = ca.display();
    let port = up.port();
    format!(
        r#"version: 1
upstreams:
  - name: grpc
    hosts: [grpc.leash.test]
    target: https://127.0.0.1:{port}
    tls: {{ ca_file: {ca}, ca_only: true, server_name: payments.internal }}
    credential: {{ kind: jwt, ttl: 5m, audience: payments }}
  - name: ledger
    hosts: [ledger.leash.test]
    target: https://127.0.0.1:{port}
    tls: {{ ca_file: {ca}, ca_only: true, server_name: payments.internal }}
    credential: {{ kind: jwt, ttl: 5m, audience: payments }}
  - name: down
    hosts: [down.leash.test]
    target: https://127.0.0.1:1
    credential: {{ kind: jwt, ttl: 5m, audience: payments }}
grants:
  - workload: {APP_ID}
    upstreams: [grpc, down]
"#
    )
}

struct Grpc {
    cp: leash_control_plane::app::ControlPlane,
    dir: tempfile::TempDir,
    _ids: Identities,
    sidecar: leash_proxy::Sidecar,
}

async fn start() -> Grpc {
    init();
    let dir = short_tempdir();
    let ids = Identities::start(dir.path(), SVID_TTL, &[CP_ID, APP_ID]);
    let tls = upstream_pki_h2(dir.path());
    let up = listener().await;
    let policy = write_policy(
        dir.path(),
        &policy(
            up.local_addr().unwrap(),
            &dir.path().join("upstream-ca.pem"),
        ),
    );
    let cp = start_control_plane(&ids, CP_ID, &policy, &dir.path().join("data")).await;
    serve_grpc_tls(up, tls, cp.admin_addr);
    let sidecar = start_sidecar(sidecar_config(ids.endpoint(APP_ID), cp.sidecar_addr)).await;
    wait_ready(sidecar.admin_addr).await;
    Grpc {
        cp,
        dir,
        _ids: ids,
        sidecar,
    }
}

/// A tonic client calling `authority` through the sidecar's proxy port
/// (HTTP/2 with prior knowledge, one connection).
async fn client(proxy: SocketAddr, authority: &str) -> EchoClient<tonic::transport::Channel> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{authority}"))
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_uri: http::Uri| async move {
            let tcp = tokio::net::TcpStream::connect(proxy).await?;
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tcp))
        }))
        .await
        .unwrap();
    EchoClient::new(channel)
}

fn with_own_token<T>(msg: T) -> Request<T> {
    let mut req = Request::new(msg);
    // The workload's own (stale) credential: never reaches the server.
    req.metadata_mut()
        .insert("authorization", "Bearer my-old-static-key".parse().unwrap());
    req
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unary_and_bidirectional_calls_carry_the_injected_credential() {
    let g = start().await;
    let mut c = client(g.sidecar.egress_addr, "grpc.leash.test").await;
    let reply = c
        .unary(with_own_token(EchoRequest { text: "hi".into() }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.text, "hi");
    assert_eq!(reply.subject, APP_ID, "the server verified Leash's JWT");

    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut replies = c
        .chat(with_own_token(tokio_stream::wrappers::ReceiverStream::new(
            rx,
        )))
        .await
        .unwrap()
        .into_inner();
    for i in 0..3 {
        tx.send(EchoRequest {
            text: format!("m{i}"),
        })
        .await
        .unwrap();
        let r = replies.message().await.unwrap().unwrap();
        assert_eq!(
            (r.text.as_str(), r.subject.as_str()),
            (&*format!("m{i}"), APP_ID)
        );
    }
    drop(tx);
    assert!(replies.message().await.unwrap().is_none(), "ends with OK");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_are_grpc_statuses_with_the_leash_code() {
    let g = start().await;
    let proxy = g.sidecar.egress_addr;
    let status = client(proxy, "ledger.leash.test")
        .await
        .unary(EchoRequest { text: "x".into() })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(
        status.message().starts_with("leash not_granted:"),
        "{status:?}"
    );
    let status = client(proxy, "nowhere.leash.test")
        .await
        .unary(EchoRequest { text: "x".into() })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(status.message().contains("unknown_upstream"), "{status:?}");
    let status = client(proxy, "down.leash.test")
        .await
        .unary(EchoRequest { text: "x".into() })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        status.message().contains("upstream_unreachable"),
        "{status:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_ends_a_running_stream_not_the_connection() {
    let g = start().await;
    let mut c = client(g.sidecar.egress_addr, "grpc.leash.test").await;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut replies = c
        .chat(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    tx.send(EchoRequest { text: "a".into() }).await.unwrap();
    assert_eq!(replies.message().await.unwrap().unwrap().text, "a");

    let admin = Admin::bootstrap(g.cp.admin_addr, &g.dir.path().join("data"));
    let r = admin
        .revoke(json!({"kind": "grant", "workload": APP_ID, "upstream": "grpc", "reason": "stream must end"}))
        .await;
    admin.wait_acknowledged(r["id"].as_str().unwrap(), 1).await;
    // Acknowledged: the stream is already cut; nothing more comes through.
    let _ = tx.send(EchoRequest { text: "b".into() }).await;
    let next = tokio::time::timeout(Duration::from_secs(5), replies.message())
        .await
        .expect("the stream ends at once");
    assert!(next.is_err(), "the stream ended with an error: {next:?}");

    // The same client (one HTTP/2 connection) still works: its next call
    // is refused with the revocation, as a gRPC status.
    let status = c.unary(EchoRequest { text: "c".into() }).await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(status.message().contains("revoked_grant"), "{status:?}");
}
