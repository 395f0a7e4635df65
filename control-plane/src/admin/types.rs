//! The admin API's contract: every request and response body, shared by the
//! server's handlers, `leashctl` and the generated OpenAPI document.
//!
//! Field names are the wire format; renaming one is a breaking change.

use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

pub use crate::anchor::SignedHead;
pub use crate::revocations::RevokeRequest;
pub use crate::store::{AuditEntry, AuditVerdict, ProbeResult, Sighting, Stripped};
pub use crate::usage::{Edge, Summary as UsageSummary, UnusedGrant, UsageRow, UseAfterRevocation};

/// A refused Security Event Token (RFC 8935 §2.4).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SsfErrorBody {
    /// invalid_request, invalid_key, invalid_issuer, invalid_audience or
    /// access_denied.
    pub err: String,
    pub description: String,
}

/// Every refusal: a stable code and a human message.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    /// Stable code: invalid, bad_body, not_found, conflict, revoked,
    /// unauthenticated, too_many_failures, forbidden, store_unavailable,
    /// audit_unavailable, audit_broken, no_master_key, not_revoked,
    /// probe_limited, internal.
    pub error: String,
    pub message: String,
}

/// A revocation (or a registered leaked value) as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Revocation {
    pub id: String,
    /// credential, grant, workload, upstream or leaked.
    pub kind: String,
    pub workload: String,
    pub upstream: String,
    pub credential_id: String,
    pub reason: String,
    pub revoked_by: String,
    pub revoked_at_ms: i64,
    /// The revocation log's sequence number of the commit.
    pub seq: u64,
    /// False once restored.
    pub active: bool,
    /// A short public handle of a leaked value's fingerprint (never the
    /// fingerprint itself); null for other kinds.
    pub fingerprint_id: Option<String>,
    pub restored: Option<Restored>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Restored {
    pub by: String,
    pub reason: String,
    pub at_ms: i64,
    pub seq: u64,
}

/// `GET /v1/revocations`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct RevocationList {
    pub revocations: Vec<Revocation>,
}

#[derive(Debug, Clone, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct RevocationListQuery {
    /// Include restored revocations.
    #[serde(default)]
    pub all: bool,
}

/// `GET /v1/revocations/{id}`: the revocation and where it has reached.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct RevocationStatus {
    #[serde(flatten)]
    pub revocation: Revocation,
    pub propagation: Propagation,
}

/// Which sidecars acknowledged a sequence number (durable record) and which
/// of the connected ones have not yet.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Propagation {
    pub seq: u64,
    /// Sidecars connected now.
    pub connected: usize,
    pub acknowledged: Vec<Acknowledgement>,
    pub pending: Vec<PendingSidecar>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Acknowledgement {
    pub session_id: String,
    pub spiffe_id: String,
    pub version: String,
    pub acked_at_ms: i64,
    /// From the commit to this acknowledgement.
    pub latency_ms: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct PendingSidecar {
    pub session_id: String,
    pub spiffe_id: String,
    pub version: String,
    pub last_ack_seq: u64,
    pub last_heard_ms: i64,
    /// The control-plane replica holding the session.
    #[serde(default)]
    pub replica: String,
}

/// A body that only says why: restores and secret-version revocations.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReasonRequest {
    pub reason: String,
}

/// `GET /v1/sidecars`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SidecarList {
    /// The newest revocation sequence number.
    pub seq: u64,
    pub sidecars: Vec<Sidecar>,
}

/// `GET /v1/replicas`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ReplicaList {
    pub replicas: Vec<ReplicaInfo>,
}

/// A control-plane replica on the store.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ReplicaInfo {
    pub id: String,
    pub version: String,
    pub sidecar_addr: String,
    pub admin_addr: String,
    pub started_at_ms: i64,
    /// When it last read the store.
    pub seen_at_ms: i64,
    pub stopped_at_ms: Option<i64>,
    /// Running and reading the store: its sessions count as connected.
    pub live: bool,
    /// The replica that answered.
    pub this: bool,
    /// Sidecar sessions it holds (live replicas only).
    pub sidecars: usize,
}

