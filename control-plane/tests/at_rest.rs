//! Keys at rest, tried as a local user would: the data directory and the
//! database are readable by their owner only (and the control plane refuses
//! to start otherwise), the JWT signing keys and the leak fingerprint key
//! are sealed under the master key, keys left in the clear by an
//! `--insecure-dev` run are sealed at the next start with a key, and `serve`
//! will not start without a master key unless told it is a throw-away run.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test stops at the first failed step, with its message"
)]

mod common;

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::sync::Arc;

use common::*;
use leash_control_plane::secrets::MasterKey;
use leash_control_plane::store::Store;

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

/// The raw stored bytes of the signing keys, the fingerprint key and the
/// evidence key (`kid hex`).
async fn raw_keys(data: &Path) -> (Vec<Vec<u8>>, String, Vec<u8>) {
    let db = sqlx::SqlitePool::connect(&format!("sqlite://{}", data.join("leash.db").display()))
        .await
        .unwrap();
    let keys: Vec<Vec<u8>> = sqlx::query_scalar("SELECT pkcs8 FROM signing_keys")
        .fetch_all(&db)
        .await
        .unwrap();
    let fp: String =
        sqlx::query_scalar("SELECT value FROM store_meta WHERE key = 'fingerprint_key'")
            .fetch_one(&db)
            .await
            .unwrap();
    let evidence: String =
        sqlx::query_scalar("SELECT value FROM store_meta WHERE key = 'evidence_key'")
            .fetch_one(&db)
            .await
            .unwrap();
    let evidence = hex::decode(evidence.split_once(' ').unwrap().1).unwrap();
    db.close().await;
    (keys, fp, evidence)
}

#[tokio::test]
async fn keys_are_sealed_and_files_private() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let key = Arc::new(MasterKey::from_base64(&MasterKey::generate_base64()).unwrap());

    // An --insecure-dev store: keys in the clear, as an older version left them.
    let store = Store::open(&data, None).await.unwrap();
    let kid = leash_control_plane::jwt::rotate(&store).await.unwrap();
    let fp = store.fingerprint_key().await.unwrap();
    let evidence = store.evidence_key().await.unwrap();
    store.close().await;
    let (clear, clear_fp, clear_evidence) = raw_keys(&data).await;
    assert_eq!(clear[0][0], 0x30, "PKCS#8 DER in the clear");
    assert_eq!(
        clear_evidence, *evidence.pkcs8,
        "the evidence key in the clear"
    );
    assert_eq!(clear_fp.len(), 32, "hex in the clear");

    // The next start with a master key seals them; they still work.
    let store = Store::open(&data, Some(key.clone())).await.unwrap();
    let keys = store.signing_keys().await.unwrap();
    assert_eq!(keys[0].kid, kid);
    assert_eq!(*keys[0].pkcs8, clear[0]);
    assert_eq!(store.fingerprint_key().await.unwrap(), fp);
    let reopened = store.evidence_key().await.unwrap();
    assert_eq!(
        (reopened.kid.as_str(), &*reopened.pkcs8),
        (evidence.kid.as_str(), &*evidence.pkcs8),
        "the same evidence key, still usable"
    );
    leash_control_plane::jwt::rotate(&store).await.unwrap();
    store.close().await;
    let (sealed, sealed_fp, sealed_evidence) = raw_keys(&data).await;
    assert!(sealed_evidence.starts_with(b"lk1:"), "evidence key sealed");
    assert!(
        !sealed_evidence
            .windows(16)
            .any(|w| clear_evidence.windows(16).any(|c| c == w)),
        "no clear evidence key material left in the row"
    );
    assert_eq!(sealed.len(), 2);
    for k in &sealed {
        assert!(k.starts_with(b"lk1:"), "sealed");
        assert!(
            !k.windows(16).any(|w| clear[0].windows(16).any(|c| c == w)),
            "no clear key material left in the row"
        );
    }
    assert!(sealed_fp.starts_with("sealed:"));
    // Nothing of the clear key is left anywhere in the files.
    for f in ["leash.db", "leash.db-wal"] {
        let bytes = std::fs::read(data.join(f)).unwrap_or_default();
        assert!(
            !bytes
                .windows(32)
                .any(|w| w == &clear[0][clear[0].len() - 32..]),
            "{f} still holds the clear signing key"
        );
        assert!(
            !bytes
                .windows(32)
                .any(|w| w == &clear_evidence[clear_evidence.len() - 32..]),
            "{f} still holds the clear evidence key"
        );
    }

    // Without the key, or with another, sealed keys do not open.
    let store = Store::open(&data, None).await.unwrap();
    assert!(store.signing_keys().await.is_err());
    assert!(store.evidence_key().await.is_err());
    store.close().await;
    let other = Arc::new(MasterKey::from_base64(&MasterKey::generate_base64()).unwrap());
    let store = Store::open(&data, Some(other)).await.unwrap();
    let err = store.signing_keys().await.err().unwrap().to_string();
    assert!(
        err.contains("cannot be opened with this master key"),
        "{err}"
    );
    store.close().await;

    // Owner-only files; a readable one stops the start, naming the file.
    assert_eq!(mode(&data), 0o700);
    assert_eq!(mode(&data.join("leash.db")), 0o600);
    std::fs::set_permissions(
        data.join("leash.db"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let err = Store::open(&data, Some(key.clone()))
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("leash.db is readable by group or others (mode 644)"),
        "{err}"
    );
    assert!(err.contains("chmod 600"), "{err}");
    std::fs::set_permissions(
        data.join("leash.db"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).unwrap();
    let err = Store::open(&data, Some(key))
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("chmod 700"), "{err}");
}

#[tokio::test]
async fn serve_needs_a_master_key_unless_insecure_dev() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("policy.yaml"),
        "version: 1\nupstreams: []\ngrants: []\n",
    )
    .unwrap();
    let mut args = serve_args(dir.path(), free_port(), free_port());
    args.retain(|a| a != "--insecure-dev");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_leash-control-plane"))
        .args(&args)
        .env_remove("LEASH_MASTER_KEY")
        .env_remove("LEASH_MASTER_KEY_FILE")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no master key"), "{stderr}");
    assert!(stderr.contains("--insecure-dev"), "{stderr}");

    // A key file others can read is refused too.
    let key = dir.path().join("master.key");
    std::fs::write(&key, MasterKey::generate_base64()).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    args.extend(["--master-key-file".to_owned(), key.display().to_string()]);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_leash-control-plane"))
        .args(&args)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("readable by group or others"), "{stderr}");
}
