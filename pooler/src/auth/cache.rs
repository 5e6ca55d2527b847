//! Verifiers from `dataplane_auth.lookup()`, cached, with bounded work whatever names
//! clients send.
//!
//! - The lookup runs over a few connections as `dp_pooler`, which may execute the
//!   function and nothing else (`pg_authid` is unreadable on managed Postgres).
//! - Names longer than PostgreSQL's 63 bytes cannot be roles: answered as unknown
//!   without a lookup (PostgreSQL itself would truncate them, and a truncated name may
//!   be another app's).
//! - Single-flight: concurrent logins for one name cost one query; the others wait
//!   for it.
//! - Roles found are kept (least recently used out past `auth_cache_max_roles`, never
//!   the whole cache) and re-read after `auth_cache_ttl_ms`; names not found are kept
//!   for `auth_negative_cache_ttl_ms` (bounded apart, so a spray of made-up names
//!   pushes out only other made-up names).
//! - Lookups pass a gate ([`gate`]): names this pooler has never found may wait there
//!   only `auth_lookup_queue` at a time and use all lookup connections but one, so a
//!   flood of unknown names cannot starve the roles that really log in here.
//! - `LISTEN dataplane_auth` ([`listen`]) drops a role's entry when its credentials
//!   row changes and re-reads it; a lost LISTEN connection may have missed
//!   notifications, so reconnecting marks every entry stale.

mod gate;
mod listen;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{OnceCell, broadcast};

use super::limiter::MAX_NAME;
use super::lru::Lru;
use crate::config::Upstream;
use crate::metrics::AuthCounters;
use crate::verifier::ScramSecret;
pub use gate::Lane;
pub use listen::Interest;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolMode {
    Transaction,
    Session,
}

/// Why a role may not log in, or `Ok`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Ok,
    Unknown,
    Disabled,
    Expired,
}

impl Status {
    fn parse(s: &str) -> Status {
        match s {
            "ok" => Status::Ok,
            "disabled" => Status::Disabled,
            "expired" => Status::Expired,
            _ => Status::Unknown,
        }
    }

    /// A metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Unknown => "unknown_role",
            Status::Disabled => "disabled",
            Status::Expired => "expired",
        }
    }
}

/// One row of `dataplane_auth.lookup`.
#[derive(Debug)]
pub struct RoleAuth {
    pub role: Arc<str>,
    pub status: Status,
    /// Present iff `status == Ok` and the stored verifier parses.
    pub secret: Option<Arc<ScramSecret>>,
    pub generation: i64,
    pub pool_size: Option<usize>,
    pub pool_mode: PoolMode,
    pub max_client_conn: Option<usize>,
}

#[derive(Debug, thiserror::Error)]
pub enum LookupError {
    #[error("the auth lookup cannot reach Postgres: {0}")]
    Unavailable(String),
    /// Too many lookups of names this pooler does not know are waiting already.
    #[error("too many logins are waiting for a credentials lookup")]
    Busy,
}

/// A change the LISTEN connection reported, after the role was looked up again.
#[derive(Debug, Clone)]
pub enum Change {
    /// The role may no longer log in (deleted, suspended, expired): disconnect its
    /// clients and close its servers.
    Revoked(Arc<str>),
    /// The verifier changed (rotation): keys of older generations are void.
    Rotated { role: Arc<str>, generation: i64 },
    /// Notifications may have been missed (the LISTEN connection was re-established):
    /// every role with clients must be checked again.
    Resync,
}

/// The bounds and lifetimes of the cache, from the configuration.
#[derive(Debug, Clone, Copy)]
pub struct CacheLimits {
    /// `auth_cache_ttl_ms`.
    pub ttl: Duration,
    /// `auth_negative_cache_ttl_ms`.
    pub negative_ttl: Duration,
    /// `auth_cache_max_roles`.
    pub max_roles: usize,
    /// `auth_negative_cache_max`.
    pub max_negative: usize,
    /// `auth_lookup_queue`.
    pub queue: usize,
    /// `auth_notify_queue`.
    pub notify_queue: usize,
}

