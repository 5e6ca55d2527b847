//! Prometheus metrics, served as `/metrics` on the admin listener. Names and labels
//! are a contract with the dashboard and the alerts (`deploy/`).
//!
//! The relay's hot path only adds to atomics: per role in [`RoleCounts`], or
//! prometheus counters whose label values are resolved once here. Gauges and per-role
//! series are computed when scraped, from the pools' and roles' own books, so they
//! cannot drift and an idle pooler costs nothing. Per-role series are off by default
//! and, when on, bounded to the `metrics_max_roles` busiest roles (the rest summed as
//! `role="_other"`), so thousands of apps cannot blow up the scrape.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

use crate::pool::PoolStats;

mod scrape;

pub use scrape::AuthCounters;
use scrape::{AuthCollector, scrape_replicas};

/// One role's books at a scrape: what the per-role series and the idle-client gauge
/// are computed from.
#[derive(Debug, Clone)]
pub struct RoleSample {
    pub name: Arc<str>,
    /// Clients of the role connected now.
    pub clients: usize,
    /// Of those, pinned to a server by session state.
    pub pinned: usize,
    pub transactions: u64,
    pub queries: u64,
}

/// This replica's part in the replica registry at a scrape.
#[derive(Debug, Clone, Default)]
pub struct ReplicaSample {
    /// Its share of the cluster's budget, as computed from the registry's rows.
    pub share: u32,
    /// What its roles could use (the peak it last reported).
    pub demand: u32,
    /// Live replicas in its last view of the registry.
    pub replicas: usize,
    /// Since its last answered heartbeat; `None` before the first.
    pub heartbeat_age: Option<std::time::Duration>,
    pub heartbeats_ok: u64,
    pub heartbeats_failed: u64,
    /// Cancel forwards by result label.
    pub forwards: Vec<(&'static str, u64)>,
}

const PREFIX: &str = "dataplane_pooler";

#[derive(Debug, thiserror::Error)]
#[error("metrics: {0}")]
pub struct MetricsError(#[from] prometheus::Error);

/// Why a client login ended as it did (`auth_total{result}`).
#[derive(Debug, Clone, Copy)]
pub enum AuthResult {
    Ok,
    BadProof,
    UnknownRole,
    Disabled,
    Throttled,
    PassthroughMismatch,
    Error,
    /// Refused (53300) before authentication: too many lookups of unknown names wait.
    LookupBusy,
}

impl AuthResult {
    const ALL: [AuthResult; 8] = [
        AuthResult::Ok,
        AuthResult::BadProof,
        AuthResult::UnknownRole,
        AuthResult::Disabled,
        AuthResult::Throttled,
        AuthResult::PassthroughMismatch,
        AuthResult::Error,
        AuthResult::LookupBusy,
    ];

    fn label(self) -> &'static str {
        match self {
            AuthResult::Ok => "ok",
            AuthResult::BadProof => "bad_proof",
            AuthResult::UnknownRole => "unknown_role",
            AuthResult::Disabled => "disabled",
            AuthResult::Throttled => "throttled",
            AuthResult::PassthroughMismatch => "passthrough_mismatch",
            AuthResult::Error => "error",
            AuthResult::LookupBusy => "lookup_busy",
        }
    }
}

/// A bound the pooler enforced on one client (`limit_refusals_total{kind}`): each
/// is a config key or a protocol limit (README, "Limits and abuse").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// A message the pooler must hold whole over `max_message_bytes`, or a login
    /// message over PostgreSQL's own limits (or of a type not allowed there).
    MessageTooLong,
    /// A named statement past `max_client_prepared_statements`.
    PreparedStatements,
    /// A named statement past `max_client_prepared_bytes`.
    PreparedBytes,
    /// A linked client that made no progress for `client_stall_timeout_ms`.
    ClientStall,
    /// A client idle in a transaction past `idle_transaction_timeout_ms`.
    IdleTransaction,
    /// An admin HTTP connection closed for a newer one past `admin_max_connections`.
    AdminConnections,
    /// An admin HTTP connection that sent no whole request head within
    /// `admin_header_timeout_ms`.
    AdminHeaderTimeout,
}

