//! Command-line flags of `leash-control-plane` and `leashctl` (also read by
//! the deploy-manifest test).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::store::DatabaseUrl;

#[derive(Parser)]
#[command(
    name = "leash-control-plane",
    version,
    about = "The Leash control plane"
)]
pub struct Cli {
    /// Log format: text or json. Filter with RUST_LOG (default info).
    #[arg(long, global = true, default_value = "text", value_parser = ["text", "json"])]
    pub log_format: String,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Serve the sidecar API (gRPC, mTLS) and the admin API (HTTP).
    Serve(Box<ServeArgs>),
    /// Run a dev SPIFFE Workload API server backed by an in-memory CA
    /// (for local runs and tests; production uses SPIRE).
    DevIdentity(DevIdentityArgs),
    /// Manage the JWT signing keys.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Print a new random master key (base64) for --master-key-file.
    MasterKey,
    /// Manage admin API tokens offline (on a running system, use POST /v1/tokens).
    #[command(subcommand)]
    Tokens(TokensCommand),
}

#[derive(Subcommand)]
pub enum TokensCommand {
    /// Create a token and print it (it is shown only this once).
    Create {
        #[arg(long, env = "LEASH_DATA_DIR", default_value = "./leash-data")]
        data_dir: PathBuf,
        /// The store's PostgreSQL database (postgres://…; or
        /// LEASH_DATABASE_URL); the SQLite file in --data-dir when absent.
        #[arg(long, env = "LEASH_DATABASE_URL", hide_env_values = true)]
        database_url: Option<DatabaseUrl>,
        /// A name for the token, shown in the audit log.
        #[arg(long)]
        name: String,
        /// viewer, responder or admin.
        #[arg(long, value_parser = ["viewer", "responder", "admin"])]
        role: String,
    },
}

