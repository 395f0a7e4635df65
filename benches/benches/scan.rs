//! The per-request cost of the leaked-value scan (path, query and headers
//! of a typical request; a 1 KiB JSON body) as the registry grows from 10
//! to 10,000 fingerprints, and of the other per-request steps: route by
//! host, revocation check, credential-cache hit and header rewriting
//! (hop-by-hop removal and credential injection).
//!
//!   cargo bench -p leash-benches --bench scan
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test and benchmark support: a failed setup step should stop the run with its message"
)]

use std::hint::black_box;

use criterion::{BatchSize, BenchmarkId, Criterion, criterion_group, criterion_main};
use http::{HeaderMap, HeaderName, HeaderValue};
use leash_api::revocation::{
    FingerprintKey, RevocationKind, RevocationSet, fingerprint, fingerprint_bytes,
};
use leash_api::v1::Revocation;

const KEY: FingerprintKey = FingerprintKey(*b"0123456789abcdef");

fn registry(n: usize) -> RevocationSet {
    RevocationSet::new((0..n).map(|i| Revocation {
        id: format!("rev-{i}"),
        kind: RevocationKind::Leaked.into(),
        fingerprint: fingerprint_bytes(fingerprint(
            &KEY,
            format!("leaked-secret-{i:08}").as_bytes(),
        )),
        ..Default::default()
    }))
    .expect("valid revocations")
}

/// What an API client typically sends through the sidecar.
fn typical_headers() -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in [
        ("host", "payments.leash.test"),
        ("user-agent", "checkout-service/2.14.1 (rust; hyper/1.12)"),
        ("accept", "application/json"),
        ("accept-encoding", "gzip, br"),
        ("content-type", "application/json; charset=utf-8"),
        (
            "authorization",
            "Bearer eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJzcGlmZmU6Ly9leGFtcGxlIn0.c2lnbmF0dXJl",
        ),
        ("x-request-id", "7f3c2a9e-1b4d-4e8f-9a6c-0d5e2f1a3b7c"),
        (
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ),
        (
            "cookie",
            "session=abc123def456ghi789; theme=dark; lang=en-GB",
        ),
    ] {
        h.insert(HeaderName::from_static(k), HeaderValue::from_static(v));
    }
    h
}

/// A payment-creation request body: 1 KiB of JSON.
fn typical_json_body() -> Vec<u8> {
    let mut body = String::from(
        r#"{"amount":2000,"currency":"gbp","customer":"cus_NffrFeUfNV2Hib","description":"Order #1042 \u2014 2 items","payment_method":"pm_1MqLiJLkdIwHu7ixUEgbFdYF","confirm":true,"capture_method":"automatic","metadata":{"order_id":"1042","cart":"c_7f3c2a9e1b4d","channel":"web","campaign":"spring-sale"},"shipping":{"name":"Jenny Rosen","address":{"line1":"1 Main Street","city":"London","postal_code":"EC1A 1AA","country":"GB"}},"return_url":"https:\/\/shop.example.com\/orders\/1042\/done","items":["#,
    );
    let mut i = 0;
    while body.len() < 1000 {
        body.push_str(&format!(
            r#"{{"sku":"SKU-{i:04}","qty":{},"price":{}}},"#,
            i % 3 + 1,
            499 + i * 100
        ));
        i += 1;
    }
    body.pop();
    body.push_str("]}");
    body.into_bytes()
}

fn scan(c: &mut Criterion) {
    let headers = typical_headers();
    let uri: http::Uri =
        "/v1/payments/charges/ch_3MtwBwLkdIwHu7ix28a3tqPa?page=2&per_page=50&sort=created_at"
            .parse()
            .expect("uri");
    let mut group = c.benchmark_group("leak_scan_request");
    for n in [10usize, 10_000] {
        let set = registry(n);
        group.bench_with_input(BenchmarkId::from_parameter(n), &set, |b, set| {
            b.iter(|| {
                leash_proxy::leak::scan_request(
                    black_box(set),
                    &KEY,
                    black_box(&headers),
                    black_box(&uri),
                )
            })
        });
    }
    group.finish();

    // A 1 KiB JSON body, as a route with `scan_body_bytes` sends it.
    let body = typical_json_body();
    let mut body_headers = HeaderMap::new();
    body_headers.insert(
        "content-type",
        HeaderValue::from_static("application/json; charset=utf-8"),
    );
    let mut group = c.benchmark_group("leak_scan_body");
    for n in [10usize, 10_000] {
        let set = registry(n);
        group.bench_with_input(BenchmarkId::new("json_1KiB", n), &set, |b, set| {
            b.iter(|| {
                leash_proxy::leak::scan_body(
                    black_box(set),
                    &KEY,
                    black_box(&body_headers),
                    black_box(&body),
                    4096,
                )
            })
        });
    }
    group.finish();
    c.bench_function("fingerprint_one_candidate", |b| {
        b.iter(|| fingerprint(&KEY, black_box(b"abc123def456ghi789")))
    });
}

