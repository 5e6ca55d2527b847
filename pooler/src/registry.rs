//! Who is connected: one entry per client and per server connection, for the admin
//! console (`SHOW CLIENTS`, `SHOW SERVERS`, `SHOW POOLS`) and for `max_client_conn`.
//!
//! An entry is added when a connection starts and removed by its guard's `Drop`, so
//! nothing can be left behind. The map is locked only then and when an operator asks;
//! what changes while a connection lives (a client's state, the server it is linked to)
//! is a few atomics in the entry, stored without any lock.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

/// Entries of one kind, by connection id.
pub struct Registry<T> {
    map: Mutex<HashMap<u64, Arc<T>>>,
}

impl Registry<ClientInfo> {
    /// Wakes every client to look at its signals (revocation, drain, grace period):
    /// call after changing them. Rare, so a snapshot of all is fine; a client with
    /// nothing to do goes back to waiting.
    pub fn wake_all(&self) {
        for client in self.snapshot() {
            client.signal.wake();
        }
    }
}

impl<T> Default for Registry<T> {
    fn default() -> Self {
        Registry {
            map: Mutex::new(HashMap::new()),
        }
    }
}

/// An entry's place in its registry; dropping it removes the entry.
pub struct Registered<T> {
    registry: Arc<Registry<T>>,
    pub entry: Arc<T>,
    pub id: u64,
}

impl<T> Drop for Registered<T> {
    fn drop(&mut self) {
        self.registry.lock().remove(&self.id);
    }
}

impl<T> std::ops::Deref for Registered<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.entry
    }
}

impl<T> Registry<T> {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<T>>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds an entry unless `limit` entries exist already.
    pub fn register(self: &Arc<Self>, id: u64, entry: T, limit: usize) -> Option<Registered<T>> {
        let entry = Arc::new(entry);
        let mut map = self.lock();
        if map.len() >= limit {
            return None;
        }
        map.insert(id, entry.clone());
        Some(Registered {
            registry: self.clone(),
            entry,
            id,
        })
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The first answer `f` gives for an entry, looked for under the lock without
    /// copying the map (for small registries, such as the servers').
    pub fn find_map<R>(&self, f: impl FnMut(&T) -> Option<R>) -> Option<R> {
        self.lock().values().map(|e| &**e).find_map(f)
    }

    /// Calls `f` on every entry, under the map's lock: for a periodic look at all
    /// clients without copying them out. `f` must be quick and must not register.
    pub fn for_each(&self, mut f: impl FnMut(&T)) {
        for entry in self.lock().values() {
            f(entry);
        }
    }

    /// Every entry now, oldest id first.
    pub fn snapshot(&self) -> Vec<Arc<T>> {
        let mut all: Vec<(u64, Arc<T>)> =
            self.lock().iter().map(|(id, e)| (*id, e.clone())).collect();
        all.sort_unstable_by_key(|(id, _)| *id);
        all.into_iter().map(|(_, e)| e).collect()
    }
}

/// Strings that many clients name alike (the database, application names), held
/// once for all of them: an idle client costs its pointers, not its own copies.
/// Bounded by [`MAX_NAMES`]: when full, names no client uses any more are dropped,
/// and a name that still does not fit is not shared (its client holds its own copy).
#[derive(Default)]
pub struct Names {
    set: Mutex<std::collections::HashSet<Arc<str>>>,
}

/// Distinct names shared at most; each is at most what a startup packet may hold.
pub const MAX_NAMES: usize = 4096;

impl Names {
    /// The shared copy of `name`.
    pub fn get(&self, name: &str) -> Arc<str> {
        let mut set = self.set.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(shared) = set.get(name) {
            return shared.clone();
        }
        if set.len() >= MAX_NAMES {
            // Linear in the set, only when full: at most once per login.
            set.retain(|n| Arc::strong_count(n) > 1);
        }
        let shared: Arc<str> = Arc::from(name);
        if set.len() < MAX_NAMES {
            set.insert(shared.clone());
        }
        shared
    }
}

/// Microseconds since the Unix epoch: what `request_time` and wait times are kept in.
pub fn unix_micros(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// What a client is doing, as PgBouncer names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientState {
    /// Before authentication finished.
    Login = 0,
    /// Logged in, holding no server.
    Idle = 1,
    /// Queued for a server (or held by PAUSE).
    Waiting = 2,
    /// Linked to a server.
    Active = 3,
}

impl ClientState {
    fn from_u8(v: u8) -> Self {
        match v {
            1 => ClientState::Idle,
            2 => ClientState::Waiting,
            3 => ClientState::Active,
            _ => ClientState::Login,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ClientState::Login => "login",
            ClientState::Idle => "idle",
            ClientState::Waiting => "waiting",
            ClientState::Active => "active",
        }
    }
}

/// Who a client is, known once it has logged in.
#[derive(Debug, Clone)]
pub struct ClientIdent {
    pub user: Arc<str>,
    /// Shared by every client that names the same ([`Names`]).
    pub database: Arc<str>,
    pub application_name: Arc<str>,
    /// TLS version and cipher, empty for plaintext.
    pub tls: Box<str>,
    /// A session of the admin console rather than of an app.
    pub admin: bool,
}

pub struct ClientInfo {
    pub id: u64,
    pub addr: SocketAddr,
    pub local: Option<SocketAddr>,
    /// When it connected (Unix µs).
    pub connected_us: u64,
    ident: OnceLock<ClientIdent>,
    state: AtomicU8,
    /// When the current request started (Unix µs): its wait, then its transaction.
    request_us: AtomicU64,
    /// The server it is linked to (0: none).
    link: AtomicU64,
    /// Woken after a revocation, a drain or the end of the grace period: the relay
    /// registers here (lock-free) rather than with a channel every client shares.
    /// The doorbell of a parked client too: whatever it must act on rings it.
    signal: futures_util::task::AtomicWaker,
    /// The parking clock's epoch when the client last went idle in a task.
    idle_epoch: AtomicU32,
    /// [`Parking`] as a byte: whether it runs in a task, was asked to park, or is parked.
    parking: AtomicU8,
}

/// Where an idle client waits: in a task of its own (recently busy), or parked
/// without one (session/park.rs), so an idle client costs a few hundred bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parking {
    InTask = 0,
    /// The parking sweep found it idle for a whole period: it parks at its next look.
    Requested = 1,
    Parked = 2,
}

