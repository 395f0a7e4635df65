//! The admin port over TLS, with real clients: curl and leashctl verify it
//! against the CA (and refuse it without), plain HTTP gets nothing, the
//! JWKS carries an ETag that curl can revalidate with, and a renewed
//! certificate is served without a restart.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test stops at the first failed step, with its message"
)]

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType, IsCa, KeyPair,
    KeyUsagePurpose, SanType,
};

/// Writes a server certificate for 127.0.0.1 named `cn`, issued by `ca`.
fn write_cert(dir: &Path, ca: &CertifiedIssuer<'_, KeyPair>, cn: &str) {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params
        .subject_alt_names
        .push(SanType::IpAddress([127, 0, 0, 1].into()));
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, cn);
    params.distinguished_name = name;
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, ca).unwrap();
    // Written next to the live files, then renamed over them, as a
    // certificate manager does.
    std::fs::write(dir.join("admin.key.new"), key.serialize_pem()).unwrap();
    std::fs::write(dir.join("admin.crt.new"), cert.pem()).unwrap();
    std::fs::rename(dir.join("admin.key.new"), dir.join("admin.key")).unwrap();
    std::fs::rename(dir.join("admin.crt.new"), dir.join("admin.crt")).unwrap();
}

fn curl(args: &[&str]) -> (bool, String, String) {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "5"])
        .args(args)
        .output()
        .expect("curl is installed (.ci/run installs it)");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn the_admin_port_serves_tls_that_real_clients_verify_and_renews_it() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut ca_params = CertificateParams::default();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    let issuer = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    std::fs::write(d.join("ca.pem"), issuer.pem()).unwrap();
    write_cert(d, &issuer, "admin-v1");
    std::fs::write(
        d.join("policy.yaml"),
        "version: 1\nupstreams:\n  - name: payments\n    hosts: [payments.leash.test]\n    target: http://127.0.0.1:9\n    credential: { kind: jwt }\ngrants: []\n",
    )
    .unwrap();
    let _identity = start_identity(d, "10m", "identity.log").await;
    let (api, admin) = (free_port(), free_port());
    let mut args = serve_args(d, api, admin);
    args.extend(
        [
            "--admin-tls-cert",
            &d.join("admin.crt").display().to_string(),
            "--admin-tls-key",
            &d.join("admin.key").display().to_string(),
        ]
        .map(str::to_owned),
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let _cp = spawn(&args, &d.join("cp.log"));
    let ca = d.join("ca.pem").display().to_string();
    let base = format!("https://{admin}");
    let ready = format!("{base}/readyz");
    wait_until("ready over TLS", || {
        curl(&["-f", "--cacert", &ca, &ready]).0
    })
    .await;

    // Verified with the CA; refused without it; nothing over plain HTTP.
    let (ok, _, err) = curl(&["-f", &ready]);
    assert!(!ok, "an unknown CA must fail verification: {err}");
    let (ok, _, _) = curl(&["-f", &format!("http://{admin}/readyz")]);
    assert!(!ok, "plain HTTP is not served on a TLS admin port");

    // The JWKS, with an ETag curl revalidates with (304, no body).
    let jwks = format!("{base}/.well-known/jwks.json");
    let (ok, headers, _) = curl(&["-f", "--cacert", &ca, "-D", "-", "-o", "/dev/null", &jwks]);
    assert!(ok);
    let etag = headers
        .lines()
        .find_map(|l| l.strip_prefix("etag: "))
        .unwrap_or_else(|| panic!("no etag in {headers}"))
        .trim()
        .to_owned();
    assert!(
        headers.contains("cache-control: public, max-age=60"),
        "{headers}"
    );
    let (_, out, _) = curl(&[
        "--cacert",
        &ca,
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "-H",
        &format!("If-None-Match: {etag}"),
        &jwks,
    ]);
    assert_eq!(out, "304");

    // The issuer is https:// once TLS is on.
    let token = std::fs::read_to_string(d.join("data/admin-token")).unwrap();
    let (ok, body, _) = curl(&[
        "-f",
        "--cacert",
        &ca,
        "-H",
        &format!("Authorization: Bearer {}", token.trim()),
        &format!("{base}/v1/config_dump"),
    ]);
    assert!(ok);
    assert!(
        body.contains(&format!("\"issuer\":\"https://{admin}\"")),
        "{body}"
    );

    // leashctl: --ca-file (or LEASH_CA_FILE) verifies; without it, exit 3.
    let leashctl = |extra: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_leashctl"))
            .args(["--addr", &base, "--token", token.trim()])
            .args(extra)
            .args(["sidecars"])
            .env_remove("LEASH_CA_FILE")
            .output()
            .unwrap()
    };
    let out = leashctl(&["--ca-file", &ca]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = leashctl(&[]);
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A renewed certificate is served without a restart.
    let (_, _, verbose) = curl(&["-v", "--cacert", &ca, "-o", "/dev/null", &ready]);
    assert!(verbose.contains("CN=admin-v1"), "{verbose}");
    std::thread::sleep(Duration::from_millis(1100));
    write_cert(d, &issuer, "admin-v2");
    wait_until("renewed certificate served", || {
        let (_, _, verbose) = curl(&["-v", "--cacert", &ca, "-o", "/dev/null", &ready]);
        verbose.contains("CN=admin-v2")
    })
    .await;
}
