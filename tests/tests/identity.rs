//! SPIFFE identity on both sides: SVID rotation under traffic, and mTLS
//! refusals for certificates that are foreign, expired, forged or missing.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test stops at the first failed step, with its message"
)]

use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use leash_api::v1::GetRoutesRequest;
use leash_api::v1::sidecar_api_client::SidecarApiClient;
use leash_control_plane::devid::{DevCa, SvidMaterial};
use leash_tests::*;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

/// Accepts any server certificate: these tests are about what the control
/// plane accepts from clients, not the other way round.
#[derive(Debug)]
struct AnyServer(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Calls `GetRoutes` on the control plane presenting `client_cert` (or none).
async fn call_with(
    addr: std::net::SocketAddr,
    client_cert: Option<&SvidMaterial>,
) -> Result<usize, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer(provider)));
    let mut config = match client_cert {
        Some(m) => builder
            .with_client_auth_cert(
                vec![CertificateDer::from(m.leaf_der.clone())],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(m.key_pkcs8.to_vec())),
            )
            .map_err(|e| e.to_string())?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let connect = tower::service_fn(move |_: http::Uri| {
        let connector = connector.clone();
        async move {
            let tcp = tokio::net::TcpStream::connect(addr).await?;
            let tls = connector.connect(ServerName::from(addr.ip()), tcp).await?;
            Ok::<_, std::io::Error>(TokioIo::new(tls))
        }
    });
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| e.to_string())?
        .connect_with_connector(connect)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let routes = SidecarApiClient::new(channel)
        .get_routes(GetRoutesRequest::default())
        .await
        .map_err(|s| format!("call: {s}"))?;
    Ok(routes.into_inner().routes.len())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_plane_refuses_bad_client_certificates() {
    let d = Deployment::start("5m", Duration::from_secs(600)).await;
    let addr = d.cp.sidecar_addr;
    let ca = d.ids.provider.ca();

    // Positive control: a valid SVID of our trust domain gets an answer.
    let good = ca.issue(APP_ID, Duration::from_secs(60)).unwrap();
    assert_eq!(call_with(addr, Some(&good)).await, Ok(2));

    let now = time::OffsetDateTime::now_utc();
    let expired = ca
        .issue_between(
            APP_ID,
            now - time::Duration::hours(2),
            now - time::Duration::hours(1),
        )
        .unwrap();
    let err = call_with(addr, Some(&expired)).await.unwrap_err();
    assert!(err.contains("connect") || err.contains("call"), "{err}");

    let foreign = DevCa::new("evil.test")
        .unwrap()
        .issue(
            "spiffe://evil.test/ns/demo/sa/client",
            Duration::from_secs(60),
        )
        .unwrap();
    call_with(addr, Some(&foreign)).await.unwrap_err();

    // A different CA minting IDs in *our* trust domain is not trusted either.
    let forged = DevCa::new(TRUST_DOMAIN)
        .unwrap()
        .issue(APP_ID, Duration::from_secs(60))
        .unwrap();
    call_with(addr, Some(&forged)).await.unwrap_err();

    call_with(addr, None).await.unwrap_err();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecar_refuses_a_control_plane_with_the_wrong_spiffe_id() {
    init();
    let dir = short_tempdir();
    let ids = Identities::start(
        dir.path(),
        Duration::from_secs(600),
        &[CP_ID, APP_ID, OTHER_ID],
    );
    let upstream = listener().await.local_addr().unwrap();
    let policy = write_policy(dir.path(), &standard_policy(upstream, "5m"));
    // The impostor has a perfectly valid SVID of the trust domain, just not
    // the control plane's.
    let impostor = start_control_plane(&ids, OTHER_ID, &policy, &dir.path().join("data")).await;
    let sidecar = start_sidecar(sidecar_config(ids.endpoint(APP_ID), impostor.sidecar_addr)).await;

    let ready = eventually(Duration::from_secs(10), "identity acquired", || async {
        let a = http_get(&format!("http://{}/readyz", sidecar.admin_addr))
            .await
            .ok()?;
        let body = String::from_utf8_lossy(&a.body).into_owned();
        (!body.contains("identity")).then_some((a.status, body))
    })
    .await;
    assert_eq!(ready.0, 503);
    assert!(ready.1.contains("pending: control-plane"), "{}", ready.1);

    let a = ProxyClient::new(sidecar.egress_addr)
        .get("http://payments.leash.test/whoami", &[])
        .await
        .unwrap();
    assert_eq!(a.status, 503);
    assert_eq!(a.json()["error"], "control_plane_unavailable");
    assert!(
        impostor
            .state
            .store
            .credentials_for(APP_ID)
            .await
            .unwrap()
            .is_empty()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_plane_down_at_start_then_up() {
    init();
    let dir = short_tempdir();
    let ids = Identities::start(dir.path(), Duration::from_secs(600), &[CP_ID, APP_ID]);
    let upstream = listener().await.local_addr().unwrap();
    let policy = write_policy(dir.path(), &standard_policy(upstream, "5m"));
    // Reserve a port, then free it: nothing listens there yet.
    let cp_addr = listener().await.local_addr().unwrap();
    let sidecar = start_sidecar(sidecar_config(ids.endpoint(APP_ID), cp_addr)).await;
    let client = ProxyClient::new(sidecar.egress_addr);

    let body = eventually(
        Duration::from_secs(10),
        "readiness waits only on the control plane",
        || async {
            let a = http_get(&format!("http://{}/readyz", sidecar.admin_addr))
                .await
                .ok()?;
            let body = String::from_utf8_lossy(&a.body).into_owned();
            (a.status == 503 && body == "not ready, pending: control-plane\n").then_some(body)
        },
    )
    .await;
    assert!(body.contains("control-plane"));
    let a = client
        .get("http://payments.leash.test/whoami", &[])
        .await
        .unwrap();
    assert_eq!(a.status, 503);
    assert_eq!(a.json()["error"], "control_plane_unavailable");

    let l = tokio::net::TcpListener::bind(cp_addr).await.unwrap();
    let _cp = start_control_plane_on(&ids, CP_ID, &policy, &dir.path().join("data"), l).await;
    wait_ready(sidecar.admin_addr).await;
    // Routed now (the upstream itself is not running: 502, not 503).
    let a = client
        .get("http://payments.leash.test/whoami", &[])
        .await
        .unwrap();
    assert_eq!(a.status, 502, "{:?}", a.json());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn svid_rotation_under_traffic_drops_nothing() {
    // SVIDs live 2 s and are re-issued every second; credentials live 2 s,
    // so issuance keeps happening over the rotating mTLS identity.
    let d = Deployment::start("2s", Duration::from_secs(2)).await;
    let first_serial = svid_serial(&d);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let (mut ok, mut failed) = (0, Vec::new());
    while tokio::time::Instant::now() < deadline {
        let a = d
            .client
            .get("http://payments.leash.test/whoami", &[])
            .await
            .unwrap();
        if a.status == 200 {
            ok += 1;
        } else {
            failed.push((a.status, String::from_utf8_lossy(&a.body).into_owned()));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        failed.is_empty(),
        "{} of {} failed: {:?}",
        failed.len(),
        ok + failed.len(),
        &failed[..failed.len().min(3)]
    );
    assert_ne!(svid_serial(&d), first_serial, "the sidecar's SVID rotated");

    // The SVIDs in use at the start have expired by now. A brand-new mTLS
    // session (control plane restarted on the same port) only works if both
    // sides picked up their rotated SVIDs.
    let Deployment {
        cp,
        ids,
        dir,
        client,
        ..
    } = d;
    let addr = cp.sidecar_addr;
    cp.shutdown(Duration::from_secs(5)).await;
    let l = tokio::net::TcpListener::bind(addr).await.unwrap();
    let _cp = start_control_plane_on(
        &ids,
        CP_ID,
        &dir.path().join("policy.yaml"),
        &dir.path().join("data"),
        l,
    )
    .await;
    let answer = eventually(
        Duration::from_secs(15),
        "a fresh credential over a fresh mTLS session",
        || async {
            let a = client
                .get("http://payments.leash.test/whoami", &[])
                .await
                .ok()?;
            (a.status == 200).then_some(a)
        },
    )
    .await;
    assert_eq!(answer.json()["sub"], APP_ID);
}

fn svid_serial(d: &Deployment) -> Vec<u8> {
    d.sidecar.link.svid_leaf().expect("sidecar has an SVID")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signing_keys_persist_and_rotate_by_kid() {
    let d = Deployment::start("5m", Duration::from_secs(600)).await;
    let old = d
        .client
        .get("http://payments.leash.test/echo", &[])
        .await
        .unwrap()
        .json();
    let old_token = old["headers"]["authorization"]
        .as_str()
        .unwrap()
        .strip_prefix("Bearer ")
        .unwrap()
        .to_owned();
    let old_kid = d.cp.state.issuer.active_kid();

    let new_kid = leash_control_plane::jwt::rotate(&d.cp.state.store)
        .await
        .unwrap();
    d.cp.state.issuer.reload(&d.cp.state.store).await.unwrap();
    assert_eq!(d.cp.state.issuer.active_kid(), new_kid);
    let jwks = http_get(&format!("http://{}/.well-known/jwks.json", d.cp.admin_addr))
        .await
        .unwrap()
        .json();
    let kids: Vec<_> = jwks["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["kid"].as_str().unwrap().to_owned())
        .collect();
    // The signing keys, newest first, then the evidence key (its own kid,
    // never one a credential is signed with).
    assert_eq!(kids.len(), 3, "{kids:?}");
    assert_eq!(
        kids[..2],
        [new_kid.clone(), old_kid.clone()],
        "both keys published, newest first"
    );
    assert!(kids[2].starts_with("evidence-"), "{kids:?}");

    // Tokens signed before the rotation still verify; new ones use the new kid.
    assert_eq!(d.verify(&old_token).await.unwrap().sub, APP_ID);
    // A second sidecar has no cached credential: it gets one signed by the new key.
    let second = start_sidecar(sidecar_config(d.ids.endpoint(APP_ID), d.cp.sidecar_addr)).await;
    let fresh = ProxyClient::new(second.egress_addr);
    let a = eventually(Duration::from_secs(10), "new sidecar ready", || async {
        let a = fresh
            .get("http://payments.leash.test/echo", &[])
            .await
            .ok()?;
        (a.status == 200).then_some(a)
    })
    .await
    .json();
    let token = a["headers"]["authorization"]
        .as_str()
        .unwrap()
        .strip_prefix("Bearer ")
        .unwrap()
        .to_owned();
    let header: serde_json::Value = serde_json::from_slice(
        &base64::Engine::decode(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD,
            token.split('.').next().unwrap(),
        )
        .unwrap(),
    )
    .unwrap();
    assert_eq!(header["kid"], new_kid.as_str());
    assert_eq!(d.verify(&token).await.unwrap().sub, APP_ID);

    // The keys survive a control-plane restart on the same data directory.
    let Deployment { cp, ids, dir, .. } = d;
    cp.shutdown(Duration::from_secs(5)).await;
    let cp = start_control_plane(
        &ids,
        CP_ID,
        &dir.path().join("policy.yaml"),
        &dir.path().join("data"),
    )
    .await;
    assert_eq!(cp.state.issuer.active_kid(), new_kid);
}
