//! Per-role pools under one global budget.
//!
//! * [`scheduler`]: the pure state machine that makes every budget decision (no I/O,
//!   time passed in); unit-tested rule by rule and simulated with thousands of roles.
//! * this module: [`Pools`], the async shell around it. It owns the connector, performs
//!   the scheduler's [`scheduler::Action`]s (hand a server to a waiter, log one in,
//!   close one) and runs maintenance.
//! * [`share`]: the pure computation of this replica's share of the cluster's budget
//!   when several replicas run (registry rows in, shares out).
//! * [`Checkout`] (`guard.rs`): a checked-out server. `release()` returns it clean;
//!   dropping it any other way closes it, so a client that dies mid-transaction can
//!   never hand on a dirty server.
//! * `waiter.rs`: a queued checkout whose `Drop` leaves the queue, so a client that
//!   goes away or times out while waiting needs no bookkeeping by the caller.
//!
//! Locking: one `std::sync::Mutex` around the scheduler. Every critical section is a
//! few pointer moves (the hot path pops the role's newest idle server, or pushes it
//! back) and never spans an `.await`, a connect, a channel send or a connection drop;
//! those happen after the guard is gone. A per-role lock would not remove the global
//! one: every release must ask whether *another* role waits and whether this role is
//! over its share of the budget. At this critical-section length one lock is cheaper
//! than two on 2 cores; if profiling ever shows contention, the way out is sharding the
//! role table with the budget as an atomic, not an async mutex.

mod guard;
pub mod scheduler;
pub mod share;
mod slab;
#[cfg(test)]
mod tests;
mod types;
mod waiter;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

pub use guard::Checkout;
use scheduler::{Action, RoleConfig, RoleId, Scheduler, ServerId, WaiterId};
pub use types::{
    ConnectError, Connector, PoolConfig, PoolError, PoolStats, RoleLimits, RolePoolStats,
};

/// What a waiter receives: a server, or why it gets none.
type Grant<S> = Result<Checkout<S>, Denied>;

/// Why a queued checkout ends without a server.
enum Denied {
    /// The login made for it failed.
    Connect(ConnectError),
    /// Its deadline passed (the maintenance tick times waiters out: no timer per wait).
    TimedOut,
}
type Tx<S> = oneshot::Sender<Grant<S>>;
type Actions<S> = Vec<Action<S, Tx<S>>>;

/// All pools of this process. Cheap to clone (an `Arc`).
pub struct Pools<S: Send + 'static> {
    shared: Arc<Shared<S>>,
}

impl<S: Send + 'static> Clone for Pools<S> {
    fn clone(&self) -> Self {
        Self {
            shared: Arc::clone(&self.shared),
        }
    }
}

struct Shared<S: Send + 'static> {
    state: Mutex<State<S>>,
    connector: Arc<dyn Connector<S>>,
    /// Servers closed by the scheduler whose backends have yet to exit (each bounded by
    /// the connector's close deadline).
    closing: AtomicU32,
    /// Rung when one of them has gone: a login waiting for its slot to be free in
    /// Postgres too may start.
    closed: tokio::sync::Notify,
}

struct State<S: Send + 'static> {
    sched: Scheduler<S, Tx<S>>,
    /// Each role's transaction pool.
    by_name: HashMap<Arc<str>, RoleId>,
    /// Each role's listener "pool": one server at most, its own scheduler role so the
    /// budget counts it and fairness treats it like any role's server, apart from the
    /// role's pool_size.
    listeners: HashMap<Arc<str>, RoleId>,
    /// RoleId index → the role it logs in as, and which of its pools it is.
    names: Vec<(Arc<str>, Purpose)>,
    config: PoolConfig,
    /// An emptied action list kept for the next release: most releases hand the
    /// server to a waiter, and a fresh list would be an allocation per transaction.
    spare: Actions<S>,
    /// This replica's share of the cluster's budget (`share.rs`), when several replicas
    /// share it; the scheduler's budget is then the smaller of the two.
    share: Option<u32>,
}

/// Which of a role's pools a scheduler role is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Purpose {
    Transactions,
    Listener,
}

