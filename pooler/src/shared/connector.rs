//! The pool's way to open a server: log in as the role with the keys its clients'
//! logins left behind (SCRAM pass-through).

use std::sync::Arc;
use std::time::Instant;

use futures_util::future::BoxFuture;

use super::Roles;
use crate::backend::params::ServerParams;
use crate::backend::{BackendError, ServerConn, Target};
use crate::metrics::Metrics;
use crate::pool::{ConnectError, Connector};
use crate::registry::{Registry, ServerInfo, next_server_id};

pub struct PassThrough {
    pub roles: Arc<Roles>,
    pub target: Target,
    /// While Postgres is unreachable, new logins fail at once until the backoff has
    /// passed, instead of every waiting client hammering a restarting server.
    pub backoff: Arc<std::sync::Mutex<Backoff>>,
    /// Where servers are listed for `SHOW SERVERS`.
    pub servers: Arc<Registry<ServerInfo>>,
    pub metrics: Arc<Metrics>,
}

#[derive(Debug, Default)]
pub struct Backoff {
    until: Option<Instant>,
    delay: std::time::Duration,
}

impl Backoff {
    const FIRST: std::time::Duration = std::time::Duration::from_millis(100);
    const MAX: std::time::Duration = std::time::Duration::from_secs(5);

    fn failed(&mut self, now: Instant) {
        self.delay = if self.delay.is_zero() {
            Self::FIRST
        } else {
            (self.delay * 2).min(Self::MAX)
        };
        self.until = Some(now + self.delay);
    }

    fn succeeded(&mut self) {
        *self = Backoff::default();
    }

    fn waiting(&self, now: Instant) -> Option<std::time::Duration> {
        self.until.filter(|u| *u > now).map(|u| u - now)
    }
}

#[derive(Debug, thiserror::Error)]
#[error("Postgres was unreachable moments ago; the next attempt is in {0:?}")]
struct BackingOff(std::time::Duration);

#[derive(Debug, thiserror::Error)]
#[error(
    "no client of role \"{0}\" has logged in since the pooler started, so it holds no key to log in with"
)]
struct NoKeys(String);

// Boxed: a server moves through the pool's queues and channels on every checkout,
// and a pointer moves cheaper than the connection's few hundred bytes.
impl Connector<Box<ServerConn>> for PassThrough {
    fn connect(&self, role: &str) -> BoxFuture<'static, Result<Box<ServerConn>, ConnectError>> {
        let roles = self.roles.clone();
        let target = self.target.clone();
        let backoff = self.backoff.clone();
        let servers = self.servers.clone();
        let metrics = self.metrics.clone();
        let role = role.to_owned();
        Box::pin(async move {
            let waiting = backoff
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .waiting(Instant::now());
            if let Some(left) = waiting {
                return Err(ConnectError::new(BackingOff(left)));
            }
            let shared = roles.get_or_insert(&role);
            let keys = shared
                .keys()
                .ok_or_else(|| ConnectError::new(NoKeys(role.clone())))?;
            match target.connect(&keys).await {
                Ok(mut server) => {
                    let id = next_server_id();
                    let info = ServerInfo {
                        id,
                        role: server.role.clone(),
                        connected_at: std::time::SystemTime::now(),
                        remote_pid: server.key.pid,
                        local: server.stream.local_addr(),
                        tls: server.stream.tls_description(),
                        listener: Default::default(),
                    };
                    // The pool bounds servers itself; the registry only lists them.
                    server.registered = servers.register(id, info, usize::MAX);
                    backoff
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .succeeded();
                    shared.set_params(ServerParams::from_login(&server.params));
                    Ok(Box::new(server))
                }
                Err(e) => {
                    if e.is_unverified_server() {
                        // Not Postgres as we know it, or a Postgres that lets anyone in:
                        // never hand it a client. Backed off like an outage, so waiting
                        // clients are refused at once instead of each trying again.
                        tracing::error!(role = %role, error = %e, "server login refused");
                        metrics.server_login_unverified.inc();
                    }
                    if e.is_unavailable() || e.is_unverified_server() {
                        backoff
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .failed(Instant::now());
                    }
                    if let BackendError::VerifierMismatch { .. } = &e {
                        // Say exactly what is wrong, once per backoff, and stop trying.
                        tracing::error!(role = %role, error = %e, "SCRAM pass-through impossible");
                        shared.mismatch(Instant::now());
                        metrics.server_login_mismatches.inc();
                    }
                    Err(ConnectError::new(e))
                }
            }
        })
    }

    fn close(&self, conn: Box<ServerConn>) -> Option<BoxFuture<'static, ()>> {
        // The rest (its SHOW SERVERS entry among it) goes now; the socket stays open
        // until the backend has gone, which Postgres shows by closing it.
        let ServerConn { stream, .. } = *conn;
        Some(Box::pin(terminate(stream)))
    }
}

/// How long a closed server's backend gets to exit before the pool stops counting it.
/// A backend exits within milliseconds of Terminate; this bounds one that hangs.
const EXIT_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Sends Terminate and waits, at most [`EXIT_WAIT`], for Postgres to close the
/// connection: it does so only after the backend has left `pg_stat_activity` and
/// freed its `max_connections` slot. Whatever the server still sends is discarded, at
/// most [`DISCARD_LIMIT`] bytes of it.
async fn terminate(mut stream: crate::net::stream::Stream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const DISCARD_LIMIT: usize = 64 * 1024;
    let _ = tokio::time::timeout(EXIT_WAIT, async {
        stream.write_all(&[b'X', 0, 0, 0, 4]).await?;
        stream.flush().await?;
        let mut sink = [0u8; 512];
        let mut discarded = 0;
        while discarded < DISCARD_LIMIT {
            match stream.read(&mut sink).await? {
                0 => break,
                n => discarded += n,
            }
        }
        Ok::<(), std::io::Error>(())
    })
    .await;
}
