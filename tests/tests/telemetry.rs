//! Telemetry: `/metrics` of both processes parses as Prometheus text and
//! counts what was sent.

use std::time::Duration;

use leash_tests::*;

const SVID_TTL: Duration = Duration::from_secs(600);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecar_metrics_parse_and_count_the_traffic() {
    let d = Deployment::start("10m", SVID_TTL).await;
    let (forwarded, not_granted, unknown) = (7, 3, 2);
    for i in 0..forwarded {
        let a = d
            .client
            .get(&format!("http://payments.leash.test/whoami?i={i}"), &[])
            .await
            .unwrap();
        assert_eq!(a.status, 200);
    }
    for _ in 0..not_granted {
        let a = d
            .client
            .get("http://ledger.leash.test/", &[])
            .await
            .unwrap();
        assert_eq!(a.status, 403);
    }
    for _ in 0..unknown {
        let a = d.client.get("http://example.com/", &[]).await.unwrap();
        assert_eq!(a.status, 403);
    }

    let resp = http_get(&format!("http://{}/metrics", d.sidecar.admin_addr))
        .await
        .unwrap();
    assert!(
        resp.headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain; version=0.0.4")
    );
    let text = String::from_utf8_lossy(&resp.body).into_owned();
    let s = parse_prometheus(&text);
    let get = |name: &str, labels: &[(&str, &str)]| {
        sample(&s, name, labels).unwrap_or_else(|| panic!("no {name}{labels:?} in\n{text}"))
    };
    let requests = "leash_proxy_requests_total";
    assert_eq!(
        get(
            requests,
            &[("upstream", "payments"), ("decision", "forwarded")]
        ),
        f64::from(forwarded)
    );
    assert_eq!(
        get(
            requests,
            &[("upstream", "payments"), ("decision", "refused")]
        ),
        0.0
    );
    assert_eq!(
        get(requests, &[("upstream", "ledger"), ("decision", "refused")]),
        f64::from(not_granted)
    );
    assert_eq!(
        get(requests, &[("upstream", ""), ("decision", "refused")]),
        f64::from(unknown)
    );
    let refusals = "leash_proxy_refusals_total";
    assert_eq!(
        get(refusals, &[("reason", "not_granted")]),
        f64::from(not_granted)
    );
    assert_eq!(
        get(refusals, &[("reason", "unknown_upstream")]),
        f64::from(unknown)
    );
    assert_eq!(get(refusals, &[("reason", "leaked_secret")]), 0.0);
    for h in [
        "leash_proxy_injection_seconds",
        "leash_proxy_upstream_seconds",
    ] {
        assert_eq!(
            get(&format!("{h}_count"), &[("upstream", "payments")]),
            f64::from(forwarded)
        );
        assert!(get(&format!("{h}_sum"), &[("upstream", "payments")]) > 0.0);
    }
    // One fetch, the rest from the cache.
    assert_eq!(get("leash_proxy_credential_cache_misses_total", &[]), 1.0);
    assert_eq!(
        get("leash_proxy_credential_cache_hits_total", &[]),
        f64::from(forwarded - 1)
    );
    assert_eq!(get("leash_proxy_credential_fetch_errors_total", &[]), 0.0);
    assert_eq!(get("leash_proxy_control_plane_connected", &[]), 1.0);
    assert_eq!(get("leash_proxy_control_plane_sessions_total", &[]), 1.0);
    assert_eq!(get("leash_proxy_ready", &[]), 1.0);
    assert!(get("leash_proxy_control_plane_silence_seconds", &[]) < 30.0);
    // I6: no credential in the metrics.
    let jwt = d.seen.lock().unwrap()[0].credential.clone().unwrap();
    let token = jwt.trim_start_matches("Bearer ");
    assert!(!text.contains(token));

    // Usage shipped and acknowledged shows up too.
    let admin = d.sidecar.admin_addr;
    eventually(
        Duration::from_secs(10),
        "usage acknowledged",
        || async move {
            let text = http_get(&format!("http://{admin}/metrics"))
                .await
                .ok()?
                .body;
            let s = parse_prometheus(&String::from_utf8_lossy(&text));
            (sample(&s, "leash_proxy_usage_reported_requests_total", &[])
                == Some(f64::from(forwarded)))
            .then_some(())
        },
    )
    .await;

    let cp = http_get(&format!("http://{}/metrics", d.cp.admin_addr))
        .await
        .unwrap();
    let s = parse_prometheus(&String::from_utf8_lossy(&cp.body));
    assert_eq!(
        sample(&s, "leash_cp_credentials_issued_total", &[]),
        Some(1.0)
    );
    assert_eq!(sample(&s, "leash_cp_sessions", &[]), Some(1.0));
    assert_eq!(
        sample(&s, "leash_cp_usage_requests_total", &[]),
        Some(f64::from(forwarded))
    );
}

#[test]
#[should_panic(expected = "no # TYPE")]
fn the_exposition_parser_refuses_an_undeclared_family() {
    parse_prometheus("leash_x 1\n");
}

#[test]
#[should_panic(expected = "not cumulative")]
fn the_exposition_parser_refuses_broken_histograms() {
    parse_prometheus(
        "# TYPE h histogram\nh_bucket{le=\"1\"} 5\nh_bucket{le=\"+Inf\"} 3\nh_sum 1\nh_count 3\n",
    );
}

#[test]
#[should_panic(expected = "label value not quoted")]
fn the_exposition_parser_refuses_unquoted_labels() {
    parse_prometheus("# TYPE c counter\nc{a=b} 1\n");
}
