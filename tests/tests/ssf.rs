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
# RFC 8936: SETs held for polling until acknowledged or reported.
cond = threading.Condition()
pending, acked, errs, polls = {}, [], {}, [0]

def sign(cmd):
    return jwt.encode(cmd["claims"], keys[cmd.get("key", "good")], algorithm="ES256",
                      headers={"typ": cmd.get("typ", "secevent+jwt"), "kid": "tx-1"})

class Handler(BaseHTTPRequestHandler):
    def log_message(self, *a):
        pass
    def answer(self, status, body):
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def do_GET(self):
        self.answer(200, jwks)
    def do_POST(self):
        if self.headers.get("Authorization") != "Bearer poll-secret":
            return self.answer(401, b"{}")
        req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with cond:
            polls[0] += 1
            for j in req.get("ack", []):
                pending.pop(j, None)
                acked.append(j)
            for j, e in req.get("setErrs", {}).items():
                pending.pop(j, None)
                errs[j] = e
            if not pending and not req.get("returnImmediately"):
                cond.wait(2)
            sets = dict(list(pending.items())[:req.get("maxEvents", 100)])
        self.answer(200, json.dumps({"sets": sets}).encode())

server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
if len(sys.argv) > 2:
    import ssl
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(sys.argv[1], sys.argv[2])
    server.socket = tls.wrap_socket(server.socket, server_side=True)
threading.Thread(target=server.serve_forever, daemon=True).start()
print(server.server_address[1], flush=True)

for line in sys.stdin:
    cmd = json.loads(line)
    if "queue" in cmd:
        with cond:
            pending[cmd["claims"]["jti"]] = sign(cmd)
            cond.notify_all()
        print(json.dumps({"queued": cmd["claims"]["jti"]}), flush=True)
        continue
    if "state" in cmd:
        with cond:
            print(json.dumps({"pending": list(pending), "acked": acked, "errs": errs, "polls": polls[0]}), flush=True)
        continue
    body = cmd["raw"].encode() if "raw" in cmd else sign(cmd).encode()
    req = urllib.request.Request(cmd["url"], data=body, method="POST",
                                 headers={"Content-Type": "application/secevent+jwt"})
    try:
        with urllib.request.urlopen(req) as r:
            print(json.dumps({"status": r.status, "body": r.read().decode()}), flush=True)
    except urllib.error.HTTPError as e:
        print(json.dumps({"status": e.code, "body": e.read().decode()}), flush=True)
"#;

/// Polls a stream Leash transmits on (RFC 8936) as a receiver would:
/// verifies each SET with PyJWT against the control plane's JWKS,
/// acknowledges it in the next poll, and stops after `want` SETs; prints
/// what it got and how many SETs were still held after its last
/// acknowledgement.
const POLLER: &str = r#"
import json, sys, time, urllib.request
import jwt
endpoint, token, jwks_url, aud, iss, want = sys.argv[1:7]
jwks = jwt.PyJWKClient(jwks_url)
def poll(body):
    req = urllib.request.Request(endpoint, data=json.dumps(body).encode(), method="POST",
        headers={"Content-Type": "application/json", "Authorization": "Bearer " + token})
    with urllib.request.urlopen(req, timeout=40) as r:
        return json.loads(r.read())
got, ack = [], []
deadline = time.time() + 20
while len(got) < int(want) and time.time() < deadline:
    answer = poll({"ack": ack, "maxEvents": 10, "returnImmediately": False})
    ack = []
    for jti, s in answer["sets"].items():
        assert jwt.get_unverified_header(s)["typ"] == "secevent+jwt"
        claims = jwt.decode(s, jwks.get_signing_key_from_jwt(s).key, algorithms=["ES256"],
                            audience=aud, issuer=iss,
                            options={"require": ["iat", "jti"], "verify_exp": False})
        assert claims["jti"] == jti
        got.append(claims)
        ack.append(jti)
left = poll({"ack": ack, "returnImmediately": True})
print(json.dumps({"got": got, "left": len(left["sets"])}))
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
                      "txn": claims.get("txn"), "body": claims["events"],
                      "ack": claims.get("leash_acknowledgement"),
                      "sighting": claims.get("leash_sighting")}
            status = 202
        except Exception as e:
            record, status = {"error": repr(e)}, 400
        with open(os.environ["OUT_FILE"], "a") as f:
            f.write(json.dumps(record) + "\n")
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
if os.environ.get("TLS_CERT"):
    import ssl
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(os.environ["TLS_CERT"], os.environ["TLS_KEY"])
    server.socket = tls.wrap_socket(server.socket, server_side=True)