/// A connected sidecar session.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Sidecar {
    pub session_id: String,
    pub spiffe_id: String,
    pub version: String,
    pub connected_at_ms: i64,
    pub last_ack_seq: u64,
    pub last_ack_at_ms: i64,
    /// On another replica: when that replica last read the store.
    pub last_heard_ms: i64,
    /// The control-plane replica holding the session.
    #[serde(default)]
    pub replica: String,
}

/// `POST /v1/leaked`.
#[derive(Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LeakedRequest {
    /// The leaked value itself. Fingerprinted, then zeroized; never stored
    /// or logged.
    #[schema(value_type = String)]
    pub value: zeroize::Zeroizing<String>,
    pub reason: String,
    /// If the value is registered already: 200 with that registration
    /// (without it: 409).
    #[serde(default)]
    pub existing_ok: bool,
}

/// `GET /v1/leaked`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct LeakedList {
    pub leaked: Vec<Revocation>,
}

/// `GET /v1/leaked/{id}`: a registration with its forgotten consumers.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct LeakedStatus {
    #[serde(flatten)]
    pub revocation: Revocation,
    pub sightings: Vec<Sighting>,
    pub propagation: Propagation,
}

/// `GET /v1/stripped`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct StrippedReport {
    /// Workloads that sent their own credential to a managed upstream.
    pub stripped: Vec<Stripped>,
    /// Injected credentials an upstream sent back (removed before the
    /// workload saw them).
    pub echoed: Vec<Echoed>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Echoed {
    pub workload: String,
    pub upstream: String,
    pub header: String,
    pub count: i64,
    pub last_seen_ms: i64,
}

/// The usage endpoints' filter. Times are Unix milliseconds, RFC 3339, or
/// a duration meaning that long ago (15m, 24h, 30d).
#[derive(Debug, Clone, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct UsageQuery {
    /// One credential id.
    pub credential: Option<String>,
    /// One workload SPIFFE ID.
    pub workload: Option<String>,
    /// One upstream name.
    pub upstream: Option<String>,
    /// Used at or after this time (required by `/v1/usage/unused-grants`).
    pub since: Option<String>,
    /// Used before this time.
    pub until: Option<String>,
}

/// `GET /v1/usage/dependencies`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Dependencies {
    pub edges: Vec<Edge>,
}

/// `GET /v1/usage/unused-grants`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct UnusedGrants {
    pub since_ms: i64,
    pub policy_version: String,
    pub unused: Vec<UnusedGrant>,
}

/// `GET /v1/usage/after-revocation`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct AfterRevocation {
    /// Uses in `uses` that are violations.
    pub violations: usize,
    pub uses: Vec<UseAfterRevocation>,
}

/// `POST /v1/secrets/{upstream}`.
#[derive(Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SecretRequest {
    /// The secret value. Encrypted at once; never stored in the clear or
    /// logged.
    #[schema(value_type = String)]
    pub value: zeroize::Zeroizing<String>,
}

/// The answer to `POST /v1/secrets/{upstream}`: the version now current.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SecretStored {
    pub upstream: String,
    pub version: i64,
}

/// `GET /v1/secrets/{upstream}`: versions newest first, never their values.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SecretVersions {
    pub upstream: String,
    /// The version leased now; null when none is usable.
    pub current: Option<i64>,
    /// "ok", or why no secret is leased.
    pub state: String,
    pub versions: Vec<SecretVersion>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SecretVersion {
    pub version: i64,
    pub current: bool,
    pub created_at_ms: i64,
    pub created_by: String,
    pub revoked_at_ms: Option<i64>,
}

/// `GET /v1/secrets/{upstream}/versions/{version}/probes`: what the
/// provider answered when sent this (revoked) version, newest first.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ProbeResults {
    pub upstream: String,
    pub version: i64,
    pub probes: Vec<ProbeResult>,
}

#[derive(Debug, Clone, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct AuditQuery {
    /// Newest entries to return (1 to 10,000).
    #[serde(default = "default_audit_limit")]
    #[param(default = 100)]
    pub limit: i64,
}

fn default_audit_limit() -> i64 {
    100
}

/// `GET /v1/audit`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct AuditLog {
    pub entries: Vec<AuditEntry>,
}

/// A head saved earlier (`GET /v1/audit/head`): its entry must still be in
/// the chain with this hash.
#[derive(Debug, Clone, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct VerifyQuery {
    pub id: Option<i64>,
    pub hash: Option<String>,
}

