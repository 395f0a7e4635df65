//! The leaked-value scanner (invariant I2) under generated requests: it
//! never panics on any header, query or body, always finds a registered
//! value wherever a whole token can carry it, and never flags a clean one.

use http::{HeaderMap, HeaderName, HeaderValue};
use leash_api::revocation::{FingerprintKey, RevocationSet, fingerprint, fingerprint_bytes};
use leash_api::v1::Revocation;
use leash_proxy::leak::{scan_body, scan_request};
use proptest::prelude::*;

const KEY: FingerprintKey = FingerprintKey([42; 16]);

fn registered(value: &str) -> RevocationSet {
    RevocationSet::new([Revocation {
        id: "rev-leak".into(),
        kind: "leaked".into(),
        fingerprint: fingerprint_bytes(fingerprint(&KEY, value.as_bytes())),
        ..Default::default()
    }])
    .unwrap()
}

fn secret() -> impl Strategy<Value = String> {
    "[A-Za-z0-9_-]{12,48}"
}

proptest! {
    #[test]
    fn never_panics_on_any_request(
        headers in prop::collection::vec(("[a-z][a-z0-9-]{0,20}", prop::collection::vec(32u8..127, 0..200)), 0..12),
        query in "\\PC{0,200}",
        body in prop::collection::vec(any::<u8>(), 0..1024),
    ) {
        let set = registered("sk_live_never_in_random_input_0001");
        let mut map = HeaderMap::new();
        for (k, v) in headers {
            if let (Ok(k), Ok(v)) = (HeaderName::from_bytes(k.as_bytes()), HeaderValue::from_bytes(&v)) {
                map.append(k, v);
            }
        }
        prop_assert!(scan_request(&set, &KEY, &map, Some(&query)).is_none());
        prop_assert!(scan_body(&set, &KEY, &body).is_none());
    }

    #[test]
    fn finds_the_value_wherever_a_whole_token_carries_it(
        value in secret(),
        noise in "[a-z]{1,10}",
        place in 0..7usize,
    ) {
        let set = registered(&value);
        let mut headers = HeaderMap::new();
        headers.insert("accept", HeaderValue::from_static("*/*"));
        let mut query = format!("{noise}=1");
        let header = |v: String| HeaderValue::from_str(&v).unwrap();
        let expect = match place {
            0 => { headers.insert("authorization", header(format!("Bearer {value}"))); "header:authorization" }
            1 => { headers.insert("x-api-key", header(value.clone())); "header:x-api-key" }
            2 => { headers.insert("cookie", header(format!("{noise}=1; session={value}; z=2"))); "header:cookie" }
            3 => {
                use base64::Engine as _;
                let basic = base64::engine::general_purpose::STANDARD.encode(format!("{noise}:{value}"));
                headers.insert("authorization", header(format!("Basic {basic}")));
                "header:authorization"
            }
            4 => { query = format!("{noise}=1&token={value}"); "query:token" }
            5 => {
                let encoded: String = value.bytes().map(|b| format!("%{b:02X}")).collect();
                query = format!("key={encoded}");
                "query:key"
            }
            _ => { headers.insert("x-forwarded", header(format!("{noise}, {value}, {noise}"))); "header:x-forwarded" }
        };
        let hit = scan_request(&set, &KEY, &headers, Some(&query));
        prop_assert_eq!(hit.map(|h| h.location), Some(expect.to_owned()));
        // Inside a longer token it is not a match (whole-token semantics).
        let mut longer = HeaderMap::new();
        longer.insert("x-api-key", header(format!("{noise}{value}{noise}")));
        prop_assert!(scan_request(&set, &KEY, &longer, None).is_none());
    }

    #[test]
    fn finds_the_value_in_a_body_between_separators(
        value in secret(),
        before in "[a-z ]{0,40}",
        after in "[a-z ]{0,40}",
        sep in prop::sample::select(vec!["\"", " ", "=", ":", ",", "\n", "&"]),
    ) {
        let set = registered(&value);
        let body = format!("{before}{sep}{value}{sep}{after}");
        prop_assert!(scan_body(&set, &KEY, body.as_bytes()).is_some(), "{}", body);
    }
}
