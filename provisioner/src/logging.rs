//! Process set-up shared by the binaries. Logs: `RUST_LOG` picks the level, but never lets through
//! tokio-postgres's debug events, which print statements and bind parameters and so
//! would carry SCRAM verifiers (`ALTER ROLE … PASSWORD`, the credentials row).

use tracing_subscriber::filter::{EnvFilter, filter_fn};
use tracing_subscriber::prelude::*;

/// Installs the global subscriber, writing to stderr as text or JSON lines.
pub fn init(json: bool) {
    let level = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // A per-layer filter, not an EnvFilter directive: a more specific RUST_LOG
    // directive (tokio_postgres::query=debug) would override a directive.
    let no_statements = filter_fn(|meta| {
        !(meta.target().starts_with("tokio_postgres") && *meta.level() > tracing::Level::INFO)
    });
    let layer = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    if json {
        tracing_subscriber::registry()
            .with(layer.json().with_filter(level).with_filter(no_statements))
            .init();
    } else {
        tracing_subscriber::registry()
            .with(layer.with_filter(level).with_filter(no_statements))
            .init();
    }
}

/// Ctrl-C in a terminal or SIGTERM from a supervisor (Kubernetes): when to stop
/// accepting and finish the requests in flight.
pub async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
}
