//! Command-line flags of `leash-proxy` (also read by the deploy-manifest test).

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::Parser;
use leash_api::identity::IdentityConfig;

use crate::{ControlConfig, Limits, SidecarConfig, UpstreamTimeouts};

#[derive(Parser)]
#[command(
    name = "leash-proxy",
    version,
    about = "The Leash sidecar: injects short-lived, identity-bound credentials into outbound calls"
)]
pub struct Cli {
    /// Forward-proxy listener; point the workload's HTTP_PROXY here.
    #[arg(long, env = "LEASH_LISTEN", default_value = "127.0.0.1:15001")]
    pub listen: SocketAddr,
    /// Admin listener: /healthz, /readyz, /metrics, /config_dump, /logging.
    /// Keep it on localhost; give probes --probe-listen.
    #[arg(long, env = "LEASH_ADMIN_LISTEN", default_value = "127.0.0.1:15000")]
    pub admin_listen: SocketAddr,
    /// Probe listener serving only /healthz and /readyz, with its own
    /// connection budget (1,024) and a 2 s header timeout, for the kubelet
    /// (e.g. 0.0.0.0:15021). Off unless given.
    #[arg(long, env = "LEASH_PROBE_LISTEN")]
    pub probe_listen: Option<SocketAddr>,
    /// A listener bound to one upstream, as UPSTREAM=ADDR (plain requests to
    /// it go to that upstream whatever their Host). Repeatable.
    #[arg(long = "upstream-listener", value_name = "UPSTREAM=ADDR")]
    pub upstream_listeners: Vec<String>,
    /// Control plane sidecar API address (host:port; a name is resolved on
    /// each connect). Repeat, or separate with commas, for several replicas:
    /// they are tried in turn.
    #[arg(
        long,
        env = "LEASH_CONTROL_PLANE",
        default_value = "127.0.0.1:8443",
        value_delimiter = ','
    )]
    pub control_plane: Vec<String>,
    /// Refuse to inject credentials (503) after this long without hearing
    /// from the control plane: the bound on how long a revocation can go
    /// unenforced when this sidecar is cut off.
    #[arg(long, env = "LEASH_MAX_STALENESS", default_value = "30s", value_parser = humantime::parse_duration)]
    pub max_staleness: Duration,
    /// SPIFFE ID the control plane must present.
    #[arg(
        long,
        env = "LEASH_CONTROL_PLANE_ID",
        default_value = "spiffe://leash.test/leash/control-plane"
    )]
    pub control_plane_id: String,
    /// SPIFFE Workload API endpoint (unix:///path or tcp://ip:port).
    #[arg(long, env = "SPIFFE_ENDPOINT_SOCKET")]
    pub spiffe_endpoint: Option<String>,
    /// Instead of the Workload API: the SVID certificate chain (PEM, leaf
    /// first). Re-read when it changes. Needs --svid-key and --svid-bundle.
    #[arg(long, env = "LEASH_SVID_CERT", requires_all = ["svid_key", "svid_bundle"])]
    pub svid_cert: Option<std::path::PathBuf>,
    /// The SVID's private key (PKCS#8 PEM).
    #[arg(long, env = "LEASH_SVID_KEY", requires = "svid_cert")]
    pub svid_key: Option<std::path::PathBuf>,
    /// The trust bundle (PEM CA certificates).
    #[arg(long, env = "LEASH_SVID_BUNDLE", requires = "svid_cert")]
    pub svid_bundle: Option<std::path::PathBuf>,
    /// Largest request line plus header block accepted (larger: 431).
    #[arg(long, default_value_t = 64 * 1024)]
    pub max_header_bytes: usize,
    /// Most header fields accepted in one request.
    #[arg(long, default_value_t = 100)]
    pub max_headers: usize,
    /// Time a client has to send a complete header block, counted from the
    /// connection's start or from when the previous request is done (its
    /// body read, its answer handed to the connection's write buffer), so it
    /// is also how long a kept-alive connection may sit idle. As with hyper's
    /// own timer, an answer's tail a client has not read by then is dropped.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub header_read_timeout: Duration,
    /// Workload connections open at once; one more gets 503 and is closed.
    #[arg(long, default_value_t = 10_000)]
    pub max_connections: usize,
    /// Requests waiting for an upstream answer at once; one more gets 503.
    #[arg(long, default_value_t = 10_000)]
    pub max_in_flight: usize,
    /// Largest WebSocket frame a workload may send; a larger one ends the
    /// connection with close code 1009 (message too big).
    #[arg(long, default_value_t = 1024 * 1024)]
    pub max_websocket_frame_bytes: u64,
    /// Upstream TCP connect timeout.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub upstream_connect_timeout: Duration,
    /// Connections open to one upstream at once (busy and idle); a request
    /// finding none free waits for one within --upstream-response-timeout.
    #[arg(long, env = "LEASH_UPSTREAM_MAX_CONNECTIONS", default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..))]
    pub upstream_max_connections: u32,
    /// Time allowed for an upstream to start answering.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub upstream_response_timeout: Duration,
    /// Time open requests get to finish on shutdown.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub drain_timeout: Duration,
    /// Runtime worker threads. A sidecar shares its node with the workload;
    /// 2 serves thousands of requests a second. Use 1 when pinned to one core.
    #[arg(long, env = "LEASH_WORKER_THREADS", default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub worker_threads: u16,
    /// How often usage counts are shipped to the control plane.
    #[arg(long, env = "LEASH_REPORT_INTERVAL", default_value = "5s", value_parser = humantime::parse_duration)]
    pub report_interval: Duration,
    /// Usage records kept while the control plane is unreachable; past this
    /// the oldest are dropped and reported as dropped.
    #[arg(long, default_value_t = 100_000)]
    pub usage_buffer_records: usize,
    /// Count usage and report it to the control plane. Turning it off hides
    /// this workload's use from responders: meant for measuring its cost.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, value_name = "true|false")]
    pub usage_reporting: bool,
    /// Write the interception CA's certificate (PEM) here at start, for the
    /// workload's trust store (upstreams with `intercept: true`). It is
    /// also served at the admin port's /ca.pem. Its key is generated at
    /// start and never leaves the process: a restart makes a new CA.
    #[arg(long, env = "LEASH_INTERCEPT_CA_FILE", value_name = "PATH")]
    pub intercept_ca_file: Option<std::path::PathBuf>,
    /// Log format: text or json. Filter with RUST_LOG (default info).
    #[arg(long, default_value = "text", value_parser = ["text", "json"])]
    pub log_format: String,
}

