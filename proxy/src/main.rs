//! `leash-proxy`: parse flags, start the sidecar, stop on Ctrl-C or SIGTERM.

use anyhow::Context as _;
use clap::Parser as _;
use leash_api::process::{init_logging, shutdown_signal};
use leash_proxy::Sidecar;
use leash_proxy::cli::Cli;

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_logging(&cli.log_format);
    leash_api::identity::install_crypto_provider();
    // A sidecar shares its node with the workload: two worker threads serve
    // thousands of requests a second without taking the node's cores.
    let runtime = if cli.worker_threads == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(usize::from(cli.worker_threads))
            .enable_all()
            .build()?
    };
    runtime.block_on(run(cli))
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let mut config = cli.config()?;
    // The connection caps (`--max-connections`) need descriptors to be real.
    if let Some(n) = leash_api::process::raise_open_files_limit()
        && (n as usize) < config.limits.max_connections + 256
    {
        tracing::warn!(
            open_files = n,
            max_connections = config.limits.max_connections,
            "the open-files limit is below what --max-connections allows"
        );
    }
    let otlp = leash_api::telemetry::OtlpConfig::from_env("leash-proxy");
    config.otel = leash_api::telemetry::Otel::start(&otlp)?;
    let otel = config.otel.clone();
    let mut named = Vec::new();
    for (name, addr) in cli.upstream_listeners()? {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr}"))?;
        named.push((name, listener));
    }
    let egress = tokio::net::TcpListener::bind(cli.listen)
        .await
        .with_context(|| format!("cannot listen on {}", cli.listen))?;
    let admin = tokio::net::TcpListener::bind(cli.admin_listen)
        .await
        .with_context(|| format!("cannot listen on {}", cli.admin_listen))?;
    tracing::info!(?config, "effective configuration");
    let probes = match cli.probe_listen {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen on {addr}"))?,
        ),
        None => None,
    };
    let mut sidecar = Sidecar::start(config, egress, admin, named)?;
    if let Some(probes) = probes {
        sidecar.serve_probes(probes)?;
    }
    shutdown_signal().await;
    tracing::info!("shutting down");
    sidecar.shutdown(cli.drain_timeout).await;
    if let Some(otel) = otel {
        otel.shutdown().await;
    }
    Ok(())
}
