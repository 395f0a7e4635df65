//! The leaked-value scanner (invariant I2) under generated requests: it
//! never panics on any path, query, header or body, finds a registered value
//! in every carrier and encoding the scan covers (one property per row of
//! the table in proxy/src/leak.rs), and never flags a clean request.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test stops at the first failed step, with its message"
)]

use std::io::Write as _;

use base64::Engine as _;
use http::{HeaderMap, HeaderName, HeaderValue, Uri};
use leash_api::revocation::{
    FingerprintKey, RevocationKind, RevocationSet, fingerprint, fingerprint_bytes,
};
use leash_api::v1::Revocation;
use leash_proxy::leak::{scan_body, scan_request};
use proptest::prelude::*;

const KEY: FingerprintKey = FingerprintKey([42; 16]);
const LIMIT: usize = 4096;

fn registered(value: &str) -> RevocationSet {
    RevocationSet::new([Revocation {
        id: "rev-leak".into(),
        kind: RevocationKind::Leaked.into(),
        fingerprint: fingerprint_bytes(fingerprint(&KEY, value.as_bytes())),
        ..Default::default()
    }])
    .unwrap()
}

fn secret() -> impl Strategy<Value = String> {
    "[A-Za-z0-9_-]{12,48}"
}

/// A value holding separators: 2 to 4 parts joined by `=`, `:` or `;`, and
/// maybe base64 padding.
fn separated() -> impl Strategy<Value = String> {
    (
        prop::collection::vec(
            (
                "[A-Za-z0-9_-]{4,12}",
                prop::sample::select(vec!["=", ":", ";"]),
            ),
            1..4,
        ),
        "[A-Za-z0-9_-]{4,12}",
        prop::sample::select(vec!["", "=", "=="]),
    )
        .prop_map(|(parts, last, pad)| {
            let mut v: String = parts.into_iter().map(|(p, s)| format!("{p}{s}")).collect();
            v.push_str(&last);
            v.push_str(pad);
            v
        })
}

/// A value with a space inside (sent as `+` in queries and forms).
fn spaced() -> impl Strategy<Value = String> {
    ("[A-Za-z0-9_-]{6,20}", "[A-Za-z0-9_-]{6,20}").prop_map(|(a, b)| format!("{a} {b}"))
}

fn pct(v: &str) -> String {
    v.bytes().map(|b| format!("%{b:02X}")).collect()
}

/// Some bytes percent-encoded, by a mask.
fn pct_some(v: &str, mask: u64) -> String {
    v.bytes()
        .enumerate()
        .map(|(i, b)| {
            if mask >> (i % 64) & 1 == 1 {
                format!("%{b:02x}")
            } else {
                char::from(b).to_string()
            }
        })
        .collect()
}

