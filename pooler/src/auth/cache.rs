//! Verifiers from `dataplane_auth.lookup()`, cached.
//!
//! - The lookup runs over a few connections as `dp_pooler`, which may execute the
//!   function and nothing else (`pg_authid` is unreadable on managed Postgres).
//! - Single-flight: a login storm for one role costs one query; the others wait for it.
//! - Entries expire after a TTL, and at once when `LISTEN dataplane_auth` reports a
//!   change to the role (the provisioner's trigger sends the role name). A lost LISTEN
//!   connection may have missed notifications, so reconnecting drops the whole cache.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use tokio::sync::{OnceCell, broadcast};

use crate::config::Upstream;
use crate::verifier::ScramSecret;

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

struct Slot {
    cell: OnceCell<Arc<RoleAuth>>,
    created: Instant,
}

pub struct VerifierCache {
    upstream: Upstream,
    /// TLS to Postgres for the lookup and LISTEN connections, as for servers.
    tls: Option<Arc<rustls::ClientConfig>>,
    ttl: Duration,
    slots: Mutex<HashMap<Arc<str>, Arc<Slot>>>,
    conns: Vec<tokio::sync::Mutex<Option<tokio_postgres::Client>>>,
    next: AtomicUsize,
    changes: broadcast::Sender<Change>,
    listening: AtomicBool,
}

/// Cached lookups kept at most (one per role name seen within the TTL).
const MAX_SLOTS: usize = 100_000;

const LOOKUP_SQL: &str = "SELECT role_name, scram_verifier, generation, pool_size, pool_mode, max_client_conn, status \
                          FROM dataplane_auth.lookup($1)";

const BACKEND_ROLES_SQL: &str = "SELECT pid, usename::text FROM pg_catalog.pg_stat_activity \
                                 WHERE pid = ANY($1) AND usename IS NOT NULL";

