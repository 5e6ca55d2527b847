//! What every client task shares: configuration, the verifier cache, per-role state,
//! the pools, cancel keys, who is connected, and the operator's controls.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::{ArcSwap, ArcSwapOption};
use tokio::sync::watch;

use crate::auth::cache::{Change, VerifierCache};
use crate::auth::limiter::AuthLimiter;
use crate::backend::{LoginKeys, ServerConn, Target};
use crate::config::Config;
use crate::control::Pause;
use crate::pool::Pools;
use crate::registry::{ClientInfo, Registry, ServerInfo};
use crate::session::cancel::CancelMap;
use crate::session::params::ServerParams;

/// How long clients of a role whose verifier disagrees with `pg_authid` are refused
/// before the pooler tries to log in as it again.
pub const MISMATCH_BACKOFF: Duration = Duration::from_secs(30);

pub struct Shared {
    /// Swapped whole by a reload; read through [`Shared::config`].
    pub(crate) config: ArcSwap<Config>,
    pub cache: Arc<VerifierCache>,
    pub roles: Arc<Roles>,
    pub pools: Pools<Box<ServerConn>>,
    pub cancels: Arc<CancelMap>,
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
    /// Set by the console's `SHUTDOWN`; the binary then drains as on SIGTERM.
    pub shutdown_requested: watch::Sender<bool>,
    pub hooks: crate::Hooks,
    /// One reload at a time.
    pub(crate) reloading: tokio::sync::Mutex<()>,
}

impl Shared {
    /// The configuration in force. Cheap (no lock, no reference count on the hot path);
    /// hold it only briefly, and never across a reload you wait for.
    pub fn config(&self) -> arc_swap::Guard<Arc<Config>> {
        self.config.load()
    }
}

/// Per-role state that outlives any one client.
pub struct RoleShared {
    pub name: Arc<str>,
    keys: Mutex<Option<Arc<LoginKeys>>>,
    /// Clients of this role connected now (its credentials row may cap them).
    clients: std::sync::atomic::AtomicUsize,
    /// Keys of older generations (before a rotation) are refused.
    min_generation: std::sync::atomic::AtomicI64,
    params: Mutex<Option<Arc<ServerParams>>>,
    /// The startup parameters of the role's latest client, shared with the next
    /// client that sends the same (session/params.rs).
    pub startup_params: Mutex<Option<crate::session::params::ParamMap>>,
    revoked: watch::Sender<u64>,
    mismatch_until: Mutex<Option<Instant>>,
    /// Clients pinned to a server by session state now.
    pinned: Arc<std::sync::atomic::AtomicUsize>,
    /// Set by the console's KILL: tells the clients it disconnects why.
    killed: std::sync::atomic::AtomicBool,
    /// Transactions and requests relayed, for per-role metrics.
    pub counts: crate::metrics::RoleCounts,
}

/// A pinned client's place under `max_pinned_per_role`; given back on drop.
#[derive(Debug)]
pub struct PinSlot {
    pinned: Arc<std::sync::atomic::AtomicUsize>,
}

