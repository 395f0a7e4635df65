//! Telemetry: `/metrics` of both processes parses as Prometheus text and
//! counts what was sent.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test stops at the first failed step, with its message"
)]

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_reach_an_otlp_collector_and_continue_the_workload_trace() {
    use leash_api::telemetry::{Otel, OtlpConfig};
    use leash_tests::otlp::{Collector, attr};

    let (collector, addr) = Collector::start().await;
    let d = Deployment::start("10m", SVID_TTL).await;
    let otel = Otel::start(&OtlpConfig {
        endpoint: Some(format!("http://{addr}")),
        service_name: "leash-proxy".into(),
        span_delay: Some(Duration::from_millis(100)),
        metric_interval: Some(Duration::from_millis(200)),
    })
    .unwrap()
    .expect("OTLP on");
    let mut config = sidecar_config(d.ids.endpoint(APP_ID), d.cp.sidecar_addr);
    config.otel = Some(otel.clone());
    let traced = start_sidecar(config).await;
    wait_ready(traced.admin_addr).await;
    let client = ProxyClient::new(traced.egress_addr);

    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let workload_span = "00f067aa0ba902b7";
    let traceparent = format!("00-{trace_id}-{workload_span}-01");
    let echo = client
        .get(
            "http://payments.leash.test/echo",
            &[("traceparent", &traceparent)],
        )
        .await
        .unwrap();
    assert_eq!(echo.status, 200);
    let echo = echo.json();
    let jti = echo["jti"].as_str().expect("verified JWT").to_owned();
    // The upstream sees the same trace, with the sidecar's span as parent.
    let upstream_tp = echo["headers"]["traceparent"].as_str().unwrap().to_owned();
    let parts: Vec<&str> = upstream_tp.split('-').collect();
    assert_eq!(parts.len(), 4, "{upstream_tp}");
    assert_eq!(parts[1], trace_id, "trace id intact");
    assert_ne!(
        parts[2], workload_span,
        "the sidecar's own span is the parent"
    );

    let refused_trace = "0af7651916cd43dd8448eb211c80319c";
    let a = client
        .get(
            "http://ledger.leash.test/",
            &[(
                "traceparent",
                &format!("00-{refused_trace}-b7ad6b7169203331-01"),
            )],
        )
        .await
        .unwrap();
    assert_eq!(a.status, 403);

    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    let spans = eventually(Duration::from_secs(10), "both spans exported", || {
        let collector = collector.clone();
        async move {
            let spans = collector.spans();
            let ours: Vec<_> = spans
                .into_iter()
                .filter(|(_, s)| [trace_id, refused_trace].contains(&hex(&s.trace_id).as_str()))
                .collect();
            (ours.len() == 2).then_some(ours)
        }
    })
    .await;
    let (service, fwd) = spans
        .iter()
        .find(|(_, s)| hex(&s.trace_id) == trace_id)
        .unwrap();
    assert_eq!(service, "leash-proxy");
    assert_eq!(fwd.name, "leash.proxy");
    assert_eq!(hex(&fwd.parent_span_id), workload_span);
    assert_eq!(hex(&fwd.span_id), parts[2]);
    let a = |k| attr(&fwd.attributes, k);
    assert_eq!(a("leash.workload").as_deref(), Some(APP_ID));
    assert_eq!(a("leash.upstream").as_deref(), Some("payments"));
    assert_eq!(a("leash.credential_id"), Some(jti));
    assert_eq!(a("leash.decision").as_deref(), Some("forwarded"));
    assert_eq!(a("http.response.status_code").as_deref(), Some("200"));
    let (_, refused) = spans
        .iter()
        .find(|(_, s)| hex(&s.trace_id) == refused_trace)
        .unwrap();
    let r = |k| attr(&refused.attributes, k);
    assert_eq!(r("leash.decision").as_deref(), Some("refused"));
    assert_eq!(r("leash.refusal").as_deref(), Some("not_granted"));
    assert_eq!(r("leash.upstream").as_deref(), Some("ledger"));

    // The counters arrive as OTLP metrics too.
    eventually(Duration::from_secs(10), "requests metric exported", || {
        let collector = collector.clone();
        async move {
            use opentelemetry_proto::tonic::metrics::v1::metric::Data;
            let m = collector
                .metrics()
                .into_iter()
                .rev()
                .find(|m| m.name == "leash.proxy.requests")?;
            let Some(Data::Sum(sum)) = m.data else {
                return None;
            };
            sum.data_points
                .iter()
                .any(|p| {
                    attr(&p.attributes, "leash.upstream").as_deref() == Some("payments")
                        && attr(&p.attributes, "leash.decision").as_deref() == Some("forwarded")
                        && p.value
                            == Some(opentelemetry_proto::tonic::metrics::v1::number_data_point::Value::AsInt(1))
                })
                .then_some(())
        }
    })
    .await;

    // I6: the injected credential is nowhere in what was exported.
    let token = d
        .seen
        .lock()
        .unwrap()
        .last()
        .unwrap()
        .credential
        .clone()
        .unwrap();
    let token = token.trim_start_matches("Bearer ").to_owned();
    let exported = format!(
        "{:?}{:?}",
        collector.traces.lock().unwrap(),
        collector.metrics.lock().unwrap()
    );
    assert!(!exported.contains(&token));
    traced.shutdown(Duration::from_secs(2)).await;
    otel.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_plane_spans_reach_an_otlp_collector() {
    use leash_api::telemetry::{Otel, OtlpConfig};
    use leash_tests::otlp::{Collector, attr};

    init();
    let (collector, addr) = Collector::start().await;
    let otel = Otel::start(&OtlpConfig {
        endpoint: Some(format!("http://{addr}")),
        service_name: "leash-control-plane".into(),
        span_delay: Some(Duration::from_millis(100)),
        metric_interval: Some(Duration::from_millis(200)),
    })
    .unwrap()
    .expect("OTLP on");
    let dir = short_tempdir();
    let ids = Identities::start(dir.path(), SVID_TTL, &[CP_ID, APP_ID]);
    let upstream = listener().await;
    let policy = write_policy(
        dir.path(),
        &standard_policy(upstream.local_addr().unwrap(), "10m"),
    );
    let data = dir.path().join("data");
    let cp = start_control_plane_full(
        &ids,
        CP_ID,
        &policy,
        &data,
        listener().await,
        Some(otel.clone()),
    )
    .await;
    tokio::spawn(leash_examples::serve_observed(
        upstream,
        upstream_config(cp.admin_addr),
        None,
        None,
    ));
    let sidecar = start_sidecar(sidecar_config(ids.endpoint(APP_ID), cp.sidecar_addr)).await;
    wait_ready(sidecar.admin_addr).await;
    let a = ProxyClient::new(sidecar.egress_addr)
        .get("http://payments.leash.test/whoami", &[])
        .await
        .unwrap();
    assert_eq!(a.status, 200);
    let jti = a.json()["jti"].as_str().unwrap().to_owned();

    // An admin call carrying a trace context continues it.
    let admin = Admin::bootstrap(cp.admin_addr, &data);
    let trace_id = "5bf92f3577b34da6a3ce929d0e0e4736";
    let client: hyper_util::client::legacy::Client<_, http_body_util::Full<bytes::Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build_http();
    let req = http::Request::get(format!("http://{}/v1/sidecars", cp.admin_addr))
        .header(
            "authorization",
            format!("Bearer {}", admin.token.clone().unwrap()),
        )
        .header("traceparent", format!("00-{trace_id}-00f067aa0ba902b7-01"))
        .body(http_body_util::Full::default())
        .unwrap();
    assert_eq!(client.request(req).await.unwrap().status(), 200);

    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    let spans = eventually(Duration::from_secs(10), "control-plane spans", || {
        let collector = collector.clone();
        async move {
            let spans = collector.spans();
            let issue = spans.iter().any(|(_, s)| s.name == "leash.issue");
            let admin = spans.iter().any(|(_, s)| hex(&s.trace_id) == trace_id);
            (issue && admin).then_some(spans)
        }
    })
    .await;
    let (service, issue) = spans.iter().find(|(_, s)| s.name == "leash.issue").unwrap();
    assert_eq!(service, "leash-control-plane");
    assert_eq!(
        attr(&issue.attributes, "leash.decision").as_deref(),
        Some("issued")
    );
    assert_eq!(attr(&issue.attributes, "leash.credential_id"), Some(jti));
    assert_eq!(
        attr(&issue.attributes, "leash.workload").as_deref(),
        Some(APP_ID)
    );
    let (_, call) = spans
        .iter()
        .find(|(_, s)| hex(&s.trace_id) == trace_id)
        .unwrap();
    assert_eq!(call.name, "leash.admin GET");
    assert!(
        attr(&call.attributes, "leash.actor")
            .unwrap()
            .starts_with("token:bootstrap/")
    );
    assert_eq!(
        attr(&call.attributes, "http.response.status_code").as_deref(),
        Some("200")
    );
    // No admin token in what was exported.
    let exported = format!("{:?}", collector.traces.lock().unwrap());
    assert!(!exported.contains(admin.token.as_deref().unwrap()));
    eventually(Duration::from_secs(10), "cp metrics exported", || {
        let collector = collector.clone();
        async move {
            collector
                .metrics()
                .iter()
                .any(|m| m.name == "leash.cp.events")
                .then_some(())
        }
    })
    .await;
    sidecar.shutdown(Duration::from_secs(2)).await;
    cp.shutdown(Duration::from_secs(2)).await;
    otel.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_dump_and_runtime_log_level_on_the_admin_port() {
    let d = Deployment::start("10m", SVID_TTL).await;
    let a = d
        .client
        .get("http://payments.leash.test/whoami", &[])
        .await
        .unwrap();
    assert_eq!(a.status, 200);
    let jti = a.json()["jti"].as_str().unwrap().to_owned();
    let admin = d.sidecar.admin_addr;

    let dump = http_get(&format!("http://{admin}/config_dump"))
        .await
        .unwrap();
    assert_eq!(dump.status, 200);
    let text = String::from_utf8_lossy(&dump.body).into_owned();
    let v = dump.json();
    assert_eq!(v["workload"], APP_ID);
    assert_eq!(v["control_plane"]["connected"], true);
    assert_eq!(v["control_plane"]["max_staleness_ms"], 30_000);
    assert_eq!(v["limits"]["max_header_bytes"], 65_536);
    assert_eq!(v["listeners"]["egress"], d.sidecar.egress_addr.to_string());
    let routes = v["routes"].as_array().unwrap();
    let payments = routes.iter().find(|r| r["upstream"] == "payments").unwrap();
    assert_eq!(payments["granted"], true);
    assert_eq!(payments["inject"]["header"], "authorization");
    assert_eq!(payments["credential_id"], jti.as_str());
    // The credential in use is named, never shown (I6).
    let token = d.seen.lock().unwrap()[0].credential.clone().unwrap();
    assert!(!text.contains(token.trim_start_matches("Bearer ")));

    let get = http_get(&format!("http://{admin}/logging")).await.unwrap();
    assert_eq!(get.status, 200);
    let before = get.json()["filter"].as_str().unwrap().to_owned();
    let post = |q: String| async move {
        let client: hyper_util::client::legacy::Client<_, http_body_util::Full<bytes::Bytes>> =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http();
        let resp = client
            .request(
                http::Request::post(format!("http://{admin}/logging{q}"))
                    .body(http_body_util::Full::default())
                    .unwrap(),
            )
            .await
            .unwrap();
        resp.status().as_u16()
    };
    assert_eq!(post("?level=leash_proxy%3Ddebug,warn".into()).await, 200);
    let now = http_get(&format!("http://{admin}/logging"))
        .await
        .unwrap()
        .json();
    assert_eq!(now["filter"], "leash_proxy=debug,warn");
    assert_eq!(post("?level=%5Bnot-a-filter".into()).await, 400);
    assert_eq!(post(String::new()).await, 400);
    let unchanged = http_get(&format!("http://{admin}/logging"))
        .await
        .unwrap()
        .json();
    assert_eq!(unchanged["filter"], "leash_proxy=debug,warn");
    assert_eq!(post(format!("?level={before}")).await, 200);

    // The control plane's equivalents are admin API calls (audited).
    let cp = d.admin();
    let dump = cp.get("/v1/config_dump").await;
    assert_eq!(dump.status, 200);
    let v = dump.json();
    assert_eq!(v["master_key"], "configured");
    assert_eq!(v["sessions"], 1);
    let master = std::fs::read_to_string(d.dir.path().join("master.key")).unwrap();
    assert!(!String::from_utf8_lossy(&dump.body).contains(master.trim()));
    assert_eq!(cp.with_token(None).get("/v1/config_dump").await.status, 401);
    let set = |f: &str| {
        let cp = cp.clone();
        let body = serde_json::json!({ "filter": f }).to_string();
        async move { cp.call("PUT", "/v1/logging", Some(body)).await.status }
    };
    assert_eq!(set("leash_control_plane=debug,warn").await, 200);
    assert_eq!(
        cp.get("/v1/logging").await.json()["filter"],
        "leash_control_plane=debug,warn"
    );
    assert_eq!(set("[bad").await, 400);
    assert_eq!(set(&before).await, 200);
}