impl VerifierCache {
    pub fn new(
        upstream: Upstream,
        tls: Option<Arc<rustls::ClientConfig>>,
        ttl: Duration,
        connections: usize,
    ) -> Arc<Self> {
        let (changes, _) = broadcast::channel(1024);
        Arc::new(VerifierCache {
            upstream,
            tls,
            ttl,
            slots: Mutex::new(HashMap::new()),
            conns: (0..connections.max(1))
                .map(|_| tokio::sync::Mutex::new(None))
                .collect(),
            next: AtomicUsize::new(0),
            changes,
            listening: AtomicBool::new(false),
        })
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
    /// callers.
    pub async fn get(&self, role: &str) -> Result<Arc<RoleAuth>, LookupError> {
        let slot = {
            let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
            match slots.get(role) {
                Some(s) if s.created.elapsed() < self.ttl => s.clone(),
                _ => {
                    // Names come from clients: past a bound, forget expired entries so a
                    // spray of made-up names cannot grow the map without limit.
                    if slots.len() >= MAX_SLOTS {
                        let ttl = self.ttl;
                        slots.retain(|_, s| s.created.elapsed() < ttl);
                        if slots.len() >= MAX_SLOTS {
                            slots.clear();
                        }
                    }
                    let s = Arc::new(Slot {
                        cell: OnceCell::new(),
                        created: Instant::now(),
                    });
                    slots.insert(Arc::from(role), s.clone());
                    s
                }
            }
        };
        // A failed lookup leaves the cell empty: the next caller tries again.
        let auth = slot.cell.get_or_try_init(|| self.lookup(role)).await?;
        Ok(auth.clone())
    }

    /// The role's cached lookup, however old, without asking Postgres.
    pub fn peek(&self, role: &str) -> Option<Arc<RoleAuth>> {
        let slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        slots.get(role).and_then(|s| s.cell.get().cloned())
    }

    /// Forget a role now.
    pub fn invalidate(&self, role: &str) {
        self.slots
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(role);
    }

    fn invalidate_all(&self) {
        self.slots.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }

    fn cached(&self, role: &str) -> Option<Arc<RoleAuth>> {
        let slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        slots.get(role).and_then(|s| s.cell.get().cloned())
    }

    async fn lookup(&self, role: &str) -> Result<Arc<RoleAuth>, LookupError> {
        match self.rows(LOOKUP_SQL, &[&role]).await?.as_slice() {
            [row] => Ok(Arc::new(parse_row(role, row))),
            rows => Err(LookupError::Unavailable(format!(
                "the lookup returned {} rows instead of one",
                rows.len()
            ))),
        }
    }

    /// The roles of the sessions among `pids` (`pg_stat_activity` shows every session's
    /// user to every role): for telling which app sent a notification.
    pub async fn backend_roles(&self, pids: &[i32]) -> Result<Vec<(i32, String)>, LookupError> {
        let rows = self.rows(BACKEND_ROLES_SQL, &[&pids]).await?;
        Ok(rows
            .iter()
            .filter_map(|r| Some((r.try_get(0).ok()?, r.try_get(1).ok()?)))
            .collect())
    }

    /// Runs one statement on one of the auth connections.
    async fn rows(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Vec<tokio_postgres::Row>, LookupError> {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.conns.len();
        let mut conn = self.conns[i].lock().await;
        // One retry on a fresh connection: the cached one may have died since.
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
        Err(LookupError::Unavailable("lookup connection lost".into()))
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
        notify: Option<tokio::sync::mpsc::UnboundedSender<Result<String, String>>>,
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
                Ok((client, tokio::spawn(drive(connection, notify))))
            }
            Some(tls) => {
                let tls = tokio_postgres_rustls::MakeRustlsConnect::new((**tls).clone());
                let (client, connection) = config.connect(tls).await.map_err(|e| e.to_string())?;
                Ok((client, tokio::spawn(drive(connection, notify))))
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

    /// Keeps a `LISTEN dataplane_auth` connection up until `shutdown` fires; each
    /// notification invalidates the role, looks it up again and publishes a
    /// [`Change`] when it matters.
    pub async fn run_listener(self: Arc<Self>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        let mut backoff = Duration::from_millis(100);
        loop {
            if *shutdown.borrow() {
                return;
            }
            match self.listen_once(&mut shutdown).await {
                Ok(()) => return,
                Err(e) => {
                    self.listening.store(false, Ordering::Relaxed);
                    tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "auth LISTEN connection lost");
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = shutdown.changed() => return,
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }

    async fn listen_once(
        &self,
        shutdown: &mut tokio::sync::watch::Receiver<bool>,
    ) -> Result<(), String> {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let (client, driver) = self.open(Some(tx), "dataplane-pooler-auth").await?;
        let result = async {
            client
                .batch_execute("LISTEN dataplane_auth")
                .await
                .map_err(|e| e.to_string())?;
            // Anything cached may have changed while we were not listening.
            self.invalidate_all();
            let _ = self.changes.send(Change::Resync);
            self.listening.store(true, Ordering::Relaxed);
            tracing::info!("listening for credential changes");
            loop {
                tokio::select! {
                    msg = rx.recv() => match msg {
                        Some(Ok(role)) => self.on_notify(&role).await,
                        Some(Err(e)) => return Err(e),
                        None => return Err("connection closed".into()),
                    },
                    _ = shutdown.changed() => return Ok(()),
                }
            }
        }
        .await;
        driver.abort();
        result
    }

    async fn on_notify(&self, role: &str) {
        let before = self.cached(role);
        self.invalidate(role);
        let after = match self.get(role).await {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(role, error = %e, "re-reading a changed role failed");
                return;
            }
        };
        let role: Arc<str> = after.role.clone();
        if after.status != Status::Ok {
            tracing::info!(role = %role, status = after.status.as_str(), "role revoked");
            let _ = self.changes.send(Change::Revoked(role));
        } else if before.is_none_or(|b| b.generation != after.generation) {
            let _ = self.changes.send(Change::Rotated {
                role,
                generation: after.generation,
            });
        }
    }
}

/// Drives a connection until it ends, passing notifications on.
async fn drive<S, T>(
    mut connection: tokio_postgres::Connection<S, T>,
    notify: Option<tokio::sync::mpsc::UnboundedSender<Result<String, String>>>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
    while let Some(msg) = messages.next().await {
        match msg {
            Ok(tokio_postgres::AsyncMessage::Notification(n)) => {
                if let Some(tx) = &notify {
                    let _ = tx.send(Ok(n.payload().to_owned()));
                }
            }
            Ok(_) => {}
            Err(e) => {
                if let Some(tx) = &notify {
                    let _ = tx.send(Err(e.to_string()));
                }
                return;
            }
        }
    }
    if let Some(tx) = &notify {
        let _ = tx.send(Err("connection closed".into()));
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
