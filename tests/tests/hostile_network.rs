//! The control plane under a hostile network (invariant I8): slowloris and
//! idle connections on the admin port, half-open TLS handshakes on the
//! sidecar port, all from one attacking address, while a responder revokes
//! and a sidecar connects from another. The attackers are capped and timed
//! out; the responder and the sidecar get through.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test stops at the first failed step, with its message"
)]

use std::net::SocketAddr;
use std::time::Duration;

use leash_tests::*;
use serde_json::json;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpSocket, TcpStream};

/// A connection from 127.0.0.2: another address than the responder's.
async fn from_attacker(to: SocketAddr) -> TcpStream {
    from_address(to, [127, 0, 0, 2]).await
}

async fn from_address(to: SocketAddr, ip: [u8; 4]) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::from((ip, 0))).unwrap();
    socket.connect(to).await.unwrap()
}

/// Whether the peer has closed `s` (read gives EOF or an error) within `wait`.
async fn closed_within(s: &mut TcpStream, wait: Duration) -> bool {
    let mut buf = [0u8; 1024];
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            // A 408 or similar before the close: keep reading.
            Ok(Ok(_)) => {}
        }
    }
}

/// Identity and a control plane with `limits`, on the standard policy.
async fn limited_control_plane(
    limits: leash_control_plane::listeners::ListenerLimits,
) -> (
    tempfile::TempDir,
    Identities,
    leash_control_plane::app::ControlPlane,
) {
    init();
    let dir = short_tempdir();
    let ids = Identities::start(dir.path(), Duration::from_secs(600), &[CP_ID, APP_ID]);
    let policy = write_policy(
        dir.path(),
        &standard_policy("127.0.0.1:9".parse().unwrap(), "5m"),
    );
    let cp = start_control_plane_limited(
        &ids,
        CP_ID,
        &policy,
        &dir.path().join("data"),
        listener().await,
        None,
        limits,
    )
    .await;
    (dir, ids, cp)
}

/// How many of `conns` the peer closed at once (within 20 ms each).
async fn closed_at_once(conns: &mut [TcpStream]) -> usize {
    let mut n = 0;
    for s in conns {
        if closed_within(s, Duration::from_millis(20)).await {
            n += 1;
        }
    }
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attackers_are_capped_and_timed_out_while_responders_and_sidecars_get_through() {
    let limits = leash_control_plane::listeners::ListenerLimits {
        admin_header_timeout: Duration::from_secs(1),
        admin_max_connections_per_address: 64,
        sidecar_handshake_timeout: Duration::from_secs(1),
        sidecar_max_handshakes_per_address: 32,
        admin_request_timeout: Duration::from_secs(2),
        ..Default::default()
    };
    let (dir, ids, cp) = limited_control_plane(limits).await;

    // 300 idle and slowloris connections on the admin port and 300 silent
    // ones on the sidecar port (no ClientHello).
    let mut slow = Vec::new();
    let mut silent = Vec::new();
    for _ in 0..300 {
        let mut s = from_attacker(cp.admin_addr).await;
        let _ = s
            .write_all(b"GET /v1/sidecars HTTP/1.1\r\nHost: x\r\n")
            .await;
        slow.push(s);
        silent.push(from_attacker(cp.sidecar_addr).await);
    }
    // Past the per-address caps, connections are closed at once.
    let refused_admin = closed_at_once(&mut slow).await;
    assert!(refused_admin >= 300 - 64, "admin: {refused_admin} closed");
    let refused_sidecar = closed_at_once(&mut silent).await;
    assert!(
        refused_sidecar >= 300 - 32,
        "sidecar port: {refused_sidecar} closed"
    );

    // Meanwhile a responder and a sidecar get through from another address.
    let admin = Admin::bootstrap(cp.admin_addr, &dir.path().join("data"));
    assert_eq!(admin.get("/v1/sidecars").await.status, 200);
    let sidecar = start_sidecar(sidecar_config(ids.endpoint(APP_ID), cp.sidecar_addr)).await;
    wait_ready(sidecar.admin_addr).await;
    let r = admin
        .revoke(json!({"kind": "upstream", "upstream": "ledger", "reason": "under attack"}))
        .await;
    admin.wait_acknowledged(r["id"].as_str().unwrap(), 1).await;

    // The admitted attackers are timed out: header and handshake timeouts.
    for s in slow.iter_mut().chain(silent.iter_mut()) {
        assert!(
            closed_within(s, Duration::from_secs(5)).await,
            "an attacking connection outlived its timeout"
        );
    }
    // A request whose body never comes gets 408 at the request timeout.
    let mut s = TcpStream::connect(cp.admin_addr).await.unwrap();
    let head = format!(
        "POST /v1/revocations HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{{",
        admin.token.as_deref().unwrap()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut answer)).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    sidecar.shutdown(Duration::from_secs(2)).await;
}

