//! AWS SigV4 signing by the sidecar, verified by botocore's own signer (an
//! implementation no one here wrote): a test upstream recomputes every
//! signature it receives with `botocore.auth` from the brokered key, for
//! header-signed GET and PUT (payload signed and unsigned), a presigned
//! query, and a generic (non-S3) service. The workload's own signature is
//! removed, the key never reaches a log, and a body too large to hash is
//! refused.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test stops at the first failed step, with its message"
)]

use std::process::Command;
use std::time::Duration;

use bytes::Bytes;
use leash_tests::*;
use serde_json::json;

const SVID_TTL: Duration = Duration::from_secs(600);
const AKID: &str = "AKIDLEASHEXAMPLE";
const SECRET: &str = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYLEASHSECRET";
const TOKEN: &str = "FwoGZXIvYXdzEXAMPLEsessiontoken";

/// Verifies every request's SigV4 signature with botocore and answers what
/// it found as JSON (200 when it verifies, 403 when not).
const VERIFIER: &str = r#"
import hashlib, json, os, sys, urllib.parse
from http.server import ThreadingHTTPServer, BaseHTTPRequestHandler
from botocore.auth import SigV4Auth, S3SigV4Auth, SigV4QueryAuth, S3SigV4QueryAuth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

CREDS = Credentials(os.environ["AKID"], os.environ["SECRET"], os.environ["TOKEN"])

def verify(method, url, h, body):
    parts = urllib.parse.urlsplit(url)
    query = dict(urllib.parse.parse_qsl(parts.query, keep_blank_values=True))
    if "X-Amz-Signature" in query:
        _, _, region, service, _ = query["X-Amz-Credential"].split("/")
        raw = [p for p in parts.query.split("&") if not p.startswith("X-Amz-Signature=")]
        unsigned = urllib.parse.urlunsplit((parts.scheme, parts.netloc, parts.path, "&".join(raw), ""))
        req = AWSRequest(method=method, url=unsigned, headers={"host": h["host"]}, data=body)
        req.context["timestamp"] = query["X-Amz-Date"]
        cls = S3SigV4QueryAuth if service == "s3" else SigV4QueryAuth
        signer = cls(CREDS, service, region, expires=int(query["X-Amz-Expires"]))
        expected = signer.signature(signer.string_to_sign(req, signer.canonical_request(req)), req)
        return {"ok": expected == query["X-Amz-Signature"], "mode": "query", "service": service,
                "akid": query["X-Amz-Credential"].split("/")[0],
                "token": query.get("X-Amz-Security-Token"), "auth_header": "authorization" in h}
    auth = h.get("authorization", "")
    if not auth.startswith("AWS4-HMAC-SHA256 "):
        return {"ok": False, "mode": "none", "auth": auth}
    fields = dict(p.strip().split("=", 1) for p in auth.split(" ", 1)[1].split(","))
    akid, _, region, service, _ = fields["Credential"].split("/")
    signed = fields["SignedHeaders"].split(";")
    req = AWSRequest(method=method, url=url, data=body, headers={k: h[k] for k in signed})
    req.context["timestamp"] = h["x-amz-date"]
    signer = (S3SigV4Auth if service == "s3" else SigV4Auth)(CREDS, service, region)
    actual = hashlib.sha256(body).hexdigest()
    claimed = h.get("x-amz-content-sha256")
    signer.payload = lambda r: claimed or actual
    expected = signer.signature(signer.string_to_sign(req, signer.canonical_request(req)), req)
    payload_ok = claimed in (None, "UNSIGNED-PAYLOAD", actual)
    return {"ok": expected == fields["Signature"] and payload_ok, "mode": "header", "service": service,
            "akid": akid, "signed_headers": signed, "payload": claimed or actual,
            "body_sha256": actual, "token": h.get("x-amz-security-token")}

