//! Getting a server for a client's next transaction, and giving it back.

use super::client::Session;
use super::upkeep::{check, reset, stale};
use crate::auth::cache::{PoolMode, RoleAuth};
use crate::backend::ServerConn;
use crate::pool::{Checkout, PoolError, RoleLimits};
use crate::proto::SqlState;
use crate::shared::{RoleShared, Shared};

/// Returns an idle server its client is done with. A whole session's state (SET,
/// LISTEN, prepared statements, advisory locks) goes with its client: a session-mode
/// or pinned client's server is reset first, and one that ran `LOAD` is closed.
pub(super) async fn give_back(s: &mut Session, mut server: Checkout<Box<ServerConn>>) {
    if server.loaded {
        // No reset unloads a library.
        s.pin = None;
        server.discard();
        return;
    }
    if s.mode == PoolMode::Session || s.pin.is_some() {
        match reset(&mut server).await {
            Ok(()) => server.release(),
            Err(e) => {
                tracing::debug!(error = %e, "resetting a session server failed");
                server.discard();
            }
        }
        s.pin = None;
    } else {
        server.release();
    }
}

/// Checks a server out of the role's pool, mapping failures to what the client is told.
pub(super) async fn checkout(
    shared: &Shared,
    role: &RoleShared,
    auth: &RoleAuth,
) -> Result<Checkout<Box<ServerConn>>, (SqlState, String)> {
    let limits = RoleLimits {
        pool_size: u32::try_from(pool_size(shared, auth)).unwrap_or(u32::MAX),
        weight: 1,
    };
    let (mut wait, check_delay) = {
        let config = shared.config();
        (config.query_wait_timeout(), config.server_check_delay())
    };
    if shared.pause.is_paused(&role.name) {
        // PAUSE: wait for RESUME within the same query_wait_timeout.
        let started = tokio::time::Instant::now();
        if !shared.pause.wait(&role.name, started + wait).await {
            let message = format!(
                "role \"{}\" is paused by the administrator and was not resumed within \
                 query_wait_timeout ({wait:?})",
                role.name
            );
            return Err((SqlState::TOO_MANY_CONNECTIONS, message));
        }
        wait = wait.saturating_sub(started.elapsed());
    }
    // A server idle for long may have been closed under us (Postgres restarted, an
    // idle timeout, a network drop): check it first, and take another if it is gone.
    for _ in 0..3 {
        let mut server = match shared.pools.checkout(&role.name, limits, wait).await {
            Ok(server) => server,
            Err(e) => return checkout_result(Err(e)),
        };
        if stale(&mut server) {
            tracing::info!(role = %role.name, "an idle server closed or spoke unasked; replacing it");
            server.discard();
            continue;
        }
        if server.idle_for() > check_delay {
            if let Err(e) = check(&mut server).await {
                tracing::info!(role = %role.name, error = %e, "an idle server failed its health check");
                server.discard();
                continue;
            }
        }
        return Ok(server);
    }
    checkout_result(shared.pools.checkout(&role.name, limits, wait).await)
}

pub(super) fn pool_size(shared: &Shared, auth: &RoleAuth) -> usize {
    auth.pool_size.unwrap_or(shared.config().default_pool_size)
}

fn checkout_result(
    result: Result<Checkout<Box<ServerConn>>, PoolError>,
) -> Result<Checkout<Box<ServerConn>>, (SqlState, String)> {
    match result {
        Ok(server) => Ok(server),
        Err(e @ PoolError::WaitTimeout { .. }) => {
            Err((SqlState::TOO_MANY_CONNECTIONS, e.to_string()))
        }
        Err(e) => {
            tracing::warn!(error = %e, "no server connection");
            Err((SqlState::CANNOT_CONNECT_NOW, e.to_string()))
        }
    }
}