/// Whatever a holder of a valid SVID reports is bounded and checked before
/// it is stored: oversized or control-character strings, upstreams the
/// policy does not name, registrations that do not exist are refused and
/// counted; well-formed reports are stored as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_a_sidecar_reports_is_bounded_before_it_is_stored() {
    use leash_api::v1::{EchoReport, LeakRefusal, SidecarMessage, StripReport, sidecar_message};
    let d = Deployment::start("5m", Duration::from_secs(600)).await;
    let rogue = leash_proxy::control::ControlLink::new(
        sidecar_config(d.ids.endpoint(APP_ID), d.cp.sidecar_addr).control,
    );
    let (_stop, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(rogue.clone().run(stop_rx));
    let link = rogue.clone();
    eventually(Duration::from_secs(10), "rogue connected", || {
        let link = link.clone();
        async move { link.connected().then_some(()) }
    })
    .await;
    let send = |m| rogue.reports.report(SidecarMessage { msg: Some(m) });
    let huge = "h".repeat(1 << 20);
    send(sidecar_message::Msg::Leak(LeakRefusal {
        revocation_id: "rev-nope".into(),
        upstream: "payments".into(),
        host: huge.clone(),
        location: "header:x".into(),
        at_ms: 1,
    }));
    send(sidecar_message::Msg::Leak(LeakRefusal {
        revocation_id: "rev-does-not-exist".into(),
        upstream: "payments".into(),
        host: "payments.leash.test".into(),
        location: "header:x".into(),
        at_ms: 1,
    }));
    send(sidecar_message::Msg::Stripped(StripReport {
        upstream: huge.clone(),
        count: 1,
    }));
    send(sidecar_message::Msg::Stripped(StripReport {
        upstream: "not-in-policy".into(),
        count: 1,
    }));
    send(sidecar_message::Msg::Echoed(EchoReport {
        upstream: "payments".into(),
        header: "bad header\n".into(),
        count: 1,
    }));
    // And one well-formed report, which is stored.
    send(sidecar_message::Msg::Stripped(StripReport {
        upstream: "payments".into(),
        count: 3,
    }));
    let admin = d.admin();
    eventually(
        Duration::from_secs(10),
        "the good report stored",
        || async {
            let v = admin.get("/v1/stripped").await.json();
            (v["stripped"].as_array()?.len() == 1).then_some(())
        },
    )
    .await;
    let v = admin.get("/v1/stripped").await.json();
    assert_eq!(v["stripped"][0]["upstream"], "payments");
    assert_eq!(v["stripped"][0]["count"], 3);
    assert!(v["echoed"].as_array().unwrap().is_empty());
    let metrics = http_get(&format!("http://{}/metrics", d.cp.admin_addr))
        .await
        .unwrap();
    let samples = parse_prometheus(&String::from_utf8_lossy(&metrics.body));
    assert_eq!(
        sample(&samples, "leash_cp_reports_rejected_total", &[]),
        Some(5.0)
    );
    let leaked = admin.get("/v1/leaked").await.json();
    assert!(!leaked.to_string().contains("hhhhhhhh"));
}

/// The sidecar's probes cannot be starved: with the admin port full of idle
/// connections (its 64-connection budget taken) and hundreds more idle on
/// the probe port, the kubelet's probe still answers, and the probe port
/// serves health and readiness only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_answer_while_the_admin_port_is_starved() {
    let mut d = Deployment::start("5m", Duration::from_secs(600)).await;
    let probes = d.sidecar.serve_probes(listener().await).unwrap();
    let mut idle = Vec::new();
    for _ in 0..100 {
        idle.push(TcpStream::connect(d.sidecar.admin_addr).await.unwrap());
    }
    for _ in 0..300 {
        idle.push(TcpStream::connect(probes).await.unwrap());
    }
    for path in ["/readyz", "/healthz"] {
        let a = http_get(&format!("http://{probes}{path}")).await.unwrap();
        assert_eq!(a.status, 200, "{path}");
    }
    let a = http_get(&format!("http://{probes}/metrics")).await.unwrap();
    assert_eq!(a.status, 404, "only health and readiness on the probe port");
    // Idle probe connections are closed within the 2 s header timeout.
    let mut probe_conn = TcpStream::connect(probes).await.unwrap();
    assert!(closed_within(&mut probe_conn, Duration::from_secs(5)).await);
    drop(idle);
}

/// Idle and half-open connections from many addresses fill both listeners'
/// total caps: the responder and a sidecar still get in, because at the cap
/// the oldest idle connection (or stalled handshake) makes room.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_attacking_addresses_cannot_fill_the_caps_against_responders() {
    let limits = leash_control_plane::listeners::ListenerLimits {
        admin_max_connections: 100,
        sidecar_max_handshakes: 50,
        ..Default::default()
    };
    let (dir, ids, cp) = limited_control_plane(limits).await;
    let mut held = Vec::new();
    for host in 1..=20u8 {
        for _ in 0..10 {
            held.push(from_address(cp.admin_addr, [127, 0, 1, host]).await);
            held.push(from_address(cp.sidecar_addr, [127, 0, 2, host]).await);
        }
    }
    let admin = Admin::bootstrap(cp.admin_addr, &dir.path().join("data"));
    assert_eq!(admin.get("/v1/sidecars").await.status, 200);
    let sidecar = start_sidecar(sidecar_config(ids.endpoint(APP_ID), cp.sidecar_addr)).await;
    wait_ready(sidecar.admin_addr).await;
    let r = admin
        .revoke(json!({"kind": "upstream", "upstream": "ledger", "reason": "under attack"}))
        .await;
    admin.wait_acknowledged(r["id"].as_str().unwrap(), 1).await;
    drop(held);
    sidecar.shutdown(Duration::from_secs(2)).await;
}
