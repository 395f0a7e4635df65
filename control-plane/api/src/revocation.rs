//! The revocation model both sides enforce: what a revocation names, and a
//! compiled set that answers "is this revoked?" without locks or allocation.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use crate::policy::WorkloadMatcher;
use crate::v1::Revocation;

/// What a revocation names: the wire enum (`leash.proto`), with the names
/// the admin API, the store and the logs use.
pub use crate::v1::RevocationKind;

impl RevocationKind {
    /// Every kind a revocation can have (not `Unspecified`).
    pub const ALL: [Self; 5] = [
        Self::Credential,
        Self::Grant,
        Self::Workload,
        Self::Upstream,
        Self::Leaked,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unspecified => "unspecified",
            Self::Credential => "credential",
            Self::Grant => "grant",
            Self::Workload => "workload",
            Self::Upstream => "upstream",
            Self::Leaked => "leaked",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == s)
    }

    /// Whether a revocation of this kind can be undone.
    pub fn restorable(self) -> bool {
        !matches!(self, Self::Credential | Self::Leaked | Self::Unspecified)
    }

    /// The kind of a revocation as sent, if it is one this build knows.
    pub fn of(r: &Revocation) -> Option<Self> {
        Self::try_from(r.kind)
            .ok()
            .filter(|k| *k != Self::Unspecified)
    }

    /// The code a refusal caused by this kind carries.
    pub fn refusal_code(self) -> &'static str {
        match self {
            Self::Credential => "revoked_credential",
            Self::Grant => "revoked_grant",
            Self::Workload => "revoked_workload",
            Self::Upstream => "revoked_upstream",
            Self::Leaked => "leaked_secret",
            Self::Unspecified => "revoked",
        }
    }
}

/// The active revocations, compiled for lookups. Cheap to copy-and-change:
/// everything is reference-counted, so applying one change to a set of n
/// costs n reference-count bumps, not n reallocations.
#[derive(Debug, Default, Clone)]
pub struct RevocationSet {
    active: BTreeMap<Arc<str>, Arc<Revocation>>,
    credentials: HashSet<Arc<str>>,
    upstreams: HashSet<Arc<str>>,
    workloads: Matchers,
    /// Grant revocations by upstream.
    grants: HashMap<Arc<str>, Matchers>,
    /// Leaked-value fingerprint → registration id.
    leaked: HashMap<u128, Arc<str>>,
}

/// A revocation the set cannot enforce as sent. The enforcement point never
/// enforces less than it was sent: the whole set (or change) is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("revocation {id:?} cannot be enforced: {reason}")]
pub struct InvalidRevocation {
    pub id: String,
    pub reason: String,
}

impl RevocationSet {
    /// Compiles `active`; fails on the first revocation it could not enforce
    /// (an unknown kind, a matcher it cannot parse, a malformed fingerprint).
    pub fn new(active: impl IntoIterator<Item = Revocation>) -> Result<Self, InvalidRevocation> {
        let mut set = Self::default();
        for r in active {
            set.add(Arc::new(r))?;
        }
        Ok(set)
    }

    fn add(&mut self, r: Arc<Revocation>) -> Result<(), InvalidRevocation> {
        let invalid = |reason: String| InvalidRevocation {
            id: r.id.clone(),
            reason,
        };
        let id: Arc<str> = r.id.as_str().into();
        let matcher = || {
            WorkloadMatcher::parse(&r.workload)
                .map_err(|e| invalid(format!("workload matcher {:?}: {e}", r.workload)))
        };
        match RevocationKind::of(&r) {
            Some(RevocationKind::Credential) if !r.credential_id.is_empty() => {
                self.credentials.insert(r.credential_id.as_str().into());
            }
            Some(RevocationKind::Upstream) if !r.upstream.is_empty() => {
                self.upstreams.insert(r.upstream.as_str().into());
            }
            Some(RevocationKind::Workload) => self.workloads.add(matcher()?, id.clone()),
            Some(RevocationKind::Grant) if !r.upstream.is_empty() => {
                let m = matcher()?;
                self.grants
                    .entry(r.upstream.as_str().into())
                    .or_default()
                    .add(m, id.clone());
            }
            Some(RevocationKind::Leaked) => {
                let fp = fingerprint_from_bytes(&r.fingerprint).ok_or_else(|| {
                    invalid(format!(
                        "fingerprint of {} bytes (16 expected)",
                        r.fingerprint.len()
                    ))
                })?;
                self.leaked.insert(fp, id.clone());
            }
            Some(kind) => {
                return Err(invalid(format!(
                    "a {} revocation without what it names",
                    kind.as_str()
                )));
            }
            // An unknown kind (a newer control plane): what it forbids is
            // unknown, so it cannot be enforced partially.
            None => return Err(invalid(format!("unknown kind {:?}", r.kind))),
        }
        self.active.insert(id, r);
        Ok(())
    }

