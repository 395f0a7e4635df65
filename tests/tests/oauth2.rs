//! OAuth2 client credentials: the control plane exchanges the brokered
//! client secret at the upstream's token endpoint and leases the access
//! token; a failing endpoint gives clear errors and never an expired token.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test stops at the first failed step, with its message"
)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use leash_tests::*;
use serde_json::json;

const CLIENT_SECRET: &str = "client-secret-Zm9vYmFyYmF6";

#[derive(Clone, Copy, PartialEq, Debug)]
enum Mode {
    Ok,
    Garbage,
    Slow,
    Refuse,
}

#[derive(Default)]
struct Endpoint {
    mode: Option<Mode>,
    /// (token, issued at, expires_in)
    issued: Vec<(String, Instant, u64)>,
    authorizations: Vec<String>,
}

async fn token_endpoint(listener: tokio::net::TcpListener, state: Arc<Mutex<Endpoint>>) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let state = state.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(
                move |req: http::Request<hyper::body::Incoming>| {
                    let state = state.clone();
                    async move {
                        let auth = req
                            .headers()
                            .get("authorization")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or_default()
                            .to_owned();
                        let mode = {
                            let mut s = state.lock().unwrap();
                            s.authorizations.push(auth);
                            s.mode.unwrap_or(Mode::Ok)
                        };
                        let (status, body) = match mode {
                            Mode::Ok => {
                                let mut s = state.lock().unwrap();
                                let token = format!("at-{}", s.issued.len() + 1);
                                s.issued.push((token.clone(), Instant::now(), 6));
                                (200, json!({"access_token": token, "token_type": "Bearer", "expires_in": 6}).to_string())
                            }
                            Mode::Garbage => (200, "<html>maintenance</html>".to_owned()),
                            Mode::Refuse => (401, json!({"error": "invalid_client"}).to_string()),
                            Mode::Slow => {
                                tokio::time::sleep(Duration::from_secs(30)).await;
                                (200, "{}".to_owned())
                            }
                        };
                        let mut resp = http::Response::new(Full::new(Bytes::from(body)));
                        *resp.status_mut() = http::StatusCode::from_u16(status).unwrap();
                        Ok::<_, std::convert::Infallible>(resp)
                    }
                },
            );
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), svc)
                .await;
        });
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_exchange_lease_failures_and_recovery() {
    let endpoint_listener = listener().await;
    let token_addr: SocketAddr = endpoint_listener.local_addr().unwrap();
    let state = Arc::new(Mutex::new(Endpoint::default()));
    let server = tokio::spawn(token_endpoint(endpoint_listener, state.clone()));

    let d = Deployment::start_with(
        move |up| {
            format!(
                r#"version: 1
upstreams:
  - name: crm
    hosts: [crm.leash.test]
    target: http://{up}
    credential:
      kind: oauth2-client-credentials
      token_url: http://{token_addr}/token
      client_id: leash-client
      scopes: [read, write]
      ttl: 5m
grants:
  - workload: {APP_ID}
    upstreams: [crm]
"#
            )
        },
        Duration::from_secs(600),
        None,
    )
    .await;
    let admin = d.admin();
    let get = || async {
        d.client
            .get("http://crm.leash.test/echo", &[])
            .await
            .unwrap()
    };

    let a = get().await;
    assert_eq!(a.status, 403, "no client secret yet");
    assert!(String::from_utf8_lossy(&a.body).contains("no_secret"));
    assert_eq!(
        admin
            .post("/v1/secrets/crm", json!({"value": CLIENT_SECRET}))
            .await
            .status,
        201
    );

    let a = get().await;
    assert_eq!(a.status, 200, "{}", String::from_utf8_lossy(&a.body));
    assert_eq!(a.json()["headers"]["authorization"], "Bearer at-1");
    {
        let s = state.lock().unwrap();
        let basic = s.authorizations[0].strip_prefix("Basic ").unwrap();
        let decoded = String::from_utf8(
            base64::Engine::decode(&base64::engine::general_purpose::STANDARD, basic).unwrap(),
        )
        .unwrap();
        assert_eq!(decoded, format!("leash-client:{CLIENT_SECRET}"));
    }

    // Each failure mode, once the current token's lease has run out.
    for (mode, expect) in [
        (Mode::Garbage, "not a token response"),
        (Mode::Refuse, "invalid_client"),
        (Mode::Slow, "did not answer"),
    ] {
        state.lock().unwrap().mode = Some(mode);
        // A fetch started under the previous mode may still answer first.
        let refused = eventually(Duration::from_secs(20), "lease runs out", || async {
            let a = get().await;
            let this_mode = String::from_utf8_lossy(&a.body).contains(expect) || mode == Mode::Slow;
            (a.status == 503 && this_mode).then_some(a)
        })
        .await;
        let body = refused.json();
        assert_eq!(body["error"], "credential_unavailable", "{mode:?}");
        let message = body["message"].as_str().unwrap();
        assert!(
            message.contains(expect) || mode == Mode::Slow,
            "{mode:?}: {message}"
        );
        assert!(!message.contains(CLIENT_SECRET));
    }

    // Down altogether.
    server.abort();
    let _ = server.await;
    let a = get().await;
    assert_eq!(a.status, 503);

    // Back: recovery on its own.
    let relisten = tokio::net::TcpListener::bind(token_addr).await.unwrap();
    state.lock().unwrap().mode = Some(Mode::Ok);
    tokio::spawn(token_endpoint(relisten, state.clone()));
    let a = eventually(Duration::from_secs(20), "recovered", || async {
        let a = get().await;
        (a.status == 200).then_some(a)
    })
    .await;
    assert!(
        a.json()["headers"]["authorization"]
            .as_str()
            .unwrap()
            .starts_with("Bearer at-")
    );

    // The upstream never received a token past its expiry.
    let issued = state.lock().unwrap().issued.clone();
    for s in d.seen.lock().unwrap().iter() {
        let Some(token) = s
            .credential
            .as_deref()
            .and_then(|c| c.strip_prefix("Bearer "))
        else {
            continue;
        };
        let (_, at, expires_in) = issued
            .iter()
            .find(|(t, _, _)| t == token)
            .expect("a token the endpoint issued");
        assert!(
            s.at < *at + Duration::from_secs(*expires_in),
            "{token} used after it expired"
        );
    }

    // An OAuth2 lease is on file like a JWT and revocable by its id: the
    // control plane drops the cached token and exchanges anew.
    let a = get().await;
    assert_eq!(a.status, 200);
    let old_token = a.json()["headers"]["authorization"]
        .as_str()
        .unwrap()
        .to_owned();
    let id = d
        .sidecar
        .link
        .routes
        .load()
        .by_name("crm")
        .unwrap()
        .current
        .load_full()
        .unwrap()
        .id
        .to_string();
    assert!(id.starts_with("oauth2:crm:"), "{id}");
    let r = admin
        .post(
            "/v1/revocations",
            json!({"kind": "credential", "credential_id": id, "reason": "token logged by a proxy"}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    admin
        .wait_acknowledged(r.json()["id"].as_str().unwrap(), 1)
        .await;
    let a = get().await;
    assert_eq!(a.status, 200, "{}", String::from_utf8_lossy(&a.body));
    let new_token = a.json()["headers"]["authorization"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_ne!(
        new_token, old_token,
        "a fresh exchange after the revocation"
    );
}
