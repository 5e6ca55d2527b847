//! The operator's controls, shared by the admin console and the HTTP listener:
//! `PAUSE`/`RESUME`, `KILL` and `SHUTDOWN` (reload is in [`crate::reload`]).

use std::sync::Arc;
use std::time::Duration;

use crate::proto::SqlState;
use crate::shared::{Held, Paused, Shared};

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
        "paused, but {active} server connection(s) are still in use after {waited:?} \
         (admin.pause_timeout_ms){}; new transactions stay held until RESUME",
        held_report(*.active, .held)
    )]
    StillActive {
        active: u32,
        waited: Duration,
        /// The idle clients that keep their servers for session state, by client id.
        held: Vec<(u64, Held)>,
    },
}

impl ControlError {
    pub fn sqlstate(&self) -> SqlState {
        match self {
            ControlError::UnknownRole(_) => SqlState::UNDEFINED_OBJECT,
            _ => SqlState::OBJECT_NOT_IN_PREREQUISITE_STATE,
        }
    }
}

/// What `PAUSE` waits for, beyond transactions in flight: each idle client keeping its
/// server for session state that cannot move, by its `SHOW CLIENTS` id.
fn held_report(active: u32, held: &[(u64, Held)]) -> String {
    if held.is_empty() {
        return ": in a transaction".to_owned();
    }
    let clients = held
        .iter()
        .map(|(id, h)| format!("client {id} of role \"{}\" ({})", h.role, h.what))
        .collect::<Vec<_>>()
        .join("; ");
    let in_transaction = (active as usize).saturating_sub(held.len());
    format!(
        ": {in_transaction} in a transaction, and {} held by idle clients whose session \
         state cannot move to another server until they release it or leave: {clients}",
        held.len()
    )
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
/// pause is how a database restart or failover is ridden out). Session-mode and pinned
/// clients let their servers go at their next idle point when their session can move
/// to another server after the pause. Returns once no server of the paused roles is in
/// use, or with [`ControlError::StillActive`] after `admin.pause_timeout_ms`, naming
/// each idle client that keeps its server for session state and what that state is;
/// the pause stays in force either way.
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
    // Clients that keep a server between transactions (session mode, pinned) let it go
    // at their next idle point if their session can move (session/relay.rs).
    shared.clients.wake_all();
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
                held: shared.pause.holders(role),
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
