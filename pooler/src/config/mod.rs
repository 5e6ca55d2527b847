//! The configuration: one serde tree, every key with its default here and nowhere else,
//! validated once at load. The TOML file is optional; flags and `POOLER_*` environment
//! variables override it (main.rs).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("parsing {path}: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: Box<toml::de::Error>,
    },
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// How TLS is used on one side of the pooler.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TlsMode {
    /// Never: clients asking for TLS get `N` and continue in plaintext.
    Disable,
    /// Clients may use TLS (needs a certificate); plaintext is accepted too.
    Allow,
    /// TLS or nothing: plaintext clients are refused with a clear error.
    Require,
    /// Server side only: TLS, and the server's certificate must chain to `ca_file` and
    /// name the host.
    VerifyFull,
}

/// A secret string from the configuration: `Debug` never shows it.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// `worker_threads` above this is surely a typo (a thread per client is not a design).
pub const MAX_WORKER_THREADS: usize = 1024;

/// The whole configuration. Every field's doc states its default.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Where app pods connect (transaction pooling unless the app's row says session).
    /// Default `0.0.0.0:5432`.
    pub listen: SocketAddr,
    /// A second port whose clients always get session pooling (pg_dump, migrations
    /// with advisory locks, LISTEN). Default: none.
    pub session_listen: Option<SocketAddr>,
    /// HTTP `/healthz`, `/readyz`. Default `0.0.0.0:9930`.
    pub admin_listen: SocketAddr,
    /// Connections the admin HTTP listener holds at once. One more takes the place of
    /// the oldest connection of the address (an IPv6 /64) that holds the most, so a
    /// flood of connections closes its own and probes and scrapes are still answered.
    /// Takes a restart. Default 64.
    pub admin_max_connections: usize,
    /// How long the admin HTTP listener waits for a whole request head (and for the
    /// next one on a kept-alive connection) before it closes the connection: a client
    /// that trickles its headers (slowloris) holds nothing longer. Every connection
    /// is closed after 30 s whatever it does (`admin::listener::CONNECTION_LIFETIME`).
    /// Takes a restart. Default 5 s.
    pub admin_header_timeout_ms: u64,
    /// Clients accepted at once over all ports; past it new clients get 53300.
    /// Default 10000.
    pub max_client_conn: usize,
    /// Server connections for all roles together, over every replica of the pooler in
    /// front of the cluster (README, "Running several replicas"): the replicas share it
    /// by demand through the registry in Postgres. Give every replica the same value;
    /// when they differ, the least binds. Default 40.
    pub max_server_connections: usize,
    /// Server connections per role when its credentials row names none. Default 5.
    pub default_pool_size: usize,
    /// How long a client waits for a server before 53300. Default 30 s.
    pub query_wait_timeout_ms: u64,
    /// Startup + authentication must finish within this. Default 15 s.
    pub client_login_timeout_ms: u64,
    /// Opening (TCP, TLS, login) one server connection. Default 5 s.
    pub server_connect_timeout_ms: u64,
    /// An idle server is closed after this. Default 600 s.
    pub server_idle_timeout_ms: u64,
    /// A server is closed when released after this age. Default 3600 s.
    pub server_lifetime_ms: u64,
    /// An idle server is health-checked before reuse after this. Default 30 s.
    pub server_check_delay_ms: u64,
    /// A server idle less than this is never taken from its role for another: it is
    /// probably between two transactions of a busy client. Default 1000 ms.
    pub min_idle_before_evict_ms: u64,
    /// How long a role may keep a slot while another role waits with none. Lower is
    /// fairer but costs more server logins (each about 1-2 ms of Postgres CPU).
    /// Default 500 ms.
    pub switch_quantum_ms: u64,
    /// Cached verifiers are re-read after this even without a NOTIFY. Default 60 s.
    pub auth_cache_ttl_ms: u64,
    /// Failed logins allowed per role from one client address (an IPv4 address, an IPv6
    /// /64) per minute; past it that address's attempts for that role are refused with
    /// 28000 until the minute is over. Never per role alone: strangers' failures cannot
    /// refuse a role's right password from another address. Attempts in flight count,
    /// so parallel guesses cannot overshoot it. (`auth_failures_per_role_per_minute`,
    /// its old name, is still read.) Default 20.
    #[serde(alias = "auth_failures_per_role_per_minute")]
    pub auth_failures_per_role_per_address_per_minute: u32,
    /// Failed logins allowed per client address (an IPv4 address, an IPv6 /64) per
    /// minute, over all roles. Default 50.
    pub auth_failures_per_address_per_minute: u32,
    /// Addresses, and (role, address) pairs, the throttle remembers (each map; the least
    /// recently used goes first). Default 100000.
    pub auth_throttle_max_entries: usize,
    /// Roles whose verifier is cached (the least recently used goes first, never the
    /// whole cache). A role cached once counts as known: its lookups never wait behind
    /// names nobody has logged in with. Default 100000.
    pub auth_cache_max_roles: usize,
    /// How long a name the lookup did not find (or found disabled) is answered from
    /// memory; a NOTIFY for the name ends it at once (a new app logs in at once).
    /// Default 5000 ms.
    pub auth_negative_cache_ttl_ms: u64,
    /// Names remembered as not found (least recently used first out). Default 10000.
    pub auth_negative_cache_max: usize,
    /// Lookups of names this pooler does not know (never logged in here) that may wait
    /// for a lookup connection at once; past it a login is refused with 53300 before
    /// authentication. Such lookups also use at most all but one of the lookup
    /// connections, so known roles always find one. Default 64.
    pub auth_lookup_queue: usize,
    /// Role names from `NOTIFY dataplane_auth` waiting to be re-read (each at most once:
    /// duplicates are dropped while it waits). Past it the queue is dropped and every
    /// known role re-read, as after a lost LISTEN connection. Default 10000.
    pub auth_notify_queue: usize,
    /// Named prepared statements kept per server connection (least recently used
    /// are closed past it). Default 200.
    pub max_prepared_statements: usize,
    /// Named prepared statements one client connection may hold (the pooler keeps
    /// each one's text in memory). A Parse of a new name past it fails with 53400,
    /// like any error in its batch (the rest is skipped up to Sync); closing
    /// statements makes room again. Default 10000.
    pub max_client_prepared_statements: usize,
    /// Bytes of prepared-statement names and texts one client connection may hold
    /// (a text is held once however many names use it). A Parse that would go past
    /// it fails with 53400 like `max_client_prepared_statements`. Default 8 MiB
    /// (8388608), room for PgJDBC's default statement cache (5 MiB).
    pub max_client_prepared_bytes: usize,
    /// The largest message the pooler holds whole: a named Parse (its text is kept
    /// to prepare it again on another server), the head of a Query, Bind or
    /// FunctionCall, a server's ErrorResponse, a console command. Longer Queries,
    /// unnamed Parses, Binds, CopyData and rows are streamed through in pieces
    /// whatever their size; a longer named Parse fails with 54000 (the rest of its
    /// batch skipped up to Sync). At least 32768. Default 1 MiB (1048576).
    pub max_message_bytes: usize,
    /// A client linked to a server that makes no progress for this long (it reads
    /// nothing of what the server sent, or does not finish a message or a COPY it
    /// started) loses its server (closed, so its transaction rolls back) and gets
    /// 08006. Also bounds every write of an error to a client. Default 10 s.
    pub client_stall_timeout_ms: u64,
    /// A client idle inside a transaction (or an unsynced extended-protocol batch)
    /// for this long loses its server (closed, rolled back) and gets 25P03, like
    /// PgBouncer's `idle_transaction_timeout`. 0 turns it off; Postgres's own
    /// `idle_in_transaction_session_timeout`, which the provisioner sets per app, still
    /// applies unless the app changes it. Default 0 (off).
    pub idle_transaction_timeout_ms: u64,
    /// TCP keepalive on client and server sockets: idle time before the first probe
    /// (0 turns keepalive off). A peer that vanished without a FIN (a node lost, a
    /// cable cut) is then noticed after about idle + 3 × interval instead of the
    /// kernel's two hours. Default 60 s.
    pub tcp_keepalive_idle_ms: u64,
    /// TCP keepalive: time between probes (3 unanswered probes close the socket).
    /// Default 10 s.
    pub tcp_keepalive_interval_ms: u64,
    /// Clients of one role that may be pinned to a server at once by session state
    /// (temp tables, advisory locks, SQL PREPARE, SET ROLE, untracked SET; LISTEN does
    /// not pin, see `max_listener_servers`).
    /// Unset: half the role's pool size, at least 1. Past it the client gets an error
    /// that points to session mode.
    pub max_pinned_per_role: Option<usize>,
    /// LISTEN in transaction mode: each app role with listening clients gets one
    /// listener server (outside its pool_size, inside `max_server_connections`) that
    /// listens on the union of their channels. At most this many such servers exist at
    /// once; a client whose LISTEN would need one more gets 53400 and is disconnected.
    /// Unset: a quarter of `max_server_connections`, at least 1.
    pub max_listener_servers: Option<usize>,
    /// Channels one client may LISTEN on at once in transaction mode; a transaction
    /// that leaves it with more ends the session with 53400. Default 100.
    pub max_client_listen_channels: usize,
    /// Notifications waiting for one client (a busy or slow one) at most, in bytes
    /// (with 64 bytes per notification for the bookkeeping); a client past it is not
    /// reading and is disconnected with 53400. At least 16384 (one notification of
    /// Postgres' 8000-byte maximum always fits). Default 1048576.
    pub max_client_notification_bytes: usize,
    /// Per-role series on `/metrics` (clients, servers, transactions by role). Off by
    /// default: thousands of apps would make thousands of series. Default false.
    pub metrics_per_role: bool,
    /// With `metrics_per_role`, the busiest roles that get their own series; the rest
    /// are summed as `role="_other"`. Default 50.
    pub metrics_max_roles: usize,
    /// Where the other replicas reach this one (`host:port`) to forward a
    /// CancelRequest for a key this replica minted; in Kubernetes, the pod IP from the
    /// downward API and the client port. Default: `listen` when it names one address,
    /// else none, and a cancel that lands on another replica is then dropped.
    pub advertise_addr: Option<String>,
    /// How often this replica heartbeats its demand and what it holds into
    /// `dataplane_auth.replicas` and reads every replica's share back. While slots are
    /// moving it heartbeats four times as often. Default 1000 ms.
    pub replica_heartbeat_ms: u64,
    /// A replica silent this long counts as dead: the others take its share and its
    /// id. At least three heartbeats. Shorter: a crashed replica's share returns
    /// sooner; longer: a replica that is slow to reach Postgres is less likely to be
    /// counted out while it still holds servers. Default 5000 ms.
    pub replica_lease_ms: u64,
    /// CancelRequests per client address per minute that this replica forwards to
    /// the replica that minted the key; past it they are dropped, so a client cannot
    /// use the replicas as an amplifier. Default 600.
    pub cancel_forwards_per_address_per_minute: u32,
    /// Connections (as `dp_pooler`) used for `dataplane_auth.lookup`. Default 2.
    pub auth_pool_size: usize,
    /// Keys the mock verifiers of unknown roles. Give every replica the same value
    /// (through `POOLER_AUTH_MOCK_SECRET`) so an unknown role's salt is as stable as a
    /// real one's across restarts and replicas. Default: random per process.
    #[serde(skip_serializing)]
    pub auth_mock_secret: Option<Secret>,
    /// What is logged: `tracing` filter directives such as `info` or
    /// `pooler=debug,info`. `RUST_LOG`, when set, takes its place. Default `info`.
    pub log_level: String,
    /// Threads that run client sessions (tokio's worker threads); 0: one per CPU; 1:
    /// tokio's current-thread scheduler, on the main thread. Fewer threads cost less
    /// CPU per transaction (no waking and stealing between workers: on 2 vCPUs shared
    /// with Postgres and the load generator one worker used about 10% less), more
    /// reach more throughput when the pooler has cores to itself. Takes a restart.
    /// Default 0.
    pub worker_threads: usize,
    pub upstream: Upstream,
    pub client_tls: ClientTls,
    pub server_tls: ServerTls,
    pub admin: Admin,
}