    fn remove(&mut self, id: &str) {
        let Some(r) = self.active.remove(id) else {
            return;
        };
        match RevocationKind::of(&r) {
            // Another active revocation may name the same credential or upstream.
            Some(RevocationKind::Credential)
                if !self
                    .active
                    .values()
                    .any(|o| o.kind == r.kind && o.credential_id == r.credential_id) =>
            {
                self.credentials.remove(r.credential_id.as_str());
            }
            Some(RevocationKind::Upstream)
                if !self
                    .active
                    .values()
                    .any(|o| o.kind == r.kind && o.upstream == r.upstream) =>
            {
                self.upstreams.remove(r.upstream.as_str());
            }
            Some(RevocationKind::Workload) => self.workloads.remove(id),
            Some(RevocationKind::Grant) => {
                if let Some(m) = self.grants.get_mut(r.upstream.as_str()) {
                    m.remove(id);
                }
            }
            Some(RevocationKind::Leaked) => self.leaked.retain(|_, i| &**i != id),
            _ => {}
        }
    }

    /// A copy with `revocation` added (or, if `restored`, removed).
    pub fn with_change(
        &self,
        revocation: Revocation,
        restored: bool,
    ) -> Result<Self, InvalidRevocation> {
        let mut next = self.clone();
        next.remove(&revocation.id);
        if !restored {
            next.add(Arc::new(revocation))?;
        }
        Ok(next)
    }

    pub fn len(&self) -> usize {
        self.active.len()
    }

    pub fn is_empty(&self) -> bool {
        self.active.is_empty()
    }

    /// The active revocation with this id.
    pub fn get(&self, id: &str) -> Option<&Revocation> {
        self.active.get(id).map(|r| &**r)
    }

    pub fn active(&self) -> impl Iterator<Item = &Revocation> {
        self.active.values().map(|r| &**r)
    }

    /// The revocation, if any, that forbids `workload` using `upstream`.
    pub fn check(&self, workload: &str, upstream: &str) -> Option<&Revocation> {
        if self.active.is_empty() {
            return None;
        }
        if self.upstreams.contains(upstream) {
            return self
                .active
                .values()
                .find(|r| r.kind() == RevocationKind::Upstream && r.upstream == upstream)
                .map(|r| &**r);
        }
        let id = self
            .workloads
            .find(workload)
            .or_else(|| self.grants.get(upstream)?.find(workload))?;
        self.active.get(id).map(|r| &**r)
    }

    pub fn credential_revoked(&self, credential_id: &str) -> bool {
        !self.credentials.is_empty() && self.credentials.contains(credential_id)
    }

    /// Whether any leaked value is registered (the scan is skipped if not).
    pub fn has_leaked(&self) -> bool {
        !self.leaked.is_empty()
    }

    /// The registration whose fingerprint this is.
    pub fn leaked(&self, fingerprint: u128) -> Option<&Arc<str>> {
        self.leaked.get(&fingerprint)
    }
}

/// Workload matchers with their revocation ids: exact SPIFFE IDs in a hash
/// map (one lookup), path prefixes in a list (there are few). Several
/// revocations may name the same workload; restoring one leaves the others.
#[derive(Debug, Default, Clone)]
struct Matchers {
    exact: HashMap<Arc<str>, Vec<Arc<str>>>,
    prefixes: Vec<(Arc<WorkloadMatcher>, Arc<str>)>,
}

impl Matchers {
    fn add(&mut self, m: WorkloadMatcher, id: Arc<str>) {
        match m {
            WorkloadMatcher::Exact(w) => self.exact.entry(w.into()).or_default().push(id),
            prefix @ WorkloadMatcher::Prefix(_) => self.prefixes.push((Arc::new(prefix), id)),
        }
    }

    fn remove(&mut self, id: &str) {
        self.exact.retain(|_, ids| {
            ids.retain(|i| &**i != id);
            !ids.is_empty()
        });
        self.prefixes.retain(|(_, i)| &**i != id);
    }

    fn find(&self, workload: &str) -> Option<&Arc<str>> {
        self.exact
            .get(workload)
            .and_then(|ids| ids.first())
            .or_else(|| {
                self.prefixes
                    .iter()
                    .find(|(m, _)| m.matches(workload))
                    .map(|(_, id)| id)
            })
    }
}

/// Shortest value accepted as a leaked secret: shorter ones would match
/// ordinary words and numbers.
pub const MIN_LEAKED_LEN: usize = 8;

/// The 16-byte key of leaked-value fingerprints.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct FingerprintKey(pub [u8; 16]);

impl std::fmt::Debug for FingerprintKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FingerprintKey(<redacted>)")
    }
}

