//! Identity from SVID files on disk, re-read when they change.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test stops at the first failed step, with its message"
)]

use std::time::Duration;

use leash_api::identity::{IdentityConfig, SvidFiles, read_svid_files};
use leash_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecar_runs_on_svid_files_and_follows_their_rotation() {
    let d = Deployment::start("5m", Duration::from_secs(600)).await;
    let files_dir = short_tempdir();
    let ca = d.ids.provider.ca().clone();
    let files = write_svid_files(files_dir.path(), &ca, APP_ID, Duration::from_secs(600));
    let sidecar = start_sidecar(sidecar_config_with(
        IdentityConfig::Files(files),
        d.cp.sidecar_addr,
    ))
    .await;
    wait_ready(sidecar.admin_addr).await;
    let client = ProxyClient::new(sidecar.egress_addr);
    let a = client
        .get("http://payments.leash.test/whoami", &[])
        .await
        .unwrap();
    assert_eq!(a.status, 200, "{}", String::from_utf8_lossy(&a.body));
    assert_eq!(a.json()["sub"], APP_ID);

    // Rotate the files under traffic: the new SVID is picked up, nothing fails.
    let before = sidecar.link.svid_leaf().unwrap();
    write_svid_files(files_dir.path(), &ca, APP_ID, Duration::from_secs(600));
    let failures = std::sync::atomic::AtomicUsize::new(0);
    eventually(
        Duration::from_secs(10),
        "rotated SVID picked up",
        || async {
            let a = client
                .get("http://payments.leash.test/whoami", &[])
                .await
                .ok()?;
            if a.status != 200 {
                failures.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            (sidecar.link.svid_leaf()? != before).then_some(())
        },
    )
    .await;
    assert_eq!(failures.into_inner(), 0);
}

#[test]
fn unreadable_svid_files_name_the_file() {
    let dir = short_tempdir();
    let garbage = dir.path().join("svid.pem");
    std::fs::write(&garbage, "not a certificate").unwrap();
    let files = SvidFiles {
        cert: garbage.clone(),
        key: dir.path().join("missing-key.pem"),
        bundle: garbage.clone(),
    };
    let err = read_svid_files(&files).unwrap_err().to_string();
    assert!(err.contains("svid.pem"), "{err}");
    assert!(err.contains("no CERTIFICATE block"), "{err}");
}