/// The admin console: the virtual databases `pgbouncer` and `admin`, for one role that
/// is configured here rather than looked up in `dataplane_auth` and that never gets a
/// server connection.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Admin {
    /// The admin role's name. Default: none, and the console refuses everyone.
    pub user: Option<String>,
    /// Its SCRAM-SHA-256 verifier, `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`
    /// as PostgreSQL stores one, so no password is kept anywhere. Set it through
    /// `POOLER_ADMIN_SCRAM_VERIFIER`, or give `POOLER_ADMIN_PASSWORD` and the pooler
    /// derives a verifier at start. Never serialised back out. Default: none.
    #[serde(skip_serializing)]
    pub scram_verifier: Option<Secret>,
    /// How long `PAUSE` waits for running transactions to finish before it reports
    /// those still running (the pause stays in force). Default 30 s.
    pub pause_timeout_ms: u64,
}

/// The Postgres cluster behind the pooler.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Upstream {
    /// Default `127.0.0.1`.
    pub host: String,
    /// Default 5432.
    pub port: u16,
    /// The one database all apps share; clients asking for another get 3D000.
    /// Default `talkide_dataplane`.
    pub dbname: String,
    /// The login that may only run `dataplane_auth.lookup`. Default `dp_pooler`.
    pub auth_user: String,
    /// Its password; set it through `POOLER_AUTH_PASSWORD`, not in the file.
    /// Never serialised back out.
    #[serde(skip_serializing)]
    pub auth_password: Option<Secret>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClientTls {
    /// `disable`, `allow` or `require`. Default `allow` (TLS when a certificate is
    /// configured, else `disable` behaviour).
    pub mode: TlsMode,
    /// PEM certificate chain. Default: none.
    pub cert_file: Option<PathBuf>,
    /// PEM private key. Default: none.
    pub key_file: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerTls {
    /// `disable`, `require` (encrypt, don't verify) or `verify-full`. Default `disable`.
    pub mode: TlsMode,
    /// PEM CA bundle for `verify-full`. Default: none.
    pub ca_file: Option<PathBuf>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([0, 0, 0, 0], 5432)),
            session_listen: None,
            admin_listen: SocketAddr::from(([0, 0, 0, 0], 9930)),
            admin_max_connections: 64,
            admin_header_timeout_ms: 5_000,
            max_client_conn: 10_000,
            max_server_connections: 40,
            default_pool_size: 5,
            query_wait_timeout_ms: 30_000,
            client_login_timeout_ms: 15_000,
            server_connect_timeout_ms: 5_000,
            server_idle_timeout_ms: 600_000,
            server_lifetime_ms: 3_600_000,
            server_check_delay_ms: 30_000,
            min_idle_before_evict_ms: 1_000,
            switch_quantum_ms: 500,
            auth_cache_ttl_ms: 60_000,
            auth_failures_per_role_per_address_per_minute: 20,
            auth_failures_per_address_per_minute: 50,
            auth_throttle_max_entries: 100_000,
            auth_cache_max_roles: 100_000,
            auth_negative_cache_ttl_ms: 5_000,
            auth_negative_cache_max: 10_000,
            auth_lookup_queue: 64,
            auth_notify_queue: 10_000,
            auth_pool_size: 2,
            advertise_addr: None,
            replica_heartbeat_ms: 1_000,
            replica_lease_ms: 5_000,
            cancel_forwards_per_address_per_minute: 600,
            auth_mock_secret: None,
            max_prepared_statements: 200,
            max_client_prepared_statements: 10_000,
            max_client_prepared_bytes: 8 << 20,
            max_message_bytes: 1 << 20,
            client_stall_timeout_ms: 10_000,
            idle_transaction_timeout_ms: 0,
            tcp_keepalive_idle_ms: 60_000,
            tcp_keepalive_interval_ms: 10_000,
            max_pinned_per_role: None,
            max_listener_servers: None,
            max_client_listen_channels: 100,
            max_client_notification_bytes: 1 << 20,
            log_level: "info".into(),
            worker_threads: 0,
            metrics_per_role: false,
            metrics_max_roles: 50,
            upstream: Upstream::default(),
            client_tls: ClientTls::default(),
            server_tls: ServerTls::default(),
            admin: Admin::default(),
        }
    }
}

