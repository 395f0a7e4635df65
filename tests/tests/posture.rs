//! Posture after an incident, end to end: real sidecars forward traffic on
//! some grants; `/v1/posture` lists the grants nobody used, the lifetime
//! far above its use and the workload still sending its own credential,
//! and proposes the policy without them; `/v1/policy/check` names the live
//! consumers a proposal would break.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test stops at the first failed step, with its message"
)]

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use leash_tests::*;
use serde_json::Value;

const SVID_TTL: Duration = Duration::from_secs(600);
const BATCH: &str = "spiffe://leash.test/ns/batch/*";
const OWN_KEY: &str = "Bearer my-own-old-key";

/// Three grants: APP on payments (1h credentials) and archive, OTHER on
/// ledger, a batch prefix on archive. Traffic goes on the first two only,
/// and never to archive.
fn policy(up: SocketAddr) -> PolicyBuilder {
    PolicyBuilder::new()
        .upstream("payments", up)
        .ttl("1h")
        .upstream("ledger", up)
        .upstream("archive", up)
        .grant(APP_ID, &["payments", "archive"])
        .grant(OTHER_ID, &["ledger"])
        .grant(BATCH, &["archive"])
}

async fn send(client: &ProxyClient, host: &str, headers: &[(&str, &str)], n: u64) {
    for i in 0..n {
        let a = client
            .get(&format!("http://{host}/whoami?i={i}"), headers)
            .await
            .expect("request");
        assert!(a.status < 500, "{}", a.status);
    }
}

fn pairs(v: &Value, a: &str, b: &str) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|x| (x[a].as_str().unwrap().into(), x[b].as_str().unwrap().into()))
        .collect();
    out.sort();
    out
}

fn pair(a: &str, b: &str) -> (String, String) {
    (a.to_owned(), b.to_owned())
}