impl<S: Send + 'static> State<S> {
    /// Interns the role and applies limits that changed since its last checkout (a
    /// credentials row reloaded with a new pool_size).
    fn role(
        &mut self,
        role: &str,
        purpose: Purpose,
        limits: RoleLimits,
        now: Instant,
        out: &mut Actions<S>,
    ) -> RoleId {
        let config = RoleConfig::from(limits);
        let map = match purpose {
            Purpose::Transactions => &mut self.by_name,
            Purpose::Listener => &mut self.listeners,
        };
        if let Some(&r) = map.get(role) {
            if self.sched.role_config(r) != Some(config) {
                // Cannot fail: `r` came from this scheduler.
                let _ = self.sched.set_role_config(r, config, now, out);
            }
            return r;
        }
        let name: Arc<str> = Arc::from(role);
        let r = self.sched.add_role(config);
        map.insert(Arc::clone(&name), r);
        self.names.push((name, purpose));
        r
    }

    /// What the scheduler may open: the configured budget, or this replica's share.
    fn budget(&self) -> u32 {
        let configured = self.config.max_server_connections;
        self.share.map_or(configured, |s| s.min(configured))
    }

    fn scheduler_config(&self) -> scheduler::SchedulerConfig {
        scheduler::SchedulerConfig {
            max_server_connections: self.budget(),
            ..self.config.scheduler()
        }
    }

    fn name(&self, r: RoleId) -> Arc<str> {
        self.names
            .get(r.index())
            .map(|(name, _)| name.clone())
            .unwrap_or_else(|| Arc::from(""))
    }
}

/// The scheduler's clock. tokio's, so `#[tokio::test(start_paused = true)]` drives it.
fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

