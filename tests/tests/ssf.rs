//! Revocation events in: the control plane as an OpenID Shared Signals
//! receiver, against a transmitter built here with PyJWT (an implementation
//! no one here wrote) that signs Security Event Tokens as RFC 8417's
//! examples show and pushes them as RFC 8935 says. A RISC
//! `credential-compromise` becomes a revocation every sidecar acknowledges;
//! bad SETs are refused with RFC 8935's error codes, audited, and revoke
//! nothing.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test stops at the first failed step, with its message"
)]

use std::io::{BufRead as _, BufReader, Write as _};
use std::process::{ChildStdin, ChildStdout, Command, Stdio};
use std::time::Duration;

use leash_tests::*;
use serde_json::{Value, json};

const SVID_TTL: Duration = Duration::from_secs(600);
const ISSUER: &str = "https://idp.leash.test";
const AUDIENCE: &str = "https://leash.test/ssf";

/// Serves its JWKS, and for each JSON command on stdin signs a SET with
/// PyJWT and pushes it (or pushes raw bytes), printing the answer.
const TRANSMITTER: &str = r#"
import json, sys, threading, urllib.request, urllib.error
from http.server import ThreadingHTTPServer, BaseHTTPRequestHandler
import jwt
from jwt.algorithms import ECAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec

keys = {"good": ec.generate_private_key(ec.SECP256R1()), "other": ec.generate_private_key(ec.SECP256R1())}
public = json.loads(ECAlgorithm.to_jwk(keys["good"].public_key()))
public.update(kid="tx-1", use="sig", alg="ES256")
jwks = json.dumps({"keys": [public]}).encode()

class Jwks(BaseHTTPRequestHandler):
    def log_message(self, *a):
        pass
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(jwks)))
        self.end_headers()
        self.wfile.write(jwks)

server = ThreadingHTTPServer(("127.0.0.1", 0), Jwks)
threading.Thread(target=server.serve_forever, daemon=True).start()
print(server.server_address[1], flush=True)

for line in sys.stdin:
    cmd = json.loads(line)
    if "raw" in cmd:
        body = cmd["raw"].encode()
    else:
        body = jwt.encode(cmd["claims"], keys[cmd.get("key", "good")], algorithm="ES256",
                          headers={"typ": cmd.get("typ", "secevent+jwt"), "kid": "tx-1"}).encode()
    req = urllib.request.Request(cmd["url"], data=body, method="POST",
                                 headers={"Content-Type": "application/secevent+jwt"})
    try:
        with urllib.request.urlopen(req) as r:
            print(json.dumps({"status": r.status, "body": r.read().decode()}), flush=True)
    except urllib.error.HTTPError as e:
        print(json.dumps({"status": e.code, "body": e.read().decode()}), flush=True)
"#;

/// Receives the SETs Leash transmits, verifies each with PyJWT against the
/// control plane's JWKS (audience, issuer, typ), and appends what it got to
/// a file.
const RECEIVER: &str = r#"
import json, os
from http.server import ThreadingHTTPServer, BaseHTTPRequestHandler
import jwt

class Handler(BaseHTTPRequestHandler):
    def log_message(self, *a):
        pass
    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"])).decode()
        with open(os.environ["JWKS_URL_FILE"]) as f:
            jwks = jwt.PyJWKClient(f.read().strip())
        try:
            assert self.headers["Content-Type"] == "application/secevent+jwt"
            assert jwt.get_unverified_header(body)["typ"] == "secevent+jwt"
            claims = jwt.decode(body, jwks.get_signing_key_from_jwt(body).key, algorithms=["ES256"],
                                audience="https://siem.leash.test", issuer="leash-test",
                                options={"require": ["iat", "jti"], "verify_exp": False})
            record = {"events": list(claims["events"]), "sub_id": claims.get("sub_id"),
                      "txn": claims.get("txn"), "body": claims["events"]}
            status = 202
        except Exception as e:
            record, status = {"error": repr(e)}, 400
        with open(os.environ["OUT_FILE"], "a") as f:
            f.write(json.dumps(record) + "\n")
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
print(server.server_address[1], flush=True)
server.serve_forever()
"#;

