//! WebSockets through the sidecar, against the Python `websockets` library
//! (an implementation no one here wrote) at both ends: the client calls
//! `ws://` and `wss://` through the proxy (it tunnels with `CONNECT`), the
//! upstream echo server reports the credential the handshake carried. A
//! revocation closes a live connection with 1008; a frame over the limit
//! closes it with 1009.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test stops at the first failed step, with its message"
)]

use std::io::{BufRead as _, BufReader};
use std::net::SocketAddr;
use std::process::{ChildStdout, Command, Stdio};
use std::time::Duration;

use leash_tests::*;
use serde_json::json;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

const SVID_TTL: Duration = Duration::from_secs(600);

const SERVER: &str = r#"
import asyncio, websockets
async def handler(ws):
    await ws.send("auth " + ws.request.headers.get("Authorization", ""))
    async for m in ws:
        await ws.send(m)
async def main():
    async with websockets.serve(handler, "127.0.0.1", 0) as server:
        print(server.sockets[0].getsockname()[1], flush=True)
        await asyncio.Future()
asyncio.run(main())
"#;

const CLIENT: &str = r#"
import asyncio, os, ssl, sys, websockets
async def main():
    url = sys.argv[1]
    kw = {"proxy": os.environ["PROXY"]}
    if url.startswith("wss://"):
        kw["ssl"] = ssl.create_default_context(cafile=os.environ["CA"])
    async with websockets.connect(url, additional_headers={"Authorization": "Bearer my-own-key"}, **kw) as ws:
        print(await ws.recv(), flush=True)
        await ws.send("hello")
        print("echo", await ws.recv(), flush=True)
        if os.environ.get("WAIT"):
            print("waiting", flush=True)
            try:
                await ws.recv()
                print("more", flush=True)
            except websockets.ConnectionClosed as e:
                print("closed", e.rcvd.code if e.rcvd else None, e.rcvd.reason if e.rcvd else "", flush=True)
asyncio.run(main())
"#;

struct Ws {
    _server: KillOnDrop,
    cp: leash_control_plane::app::ControlPlane,
    dir: tempfile::TempDir,
    _ids: Identities,
    sidecar: leash_proxy::Sidecar,
    ca: std::path::PathBuf,
}

async fn start() -> Ws {
    init();
    let python = python_with("websockets", "websockets");
    let mut cmd = Command::new(&python);
    cmd.args(["-c", SERVER]);
    let (server, port) = python_server(cmd);
    let dir = short_tempdir();
    let ids = Identities::start(dir.path(), SVID_TTL, &[CP_ID, APP_ID]);
    let policy = PolicyBuilder::new()
        .upstream("chat", format!("http://127.0.0.1:{port}"))
        .with(|u| {
            u.intercept = true;
            u.credential.audience = Some("payments".into());
        })
        .grant(APP_ID, &["chat"])
        .write(dir.path());
    let cp = start_control_plane(&ids, CP_ID, &policy, &dir.path().join("data")).await;
    let mut config = sidecar_config(ids.endpoint(APP_ID), cp.sidecar_addr);
    config.intercept_ca_file = Some(dir.path().join("leash-ca.pem"));
    let sidecar = start_sidecar(config).await;
    wait_ready(sidecar.admin_addr).await;
    Ws {
        _server: server,
        ca: dir.path().join("leash-ca.pem"),
        cp,
        dir,
        _ids: ids,
        sidecar,
    }
}

fn client(ws: &Ws, url: &str, wait: bool) -> (KillOnDrop, BufReader<ChildStdout>) {
    let mut cmd = Command::new(python_with("websockets", "websockets"));
    cmd.args(["-c", CLIENT, url])
        .env("PROXY", format!("http://{}", ws.sidecar.egress_addr))
        .env("CA", &ws.ca)
        .stdout(Stdio::piped());
    if wait {
        cmd.env("WAIT", "1");
    }
    let mut child = cmd.spawn().unwrap();
    let out = BufReader::new(child.stdout.take().unwrap());
    (KillOnDrop(child), out)
}

fn next_line(out: &mut BufReader<ChildStdout>) -> String {
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    line.trim_end().to_owned()
}

