//! Provisioning operations: [`plan`] turns a request into statements (pure), and
//! [`execute`] runs them in one transaction under the global lock.

pub mod execute;
pub mod plan;
mod tx;

use serde::{Deserialize, Serialize};

pub use execute::{EnsureOutcome, Provisioner, RotateOutcome};
pub use tx::{OpContext, PROVISION_LOCK};

/// How the pooler serves an app's clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PoolMode {
    /// A server per transaction: the default, and what makes a small budget go far.
    Transaction,
    /// A server per client connection, for pg_dump, LISTEN and session advisory locks.
    Session,
}

impl PoolMode {
    pub fn as_str(self) -> &'static str {
        match self {
            PoolMode::Transaction => "transaction",
            PoolMode::Session => "session",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "transaction" => Some(PoolMode::Transaction),
            "session" => Some(PoolMode::Session),
            _ => None,
        }
    }
}

/// Limits Postgres enforces on the role itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct RoleLimits {
    /// `CONNECTION LIMIT` of the role (-1: none). The pooler's servers count against it.
    pub connection_limit: i32,
    /// `statement_timeout` of the role, in ms (0: none).
    pub statement_timeout_ms: i32,
    /// `idle_in_transaction_session_timeout` of the role, in ms (0: none).
    pub idle_in_transaction_session_timeout_ms: i32,
    /// `lock_timeout` of the role, in ms (0: none).
    pub lock_timeout_ms: i32,
}

/// Limits the pooler reads from the credentials row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct PoolLimits {
    /// Server connections per pooler replica; `None`: the pooler's default_pool_size.
    pub pool_size: Option<i32>,
    pub pool_mode: PoolMode,
    /// Client connections per pooler replica; `None`: the pooler's default.
    pub max_client_conn: Option<i32>,
}

/// Every limit of an app.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Limits {
    #[serde(flatten)]
    pub role: RoleLimits,
    #[serde(flatten)]
    pub pool: PoolLimits,
}

impl Default for Limits {
    /// The defaults a new app gets when the request names none.
    fn default() -> Self {
        Limits {
            role: RoleLimits {
                connection_limit: 20,
                statement_timeout_ms: 30_000,
                idle_in_transaction_session_timeout_ms: 60_000,
                lock_timeout_ms: 10_000,
            },
            pool: PoolLimits {
                pool_size: None,
                pool_mode: PoolMode::Transaction,
                max_client_conn: None,
            },
        }
    }
}

/// A request to change some limits; absent fields keep their value.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsPatch {
    pub connection_limit: Option<i32>,
    pub statement_timeout_ms: Option<i32>,
    pub idle_in_transaction_session_timeout_ms: Option<i32>,
    pub lock_timeout_ms: Option<i32>,
    pub pool_size: Option<i32>,
    pub pool_mode: Option<PoolMode>,
    pub max_client_conn: Option<i32>,
}

impl LimitsPatch {
    pub fn is_empty(&self) -> bool {
        self == &LimitsPatch::default()
    }

    /// `base` with this patch applied, or why a value is out of range.
    pub fn apply(&self, base: &Limits) -> Result<Limits, String> {
        fn check(field: &str, v: Option<i32>, lo: i32, hi: i32) -> Result<Option<i32>, String> {
            match v {
                Some(x) if !(lo..=hi).contains(&x) => {
                    Err(format!("{field} must be between {lo} and {hi}, got {x}"))
                }
                _ => Ok(v),
            }
        }
        const DAY_MS: i32 = 86_400_000;
        let mut out = *base;
        if let Some(v) = check("connection_limit", self.connection_limit, -1, 100_000)? {
            out.role.connection_limit = v;
        }
        if let Some(v) = check("statement_timeout_ms", self.statement_timeout_ms, 0, DAY_MS)? {
            out.role.statement_timeout_ms = v;
        }
        if let Some(v) = check(
            "idle_in_transaction_session_timeout_ms",
            self.idle_in_transaction_session_timeout_ms,
            0,
            DAY_MS,
        )? {
            out.role.idle_in_transaction_session_timeout_ms = v;
        }
        if let Some(v) = check("lock_timeout_ms", self.lock_timeout_ms, 0, DAY_MS)? {
            out.role.lock_timeout_ms = v;
        }
        if let Some(v) = check("pool_size", self.pool_size, 1, 10_000)? {
            out.pool.pool_size = Some(v);
        }
        if let Some(v) = self.pool_mode {
            out.pool.pool_mode = v;
        }
        if let Some(v) = check("max_client_conn", self.max_client_conn, 1, 1_000_000)? {
            out.pool.max_client_conn = Some(v);
        }
        Ok(out)
    }
}

