//! The operator's controls, shared by the admin console and the HTTP listener:
//! `PAUSE`/`RESUME`, `KILL` and `SHUTDOWN` (reload is in [`crate::reload`]).

use std::sync::Arc;
use std::time::Duration;

use crate::proto::SqlState;
use crate::shared::{Paused, Shared};

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("no role \"{0}\" has connected to this pooler since it started")]
    UnknownRole(String),
    #[error("{0} is not paused")]
    NotPaused(String),
    #[error(
        "the whole pooler is paused: RESUME without a role name resumes it (role \"{0}\" cannot be resumed alone)"
    )]
    PausedGlobally(String),
    #[error(
        "paused, but {active} server connection(s) are still in a transaction after {waited:?} \
         (admin.pause_timeout_ms); new transactions stay held until RESUME"
    )]
    StillActive { active: u32, waited: Duration },
}

impl ControlError {
    pub fn sqlstate(&self) -> SqlState {
        match self {
            ControlError::UnknownRole(_) => SqlState::UNDEFINED_OBJECT,
            _ => SqlState::OBJECT_NOT_IN_PREREQUISITE_STATE,
        }
    }
}

fn known(shared: &Shared, role: &str) -> Result<(), ControlError> {
    match shared.roles.get(role) {
        Some(_) => Ok(()),
        None => Err(ControlError::UnknownRole(role.to_owned())),
    }
}

/// Servers checked out now, of `role` or of every role.
fn active_servers(shared: &Shared, role: Option<&str>) -> u32 {
    let stats = shared.pools.stats();
    stats
        .roles
        .iter()
        .filter(|r| role.is_none_or(|name| *r.role == *name))
        .map(|r| r.active)
        .sum()
}

/// `PAUSE [role]`, as PgBouncer's: new checkouts of the role (or of all roles) wait for
/// `RESUME`, running transactions finish, and servers are closed as they come back (a
/// pause is how a database restart or failover is ridden out). Returns once no server
/// of the paused roles is in a transaction, or with [`ControlError::StillActive`] after
/// `admin.pause_timeout_ms`; the pause stays in force either way.
pub async fn pause(shared: &Shared, role: Option<&str>) -> Result<(), ControlError> {
    if let Some(r) = role {
        known(shared, r)?;
    }
    shared.pause.update(|p| {
        match role {
            Some(r) => {
                p.roles.insert(Arc::from(r));
            }
            None => p.all = true,
        }
        Ok(())
    })?;
    let names: Vec<Arc<str>> = match role {
        Some(r) => vec![Arc::from(r)],
        None => shared
            .pools
            .stats()
            .roles
            .into_iter()
            .map(|r| r.role)
            .collect(),
    };
    for name in &names {
        shared.pools.close_role(name);
    }
    tracing::info!(role = role.unwrap_or("*"), "paused");
    let timeout = shared.config().admin.pause_timeout();
    let started = tokio::time::Instant::now();
    loop {
        let active = active_servers(shared, role);
        if active == 0 {
            return Ok(());
        }
        if started.elapsed() >= timeout {
            return Err(ControlError::StillActive {
                active,
                waited: started.elapsed(),
            });
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `RESUME [role]`: releases the checkouts that `PAUSE` holds.
pub fn resume(shared: &Shared, role: Option<&str>) -> Result<(), ControlError> {
    shared.pause.update(|p| match role {
        None if p.is_empty() => Err(ControlError::NotPaused("the pooler".into())),
        None => {
            *p = Paused::default();
            Ok(())
        }
        Some(r) if p.roles.remove(r) => Ok(()),
        Some(r) if p.all => Err(ControlError::PausedGlobally(r.to_owned())),
        Some(r) => Err(ControlError::NotPaused(format!("role \"{r}\""))),
    })?;
    tracing::info!(role = role.unwrap_or("*"), "resumed");
    Ok(())
}

/// `KILL role`: disconnects the role's clients now (57P01, in a transaction or not) and
/// closes its servers. Unlike PgBouncer's KILL it does not also pause the role: its
/// clients may reconnect at once (`PAUSE` it first to keep them out). Returns how many
/// clients were told to leave.
pub fn kill(shared: &Shared, role: &str) -> Result<usize, ControlError> {
    let r = shared
        .roles
        .get(role)
        .ok_or_else(|| ControlError::UnknownRole(role.to_owned()))?;
    let clients = shared
        .clients
        .snapshot()
        .iter()
        .filter(|c| c.ident().is_some_and(|i| !i.admin && *i.user == *role))
        .count();
    r.kill();
    shared.clients.wake_all();
    shared.pools.close_role(role);
    tracing::warn!(role, clients, "killed by the administrator");
    Ok(clients)
}

/// `SHUTDOWN`: the binary drains as on SIGTERM.
pub fn shutdown(shared: &Shared) {
    tracing::info!("shutdown requested by the administrator");
    shared.shutdown_requested.send_replace(true);
}
