//! `leashctl posture` and `leashctl policy check --against-usage` against
//! a real control plane process with a sidecar forwarding: what they print
//! and the exit codes scripts rely on.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test stops at the first failed step, with its message"
)]

mod common;

use std::path::Path;

use common::*;

/// payments (1h credentials) and ledger, both granted to APP.
fn policy(upstream: std::net::SocketAddr, grants: &str) -> String {
    format!(
        "version: 1\nupstreams:\n  - name: payments\n    hosts: [payments.leash.test]\n    target: http://{upstream}\n    credential: {{ kind: jwt, ttl: 1h }}\n  - name: ledger\n    hosts: [ledger.leash.test]\n    target: http://{upstream}\n    credential: {{ kind: jwt }}\ngrants:\n{grants}"
    )
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn posture_and_check_print_findings_and_exit_as_documented() {
    let tmp = tempfile::Builder::new()
        .prefix("lsh")
        .tempdir_in("/tmp")
        .unwrap();
    let dir = tmp.path();
    let _identity = start_identity(dir, "10m", "identity.log").await;
    let (upstream, received) = counting_upstream().await;
    let both = format!("  - workload: {APP_ID}\n    upstreams: [payments, ledger]\n");
    write(dir, "policy.yaml", &policy(upstream, &both));
    let (sidecar_api, admin) = (free_port(), free_port());
    let args = serve_args(dir, sidecar_api, admin);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let _cp = spawn(&args, &dir.join("cp.log"));
    wait_ready(admin).await;
    let token = std::fs::read_to_string(dir.join("data/admin-token")).unwrap();
    let token = Some(token.trim());
    let s = sidecar(dir, sidecar_api, &["--report-interval", "200ms"]).await;

    // Only payments is used.
    let mut ok = 0;
    while ok < 5 {
        if get(s.egress_addr, "http://payments.leash.test/")
            .await
            .map(|r| r.0)
            == Some(200)
        {
            ok += 1;
        } else {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }
    assert!(received.load(std::sync::atomic::Ordering::Relaxed) >= 5);
    wait_until("payments' usage reported", || {
        let (code, out, _) = leashctl(admin, token, &["posture", "--json"]);
        assert_eq!(code, 0);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        v["unused_grants"].as_array().unwrap().len() == 1
    })
    .await;

    let (code, out, err) = leashctl(admin, token, &["posture", "--since", "1d"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("Grants nobody used (1)"), "{out}");
    assert!(
        out.lines()
            .any(|l| l.starts_with(APP_ID) && l.contains("ledger")),
        "{out}"
    );
    assert!(
        out.contains("Credential lifetimes far above their use (1)"),
        "{out}"
    );
    assert!(
        out.lines()
            .any(|l| l.starts_with("payments") && l.contains("1h") && l.ends_with("1m")),
        "{out}"
    );
    assert!(out.contains("+++ policy (proposed)"), "{out}");
    assert!(
        out.lines()
            .any(|l| l.starts_with('-') && l.contains("- ledger")),
        "{out}"
    );
    let (code, _, err) = leashctl(admin, token, &["posture", "--since", "soon"]);
    assert_eq!(code, 1);
    assert!(err.contains("since: "), "{err}");

    // A proposal without the unused grant: nobody breaks, exit 0.
    let narrowed = format!("  - workload: {APP_ID}\n    upstreams: [payments]\n");
    let file = write(dir, "narrowed.yaml", &policy(upstream, &narrowed));
    let (code, out, err) = leashctl(
        admin,
        token,
        &["policy", "check", "--against-usage", "30d", &file],
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("no live consumer would break"), "{out}");
    // Without payments' grant: APP on payments breaks, exit 1.
    let used_gone = format!("  - workload: {APP_ID}\n    upstreams: [ledger]\n");
    let file = write(dir, "breaks.yaml", &policy(upstream, &used_gone));
    let (code, out, err) = leashctl(
        admin,
        token,
        &["policy", "check", "--against-usage", "30d", &file],
    );
    assert_eq!(code, 1, "{out}{err}");
    assert!(out.contains("1 live consumer(s) would break"), "{out}");
    assert!(
        out.lines()
            .any(|l| l.starts_with(APP_ID) && l.contains("payments") && l.contains("not_granted")),
        "{out}"
    );
    // An invalid proposal: refused naming the field and line, exit 1.
    let file = write(
        dir,
        "bad.yaml",
        &policy(upstream, &narrowed).replace("ttl: 1h", "tll: 1h"),
    );
    let (code, _, err) = leashctl(
        admin,
        token,
        &["policy", "check", "--against-usage", "30d", &file],
    );
    assert_eq!(code, 1);
    assert!(
        err.contains("line 6") && err.contains("upstreams[0].credential.tll"),
        "{err}"
    );
    // Offline, without --against-usage, the same file is still checked locally.
    let (code, _, err) = leashctl(admin, token, &["policy", "check", &file]);
    assert_eq!(code, 1);
    assert!(err.contains("bad.yaml"), "{err}");
    drop(s);
}
