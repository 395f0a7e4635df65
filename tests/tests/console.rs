//! The web console in a real headless Chromium (Debian's `chromium` and
//! `chromium-driver`, driven over WebDriver by `fantoccini`): a responder
//! signs in, sees the sidecar, opens the dependency map, revokes the grant
//! after seeing who will break, watches the acknowledgements arrive without
//! reloading, finds the next request refused, restores, and signs out; the
//! old cookie is refused. A viewer sees no revoke control, and forged,
//! tampered, expired and malformed input is refused with a clear page.
//!
//! Screenshots of every page are written to `target/tmp/console/`; with
//! `LEASH_UPDATE_SCREENSHOTS=1` also to `docs/console/` (the README's).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test stops at the first failed step, with its message"
)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use leash_tests::*;

/// chromedriver on a free port, killed on drop.
struct Driver {
    child: std::process::Child,
    url: String,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn chromedriver() -> Driver {
    let found = std::process::Command::new("chromedriver")
        .arg("--version")
        .output();
    assert!(
        found.is_ok_and(|o| o.status.success()),
        "chromedriver is not on PATH: apt-get install chromium chromium-driver (.ci/run does)"
    );
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = std::process::Command::new("chromedriver")
        .arg(format!("--port={port}"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        assert!(Instant::now() < deadline, "chromedriver did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Driver {
        child,
        url: format!("http://127.0.0.1:{port}"),
    }
}

/// A new headless Chromium with a profile of its own.
async fn browser(driver: &Driver, profile: &std::path::Path) -> Client {
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        serde_json::json!({
            "binary": "/usr/bin/chromium",
            "args": [
                "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync",
                "--window-size=1280,900",
                format!("--user-data-dir={}", profile.display()),
            ],
        }),
    );
    ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(caps)
        .connect(&driver.url)
        .await
        .expect("a Chromium session")
}

/// Where screenshots go.
fn shots() -> Vec<PathBuf> {
    let mut dirs = vec![PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("console")];
    if std::env::var_os("LEASH_UPDATE_SCREENSHOTS").is_some() {
        dirs.push(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/console"));
    }
    dirs
}

async fn screenshot(c: &Client, name: &str) {
    let png = c.screenshot().await.unwrap();
    for dir in shots() {
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(format!("{name}.png")), &png).unwrap();
    }
}

/// Waits until the page has an element matching `css` whose text contains
/// `text`.
async fn wait_text(c: &Client, css: &str, text: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(found) = c.find_all(Locator::Css(css)).await {
            for e in found {
                if e.text().await.is_ok_and(|t| t.contains(text)) {
                    return;
                }
            }
        }
        assert!(
            Instant::now() < deadline,
            "no {css} with {text:?} on {}: {}",
            c.current_url().await.unwrap(),
            c.source().await.unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn click(c: &Client, what: Locator<'_>) {
    c.find(what).await.unwrap().click().await.unwrap();
}

async fn type_into(c: &Client, what: Locator<'_>, text: &str) {
    c.find(what).await.unwrap().send_keys(text).await.unwrap();
}

async fn sign_in(c: &Client, admin: SocketAddr, token: &str) {
    c.goto(&format!("http://{admin}/console")).await.unwrap();
    // Not signed in: sent to the sign-in page.
    assert!(c.current_url().await.unwrap().path() == "/console/sign-in");
    type_into(c, Locator::Id("token"), token).await;
    click(c, Locator::Css("main form button")).await;
    wait_text(c, "h1", "Fleet").await;
}

/// A raw HTTP/1.1 request to the admin port with `cookie`; the answer's
/// status line and headers.
async fn with_cookie(
    admin: SocketAddr,
    method: &str,
    path: &str,
    cookie: &str,
    body: &str,
) -> String {
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {admin}\r\nCookie: leash_console={cookie}\r\n\
         Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    raw(admin, request.as_bytes()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_responder_revokes_from_the_console_and_watches_it_take_effect() {
    let d = Deployment::start("5m", Duration::from_secs(600)).await;
    let admin = Admin::bootstrap(d.cp.admin_addr, &d.dir.path().join("data"));
    let token = std::fs::read_to_string(d.dir.path().join("data/admin-token"))
        .unwrap()
        .trim()
        .to_owned();
    // Some use to show: the map and the who-will-break list read it.
    for _ in 0..5 {
        let r = d
            .client
            .get("http://payments.leash.test/whoami", &[])
            .await
            .unwrap();
        assert_eq!(r.status, 200);
    }
    eventually(Duration::from_secs(20), "usage recorded", || async {
        let deps = admin.get("/v1/usage/dependencies").await.json();
        (deps["edges"].as_array()?.len() == 1).then_some(())
    })
    .await;

    let driver = chromedriver().await;
    let profile = tempfile::tempdir().unwrap();
    let c = browser(&driver, profile.path()).await;
    let base = format!("http://{}", d.cp.admin_addr);

    // A wrong token is refused on the page.
    c.goto(&format!("{base}/console/sign-in")).await.unwrap();
    type_into(&c, Locator::Id("token"), "lsh_nothere_AAAA").await;
    click(&c, Locator::Css("main form button")).await;
    wait_text(&c, "#token-error", "not valid").await;
    screenshot(&c, "sign-in").await;

    sign_in(&c, d.cp.admin_addr, &token).await;
    // The fleet: the quickstart's sidecar, by its SPIFFE ID.
    wait_text(&c, "#sidecars td", APP_ID).await;
    screenshot(&c, "fleet").await;
    let cookie = c.get_named_cookie("leash_console").await.unwrap();
    assert_eq!(cookie.http_only(), Some(true));
    assert_eq!(
        cookie.same_site().map(|s| s.to_string()).as_deref(),
        Some("Strict")
    );
    let cookie = cookie.value().to_owned();

    // The dependency map as a picture: one edge, the app to payments.
    click(&c, Locator::LinkText("Dependency map")).await;
    wait_text(&c, "h1", "Dependency map").await;
    let edges = c.find_all(Locator::Css("svg.map path.edge")).await.unwrap();
    assert_eq!(edges.len(), 1);
    screenshot(&c, "map").await;
    // Usage over time: the five requests, as bars.
    click(&c, Locator::LinkText("Usage")).await;
    wait_text(&c, "#usage-total", "5 request(s), 0 error(s)").await;
    assert!(
        !c.find_all(Locator::Css("svg.chart rect.bar"))
            .await
            .unwrap()
            .is_empty()
    );
    screenshot(&c, "usage").await;

    // Revoke: a malformed SPIFFE ID is refused next to its field.
    c.goto(&format!("{base}/console/revoke")).await.unwrap();
    type_into(&c, Locator::Id("workload"), "not a spiffe id").await;
    type_into(&c, Locator::Id("upstream"), "payments").await;
    type_into(&c, Locator::Id("reason"), "drill").await;
    click(&c, Locator::Css("main form button")).await;
    wait_text(&c, "#workload-error", "invalid SPIFFE ID").await;
    screenshot(&c, "revoke-error").await;
    // Corrected: who will break is the app, with its requests.
    let workload = c.find(Locator::Id("workload")).await.unwrap();
    workload.clear().await.unwrap();
    workload.send_keys(APP_ID).await.unwrap();
    click(&c, Locator::Css("main form button")).await;
    wait_text(&c, "#breaks td", APP_ID).await;
    wait_text(&c, "#impact", "5 request(s)").await;
    screenshot(&c, "revoke-confirm").await;
    click(&c, Locator::Id("confirm")).await;
    wait_text(&c, "h1", "Revocation").await;
    wait_text(&c, "#acks td", APP_ID).await;
    let id = c
        .current_url()
        .await
        .unwrap()
        .path()
        .rsplit('/')
        .next()
        .unwrap()
        .to_owned();
    // The next request through the sidecar is refused.
    let r = d
        .client
        .get("http://payments.leash.test/whoami", &[])
        .await
        .unwrap();
    assert_eq!(r.status, 403);
    assert_eq!(r.json()["error"], "revoked_grant");

    // Acknowledgements arrive without a reload: a second sidecar connects
    // while the page is open, and its row appears.
    let rows = |c: &Client| {
        let c = c.clone();
        async move {
            c.find_all(Locator::Css("#acks tbody tr"))
                .await
                .unwrap()
                .len()
        }
    };
    assert_eq!(rows(&c).await, 1);
    c.execute("window.leashMarker = 'still the same page';", vec![])
        .await
        .unwrap();
    let second = start_sidecar(sidecar_config(d.ids.endpoint(APP_ID), d.cp.sidecar_addr)).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while rows(&c).await < 2 {
        assert!(
            Instant::now() < deadline,
            "the second acknowledgement never appeared"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let marker = c
        .execute("return window.leashMarker;", vec![])
        .await
        .unwrap();
    assert_eq!(marker, "still the same page", "the page was not reloaded");
    wait_text(&c, "#acked", "2").await;
    screenshot(&c, "revocation-live").await;

    // Restore from the page.
    type_into(&c, Locator::Id("restore-reason"), "drill over").await;
    click(&c, Locator::Css("form[action$='/restore'] button")).await;
    wait_text(&c, "#state", "restored").await;
    eventually(Duration::from_secs(20), "served again", || async {
        let r = d
            .client
            .get("http://payments.leash.test/whoami", &[])
            .await
            .ok()?;
        (r.status == 200).then_some(())
    })
    .await;
    // Both actions are in the audit log as the token's own API calls.
    let audit = admin.get("/v1/audit?limit=50").await.json();
    let actions: Vec<String> = audit["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| format!("{} {}", e["action"].as_str().unwrap(), e["status"]))
        .collect();
    assert!(
        actions.iter().any(|a| a == "POST /v1/revocations 201"),
        "{actions:?}"
    );
    assert!(
        actions
            .iter()
            .any(|a| a.starts_with("POST /v1/revocations/") && a.ends_with("restore 200")),
        "{actions:?}"
    );

    // A leaked value, refused when the app sends it: its page shows the
    // forgotten consumer, never the value.
    let leaked_value = "sk_live_console_test_0123456789abcdef";
    let registered = admin
        .post(
            "/v1/leaked",
            serde_json::json!({"value": leaked_value, "reason": "found in a paste"}),
        )
        .await
        .json();
    let leaked_id = registered["id"].as_str().unwrap().to_owned();
    eventually(
        Duration::from_secs(20),
        "the leaked value refused",
        || async {
            let r = d
                .client
                .get(
                    "http://payments.leash.test/whoami",
                    &[("x-api-key", leaked_value)],
                )
                .await
                .ok()?;
            (r.status == 403).then_some(())
        },
    )
    .await;
    click(&c, Locator::LinkText("Leaked")).await;
    wait_text(&c, "#leaked td", "found in a paste").await;
    c.goto(&format!("{base}/console/leaked/{leaked_id}"))
        .await
        .unwrap();
    wait_text(&c, "h1", "Leaked value").await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while c.find(Locator::Css("#sightings")).await.is_err() {
        assert!(Instant::now() < deadline, "no sighting shown");
        tokio::time::sleep(Duration::from_millis(200)).await;
        c.refresh().await.unwrap();
    }
    wait_text(&c, "#sightings td", APP_ID).await;
    assert!(!c.source().await.unwrap().contains(leaked_value));
    screenshot(&c, "leaked").await;
    click(&c, Locator::LinkText("Stripped")).await;
    wait_text(&c, "h1", "Stripped credentials").await;

    // A mission on that value: its criteria and the signed evidence.
    let mission = admin
        .post(
            "/v1/missions",
            serde_json::json!({
                "objective": "retire the pasted key",
                "owner": "payments-team",
                "findings": [{"finding": {"kind": "leaked", "revocation_id": leaked_id}}],
            }),
        )
        .await
        .json();
    let mission_id = mission["id"].as_str().unwrap().to_owned();
    click(&c, Locator::LinkText("Missions")).await;
    wait_text(&c, "#missions td", "retire the pasted key").await;
    click(&c, Locator::LinkText("retire the pasted key")).await;
    wait_text(&c, "#criteria td", "acknowledged").await;
    screenshot(&c, "mission").await;
    let evidence = with_cookie(
        d.cp.admin_addr,
        "GET",
        &format!("/console/missions/{mission_id}/evidence"),
        &cookie,
        "",
    )
    .await;
    assert!(evidence.starts_with("HTTP/1.1 200"), "{evidence}");
    assert!(
        evidence.contains("attachment; filename=\"leash-evidence-"),
        "{evidence}"
    );
    assert!(evidence.contains("\"signature\""), "{evidence}");

    // The audit log, and its chain verified from the page.
    click(&c, Locator::LinkText("Audit")).await;
    wait_text(&c, "#audit td", "POST /v1/revocations").await;
    click(&c, Locator::Id("verify")).await;
    wait_text(&c, "#verdict", "The chain verifies").await;
    screenshot(&c, "audit").await;

    // A token made on the page is shown once, and works.
    click(&c, Locator::LinkText("Tokens")).await;
    type_into(&c, Locator::Id("name"), "from-the-console").await;
    click(&c, Locator::Css("main form button")).await;
    // The form posts and a new page loads: wait for it.
    let made = c
        .wait()
        .at_most(Duration::from_secs(10))
        .for_element(Locator::Id("new-token"))
        .await
        .unwrap()
        .prop("value")
        .await
        .unwrap()
        .unwrap();
    assert!(made.starts_with("lsh_"), "{made}");
    let viewer_api = admin.with_token(Some(&made));
    assert_eq!(viewer_api.get("/v1/sidecars").await.status, 200);
    c.goto(&format!("{base}/console/tokens")).await.unwrap();
    assert!(
        !c.source().await.unwrap().contains(&made),
        "shown once only"
    );

    // On a phone: the fleet, readable.
    c.set_window_size(390, 844).await.unwrap();
    c.goto(&format!("{base}/console/fleet")).await.unwrap();
    wait_text(&c, "#sidecars td", APP_ID).await;
    screenshot(&c, "fleet-phone").await;
    c.set_window_size(1280, 900).await.unwrap();

    // A forged post (no CSRF value) with the session's own cookie: refused,
    // and nothing is revoked.
    let forged = with_cookie(
        d.cp.admin_addr,
        "POST",
        "/console/revoke/confirm",
        &cookie,
        "kind=upstream&upstream=payments&reason=forged",
    )
    .await;
    assert!(forged.starts_with("HTTP/1.1 403"), "{forged}");
    let list = admin.get("/v1/revocations").await.json();
    let upstream_revoked = list["revocations"]
        .as_array()
        .unwrap()
        .iter()
        .any(|r| r["kind"] == "upstream");
    assert!(!upstream_revoked, "{list}");
    // A tampered cookie is no session.
    let tampered = with_cookie(
        d.cp.admin_addr,
        "GET",
        "/console/fleet",
        &format!("{cookie}x"),
        "",
    )
    .await;
    assert!(tampered.starts_with("HTTP/1.1 303"), "{tampered}");
    assert!(
        tampered.contains("location: /console/sign-in"),
        "{tampered}"
    );

    // Sign out: the old cookie is refused from then on.
    click(&c, Locator::Css("form.signout button")).await;
    wait_text(&c, "h1", "Sign in").await;
    let old = with_cookie(d.cp.admin_addr, "GET", "/console/fleet", &cookie, "").await;
    assert!(
        old.contains("location: /console/sign-in?why=signed-out"),
        "{old}"
    );

    // A viewer: no revoke control, and the page refuses anyway.
    let viewer = leash_control_plane::auth::create_token(
        &d.cp.state.store,
        "console-viewer",
        leash_control_plane::auth::Role::Viewer,
        "test",
    )
    .await
    .unwrap();
    sign_in(&c, d.cp.admin_addr, &viewer).await;
    assert!(c.find(Locator::LinkText("Revoke")).await.is_err());
    assert!(c.find(Locator::LinkText("Audit")).await.is_err());
    c.goto(&format!("{base}/console/revocations/{id}"))
        .await
        .unwrap();
    wait_text(&c, "h1", "Revocation").await;
    assert!(c.find(Locator::Id("restore-reason")).await.is_err());
    c.goto(&format!("{base}/console/revoke")).await.unwrap();
    wait_text(&c, "main", "responder").await;
    screenshot(&c, "viewer-refused").await;

    // An expired session sends the browser to sign in, saying so.
    let secret = "an-expired-console-session-secret";
    let hash = hex::encode(ring::digest::digest(
        &ring::digest::SHA256,
        secret.as_bytes(),
    ));
    let token_id = token.split('_').nth(1).unwrap().to_owned();
    d.cp.state
        .store
        .insert_console_session(&leash_control_plane::store::ConsoleSession {
            id_sha256: hash,
            token_id,
            csrf: "x".into(),
            created_at_ms: 1,
            expires_at_ms: 2,
            ended_at_ms: None,
        })
        .await
        .unwrap();
    let expired = with_cookie(d.cp.admin_addr, "GET", "/console/fleet", secret, "").await;
    assert!(
        expired.contains("location: /console/sign-in?why=expired"),
        "{expired}"
    );

    // Guessing tokens at the sign-in page is limited like the API (10 a
    // minute from one address in the tests), and a valid token still works.
    let mut statuses = Vec::new();
    for _ in 0..12 {
        let answer = with_cookie(
            d.cp.admin_addr,
            "POST",
            "/console/sign-in",
            "",
            "token=lsh_guess_AAAA",
        )
        .await;
        statuses.push(answer[9..12].to_owned());
    }
    assert_eq!(
        statuses.last().map(String::as_str),
        Some("429"),
        "{statuses:?}"
    );
    assert!(statuses.contains(&"401".to_owned()), "{statuses:?}");
    let valid = with_cookie(
        d.cp.admin_addr,
        "POST",
        "/console/sign-in",
        "",
        &format!("token={token}"),
    )
    .await;
    assert!(valid.starts_with("HTTP/1.1 303"), "{valid}");

    // Never a secret: the pages never held the token.
    let source = c.source().await.unwrap();
    assert!(!source.contains(&token));
    c.close().await.unwrap();
    second.shutdown(Duration::from_secs(2)).await;
}

/// The control plane restarts while a revocation's page is open: the
/// session survives (it is in the store), the live view reconnects by
/// itself, and acknowledgements made after the restart appear without a
/// reload.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_live_view_reconnects_when_the_control_plane_restarts() {
    let d = Deployment::start("5m", Duration::from_secs(600)).await;
    let admin = Admin::bootstrap(d.cp.admin_addr, &d.dir.path().join("data"));
    let token = std::fs::read_to_string(d.dir.path().join("data/admin-token"))
        .unwrap()
        .trim()
        .to_owned();
    let revoked = admin
        .revoke(serde_json::json!({"kind": "upstream", "upstream": "ledger", "reason": "drill"}))
        .await;
    let id = revoked["id"].as_str().unwrap().to_owned();
    admin.wait_acknowledged(&id, 1).await;

    let driver = chromedriver().await;
    let profile = tempfile::tempdir().unwrap();
    let c = browser(&driver, profile.path()).await;
    sign_in(&c, d.cp.admin_addr, &token).await;
    c.goto(&format!(
        "http://{}/console/revocations/{id}",
        d.cp.admin_addr
    ))
    .await
    .unwrap();
    wait_text(&c, "#acks td", APP_ID).await;
    c.execute("window.leashMarker = 'still the same page';", vec![])
        .await
        .unwrap();
    let rows = c
        .find_all(Locator::Css("#acks tbody tr"))
        .await
        .unwrap()
        .len();

    let d = d.restart_control_plane().await;
    // The sidecar resumes on the restarted control plane: its new session
    // acknowledges again, and a second sidecar joins; both rows arrive.
    let second = start_sidecar(sidecar_config(d.ids.endpoint(APP_ID), d.cp.sidecar_addr)).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while c
        .find_all(Locator::Css("#acks tbody tr"))
        .await
        .unwrap()
        .len()
        < rows + 2
    {
        if Instant::now() > deadline {
            let status = admin.get(&format!("/v1/revocations/{id}")).await.json();
            panic!(
                "no acknowledgement after the restart reached the open page: {}\nthe API says: {status}",
                c.source().await.unwrap_or_default()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let marker = c
        .execute("return window.leashMarker;", vec![])
        .await
        .unwrap();
    assert_eq!(marker, "still the same page", "the page was not reloaded");
    c.close().await.unwrap();
    second.shutdown(Duration::from_secs(2)).await;
}
