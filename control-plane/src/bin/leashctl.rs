//! `leashctl`: the operator's and responder's command line.

use std::process::ExitCode;

use bytes::Bytes;
use clap::Parser as _;
use http_body_util::{BodyExt as _, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use leash_control_plane::admin::types::{
    AfterRevocation, AuditLog, AuditVerdict, Dependencies, ErrorBody, LeakedList, LeakedRequest,
    LeakedStatus, PolicyCheck, Posture, ProbeResult, ProbeResults, ReasonRequest, ReplicaList,
    Revocation, RevocationList, RevocationStatus, RevokeRequest, SecretRequest, SecretStored,
    SecretVersions, SidecarList, SignedHead, StrippedReport, TokenCreated, TokenRequest,
    UnusedGrants, UsageSummary,
};
use leash_control_plane::admin::types::{
    Evidence, Finding, FindingEntry, FindingsRequest, MissionList, MissionRequest, MissionView,
    SignedEvidence,
};
use leash_control_plane::cli::{
    AuditArgs, AuditCommand, EvidenceCommand, LeakedCommand, LeashctlCli as Cli,
    LeashctlCommand as Command, MissionCommand, PolicyCommand, RevokeCommand, SecretCommand,
    TokenCommand, UsageArgs, UsageCommand, UsageFilter,
};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// Exit codes scripts can rely on.
const REFUSED: u8 = 1;
const UNREACHABLE: u8 = 3;

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::Policy(PolicyCommand::Check {
        file,
        against_usage: None,
    }) = &cli.command
    {
        return policy_check(file);
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("leashctl: {e}");
            return ExitCode::from(UNREACHABLE);
        }
    };
    match runtime.block_on(run(&cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Refused(status, body)) => {
            eprintln!("leashctl: {status} {}: {}", body.error, body.message);
            ExitCode::from(REFUSED)
        }
        Err(Failure::Unreachable(e)) => {
            eprintln!("leashctl: {e}");
            ExitCode::from(UNREACHABLE)
        }
        Err(Failure::Violations) => ExitCode::from(REFUSED),
        Err(Failure::Usage(e)) => {
            eprintln!("leashctl: {e}");
            ExitCode::from(2)
        }
    }
}

fn policy_check(file: &std::path::Path) -> ExitCode {
    match leash_api::policy::load(file) {
        Ok(p) => {
            println!(
                "{}: ok ({} upstreams, {} grants)",
                file.display(),
                p.policy.upstreams.len(),
                p.policy.grants.len()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::FAILURE
        }
    }
}

enum Failure {
    Refused(u16, ErrorBody),
    Unreachable(String),
    Usage(String),
    /// The command worked and found something a script should fail on.
    Violations,
}

fn probe_row(p: &ProbeResult) -> Vec<String> {
    vec![
        p.outcome.clone(),
        p.status.map_or_else(|| "-".to_owned(), |s| s.to_string()),
        ago(Some(p.at_ms)),
        p.detail.clone(),
    ]
}

async fn get<T: DeserializeOwned>(cli: &Cli, path: &str) -> Result<T, Failure> {
    call(cli, "GET", path, None, "application/json").await
}

async fn post<T: DeserializeOwned>(
    cli: &Cli,
    path: &str,
    body: &impl Serialize,
) -> Result<T, Failure> {
    let body = serde_json::to_vec(body)
        .map_err(|e| Failure::Usage(format!("cannot encode the request: {e}")))?;
    call(cli, "POST", path, Some(body), "application/json").await
}

async fn call<T: DeserializeOwned>(
    cli: &Cli,
    method: &str,
    path: &str,
    body: Option<Vec<u8>>,
    content_type: &str,
) -> Result<T, Failure> {
    let url = format!("{}{}", cli.addr.trim_end_matches('/'), path);
    let mut req = http::Request::builder()
        .method(method)
        .uri(&url)
        .header("content-type", content_type);
    if let Some(token) = &cli.token {
        req = req.header("authorization", format!("Bearer {token}"));
    }
    let req = req
        .body(Full::new(Bytes::from(body.unwrap_or_default())))
        .map_err(|e| Failure::Unreachable(format!("bad request to {url}: {e}")))?;
    let client = Client::builder(TokioExecutor::new()).build(connector(cli)?);
    let resp = tokio::time::timeout(std::time::Duration::from_secs(30), client.request(req))
        .await
        .map_err(|_| Failure::Unreachable(format!("{url}: no answer within 30 s")))?
        .map_err(|e| Failure::Unreachable(format!("cannot reach {url}: {e}")))?;
    let status = resp.status().as_u16();
    let bytes = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| Failure::Unreachable(format!("{url}: {e}")))?
        .to_bytes();
    if (200..=299).contains(&status) {
        return serde_json::from_slice(&bytes).map_err(|e| {
            Failure::Unreachable(format!(
                "{url}: an answer leashctl does not understand: {e}"
            ))
        });
    }
    // A refusal from the API is an ErrorBody; anything else (a proxy's
    // page, a plain-text rejection) is shown as it came.
    let refusal = serde_json::from_slice(&bytes).unwrap_or_else(|_| ErrorBody {
        error: "error".into(),
        message: String::from_utf8_lossy(&bytes).into_owned(),
    });
    match status {
        400..=499 => Err(Failure::Refused(status, refusal)),
        _ => Err(Failure::Unreachable(format!(
            "{url}: {status} {}",
            refusal.message
        ))),
    }
}

/// HTTP, or HTTPS verified against the system's roots plus `--ca-file`.
fn connector(
    cli: &Cli,
) -> Result<hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>, Failure>
{
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject as _;
    let mut roots = rustls::RootCertStore::empty();
    let (_added, _ignored) =
        roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
    if let Some(path) = &cli.ca_file {
        let certs = CertificateDer::pem_file_iter(path)
            .and_then(|i| i.collect::<Result<Vec<_>, _>>())
            .map_err(|e| Failure::Usage(format!("--ca-file {}: {e}", path.display())))?;
        for c in certs {
            roots
                .add(c)
                .map_err(|e| Failure::Usage(format!("--ca-file {}: {e}", path.display())))?;
        }
    }
    let tls = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .build())
}

