//! The policy file: which upstreams Leash manages, how credentials are made
//! and injected for each, and which workloads (by SPIFFE ID) may use them.
//!
//! Parsing is strict (`deny_unknown_fields`), and validation reports every
//! problem with the field path, so an operator can fix a file in one pass.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use spiffe::SpiffeId;

/// Credential lifetime bounds. Below a second refresh-ahead cannot work;
/// above a day the credential is no longer "short-lived".
pub const MIN_TTL: Duration = Duration::from_secs(1);
pub const MAX_TTL: Duration = Duration::from_secs(24 * 3600);

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// Schema version of the file; only `1` exists.
    pub version: u32,
    #[serde(default)]
    pub upstreams: Vec<Upstream>,
    #[serde(default)]
    pub grants: Vec<Grant>,
    /// Security events received (OpenID Shared Signals): which
    /// transmitters are trusted and what their subjects mean.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssf: Option<SsfSpec>,
}

/// `ssf:` — the control plane as an SSF receiver (RFC 8935 push).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SsfSpec {
    /// This receiver's audience: every SET must name it in `aud`.
    #[serde(default)]
    pub audience: String,
    #[serde(default)]
    pub transmitters: Vec<SsfTransmitter>,
    /// Subjects (RFC 9493) and what revoking them means. A `uri` subject
    /// that is a SPIFFE ID needs no entry: it is that workload.
    #[serde(default)]
    pub subjects: Vec<SsfSubject>,
    /// Where this control plane, as a transmitter, pushes its own events.
    #[serde(default)]
    pub receivers: Vec<SsfReceiverSpec>,
}

/// A receiver of the events Leash transmits: a stream whose id is `name`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SsfReceiverSpec {
    pub name: String,
    /// `push` (RFC 8935, the default: Leash POSTs each SET to
    /// `endpoint_url`) or `poll` (RFC 8936: the receiver polls
    /// `/v1/ssf/poll/<name>` with a viewer token).
    #[serde(default)]
    pub delivery: SsfDelivery,
    /// Its push endpoint (push delivery only).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub endpoint_url: String,
    /// Poll delivery only: a file holding the bearer token the receiver
    /// polls with (relative to the policy file; read at every poll).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub poll_token_file: Option<PathBuf>,
    /// Push delivery: CA certificates (PEM) trusted for `endpoint_url`
    /// besides the system's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// The `aud` of the SETs it gets.
    pub audience: String,
    /// Which events it wants (`credential-change`, `session-revoked`,
    /// `credential-compromise`); all when left out.
    #[serde(default)]
    pub events: Vec<String>,
}

