//! OAuth2 with no static secret anywhere, against a token endpoint built
//! with authlib (an implementation no one here wrote): `oauth2-jwt-bearer`
//! authenticates with an RFC 7523 client assertion the control plane signs
//! for the workload (its SPIFFE ID as client id, per the OAuth SPIFFE
//! client-authentication draft), verified by authlib's
//! `JWTBearerClientAssertion` against the control plane's JWKS;
//! `oauth2-token-exchange` exchanges a JWT issued for the workload (RFC
//! 8693), its `jti` naming the lease so that it can be revoked.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test stops at the first failed step, with its message"
)]

use std::process::Command;
use std::time::Duration;

use leash_tests::*;
use serde_json::json;

const SVID_TTL: Duration = Duration::from_secs(600);

const ENDPOINT: &str = r#"
import json, os, secrets, sys, urllib.parse, urllib.request
from http.server import ThreadingHTTPServer, BaseHTTPRequestHandler
from authlib.oauth2.rfc6749 import OAuth2Error
from authlib.oauth2.rfc7523 import JWTBearerClientAssertion
from joserfc import jwk, jwt

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
JWT_TYPE = "urn:ietf:params:oauth:token-type:jwt"
ACCESS_TYPE = "urn:ietf:params:oauth:token-type:access_token"
CLIENTS = set(os.environ["CLIENTS"].split(","))
TOKENS, SEEN = {}, set()
TOKEN_URL = None

def leash_jwks():
    with open(os.environ["JWKS_URL_FILE"]) as f:
        return json.load(urllib.request.urlopen(f.read().strip()))

class Assertion(JWTBearerClientAssertion):
    def get_audiences(self):
        return [TOKEN_URL]
    def resolve_client_public_key(self, client):
        return leash_jwks()
    def validate_jti(self, claims, jti):
        if jti in SEEN:
            return False
        SEEN.add(jti)
        return True

class Client:
    def __init__(self, client_id):
        self.client_id = client_id
    def check_endpoint_auth_method(self, method, endpoint):
        return method == "client_assertion_jwt"

class Request:
    def __init__(self, form):
        self.form, self.client = form, None

def token(form):
    try:
        client = Assertion()(lambda cid: Client(cid) if cid in CLIENTS else None, Request(form))
    except OAuth2Error as e:
        return 401, {"error": e.error, "error_description": e.description}
    if client is None:
        return 401, {"error": "invalid_client"}
    grant = form.get("grant_type")
    record = {"client_id": client.client_id, "grant": grant, "scope": form.get("scope")}
    if grant == "client_credentials":
        record["sub"] = client.client_id
    elif grant == TOKEN_EXCHANGE:
        if form.get("subject_token_type") != JWT_TYPE or form.get("requested_token_type") != ACCESS_TYPE:
            return 400, {"error": "invalid_request"}
        try:
            tok = jwt.decode(form["subject_token"], jwk.KeySet.import_key_set(leash_jwks()))
            jwt.JWTClaimsRegistry(iss={"essential": True, "value": "leash-test"},
                                  aud={"essential": True, "value": TOKEN_URL},
                                  sub={"essential": True}, exp={"essential": True},
                                  jti={"essential": True}).validate(tok.claims)
        except Exception as e:
            return 400, {"error": "invalid_grant", "error_description": type(e).__name__}
        record.update(sub=tok.claims["sub"], jti=tok.claims["jti"],
                      audience=form.get("audience"), resource=form.get("resource"))
    else:
        return 400, {"error": "unsupported_grant_type"}
    access = secrets.token_urlsafe(24)
    TOKENS[access] = record
    with open(os.environ["LOG_FILE"], "a") as f:
        f.write(json.dumps(record) + "\n")
    answer = {"access_token": access, "token_type": "Bearer", "expires_in": 600}
    if grant == TOKEN_EXCHANGE:
        answer["issued_token_type"] = ACCESS_TYPE
    return 200, answer

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *args):
        pass
    def answer(self, status, obj):
        out = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode()
        form = dict(urllib.parse.parse_qsl(body))
        self.answer(*token(form))
    def do_GET(self):
        auth = self.headers.get("Authorization", "")
        record = TOKENS.get(auth.removeprefix("Bearer "))
        self.answer(200, record) if record else self.answer(401, {"error": "invalid_token"})

