//! Reload (`SIGHUP`, the console's `RELOAD`, `POST /v1/reload`): re-read the
//! configuration as at start, validate it whole, and apply what can change without
//! dropping a client. Keys that cannot (listeners, the upstream, server TLS, the auth
//! lookup's connections) keep their old values and are reported as needing a restart.
//! Nothing is applied unless everything that can fail has succeeded.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::config::{Config, ConfigError, TlsMode};
use crate::limits::{OpenFilesError, check_open_files, open_files_needed, pool_config};
use crate::net::tls;
use crate::pool::RoleLimits;
use crate::shared::Shared;

#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("this pooler was started without a configuration source to re-read")]
    NoSource,
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("client TLS: {0}")]
    Tls(#[from] tls::TlsError),
    #[error("log_level: {0}")]
    LogLevel(String),
    #[error(transparent)]
    OpenFiles(#[from] OpenFilesError),
}

/// What a reload changed.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ReloadReport {
    /// Keys whose new values are in force now.
    pub applied: Vec<String>,
    /// Keys that changed but take a restart; their old values stay in force.
    pub needs_restart: Vec<String>,
}

/// Keys a running pooler cannot change (a key, or a table and everything in it).
pub const RESTART_KEYS: &[&str] = &[
    "listen",
    "session_listen",
    "admin_listen",
    "admin_max_connections",
    "admin_header_timeout_ms",
    "server_connect_timeout_ms",
    "tcp_keepalive_idle_ms",
    "tcp_keepalive_interval_ms",
    "auth_cache_ttl_ms",
    "auth_failures_per_role_per_address_per_minute",
    "auth_failures_per_address_per_minute",
    "auth_throttle_max_entries",
    "auth_cache_max_roles",
    "auth_negative_cache_ttl_ms",
    "auth_negative_cache_max",
    "auth_lookup_queue",
    "auth_notify_queue",
    "cancel_forwards_per_address_per_minute",
    "auth_pool_size",
    "auth_mock_secret",
    "upstream",
    "server_tls",
    "metrics_per_role",
    "metrics_max_roles",
    "worker_threads",
];

/// Whether `key` (dotted, as `SHOW CONFIG` names it) takes a restart to change.
pub fn needs_restart(key: &str) -> bool {
    RESTART_KEYS.iter().any(|k| {
        key == *k
            || key
                .strip_prefix(k)
                .is_some_and(|rest| rest.starts_with('.'))
    })
}

/// `new` with every [`RESTART_KEYS`] value put back to `old`'s.
fn keep_restart_only(old: &Config, mut new: Config) -> Config {
    new.listen = old.listen;
    new.session_listen = old.session_listen;
    new.admin_listen = old.admin_listen;
    new.admin_max_connections = old.admin_max_connections;
    new.admin_header_timeout_ms = old.admin_header_timeout_ms;
    new.server_connect_timeout_ms = old.server_connect_timeout_ms;
    new.tcp_keepalive_idle_ms = old.tcp_keepalive_idle_ms;
    new.tcp_keepalive_interval_ms = old.tcp_keepalive_interval_ms;
    new.auth_cache_ttl_ms = old.auth_cache_ttl_ms;
    new.auth_failures_per_role_per_address_per_minute =
        old.auth_failures_per_role_per_address_per_minute;
    new.auth_failures_per_address_per_minute = old.auth_failures_per_address_per_minute;
    new.auth_throttle_max_entries = old.auth_throttle_max_entries;
    new.auth_cache_max_roles = old.auth_cache_max_roles;
    new.auth_negative_cache_ttl_ms = old.auth_negative_cache_ttl_ms;
    new.auth_negative_cache_max = old.auth_negative_cache_max;
    new.auth_lookup_queue = old.auth_lookup_queue;
    new.auth_notify_queue = old.auth_notify_queue;
    new.cancel_forwards_per_address_per_minute = old.cancel_forwards_per_address_per_minute;
    new.auth_pool_size = old.auth_pool_size;
    new.auth_mock_secret = old.auth_mock_secret.clone();
    new.upstream = old.upstream.clone();
    new.server_tls = old.server_tls.clone();
    new.metrics_per_role = old.metrics_per_role;
    new.metrics_max_roles = old.metrics_max_roles;
    new.worker_threads = old.worker_threads;
    new
}

