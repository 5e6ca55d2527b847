//! The front door every client connection passes: TLS and GSS negotiation, cancel
//! requests, the startup packet, the SCRAM exchange, and the FATAL errors that end a
//! connection before it is anyone's. What lies behind the door (an app's session, the
//! admin console) is chosen by the caller from what [`arrive`] returns, so the door
//! names neither.

mod scram;

pub use scram::{Proof, password_failed, refused_attempt, scram_exchange};

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::config::TlsMode;
use crate::net::stream::Stream;
use crate::proto::SqlState;
use crate::proto::backend as msg;
use crate::proto::startup::{self, StartupPacket};
use crate::registry::{ClientInfo, Registered};
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

/// The database names that mean the admin console.
pub const CONSOLE_DATABASES: &[&str] = &["pgbouncer", "admin"];

/// A client that came through the door: negotiated, registered, its startup packet read,
/// not yet authenticated.
pub struct Arrival {
    pub stream: Stream,
    pub peer: SocketAddr,
    pub listener: Listener,
    /// The startup packet's parameters, as sent.
    pub startup: Vec<(String, String)>,
    /// Client bytes read past the startup packet.
    pub buf: BytesMut,
    /// Authentication must finish by this instant.
    pub deadline: tokio::time::Instant,
    /// The client's entry in `SHOW CLIENTS` and its place under `max_client_conn`.
    pub client: Registered<ClientInfo>,
    /// It asked for the admin console's database.
    pub console: bool,
}

impl Arrival {
    pub fn param(&self, key: &str) -> Option<&str> {
        startup_param(&self.startup, key)
    }
}

fn startup_param<'a>(startup: &'a [(String, String)], key: &str) -> Option<&'a str> {
    startup
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

/// Whether a startup packet asks for the console (libpq's default database is the
/// user name, as in the app path).
fn is_console(startup: &[(String, String)]) -> bool {
    startup_param(startup, "database")
        .filter(|db| !db.is_empty())
        .or_else(|| startup_param(startup, "user"))
        .is_some_and(|db| CONSOLE_DATABASES.contains(&db))
}

/// Connection ids for log lines.
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// A new connection's id and the span its log lines go under.
pub fn span(peer: SocketAddr) -> (u64, tracing::Span) {
    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    (id, tracing::info_span!("client", id, peer = %peer))
}

