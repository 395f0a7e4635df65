//! Keeps `deploy/` honest: every flag and environment variable that a
//! container file, Kubernetes manifest or systemd unit passes to a Leash
//! binary must exist in that binary and parse; every Kubernetes manifest is
//! valid against the Kubernetes schemas (`kubernetes-validate`, from PyPI);
//! the PostgreSQL manifest runs replicas that survive losing a node, the
//! SQLite one a single replica.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test stops at the first failed step, with its message"
)]

use std::path::{Path, PathBuf};
use std::process::Command;

use clap::{CommandFactory as _, Parser as _};

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// Read by `leash-control-plane` itself, never through a flag, so that the
/// key never appears on a command line.
const READ_DIRECTLY: [&str; 1] = ["LEASH_MASTER_KEY"];

/// A Kubernetes manifest and its resources (YAML documents that are not
/// empty).
struct Manifest {
    path: PathBuf,
    text: String,
    resources: Vec<serde_yaml_ng::Value>,
}

impl Manifest {
    fn read(path: PathBuf) -> Self {
        let text = std::fs::read_to_string(&path).unwrap();
        let resources = serde_yaml_ng::Deserializer::from_str(&text)
            .map(|doc| {
                serde::Deserialize::deserialize(doc)
                    .unwrap_or_else(|e| panic!("{}: invalid YAML: {e}", path.display()))
            })
            .filter(|doc: &serde_yaml_ng::Value| !doc.is_null())
            .collect();
        Self {
            path,
            text,
            resources,
        }
    }

    fn named(file: &str) -> Self {
        Self::read(deploy_dir().join("kubernetes").join(file))
    }

    fn resource(&self, kind: &str) -> &serde_yaml_ng::Value {
        self.resources
            .iter()
            .find(|r| r["kind"] == kind)
            .unwrap_or_else(|| panic!("{}: no {kind}", self.path.display()))
    }

    /// The value a variable taken from a Secret gets when the Secret is made
    /// as the manifest's comments say (`kubectl create secret generic NAME
    /// --from-literal=KEY=VALUE`): the test parses that in its place, so the
    /// documented command must exist and give a value the binary accepts.
    fn documented_secret(&self, name: &str, key: &str) -> Option<String> {
        let start = self.text.find(&format!("create secret generic {name} "))?;
        // That command only, up to the next one.
        let command = &self.text[start..];
        let command = &command[..command.find("kubectl").unwrap_or(command.len())];
        let value = command
            .split_once(&format!("--from-literal={key}="))?
            .1
            .split_whitespace()
            .next()?;
        Some(value.trim_matches(['\'', '"']).to_owned())
    }
}