impl Limit {
    const ALL: [Limit; 7] = [
        Limit::MessageTooLong,
        Limit::PreparedStatements,
        Limit::PreparedBytes,
        Limit::ClientStall,
        Limit::IdleTransaction,
        Limit::AdminConnections,
        Limit::AdminHeaderTimeout,
    ];

    fn label(self) -> &'static str {
        match self {
            Limit::MessageTooLong => "message_too_long",
            Limit::PreparedStatements => "prepared_statements",
            Limit::PreparedBytes => "prepared_bytes",
            Limit::ClientStall => "client_stall",
            Limit::IdleTransaction => "idle_transaction",
            Limit::AdminConnections => "admin_connections",
            Limit::AdminHeaderTimeout => "admin_header_timeout",
        }
    }
}

pub struct Metrics {
    registry: Registry,
    per_role: bool,
    max_roles: usize,
    pub checkout_wait: Histogram,
    pub transaction_duration: Histogram,
    pub transactions: IntCounter,
    pub queries: IntCounter,
    pub bytes_received: IntCounter,
    pub bytes_sent: IntCounter,
    auth: Vec<IntCounter>,
    /// Server logins refused because the verifier and `pg_authid` disagree.
    pub server_login_mismatches: IntCounter,
    /// Server logins refused because the server did not prove it holds the verifier.
    pub server_login_unverified: IntCounter,
    pub cancels: IntCounter,
    pub prepared_hits: IntCounter,
    pub prepared_misses: IntCounter,
    pub checkout_timeouts: IntCounter,
    errors: IntCounterVec,
    limits: Vec<IntCounter>,
    /// Notifications queued for clients by their role's listener (one per client).
    pub notifications_delivered: IntCounter,
    /// Notifications dropped because a session of another role (or of none the pooler
    /// could find) sent them.
    pub notifications_dropped: IntCounter,
    /// Clients disconnected because they did not read their notifications.
    pub notification_overflows: IntCounter,
    /// Listener servers lost (and logged in again while clients listen).
    pub listener_losses: IntCounter,
}

fn name(short: &str) -> String {
    format!("{PREFIX}_{short}")
}