/// Logs how a connection ended and counts the error it was refused with.
pub fn report(shared: &Shared, span: &tracing::Span, result: Result<(), SessionError>) {
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

/// Takes a new connection through the door. `None`: it was a cancel request, now
/// served. Every failure is reported to the client (where the protocol still allows)
/// before it is returned.
pub async fn arrive(
    id: u64,
    tcp: TcpStream,
    peer: SocketAddr,
    shared: &Shared,
    listener: Listener,
) -> Result<Option<Arrival>, SessionError> {
    let _ = tcp.set_nodelay(true);
    if let Err(e) = crate::net::keepalive::set(&tcp, shared.config().tcp_keepalive()) {
        tracing::debug!(error = %e, "setting TCP keepalive on a client socket");
    }
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
    // Boxed: a task's future is as big as its biggest state, and an idle client should
    // not carry the negotiation's for its whole life (10,000 idle clients must cost
    // little memory).
    let Some((mut stream, startup, buf)) =
        Box::pin(negotiate(stream, peer, shared, deadline)).await?
    else {
        return Ok(None);
    };
    let console = is_console(&startup);
    // Accepted in the moment between the drain's start and the accept loop seeing
    // it: refused like Postgres refuses logins while it shuts down.
    if *shared.shutdown.borrow() && !console {
        return fatal(
            &mut stream,
            SqlState::CANNOT_CONNECT_NOW,
            "the pooler is shutting down".into(),
        )
        .await;
    }
    Ok(Some(Arrival {
        stream,
        peer,
        listener,
        startup,
        buf,
        deadline,
        client,
        console,
    }))
}

/// The untagged first packets: TLS and GSS negotiation, cancel requests, and finally
/// the startup packet. `None`: the connection was a cancel request, now served.
async fn negotiate(
    mut stream: Stream,
    peer: SocketAddr,
    shared: &Shared,
    deadline: tokio::time::Instant,
) -> Result<Option<(Stream, Vec<(String, String)>, BytesMut)>, SessionError> {
    let mut buf = BytesMut::with_capacity(256);
    // One SSLRequest and one GSSENCRequest, as PostgreSQL allows (postmaster.c,
    // ProcessStartupPacket): a repeat is no protocol it speaks, and answering each
    // would let one connection make the pooler write forever.
    let (mut ssl_done, mut gss_done) = (false, false);
    loop {
        let packet = loop {
            match startup::read(&mut buf) {
                Ok(Some(p)) => break p,
                Ok(None) => read_within(&mut stream, &mut buf, deadline).await?,
                Err(e) => {
                    return fatal_hinted(&mut stream, e.sqlstate(), e.to_string(), e.hint()).await;
                }
            }
        };
        let repeated = match packet {
            StartupPacket::SslRequest => std::mem::replace(&mut ssl_done, true),
            StartupPacket::GssEncRequest => std::mem::replace(&mut gss_done, true),
            _ => false,
        };
        if repeated {
            return fatal(
                &mut stream,
                SqlState::PROTOCOL_VIOLATION,
                "a second SSL or GSS encryption request on one connection".into(),
            )
            .await;
        }
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
                        match tokio::time::timeout_at(deadline, tcp.write_all(b"S")).await {
                            Ok(written) => written?,
                            Err(_) => return Err(login_timeout(shared)),
                        }
                        // No GSS encryption inside TLS either (postmaster.c).
                        gss_done = true;
                        match tokio::time::timeout_at(deadline, acceptor.accept(tcp)).await {
                            Ok(tls) => Stream::TlsServer(Box::new(tls?)),
                            Err(_) => return Err(login_timeout(shared)),
                        }
                    }
                    (_, mut other) => {
                        // No certificate configured, or TLS already on: say no.
                        write_within(&mut other, b"N", deadline).await?;
                        other
                    }
                };
            }
            StartupPacket::GssEncRequest => write_within(&mut stream, b"N", deadline).await?,
            StartupPacket::Cancel { pid, secret } => {
                // This replica's own keys first (a forwarded request carries the hop
                // bit); another replica's key goes to that replica, once.
                let own = crate::replicas::key::unmarked(pid);
                match shared.cancels.resolve(own, secret) {
                    Some(key) => {
                        shared.metrics.cancels.inc();
                        if let Err(e) = crate::backend::cancel(&shared.target, key).await {
                            tracing::warn!(error = %e, "forwarding a cancel request failed");
                        }
                    }
                    None => {
                        let _ = shared.replicas.forward_cancel(peer.ip(), pid, secret).await;
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
                        write_within(&mut stream, &out, deadline).await?;
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
pub async fn read_within(
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

/// Writes to a client that has not logged in yet, within the login deadline. A
/// client that reads nothing is cut off there, and is told nothing (it would not
/// read it either).
pub async fn write_within(
    stream: &mut Stream,
    bytes: &[u8],
    deadline: tokio::time::Instant,
) -> Result<(), SessionError> {
    match tokio::time::timeout_at(deadline, stream.write_all(bytes)).await {
        Ok(written) => Ok(written?),
        Err(_) => Err(SessionError::Reported {
            code: SqlState::PROTOCOL_VIOLATION,
            message: "the client read nothing within client_login_timeout".into(),
        }),
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

/// How long a FATAL error may take to be written: a client that cannot take a few
/// hundred bytes in this long is not reading, and must not keep its task (and, when
/// linked, its server) waiting on it.
const FATAL_WRITE_LIMIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Sends a FATAL ErrorResponse and ends the session with it.
pub async fn fatal<T>(
    stream: &mut Stream,
    code: SqlState,
    message: String,
) -> Result<T, SessionError> {
    fatal_hinted(stream, code, message, None).await
}

/// [`fatal`], with the hint Postgres gives for the same fault.
pub async fn fatal_hinted<T>(
    stream: &mut Stream,
    code: SqlState,
    message: String,
    hint: Option<&str>,
) -> Result<T, SessionError> {
    let mut out = BytesMut::new();
    msg::error_response(
        &mut out,
        &msg::Diagnostic {
            hint,
            ..msg::Diagnostic::new(msg::Severity::Fatal, code, &message)
        },
    );
    // The client may already be gone; the error is still the session's outcome.
    // Boxed: the timer would otherwise make every future that can end in a FATAL
    // (the relay's, once per transaction) bigger, and its allocation slower.
    let _ = Box::pin(tokio::time::timeout(FATAL_WRITE_LIMIT, async {
        stream.write_all(&out).await?;
        stream.flush().await
    }))
    .await;
    Err(SessionError::Reported { code, message })
}

/// Our own messages are small and NUL-free; failing to encode one is a bug, reported
/// to the client as such rather than a panic.
pub fn encoded(r: Result<(), crate::proto::error::EncodeError>) -> Result<(), SessionError> {
    r.map_err(|e| SessionError::Reported {
        code: SqlState::INTERNAL_ERROR,
        message: format!("encoding a message: {e}"),
    })
}