/// How a stream's SETs reach its receiver.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SsfDelivery {
    /// RFC 8935: the transmitter POSTs each SET.
    #[default]
    Push,
    /// RFC 8936: the receiver asks for them.
    Poll,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SsfTransmitter {
    pub name: String,
    /// The `iss` of its SETs.
    pub issuer: String,
    /// Where its signing keys are (a JWKS).
    pub jwks_url: String,
    /// Poll this transmitter's RFC 8936 endpoint for its SETs (as well as
    /// taking what it pushes to `/ssf/events`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub poll_url: Option<String>,
    /// A file holding the bearer token each poll presents (read at every
    /// poll, so it can be replaced); relative to the policy file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub poll_token_file: Option<PathBuf>,
    /// CA certificates (PEM) trusted for `jwks_url` and `poll_url` besides
    /// the system's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SsfSubject {
    /// `iss_sub`, `opaque` or `uri`.
    pub format: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sub: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uri: Option<String>,
    /// What an event about this subject revokes: `workload`, `workload` +
    /// `upstream` (a grant), or `credential_id`.
    pub revoke: SsfTarget,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SsfTarget {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub workload: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub upstream: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub credential_id: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Upstream {
    /// Stable name, used in grants, credentials (`aud`) and reports.
    pub name: String,
    /// Host names a workload calls to reach this upstream; `*.example.com`
    /// matches any single or multi-label subdomain.
    pub hosts: Vec<String>,
    /// `http://host:port` or `https://host[:port]` the sidecar connects to.
    pub target: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsSpec>,
    /// How credentials are made for this upstream; a Leash JWT
    /// (`kind: jwt`, `ttl: 5m`) when left out.
    #[serde(default)]
    pub credential: CredentialSpec,
    #[serde(default)]
    pub inject: InjectSpec,
    /// Scan this many bytes at the start of request bodies for leaked values
    /// (0, the default: headers and query only). At most 65536.
    #[serde(default)]
    pub scan_body_bytes: u32,
    /// `static` only: how the control plane checks, after a secret version
    /// is revoked, that the provider itself refuses the old value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deactivation_probe: Option<DeactivationProbe>,
    /// `CONNECT` to this upstream's hosts (a client calling `https://`
    /// with `HTTPS_PROXY`) is answered by the sidecar itself: it terminates
    /// the workload's TLS with a certificate from its local CA and handles
    /// every request inside exactly as a plain `http://` one.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub intercept: bool,
    /// `CONNECT` to this upstream's hosts is tunnelled as bytes to
    /// `target`, with no credential and nothing inspected (for clients that
    /// pin the upstream's certificate); the grant, revocations and
    /// staleness still apply. Plain `http://` requests to it are refused.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub passthrough: bool,
}

/// One request sent to the upstream's `target` with a revoked secret
/// version, injected as `inject` says; an answer in `expect` proves the
/// provider refuses it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeactivationProbe {
    /// An HTTP method, e.g. `GET`.
    pub method: String,
    /// Origin-form path (and query), starting with `/`.
    pub path: String,
    /// Statuses that mean "refused", e.g. `[401, 403]`.
    pub expect: Vec<u16>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSpec {
    /// PEM file with extra trust anchors for the upstream (relative paths are
    /// resolved against the policy file's directory).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Trust only `ca_file`, not the system roots.
    #[serde(default)]
    pub ca_only: bool,
    /// Name to send as SNI and to verify, instead of the target's host.
    #[serde(default)]
    pub server_name: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CredentialKind {
    Jwt,
    Static,
    Oauth2ClientCredentials,
    /// An OAuth2 access token obtained with no client secret at all: the
    /// control plane authenticates with a JWT it signs for the workload
    /// (RFC 7523 `private_key_jwt`; `client_id` defaults to the workload's
    /// SPIFFE ID, per the OAuth SPIFFE client-authentication draft).
    Oauth2JwtBearer,
    /// An OAuth2 access token for the workload from RFC 8693 token
    /// exchange: a JWT the control plane issues for the workload (its
    /// SPIFFE ID as `sub`, a tracked `jti`) is the subject token; the client
    /// authenticates with `private_key_jwt`.
    Oauth2TokenExchange,
    /// A brokered AWS access key (`ACCESS_KEY_ID:SECRET_ACCESS_KEY`, or
    /// with `:SESSION_TOKEN`), with which the sidecar signs each request
    /// (SigV4; `inject: {type: aws-sigv4, ...}`).
    AwsSigv4,
}

impl CredentialKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Jwt => "jwt",
            Self::Static => "static",
            Self::Oauth2ClientCredentials => "oauth2-client-credentials",
            Self::AwsSigv4 => "aws-sigv4",
            Self::Oauth2JwtBearer => "oauth2-jwt-bearer",
            Self::Oauth2TokenExchange => "oauth2-token-exchange",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CredentialSpec {
    pub kind: CredentialKind,
    /// Lifetime of each issued credential, e.g. `5m`.
    #[serde(default = "default_ttl", with = "humantime_serde_compat")]
    pub ttl: Duration,
    /// `aud` of issued JWTs; defaults to the upstream's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audience: Option<String>,
    /// `oauth2-client-credentials`: the token endpoint (the client secret is
    /// the upstream's brokered secret: `leashctl secret put <upstream>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub scopes: Vec<String>,
    /// `aws-sigv4`: instead of a brokered key, temporary credentials for
    /// this role from STS `AssumeRoleWithWebIdentity`, presenting a JWT the
    /// control plane issues for the workload (`sub` = its SPIFFE ID, `aud` =
    /// `audience`, default `sts.amazonaws.com`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role_arn: Option<String>,
    /// The STS endpoint for `role_arn` (default `https://sts.amazonaws.com/`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sts_url: Option<String>,
    /// `oauth2-token-exchange`: the RFC 8693 `resource` asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource: Option<String>,
}

impl CredentialKind {
    /// The kinds whose token comes from an OAuth2 token endpoint.
    pub fn is_oauth2(self) -> bool {
        matches!(
            self,
            Self::Oauth2ClientCredentials | Self::Oauth2JwtBearer | Self::Oauth2TokenExchange
        )
    }
}

fn default_ttl() -> Duration {
    Duration::from_secs(300)
}

impl Default for CredentialSpec {
    /// A Leash JWT of five minutes.
    fn default() -> Self {
        Self {
            kind: CredentialKind::Jwt,
            ttl: default_ttl(),
            audience: None,
            token_url: None,
            client_id: None,
            scopes: Vec::new(),
            role_arn: None,
            sts_url: None,
            resource: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case", deny_unknown_fields)]
pub enum InjectSpec {
    /// `name: format`, where format holds `{token}` once.
    Header {
        #[serde(default = "default_header")]
        name: String,
        #[serde(default = "default_format")]
        format: String,
    },
    /// HTTP basic auth with a fixed user name and the credential as password.
    Basic { username: String },
    /// A query parameter carrying the credential.
    Query { param: String },
    /// AWS Signature Version 4 with the upstream's brokered access key
    /// (`credential.kind: aws-sigv4`): the sidecar signs every request,
    /// after every header it changes, the workload's own signature removed.
    AwsSigv4 {
        region: String,
        service: String,
        /// `signed` (default): the body's SHA-256 is signed (bodies up to
        /// 8 MiB); `unsigned`: `UNSIGNED-PAYLOAD` (S3, streaming uploads).
        #[serde(default)]
        payload: SigV4Payload,
        /// `header` (default): `Authorization`; `query`: a presigned query.
        #[serde(default)]
        signature: SigV4Location,
    },
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SigV4Payload {
    #[default]
    Signed,
    Unsigned,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SigV4Location {
    #[default]
    Header,
    Query,
}

/// A brokered AWS access key as the secret stores it:
/// `ACCESS_KEY_ID:SECRET_ACCESS_KEY[:SESSION_TOKEN]`.
pub struct AwsKey<'a> {
    pub access_key_id: &'a str,
    pub secret_access_key: &'a str,
    pub session_token: Option<&'a str>,
}

impl<'a> AwsKey<'a> {
    /// Parses a brokered secret; the error never repeats the secret.
    pub fn parse(secret: &'a [u8]) -> Result<Self, &'static str> {
        let text = std::str::from_utf8(secret).map_err(|_| "an AWS key is UTF-8 text")?;
        let mut parts = text.trim_end_matches(['\r', '\n']).splitn(3, ':');
        let (Some(id), Some(key)) = (parts.next(), parts.next()) else {
            return Err("an AWS key is ACCESS_KEY_ID:SECRET_ACCESS_KEY[:SESSION_TOKEN]");
        };
        let ok = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_graphic());
        if !ok(id) || !ok(key) {
            return Err(
                "an AWS key is ACCESS_KEY_ID:SECRET_ACCESS_KEY[:SESSION_TOKEN], each printable ASCII",
            );
        }
        let session_token = parts.next().filter(|t| !t.is_empty());
        if session_token.is_some_and(|t| !ok(t)) {
            return Err("an AWS session token is printable ASCII");
        }
        Ok(Self {
            access_key_id: id,
            secret_access_key: key,
            session_token,
        })
    }
}

impl Default for InjectSpec {
    fn default() -> Self {
        Self::Header {
            name: default_header(),
            format: default_format(),
        }
    }
}

fn default_header() -> String {
    "authorization".to_owned()
}

fn default_format() -> String {
    "Bearer {token}".to_owned()
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Grant {
    /// An exact SPIFFE ID, or a path prefix ending in `/*`
    /// (`spiffe://td/ns/payments/*` matches every ID under that path).
    pub workload: String,
    pub upstreams: Vec<String>,
}

/// serde adapter for `humantime` durations ("30s", "5m", "1h 30m").
mod humantime_serde_compat {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s).map_err(|e| {
            serde::de::Error::custom(format!(
                "invalid duration {s:?}: {e} (use e.g. 30s, 5m, 1h)"
            ))
        })
    }
}

/// Who a grant applies to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WorkloadMatcher {
    Exact(String),
    /// `spiffe://td/path/` (with the trailing slash): matches IDs strictly below.
    Prefix(String),
}

impl WorkloadMatcher {
    pub fn parse(s: &str) -> Result<Self, String> {
        if let Some(base) = s.strip_suffix("/*") {
            let id =
                SpiffeId::new(base).map_err(|e| format!("invalid SPIFFE ID prefix {s:?}: {e}"))?;
            Ok(Self::Prefix(format!("{id}/")))
        } else if s.contains('*') {
            Err(format!(
                "invalid workload {s:?}: `*` is only allowed as a final `/*` path prefix"
            ))
        } else {
            let id = SpiffeId::new(s).map_err(|e| format!("invalid SPIFFE ID {s:?}: {e}"))?;
            Ok(Self::Exact(id.to_string()))
        }
    }

    pub fn matches(&self, spiffe_id: &str) -> bool {
        match self {
            Self::Exact(id) => id == spiffe_id,
            Self::Prefix(prefix) => spiffe_id.len() > prefix.len() && spiffe_id.starts_with(prefix),
        }
    }
}

/// One problem found in a policy file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyIssue {
    /// Field path such as `upstreams[1].credential.ttl`.
    pub field: String,
    /// `line:column` where the parser knows it.
    pub location: Option<(usize, usize)>,
    pub reason: String,
}

/// A policy that could not be loaded: the file and every problem in it.
#[derive(Debug, Clone, thiserror::Error)]
pub struct PolicyError {
    pub file: PathBuf,
    pub issues: Vec<PolicyIssue>,
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid policy {}:", self.file.display())?;
        for issue in &self.issues {
            write!(f, "\n  ")?;
            if let Some((line, col)) = issue.location {
                write!(f, "line {line} column {col}: ")?;
            }
            if issue.field.is_empty() {
                write!(f, "{}", issue.reason)?;
            } else {
                write!(f, "{}: {}", issue.field, issue.reason)?;
            }
        }
        Ok(())
    }
}

/// A policy that parsed and validated, with its derived lookup tables.
#[derive(Debug, Clone)]
pub struct ValidPolicy {
    pub policy: Policy,
    /// Grants with parsed matchers, in file order.
    pub grants: Vec<(WorkloadMatcher, Vec<String>)>,
    /// PEM contents of each upstream's `tls.ca_file`, by upstream name.
    pub ca_pems: HashMap<String, String>,
    /// PEM contents of the `ssf.transmitters[].ca_file`s and
    /// `ssf.receivers[].ca_file`s, by `transmitter:<name>` and
    /// `receiver:<name>`.
    pub ssf_ca_pems: HashMap<String, String>,
}

impl ValidPolicy {
    pub fn upstream(&self, name: &str) -> Option<&Upstream> {
        self.policy.upstreams.iter().find(|u| u.name == name)
    }

    /// Whether `spiffe_id` is granted `upstream` by any grant.
    pub fn is_granted(&self, spiffe_id: &str, upstream: &str) -> bool {
        self.grants
            .iter()
            .any(|(m, ups)| m.matches(spiffe_id) && ups.iter().any(|u| u == upstream))
    }
}

/// Reads, parses and validates a policy file.
pub fn load(path: &Path) -> Result<ValidPolicy, PolicyError> {
    let text = std::fs::read_to_string(path).map_err(|e| PolicyError {
        file: path.to_owned(),
        issues: vec![PolicyIssue {
            field: String::new(),
            location: None,
            reason: format!("cannot read file: {e}"),
        }],
    })?;
    let base = path.parent().unwrap_or(Path::new("."));
    parse(&text, base).map_err(|issues| PolicyError {
        file: path.to_owned(),
        issues,
    })
}

/// Parses and validates policy text; relative `ca_file`s resolve against `base_dir`.
pub fn parse(text: &str, base_dir: &Path) -> Result<ValidPolicy, Vec<PolicyIssue>> {
    let de = serde_yaml_ng::Deserializer::from_str(text);
    let policy: Policy = serde_path_to_error::deserialize(de).map_err(|e| {
        let field = e.path().to_string();
        let inner = e.into_inner();
        let location = inner.location().map(|l| (l.line(), l.column()));
        let mut reason = strip_location(&inner.to_string());
        // The YAML error may repeat (part of) the path we report separately.
        if let Some((head, rest)) = reason.split_once(": ")
            && !head.is_empty()
            && field.starts_with(head)
        {
            reason = rest.to_owned();
        }
        vec![PolicyIssue {
            field: if field == "." { String::new() } else { field },
            location,
            reason,
        }]
    })?;
    validate(policy, base_dir)
}

/// serde_yaml appends " at line X column Y"; we report the location separately.
fn strip_location(msg: &str) -> String {
    match msg.find(" at line ") {
        Some(i) => msg[..i].to_owned(),
        None => msg.to_owned(),
    }
}

fn validate(policy: Policy, base_dir: &Path) -> Result<ValidPolicy, Vec<PolicyIssue>> {
    let mut issues = Vec::new();
    let mut bad = |field: String, reason: String| {
        issues.push(PolicyIssue {
            field,
            location: None,
            reason,
        })
    };
    if policy.version != 1 {
        bad(
            "version".into(),
            format!("unsupported version {}: only 1 exists", policy.version),
        );
    }

    let mut names = HashSet::new();
    let mut host_owner: HashMap<&str, &str> = HashMap::new();
    let mut ca_pems = HashMap::new();
    let mut ssf_ca_pems = HashMap::new();
    for (i, up) in policy.upstreams.iter().enumerate() {
        let at = |f: &str| format!("upstreams[{i}].{f}");
        if !valid_name(&up.name) {
            bad(
                at("name"),
                format!(
                    "{:?} must be 1-63 characters of a-z, 0-9, '-', '_' or '.'",
                    up.name
                ),
            );
        } else if !names.insert(up.name.as_str()) {
            bad(at("name"), format!("duplicate upstream name {:?}", up.name));
        }
        if up.hosts.is_empty() {
            bad(at("hosts"), "at least one host is required".into());
        }
        for (j, host) in up.hosts.iter().enumerate() {
            if let Err(reason) = check_host_pattern(host) {
                bad(at(&format!("hosts[{j}]")), reason);
            } else if let Some(other) = host_owner.insert(host.as_str(), up.name.as_str()) {
                bad(
                    at(&format!("hosts[{j}]")),
                    format!("host {host:?} is already claimed by upstream {other:?}"),
                );
            }
        }
        let https = match parse_target(&up.target) {
            Ok(t) => t.https,
            Err(reason) => {
                bad(at("target"), reason);
                false
            }
        };
        if up.intercept && up.passthrough {
            bad(
                at("passthrough"),
                "an upstream is either intercepted or passed through, not both".into(),
            );
        }
        if up.passthrough && !https {
            bad(
                at("passthrough"),
                "a passthrough upstream carries the workload's own TLS: it needs an https:// target"
                    .into(),
            );
        }
        if let Some(tls) = &up.tls {
            if !https {
                bad(at("tls"), "tls settings need an https:// target".into());
            }
            if tls.ca_only && tls.ca_file.is_none() {
                bad(at("tls.ca_only"), "ca_only needs ca_file".into());
            }
            if let Some(name) = &tls.server_name
                && rustls_name_ok(name).is_err()
            {
                bad(
                    at("tls.server_name"),
                    format!("{name:?} is not a valid DNS name or IP address"),
                );
            }
            if let Some(file) = &tls.ca_file {
                match read_ca_file(&base_dir.join(file)) {
                    Ok(pem) => {
                        ca_pems.insert(up.name.clone(), pem);
                    }
                    Err(reason) => bad(at("tls.ca_file"), reason),
                }
            }
        }
        match up.credential.kind {
            CredentialKind::Jwt | CredentialKind::Static | CredentialKind::AwsSigv4 => {}
            kind @ (CredentialKind::Oauth2ClientCredentials
            | CredentialKind::Oauth2JwtBearer
            | CredentialKind::Oauth2TokenExchange) => {
                match up.credential.token_url.as_deref().map(parse_target_url) {
                    None => bad(
                        at("credential.token_url"),
                        format!("required for {}", kind.as_str()),
                    ),
                    Some(Err(reason)) => bad(at("credential.token_url"), reason),
                    Some(Ok(())) => {}
                }
                // jwt-bearer defaults to the workload's SPIFFE ID.
                if kind != CredentialKind::Oauth2JwtBearer
                    && up.credential.client_id.as_deref().is_none_or(str::is_empty)
                {
                    bad(
                        at("credential.client_id"),
                        format!("required for {}", kind.as_str()),
                    );
                }
            }
        }
        if up.credential.kind != CredentialKind::AwsSigv4
            && (up.credential.role_arn.is_some() || up.credential.sts_url.is_some())
        {
            bad(
                at("credential"),
                "role_arn and sts_url belong to aws-sigv4".into(),
            );
        }
        if let Some(arn) = &up.credential.role_arn
            && (!arn.starts_with("arn:")
                || arn.chars().any(|c| c.is_whitespace() || c.is_control()))
        {
            bad(
                at("credential.role_arn"),
                format!("{arn:?} is not a role ARN (arn:aws:iam::ACCOUNT:role/NAME)"),
            );
        }
        if let Some(url) = &up.credential.sts_url {
            if up.credential.role_arn.is_none() {
                bad(at("credential.sts_url"), "needs role_arn".into());
            }
            if let Err(reason) = parse_target_url(url) {
                bad(at("credential.sts_url"), reason);
            }
        }
        if up.credential.kind == CredentialKind::AwsSigv4
            && !matches!(up.inject, InjectSpec::AwsSigv4 { .. })
        {
            bad(
                at("inject"),
                "an aws-sigv4 credential is injected by signing: inject: {type: aws-sigv4, region: ..., service: ...}".into(),
            );
        }
        if !up.credential.kind.is_oauth2()
            && (up.credential.token_url.is_some()
                || up.credential.client_id.is_some()
                || !up.credential.scopes.is_empty())
        {
            bad(
                at("credential"),
                "token_url, client_id and scopes belong to the oauth2-* kinds".into(),
            );
        }
        if up.credential.kind != CredentialKind::Oauth2TokenExchange
            && up.credential.resource.is_some()
        {
            bad(
                at("credential.resource"),
                "belongs to oauth2-token-exchange".into(),
            );
        }
        if let Some(probe) = &up.deactivation_probe {
            if up.credential.kind != CredentialKind::Static {
                bad(
                    at("deactivation_probe"),
                    "only a static credential can be probed (credential.kind: static)".into(),
                );
            }
            for (field, reason) in check_probe(probe) {
                bad(at(&format!("deactivation_probe.{field}")), reason);
            }
        }
        if up.scan_body_bytes > 65_536 {
            bad(at("scan_body_bytes"), "must be at most 65536".into());
        }
        if up.credential.ttl < MIN_TTL || up.credential.ttl > MAX_TTL {
            bad(at("credential.ttl"), "must be between 1s and 24h".into());
        }
        if let Some(aud) = &up.credential.audience
            && aud.is_empty()
        {
            bad(at("credential.audience"), "must not be empty".into());
        }
        match &up.inject {
            InjectSpec::Header { name, format } => {
                if let Err(reason) = check_header_name(name) {
                    bad(at("inject.name"), reason);
                }
                if format.matches("{token}").count() != 1 {
                    bad(
                        at("inject.format"),
                        "must contain {token} exactly once".into(),
                    );
                } else if http::HeaderValue::from_str(&format.replace("{token}", "x")).is_err() {
                    bad(
                        at("inject.format"),
                        "contains characters not allowed in a header value".into(),
                    );
                }
            }
            InjectSpec::Basic { username } => {
                if username.is_empty()
                    || username.contains(':')
                    || username.chars().any(char::is_control)
                {
                    bad(
                        at("inject.username"),
                        "must be non-empty, without ':' or control characters".into(),
                    );
                }
            }
            InjectSpec::AwsSigv4 {
                region, service, ..
            } => {
                if up.credential.kind != CredentialKind::AwsSigv4 {
                    bad(
                        at("inject.type"),
                        "aws-sigv4 signing needs credential.kind: aws-sigv4".into(),
                    );
                }
                for (field, value) in [("region", region), ("service", service)] {
                    if value.is_empty()
                        || !value
                            .bytes()
                            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                    {
                        bad(
                            at(&format!("inject.{field}")),
                            format!(
                                "{value:?} must be lower-case letters, digits and '-', e.g. us-east-1 / s3"
                            ),
                        );
                    }
                }
            }
            InjectSpec::Query { param } => {
                if param.is_empty()
                    || !param
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-_.~".contains(&b))
                {
                    bad(
                        at("inject.param"),
                        "must be non-empty and URL-safe (A-Z a-z 0-9 - _ . ~)".into(),
                    );
                }
            }
        }
    }

    if let Some(ssf) = &policy.ssf {
        if ssf.audience.is_empty() && !ssf.transmitters.is_empty() {
            bad(
                "ssf.audience".into(),
                "required to receive events from transmitters".into(),
            );
        }
        let mut receivers = HashSet::new();
        for (i, r) in ssf.receivers.iter().enumerate() {
            let at = |f: &str| format!("ssf.receivers[{i}].{f}");
            if !valid_name(&r.name) || !receivers.insert(r.name.as_str()) {
                bad(
                    at("name"),
                    format!(
                        "{:?} must be a unique name (a-z, 0-9, '-', '_', '.')",
                        r.name
                    ),
                );
            }
            match r.delivery {
                SsfDelivery::Push => {
                    if let Err(reason) = parse_target_url(&r.endpoint_url) {
                        bad(at("endpoint_url"), reason);
                    }
                    if r.poll_token_file.is_some() {
                        bad(at("poll_token_file"), "belongs to delivery: poll".into());
                    }
                    if let Some(file) = &r.ca_file {
                        match read_ca_file(&base_dir.join(file)) {
                            Ok(pem) => {
                                ssf_ca_pems.insert(format!("receiver:{}", r.name), pem);
                            }
                            Err(reason) => bad(at("ca_file"), reason),
                        }
                    }
                }
                SsfDelivery::Poll => {
                    if r.ca_file.is_some() {
                        bad(at("ca_file"), "belongs to delivery: push".into());
                    }
                    if !r.endpoint_url.is_empty() {
                        bad(
                            at("endpoint_url"),
                            "a poll stream has no endpoint_url: its receiver polls /ssf/poll/<name>"
                                .into(),
                        );
                    }
                    match &r.poll_token_file {
                        None => bad(
                            at("poll_token_file"),
                            "a poll stream needs the file holding its receiver's bearer token"
                                .into(),
                        ),
                        Some(file) => {
                            if let Err(reason) = read_token_file(&base_dir.join(file)) {
                                bad(at("poll_token_file"), reason);
                            }
                        }
                    }
                }
            }
            if r.audience.is_empty() {
                bad(at("audience"), "must not be empty".into());
            }
            for (j, e) in r.events.iter().enumerate() {
                if ![
                    "credential-change",
                    "session-revoked",
                    "credential-compromise",
                ]
                .contains(&e.as_str())
                {
                    bad(
                        at(&format!("events[{j}]")),
                        format!(
                            "{e:?}: use credential-change, session-revoked or credential-compromise"
                        ),
                    );
                }
            }
        }
        let mut seen = HashSet::new();
        for (i, t) in ssf.transmitters.iter().enumerate() {
            let at = |f: &str| format!("ssf.transmitters[{i}].{f}");
            if !valid_name(&t.name) || !seen.insert(t.name.as_str()) {
                bad(
                    at("name"),
                    format!(
                        "{:?} must be a unique name (a-z, 0-9, '-', '_', '.')",
                        t.name
                    ),
                );
            }
            if t.issuer.is_empty() {
                bad(at("issuer"), "must not be empty".into());
            }
            if let Err(reason) = parse_target_url(&t.jwks_url) {
                bad(at("jwks_url"), reason);
            }
            if let Some(url) = &t.poll_url
                && let Err(reason) = parse_target_url(url)
            {
                bad(at("poll_url"), reason);
            }
            if let Some(file) = &t.ca_file {
                match read_ca_file(&base_dir.join(file)) {
                    Ok(pem) => {
                        ssf_ca_pems.insert(format!("transmitter:{}", t.name), pem);
                    }
                    Err(reason) => bad(at("ca_file"), reason),
                }
            }
            if let Some(file) = &t.poll_token_file {
                if t.poll_url.is_none() {
                    bad(at("poll_token_file"), "belongs with poll_url".into());
                } else if let Err(reason) = read_token_file(&base_dir.join(file)) {
                    bad(at("poll_token_file"), reason);
                }
            }
        }
        for (i, m) in ssf.subjects.iter().enumerate() {
            let at = |f: &str| format!("ssf.subjects[{i}].{f}");
            let fields = match m.format.as_str() {
                "iss_sub" => {
                    m.iss.is_some() && m.sub.is_some() && m.id.is_none() && m.uri.is_none()
                }
                "opaque" => m.id.is_some() && m.iss.is_none() && m.sub.is_none() && m.uri.is_none(),
                "uri" => m.uri.is_some() && m.iss.is_none() && m.sub.is_none() && m.id.is_none(),
                other => {
                    bad(
                        at("format"),
                        format!("{other:?}: use iss_sub, opaque or uri"),
                    );
                    true
                }
            };
            if !fields {
                bad(
                    at("format"),
                    "iss_sub takes iss and sub; opaque takes id; uri takes uri".into(),
                );
            }
            let t = &m.revoke;
            let shape = match (
                t.workload.is_empty(),
                t.upstream.is_empty(),
                t.credential_id.is_empty(),
            ) {
                (false, _, true) => WorkloadMatcher::parse(&t.workload).err(),
                (true, true, false) => None,
                _ => Some(
                    "revoke a workload, a workload and an upstream (a grant), or a credential_id"
                        .to_owned(),
                ),
            };
            if let Some(reason) = shape {
                bad(at("revoke"), reason);
            }
            if !t.upstream.is_empty() && !names.contains(t.upstream.as_str()) {
                bad(
                    at("revoke.upstream"),
                    format!("no upstream is named {:?}", t.upstream),
                );
            }
        }
    }

    let mut grants = Vec::new();
    for (i, g) in policy.grants.iter().enumerate() {
        match WorkloadMatcher::parse(&g.workload) {
            Ok(m) => grants.push((m, g.upstreams.clone())),
            Err(reason) => bad(format!("grants[{i}].workload"), reason),
        }
        if g.upstreams.is_empty() {
            bad(
                format!("grants[{i}].upstreams"),
                "at least one upstream is required".into(),
            );
        }
        for (j, u) in g.upstreams.iter().enumerate() {
            if !names.contains(u.as_str()) {
                bad(
                    format!("grants[{i}].upstreams[{j}]"),
                    format!("no upstream is named {u:?}"),
                );
            }
        }
    }

    if issues.is_empty() {
        Ok(ValidPolicy {
            policy,
            grants,
            ca_pems,
            ssf_ca_pems,
        })
    } else {
        Err(issues)
    }
}

/// Each problem of a deactivation probe: (field, reason).
fn check_probe(probe: &DeactivationProbe) -> Vec<(&'static str, String)> {
    let mut issues = Vec::new();
    // RFC 9110 §5.6.2 `token`.
    let tchar = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
    if probe.method.is_empty() || !probe.method.bytes().all(tchar) {
        issues.push((
            "method",
            format!("{:?} is not an HTTP method", probe.method),
        ));
    }
    if !probe.path.starts_with('/')
        || probe.path.parse::<http::uri::PathAndQuery>().is_err()
        || probe.path.contains('#')
    {
        issues.push((
            "path",
            format!(
                "{:?} must be a path starting with / (and an optional query)",
                probe.path
            ),
        ));
    }
    if probe.expect.is_empty() {
        issues.push(("expect", "at least one status is required".into()));
    } else if let Some(s) = probe.expect.iter().find(|s| !(100..=599).contains(*s)) {
        issues.push(("expect", format!("{s} is not an HTTP status (100-599)")));
    }
    issues
}

fn valid_name(s: &str) -> bool {
    (1..=63).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b))
}

fn check_host_pattern(host: &str) -> Result<(), String> {
    let name = host.strip_prefix("*.").unwrap_or(host);
    if name.is_empty() || name.len() > 253 {
        return Err(format!("{host:?} is not a host name"));
    }
    if host != host.to_ascii_lowercase() {
        return Err(format!("{host:?} must be lower case"));
    }
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    };
    if name.split('.').all(label_ok) || name.parse::<std::net::IpAddr>().is_ok() {
        Ok(())
    } else {
        Err(format!(
            "{host:?} is not a host name (no port, scheme or path; `*.` only as a leading label)"
        ))
    }
}