async fn run(cli: &Cli) -> Result<(), Failure> {
    let out = match &cli.command {
        Command::Policy(PolicyCommand::Check {
            file,
            against_usage: Some(since),
        }) => return check_against_usage(cli, file, since).await,
        Command::Policy(_) => return Ok(()),
        Command::Posture { since } => return posture(cli, since).await,
        Command::Revoke(r) => {
            let req = match r {
                RevokeCommand::Workload { spiffe_id, reason } => RevokeRequest {
                    kind: "workload".into(),
                    workload: spiffe_id.clone(),
                    reason: reason.clone(),
                    ..RevokeRequest::default()
                },
                RevokeCommand::Grant {
                    workload,
                    upstream,
                    reason,
                } => RevokeRequest {
                    kind: "grant".into(),
                    workload: workload.clone(),
                    upstream: upstream.clone(),
                    reason: reason.clone(),
                    ..RevokeRequest::default()
                },
                RevokeCommand::Credential {
                    credential_id,
                    reason,
                } => RevokeRequest {
                    kind: "credential".into(),
                    credential_id: credential_id.clone(),
                    reason: reason.clone(),
                    ..RevokeRequest::default()
                },
                RevokeCommand::Upstream { name, reason } => RevokeRequest {
                    kind: "upstream".into(),
                    upstream: name.clone(),
                    reason: reason.clone(),
                    ..RevokeRequest::default()
                },
            };
            let r: Revocation = post(cli, "/v1/revocations", &req).await?;
            let text = format!("revoked: {} (seq {})\n", r.id, r.seq);
            Output::new(&r, text)
        }
        Command::Restore {
            revocation_id,
            reason,
        } => {
            let r: Revocation = post(
                cli,
                &format!("/v1/revocations/{revocation_id}/restore"),
                &ReasonRequest {
                    reason: reason.clone(),
                },
            )
            .await?;
            let text = format!(
                "restored: {} (seq {})\n",
                revocation_id,
                or_null(r.restored.as_ref().map(|x| x.seq))
            );
            Output::new(&r, text)
        }
        Command::Revocations { all } => {
            let v: RevocationList = get(cli, &format!("/v1/revocations?all={all}")).await?;
            let rows = v
                .revocations
                .iter()
                .map(|r| {
                    vec![
                        r.id.clone(),
                        r.kind.clone(),
                        target(r),
                        r.seq.to_string(),
                        if r.active { "active" } else { "restored" }.to_owned(),
                        r.revoked_by.clone(),
                        r.reason.clone(),
                    ]
                })
                .collect();
            let text = table(
                &["ID", "KIND", "TARGET", "SEQ", "STATE", "BY", "REASON"],
                rows,
            );
            Output::new(&v, text)
        }
        Command::Status { revocation_id } => {
            let v: RevocationStatus = get(cli, &format!("/v1/revocations/{revocation_id}")).await?;
            let (r, p) = (&v.revocation, &v.propagation);
            let mut text = format!(
                "{} {} {} — {} (seq {})\nacknowledged by {} sidecar(s); {} connected sidecar(s) pending\n",
                r.id,
                r.kind,
                target(r),
                if r.active { "active" } else { "restored" },
                r.seq,
                p.acknowledged.len(),
                p.pending.len(),
            );
            let mut rows: Vec<Vec<String>> = p
                .acknowledged
                .iter()
                .map(|a| {
                    vec![
                        a.spiffe_id.clone(),
                        a.session_id.clone(),
                        "acknowledged".into(),
                        format!("{} ms", a.latency_ms),
                    ]
                })
                .collect();
            rows.extend(p.pending.iter().map(|a| {
                vec![
                    a.spiffe_id.clone(),
                    a.session_id.clone(),
                    "PENDING".into(),
                    format!("at seq {}", a.last_ack_seq),
                ]
            }));
            text.push_str(&table(&["SIDECAR", "SESSION", "STATE", "LATENCY"], rows));
            Output::new(&v, text)
        }
        Command::Sidecars => {
            let v: SidecarList = get(cli, "/v1/sidecars").await?;
            let rows = v
                .sidecars
                .iter()
                .map(|c| {
                    vec![
                        c.spiffe_id.clone(),
                        c.version.clone(),
                        c.last_ack_seq.to_string(),
                        ago(Some(c.last_heard_ms)),
                        c.session_id.clone(),
                        c.replica.clone(),
                    ]
                })
                .collect();
            let text = table(
                &[
                    "SPIFFE ID",
                    "VERSION",
                    "ACKED SEQ",
                    "LAST HEARD",
                    "SESSION",
                    "REPLICA",
                ],
                rows,
            );
            Output::new(&v, text)
        }
        Command::Replicas => {
            let v: ReplicaList = get(cli, "/v1/replicas").await?;
            let rows = v
                .replicas
                .iter()
                .map(|r| {
                    let state = match (r.live, r.stopped_at_ms) {
                        (true, _) => "live",
                        (false, Some(_)) => "stopped",
                        (false, None) => "gone",
                    };
                    vec![
                        format!("{}{}", r.id, if r.this { " (this)" } else { "" }),
                        state.into(),
                        r.sidecars.to_string(),
                        ago(Some(r.seen_at_ms)),
                        r.admin_addr.clone(),
                        r.sidecar_addr.clone(),
                        r.version.clone(),
                    ]
                })
                .collect();
            let text = table(
                &[
                    "REPLICA",
                    "STATE",
                    "SIDECARS",
                    "SEEN",
                    "ADMIN",
                    "SIDECAR API",
                    "VERSION",
                ],
                rows,
            );
            Output::new(&v, text)
        }
        Command::Leaked(LeakedCommand::Add { reason, file }) => {
            let req = LeakedRequest {
                value: read_secret(file.as_deref())?,
                reason: reason.clone(),
                existing_ok: false,
            };
            let r: Revocation = post(cli, "/v1/leaked", &req).await?;
            let text = format!("registered: {} (seq {})\n", r.id, r.seq);
            Output::new(&r, text)
        }
        Command::Leaked(LeakedCommand::List) => {
            let v: LeakedList = get(cli, "/v1/leaked").await?;
            let rows = v
                .leaked
                .iter()
                .map(|r| {
                    vec![
                        r.id.clone(),
                        or_null(r.fingerprint_id.as_ref()),
                        r.seq.to_string(),
                        r.revoked_by.clone(),
                        r.reason.clone(),
                    ]
                })
                .collect();
            let text = table(&["ID", "FINGERPRINT", "SEQ", "BY", "REASON"], rows);
            Output::new(&v, text)
        }
        Command::Leaked(LeakedCommand::Show { revocation_id }) => {
            let v: LeakedStatus = get(cli, &format!("/v1/leaked/{revocation_id}")).await?;
            let rows: Vec<Vec<String>> = v
                .sightings
                .iter()
                .map(|x| {
                    vec![
                        x.workload.clone(),
                        if x.upstream.is_empty() {
                            format!("({})", x.host)
                        } else {
                            x.upstream.clone()
                        },
                        x.location.clone(),
                        x.count.to_string(),
                        ago(Some(x.first_seen_ms)),
                        ago(Some(x.last_seen_ms)),
                    ]
                })
                .collect();
            let text = format!(
                "{} — {} workload/upstream pair(s) still sending it\n{}",
                v.revocation.id,
                rows.len(),
                table(
                    &[
                        "WORKLOAD",
                        "UPSTREAM",
                        "WHERE",
                        "COUNT",
                        "FIRST SEEN",
                        "LAST SEEN"
                    ],
                    rows
                )
            );
            Output::new(&v, text)
        }
        Command::Secret(
            SecretCommand::Put { upstream, file } | SecretCommand::Rotate { upstream, file },
        ) => {
            let req = SecretRequest {
                value: read_secret(file.as_deref())?,
            };
            let v: SecretStored = post(cli, &format!("/v1/secrets/{upstream}"), &req).await?;
            let text = format!("{upstream}: version {} is current\n", v.version);
            Output::new(&v, text)
        }
        Command::Secret(SecretCommand::RevokeVersion {
            upstream,
            version,
            reason,
        }) => {
            let r: Revocation = post(
                cli,
                &format!("/v1/secrets/{upstream}/versions/{version}/revoke"),
                &ReasonRequest {
                    reason: reason.clone(),
                },
            )
            .await?;
            let text = format!("revoked: {} (seq {})\n", r.id, r.seq);
            Output::new(&r, text)
        }
        Command::Secret(SecretCommand::List { upstream }) => {
            let v: SecretVersions = get(cli, &format!("/v1/secrets/{upstream}")).await?;
            let rows = v
                .versions
                .iter()
                .map(|x| {
                    let state = if x.current {
                        "current"
                    } else if x.revoked_at_ms.is_none() {
                        "superseded"
                    } else {
                        "revoked"
                    };
                    vec![
                        x.version.to_string(),
                        state.to_owned(),
                        x.created_by.clone(),
                        ago(Some(x.created_at_ms)),
                    ]
                })
                .collect();
            let mut text = table(&["VERSION", "STATE", "BY", "CREATED"], rows);
            if v.current.is_none() {
                text.push_str(&format!("\n{}: {}\n", upstream, v.state));
            }
            Output::new(&v, text)
        }
        Command::Secret(SecretCommand::Probes { upstream, version }) => {
            let v: ProbeResults = get(
                cli,
                &format!("/v1/secrets/{upstream}/versions/{version}/probes"),
            )
            .await?;
            let rows = v.probes.iter().map(probe_row).collect();
            let mut text = table(&["OUTCOME", "STATUS", "WHEN", "DETAIL"], rows);
            if v.probes.is_empty() {
                text = format!("{upstream} v{version}: never probed\n");
            }
            Output::new(&v, text)
        }
        Command::Secret(SecretCommand::Probe { upstream, version }) => {
            let r: ProbeResult = post(
                cli,
                &format!("/v1/secrets/{upstream}/versions/{version}/probe"),
                &serde_json::Map::new(),
            )
            .await?;
            let text = table(
                &["OUTCOME", "STATUS", "WHEN", "DETAIL"],
                vec![probe_row(&r)],
            );
            Output::new(&r, text)
        }
        Command::Usage(args) => return usage(cli, args).await,
        Command::Mission(MissionCommand::Evidence { id, out }) => {
            return export_evidence(cli, id, out).await;
        }
        Command::Mission(m) => return mission(cli, m).await,
        Command::Evidence(EvidenceCommand::Verify { file, jwks }) => {
            return verify_evidence(cli, file, jwks).await;
        }
        Command::Leaked(LeakedCommand::Import {
            format,
            report,
            root,
            mission,
            owner,
            window,
            deadline,
        }) => {
            let import = Import {
                format: *format,
                report,
                root: root.as_deref(),
                mission: mission.as_deref(),
                owner: owner.as_deref(),
                window: window.as_deref(),
                deadline: deadline.as_deref(),
            };
            return import_report(cli, &import).await;
        }
        Command::Stripped => {
            let v: StrippedReport = get(cli, "/v1/stripped").await?;
            let rows = v
                .stripped
                .iter()
                .map(|x| {
                    vec![
                        x.workload.clone(),
                        x.upstream.clone(),
                        x.count.to_string(),
                        ago(Some(x.last_seen_ms)),
                    ]
                })
                .collect();
            let mut text = table(&["WORKLOAD", "UPSTREAM", "COUNT", "LAST SEEN"], rows);
            let echoed: Vec<Vec<String>> = v
                .echoed
                .iter()
                .map(|x| {
                    vec![
                        x.workload.clone(),
                        x.upstream.clone(),
                        x.header.clone(),
                        x.count.to_string(),
                        ago(Some(x.last_seen_ms)),
                    ]
                })
                .collect();
            if !echoed.is_empty() {
                text.push_str("\nInjected credentials sent back by upstreams (removed before the workload saw them):\n");
                text.push_str(&table(
                    &["WORKLOAD", "UPSTREAM", "HEADER", "COUNT", "LAST SEEN"],
                    echoed,
                ));
            }
            Output::new(&v, text)
        }
        Command::Tokens(TokenCommand::Create { name, role }) => {
            let req = TokenRequest {
                name: name.clone(),
                role: role.clone(),
            };
            let v: TokenCreated = post(cli, "/v1/tokens", &req).await?;
            let text = format!("{}\n", v.token);
            Output::new(&v, text)
        }
        Command::Audit(AuditArgs {
            command: Some(AuditCommand::Head),
            ..
        }) => {
            let v: SignedHead = get(cli, "/v1/audit/head").await?;
            // The saved form is the JSON itself.
            let out = Output::new(&v, String::new());
            let text = format!(
                "{}\n",
                serde_json::to_string_pretty(&out.json).unwrap_or_default()
            );
            Output { text, ..out }
        }
        Command::Audit(AuditArgs {
            command: Some(AuditCommand::Verify { head }),
            ..
        }) => {
            let mut path = "/v1/audit/verify".to_owned();
            if let Some(file) = head {
                let saved: SignedHead = std::fs::read(file)
                    .ok()
                    .and_then(|b| serde_json::from_slice(&b).ok())
                    .ok_or_else(|| {
                        Failure::Usage(format!("{}: not a saved audit head", file.display()))
                    })?;
                if !saved.verify() {
                    println!("AUDIT HEAD FORGED: the saved head's signature does not verify");
                    return Err(Failure::Violations);
                }
                path = format!("{path}?id={}&hash={}", saved.id, saved.hash);
            }
            let v: AuditVerdict = get(cli, &path).await?;
            let text = if v.ok {
                format!(
                    "audit log intact: {} chained entries ({} from before the chain), {} signed anchors; head {}\n",
                    v.chained,
                    v.unchained,
                    v.anchors,
                    or_null(v.head.as_ref())
                )
            } else {
                format!(
                    "AUDIT LOG TAMPERED: entry {}: {}\n",
                    or_null(v.first_bad_id),
                    or_null(v.problem.as_ref())
                )
            };
            let intact = v.ok;
            print(cli, Output::new(&v, text));
            return if intact {
                Ok(())
            } else {
                Err(Failure::Violations)
            };
        }
        Command::Audit(AuditArgs { limit, .. }) => {
            let v: AuditLog = get(cli, &format!("/v1/audit?limit={limit}")).await?;
            let rows = v
                .entries
                .iter()
                .map(|e| {
                    vec![
                        ago(Some(e.at_ms)),
                        e.actor.clone(),
                        e.action.clone(),
                        e.status.to_string(),
                        e.detail.clone(),
                    ]
                })
                .collect();
            let text = table(&["WHEN", "ACTOR", "ACTION", "STATUS", "DETAIL"], rows);
            Output::new(&v, text)
        }
    };
    print(cli, out);
    Ok(())
}

