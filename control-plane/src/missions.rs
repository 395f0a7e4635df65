//! Remediation missions: findings grouped under an objective, owner and
//! deadline, with acceptance criteria computed from what the sidecars
//! report — never ticked by hand. A mission closes itself when every
//! criterion of every finding holds, and reopens (audited, with the
//! reason) when one stops holding: a new sighting, a use after the
//! revocation, a grant back in the policy.
//!
//! Each finding implies its criteria:
//!
//! | finding | criteria |
//! |---|---|
//! | `leaked` (a registered leaked value) | `acknowledged`, `no-sightings` |
//! | `revocation` | `acknowledged`, `no-use` |
//! | `secret-version` | `rotated`, `acknowledged`, `no-use`, and `deactivated-at-source` when its upstream declares a probe |
//! | `stripped` (a workload sending its own credential) | `consumers-migrated` |
//! | `grant` | `grants-cleaned` |
//! | `sighting` (a forgotten consumer of a leaked value) | `no-sightings` by that workload |

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

use leash_api::policy::WorkloadMatcher;
use leash_api::revocation::RevocationKind;
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::ToSchema;

use crate::state::ControlPlaneState;
use crate::store::{AuditEntry, MissionRow, Store, StoreError, StoredRevocation, now_ms};

/// The no-use and no-sightings windows a mission may ask for.
pub const MIN_WINDOW_MS: i64 = 1_000;
pub const MAX_WINDOW_MS: i64 = 90 * 24 * 3600 * 1000;
/// Findings one mission may hold.
pub const MAX_FINDINGS: usize = 1_000;

/// What a finding names: something Leash already knows about.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Finding {
    /// A registered leaked value, by its revocation id.
    Leaked { revocation_id: String },
    /// A revocation (credential, grant, workload or upstream).
    Revocation { revocation_id: String },
    /// A version of a brokered secret to retire.
    SecretVersion { upstream: String, version: i64 },
    /// A workload still sending its own credential to an upstream.
    Stripped { workload: String, upstream: String },
    /// A grant (workload pattern × upstream) that should go from the policy.
    Grant { workload: String, upstream: String },
    /// A workload seen sending a leaked value (a forgotten consumer).
    Sighting {
        revocation_id: String,
        workload: String,
    },
}

/// One criterion of one finding, with the data it was computed from.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Check {
    /// The finding's number in its mission.
    pub finding: i64,
    /// `acknowledged`, `no-use`, `no-sightings`, `consumers-migrated`,
    /// `rotated`, `deactivated-at-source` or `grants-cleaned`.
    pub criterion: String,
    pub holds: bool,
    /// Why it holds or not, in words.
    pub detail: String,
    /// What it was computed from.
    #[schema(value_type = Object)]
    pub inputs: serde_json::Value,
}