fn check_header_name(name: &str) -> Result<(), String> {
    let parsed = http::HeaderName::from_bytes(name.as_bytes())
        .map_err(|_| format!("{name:?} is not a valid header name"))?;
    const FORBIDDEN: [&str; 9] = [
        "host",
        "connection",
        "keep-alive",
        "proxy-connection",
        "transfer-encoding",
        "te",
        "trailer",
        "upgrade",
        "content-length",
    ];
    if FORBIDDEN.contains(&parsed.as_str()) {
        return Err(format!(
            "{name:?} is a connection-level header and cannot carry a credential"
        ));
    }
    Ok(())
}

fn rustls_name_ok(name: &str) -> Result<(), ()> {
    if name.parse::<std::net::IpAddr>().is_ok()
        || check_host_pattern(name).is_ok() && !name.starts_with("*.")
    {
        Ok(())
    } else {
        Err(())
    }
}

/// CA certificates kept in a PEM file.
fn read_ca_file(path: &Path) -> Result<String, String> {
    match std::fs::read_to_string(path) {
        Ok(pem) if pem.contains("-----BEGIN CERTIFICATE-----") => Ok(pem),
        Ok(_) => Err(format!("{} holds no PEM certificate", path.display())),
        Err(e) => Err(format!("cannot read {}: {e}", path.display())),
    }
}

