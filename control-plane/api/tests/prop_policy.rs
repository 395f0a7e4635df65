//! Property tests (the fuzzing of this crate's parsers; `PROPTEST_CASES`
//! sets how many cases, CI runs a larger bounded batch): the policy parser,
//! SPIFFE ID and workload-matcher parsing, and session messages decoded from
//! arbitrary bytes never panic, and accept exactly what they should.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test stops at the first failed step, with its message"
)]

use std::path::Path;

use leash_api::policy::{self, WorkloadMatcher};
use proptest::prelude::*;
use prost::Message as _;

fn name() -> impl Strategy<Value = String> {
    "[a-z][a-z0-9-]{0,15}"
}

fn spiffe_id() -> impl Strategy<Value = String> {
    prop::collection::vec("[a-z0-9._-]{1,12}", 1..5)
        .prop_map(|segs| format!("spiffe://leash.test/{}", segs.join("/")))
        .prop_filter("no dot segments", |id| {
            !id.split('/').any(|s| s == "." || s == "..")
        })
}

proptest! {
    #[test]
    fn the_policy_parser_never_panics(text in "\\PC{0,400}") {
        let _ = policy::parse(&text, Path::new("/nonexistent"));
    }

    #[test]
    fn yaml_shaped_noise_never_panics(
        lines in prop::collection::vec(
            prop_oneof![
                Just("version: 1".to_owned()),
                Just("upstreams:".to_owned()),
                Just("  - name: x".to_owned()),
                Just("    hosts: [a.test]".to_owned()),
                Just("    target: http://127.0.0.1:1".to_owned()),
                Just("    credential: { kind: jwt, ttl: 5m }".to_owned()),
                Just("grants:".to_owned()),
                Just("  - workload: spiffe://leash.test/a".to_owned()),
                Just("    upstreams: [x]".to_owned()),
                "\\PC{0,30}",
            ],
            0..20,
        )
    ) {
        let _ = policy::parse(&lines.join("\n"), Path::new("/nonexistent"));
    }

    #[test]
    fn generated_policies_parse_and_grant_exactly_what_they_say(
        upstreams in prop::collection::btree_set(name(), 1..5),
        workload in spiffe_id(),
        ttl in 1u32..3600,
        granted_mask in any::<u8>(),
    ) {
        let upstreams: Vec<String> = upstreams.into_iter().collect();
        let granted: Vec<&String> = upstreams
            .iter()
            .enumerate()
            .filter(|(i, _)| granted_mask & (1 << i) != 0)
            .map(|(_, u)| u)
            .collect();
        let mut text = String::from("version: 1\nupstreams:\n");
        for (i, u) in upstreams.iter().enumerate() {
            text.push_str(&format!(
                "  - name: {u}\n    hosts: [h{i}.leash.test]\n    target: http://127.0.0.1:{}\n    credential: {{ kind: jwt, ttl: {ttl}s }}\n",
                1000 + i
            ));
        }
        if !granted.is_empty() {
            text.push_str(&format!(
                "grants:\n  - workload: {workload}\n    upstreams: [{}]\n",
                granted.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
            ));
        }
        let p = policy::parse(&text, Path::new("/nonexistent"));
        let p = p.map_err(|e| TestCaseError::fail(format!("{e:?}\n{text}")))?;
        for u in &upstreams {
            prop_assert_eq!(p.is_granted(&workload, u), granted.contains(&u));
            prop_assert!(!p.is_granted("spiffe://leash.test/someone-else", u));
        }
    }

    #[test]
    fn a_bad_field_is_reported_with_its_path(ttl in "[a-z]{1,6}") {
        let text = format!(
            "version: 1\nupstreams:\n  - name: a\n    hosts: [a.test]\n    target: http://127.0.0.1:1\n    credential: {{ kind: jwt, ttl: {ttl}9 }}\n"
        );
        let issues = policy::parse(&text, Path::new("/nonexistent")).unwrap_err();
        prop_assert!(issues.iter().any(|i| i.field.contains("upstreams[0].credential")), "{issues:?}");
    }

    #[test]
    fn spiffe_and_matcher_parsing_never_panic(s in "\\PC{0,80}") {
        let _ = spiffe::SpiffeId::new(&s);
        if let Ok(m) = WorkloadMatcher::parse(&s) {
            let _ = m.matches(&s);
        }
    }

    #[test]
    fn exact_matchers_match_only_themselves_and_prefixes_only_below(
        id in spiffe_id(),
        other in spiffe_id(),
        child in "[a-z0-9]{1,8}",
    ) {
        let exact = WorkloadMatcher::parse(&id).unwrap();
        prop_assert!(exact.matches(&id));
        prop_assert_eq!(exact.matches(&other), other == id);
        let prefix = WorkloadMatcher::parse(&format!("{id}/*")).unwrap();
        let below = format!("{id}/{child}");
        prop_assert!(prefix.matches(&below));
        prop_assert!(!prefix.matches(&id), "a prefix does not match itself");
        // A sibling that merely shares the text prefix is not below.
        let sibling = format!("{id}{child}");
        prop_assert!(!prefix.matches(&sibling));
    }

    #[test]
    fn session_messages_from_arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = leash_api::v1::SidecarMessage::decode(bytes.as_slice());
        let _ = leash_api::v1::ControlMessage::decode(bytes.as_slice());
        let _ = leash_api::v1::UsageBatch::decode(bytes.as_slice());
    }
}
