//! Loading the configuration and checking what serde cannot: ranges, and combinations
//! that cannot work.

use std::path::PathBuf;

use super::*;

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
}
