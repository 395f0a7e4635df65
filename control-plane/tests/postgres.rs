//! The control plane on PostgreSQL, end to end with real processes: served
//! with `--database-url`, a sidecar connects, a revocation is committed and
//! acknowledged, the control plane restarts and still has it, enforced, and
//! the audit chain verifies. And over TLS: a PostgreSQL of the test's own that
//! takes TLS only, `sslmode=verify-full` with its CA serves, another CA stops
//! the start. Skipped (with a line) when `LEASH_TEST_DATABASE_URL` is not set;
//! `.ci/run` always sets it.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test stops at the first failed step, with its message"
)]

mod common;
#[path = "../src/store/fresh_pg.rs"]
mod fresh_pg;

use std::time::{Duration, Instant};

use common::pg::OwnPostgres;
use common::*;
use sqlx::Connection as _;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// `url` with a password in its user part (trust authentication ignores
/// it): the one the logs and the config dump must never show.
fn with_password(url: &str) -> (String, String) {
    let (scheme, rest) = url.split_once("://").unwrap();
    let (userinfo, host) = rest.split_once('@').expect("a user in the test URL");
    match userinfo.split_once(':') {
        Some((_, password)) => (url.to_owned(), password.to_owned()),
        None => {
            let password = "e2e-Pa55word-never-logged";
            (
                format!("{scheme}://{userinfo}:{password}@{host}"),
                password.to_owned(),
            )
        }
    }
}