impl<S: Send + 'static> Pools<S> {
    /// Creates the pools and spawns the maintenance task (idle timeout, lifetime,
    /// deferred evictions), which stops when the last `Pools` clone is dropped. Must be
    /// called within a Tokio runtime.
    pub fn new(config: PoolConfig, connector: Arc<dyn Connector<S>>) -> Self {
        let sched = Scheduler::new(config.scheduler());
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                sched,
                by_name: HashMap::new(),
                listeners: HashMap::new(),
                names: Vec::new(),
                config,
                spare: Vec::new(),
                share: None,
            }),
            connector,
            closing: AtomicU32::new(0),
            closed: tokio::sync::Notify::new(),
        });
        let weak = Arc::downgrade(&shared);
        tokio::spawn(async move {
            loop {
                let period = match weak.upgrade() {
                    Some(shared) => Pools { shared }.lock().config.maintenance_interval,
                    None => return,
                };
                tokio::time::sleep(period).await;
                match weak.upgrade() {
                    Some(shared) => Pools { shared }.tick(),
                    None => return,
                }
            }
        });
        Self { shared }
    }

    /// A server logged in as `role`, waiting up to `wait_timeout` in the role's queue.
    /// The wait is timed out by the maintenance tick, so it ends up to one
    /// `maintenance_interval` after `wait_timeout`; no timer is armed per wait.
    ///
    /// Cancel-safe: dropping the future while it waits leaves the queue, and a server
    /// granted at that moment goes back to the pool.
    pub async fn checkout(
        &self,
        role: &str,
        limits: RoleLimits,
        wait_timeout: Duration,
    ) -> Result<Checkout<S>, PoolError> {
        self.checkout_for(role, Purpose::Transactions, limits, wait_timeout)
            .await
    }

    /// The server a role's LISTEN multiplexer holds for as long as the role has
    /// listening clients: logged in as `role`, counted in the budget like any server
    /// (an idle server of another role may be closed for it), outside the role's
    /// pool_size, one at a time. It is never released: discard it when done.
    ///
    /// Cancel-safe, as [`Pools::checkout`].
    pub async fn checkout_listener(
        &self,
        role: &str,
        wait_timeout: Duration,
    ) -> Result<Checkout<S>, PoolError> {
        let limits = RoleLimits {
            pool_size: 1,
            weight: 1,
        };
        self.checkout_for(role, Purpose::Listener, limits, wait_timeout)
            .await
    }

    async fn checkout_for(
        &self,
        role: &str,
        purpose: Purpose,
        limits: RoleLimits,
        wait_timeout: Duration,
    ) -> Result<Checkout<S>, PoolError> {
        let started = tokio::time::Instant::now();
        let now = started.into_std();
        let mut out = Vec::new();
        let (r, enqueued) = {
            let mut st = self.lock();
            let r = st.role(role, purpose, limits, now, &mut out);
            if let Some((server, conn, idle_for)) = st.sched.take_idle(r, now) {
                drop(st);
                self.run(out);
                return Ok(Checkout::new(self.clone(), server, conn, idle_for));
            }
            let (tx, rx) = oneshot::channel();
            let deadline = now.checked_add(wait_timeout);
            let enqueued = st
                .sched
                .enqueue_until(r, tx, now, deadline, &mut out)
                .map(|id| (id, rx));
            (r, enqueued)
        };
        self.run(out);
        let Ok((id, rx)) = enqueued else {
            return Err(PoolError::Dropped {
                role: Arc::from(role),
            });
        };
        // Armed before the first await: from here on, dropping this future dequeues.
        let mut waiter = waiter::Waiter::new(self.clone(), id, rx);
        match waiter.recv().await {
            Ok(Ok(checkout)) => Ok(checkout),
            Ok(Err(Denied::Connect(source))) => Err(PoolError::Connect {
                role: Arc::from(role),
                source,
            }),
            Err(_) => Err(PoolError::Dropped {
                role: Arc::from(role),
            }),
            Ok(Err(Denied::TimedOut)) => {
                drop(waiter);
                let st = self.lock();
                let stats = st.sched.role_stats(r).unwrap_or_default();
                Err(PoolError::WaitTimeout {
                    role: st.name(r),
                    waited: started.elapsed(),
                    pool_size: stats.pool_size,
                    active: stats.active,
                    waiting: stats.waiting,
                    in_use: st.sched.total_servers(),
                    max_server_connections: st.budget(),
                })
            }
        }
    }

    /// Revocation (credentials changed or disabled): closes the role's idle servers now
    /// and its checked-out ones when they are released.
    pub fn close_role(&self, role: &str) {
        let mut out = Vec::new();
        {
            let mut st = self.lock();
            let ids = [st.by_name.get(role), st.listeners.get(role)];
            for r in ids.into_iter().flatten().copied().collect::<Vec<_>>() {
                st.sched.close_role(r, now(), &mut out);
            }
        }
        self.run(out);
    }

    /// A role's credentials row changed (NOTIFY): applies new limits without waiting for
    /// its next checkout. Unknown roles are ignored; their first checkout brings limits.
    pub fn set_role_limits(&self, role: &str, limits: RoleLimits) {
        let mut out = Vec::new();
        {
            let mut st = self.lock();
            if let Some(&r) = st.by_name.get(role) {
                // Cannot fail: `r` came from this scheduler.
                let _ = st.sched.set_role_config(r, limits.into(), now(), &mut out);
            }
        }
        self.run(out);
    }

    /// Reload: swaps the global configuration (a lowered budget closes idle servers now
    /// and busy ones on release).
    pub fn set_config(&self, config: PoolConfig) {
        let mut out = Vec::new();
        {
            let mut st = self.lock();
            st.config = config;
            let sched = st.scheduler_config();
            st.sched.set_config(sched, now(), &mut out);
        }
        self.run(out);
    }

    /// This replica's share of the cluster's budget: a lower one closes idle servers
    /// now (oldest first) and busy ones as they are released; a higher one is filled
    /// from the waiters. Returns the servers still open (or logging in) afterwards,
    /// which the replica must go on reporting as held until they are gone.
    pub fn set_share(&self, share: u32) -> u32 {
        let mut out = Vec::new();
        {
            let mut st = self.lock();
            st.share = Some(share);
            let sched = st.scheduler_config();
            st.sched.set_config(sched, now(), &mut out);
        }
        // Closing happens here, outside the lock; the closed servers count until
        // their backends have gone.
        self.run(out);
        self.servers()
    }

    /// Servers open, logging in, or closed but not yet gone from Postgres, all roles:
    /// what this replica holds of the cluster's budget as Postgres counts it.
    pub fn servers(&self) -> u32 {
        let open = self.lock().sched.total_servers();
        open.saturating_add(self.shared.closing.load(Ordering::Acquire))
    }

    /// The replica's demand since the last call (see
    /// [`scheduler::Scheduler::take_demand_peak`]).
    pub fn take_demand_peak(&self) -> u32 {
        self.lock().sched.take_demand_peak()
    }

    /// One round of maintenance; the task spawned by [`Pools::new`] calls this every
    /// `maintenance_interval`.
    pub fn tick(&self) {
        let mut out = Vec::new();
        let expired = {
            let mut st = self.lock();
            let now = now();
            st.sched.tick(now, &mut out);
            st.sched.expire_waiters(now)
        };
        for waiter in expired {
            // Its future may be gone already; then nobody needs the answer.
            let _ = waiter.send(Err(Denied::TimedOut));
        }
        self.run(out);
    }

    pub fn stats(&self) -> PoolStats {
        let st = self.lock();
        let listener = |name: &Arc<str>| {
            st.listeners
                .get(name)
                .and_then(|r| st.sched.role_stats(*r))
                .map_or(0, |s| s.active + s.idle + s.opening)
        };
        let roles = st
            .names
            .iter()
            .filter(|(_, purpose)| *purpose == Purpose::Transactions)
            .filter_map(|(name, _)| {
                let r = st.by_name.get(name)?;
                let s = st.sched.role_stats(*r)?;
                Some(RolePoolStats {
                    role: Arc::clone(name),
                    active: s.active,
                    idle: s.idle,
                    opening: s.opening,
                    waiting: s.waiting,
                    pool_size: s.pool_size,
                    listener: listener(name),
                })
            })
            .chain(
                // A role whose only server is its listener's still has a row.
                st.listeners
                    .iter()
                    .filter(|(name, _)| !st.by_name.contains_key(*name))
                    .map(|(name, _)| RolePoolStats {
                        role: Arc::clone(name),
                        listener: listener(name),
                        ..RolePoolStats::default()
                    }),
            )
            .collect();
        PoolStats {
            roles,
            servers_in_use: st.sched.total_servers(),
            max_server_connections: st.budget(),
            cluster_budget: st.config.max_server_connections,
            demand: st.sched.demand(),
            counters: st.sched.counters(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State<S>> {
        // A panic while holding the lock would be a bug; the state is plain counters
        // and lists updated in a few statements, so carrying on beats wedging every
        // client of every role behind a poisoned lock.
        self.shared
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn release_server(&self, server: ServerId, conn: S) {
        let res = {
            let mut st = self.lock();
            let mut out = std::mem::take(&mut st.spare);
            match st.sched.release(server, conn, now(), &mut out) {
                // Parked idle, nothing to do: the list goes straight back, under the
                // same lock (the common release when nobody waits).
                Ok(()) if out.is_empty() => {
                    st.spare = out;
                    return;
                }
                res => res.map(|()| out),
            }
        };
        match res {
            Ok(out) => {
                let spare = self.run(out);
                // Kept only if nobody holds the lock: never wait for a spare list.
                if let Ok(mut st) = self.shared.state.try_lock() {
                    if st.spare.capacity() == 0 {
                        st.spare = spare;
                    }
                }
            }
            Err(error) => {
                tracing::error!(%error, "pool: release of an unknown server; closed it");
            }
        }
    }

    /// A checked-out server that must not be reused: counted as closing first, so the
    /// slot the scheduler frees is logged into only after its backend has gone.
    pub(crate) fn discard_conn(&self, server: ServerId, conn: S) {
        self.close(conn);
        self.discard_server(server);
    }

    pub(crate) fn discard_server(&self, server: ServerId) {
        let mut out = Vec::new();
        let res = self.lock().sched.discard(server, now(), &mut out);
        if let Err(error) = res {
            tracing::error!(%error, "pool: discard of an unknown server");
        }
        self.run(out);
    }

    /// Removes a waiter that gave up; `None` if it was already granted or failed.
    fn cancel_waiter(&self, id: WaiterId) -> Option<Tx<S>> {
        self.lock().sched.cancel(id, now())
    }

    /// Performs the scheduler's decisions, outside the lock; returns the emptied list.
    fn run(&self, mut actions: Actions<S>) -> Actions<S> {
        let mut next = Vec::new();
        while !actions.is_empty() {
            for action in actions.drain(..) {
                match action {
                    Action::Grant {
                        waiter,
                        server,
                        conn,
                    } => {
                        if let Err(Ok(unwanted)) = waiter.send(Ok(Checkout::new(
                            self.clone(),
                            server,
                            conn,
                            Duration::ZERO,
                        ))) {
                            // The waiter gave up between the decision and now: the
                            // server was never used, so it goes back clean.
                            let (server, conn) = unwanted.into_parts();
                            let res = self.lock().sched.release(server, conn, now(), &mut next);
                            if let Err(error) = res {
                                tracing::error!(%error, "pool: returning an unclaimed grant");
                            }
                        }
                    }
                    Action::Open { server, role } => self.open(server, role),
                    Action::Close {
                        server,
                        conn,
                        reason,
                    } => {
                        tracing::debug!(server = server.index(), ?reason, "pool: closing server");
                        self.close(conn);
                    }
                }
            }
            std::mem::swap(&mut actions, &mut next);
        }
        // Both are empty now; the one that held the first round has the capacity.
        if next.capacity() > actions.capacity() {
            next
        } else {
            actions
        }
    }

    fn close(&self, conn: S) {
        let Some(gone) = self.shared.connector.close(conn) else {
            return;
        };
        self.shared.closing.fetch_add(1, Ordering::AcqRel);
        let pools = self.clone();
        tokio::spawn(async move {
            gone.await;
            pools.shared.closing.fetch_sub(1, Ordering::AcqRel);
            pools.shared.closed.notify_waiters();
        });
    }

    /// Waits until the servers this pool has open, logging in and still closing fit
    /// its budget: a slot the scheduler freed by closing a server (a switch between
    /// roles, a shrinking share) is free in Postgres only once that backend has exited,
    /// and a login started before then would have Postgres count both. Bounded by the
    /// connector's close deadline; the login's own timeout covers the wait.
    async fn slot_gone_in_postgres(&self) {
        loop {
            let closed = self.shared.closed.notified();
            let mut closed = std::pin::pin!(closed);
            closed.as_mut().enable();
            let over = {
                let st = self.lock();
                let held = st.sched.total_servers();
                let closing = self.shared.closing.load(Ordering::Acquire);
                closing > 0
                    && held.saturating_add(closing) > st.sched.config().max_server_connections
            };
            if !over {
                return;
            }
            closed.await;
        }
    }

    fn open(&self, server: ServerId, role: RoleId) {
        let (name, timeout) = {
            let st = self.lock();
            (st.name(role), st.config.connect_timeout)
        };
        let pools = self.clone();
        tokio::spawn(async move {
            let login = async {
                pools.slot_gone_in_postgres().await;
                pools.shared.connector.connect(&name).await
            };
            let result = match tokio::time::timeout(timeout, login).await {
                Ok(result) => result,
                Err(_) => Err(ConnectError::timeout(timeout)),
            };
            let mut out = Vec::new();
            match result {
                Ok(conn) => {
                    let res = pools.lock().sched.opened(server, conn, now(), &mut out);
                    if let Err(error) = res {
                        tracing::error!(%error, "pool: login finished for an unknown server");
                    }
                }
                Err(error) => {
                    tracing::warn!(role = %name, %error, "pool: server login failed");
                    let failed = pools.lock().sched.open_failed(server, now(), &mut out);
                    if let Ok(Some(waiter)) = failed {
                        // Its future may be gone; then nobody needs the error.
                        let _ = waiter.send(Err(Denied::Connect(error)));
                    }
                }
            }
            pools.run(out);
        });
    }
}
