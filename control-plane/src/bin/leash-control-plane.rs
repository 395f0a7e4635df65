//! `leash-control-plane`: serve the control plane, run the dev identity
//! provider, or rotate the JWT signing key.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::{Args, Parser, Subcommand};
use leash_api::identity::IdentityConfig;
use leash_control_plane::app::{ControlPlane, ServeConfig};
use leash_control_plane::devid::{DevCa, DevIdentityProvider};
use leash_control_plane::store::Store;
use leash_control_plane::{init_logging, jwt, shutdown_signal};

#[derive(Parser)]
#[command(
    name = "leash-control-plane",
    version,
    about = "The Leash control plane"
)]
struct Cli {
    /// Log format: text or json. Filter with RUST_LOG (default info).
    #[arg(long, global = true, default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the sidecar API (gRPC, mTLS) and the admin API (HTTP).
    Serve(ServeArgs),
    /// Run a dev SPIFFE Workload API server backed by an in-memory CA
    /// (for local runs and tests; production uses SPIRE).
    DevIdentity(DevIdentityArgs),
    /// Manage the JWT signing keys.
    #[command(subcommand)]
    Keys(KeysCommand),
}

#[derive(Args)]
struct ServeArgs {
    /// Policy file (YAML). Re-read when it changes; an invalid edit is refused.
    #[arg(long, env = "LEASH_POLICY")]
    policy: PathBuf,
    /// Directory for the SQLite database.
    #[arg(long, env = "LEASH_DATA_DIR", default_value = "./leash-data")]
    data_dir: PathBuf,
    /// Address of the sidecar API (gRPC over mTLS).
    #[arg(long, env = "LEASH_LISTEN", default_value = "127.0.0.1:8443")]
    listen: SocketAddr,
    /// Address of the admin API (health, readiness, JWKS, metrics).
    #[arg(long, env = "LEASH_ADMIN_LISTEN", default_value = "127.0.0.1:8080")]
    admin_listen: SocketAddr,
    /// SPIFFE Workload API endpoint (unix:///path or tcp://ip:port).
    #[arg(long, env = "SPIFFE_ENDPOINT_SOCKET")]
    spiffe_endpoint: Option<String>,
    /// Instead of the Workload API: the SVID certificate chain (PEM, leaf
    /// first). Re-read when it changes. Needs --svid-key and --svid-bundle.
    #[arg(long, env = "LEASH_SVID_CERT", requires_all = ["svid_key", "svid_bundle"])]
    svid_cert: Option<PathBuf>,
    /// The SVID's private key (PKCS#8 PEM).
    #[arg(long, env = "LEASH_SVID_KEY", requires = "svid_cert")]
    svid_key: Option<PathBuf>,
    /// The trust bundle (PEM CA certificates).
    #[arg(long, env = "LEASH_SVID_BUNDLE", requires = "svid_cert")]
    svid_bundle: Option<PathBuf>,
    /// `iss` claim of issued JWTs (default: http://<admin-listen>).
    #[arg(long, env = "LEASH_ISSUER")]
    issuer: Option<String>,
    /// How long to wait for the first SVID at start.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    identity_timeout: Duration,
}

#[derive(Args)]
struct DevIdentityArgs {
    /// Trust domain of the dev CA.
    #[arg(long, default_value = "leash.test")]
    trust_domain: String,
    /// A socket and the SPIFFE ID it serves, as PATH=SPIFFE_ID. Repeatable.
    #[arg(long = "socket", value_name = "PATH=SPIFFE_ID", required = true)]
    sockets: Vec<String>,
    /// Lifetime of each SVID; SVIDs are re-issued at half-life.
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    svid_ttl: Duration,
    /// Write the CA certificate (the trust bundle) to this PEM file.
    #[arg(long)]
    bundle_out: Option<PathBuf>,
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Create a new signing key and make it the active one. A running control
    /// plane picks it up within 5 s; older keys stay in the JWKS.
    Rotate {
        #[arg(long, env = "LEASH_DATA_DIR", default_value = "./leash-data")]
        data_dir: PathBuf,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_logging(&cli.log_format);
    leash_api::identity::install_crypto_provider();
    match cli.command {
        Command::Serve(args) => serve(args).await,
        Command::DevIdentity(args) => dev_identity(args).await,
        Command::Keys(KeysCommand::Rotate { data_dir }) => {
            let store = Store::open(&data_dir).await?;
            let kid = jwt::rotate(&store).await?;
            println!("{kid}");
            Ok(())
        }
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    // Policy errors are the commonest start failure: report them before
    // waiting on identity.
    leash_api::policy::load(&args.policy)?;
    let identity_config = IdentityConfig::from_flags(
        args.spiffe_endpoint,
        args.svid_cert,
        args.svid_key,
        args.svid_bundle,
    )?;
    let identity = leash_api::identity::connect(&identity_config, args.identity_timeout).await?;
    let source = identity.source.clone();
    let svid = source.svid().context("no SVID")?;
    tracing::info!(spiffe_id = %svid.spiffe_id(), "identity acquired");
    let sidecar = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let admin = tokio::net::TcpListener::bind(args.admin_listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.admin_listen))?;
    let config = ServeConfig {
        policy: args.policy,
        data_dir: args.data_dir,
        issuer: args.issuer,
        policy_poll: Duration::from_secs(2),
    };
    let cp = ControlPlane::start(config, source.clone(), sidecar, admin).await?;
    shutdown_signal().await;
    tracing::info!("shutting down");
    cp.shutdown(Duration::from_secs(10)).await;
    source.shutdown().await;
    Ok(())
}

async fn dev_identity(args: DevIdentityArgs) -> anyhow::Result<()> {
    let ca = DevCa::new(&args.trust_domain)?;
    if let Some(path) = &args.bundle_out {
        std::fs::write(path, ca.bundle_pem())
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    let mut provider = DevIdentityProvider::new(ca, args.svid_ttl);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut servers = Vec::new();
    for spec in &args.sockets {
        let Some((path, id)) = spec.split_once('=') else {
            bail!("--socket {spec:?}: expected PATH=SPIFFE_ID");
        };
        if let Some(dir) = std::path::Path::new(path).parent() {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
        }
        servers.push(provider.serve(path.as_ref(), id, stop_rx.clone())?);
    }
    shutdown_signal().await;
    let _ = stop_tx.send(true);
    for s in servers {
        let _ = s.await;
    }
    Ok(())
}
