//! `leashctl policy check` as an operator runs it.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test stops at the first failed step, with its message"
)]

use std::process::Command;

fn check(policy: &str) -> (bool, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("policy.yaml");
    std::fs::write(&path, policy).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_leashctl"))
        .args(["policy", "check"])
        .arg(&path)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn quickstart_policy_is_valid() {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../examples/quickstart/policy.yaml"
    ))
    .unwrap();
    let (ok, stdout, stderr) = check(&text);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("ok (2 upstreams, 1 grants)"), "{stdout}");
}

#[test]
fn invalid_policy_names_file_line_and_field() {
    let (ok, _, stderr) = check(
        "version: 1\nupstreams:\n  - name: p\n    hosts: [p.test]\n    target: http://127.0.0.1:1\n    credential: { kind: jwt, tll: 5m }\n",
    );
    assert!(!ok);
    assert!(stderr.contains("policy.yaml"), "{stderr}");
    assert!(stderr.contains("line 6"), "{stderr}");
    assert!(
        stderr.contains("upstreams[0].credential.tll: unknown field `tll`"),
        "{stderr}"
    );
}

#[test]
fn every_semantic_problem_is_listed() {
    let (ok, _, stderr) = check(
        "version: 1\nupstreams:\n  - name: p\n    hosts: [P.test]\n    target: ftp://x\n    credential: { kind: jwt, ttl: 0s }\ngrants:\n  - workload: not-an-id\n    upstreams: [q]\n",
    );
    assert!(!ok);
    for field in [
        "upstreams[0].hosts[0]",
        "upstreams[0].target",
        "upstreams[0].credential.ttl",
        "grants[0].workload",
        "grants[0].upstreams[0]",
    ] {
        assert!(stderr.contains(field), "{field} missing in {stderr}");
    }
}

#[test]
fn missing_file_is_a_clear_error() {
    let out = Command::new(env!("CARGO_BIN_EXE_leashctl"))
        .args(["policy", "check", "/nonexistent/policy.yaml"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read file"));
}