#[derive(Debug, thiserror::Error)]
pub enum MissionError {
    #[error("{0}")]
    Invalid(String),
    #[error("no mission {0}")]
    NotFound(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Mission counters for `/metrics`.
#[derive(Default)]
pub struct MissionMetrics {
    pub open: AtomicU64,
    pub closed: AtomicU64,
    pub overdue: AtomicU64,
    /// Changes of state, by the criteria or by hand.
    pub closed_total: AtomicU64,
    pub reopened_total: AtomicU64,
}

/// Checks that a finding names something that exists (or existed).
pub async fn validate(cp: &ControlPlaneState, f: &Finding) -> Result<(), MissionError> {
    let invalid = |m: String| Err(MissionError::Invalid(m));
    let revocation = |id: &str| {
        let id = id.to_owned();
        async move { cp.store.revocation(&id).await }
    };
    match f {
        Finding::Leaked { revocation_id } | Finding::Sighting { revocation_id, .. } => {
            match revocation(revocation_id).await? {
                Some(r) if r.revocation.kind() == RevocationKind::Leaked => {}
                Some(_) => return invalid(format!("{revocation_id} is not a leaked value")),
                None => return invalid(format!("no leaked value {revocation_id}")),
            }
            if let Finding::Sighting { workload, .. } = f {
                WorkloadMatcher::parse(workload).map_err(MissionError::Invalid)?;
            }
        }
        Finding::Revocation { revocation_id } => {
            if revocation(revocation_id).await?.is_none() {
                return invalid(format!("no revocation {revocation_id}"));
            }
        }
        Finding::SecretVersion { upstream, version } => {
            let versions = cp.store.secret_versions(upstream).await?;
            if !versions.iter().any(|v| v.version == *version) {
                return invalid(format!("no version {version} of {upstream:?}'s secret"));
            }
        }
        Finding::Stripped { workload, upstream } | Finding::Grant { workload, upstream } => {
            WorkloadMatcher::parse(workload).map_err(MissionError::Invalid)?;
            let known = cp.policy.load().policy.upstream(upstream).is_some()
                || cp
                    .store
                    .stripped(None)
                    .await?
                    .iter()
                    .any(|s| s.upstream == *upstream);
            if !known {
                return invalid(format!("no upstream {upstream:?} in policy or reports"));
            }
        }
    }
    Ok(())
}

/// Evaluates every criterion of every finding of `m`, now.
pub async fn evaluate(cp: &ControlPlaneState, m: &MissionRow) -> Result<Vec<Check>, StoreError> {
    let now = now_ms();
    let mut checks = Vec::new();
    for row in cp.store.findings(&m.id).await? {
        let Ok(finding) = serde_json::from_str::<Finding>(&row.finding) else {
            return Err(StoreError::Corrupt(format!(
                "mission_findings.finding {} of {}",
                row.seq, m.id
            )));
        };
        let mut push =
            |criterion: &str, (holds, detail, inputs): (bool, String, serde_json::Value)| {
                checks.push(Check {
                    finding: row.seq,
                    criterion: criterion.to_owned(),
                    holds,
                    detail,
                    inputs,
                });
            };
        match &finding {
            Finding::Leaked { revocation_id } => {
                let r = cp.store.revocation(revocation_id).await?;
                push("acknowledged", acknowledged(cp, r.as_ref()).await?);
                push(
                    "no-sightings",
                    no_sightings(&cp.store, revocation_id, None, r.as_ref(), m.window_ms, now)
                        .await?,
                );
            }
            Finding::Revocation { revocation_id } => {
                let r = cp.store.revocation(revocation_id).await?;
                push("acknowledged", acknowledged(cp, r.as_ref()).await?);
                if r.as_ref()
                    .is_some_and(|r| r.revocation.kind() == RevocationKind::Leaked)
                {
                    push(
                        "no-sightings",
                        no_sightings(&cp.store, revocation_id, None, r.as_ref(), m.window_ms, now)
                            .await?,
                    );
                } else {
                    push(
                        "no-use",
                        no_use(&cp.store, r.as_ref(), m.window_ms, now).await?,
                    );
                }
            }
            Finding::SecretVersion { upstream, version } => {
                push("rotated", rotated(&cp.store, upstream, *version).await?);
                let lease = crate::secrets::lease_id(upstream, *version);
                let r = cp.store.revocations(true).await?.into_iter().find(|r| {
                    r.revocation.kind() == RevocationKind::Credential
                        && r.revocation.credential_id == lease
                });
                push("acknowledged", acknowledged(cp, r.as_ref()).await?);
                push(
                    "no-use",
                    no_use(&cp.store, r.as_ref(), m.window_ms, now).await?,
                );
                let probed = cp
                    .policy
                    .load()
                    .policy
                    .upstream(upstream)
                    .is_some_and(|u| u.deactivation_probe.is_some());
                if probed {
                    push(
                        "deactivated-at-source",
                        deactivated(&cp.store, upstream, *version).await?,
                    );
                }
            }
            Finding::Stripped { workload, upstream } => {
                push(
                    "consumers-migrated",
                    migrated(&cp.store, workload, upstream, m.window_ms, now).await?,
                );
            }
            Finding::Grant { workload, upstream } => {
                push("grants-cleaned", grants_cleaned(cp, workload, upstream));
            }
            Finding::Sighting {
                revocation_id,
                workload,
            } => {
                let r = cp.store.revocation(revocation_id).await?;
                push(
                    "no-sightings",
                    no_sightings(
                        &cp.store,
                        revocation_id,
                        Some(workload),
                        r.as_ref(),
                        m.window_ms,
                        now,
                    )
                    .await?,
                );
            }
        }
    }
    Ok(checks)
}

type Outcome = (bool, String, serde_json::Value);

/// Every sidecar connected now has acknowledged the revocation. (A sidecar
/// that is not connected refuses to inject once its `--max-staleness`
/// passes, so it cannot go on using what was revoked.)
async fn acknowledged(
    cp: &ControlPlaneState,
    r: Option<&StoredRevocation>,
) -> Result<Outcome, StoreError> {
    let Some(r) = r else {
        return Ok((false, "not revoked yet".into(), json!(null)));
    };
    if let Some(restore) = &r.restored {
        return Ok((
            false,
            format!("{} was restored at {}", r.revocation.id, restore.at_ms),
            json!({"revocation_id": r.revocation.id, "restored_at_ms": restore.at_ms}),
        ));
    }
    let p = crate::sessions::propagation(cp, r.revoke_seq).await?;
    let holds = p.pending.is_empty();
    let detail = if holds {
        format!(
            "{} acknowledged by {} sidecar(s); every connected sidecar has it",
            r.revocation.id,
            p.acknowledged.len()
        )
    } else {
        format!(
            "{} not yet acknowledged by {} of {} connected sidecar(s)",
            r.revocation.id,
            p.pending.len(),
            p.connected
        )
    };
    let inputs = json!({
        "revocation_id": r.revocation.id,
        "kind": r.revocation.kind().as_str(),
        "seq": r.revoke_seq,
        "revoked_at_ms": r.revocation.revoked_at_ms,
        "propagation": p,
    });
    Ok((holds, detail, inputs))
}

/// No use of what the revocation covers since its sidecars acknowledged it,
/// for the whole window since the revocation.
async fn no_use(
    store: &Store,
    r: Option<&StoredRevocation>,
    window_ms: i64,
    now: i64,
) -> Result<Outcome, StoreError> {
    let Some(r) = r else {
        return Ok((false, "not revoked yet".into(), json!(null)));
    };
    let uses = crate::usage::uses_after(store, r).await?;
    let violations = uses.iter().filter(|u| u.violation).count();
    let elapsed = now - r.revocation.revoked_at_ms;
    let holds = violations == 0 && elapsed >= window_ms;
    let detail = if violations > 0 {
        format!(
            "{violations} use(s) after the acknowledgement of {}",
            r.revocation.id
        )
    } else if elapsed < window_ms {
        format!(
            "no use since {}, for {} of the {} ms window",
            r.revocation.id, elapsed, window_ms
        )
    } else {
        format!("no use since {} for the whole window", r.revocation.id)
    };
    // The last use per consumer, before or after.
    let mut last: BTreeMap<String, i64> = BTreeMap::new();
    for u in &uses {
        let e = last.entry(u.workload.clone()).or_insert(u.last_seen_ms);
        *e = (*e).max(u.last_seen_ms);
    }
    let inputs = json!({
        "revocation_id": r.revocation.id,
        "revoked_at_ms": r.revocation.revoked_at_ms,
        "window_ms": window_ms,
        "uses_after_revocation": uses,
        "last_use_by_workload": last,
    });
    Ok((holds, detail, inputs))
}

/// The leaked value not seen (by `workload`, or anywhere) for the window.
async fn no_sightings(
    store: &Store,
    revocation_id: &str,
    workload: Option<&str>,
    r: Option<&StoredRevocation>,
    window_ms: i64,
    now: i64,
) -> Result<Outcome, StoreError> {
    let sightings: Vec<_> = store
        .sightings(revocation_id)
        .await?
        .into_iter()
        .filter(|s| workload.is_none_or(|w| s.workload == w))
        .collect();
    let registered = r.map_or(now, |r| r.revocation.revoked_at_ms);
    let last = sightings.iter().map(|s| s.last_seen_ms).max();
    let quiet_since = last.unwrap_or(registered).max(registered);
    let holds = now - quiet_since >= window_ms;
    let whom = workload.map_or_else(|| "anywhere".to_owned(), |w| format!("by {w}"));
    let detail = match last {
        Some(at) if !holds => format!("{revocation_id} seen {whom} {} ms ago", now - at),
        _ if !holds => format!(
            "{revocation_id} not seen {whom} for {} of the {window_ms} ms window",
            now - quiet_since
        ),
        _ => format!("{revocation_id} not seen {whom} for the whole window"),
    };
    let inputs = json!({
        "revocation_id": revocation_id,
        "workload": workload,
        "window_ms": window_ms,
        "last_seen_ms": last,
        "sightings": sightings,
    });
    Ok((holds, detail, inputs))
}

/// The workload has not sent its own credential to the upstream for the window.
async fn migrated(
    store: &Store,
    workload: &str,
    upstream: &str,
    window_ms: i64,
    now: i64,
) -> Result<Outcome, StoreError> {
    let reports: Vec<_> = store
        .stripped(None)
        .await?
        .into_iter()
        .filter(|s| s.workload == workload && s.upstream == upstream)
        .map(|s| {
            json!({"count": s.count, "first_seen_ms": s.first_seen_ms, "last_seen_ms": s.last_seen_ms})
        })
        .collect();
    let last = reports
        .iter()
        .filter_map(|r| r["last_seen_ms"].as_i64())
        .max();
    let holds = last.is_none_or(|at| now - at >= window_ms);
    let detail = match last {
        Some(at) if !holds => format!(
            "{workload} sent its own credential to {upstream} {} ms ago",
            now - at
        ),
        Some(_) => {
            format!("{workload} has not sent its own credential to {upstream} for the window")
        }
        None => format!("{workload} never sent its own credential to {upstream}"),
    };
    let inputs = json!({"workload": workload, "upstream": upstream, "window_ms": window_ms, "stripped": reports});
    Ok((holds, detail, inputs))
}

/// A newer version is current and this one is revoked.
async fn rotated(store: &Store, upstream: &str, version: i64) -> Result<Outcome, StoreError> {
    let versions = store.secret_versions(upstream).await?;
    let this = versions.iter().find(|v| v.version == version);
    let newer = versions
        .iter()
        .filter(|v| v.version > version && v.revoked_at_ms.is_none())
        .map(|v| v.version)
        .max();
    let revoked = this.and_then(|v| v.revoked_at_ms);
    let holds = revoked.is_some() && newer.is_some();
    let detail = match (revoked, newer) {
        (Some(_), Some(n)) => format!("version {version} revoked; version {n} is current"),
        (None, _) => format!("version {version} is not revoked"),
        (Some(_), None) => format!("version {version} revoked, but no newer version is current"),
    };
    let inputs = json!({
        "upstream": upstream,
        "version": version,
        "versions": versions.iter().map(|v| json!({
            "version": v.version,
            "created_at_ms": v.created_at_ms,
            "revoked_at_ms": v.revoked_at_ms,
        })).collect::<Vec<_>>(),
    });
    Ok((holds, detail, inputs))
}

/// The provider itself refuses the old value: the newest deactivation
/// probe of the version (sent by the control plane once it was revoked)
/// got a status the policy expects.
async fn deactivated(store: &Store, upstream: &str, version: i64) -> Result<Outcome, StoreError> {
    let results = store.probe_results(upstream, version).await?;
    let newest = results.first();
    let holds = newest.is_some_and(|p| p.outcome == "dead");
    let detail = match newest {
        None => format!("version {version} not probed yet (it is probed once revoked)"),
        Some(p) => format!(
            "the provider answered version {version} with {} ({}): {}",
            p.status
                .map_or_else(|| "nothing".to_owned(), |s| s.to_string()),
            p.outcome,
            p.detail
        ),
    };
    let inputs = json!({"upstream": upstream, "version": version, "probes": results});
    Ok((holds, detail, inputs))
}

/// No grant of the policy in force gives `workload` (the pattern as named,
/// or an exact ID covered by a broader grant) the upstream.
fn grants_cleaned(cp: &ControlPlaneState, workload: &str, upstream: &str) -> Outcome {
    let policy = cp.policy.load();
    let named: Vec<String> = policy
        .policy
        .policy
        .grants
        .iter()
        .filter(|g| g.workload == workload && g.upstreams.iter().any(|u| u == upstream))
        .map(|g| g.workload.clone())
        .collect();
    let covered = match WorkloadMatcher::parse(workload) {
        Ok(WorkloadMatcher::Exact(id)) => policy.policy.is_granted(&id, upstream),
        _ => false,
    };
    let holds = named.is_empty() && !covered;
    let detail = if holds {
        format!(
            "policy {} grants {workload} nothing of {upstream}",
            policy.version
        )
    } else {
        format!(
            "policy {} still grants {workload} {upstream}",
            policy.version
        )
    };
    let inputs = json!({
        "workload": workload,
        "upstream": upstream,
        "policy_version": policy.version,
        "grants_naming_it": named,
        "granted_by_another_grant": covered,
    });
    (holds, detail, inputs)
}

/// One pass over every mission: a mission whose criteria all hold closes;
/// one closed by its criteria reopens when one stops holding. Both are
/// audited and counted. Returns the missions that changed.
pub async fn sweep(cp: &ControlPlaneState, metrics: &MissionMetrics) -> Result<usize, StoreError> {
    let now = now_ms();
    let (mut open, mut closed, mut overdue, mut changed) = (0, 0, 0, 0);
    for m in cp.store.missions().await? {
        let is_open = m.state == "open";
        if is_open && m.deadline_ms.is_some_and(|d| d < now) {
            overdue += 1;
        }
        // A mission closed by hand stays closed until reopened by hand.
        if m.closed_by_hand {
            closed += 1;
            continue;
        }
        let checks = evaluate(cp, &m).await?;
        let all_hold = !checks.is_empty() && checks.iter().all(|c| c.holds);
        if is_open && all_hold {
            let reason = format!("all {} criteria hold", checks.len());
            change(cp, &m.id, "closed", false, &reason, SYSTEM_ACTOR).await?;
            metrics.closed_total.fetch_add(1, Ordering::Relaxed);
            closed += 1;
            changed += 1;
        } else if !is_open && !all_hold {
            let failing: Vec<String> = checks
                .iter()
                .filter(|c| !c.holds)
                .map(|c| format!("{} (finding {}): {}", c.criterion, c.finding, c.detail))
                .collect();
            let reason = format!("reopened: {}", failing.join("; "));
            change(cp, &m.id, "open", false, &reason, SYSTEM_ACTOR).await?;
            metrics.reopened_total.fetch_add(1, Ordering::Relaxed);
            open += 1;
            changed += 1;
        } else if is_open {
            open += 1;
        } else {
            closed += 1;
        }
    }
    metrics.open.store(open, Ordering::Relaxed);
    metrics.closed.store(closed, Ordering::Relaxed);
    metrics.overdue.store(overdue, Ordering::Relaxed);
    Ok(changed)
}

/// Who changes a mission when its criteria do.
pub const SYSTEM_ACTOR: &str = "leash:missions";

/// Records a change of state and audits it.
pub async fn change(
    cp: &ControlPlaneState,
    id: &str,
    state: &str,
    by_hand: bool,
    reason: &str,
    actor: &str,
) -> Result<(), StoreError> {
    let at_ms = now_ms();
    cp.store
        .change_mission(id, state, by_hand, reason, actor, at_ms)
        .await?;
    tracing::info!(mission = %id, state, by_hand, reason, "mission state changed");
    if actor == SYSTEM_ACTOR {
        // Changes made by hand are audited by the admin API like any call.
        cp.store
            .append_audit(&AuditEntry {
                at_ms,
                actor: actor.to_owned(),
                role: "system".into(),
                method: "-".into(),
                path: format!("/v1/missions/{id}"),
                action: format!("mission.{state}"),
                status: 200,
                detail: reason.chars().take(1024).collect(),
            })
            .await?;
    }
    Ok(())
}

impl std::str::FromStr for Finding {
    type Err = String;

    /// `leaked:ID`, `revocation:ID`, `secret-version:UPSTREAM/VERSION`,
    /// `stripped:WORKLOAD@UPSTREAM`, `grant:WORKLOAD@UPSTREAM`,
    /// `sighting:ID@WORKLOAD` (the command line's way to name a finding).
    fn from_str(s: &str) -> Result<Self, String> {
        let usage = "a finding is leaked:ID, revocation:ID, secret-version:UPSTREAM/VERSION, \
                     stripped:WORKLOAD@UPSTREAM, grant:WORKLOAD@UPSTREAM or sighting:ID@WORKLOAD";
        let (kind, what) = s.split_once(':').ok_or_else(|| format!("{s:?}: {usage}"))?;
        let pair = |sep: char| {
            what.rsplit_once(sep)
                .filter(|(a, b)| !a.is_empty() && !b.is_empty())
                .map(|(a, b)| (a.to_owned(), b.to_owned()))
                .ok_or_else(|| format!("{s:?}: {usage}"))
        };
        if what.is_empty() {
            return Err(format!("{s:?}: {usage}"));
        }
        Ok(match kind {
            "leaked" => Self::Leaked {
                revocation_id: what.to_owned(),
            },
            "revocation" => Self::Revocation {
                revocation_id: what.to_owned(),
            },
            "secret-version" => {
                let (upstream, version) = pair('/')?;
                let version = version
                    .trim_start_matches('v')
                    .parse()
                    .map_err(|_| format!("{s:?}: the version is a number"))?;
                Self::SecretVersion { upstream, version }
            }
            "stripped" => {
                let (workload, upstream) = pair('@')?;
                Self::Stripped { workload, upstream }
            }
            "grant" => {
                let (workload, upstream) = pair('@')?;
                Self::Grant { workload, upstream }
            }
            "sighting" => {
                let (revocation_id, workload) = what
                    .split_once('@')
                    .filter(|(a, b)| !a.is_empty() && !b.is_empty())
                    .ok_or_else(|| format!("{s:?}: {usage}"))?;
                Self::Sighting {
                    revocation_id: revocation_id.to_owned(),
                    workload: workload.to_owned(),
                }
            }
            _ => return Err(format!("{s:?}: unknown kind {kind:?}; {usage}")),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn findings_parse_from_the_command_line() {
        assert_eq!(
            "secret-version:vault-api/v2".parse::<Finding>(),
            Ok(Finding::SecretVersion {
                upstream: "vault-api".into(),
                version: 2
            })
        );
        assert_eq!(
            "sighting:rev-1@spiffe://td/ns/app".parse::<Finding>(),
            Ok(Finding::Sighting {
                revocation_id: "rev-1".into(),
                workload: "spiffe://td/ns/app".into()
            })
        );
        assert_eq!(
            "grant:spiffe://td/ns/*@payments".parse::<Finding>(),
            Ok(Finding::Grant {
                workload: "spiffe://td/ns/*".into(),
                upstream: "payments".into()
            })
        );
        for bad in [
            "leaked:",
            "nope:x",
            "grant:x",
            "secret-version:a/b",
            "plain",
        ] {
            assert!(bad.parse::<Finding>().is_err(), "{bad}");
        }
    }
}