#[derive(Args)]
pub struct ServeArgs {
    /// Policy file (YAML). Re-read when it changes; an invalid edit is refused.
    #[arg(long, env = "LEASH_POLICY")]
    pub policy: PathBuf,
    /// Directory for the SQLite database and the control plane's files
    /// (admin-token).
    #[arg(long, env = "LEASH_DATA_DIR", default_value = "./leash-data")]
    pub data_dir: PathBuf,
    /// Keep the store in this PostgreSQL database (postgres://user:pass@host/db)
    /// instead of the SQLite file in --data-dir. Never logged with its password.
    #[arg(long, env = "LEASH_DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<DatabaseUrl>,
    /// Address of the sidecar API (gRPC over mTLS).
    #[arg(long, env = "LEASH_LISTEN", default_value = "127.0.0.1:8443")]
    pub listen: SocketAddr,
    /// Address of the admin API (health, readiness, JWKS, metrics).
    #[arg(long, env = "LEASH_ADMIN_LISTEN", default_value = "127.0.0.1:8080")]
    pub admin_listen: SocketAddr,
    /// SPIFFE Workload API endpoint (unix:///path or tcp://ip:port).
    #[arg(long, env = "SPIFFE_ENDPOINT_SOCKET")]
    pub spiffe_endpoint: Option<String>,
    /// Instead of the Workload API: the SVID certificate chain (PEM, leaf
    /// first). Re-read when it changes. Needs --svid-key and --svid-bundle.
    #[arg(long, env = "LEASH_SVID_CERT", requires_all = ["svid_key", "svid_bundle"])]
    pub svid_cert: Option<PathBuf>,
    /// The SVID's private key (PKCS#8 PEM).
    #[arg(long, env = "LEASH_SVID_KEY", requires = "svid_cert")]
    pub svid_key: Option<PathBuf>,
    /// The trust bundle (PEM CA certificates).
    #[arg(long, env = "LEASH_SVID_BUNDLE", requires = "svid_cert")]
    pub svid_bundle: Option<PathBuf>,
    /// `iss` claim of issued JWTs (default: http://<admin-listen>).
    #[arg(long, env = "LEASH_ISSUER")]
    pub issuer: Option<String>,
    /// Interval of heartbeats on each sidecar session. Sidecars refuse to
    /// inject after --max-staleness without hearing from the control plane,
    /// so keep this well below it.
    #[arg(long, env = "LEASH_HEARTBEAT_INTERVAL", default_value = "5s", value_parser = humantime::parse_duration)]
    pub heartbeat_interval: Duration,
    /// How often every remediation mission's criteria are computed; a
    /// mission closes (or reopens) at most this long after they change.
    #[arg(long, env = "LEASH_MISSION_INTERVAL", default_value = "10s", value_parser = humantime::parse_duration)]
    pub mission_interval: Duration,
    /// File holding the master key (32 bytes, base64) that encrypts brokered
    /// secrets. Alternatively set LEASH_MASTER_KEY to the key itself. Never
    /// stored in the database; without it `static` upstreams are denied.
    #[arg(long, env = "LEASH_MASTER_KEY_FILE")]
    pub master_key_file: Option<PathBuf>,
    /// Run without a master key: JWT signing keys and the leak fingerprint
    /// key are then stored in the clear in the database (anyone who can
    /// read it can mint tokens). For throw-away local runs only.
    #[arg(long)]
    pub insecure_dev: bool,
    /// How long to wait for the first SVID at start.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub identity_timeout: Duration,
    /// Invalid admin tokens accepted from one client address per minute;
    /// past that the address gets 429 until the minute is over.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..))]
    pub admin_auth_failures_per_minute: u32,
    /// How long a provider has to answer a deactivation probe (sent once
    /// to an upstream with a revoked secret version when its policy has a
    /// `deactivation_probe`); no answer in time is recorded as `error`.
    #[arg(long, env = "LEASH_PROBE_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub probe_timeout: Duration,
    #[command(flatten)]
    pub limits: crate::listeners::ListenerLimits,
    /// Serve the admin port over TLS with this certificate chain (PEM);
    /// re-read when the file changes. The issuer becomes https://.
    #[arg(long, env = "LEASH_ADMIN_TLS_CERT", requires = "admin_tls_key")]
    pub admin_tls_cert: Option<PathBuf>,
    /// The admin certificate's private key (PEM, PKCS#8, SEC1 or PKCS#1).
    #[arg(long, env = "LEASH_ADMIN_TLS_KEY", requires = "admin_tls_cert")]
    pub admin_tls_key: Option<PathBuf>,
}

#[derive(Args)]
pub struct DevIdentityArgs {
    /// Trust domain of the dev CA.
    #[arg(long, default_value = "leash.test")]
    pub trust_domain: String,
    /// A socket and the SPIFFE ID it serves, as PATH=SPIFFE_ID. Repeatable.
    #[arg(long = "socket", value_name = "PATH=SPIFFE_ID", required = true)]
    pub sockets: Vec<String>,
    /// Lifetime of each SVID; SVIDs are re-issued at half-life.
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    pub svid_ttl: Duration,
    /// Write the CA certificate (the trust bundle) to this PEM file.
    #[arg(long)]
    pub bundle_out: Option<PathBuf>,
}

#[derive(Subcommand)]
pub enum KeysCommand {
    /// Create a new signing key and make it the active one. A running control
    /// plane picks it up within 5 s; older keys stay in the JWKS.
    Rotate {
        #[arg(long, env = "LEASH_DATA_DIR", default_value = "./leash-data")]
        data_dir: PathBuf,
        /// The store's PostgreSQL database (postgres://…; or
        /// LEASH_DATABASE_URL); the SQLite file in --data-dir when absent.
        #[arg(long, env = "LEASH_DATABASE_URL", hide_env_values = true)]
        database_url: Option<DatabaseUrl>,
        /// The master key the signing keys are sealed under (or
        /// LEASH_MASTER_KEY); required unless the store was made with
        /// --insecure-dev.
        #[arg(long, env = "LEASH_MASTER_KEY_FILE")]
        master_key_file: Option<PathBuf>,
    },
}