/// The other per-request steps: route by host, the revocation check with 10
/// and 10,000 active revocations, the credential-cache hit and the header
/// rewriting.
fn lookups(c: &mut Criterion) {
    use leash_api::v1::{Injection, Route, RouteSet};
    let routes: Vec<Route> = (0..50)
        .map(|i| Route {
            upstream: format!("up{i}"),
            hosts: vec![format!("api{i}.example.com")],
            target: format!("http://127.0.0.1:{}", 10_000 + i),
            inject: Some(Injection::default()),
            granted: true,
            credential_kind: "jwt".into(),
            ..Default::default()
        })
        .map(|mut r| {
            r.inject = Some(Injection {
                how: Some(leash_api::v1::injection::How::Header(
                    leash_api::v1::HeaderInjection {
                        name: "authorization".into(),
                        format: "Bearer {token}".into(),
                    },
                )),
            });
            r
        })
        .collect();
    let timeouts = leash_proxy::UpstreamTimeouts {
        connect: std::time::Duration::from_secs(1),
        pool_idle: std::time::Duration::from_secs(1),
        max_connections: 1024,
    };
    // The upstream clients need a runtime to exist; nothing is sent.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let _guard = rt.enter();
    let table = leash_proxy::routes::RouteTable::build(
        RouteSet {
            policy_version: "v".into(),
            routes,
        },
        &Default::default(),
        &timeouts,
        &leash_proxy::metrics::Metrics::default(),
    )
    .expect("routes");
    c.bench_function("route_by_host_50_routes", |b| {
        b.iter(|| table.by_host(black_box("api37.example.com")).is_some())
    });

    // The credential-cache hit every request after a route's first takes:
    // the route's current credential, checked fresh and not revoked.
    let route = table.by_host("api37.example.com").expect("route").clone();
    let link = leash_proxy::control::ControlLink::new(leash_proxy::ControlConfig {
        // Never connected: a hit does not involve the control plane.
        identity: leash_api::identity::IdentityConfig::WorkloadApi("unix:///nonexistent".into()),
        control_planes: Vec::new(),
        control_plane_id: "spiffe://leash.test/control-plane".into(),
        max_staleness: std::time::Duration::from_secs(60),
        call_timeout: std::time::Duration::from_secs(1),
        upstream: timeouts.clone(),
        report_interval: std::time::Duration::from_secs(5),
        usage_buffer_records: 1_000,
    });
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as i64;
    let credential = leash_proxy::credential::CachedCredential::from_issued(
        leash_api::v1::Credential {
            id: "3f2a9c1e-credential".into(),
            upstream: "up37".into(),
            kind: "jwt".into(),
            secret: b"eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJ1cDM3In0.c2lnbmF0dXJl".to_vec(),
            issued_at_unix_ms: now_ms,
            expires_at_unix_ms: now_ms + 600_000,
        },
        route.render_for(),
        link.usage.cell("3f2a9c1e-credential", &route.name, "jwt"),
    )
    .expect("credential");
    route.current.store(Some(credential.clone()));
    let cache =
        leash_proxy::cache::CredentialCache::new(leash_proxy::cache::CacheHandles::of(&link));
    c.bench_function("credential_cache_hit", |b| {
        b.iter(|| {
            // Ready at the first poll on a hit.
            let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
            let get = std::pin::pin!(cache.get(black_box(&route)));
            matches!(
                std::future::Future::poll(get, &mut cx),
                std::task::Poll::Ready(Ok(_))
            )
        })
    });

    // A typical request's headers made into the upstream's: hop-by-hop
    // ones removed, the workload's own `Authorization` replaced.
    let mut headers = typical_headers();
    headers.insert("connection", HeaderValue::from_static("keep-alive"));
    c.bench_function("upstream_headers_typical_request", |b| {
        b.iter_batched_ref(
            || headers.clone(),
            |h| {
                leash_proxy::headers::upstream_headers(
                    h,
                    &mut http::Extensions::new(),
                    &route.inject,
                    &credential.value,
                )
            },
            BatchSize::SmallInput,
        )
    });

    let mut group = c.benchmark_group("revocation_check");
    for n in [10usize, 10_000] {
        let set = RevocationSet::new((0..n).map(|i| Revocation {
            id: format!("rev-{i}"),
            kind: if i % 2 == 0 {
                RevocationKind::Credential.into()
            } else {
                RevocationKind::Grant.into()
            },
            credential_id: format!("cred-{i}"),
            workload: format!("spiffe://leash.test/ns/other{i}/sa/x"),
            upstream: "up1".into(),
            ..Default::default()
        }))
        .expect("valid revocations");
        group.bench_with_input(BenchmarkId::from_parameter(n), &set, |b, set| {
            b.iter(|| {
                set.check(
                    black_box("spiffe://leash.test/ns/demo/sa/client"),
                    black_box("up37"),
                )
                .is_none()
                    && !set.credential_revoked(black_box("3f2a9c1e-credential"))
            })
        });
    }
    group.finish();
}

criterion_group!(benches, scan, lookups);
criterion_main!(benches);