/// Every key of the configuration with its value as text, secrets left out (they are
/// never serialised).
pub fn flatten(config: &Config) -> BTreeMap<String, String> {
    fn walk(prefix: &str, value: &toml::Value, out: &mut BTreeMap<String, String>) {
        match value {
            toml::Value::Table(t) => {
                for (k, v) in t {
                    let key = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    walk(&key, v, out);
                }
            }
            toml::Value::String(s) => {
                out.insert(prefix.to_owned(), s.clone());
            }
            other => {
                out.insert(prefix.to_owned(), other.to_string());
            }
        }
    }
    let mut out = BTreeMap::new();
    // Serialising plain data into a TOML value cannot fail; an empty map if it ever did.
    if let Ok(value) = toml::Value::try_from(config) {
        walk("", &value, &mut out);
    }
    // Optional keys that are unset still exist; show them empty.
    for key in [
        "session_listen",
        "max_pinned_per_role",
        "admin.user",
        "advertise_addr",
    ] {
        out.entry(key.to_owned()).or_default();
    }
    out
}

/// The keys whose values differ, secrets included (by name only).
fn changed_keys(a: &Config, b: &Config) -> Vec<String> {
    let (fa, fb) = (flatten(a), flatten(b));
    let mut keys: Vec<String> = fa
        .keys()
        .chain(fb.keys())
        .filter(|k| fa.get(*k) != fb.get(*k))
        .cloned()
        .collect();
    for (key, differs) in [
        (
            "upstream.auth_password",
            a.upstream.auth_password != b.upstream.auth_password,
        ),
        ("auth_mock_secret", a.auth_mock_secret != b.auth_mock_secret),
        (
            "admin.scram_verifier",
            a.admin.scram_verifier != b.admin.scram_verifier,
        ),
    ] {
        if differs {
            keys.push(key.to_owned());
        }
    }
    keys.sort();
    keys.dedup();
    keys
}

/// The acceptor for client TLS, from the configured files (read anew, so renewed
/// certificates are picked up by a reload).
pub(crate) fn client_acceptor(
    config: &Config,
) -> Result<Option<tokio_rustls::TlsAcceptor>, tls::TlsError> {
    let c = &config.client_tls;
    match (&c.cert_file, &c.key_file, c.mode) {
        (_, _, TlsMode::Disable) => Ok(None),
        (Some(cert), Some(key), _) => Ok(Some(tokio_rustls::TlsAcceptor::from(
            tls::server_config(cert, key)?,
        ))),
        _ => Ok(None),
    }
}

/// Re-reads the configuration and applies it. On error nothing changed.
pub async fn reload(shared: &Shared) -> Result<ReloadReport, ReloadError> {
    let result = apply(shared).await;
    match &result {
        Ok(report) if !report.needs_restart.is_empty() => tracing::warn!(
            applied = ?report.applied,
            needs_restart = ?report.needs_restart,
            "configuration reloaded; some changes take a restart and were not applied"
        ),
        Ok(report) => tracing::info!(applied = ?report.applied, "configuration reloaded"),
        Err(e) => {
            tracing::error!(error = %e, "reload refused; the configuration in force is unchanged")
        }
    }
    result
}