fn print(cli: &Cli, out: Output) {
    if cli.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&out.json).unwrap_or_default()
        );
    } else {
        print!("{}", out.text);
    }
}

async fn usage(cli: &Cli, args: &UsageArgs) -> Result<(), Failure> {
    match &args.command {
        None => {
            let v: UsageSummary = get(cli, &format!("/v1/usage{}", args.filter.query())).await?;
            let rows = v
                .rows
                .iter()
                .map(|x| {
                    vec![
                        x.workload.clone(),
                        x.upstream.clone(),
                        x.credential_id.clone(),
                        format!("{} {}", x.method, x.status_class),
                        x.requests.to_string(),
                        ago(Some(x.last_seen_ms)),
                    ]
                })
                .collect();
            let mut text = table(
                &[
                    "WORKLOAD",
                    "UPSTREAM",
                    "CREDENTIAL",
                    "REQUEST",
                    "COUNT",
                    "LAST USE",
                ],
                rows,
            );
            text.push_str(&format!(
                "{} requests; {} dropped by sidecars before delivery\n",
                v.requests, v.dropped_requests
            ));
            print(cli, Output::new(&v, text));
        }
        Some(UsageCommand::Deps(filter)) => {
            let v: Dependencies =
                get(cli, &format!("/v1/usage/dependencies{}", filter.query())).await?;
            let rows = v
                .edges
                .iter()
                .map(|x| {
                    vec![
                        x.workload.clone(),
                        x.upstream.clone(),
                        x.credential_kind.clone(),
                        x.requests.to_string(),
                        x.errors.to_string(),
                        x.credentials.to_string(),
                        ago(Some(x.last_used_ms)),
                    ]
                })
                .collect();
            let text = table(
                &[
                    "WORKLOAD",
                    "UPSTREAM",
                    "KIND",
                    "REQUESTS",
                    "ERRORS",
                    "CREDENTIALS",
                    "LAST USE",
                ],
                rows,
            );
            print(cli, Output::new(&v, text));
        }
        Some(UsageCommand::Unused { since }) => {
            let q = UsageFilter {
                since: Some(since.clone()),
                ..UsageFilter::default()
            }
            .query();
            let v: UnusedGrants = get(cli, &format!("/v1/usage/unused-grants{q}")).await?;
            let rows = v
                .unused
                .iter()
                .map(|x| vec![x.workload.clone(), x.upstream.clone(), ago(x.last_used_ms)])
                .collect();
            let text = table(&["WORKLOAD", "UPSTREAM", "LAST USE EVER"], rows);
            print(cli, Output::new(&v, text));
        }
        Some(UsageCommand::AfterRevocation) => {
            let v: AfterRevocation = get(cli, "/v1/usage/after-revocation").await?;
            let rows = v
                .uses
                .iter()
                .map(|x| {
                    vec![
                        x.revocation_id.clone(),
                        x.workload.clone(),
                        x.upstream.clone(),
                        x.credential_id.clone(),
                        x.requests.to_string(),
                        ago(Some(x.last_seen_ms)),
                        if x.violation {
                            "VIOLATION".into()
                        } else {
                            "before ack".into()
                        },
                    ]
                })
                .collect();
            let mut text = table(
                &[
                    "REVOCATION",
                    "WORKLOAD",
                    "UPSTREAM",
                    "CREDENTIAL",
                    "REQUESTS",
                    "LAST USE",
                    "VERDICT",
                ],
                rows,
            );
            text.push_str(&format!("{} violation(s)\n", v.violations));
            let violations = v.violations;
            print(cli, Output::new(&v, text));
            if violations > 0 {
                return Err(Failure::Violations);
            }
        }
    }
    Ok(())
}

