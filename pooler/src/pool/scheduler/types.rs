//! The scheduler's vocabulary: ids, configuration, the actions it asks for, its
//! errors and statistics.

use std::time::Duration;

use crate::pool::slab::Key;

/// A role's index in the scheduler's role table (O(1) to reach its state).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct RoleId(pub(super) u32);

impl RoleId {
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

/// A server connection slot; stale after the server is closed.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct ServerId(pub(super) Key);

impl ServerId {
    /// Dense index, reused after close: good for metrics labels, not for identity.
    pub fn index(self) -> u32 {
        self.0.index()
    }
}

/// A queued checkout; stale once served, failed or cancelled.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct WaiterId(pub(super) Key);

/// Global scheduling knobs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SchedulerConfig {
    /// Server connections for all roles together. Default 40.
    pub max_server_connections: u32,
    /// An idle server is taken from its role for another only after being idle this
    /// long, so a server between two transactions of a busy client is not stolen.
    /// Longer: fewer wasted logins, slower hand-over of idle capacity. Default 1 s.
    pub min_idle_before_evict: Duration,
    /// A role keeps a slot at least this long before it must hand it to a role that has
    /// had no server for as long. Shorter: lower worst-case wait, more logins (at most
    /// budget / quantum per second). Default 500 ms.
    pub switch_quantum: Duration,
    /// Idle servers older than this are closed by [`Scheduler::tick`]. Default 600 s.
    pub server_idle_timeout: Duration,
    /// Servers older than this are closed when idle or on release. Default 3600 s.
    pub server_lifetime: Duration,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            max_server_connections: 40,
            min_idle_before_evict: Duration::from_secs(1),
            switch_quantum: Duration::from_millis(500),
            server_idle_timeout: Duration::from_secs(600),
            server_lifetime: Duration::from_secs(3600),
        }
    }
}

/// Per-role limits (from the credentials row).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RoleConfig {
    /// Most servers this role may hold (keep it at or under the role's CONNECTION
    /// LIMIT). 0 means the role is never served. Default 20.
    pub pool_size: u32,
    /// Relative share of the budget among roles with demand; 0 is treated as 1.
    /// Default 1.
    pub weight: u32,
}

impl Default for RoleConfig {
    fn default() -> Self {
        Self {
            pool_size: 20,
            weight: 1,
        }
    }
}

/// Why a server is closed (a metrics label and a log field).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloseReason {
    IdleTimeout,
    Lifetime,
    /// The role was revoked ([`Scheduler::close_role`]).
    Revoked,
    /// An idle server taken for another role (checkout rule 3 or its deferred form).
    Evicted,
    /// A released server moved to another role (release rule 2).
    Switched,
    /// Over the role's pool_size or the global budget after a reconfiguration.
    OverLimit,
    /// The id was unknown: an async-layer bug, the connection is closed to be safe.
    Unknown,
}

/// What the async layer must do, in order.
#[derive(Debug, PartialEq, Eq)]
pub enum Action<C, W> {
    /// Give this (clean) server to this waiter; it is now checked out.
    Grant {
        waiter: W,
        server: ServerId,
        conn: C,
    },
    /// Log a new server in for `role`; report [`Scheduler::opened`] or
    /// [`Scheduler::open_failed`] with `server`.
    Open { server: ServerId, role: RoleId },
    /// Drop this connection (outside the lock).
    Close {
        server: ServerId,
        conn: C,
        reason: CloseReason,
    },
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SchedulerError {
    #[error("unknown role {0:?}")]
    UnknownRole(RoleId),
    #[error("unknown or stale server {0:?}")]
    UnknownServer(ServerId),
    #[error("server {0:?} is not in the state this call expects")]
    WrongState(ServerId),
}

/// Monotonic counters since start.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub opens: u64,
    pub open_failures: u64,
    pub closes: u64,
    /// Idle servers closed to open one for another role.
    pub evictions: u64,
    /// Released servers closed to open one for another role.
    pub switches: u64,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RoleStats {
    pub active: u32,
    pub idle: u32,
    pub opening: u32,
    pub waiting: u32,
    pub pool_size: u32,
}
