//! What a configuration asks of the process and of the pools: open files, and the
//! pool settings derived from the configuration. Start-up and reload both use them.

use crate::config::Config;
use crate::pool::PoolConfig;

#[derive(Debug, thiserror::Error)]
pub enum OpenFilesError {
    #[error("reading or raising the open-files limit: {0}")]
    Limit(std::io::Error),
    #[error(
        "max_client_conn = {clients} and max_server_connections = {servers} need about {need} open \
         files, but the limit is {soft} (hard limit {hard}); raise the hard limit (ulimit -Hn, \
         LimitNOFILE, or the container runtime's nofile) or lower max_client_conn"
    )]
    TooFew {
        clients: usize,
        servers: usize,
        need: u64,
        soft: u64,
        hard: u64,
    },
}

/// Raises the soft open-files limit to the hard limit and checks that `config` fits.
pub fn raise_open_files(config: &Config) -> Result<(), OpenFilesError> {
    use rlimit::Resource;
    let (soft, hard) = Resource::NOFILE.get().map_err(OpenFilesError::Limit)?;
    let raised = if soft < hard {
        rlimit::increase_nofile_limit(hard).map_err(OpenFilesError::Limit)?
    } else {
        soft
    };
    if raised != soft {
        tracing::info!(
            from = soft,
            to = raised,
            "raised the open-files soft limit to the hard limit"
        );
    }
    check_open_files(config, raised, hard)
}

/// One descriptor per client and per server, plus listeners, the auth lookup
/// connections, the LISTEN connection and some slack.
pub(crate) fn open_files_needed(config: &Config) -> u64 {
    (config.max_client_conn + config.max_server_connections + config.auth_pool_size) as u64 + 64
}

/// Whether `config`'s limits fit under the soft limit `raised`.
pub(crate) fn check_open_files(
    config: &Config,
    raised: u64,
    hard: u64,
) -> Result<(), OpenFilesError> {
    let need = open_files_needed(config);
    if raised < need {
        return Err(OpenFilesError::TooFew {
            clients: config.max_client_conn,
            servers: config.max_server_connections,
            need,
            soft: raised,
            hard,
        });
    }
    Ok(())
}

/// The pool's settings, from the configuration's.
pub(crate) fn pool_config(c: &Config) -> PoolConfig {
    PoolConfig {
        max_server_connections: u32::try_from(c.max_server_connections).unwrap_or(u32::MAX),
        min_idle_before_evict: c.min_idle_before_evict(),
        switch_quantum: c.switch_quantum(),
        server_idle_timeout: c.server_idle_timeout(),
        server_lifetime: c.server_lifetime(),
        connect_timeout: c.server_connect_timeout(),
        ..PoolConfig::default()
    }
}
