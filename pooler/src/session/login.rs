//! Authentication: SCRAM-SHA-256 against the verifier from `dataplane_auth.lookup`,
//! which also recovers the ClientKey the pooler logs into Postgres with.
//!
//! Unknown, disabled and expired roles run the same exchange against a mock verifier,
//! so every failure is the same 28P01 at the same step: no role enumeration.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use tokio::io::AsyncWriteExt;

use super::cancel::CancelHandle;
use super::params::{ClientParams, ServerParams};
use super::{Listener, SessionError, fatal};
use crate::auth::cache::{LookupError, PoolMode, RoleAuth, Status};
use crate::auth::limiter::AdmitError;
use crate::auth::scram::{ScramError, ServerExchange};
use crate::auth::verifier;
use crate::backend::LoginKeys;
use crate::metrics::AuthResult;
use crate::net::stream::Stream;
use crate::proto::SqlState;
use crate::proto::backend::{self as msg, TransactionStatus};
use crate::proto::frame::{self, Side};
use crate::proto::frontend;
use crate::shared::{ClientSlot, RoleShared, Shared};

/// A logged-in client, ready to relay.
pub struct Session {
    pub stream: Stream,
    pub role: Arc<RoleShared>,
    pub auth: Arc<RoleAuth>,
    pub params: ClientParams,
    pub mode: PoolMode,
    pub cancel: CancelHandle,
    /// Fires when the role is revoked; subscribed during login, so a revocation that
    /// lands while the client authenticates is not missed.
    pub revoked: tokio::sync::watch::Receiver<u64>,
    /// This client's place under the app's max_client_conn.
    pub _slot: ClientSlot,
    /// The client's named prepared statements.
    pub statements: super::prepared::ClientStatements,
    /// Held while the client has session state on its server (state.rs).
    pub pin: Option<crate::shared::PinSlot>,
    /// What the client's messages since the last settle may have changed.
    pub pending: super::state::Effect,
    /// Custom parameters the client may have set, for the state check.
    pub customs: super::state::Customs,
    /// Client bytes read past the login messages.
    pub buf: BytesMut,
}

const MECHANISM: &str = "SCRAM-SHA-256";

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
        || match shared.cache.get(&user).await {
            Ok(now) => now.status == Status::Ok && now.generation == auth.generation,
            Err(_) => false,
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
                stream.write_all(&out).await?;
                return fatal(&mut stream, code, message).await;
            }
        },
    };
    for (name, value) in server_params.announce(&params) {
        // A value the protocol cannot carry (a NUL) is not announced.
        let _ = msg::parameter_status(&mut out, name, value.as_bytes());
    }
    let cancel = match shared.cancels.register() {
        Ok(c) => c,
        Err(e) => {
            return fatal(
                &mut stream,
                SqlState::CONNECTION_FAILURE,
                format!("no randomness: {e}"),
            )
            .await;
        }
    };
    msg::backend_key_data(&mut out, cancel.key.pid, cancel.key.secret);
    msg::ready_for_query(&mut out, TransactionStatus::Idle);
    stream.write_all(&out).await?;

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
        buf,
    })
}

/// How a SCRAM exchange that ran to its end came out.
pub(crate) enum Proof {
    Valid {
        server_final: Vec<u8>,
        client_key: crate::auth::scram::ClientKey,
    },
    /// A wrong password, or a mock verifier: the caller reports it as 28P01.
    Invalid,
}