/// The log filter in force (`RUST_LOG` syntax); null when logging was not
/// set up by this process.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct LogFilter {
    pub filter: Option<String>,
}

/// `PUT /v1/logging`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LoggingRequest {
    /// `RUST_LOG` syntax.
    pub filter: String,
}

/// `GET /v1/config_dump`: the effective configuration (without secrets)
/// and live state.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ConfigDump {
    /// The configuration as started (listeners, limits, paths, issuer…).
    #[serde(flatten)]
    #[schema(value_type = Object)]
    pub config: serde_json::Map<String, serde_json::Value>,
    pub policy_version: String,
    pub upstreams: usize,
    pub grants: usize,
    pub revocation_seq: u64,
    pub sessions: usize,
    pub log_filter: Option<String>,
}

/// `POST /v1/tokens`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TokenRequest {
    /// 1 to 64 bytes.
    pub name: String,
    /// viewer, responder or admin.
    pub role: String,
}

/// A new token; the secret is shown this once and stored only as a hash.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct TokenCreated {
    pub name: String,
    pub role: String,
    pub token: String,
}

pub use crate::missions::{Check, Finding};

/// A finding to add to a mission, with metadata kept beside it (where a
/// scanner found a secret, say; never a secret itself).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FindingEntry {
    pub finding: Finding,
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    #[schema(value_type = Object)]
    pub note: serde_json::Value,
}

/// `POST /v1/missions`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MissionRequest {
    /// What closing the mission achieves, 1 to 1024 bytes.
    pub objective: String,
    /// Who answers for it (a person or team), 1 to 256 bytes.
    pub owner: String,
    /// When it is due: RFC 3339, Unix milliseconds, or a duration from now
    /// (`72h`, `7d`). Past it, an open mission is overdue.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline: Option<String>,
    /// How long nothing may be seen (no use, no sightings, no credential of
    /// its own) before those criteria hold: `1s` to `90d`; default `24h`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<String>,
    #[serde(default)]
    pub findings: Vec<FindingEntry>,
}

/// `POST /v1/missions/{id}/findings`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FindingsRequest {
    pub findings: Vec<FindingEntry>,
}

/// A finding as its mission holds it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct FindingView {
    pub seq: i64,
    pub finding: Finding,
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    #[schema(value_type = Object)]
    pub note: serde_json::Value,
    pub added_at_ms: i64,
    pub added_by: String,
}

/// A change of a mission's state, and why.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct MissionChangeView {
    pub at_ms: i64,
    pub state: String,
    pub reason: String,
    pub actor: String,
}

/// A mission with its findings, each criterion as computed now, and its
/// history.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct MissionView {
    pub id: String,
    pub objective: String,
    pub owner: String,
    pub deadline_ms: Option<i64>,
    pub window_ms: i64,
    /// `open` or `closed`.
    pub state: String,
    /// Closed by a responder rather than by its criteria.
    pub closed_by_hand: bool,
    /// Open past its deadline.
    pub overdue: bool,
    pub created_at_ms: i64,
    pub created_by: String,
    pub changed_at_ms: i64,
    pub findings: Vec<FindingView>,
    pub criteria: Vec<Check>,
    /// Every criterion holds (and there is at least one).
    pub all_hold: bool,
    pub changes: Vec<MissionChangeView>,
}

/// One line of `GET /v1/missions`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct MissionSummary {
    pub id: String,
    pub objective: String,
    pub owner: String,
    pub state: String,
    pub overdue: bool,
    pub deadline_ms: Option<i64>,
    pub findings: usize,
    pub criteria: usize,
    pub criteria_holding: usize,
}

/// `GET /v1/missions`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct MissionList {
    pub missions: Vec<MissionSummary>,
}

/// `GET /v1/posture` and `POST /v1/policy/check`: the window of usage
/// looked at. Unix milliseconds, RFC 3339, or a duration ago; 30d when
/// not given.
#[derive(Debug, Clone, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct PostureQuery {
    /// Start of the window (default 30d).
    pub since: Option<String>,
}

