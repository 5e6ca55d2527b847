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
    /// Threads that run client sessions (tokio's worker threads); 0: one per CPU.
    /// Fewer threads cost less CPU per transaction (less cross-thread waking and
    /// stealing: on 2 vCPUs one worker used about 10% less), more reach more
    /// throughput when the pooler has cores to itself. Takes a restart. Default 0.
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

fn ms(v: u64) -> Duration {
    Duration::from_millis(v)
}

impl Config {
    /// Reads a TOML file (every key optional) and validates it.
    pub fn from_file(path: &std::path::Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_toml(&text).map_err(|e| match e {
            ConfigError::Parse { source, .. } => ConfigError::Parse {
                path: path.to_owned(),
                source,
            },
            other => other,
        })
    }

    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: PathBuf::from("<config>"),
            source: Box::new(e),
        })
    }

    /// Checks what serde cannot: ranges, and combinations that cannot work.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if self.max_server_connections == 0 {
            return bad("max_server_connections must be at least 1".into());
        }
        if self.default_pool_size == 0 {
            return bad("default_pool_size must be at least 1".into());
        }
        if self.max_client_conn == 0 {
            return bad("max_client_conn must be at least 1".into());
        }
        if self.auth_pool_size == 0 {
            return bad("auth_pool_size must be at least 1".into());
        }
        if self.worker_threads > MAX_WORKER_THREADS {
            return bad(format!(
                "worker_threads must be at most {MAX_WORKER_THREADS} (0: one per CPU)"
            ));
        }
        // 0 would refuse every named statement: drivers that name theirs (PgJDBC,
        // tokio-postgres, asyncpg) could not run a query.
        if self.max_prepared_statements == 0 || self.max_client_prepared_statements == 0 {
            return bad(
                "max_prepared_statements and max_client_prepared_statements must be at least 1"
                    .into(),
            );
        }
        if self.max_message_bytes < MIN_MESSAGE_BYTES {
            return bad(format!(
                "max_message_bytes must be at least {MIN_MESSAGE_BYTES} (the protocol's short messages)"
            ));
        }
        if self.max_client_prepared_bytes < self.max_message_bytes {
            return bad(
                "max_client_prepared_bytes must be at least max_message_bytes: a named \
                 statement of the largest message could never be held"
                    .into(),
            );
        }
        if self.tcp_keepalive_idle_ms > 0 && self.tcp_keepalive_interval_ms == 0 {
            return bad("tcp_keepalive_interval_ms must be greater than 0".into());
        }
        if self.max_listener_servers == Some(0) || self.max_client_listen_channels == 0 {
            return bad(
                "max_listener_servers and max_client_listen_channels must be at least 1".into(),
            );
        }
        if self.max_client_notification_bytes < MIN_NOTIFICATION_BYTES {
            return bad(format!(
                "max_client_notification_bytes must be at least {MIN_NOTIFICATION_BYTES}, so that one \
                 notification of the largest size fits"
            ));
        }
        for (name, v) in [
            (
                "auth_failures_per_role_per_address_per_minute",
                self.auth_failures_per_role_per_address_per_minute as usize,
            ),
            (
                "auth_failures_per_address_per_minute",
                self.auth_failures_per_address_per_minute as usize,
            ),
            ("auth_throttle_max_entries", self.auth_throttle_max_entries),
            ("auth_cache_max_roles", self.auth_cache_max_roles),
            ("auth_negative_cache_max", self.auth_negative_cache_max),
            ("auth_lookup_queue", self.auth_lookup_queue),
            ("auth_notify_queue", self.auth_notify_queue),
            ("admin_max_connections", self.admin_max_connections),
        ] {
            if v == 0 {
                return bad(format!("{name} must be at least 1"));
            }
        }
        if self.upstream.dbname.is_empty() || self.upstream.auth_user.is_empty() {
            return bad("upstream.dbname and upstream.auth_user must be set".into());
        }
        for (name, v) in [
            ("query_wait_timeout_ms", self.query_wait_timeout_ms),
            ("client_login_timeout_ms", self.client_login_timeout_ms),
            ("server_connect_timeout_ms", self.server_connect_timeout_ms),
            ("switch_quantum_ms", self.switch_quantum_ms),
            ("client_stall_timeout_ms", self.client_stall_timeout_ms),
            ("admin.pause_timeout_ms", self.admin.pause_timeout_ms),
            ("admin_header_timeout_ms", self.admin_header_timeout_ms),
        ] {
            if v == 0 {
                return bad(format!("{name} must be greater than 0"));
            }
        }
        let c = &self.client_tls;
        match c.mode {
            TlsMode::VerifyFull => {
                return bad(
                    "client_tls.mode cannot be verify-full (that is a server-side mode)".into(),
                );
            }
            TlsMode::Require if c.cert_file.is_none() || c.key_file.is_none() => {
                return bad(
                    "client_tls.mode = require needs client_tls.cert_file and client_tls.key_file"
                        .into(),
                );
            }
            _ => {}
        }
        if c.cert_file.is_some() != c.key_file.is_some() {
            return bad("client_tls.cert_file and client_tls.key_file go together".into());
        }
        let s = &self.server_tls;
        match s.mode {
            TlsMode::Allow => {
                return bad("server_tls.mode is disable, require or verify-full".into());
            }
            TlsMode::VerifyFull if s.ca_file.is_none() => {
                return bad("server_tls.mode = verify-full needs server_tls.ca_file".into());
            }
            _ => {}
        }
        if self.replica_heartbeat_ms == 0
            || self.replica_lease_ms < 3 * self.replica_heartbeat_ms
            || !(1_000..=600_000).contains(&self.replica_lease_ms)
        {
            return bad(
                "replica_heartbeat_ms must be at least 1 and replica_lease_ms at least three \
                 heartbeats, between 1000 and 600000"
                    .into(),
            );
        }
        if let Some(addr) = &self.advertise_addr {
            if let Err(e) = parse_advertise_addr(addr) {
                return bad(format!("advertise_addr {addr:?}: {e}"));
            }
        }
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log_level) {
            return bad(format!("log_level {:?}: {e}", self.log_level));
        }
        self.admin.validate()
    }

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

