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