/// `GET /v1/posture`: what the policy in force grants or allows beyond
/// what the window's usage needed, and the edit that would take it back.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Posture {
    pub since_ms: i64,
    /// The policy in force the findings are about.
    pub policy_version: String,
    /// (grant workload, upstream) pairs no matching workload used in the
    /// window.
    pub unused_grants: Vec<UnusedGrant>,
    /// Upstreams whose credential lifetime is far above how long any one
    /// credential was in use.
    pub oversized_ttls: Vec<OversizedTtl>,
    /// Workloads that sent their own credential (stripped by the sidecar)
    /// in the window.
    pub own_secrets: Vec<Stripped>,
    pub policy_diff: PolicyDiff,
}

/// An upstream whose `credential.ttl` is more than 4× the longest time
/// any one of its credentials was in use, and above 5 minutes.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct OversizedTtl {
    pub upstream: String,
    pub ttl_secs: u64,
    /// The longest use of one credential over every workload.
    pub longest_span_ms: i64,
    /// 2× the longest span, rounded up to 1m, 2m, 5m, 10m, 15m, 30m, 1h,
    /// 2h, 4h, 8h, 12h or 24h.
    pub suggested_ttl_secs: u64,
    /// Each workload's longest use of one credential.
    pub workloads: Vec<WorkloadSpan>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct WorkloadSpan {
    pub workload: String,
    pub longest_span_ms: i64,
    /// Distinct credentials it used in the window.
    pub credentials: i64,
    pub requests: i64,
}

/// The policy in force with the unused grants removed and the oversized
/// lifetimes lowered.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct PolicyDiff {
    /// False when there is nothing to remove or narrow.
    pub changed: bool,
    /// The proposed policy file.
    pub yaml: String,
    /// Unified diff from the policy in force (as Leash writes it: the same
    /// form as `yaml`, without the file's comments) to `yaml`; empty when
    /// unchanged.
    pub diff: String,
}

/// `POST /v1/policy/check`: the window of usage a proposed policy is
/// checked against (default 30d).
#[derive(Debug, Clone, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct PolicyCheckQuery {
    /// Start of the window: Unix ms, RFC 3339 or a duration ago (default 30d).
    pub against_usage: Option<String>,
}

/// The answer to `POST /v1/policy/check`: the proposal is valid; these
/// live consumers would lose access if it were applied.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct PolicyCheck {
    pub since_ms: i64,
    /// The policy in force now.
    pub policy_version: String,
    pub upstreams: usize,
    pub grants: usize,
    pub broken: Vec<BrokenConsumer>,
}

/// A (workload, upstream) pair with requests in the window that the
/// proposed policy would refuse.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, ToSchema)]
pub struct BrokenConsumer {
    pub workload: String,
    pub upstream: String,
    /// upstream_removed, or not_granted.
    pub reason: String,
    pub requests: i64,
    pub last_used_ms: i64,
}

pub use crate::jwt::SignedEvidence;
pub use crate::store::ChainedEntry;

/// A revocation a mission rests on, with every sidecar's acknowledgement.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct RevocationEvidence {
    pub revocation: Revocation,
    pub propagation: Propagation,
}

/// The state of the audit chain when the evidence was taken.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ChainHead {
    /// The chain verified from its first entry to its head.
    pub verified: bool,
    pub head_id: Option<i64>,
    pub head: Option<String>,
    /// The head signed with the audit anchor key (with a master key).
    pub signed: Option<SignedHead>,
}

/// What `GET /v1/missions/{id}/evidence` signs: everything the mission's
/// state was judged from.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Evidence {
    /// `leash-evidence/1`.
    pub format: String,
    pub generated_at_ms: i64,
    /// The control plane that signed it (its JWT issuer).
    pub issuer: String,
    /// The mission was still open when this was taken: proof of what is
    /// done so far, not of closure.
    pub open: bool,
    /// Findings, every criterion with the data it was computed from (uses
    /// before and after each revocation with the last use per consumer,
    /// sightings, stripped credentials, probe results), and every change.
    pub mission: MissionView,
    pub revocations: Vec<RevocationEvidence>,
    /// Every audit entry naming the mission or its revocations, with its
    /// hash in the chain.
    pub audit: Vec<ChainedEntry>,
    pub audit_chain: ChainHead,
}