#[derive(Parser)]
#[command(
    name = "leashctl",
    version,
    about = "Operate Leash: check policy, revoke and restore, and prove propagation",
    after_help = "Exit codes: 0 done; 1 refused by the control plane (bad input, not found, conflict, \
                  unauthenticated, forbidden); 2 usage error; 3 control plane unreachable or failing."
)]
pub struct LeashctlCli {
    /// Control plane admin API.
    #[arg(
        long,
        global = true,
        env = "LEASH_ADDR",
        default_value = "http://127.0.0.1:8080"
    )]
    pub addr: String,
    /// Admin API token (lsh_…).
    #[arg(long, global = true, env = "LEASH_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// CA certificate(s) (PEM) to trust for an https:// --addr, besides the
    /// system's roots.
    #[arg(long, global = true, env = "LEASH_CA_FILE")]
    pub ca_file: Option<PathBuf>,
    /// Print the API's JSON instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: LeashctlCommand,
}

#[derive(Subcommand)]
pub enum LeashctlCommand {
    /// Work with policy files.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Revoke a credential, grant, workload or upstream (takes effect on every
    /// connected sidecar within milliseconds).
    #[command(subcommand)]
    Revoke(RevokeCommand),
    /// Restore a grant, workload or upstream revocation, by its id (see
    /// `leashctl revocations`). Credential revocations are permanent.
    Restore {
        revocation_id: String,
        #[arg(long)]
        reason: String,
    },
    /// List revocations (active ones unless --all).
    Revocations {
        #[arg(long)]
        all: bool,
    },
    /// A revocation's propagation: which sidecars acknowledged it, and when.
    Status { revocation_id: String },
    /// Connected sidecars, on every live replica.
    Sidecars,
    /// The control-plane replicas on the store: live or gone, and the
    /// sidecar sessions each holds.
    Replicas,
    /// Leaked secret values: register one (refused everywhere from then on)
    /// and see who still sends it.
    #[command(subcommand)]
    Leaked(LeakedCommand),
    /// Workloads that still send their own credential to a managed upstream
    /// (the sidecar strips it): they still hold a secret somewhere.
    Stripped,
    /// Brokered static secrets of upstreams (values from stdin or --file).
    #[command(subcommand)]
    Secret(SecretCommand),
    /// Admin API tokens.
    #[command(subcommand)]
    Tokens(TokenCommand),
    /// What the sidecars forwarded, with which credential, to what: usage
    /// by credential, workload, upstream and time; the dependency map;
    /// grants nobody uses; uses after a revocation.
    Usage(UsageArgs),
    /// Remediation missions: findings grouped under an objective, owner and
    /// deadline, closed when their criteria (computed from what the sidecars
    /// see) hold, reopened when they stop holding.
    #[command(subcommand)]
    Mission(MissionCommand),
    /// Evidence bundles exported by `mission evidence`.
    #[command(subcommand)]
    Evidence(EvidenceCommand),
    /// The newest audit log entries (admin role); `audit verify` checks the
    /// hash chain.
    Audit(AuditArgs),
    /// Posture after an incident: grants nobody used, credential lifetimes
    /// far above their use, workloads still sending their own credential,
    /// and the policy diff that removes or narrows them (nothing is applied).
    Posture {
        /// Usage since this time: a duration ago (30d), RFC 3339 or Unix ms.
        #[arg(long, default_value = "30d")]
        since: String,
    },
}

#[derive(clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct AuditArgs {
    #[command(subcommand)]
    pub command: Option<AuditCommand>,
    #[arg(long, default_value_t = 50)]
    pub limit: u32,
}

#[derive(Subcommand)]
pub enum AuditCommand {
    /// Walk the audit log's hash chain and its signed anchors: exit 0 if
    /// every entry is intact, 1 naming the first entry that was changed,
    /// removed or reordered.
    Verify {
        /// A head saved earlier with `leashctl audit head`: its signature is
        /// checked, and its entry must still be in the chain (catches a
        /// chain rewritten or cut off since).
        #[arg(long)]
        head: Option<std::path::PathBuf>,
    },
    /// Print the chain's current head, signed with a key derived from the
    /// master key; keep it somewhere the control plane's host cannot write.
    Head,
}