/// A bearer token kept in a file: its trimmed contents, which must be
/// non-empty and fit in an HTTP header.
pub fn read_token_file(path: &Path) -> Result<String, String> {
    let token = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let token = token.trim();
    if token.is_empty() {
        return Err(format!("{} is empty", path.display()));
    }
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(format!(
            "{} must hold one token of printable ASCII",
            path.display()
        ));
    }
    Ok(token.to_owned())
}

/// Checks an `http://` or `https://` URL with a host.
pub fn parse_target_url(url: &str) -> Result<(), String> {
    let uri: http::Uri = url
        .parse()
        .map_err(|e| format!("{url:?} is not a URL: {e}"))?;
    match (uri.scheme_str(), uri.host()) {
        (Some("http" | "https"), Some(h)) if !h.is_empty() => Ok(()),
        _ => Err(format!("{url:?} must be an http:// or https:// URL")),
    }
}

/// A parsed upstream `target`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub https: bool,
    pub host: String,
    pub port: u16,
}

pub fn parse_target(target: &str) -> Result<Target, String> {
    let uri: http::Uri = target
        .parse()
        .map_err(|e| format!("{target:?} is not a URL: {e}"))?;
    let https = match uri.scheme_str() {
        Some("http") => false,
        Some("https") => true,
        _ => return Err(format!("{target:?} must start with http:// or https://")),
    };
    let host = uri
        .host()
        .filter(|h| !h.is_empty())
        .ok_or_else(|| format!("{target:?} has no host"))?;
    if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
        return Err(format!("{target:?} must not have a path or query"));
    }
    if uri.authority().is_some_and(|a| a.as_str().contains('@')) {
        return Err(format!("{target:?} must not carry user info"));
    }
    let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
    Ok(Target {
        https,
        host: host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned(),
        port,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
version: 1
upstreams:
  - name: payments
    hosts: [payments.leash.test, "*.pay.example"]
    target: http://127.0.0.1:9090
    credential: { kind: jwt, ttl: 2m }
  - name: github
    hosts: [api.github.com]
    target: https://api.github.com
    credential: { kind: jwt }
    inject: { type: query, param: access_token }
grants:
  - workload: spiffe://leash.test/ns/demo/sa/client
    upstreams: [payments]
  - workload: spiffe://leash.test/ns/ci/*
    upstreams: [payments, github]
"#;

    #[test]
    fn good_policy_parses_with_defaults() {
        let p = parse(GOOD, Path::new(".")).expect("valid");
        let up = p.upstream("payments").expect("payments");
        assert_eq!(up.credential.ttl, Duration::from_secs(120));
        assert_eq!(up.inject, InjectSpec::default());
        assert!(p.is_granted("spiffe://leash.test/ns/demo/sa/client", "payments"));
        assert!(!p.is_granted("spiffe://leash.test/ns/demo/sa/client", "github"));
        assert!(p.is_granted("spiffe://leash.test/ns/ci/sa/runner", "github"));
        assert!(!p.is_granted("spiffe://leash.test/ns/ci", "github"));
        assert!(!p.is_granted("spiffe://leash.test/ns/cix/sa/runner", "github"));
    }

    fn issues(text: &str) -> Vec<PolicyIssue> {
        parse(text, Path::new(".")).expect_err("must be invalid")
    }

    #[test]
    fn unknown_field_names_path_and_line() {
        let text = GOOD.replace("ttl: 2m", "ttl: 2m, tll: 3m");
        let i = issues(&text);
        assert_eq!(i.len(), 1);
        assert_eq!(i[0].field, "upstreams[0].credential.tll");
        assert!(i[0].reason.contains("unknown field `tll`"), "{:?}", i[0]);
        assert_eq!(i[0].location.map(|l| l.0), Some(7));
    }

    #[test]
    fn bad_duration_names_field() {
        let i = issues(&GOOD.replace("ttl: 2m", "ttl: soon"));
        assert_eq!(i[0].field, "upstreams[0].credential.ttl");
        assert!(i[0].reason.contains("invalid duration"));
    }

    #[test]
    fn semantic_errors_are_all_reported() {
        let text = GOOD
            .replace("http://127.0.0.1:9090", "ftp://x")
            .replace("upstreams: [payments]", "upstreams: [nope]")
            .replace("api.github.com]", "payments.leash.test]")
            .replace("ttl: 2m", "ttl: 2d");
        let fields: Vec<_> = issues(&text).into_iter().map(|i| i.field).collect();
        assert_eq!(
            fields,
            [
                "upstreams[0].target",
                "upstreams[0].credential.ttl",
                "upstreams[1].hosts[0]",
                "grants[0].upstreams[0]",
            ]
        );
    }

    #[test]
    fn connect_modes_and_the_default_credential() {
        let text = GOOD.replace("    credential: { kind: jwt }\n", "    passthrough: true\n");
        let p = parse(&text, Path::new(".")).expect("valid");
        let up = p.upstream("github").expect("github");
        assert!(up.passthrough && !up.intercept);
        assert_eq!(
            up.credential.kind,
            CredentialKind::Jwt,
            "a Leash JWT when left out"
        );
        assert_eq!(up.credential.ttl, Duration::from_secs(300));

        let both = text.replace(
            "passthrough: true",
            "passthrough: true\n    intercept: true",
        );
        let i = issues(&both);
        assert_eq!(i.len(), 1, "{i:?}");
        assert_eq!(i[0].field, "upstreams[1].passthrough");
        let plain = GOOD.replace(
            "    target: http://127.0.0.1:9090\n",
            "    target: http://127.0.0.1:9090\n    passthrough: true\n",
        );
        let i = issues(&plain);
        assert_eq!(i[0].field, "upstreams[0].passthrough");
        assert!(i[0].reason.contains("https://"), "{:?}", i[0]);
    }

    #[test]
    fn oauth2_kinds_without_a_secret() {
        let bearer = GOOD.replace(
            "credential: { kind: jwt }",
            "credential: { kind: oauth2-jwt-bearer, token_url: \"https://auth.example/token\" }",
        );
        let p = parse(&bearer, Path::new(".")).expect("jwt-bearer needs no client_id");
        assert_eq!(
            p.upstream("github").expect("github").credential.kind,
            CredentialKind::Oauth2JwtBearer
        );
        let exchange = GOOD.replace(
            "credential: { kind: jwt }",
            "credential: { kind: oauth2-token-exchange, token_url: \"https://auth.example/token\", resource: \"https://api\" }",
        );
        let i = issues(&exchange);
        assert_eq!(i.len(), 1, "{i:?}");
        assert_eq!(i[0].field, "upstreams[1].credential.client_id");
        let misplaced = GOOD.replace(
            "credential: { kind: jwt }",
            "credential: { kind: jwt, resource: \"https://api\" }",
        );
        assert_eq!(
            issues(&misplaced)[0].field,
            "upstreams[1].credential.resource"
        );
    }

    #[test]
    fn ssf_receivers_and_subject_mappings_are_checked() {
        let good = format!(
            "{GOOD}ssf:\n  audience: https://leash/ssf\n  transmitters:\n    - {{ name: idp, issuer: https://idp, jwks_url: https://idp/jwks }}\n  subjects:\n    - {{ format: opaque, id: k1, revoke: {{ credential_id: static:payments:v1 }} }}\n    - {{ format: iss_sub, iss: https://idp, sub: s, revoke: {{ workload: spiffe://leash.test/ns/a, upstream: payments }} }}\n"
        );
        let p = parse(&good, Path::new(".")).expect("valid");
        assert_eq!(p.policy.ssf.expect("ssf").subjects.len(), 2);
        let receivers = format!(
            "{GOOD}ssf:\n  receivers:\n    - {{ name: siem, endpoint_url: https://siem/ssf, audience: https://siem, events: [session-revoked, logged-in] }}\n"
        );
        let i = issues(&receivers);
        assert_eq!(i.len(), 1, "{i:?}");
        assert_eq!(i[0].field, "ssf.receivers[0].events[1]");
        let poll = format!(
            "{GOOD}ssf:\n  receivers:\n    - {{ name: siem, delivery: poll, audience: https://siem }}\n    - {{ name: soc, delivery: poll, endpoint_url: https://soc/ssf, audience: https://soc, poll_token_file: Cargo.toml }}\n    - {{ name: ops, audience: https://ops }}\n    - {{ name: dev, audience: https://dev, endpoint_url: https://dev/ssf, poll_token_file: t }}\n"
        );
        let fields: Vec<_> = issues(&poll).into_iter().map(|i| i.field).collect();
        assert_eq!(
            fields,
            [
                "ssf.receivers[0].poll_token_file",
                "ssf.receivers[1].endpoint_url",
                "ssf.receivers[1].poll_token_file",
                "ssf.receivers[2].endpoint_url",
                "ssf.receivers[3].poll_token_file",
            ]
        );
        let polled = good.replace(
            "jwks_url: https://idp/jwks }",
            "jwks_url: https://idp/jwks, poll_url: https://idp/poll, poll_token_file: /nonexistent/token }",
        );
        let i = issues(&polled);
        assert_eq!(i[0].field, "ssf.transmitters[0].poll_token_file", "{i:?}");
        assert!(i[0].reason.contains("cannot read"), "{i:?}");
        let trusted = good.replace(
            "jwks_url: https://idp/jwks }",
            "jwks_url: https://idp/jwks, ca_file: Cargo.toml }",
        );
        let i = issues(&trusted);
        assert_eq!(i[0].field, "ssf.transmitters[0].ca_file", "{i:?}");
        assert!(i[0].reason.contains("no PEM certificate"), "{i:?}");
        let no_audience = good.replace("  audience: https://leash/ssf\n", "");
        assert_eq!(issues(&no_audience)[0].field, "ssf.audience");
        let bad = good
            .replace("format: opaque, id: k1", "format: opaque, uri: k1")
            .replace("upstream: payments", "upstream: nowhere")
            .replace("jwks_url: https://idp/jwks", "jwks_url: ftp://idp");
        let fields: Vec<_> = issues(&bad).into_iter().map(|i| i.field).collect();
        assert_eq!(
            fields,
            [
                "ssf.transmitters[0].jwks_url",
                "ssf.subjects[0].format",
                "ssf.subjects[1].revoke.upstream",
            ]
        );
    }

    #[test]
    fn workload_matchers() {
        assert!(WorkloadMatcher::parse("spiffe://td/a*").is_err());
        assert!(WorkloadMatcher::parse("https://td/a").is_err());
        assert!(WorkloadMatcher::parse("spiffe://td/a/*").is_ok());
        let m = WorkloadMatcher::parse("spiffe://td/*").expect("td-wide prefix");
        assert!(m.matches("spiffe://td/x"));
        assert!(!m.matches("spiffe://tdx/x"));
    }

    #[test]
    fn header_injection_checks() {
        let bad = GOOD.replace(
            "credential: { kind: jwt, ttl: 2m }",
            "credential: { kind: jwt, ttl: 2m }\n    inject: { type: header, name: connection, format: \"x\" }",
        );
        let fields: Vec<_> = issues(&bad).into_iter().map(|i| i.field).collect();
        assert_eq!(
            fields,
            ["upstreams[0].inject.name", "upstreams[0].inject.format"]
        );
    }

    #[test]
    fn deactivation_probes() {
        let probed = |kind: &str, probe: &str| {
            GOOD.replace(
                "credential: { kind: jwt, ttl: 2m }",
                &format!(
                    "credential: {{ kind: {kind}, ttl: 2m }}\n    deactivation_probe: {probe}"
                ),
            )
        };
        let ok = parse(
            &probed(
                "static",
                "{ method: GET, path: /v1/me, expect: [401, 403] }",
            ),
            Path::new("."),
        )
        .expect("valid probe");
        assert_eq!(
            ok.upstream("payments")
                .and_then(|u| u.deactivation_probe.clone()),
            Some(DeactivationProbe {
                method: "GET".into(),
                path: "/v1/me".into(),
                expect: vec![401, 403],
            })
        );
        let fields = |text: &str| -> Vec<(String, String)> {
            issues(text)
                .into_iter()
                .map(|i| (i.field, i.reason))
                .collect()
        };
        let bad = fields(&probed(
            "static",
            "{ method: \"GE T\", path: v1/me, expect: [401, 99] }",
        ));
        let names: Vec<_> = bad.iter().map(|(f, _)| f.as_str()).collect();
        assert_eq!(
            names,
            [
                "upstreams[0].deactivation_probe.method",
                "upstreams[0].deactivation_probe.path",
                "upstreams[0].deactivation_probe.expect",
            ],
            "{bad:?}"
        );
        assert!(bad[2].1.contains("99"), "{bad:?}");
        let empty = fields(&probed(
            "static",
            "{ method: GET, path: /v1/me, expect: [] }",
        ));
        assert_eq!(empty[0].0, "upstreams[0].deactivation_probe.expect");
        let jwt = fields(&probed(
            "jwt",
            "{ method: GET, path: /v1/me, expect: [401] }",
        ));
        assert_eq!(jwt[0].0, "upstreams[0].deactivation_probe");
        assert!(jwt[0].1.contains("static"), "{jwt:?}");
        let unknown = fields(&probed(
            "static",
            "{ method: GET, path: /v1/me, expect: [401], retry: 3 }",
        ));
        assert_eq!(unknown[0].0, "upstreams[0].deactivation_probe.retry");
        let out_of_range = fields(&probed(
            "static",
            "{ method: GET, path: /v1/me, expect: [70000] }",
        ));
        assert_eq!(
            out_of_range[0].0,
            "upstreams[0].deactivation_probe.expect[0]"
        );
    }

    #[test]
    fn targets() {
        assert_eq!(
            parse_target("https://api.example.com").expect("ok"),
            Target {
                https: true,
                host: "api.example.com".into(),
                port: 443
            }
        );
        assert!(parse_target("http://h/path").is_err());
        assert!(parse_target("http://u:p@h").is_err());
    }
}
