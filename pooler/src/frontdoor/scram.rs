//! The SCRAM-SHA-256 exchange with a client, shared by app logins and the console.

use bytes::{Bytes, BytesMut};

use super::{SessionError, encoded, fatal, read_within, write_within};
use crate::auth::limiter::AdmitError;
use crate::auth::scram::{ScramError, ServerExchange};
use crate::metrics::AuthResult;
use crate::net::stream::Stream;
use crate::proto::SqlState;
use crate::proto::backend as msg;
use crate::proto::frame::{self, Side};
use crate::proto::frontend;
use crate::shared::Shared;
use crate::verifier;

const MECHANISM: &str = "SCRAM-SHA-256";

/// How a SCRAM exchange that ran to its end came out.
pub enum Proof {
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
pub async fn scram_exchange(
    stream: &mut Stream,
    buf: &mut BytesMut,
    secret: verifier::ScramSecret,
    deadline: tokio::time::Instant,
) -> Result<Proof, SessionError> {
    let mut out = BytesMut::with_capacity(256);
    encoded(msg::authentication_sasl(&mut out, &[MECHANISM]))?;
    write_within(stream, &out, deadline).await?;
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
    write_within(stream, &out, deadline).await?;

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

/// The message PostgreSQL itself sends (auth.c), whatever the reason.
pub async fn password_failed<T>(stream: &mut Stream, user: &str) -> Result<T, SessionError> {
    fatal(
        stream,
        SqlState::INVALID_PASSWORD,
        format!("password authentication failed for user \"{user}\""),
    )
    .await
}

/// Reads one SASL message ('p') from the client. Any other type is refused at its
/// first byte, before its length is even read: a `Q` announcing 1 GiB here is not
/// buffered. A `p` is within `PG_MAX_AUTH_TOKEN_LENGTH` (frame.rs) by its header.
async fn read_sasl(
    stream: &mut Stream,
    buf: &mut BytesMut,
    deadline: tokio::time::Instant,
) -> Result<Bytes, SessionError> {
    loop {
        if let Some(&tag) = buf.first().filter(|&&t| t != b'p') {
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
        match frame::split(buf, Side::Frontend) {
            // A `p`: any other type was refused above.
            Ok(Some((_, body))) => return Ok(body),
            Ok(None) => read_within(stream, buf, deadline).await?,
            Err(e) => return fatal(stream, SqlState::PROTOCOL_VIOLATION, e.to_string()).await,
        }
    }
}

/// A login the throttle did not let start: too many failures from its address, or the
/// login deadline passed while attempts in flight settled.
pub async fn refused_attempt<T>(
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