fn headers(pairs: &[(&str, String)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert("accept", HeaderValue::from_static("*/*"));
    for (k, v) in pairs {
        h.append(
            HeaderName::from_bytes(k.as_bytes()).unwrap(),
            HeaderValue::from_str(v).unwrap(),
        );
    }
    h
}

/// Where the value is found in the request, and that the same request is
/// clean when something else is registered.
fn request_at(value: &str, pairs: &[(&str, String)], target: &str) -> Option<String> {
    let uri: Uri = target.parse().unwrap();
    let h = headers(pairs);
    let other = registered(&format!("{value}~"));
    assert!(
        scan_request(&other, &KEY, &h, &uri).is_none(),
        "clean request flagged: {target} {pairs:?}"
    );
    scan_request(&registered(value), &KEY, &h, &uri).map(|h| h.location)
}

fn body_at(value: &str, pairs: &[(&str, String)], body: &[u8]) -> Option<String> {
    let h = headers(pairs);
    let other = registered(&format!("{value}~"));
    assert!(
        scan_body(&other, &KEY, &h, body, LIMIT).is_none(),
        "clean body flagged: {pairs:?}"
    );
    scan_body(&registered(value), &KEY, &h, body, LIMIT).map(|h| h.location)
}

fn json_string(v: &str) -> String {
    serde_json::to_string(v).unwrap()
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

fn deflate(data: &[u8], zlib: bool) -> Vec<u8> {
    if zlib {
        let mut e = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    } else {
        let mut e = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }
}

proptest! {
    #[test]
    fn never_panics_on_any_request(
        headers in prop::collection::vec(("[a-z][a-z0-9-]{0,20}", prop::collection::vec(32u8..127, 0..200)), 0..12),
        path in prop::collection::vec("[!-~&&[^?#]]{0,30}", 0..20),
        query in "\\PC{0,200}",
        body in prop::collection::vec(any::<u8>(), 0..1024),
        coding in prop::sample::select(vec!["", "gzip", "deflate", "x-gzip", "br", "gzip, gzip"]),
        content_type in prop::sample::select(vec!["", "application/json", "application/x-www-form-urlencoded", "text/plain"]),
        compress in any::<bool>(),
        cut in 0..64usize,
        limit in 0..2048usize,
    ) {
        let set = registered("sk_live_never_in_random_input_0001");
        let mut map = HeaderMap::new();
        for (k, v) in headers {
            if let (Ok(k), Ok(v)) = (HeaderName::from_bytes(k.as_bytes()), HeaderValue::from_bytes(&v)) {
                map.append(k, v);
            }
        }
        let target = format!("/{}?{}", path.join("/"), query);
        let uri: Uri = target.parse().unwrap_or_else(|_| Uri::from_static("/"));
        prop_assert!(scan_request(&set, &KEY, &map, &uri).is_none());
        let mut h = HeaderMap::new();
        if !coding.is_empty() {
            h.insert("content-encoding", HeaderValue::from_static(coding));
        }
        if !content_type.is_empty() {
            h.insert("content-type", HeaderValue::from_static(content_type));
        }
        // Random bytes, and (maybe truncated) compressed random bytes.
        let body = if compress {
            let mut z = if coding.contains("deflate") { deflate(&body, cut % 2 == 0) } else { gzip(&body) };
            z.truncate(z.len().saturating_sub(cut));
            z
        } else {
            body
        };
        prop_assert!(scan_body(&set, &KEY, &h, &body, limit).is_none());
    }

    // Path segment, raw.
    #[test]
    fn path_segment_raw(value in secret(), noise in "[a-z]{1,10}") {
        let loc = request_at(&value, &[], &format!("/{noise}/{value}/{noise}"));
        prop_assert_eq!(loc.as_deref(), Some("path"));
    }

    // Path segment, percent-encoded (some or all bytes).
    #[test]
    fn path_segment_percent_encoded(value in secret(), noise in "[a-z]{1,10}", mask in any::<u64>()) {
        let loc = request_at(&value, &[], &format!("/{noise}/{}", pct_some(&value, mask | 1)));
        prop_assert_eq!(loc.as_deref(), Some("path"));
    }

    // Path segment, glued after a letters prefix (`/bot<value>/send`).
    #[test]
    fn path_segment_glued_after_letters(value in secret(), prefix in "[A-Za-z]{1,16}") {
        let loc = request_at(&value, &[], &format!("/{prefix}{value}/send"));
        prop_assert_eq!(loc.as_deref(), Some("path"));
    }

    // Query parameter name, raw or percent-encoded, with or without a value.
    #[test]
    fn query_name(value in secret(), encoded in any::<bool>(), bare in any::<bool>()) {
        let name = if encoded { pct(&value) } else { value.clone() };
        let query = if bare { format!("a=1&{name}") } else { format!("a=1&{name}=1") };
        let loc = request_at(&value, &[], &format!("/x?{query}"));
        prop_assert_eq!(loc.as_deref(), Some("query-name"));
    }

    // Query parameter value, raw.
    #[test]
    fn query_value_raw(value in secret(), noise in "[a-z]{1,10}") {
        let loc = request_at(&value, &[], &format!("/x?{noise}=1&token={value}"));
        prop_assert_eq!(loc.as_deref(), Some("query:token"));
    }

    // Query parameter value, percent-encoded (some or all bytes).
    #[test]
    fn query_value_percent_encoded(value in secret(), mask in any::<u64>()) {
        let loc = request_at(&value, &[], &format!("/x?key={}", pct_some(&value, mask | 1)));
        prop_assert_eq!(loc.as_deref(), Some("query:key"));
    }

    // Query parameter value with a space, sent as `+`.
    #[test]
    fn query_value_plus_for_space(value in spaced()) {
        let loc = request_at(&value, &[], &format!("/x?a=b&q={}", value.replace(' ', "+")));
        prop_assert_eq!(loc.as_deref(), Some("query:q"));
    }

    // Header value, raw: whole, after a scheme, in a list.
    #[test]
    fn header_value_raw(value in secret(), noise in "[a-z]{1,10}", form in 0..3usize) {
        let v = match form {
            0 => value.clone(),
            1 => format!("Bearer {value}"),
            _ => format!("{noise}, {value}, {noise}"),
        };
        let loc = request_at(&value, &[("x-api-key", v)], "/");
        prop_assert_eq!(loc.as_deref(), Some("header:x-api-key"));
    }

    // Header value, percent-encoded (some or all bytes).
    #[test]
    fn header_value_percent_encoded(value in secret(), mask in any::<u64>(), keyed in any::<bool>()) {
        let enc = pct_some(&value, mask | 1);
        let v = if keyed { format!("k={enc}") } else { enc };
        let loc = request_at(&value, &[("x-api-key", v)], "/");
        prop_assert_eq!(loc.as_deref(), Some("header:x-api-key"));
    }

    // Cookie, raw or percent-encoded.
    #[test]
    fn cookie(value in secret(), noise in "[a-z]{1,10}", mask in any::<u64>()) {
        let v = pct_some(&value, mask);
        let loc = request_at(&value, &[("cookie", format!("{noise}=1; session={v}; z=2"))], "/");
        prop_assert_eq!(loc.as_deref(), Some("header:cookie"));
    }

    // Basic, padded.
    #[test]
    fn basic_padded(value in secret(), user in "[a-z]{1,10}", as_user in any::<bool>()) {
        let plain = if as_user { format!("{value}:{user}") } else { format!("{user}:{value}") };
        let b = base64::engine::general_purpose::STANDARD.encode(plain);
        let loc = request_at(&value, &[("authorization", format!("Basic {b}"))], "/");
        prop_assert_eq!(loc.as_deref(), Some("header:authorization"));
    }

    // Basic, unpadded (standard or URL-safe alphabet).
    #[test]
    fn basic_unpadded(value in secret(), user in "[a-z]{1,10}", url_safe in any::<bool>()) {
        let plain = format!("{user}:{value}");
        let b = if url_safe {
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(plain)
        } else {
            base64::engine::general_purpose::STANDARD_NO_PAD.encode(plain)
        };
        let loc = request_at(&value, &[("authorization", format!("Basic {b}"))], "/");
        prop_assert_eq!(loc.as_deref(), Some("header:authorization"));
    }

    // JSON body, plain, with leading whitespace.
    #[test]
    fn json_body_plain(value in secret(), noise in "[a-z]{1,10}", ws in "[ \t\r\n]{0,64}") {
        let body = format!("{ws}{{\"{noise}\":1,\"key\":{},\"list\":[\"{noise}\"]}}", json_string(&value));
        let loc = body_at(&value, &[("content-type", "application/json".into())], body.as_bytes());
        prop_assert_eq!(loc.as_deref(), Some("body"));
    }

    // JSON body with `\uXXXX` and `\/` escapes (a `/` in the value).
    #[test]
    fn json_body_escaped(a in secret(), b in "[A-Za-z0-9_-]{0,8}", mask in any::<u64>(), upper in any::<bool>()) {
        let value = if b.is_empty() { a } else { format!("{a}/{b}") };
        let escaped: String = value
            .chars()
            .enumerate()
            .map(|(i, c)| match c {
                '/' => "\\/".to_owned(),
                c if mask >> (i % 64) & 1 == 1 && upper => format!("\\u{:04X}", u32::from(c)),
                c if mask >> (i % 64) & 1 == 1 => format!("\\u{:04x}", u32::from(c)),
                c => c.to_string(),
            })
            .collect();
        let body = format!("{{\"key\":\"{escaped}\"}}");
        let loc = body_at(&value, &[("content-type", "application/json".into())], body.as_bytes());
        prop_assert_eq!(loc.as_deref(), Some("body"));
    }

    // Form body, encoded (some or all bytes percent-encoded).
    #[test]
    fn form_body_encoded(value in secret(), noise in "[a-z]{1,10}", mask in any::<u64>()) {
        let body = format!("{noise}=1&token={}&z={noise}", pct_some(&value, mask | 1));
        let ct = ("content-type", "application/x-www-form-urlencoded".to_owned());
        let loc = body_at(&value, &[ct], body.as_bytes());
        prop_assert_eq!(loc.as_deref(), Some("body"));
    }

    // Gzip body.
    #[test]
    fn gzip_body(value in secret(), noise in "[a-z ]{0,200}") {
        let body = gzip(format!("{noise}{{\"key\":{}}}", json_string(&value)).as_bytes());
        let loc = body_at(&value, &[("content-encoding", "gzip".into())], &body);
        prop_assert_eq!(loc.as_deref(), Some("body:gzip"));
    }

    // Deflate body, zlib-wrapped or raw.
    #[test]
    fn deflate_body(value in secret(), noise in "[a-z ]{0,200}", zlib in any::<bool>()) {
        let body = deflate(format!("{noise}{{\"key\":{}}}", json_string(&value)).as_bytes(), zlib);
        let loc = body_at(&value, &[("content-encoding", "deflate".into())], &body);
        prop_assert_eq!(loc.as_deref(), Some("body:deflate"));
    }

    // A value with separators inside, in a header.
    #[test]
    fn separators_in_header(value in separated(), noise in "[a-z]{1,10}", form in 0..4usize) {
        let (name, v) = match form {
            0 => ("x-api-key", value.clone()),
            1 => ("authorization", format!("Bearer {value}")),
            2 => ("cookie", format!("{noise}=1; t={value}; z=2")),
            _ => ("x-list", format!("{noise}, {value}, {noise}")),
        };
        let loc = request_at(&value, &[(name, v)], "/");
        prop_assert_eq!(loc, Some(format!("header:{name}")));
    }

    // A value with separators inside, in a query value (raw or encoded).
    #[test]
    fn separators_in_query(value in separated(), noise in "[a-z]{1,10}", encoded in any::<bool>()) {
        let v = if encoded { pct(&value) } else { value.clone() };
        let loc = request_at(&value, &[], &format!("/x?{noise}=1&q={v}&z={noise}"));
        prop_assert_eq!(loc.as_deref(), Some("query:q"));
    }

    // A value with separators inside, in a JSON or form body.
    #[test]
    fn separators_in_body(value in separated(), noise in "[a-z]{1,10}", form in any::<bool>()) {
        let (ct, body) = if form {
            ("application/x-www-form-urlencoded", format!("{noise}=1&q={}", pct(&value)))
        } else {
            ("application/json", format!("{{\"{noise}\":\"x\",\"q\":{}}}", json_string(&value)))
        };
        let loc = body_at(&value, &[("content-type", ct.into())], body.as_bytes());
        prop_assert_eq!(loc.as_deref(), Some("body"));
    }
}