/// An app as the credentials table and the catalogs describe it. Never holds a
/// password or verifier.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AppRecord {
    pub role: String,
    pub schema: String,
    pub database: String,
    pub tenant_id: u64,
    pub slug: String,
    pub env: String,
    pub disabled: bool,
    /// Bumped on every password rotation; the pooler ties cached keys to it.
    pub generation: i64,
    pub limits: Limits,
    pub created_at: String,
    pub updated_at: String,
    pub rotated_at: Option<String>,
}

/// Why an operation failed. [`ProvisionError::kind`] is what callers branch on.
#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    #[error("no such app: {0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("invalid limits: {0}")]
    InvalidLimits(String),
    #[error("the database is unavailable: {0}")]
    Unavailable(String),
    /// A conflict with a concurrent transaction that a retry resolves (serialization
    /// failure, deadlock, "tuple concurrently updated" on a shared catalog row).
    #[error("concurrent update, retry: {0}")]
    Transient(String),
    #[error("database error: {}", describe(.0))]
    Database(#[source] tokio_postgres::Error),
    #[error(transparent)]
    Secret(#[from] crate::secret::SecretError),
}

impl From<tokio_postgres::Error> for ProvisionError {
    fn from(e: tokio_postgres::Error) -> Self {
        if e.code().is_some_and(|c| c.code() == "2BP01") {
            // DROP ROLE: objects in another database still depend on the role.
            return ProvisionError::Conflict(format!(
                "the role still owns objects or privileges elsewhere in the cluster: {}",
                describe(&e)
            ));
        }
        let concurrent = e
            .code()
            .is_some_and(|c| matches!(c.code(), "40001" | "40P01"))
            || (e.code().is_some_and(|c| c.code() == "XX000")
                && describe(&e).contains("concurrently updated"));
        if concurrent {
            return ProvisionError::Transient(describe(&e));
        }
        if is_unavailable(&e) {
            ProvisionError::Unavailable(describe(&e))
        } else {
            ProvisionError::Database(e)
        }
    }
}

impl From<deadpool_postgres::PoolError> for ProvisionError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        match e {
            deadpool_postgres::PoolError::Backend(e) => e.into(),
            other => ProvisionError::Unavailable(other.to_string()),
        }
    }
}

/// tokio-postgres displays a server error as just "db error"; the server's own
/// message and detail are what an operator needs.
fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => match db.detail() {
            Some(detail) => format!("{}: {} ({detail})", db.code().code(), db.message()),
            None => format!("{}: {}", db.code().code(), db.message()),
        },
        None => e.to_string(),
    }
}

/// Errors that mean "the database is not there right now" rather than "this request
/// is wrong": a lost connection, or a server refusing or shutting down.
fn is_unavailable(e: &tokio_postgres::Error) -> bool {
    match e.code() {
        None => {
            let io = std::error::Error::source(e).is_some_and(|s| s.is::<std::io::Error>());
            e.is_closed() || io || e.to_string().contains("timeout")
        }
        Some(code) => {
            let c = code.code();
            // 08: connection exception; 53: insufficient resources; 57P0x: shutdown;
            // and our own lock and statement timeouts.
            c.starts_with("08")
                || c.starts_with("53")
                || c.starts_with("57P")
                || matches!(c, "55P03" | "57014")
        }
    }
}
