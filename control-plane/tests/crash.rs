//! A revocation acknowledged to a responder survives a SIGKILL of the
//! control plane (invariant I5): real processes, real leashctl, and a real
//! sidecar that keeps enforcing it across the restart.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test stops at the first failed step, with its message"
)]

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use hyper_util::rt::TokioIo;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_survives_sigkill_and_stays_enforced() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::Builder::new()
        .prefix("lsh")
        .tempdir_in("/tmp")
        .unwrap();
    let d = dir.path();
    let sock = |n: &str| d.join(n);
    let _identity = spawn(
        &[
            "dev-identity",
            "--socket",
            &format!("{}={CP_ID}", sock("cp.sock").display()),
            "--socket",
            &format!("{}={APP_ID}", sock("app.sock").display()),
        ],
        &d.join("identity.log"),
    );
    wait_until("identity sockets", || {
        sock("app.sock").exists() && sock("cp.sock").exists()
    })
    .await;

    // An upstream that accepts anything: enforcement here is the sidecar's.
    let upstream = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream_addr = upstream.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = upstream.accept().await else {
                continue;
            };
            tokio::spawn(hyper::server::conn::http1::Builder::new().serve_connection(
                TokioIo::new(tcp),
                hyper::service::service_fn(|_req| async {
                    Ok::<_, std::convert::Infallible>(hyper::Response::new(
                        http_body_util::Full::new(Bytes::from("{}")),
                    ))
                }),
            ));
        }
    });
    let policy = d.join("policy.yaml");
    std::fs::write(
        &policy,
        format!(
            "version: 1\nupstreams:\n  - name: payments\n    hosts: [payments.leash.test]\n    target: http://{upstream_addr}\n    credential: {{ kind: jwt, ttl: 5m }}\ngrants:\n  - workload: {APP_ID}\n    upstreams: [payments]\n"
        ),
    )
    .unwrap();
    let (sidecar_api, admin) = (free_port(), free_port());
    let serve_args: Vec<String> = [
        "serve",
        "--policy",
        &policy.display().to_string(),
        "--data-dir",
        &d.join("data").display().to_string(),
        "--listen",
        &sidecar_api.to_string(),
        "--admin-listen",
        &admin.to_string(),
        "--spiffe-endpoint",
        &format!("unix://{}", sock("cp.sock").display()),
        "--heartbeat-interval",
        "500ms",
        "--insecure-dev",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let args: Vec<&str> = serve_args.iter().map(String::as_str).collect();
    let start_cp = |n: u32| spawn(&args, &d.join(format!("cp{n}.log")));
    let mut cp = start_cp(1);
    let ready = || async {
        get(admin, &format!("http://{admin}/readyz"))
            .await
            .is_some_and(|(s, _)| s == 200)
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while !ready().await {
        assert!(
            Instant::now() < deadline,
            "control plane not ready: {}",
            std::fs::read_to_string(d.join("cp1.log")).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let token = std::fs::read_to_string(d.join("data/admin-token"))
        .unwrap()
        .trim()
        .to_owned();

    // Configured exactly as the binary would be from these flags.
    let cli = <leash_proxy::cli::Cli as clap::Parser>::try_parse_from([
        "leash-proxy".to_owned(),
        "--spiffe-endpoint".to_owned(),
        format!("unix://{}", sock("app.sock").display()),
        "--control-plane".to_owned(),
        sidecar_api.to_string(),
        "--max-staleness".to_owned(),
        "60s".to_owned(),
    ])
    .unwrap();
    let config = cli.config().unwrap();
    let sidecar = leash_proxy::Sidecar::start(
        config,
        tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
        tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
        Vec::new(),
    )
    .unwrap();
    let proxy = sidecar.egress_addr;
    let url = "http://payments.leash.test/";
    let deadline = Instant::now() + Duration::from_secs(20);
    while get(proxy, url).await.map(|r| r.0) != Some(200) {
        assert!(Instant::now() < deadline, "sidecar never forwarded");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // leashctl's exit codes: refused (1) without a token, unreachable (3).
    assert_eq!(leashctl(admin, None, &["revocations"]).0, 1);
    assert_eq!(leashctl(free_port(), Some(&token), &["revocations"]).0, 3);

    let (code, out, err) = leashctl(
        admin,
        Some(&token),
        &[
            "--json",
            "revoke",
            "workload",
            APP_ID,
            "--reason",
            "credential found in a public repo",
        ],
    );
    assert_eq!(code, 0, "{err}");
    let revocation: serde_json::Value = serde_json::from_str(&out).unwrap();
    let id = revocation["id"].as_str().unwrap().to_owned();
    // Killed the moment the responder has the answer.
    cp.0.kill().unwrap();
    cp.0.wait().unwrap();

    cp = start_cp(2);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !ready().await {
        assert!(Instant::now() < deadline, "control plane did not restart");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (code, out, err) = leashctl(admin, Some(&token), &["--json", "status", &id]);
    assert_eq!(code, 0, "{err}");
    let status: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(status["active"], true);
    assert_eq!(status["seq"], revocation["seq"]);

    // Enforced by the sidecar (whether it applied it before the kill or on
    // reconnect), and by the restarted control plane.
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
    // The reconnected sidecar's acknowledgement is on record again.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (code, out, _) = leashctl(admin, Some(&token), &["status", &id]);
        assert_eq!(code, 0);
        // The session killed with the control plane may have had its own
        // acknowledgement written before the kill (then two sessions of the
        // one sidecar are on record), or not.
        if (out.contains("acknowledged by 1 sidecar(s)")
            || out.contains("acknowledged by 2 sidecar(s)"))
            && out.contains("; 0 connected sidecar(s) pending")
        {
            assert!(out.contains(APP_ID), "{out}");
            break;
        }
        assert!(Instant::now() < deadline, "{out}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (code, out, _) = leashctl(admin, Some(&token), &["revocations"]);
    assert_eq!(code, 0);
    assert!(out.contains(&id) && out.contains("active"), "{out}");
    drop(cp);
    sidecar.shutdown(Duration::from_secs(2)).await;
}
