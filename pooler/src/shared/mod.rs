//! What every client task shares: configuration, the verifier cache, per-role state,
//! the pools, cancel keys, who is connected, and the operator's controls.

pub mod cancel;
mod connector;
mod pause;
mod roles;

pub use cancel::{CancelHandle, CancelMap};
pub use connector::{Backoff, PassThrough};
pub use pause::{Held, Pause, Paused};
pub use roles::{
    CheckedSetting, ClientSlot, MAX_CHECKED_SETTING_BYTES, MAX_CHECKED_SETTINGS, MISMATCH_BACKOFF,
    PinSlot, RoleShared, Roles,
};

use std::sync::Arc;

use arc_swap::{ArcSwap, ArcSwapOption};
use tokio::sync::watch;

use crate::auth::cache::{Change, VerifierCache};
use crate::auth::limiter::AuthLimiter;
use crate::backend::{ServerConn, Target};
use crate::config::{Config, ConfigError};
use crate::pool::Pools;
use crate::registry::{ClientInfo, Registry, ServerInfo};

pub struct Shared {
    /// Swapped whole by a reload; read through [`Shared::config`].
    pub(crate) config: ArcSwap<Config>,
    pub cache: Arc<VerifierCache>,
    pub roles: Arc<Roles>,
    pub pools: Pools<Box<ServerConn>>,
    pub cancels: Arc<CancelMap>,
    /// This replica's membership: its id (in the cancel keys it mints), its share of
    /// the cluster's budget, the other replicas, cancel forwarding.
    pub replicas: Arc<crate::replicas::Replicas>,
    pub limiter: AuthLimiter,
    pub target: Target,
    /// Keys the mock verifiers of unknown roles, so they are stable but unguessable.
    pub mock_secret: [u8; 32],
    /// Swapped by a reload, so renewed certificate files take effect for new clients.
    pub client_tls: ArcSwapOption<tokio_rustls::TlsAcceptor>,
    /// Connected clients, at most `max_client_conn` (admin sessions included).
    pub clients: Arc<Registry<ClientInfo>>,
    pub servers: Arc<Registry<ServerInfo>>,
    /// `PAUSE`: checkouts of paused roles wait for `RESUME`.
    pub pause: Pause,
    /// Shutdown started: stop taking new transactions.
    pub shutdown: watch::Receiver<bool>,
    /// The shutdown's grace period is over: close every client.
    pub closing: watch::Receiver<bool>,
    pub metrics: Arc<crate::metrics::Metrics>,
    /// LISTEN in transaction mode: each role's listener, and who sent a notification.
    pub notify: crate::notify::Hub,
    /// Set by the console's `SHUTDOWN`; the binary then drains as on SIGTERM.
    pub shutdown_requested: watch::Sender<bool>,
    pub hooks: Hooks,
    /// One reload at a time.
    pub(crate) reloading: tokio::sync::Mutex<()>,
    /// Live clients, in a task or parked: shutdown waits for them.
    pub tasks: crate::net::Tracker,
    /// Idle app clients parked without a task (session/park.rs).
    pub lot: crate::net::park::Lot,
    /// Database and application names, shared by the clients that give the same.
    pub names: crate::registry::Names,
}

impl Shared {
    /// The configuration in force. Cheap (no lock, no reference count on the hot path);
    /// hold it only briefly, and never across a reload you wait for.
    pub fn config(&self) -> arc_swap::Guard<Arc<Config>> {
        self.config.load()
    }
}

/// Re-reads the configuration as the binary built it at start (file, environment,
/// flags). A reload calls it.
pub type LoadConfig = Box<dyn Fn() -> Result<Config, ConfigError> + Send + Sync>;
/// Replaces the log filter (a validated `log_level`).
pub type SetLogFilter = Box<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

/// What the embedding program lends the pooler for reloads.
#[derive(Default)]
pub struct Hooks {
    /// Without it, a reload is refused.
    pub load_config: Option<LoadConfig>,
    /// Without it, `log_level` changes on reload are recorded but not applied.
    pub set_log_filter: Option<SetLogFilter>,
}

/// Applies what the LISTEN connection learns: a revoked role loses its keys, its
/// clients are told to leave and its servers are closed; a rotated one loses keys of
/// older generations. Runs until the cache's channel closes.
pub async fn apply_changes(
    cache: Arc<VerifierCache>,
    roles: Arc<Roles>,
    pools: Pools<Box<ServerConn>>,
) {
    let mut changes = cache.subscribe();
    loop {
        match changes.recv().await {
            Ok(Change::Revoked(role)) => {
                roles.bump();
                if let Some(r) = roles.get(&role) {
                    r.revoke();
                    roles.clients.wake_all();
                }
                pools.close_role(&role);
            }
            Ok(Change::Rotated { role, generation }) => {
                roles.bump();
                if let Some(r) = roles.get(&role) {
                    r.rotated(generation);
                }
            }
            Ok(Change::Resync) => resync(&cache, &roles, &pools).await,
            Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                tracing::warn!(
                    missed = n,
                    "credential changes arrived faster than applied; re-checking every role"
                );
                resync(&cache, &roles, &pools).await;
            }
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
        }
    }
}

/// Looks every known role up again and revokes those that may no longer log in: for
/// when notifications may have been lost.
async fn resync(cache: &VerifierCache, roles: &Roles, pools: &Pools<Box<ServerConn>>) {
    for name in roles.names() {
        match cache.reread(&name).await {
            Ok(auth) if auth.status != crate::auth::cache::Status::Ok => {
                roles.bump();
                if let Some(r) = roles.get(&name) {
                    r.revoke();
                    roles.clients.wake_all();
                }
                pools.close_role(&name);
            }
            Ok(auth) => {
                if let Some(r) = roles.get(&name) {
                    r.rotated(auth.generation);
                }
            }
            Err(e) => {
                tracing::warn!(role = %name, error = %e, "re-checking a role failed");
            }
        }
    }
}
