//! `example-upstream`: the quickstart's payments API. Accepts only Leash JWTs.

use std::net::SocketAddr;

use clap::Parser;
use leash_examples::{UpstreamConfig, bind, serve};

#[derive(Parser)]
#[command(
    name = "example-upstream",
    about = "An API that accepts only Leash JWTs (quickstart)"
)]
struct Cli {
    #[arg(long, default_value = "127.0.0.1:9090")]
    listen: SocketAddr,
    /// The control plane's JWKS.
    #[arg(long, default_value = "http://127.0.0.1:8080/.well-known/jwks.json")]
    jwks_url: String,
    /// Expected `aud` (the upstream's name in the policy).
    #[arg(long, default_value = "payments")]
    audience: String,
    /// Expected `iss` (the control plane's issuer).
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    issuer: String,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let listener = bind(cli.listen).await?;
    tracing::info!(listen = %cli.listen, audience = %cli.audience, "example upstream listening");
    let config = UpstreamConfig {
        jwks_url: cli.jwks_url,
        audience: cli.audience,
        issuer: Some(cli.issuer),
    };
    tokio::select! {
        () = serve(listener, config) => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    Ok(())
}