async fn check(admin: &Admin, since: &str, proposal: &str) -> leash_tests::Answer {
    admin
        .call(
            "POST",
            &format!("/v1/policy/check?against_usage={since}"),
            Some(proposal.to_owned()),
        )
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn posture_finds_what_the_incident_left_and_check_guards_live_consumers() {
    let d = Deployment::start_with(|up| policy(up).yaml(), SVID_TTL, None).await;
    let other = start_sidecar(sidecar_config(d.ids.endpoint(OTHER_ID), d.cp.sidecar_addr)).await;
    wait_ready(other.admin_addr).await;
    let admin = d.admin();

    send(&d.client, "payments.leash.test", &[], 20).await;
    let other_client = ProxyClient::new(other.egress_addr);
    send(
        &other_client,
        "ledger.leash.test",
        &[("authorization", OWN_KEY)],
        10,
    )
    .await;
    // The upstream never saw the workload's own key: the sidecar stripped it.
    {
        let seen = d.seen.lock().unwrap();
        assert_eq!(seen.len(), 30);
        assert!(
            seen.iter()
                .all(|s| s.credential.as_deref() != Some(OWN_KEY))
        );
    }

    let posture = eventually(
        Duration::from_secs(15),
        "usage and stripped reports delivered",
        || {
            let admin = admin.clone();
            async move {
                let a = admin.get("/v1/posture?since=1h").await;
                assert_eq!(a.status, 200, "{}", String::from_utf8_lossy(&a.body));
                let v = a.json();
                let used: i64 = v["oversized_ttls"][0]["workloads"]
                    .as_array()
                    .map_or(0, |w| {
                        w.iter().map(|x| x["requests"].as_i64().unwrap()).sum()
                    });
                let stripped = v["own_secrets"][0]["count"].as_i64();
                // The other sidecar's usage of ledger arrives in its own
                // batch, apart from its stripped report: wait for it too.
                let other_used = pairs(&v["unused_grants"], "workload", "upstream")
                    .iter()
                    .all(|(w, u)| !(w == OTHER_ID && u == "ledger"));
                (used == 20 && stripped == Some(10) && other_used).then_some(v)
            }
        },
    )
    .await;

    // The third grant and APP's archive were never used; the used ones are
    // not listed.
    assert_eq!(
        pairs(&posture["unused_grants"], "workload", "upstream"),
        [pair(BATCH, "archive"), pair(APP_ID, "archive")]
    );
    // payments: 1h credentials used for a few seconds each → 1m.
    let ttls = posture["oversized_ttls"].as_array().unwrap();
    assert_eq!(ttls.len(), 1, "{ttls:?}");
    assert_eq!(ttls[0]["upstream"], "payments");
    assert_eq!(ttls[0]["ttl_secs"], 3600);
    assert_eq!(ttls[0]["suggested_ttl_secs"], 60);
    assert!(ttls[0]["longest_span_ms"].as_i64().unwrap() < 30_000);
    assert_eq!(ttls[0]["workloads"][0]["workload"], APP_ID);
    // OTHER still holds its own key for ledger.
    let own = posture["own_secrets"].as_array().unwrap();
    assert_eq!(own.len(), 1, "{own:?}");
    assert_eq!(
        (own[0]["workload"].as_str(), own[0]["upstream"].as_str()),
        (Some(OTHER_ID), Some("ledger"))
    );
    assert!(own[0]["last_seen_ms"].as_i64().unwrap() >= posture["since_ms"].as_i64().unwrap());

    // The proposal: the batch grant gone, APP narrowed to payments,
    // payments' lifetime lowered; and it is a valid policy.
    let diff = &posture["policy_diff"];
    assert_eq!(diff["changed"], true);
    let proposed = leash_api::policy::parse(diff["yaml"].as_str().unwrap(), Path::new("."))
        .expect("the proposal is valid");
    let grants: Vec<(String, Vec<String>)> = proposed
        .policy
        .grants
        .iter()
        .map(|g| (g.workload.clone(), g.upstreams.clone()))
        .collect();
    assert_eq!(
        grants,
        [
            (APP_ID.to_owned(), vec!["payments".to_owned()]),
            (OTHER_ID.to_owned(), vec!["ledger".to_owned()]),
        ]
    );
    assert_eq!(
        proposed.upstream("payments").unwrap().credential.ttl,
        Duration::from_secs(60)
    );
    let text = diff["diff"].as_str().unwrap();
    let removed = |s: &str| text.lines().any(|l| l.starts_with('-') && l.contains(s));
    let added = |s: &str| text.lines().any(|l| l.starts_with('+') && l.contains(s));
    assert!(text.starts_with("--- policy "), "{text}");
    assert!(removed(BATCH) && removed("- archive"), "{text}");
    assert!(removed("ttl: 1h") && added("ttl: 1m"), "{text}");
    assert!(!removed("- ledger") && !removed(OTHER_ID), "{text}");

    // Check: the proposal breaks nobody.
    let a = check(&admin, "1h", diff["yaml"].as_str().unwrap()).await;
    assert_eq!(a.status, 200, "{}", String::from_utf8_lossy(&a.body));
    assert_eq!(a.json()["broken"], serde_json::json!([]));
    // Dropping OTHER's grant (used) breaks OTHER on ledger.
    let up = d.upstream;
    let drop_used = PolicyBuilder::new()
        .upstream("payments", up)
        .upstream("ledger", up)
        .upstream("archive", up)
        .grant(APP_ID, &["payments", "archive"])
        .grant(BATCH, &["archive"])
        .yaml();
    let a = check(&admin, "1h", &drop_used).await;
    assert_eq!(a.status, 200, "{}", String::from_utf8_lossy(&a.body));
    let broken = a.json()["broken"].clone();
    assert_eq!(broken.as_array().unwrap().len(), 1, "{broken}");
    assert_eq!(broken[0]["workload"], OTHER_ID);
    assert_eq!(broken[0]["upstream"], "ledger");
    assert_eq!(broken[0]["reason"], "not_granted");
    assert_eq!(broken[0]["requests"], 10);
    // Removing payments breaks APP on it.
    let no_payments = PolicyBuilder::new()
        .upstream("ledger", up)
        .grant(OTHER_ID, &["ledger"])
        .yaml();
    let a = check(&admin, "30d", &no_payments).await;
    assert_eq!(
        pairs(&a.json()["broken"], "workload", "upstream"),
        [pair(APP_ID, "payments")]
    );
    assert_eq!(a.json()["broken"][0]["reason"], "upstream_removed");
    // A window after all the traffic: nothing is live.
    let now = leash_control_plane::store::now_ms().to_string();
    let later = check(&admin, &now, &drop_used).await;
    assert_eq!(
        later.status,
        200,
        "{}",
        String::from_utf8_lossy(&later.body)
    );
    assert_eq!(later.json()["broken"], serde_json::json!([]));

    // Refusals.
    let bad = check(
        &admin,
        "1h",
        &diff["yaml"]
            .as_str()
            .unwrap()
            .replacen("kind: jwt", "kind: jwt\n    tll: 5m", 1),
    )
    .await;
    assert_eq!(bad.status, 400);
    let message = bad.json()["message"].as_str().unwrap().to_owned();
    assert!(message.contains("line "), "{message}");
    assert!(message.contains("upstreams[0].credential.tll"), "{message}");
    let bad = check(
        &admin,
        "1h",
        "version: 1\ngrants:\n  - workload: x\n    upstreams: [nope]\n",
    )
    .await;
    assert_eq!(bad.status, 400);
    let message = bad.json()["message"].as_str().unwrap().to_owned();
    assert!(message.contains("grants[0].workload"), "{message}");
    assert!(message.contains("grants[0].upstreams[0]"), "{message}");
    // Not YAML at all: the parser's line.
    let bad = check(
        &admin,
        "1h",
        "version: 1\ngrants:\n  - workload: a\n    upstreams: [x\n  }\n",
    )
    .await;
    assert_eq!(bad.status, 400);
    let message = bad.json()["message"].as_str().unwrap().to_owned();
    assert!(message.contains("line 5"), "{message}");
    let huge = format!(
        "{}\n# {}\n",
        diff["yaml"].as_str().unwrap(),
        "x".repeat(1024 * 1024)
    );
    let a = check(&admin, "1h", &huge).await;
    assert_eq!(a.status, 413, "{}", String::from_utf8_lossy(&a.body));
    for query in [
        "/v1/posture?since=soon",
        "/v1/posture?since=2999-01-01T00:00:00Z",
        "/v1/posture?color=blue",
    ] {
        let a = admin.get(query).await;
        assert_eq!(a.status, 400, "{query}");
    }
    let a = admin.get("/v1/posture?since=soon").await;
    assert!(a.json()["message"].as_str().unwrap().contains("since: "));
    let a = check(&admin, "nope", &drop_used).await;
    assert_eq!(a.status, 400);
    assert!(
        a.json()["message"]
            .as_str()
            .unwrap()
            .contains("against_usage: ")
    );
    // A viewer may look.
    let viewer = leash_control_plane::auth::create_token(
        &d.cp.state.store,
        "viewer",
        leash_control_plane::auth::Role::Viewer,
        "test",
    )
    .await
    .unwrap();
    let a = admin.with_token(Some(&viewer)).get("/v1/posture").await;
    assert_eq!(a.status, 200);
    other.shutdown(Duration::from_secs(5)).await;
}