impl Metrics {
    pub fn new(per_role: bool, max_roles: usize) -> Result<Self, MetricsError> {
        let registry = Registry::new();
        let histogram = |short: &str, help: &str| -> Result<Histogram, MetricsError> {
            // 50 µs to 30 s: a point select through a warm pool up to a long wait.
            let buckets = prometheus::exponential_buckets(0.00005, 2.5, 15)?;
            let h = Histogram::with_opts(HistogramOpts::new(name(short), help).buckets(buckets))?;
            registry.register(Box::new(h.clone()))?;
            Ok(h)
        };
        let counter = |short: &str, help: &str| -> Result<IntCounter, MetricsError> {
            let c = IntCounter::new(name(short), help)?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        };
        let checkout_wait = histogram(
            "checkout_wait_seconds",
            "Time a client waited for a server at the start of a transaction.",
        )?;
        let transaction_duration = histogram(
            "transaction_duration_seconds",
            "Time a client held a server in transaction mode (checkout to release).",
        )?;
        let transactions = counter("transactions_total", "Transactions relayed.")?;
        let queries = counter(
            "queries_total",
            "Requests relayed that ended with ReadyForQuery (simple queries and Syncs).",
        )?;
        let bytes_received = counter(
            "client_bytes_received_total",
            "Bytes read from clients and forwarded to servers.",
        )?;
        let bytes_sent = counter(
            "client_bytes_sent_total",
            "Bytes written to clients from servers.",
        )?;
        let auth_vec = IntCounterVec::new(
            Opts::new(name("auth_total"), "Client logins by result."),
            &["result"],
        )?;
        registry.register(Box::new(auth_vec.clone()))?;
        let auth = AuthResult::ALL
            .iter()
            .map(|r| auth_vec.with_label_values(&[r.label()]))
            .collect();
        let server_login_mismatches = counter(
            "server_login_mismatches_total",
            "Server logins refused because the credentials table's verifier differs from pg_authid.",
        )?;
        let server_login_unverified = counter(
            "server_login_unverified_total",
            "Server logins refused because the server let the pooler in without proving it holds the role's \
             verifier (no SASLFinal, a wrong signature, or no authentication at all).",
        )?;
        let cancels = counter("cancels_total", "Cancel requests forwarded to Postgres.")?;
        let prepared = IntCounterVec::new(
            Opts::new(
                name("prepared_statements_total"),
                "Named statements bound or described: hit (already on the server) or miss (prepared there first).",
            ),
            &["result"],
        )?;
        registry.register(Box::new(prepared.clone()))?;
        let checkout_timeouts = counter(
            "checkout_timeouts_total",
            "Clients refused with 53300 after query_wait_timeout.",
        )?;
        let errors = IntCounterVec::new(
            Opts::new(
                name("errors_total"),
                "Connections ended by an error the pooler reported, by SQLSTATE class name.",
            ),
            &["kind"],
        )?;
        registry.register(Box::new(errors.clone()))?;
        let limits_vec = IntCounterVec::new(
            Opts::new(
                name("limit_refusals_total"),
                "Clients refused or cut off by a per-client bound, by kind.",
            ),
            &["kind"],
        )?;
        registry.register(Box::new(limits_vec.clone()))?;
        let limits = Limit::ALL
            .iter()
            .map(|l| limits_vec.with_label_values(&[l.label()]))
            .collect();
        let notifications = IntCounterVec::new(
            Opts::new(
                name("notifications_total"),
                "LISTEN notifications: delivered (queued for a client, one per client), or \
                 dropped (sent by a session of another role).",
            ),
            &["result"],
        )?;
        registry.register(Box::new(notifications.clone()))?;
        let notification_overflows = counter(
            "notification_overflows_total",
            "Clients disconnected because they did not read their notifications \
             (max_client_notification_bytes).",
        )?;
        let listener_losses = counter(
            "listener_losses_total",
            "Listener servers lost; each was logged in again while its clients listened.",
        )?;
        #[cfg(target_os = "linux")]
        registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;
        Ok(Metrics {
            per_role,
            max_roles: max_roles.max(1),
            checkout_wait,
            transaction_duration,
            transactions,
            queries,
            bytes_received,
            bytes_sent,
            auth,
            server_login_mismatches,
            server_login_unverified,
            cancels,
            prepared_hits: prepared.with_label_values(&["hit"]),
            prepared_misses: prepared.with_label_values(&["miss"]),
            checkout_timeouts,
            errors,
            limits,
            notifications_delivered: notifications.with_label_values(&["delivered"]),
            notifications_dropped: notifications.with_label_values(&["dropped"]),
            notification_overflows,
            listener_losses,
            registry,
        })
    }

    pub fn auth(&self, result: AuthResult) {
        if let Some(c) = self.auth.get(result as usize) {
            c.inc();
        }
    }

    /// `n` clients refused or cut off by `limit`.
    pub fn limit(&self, limit: Limit, n: u64) {
        if let Some(c) = self.limits.get(limit as usize) {
            c.inc_by(n);
        }
    }

    /// Exports the verifier cache's own counters (lookups, NOTIFY hints) when scraped.
    pub fn watch_auth(&self, counters: Arc<AuthCounters>) -> Result<(), MetricsError> {
        let lookups = IntCounterVec::new(
            Opts::new(
                name("auth_lookups_total"),
                "Role names to authenticate that were not cached: queried (dataplane_auth.lookup ran), \
                 refused (the queue for unknown names was full), too_long (over 63 bytes: unknown, not queried).",
            ),
            &["result"],
        )?;
        let notifications = IntCounterVec::new(
            Opts::new(
                name("auth_notifications_total"),
                "NOTIFY dataplane_auth payloads: queued for a re-read, coalesced (already queued), \
                 ignored (no role this pooler knows), overflow (the queue was dropped and every role re-read).",
            ),
            &["outcome"],
        )?;
        self.registry.register(Box::new(AuthCollector {
            counters,
            lookups,
            notifications,
            scrape: std::sync::Mutex::new(()),
        }))?;
        Ok(())
    }

