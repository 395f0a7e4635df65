//! Two control-plane replicas on one PostgreSQL database, as real
//! processes, with three sidecars under load: one replica SIGKILLed, one cut
//! off from the database. Nothing committed is lost, no request fails, the
//! sidecars move to the live replica, and what they acknowledge there is the
//! proof. Skipped (with a line) when `LEASH_TEST_DATABASE_URL` is not set;
//! `.ci/run` always sets it.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test stops at the first failed step, with its message"
)]

mod common;
#[path = "../src/store/fresh_pg.rs"]
mod fresh_pg;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::pg::OwnPostgres;
use common::*;

const URL: &str = "http://payments.leash.test/";

/// A TCP relay to PostgreSQL that can cut one replica off: every
/// connection through it is closed and new ones are refused until it is
/// mended, as a network partition or a failed link would.
struct Relay {
    addr: SocketAddr,
    cut: Arc<AtomicBool>,
    generation: tokio::sync::watch::Sender<u64>,
}

impl Relay {
    async fn start(to: SocketAddr) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cut = Arc::new(AtomicBool::new(false));
        let (generation, _) = tokio::sync::watch::channel(0u64);
        let (is_cut, cuts) = (cut.clone(), generation.clone());
        tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    continue;
                };
                if is_cut.load(Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                let mut cutting = cuts.subscribe();
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(to).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = cutting.changed() => {}
                    }
                });
            }
        });
        Self {
            addr,
            cut,
            generation,
        }
    }

    fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        self.generation.send_modify(|g| *g += 1);
    }

    fn mend(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }
}

/// `url` with its host and port replaced by `addr`.
fn via(url: &str, addr: SocketAddr) -> String {
    let (scheme, rest) = url.split_once("://").unwrap();
    let (userinfo, after) = rest.split_once('@').unwrap();
    let path = &after[after.find('/').unwrap()..];
    format!("{scheme}://{userinfo}@{addr}{path}")
}

fn pg_addr(url: &str) -> SocketAddr {
    let after = url.split_once('@').unwrap().1;
    let hostport = &after[..after.find('/').unwrap()];
    hostport.parse().unwrap()
}

struct Replica {
    proc: Proc,
    sidecar_api: SocketAddr,
    admin: SocketAddr,
}

/// The identity provider, the upstream, the policy and the database of a
/// test; replicas are started on it one by one.
struct Cluster {
    tmp: tempfile::TempDir,
    _identity: Proc,
    received: Arc<AtomicU64>,
    /// The database the replicas share.
    url: String,
    /// Dropped after the test when it is one of the shared server's.
    fresh: Option<fresh_pg::FreshDatabase>,
}

impl Cluster {
    /// On a fresh database of the tests' shared server.
    async fn new(test: &str) -> Option<Self> {
        let db = fresh_pg::FreshDatabase::create(test).await?;
        Some(Self::on(db.url.clone(), Some(db)).await)
    }

    async fn on(url: String, fresh: Option<fresh_pg::FreshDatabase>) -> Self {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let tmp = tempfile::Builder::new()
            .prefix("lrp")
            .tempdir_in("/tmp")
            .unwrap();
        let identity = start_identity(tmp.path(), "10m", "identity.log").await;
        let (upstream, received) = counting_upstream().await;
        std::fs::write(
            tmp.path().join("policy.yaml"),
            format!(
                "version: 1\nupstreams:\n{}grants:\n  - workload: {APP_ID}\n    upstreams: [payments, ledger, billing]\n",
                ["payments", "ledger", "billing"]
                    .iter()
                    .map(|n| format!(
                        "  - name: {n}\n    hosts: [{n}.leash.test]\n    target: http://{upstream}\n    credential: {{ kind: jwt, ttl: 10m }}\n"
                    ))
                    .collect::<String>()
            ),
        )
        .unwrap();
        Self {
            tmp,
            _identity: identity,
            received,
            url,
            fresh,
        }
    }

    async fn finish(self) {
        if let Some(db) = self.fresh {
            db.drop_database().await;
        }
    }