async fn posture(cli: &Cli, since: &str) -> Result<(), Failure> {
    let q = UsageFilter {
        since: Some(since.to_owned()),
        ..UsageFilter::default()
    }
    .query();
    let v: Posture = get(cli, &format!("/v1/posture{q}")).await?;
    let mut text = format!(
        "Posture of policy {} since {} ({})\n",
        v.policy_version,
        when(v.since_ms),
        ago(Some(v.since_ms))
    );
    text.push_str(&format!(
        "\nGrants nobody used ({}): remove them\n",
        v.unused_grants.len()
    ));
    let rows = v
        .unused_grants
        .iter()
        .map(|x| vec![x.workload.clone(), x.upstream.clone(), ago(x.last_used_ms)])
        .collect();
    text.push_str(&table(&["WORKLOAD", "UPSTREAM", "LAST USE EVER"], rows));
    text.push_str(&format!(
        "\nCredential lifetimes far above their use ({}): lower them\n",
        v.oversized_ttls.len()
    ));
    let rows = v
        .oversized_ttls
        .iter()
        .map(|x| {
            vec![
                x.upstream.clone(),
                secs(x.ttl_secs),
                span(x.longest_span_ms),
                secs(x.suggested_ttl_secs),
            ]
        })
        .collect();
    text.push_str(&table(
        &[
            "UPSTREAM",
            "TTL",
            "LONGEST USE OF ONE CREDENTIAL",
            "SUGGESTED",
        ],
        rows,
    ));
    text.push_str(&format!(
        "\nWorkloads still sending their own credential ({}): find and revoke that secret\n",
        v.own_secrets.len()
    ));
    let rows = v
        .own_secrets
        .iter()
        .map(|x| {
            vec![
                x.workload.clone(),
                x.upstream.clone(),
                x.count.to_string(),
                ago(Some(x.last_seen_ms)),
            ]
        })
        .collect();
    text.push_str(&table(
        &["WORKLOAD", "UPSTREAM", "COUNT", "LAST SEEN"],
        rows,
    ));
    if v.policy_diff.changed {
        text.push_str(
            "\nThe policy without them (check it with `leashctl policy check --against-usage`):\n",
        );
        text.push_str(&v.policy_diff.diff);
    } else {
        text.push_str("\nNothing to remove or narrow in the policy.\n");
    }
    print(cli, Output::new(&v, text));
    Ok(())
}

