//! Leaked secrets are refused at runtime wherever a workload sends them, and
//! the control plane learns which workload still holds them.

use std::net::SocketAddr;
use std::time::Duration;

use base64::Engine as _;
use leash_tests::*;
use serde_json::json;

const SVID_TTL: Duration = Duration::from_secs(600);
const LEAKED: &str = "ghp_leaked0123456789abcdefXYZ";

fn policy(up: SocketAddr) -> String {
    format!(
        r#"version: 1
upstreams:
  - name: payments
    hosts: [payments.leash.test]
    target: http://{up}
    credential: {{ kind: jwt, ttl: 5m }}
  - name: uploads
    hosts: [uploads.leash.test]
    target: http://{up}
    credential: {{ kind: jwt, ttl: 5m, audience: payments }}
    scan_body_bytes: 4096
grants:
  - workload: {APP_ID}
    upstreams: [payments, uploads]
"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leaked_value_is_refused_everywhere_and_the_sender_is_named() {
    let d = Deployment::start_with(policy, SVID_TTL, None).await;
    let admin = d.admin();
    let r = admin
        .post(
            "/v1/leaked",
            json!({"value": LEAKED, "reason": "pushed to a public repo"}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    let reg = r.json();
    let id = reg["id"].as_str().unwrap().to_owned();
    assert!(
        !r.body.windows(LEAKED.len()).any(|w| w == LEAKED.as_bytes()),
        "value echoed"
    );
    admin.wait_acknowledged(&id, 1).await;

    let basic = base64::engine::general_purpose::STANDARD.encode(format!("deploy:{LEAKED}"));
    let bearer = format!("Bearer {LEAKED}");
    let basic = format!("Basic {basic}");
    let cookie = format!("theme=dark; token={LEAKED}");
    type Case<'a> = (String, Vec<(&'a str, &'a str)>, &'a str);
    let cases: Vec<Case> = vec![
        (
            "http://payments.leash.test/whoami".into(),
            vec![("authorization", &bearer)],
            "header:authorization",
        ),
        (
            "http://payments.leash.test/whoami".into(),
            vec![("authorization", &basic)],
            "header:authorization",
        ),
        (
            "http://payments.leash.test/whoami".into(),
            vec![("x-api-key", LEAKED)],
            "header:x-api-key",
        ),
        (
            "http://payments.leash.test/whoami".into(),
            vec![("cookie", &cookie)],
            "header:cookie",
        ),
        (
            format!("http://payments.leash.test/whoami?api_key={LEAKED}"),
            vec![],
            "query:api_key",
        ),
        // Hosts policy does not name are scanned too.
        (
            "http://unmanaged.example.com/".into(),
            vec![("x-api-key", LEAKED)],
            "header:x-api-key",
        ),
    ];
    for (url, headers, location) in &cases {
        let a = d.client.get(url, headers).await.unwrap();
        assert_eq!(a.status, 403, "{url} {headers:?}");
        let body = a.json();
        assert_eq!(body["error"], "leaked_secret");
        assert_eq!(body["location"], *location);
        assert_eq!(body["workload"], APP_ID);
        assert_eq!(body["revocation_id"], id.as_str());
        assert!(
            !a.body.windows(LEAKED.len()).any(|w| w == LEAKED.as_bytes()),
            "refusal echoes the value"
        );
    }
    // The same requests without it pass; a longer token merely containing it
    // is not a match (whole-token matching, see proxy/src/leak.rs).
    let longer = format!("Bearer x{LEAKED}x");
    for headers in [
        vec![("x-api-key", "ghp_fine0123456789abcdef")],
        vec![("authorization", longer.as_str())],
    ] {
        let a = d
            .client
            .get("http://payments.leash.test/whoami", &headers)
            .await
            .unwrap();
        assert_eq!(a.status, 200, "{headers:?}");
    }
    // None of the refused requests reached the upstream.
    let seen = d.seen.lock().unwrap().len();
    assert_eq!(seen, 2, "only the two clean requests arrived");

    // Forgotten consumers: who sent it, to what, where, how often.
    let show = eventually(Duration::from_secs(10), "sightings recorded", || async {
        let v = admin.get(&format!("/v1/leaked/{id}")).await.json();
        let total: i64 = v["sightings"]
            .as_array()?
            .iter()
            .map(|s| s["count"].as_i64().unwrap_or(0))
            .sum();
        (total == cases.len() as i64).then_some(v)
    })
    .await;
    let sightings = show["sightings"].as_array().unwrap();
    assert!(sightings.iter().all(|s| s["workload"] == APP_ID));
    let auth = sightings
        .iter()
        .find(|s| s["upstream"] == "payments" && s["location"] == "header:authorization")
        .unwrap();
    assert_eq!(auth["count"], 2);
    assert!(
        sightings
            .iter()
            .any(|s| s["upstream"] == "" && s["host"] == "unmanaged.example.com")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn body_scan_is_opt_in_and_bounded() {
    let d = Deployment::start_with(policy, SVID_TTL, None).await;
    let admin = d.admin();
    let id = admin
        .post("/v1/leaked", json!({"value": LEAKED, "reason": "r"}))
        .await
        .json()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    admin.wait_acknowledged(&id, 1).await;
    let post = |host: &'static str, body: String| {
        let proxy = d.sidecar.egress_addr;
        async move {
            let stream = tokio::net::TcpStream::connect(proxy).await.unwrap();
            let (mut send, conn) =
                hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                    .await
                    .unwrap();
            tokio::spawn(conn);
            let req = http::Request::post(format!("http://{host}/echo"))
                .header("host", host)
                .body(http_body_util::Full::new(bytes::Bytes::from(body)))
                .unwrap();
            send.send_request(req).await.unwrap().status().as_u16()
        }
    };
    let json_body = format!("{{\"name\":\"x\",\"token\":\"{LEAKED}\"}}");
    assert_eq!(
        post("uploads.leash.test", json_body.clone()).await,
        403,
        "scanned upstream"
    );
    assert_eq!(
        post("payments.leash.test", json_body).await,
        200,
        "not opted in"
    );
    // Beyond the scanned prefix it is not looked for; the body still arrives whole.
    let late = format!("{}{LEAKED}", "a ".repeat(3000));
    assert_eq!(post("uploads.leash.test", late).await, 200);
    assert_eq!(
        post(
            "uploads.leash.test",
            "{\"token\":\"clean-value-123\"}".into()
        )
        .await,
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workloads_still_sending_their_own_credential_are_reported() {
    let d = Deployment::start_with(policy, SVID_TTL, None).await;
    for _ in 0..3 {
        let a = d
            .client
            .get(
                "http://payments.leash.test/whoami",
                &[("authorization", "Bearer my-old-static-key")],
            )
            .await
            .unwrap();
        assert_eq!(a.status, 200);
    }
    let admin = d.admin();
    let rows = eventually(
        Duration::from_secs(10),
        "stripped credentials reported",
        || async {
            let v = admin.get("/v1/stripped").await.json();
            let rows = v["stripped"].as_array()?.clone();
            (rows.first()?["count"] == 3).then_some(rows)
        },
    )
    .await;
    assert_eq!(rows[0]["workload"], APP_ID);
    assert_eq!(rows[0]["upstream"], "payments");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registration_validates_and_never_stores_the_value() {
    let d = Deployment::start("5m", SVID_TTL).await;
    let admin = d.admin();
    assert_eq!(
        admin
            .post("/v1/leaked", json!({"value": "short", "reason": "r"}))
            .await
            .status,
        400
    );
    assert_eq!(
        admin
            .post("/v1/leaked", json!({"value": LEAKED}))
            .await
            .status,
        400
    );
    let viewer_token = admin
        .post("/v1/tokens", json!({"name": "v", "role": "viewer"}))
        .await
        .json()["token"]
        .as_str()
        .unwrap()
        .to_owned();
    let viewer = admin.with_token(Some(&viewer_token));
    assert_eq!(
        viewer
            .post("/v1/leaked", json!({"value": LEAKED, "reason": "r"}))
            .await
            .status,
        403
    );
    assert_eq!(
        admin
            .post("/v1/leaked", json!({"value": LEAKED, "reason": "r"}))
            .await
            .status,
        201
    );
    assert_eq!(
        admin
            .post("/v1/leaked", json!({"value": LEAKED, "reason": "again"}))
            .await
            .status,
        409
    );
    // A leaked value cannot be un-leaked.
    let id = admin.get("/v1/leaked").await.json()["leaked"][0]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(
        admin
            .post(
                &format!("/v1/revocations/{id}/restore"),
                json!({"reason": "r"})
            )
            .await
            .status,
        409
    );
    // Nor registered through the generic endpoint.
    assert_eq!(
        admin
            .post("/v1/revocations", json!({"kind": "leaked", "reason": "r"}))
            .await
            .status,
        400
    );

    let audit = admin.get("/v1/audit").await;
    assert!(
        !audit
            .body
            .windows(LEAKED.len())
            .any(|w| w == LEAKED.as_bytes())
    );
    d.cp.shutdown(Duration::from_secs(5)).await;
    for file in ["leash.db", "leash.db-wal"] {
        let path = d.dir.path().join("data").join(file);
        if let Ok(bytes) = std::fs::read(&path) {
            assert!(
                !bytes.windows(LEAKED.len()).any(|w| w == LEAKED.as_bytes()),
                "{file} holds the value"
            );
        }
    }
}
