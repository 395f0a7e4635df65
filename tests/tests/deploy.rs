//! Keeps `deploy/` honest: every flag and environment variable that a
//! container file, Kubernetes manifest or systemd unit passes to a Leash
//! binary must exist in that binary and parse.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test stops at the first failed step, with its message"
)]

use std::path::{Path, PathBuf};

use clap::{CommandFactory as _, Parser as _};

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
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
            // Read by the binary itself, never through a flag, so that the
            // key never appears on a command line.
            const READ_DIRECTLY: [&str; 1] = ["LEASH_MASTER_KEY"];
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
    for entry in std::fs::read_dir(deploy_dir().join("kubernetes")).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        for doc in serde_yaml_ng::Deserializer::from_str(&text) {
            let doc: serde_yaml_ng::Value = serde::Deserialize::deserialize(doc)
                .unwrap_or_else(|e| panic!("{}: invalid YAML: {e}", path.display()));
            let containers = &doc["spec"]["template"]["spec"]["containers"];
            for c in containers.as_sequence().into_iter().flatten() {
                let image = c["image"].as_str().unwrap_or_default();
                let Some(binary) = binary_of(image) else {
                    continue;
                };
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
                        (
                            e["name"].as_str().unwrap().to_owned(),
                            e["value"].as_str().unwrap_or_default().to_owned(),
                        )
                    })
                    .collect();
                found.push(Invocation {
                    source: format!("{} ({})", path.display(), c["name"].as_str().unwrap_or("?")),
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