async fn check_against_usage(
    cli: &Cli,
    file: &std::path::Path,
    since: &str,
) -> Result<(), Failure> {
    let body = std::fs::read(file)
        .map_err(|e| Failure::Usage(format!("cannot read {}: {e}", file.display())))?;
    let q = form_urlencoded::Serializer::new(String::new())
        .append_pair("against_usage", since)
        .finish();
    let v: PolicyCheck = call(
        cli,
        "POST",
        &format!("/v1/policy/check?{q}"),
        Some(body),
        "application/yaml",
    )
    .await?;
    let mut text = format!(
        "{}: valid ({} upstreams, {} grants); checked against usage since {}\n",
        file.display(),
        v.upstreams,
        v.grants,
        when(v.since_ms)
    );
    if v.broken.is_empty() {
        text.push_str("no live consumer would break\n");
    } else {
        text.push_str(&format!(
            "{} live consumer(s) would break:\n",
            v.broken.len()
        ));
        let rows = v
            .broken
            .iter()
            .map(|x| {
                vec![
                    x.workload.clone(),
                    x.upstream.clone(),
                    x.reason.clone(),
                    x.requests.to_string(),
                    ago(Some(x.last_used_ms)),
                ]
            })
            .collect();
        text.push_str(&table(
            &["WORKLOAD", "UPSTREAM", "WHY", "REQUESTS", "LAST USE"],
            rows,
        ));
    }
    let breaks = !v.broken.is_empty();
    print(cli, Output::new(&v, text));
    if breaks {
        return Err(Failure::Violations);
    }
    Ok(())
}

/// Unix milliseconds as RFC 3339 (UTC, seconds).
fn when(ms: i64) -> String {
    let t =
        std::time::UNIX_EPOCH + std::time::Duration::from_millis(u64::try_from(ms).unwrap_or(0));
    humantime::format_rfc3339_seconds(t).to_string()
}

fn secs(s: u64) -> String {
    humantime::format_duration(std::time::Duration::from_secs(s)).to_string()
}

/// A span to the tenth of a second.
fn span(ms: i64) -> String {
    format!("{:.1}s", ms.max(0) as f64 / 1000.0)
}

/// A secret from a file or standard input, without its trailing newline.
fn read_secret(file: Option<&std::path::Path>) -> Result<zeroize::Zeroizing<String>, Failure> {
    use std::io::Read as _;
    let mut value = zeroize::Zeroizing::new(String::new());
    let read = match file {
        Some(path) => std::fs::File::open(path).and_then(|mut f| f.read_to_string(&mut value)),
        None => std::io::stdin().read_to_string(&mut value),
    };
    read.map_err(|e| Failure::Unreachable(format!("cannot read the value: {e}")))?;
    let trimmed = zeroize::Zeroizing::new(value.trim_end_matches(['\r', '\n']).to_owned());
    if trimmed.is_empty() {
        return Err(Failure::Usage(
            "no value on standard input (pipe it in, or use --file)".into(),
        ));
    }
    Ok(trimmed)
}

/// What a command prints: the answer as JSON (`--json`) or as text.
struct Output {
    json: serde_json::Value,
    text: String,
}

impl Output {
    fn new(answer: &impl Serialize, text: String) -> Self {
        Self {
            json: serde_json::to_value(answer).unwrap_or_default(),
            text,
        }
    }
}

/// An optional field as the text output shows it.
fn or_null(v: Option<impl std::fmt::Display>) -> String {
    v.map_or_else(|| "null".to_owned(), |v| v.to_string())
}