    /// A connection ended with an error the pooler sent (its SQLSTATE).
    pub fn error(&self, sqlstate: &str) {
        self.errors.with_label_values(&[error_kind(sqlstate)]).inc();
    }

    /// The Prometheus text exposition of everything.
    pub fn render(
        &self,
        pools: &PoolStats,
        roles: &[RoleSample],
        replicas: &ReplicaSample,
    ) -> Result<String, MetricsError> {
        let scrape = Registry::new();
        self.scrape_gauges(&scrape, pools, roles)?;
        scrape_replicas(&scrape, pools, replicas)?;
        let mut families = self.registry.gather();
        families.extend(scrape.gather());
        families.sort_by(|a, b| a.name().cmp(b.name()));
        let mut out = Vec::new();
        TextEncoder::new().encode(&families, &mut out)?;
        Ok(String::from_utf8_lossy(&out).into_owned())
    }

    fn scrape_gauges(
        &self,
        scrape: &Registry,
        pools: &PoolStats,
        all_roles: &[RoleSample],
    ) -> Result<(), MetricsError> {
        let role_label: &[&str] = if self.per_role {
            &["state", "role"]
        } else {
            &["state"]
        };
        let clients = IntGaugeVec::new(
            Opts::new(name("clients"), "Client connections by state."),
            role_label,
        )?;
        let servers = IntGaugeVec::new(
            Opts::new(name("servers"), "Server connections by state."),
            role_label,
        )?;
        let pinned = IntGaugeVec::new(
            Opts::new(
                name("pinned_clients"),
                "Clients pinned to their server by session state.",
            ),
            if self.per_role { &["role"] } else { &[] },
        )?;
        let shown = self.shown_roles(all_roles);
        let label = |role: &str| -> String {
            if shown.contains_key(role) {
                role.to_owned()
            } else {
                "_other".to_owned()
            }
        };
        let add = |vec: &IntGaugeVec, state: Option<&str>, role: &str, v: i64| {
            let role = label(role);
            let mut values: Vec<&str> = state.into_iter().collect();
            if self.per_role {
                values.push(&role);
            }
            vec.with_label_values(&values).add(v);
        };
        for state in ["active", "waiting", "idle"] {
            add(&clients, Some(state), "", 0);
        }
        for state in ["active", "idle", "connecting", "listener"] {
            add(&servers, Some(state), "", 0);
        }
        if !self.per_role {
            add(&pinned, None, "", 0);
        }
        let by_name: HashMap<&str, &RoleSample> = all_roles.iter().map(|r| (&*r.name, r)).collect();
        for p in &pools.roles {
            add(&servers, Some("active"), &p.role, i64::from(p.active));
            add(&servers, Some("idle"), &p.role, i64::from(p.idle));
            add(&servers, Some("connecting"), &p.role, i64::from(p.opening));
            add(&servers, Some("listener"), &p.role, i64::from(p.listener));
            add(&clients, Some("active"), &p.role, i64::from(p.active));
            add(&clients, Some("waiting"), &p.role, i64::from(p.waiting));
            if let Some(r) = by_name.get(&*p.role) {
                let busy = u64::from(p.active) + u64::from(p.waiting);
                let idle = (r.clients as u64).saturating_sub(busy);
                add(
                    &clients,
                    Some("idle"),
                    &p.role,
                    i64::try_from(idle).unwrap_or(i64::MAX),
                );
            }
        }
        for r in all_roles {
            if pools.role(&r.name).is_none() {
                let n = i64::try_from(r.clients).unwrap_or(i64::MAX);
                add(&clients, Some("idle"), &r.name, n);
            }
            let pins = i64::try_from(r.pinned).unwrap_or(i64::MAX);
            if pins > 0 || self.per_role {
                add(&pinned, None, &r.name, pins);
            }
        }
        scrape.register(Box::new(clients))?;
        scrape.register(Box::new(servers))?;
        scrape.register(Box::new(pinned))?;

        let gauge = |short: &str, help: &str, v: u32| -> Result<(), MetricsError> {
            let g = IntGauge::new(name(short), help)?;
            g.set(i64::from(v));
            scrape.register(Box::new(g))?;
            Ok(())
        };
        gauge(
            "budget_in_use",
            "Server connections open or opening, all roles.",
            pools.servers_in_use,
        )?;
        gauge(
            "budget_limit",
            "Server connections this replica may open now: its share of the cluster's \
             budget in force.",
            pools.max_server_connections,
        )?;
        let count = |short: &str, help: &str, v: u64| -> Result<(), MetricsError> {
            let c = IntCounter::new(name(short), help)?;
            c.inc_by(v);
            scrape.register(Box::new(c))?;
            Ok(())
        };
        count(
            "server_evictions_total",
            "Server connections closed to give their slot to another role.",
            pools.counters.evictions + pools.counters.switches,
        )?;
        let logins = IntCounterVec::new(
            Opts::new(name("server_logins_total"), "Logins to Postgres by result."),
            &["result"],
        )?;
        logins
            .with_label_values(&["ok"])
            .inc_by(pools.counters.opens);
        logins
            .with_label_values(&["error"])
            .inc_by(pools.counters.open_failures);
        scrape.register(Box::new(logins))?;
        if self.per_role {
            let per = |short: &str, help: &str, get: fn(&RoleSample) -> u64| {
                let v = IntCounterVec::new(Opts::new(name(short), help), &["role"])?;
                for r in all_roles {
                    v.with_label_values(&[&label(&r.name)]).inc_by(get(r));
                }
                scrape.register(Box::new(v))?;
                Ok::<(), MetricsError>(())
            };
            per(
                "role_transactions_total",
                "Transactions relayed, per role.",
                |r| r.transactions,
            )?;
            per("role_queries_total", "Requests relayed, per role.", |r| {
                r.queries
            })?;
        }
        Ok(())
    }