/// Every file in `deploy/kubernetes/`.
fn manifests() -> Vec<Manifest> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(deploy_dir().join("kubernetes"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    paths.sort();
    paths.into_iter().map(Manifest::read).collect()
}

/// One invocation found in a deploy file.
#[derive(Debug)]
struct Invocation {
    source: String,
    binary: String,
    args: Vec<String>,
    env: Vec<(String, String)>,
    /// Whether the invocation is complete (an image's defaults are not: the
    /// deployment adds identity and addresses).
    complete: bool,
}

/// Finds the argument whose `env` is `name`, in the command or the subcommand used.
fn flag_for_env(cmd: &clap::Command, sub: Option<&str>, name: &str) -> Option<String> {
    let scope = match sub {
        Some(s) => cmd.find_subcommand(s)?,
        None => cmd,
    };
    scope
        .get_arguments()
        .chain(cmd.get_arguments())
        .find(|a| a.get_env().is_some_and(|e| e == name))
        .and_then(|a| a.get_long())
        .map(|l| format!("--{l}"))
}

fn check(inv: &Invocation) {
    let mut argv = vec![inv.binary.clone()];
    argv.extend(inv.args.iter().cloned());
    let leash_env = |k: &str| k.starts_with("LEASH_") || k == "SPIFFE_ENDPOINT_SOCKET";
    match inv.binary.as_str() {
        "leash-proxy" => {
            let cmd = leash_proxy::cli::Cli::command();
            for (k, v) in inv.env.iter().filter(|(k, _)| leash_env(k)) {
                let flag = flag_for_env(&cmd, None, k).unwrap_or_else(|| {
                    panic!(
                        "{}: leash-proxy reads no environment variable {k}",
                        inv.source
                    )
                });
                argv.push(format!("{flag}={v}"));
            }
            let cli = leash_proxy::cli::Cli::try_parse_from(&argv)
                .unwrap_or_else(|e| panic!("{}: leash-proxy rejects {argv:?}:\n{e}", inv.source));
            if inv.complete {
                cli.config().unwrap_or_else(|e| {
                    panic!("{}: leash-proxy configuration invalid: {e:#}", inv.source)
                });
            }
            cli.upstream_listeners().unwrap();
        }
        "leash-control-plane" => {
            let cmd = leash_control_plane::cli::Cli::command();
            let sub = inv.args.first().map(String::as_str);
            for (k, v) in inv
                .env
                .iter()
                .filter(|(k, _)| leash_env(k) && !READ_DIRECTLY.contains(&k.as_str()))
            {
                let flag = flag_for_env(&cmd, sub, k).unwrap_or_else(|| {
                    panic!(
                        "{}: leash-control-plane {sub:?} reads no environment variable {k}",
                        inv.source
                    )
                });
                argv.push(format!("{flag}={v}"));
            }
            leash_control_plane::cli::Cli::try_parse_from(&argv).unwrap_or_else(|e| {
                panic!("{}: leash-control-plane rejects {argv:?}:\n{e}", inv.source)
            });
        }
        other => panic!("{}: unknown binary {other}", inv.source),
    }
}

fn binary_of(image_or_path: &str) -> Option<String> {
    ["leash-control-plane", "leash-proxy"]
        .into_iter()
        .find(|b| image_or_path.contains(b))
        .map(str::to_owned)
}

fn kubernetes() -> Vec<Invocation> {
    let mut found = Vec::new();
    for manifest in manifests() {
        for doc in &manifest.resources {
            let containers = &doc["spec"]["template"]["spec"]["containers"];
            for c in containers.as_sequence().into_iter().flatten() {
                let image = c["image"].as_str().unwrap_or_default();
                let Some(binary) = binary_of(image) else {
                    continue;
                };
                let source = format!(
                    "{} ({})",
                    manifest.path.display(),
                    c["name"].as_str().unwrap_or("?")
                );
                let strings = |v: &serde_yaml_ng::Value| -> Vec<String> {
                    v.as_sequence()
                        .into_iter()
                        .flatten()
                        .map(|s| s.as_str().expect("string arg").to_owned())
                        .collect()
                };
                let env = c["env"]
                    .as_sequence()
                    .into_iter()
                    .flatten()
                    .map(|e| {
                        let name = e["name"].as_str().unwrap().to_owned();
                        let secret = &e["valueFrom"]["secretKeyRef"];
                        let value = if let Some(v) = e["value"].as_str() {
                            v.to_owned()
                        } else if READ_DIRECTLY.contains(&name.as_str()) {
                            String::new()
                        } else if let (Some(secret), Some(key)) =
                            (secret["name"].as_str(), secret["key"].as_str())
                        {
                            manifest.documented_secret(secret, key).unwrap_or_else(|| {
                                panic!(
                                    "{source}: {name} comes from Secret {secret}, key {key}: \
                                     document how to make it in a comment \
                                     (kubectl create secret generic {secret} --from-literal={key}=…)"
                                )
                            })
                        } else {
                            panic!("{source}: {name} has neither a value nor a secretKeyRef")
                        };
                        (name, value)
                    })
                    .collect();
                found.push(Invocation {
                    source,
                    binary,
                    args: strings(&c["args"]),
                    env,
                    complete: true,
                });
            }
        }
    }
    found
}

fn systemd() -> Vec<Invocation> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(deploy_dir().join("systemd")).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        let env = text
            .lines()
            .filter_map(|l| l.strip_prefix("Environment="))
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        let exec = text
            .lines()
            .find_map(|l| l.strip_prefix("ExecStart="))
            .unwrap_or_else(|| panic!("{}: no ExecStart", path.display()));
        let mut words = exec.split_whitespace();
        let binary = binary_of(words.next().unwrap()).expect("a leash binary");
        found.push(Invocation {
            source: path.display().to_string(),
            binary,
            args: words.map(str::to_owned).collect(),
            env,
            complete: true,
        });
    }
    found
}