#[derive(clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct UsageArgs {
    #[command(subcommand)]
    pub command: Option<UsageCommand>,
    #[command(flatten)]
    pub filter: UsageFilter,
}

/// Which usage to show. Times: Unix ms, RFC 3339, or a duration ago (24h).
#[derive(clap::Args, Default, Clone)]
pub struct UsageFilter {
    /// One credential (a JWT's jti, a lease id).
    #[arg(long)]
    pub credential: Option<String>,
    /// One workload's SPIFFE ID.
    #[arg(long)]
    pub workload: Option<String>,
    #[arg(long)]
    pub upstream: Option<String>,
    /// Used at or after this time.
    #[arg(long)]
    pub since: Option<String>,
    /// Used before this time.
    #[arg(long)]
    pub until: Option<String>,
}

impl UsageFilter {
    /// As a URL query string (empty, or starting with `?`).
    pub fn query(&self) -> String {
        let mut q = form_urlencoded::Serializer::new(String::new());
        for (k, v) in [
            ("credential", &self.credential),
            ("workload", &self.workload),
            ("upstream", &self.upstream),
            ("since", &self.since),
            ("until", &self.until),
        ] {
            if let Some(v) = v {
                q.append_pair(k, v);
            }
        }
        let q = q.finish();
        if q.is_empty() { q } else { format!("?{q}") }
    }
}

#[derive(Subcommand)]
pub enum UsageCommand {
    /// The dependency map: workload → upstream edges with credential kind,
    /// request count and last use.
    Deps(UsageFilter),
    /// Grants of the current policy that no workload used since a time:
    /// candidates for removal.
    Unused {
        /// e.g. 30d, or an RFC 3339 time.
        #[arg(long)]
        since: String,
    },
    /// Uses of what a revocation covers after it was issued; a use after
    /// the sidecars acknowledged it is a violation (exit code 1).
    AfterRevocation,
}

#[derive(Subcommand)]
pub enum RevokeCommand {
    /// Every upstream, for a SPIFFE ID or a prefix ending in /*.
    Workload {
        spiffe_id: String,
        #[arg(long)]
        reason: String,
    },
    /// One workload (or prefix) × one upstream.
    Grant {
        #[arg(long)]
        workload: String,
        #[arg(long)]
        upstream: String,
        #[arg(long)]
        reason: String,
    },
    /// One issued credential (the JWT's jti). Sidecars fetch a fresh one.
    Credential {
        credential_id: String,
        #[arg(long)]
        reason: String,
    },
    /// An upstream, for every workload.
    Upstream {
        name: String,
        #[arg(long)]
        reason: String,
    },
}

#[derive(Subcommand)]
pub enum LeakedCommand {
    /// Register a leaked value, read from standard input (or --file), never
    /// from the command line. Only a keyed fingerprint is kept.
    Add {
        #[arg(long)]
        reason: String,
        /// Read the value from this file instead of standard input.
        #[arg(long)]
        file: Option<PathBuf>,
    },
    /// Register every secret a scanner found, from its JSON report (the
    /// values are fingerprinted by the control plane, never stored or
    /// printed), and group them, one finding per secret with where it was
    /// found, into a mission (a new one unless --mission).
    Import {
        #[arg(long, value_enum)]
        format: crate::scanners::Format,
        report: PathBuf,
        /// The directory the scan ran in (detect-secrets names files
        /// relative to it and keeps only hashes: the values are read back
        /// from the files). Default: the current directory.
        #[arg(long)]
        root: Option<PathBuf>,
        /// Add the findings to this mission instead of opening one.
        #[arg(long)]
        mission: Option<String>,
        /// Owner of the new mission.
        #[arg(long, required_unless_present = "mission")]
        owner: Option<String>,
        /// The new mission's window (see `mission create`).
        #[arg(long)]
        window: Option<String>,
        /// The new mission's deadline.
        #[arg(long)]
        deadline: Option<String>,
    },
    /// Registered leaked values.
    List,
    /// The forgotten consumers: every workload that sent the value since it
    /// was registered, to which upstream, how often, first and last seen.
    Show { revocation_id: String },
}

