//! The pool's way to open a server: log in as the role with the keys its clients'
//! logins left behind (SCRAM pass-through).

use std::sync::Arc;
use std::time::Instant;

use futures_util::future::BoxFuture;

use super::{BackendError, ServerConn, Target};
use crate::pool::{ConnectError, Connector};
use crate::session::params::ServerParams;
use crate::shared::Roles;

pub struct PassThrough {
    pub roles: Arc<Roles>,
    pub target: Target,
}

#[derive(Debug, thiserror::Error)]
#[error(
    "no client of role \"{0}\" has logged in since the pooler started, so it holds no key to log in with"
)]
struct NoKeys(String);

impl Connector<ServerConn> for PassThrough {
    fn connect(&self, role: &str) -> BoxFuture<'static, Result<ServerConn, ConnectError>> {
        let roles = self.roles.clone();
        let target = self.target.clone();
        let role = role.to_owned();
        Box::pin(async move {
            let shared = roles.get_or_insert(&role);
            let keys = shared
                .keys()
                .ok_or_else(|| ConnectError::new(NoKeys(role.clone())))?;
            match target.connect(&keys).await {
                Ok(server) => {
                    shared.set_params(ServerParams::from_login(&server.params));
                    Ok(server)
                }
                Err(e) => {
                    if let BackendError::VerifierMismatch { .. } = &e {
                        // Say exactly what is wrong, once per backoff, and stop trying.
                        tracing::error!(role = %role, error = %e, "SCRAM pass-through impossible");
                        shared.mismatch(Instant::now());
                    }
                    Err(ConnectError::new(e))
                }
            }
        })
    }
}
