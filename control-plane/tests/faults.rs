//! Faults under load, with real processes: the control plane SIGKILLed and
//! restarted, and the Workload API restarted (new CA) with SVIDs rotating,
//! while two sidecars keep forwarding. Nothing is lost: no request fails,
//! every acknowledged revocation is still there and enforced, the sidecars
//! reconnect, and the usage the control plane stored equals what the
//! upstream received.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test stops at the first failed step, with its message"
)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::*;

const URL: &str = "http://payments.leash.test/";

fn write_policy(dir: &std::path::Path, upstream: std::net::SocketAddr) {
    std::fs::write(
        dir.join("policy.yaml"),
        format!(
            "version: 1\nupstreams:\n  - name: payments\n    hosts: [payments.leash.test]\n    target: http://{upstream}\n    credential: {{ kind: jwt, ttl: 10m }}\n  - name: ledger\n    hosts: [ledger.leash.test]\n    target: http://{upstream}\n    credential: {{ kind: jwt, ttl: 10m }}\ngrants:\n  - workload: {APP_ID}\n    upstreams: [payments, ledger]\n"
        ),
    )
    .unwrap();
}

fn revoke_ledger_grant(admin: std::net::SocketAddr, token: &str, reason: &str) -> String {
    let (code, out, err) = revoke_grant(admin, token, "ledger", reason);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["id"].as_str().unwrap().to_owned()
}

/// Identity provider, upstream and policy in a temp dir, and the addresses
/// and flags of a control plane there (started by each test its own way).
struct Env {
    tmp: tempfile::TempDir,
    identity: Proc,
    received: Arc<AtomicU64>,
    sidecar_api: std::net::SocketAddr,
    admin: std::net::SocketAddr,
    args: Vec<String>,
}

impl Env {
    async fn new(svid_ttl: &str) -> Self {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let tmp = tempfile::Builder::new()
            .prefix("lsh")
            .tempdir_in("/tmp")
            .unwrap();
        let identity = start_identity(tmp.path(), svid_ttl, "identity1.log").await;
        let (upstream, received) = counting_upstream().await;
        write_policy(tmp.path(), upstream);
        let (sidecar_api, admin) = (free_port(), free_port());
        let args = serve_args(tmp.path(), sidecar_api, admin);
        Self {
            tmp,
            identity,
            received,
            sidecar_api,
            admin,
            args,
        }
    }

    fn dir(&self) -> &std::path::Path {
        self.tmp.path()
    }

    /// Starts the control plane and waits until it is ready.
    async fn control_plane(&self, log: &str) -> Proc {
        let args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        let cp = spawn(&args, &self.dir().join(log));
        wait_ready(self.admin).await;
        cp
    }

    fn token(&self) -> String {
        read_token(&self.dir().join("data"))
    }

