//! Credentials never leak back or sideways: TRACE is refused, an upstream
//! that sends the injected credential back has it removed (and the control
//! plane is told), and a workload's own query parameter that decodes to the
//! injection parameter's name is stripped and counted.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test stops at the first failed step, with its message"
)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use leash_tests::*;

/// An upstream that echoes what it got: the `Authorization` header back as
/// `x-echo`, the request target as `x-target` and in a `Location`, and every
/// request target it saw into `targets`.
async fn echoing_upstream() -> (SocketAddr, Arc<Mutex<Vec<String>>>) {
    let l = listener().await;
    let addr = l.local_addr().unwrap();
    let targets = Arc::new(Mutex::new(Vec::new()));
    let seen = targets.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = l.accept().await {
            let seen = seen.clone();
            let svc =
                hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let seen = seen.clone();
                    async move {
                        let target = req.uri().to_string();
                        seen.lock().unwrap().push(target.clone());
                        let auth = req
                            .headers()
                            .get("authorization")
                            .cloned()
                            .unwrap_or(http::HeaderValue::from_static("none"));
                        let resp = http::Response::builder()
                            .status(302)
                            .header("x-echo", auth)
                            .header("x-target", &target)
                            .header("location", format!("https://elsewhere.example{target}"))
                            .header("x-clean", "nothing secret here")
                            .body(Full::new(Bytes::from_static(b"{}")))
                            .unwrap();
                        Ok::<_, Infallible>(resp)
                    }
                });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc),
            );
        }
    });
    (addr, targets)
}

fn policy(up: SocketAddr) -> String {
    format!(
        r#"version: 1
upstreams:
  - name: payments
    hosts: [payments.leash.test]
    target: http://{up}
    credential: {{ kind: jwt, ttl: 5m }}
  - name: query
    hosts: [query.leash.test]
    target: http://{up}
    credential: {{ kind: jwt, ttl: 5m, audience: payments }}
    inject: {{ type: query, param: access_token }}
grants:
  - workload: {APP_ID}
    upstreams: [payments, query]
"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_never_come_back_or_go_sideways() {
    init();
    let dir = short_tempdir();
    let ids = Identities::start(dir.path(), Duration::from_secs(600), &[CP_ID, APP_ID]);
    let (up, targets) = echoing_upstream().await;
    let policy = write_policy(dir.path(), &policy(up));
    let cp = start_control_plane(&ids, CP_ID, &policy, &dir.path().join("data")).await;
    let sidecar = start_sidecar(sidecar_config(ids.endpoint(APP_ID), cp.sidecar_addr)).await;
    wait_ready(sidecar.admin_addr).await;
    let client = ProxyClient::new(sidecar.egress_addr);
    let admin = Admin::bootstrap(cp.admin_addr, &dir.path().join("data"));

    // TRACE and TRACK would reflect the injected credential: refused.
    for method in ["TRACE", "TRACK", "track"] {
        let a = client
            .send(method, "http://payments.leash.test/x", &[], Bytes::new())
            .await
            .unwrap();
        assert_eq!(a.status, 405, "{method}");
        assert_eq!(a.json()["error"], "trace_refused");
    }
    assert!(targets.lock().unwrap().is_empty(), "nothing was sent");

    // The header credential comes back in `x-echo`: removed; the rest stays.
    let a = client
        .get("http://payments.leash.test/a", &[])
        .await
        .unwrap();
    assert_eq!(a.status, 302);
    assert!(a.headers.get("x-echo").is_none(), "{:?}", a.headers);
    assert_eq!(a.headers["x-clean"], "nothing secret here");
    assert!(
        a.headers.get("location").is_some(),
        "a clean redirect is kept"
    );

    // The query credential comes back in the target and the `Location`.
    let a = client
        .get("http://query.leash.test/b?x=1", &[])
        .await
        .unwrap();
    assert!(a.headers.get("x-target").is_none(), "{:?}", a.headers);
    assert!(a.headers.get("location").is_none(), "{:?}", a.headers);
    assert!(
        targets
            .lock()
            .unwrap()
            .last()
            .unwrap()
            .contains("access_token=")
    );

    // The workload's own parameter, however it spells the name, is stripped.
    for own in [
        "http://query.leash.test/c?access%5Ftoken=mine&y=2",
        "http://query.leash.test/c?y=2;access_token=mine",
        "http://query.leash.test/c?acc%65ss_token=mine",
    ] {
        let a = client.get(own, &[]).await.unwrap();
        assert_eq!(a.status, 302, "{own}");
        let sent = targets.lock().unwrap().last().unwrap().clone();
        assert!(!sent.contains("mine"), "{own} was sent as {sent}");
        assert_eq!(sent.matches("access_token=").count(), 1, "{sent}");
    }

    // The control plane hears of both.
    let v = eventually(
        Duration::from_secs(10),
        "echoes and strips reported",
        || async {
            let v = admin.get("/v1/stripped").await.json();
            let echoed: i64 = v["echoed"]
                .as_array()?
                .iter()
                .map(|e| e["count"].as_i64().unwrap_or(0))
                .sum();
            let stripped: i64 = v["stripped"]
                .as_array()?
                .iter()
                .map(|e| e["count"].as_i64().unwrap_or(0))
                .sum();
            // x-echo once; x-target and location for each of the four query calls.
            (echoed == 9 && stripped == 3).then_some(v)
        },
    )
    .await;
    let headers: Vec<&str> = v["echoed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["header"].as_str().unwrap())
        .collect();
    for h in ["x-echo", "x-target", "location"] {
        assert!(headers.contains(&h), "{h} in {headers:?}");
    }
    sidecar.shutdown(Duration::from_secs(2)).await;
}
