//! `leashctl`: the operator's and responder's command line.

use std::process::ExitCode;

use bytes::Bytes;
use clap::Parser as _;
use http_body_util::{BodyExt as _, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use leash_control_plane::cli::{
    AuditArgs, AuditCommand, LeakedCommand, LeashctlCli as Cli, LeashctlCommand as Command,
    PolicyCommand, RevokeCommand, SecretCommand, TokenCommand, UsageArgs, UsageCommand,
    UsageFilter,
};
use serde_json::{Value, json};

/// Exit codes scripts can rely on.
const REFUSED: u8 = 1;
const UNREACHABLE: u8 = 3;

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::Policy(PolicyCommand::Check { file }) = &cli.command {
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
            let message = body["message"].as_str().unwrap_or("");
            let code = body["error"].as_str().unwrap_or("error");
            eprintln!("leashctl: {status} {code}: {message}");
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
    Refused(u16, Value),
    Unreachable(String),
    Usage(String),
    /// The command worked and found something a script should fail on.
    Violations,
}

async fn call(cli: &Cli, method: &str, path: &str, body: Option<Value>) -> Result<Value, Failure> {
    let url = format!("{}{}", cli.addr.trim_end_matches('/'), path);
    let mut req = http::Request::builder()
        .method(method)
        .uri(&url)
        .header("content-type", "application/json");
    if let Some(token) = &cli.token {
        req = req.header("authorization", format!("Bearer {token}"));
    }
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let req = req
        .body(Full::new(Bytes::from(body)))
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
    let value: Value = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| json!({"message": String::from_utf8_lossy(&bytes)}));
    match status {
        200..=299 => Ok(value),
        400..=499 => Err(Failure::Refused(status, value)),
        _ => Err(Failure::Unreachable(format!(
            "{url}: {status} {}",
            value["message"].as_str().unwrap_or("")
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
        Command::Policy(_) => return Ok(()),
        Command::Revoke(r) => {
            let body = match r {
                RevokeCommand::Workload { spiffe_id, reason } => {
                    json!({"kind": "workload", "workload": spiffe_id, "reason": reason})
                }
                RevokeCommand::Grant {
                    workload,
                    upstream,
                    reason,
                } => {
                    json!({"kind": "grant", "workload": workload, "upstream": upstream, "reason": reason})
                }
                RevokeCommand::Credential {
                    credential_id,
                    reason,
                } => {
                    json!({"kind": "credential", "credential_id": credential_id, "reason": reason})
                }
                RevokeCommand::Upstream { name, reason } => {
                    json!({"kind": "upstream", "upstream": name, "reason": reason})
                }
            };
            let v = call(cli, "POST", "/v1/revocations", Some(body)).await?;
            Output::new(
                v.clone(),
                format!(
                    "revoked: {} (seq {})\n",
                    v["id"].as_str().unwrap_or("?"),
                    v["seq"]
                ),
            )
        }
        Command::Restore {
            revocation_id,
            reason,
        } => {
            let v = call(
                cli,
                "POST",
                &format!("/v1/revocations/{revocation_id}/restore"),
                Some(json!({"reason": reason})),
            )
            .await?;
            Output::new(
                v.clone(),
                format!(
                    "restored: {} (seq {})\n",
                    revocation_id, v["restored"]["seq"]
                ),
            )
        }
        Command::Revocations { all } => {
            let v = call(cli, "GET", &format!("/v1/revocations?all={all}"), None).await?;
            let rows = v["revocations"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|r| {
                    vec![
                        s(&r["id"]),
                        s(&r["kind"]),
                        target(r),
                        r["seq"].to_string(),
                        if r["active"].as_bool() == Some(true) {
                            "active"
                        } else {
                            "restored"
                        }
                        .to_owned(),
                        s(&r["revoked_by"]),
                        s(&r["reason"]),
                    ]
                })
                .collect();
            Output::new(
                v,
                table(
                    &["ID", "KIND", "TARGET", "SEQ", "STATE", "BY", "REASON"],
                    rows,
                ),
            )
        }
        Command::Status { revocation_id } => {
            let v = call(
                cli,
                "GET",
                &format!("/v1/revocations/{revocation_id}"),
                None,
            )
            .await?;
            let p = &v["propagation"];
            let mut text = format!(
                "{} {} {} — {} (seq {})\nacknowledged by {} sidecar(s); {} connected sidecar(s) pending\n",
                s(&v["id"]),
                s(&v["kind"]),
                target(&v),
                if v["active"].as_bool() == Some(true) {
                    "active"
                } else {
                    "restored"
                },
                v["seq"],
                p["acknowledged"].as_array().map_or(0, Vec::len),
                p["pending"].as_array().map_or(0, Vec::len),
            );
            let mut rows: Vec<Vec<String>> = p["acknowledged"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|a| {
                    vec![
                        s(&a["spiffe_id"]),
                        s(&a["session_id"]),
                        "acknowledged".into(),
                        format!("{} ms", a["latency_ms"]),
                    ]
                })
                .collect();
            rows.extend(p["pending"].as_array().into_iter().flatten().map(|a| {
                vec![
                    s(&a["spiffe_id"]),
                    s(&a["session_id"]),
                    "PENDING".into(),
                    format!("at seq {}", a["last_ack_seq"]),
                ]
            }));
            text.push_str(&table(&["SIDECAR", "SESSION", "STATE", "LATENCY"], rows));
            Output::new(v, text)
        }
        Command::Sidecars => {
            let v = call(cli, "GET", "/v1/sidecars", None).await?;
            let rows = v["sidecars"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|c| {
                    vec![
                        s(&c["spiffe_id"]),
                        s(&c["version"]),
                        c["last_ack_seq"].to_string(),
                        ago(c["last_heard_ms"].as_i64()),
                        s(&c["session_id"]),
                    ]
                })
                .collect();
            Output::new(
                v,
                table(
                    &["SPIFFE ID", "VERSION", "ACKED SEQ", "LAST HEARD", "SESSION"],
                    rows,
                ),
            )
        }
        Command::Leaked(LeakedCommand::Add { reason, file }) => {
            let value = read_secret(file.as_deref())?;
            let v = call(
                cli,
                "POST",
                "/v1/leaked",
                Some(json!({"value": &*value, "reason": reason})),
            )
            .await?;
            Output::new(
                v.clone(),
                format!("registered: {} (seq {})\n", s(&v["id"]), v["seq"]),
            )
        }
        Command::Leaked(LeakedCommand::List) => {
            let v = call(cli, "GET", "/v1/leaked", None).await?;
            let rows = v["leaked"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|r| {
                    vec![
                        s(&r["id"]),
                        s(&r["fingerprint_id"]),
                        r["seq"].to_string(),
                        s(&r["revoked_by"]),
                        s(&r["reason"]),
                    ]
                })
                .collect();
            Output::new(
                v,
                table(&["ID", "FINGERPRINT", "SEQ", "BY", "REASON"], rows),
            )
        }
        Command::Leaked(LeakedCommand::Show { revocation_id }) => {
            let v = call(cli, "GET", &format!("/v1/leaked/{revocation_id}"), None).await?;
            let rows: Vec<Vec<String>> = v["sightings"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|x| {
                    vec![
                        s(&x["workload"]),
                        if s(&x["upstream"]).is_empty() {
                            format!("({})", s(&x["host"]))
                        } else {
                            s(&x["upstream"])
                        },
                        s(&x["location"]),
                        x["count"].to_string(),
                        ago(x["first_seen_ms"].as_i64()),
                        ago(x["last_seen_ms"].as_i64()),
                    ]
                })
                .collect();
            let text = format!(
                "{} — {} workload/upstream pair(s) still sending it\n{}",
                s(&v["id"]),
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
            Output::new(v, text)
        }
        Command::Secret(
            SecretCommand::Put { upstream, file } | SecretCommand::Rotate { upstream, file },
        ) => {
            let value = read_secret(file.as_deref())?;
            let v = call(
                cli,
                "POST",
                &format!("/v1/secrets/{upstream}"),
                Some(json!({"value": &*value})),
            )
            .await?;
            Output::new(
                v.clone(),
                format!("{upstream}: version {} is current\n", v["version"]),
            )
        }
        Command::Secret(SecretCommand::RevokeVersion {
            upstream,
            version,
            reason,
        }) => {
            let v = call(
                cli,
                "POST",
                &format!("/v1/secrets/{upstream}/versions/{version}/revoke"),
                Some(json!({"reason": reason})),
            )
            .await?;
            Output::new(
                v.clone(),
                format!("revoked: {} (seq {})\n", s(&v["id"]), v["seq"]),
            )
        }
        Command::Secret(SecretCommand::List { upstream }) => {
            let v = call(cli, "GET", &format!("/v1/secrets/{upstream}"), None).await?;
            let rows = v["versions"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|x| {
                    let state = if x["current"] == true {
                        "current"
                    } else if x["revoked_at_ms"].is_null() {
                        "superseded"
                    } else {
                        "revoked"
                    };
                    vec![
                        x["version"].to_string(),
                        state.to_owned(),
                        s(&x["created_by"]),
                        ago(x["created_at_ms"].as_i64()),
                    ]
                })
                .collect();
            let mut text = table(&["VERSION", "STATE", "BY", "CREATED"], rows);
            if v["current"].is_null() {
                text.push_str(&format!("\n{}: {}\n", upstream, s(&v["state"])));
            }
            Output::new(v, text)
        }
        Command::Usage(args) => return usage(cli, args).await,
        Command::Stripped => {
            let v = call(cli, "GET", "/v1/stripped", None).await?;
            let rows = v["stripped"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|x| {
                    vec![
                        s(&x["workload"]),
                        s(&x["upstream"]),
                        x["count"].to_string(),
                        ago(x["last_seen_ms"].as_i64()),
                    ]
                })
                .collect();
            let mut text = table(&["WORKLOAD", "UPSTREAM", "COUNT", "LAST SEEN"], rows);
            let echoed: Vec<Vec<String>> = v["echoed"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|x| {
                    vec![
                        s(&x["workload"]),
                        s(&x["upstream"]),
                        s(&x["header"]),
                        x["count"].to_string(),
                        ago(x["last_seen_ms"].as_i64()),
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
            Output::new(v, text)
        }
        Command::Tokens(TokenCommand::Create { name, role }) => {
            let v = call(
                cli,
                "POST",
                "/v1/tokens",
                Some(json!({"name": name, "role": role})),
            )
            .await?;
            Output::new(v.clone(), format!("{}\n", s(&v["token"])))
        }
        Command::Audit(AuditArgs {
            command: Some(AuditCommand::Head),
            ..
        }) => {
            let v = call(cli, "GET", "/v1/audit/head", None).await?;
            // The saved form is the JSON itself.
            let text = format!("{}\n", serde_json::to_string_pretty(&v).unwrap_or_default());
            Output::new(v, text)
        }
        Command::Audit(AuditArgs {
            command: Some(AuditCommand::Verify { head }),
            ..
        }) => {
            let mut path = "/v1/audit/verify".to_owned();
            if let Some(file) = head {
                let saved: leash_control_plane::anchor::SignedHead = std::fs::read(file)
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
            let v = call(cli, "GET", &path, None).await?;
            let text = if v["ok"].as_bool() == Some(true) {
                format!(
                    "audit log intact: {} chained entries ({} from before the chain), {} signed anchors; head {}\n",
                    v["chained"],
                    v["unchained"],
                    v["anchors"],
                    s(&v["head"])
                )
            } else {
                format!(
                    "AUDIT LOG TAMPERED: entry {}: {}\n",
                    v["first_bad_id"],
                    s(&v["problem"])
                )
            };
            let intact = v["ok"].as_bool() == Some(true);
            print(cli, Output::new(v, text));
            return if intact {
                Ok(())
            } else {
                Err(Failure::Violations)
            };
        }
        Command::Audit(AuditArgs { limit, .. }) => {
            let v = call(cli, "GET", &format!("/v1/audit?limit={limit}"), None).await?;
            let rows = v["entries"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|e| {
                    vec![
                        ago(e["at_ms"].as_i64()),
                        s(&e["actor"]),
                        s(&e["action"]),
                        e["status"].to_string(),
                        s(&e["detail"]),
                    ]
                })
                .collect();
            Output::new(
                v,
                table(&["WHEN", "ACTOR", "ACTION", "STATUS", "DETAIL"], rows),
            )
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
    let rows_of = |v: &Value, key: &str, f: &dyn Fn(&Value) -> Vec<String>| -> Vec<Vec<String>> {
        v[key].as_array().into_iter().flatten().map(f).collect()
    };
    match &args.command {
        None => {
            let v = call(
                cli,
                "GET",
                &format!("/v1/usage{}", args.filter.query()),
                None,
            )
            .await?;
            let rows = rows_of(&v, "rows", &|x| {
                vec![
                    s(&x["workload"]),
                    s(&x["upstream"]),
                    s(&x["credential_id"]),
                    format!("{} {}", s(&x["method"]), s(&x["status_class"])),
                    x["requests"].to_string(),
                    ago(x["last_seen_ms"].as_i64()),
                ]
            });
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
                v["requests"], v["dropped_requests"]
            ));
            print(cli, Output::new(v, text));
        }
        Some(UsageCommand::Deps(filter)) => {
            let v = call(
                cli,
                "GET",
                &format!("/v1/usage/dependencies{}", filter.query()),
                None,
            )
            .await?;
            let rows = rows_of(&v, "edges", &|x| {
                vec![
                    s(&x["workload"]),
                    s(&x["upstream"]),
                    s(&x["credential_kind"]),
                    x["requests"].to_string(),
                    x["errors"].to_string(),
                    x["credentials"].to_string(),
                    ago(x["last_used_ms"].as_i64()),
                ]
            });
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
            print(cli, Output::new(v, text));
        }
        Some(UsageCommand::Unused { since }) => {
            let q = UsageFilter {
                since: Some(since.clone()),
                ..UsageFilter::default()
            }
            .query();
            let v = call(cli, "GET", &format!("/v1/usage/unused-grants{q}"), None).await?;
            let rows = rows_of(&v, "unused", &|x| {
                vec![
                    s(&x["workload"]),
                    s(&x["upstream"]),
                    ago(x["last_used_ms"].as_i64()),
                ]
            });
            let text = table(&["WORKLOAD", "UPSTREAM", "LAST USE EVER"], rows);
            print(cli, Output::new(v, text));
        }
        Some(UsageCommand::AfterRevocation) => {
            let v = call(cli, "GET", "/v1/usage/after-revocation", None).await?;
            let rows = rows_of(&v, "uses", &|x| {
                vec![
                    s(&x["revocation_id"]),
                    s(&x["workload"]),
                    s(&x["upstream"]),
                    s(&x["credential_id"]),
                    x["requests"].to_string(),
                    ago(x["last_seen_ms"].as_i64()),
                    if x["violation"].as_bool() == Some(true) {
                        "VIOLATION".into()
                    } else {
                        "before ack".into()
                    },
                ]
            });
            let violations = v["violations"].as_u64().unwrap_or(0);
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
            text.push_str(&format!("{violations} violation(s)\n"));
            print(cli, Output::new(v, text));
            if violations > 0 {
                return Err(Failure::Violations);
            }
        }
    }
    Ok(())
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

struct Output {
    json: Value,
    text: String,
}

impl Output {
    fn new(json: Value, text: String) -> Self {
        Self { json, text }
    }
}

fn s(v: &Value) -> String {
    v.as_str().map_or_else(|| v.to_string(), str::to_owned)
}

fn target(r: &Value) -> String {
    match r["kind"].as_str() {
        Some("credential") => s(&r["credential_id"]),
        Some("grant") => format!("{} -> {}", s(&r["workload"]), s(&r["upstream"])),
        Some("workload") => s(&r["workload"]),
        _ => s(&r["upstream"]),
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
