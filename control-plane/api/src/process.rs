//! Process plumbing shared by the binaries: logging setup and stop signals.

use std::sync::{Mutex, OnceLock};

use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Registry, reload};

/// The process's log filter, changeable at runtime.
struct LogControl {
    handle: reload::Handle<EnvFilter, Registry>,
    current: Mutex<String>,
}

static LOG_CONTROL: OnceLock<LogControl> = OnceLock::new();

fn initial_filter(default: &str) -> (EnvFilter, String) {
    let spec = std::env::var("RUST_LOG")
        .ok()
        .filter(|s| !s.trim().is_empty())
        .unwrap_or_else(|| default.to_owned());
    match EnvFilter::try_new(&spec) {
        Ok(f) => (f, spec),
        Err(_) => (EnvFilter::new(default), default.to_owned()),
    }
}

/// Sets up `tracing` output on stderr: `text` (default) or `json`, filtered
/// by `RUST_LOG` (default `info`); the filter can be changed at runtime with
/// [`set_log_filter`].
pub fn init_logging(format: &str) {
    let (filter, spec) = initial_filter("info");
    let (filter, handle) = reload::Layer::new(filter);
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let registry = tracing_subscriber::registry().with(filter);
    let installed = if format == "json" {
        registry.with(fmt.json()).try_init()
    } else {
        registry.with(fmt).try_init()
    };
    if installed.is_ok() {
        let _ = LOG_CONTROL.set(LogControl {
            handle,
            current: Mutex::new(spec),
        });
    }
}

/// As [`init_logging`], writing through the test harness's capture (errors
/// only unless `RUST_LOG` says otherwise).
pub fn init_test_logging() {
    let (filter, spec) = initial_filter("error");
    let (filter, handle) = reload::Layer::new(filter);
    let fmt = tracing_subscriber::fmt::layer().with_test_writer();
    if tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .try_init()
        .is_ok()
    {
        let _ = LOG_CONTROL.set(LogControl {
            handle,
            current: Mutex::new(spec),
        });
    }
}

/// The log filter in force (`RUST_LOG` syntax), if this process set up logging.
pub fn log_filter() -> Option<String> {
    let c = LOG_CONTROL.get()?;
    c.current.lock().ok().map(|s| s.clone())
}

/// Replaces the log filter (`debug`, `info,leash_proxy=trace`, ...).
pub fn set_log_filter(spec: &str) -> Result<String, String> {
    let c = LOG_CONTROL
        .get()
        .ok_or("logging was not set up by this process")?;
    let filter = EnvFilter::try_new(spec).map_err(|e| format!("invalid filter {spec:?}: {e}"))?;
    c.handle.reload(filter).map_err(|e| e.to_string())?;
    if let Ok(mut current) = c.current.lock() {
        spec.clone_into(&mut current);
    }
    tracing::warn!(filter = spec, "log filter changed at runtime");
    Ok(spec.to_owned())
}

/// Resolves when the process is asked to stop (Ctrl-C or SIGTERM).
pub async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// Resolves once `stop` turns true (or its sender is gone). The borrow of the
/// watch value ends inside, so the future stays `Send` in `select!` loops.
pub async fn stopped(stop: &mut tokio::sync::watch::Receiver<bool>) {
    let _stopped = stop.wait_for(|s| *s).await.is_ok();
}

/// Raises this process's soft limit on open files to its hard limit (as Go
/// programs do at start): a default soft limit of 1,024 would make the
/// connection caps unreachable and let a few thousand idle connections take
/// every descriptor. Returns the limit now in force.
pub fn raise_open_files_limit() -> Option<u64> {
    let (_, hard) = rlimit::Resource::NOFILE.get().ok()?;
    rlimit::increase_nofile_limit(hard).ok()
}