def assume_role(form):
    # STS AssumeRoleWithWebIdentity: the web identity token verified with
    # PyJWT against the control plane's JWKS, as an identity provider
    # trust would be by AWS.
    import jwt, datetime
    with open(os.environ["JWKS_URL_FILE"]) as f:
        jwks = jwt.PyJWKClient(f.read().strip())
    token = form["WebIdentityToken"]
    try:
        key = jwks.get_signing_key_from_jwt(token)
        claims = jwt.decode(token, key.key, algorithms=["ES256"], audience="sts.amazonaws.com",
                            issuer="leash-test", options={"require": ["exp", "iat", "sub", "jti"]})
    except Exception as e:
        return 400, "<ErrorResponse><Error><Type>Sender</Type><Code>InvalidIdentityToken</Code><Message>%s</Message></Error></ErrorResponse>" % type(e).__name__
    with open(os.environ["ASSUMED_FILE"], "a") as f:
        f.write(json.dumps({"sub": claims["sub"], "role": form["RoleArn"], "session": form["RoleSessionName"],
                            "duration": form["DurationSeconds"]}) + "\n")
    expires = (datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=int(form["DurationSeconds"]))).strftime("%Y-%m-%dT%H:%M:%SZ")
    return 200, f'''<AssumeRoleWithWebIdentityResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/">
  <AssumeRoleWithWebIdentityResult>
    <SubjectFromWebIdentityToken>{claims["sub"]}</SubjectFromWebIdentityToken>
    <Credentials>
      <SessionToken>{os.environ["TOKEN"]}</SessionToken>
      <SecretAccessKey>{os.environ["SECRET"]}</SecretAccessKey>
      <Expiration>{expires}</Expiration>
      <AccessKeyId>{os.environ["AKID"]}</AccessKeyId>
    </Credentials>
  </AssumeRoleWithWebIdentityResult>
</AssumeRoleWithWebIdentityResponse>'''

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *args):
        pass
    def handle_any(self):
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            body = b""
            while True:
                size = int(self.rfile.readline().strip().split(b";")[0], 16)
                if size == 0:
                    self.rfile.readline()
                    break
                body += self.rfile.read(size)
                self.rfile.readline()
        else:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        h = {k.lower(): v for k, v in self.headers.items()}
        form = dict(urllib.parse.parse_qsl(body.decode(errors="replace")))
        if self.command == "POST" and form.get("Action") == "AssumeRoleWithWebIdentity":
            status, xml = assume_role(form)
            out = xml.encode()
            self.send_response(status)
            self.send_header("Content-Type", "text/xml")
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)
            return
        try:
            verdict = verify(self.command, "http://" + h["host"] + self.path, h, body)
        except Exception as e:
            verdict = {"ok": False, "error": repr(e)}
        out = json.dumps(verdict).encode()
        self.send_response(200 if verdict["ok"] else 403)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)
    do_GET = do_PUT = do_POST = do_DELETE = handle_any

server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
print(server.server_address[1], flush=True)
server.serve_forever()
"#;