    /// The roles that get their own series: the busiest `max_roles` by transactions.
    fn shown_roles(&self, all: &[RoleSample]) -> HashMap<String, ()> {
        if !self.per_role {
            return HashMap::new();
        }
        let mut by_load: Vec<(u64, &str)> =
            all.iter().map(|r| (r.transactions, &*r.name)).collect();
        by_load.sort_unstable_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(b.1)));
        by_load
            .into_iter()
            .take(self.max_roles)
            .map(|(_, n)| (n.to_owned(), ()))
            .collect()
    }
}

/// Per-role counters the relay adds to at the end of each linked stretch.
#[derive(Debug, Default)]
pub struct RoleCounts {
    pub transactions: std::sync::atomic::AtomicU64,
    pub queries: std::sync::atomic::AtomicU64,
}

impl RoleCounts {
    pub fn add(&self, transactions: u64, queries: u64) {
        self.transactions.fetch_add(transactions, Ordering::Relaxed);
        self.queries.fetch_add(queries, Ordering::Relaxed);
    }
}

/// A bounded label for an error's SQLSTATE.
fn error_kind(sqlstate: &str) -> &'static str {
    match sqlstate {
        "08P01" => "protocol_violation",
        "28P01" => "invalid_password",
        "28000" => "invalid_authorization",
        "3D000" => "invalid_catalog_name",
        "53300" => "too_many_connections",
        "53400" => "configuration_limit_exceeded",
        "57P01" => "admin_shutdown",
        "57P03" => "cannot_connect_now",
        "0A000" => "feature_not_supported",
        "08006" => "connection_failure",
        "54000" => "program_limit_exceeded",
        "25P03" => "idle_in_transaction_timeout",
        _ => "other",
    }
}