impl FingerprintKey {
    pub fn from_slice(b: &[u8]) -> Option<Self> {
        b.try_into().ok().map(Self)
    }
}

/// Keyed fingerprint of a value: SipHash-2-4 with a 128-bit output, a PRF
/// under the key. The value cannot be recovered from it, and without the key
/// it cannot even be tested against guesses.
pub fn fingerprint(key: &FingerprintKey, value: &[u8]) -> u128 {
    let (k0, k1) = key.0.split_at(8);
    let k0 = u64::from_le_bytes(k0.try_into().unwrap_or([0; 8]));
    let k1 = u64::from_le_bytes(k1.try_into().unwrap_or([0; 8]));
    siphasher::sip128::SipHasher24::new_with_keys(k0, k1)
        .hash(value)
        .as_u128()
}

pub fn fingerprint_bytes(fp: u128) -> Vec<u8> {
    fp.to_le_bytes().to_vec()
}

pub fn fingerprint_from_bytes(b: &[u8]) -> Option<u128> {
    b.try_into().ok().map(u128::from_le_bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rev(id: &str, kind: &str, workload: &str, upstream: &str, cred: &str) -> Revocation {
        Revocation {
            id: id.into(),
            kind: RevocationKind::parse(kind).map_or(0, i32::from),
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
        ])
        .unwrap();
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

        let restored = set
            .with_change(rev("2", "grant", "spiffe://td/a", "pay", ""), true)
            .unwrap();
        assert!(restored.check("spiffe://td/a", "pay").is_none());
        assert_eq!(restored.len(), 3);
    }

    /// Found by the property test: two revocations of the same workload,
    /// one restored, left the workload unrevoked (the index kept one id).
    #[test]
    fn restoring_one_of_two_revocations_of_a_workload_keeps_the_other() {
        let w = "spiffe://td/ns/b/sa/one";
        let set = RevocationSet::new([
            rev("a", "workload", w, "", ""),
            rev("b", "workload", w, "", ""),
            rev("c", "grant", w, "pay", ""),
            rev("d", "grant", w, "pay", ""),
        ])
        .unwrap();
        let set = set
            .with_change(rev("b", "workload", w, "", ""), true)
            .unwrap();
        assert_eq!(set.check(w, "other").map(|r| r.id.as_str()), Some("a"));
        let set = set
            .with_change(rev("a", "workload", w, "", ""), true)
            .unwrap();
        assert!(set.check(w, "other").is_none());
        let set = set
            .with_change(rev("d", "grant", w, "pay", ""), true)
            .unwrap();
        assert_eq!(set.check(w, "pay").map(|r| r.id.as_str()), Some("c"));
    }

    /// The enforcement point never enforces less than it was sent: what it
    /// cannot parse fails the whole set, and a failed change leaves the
    /// previous set as it was.
    #[test]
    fn what_cannot_be_enforced_is_refused_not_dropped() {
        let bad = [
            rev("x", "quarantine", "spiffe://td/a", "", ""),
            rev("x", "workload", "not-a-spiffe-id", "", ""),
            rev("x", "grant", "spiffe://td/a*", "pay", ""),
            rev("x", "grant", "spiffe://td/a", "", ""),
            rev("x", "credential", "", "", ""),
            rev("x", "upstream", "", "", ""),
            Revocation {
                id: "x".into(),
                kind: RevocationKind::Leaked.into(),
                fingerprint: vec![1, 2, 3],
                ..Default::default()
            },
        ];
        let good = rev("1", "workload", "spiffe://td/a", "", "");
        for r in bad {
            let err = RevocationSet::new([good.clone(), r.clone()]).unwrap_err();
            assert_eq!(err.id, "x", "{r:?}");
            let set = RevocationSet::new([good.clone()]).unwrap();
            assert!(set.with_change(r, false).is_err());
            assert!(set.check("spiffe://td/a", "pay").is_some());
        }
    }
}

#[cfg(test)]
mod leaked_tests {
    use super::*;

    #[test]
    fn leaked_lookup() {
        let key = FingerprintKey([7; 16]);
        let fp = fingerprint(&key, b"sk_live_4f9a8b7c6d5e");
        let set = RevocationSet::new([Revocation {
            id: "rev-leak".into(),
            kind: RevocationKind::Leaked.into(),
            fingerprint: fingerprint_bytes(fp),
            ..Default::default()
        }])
        .unwrap();
        assert!(set.has_leaked());
        assert_eq!(set.leaked(fp).map(|s| &**s), Some("rev-leak"));
        assert!(
            set.leaked(fingerprint(&key, b"sk_live_4f9a8b7c6d5f"))
                .is_none()
        );
        assert_ne!(
            fingerprint(&FingerprintKey([8; 16]), b"sk_live_4f9a8b7c6d5e"),
            fp,
            "keyed"
        );
    }
}