/// Runs SCRAM-SHA-256 with the client against `secret`, from AuthenticationSASL to
/// the verdict. A broken exchange ends the session here (08P01); a wrong proof is
/// returned, so each caller fails it the same way whatever the reason.
pub(crate) async fn scram_exchange(
    stream: &mut Stream,
    buf: &mut BytesMut,
    secret: verifier::ScramSecret,
    deadline: tokio::time::Instant,
) -> Result<Proof, SessionError> {
    let mut out = BytesMut::with_capacity(256);
    encoded(msg::authentication_sasl(&mut out, &[MECHANISM]))?;
    stream.write_all(&out).await?;
    out.clear();

    let nonce = match crate::auth::random_nonce() {
        Ok(n) => n,
        Err(e) => {
            return fatal(
                stream,
                SqlState::CONNECTION_FAILURE,
                format!("no randomness: {e}"),
            )
            .await;
        }
    };
    let mut exchange = match ServerExchange::new(secret, &nonce) {
        Ok(x) => x,
        Err(e) => return fatal(stream, SqlState::INTERNAL_ERROR, e.to_string()).await,
    };
    let first = read_sasl(stream, buf, deadline).await?;
    let first = match frontend::parse_sasl_initial_response(&first) {
        Ok(frontend::SaslInitialResponse {
            mechanism,
            data: Some(data),
        }) if mechanism == MECHANISM => data.to_vec(),
        Ok(frontend::SaslInitialResponse { mechanism, .. }) => {
            return fatal(
                stream,
                SqlState::PROTOCOL_VIOLATION,
                format!("SASL mechanism {mechanism:?} is not offered; use {MECHANISM}"),
            )
            .await;
        }
        Err(e) => return fatal(stream, SqlState::PROTOCOL_VIOLATION, e.to_string()).await,
    };
    let server_first = match exchange.client_first(&first) {
        Ok(m) => m,
        Err(e) => return fatal(stream, SqlState::PROTOCOL_VIOLATION, e.to_string()).await,
    };
    encoded(msg::authentication_sasl_continue(&mut out, &server_first))?;
    stream.write_all(&out).await?;

    let last = read_sasl(stream, buf, deadline).await?;
    let last = match frontend::parse_sasl_response(&last) {
        Ok(data) => data.to_vec(),
        Err(e) => return fatal(stream, SqlState::PROTOCOL_VIOLATION, e.to_string()).await,
    };
    match exchange.client_final(&last) {
        Ok((server_final, client_key)) => Ok(Proof::Valid {
            server_final,
            client_key,
        }),
        Err(ScramError::InvalidProof) => Ok(Proof::Invalid),
        Err(e) => fatal(stream, SqlState::PROTOCOL_VIOLATION, e.to_string()).await,
    }
}

/// A login the throttle did not let start: too many failures from its address, or the
/// login deadline passed while attempts in flight settled.
pub(crate) async fn refused_attempt<T>(
    stream: &mut Stream,
    shared: &Shared,
    error: AdmitError,
) -> Result<T, SessionError> {
    match error {
        AdmitError::Throttled => {
            shared.metrics.auth(AuthResult::Throttled);
            let message = "too many failed login attempts; try again in a minute";
            fatal(
                stream,
                SqlState::INVALID_AUTHORIZATION_SPECIFICATION,
                message.into(),
            )
            .await
        }
        AdmitError::TimedOut => {
            let message = "login not completed within client_login_timeout".to_owned();
            fatal(stream, SqlState::PROTOCOL_VIOLATION, message).await
        }
    }
}

/// The message PostgreSQL itself sends (auth.c), whatever the reason.
pub(crate) async fn password_failed<T>(stream: &mut Stream, user: &str) -> Result<T, SessionError> {
    fatal(
        stream,
        SqlState::INVALID_PASSWORD,
        format!("password authentication failed for user \"{user}\""),
    )
    .await
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

/// Reads one SASL message ('p') from the client.
async fn read_sasl(
    stream: &mut Stream,
    buf: &mut BytesMut,
    deadline: tokio::time::Instant,
) -> Result<Bytes, SessionError> {
    loop {
        match frame::split(buf, Side::Frontend) {
            Ok(Some((b'p', body))) => return Ok(body),
            Ok(Some((tag, _))) => {
                return fatal(
                    stream,
                    SqlState::PROTOCOL_VIOLATION,
                    format!(
                        "expected a SASL response, got message type {:?}",
                        char::from(tag)
                    ),
                )
                .await;
            }
            Ok(None) => super::read_within(stream, buf, deadline).await?,
            Err(e) => return fatal(stream, SqlState::PROTOCOL_VIOLATION, e.to_string()).await,
        }
    }
}

/// Our own messages are small and NUL-free; failing to encode one is a bug, reported
/// to the client as such rather than a panic.
pub(crate) fn encoded(r: Result<(), crate::proto::error::EncodeError>) -> Result<(), SessionError> {
    r.map_err(|e| SessionError::Reported {
        code: SqlState::INTERNAL_ERROR,
        message: format!("encoding a message: {e}"),
    })
}