fn dockerfiles() -> Vec<Invocation> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(deploy_dir().join("docker")).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        let json_line = |prefix: &str| -> Vec<String> {
            text.lines()
                .find_map(|l| l.strip_prefix(prefix))
                .map(|v| serde_json::from_str(v.trim()).expect("exec-form JSON array"))
                .unwrap_or_default()
        };
        let entrypoint = json_line("ENTRYPOINT ");
        let binary = binary_of(&entrypoint[0]).expect("a leash binary");
        // Every binary the image copies in must be one the workspace builds.
        for copied in text.lines().filter(|l| l.starts_with("COPY --from=build")) {
            let bin = copied.split('/').next_back().unwrap_or_default().trim();
            assert!(
                ["leash-proxy", "leash-control-plane", "leashctl"].contains(&bin),
                "{}: copies unknown binary {bin}",
                path.display()
            );
        }
        let mut args: Vec<String> = entrypoint[1..].to_vec();
        args.extend(json_line("CMD "));
        let env = text
            .lines()
            .filter_map(|l| l.strip_prefix("ENV "))
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        found.push(Invocation {
            source: path.display().to_string(),
            binary,
            args,
            env,
            complete: false,
        });
    }
    found
}

#[test]
fn every_deploy_file_passes_flags_the_binaries_accept() {
    let all: Vec<Invocation> = kubernetes()
        .into_iter()
        .chain(systemd())
        .chain(dockerfiles())
        .collect();
    assert!(
        all.iter().filter(|i| i.binary == "leash-proxy").count() >= 3,
        "{all:#?}"
    );
    assert!(
        all.iter()
            .filter(|i| i.binary == "leash-control-plane")
            .count()
            >= 3,
        "{all:#?}"
    );
    for inv in &all {
        check(inv);
    }
}

#[test]
fn the_check_catches_a_wrong_flag() {
    let result = std::panic::catch_unwind(|| {
        check(&Invocation {
            source: "test".into(),
            binary: "leash-proxy".into(),
            args: vec!["--listen-addr=127.0.0.1:1".into()],
            env: vec![("SPIFFE_ENDPOINT_SOCKET".into(), "unix:///x".into())],
            complete: true,
        })
    });
    assert!(result.is_err());
    let result = std::panic::catch_unwind(|| {
        check(&Invocation {
            source: "test".into(),
            binary: "leash-proxy".into(),
            args: vec![],
            env: vec![
                ("SPIFFE_ENDPOINT_SOCKET".into(), "unix:///x".into()),
                ("LEASH_NO_SUCH_THING".into(), "1".into()),
            ],
            complete: true,
        })
    });
    assert!(result.is_err());
}

/// Runs `kubernetes-validate --strict` (unknown fields are errors) on
/// `files`. Ok only if every resource of every file was validated: the tool
/// only warns, and exits 0, for a kind it has no schema for.
fn schema_check(files: &[Manifest]) -> Result<(), String> {
    let found = Command::new("kubernetes-validate")
        .arg("--version")
        .output();
    assert!(
        found.is_ok_and(|o| o.status.success()),
        "kubernetes-validate is not on PATH: pip install kubernetes-validate (.ci/run does)"
    );
    let out = Command::new("kubernetes-validate")
        .arg("--strict")
        .args(files.iter().map(|m| &m.path))
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        return Err(text);
    }
    if let Some(line) = text
        .lines()
        .find(|l| !l.trim().is_empty() && !l.contains(" passed for resource "))
    {
        return Err(format!("not a pass: {line}\n{text}"));
    }
    for m in files {
        let passed = format!("{} passed for resource ", m.path.display());
        let validated = text.lines().filter(|l| l.contains(&passed)).count();
        if validated != m.resources.len() {
            return Err(format!(
                "{}: {validated} of {} resources validated\n{text}",
                m.path.display(),
                m.resources.len()
            ));
        }
    }
    Ok(())
}

#[test]
fn every_kubernetes_manifest_is_valid_against_the_kubernetes_schemas() {
    let all = manifests();
    assert!(all.len() >= 3, "{} manifests", all.len());
    if let Err(e) = schema_check(&all) {
        panic!("deploy/kubernetes against the Kubernetes schemas:\n{e}");
    }
}