impl Drop for PinSlot {
    fn drop(&mut self) {
        self.pinned
            .fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

impl RoleShared {
    fn new(name: Arc<str>) -> Self {
        RoleShared {
            name,
            keys: Mutex::new(None),
            min_generation: std::sync::atomic::AtomicI64::new(0),
            clients: std::sync::atomic::AtomicUsize::new(0),
            params: Mutex::new(None),
            startup_params: Mutex::new(None),
            revoked: watch::Sender::new(0),
            mismatch_until: Mutex::new(None),
            pinned: Arc::default(),
            killed: Default::default(),
            counts: Default::default(),
        }
    }

    /// The console's KILL: every client of the role is told to leave (57P01), as on a
    /// revocation, but its keys stay valid and it may log in again at once.
    pub fn kill(&self) {
        self.killed
            .store(true, std::sync::atomic::Ordering::Release);
        self.revoked.send_modify(|n| *n += 1);
    }

    /// Whether the last disconnection of the role's clients was a KILL.
    pub fn was_killed(&self) -> bool {
        self.killed.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Clients of this role connected now.
    pub fn client_count(&self) -> usize {
        self.clients.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Transactions and requests relayed since start.
    pub fn counts(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        (
            self.counts.transactions.load(Relaxed),
            self.counts.queries.load(Relaxed),
        )
    }

    /// A pin slot, if fewer than `max` clients of the role are pinned.
    pub fn try_pin(&self, max: usize) -> Option<PinSlot> {
        use std::sync::atomic::Ordering;
        self.pinned
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| PinSlot {
                pinned: self.pinned.clone(),
            })
    }

    /// Clients pinned now.
    pub fn pinned(&self) -> usize {
        self.pinned.load(std::sync::atomic::Ordering::Acquire)
    }

    /// The pass-through keys of the role's latest successful client login.
    pub fn keys(&self) -> Option<Arc<LoginKeys>> {
        self.keys.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Keeps the keys of a login, unless newer ones (a later generation) are held, the
    /// login's generation was rotated away, or the role was revoked since `seen`
    /// (the revocation counter the login observed). `false`: the keys are stale.
    pub fn set_keys(&self, keys: LoginKeys, seen: u64) -> bool {
        use std::sync::atomic::Ordering;
        let mut slot = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        if *self.revoked.borrow() != seen
            || keys.generation < self.min_generation.load(Ordering::Acquire)
        {
            return false;
        }
        if slot
            .as_ref()
            .is_none_or(|k| k.generation <= keys.generation)
        {
            *slot = Some(Arc::new(keys));
        }
        true
    }

    /// A rotation to `generation`: older keys are void, and a verifier mismatch seen
    /// with them is no reason to keep refusing.
    pub fn rotated(&self, generation: i64) {
        use std::sync::atomic::Ordering;
        self.min_generation.fetch_max(generation, Ordering::AcqRel);
        let mut slot = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        if slot.as_ref().is_some_and(|k| k.generation < generation) {
            *slot = None;
        }
        *self
            .mismatch_until
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// Takes one of the role's client slots, or `None` when `max` are taken.
    pub fn admit(self: &Arc<Self>, max: Option<usize>) -> Option<ClientSlot> {
        use std::sync::atomic::Ordering;
        let before = self.clients.fetch_add(1, Ordering::AcqRel);
        if max.is_some_and(|m| before >= m) {
            self.clients.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(ClientSlot(self.clone()))
    }

    /// ParameterStatus values a server of this role reported at login.
    pub fn params(&self) -> Option<Arc<ServerParams>> {
        self.params
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn set_params(&self, params: ServerParams) {
        let mut slot = self.params.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            *slot = Some(Arc::new(params));
        }
    }

    /// Fires for every client of the role when it is revoked.
    pub fn revocations(&self) -> watch::Receiver<u64> {
        self.revoked.subscribe()
    }

    pub fn revoke(&self) {
        self.killed
            .store(false, std::sync::atomic::Ordering::Release);
        *self.keys.lock().unwrap_or_else(|p| p.into_inner()) = None;
        self.revoked.send_modify(|n| *n += 1);
    }

    pub fn mismatch(&self, now: Instant) {
        *self
            .mismatch_until
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(now + MISMATCH_BACKOFF);
    }

    /// Whether logins as this role are known to fail (verifier mismatch) right now.
    pub fn in_mismatch_backoff(&self, now: Instant) -> bool {
        self.mismatch_until
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some_and(|until| now < until)
    }
}

/// One connected client of a role; gives its slot back when dropped.
pub struct ClientSlot(Arc<RoleShared>);

impl Drop for ClientSlot {
    fn drop(&mut self) {
        self.0
            .clients
            .fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

#[derive(Default)]
pub struct Roles {
    map: Mutex<HashMap<Arc<str>, Arc<RoleShared>>>,
    /// Bumped by every revocation or rotation of any role: a login that spans a bump
    /// re-checks its role before it is let in.
    epoch: std::sync::atomic::AtomicU64,
    /// The connected clients (the same registry as [`Shared::clients`]): woken when a
    /// role is revoked.
    pub clients: Arc<Registry<ClientInfo>>,
}

impl Roles {
    pub fn epoch(&self) -> u64 {
        self.epoch.load(std::sync::atomic::Ordering::Acquire)
    }

    fn bump(&self) {
        self.epoch.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
    }

    pub fn get_or_insert(&self, role: &str) -> Arc<RoleShared> {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(r) = map.get(role) {
            return r.clone();
        }
        let name: Arc<str> = Arc::from(role);
        let r = Arc::new(RoleShared::new(name.clone()));
        map.insert(name, r.clone());
        r
    }

    /// Every role that has had a client since start-up.
    pub fn all(&self) -> Vec<Arc<RoleShared>> {
        self.map
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }

    pub fn get(&self, role: &str) -> Option<Arc<RoleShared>> {
        self.map
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(role)
            .cloned()
    }
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
    let names: Vec<Arc<str>> = roles
        .map
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .keys()
        .cloned()
        .collect();
    for name in names {
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