fn target(r: &Revocation) -> String {
    match r.kind.as_str() {
        "credential" => r.credential_id.clone(),
        "grant" => format!("{} -> {}", r.workload, r.upstream),
        "workload" => r.workload.clone(),
        _ => r.upstream.clone(),
    }
}

fn ago(ms: Option<i64>) -> String {
    let Some(ms) = ms.filter(|m| *m > 0) else {
        return "-".into();
    };
    let now = leash_control_plane::store::now_ms();
    format!("{:.1}s ago", (now - ms).max(0) as f64 / 1000.0)
}

fn table(header: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let mut out = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<w$}  "));
            }
        }
        out.trim_end().to_owned() + "\n"
    };
    let mut out = line(header.iter().map(|h| (*h).to_owned()).collect());
    for row in rows {
        out.push_str(&line(row));
    }
    out
}

async fn mission(cli: &Cli, cmd: &MissionCommand) -> Result<(), Failure> {
    let entries = |findings: &[Finding]| {
        findings
            .iter()
            .map(|f| FindingEntry {
                finding: f.clone(),
                note: serde_json::Value::Null,
            })
            .collect::<Vec<_>>()
    };
    let view: MissionView = match cmd {
        MissionCommand::List => {
            let v: MissionList = get(cli, "/v1/missions").await?;
            let rows = v
                .missions
                .iter()
                .map(|m| {
                    vec![
                        m.id.clone(),
                        if m.overdue {
                            format!("{} (OVERDUE)", m.state)
                        } else {
                            m.state.clone()
                        },
                        format!("{}/{}", m.criteria_holding, m.criteria),
                        m.findings.to_string(),
                        m.owner.clone(),
                        m.objective.clone(),
                    ]
                })
                .collect();
            let text = table(
                &["ID", "STATE", "CRITERIA", "FINDINGS", "OWNER", "OBJECTIVE"],
                rows,
            );
            print(cli, Output::new(&v, text));
            return Ok(());
        }
        MissionCommand::Create {
            objective,
            owner,
            deadline,
            window,
            findings,
        } => {
            let req = MissionRequest {
                objective: objective.clone(),
                owner: owner.clone(),
                deadline: deadline.clone(),
                window: window.clone(),
                findings: entries(findings),
            };
            post(cli, "/v1/missions", &req).await?
        }
        MissionCommand::Show { id } => get(cli, &format!("/v1/missions/{id}")).await?,
        MissionCommand::Add { id, findings } => {
            let req = FindingsRequest {
                findings: entries(findings),
            };
            post(cli, &format!("/v1/missions/{id}/findings"), &req).await?
        }
        MissionCommand::Evidence { .. } => return Ok(()),
        MissionCommand::Close { id, reason } | MissionCommand::Reopen { id, reason } => {
            let verb = if matches!(cmd, MissionCommand::Close { .. }) {
                "close"
            } else {
                "reopen"
            };
            let req = ReasonRequest {
                reason: reason.clone(),
            };
            post(cli, &format!("/v1/missions/{id}/{verb}"), &req).await?
        }
    };
    let text = mission_text(&view);
    print(cli, Output::new(&view, text));
    Ok(())
}

fn mission_text(m: &MissionView) -> String {
    let mut out = format!(
        "{}  {}{}{}\nobjective: {}\nowner: {}  deadline: {}  window: {} ms\n\n",
        m.id,
        m.state,
        if m.closed_by_hand { " (by hand)" } else { "" },
        if m.overdue { " OVERDUE" } else { "" },
        m.objective,
        m.owner,
        or_null(m.deadline_ms),
        m.window_ms,
    );
    let findings = m
        .findings
        .iter()
        .map(|f| {
            vec![
                f.seq.to_string(),
                serde_json::to_string(&f.finding).unwrap_or_default(),
            ]
        })
        .collect();
    out.push_str(&table(&["#", "FINDING"], findings));
    out.push('\n');
    let criteria = m
        .criteria
        .iter()
        .map(|c| {
            vec![
                c.finding.to_string(),
                c.criterion.clone(),
                if c.holds { "holds" } else { "NOT YET" }.to_owned(),
                c.detail.clone(),
            ]
        })
        .collect();
    out.push_str(&table(&["#", "CRITERION", "", "DETAIL"], criteria));
    out.push('\n');
    let changes = m
        .changes
        .iter()
        .map(|c| {
            vec![
                ago(Some(c.at_ms)),
                c.state.clone(),
                c.actor.clone(),
                c.reason.clone(),
            ]
        })
        .collect();
    out.push_str(&table(&["WHEN", "STATE", "BY", "WHY"], changes));
    out
}

/// What `leaked import` was asked to do.
struct Import<'a> {
    format: leash_control_plane::scanners::Format,
    report: &'a std::path::Path,
    root: Option<&'a std::path::Path>,
    mission: Option<&'a str>,
    owner: Option<&'a str>,
    window: Option<&'a str>,
    deadline: Option<&'a str>,
}

/// Largest scanner report read.
const MAX_REPORT: u64 = 64 * 1024 * 1024;
/// Locations kept with one finding (the count says how many there were).
const MAX_LOCATIONS: usize = 20;
/// Findings sent in one call.
const FINDINGS_PER_CALL: usize = 10;

