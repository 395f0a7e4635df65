//! Process plumbing shared by the binaries: logging setup and stop signals.

/// Sets up `tracing` output on stderr: `text` (default) or `json`, filtered
/// by `RUST_LOG` (default `info`).
pub fn init_logging(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
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