/// `host:port` as the registry stores it (sql/0002 checks the same shape): a host of
/// letters, digits, dots, dashes, colons and brackets (an IPv6 literal is bracketed),
/// and a port.
pub fn parse_advertise_addr(s: &str) -> Result<(&str, u16), &'static str> {
    let (host, port) = s.rsplit_once(':').ok_or("expected host:port")?;
    let port: u16 = port.parse().map_err(|_| "the port is not a number")?;
    let ok = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '[' | ']');
    if host.is_empty() || s.len() > 261 || !host.chars().all(ok) || port == 0 {
        return Err("expected host:port with a host name or IP address");
    }
    Ok((host.trim_start_matches('[').trim_end_matches(']'), port))
}

impl Admin {
    fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: &str| Err(ConfigError::Invalid(m.into()));
        match (&self.user, &self.scram_verifier) {
            (None, None) => Ok(()),
            (Some(user), _) if user.is_empty() => bad("admin.user must not be empty"),
            (Some(_), None) => bad(
                "admin.user needs its verifier: set POOLER_ADMIN_SCRAM_VERIFIER (or \
                 POOLER_ADMIN_PASSWORD, from which the pooler derives one)",
            ),
            (None, Some(_)) => bad("an admin verifier is set but admin.user is not"),
            (Some(_), Some(v)) => match crate::verifier::ScramSecret::parse(v.expose()) {
                Ok(_) => Ok(()),
                // The error names what is malformed, never the verifier itself.
                Err(e) => Err(ConfigError::Invalid(format!("the admin verifier: {e}"))),
            },
        }
    }

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
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_a_file_overrides_them() {
        Config::default().validate().unwrap();
        let c = Config::from_toml(
            "listen = '127.0.0.1:6432'\nmax_server_connections = 10\n[upstream]\nport = 5433\n",
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.listen.port(), 6432);
        assert_eq!(c.max_server_connections, 10);
        assert_eq!(c.upstream.port, 5433);
        assert_eq!(c.upstream.dbname, "talkide_dataplane");
        assert_eq!(c.default_pool_size, 5);
    }

    #[test]
    fn rejects_what_cannot_work() {
        assert!(
            Config::from_toml("max_server_conections = 3").is_err(),
            "typos are errors"
        );
        let mut c = Config::default();
        c.client_tls.mode = TlsMode::Require;
        assert!(c.validate().is_err());
        let mut c = Config::default();
        c.server_tls.mode = TlsMode::VerifyFull;
        assert!(c.validate().is_err());
        let c = Config {
            max_server_connections: 0,
            ..Config::default()
        };
        assert!(c.validate().is_err());
        let c = Config {
            max_client_prepared_statements: 0,
            ..Config::default()
        };
        assert!(c.validate().is_err());
        let c = Config {
            worker_threads: MAX_WORKER_THREADS + 1,
            ..Config::default()
        };
        assert!(c.validate().is_err());
        for c in [
            Config {
                max_listener_servers: Some(0),
                ..Config::default()
            },
            Config {
                max_client_listen_channels: 0,
                ..Config::default()
            },
            Config {
                max_client_notification_bytes: 1000,
                ..Config::default()
            },
        ] {
            assert!(c.validate().is_err());
        }
        assert_eq!(Config::default().max_listener_servers(), 10);
    }

    #[test]
    fn the_advertised_address_is_checked_and_defaults_to_a_specific_listen() {
        assert_eq!(Config::default().advertised(), None, "0.0.0.0 names no one");
        let c = Config {
            listen: "10.1.2.3:6432".parse().unwrap(),
            ..Config::default()
        };
        assert_eq!(c.advertised().as_deref(), Some("10.1.2.3:6432"));
        assert_eq!(
            parse_advertise_addr("pod-1.pooler:5432"),
            Ok(("pod-1.pooler", 5432))
        );
        assert_eq!(
            parse_advertise_addr("[fd00::1]:5432"),
            Ok(("fd00::1", 5432))
        );
        for bad in ["", "host", "host:0", "host:x", ":5432", "a b:1", "h';--:1"] {
            let c = Config {
                advertise_addr: Some(bad.into()),
                ..Config::default()
            };
            assert!(c.validate().is_err(), "{bad:?}");
        }
        let c = Config {
            replica_lease_ms: 2_000,
            ..Config::default()
        };
        assert!(
            c.validate().is_err(),
            "a lease shorter than three heartbeats"
        );
    }

    #[test]
    fn the_auth_password_is_never_written_back() {
        let mut c = Config::default();
        c.upstream.auth_password = Some(Secret::new("hunter2hunter2"));
        let text = toml::to_string(&c).unwrap();
        assert!(!text.contains("hunter2"));
        assert!(!format!("{c:?}").contains("hunter2"));
    }

    #[test]
    fn the_old_name_of_the_per_role_throttle_is_still_read() {
        let c = Config::from_toml("auth_failures_per_role_per_minute = 7").unwrap();
        assert_eq!(c.auth_failures_per_role_per_address_per_minute, 7);
    }
}
