//! A client's life: negotiate TLS, read the startup packet, authenticate, then relay
//! (a transaction at a time, or the whole session), and leave nothing behind.

pub mod cancel;
mod checkout;
mod cursor;
pub(crate) mod login;
pub mod params;
pub mod prepared;
mod relay;
mod signals;
pub(crate) mod state;
mod tracker;
mod upkeep;
mod wire;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::config::TlsMode;
use crate::net::stream::Stream;
use crate::proto::SqlState;
use crate::proto::backend as msg;
use crate::proto::error::write_fatal;
use crate::proto::startup::{self, StartupPacket};
use crate::registry::{ClientIdent, ClientInfo};
use crate::shared::Shared;

/// Which port the client came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listener {
    /// Transaction pooling, unless the app's credentials row says session.
    Main,
    /// Always session pooling.
    Session,
}

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("client I/O: {0}")]
    Io(#[from] std::io::Error),
    /// Already reported to the client as an ErrorResponse.
    #[error("{code}: {message}")]
    Reported { code: SqlState, message: String },
}

/// Connection ids for log lines.
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// Serves one client connection from accept to close. Never panics on client input:
/// every failure becomes an ErrorResponse (where the protocol still allows one) and
/// a log line.
pub async fn serve(tcp: TcpStream, peer: SocketAddr, shared: Arc<Shared>, listener: Listener) {
    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    let span = tracing::info_span!("client", id, peer = %peer);
    let _ = tcp.set_nodelay(true);
    let result =
        tracing::Instrument::instrument(run(id, tcp, peer, shared.clone(), listener), span.clone())
            .await;
    let _entered = span.enter();
    match result {
        Ok(()) => tracing::debug!("client left"),
        Err(SessionError::Reported { code, message }) => {
            shared.metrics.error(code.code());
            tracing::info!(code = code.code(), %message, "client refused")
        }
        Err(SessionError::Io(e)) => tracing::debug!(error = %e, "client connection ended"),
    }
}

async fn run(
    id: u64,
    tcp: TcpStream,
    peer: SocketAddr,
    shared: Arc<Shared>,
    listener: Listener,
) -> Result<(), SessionError> {
    let local = tcp.local_addr().ok();
    let mut stream = Stream::Plain(tcp);
    let limit = shared.config().max_client_conn;
    let Some(client) = shared
        .clients
        .register(id, ClientInfo::new(id, peer, local), limit)
    else {
        return fatal(
            &mut stream,
            SqlState::TOO_MANY_CONNECTIONS,
            format!("sorry, too many clients already (max_client_conn = {limit})"),
        )
        .await;
    };
    // Startup and authentication must finish by this instant; a client that stalls
    // is told so and closed, and holds nothing meanwhile.
    let deadline = tokio::time::Instant::now() + shared.config().client_login_timeout();
    // The login's and the console's futures are boxed: a task's future is as big as
    // its biggest state, and an idle client should not carry the login's for its
    // whole life (10,000 idle clients must cost little memory).
    let Some((stream, params, buf)) = Box::pin(negotiate(stream, &shared, deadline)).await? else {
        return Ok(());
    };
    // Accepted in the moment between the drain's start and the accept loop seeing
    // it: refused like Postgres refuses logins while it shuts down.
    if *shared.shutdown.borrow() && !crate::admin::console::is_console(&params) {
        let mut stream = stream;
        return fatal(
            &mut stream,
            SqlState::CANNOT_CONNECT_NOW,
            "the pooler is shutting down".into(),
        )
        .await;
    }
    if crate::admin::console::is_console(&params) {
        return Box::pin(crate::admin::console::serve(
            stream, peer, &shared, params, buf, deadline, &client,
        ))
        .await;
    }
    // Boxed too: an async fn keeps a moved-in argument twice (as passed and as bound),
    // and the session lives as long as the client.
    let session = Box::new(
        Box::pin(login::login(
            stream, peer, &shared, params, buf, listener, deadline,
        ))
        .await?,
    );
    client.logged_in(ClientIdent {
        user: session.role.name.clone(),
        database: shared.config().upstream.dbname.clone(),
        application_name: session
            .params
            .get("application_name")
            .unwrap_or_default()
            .to_owned(),
        tls: session.stream.tls_description(),
        admin: false,
    });
    relay::run(session, &shared, &client).await
}