print(server.server_address[1], flush=True)
server.serve_forever()
"#;

struct Transmitter {
    _child: KillOnDrop,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Transmitter {
    /// Serves its JWKS and poll endpoint over HTTP, or over HTTPS with the
    /// certificate [`upstream_pki`] wrote to `tls`.
    fn start(tls: Option<&std::path::Path>) -> (Self, u16) {
        let python = python_with("jwt, cryptography", "'pyjwt[crypto]'");
        let mut cmd = Command::new(python);
        cmd.args(["-c", TRANSMITTER]);
        if let Some(dir) = tls {
            cmd.arg(dir.join("upstream-cert.pem"))
                .arg(dir.join("upstream-key.pem"));
        }
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        let port: u16 = line.trim().parse().unwrap();
        let tx = Self {
            _child: KillOnDrop(child),
            stdin,
            stdout,
        };
        (tx, port)
    }

    /// One command; its answer line.
    fn command(&mut self, cmd: &Value) -> Value {
        writeln!(self.stdin, "{cmd}").unwrap();
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        serde_json::from_str(&line).unwrap()
    }

    fn push(&mut self, cmd: Value) -> (u16, Value) {
        let v = self.command(&cmd);
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

/// The policy both tests start from: the transmitter `idp` (with
/// `transmitter` added to its entry), the subject mapping, and `receivers`.
/// Starts the control plane and the upstream.
async fn start_ssf(
    ids: &Identities,
    dir: &std::path::Path,
    transmitter_base: &str,
    transmitter: &str,
    receivers: &str,
) -> (leash_control_plane::app::ControlPlane, Admin) {
    let up = listener().await;
    let upstream = up.local_addr().unwrap();
    let policy = format!(
        r#"{}ssf:
  audience: {AUDIENCE}
  transmitters:
    - name: idp
      issuer: {ISSUER}
      jwks_url: {transmitter_base}/jwks
{transmitter}  subjects:
    - format: iss_sub
      iss: {ISSUER}
      sub: svc-payments-client
      revoke: {{ workload: {APP_ID}, upstream: payments }}
  receivers:
{receivers}"#,
        standard_policy(upstream, "5m")
    );
    let policy = write_policy(dir, &policy);
    let data = dir.join("data");
    let cp = start_control_plane(ids, CP_ID, &policy, &data).await;
    tokio::spawn(leash_examples::serve_observed(
        up,
        upstream_config(cp.admin_addr),
        None,
        None,
    ));
    let admin = Admin::bootstrap(cp.admin_addr, &data);
    (cp, admin)
}

const COMPROMISE: &str =
    "https://schemas.openid.net/secevent/risc/event-type/credential-compromise";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_risc_event_becomes_a_revocation_every_sidecar_acknowledges() {
    init();
    let (mut tx, jwks_port) = Transmitter::start(None);

    let dir = short_tempdir();
    // The receiver serves HTTPS, trusted through the policy's ca_file.
    upstream_pki(dir.path());
    let jwks_url_file = dir.path().join("jwks-url");
    let received_file = dir.path().join("received.jsonl");
    let mut cmd = Command::new(python_with("jwt, cryptography", "'pyjwt[crypto]'"));
    cmd.args(["-c", RECEIVER])
        .env("JWKS_URL_FILE", &jwks_url_file)
        .env("OUT_FILE", &received_file)
        .env("TLS_CERT", dir.path().join("upstream-cert.pem"))
        .env("TLS_KEY", dir.path().join("upstream-key.pem"));
    let (_receiver, receiver_port) = python_server(cmd);
    let received = || -> Vec<Value> {
        std::fs::read_to_string(&received_file)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let ids = Identities::start(dir.path(), SVID_TTL, &[CP_ID, APP_ID, OTHER_ID]);
    let (cp, admin) = start_ssf(
        &ids,
        dir.path(),
        &format!("http://127.0.0.1:{jwks_port}"),
        "",
        &format!(
            "    - name: siem\n      endpoint_url: https://127.0.0.1:{receiver_port}/events\n      ca_file: upstream-ca.pem\n      audience: https://siem.leash.test\n    - name: untrusted\n      endpoint_url: https://127.0.0.1:{receiver_port}/events\n      audience: https://siem.leash.test\n      events: [session-revoked]\n"
        ),
    )
    .await;
    std::fs::write(
        &jwks_url_file,
        format!("http://{}/.well-known/jwks.json", cp.admin_addr),
    )
    .unwrap();
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
    assert!(sent["ack"].is_null(), "{sent}");
    // Then the same event and txn once both sidecars acknowledged it.
    let done = eventually(Duration::from_secs(10), "the acknowledgement SET", || {
        let got = received();
        let id = id.clone();
        async move {
            got.into_iter()
                .find(|r| r["txn"] == id.as_str() && !r["ack"].is_null())
        }
    })
    .await;
    assert_eq!(done["events"], sent["events"], "{done}");
    assert_eq!(done["ack"]["status"], "complete", "{done}");
    assert_eq!(done["ack"]["acknowledged"], 2, "{done}");
    assert_eq!(done["ack"]["pending"], 0, "{done}");

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
            // Three revocations, announced then acknowledged; one
            // verification.
            let acks = got.iter().filter(|r| r["ack"]["status"] == "complete").count();
            (has("https://schemas.openid.net/secevent/risc/event-type/credential-compromise")
                && got.iter().any(|r| r["body"]["https://schemas.openid.net/secevent/ssf/event-type/verification"]["state"] == "st-42")
                && got.len() == 7
                && acks == 3)
                .then_some(())
        }
    })
    .await;
    // The leaked value seen in a request: RISC again, saying who sent it.
    let leak = client
        .get(
            "http://payments.leash.test/whoami",
            &[("x-api-key", "ghp_transmittedLeak0123456789")],
        )
        .await
        .unwrap();
    assert_eq!(leak.status, 403);
    assert_eq!(leak.json()["error"], "leaked_secret");
    let seen = eventually(Duration::from_secs(10), "the sighting event", || {
        let got = received();
        async move { got.into_iter().find(|r| r["sighting"].is_object()) }
    })
    .await;
    assert_eq!(seen["events"][0], COMPROMISE, "{seen}");
    assert_eq!(seen["sighting"]["workload"], APP_ID, "{seen}");
    assert_eq!(seen["sighting"]["location"], "header:x-api-key", "{seen}");
    assert!(
        !seen.to_string().contains("ghp_transmittedLeak"),
        "the value itself is never sent: {seen}"
    );
    assert!(
        received().iter().all(|r| r["error"].is_null()),
        "{:?}",
        received()
    );
    let streams = admin.get("/v1/ssf/streams").await.json();
    assert_eq!(streams[0]["stream_id"], "siem", "{streams}");
    assert_eq!(streams[0]["leash_counts"]["delivered"], 8, "{streams}");
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
    // The same receiver without the policy's ca_file: its certificate is
    // not trusted, and nothing is delivered (after the retries).
    let untrusted = eventually(
        Duration::from_secs(20),
        "the untrusted push failed",
        || async {
            let s = admin
                .get("/v1/ssf/streams?stream_id=untrusted")
                .await
                .json();
            (s["leash_counts"]["failed"].as_u64() >= Some(1)).then_some(s)
        },
    )
    .await;
    assert_eq!(untrusted["leash_counts"]["delivered"], 0, "{untrusted}");
}

/// RFC 8936 both ways. In: the control plane polls a PyJWT transmitter,
/// commits what verifies, acknowledges it and reports what does not
/// (`setErrs`). Out: a receiver creates a poll stream through the stream
/// configuration API (SSF 1.0 §8.1.1) and polls it with a viewer token,
/// verifying each SET with PyJWT; the stream's status holds (paused) or
/// stops (disabled) its events; a stream policy names cannot be changed
/// through the API.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_are_polled_both_ways_and_streams_are_managed() {
    init();
    let dir = short_tempdir();
    // The transmitter serves HTTPS (JWKS and polls), trusted through the
    // policy's ca_file.
    upstream_pki(dir.path());
    let (mut tx, tx_port) = Transmitter::start(Some(dir.path()));
    std::fs::write(dir.path().join("poll-token"), "poll-secret\n").unwrap();
    std::fs::write(dir.path().join("soc-token"), "soc-secret\n").unwrap();
    let ids = Identities::start(dir.path(), SVID_TTL, &[CP_ID, APP_ID]);
    let (cp, admin) = start_ssf(
        &ids,
        dir.path(),
        &format!("https://127.0.0.1:{tx_port}"),
        &format!(
            "      poll_url: https://127.0.0.1:{tx_port}/poll\n      poll_token_file: poll-token\n      ca_file: upstream-ca.pem\n"
        ),
        "    - name: soc\n      delivery: poll\n      poll_token_file: soc-token\n      audience: https://soc.leash.test\n",
    )
    .await;
    let a = start_sidecar(sidecar_config(ids.endpoint(APP_ID), cp.sidecar_addr)).await;
    wait_ready(a.admin_addr).await;
    let issuer_sub = json!({"format": "iss_sub", "iss": ISSUER, "sub": "svc-payments-client"});