    fn dir(&self) -> &std::path::Path {
        self.tmp.path()
    }

    /// Replica `n` on `database_url`, once ready; its own data directory
    /// and ports, the same issuer as every other.
    async fn replica(&self, n: usize, database_url: &str) -> Replica {
        let (sidecar_api, admin) = (free_port(), free_port());
        let mut args = serve_args(self.dir(), sidecar_api, admin);
        let data = args.iter().position(|a| a == "--data-dir").unwrap() + 1;
        args[data] = self.dir().join(format!("data{n}")).display().to_string();
        args.extend([
            "--database-url".to_owned(),
            database_url.to_owned(),
            "--issuer".to_owned(),
            "https://leash-control-plane.test".to_owned(),
        ]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let proc = spawn(&args, &self.dir().join(format!("cp{n}.log")));
        wait_ready(admin).await;
        Replica {
            proc,
            sidecar_api,
            admin,
        }
    }

    /// The bootstrap admin token, written by the replica that created the
    /// store (the first).
    fn token(&self) -> String {
        read_token(&self.dir().join("data1"))
    }

    /// A sidecar given the replicas' sidecar-API addresses in this order,
    /// once it forwards.
    async fn sidecar(&self, replicas: &[&Replica]) -> leash_proxy::Sidecar {
        let mut flags = vec![
            "--max-staleness".to_owned(),
            "60s".to_owned(),
            "--report-interval".to_owned(),
            "200ms".to_owned(),
        ];
        for r in &replicas[1..] {
            flags.extend(["--control-plane".to_owned(), r.sidecar_api.to_string()]);
        }
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        let s = sidecar(self.dir(), replicas[0].sidecar_api, &flags).await;
        forwarding(&s, URL).await;
        s
    }
}

fn revoked_id(answer: (i32, String, String)) -> String {
    let (code, out, err) = answer;
    assert_eq!(code, 0, "{out}{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["id"].as_str().unwrap().to_owned()
}

/// `leashctl --json <args>` on `admin`, which must succeed.
fn json(admin: SocketAddr, token: &str, args: &[&str]) -> serde_json::Value {
    let mut all = vec!["--json"];
    all.extend(args);
    let (code, out, err) = leashctl(admin, Some(token), &all);
    assert_eq!(code, 0, "{err}");
    serde_json::from_str(&out).unwrap()
}

/// Waits until every sidecar refuses `upstream` as a revoked grant.
async fn refused_everywhere(sidecars: &[&leash_proxy::Sidecar], upstream: &str) {
    let url = format!("http://{upstream}.leash.test/");
    for s in sidecars {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let r = get(s.egress_addr, &url).await;
            if let Some((403, body)) = &r {
                assert_eq!(body["error"], "revoked_grant");
                break;
            }
            assert!(Instant::now() < deadline, "{upstream} still served: {r:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_one_of_two_replicas_under_load_loses_nothing() {
    let Some(cluster) = Cluster::new("the replica SIGKILL test").await else {
        return;
    };
    let url = cluster.url.clone();
    let a = cluster.replica(1, &url).await;
    let b = cluster.replica(2, &url).await;
    let token = cluster.token();
    // Two sidecars prefer A, one prefers B.
    let s1 = cluster.sidecar(&[&a, &b]).await;
    let s2 = cluster.sidecar(&[&a, &b]).await;
    let s3 = cluster.sidecar(&[&b, &a]).await;
    let all = [&s1, &s2, &s3];
    let load = traffic(URL, &[s1.egress_addr, s2.egress_addr, s3.egress_addr]);
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Committed on A, pushed to the sidecar on B too: one sequence.
    let first = revoked_id(revoke_grant(a.admin, &token, "ledger", "replica drill"));
    acknowledged_by(a.admin, &token, &first, 3).await;
    refused_everywhere(&all, "ledger").await;
    // Either replica shows the whole fleet: three sidecars, two on A.
    for replica in [&a, &b] {
        let fleet = json(replica.admin, &token, &["sidecars"]);
        let on: Vec<&str> = fleet["sidecars"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["replica"].as_str().unwrap())
            .collect();
        assert_eq!(on.len(), 3, "{fleet}");
        let replicas = json(replica.admin, &token, &["replicas"]);
        let live: Vec<&serde_json::Value> = replicas["replicas"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["live"] == true)
            .collect();
        assert_eq!(live.len(), 2, "{replicas}");
        let this = live.iter().find(|r| r["this"] == true).unwrap();
        let other = live.iter().find(|r| r["this"] == false).unwrap();
        let held = |r: &serde_json::Value| on.iter().filter(|&&id| id == r["id"]).count();
        let expected = if replica.admin == a.admin {
            (2, 1)
        } else {
            (1, 2)
        };
        assert_eq!((held(this), held(other)), expected, "{fleet}");
    }
    // The same revocation asked of B is the one A committed.
    let (code, out, err) = revoke_grant(b.admin, &token, "ledger", "replica drill");
    assert_ne!(code, 0);
    assert!(format!("{out}{err}").contains(&first), "{out}{err}");

    // A dies mid-traffic, with usage batches in flight.
    let mut a = a;
    a.proc.0.kill().unwrap();
    a.proc.0.wait().unwrap();
    // B takes A for gone once it stops being seen, and counts its
    // sessions no more.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let replicas = json(b.admin, &token, &["replicas"]);
        let live = replicas["replicas"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["live"] == true)
            .count();
        if live == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "A still live: {replicas}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // New revocations go through B and are acknowledged by all three.
    let second = revoked_id(revoke_grant(b.admin, &token, "billing", "replica drill"));
    acknowledged_by(b.admin, &token, &second, 3).await;
    refused_everywhere(&all, "billing").await;
    refused_everywhere(&all, "ledger").await;
    for s in all {
        assert!(s.link.stale().is_none(), "no sidecar went stale");
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (ok, failed) = load.stop().await;
    eprintln!("requests: {ok} ok, {failed} failed");
    assert_eq!(failed, 0, "no request failed when a replica died");
    assert!(ok > 50, "traffic flowed: {ok}");

    // Usage stored (through both replicas, batches resent to B after the
    // kill counted once) equals usage served.
    for s in [s1, s2, s3] {
        s.shutdown(Duration::from_secs(5)).await;
    }
    let upstream_saw = cluster.received.load(Ordering::Relaxed);
    assert_eq!(upstream_saw, ok + 3, "every 200 came from the upstream");
    let (stored, dropped) = usage_requests(b.admin, &token);
    assert_eq!(
        (stored, dropped),
        (upstream_saw, 0),
        "usage reconciles exactly"
    );
    // The audit chain, appended to by both replicas, is one chain.
    let (code, out, err) = leashctl(b.admin, Some(&token), &["--json", "audit", "verify"]);
    assert_eq!(code, 0, "{err}");
    let verdict: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(verdict["ok"], true, "{out}");
    drop(b);
    cluster.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_cut_off_from_the_database_refuses_writes_and_its_sidecars_move() {
    let Some(cluster) = Cluster::new("the replica partition test").await else {
        return;
    };
    let url = cluster.url.clone();
    let relay = Relay::start(pg_addr(&url)).await;
    let a = cluster.replica(1, &via(&url, relay.addr)).await;
    let b = cluster.replica(2, &url).await;
    let token = cluster.token();
    let s1 = cluster.sidecar(&[&a, &b]).await;
    let s2 = cluster.sidecar(&[&a, &b]).await;
    let load = traffic(URL, &[s1.egress_addr, s2.egress_addr]);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let sessions = |s: &leash_proxy::Sidecar| s.link.metrics.sessions.load(Ordering::SeqCst);
    assert_eq!((sessions(&s1), sessions(&s2)), (1, 1));

    relay.cut();
    // A says so, and refuses writes with a clear 503 (the token cannot
    // even be checked without the database).
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let ready = get(a.admin, &format!("http://{}/readyz", a.admin)).await;
        if matches!(ready, Some((503, _))) {
            break;
        }
        assert!(Instant::now() < deadline, "A still ready: {ready:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (code, out, err) = revoke_grant(a.admin, &token, "ledger", "replica drill");
    assert_ne!(code, 0, "{out}");
    assert!(err.contains("503"), "{err}");
    // Its sidecars move to B, which they find in sync.
    wait_until("both sidecars on a second session", || {
        sessions(&s1) >= 2 && sessions(&s2) >= 2
    })
    .await;
    let id = revoked_id(revoke_grant(b.admin, &token, "ledger", "replica drill"));
    acknowledged_by(b.admin, &token, &id, 2).await;
    refused_everywhere(&[&s1, &s2], "ledger").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (ok, failed) = load.stop().await;
    eprintln!("requests: {ok} ok, {failed} failed");
    assert_eq!(
        failed, 0,
        "no request failed when a replica lost the database"
    );
    assert!(ok > 20, "traffic flowed: {ok}");

    // Mended: A reads the store again, has B's revocation, and is ready.
    relay.mend();
    wait_ready(a.admin).await;
    let (code, out, err) = leashctl(a.admin, Some(&token), &["--json", "status", &id]);
    assert_eq!(code, 0, "{err}");
    let status: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(status["active"], true, "{out}");
    for s in [s1, s2] {
        s.shutdown(Duration::from_secs(2)).await;
    }
    drop((a, b));
    cluster.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgresql_restarted_under_load_loses_nothing() {
    // A server of the test's own, to restart: where the other PostgreSQL
    // tests run (CI sets the variable and installs PostgreSQL).
    if std::env::var_os(fresh_pg::TEST_DATABASE_URL).is_none() {
        eprintln!(
            "skipped the PostgreSQL restart test: {} is not set",
            fresh_pg::TEST_DATABASE_URL
        );
        return;
    }
    let pg = OwnPostgres::start(None);
    let cluster = Cluster::on(pg.plain_url(), None).await;
    let url = cluster.url.clone();
    let a = cluster.replica(1, &url).await;
    let b = cluster.replica(2, &url).await;
    let token = cluster.token();
    let s1 = cluster.sidecar(&[&a, &b]).await;
    let s2 = cluster.sidecar(&[&b, &a]).await;
    let load = traffic(URL, &[s1.egress_addr, s2.egress_addr]);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let first = revoked_id(revoke_grant(
        a.admin,
        &token,
        "ledger",
        "before the restart",
    ));
    acknowledged_by(a.admin, &token, &first, 2).await;

    // Restarted under load: every connection of both replicas is dropped.
    pg.pg_ctl("restart");
    wait_ready(a.admin).await;
    wait_ready(b.admin).await;
    // Nothing committed is lost, and what comes next reaches everyone.
    let status = json(b.admin, &token, &["status", &first]);
    assert_eq!(status["active"], true, "{status}");
    let second = revoked_id(revoke_grant(
        b.admin,
        &token,
        "billing",
        "after the restart",
    ));
    acknowledged_by(a.admin, &token, &second, 2).await;
    refused_everywhere(&[&s1, &s2], "billing").await;
    refused_everywhere(&[&s1, &s2], "ledger").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (ok, failed) = load.stop().await;
    eprintln!("requests: {ok} ok, {failed} failed");
    assert_eq!(failed, 0, "no request failed while PostgreSQL restarted");
    assert!(ok > 20, "traffic flowed: {ok}");

    // Usage batches refused while the database was down were resent.
    for s in [s1, s2] {
        s.shutdown(Duration::from_secs(5)).await;
    }
    let upstream_saw = cluster.received.load(Ordering::Relaxed);
    assert_eq!(upstream_saw, ok + 2, "every 200 came from the upstream");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (stored, dropped) = usage_requests(a.admin, &token);
        if (stored, dropped) == (upstream_saw, 0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "usage stored {stored} (dropped {dropped}), served {upstream_saw}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let verdict = json(a.admin, &token, &["audit", "verify"]);
    assert_eq!(verdict["ok"], true, "{verdict}");
    drop((a, b));
    cluster.finish().await;
    drop(pg);
}
