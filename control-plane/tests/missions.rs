//! A whole incident, as a responder lives it, with real processes: the
//! scanners teams run (trufflehog3, detect-secrets from PyPI; a gitleaks
//! report in its documented format) find secrets; `leashctl leaked import`
//! registers them and opens a mission; the sidecars acknowledge; a
//! forgotten consumer keeps sending the leaked value (seen: the mission
//! stays open); it is migrated; the windows pass; the mission closes
//! itself; a new sighting reopens it. And the bad input a responder can
//! give: unknown findings, windows out of range, a malformed report.
//!
//! Needs `trufflehog3` and `detect-secrets` on PATH (`.ci/run` installs
//! them in a virtual environment: `pip install trufflehog3 detect-secrets`).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test stops at the first failed step, with its message"
)]

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt as _, Empty};
use hyper_util::rt::TokioIo;

const LEAKED_AWS: &str = "AKIAIOSFODNN7LEASHQA";
const LEAKED_TOKEN: &str = "Zk9xQ2vL7pR3sT8wY1bN4mH6jD0cF5gK";

/// A request through the sidecar with `headers`; the status.
async fn send(proxy: SocketAddr, url: &str, headers: &[(&str, &str)]) -> u16 {
    let tcp = tokio::net::TcpStream::connect(proxy).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    let uri: http::Uri = url.parse().unwrap();
    let mut req = http::Request::get(uri.clone()).header("host", uri.authority().unwrap().as_str());
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = sender
        .send_request(req.body(Empty::<Bytes>::new()).unwrap())
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let _ = resp.into_body().collect().await;
    status
}

fn scanner(program: &str) -> Command {
    let found = Command::new(program).arg("--help").output();
    assert!(
        found.is_ok_and(|o| o.status.success()),
        "{program} is not on PATH: pip install trufflehog3 detect-secrets (.ci/run does)"
    );
    Command::new(program)
}

/// A repository with two secrets in three places, scanned by the real tools.
fn scanned_repository(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let repo = dir.join("repo");
    std::fs::create_dir_all(repo.join("src")).unwrap();
    std::fs::write(
        repo.join("src/settings.py"),
        format!("AWS_KEY = \"{LEAKED_AWS}\"\nTOKEN = \"{LEAKED_TOKEN}\"\n"),
    )
    .unwrap();
    std::fs::write(repo.join("deploy.env"), format!("aws={LEAKED_AWS}\n")).unwrap();
    let trufflehog = dir.join("trufflehog.json");
    let out = scanner("trufflehog3")
        .args(["-z", "--no-history", "--format", "json", "-o"])
        .arg(&trufflehog)
        .arg(".")
        .current_dir(&repo)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = scanner("detect-secrets")
        .args(["scan", "--all-files"])
        .current_dir(&repo)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let detect = dir.join("detect-secrets.json");
    std::fs::write(&detect, &out.stdout).unwrap();
    (trufflehog, detect)
}

/// payments and ledger (JWTs), and vault-api (a brokered static key whose
/// provider, at `provider`, can be asked whether an old key is dead).
fn policy(upstream: SocketAddr, provider: SocketAddr, ledger_granted: bool) -> String {
    let granted = if ledger_granted {
        "[payments, ledger]"
    } else {
        "[payments]"
    };
    format!(
        "version: 1\nupstreams:\n  - name: payments\n    hosts: [payments.leash.test]\n    target: http://{upstream}\n    credential: {{ kind: jwt, ttl: 5m }}\n  - name: ledger\n    hosts: [ledger.leash.test]\n    target: http://{upstream}\n    credential: {{ kind: jwt, ttl: 5m }}\n  - name: vault-api\n    hosts: [vault.leash.test]\n    target: http://{provider}\n    credential: {{ kind: static, ttl: 1m }}\n    inject: {{ type: header, name: x-api-key, format: \"{{token}}\" }}\n    deactivation_probe: {{ method: GET, path: /v1/me, expect: [401] }}\ngrants:\n  - workload: {APP_ID}\n    upstreams: {granted}\n"
    )
}