impl Default for Admin {
    fn default() -> Self {
        Admin {
            user: None,
            scram_verifier: None,
            pause_timeout_ms: 30_000,
        }
    }
}

impl Default for Upstream {
    fn default() -> Self {
        Upstream {
            host: "127.0.0.1".into(),
            port: 5432,
            dbname: "talkide_dataplane".into(),
            auth_user: "dp_pooler".into(),
            auth_password: None,
        }
    }
}

impl Default for ClientTls {
    fn default() -> Self {
        ClientTls {
            mode: TlsMode::Allow,
            cert_file: None,
            key_file: None,
        }
    }
}

impl Default for ServerTls {
    fn default() -> Self {
        ServerTls {
            mode: TlsMode::Disable,
            ca_file: None,
        }
    }
}

/// The smallest `max_message_bytes`: every short message of the protocol
/// (`PQ_SMALL_MESSAGE_LIMIT`, libpq's 30000 for backend short messages) must fit.
pub const MIN_MESSAGE_BYTES: usize = 32 * 1024;

/// The smallest `max_client_notification_bytes`: a NotificationResponse with
/// Postgres' largest payload (8000 bytes) and channel, plus its bookkeeping, fits.
pub const MIN_NOTIFICATION_BYTES: usize = 16 * 1024;

