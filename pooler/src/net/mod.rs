//! Accepting clients: one task per connection, a shutdown signal that stops accepting.

pub mod keepalive;
pub mod stream;
pub mod tls;
mod tracker;

pub use tracker::Tracker;

use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::session::{self, Listener};
use crate::shared::Shared;

/// Accepts until `shutdown` fires. Client tasks are tracked in `tasks`, so the caller
/// can wait for them to finish.
pub async fn accept_loop(
    listener: TcpListener,
    kind: Listener,
    shared: Arc<Shared>,
    mut shutdown: watch::Receiver<bool>,
    tasks: Tracker,
) {
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, peer)) => {
                    let shared = shared.clone();
                    tasks.spawn(session::serve(tcp, peer, shared, kind));
                }
                Err(e) => {
                    // Out of descriptors, typically: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            },
            _ = shutdown.changed() => return,
        }
    }
}