async fn verify(ws: &Ws, auth_line: &str) {
    let token = auth_line
        .strip_prefix("auth Bearer ")
        .unwrap_or_else(|| panic!("no bearer token on the handshake: {auth_line:?}"));
    let claims = leash_examples::Verifier::new(upstream_config(ws.cp.admin_addr))
        .verify(token)
        .await
        .unwrap();
    assert_eq!(claims.sub, APP_ID);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_echo_gets_the_credential_on_its_handshake() {
    let ws = start().await;
    for url in ["ws://chat.leash.test/", "wss://chat.leash.test/"] {
        let (_child, mut out) = client(&ws, url, false);
        let auth = next_line(&mut out);
        verify(&ws, &auth).await;
        assert_eq!(next_line(&mut out), "echo hello", "{url}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_closes_a_live_websocket_with_1008() {
    let ws = start().await;
    let (_child, mut out) = client(&ws, "wss://chat.leash.test/", true);
    let auth = next_line(&mut out);
    verify(&ws, &auth).await;
    assert_eq!(next_line(&mut out), "echo hello");
    assert_eq!(next_line(&mut out), "waiting");
    let admin = Admin::bootstrap(ws.cp.admin_addr, &ws.dir.path().join("data"));
    let r = admin
        .revoke(json!({"kind": "grant", "workload": APP_ID, "upstream": "chat", "reason": "agent compromised"}))
        .await;
    admin.wait_acknowledged(r["id"].as_str().unwrap(), 1).await;
    let closed = tokio::task::spawn_blocking(move || next_line(&mut out))
        .await
        .unwrap();
    assert_eq!(closed, "closed 1008 leash: revoked");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_over_the_limit_is_refused_with_1009() {
    let ws = start().await;
    let proxy: SocketAddr = ws.sidecar.egress_addr;
    // HTTP_PROXY style: the handshake in absolute form.
    let mut s = tokio::net::TcpStream::connect(proxy).await.unwrap();
    s.write_all(
        b"GET http://chat.leash.test/ HTTP/1.1\r\nHost: chat.leash.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    )
    .await
    .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = s.read(&mut buf).await.unwrap();
        assert!(n > 0, "closed: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    let head = String::from_utf8_lossy(&got).to_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(
        head.contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo="),
        "{head}"
    );
    // A masked binary frame that says it carries 2 MiB (the limit is 1).
    let mut frame = vec![0x82, 0x80 | 127];
    frame.extend_from_slice(&(2u64 * 1024 * 1024).to_be_bytes());
    frame.extend_from_slice(&[1, 2, 3, 4]);
    frame.extend_from_slice(&[0u8; 1024]);
    s.write_all(&frame).await.unwrap();
    // Read to the end: the server's "auth" text frame, then the close.
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut rest)).await;
    let close = rest
        .windows(4)
        .position(|w| w[0] == 0x88 && w[2..4] == 1009u16.to_be_bytes())
        .unwrap_or_else(|| panic!("no close 1009 in {rest:?}"));
    let reason = String::from_utf8_lossy(&rest[close + 4..]);
    assert!(reason.contains("over the sidecar's limit"), "{reason}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_over_http2_is_translated_for_the_upstream() {
    let ws = start().await;
    // RFC 8441 with the h2 crate's client: an extended CONNECT over h2c.
    let tcp = tokio::net::TcpStream::connect(ws.sidecar.egress_addr)
        .await
        .unwrap();
    let (send, conn) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut send = send.ready().await.unwrap();
    // The server's SETTINGS arrive after the handshake returns.
    eventually(
        Duration::from_secs(5),
        "SETTINGS_ENABLE_CONNECT_PROTOCOL",
        || {
            let on = send.is_extended_connect_protocol_enabled();
            async move { on.then_some(()) }
        },
    )
    .await;
    let mut req = http::Request::builder()
        .method("CONNECT")
        .uri("http://chat.leash.test/")
        .header("sec-websocket-version", "13")
        .header("authorization", "Bearer my-own-key")
        .body(())
        .unwrap();
    req.extensions_mut()
        .insert(h2::ext::Protocol::from_static("websocket"));
    let (resp, mut up) = send.send_request(req, false).unwrap();
    let resp = resp.await.unwrap();
    assert_eq!(resp.status(), 200, "{resp:?}");
    assert!(resp.headers().get("sec-websocket-accept").is_none());
    let mut down = resp.into_body();
    // Frames as RFC 6455 has them; the server's first is "auth <header>".
    let mut got = Vec::new();
    let text = loop {
        let chunk = down.data().await.unwrap().unwrap();
        let _ = down.flow_control().release_capacity(chunk.len());
        got.extend_from_slice(&chunk);
        if got.len() >= 2 && got.len() >= 2 + usize::from(got[1] & 0x7f).min(125) {
            let (len, start) = match got[1] & 0x7f {
                126 => (usize::from(u16::from_be_bytes([got[2], got[3]])), 4),
                n => (usize::from(n), 2),
            };
            if got.len() >= start + len {
                assert_eq!(got[0], 0x81, "a text frame");
                break String::from_utf8(got[start..start + len].to_vec()).unwrap();
            }
        }
    };
    verify(&ws, &text).await;
    // A masked text frame "hi" goes up and comes back.
    let key = [9u8, 8, 7, 6];
    let mut frame = vec![0x81, 0x80 | 2];
    frame.extend_from_slice(&key);
    frame.extend(b"hi".iter().zip(key.iter().cycle()).map(|(b, k)| b ^ k));
    up.send_data(bytes::Bytes::from(frame), false).unwrap();
    let echo = down.data().await.unwrap().unwrap();
    assert_eq!(&echo[..], &[0x81, 2, b'h', b'i']);
}