impl Cli {
    /// Validates the flags and builds the sidecar's configuration.
    pub fn config(&self) -> anyhow::Result<SidecarConfig> {
        let cli = self;
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
        if cli.control_plane.iter().any(|a| {
            a.parse::<http::uri::Authority>()
                .map_or(true, |a| a.port().is_none())
        }) {
            bail!(
                "--control-plane takes host:port, got {:?}",
                cli.control_plane
            );
        }
        if cli.max_staleness < Duration::from_secs(1) {
            bail!("--max-staleness must be at least 1s");
        }
        if cli.report_interval < Duration::from_millis(100) {
            bail!("--report-interval must be at least 100ms");
        }
        if cli.max_header_bytes < 8192 {
            bail!("--max-header-bytes must be at least 8192");
        }
        let config = SidecarConfig {
            control: ControlConfig {
                identity,
                control_planes: cli.control_plane.clone(),
                control_plane_id: cli.control_plane_id.clone(),
                max_staleness: cli.max_staleness,
                report_interval: cli.report_interval,
                usage_buffer_records: cli.usage_buffer_records,
                call_timeout: Duration::from_secs(5),
                upstream: UpstreamTimeouts {
                    connect: cli.upstream_connect_timeout,
                    pool_idle: Duration::from_secs(90),
                    max_connections: cli.upstream_max_connections as usize,
                },
            },
            limits: Limits {
                max_header_bytes: cli.max_header_bytes,
                max_headers: cli.max_headers,
                header_read_timeout: cli.header_read_timeout,
                max_connections: cli.max_connections.max(1),
                max_in_flight: cli.max_in_flight.max(1),
                max_websocket_frame_bytes: cli.max_websocket_frame_bytes,
            },
            upstream_response_timeout: cli.upstream_response_timeout,
            otel: None,
            usage_reporting: cli.usage_reporting,
            intercept_ca_file: cli.intercept_ca_file.clone(),
        };
        Ok(config)
    }

    /// The `--upstream-listener` flags as (upstream, address).
    pub fn upstream_listeners(&self) -> anyhow::Result<Vec<(String, SocketAddr)>> {
        let mut out = Vec::new();
        for spec in &self.upstream_listeners {
            let Some((name, addr)) = spec.split_once('=') else {
                bail!("--upstream-listener {spec:?}: expected UPSTREAM=ADDR");
            };
            let addr: SocketAddr = addr
                .parse()
                .with_context(|| format!("--upstream-listener {spec:?}: bad address"))?;
            out.push((name.to_owned(), addr));
        }
        Ok(out)
    }
}
