//! The revocation model both sides enforce: what a revocation names, and a
//! compiled set that answers "is this revoked?" without locks or allocation.

use std::collections::{BTreeMap, HashSet};

use crate::policy::WorkloadMatcher;
use crate::v1::Revocation;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RevocationKind {
    /// One issued credential, by id. Permanent.
    Credential,
    /// A workload (exact or prefix) × an upstream.
    Grant,
    /// A workload (exact or prefix), for every upstream.
    Workload,
    /// An upstream, for every workload.
    Upstream,
}

impl RevocationKind {
    pub const ALL: [Self; 4] = [
        Self::Credential,
        Self::Grant,
        Self::Workload,
        Self::Upstream,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Credential => "credential",
            Self::Grant => "grant",
            Self::Workload => "workload",
            Self::Upstream => "upstream",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == s)
    }

    /// Whether a revocation of this kind can be undone.
    pub fn restorable(self) -> bool {
        self != Self::Credential
    }

    /// The code a refusal caused by this kind carries.
    pub fn refusal_code(self) -> &'static str {
        match self {
            Self::Credential => "revoked_credential",
            Self::Grant => "revoked_grant",
            Self::Workload => "revoked_workload",
            Self::Upstream => "revoked_upstream",
        }
    }
}

/// The active revocations, compiled for lookups.
#[derive(Debug, Default, Clone)]
pub struct RevocationSet {
    active: BTreeMap<String, Revocation>,
    credentials: HashSet<String>,
    upstreams: HashSet<String>,
    workloads: Vec<(WorkloadMatcher, String)>,
    grants: Vec<(WorkloadMatcher, String, String)>,
}

impl RevocationSet {
    pub fn new(active: impl IntoIterator<Item = Revocation>) -> Self {
        let active = active.into_iter().map(|r| (r.id.clone(), r)).collect();
        Self::compile(active)
    }

    fn compile(active: BTreeMap<String, Revocation>) -> Self {
        let mut set = Self::default();
        for r in active.values() {
            match RevocationKind::parse(&r.kind) {
                Some(RevocationKind::Credential) => {
                    set.credentials.insert(r.credential_id.clone());
                }
                Some(RevocationKind::Upstream) => {
                    set.upstreams.insert(r.upstream.clone());
                }
                Some(RevocationKind::Workload) => {
                    if let Ok(m) = WorkloadMatcher::parse(&r.workload) {
                        set.workloads.push((m, r.id.clone()));
                    }
                }
                Some(RevocationKind::Grant) => {
                    if let Ok(m) = WorkloadMatcher::parse(&r.workload) {
                        set.grants.push((m, r.upstream.clone(), r.id.clone()));
                    }
                }
                // An unknown kind from a newer control plane: nothing to match on.
                None => {}
            }
        }
        set.active = active;
        set
    }

    /// A copy with `revocation` added (or, if `restored`, removed).
    pub fn with_change(&self, revocation: Revocation, restored: bool) -> Self {
        let mut active = self.active.clone();
        if restored {
            active.remove(&revocation.id);
        } else {
            active.insert(revocation.id.clone(), revocation);
        }
        Self::compile(active)
    }

    pub fn len(&self) -> usize {
        self.active.len()
    }

    pub fn is_empty(&self) -> bool {
        self.active.is_empty()
    }

    pub fn active(&self) -> impl Iterator<Item = &Revocation> {
        self.active.values()
    }

    /// The revocation, if any, that forbids `workload` using `upstream`.
    pub fn check(&self, workload: &str, upstream: &str) -> Option<&Revocation> {
        let id = if self.upstreams.contains(upstream) {
            self.active
                .values()
                .find(|r| r.kind == "upstream" && r.upstream == upstream)
                .map(|r| &r.id)
        } else {
            self.workloads
                .iter()
                .find(|(m, _)| m.matches(workload))
                .map(|(_, id)| id)
                .or_else(|| {
                    self.grants
                        .iter()
                        .find(|(m, u, _)| u == upstream && m.matches(workload))
                        .map(|(_, _, id)| id)
                })
        }?;
        self.active.get(id)
    }

    pub fn credential_revoked(&self, credential_id: &str) -> bool {
        !self.credentials.is_empty() && self.credentials.contains(credential_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rev(id: &str, kind: &str, workload: &str, upstream: &str, cred: &str) -> Revocation {
        Revocation {
            id: id.into(),
            kind: kind.into(),
            workload: workload.into(),
            upstream: upstream.into(),
            credential_id: cred.into(),
            ..Default::default()
        }
    }

    #[test]
    fn each_kind_matches_what_it_names() {
        let set = RevocationSet::new([
            rev("1", "credential", "", "", "cred-1"),
            rev("2", "grant", "spiffe://td/a", "pay", ""),
            rev("3", "workload", "spiffe://td/ns/bad/*", "", ""),
            rev("4", "upstream", "", "ledger", ""),
        ]);
        assert!(set.credential_revoked("cred-1"));
        assert!(!set.credential_revoked("cred-2"));
        assert_eq!(
            set.check("spiffe://td/a", "pay").map(|r| r.id.as_str()),
            Some("2")
        );
        assert!(set.check("spiffe://td/a", "other").is_none());
        assert_eq!(
            set.check("spiffe://td/ns/bad/x", "pay")
                .map(|r| r.id.as_str()),
            Some("3")
        );
        assert!(set.check("spiffe://td/ns/badx", "pay").is_none());
        assert_eq!(
            set.check("spiffe://td/anyone", "ledger")
                .map(|r| r.id.as_str()),
            Some("4")
        );

        let restored = set.with_change(rev("2", "grant", "spiffe://td/a", "pay", ""), true);
        assert!(restored.check("spiffe://td/a", "pay").is_none());
        assert_eq!(restored.len(), 3);
    }
}
