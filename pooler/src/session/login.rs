//! Authentication: SCRAM-SHA-256 against the verifier from `dataplane_auth.lookup`,
//! which also recovers the ClientKey the pooler logs into Postgres with.
//!
//! Unknown, disabled and expired roles run the same exchange against a mock verifier,
//! so every failure is the same 28P01 at the same step: no role enumeration.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::BytesMut;

use super::client::Session;
use crate::auth::cache::{LookupError, PoolMode, RoleAuth, Status};
use crate::backend::LoginKeys;
use crate::backend::params::{ClientParams, ServerParams};
use crate::frontdoor::{
    Listener, Proof, SessionError, encoded, fatal, password_failed, refused_attempt,
    scram_exchange, write_within,
};
use crate::metrics::AuthResult;
use crate::net::stream::Stream;
use crate::proto::SqlState;
use crate::proto::backend::{self as msg, TransactionStatus};
use crate::shared::{RoleShared, Shared};
use crate::verifier;

pub async fn login(
    mut stream: Stream,
    peer: SocketAddr,
    shared: &Shared,
    startup: Vec<(String, String)>,
    mut buf: BytesMut,
    listener: Listener,
    deadline: tokio::time::Instant,
) -> Result<Session, SessionError> {
    let get = |k: &str| {
        startup
            .iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.as_str())
    };
    let Some(user) = get("user").map(str::to_owned) else {
        return fatal(
            &mut stream,
            SqlState::INVALID_AUTHORIZATION_SPECIFICATION,
            "no user name in the startup packet".into(),
        )
        .await;
    };
    let database = get("database").unwrap_or(&user).to_owned();
    if database != shared.config().upstream.dbname {
        return fatal(
            &mut stream,
            SqlState::INVALID_CATALOG_NAME,
            format!("database \"{database}\" does not exist"),
        )
        .await;
    }
    // Recorded before the lookup and the exchange, so guesses sent in parallel count
    // (limiter.rs); settled below, and a client that leaves mid-exchange counts.
    let attempt = match shared.limiter.admit(&user, peer.ip(), deadline).await {
        Ok(a) => a,
        Err(e) => return refused_attempt(&mut stream, shared, e).await,
    };
    let epoch = shared.roles.epoch();
    let lookup = tokio::time::timeout_at(deadline, shared.cache.get(&user)).await;
    let auth = match lookup
        .unwrap_or_else(|_| Err(LookupError::Unavailable("lookup timed out".into())))
    {
        Ok(a) => a,
        Err(LookupError::Busy) => {
            attempt.withdrawn();
            tracing::warn!(role = %user, "too many lookups of unknown names waiting: login refused");
            shared.metrics.auth(AuthResult::LookupBusy);
            return fatal(
                &mut stream,
                SqlState::TOO_MANY_CONNECTIONS,
                "too many logins are waiting for a credentials lookup (auth_lookup_queue); try again shortly"
                    .into(),
            )
            .await;
        }
        Err(e) => {
            attempt.withdrawn();
            tracing::warn!(error = %e, "verifier lookup failed");
            shared.metrics.auth(AuthResult::Error);
            return fatal(
                &mut stream,
                SqlState::CANNOT_CONNECT_NOW,
                "the pooler cannot reach the database to authenticate; try again shortly".into(),
            )
            .await;
        }
    };
    let secret = match &auth.secret {
        Some(s) => (**s).clone(),
        None => verifier::ScramSecret::mock(&user, &shared.mock_secret),
    };

    let (server_final, client_key) = match scram_exchange(&mut stream, &mut buf, secret, deadline)
        .await?
    {
        Proof::Valid {
            server_final,
            client_key,
        } if auth.status == Status::Ok => {
            attempt.succeeded();
            (server_final, client_key)
        }
        Proof::Valid { .. } | Proof::Invalid => {
            attempt.failed();
            tracing::info!(role = %user, reason = auth.status.as_str(), "authentication failed");
            shared.metrics.auth(match auth.status {
                Status::Ok => AuthResult::BadProof,
                Status::Unknown => AuthResult::UnknownRole,
                _ => AuthResult::Disabled,
            });
            return password_failed(&mut stream, &user).await;
        }
    };
    let mut out = BytesMut::with_capacity(512);

    // Only authenticated names get per-role state, so clients cannot grow it at will.
    let role = shared.roles.get_or_insert(&user);
    let revoked = role.revocations();
    let seen = *revoked.borrow();
    // A revocation or rotation while this client authenticated: is it still welcome?
    let current = shared.roles.epoch() == epoch
        || match tokio::time::timeout_at(deadline, shared.cache.get(&user)).await {
            Ok(Ok(now)) => now.status == Status::Ok && now.generation == auth.generation,
            Ok(Err(_)) | Err(_) => false,
        };
    let keys_kept = current
        && match &auth.secret {
            Some(secret) => role.set_keys(
                LoginKeys {
                    role: role.name.clone(),
                    client_key: Arc::new(client_key),
                    secret: secret.clone(),
                    generation: auth.generation,
                },
                seen,
            ),
            None => false,
        };
    if !keys_kept {
        tracing::info!(role = %user, "credentials changed during login");
        return password_failed(&mut stream, &user).await;
    }
    let Some(slot) = role.admit(auth.max_client_conn) else {
        let max = auth.max_client_conn.unwrap_or_default();
        return fatal(
            &mut stream,
            SqlState::TOO_MANY_CONNECTIONS,
            format!("too many connections for app \"{user}\" (its max_client_conn is {max})"),
        )
        .await;
    };
    if role.in_mismatch_backoff(Instant::now()) {
        shared.metrics.auth(AuthResult::PassthroughMismatch);
        return fatal(
            &mut stream,
            SqlState::CANNOT_CONNECT_NOW,
            format!(
                "the pooler cannot log in as \"{user}\": the verifier in dataplane_auth.credentials differs from the \
                 server's; rotate the app's password to repair it"
            ),
        )
        .await;
    }
    encoded(msg::authentication_sasl_final(&mut out, &server_final))?;
    msg::authentication_ok(&mut out);

    let params = ClientParams::from_startup_shared(&startup, &role.startup_params);
    let server_params = match role.params() {
        Some(p) => p,
        None => match warm_up(shared, &role, &auth).await {
            Ok(p) => p,
            Err((code, message)) => {
                write_within(&mut stream, &out, deadline).await?;
                return fatal(&mut stream, code, message).await;
            }
        },
    };
    for (name, value) in server_params.announce(&params) {
        // A value the protocol cannot carry (a NUL) is not announced.
        let _ = msg::parameter_status(&mut out, name, value.as_bytes());
    }
    let cancel = match shared.cancels.register(shared.replicas.id()) {
        Ok(c) => c,
        Err(e) => {
            return fatal(
                &mut stream,
                SqlState::CONNECTION_FAILURE,
                format!("no cancel key: {e}"),
            )
            .await;
        }
    };
    msg::backend_key_data(&mut out, cancel.key.pid, cancel.key.secret);
    msg::ready_for_query(&mut out, TransactionStatus::Idle);
    write_within(&mut stream, &out, deadline).await?;

    let mode = if listener == Listener::Session {
        PoolMode::Session
    } else {
        auth.pool_mode
    };
    tracing::info!(role = %user, mode = ?mode, tls = stream.is_tls(), "client logged in");
    shared.metrics.auth(AuthResult::Ok);
    Ok(Session {
        stream,
        role,
        auth,
        params,
        mode,
        cancel,
        revoked,
        _slot: slot,
        statements: Default::default(),
        pin: None,
        pending: Default::default(),
        customs: Default::default(),
        listening: None,
        buf,
    })
}

/// The first client of a role since start-up: open (and return) a server to learn the
/// parameters Postgres reports for the role. Later clients log in without Postgres.
async fn warm_up(
    shared: &Shared,
    role: &RoleShared,
    auth: &RoleAuth,
) -> Result<Arc<ServerParams>, (SqlState, String)> {
    let server = super::checkout::checkout(shared, role, auth).await?;
    let params = ServerParams::from_login(&server.params);
    role.set_params(params);
    server.release();
    role.params().ok_or((
        SqlState::CONNECTION_FAILURE,
        "server parameters unavailable".into(),
    ))
}