/// A role found (status `ok`). Kept past its TTL, stale, as the mark of a role that
/// really logs in here (its lookups use the known lane).
struct Found {
    auth: Arc<RoleAuth>,
    fetched: Instant,
    stale: bool,
}

/// A name not found (or not allowed to log in).
struct Missing {
    auth: Arc<RoleAuth>,
    fetched: Instant,
}

/// One lookup in progress, shared by every login that asks for the name meanwhile.
struct Flight {
    cell: OnceCell<Arc<RoleAuth>>,
    lane: Lane,
}

struct State {
    found: Lru<Arc<str>, Found>,
    missing: Lru<Arc<str>, Missing>,
    flights: HashMap<Arc<str>, Arc<Flight>>,
}

pub struct VerifierCache {
    upstream: Upstream,
    /// TLS to Postgres for the lookup and LISTEN connections, as for servers.
    tls: Option<Arc<rustls::ClientConfig>>,
    limits: CacheLimits,
    state: Mutex<State>,
    conns: Vec<tokio::sync::Mutex<Option<tokio_postgres::Client>>>,
    /// The connection that tells notifications' senders apart ([`Self::backend_roles`]):
    /// its own, opened on first use, so those queries never take a lookup connection
    /// the gate has promised to a login, nor wait behind a login storm.
    senders: tokio::sync::Mutex<Option<tokio_postgres::Client>>,
    gate: gate::Gate,
    next: AtomicUsize,
    changes: broadcast::Sender<Change>,
    listening: AtomicBool,
    notices: listen::Notices,
    /// What the cache did, for `/metrics`.
    pub counters: Arc<AuthCounters>,
}

const LOOKUP_SQL: &str = "SELECT role_name, scram_verifier, generation, pool_size, pool_mode, max_client_conn, status \
                          FROM dataplane_auth.lookup($1)";

const BACKEND_ROLES_SQL: &str = "SELECT pid, usename::text FROM pg_catalog.pg_stat_activity \
                                 WHERE pid = ANY($1) AND usename IS NOT NULL";

/// What a lookup would say of a name that cannot be a role.
fn unknown(role: &str) -> RoleAuth {
    RoleAuth {
        role: Arc::from(role),
        status: Status::Unknown,
        secret: None,
        generation: 0,
        pool_size: None,
        pool_mode: PoolMode::Transaction,
        max_client_conn: None,
    }
}

/// Removes a flight from the map when the last login waiting on it leaves (finished,
/// failed or cancelled), so an abandoned lookup leaves nothing behind.
struct FlightGuard<'a> {
    cache: &'a VerifierCache,
    name: Arc<str>,
    flight: Option<Arc<Flight>>,
}

impl Drop for FlightGuard<'_> {
    fn drop(&mut self) {
        let mut state = self.cache.state();
        if let Some(flight) = self.flight.take() {
            let ours = state
                .flights
                .get(&self.name)
                .is_some_and(|f| Arc::ptr_eq(f, &flight));
            // The map's reference and ours: nobody else waits on it.
            if ours && Arc::strong_count(&flight) == 2 {
                state.flights.remove(&self.name);
            }
        }
    }
}