struct Transmitter {
    _child: KillOnDrop,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Transmitter {
    fn push(&mut self, cmd: Value) -> (u16, Value) {
        writeln!(self.stdin, "{cmd}").unwrap();
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        let v: Value = serde_json::from_str(&line).unwrap();
        let body = v["body"].as_str().unwrap();
        let body = if body.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(body).unwrap()
        };
        (u16::try_from(v["status"].as_u64().unwrap()).unwrap(), body)
    }
}

fn now() -> i64 {
    i64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs(),
    )
    .unwrap()
}

/// A SET as RFC 8417 §2.1's examples show, with SSF 1.0's `sub_id`.
fn set(jti: &str, event: &str, sub_id: Value) -> Value {
    json!({
        "iss": ISSUER,
        "aud": AUDIENCE,
        "iat": now(),
        "jti": jti,
        "sub_id": sub_id,
        "events": { event: { "credential_type": "api-key", "event_timestamp": now() } },
    })
}

const COMPROMISE: &str =
    "https://schemas.openid.net/secevent/risc/event-type/credential-compromise";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_risc_event_becomes_a_revocation_every_sidecar_acknowledges() {
    init();
    let python = python_with("jwt, cryptography", "'pyjwt[crypto]'");
    let mut child = Command::new(python)
        .args(["-c", TRANSMITTER])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdin = child.stdin.take().unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    let jwks_port: u16 = line.trim().parse().unwrap();
    let mut tx = Transmitter {
        _child: KillOnDrop(child),
        stdin,
        stdout,
    };

    let dir = short_tempdir();
    let jwks_url_file = dir.path().join("jwks-url");
    let received_file = dir.path().join("received.jsonl");
    let mut cmd = Command::new(python_with("jwt, cryptography", "'pyjwt[crypto]'"));
    cmd.args(["-c", RECEIVER])
        .env("JWKS_URL_FILE", &jwks_url_file)
        .env("OUT_FILE", &received_file);
    let (_receiver, receiver_port) = python_server(cmd);
    let received = || -> Vec<Value> {
        std::fs::read_to_string(&received_file)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let ids = Identities::start(dir.path(), SVID_TTL, &[CP_ID, APP_ID, OTHER_ID]);
    let up = listener().await;
    let upstream = up.local_addr().unwrap();
    let policy = format!(
        r#"{}ssf:
  audience: {AUDIENCE}
  transmitters:
    - name: idp
      issuer: {ISSUER}
      jwks_url: http://127.0.0.1:{jwks_port}/jwks
  subjects:
    - format: iss_sub
      iss: {ISSUER}
      sub: svc-payments-client
      revoke: {{ workload: {APP_ID}, upstream: payments }}
  receivers:
    - name: siem
      endpoint_url: http://127.0.0.1:{receiver_port}/events
      audience: https://siem.leash.test
"#,
        standard_policy(upstream, "5m")
    );
    let policy = write_policy(dir.path(), &policy);
    let data = dir.path().join("data");
    let cp = start_control_plane(&ids, CP_ID, &policy, &data).await;
    std::fs::write(
        &jwks_url_file,
        format!("http://{}/.well-known/jwks.json", cp.admin_addr),
    )
    .unwrap();
    tokio::spawn(leash_examples::serve_observed(
        up,
        upstream_config(cp.admin_addr),
        None,
        None,
    ));
    let a = start_sidecar(sidecar_config(ids.endpoint(APP_ID), cp.sidecar_addr)).await;
    let b = start_sidecar(sidecar_config(ids.endpoint(OTHER_ID), cp.sidecar_addr)).await;
    wait_ready(a.admin_addr).await;
    wait_ready(b.admin_addr).await;
    let client = ProxyClient::new(a.egress_addr);
    let ok = client
        .get("http://payments.leash.test/whoami", &[])
        .await
        .unwrap();
    assert_eq!(ok.status, 200);
    let url = format!("http://{}/ssf/events", cp.admin_addr);
    let admin = Admin::bootstrap(cp.admin_addr, &data);
    let revocations = || async {
        admin.get("/v1/revocations").await.json()["revocations"]
            .as_array()
            .map_or(0, Vec::len)
    };
    let issuer_sub = json!({"format": "iss_sub", "iss": ISSUER, "sub": "svc-payments-client"});

    // Bad SETs: refused with RFC 8935's codes, and nothing revoked.
    let mut wrong_aud = set("bad-aud", COMPROMISE, issuer_sub.clone());
    wrong_aud["aud"] = json!("https://someone.else");
    let bad = [
        (
            json!({"url": url, "key": "other", "claims": set("bad-sig", COMPROMISE, issuer_sub.clone())}),
            "invalid_key",
        ),
        (json!({"url": url, "claims": wrong_aud}), "invalid_audience"),
        (
            json!({"url": url, "claims": set("unknown-type", "https://schemas.openid.net/secevent/risc/event-type/sessions-revoked-everywhere", issuer_sub.clone())}),
            "invalid_request",
        ),
        (
            json!({"url": url, "claims": set("unmapped", COMPROMISE, json!({"format": "opaque", "id": "nobody-knows"}))}),
            "invalid_request",
        ),
        (
            json!({"url": url, "typ": "JWT", "claims": set("wrong-typ", COMPROMISE, issuer_sub.clone())}),
            "invalid_request",
        ),
        (
            json!({"url": url, "raw": "x".repeat(70 * 1024)}),
            "invalid_request",
        ),
    ];
    for (cmd, code) in bad {
        let (status, body) = tx.push(cmd.clone());
        assert_eq!(
            (status, body["err"].as_str()),
            (400, Some(code)),
            "{cmd}: {body}"
        );
    }
    // An unknown issuer.
    let mut foreign = set("foreign", COMPROMISE, issuer_sub.clone());
    foreign["iss"] = json!("https://evil.example");
    let (status, body) = tx.push(json!({"url": url, "claims": foreign}));
    assert_eq!(
        (status, body["err"].as_str()),
        (400, Some("invalid_issuer")),
        "{body}"
    );
    assert_eq!(revocations().await, 0, "nothing was revoked");

    // A RISC credential-compromise for the mapped subject.
    let (status, body) =
        tx.push(json!({"url": url, "claims": set("evt-1", COMPROMISE, issuer_sub.clone())}));
    assert_eq!(status, 202, "{body}");
    let event = cp
        .state
        .store
        .ssf_event(ISSUER, "evt-1")
        .await
        .unwrap()
        .expect("recorded");
    let id = event.revocation_id.expect("became a revocation");
    let propagation = admin.wait_acknowledged(&id, 2).await;
    let last_ack = propagation["acknowledged"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["acked_at_ms"].as_i64().unwrap())
        .max()
        .unwrap();
    eprintln!(
        "SSF event received to last acknowledgement (2 sidecars): {} ms",
        last_ack - event.received_at_ms
    );
    let status = admin.get(&format!("/v1/revocations/{id}")).await.json();
    let r = &status;
    assert_eq!(r["kind"], "grant");
    assert_eq!(r["workload"], APP_ID);
    assert_eq!(r["revoked_by"], "ssf:idp");
    assert!(
        r["reason"]
            .as_str()
            .unwrap()
            .contains("credential-compromise")
            && r["reason"].as_str().unwrap().contains("evt-1")
            && r["reason"].as_str().unwrap().contains(ISSUER),
        "{r}"
    );
    let refused = client
        .get("http://payments.leash.test/whoami", &[])
        .await
        .unwrap();
    assert_eq!(refused.status, 403);
    assert_eq!(refused.json()["error"], "revoked_grant");

    // Leash transmits the revocation as a CAEP event; the receiver
    // verified its signature against Leash's JWKS.
    let sent = eventually(Duration::from_secs(10), "the CAEP event received", || {
        let got = received();
        let id = id.clone();
        async move { got.into_iter().find(|r| r["txn"] == id.as_str()) }
    })
    .await;
    assert_eq!(
        sent["events"][0], "https://schemas.openid.net/secevent/caep/event-type/session-revoked",
        "{sent}"
    );
    assert_eq!(sent["sub_id"], json!({"format": "uri", "uri": APP_ID}));

    // The same SET again: a replay.
    let (status, body) =
        tx.push(json!({"url": url, "claims": set("evt-1", COMPROMISE, issuer_sub.clone())}));
    assert_eq!(
        (status, body["err"].as_str()),
        (400, Some("invalid_request")),
        "{body}"
    );
    assert!(
        body["description"]
            .as_str()
            .unwrap()
            .contains("received before")
    );

    // A CAEP session-revoked whose subject is a SPIFFE ID (uri format).
    let caep = "https://schemas.openid.net/secevent/caep/event-type/session-revoked";
    let (status, body) = tx.push(json!({"url": url, "claims": set("evt-2", caep, json!({"format": "uri", "uri": OTHER_ID}))}));
    assert_eq!(status, 202, "{body}");

    // A leaked value registered: RISC credential-compromise. A verification
    // event on request. The stream's counts.
    let leaked = admin
        .post(
            "/v1/leaked",
            json!({"value": "ghp_transmittedLeak0123456789", "reason": "in a paste"}),
        )
        .await;
    assert_eq!(leaked.status, 201);
    let verify = admin
        .post(
            "/v1/ssf/verify",
            json!({"stream_id": "siem", "state": "st-42"}),
        )
        .await;
    assert_eq!(
        verify.status,
        204,
        "{}",
        String::from_utf8_lossy(&verify.body)
    );
    eventually(Duration::from_secs(10), "every event received", || {
        let got = received();
        async move {
            let has = |e: &str| got.iter().any(|r| r["events"][0].as_str() == Some(e));
            (has("https://schemas.openid.net/secevent/risc/event-type/credential-compromise")
                && got.iter().any(|r| r["body"]["https://schemas.openid.net/secevent/ssf/event-type/verification"]["state"] == "st-42")
                && got.len() == 4)
                .then_some(())
        }
    })
    .await;
    assert!(
        received().iter().all(|r| r["error"].is_null()),
        "{:?}",
        received()
    );
    let streams = admin.get("/v1/ssf/streams").await.json();
    assert_eq!(streams["streams"][0]["delivered"], 4, "{streams}");
    let config = http_get(&format!(
        "http://{}/.well-known/ssf-configuration",
        cp.admin_addr
    ))
    .await
    .unwrap()
    .json();
    assert_eq!(config["issuer"], "leash-test");
    assert!(
        config["jwks_uri"]
            .as_str()
            .unwrap()
            .ends_with("/.well-known/jwks.json")
    );

    // Every event is in the audit log, accepted or refused.
    let audit = admin.get("/v1/audit?limit=100").await.json();
    let ssf: Vec<&Value> = audit["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["path"] == "/ssf/events")
        .collect();
    assert_eq!(ssf.len(), 10, "{ssf:?}");
    assert_eq!(ssf.iter().filter(|e| e["status"] == 202).count(), 2);
    assert!(
        ssf.iter()
            .any(|e| e["detail"].as_str().unwrap().contains("invalid_key"))
    );
    let verified = admin.get("/v1/audit/verify").await.json();
    assert_eq!(verified["ok"], true, "{verified}");
}