#[derive(Subcommand)]
pub enum MissionCommand {
    /// Open a mission. Findings: leaked:ID, revocation:ID,
    /// secret-version:UPSTREAM/VERSION, stripped:WORKLOAD@UPSTREAM,
    /// grant:WORKLOAD@UPSTREAM, sighting:ID@WORKLOAD.
    Create {
        #[arg(long)]
        objective: String,
        #[arg(long)]
        owner: String,
        /// Due: a duration from now (72h, 7d), RFC 3339 or Unix milliseconds.
        #[arg(long)]
        deadline: Option<String>,
        /// How long nothing may be seen before no-use, no-sightings and
        /// consumers-migrated hold (1s to 90d; default 24h).
        #[arg(long)]
        window: Option<String>,
        /// A finding (repeat for more).
        #[arg(long = "finding", value_name = "KIND:REF")]
        findings: Vec<crate::missions::Finding>,
    },
    /// Missions, newest first, with how many criteria hold.
    List,
    /// A mission's findings, each criterion with what it was computed from,
    /// and its history.
    Show { id: String },
    /// Add findings to a mission.
    Add {
        id: String,
        #[arg(required = true, value_name = "KIND:REF")]
        findings: Vec<crate::missions::Finding>,
    },
    /// Close a mission by hand (marked so; its criteria no longer reopen it).
    Close {
        id: String,
        #[arg(long)]
        reason: String,
    },
    /// Reopen a mission by hand.
    Reopen {
        id: String,
        #[arg(long)]
        reason: String,
    },
    /// Export the mission's signed evidence to FILE (a flattened JWS: verify
    /// it with `leashctl evidence verify`) and a readable report to
    /// FILE.html (one file, no external assets).
    Evidence {
        id: String,
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Subcommand)]
pub enum EvidenceCommand {
    /// Verify an evidence bundle offline against the control plane's JWKS
    /// (a file, or its URL: `https://…/.well-known/jwks.json`). Exits 0 when
    /// the signature holds, 1 when it does not.
    Verify {
        file: PathBuf,
        #[arg(long)]
        jwks: String,
    },
}

#[derive(Subcommand)]
pub enum SecretCommand {
    /// Store the first (or a new) version of an upstream's secret, read from
    /// standard input or --file; it becomes current.
    Put {
        upstream: String,
        #[arg(long)]
        file: Option<PathBuf>,
    },
    /// Same as put: a new current version. Sidecars move to it as their
    /// leases end; revoke the old version to move them at once.
    Rotate {
        upstream: String,
        #[arg(long)]
        file: Option<PathBuf>,
    },
    /// Revoke one version: sidecars drop it at once and fetch the current one.
    RevokeVersion {
        upstream: String,
        version: i64,
        #[arg(long)]
        reason: String,
    },
    /// Versions of an upstream's secret (never their values).
    List { upstream: String },
    /// What the provider answered each time a revoked version was sent to it
    /// (its policy's deactivation_probe), newest first.
    Probes { upstream: String, version: i64 },
    /// Send a revoked version's deactivation_probe to its provider again and
    /// show the answer (at most once a minute per version; never a live one).
    Probe { upstream: String, version: i64 },
}

#[derive(Subcommand)]
pub enum TokenCommand {
    /// Create a token (admin role); it is printed once.
    Create {
        #[arg(long)]
        name: String,
        #[arg(long, value_parser = ["viewer", "responder", "admin"])]
        role: String,
    },
}

#[derive(Subcommand)]
pub enum PolicyCommand {
    /// Validate a policy file offline: exits non-zero naming each bad field.
    /// With --against-usage, the control plane validates it and lists the
    /// live consumers it would break: exit 0 when none, 1 when any would
    /// break (or the file is invalid).
    Check {
        file: PathBuf,
        /// Check against the usage since this time (e.g. 30d, or an RFC
        /// 3339 time): every workload/upstream pair with requests since
        /// then that the file no longer grants is listed.
        #[arg(long, value_name = "SINCE")]
        against_usage: Option<String>,
    },
}
