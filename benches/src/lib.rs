//! Helpers shared by the benchmarks that run the release binaries as real
//! processes (`propagation`, `hostile`).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test and benchmark support: a failed setup step should stop the run with its message"
)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::bail;

pub const CP_ID: &str = "spiffe://leash.test/leash/control-plane";
pub const APP_ID: &str = "spiffe://leash.test/ns/bench/sa/client";

/// A child process, killed when dropped.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The release `leash-control-plane` binary (built beforehand).
pub fn control_plane_binary() -> anyhow::Result<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let target =
        std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), PathBuf::from);
    let bin = target.join("release/leash-control-plane");
    if !bin.exists() {
        bail!(
            "{} not found: run `cargo build --release -p leash-control-plane` first",
            bin.display()
        );
    }
    Ok(bin)
}

pub fn free_port() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
}

/// `leash-control-plane serve` with the policy `dir/policy.yaml`, the data
/// directory `data`, the two listeners, and its identity from the dev
/// Workload API's `dir/cp.sock` (see [`start_identity`]); each benchmark
/// adds its own flags.
pub fn serve_command(
    bin: &Path,
    dir: &Path,
    data: &Path,
    api: SocketAddr,
    admin: SocketAddr,
) -> Command {
    let mut cmd = Command::new(bin);
    cmd.arg("serve")
        .arg("--policy")
        .arg(dir.join("policy.yaml"))
        .arg("--data-dir")
        .arg(data)
        .args([
            "--listen",
            &api.to_string(),
            "--admin-listen",
            &admin.to_string(),
        ])
        .arg("--spiffe-endpoint")
        .arg(format!("unix://{}", dir.join("cp.sock").display()));
    cmd
}

/// The dev Workload API as a process, serving `cp.sock` (the control
/// plane's identity) and `app.sock` (the bench workload's) in `dir`.
pub async fn start_identity(bin: &Path, dir: &Path) -> anyhow::Result<Proc> {
    let identity = Proc(
        Command::new(bin)
            .args(["dev-identity", "--socket"])
            .arg(format!("{}={CP_ID}", dir.join("cp.sock").display()))
            .arg("--socket")
            .arg(format!("{}={APP_ID}", dir.join("app.sock").display()))
            .stderr(Stdio::null())
            .spawn()?,
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while !dir.join("app.sock").exists() {
        if Instant::now() > deadline {
            bail!("dev identity did not start");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(identity)
}

/// Waits until the control plane whose admin API is at `admin` answers
/// `/readyz` with 200 (its store is open and read, its listeners serve).
pub async fn wait_ready(admin: SocketAddr, within: Duration) -> anyhow::Result<()> {
    use http_body_util::Empty;
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::TokioExecutor;

    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<bytes::Bytes>>();
    let deadline = Instant::now() + within;
    loop {
        if let Ok(r) = client.get(format!("http://{admin}/readyz").parse()?).await
            && r.status() == 200
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the control plane at {admin} was not ready within {within:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
