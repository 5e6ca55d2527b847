//! Accepting clients: one task per connection, a shutdown signal that stops accepting.

pub mod keepalive;
pub mod park;
pub mod stream;
pub mod tls;
mod tracker;

pub use tracker::{Hold, Tracker};

use std::future::Future;
use std::net::SocketAddr;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// Accepts until `shutdown` fires, running `serve` for each connection in a task of
/// its own. Client tasks are tracked in `tasks`, so the caller can wait for them to
/// finish. The caller says what a connection is served with: this loop knows sockets,
/// not sessions.
pub async fn accept_loop<F, Fut>(
    listener: TcpListener,
    serve: F,
    mut shutdown: watch::Receiver<bool>,
    tasks: Tracker,
) where
    F: Fn(TcpStream, SocketAddr) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, peer)) => tasks.spawn(serve(tcp, peer)),
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
