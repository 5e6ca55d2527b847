//! Per-role state that outlives any one client: the pass-through keys, the client and
//! pin counts, the parameters its servers report, revocation.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::backend::LoginKeys;
use crate::backend::params::{ParamMap, ServerParams};
use crate::metrics::{RoleCounts, RoleSample};
use crate::registry::{ClientInfo, Registry};

/// How long clients of a role whose verifier disagrees with `pg_authid` are refused
/// before the pooler tries to log in as it again.
pub const MISMATCH_BACKOFF: Duration = Duration::from_secs(30);

/// Startup settings remembered per role as accepted; past this the memory starts over.
pub const MAX_CHECKED_SETTINGS: usize = 256;
/// A setting longer than this (name and value) is checked every time, not remembered.
pub const MAX_CHECKED_SETTING_BYTES: usize = 512;

/// A startup setting a server of the role accepted without a notice.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckedSetting {
    /// The value as Postgres reports it (ParameterStatus), for a reported parameter.
    pub reported: Option<String>,
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
    /// client that sends the same (backend/params.rs).
    pub startup_params: Mutex<Option<ParamMap>>,
    revoked: watch::Sender<u64>,
    mismatch_until: Mutex<Option<Instant>>,
    /// Clients pinned to a server by session state now.
    pinned: Arc<std::sync::atomic::AtomicUsize>,
    /// Set by the console's KILL: tells the clients it disconnects why.
    killed: std::sync::atomic::AtomicBool,
    /// Transactions and requests relayed, for per-role metrics.
    pub counts: RoleCounts,
    /// Startup settings its servers accepted, by `name\0value`: a client asking for
    /// only these logs in without a check on a server.
    checked: Mutex<HashMap<String, Arc<CheckedSetting>>>,
    /// The kinds of session state the app's functions may leave (a mask of
    /// session/state's kinds; session/routines.rs): every transaction of its clients
    /// is looked at for them. All kinds until first looked at.
    routine_kinds: std::sync::atomic::AtomicU16,
    /// When they were last looked at, in ms since `born` (0: never).
    routines_seen_ms: std::sync::atomic::AtomicU64,
    born: Instant,
    /// Custom parameters the app's functions may set, for the state check.
    routine_customs: Mutex<Vec<String>>,
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
            checked: Mutex::new(HashMap::new()),
            routine_kinds: std::sync::atomic::AtomicU16::new(u16::MAX),
            routines_seen_ms: std::sync::atomic::AtomicU64::new(0),
            born: Instant::now(),
            routine_customs: Mutex::new(Vec::new()),
        }
    }

    /// What the app's functions may leave behind a plain `SELECT f()` (all, if never
    /// looked at): every transaction of its clients is looked at for it. 0: nothing.
    pub fn routine_kinds(&self) -> u16 {
        self.routine_kinds
            .load(std::sync::atomic::Ordering::Acquire)
    }

    /// Whether the app's functions may leave session state at all.
    pub fn routines_risky(&self) -> bool {
        self.routine_kinds() != 0
    }

    /// The app's functions have not been looked at within `every` of `now` (an
    /// instant the caller has anyway: no clock read here).
    pub fn routines_due(&self, now: Instant, every: Duration) -> bool {
        let seen = self
            .routines_seen_ms
            .load(std::sync::atomic::Ordering::Acquire);
        let now =
            u64::try_from(now.saturating_duration_since(self.born).as_millis()).unwrap_or(u64::MAX);
        seen == 0 || now.saturating_sub(seen) >= u64::try_from(every.as_millis()).unwrap_or(0)
    }

    /// What a look at the app's functions found: the kinds of state they may leave,
    /// and the custom parameters they may set.
    pub fn set_routines(&self, kinds: u16, customs: Vec<String>) {
        use std::sync::atomic::Ordering;
        *self
            .routine_customs
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = customs;
        self.routine_kinds.store(kinds, Ordering::Release);
        let now = u64::try_from(self.born.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.routines_seen_ms.store(now.max(1), Ordering::Release);
    }

    /// Custom parameters the app's functions may set.
    pub fn routine_customs(&self) -> Vec<String> {
        self.routine_customs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// What a server of the role said about startup setting `name = value`, if it
    /// accepted it before.
    pub fn checked_setting(&self, name: &str, value: &str) -> Option<Arc<CheckedSetting>> {
        let map = self.checked.lock().unwrap_or_else(|p| p.into_inner());
        if map.is_empty() {
            return None;
        }
        map.get(&format!("{name}\0{value}")).cloned()
    }

    /// Remembers that a server of the role accepted `name = value`.
    pub fn remember_setting(&self, name: &str, value: &str, checked: CheckedSetting) {
        if name.len() + value.len() > MAX_CHECKED_SETTING_BYTES {
            return;
        }
        let mut map = self.checked.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= MAX_CHECKED_SETTINGS {
            map.clear();
        }
        map.insert(format!("{name}\0{value}"), Arc::new(checked));
    }

    /// The role changed (revoked, rotated): what its servers accepted may change too.
    fn forget_settings(&self) {
        self.checked
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
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
        drop(slot);
        self.forget_settings();
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
        self.forget_settings();
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

    pub(super) fn bump(&self) {
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

    /// Every role's books, for a metrics scrape.
    pub fn samples(&self) -> Vec<RoleSample> {
        self.all()
            .iter()
            .map(|r| {
                let (transactions, queries) = r.counts();
                RoleSample {
                    name: r.name.clone(),
                    clients: r.client_count(),
                    pinned: r.pinned(),
                    transactions,
                    queries,
                }
            })
            .collect()
    }

    /// The names of every role that has had a client since start-up.
    pub fn names(&self) -> Vec<Arc<str>> {
        self.map
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
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
