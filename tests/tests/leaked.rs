//! Leaked secrets are refused at runtime wherever a workload sends them, and
//! the control plane learns which workload still holds them.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test stops at the first failed step, with its message"
)]

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

/// Every carrier × encoding in the README's table, through the real sidecar:
/// refused before anything reaches the upstream. And the hostile shapes (a
/// 10,000-segment path, a gzip bomb, a body behind 5,000 bytes of spaces)
/// get a clear answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_carrier_and_encoding_is_refused() {
    use std::io::Write as _;
    let d = Deployment::start_with(policy, SVID_TTL, None).await;
    let admin = d.admin();
    // A second value with separators inside it.
    const WITH_COLON: &str = "deploy:pa55-w0rd;leak";
    for value in [LEAKED, WITH_COLON] {
        let r = admin
            .post("/v1/leaked", json!({"value": value, "reason": "r"}))
            .await;
        assert_eq!(r.status, 201);
        admin
            .wait_acknowledged(r.json()["id"].as_str().unwrap(), 1)
            .await;
    }
    let pct = |v: &str| -> String { v.bytes().map(|b| format!("%{b:02X}")).collect() };
    let gzip = |v: &[u8]| {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(v).unwrap();
        e.finish().unwrap()
    };
    let unpadded =
        base64::engine::general_purpose::STANDARD_NO_PAD.encode(format!("user:{LEAKED}"));
    let json_escaped = format!("{{\"token\":\"{}\"}}", LEAKED.replace('_', "\\u005f"));
    let form = format!("a=1&token={}", pct(LEAKED));
    let spaced = format!("{}{{\"token\":\"{LEAKED}\"}}", " ".repeat(5000));
    let pay = "http://payments.leash.test";
    let up = "http://uploads.leash.test/echo";
    type Case = (
        &'static str,
        String,
        Vec<(&'static str, String)>,
        Vec<u8>,
        &'static str,
    );
    let cases: Vec<Case> = vec![
        (
            "GET",
            format!("{pay}/hooks/{LEAKED}"),
            vec![],
            vec![],
            "path",
        ),
        (
            "GET",
            format!("{pay}/bot{LEAKED}/send"),
            vec![],
            vec![],
            "path",
        ),
        (
            "GET",
            format!("{pay}/hooks/{}", pct(LEAKED)),
            vec![],
            vec![],
            "path",
        ),
        (
            "GET",
            format!("{pay}/x?{LEAKED}=1"),
            vec![],
            vec![],
            "query-name",
        ),
        (
            "GET",
            format!("{pay}/x?k={}", pct(LEAKED)),
            vec![],
            vec![],
            "query:k",
        ),
        (
            "GET",
            format!("{pay}/x"),
            vec![("cookie", format!("a=1; k={}", pct(LEAKED)))],
            vec![],
            "header:cookie",
        ),
        (
            "GET",
            format!("{pay}/x"),
            vec![("x-token", pct(LEAKED))],
            vec![],
            "header:x-token",
        ),
        (
            "GET",
            format!("{pay}/x"),
            vec![("authorization", format!("Basic {unpadded}"))],
            vec![],
            "header:authorization",
        ),
        (
            "GET",
            format!("{pay}/x"),
            vec![("x-creds", format!("a={WITH_COLON}, b=2"))],
            vec![],
            "header:x-creds",
        ),
        (
            "GET",
            format!("{pay}/x?c={WITH_COLON}&d=1"),
            vec![],
            vec![],
            "query:c",
        ),
        (
            "POST",
            up.into(),
            vec![("content-type", "application/json".into())],
            json_escaped.into_bytes(),
            "body",
        ),
        (
            "POST",
            up.into(),
            vec![("content-type", "application/x-www-form-urlencoded".into())],
            form.into_bytes(),
            "body",
        ),
        (
            "POST",
            up.into(),
            vec![("content-encoding", "gzip".into())],
            gzip(format!("{{\"t\":\"{LEAKED}\"}}").as_bytes()),
            "body:gzip",
        ),
        ("POST", up.into(), vec![], spaced.into_bytes(), "body"),
    ];
    for (method, url, headers, body, location) in &cases {
        let h: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let a = d
            .client
            .send(method, url, &h, bytes::Bytes::from(body.clone()))
            .await
            .unwrap();
        assert_eq!(
            a.status,
            403,
            "{method} {url} {headers:?}: {}",
            String::from_utf8_lossy(&a.body)
        );
        let v = a.json();
        assert_eq!(v["error"], "leaked_secret");
        assert_eq!(v["location"], *location, "{url} {headers:?}");
    }
    assert_eq!(
        d.seen.lock().unwrap().len(),
        0,
        "nothing reached the upstream"
    );

    // Hostile shapes: clear answers, nothing leaked, bounded work.
    let long_path = format!("{pay}{}", "/a".repeat(10_000));
    let a = d.client.get(&long_path, &[]).await.unwrap();
    assert!(
        a.status == 431 || a.status == 200 || a.status == 404,
        "{}",
        a.status
    );
    let bomb = {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        let zeros = vec![0u8; 1 << 20];
        for _ in 0..50 {
            e.write_all(&zeros).unwrap();
        }
        e.finish().unwrap()
    };
    let a = d
        .client
        .send(
            "POST",
            up,
            &[("content-encoding", "gzip")],
            bytes::Bytes::from(bomb),
        )
        .await
        .unwrap();
    assert_eq!(
        a.status, 200,
        "a clean compressed body is forwarded as sent"
    );
    let a = d
        .client
        .send("POST", up, &[], bytes::Bytes::from(" ".repeat(70 * 1024)))
        .await
        .unwrap();
    assert_eq!(a.status, 400, "more leading whitespace than the scan reads");
    assert_eq!(a.json()["error"], "bad_request");
}