async fn apply(shared: &Shared) -> Result<ReloadReport, ReloadError> {
    let _one_at_a_time = shared.reloading.lock().await;
    let load = shared
        .hooks
        .load_config
        .as_ref()
        .ok_or(ReloadError::NoSource)?;
    let new = load()?;
    new.validate()?;
    let old = shared.config.load_full();
    let effective = keep_restart_only(&old, new.clone());
    let report = ReloadReport {
        applied: changed_keys(&old, &effective),
        needs_restart: changed_keys(&new, &effective),
    };

    // What can fail, first.
    let acceptor = client_acceptor(&effective)?;
    if open_files_needed(&effective) > open_files_needed(&old) {
        // Raised client or server limits must still fit the descriptors the process has.
        let (soft, hard) = rlimit::Resource::NOFILE
            .get()
            .map_err(OpenFilesError::Limit)?;
        check_open_files(&effective, soft, hard)?;
    }
    if effective.log_level != old.log_level {
        if let Some(set) = &shared.hooks.set_log_filter {
            set(&effective.log_level).map_err(ReloadError::LogLevel)?;
        }
    }

    shared.client_tls.store(acceptor.map(Arc::new));
    let effective = Arc::new(effective);
    shared.config.store(effective.clone());
    let pool = pool_config(&effective);
    if pool != pool_config(&old) {
        shared.pools.set_config(pool);
    }
    if effective.default_pool_size != old.default_pool_size {
        // Roles whose row names no pool size follow the default now, not at their next
        // checkout: a lowered size closes their surplus idle servers at once.
        let limits = RoleLimits {
            pool_size: u32::try_from(effective.default_pool_size).unwrap_or(u32::MAX),
            weight: 1,
        };
        for role in shared.pools.stats().roles {
            if shared
                .cache
                .peek(&role.role)
                .is_some_and(|auth| auth.pool_size.is_none())
            {
                shared.pools.set_role_limits(&role.role, limits);
            }
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Secret;

    /// A configuration in which every key a restart guards differs from the default.
    fn all_restart_keys_changed() -> Config {
        let mut c = Config {
            listen: "127.0.0.1:1".parse().unwrap(),
            session_listen: Some("127.0.0.1:2".parse().unwrap()),
            admin_listen: "127.0.0.1:3".parse().unwrap(),
            admin_max_connections: 1,
            admin_header_timeout_ms: 1,
            server_connect_timeout_ms: 1,
            tcp_keepalive_idle_ms: 1,
            tcp_keepalive_interval_ms: 1,
            auth_cache_ttl_ms: 1,
            auth_failures_per_role_per_address_per_minute: 1,
            auth_failures_per_address_per_minute: 1,
            auth_throttle_max_entries: 1,
            auth_cache_max_roles: 1,
            auth_negative_cache_ttl_ms: 1,
            auth_negative_cache_max: 1,
            auth_lookup_queue: 1,
            auth_notify_queue: 1,
            cancel_forwards_per_address_per_minute: 1,
            auth_pool_size: 9,
            auth_mock_secret: Some(Secret::new("x")),
            ..Config::default()
        };
        c.upstream.host = "elsewhere".into();
        c.upstream.auth_password = Some(Secret::new("pw"));
        c.server_tls.mode = TlsMode::Require;
        c.metrics_per_role = true;
        c.metrics_max_roles = 7;
        c.worker_threads = 3;
        c
    }

    #[test]
    fn restart_keys_keep_their_old_values_and_the_rest_applies() {
        let old = Config::default();
        let mut new = all_restart_keys_changed();
        new.default_pool_size = 2;
        new.client_tls.mode = TlsMode::Disable;
        new.admin.pause_timeout_ms = 5;
        let effective = keep_restart_only(&old, new.clone());
        let applied = changed_keys(&old, &effective);
        let restart = changed_keys(&new, &effective);
        assert_eq!(
            applied,
            [
                "admin.pause_timeout_ms",
                "client_tls.mode",
                "default_pool_size"
            ]
        );
        assert!(applied.iter().all(|k| !needs_restart(k)), "{applied:?}");
        assert!(restart.iter().all(|k| needs_restart(k)), "{restart:?}");
        // Every guarded key is covered by what keep_restart_only restores.
        let guarded = changed_keys(&old, &all_restart_keys_changed());
        assert_eq!(guarded, restart);
        for key in RESTART_KEYS {
            assert!(
                restart
                    .iter()
                    .any(|k| k == key || k.starts_with(&format!("{key}."))),
                "{key} is never restored"
            );
        }
    }

    #[test]
    fn flatten_names_every_key_and_hides_secrets() {
        let mut c = Config::default();
        c.upstream.auth_password = Some(Secret::new("hunter2hunter2"));
        let flat = flatten(&c);
        assert_eq!(flat["upstream.port"], "5432");
        assert_eq!(flat["client_tls.mode"], "allow");
        assert_eq!(flat["admin.user"], "");
        assert!(flat.values().all(|v| !v.contains("hunter2")));
        assert!(!flat.contains_key("upstream.auth_password"));
    }
}