const VAULT_V1: &str = "vault-key-v1-RXhwb3NlZCBpbiBDSQ";
const VAULT_V2: &str = "vault-key-v2-Um90YXRlZA";

/// A provider that accepts only the current vault key; counts the
/// requests that carried the old one.
async fn provider() -> (SocketAddr, std::sync::Arc<std::sync::atomic::AtomicU64>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let old = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let seen = old.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = l.accept().await {
            let seen = seen.clone();
            let svc =
                hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let key = req
                        .headers()
                        .get("x-api-key")
                        .map(|v| v.as_bytes().to_vec());
                    if key.as_deref() == Some(VAULT_V1.as_bytes()) {
                        seen.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    let status = if key.as_deref() == Some(VAULT_V2.as_bytes()) {
                        200
                    } else {
                        401
                    };
                    async move {
                        Ok::<_, std::convert::Infallible>(
                            http::Response::builder()
                                .status(status)
                                .body(http_body_util::Full::new(Bytes::new()))
                                .unwrap(),
                        )
                    }
                });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tcp), svc),
            );
        }
    });
    (addr, old)
}

/// A master key for the control plane, in a private file.
fn master_key(dir: &Path) -> std::path::PathBuf {
    let out = Command::new(env!("CARGO_BIN_EXE_leash-control-plane"))
        .arg("master-key")
        .output()
        .unwrap();
    assert!(out.status.success());
    let path = dir.join("master.key");
    std::fs::write(&path, &out.stdout).unwrap();
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path
}