    /// A sidecar with `flags`, once it forwards.
    async fn sidecar(&self, flags: &[&str]) -> leash_proxy::Sidecar {
        let s = sidecar(self.dir(), self.sidecar_api, flags).await;
        forwarding(&s, URL).await;
        s
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_plane_sigkill_under_load_loses_nothing() {
    let env = Env::new("10m").await;
    let (admin, received) = (env.admin, env.received.clone());
    let mut cp = env.control_plane("cp1.log").await;
    let token = env.token();
    let flags = ["--max-staleness", "60s", "--report-interval", "200ms"];
    let s1 = env.sidecar(&flags).await;
    let s2 = env.sidecar(&flags).await;

    let load = traffic(URL, &[s1.egress_addr, s2.egress_addr]);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let first = revoke_ledger_grant(admin, &token, "before the crash");
    acknowledged_by(admin, &token, &first, 2).await;
    // SIGKILL mid-traffic, with usage batches in flight.
    cp.0.kill().unwrap();
    cp.0.wait().unwrap();
    tokio::time::sleep(Duration::from_millis(800)).await;
    cp = env.control_plane("cp2.log").await;
    // Both sidecars are back: they acknowledge the old revocation again
    // (restoring any proof lost with the crash) and the new one.
    acknowledged_by(admin, &token, &first, 2).await;
    let (code, out, _) = leashctl(
        admin,
        Some(&token),
        &["--json", "restore", &first, "--reason", "drill"],
    );
    assert_eq!(code, 0, "{out}");
    let second = revoke_ledger_grant(admin, &token, "after the crash");
    acknowledged_by(admin, &token, &second, 2).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (ok, failed) = load.stop().await;
    assert_eq!(failed, 0, "no request failed through the crash");
    assert!(ok > 50, "traffic flowed: {ok}");
    // Enforced after the restart.
    let r = get(s1.egress_addr, "http://ledger.leash.test/")
        .await
        .unwrap();
    assert_eq!(r.0, 403);
    assert_eq!(r.1["error"], "revoked_grant");

    // Sidecars ship their last counts on shutdown: usage reconciles exactly.
    s1.shutdown(Duration::from_secs(5)).await;
    s2.shutdown(Duration::from_secs(5)).await;
    let upstream_saw = received.load(Ordering::Relaxed);
    // Plus the one request per sidecar that waited for it to be ready.
    assert_eq!(upstream_saw, ok + 2, "every 200 came from the upstream");
    let (stored, dropped) = usage_requests(admin, &token);
    assert_eq!(
        (stored, dropped),
        (upstream_saw, 0),
        "usage reconciles exactly"
    );
    drop(cp);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workload_api_restart_and_svid_rotation_under_load() {
    // SVIDs of 4 s are re-issued every 2 s: several rotations under load.
    let mut env = Env::new("4s").await;
    let (admin, d) = (env.admin, env.dir().to_owned());
    let _cp = env.control_plane("cp.log").await;
    let token = env.token();
    let s = env.sidecar(&["--max-staleness", "60s"]).await;
    let first_leaf = s.link.svid_leaf().unwrap();
    let load = traffic(URL, &[s.egress_addr]);
    tokio::time::sleep(Duration::from_secs(5)).await;
    let rotated = s.link.svid_leaf().unwrap();
    assert_ne!(rotated, first_leaf, "the SVID rotated under load");

    // The Workload API goes away and comes back with a new CA.
    env.identity.0.kill().unwrap();
    env.identity.0.wait().unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    env.identity = start_identity(&d, "4s", "identity2.log").await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while s.link.svid_leaf().unwrap() == rotated {
        assert!(
            Instant::now() < deadline,
            "no SVID from the restarted Workload API"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Revocations still propagate to the sidecar over mTLS with the new
    // identities (on the old session, or a new one).
    let id = revoke_ledger_grant(admin, &token, "after the identity restart");
    acknowledged_by(admin, &token, &id, 1).await;
    let (ok, failed) = load.stop().await;
    assert_eq!(failed, 0, "no request failed through rotation and restart");
    assert!(ok > 50, "{ok}");
    let r = get(s.egress_addr, "http://ledger.leash.test/")
        .await
        .unwrap();
    assert_eq!(r.1["error"], "revoked_grant");
    s.shutdown(Duration::from_secs(2)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_writes_clearly_and_corrupts_nothing() {
    let env = Env::new("10m").await;
    let (d, admin, args) = (env.dir(), env.admin, &env.args);
    // The disk fills up: no file of the store may grow past 1 MiB (writes
    // past it fail with EFBIG, as on a full disk; SIGXFSZ is ignored, as a
    // process on a full disk gets no signal).
    let log = std::fs::File::create(d.join("cp-full.log")).unwrap();
    let mut full = std::process::Command::new("sh");
    full.arg("-c")
        .arg("trap '' XFSZ; exec prlimit --fsize=1048576 \"$@\"")
        .arg("sh")
        .arg(env!("CARGO_BIN_EXE_leash-control-plane"))
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(log);
    let mut cp = Proc(full.spawn().unwrap());
    wait_ready(admin).await;
    let token = env.token();
    let s = env
        .sidecar(&["--max-staleness", "60s", "--report-interval", "200ms"])
        .await;

    // Revoke and restore until the store refuses.
    let mut committed = Vec::new();
    let refusal = loop {
        assert!(committed.len() < 2000, "the store never filled up");
        let (code, out, err) = leashctl(
            admin,
            Some(&token),
            &[
                "--json",
                "revoke",
                "grant",
                "--workload",
                APP_ID,
                "--upstream",
                "ledger",
                "--reason",
                &"x".repeat(1000),
            ],
        );
        if code != 0 {
            break (code, err);
        }
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        let id = v["id"].as_str().unwrap().to_owned();
        let (code, _, err) = leashctl(admin, Some(&token), &["restore", &id, "--reason", "fill"]);
        committed.push(id);
        if code != 0 {
            break (code, err);
        }
    };
    eprintln!(
        "store full after {} revocations: {}",
        committed.len(),
        refusal.1.trim()
    );
    // A clear error, not a hang or a crash.
    assert_eq!(refusal.0, 3, "{}", refusal.1);
    assert!(
        refusal.1.contains("store refused the write")
            || refusal.1.contains("audit log is not writable"),
        "{}",
        refusal.1
    );
    // Reads keep working, and show everything that was committed.
    let (code, out, err) = leashctl(admin, Some(&token), &["--json", "revocations", "--all"]);
    assert_eq!(code, 0, "{err}");
    for id in &committed {
        assert!(out.contains(id.as_str()), "{id} missing from the listing");
    }
    assert!(
        get(admin, &format!("http://{admin}/readyz"))
            .await
            .is_some()
    );
    // Sidecars keep serving with the credentials they hold.
    assert_eq!(get(s.egress_addr, URL).await.map(|r| r.0), Some(200));

    // Killed on the full disk, restarted with room: nothing corrupted,
    // nothing committed lost, writes work again.
    cp.0.kill().unwrap();
    cp.0.wait().unwrap();
    let pool =
        sqlx::SqlitePool::connect(&format!("sqlite://{}", d.join("data/leash.db").display()))
            .await
            .unwrap();
    let check: String = sqlx::query_scalar("PRAGMA integrity_check")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(check, "ok");
    pool.close().await;
    let _cp = env.control_plane("cp-after.log").await;
    let (code, out, _) = leashctl(admin, Some(&token), &["--json", "revocations", "--all"]);
    assert_eq!(code, 0);
    for id in &committed {
        assert!(out.contains(id.as_str()), "{id} lost");
    }
    let (code, _, err) = leashctl(admin, Some(&token), &["audit", "verify"]);
    assert_eq!(code, 0, "audit chain intact: {err}");
    // (The last grant revocation may still be active: revoke the upstream.)
    let (code, out, err) = leashctl(
        admin,
        Some(&token),
        &[
            "--json",
            "revoke",
            "upstream",
            "ledger",
            "--reason",
            "room again",
        ],
    );
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    acknowledged_by(admin, &token, v["id"].as_str().unwrap(), 1).await;
    s.shutdown(Duration::from_secs(2)).await;
}
