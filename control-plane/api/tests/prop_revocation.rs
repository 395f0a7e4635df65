//! The revocation set under random sequences of revocations and restores
//! agrees with a plain model of what should be refused.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test stops at the first failed step, with its message"
)]

use std::collections::BTreeMap;

use leash_api::revocation::{RevocationKind, RevocationSet};
use leash_api::v1::Revocation;
use proptest::prelude::*;

const WORKLOADS: [&str; 3] = [
    "spiffe://leash.test/ns/a/sa/one",
    "spiffe://leash.test/ns/a/sa/two",
    "spiffe://leash.test/ns/b/sa/one",
];
const UPSTREAMS: [&str; 2] = ["payments", "ledger"];

#[derive(Debug, Clone)]
enum Op {
    Revoke(Revocation),
    Restore(usize),
}

fn revocation() -> impl Strategy<Value = Revocation> {
    (0..4usize, 0..3usize, 0..2usize, 0..3usize, any::<bool>()).prop_map(
        |(kind, w, u, c, prefix)| {
            let workload = if prefix {
                "spiffe://leash.test/ns/a/*".to_owned()
            } else {
                WORKLOADS[w].to_owned()
            };
            let mut r = Revocation {
                reason: "prop".into(),
                ..Default::default()
            };
            match kind {
                0 => {
                    r.kind = RevocationKind::Credential.into();
                    r.credential_id = format!("cred-{c}");
                }
                1 => {
                    r.kind = RevocationKind::Grant.into();
                    r.workload = workload;
                    r.upstream = UPSTREAMS[u].into();
                }
                2 => {
                    r.kind = RevocationKind::Workload.into();
                    r.workload = workload;
                }
                _ => {
                    r.kind = RevocationKind::Upstream.into();
                    r.upstream = UPSTREAMS[u].into();
                }
            }
            r
        },
    )
}

fn matches(pattern: &str, id: &str) -> bool {
    match pattern.strip_suffix("/*") {
        Some(base) => id.starts_with(&format!("{base}/")),
        None => pattern == id,
    }
}

proptest! {
    #[test]
    fn the_set_agrees_with_the_model(ops in prop::collection::vec(prop_oneof![
        3 => revocation().prop_map(Op::Revoke),
        1 => (0..20usize).prop_map(Op::Restore),
    ], 0..40)) {
        let mut set = RevocationSet::new([]).unwrap();
        let mut model: BTreeMap<String, Revocation> = BTreeMap::new();
        let mut ids = Vec::new();
        for (i, op) in ops.into_iter().enumerate() {
            match op {
                Op::Revoke(mut r) => {
                    r.id = format!("rev-{i}");
                    ids.push(r.id.clone());
                    model.insert(r.id.clone(), r.clone());
                    set = set.with_change(r, false).unwrap();
                }
                Op::Restore(k) => {
                    let Some(id) = ids.get(k % ids.len().max(1)).cloned() else { continue };
                    if let Some(r) = model.remove(&id) {
                        set = set.with_change(r, true).unwrap();
                    }
                }
            }
        }
        prop_assert_eq!(set.len(), model.len());
        for w in WORKLOADS {
            for u in UPSTREAMS {
                let expected = model.values().any(|r| match r.kind() {
                    RevocationKind::Grant => matches(&r.workload, w) && r.upstream == u,
                    RevocationKind::Workload => matches(&r.workload, w),
                    RevocationKind::Upstream => r.upstream == u,
                    _ => false,
                });
                prop_assert_eq!(set.check(w, u).is_some(), expected, "{} × {}", w, u);
            }
        }
        for c in 0..3 {
            let id = format!("cred-{c}");
            let expected = model.values().any(|r| r.kind() == RevocationKind::Credential && r.credential_id == id);
            prop_assert_eq!(set.credential_revoked(&id), expected);
        }
    }
}
