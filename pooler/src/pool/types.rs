//! The pool's public vocabulary: configuration, the connector seam, errors, statistics.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;

use super::scheduler::{Counters, RoleConfig, SchedulerConfig};

/// Logs a new server connection in as `role`. The pool is generic over the connection
/// type so it can be tested without Postgres; `backend/` provides the real one.
pub trait Connector<S>: Send + Sync + 'static {
    fn connect(&self, role: &str) -> BoxFuture<'static, Result<S, ConnectError>>;

    /// Ends a server the scheduler closed. `Some`: the future resolves once the server
    /// is really gone (its backend has exited), and until then the pool counts it as
    /// held, so a replica never publishes as released a slot Postgres still counts.
    /// `None`: dropping it was enough.
    fn close(&self, conn: S) -> Option<BoxFuture<'static, ()>> {
        drop(conn);
        None
    }
}

/// A failed login. Cloneable and opaque: the backend keeps its own typed error and
/// metrics; the pool only carries it to the waiter that the attempt was charged to.
#[derive(Clone)]
pub struct ConnectError(Arc<dyn std::error::Error + Send + Sync + 'static>);

impl ConnectError {
    pub fn new(error: impl std::error::Error + Send + Sync + 'static) -> Self {
        Self(Arc::new(error))
    }

    pub(crate) fn timeout(after: Duration) -> Self {
        Self::new(LoginTimeout(after))
    }
}

impl fmt::Debug for ConnectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl fmt::Display for ConnectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&*self.0, f)
    }
}

impl std::error::Error for ConnectError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0.source()
    }
}

#[derive(Debug, thiserror::Error)]
#[error("server login did not finish within {0:?} (connect_timeout)")]
struct LoginTimeout(Duration);

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// The caller answers SQLSTATE 53300 (too_many_connections) with this message.
    #[error(
        "no server connection for role \"{role}\" became free within query_wait_timeout \
         ({waited:?}): the role has {active} of pool_size {pool_size} servers busy and \
         {waiting} clients waiting; {in_use} of {max_server_connections} server \
         connections are in use overall"
    )]
    WaitTimeout {
        role: Arc<str>,
        waited: Duration,
        pool_size: u32,
        active: u32,
        waiting: u32,
        in_use: u32,
        max_server_connections: u32,
    },
    #[error("could not log in to the database server as role \"{role}\": {source}")]
    Connect {
        role: Arc<str>,
        #[source]
        source: ConnectError,
    },
    /// The pool dropped a queued request without answering it: a bug, reported rather
    /// than leaving the client hanging.
    #[error("the pool dropped the request for role \"{role}\"")]
    Dropped { role: Arc<str> },
}

impl PoolError {
    /// The SQLSTATE a session reports for this error.
    pub fn sqlstate(&self) -> &'static str {
        match self {
            // too_many_connections, as PgBouncer's query_wait_timeout.
            Self::WaitTimeout { .. } => "53300",
            // sqlclient_unable_to_establish_sqlconnection.
            Self::Connect { .. } => "08001",
            // internal_error.
            Self::Dropped { .. } => "XX000",
        }
    }
}

/// Global pool configuration. A reload replaces it whole ([`super::Pools::set_config`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolConfig {
    /// Server connections for all roles together, over all replicas: the cluster's
    /// budget. This replica's share of it is set apart ([`super::Pools::set_share`]).
    /// Default 40.
    pub max_server_connections: u32,
    /// How long an idle server is protected from being moved to another role.
    /// Default 1 s. See [`SchedulerConfig::min_idle_before_evict`].
    pub min_idle_before_evict: Duration,
    /// Minimum tenure of a slot before it must move to a starving role. Default
    /// 500 ms. See [`SchedulerConfig::switch_quantum`].
    pub switch_quantum: Duration,
    /// Idle servers are closed after this long. Default 600 s.
    pub server_idle_timeout: Duration,
    /// Servers are closed after this age, when idle or on release. Default 3600 s.
    pub server_lifetime: Duration,
    /// How often maintenance runs (idle timeout, lifetime, deferred evictions).
    /// Default 100 ms: it bounds how late an idle server is handed to a waiting role
    /// once it has been idle `min_idle_before_evict`.
    pub maintenance_interval: Duration,
    /// A login that takes longer fails (and frees its slot). Default 10 s.
    pub connect_timeout: Duration,
}

impl Default for PoolConfig {
    fn default() -> Self {
        let s = SchedulerConfig::default();
        Self {
            max_server_connections: s.max_server_connections,
            min_idle_before_evict: s.min_idle_before_evict,
            switch_quantum: s.switch_quantum,
            server_idle_timeout: s.server_idle_timeout,
            server_lifetime: s.server_lifetime,
            maintenance_interval: Duration::from_millis(100),
            connect_timeout: Duration::from_secs(10),
        }
    }
}

impl PoolConfig {
    pub(crate) fn scheduler(&self) -> SchedulerConfig {
        SchedulerConfig {
            max_server_connections: self.max_server_connections,
            min_idle_before_evict: self.min_idle_before_evict,
            switch_quantum: self.switch_quantum,
            server_idle_timeout: self.server_idle_timeout,
            server_lifetime: self.server_lifetime,
        }
    }
}

/// Per-role limits, from the role's credentials row.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RoleLimits {
    /// Most servers the role may hold. Default 20.
    pub pool_size: u32,
    /// Relative share of the budget when roles compete. Default 1 (0 counts as 1).
    pub weight: u32,
}

impl Default for RoleLimits {
    fn default() -> Self {
        let r = RoleConfig::default();
        Self {
            pool_size: r.pool_size,
            weight: r.weight,
        }
    }
}

impl From<RoleLimits> for RoleConfig {
    fn from(l: RoleLimits) -> Self {
        Self {
            pool_size: l.pool_size,
            // Normalized here as the scheduler does, so an unchanged row compares equal.
            weight: l.weight.max(1),
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RolePoolStats {
    pub role: Arc<str>,
    /// Checked out by clients.
    pub active: u32,
    pub idle: u32,
    /// Logins in progress.
    pub opening: u32,
    /// Clients queued for a server.
    pub waiting: u32,
    pub pool_size: u32,
    /// The role's LISTEN server (open or opening: 0 or 1), outside its pool_size and
    /// counted in none of the above.
    pub listener: u32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolStats {
    pub roles: Vec<RolePoolStats>,
    /// Server connections open or opening, all roles.
    pub servers_in_use: u32,
    /// What this replica may open now: its share of the cluster's budget.
    pub max_server_connections: u32,
    /// The configured budget of the whole cluster.
    pub cluster_budget: u32,
    /// Servers the roles could use right now (see
    /// [`super::scheduler::Scheduler::demand`]).
    pub demand: u32,
    /// Logins, failed logins, closes, evictions and switches since start.
    pub counters: Counters,
}

impl PoolStats {
    pub fn role(&self, name: &str) -> Option<&RolePoolStats> {
        self.roles.iter().find(|r| &*r.role == name)
    }
}
