//! `leash-proxy`: parse flags, start the sidecar, stop on Ctrl-C or SIGTERM.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::Parser;
use leash_api::identity::IdentityConfig;
use leash_api::process::{init_logging, shutdown_signal};
use leash_proxy::{ControlConfig, Limits, Sidecar, SidecarConfig, UpstreamTimeouts};

#[derive(Parser)]
#[command(
    name = "leash-proxy",
    version,
    about = "The Leash sidecar: injects short-lived, identity-bound credentials into outbound calls"
)]
struct Cli {
    /// Forward-proxy listener; point the workload's HTTP_PROXY here.
    #[arg(long, env = "LEASH_LISTEN", default_value = "127.0.0.1:15001")]
    listen: SocketAddr,
    /// Admin listener: /healthz, /readyz, /metrics.
    #[arg(long, env = "LEASH_ADMIN_LISTEN", default_value = "127.0.0.1:15000")]
    admin_listen: SocketAddr,
    /// A listener bound to one upstream, as UPSTREAM=ADDR (plain requests to
    /// it go to that upstream whatever their Host). Repeatable.
    #[arg(long = "upstream-listener", value_name = "UPSTREAM=ADDR")]
    upstream_listeners: Vec<String>,
    /// Control plane sidecar API address.
    #[arg(long, env = "LEASH_CONTROL_PLANE", default_value = "127.0.0.1:8443")]
    control_plane: SocketAddr,
    /// SPIFFE ID the control plane must present.
    #[arg(
        long,
        env = "LEASH_CONTROL_PLANE_ID",
        default_value = "spiffe://leash.test/leash/control-plane"
    )]
    control_plane_id: String,
    /// SPIFFE Workload API endpoint (unix:///path or tcp://ip:port).
    #[arg(long, env = "SPIFFE_ENDPOINT_SOCKET")]
    spiffe_endpoint: Option<String>,
    /// Instead of the Workload API: the SVID certificate chain (PEM, leaf
    /// first). Re-read when it changes. Needs --svid-key and --svid-bundle.
    #[arg(long, env = "LEASH_SVID_CERT", requires_all = ["svid_key", "svid_bundle"])]
    svid_cert: Option<std::path::PathBuf>,
    /// The SVID's private key (PKCS#8 PEM).
    #[arg(long, env = "LEASH_SVID_KEY", requires = "svid_cert")]
    svid_key: Option<std::path::PathBuf>,
    /// The trust bundle (PEM CA certificates).
    #[arg(long, env = "LEASH_SVID_BUNDLE", requires = "svid_cert")]
    svid_bundle: Option<std::path::PathBuf>,
    /// How often routes are re-read from the control plane.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    routes_refresh: Duration,
    /// Largest request line plus header block accepted (larger: 431).
    #[arg(long, default_value_t = 64 * 1024)]
    max_header_bytes: usize,
    /// Most header fields accepted in one request.
    #[arg(long, default_value_t = 100)]
    max_headers: usize,
    /// Time a client has to send a complete header block.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    header_read_timeout: Duration,
    /// Upstream TCP connect timeout.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    upstream_connect_timeout: Duration,
    /// Time allowed for an upstream to start answering.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    upstream_response_timeout: Duration,
    /// Time open requests get to finish on shutdown.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    drain_timeout: Duration,
    /// Log format: text or json. Filter with RUST_LOG (default info).
    #[arg(long, default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_logging(&cli.log_format);
    leash_api::identity::install_crypto_provider();
    // A sidecar shares its node with the workload: two worker threads serve
    // thousands of requests a second without taking the node's cores.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(run(cli))
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let identity = IdentityConfig::from_flags(
        cli.spiffe_endpoint.clone(),
        cli.svid_cert.clone(),
        cli.svid_key.clone(),
        cli.svid_bundle.clone(),
    )?;
    spiffe::SpiffeId::new(&cli.control_plane_id).with_context(|| {
        format!(
            "--control-plane-id {:?} is not a SPIFFE ID",
            cli.control_plane_id
        )
    })?;
    if cli.max_header_bytes < 8192 {
        bail!("--max-header-bytes must be at least 8192");
    }
    let mut named = Vec::new();
    for spec in &cli.upstream_listeners {
        let Some((name, addr)) = spec.split_once('=') else {
            bail!("--upstream-listener {spec:?}: expected UPSTREAM=ADDR");
        };
        let addr: SocketAddr = addr
            .parse()
            .with_context(|| format!("--upstream-listener {spec:?}: bad address"))?;
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr}"))?;
        named.push((name.to_owned(), listener));
    }
    let egress = tokio::net::TcpListener::bind(cli.listen)
        .await
        .with_context(|| format!("cannot listen on {}", cli.listen))?;
    let admin = tokio::net::TcpListener::bind(cli.admin_listen)
        .await
        .with_context(|| format!("cannot listen on {}", cli.admin_listen))?;
    let config = SidecarConfig {
        control: ControlConfig {
            identity,
            control_plane_addr: cli.control_plane,
            control_plane_id: cli.control_plane_id,
            routes_refresh: cli.routes_refresh,
            call_timeout: Duration::from_secs(5),
            upstream: UpstreamTimeouts {
                connect: cli.upstream_connect_timeout,
                pool_idle: Duration::from_secs(90),
            },
        },
        limits: Limits {
            max_header_bytes: cli.max_header_bytes,
            max_headers: cli.max_headers,
            header_read_timeout: cli.header_read_timeout,
        },
        upstream_response_timeout: cli.upstream_response_timeout,
    };
    tracing::info!(?config, "effective configuration");
    let sidecar = Sidecar::start(config, egress, admin, named)?;
    shutdown_signal().await;
    tracing::info!("shutting down");
    sidecar.shutdown(cli.drain_timeout).await;
    Ok(())
}