/// The admin API's config dump (admin token).
async fn config_dump(admin: std::net::SocketAddr, token: &str) -> String {
    let mut tcp = tokio::net::TcpStream::connect(admin).await.unwrap();
    tcp.write_all(
        format!(
            "GET /v1/config_dump HTTP/1.1\r\nHost: {admin}\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut answer = String::new();
    tcp.read_to_string(&mut answer).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    answer
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_control_plane_on_postgresql_keeps_its_revocations_and_audit_chain_across_a_restart() {
    let Some(db) = fresh_pg::FreshDatabase::create("the PostgreSQL end-to-end test").await else {
        return;
    };
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::Builder::new()
        .prefix("lpg")
        .tempdir_in("/tmp")
        .unwrap();
    let d = dir.path();
    let _identity = start_identity(d, "10m", "identity.log").await;
    let (upstream_addr, _) = counting_upstream().await;
    std::fs::write(
        d.join("policy.yaml"),
        format!(
            "version: 1\nupstreams:\n  - name: payments\n    hosts: [payments.leash.test]\n    target: http://{upstream_addr}\n    credential: {{ kind: jwt, ttl: 5m }}\ngrants:\n  - workload: {APP_ID}\n    upstreams: [payments]\n"
        ),
    )
    .unwrap();
    let (database_url, password) = with_password(&db.url);
    let (sidecar_api, admin) = (free_port(), free_port());
    let mut serve = serve_args(d, sidecar_api, admin);
    serve.extend(["--database-url".to_owned(), database_url]);
    let args: Vec<&str> = serve.iter().map(String::as_str).collect();
    let cp1 = spawn(&args, &d.join("cp1.log"));
    wait_ready(admin).await;
    // The store is in PostgreSQL; the data directory keeps the files only.
    assert!(d.join("data/admin-token").exists());
    assert!(!d.join("data/leash.db").exists());
    let token = std::fs::read_to_string(d.join("data/admin-token"))
        .unwrap()
        .trim()
        .to_owned();
    let dump = config_dump(admin, &token).await;
    assert!(dump.contains(":***@"), "{dump}");

    let sidecar = sidecar(d, sidecar_api, &["--max-staleness", "60s"]).await;
    let proxy = sidecar.egress_addr;
    let url = "http://payments.leash.test/";
    let deadline = Instant::now() + Duration::from_secs(20);
    while get(proxy, url).await.map(|r| r.0) != Some(200) {
        assert!(Instant::now() < deadline, "sidecar never forwarded");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let (code, out, err) = leashctl(
        admin,
        Some(&token),
        &["--json", "revoke", "workload", APP_ID, "--reason", "leaked"],
    );
    assert_eq!(code, 0, "{err}");
    let revocation: serde_json::Value = serde_json::from_str(&out).unwrap();
    let id = revocation["id"].as_str().unwrap().to_owned();
    // Acknowledged by the sidecar (recorded in PostgreSQL), and enforced.
    let acknowledged = |what: &str| {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let (code, out, _) = leashctl(admin, Some(&token), &["status", &id]);
            assert_eq!(code, 0);
            if out.contains("acknowledged by 1 sidecar(s)") && out.contains(APP_ID) {
                return;
            }
            assert!(Instant::now() < deadline, "{what}: {out}");
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    acknowledged("not acknowledged");
    assert!(matches!(get(proxy, url).await, Some((403, _))));

    // Killed, and a new process on the same database.
    drop(cp1);
    let cp2 = spawn(&args, &d.join("cp2.log"));
    wait_ready(admin).await;
    let (code, out, err) = leashctl(admin, Some(&token), &["--json", "status", &id]);
    assert_eq!(code, 0, "{err}");
    let status: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(status["active"], true);
    assert_eq!(status["seq"], revocation["seq"]);
    // Still enforced by the sidecar, reconnected to the new process.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = get(proxy, url).await;
        if let Some((403, body)) = &r {
            assert_eq!(body["error"], "revoked_workload");
            assert_eq!(body["revocation_id"], id.as_str());
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not enforced after restart: {r:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The audit chain, written by both processes, verifies.
    let (code, out, err) = leashctl(admin, Some(&token), &["--json", "audit", "verify"]);
    assert_eq!(code, 0, "{err}");
    let verdict: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(verdict["ok"], true, "{out}");
    assert!(verdict["chained"].as_u64().unwrap() >= 3, "{out}");
    assert!(verdict["first_bad_id"].is_null(), "{out}");

    drop(cp2);
    sidecar.shutdown(Duration::from_secs(2)).await;
    // The password appears in no log.
    for log in ["cp1.log", "cp2.log"] {
        let text = std::fs::read_to_string(d.join(log)).unwrap();
        assert!(
            text.contains("postgres://") && text.contains(":***@"),
            "{log}: {text}"
        );
        assert!(!text.contains(&password), "{log} shows the password");
    }
    db.drop_database().await;
}

/// A CA named `name` for the test's TLS, written to `file`.
fn test_ca(name: &str, file: &std::path::Path) -> rcgen::CertifiedIssuer<'static, rcgen::KeyPair> {
    let mut params = rcgen::CertificateParams::default();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    let ca =
        rcgen::CertifiedIssuer::self_signed(params, rcgen::KeyPair::generate().unwrap()).unwrap();
    std::fs::write(file, ca.pem()).unwrap();
    ca
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_control_plane_reaches_postgresql_over_verified_tls_and_refuses_an_unknown_ca() {
    // Needs initdb only where the other PostgreSQL tests run: CI sets the
    // variable (and installs PostgreSQL); local runs without it skip.
    if std::env::var_os(fresh_pg::TEST_DATABASE_URL).is_none() {
        eprintln!(
            "skipped the PostgreSQL TLS test: {} is not set",
            fresh_pg::TEST_DATABASE_URL
        );
        return;
    }
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::Builder::new()
        .prefix("lpgtls")
        .tempdir_in("/tmp")
        .unwrap();
    let d = dir.path();
    let ca = test_ca("leash test PostgreSQL CA", &d.join("ca.pem"));
    let _other_ca = test_ca("another CA", &d.join("other-ca.pem"));
    let pg = OwnPostgres::start(Some(&ca));

    // The server takes TLS only: without it, refused.
    let plain = format!(
        "postgres://postgres@127.0.0.1:{}/postgres?sslmode=disable",
        pg.port
    );
    assert!(sqlx::PgConnection::connect(&plain).await.is_err());

    let _identity = start_identity(d, "10m", "identity.log").await;
    std::fs::write(
        d.join("policy.yaml"),
        "version: 1\nupstreams: []\ngrants: []\n",
    )
    .unwrap();
    let (sidecar_api, admin) = (free_port(), free_port());
    let serve = |url: String| {
        let mut args = serve_args(d, sidecar_api, admin);
        args.extend(["--database-url".to_owned(), url]);
        args
    };

    // verify-full with the server's CA: serves, and the store answers.
    let args = serve(pg.url("verify-full", &d.join("ca.pem")));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let cp = spawn(&args, &d.join("cp.log"));
    wait_ready(admin).await;
    let token = std::fs::read_to_string(d.join("data/admin-token"))
        .unwrap()
        .trim()
        .to_owned();
    let (code, out, err) = leashctl(admin, Some(&token), &["--json", "audit", "verify"]);
    assert_eq!(code, 0, "{err}");
    let verdict: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(verdict["ok"], true, "{out}");
    drop(cp);

    // verify-full with another CA: refuses to start, saying why.
    let args = serve(pg.url("verify-full", &d.join("other-ca.pem")));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut cp = spawn(&args, &d.join("cp-other-ca.log"));
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = cp.0.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "started with an unknown CA");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(!status.success());
    let log = std::fs::read_to_string(d.join("cp-other-ca.log")).unwrap();
    assert!(
        log.contains("Error: ") && log.contains("certificate"),
        "no certificate error: {log}"
    );
    drop(pg);
}
