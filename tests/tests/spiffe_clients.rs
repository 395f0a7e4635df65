//! The dev Workload API serves every SPIFFE client, not only Rust ones:
//! `py-spiffe` (the SPIFFE Python library, on grpc-core, which sends the
//! socket path as the HTTP/2 `:authority`) fetches X.509 and JWT SVIDs and
//! bundles, verifies a JWT-SVID against the JWT bundle itself, has it
//! validated by the API, and watches a rotation.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test stops at the first failed step, with its message"
)]

use std::process::Command;
use std::time::Duration;

use leash_tests::*;

const SCRIPT: &str = r#"
import base64, json, sys, threading
from spiffe import WorkloadApiClient
from spiffe.spiffe_id.spiffe_id import TrustDomain
from spiffe.svid.jwt_svid import JwtSvid

client = WorkloadApiClient("unix://" + sys.argv[1])
td = TrustDomain("leash.test")
svid = client.fetch_x509_svid()
print("x509", svid.spiffe_id, flush=True)
bundles = client.fetch_x509_bundles()
print("x509-bundle", bundles.get_bundle_for_trust_domain(td) is not None, flush=True)
jwt = client.fetch_jwt_svid(audience={"svc-b", "svc-c"})
print("jwt", jwt.spiffe_id, ",".join(sorted(jwt.audience)), flush=True)
payload = jwt.token.split(".")[1]
claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
print("jti", len(claims.get("jti", "")), flush=True)
jwt_bundle = client.fetch_jwt_bundles().get_bundle_for_trust_domain(td)
local = JwtSvid.parse_and_validate(jwt.token, jwt_bundle, {"svc-b"})
print("verified-with-bundle", local.spiffe_id, flush=True)
client.validate_jwt_svid(jwt.token, "svc-c")
print("validated-by-api", flush=True)
try:
    client.validate_jwt_svid(jwt.token, "svc-x")
    print("validated-wrong-audience", flush=True)
except Exception:
    print("refused-wrong-audience", flush=True)
serials, rotated = set(), threading.Event()
def on_update(ctx):
    serials.add(ctx.default_svid.leaf.serial_number)
    if len(serials) >= 2:
        rotated.set()
handle = client.stream_x509_contexts(on_update, lambda e: print("error", e, flush=True))
rotated.wait(20)
handle.cancel()
print("rotations-seen", len(serials), flush=True)
client.close()
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn py_spiffe_gets_x509_and_jwt_svids_and_watches_a_rotation() {
    init();
    let python = python_with("spiffe.workloadapi", "spiffe");
    let dir = short_tempdir();
    // SVIDs of 2 s are re-issued every second: a rotation to watch.
    let ids = Identities::start(dir.path(), Duration::from_secs(2), &[APP_ID]);
    let socket = ids.socket(APP_ID);
    let out = tokio::task::spawn_blocking(move || {
        Command::new(python)
            .args(["-W", "ignore", "-c", SCRIPT])
            .arg(socket)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let expect = [
        format!("x509 {APP_ID}"),
        "x509-bundle True".to_owned(),
        format!("jwt {APP_ID} svc-b,svc-c"),
        "jti 32".to_owned(),
        format!("verified-with-bundle {APP_ID}"),
        "validated-by-api".to_owned(),
        "refused-wrong-audience".to_owned(),
        "rotations-seen 2".to_owned(),
    ];
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines, expect, "{stdout}");
    ids.stop();
}