fn json(out: &str) -> serde_json::Value {
    serde_json::from_str(out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
}

/// The mission as `leashctl --json mission show` prints it.
fn show(admin: SocketAddr, token: &str, id: &str) -> serde_json::Value {
    let (code, out, err) = leashctl(admin, Some(token), &["--json", "mission", "show", id]);
    assert_eq!(code, 0, "{err}");
    json(&out)
}

async fn wait_state(admin: SocketAddr, token: &str, id: &str, state: &str) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let m = show(admin, token, id);
        if m["state"] == state {
            return m;
        }
        assert!(
            Instant::now() < deadline,
            "mission never {state}: {}",
            serde_json::to_string_pretty(&m["criteria"]).unwrap()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_incident_from_scanner_report_to_a_mission_that_closes_and_reopens_itself() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let _identity = start_identity(d, "10m", "identity.log").await;
    let (upstream, _) = counting_upstream().await;
    let (vault, old_key_seen) = provider().await;
    let policy_file = d.join("policy.yaml");
    std::fs::write(&policy_file, policy(upstream, vault, true)).unwrap();
    let (sidecar_api, admin) = (free_port(), free_port());
    let mut args = serve_args(d, sidecar_api, admin);
    args.retain(|a| a != "--insecure-dev");
    args.extend([
        "--mission-interval".to_owned(),
        "200ms".to_owned(),
        "--master-key-file".to_owned(),
        master_key(d).display().to_string(),
    ]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let _cp = spawn(&args, &d.join("cp.log"));
    wait_ready(admin).await;
    let token = std::fs::read_to_string(d.join("data/admin-token"))
        .unwrap()
        .trim()
        .to_owned();
    let sidecar = sidecar(d, sidecar_api, &["--report-interval", "200ms"]).await;
    let proxy = sidecar.egress_addr;
    wait_until("sidecar ready", || sidecar.link.pending().is_empty()).await;

    let (trufflehog, detect) = scanned_repository(d);
    let leaked_before = json(&leashctl(admin, Some(&token), &["--json", "leaked", "list"]).1);

    // A malformed report: the line named, nothing registered.
    let broken = d.join("broken.json");
    std::fs::write(
        &broken,
        "[\n  {\"rule\": {\"id\": \"x\"},\n   \"path\": 3\n]",
    )
    .unwrap();
    let (code, _, err) = leashctl(
        admin,
        Some(&token),
        &[
            "leaked",
            "import",
            "--format",
            "trufflehog",
            "--owner",
            "sec",
        ],
    );
    assert_ne!(code, 0, "a report is required: {err}");
    let (code, _, err) = leashctl(
        admin,
        Some(&token),
        &[
            "leaked",
            "import",
            "--format",
            "trufflehog",
            broken.to_str().unwrap(),
            "--owner",
            "sec",
        ],
    );
    assert_ne!(code, 0);
    assert!(err.contains("line 3"), "{err}");
    assert!(err.contains("nothing was registered"), "{err}");
    assert_eq!(
        json(&leashctl(admin, Some(&token), &["--json", "leaked", "list"]).1),
        leaked_before
    );

    // The real report: two secrets, found in three places, one mission.
    let (code, out, err) = leashctl(
        admin,
        Some(&token),
        &[
            "--json",
            "leaked",
            "import",
            "--format",
            "trufflehog",
            trufflehog.to_str().unwrap(),
            "--owner",
            "sec-team",
            "--window",
            "2s",
            "--deadline",
            "7d",
        ],
    );
    assert_eq!(code, 0, "{err}");
    // What leashctl prints never holds a value it imported.
    for secret in [LEAKED_AWS, LEAKED_TOKEN] {
        assert!(!out.contains(secret) && !err.contains(secret), "{out}{err}");
    }
    let imported = json(&out);
    assert_eq!(imported["secrets"], 2, "{imported}");
    let mission = imported["mission"].as_str().unwrap().to_owned();
    // detect-secrets keeps only hashes: the values are read back from the
    // scanned files; the same two secrets land in the same mission once.
    let (code, _, err) = leashctl(
        admin,
        Some(&token),
        &[
            "leaked",
            "import",
            "--format",
            "detect-secrets",
            detect.to_str().unwrap(),
            "--root",
            d.join("repo").to_str().unwrap(),
            "--mission",
            &mission,
        ],
    );
    assert_eq!(code, 0, "{err}");
    let m = show(admin, &token, &mission);
    assert_eq!(m["findings"].as_array().unwrap().len(), 2, "{m}");
    assert_eq!(m["owner"], "sec-team");
    let aws_finding = m["findings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["note"]["locations_total"] == 2)
        .expect("the AWS key, found in two files");
    let aws = aws_finding["finding"]["revocation_id"]
        .as_str()
        .unwrap()
        .to_owned();
    // Nothing of the values anywhere in what the control plane gives back.
    let everything = serde_json::to_string(&m).unwrap();
    assert!(!everything.contains(LEAKED_AWS) && !everything.contains(LEAKED_TOKEN));

    // More findings: the grant the leaked key was used under, the consumer
    // still holding a credential of its own.
    let (code, _, err) = leashctl(
        admin,
        Some(&token),
        &[
            "mission",
            "add",
            &mission,
            &format!("grant:{APP_ID}@ledger"),
            &format!("sighting:{aws}@{APP_ID}"),
        ],
    );
    assert_eq!(code, 0, "{err}");

    // The vault key exposed alongside: a new version goes in, the responder
    // revokes the old one, and the control plane asks the provider.
    for value in [VAULT_V1, VAULT_V2] {
        let file = d.join("value");
        std::fs::write(&file, value).unwrap();
        let (code, _, err) = leashctl(
            admin,
            Some(&token),
            &[
                "secret",
                "put",
                "vault-api",
                "--file",
                file.to_str().unwrap(),
            ],
        );
        assert_eq!(code, 0, "{err}");
        std::fs::remove_file(&file).unwrap();
    }
    let (code, _, err) = leashctl(
        admin,
        Some(&token),
        &["mission", "add", &mission, "secret-version:vault-api/1"],
    );
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = leashctl(
        admin,
        Some(&token),
        &[
            "secret",
            "revoke-version",
            "vault-api",
            "1",
            "--reason",
            "exposed with the AWS key",
        ],
    );
    assert_eq!(code, 0, "{err}");
    wait_until("the provider probed with the old key", || {
        old_key_seen.load(std::sync::atomic::Ordering::Relaxed) == 1
    })
    .await;

    // The forgotten consumer keeps sending the leaked key, and its own
    // credential to payments: refused and seen, stripped and reported.
    let payments = "http://payments.leash.test/";
    assert_eq!(
        send(proxy, payments, &[("x-api-key", LEAKED_AWS)]).await,
        403
    );
    assert_eq!(
        send(
            proxy,
            payments,
            &[("authorization", "Bearer its-own-old-token")]
        )
        .await,
        200
    );
    wait_until("the stripped credential reported", || {
        let (_, out, _) = leashctl(admin, Some(&token), &["--json", "stripped"]);
        out.contains(APP_ID)
    })
    .await;
    let (code, _, err) = leashctl(
        admin,
        Some(&token),
        &[
            "mission",
            "add",
            &mission,
            &format!("stripped:{APP_ID}@payments"),
        ],
    );
    assert_eq!(
        code,
        0,
        "{err}\n{}",
        std::fs::read_to_string(d.join("cp.log")).unwrap_or_default()
    );
    for _ in 0..8 {
        assert_eq!(
            send(proxy, payments, &[("x-api-key", LEAKED_AWS)]).await,
            403
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // Seen all along: open, and saying why.
    let m = show(admin, &token, &mission);
    assert_eq!(m["state"], "open", "{m}");
    let failing: Vec<&serde_json::Value> = m["criteria"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["holds"] == false)
        .collect();
    assert!(
        failing
            .iter()
            .any(|c| c["criterion"] == "no-sightings"
                && c["detail"].as_str().unwrap().contains("seen")),
        "{failing:?}"
    );
    assert!(failing.iter().any(|c| c["criterion"] == "grants-cleaned"));
    let acknowledged = m["criteria"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["criterion"] == "acknowledged")
        .collect::<Vec<_>>();
    assert_eq!(
        acknowledged.len(),
        3,
        "two leaked values and the vault key's version"
    );
    assert!(
        acknowledged.iter().all(|c| c["holds"] == true),
        "{acknowledged:?}"
    );
    assert!(acknowledged[0]["inputs"]["propagation"]["acknowledged"][0]["latency_ms"].is_i64());

    // Migrated: the consumer stops, the grant goes from the policy.
    std::fs::write(&policy_file, policy(upstream, vault, false)).unwrap();
    let closed = wait_state(admin, &token, &mission, "closed").await;
    assert!(closed["all_hold"] == true, "{closed}");
    let source = closed["criteria"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["criterion"] == "deactivated-at-source")
        .expect("the secret version is judged at its source")
        .clone();
    assert_eq!(source["inputs"]["probes"][0]["status"], 401, "{source}");
    let last = closed["changes"]
        .as_array()
        .unwrap()
        .last()
        .unwrap()
        .clone();
    assert_eq!(last["actor"], "leash:missions");
    assert!(
        last["reason"].as_str().unwrap().contains("criteria hold"),
        "{last}"
    );

    // The evidence, signed; verified offline against the published JWKS
    // (by URL and from a file); one byte changed and it no longer verifies.
    let bundle = d.join("evidence.json");
    let (code, _, err) = leashctl(
        admin,
        Some(&token),
        &[
            "mission",
            "evidence",
            &mission,
            "--out",
            bundle.to_str().unwrap(),
        ],
    );
    assert_eq!(code, 0, "{err}");
    let report = std::fs::read_to_string(d.join("evidence.json.html")).unwrap();
    assert!(
        report.contains(&mission) && report.contains("CLOSED"),
        "{report}"
    );
    // One file: nothing loaded from anywhere.
    for external in ["<script", "src=", "href=", "<link", "url("] {
        assert!(!report.contains(external), "{external} in the report");
    }
    let jwks_url = format!("http://{admin}/.well-known/jwks.json");
    let (code, out, err) = leashctl(
        admin,
        None,
        &[
            "--json",
            "evidence",
            "verify",
            bundle.to_str().unwrap(),
            "--jwks",
            &jwks_url,
        ],
    );
    assert_eq!(code, 0, "{err}");
    let verdict = json(&out);
    assert_eq!(verdict["valid"], true);
    assert_eq!(verdict["open"], false);
    assert!(verdict["kid"].as_str().unwrap().starts_with("evidence-"));
    let signed = json(&std::fs::read_to_string(&bundle).unwrap());
    let payload = base64_decode(signed["payload"].as_str().unwrap());
    let evidence: serde_json::Value = serde_json::from_slice(&payload).unwrap();
    assert_eq!(evidence["mission"]["state"], "closed");
    assert!(evidence["revocations"][0]["propagation"]["acknowledged"][0]["latency_ms"].is_i64());
    assert!(
        evidence["audit"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["action"] == "mission.closed" && a["hash"].is_string())
    );
    let text = String::from_utf8_lossy(&payload).into_owned();
    for secret in [LEAKED_AWS, LEAKED_TOKEN, VAULT_V1, VAULT_V2] {
        assert!(!text.contains(secret), "a secret in the evidence");
    }
    let (_, jwks) = get(admin, &jwks_url).await.unwrap();
    let jwks_file = d.join("jwks.json");
    std::fs::write(&jwks_file, jwks.to_string()).unwrap();
    let (code, _, err) = leashctl(
        admin,
        None,
        &[
            "evidence",
            "verify",
            bundle.to_str().unwrap(),
            "--jwks",
            jwks_file.to_str().unwrap(),
        ],
    );
    assert_eq!(code, 0, "{err}");
    let mut tampered = std::fs::read(&bundle).unwrap();
    let at = tampered
        .windows(12)
        .position(|w| w == b"\"payload\": \"")
        .unwrap()
        + 40;
    tampered[at] = if tampered[at] == b'A' { b'B' } else { b'A' };
    let forged = d.join("forged.json");
    std::fs::write(&forged, tampered).unwrap();
    let (code, _, err) = leashctl(
        admin,
        None,
        &[
            "evidence",
            "verify",
            forged.to_str().unwrap(),
            "--jwks",
            jwks_file.to_str().unwrap(),
        ],
    );
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("INVALID"), "{err}");

    // A new sighting reopens it, with the reason.
    assert_eq!(
        send(proxy, payments, &[("x-api-key", LEAKED_AWS)]).await,
        403
    );
    let reopened = wait_state(admin, &token, &mission, "open").await;
    let last = reopened["changes"]
        .as_array()
        .unwrap()
        .last()
        .unwrap()
        .clone();
    assert!(
        last["reason"].as_str().unwrap().contains("no-sightings"),
        "{last}"
    );

    // Evidence of an open mission is exported, and says it is open.
    let (code, out, err) = leashctl(
        admin,
        Some(&token),
        &[
            "--json",
            "mission",
            "evidence",
            &mission,
            "--out",
            d.join("open.json").to_str().unwrap(),
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(json(&out)["open"], true);

    // Both changes are in the audit log and counted.
    let (_, out, _) = leashctl(admin, Some(&token), &["--json", "audit", "--limit", "200"]);
    assert!(
        out.contains("mission.closed") && out.contains("mission.open"),
        "{out}"
    );
    let text = text_of(admin, "/metrics").await;
    assert!(
        text.contains("leash_cp_mission_changes_total{to=\"closed\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("leash_cp_mission_changes_total{to=\"open\"} 1"),
        "{text}"
    );

    // By hand: close with a reason (marked so), a second close is a conflict.
    let (code, out, err) = leashctl(
        admin,
        Some(&token),
        &[
            "--json",
            "mission",
            "close",
            &mission,
            "--reason",
            "accepted risk",
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(json(&out)["closed_by_hand"], true);
    let (code, _, err) = leashctl(
        admin,
        Some(&token),
        &["mission", "close", &mission, "--reason", "again"],
    );
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("already closed"), "{err}");

    // Nothing the incident handled reached the control plane's log.
    let log = std::fs::read_to_string(d.join("cp.log")).unwrap();
    for secret in [LEAKED_AWS, LEAKED_TOKEN, VAULT_V1, VAULT_V2] {
        assert!(!log.contains(secret), "a secret in the control plane's log");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_missions_are_refused_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let _identity = start_identity(d, "10m", "identity.log").await;
    let (upstream, _) = counting_upstream().await;
    std::fs::write(d.join("policy.yaml"), policy(upstream, upstream, true)).unwrap();
    let (sidecar_api, admin) = (free_port(), free_port());
    let mut args = serve_args(d, sidecar_api, admin);
    args.extend(["--mission-interval".to_owned(), "200ms".to_owned()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let _cp = spawn(&args, &d.join("cp.log"));
    wait_ready(admin).await;
    let token = std::fs::read_to_string(d.join("data/admin-token"))
        .unwrap()
        .trim()
        .to_owned();
    let create = |extra: &[&str]| {
        let mut a = vec!["mission", "create", "--objective", "o", "--owner", "me"];
        a.extend_from_slice(extra);
        leashctl(admin, Some(&token), &a)
    };
    for (extra, want) in [
        (
            vec!["--finding", "leaked:rev-nope"],
            "no leaked value rev-nope",
        ),
        (
            vec!["--finding", "revocation:rev-nope"],
            "no revocation rev-nope",
        ),
        (
            vec!["--finding", "secret-version:payments/3"],
            "no version 3",
        ),
        (
            vec!["--finding", "grant:not-an-id@payments"],
            "invalid SPIFFE ID",
        ),
        (
            vec!["--finding", "stripped:spiffe://leash.test/x@nowhere"],
            "no upstream \"nowhere\"",
        ),
        (vec!["--window", "0s"], "out of range"),
        (vec!["--window", "100d"], "out of range"),
        (vec!["--window", "soon"], "window"),
        (vec!["--deadline", "someday"], "deadline"),
    ] {
        let (code, _, err) = create(&extra);
        assert_eq!(code, 1, "{extra:?}: {err}");
        assert!(err.contains(want), "{extra:?}: {err}");
    }
    let (code, _, err) = leashctl(
        admin,
        Some(&token),
        &[
            "mission",
            "create",
            "--objective",
            "o",
            "--owner",
            "me",
            "--finding",
            "bogus",
        ],
    );
    assert_eq!(code, 2, "clap refuses an unparseable finding: {err}");
    // Past its deadline and open: overdue, in the list and the metrics.
    let (code, out, err) = leashctl(
        admin,
        Some(&token),
        &[
            "--json",
            "mission",
            "create",
            "--objective",
            "late",
            "--owner",
            "me",
            "--deadline",
            "2020-01-01T00:00:00Z",
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(json(&out)["overdue"], true);
    let (_, out, _) = leashctl(admin, Some(&token), &["mission", "list"]);
    assert!(out.contains("open (OVERDUE)"), "{out}");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !text_of(admin, "/metrics")
        .await
        .contains("leash_cp_missions{state=\"overdue\"} 1")
    {
        assert!(Instant::now() < deadline, "the overdue gauge never moved");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (code, _, err) = leashctl(admin, Some(&token), &["mission", "show", "m-nope"]);
    assert_eq!(code, 1);
    assert!(err.contains("no mission m-nope"), "{err}");
    // A gitleaks report (its documented JSON format) with a finding that has
    // no secret: refused as a whole, naming the finding.
    let report = d.join("gitleaks.json");
    std::fs::write(
        &report,
        r#"[{"RuleID":"generic-api-key","File":"a.py","StartLine":4,"Secret":"abcdefabcdef1234","Commit":"c0ffee"},
            {"RuleID":"generic-api-key","File":"b.py","StartLine":9,"Secret":"","Commit":"c0ffee"}]"#,
    )
    .unwrap();
    let (code, _, err) = leashctl(
        admin,
        Some(&token),
        &[
            "leaked",
            "import",
            "--format",
            "gitleaks",
            report.to_str().unwrap(),
            "--owner",
            "me",
        ],
    );
    assert_ne!(code, 0);
    assert!(err.contains("finding 1 (line 9 of b.py)"), "{err}");
    assert!(!err.contains("abcdefabcdef1234"), "{err}");
}

/// A GET's body as text.
async fn text_of(admin: SocketAddr, path: &str) -> String {
    let tcp = tokio::net::TcpStream::connect(admin).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = http::Request::get(path)
        .header("host", admin.to_string())
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    String::from_utf8_lossy(&resp.into_body().collect().await.unwrap().to_bytes()).into_owned()
}

fn base64_decode(s: &str) -> Vec<u8> {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(s)
        .unwrap()
}