async fn import_report(cli: &Cli, import: &Import<'_>) -> Result<(), Failure> {
    use leash_control_plane::scanners;
    let format_name = match import.format {
        scanners::Format::Gitleaks => "gitleaks",
        scanners::Format::Trufflehog => "trufflehog",
        scanners::Format::DetectSecrets => "detect-secrets",
    };
    let path = import.report;
    let size = std::fs::metadata(path)
        .map_err(|e| Failure::Usage(format!("cannot read {}: {e}", path.display())))?
        .len();
    if size > MAX_REPORT {
        return Err(Failure::Usage(format!(
            "{} is larger than {MAX_REPORT} bytes",
            path.display()
        )));
    }
    let bytes = zeroize::Zeroizing::new(
        std::fs::read(path)
            .map_err(|e| Failure::Usage(format!("cannot read {}: {e}", path.display())))?,
    );
    let root = import.root.unwrap_or_else(|| std::path::Path::new("."));
    // Everything is read and understood before anything is registered.
    let secrets = scanners::read(import.format, &bytes, root)
        .map_err(|e| Failure::Usage(format!("{}: {e}; nothing was registered", path.display())))?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut findings = Vec::new();
    let mut rows = Vec::new();
    for secret in &secrets {
        let first = &secret.locations[0];
        let req = LeakedRequest {
            value: secret.value.clone(),
            reason: format!(
                "found by {format_name} in {}:{} ({name})",
                first.file, first.line
            ),
            existing_ok: true,
        };
        let r: Revocation = post(cli, "/v1/leaked", &req).await?;
        rows.push(vec![
            r.id.clone(),
            format!("{}:{}", first.file, first.line),
            secret.locations.len().to_string(),
        ]);
        findings.push(FindingEntry {
            finding: Finding::Leaked {
                revocation_id: r.id.clone(),
            },
            note: serde_json::json!({
                "scanner": format_name,
                "report": name,
                "locations_total": secret.locations.len(),
                "locations": secret.locations.iter().take(MAX_LOCATIONS).collect::<Vec<_>>(),
            }),
        });
    }
    let mut chunks = findings.chunks(FINDINGS_PER_CALL);
    let mission_id = match import.mission {
        Some(id) => id.to_owned(),
        None => {
            let req = MissionRequest {
                objective: format!(
                    "Retire the {} secret(s) {format_name} found ({name})",
                    secrets.len()
                ),
                owner: import.owner.unwrap_or_default().to_owned(),
                deadline: import.deadline.map(str::to_owned),
                window: import.window.map(str::to_owned),
                findings: chunks.next().map(<[_]>::to_vec).unwrap_or_default(),
            };
            let m: MissionView = post(cli, "/v1/missions", &req).await?;
            m.id
        }
    };
    for chunk in chunks {
        let req = FindingsRequest {
            findings: chunk.to_vec(),
        };
        let _: MissionView =
            post(cli, &format!("/v1/missions/{mission_id}/findings"), &req).await?;
    }
    let summary = serde_json::json!({
        "mission": mission_id,
        "secrets": secrets.len(),
        "registered": rows.iter().map(|r| &r[0]).collect::<Vec<_>>(),
    });
    let mut text = format!(
        "{} secret(s) from {} finding(s) registered; mission {mission_id}\n",
        secrets.len(),
        secrets.iter().map(|s| s.locations.len()).sum::<usize>()
    );
    text.push_str(&table(&["REVOCATION", "FIRST FOUND", "PLACES"], rows));
    print(cli, Output::new(&summary, text));
    Ok(())
}

async fn export_evidence(cli: &Cli, id: &str, out: &std::path::Path) -> Result<(), Failure> {
    let signed: SignedEvidence = get(cli, &format!("/v1/missions/{id}/evidence")).await?;
    let evidence = decode_evidence(&signed)?;
    let json = serde_json::to_vec_pretty(&signed)
        .map_err(|e| Failure::Usage(format!("cannot encode the evidence: {e}")))?;
    std::fs::write(out, json)
        .map_err(|e| Failure::Usage(format!("cannot write {}: {e}", out.display())))?;
    let html = out.with_extension(match out.extension() {
        Some(e) => format!("{}.html", e.to_string_lossy()),
        None => "html".into(),
    });
    std::fs::write(&html, evidence_html(&evidence))
        .map_err(|e| Failure::Usage(format!("cannot write {}: {e}", html.display())))?;
    let summary = serde_json::json!({
        "mission": evidence.mission.id,
        "open": evidence.open,
        "file": out,
        "report": html,
    });
    let text = format!(
        "evidence of {} ({}) written to {} and {}\n",
        evidence.mission.id,
        if evidence.open { "OPEN" } else { "closed" },
        out.display(),
        html.display()
    );
    print(cli, Output::new(&summary, text));
    Ok(())
}

fn decode_evidence(signed: &SignedEvidence) -> Result<Evidence, Failure> {
    use base64::Engine as _;
    let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(&signed.payload)
        .map_err(|_| Failure::Usage("the evidence payload is not base64url".into()))?;
    serde_json::from_slice(&payload)
        .map_err(|e| Failure::Usage(format!("the evidence payload is not understood: {e}")))
}

async fn verify_evidence(cli: &Cli, file: &std::path::Path, jwks: &str) -> Result<(), Failure> {
    let read = |path: &std::path::Path| {
        std::fs::read(path)
            .map_err(|e| Failure::Usage(format!("cannot read {}: {e}", path.display())))
    };
    let signed: SignedEvidence = serde_json::from_slice(&read(file)?).map_err(|e| {
        Failure::Usage(format!("{} is not an evidence bundle: {e}", file.display()))
    })?;
    let keys: serde_json::Value = if jwks.starts_with("http://") || jwks.starts_with("https://") {
        fetch_json(cli, jwks).await?
    } else {
        serde_json::from_slice(&read(std::path::Path::new(jwks))?)
            .map_err(|e| Failure::Usage(format!("{jwks} is not a JWK Set: {e}")))?
    };
    match leash_control_plane::jwt::verify_evidence(&signed, &keys) {
        Ok((_, kid)) => {
            let evidence = decode_evidence(&signed)?;
            let summary = serde_json::json!({
                "valid": true,
                "kid": kid,
                "mission": evidence.mission.id,
                "open": evidence.open,
                "generated_at_ms": evidence.generated_at_ms,
            });
            let text = format!(
                "valid: evidence of mission {} ({}), signed by {kid}\n",
                evidence.mission.id,
                if evidence.open {
                    "OPEN when exported"
                } else {
                    "closed"
                },
            );
            print(cli, Output::new(&summary, text));
            Ok(())
        }
        Err(e) => {
            eprintln!("leashctl: INVALID: {e}");
            Err(Failure::Violations)
        }
    }
}

