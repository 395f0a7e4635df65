//! `leash-control-plane`: serve the control plane, run the dev identity
//! provider, or rotate the JWT signing key.

use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::Parser as _;
use leash_api::identity::IdentityConfig;
use leash_control_plane::app::{ControlPlane, ServeConfig};
use std::sync::Arc;

use leash_control_plane::auth::{Role, create_token};
use leash_control_plane::cli::{
    Cli, Command, DevIdentityArgs, KeysCommand, ServeArgs, TokensCommand,
};
use leash_control_plane::devid::{DevCa, DevIdentityProvider};
use leash_control_plane::secrets::MasterKey;
use leash_control_plane::store::Store;
use leash_control_plane::{init_logging, jwt, shutdown_signal};
use zeroize::Zeroizing;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_logging(&cli.log_format);
    leash_api::identity::install_crypto_provider();
    match cli.command {
        Command::Serve(args) => serve(*args).await,
        Command::DevIdentity(args) => dev_identity(args).await,
        Command::MasterKey => {
            println!("{}", MasterKey::generate_base64());
            Ok(())
        }
        Command::Tokens(TokensCommand::Create {
            data_dir,
            database_url,
            name,
            role,
        }) => {
            let store = Store::open_at(&data_dir, database_url.as_ref(), None).await?;
            let role = Role::parse(&role).context("role")?;
            println!(
                "{}",
                create_token(&store, &name, role, "leash-control-plane tokens create").await?
            );
            Ok(())
        }
        Command::Keys(KeysCommand::Rotate {
            data_dir,
            database_url,
            master_key_file,
        }) => {
            let store = Store::open_at(
                &data_dir,
                database_url.as_ref(),
                master_key(master_key_file.as_deref())?,
            )
            .await?;
            let kid = jwt::rotate(&store).await?;
            println!("{kid}");
            Ok(())
        }
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let open_files = leash_api::process::raise_open_files_limit();
    let wanted =
        (args.limits.admin_max_connections + args.limits.sidecar_max_connections) as u64 + 256;
    match open_files {
        Some(n) if n < wanted => tracing::warn!(
            open_files = n,
            wanted,
            "the open-files limit is below what the connection caps allow; raise LimitNOFILE / ulimit -n or lower --admin-max-connections and --sidecar-max-connections"
        ),
        Some(n) => tracing::debug!(open_files = n, "open-files limit"),
        None => tracing::warn!("cannot read the open-files limit"),
    }
    // Policy errors are the commonest start failure: report them before
    // waiting on identity.
    leash_api::policy::load(&args.policy)?;
    let master_key = master_key(args.master_key_file.as_deref())?;
    match (&master_key, args.insecure_dev) {
        (Some(_), _) => {}
        (None, true) => tracing::warn!(
            "--insecure-dev: no master key; signing keys are stored in the clear and static secrets are unavailable"
        ),
        (None, false) => bail!(
            "no master key: give --master-key-file FILE (or LEASH_MASTER_KEY); make one with `leash-control-plane master-key > FILE` (chmod 600). \
             It seals the JWT signing keys and brokered secrets at rest. For a throw-away local run, --insecure-dev starts without one."
        ),
    }
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
        database_url: args.database_url,
        issuer: args.issuer,
        policy_poll: Duration::from_secs(2),
        heartbeat: args.heartbeat_interval,
        mission_interval: args.mission_interval,
        master_key,
        admin_auth_failures_per_minute: args.admin_auth_failures_per_minute,
        limits: args.limits,
        probe_timeout: args.probe_timeout,
        admin_tls: match (args.admin_tls_cert, args.admin_tls_key) {
            (Some(cert), Some(key)) => Some(leash_control_plane::listeners::AdminTls { cert, key }),
            _ => None,
        },
        otel: leash_api::telemetry::Otel::start(&leash_api::telemetry::OtlpConfig::from_env(
            "leash-control-plane",
        ))?,
    };
    let otel = config.otel.clone();
    let cp = ControlPlane::start(config, source.clone(), sidecar, admin).await?;
    shutdown_signal().await;
    tracing::info!("shutting down");
    cp.shutdown(Duration::from_secs(10)).await;
    if let Some(otel) = otel {
        otel.shutdown().await;
    }
    source.shutdown().await;
    Ok(())
}

/// The master key from `file` (which only its owner may read) or from
/// `LEASH_MASTER_KEY`, if either is given.
fn master_key(file: Option<&std::path::Path>) -> anyhow::Result<Option<Arc<MasterKey>>> {
    use std::os::unix::fs::PermissionsExt as _;
    if let Some(path) = file {
        let mode = std::fs::metadata(path)
            .with_context(|| format!("master key file {}", path.display()))?
            .permissions()
            .mode();
        if mode & 0o077 != 0 {
            bail!(
                "master key file {} is readable by group or others (mode {:o}): chmod 600 {}",
                path.display(),
                mode & 0o777,
                path.display()
            );
        }
        return Ok(Some(Arc::new(MasterKey::from_file(path)?)));
    }
    match std::env::var("LEASH_MASTER_KEY") {
        Ok(text) => Ok(Some(Arc::new(MasterKey::from_base64(&Zeroizing::new(
            text,
        ))?))),
        Err(_) => Ok(None),
    }
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
    // Workload API streams last as long as their clients: those still open
    // after a moment are dropped, not waited for.
    let drained = tokio::time::timeout(Duration::from_secs(2), async {
        for s in servers {
            let _ = s.await;
        }
    })
    .await;
    if drained.is_err() {
        tracing::info!("closed the Workload API streams still open");
    }
    Ok(())
}
