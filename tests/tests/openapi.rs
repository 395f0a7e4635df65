//! The admin API's OpenAPI document against the router that serves it:
//! every documented operation is routed and enforces the role it states,
//! and the router has nothing the document leaves out.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test stops at the first failed step, with its message"
)]

use std::net::SocketAddr;
use std::time::Duration;

use axum::extract::ConnectInfo;
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use leash_control_plane::admin::types::ErrorBody;
use leash_control_plane::auth::{Role, create_token};
use leash_tests::*;
use tower::ServiceExt as _;

struct Reply {
    status: u16,
    body: Bytes,
}

impl Reply {
    /// The answer of a handler, not of the router's own "no such route" (an
    /// empty 404) or "no such method" (405).
    fn routed(&self) -> bool {
        self.status != 405
            && (self.status != 404 || serde_json::from_slice::<ErrorBody>(&self.body).is_ok())
    }

    fn error(&self) -> String {
        serde_json::from_slice::<ErrorBody>(&self.body)
            .map(|e| e.error)
            .unwrap_or_default()
    }
}

/// One call on the router in process, from its own client address (the
/// limiter counts calls without a token per address).
async fn send(
    router: &axum::Router,
    method: &str,
    path: &str,
    token: Option<&str>,
    peer: u8,
) -> Reply {
    let mut req = http::Request::builder()
        .method(method)
        .uri(path)
        .header("content-type", "application/json");
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let body = if matches!(method, "POST" | "PUT" | "PATCH") {
        Bytes::from_static(b"{}")
    } else {
        Bytes::new()
    };
    let mut req = req.body(Full::new(body)).unwrap();
    req.extensions_mut()
        .insert(ConnectInfo(SocketAddr::from(([10, 9, 0, peer], 40000))));
    let resp = router.clone().oneshot(req).await.unwrap();
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    Reply { status, body }
}

/// A path template with its parameters filled in.
fn concrete(template: &str) -> String {
    template
        .replace("{id}", "rev-none")
        .replace("{upstream}", "payments")
        .replace("{version}", "1")
}

fn stated_role(op: &serde_json::Value) -> Option<Role> {
    let description = op["description"].as_str().unwrap_or_default();
    ["viewer", "responder", "admin"]
        .into_iter()
        .find(|r| description.contains(&format!("Role: {r}.")))
        .and_then(Role::parse)
}

#[tokio::test]
async fn the_document_and_the_router_describe_the_same_api() {
    init();
    let dir = short_tempdir();
    let ids = Identities::start(dir.path(), Duration::from_secs(600), &[CP_ID]);
    let upstream: SocketAddr = "127.0.0.1:9".parse().unwrap();
    let policy = write_policy(dir.path(), &standard_policy(upstream, "5m"));
    let cp = start_control_plane(&ids, CP_ID, &policy, &dir.path().join("data")).await;
    let router = &cp.admin_router;
    let store = &cp.state.store;
    let mut tokens = Vec::new();
    for role in [Role::Viewer, Role::Responder, Role::Admin] {
        let t = create_token(store, role.as_str(), role, "test")
            .await
            .unwrap();
        tokens.push((role, t));
    }
    let admin = tokens[2].1.as_str();

    // The document as served, generated from the same registrations.
    let served = send(router, "GET", "/openapi.json", None, 1).await;
    assert_eq!(served.status, 200);
    let doc: serde_json::Value = serde_json::from_slice(&served.body).unwrap();
    assert_eq!(
        doc,
        serde_json::to_value(leash_control_plane::admin::openapi()).unwrap()
    );
    let paths = doc["paths"].as_object().unwrap();
    for must in [
        "/v1/secrets/{upstream}",
        "/v1/secrets/{upstream}/versions/{version}/revoke",
        "/v1/audit/verify",
        "/v1/audit/head",
        "/v1/posture",
        "/v1/policy/check",
    ] {
        assert!(paths.contains_key(must), "{must} is not documented");
    }

    let mut peer = 10u8;
    let mut operations = 0;
    for (template, item) in paths {
        let path = concrete(template);
        let documented: Vec<String> = item
            .as_object()
            .unwrap()
            .keys()
            .map(|m| m.to_uppercase())
            .collect();
        for method in &documented {
            operations += 1;
            let op = &item[method.to_lowercase()];
            let Some(needed) = stated_role(op) else {
                // Public: answered without an admin token. A route with
                // its own credential (a poll stream's token) says so with
                // a documented 401.
                let r = send(router, method, &path, None, 2).await;
                assert!(r.routed(), "{method} {template}: {}", r.status);
                if r.status == 401 {
                    assert!(
                        op["responses"]["401"].is_object(),
                        "{method} {template} is public, yet answers an undocumented 401"
                    );
                }
                continue;
            };
            // Documented means routed: a handler answers, not the router.
            let r = send(router, method, &path, Some(admin), 3).await;
            assert!(
                r.routed(),
                "{method} {template} is documented but not routed: {}",
                r.status
            );
            // Without a token: refused before any handler.
            peer = peer.wrapping_add(1);
            let r = send(router, method, &path, None, peer).await;
            assert_eq!(r.status, 401, "{method} {template} without a token");
            // The role the document states is the role the handler enforces.
            for (role, token) in &tokens {
                let r = send(router, method, &path, Some(token), 4).await;
                if *role < needed {
                    assert_eq!(
                        (r.status, r.error().as_str()),
                        (403, "forbidden"),
                        "{method} {template} documents {needed:?}; a {role:?} got through"
                    );
                } else {
                    assert_ne!(
                        r.status, 403,
                        "{method} {template} documents {needed:?}; a {role:?} was refused"
                    );
                }
            }
        }
        // The other direction: a method the document does not list for this
        // path is not routed either.
        for method in ["GET", "POST", "PUT", "DELETE", "PATCH"] {
            if !documented.iter().any(|m| m == method) {
                let r = send(router, method, &path, Some(admin), 5).await;
                assert_eq!(
                    r.status, 405,
                    "{method} {template} is routed but not documented"
                );
            }
        }
    }
    assert!(operations >= 27, "{operations} operations documented");
    // And a path the document does not have is the router's empty 404.
    let r = send(router, "GET", "/v1/undocumented", Some(admin), 6).await;
    assert!(!r.routed(), "{}", r.status);
    cp.shutdown(Duration::from_secs(5)).await;
}

/// The generated document is valid OpenAPI 3.1 to a validator no one here
/// wrote (`openapi-spec-validator`, from PyPI; `.ci/run` installs it).
#[test]
fn the_document_is_valid_openapi_to_an_independent_validator() {
    let found = std::process::Command::new("openapi-spec-validator")
        .arg("--version")
        .output();
    assert!(
        found.is_ok_and(|o| o.status.success()),
        "openapi-spec-validator is not on PATH: pip install openapi-spec-validator (.ci/run does)"
    );
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("openapi.json");
    let doc = serde_json::to_vec_pretty(&leash_control_plane::admin::openapi()).unwrap();
    std::fs::write(&file, doc).unwrap();
    let out = std::process::Command::new("openapi-spec-validator")
        .args(["--schema", "3.1", "--errors", "all"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