impl VerifierCache {
    pub fn new(
        upstream: Upstream,
        tls: Option<Arc<rustls::ClientConfig>>,
        limits: CacheLimits,
        connections: usize,
    ) -> Arc<Self> {
        let (changes, _) = broadcast::channel(1024);
        let connections = connections.max(1);
        Arc::new(VerifierCache {
            upstream,
            tls,
            limits,
            state: Mutex::new(State {
                found: Lru::new(limits.max_roles),
                missing: Lru::new(limits.max_negative),
                flights: HashMap::new(),
            }),
            conns: (0..connections)
                .map(|_| tokio::sync::Mutex::new(None))
                .collect(),
            senders: tokio::sync::Mutex::new(None),
            gate: gate::Gate::new(connections, limits.queue),
            next: AtomicUsize::new(0),
            changes,
            listening: AtomicBool::new(false),
            notices: listen::Notices::new(limits.notify_queue),
            counters: Arc::default(),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Revocations and rotations, as the LISTEN connection learns of them.
    pub fn subscribe(&self) -> broadcast::Receiver<Change> {
        self.changes.subscribe()
    }

    /// Whether the LISTEN connection is up (part of `/readyz`).
    pub fn is_listening(&self) -> bool {
        self.listening.load(Ordering::Relaxed)
    }

    /// The role's verifier and limits: cached, or looked up once for all concurrent
    /// callers. Cancel-safe: a login that leaves mid-lookup leaves the lookup to the
    /// others waiting on it, or nothing at all.
    pub async fn get(&self, role: &str) -> Result<Arc<RoleAuth>, LookupError> {
        self.get_in(role, None).await
    }

    /// The role read from Postgres now (what it was told by a NOTIFY, or a resync),
    /// in the known lane: the pooler asks this only of roles it has reason to.
    pub async fn reread(&self, role: &str) -> Result<Arc<RoleAuth>, LookupError> {
        self.invalidate(role);
        self.get_in(role, Some(Lane::Known)).await
    }

    async fn get_in(&self, role: &str, lane: Option<Lane>) -> Result<Arc<RoleAuth>, LookupError> {
        if role.len() > MAX_NAME {
            self.counters.names_too_long.fetch_add(1, Ordering::Relaxed);
            return Ok(Arc::new(unknown(role)));
        }
        let (name, flight) = {
            let mut state = self.state();
            let State {
                found,
                missing,
                flights,
            } = &mut *state;
            let known = match found.get(role) {
                Some(f) if !f.stale && f.fetched.elapsed() < self.limits.ttl => {
                    return Ok(f.auth.clone());
                }
                Some(_) => true,
                None => false,
            };
            if let Some(m) = missing.get(role) {
                if m.fetched.elapsed() < self.limits.negative_ttl {
                    return Ok(m.auth.clone());
                }
            }
            let lane = lane.unwrap_or(if known { Lane::Known } else { Lane::Unknown });
            match flights.get_key_value(role) {
                Some((name, flight)) => (name.clone(), flight.clone()),
                None => {
                    let name: Arc<str> = Arc::from(role);
                    let flight = Arc::new(Flight {
                        cell: OnceCell::new(),
                        lane,
                    });
                    flights.insert(name.clone(), flight.clone());
                    (name, flight)
                }
            }
        };
        let guard = FlightGuard {
            cache: self,
            name,
            flight: Some(flight),
        };
        let Some(flight) = guard.flight.as_ref() else {
            return Err(LookupError::Unavailable("lookup abandoned".into()));
        };
        // A failed lookup leaves the cell empty: the next waiter tries again.
        let auth = flight
            .cell
            .get_or_try_init(|| self.fetch(&guard.name, flight))
            .await?;
        Ok(auth.clone())
    }

    /// Through the gate, one query, and the answer kept (unless the name was
    /// invalidated meanwhile: then only the logins that asked before get it).
    async fn fetch(
        &self,
        role: &Arc<str>,
        flight: &Arc<Flight>,
    ) -> Result<Arc<RoleAuth>, LookupError> {
        let permit = match self.gate.enter(flight.lane).await {
            Ok(p) => p,
            Err(gate::Full) => {
                self.counters
                    .lookups_refused
                    .fetch_add(1, Ordering::Relaxed);
                return Err(LookupError::Busy);
            }
        };
        let auth = self.lookup(role).await?;
        drop(permit);
        let mut state = self.state();
        let current = state
            .flights
            .get(role)
            .is_some_and(|f| Arc::ptr_eq(f, flight));
        if current {
            let now = Instant::now();
            if auth.status == Status::Ok {
                state.missing.remove(role);
                state.found.insert(
                    role.clone(),
                    Found {
                        auth: auth.clone(),
                        fetched: now,
                        stale: false,
                    },
                );
            } else {
                state.found.remove(role);
                state.missing.insert(
                    role.clone(),
                    Missing {
                        auth: auth.clone(),
                        fetched: now,
                    },
                );
            }
        }
        Ok(auth)
    }

    /// The role's cached lookup, however old, without asking Postgres.
    pub fn peek(&self, role: &str) -> Option<Arc<RoleAuth>> {
        let state = self.state();
        state
            .found
            .peek(role)
            .map(|f| f.auth.clone())
            .or_else(|| state.missing.peek(role).map(|m| m.auth.clone()))
    }

    /// Whether the role was found here and may log in (as far as the cache knows).
    fn is_known(state: &State, role: &str) -> bool {
        state.found.contains(role) || state.flights.contains_key(role)
    }

    /// Forget what the role was: the next login reads it again. A role found before
    /// stays known (its next lookup is in the known lane); a lookup in progress is left
    /// to the logins waiting on it, and its answer is not kept.
    pub fn invalidate(&self, role: &str) {
        let mut state = self.state();
        if let Some(f) = state.found.get(role) {
            f.stale = true;
        }
        state.missing.remove(role);
        state.flights.remove(role);
    }

    /// Everything may have changed (notifications were lost): every entry is stale.
    fn expire_all(&self) {
        let mut state = self.state();
        for f in state.found.values_mut() {
            f.stale = true;
        }
        state.missing.clear();
        state.flights.clear();
    }

    /// Entries held: roles found, names missing, lookups in flight.
    pub fn len(&self) -> (usize, usize, usize) {
        let state = self.state();
        (state.found.len(), state.missing.len(), state.flights.len())
    }

    /// One query of `dataplane_auth.lookup`, on a lookup connection the gate's permit
    /// guarantees is free (or about to be).
    async fn lookup(&self, role: &str) -> Result<Arc<RoleAuth>, LookupError> {
        self.counters.lookups.fetch_add(1, Ordering::Relaxed);
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let n = self.conns.len();
        let free = (0..n).find_map(|k| self.conns[(start + k) % n].try_lock().ok());
        let mut conn = match free {
            Some(c) => c,
            None => self.conns[start % n].lock().await,
        };
        match self
            .query(&mut conn, LOOKUP_SQL, &[&role])
            .await?
            .as_slice()
        {
            [row] => Ok(Arc::new(parse_row(role, row))),
            rows => Err(LookupError::Unavailable(format!(
                "the lookup returned {} rows instead of one",
                rows.len()
            ))),
        }
    }

    /// The roles of the sessions among `pids` (`pg_stat_activity` shows every session's
    /// user to every role): for telling which app sent a notification. One query at a
    /// time, on a connection of its own.
    pub async fn backend_roles(&self, pids: &[i32]) -> Result<Vec<(i32, String)>, LookupError> {
        let mut conn = self.senders.lock().await;
        let rows = self.query(&mut conn, BACKEND_ROLES_SQL, &[&pids]).await?;
        Ok(rows
            .iter()
            .filter_map(|r| Some((r.try_get(0).ok()?, r.try_get(1).ok()?)))
            .collect())
    }

    /// One statement on an auth connection held by the caller, with one retry on a
    /// fresh connection: the cached one may have died since.
    async fn query(
        &self,
        conn: &mut Option<tokio_postgres::Client>,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Vec<tokio_postgres::Row>, LookupError> {
        for attempt in 0..2 {
            if conn.as_ref().is_none_or(|c| c.is_closed()) {
                *conn = Some(self.connect().await?);
            }
            let Some(client) = conn.as_ref() else {
                continue;
            };
            match client.query(sql, params).await {
                Ok(rows) => return Ok(rows),
                Err(e) if attempt == 0 && (e.is_closed() || e.code().is_none()) => {
                    *conn = None;
                }
                Err(e) => return Err(LookupError::Unavailable(e.to_string())),
            }
        }
        Err(LookupError::Unavailable("auth connection lost".into()))
    }

    async fn connect(&self) -> Result<tokio_postgres::Client, LookupError> {
        let (client, _) = self
            .open(None, "dataplane-pooler-auth")
            .await
            .map_err(LookupError::Unavailable)?;
        Ok(client)
    }

    /// A connection of its own as the auth user, for another of its duties (the
    /// replica registry), so that work never waits behind a login storm's lookups.
    pub async fn connect_auth_user(
        &self,
        application_name: &str,
    ) -> Result<tokio_postgres::Client, String> {
        let (client, _) = self.open(None, application_name).await?;
        Ok(client)
    }

    /// Opens a connection as the auth user and drives it on a task; notifications go
    /// to `notify` when given.
    async fn open(
        &self,
        notify: Option<listen::Sink>,
        application_name: &str,
    ) -> Result<(tokio_postgres::Client, tokio::task::JoinHandle<()>), String> {
        let mut config = self.pg_config();
        config.application_name(application_name);
        match &self.tls {
            None => {
                let (client, connection) = config
                    .connect(tokio_postgres::NoTls)
                    .await
                    .map_err(|e| e.to_string())?;
                Ok((client, tokio::spawn(listen::drive(connection, notify))))
            }
            Some(tls) => {
                let tls = tokio_postgres_rustls::MakeRustlsConnect::new((**tls).clone());
                let (client, connection) = config.connect(tls).await.map_err(|e| e.to_string())?;
                Ok((client, tokio::spawn(listen::drive(connection, notify))))
            }
        }
    }

    fn pg_config(&self) -> tokio_postgres::Config {
        let u = &self.upstream;
        let mut c = tokio_postgres::Config::new();
        c.host(&u.host)
            .port(u.port)
            .dbname(&u.dbname)
            .user(&u.auth_user)
            .application_name("dataplane-pooler-auth")
            // A lookup that hangs must not hold logins hostage.
            .options("-c statement_timeout=5000")
            .connect_timeout(Duration::from_secs(5))
            // The LISTEN connection must notice a vanished server in about a minute
            // (the default `tcp_keepalive_idle_ms`), not the kernel's two hours.
            .keepalives_idle(Duration::from_secs(60));
        if let Some(p) = &u.auth_password {
            c.password(p.expose());
        }
        c
    }
}

fn parse_row(role: &str, row: &tokio_postgres::Row) -> RoleAuth {
    let status = row
        .try_get::<_, Option<String>>(6)
        .ok()
        .flatten()
        .map(|s| Status::parse(&s))
        .unwrap_or(Status::Unknown);
    let verifier: Option<String> = row.try_get(1).ok().flatten();
    let secret = match (status, verifier) {
        (Status::Ok, Some(v)) => match ScramSecret::parse(&v) {
            Ok(s) => Some(Arc::new(s)),
            Err(e) => {
                tracing::error!(role, error = %e, "stored verifier does not parse; the role cannot log in");
                None
            }
        },
        _ => None,
    };
    let size = |i: usize| {
        row.try_get::<_, Option<i32>>(i)
            .ok()
            .flatten()
            .and_then(|v| usize::try_from(v).ok())
    };
    let pool_mode = match row
        .try_get::<_, Option<String>>(4)
        .ok()
        .flatten()
        .as_deref()
    {
        Some("session") => PoolMode::Session,
        _ => PoolMode::Transaction,
    };
    RoleAuth {
        role: Arc::from(role),
        status: if secret.is_some() {
            status
        } else if status == Status::Ok {
            Status::Unknown
        } else {
            status
        },
        secret,
        generation: row.try_get::<_, Option<i64>>(2).ok().flatten().unwrap_or(0),
        pool_size: size(3),
        pool_mode,
        max_client_conn: size(5),
    }
}
