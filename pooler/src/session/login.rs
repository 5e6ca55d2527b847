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
use super::settings::{self, Outcome, Requested};
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
use crate::proto::startup::Replication;
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
    // No database, or an empty one, is the user's name (backend_startup.c).
    let database = get("database")
        .filter(|d| !d.is_empty())
        .unwrap_or(&user)
        .to_owned();
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

    // What the client asked for at startup, checked as Postgres would check it (on a
    // server only when some of it has not passed before).
    let requested = settings::requested(&startup);
    let (server_params, outcome) = match (role.params(), requested.known(&role)) {
        (Some(p), Some(outcome)) => (p, outcome),
        _ => match prepare(shared, &role, &auth, &requested).await {
            Ok(both) => both,
            Err((code, message)) => {
                write_within(&mut stream, &out, deadline).await?;
                return fatal(&mut stream, code, message).await;
            }
        },
    };
    // Refused after authentication and before any setting, as Postgres refuses them
    // (postinit.c, InitPostgres), so a client cannot tell the pooler from the server.
    if let Some(refusal) = refused_after_login(
        &startup,
        &database,
        &shared.config().upstream.dbname,
        &server_params,
    ) {
        refusal.write(&mut out);
        // The client may already be gone; the refusal is still the outcome.
        let _ = write_within(&mut stream, &out, deadline).await;
        return Err(SessionError::Reported {
            code: refusal.code,
            message: refusal.message,
        });
    }
    let reported = match outcome {
        Outcome::Accepted { reported, notices } => {
            for notice in notices {
                out.extend_from_slice(&notice);
            }
            reported
        }
        Outcome::Refused {
            notices,
            error,
            code,
            message,
        } => {
            for notice in notices {
                out.extend_from_slice(&notice);
            }
            out.extend_from_slice(&error);
            // The client may already be gone; the refusal is still the outcome.
            let _ = write_within(&mut stream, &out, deadline).await;
            return Err(SessionError::Reported { code, message });
        }
    };
    // Reported parameters as Postgres spells them (`utf8` is `UTF8`).
    let settings = requested.settings.iter().map(|(name, value)| {
        let value = reported.get(&name.to_ascii_lowercase()).unwrap_or(value);
        (name.as_str(), value.as_str())
    });
    let params = ClientParams::shared_from_settings(settings, &role.startup_params);
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

/// A server of the role, for what a login needs from one: the parameters Postgres
/// reports for the role and what its functions may leave (the first client since
/// start-up learns them), and the check of settings that have not passed before.
/// Later clients log in without Postgres.
async fn prepare(
    shared: &Shared,
    role: &RoleShared,
    auth: &RoleAuth,
    requested: &Requested,
) -> Result<(Arc<ServerParams>, Outcome), (SqlState, String)> {
    let mut server = super::checkout::checkout(shared, role, auth).await?;
    role.set_params(ServerParams::from_login(&server.params));
    // The role's first client: what its functions may leave (routines.rs). A failure
    // leaves the role risky, and the look is tried again after a transaction.
    if role.routines_due(Instant::now(), super::routines::REFRESH) {
        if let Err(e) = super::upkeep::look_at_routines(role, &mut server).await {
            tracing::debug!(role = %role.name, error = %e, "looking at the app's functions failed");
        }
    }
    let outcome = match requested.known(role) {
        Some(outcome) => outcome,
        None => match requested.check(&mut server, role).await {
            Ok(outcome) => outcome,
            Err(e) => {
                tracing::warn!(role = %role.name, error = %e, "checking startup settings failed");
                server.discard();
                return Err((
                    SqlState::CONNECTION_FAILURE,
                    format!("the pooler could not check the startup settings: {e}"),
                ));
            }
        },
    };
    server.release();
    let params = role.params().ok_or((
        SqlState::CONNECTION_FAILURE,
        "server parameters unavailable".into(),
    ))?;
    Ok((params, outcome))
}

/// A login Postgres would refuse once the client has authenticated.
#[derive(Debug, PartialEq, Eq)]
struct Refusal {
    code: SqlState,
    message: String,
    detail: Option<&'static str>,
}

impl Refusal {
    fn write(&self, out: &mut BytesMut) {
        msg::error_response(
            out,
            &msg::Diagnostic {
                detail: self.detail,
                ..msg::Diagnostic::new(msg::Severity::Fatal, self.code, &self.message)
            },
        );
    }
}

/// What Postgres refuses after authentication, in its order: a walsender (the
/// `replication` key) for a role without REPLICATION, which no app role has (the
/// provisioner creates them NOREPLICATION), in the wording of the server's version;
/// then a database other than the apps' (the pooler serves that one only).
fn refused_after_login(
    startup: &[(String, String)],
    database: &str,
    served: &str,
    server: &ServerParams,
) -> Option<Refusal> {
    if Replication::of(startup) != Replication::Off {
        let major = server
            .reported("server_version")
            .and_then(|v| v.split(|c: char| !c.is_ascii_digit()).next())
            .and_then(|m| m.parse::<u32>().ok());
        // PostgreSQL 16 reworded it (and added a detail).
        let (message, detail) = match major {
            Some(m) if m < 16 => (
                "must be superuser or replication role to start walsender",
                None,
            ),
            _ => (
                "permission denied to start WAL sender",
                Some("Only roles with the REPLICATION attribute may start a WAL sender process."),
            ),
        };
        return Some(Refusal {
            code: SqlState::INSUFFICIENT_PRIVILEGE,
            message: message.to_owned(),
            detail,
        });
    }
    (database != served).then(|| Refusal {
        code: SqlState::INVALID_CATALOG_NAME,
        message: format!("database \"{database}\" does not exist"),
        detail: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::settings::tests::packet;

    fn server(version: &str) -> ServerParams {
        ServerParams::from_login(&packet(&[("server_version", version)]))
    }

    #[test]
    fn a_walsender_is_refused_in_the_servers_words_before_the_database() {
        let walsender = packet(&[("replication", "database")]);
        let pg15 = refused_after_login(&walsender, "other", "apps", &server("15.18 (Debian)"));
        assert_eq!(
            pg15,
            Some(Refusal {
                code: SqlState::INSUFFICIENT_PRIVILEGE,
                message: "must be superuser or replication role to start walsender".into(),
                detail: None,
            })
        );
        let pg17 = refused_after_login(&walsender, "apps", "apps", &server("17.2")).unwrap();
        assert_eq!(pg17.message, "permission denied to start WAL sender");
        assert!(pg17.detail.is_some());
        let off = packet(&[("replication", "database"), ("replication", "off")]);
        assert_eq!(
            refused_after_login(&off, "other", "apps", &server("15.1")).map(|r| r.code),
            Some(SqlState::INVALID_CATALOG_NAME)
        );
        assert_eq!(
            refused_after_login(&off, "apps", "apps", &server("15.1")),
            None
        );
    }
}