server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
TOKEN_URL = "http://127.0.0.1:%d/token" % server.server_address[1]
print(server.server_address[1], flush=True)
server.serve_forever()
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_without_a_client_secret_from_an_authlib_endpoint() {
    init();
    let dir = short_tempdir();
    let jwks_url_file = dir.path().join("jwks-url");
    let log_file = dir.path().join("tokens.jsonl");
    let mut cmd = Command::new(python_with("authlib.oauth2.rfc7523, joserfc", "authlib"));
    cmd.args(["-c", ENDPOINT])
        .env("CLIENTS", format!("{APP_ID},leash-exchanger"))
        .env("JWKS_URL_FILE", &jwks_url_file)
        .env("LOG_FILE", &log_file);
    let (_endpoint, port) = python_server(cmd);
    let token_url = format!("http://127.0.0.1:{port}/token");
    let policy = format!(
        r#"version: 1
upstreams:
  - name: bearer
    hosts: [bearer.leash.test]
    target: http://127.0.0.1:{port}
    credential: {{ kind: oauth2-jwt-bearer, token_url: "{token_url}", scopes: [reports.read] }}
  - name: exchange
    hosts: [exchange.leash.test]
    target: http://127.0.0.1:{port}
    credential:
      kind: oauth2-token-exchange
      token_url: "{token_url}"
      client_id: leash-exchanger
      audience: https://api.example.com
      resource: https://api.example.com/v1
      scopes: [orders.write]
grants:
  - workload: {APP_ID}
    upstreams: [bearer, exchange]
"#
    );
    let ids = Identities::start(dir.path(), SVID_TTL, &[CP_ID, APP_ID]);
    let policy = write_policy(dir.path(), &policy);
    let data = dir.path().join("data");
    let cp = start_control_plane(&ids, CP_ID, &policy, &data).await;
    std::fs::write(
        &jwks_url_file,
        format!("http://{}/.well-known/jwks.json", cp.admin_addr),
    )
    .unwrap();
    let sidecar = start_sidecar(sidecar_config(ids.endpoint(APP_ID), cp.sidecar_addr)).await;
    wait_ready(sidecar.admin_addr).await;
    let client = ProxyClient::new(sidecar.egress_addr);
    let exchanges = || -> Vec<serde_json::Value> {
        std::fs::read_to_string(&log_file)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };

    // RFC 7523: the workload is the OAuth client, authenticated by a JWT
    // Leash signed; no secret was ever put.
    for _ in 0..2 {
        let a = client
            .get(
                "http://bearer.leash.test/reports",
                &[("authorization", "Bearer old-static")],
            )
            .await
            .unwrap();
        assert_eq!(a.status, 200, "{}", String::from_utf8_lossy(&a.body));
        let v = a.json();
        assert_eq!(v["client_id"], APP_ID, "{v}");
        assert_eq!(v["grant"], "client_credentials");
        assert_eq!(v["scope"], "reports.read");
    }
    assert_eq!(exchanges().len(), 1, "the token is cached and leased");

    // RFC 8693: the workload's JWT exchanged for an access token.
    let a = client
        .get("http://exchange.leash.test/orders", &[])
        .await
        .unwrap();
    assert_eq!(a.status, 200, "{}", String::from_utf8_lossy(&a.body));
    let v = a.json();
    assert_eq!(v["sub"], APP_ID, "{v}");
    assert_eq!(v["client_id"], "leash-exchanger");
    assert_eq!(
        v["grant"],
        "urn:ietf:params:oauth:grant-type:token-exchange"
    );
    assert_eq!(v["audience"], "https://api.example.com");
    assert_eq!(v["resource"], "https://api.example.com/v1");
    assert_eq!(v["scope"], "orders.write");
    let jti = v["jti"].as_str().unwrap().to_owned();

    // The lease is named by the subject token's jti; revoking it ends that
    // token's use and the next request gets a new exchange.
    let lease = format!("oauth2x:exchange:{jti}");
    let issued = cp.state.store.credentials_for(APP_ID).await.unwrap();
    assert!(issued.iter().any(|c| c.id == lease), "{lease} is on file");
    let admin = Admin::bootstrap(cp.admin_addr, &data);
    let r = admin
        .revoke(json!({"kind": "credential", "credential_id": lease, "reason": "token leaked"}))
        .await;
    admin.wait_acknowledged(r["id"].as_str().unwrap(), 1).await;
    let a = client
        .get("http://exchange.leash.test/orders", &[])
        .await
        .unwrap();
    assert_eq!(a.status, 200, "{}", String::from_utf8_lossy(&a.body));
    assert_ne!(
        a.json()["jti"],
        jti.as_str(),
        "a new subject token, a new token"
    );
    assert_eq!(
        exchanges()
            .iter()
            .filter(|e| e["grant"] == "urn:ietf:params:oauth:grant-type:token-exchange")
            .count(),
        2
    );
}
