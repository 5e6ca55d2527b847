//! What every client task shares: configuration, the verifier cache, per-role state,
//! the pools, cancel keys.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{Semaphore, watch};

use crate::auth::cache::{Change, VerifierCache};
use crate::auth::limiter::AuthLimiter;
use crate::backend::{LoginKeys, ServerConn, Target};
use crate::config::Config;
use crate::pool::Pools;
use crate::session::cancel::CancelMap;
use crate::session::params::ServerParams;

/// How long clients of a role whose verifier disagrees with `pg_authid` are refused
/// before the pooler tries to log in as it again.
pub const MISMATCH_BACKOFF: Duration = Duration::from_secs(30);

pub struct Shared {
    pub config: Arc<Config>,
    pub cache: Arc<VerifierCache>,
    pub roles: Arc<Roles>,
    pub pools: Pools<ServerConn>,
    pub cancels: Arc<CancelMap>,
    pub limiter: AuthLimiter,
    pub target: Target,
    /// Keys the mock verifiers of unknown roles, so they are stable but unguessable.
    pub mock_secret: [u8; 32],
    pub client_tls: Option<tokio_rustls::TlsAcceptor>,
    pub clients: Arc<Semaphore>,
    pub shutdown: watch::Receiver<bool>,
}

/// Per-role state that outlives any one client.
pub struct RoleShared {
    pub name: Arc<str>,
    keys: Mutex<Option<Arc<LoginKeys>>>,
    params: Mutex<Option<Arc<ServerParams>>>,
    revoked: watch::Sender<u64>,
    mismatch_until: Mutex<Option<Instant>>,
}

impl RoleShared {
    fn new(name: Arc<str>) -> Self {
        RoleShared {
            name,
            keys: Mutex::new(None),
            params: Mutex::new(None),
            revoked: watch::Sender::new(0),
            mismatch_until: Mutex::new(None),
        }
    }

    /// The pass-through keys of the role's latest successful client login.
    pub fn keys(&self) -> Option<Arc<LoginKeys>> {
        self.keys.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Keeps the keys of a login, unless newer ones (a later generation) are held.
    pub fn set_keys(&self, keys: LoginKeys) {
        let mut slot = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        if slot
            .as_ref()
            .is_none_or(|k| k.generation <= keys.generation)
        {
            *slot = Some(Arc::new(keys));
        }
    }

    /// Drops keys older than `generation` (after a rotation).
    pub fn drop_keys_before(&self, generation: i64) {
        let mut slot = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        if slot.as_ref().is_some_and(|k| k.generation < generation) {
            *slot = None;
        }
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

#[derive(Default)]
pub struct Roles {
    map: Mutex<HashMap<Arc<str>, Arc<RoleShared>>>,
}

impl Roles {
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
pub async fn apply_changes(cache: Arc<VerifierCache>, roles: Arc<Roles>, pools: Pools<ServerConn>) {
    let mut changes = cache.subscribe();
    loop {
        match changes.recv().await {
            Ok(Change::Revoked(role)) => {
                if let Some(r) = roles.get(&role) {
                    r.revoke();
                }
                pools.close_role(&role);
            }
            Ok(Change::Rotated { role, generation }) => {
                if let Some(r) = roles.get(&role) {
                    r.drop_keys_before(generation);
                }
            }
            Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                tracing::warn!(missed = n, "credential changes arrived faster than applied");
            }
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
        }
    }
}