fn policy(port: u16) -> String {
    let up = |name: &str, service: &str, extra: &str| {
        format!(
            r#"  - name: {name}
    hosts: [{name}.leash.test]
    target: http://127.0.0.1:{port}
    credential: {{ kind: aws-sigv4, ttl: 5m }}
    inject: {{ type: aws-sigv4, region: eu-west-3, service: {service}{extra} }}
"#
        )
    };
    let assumed = format!(
        r#"  - name: assumed
    hosts: [assumed.leash.test]
    target: http://127.0.0.1:{port}
    credential:
      kind: aws-sigv4
      ttl: 20m
      role_arn: arn:aws:iam::123456789012:role/leash-workloads
      sts_url: http://127.0.0.1:{port}/
    inject: {{ type: aws-sigv4, region: eu-west-3, service: s3 }}
"#
    );
    format!(
        "version: 1\nupstreams:\n{}{}{}{}{assumed}grants:\n  - workload: {APP_ID}\n    upstreams: [s3, s3stream, presign, sts, assumed]\n",
        up("s3", "s3", ""),
        up("s3stream", "s3", ", payload: unsigned"),
        up("presign", "s3", ", signature: query"),
        up("sts", "sts", ""),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_signed_by_the_sidecar_verify_with_botocore() {
    let logs = captured_logs();
    init();
    let dir = short_tempdir();
    let jwks_url_file = dir.path().join("jwks-url");
    let assumed_file = dir.path().join("assumed.jsonl");
    let mut cmd = Command::new(python_with("botocore.auth", "botocore"));
    cmd.args(["-c", VERIFIER])
        .env("AKID", AKID)
        .env("SECRET", SECRET)
        .env("TOKEN", TOKEN)
        .env("JWKS_URL_FILE", &jwks_url_file)
        .env("ASSUMED_FILE", &assumed_file);
    let (_verifier, port) = python_server(cmd);

    let ids = Identities::start(dir.path(), SVID_TTL, &[CP_ID, APP_ID]);
    let policy = write_policy(dir.path(), &policy(port));
    let data = dir.path().join("data");
    let cp = start_control_plane(&ids, CP_ID, &policy, &data).await;
    std::fs::write(
        &jwks_url_file,
        format!("http://{}/.well-known/jwks.json", cp.admin_addr),
    )
    .unwrap();
    let admin = Admin::bootstrap(cp.admin_addr, &data);
    // A malformed key is refused when stored, without repeating it.
    let bad = admin
        .post("/v1/secrets/s3", json!({"value": "not-a-key-at-all"}))
        .await;
    assert_eq!(bad.status, 400, "{}", String::from_utf8_lossy(&bad.body));
    assert!(!String::from_utf8_lossy(&bad.body).contains("not-a-key-at-all"));
    for up in ["s3", "s3stream", "presign", "sts"] {
        let r = admin
            .post(
                &format!("/v1/secrets/{up}"),
                json!({"value": format!("{AKID}:{SECRET}:{TOKEN}")}),
            )
            .await;
        assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    }
    let sidecar = start_sidecar(sidecar_config(ids.endpoint(APP_ID), cp.sidecar_addr)).await;
    wait_ready(sidecar.admin_addr).await;
    let client = ProxyClient::new(sidecar.egress_addr);
    let verdict = |a: &Answer| -> serde_json::Value {
        assert_eq!(a.status, 200, "{}", String::from_utf8_lossy(&a.body));
        let v = a.json();
        assert_eq!(v["ok"], true, "{v}");
        assert_eq!(v["akid"], AKID, "{v}");
        assert_eq!(v["token"], TOKEN, "{v}");
        v
    };

    // GET, the workload's own (stale) signature removed.
    let a = client
        .get(
            "http://s3.leash.test/bucket/some%20key.txt?list-type=2&prefix=a%2Fb",
            &[
                ("authorization", "AWS4-HMAC-SHA256 Credential=AKIDOLDLEAKED/20200101/eu-west-3/s3/aws4_request, SignedHeaders=host, Signature=00"),
                ("x-amz-date", "20200101T000000Z"),
                ("x-amz-security-token", "old-token"),
            ],
        )
        .await
        .unwrap();
    let v = verdict(&a);
    assert_eq!(v["mode"], "header");
    assert!(
        v["signed_headers"]
            .as_array()
            .unwrap()
            .iter()
            .any(|h| h == "host"),
        "{v}"
    );

    // PUT with a body: its SHA-256 signed.
    let body = Bytes::from(vec![b'x'; 100_000]);
    let a = client
        .send(
            "PUT",
            "http://s3.leash.test/bucket/object",
            &[],
            body.clone(),
        )
        .await
        .unwrap();
    let v = verdict(&a);
    assert_eq!(v["payload"], v["body_sha256"], "{v}");

    // PUT streaming: UNSIGNED-PAYLOAD.
    let a = client
        .send("PUT", "http://s3stream.leash.test/bucket/big", &[], body)
        .await
        .unwrap();
    assert_eq!(verdict(&a)["payload"], "UNSIGNED-PAYLOAD");

    // A presigned query, replacing the workload's own presigned parameters.
    let a = client
        .get(
            "http://presign.leash.test/bucket/report.csv?versionId=3&X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIDOLDLEAKED%2F20200101%2Feu-west-3%2Fs3%2Faws4_request&X-Amz-Signature=00",
            &[],
        )
        .await
        .unwrap();
    let v = verdict(&a);
    assert_eq!(v["mode"], "query", "{v}");
    assert_eq!(v["auth_header"], false, "{v}");

    // A generic service (path double-encoded, body hashed), as a form POST.
    let a = client
        .send(
            "POST",
            "http://sts.leash.test/",
            &[("content-type", "application/x-www-form-urlencoded")],
            Bytes::from_static(b"Action=GetCallerIdentity&Version=2011-06-15"),
        )
        .await
        .unwrap();
    assert_eq!(verdict(&a)["service"], "sts");

    // No stored key at all: temporary credentials from STS for this
    // workload, with a JWT naming it (verified with PyJWT against the
    // control plane's JWKS), cached for the next request.
    for _ in 0..2 {
        let a = client
            .get("http://assumed.leash.test/bucket/from-sts", &[])
            .await
            .unwrap();
        verdict(&a);
    }
    let assumed: Vec<serde_json::Value> = std::fs::read_to_string(&assumed_file)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(
        assumed.len(),
        1,
        "one exchange, then the cache: {assumed:?}"
    );
    assert_eq!(assumed[0]["sub"], APP_ID);
    assert_eq!(
        assumed[0]["role"],
        "arn:aws:iam::123456789012:role/leash-workloads"
    );
    assert_eq!(assumed[0]["duration"], "1200");
    let issued = cp.state.store.credentials_for(APP_ID).await.unwrap();
    assert!(
        issued
            .iter()
            .any(|c| c.upstream == "assumed" && c.id.starts_with("sts:assumed:")),
        "the lease is on file"
    );
    // Revoking that lease: the sidecar drops it, and the control plane
    // exchanges a new JWT for a new set rather than hand back the cached
    // one (whose id is revoked).
    let lease = issued
        .iter()
        .find(|c| c.upstream == "assumed" && c.id.starts_with("sts:assumed:"))
        .unwrap()
        .id
        .clone();
    let revoked = admin
        .revoke(json!({"kind": "credential", "credential_id": lease, "reason": "STS set leaked"}))
        .await;
    admin
        .wait_acknowledged(revoked["id"].as_str().unwrap(), 1)
        .await;
    let a = client
        .get("http://assumed.leash.test/bucket/after-revocation", &[])
        .await
        .unwrap();
    verdict(&a);
    let exchanges = std::fs::read_to_string(&assumed_file)
        .unwrap()
        .lines()
        .count();
    assert_eq!(exchanges, 2, "a new exchange after the revocation");
    let leases: Vec<String> = cp
        .state
        .store
        .credentials_for(APP_ID)
        .await
        .unwrap()
        .into_iter()
        .filter(|c| c.upstream == "assumed")
        .map(|c| c.id)
        .collect();
    assert!(
        leases.len() == 2 && leases.contains(&lease),
        "a second lease, not the revoked one again: {leases:?}"
    );

    // Over the signed-body limit: refused, nothing sent.
    let big = Bytes::from(vec![b'y'; leash_proxy::sigv4::MAX_SIGNED_BODY + 1]);
    let a = client
        .send("PUT", "http://s3.leash.test/bucket/huge", &[], big)
        .await
        .unwrap();
    assert_eq!(a.status, 413);
    assert_eq!(a.json()["error"], "body_too_large_to_sign");

    // The key and the session token never reach a log.
    let logs = String::from_utf8_lossy(&logs.lock().unwrap()).into_owned();
    assert!(
        logs.contains("sigv4") || logs.contains("s3"),
        "logs were captured"
    );
    assert!(!logs.contains(SECRET), "the secret access key was logged");
    assert!(!logs.contains(TOKEN), "the session token was logged");
}