/// The untagged first packets: TLS and GSS negotiation, cancel requests, and finally
/// the startup packet. `None`: the connection was a cancel request, now served.
async fn negotiate(
    mut stream: Stream,
    shared: &Shared,
    deadline: tokio::time::Instant,
) -> Result<Option<(Stream, Vec<(String, String)>, BytesMut)>, SessionError> {
    let mut buf = BytesMut::with_capacity(256);
    loop {
        let packet = loop {
            match startup::read(&mut buf) {
                Ok(Some(p)) => break p,
                Ok(None) => read_within(&mut stream, &mut buf, deadline).await?,
                Err(e) => {
                    return fatal(&mut stream, e.sqlstate(), e.to_string()).await;
                }
            }
        };
        match packet {
            StartupPacket::SslRequest => {
                if !buf.is_empty() {
                    // Bytes behind an SSLRequest would be read in the clear although
                    // the client means them for TLS (CVE-2021-23214): refuse, as
                    // PostgreSQL does.
                    return fatal(
                        &mut stream,
                        SqlState::PROTOCOL_VIOLATION,
                        "received unencrypted data after SSL request".into(),
                    )
                    .await;
                }
                let acceptor = shared.client_tls.load_full();
                stream = match (acceptor.as_deref(), stream) {
                    (Some(acceptor), Stream::Plain(mut tcp)) => {
                        tcp.write_all(b"S").await?;
                        match tokio::time::timeout_at(deadline, acceptor.accept(tcp)).await {
                            Ok(tls) => Stream::TlsServer(Box::new(tls?)),
                            Err(_) => return Err(login_timeout(shared)),
                        }
                    }
                    (_, mut other) => {
                        // No certificate configured, or TLS already on: say no.
                        other.write_all(b"N").await?;
                        other
                    }
                };
            }
            StartupPacket::GssEncRequest => stream.write_all(b"N").await?,
            StartupPacket::Cancel { pid, secret } => {
                if let Some(key) = shared.cancels.resolve(pid, secret) {
                    shared.metrics.cancels.inc();
                    if let Err(e) = crate::backend::cancel(&shared.target, key).await {
                        tracing::warn!(error = %e, "forwarding a cancel request failed");
                    }
                }
                return Ok(None);
            }
            StartupPacket::Startup {
                major,
                minor,
                params,
                protocol_options,
            } => {
                if major != 3 {
                    return fatal(
                        &mut stream,
                        SqlState::FEATURE_NOT_SUPPORTED,
                        format!(
                            "unsupported frontend protocol {major}.{minor}: only 3.0 is supported"
                        ),
                    )
                    .await;
                }
                if minor > 0 || !protocol_options.is_empty() {
                    // Tell the client what we speak (protocol.html, "Protocol versioning").
                    let mut out = BytesMut::new();
                    if msg::negotiate_protocol_version(&mut out, 0, &protocol_options).is_ok() {
                        stream.write_all(&out).await?;
                    }
                }
                let tls_required = shared.config().client_tls.mode == TlsMode::Require;
                if tls_required && !stream.is_tls() {
                    return fatal(
                        &mut stream,
                        SqlState::INVALID_AUTHORIZATION_SPECIFICATION,
                        "TLS is required by this pooler: connect with sslmode=require (or stronger)".into(),
                    )
                    .await;
                }
                return Ok(Some((stream, params, buf)));
            }
        }
    }
}

/// Reads more client bytes into `buf` before `deadline`; a client that stalls past it
/// gets a FATAL error naming the limit.
pub(crate) async fn read_within(
    stream: &mut Stream,
    buf: &mut BytesMut,
    deadline: tokio::time::Instant,
) -> Result<(), SessionError> {
    match tokio::time::timeout_at(deadline, stream.read_buf(buf)).await {
        Ok(Ok(0)) => Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into()),
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(e.into()),
        Err(_) => {
            let message = "login not completed within client_login_timeout".to_owned();
            fatal(stream, SqlState::PROTOCOL_VIOLATION, message).await
        }
    }
}

fn login_timeout(shared: &Shared) -> SessionError {
    SessionError::Reported {
        code: SqlState::PROTOCOL_VIOLATION,
        message: format!(
            "TLS handshake not completed within client_login_timeout ({} ms)",
            shared.config().client_login_timeout_ms
        ),
    }
}

/// Sends a FATAL ErrorResponse and ends the session with it.
pub(crate) async fn fatal<T>(
    stream: &mut Stream,
    code: SqlState,
    message: String,
) -> Result<T, SessionError> {
    let mut out = BytesMut::new();
    write_fatal(&mut out, code, &message);
    // The client may already be gone; the error is still the session's outcome.
    let _ = stream.write_all(&out).await;
    let _ = stream.flush().await;
    Err(SessionError::Reported { code, message })
}