impl ClientInfo {
    pub fn new(id: u64, addr: SocketAddr, local: Option<SocketAddr>) -> Self {
        ClientInfo {
            id,
            addr,
            local,
            connected_us: unix_micros(SystemTime::now()),
            ident: OnceLock::new(),
            state: AtomicU8::new(ClientState::Login as u8),
            request_us: AtomicU64::new(0),
            link: AtomicU64::new(0),
            signal: futures_util::task::AtomicWaker::new(),
            idle_epoch: AtomicU32::new(0),
            parking: AtomicU8::new(Parking::InTask as u8),
        }
    }

    /// Goes idle in its task at the parking clock's `epoch`; a request to park made
    /// before is stale (it was busy since).
    pub fn idle_in_task(&self, epoch: u32) {
        self.idle_epoch.store(epoch, Ordering::Relaxed);
        self.parking.store(Parking::InTask as u8, Ordering::Relaxed);
    }

    /// The parking sweep at `epoch`: asks a client idle in its task since before the
    /// previous epoch to park, and rings it. Returns whether it asked.
    pub fn ask_to_park(&self, epoch: u32) -> bool {
        let quiet = epoch.wrapping_sub(self.idle_epoch.load(Ordering::Relaxed)) >= 2;
        if !quiet || self.state() != ClientState::Idle {
            return false;
        }
        let asked = self
            .parking
            .compare_exchange(
                Parking::InTask as u8,
                Parking::Requested as u8,
                Ordering::AcqRel,
                Ordering::Relaxed,
            )
            .is_ok();
        if asked {
            self.signal.wake();
        }
        asked
    }

    /// Whether it was asked to park; the request is used up.
    pub fn take_park_request(&self) -> bool {
        self.parking
            .compare_exchange(
                Parking::Requested as u8,
                Parking::InTask as u8,
                Ordering::AcqRel,
                Ordering::Relaxed,
            )
            .is_ok()
    }

    pub fn set_parking(&self, p: Parking) {
        self.parking.store(p as u8, Ordering::Release);
    }

    pub fn parking(&self) -> Parking {
        match self.parking.load(Ordering::Acquire) {
            1 => Parking::Requested,
            2 => Parking::Parked,
            _ => Parking::InTask,
        }
    }

    /// Where the relay waits for [`Registry::wake_all`].
    pub fn signal(&self) -> &futures_util::task::AtomicWaker {
        &self.signal
    }

    /// Logged in: the client now counts in `SHOW CLIENTS` and `SHOW POOLS`.
    pub fn logged_in(&self, ident: ClientIdent) {
        let _ = self.ident.set(ident);
        self.state.store(ClientState::Idle as u8, Ordering::Release);
    }

    pub fn ident(&self) -> Option<&ClientIdent> {
        self.ident.get()
    }

    pub fn state(&self) -> ClientState {
        ClientState::from_u8(self.state.load(Ordering::Acquire))
    }