/// A JSON document by URL (the JWKS is public: no token is sent).
async fn fetch_json(cli: &Cli, url: &str) -> Result<serde_json::Value, Failure> {
    let req = http::Request::get(url)
        .body(Full::new(Bytes::new()))
        .map_err(|e| Failure::Usage(format!("bad URL {url}: {e}")))?;
    let client = Client::builder(TokioExecutor::new()).build(connector(cli)?);
    let resp = tokio::time::timeout(std::time::Duration::from_secs(30), client.request(req))
        .await
        .map_err(|_| Failure::Unreachable(format!("{url}: no answer within 30 s")))?
        .map_err(|e| Failure::Unreachable(format!("cannot reach {url}: {e}")))?;
    let bytes = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| Failure::Unreachable(format!("{url}: {e}")))?
        .to_bytes();
    serde_json::from_slice(&bytes)
        .map_err(|e| Failure::Unreachable(format!("{url}: not JSON: {e}")))
}

/// HTML-escapes text.
fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&#39;")
}

/// The evidence as one self-contained HTML page (inline style, no script,
/// no external assets).
fn evidence_html(e: &Evidence) -> String {
    let m = &e.mission;
    let mut h = String::with_capacity(16 * 1024);
    h.push_str("<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">");
    h.push_str("<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">");
    h.push_str(&format!("<title>Evidence: {}</title>", esc(&m.objective)));
    h.push_str("<style>body{font:15px/1.45 system-ui,sans-serif;margin:2rem auto;max-width:70rem;padding:0 1rem;color:#1b1b1b}table{border-collapse:collapse;width:100%;margin:.5rem 0 1.5rem}td,th{border:1px solid #ccc;padding:.3rem .5rem;text-align:left;vertical-align:top}th{background:#f2f2f2}.ok{color:#17652f;font-weight:600}.no{color:#a3191d;font-weight:600}code{font-size:.85em;word-break:break-all}.banner{padding:.6rem 1rem;border-radius:4px;margin:1rem 0}.open{background:#fdecea}.closed{background:#e8f5e9}</style></head><body>");
    h.push_str(&format!("<h1>{}</h1>", esc(&m.objective)));
    let state = if e.open { "open" } else { "closed" };
    h.push_str(&format!(
        "<div class=\"banner {state}\">Mission <code>{}</code> was <b>{}</b>{} when this evidence was taken ({} ms since the Unix epoch), by {}.</div>",
        esc(&m.id),
        state.to_uppercase(),
        if m.closed_by_hand { " (closed by hand)" } else { "" },
        e.generated_at_ms,
        esc(&e.issuer)
    ));
    h.push_str(&format!(
        "<p>Owner: {} &middot; deadline: {} &middot; window: {} ms{}</p>",
        esc(&m.owner),
        m.deadline_ms
            .map_or_else(|| "none".to_owned(), |d| d.to_string()),
        m.window_ms,
        if m.overdue {
            " &middot; <span class=\"no\">OVERDUE</span>"
        } else {
            ""
        }
    ));
    h.push_str(
        "<h2>Criteria</h2><table><tr><th>#</th><th>criterion</th><th></th><th>why</th></tr>",
    );
    for c in &m.criteria {
        h.push_str(&format!(
            "<tr><td>{}</td><td>{}</td><td class=\"{}\">{}</td><td>{}</td></tr>",
            c.finding,
            esc(&c.criterion),
            if c.holds { "ok" } else { "no" },
            if c.holds { "holds" } else { "not yet" },
            esc(&c.detail)
        ));
    }
    h.push_str("</table><h2>Findings</h2><table><tr><th>#</th><th>finding</th><th>noted</th></tr>");
    for f in &m.findings {
        h.push_str(&format!(
            "<tr><td>{}</td><td><code>{}</code></td><td><code>{}</code></td></tr>",
            f.seq,
            esc(&serde_json::to_string(&f.finding).unwrap_or_default()),
            esc(&f.note.to_string())
        ));
    }
    h.push_str("</table><h2>Revocations and their acknowledgements</h2>");
    for r in &e.revocations {
        h.push_str(&format!(
            "<h3><code>{}</code> ({}, seq {})</h3><p>{}</p><table><tr><th>sidecar</th><th>acknowledged at</th><th>latency</th></tr>",
            esc(&r.revocation.id),
            esc(&r.revocation.kind),
            r.revocation.seq,
            esc(&r.revocation.reason)
        ));
        for a in &r.propagation.acknowledged {
            h.push_str(&format!(
                "<tr><td>{}</td><td>{}</td><td>{} ms</td></tr>",
                esc(&a.spiffe_id),
                a.acked_at_ms,
                a.latency_ms
            ));
        }
        for p in &r.propagation.pending {
            h.push_str(&format!(
                "<tr><td>{}</td><td class=\"no\">not yet</td><td></td></tr>",
                esc(&p.spiffe_id)
            ));
        }
        h.push_str("</table>");
    }
    h.push_str("<h2>History</h2><table><tr><th>at</th><th>state</th><th>by</th><th>why</th></tr>");
    for c in &m.changes {
        h.push_str(&format!(
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            c.at_ms,
            esc(&c.state),
            esc(&c.actor),
            esc(&c.reason)
        ));
    }
    h.push_str("</table><h2>Audit entries</h2><table><tr><th>id</th><th>at</th><th>actor</th><th>action</th><th>chain hash</th></tr>");
    for a in &e.audit {
        h.push_str(&format!(
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td><code>{}</code></td></tr>",
            a.id,
            a.entry.at_ms,
            esc(&a.entry.actor),
            esc(&a.entry.action),
            esc(a.hash.as_deref().unwrap_or("(before the chain)"))
        ));
    }
    h.push_str(&format!(
        "</table><p>Audit chain {} up to entry {} (head <code>{}</code>){}.</p>",
        if e.audit_chain.verified {
            "verified"
        } else {
            "<span class=\"no\">BROKEN</span>"
        },
        e.audit_chain
            .head_id
            .map_or_else(String::new, |i| i.to_string()),
        esc(e.audit_chain.head.as_deref().unwrap_or("")),
        if e.audit_chain.signed.is_some() {
            ", head signed with the audit anchor key"
        } else {
            ""
        }
    ));
    h.push_str("<p>This page is a rendering. The signed bundle beside it is the evidence: <code>leashctl evidence verify FILE --jwks URL</code>.</p></body></html>\n");
    h
}