mod validate;

pub use validate::parse_advertise_addr;

fn ms(v: u64) -> Duration {
    Duration::from_millis(v)
}

impl Config {
    /// How many roles may have a listener server at once.
    pub fn max_listener_servers(&self) -> usize {
        self.max_listener_servers
            .unwrap_or((self.max_server_connections / 4).max(1))
    }

    /// What this replica registers as its address for forwarded cancels: the
    /// configured one, else `listen` when it names one address.
    pub fn advertised(&self) -> Option<String> {
        match &self.advertise_addr {
            Some(a) => Some(a.clone()),
            None if !self.listen.ip().is_unspecified() => Some(self.listen.to_string()),
            None => None,
        }
    }

    pub fn replica_heartbeat(&self) -> Duration {
        ms(self.replica_heartbeat_ms)
    }
    pub fn replica_lease(&self) -> Duration {
        ms(self.replica_lease_ms)
    }

    /// The pin bound for a role with this pool size.
    pub fn max_pinned(&self, pool_size: usize) -> usize {
        self.max_pinned_per_role
            .unwrap_or_else(|| (pool_size / 2).max(1))
    }

    pub fn query_wait_timeout(&self) -> Duration {
        ms(self.query_wait_timeout_ms)
    }
    pub fn client_login_timeout(&self) -> Duration {
        ms(self.client_login_timeout_ms)
    }
    pub fn admin_header_timeout(&self) -> Duration {
        ms(self.admin_header_timeout_ms)
    }
    pub fn server_connect_timeout(&self) -> Duration {
        ms(self.server_connect_timeout_ms)
    }
    pub fn server_idle_timeout(&self) -> Duration {
        ms(self.server_idle_timeout_ms)
    }
    pub fn server_lifetime(&self) -> Duration {
        ms(self.server_lifetime_ms)
    }
    pub fn server_check_delay(&self) -> Duration {
        ms(self.server_check_delay_ms)
    }
    pub fn min_idle_before_evict(&self) -> Duration {
        ms(self.min_idle_before_evict_ms)
    }
    pub fn switch_quantum(&self) -> Duration {
        ms(self.switch_quantum_ms)
    }
    pub fn auth_cache_ttl(&self) -> Duration {
        ms(self.auth_cache_ttl_ms)
    }
    pub fn client_stall_timeout(&self) -> Duration {
        ms(self.client_stall_timeout_ms)
    }
    /// `None` when off.
    pub fn idle_transaction_timeout(&self) -> Option<Duration> {
        (self.idle_transaction_timeout_ms > 0).then(|| ms(self.idle_transaction_timeout_ms))
    }
    /// `None` when off.
    pub fn tcp_keepalive(&self) -> Option<(Duration, Duration)> {
        (self.tcp_keepalive_idle_ms > 0).then(|| {
            (
                ms(self.tcp_keepalive_idle_ms),
                ms(self.tcp_keepalive_interval_ms),
            )
        })
    }
    pub fn auth_negative_cache_ttl(&self) -> Duration {
        ms(self.auth_negative_cache_ttl_ms)
    }
}

impl Admin {
    pub fn pause_timeout(&self) -> Duration {
        ms(self.pause_timeout_ms)
    }

    /// The admin role and its parsed verifier, when the console is configured.
    pub fn credentials(&self) -> Option<(&str, crate::verifier::ScramSecret)> {
        let user = self.user.as_deref()?;
        let secret = crate::verifier::ScramSecret::parse(self.scram_verifier.as_ref()?.expose());
        Some((user, secret.ok()?))
    }
}

#[cfg(test)]
mod tests;
