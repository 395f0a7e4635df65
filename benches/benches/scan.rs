//! The per-request cost of the leaked-value scan (headers and query of a
//! typical request) as the registry grows from 10 to 10,000 fingerprints.
//!
//!   cargo bench -p leash-benches --bench scan

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use http::{HeaderMap, HeaderName, HeaderValue};
use leash_api::revocation::{FingerprintKey, RevocationSet, fingerprint, fingerprint_bytes};
use leash_api::v1::Revocation;

const KEY: FingerprintKey = FingerprintKey(*b"0123456789abcdef");

fn registry(n: usize) -> RevocationSet {
    RevocationSet::new((0..n).map(|i| Revocation {
        id: format!("rev-{i}"),
        kind: "leaked".into(),
        fingerprint: fingerprint_bytes(fingerprint(
            &KEY,
            format!("leaked-secret-{i:08}").as_bytes(),
        )),
        ..Default::default()
    }))
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

fn scan(c: &mut Criterion) {
    let headers = typical_headers();
    let query = Some("page=2&per_page=50&sort=created_at");
    let mut group = c.benchmark_group("leak_scan_request");
    for n in [10usize, 10_000] {
        let set = registry(n);
        group.bench_with_input(BenchmarkId::from_parameter(n), &set, |b, set| {
            b.iter(|| {
                leash_proxy::leak::scan_request(
                    black_box(set),
                    &KEY,
                    black_box(&headers),
                    black_box(query),
                )
            })
        });
    }
    group.finish();
    c.bench_function("fingerprint_one_candidate", |b| {
        b.iter(|| fingerprint(&KEY, black_box(b"abc123def456ghi789")))
    });
}

criterion_group!(benches, scan);
criterion_main!(benches);