    // In: one SET that does not verify, one that does.
    tx.command(&json!({"queue": true, "key": "other", "claims": set("poll-bad", COMPROMISE, issuer_sub.clone())}));
    let queued_ms = i64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap();
    tx.command(&json!({"queue": true, "claims": set("poll-1", COMPROMISE, issuer_sub.clone())}));
    let state = eventually(Duration::from_secs(15), "both SETs answered", || {
        let state = tx.command(&json!({"state": true}));
        async move {
            (state["acked"] == json!(["poll-1"]) && state["errs"]["poll-bad"].is_object())
                .then_some(state)
        }
    })
    .await;
    assert_eq!(state["errs"]["poll-bad"]["err"], "invalid_key", "{state}");
    assert_eq!(state["pending"], json!([]), "{state}");
    let event = cp
        .state
        .store
        .ssf_event(ISSUER, "poll-1")
        .await
        .unwrap()
        .expect("recorded");
    let id = event.revocation_id.expect("became a revocation");
    let r = admin.get(&format!("/v1/revocations/{id}")).await.json();
    eprintln!(
        "SSF SET held by the transmitter to revocation committed (long poll): {} ms",
        r["revoked_at_ms"].as_i64().unwrap() - queued_ms
    );
    assert_eq!(
        (r["kind"].as_str(), r["revoked_by"].as_str()),
        (Some("grant"), Some("ssf:idp")),
        "{r}"
    );
    admin.wait_acknowledged(&id, 1).await;
    let audit = admin.get("/v1/audit?limit=100").await.json();
    let polled: Vec<&Value> = audit["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["path"].as_str().is_some_and(|p| p.ends_with("/poll")))
        .collect();
    assert_eq!(polled.len(), 2, "{polled:?}");

    // Out: a receiver creates a poll stream. Bad configurations first.
    let poll_method = "urn:ietf:rfc:8936";
    let session_revoked = "https://schemas.openid.net/secevent/caep/event-type/session-revoked";
    for bad in [
        json!({"delivery": {"method": "urn:example:smoke-signals"}}),
        json!({"delivery": {"method": "urn:ietf:rfc:8935", "endpoint_url": "ftp://siem"}}),
        json!({"stream_id": "mine", "delivery": {"method": poll_method}}),
        json!({"delivery": {"method": poll_method}, "events_requested": ["x".repeat(300)]}),
    ] {
        let a = admin.post("/v1/ssf/streams", bad.clone()).await;
        assert_eq!(a.status, 400, "{bad}: {}", String::from_utf8_lossy(&a.body));
    }
    let viewer = admin
        .post(
            "/v1/tokens",
            json!({"name": "soc-poller", "role": "viewer"}),
        )
        .await
        .json()["token"]
        .as_str()
        .unwrap()
        .to_owned();
    let as_viewer = admin.with_token(Some(&viewer));
    assert_eq!(
        as_viewer
            .post(
                "/v1/ssf/streams",
                json!({"delivery": {"method": poll_method}})
            )
            .await
            .status,
        403,
        "a viewer cannot create a stream"
    );
    // Created with curl, as the README shows.
    let body = json!({"delivery": {"method": poll_method}, "events_requested": [session_revoked, "https://example.com/unknown"], "description": "SOC", "aud": "https://soc2.leash.test"});
    let created = std::process::Command::new("curl")
        .args([
            "-sS",
            "-w",
            "\n%{http_code}",
            "-H",
            "content-type: application/json",
            "-H",
        ])
        .arg(format!(
            "authorization: Bearer {}",
            admin.token.as_deref().unwrap()
        ))
        .arg("-d")
        .arg(body.to_string())
        .arg(format!("http://{}/v1/ssf/streams", cp.admin_addr))
        .output()
        .unwrap();
    let out = String::from_utf8(created.stdout).unwrap();
    let (answer, code) = out.rsplit_once('\n').unwrap();
    assert_eq!(code, "201", "{answer}");
    let stream: Value = serde_json::from_str(answer).unwrap();
    let sid = stream["stream_id"].as_str().unwrap().to_owned();
    let endpoint = stream["delivery"]["endpoint_url"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(endpoint.ends_with(&format!("/ssf/poll/{sid}")), "{stream}");
    // The stream's own token, shown once: no other token polls it.
    let poll_token = stream["leash_poll_token"].as_str().unwrap().to_owned();
    let shown = admin
        .get(&format!("/v1/ssf/streams?stream_id={sid}"))
        .await
        .json();
    assert!(shown["leash_poll_token"].is_null(), "{shown}");
    let receiver = admin.with_token(Some(&poll_token));
    assert_eq!(
        stream["events_delivered"],
        json!([session_revoked]),
        "{stream}"
    );
    assert_eq!(stream["aud"], "https://soc2.leash.test");

    // A responder revokes the workload; a verification event is asked for.
    let revoked = admin
        .revoke(json!({"kind": "workload", "workload": APP_ID, "reason": "poll test"}))
        .await;
    let rid = revoked["id"].as_str().unwrap().to_owned();
    let v = admin
        .post(
            "/v1/ssf/verify",
            json!({"stream_id": sid, "state": "st-poll"}),
        )
        .await;
    assert_eq!(v.status, 204, "{}", String::from_utf8_lossy(&v.body));
    let poller = |want: usize| {
        let python = python_with("jwt, cryptography", "'pyjwt[crypto]'");
        let args = [
            endpoint.clone(),
            poll_token.clone(),
            format!("http://{}/.well-known/jwks.json", cp.admin_addr),
            "https://soc2.leash.test".to_owned(),
            "leash-test".to_owned(),
            want.to_string(),
        ];
        async move {
            let out = tokio::task::spawn_blocking(move || {
                Command::new(python)
                    .args(["-c", POLLER])
                    .args(args)
                    .output()
                    .unwrap()
            })
            .await
            .unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            serde_json::from_slice::<Value>(&out.stdout).unwrap()
        }
    };
    // The revocation, its acknowledgement, the verification.
    let polled = poller(3).await;
    let got = polled["got"].as_array().unwrap();
    assert_eq!(got.len(), 3, "{polled}");
    assert_eq!(polled["left"], 0, "{polled}");
    let announced: Vec<&Value> = got.iter().filter(|c| c["txn"] == rid.as_str()).collect();
    assert_eq!(announced.len(), 2, "{polled}");
    assert!(
        announced
            .iter()
            .all(|c| c["events"][session_revoked].is_object())
    );
    assert!(
        announced
            .iter()
            .any(|c| c["leash_acknowledgement"]["status"] == "complete"
                && c["leash_acknowledgement"]["acknowledged"] == 1),
        "{polled}"
    );
    assert!(
        got.iter()
            .any(|c| c["events"]["https://schemas.openid.net/secevent/ssf/event-type/verification"]["state"] == "st-poll"),
        "{polled}"
    );
    let counts = admin
        .get(&format!("/v1/ssf/streams?stream_id={sid}"))
        .await
        .json();
    assert_eq!(counts["leash_counts"]["delivered"], 3, "{counts}");

    // Paused: held, and returned once enabled. Disabled: nothing made.
    let status = |st: &str| json!({"stream_id": sid, "status": st, "reason": "maintenance"});
    assert_eq!(
        admin.post("/v1/ssf/status", status("paused")).await.status,
        200
    );
    let now = as_viewer
        .get(&format!("/v1/ssf/status?stream_id={sid}"))
        .await
        .json();
    assert_eq!(
        (now["status"].as_str(), now["reason"].as_str()),
        (Some("paused"), Some("maintenance"))
    );
    assert_eq!(
        admin
            .post("/v1/ssf/verify", json!({"stream_id": sid, "state": "held"}))
            .await
            .status,
        204
    );
    let poll_now = || async {
        receiver
            .post(
                &format!("/ssf/poll/{sid}"),
                json!({"returnImmediately": true}),
            )
            .await
            .json()
    };
    for (who, token) in [
        ("a viewer", Some(viewer.as_str())),
        ("the admin", admin.token.as_deref()),
        ("soc's receiver", Some("soc-secret")),
        ("nobody", None),
    ] {
        let a = admin
            .with_token(token)
            .post(
                &format!("/ssf/poll/{sid}"),
                json!({"returnImmediately": true}),
            )
            .await;
        assert_eq!(a.status, 401, "{who} polls another's stream");
    }
    assert_eq!(
        poll_now().await["sets"],
        json!({}),
        "paused: nothing returned"
    );
    assert_eq!(
        admin.post("/v1/ssf/status", status("enabled")).await.status,
        200
    );
    let sets = poll_now().await["sets"].clone();
    assert_eq!(sets.as_object().unwrap().len(), 1, "{sets}");
    let jti = sets.as_object().unwrap().keys().next().unwrap().clone();
    let acked = receiver
        .post(
            &format!("/ssf/poll/{sid}"),
            json!({"ack": [jti], "returnImmediately": true}),
        )
        .await
        .json();
    assert_eq!(acked["sets"], json!({}), "{acked}");
    assert_eq!(
        admin
            .post("/v1/ssf/status", status("disabled"))
            .await
            .status,
        200
    );
    assert_eq!(
        admin
            .post("/v1/ssf/verify", json!({"stream_id": sid}))
            .await
            .status,
        409
    );

    // Changed, then deleted. The policy's stream is policy's to change.
    let patched = admin
        .call(
            "PATCH",
            "/v1/ssf/streams",
            Some(json!({"stream_id": sid, "description": "SOC, nights"}).to_string()),
        )
        .await;
    assert_eq!(
        patched.status,
        200,
        "{}",
        String::from_utf8_lossy(&patched.body)
    );
    assert_eq!(patched.json()["description"], "SOC, nights");
    assert_eq!(patched.json()["events_delivered"], json!([session_revoked]));
    let policy_stream = admin
        .call(
            "PATCH",
            "/v1/ssf/streams",
            Some(json!({"stream_id": "soc", "description": "x"}).to_string()),
        )
        .await;
    assert_eq!(policy_stream.status, 409);
    let all = admin.get("/v1/ssf/streams").await.json();
    assert_eq!(all.as_array().unwrap().len(), 2, "{all}");
    // The policy's poll stream has the events too (every kind by default).
    let soc = admin
        .with_token(Some("soc-secret"))
        .post("/ssf/poll/soc", json!({"returnImmediately": true}))
        .await
        .json();
    assert!(soc["sets"].as_object().unwrap().len() >= 2, "{soc}");
    let deleted = admin
        .call("DELETE", &format!("/v1/ssf/streams?stream_id={sid}"), None)
        .await;
    assert_eq!(deleted.status, 204);
    assert_eq!(
        admin
            .get(&format!("/v1/ssf/streams?stream_id={sid}"))
            .await
            .status,
        404
    );
    assert_eq!(poll_now().await["error"], "unauthenticated");

    // SETs held for a stream no longer named anywhere are swept once an
    // hour old; those of a stream that exists stay.
    let store = &cp.state.store;
    assert!(
        store
            .hold_ssf_set("gone", "j-old", "x", 0, 10)
            .await
            .unwrap()
    );
    assert!(
        store
            .hold_ssf_set("gone", "j-new", "x", i64::MAX, 10)
            .await
            .unwrap()
    );
    assert!(
        store
            .hold_ssf_set("soc", "j-soc", "x", 0, 10)
            .await
            .unwrap()
    );
    assert_eq!(cp.state.ssf_out.sweep(&cp.state).await.unwrap(), 1);
    assert_eq!(store.held_ssf_sets("gone", 10).await.unwrap().0.len(), 1);
    assert!(
        store
            .held_ssf_sets("soc", 100)
            .await
            .unwrap()
            .0
            .iter()
            .any(|(jti, _)| jti == "j-soc")
    );

    // Guessing poll tokens counts against the address as failed admin-API
    // calls do (10 a minute here, some spent above); the right token is
    // never limited.
    let mut limited = false;
    for _ in 0..12 {
        let a = admin
            .with_token(Some("lss_guess"))
            .post("/ssf/poll/soc", json!({"returnImmediately": true}))
            .await;
        if a.status == 429 {
            assert_eq!(a.json()["error"], "too_many_failures");
            assert!(a.headers.contains_key("retry-after"));
            limited = true;
            break;
        }
        assert_eq!(a.status, 401);
    }
    assert!(limited, "guesses are limited");
    let right = admin
        .with_token(Some("soc-secret"))
        .post("/ssf/poll/soc", json!({"returnImmediately": true}))
        .await;
    assert_eq!(
        right.status,
        200,
        "{}",
        String::from_utf8_lossy(&right.body)
    );

    let verified = admin.get("/v1/audit/verify").await.json();
    assert_eq!(verified["ok"], true, "{verified}");
}