/// The schema check is not vacuous: a wrong type, a misspelled field and a
/// misspelled kind in a copy of the real manifest are each refused.
#[test]
fn the_schema_check_catches_a_broken_manifest() {
    let real = Manifest::named("control-plane.yaml");
    let dir = tempfile::tempdir().unwrap();
    for (from, to, expected) in [
        ("replicas: 3", "replicas: \"three\"", "spec.replicas"),
        ("readinessProbe:", "readinesProbe:", "readinesProbe"),
        (
            "kind: PodDisruptionBudget",
            "kind: PodDisruptionBuget",
            "PodDisruptionBuget",
        ),
    ] {
        assert!(real.text.contains(from), "{from}");
        let path = dir.path().join("broken.yaml");
        std::fs::write(&path, real.text.replacen(from, to, 1)).unwrap();
        let err = schema_check(&[Manifest::read(path)]).expect_err(&format!(
            "{to} in control-plane.yaml passed the schema check"
        ));
        assert!(err.contains(expected), "{to}: {err}");
    }
}

/// Whether `container` reads `name` from a Secret.
fn env_from_secret(container: &serde_yaml_ng::Value, name: &str) -> bool {
    container["env"]
        .as_sequence()
        .into_iter()
        .flatten()
        .any(|e| e["name"] == name && e["valueFrom"]["secretKeyRef"]["name"].is_string())
}

/// Issue 17's deployment: three replicas on PostgreSQL that survive losing a
/// node, ready only with their database.
#[test]
fn the_postgres_manifest_runs_replicas_that_survive_losing_a_node() {
    let m = Manifest::named("control-plane.yaml");
    let deployment = m.resource("Deployment");
    let spec = &deployment["spec"];
    let pod = &spec["template"]["spec"];
    let container = &pod["containers"][0];
    assert_eq!(spec["replicas"].as_u64(), Some(3));
    assert_eq!(spec["strategy"]["type"], "RollingUpdate");

    let pdb = m.resource("PodDisruptionBudget");
    assert_eq!(pdb["spec"]["selector"], spec["selector"]);
    assert!(
        pdb["spec"]["maxUnavailable"].as_u64() == Some(1)
            || pdb["spec"]["minAvailable"].as_u64() == Some(2),
        "{pdb:?}"
    );

    let anti = &pod["affinity"]["podAntiAffinity"];
    let terms = anti["requiredDuringSchedulingIgnoredDuringExecution"]
        .as_sequence()
        .into_iter()
        .flatten()
        .chain(
            anti["preferredDuringSchedulingIgnoredDuringExecution"]
                .as_sequence()
                .into_iter()
                .flatten()
                .map(|t| &t["podAffinityTerm"]),
        );
    assert!(
        terms
            .into_iter()
            .any(|t| t["topologyKey"] == "kubernetes.io/hostname"
                && t["labelSelector"] == spec["selector"]),
        "no anti-affinity across nodes: {anti:?}"
    );

    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert!(env_from_secret(container, "LEASH_DATABASE_URL"));
    assert!(env_from_secret(container, "LEASH_MASTER_KEY"));
    // JWTs must carry one `iss` whichever replica signed them.
    let args = container["args"].as_sequence().unwrap();
    assert!(
        args.iter()
            .any(|a| a.as_str().is_some_and(|a| a.starts_with("--issuer="))),
        "{args:?}"
    );
    // No volume for the store: it is in PostgreSQL.
    assert!(
        m.resources
            .iter()
            .all(|r| r["kind"] != "PersistentVolumeClaim")
    );
    assert!(
        pod["volumes"]
            .as_sequence()
            .unwrap()
            .iter()
            .all(|v| v["persistentVolumeClaim"].is_null())
    );
    let url = m.documented_secret("leash-database", "url").unwrap();
    leash_control_plane::store::DatabaseUrl::parse(&url).unwrap();
    assert!(url.contains("sslmode=verify-full"), "{url}");
}

/// SQLite stays the single-node variant: one replica, never two at once on
/// the volume.
#[test]
fn the_sqlite_manifest_runs_one_replica_on_a_volume() {
    let m = Manifest::named("control-plane-sqlite.yaml");
    let spec = &m.resource("Deployment")["spec"];
    assert_eq!(spec["replicas"].as_u64(), Some(1));
    assert_eq!(spec["strategy"]["type"], "Recreate");
    m.resource("PersistentVolumeClaim");
    let container = &spec["template"]["spec"]["containers"][0];
    assert!(!env_from_secret(container, "LEASH_DATABASE_URL"));
}
