//! A policy edit rebuilds only what it changed: under load from two
//! sidecars, editing one upstream fails no request, fetches no credential
//! for the unchanged upstream, and leaves its connection pool as it was.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test stops at the first failed step, with its message"
)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use leash_tests::*;

fn policy(payments: SocketAddr, ledger: SocketAddr, ledger_scan: u32) -> String {
    format!(
        r#"version: 1
upstreams:
  - name: payments
    hosts: [payments.leash.test]
    target: http://{payments}
    credential: {{ kind: jwt, ttl: 5m }}
  - name: ledger
    hosts: [ledger.leash.test]
    target: http://{ledger}
    credential: {{ kind: jwt, ttl: 5m }}
    scan_body_bytes: {ledger_scan}
grants:
  - workload: {APP_ID}
    upstreams: [payments, ledger]
"#
    )
}

async fn credentials_issued(data: &std::path::Path, upstream: &str) -> i64 {
    let db = sqlx::SqlitePool::connect(&format!("sqlite://{}", data.join("leash.db").display()))
        .await
        .unwrap();
    let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM credentials WHERE upstream = ?")
        .bind(upstream)
        .fetch_one(&db)
        .await
        .unwrap();
    db.close().await;
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn editing_one_upstream_leaves_the_others_untouched() {
    if on_postgres() {
        eprintln!("skipped on PostgreSQL: reads credentials from the SQLite file");
        return;
    }
    init();
    let dir = short_tempdir();
    let ids = Identities::start(dir.path(), Duration::from_secs(600), &[CP_ID, APP_ID]);
    let ok = || http::Response::new(http_body_util::Full::new(bytes::Bytes::from_static(b"{}")));
    let keep = Canned::Answer {
        delay: Duration::ZERO,
        keep_alive: true,
    };
    let (payments, payments_conns) = canned_upstream(keep, ok).await;
    let (ledger, _) = canned_upstream(keep, ok).await;
    let policy_file = write_policy(dir.path(), &policy(payments, ledger, 0));
    let data = dir.path().join("data");
    let cp = start_control_plane(&ids, CP_ID, &policy_file, &data).await;
    let mut sidecars = Vec::new();
    for _ in 0..2 {
        let s = start_sidecar(sidecar_config(ids.endpoint(APP_ID), cp.sidecar_addr)).await;
        wait_ready(s.admin_addr).await;
        sidecars.push(s);
    }

    // One request at a time per sidecar and upstream: one pooled upstream
    // connection each.
    let stop = Arc::new(AtomicBool::new(false));
    let (done, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let mut load = Vec::new();
    for s in &sidecars {
        for host in ["payments", "ledger"] {
            let client = ProxyClient::new(s.egress_addr);
            let (stop, done, failed) = (stop.clone(), done.clone(), failed.clone());
            load.push(tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    match client
                        .get(&format!("http://{host}.leash.test/x"), &[])
                        .await
                    {
                        Ok(a) if a.status == 200 => done.fetch_add(1, Ordering::Relaxed),
                        other => {
                            eprintln!("{host}: {:?}", other.map(|a| a.status));
                            failed.fetch_add(1, Ordering::Relaxed)
                        }
                    };
                }
            }));
        }
    }
    eventually(Duration::from_secs(10), "traffic flowing", || async {
        (done.load(Ordering::Relaxed) > 50).then_some(())
    })
    .await;
    let issued_before = credentials_issued(&data, "payments").await;
    let conns_before = payments_conns.load(Ordering::SeqCst);
    let payments_route =
        |s: &leash_proxy::Sidecar| s.link.routes.load().by_name("payments").cloned().unwrap();
    let routes_before: Vec<_> = sidecars.iter().map(payments_route).collect();
    let version = sidecars[0].link.routes.load().policy_version.clone();

    // Edit ledger only.
    std::thread::sleep(Duration::from_millis(1100));
    std::fs::write(&policy_file, policy(payments, ledger, 1024)).unwrap();
    for s in &sidecars {
        eventually(Duration::from_secs(10), "edit applied", || async {
            (s.link.routes.load().policy_version != version).then_some(())
        })
        .await;
    }
    let after = done.load(Ordering::Relaxed);
    eventually(
        Duration::from_secs(10),
        "traffic after the edit",
        || async { (done.load(Ordering::Relaxed) > after + 50).then_some(()) },
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    for l in load {
        l.await.unwrap();
    }

    assert_eq!(failed.load(Ordering::Relaxed), 0, "no request failed");
    assert_eq!(
        credentials_issued(&data, "payments").await,
        issued_before,
        "no credential fetched for the unchanged upstream"
    );
    assert_eq!(
        payments_conns.load(Ordering::SeqCst),
        conns_before,
        "the unchanged upstream's pooled connections were kept"
    );
    for (s, before) in sidecars.iter().zip(&routes_before) {
        assert!(
            Arc::ptr_eq(&payments_route(s), before),
            "the route itself was kept"
        );
        let ledger = s.link.routes.load().by_name("ledger").cloned().unwrap();
        assert_eq!(
            ledger.scan_body_bytes, 1024,
            "the edited route was replaced"
        );
    }
    for s in sidecars {
        s.shutdown(Duration::from_secs(2)).await;
    }
}