    pub fn waiting(&self) {
        self.request_us
            .store(unix_micros(SystemTime::now()), Ordering::Relaxed);
        self.state
            .store(ClientState::Waiting as u8, Ordering::Release);
    }

    pub fn active(&self, server: u64) {
        self.link.store(server, Ordering::Relaxed);
        self.state
            .store(ClientState::Active as u8, Ordering::Release);
    }

    pub fn idle(&self) {
        self.link.store(0, Ordering::Relaxed);
        self.state.store(ClientState::Idle as u8, Ordering::Release);
    }

    pub fn request_us(&self) -> u64 {
        self.request_us.load(Ordering::Relaxed)
    }

    pub fn link(&self) -> u64 {
        self.link.load(Ordering::Relaxed)
    }
}

/// One server connection. Whether it is active is read off the clients linked to it.
pub struct ServerInfo {
    pub id: u64,
    pub role: Arc<str>,
    pub connected_at: SystemTime,
    /// The backend's pid from BackendKeyData.
    pub remote_pid: i32,
    pub local: Option<SocketAddr>,
    /// TLS version and cipher, empty for plaintext.
    pub tls: String,
    /// Held by its role's LISTEN multiplexer rather than by the role's clients.
    pub listener: std::sync::atomic::AtomicBool,
}

impl ServerInfo {
    pub fn mark_listener(&self) {
        self.listener.store(true, Ordering::Relaxed);
    }

    pub fn is_listener(&self) -> bool {
        self.listener.load(Ordering::Relaxed)
    }
}

/// Ids of server connections, for `SHOW SERVERS` and the `link` columns.
static NEXT_SERVER_ID: AtomicU64 = AtomicU64::new(1);

pub fn next_server_id() -> u64 {
    NEXT_SERVER_ID.fetch_add(1, Ordering::Relaxed)
}

#[cfg(test)]
mod tests {

    #[test]
    fn names_are_shared_and_bounded_and_unused_ones_make_room() {
        let names = Names::default();
        let a = names.get("app");
        let b = names.get("app");
        assert!(Arc::ptr_eq(&a, &b));
        let held: Vec<Arc<str>> = (0..MAX_NAMES - 1)
            .map(|i| names.get(&i.to_string()))
            .collect();
        // Full: a new name is not shared, but works.
        let x = names.get("extra");
        assert!(!Arc::ptr_eq(&x, &names.get("extra")));
        // Names nobody holds make room again.
        drop(held);
        let y = names.get("extra");
        assert!(Arc::ptr_eq(&y, &names.get("extra")));
        assert!(Arc::ptr_eq(&a, &names.get("app")), "held names stay");
    }

    use super::*;

    #[test]
    fn entries_leave_with_their_guard_and_the_limit_holds() {
        let reg: Arc<Registry<u32>> = Arc::default();
        let a = reg.register(1, 10, 2).unwrap();
        let b = reg.register(2, 20, 2).unwrap();
        assert!(reg.register(3, 30, 2).is_none());
        assert_eq!(*b, 20);
        drop(a);
        assert_eq!(reg.len(), 1);
        let c = reg.register(3, 30, 2).unwrap();
        assert_eq!(
            reg.snapshot().iter().map(|e| **e).collect::<Vec<_>>(),
            vec![20, 30]
        );
        drop((b, c));
        assert!(reg.is_empty());
    }

    #[test]
    fn client_states_round_trip() {
        let c = ClientInfo::new(7, "127.0.0.1:1".parse().unwrap(), None);
        assert_eq!(c.state(), ClientState::Login);
        c.waiting();
        assert_eq!(c.state(), ClientState::Waiting);
        assert!(c.request_us() > 0);
        c.active(9);
        assert_eq!((c.state(), c.link()), (ClientState::Active, 9));
        c.idle();
        assert_eq!((c.state(), c.link()), (ClientState::Idle, 0));
    }

    #[test]
    fn only_a_client_idle_for_a_whole_sweep_period_is_asked_to_park() {
        let c = ClientInfo::new(7, "127.0.0.1:1".parse().unwrap(), None);
        c.idle_in_task(10);
        assert!(!c.ask_to_park(11), "still logging in");
        c.idle();
        assert!(!c.ask_to_park(11), "idle since less than a period");
        assert!(c.ask_to_park(12));
        assert_eq!(c.parking(), Parking::Requested);
        assert!(!c.ask_to_park(13), "asked once");
        assert!(c.take_park_request());
        assert!(!c.take_park_request());
        c.waiting();
        assert!(!c.ask_to_park(20), "busy");
        c.idle();
        c.idle_in_task(20);
        c.set_parking(Parking::Parked);
        assert!(!c.ask_to_park(30), "parked already");
    }
}
