//! The pooling loop. The client holds no server while idle; its first message checks
//! one out of the role's pool; bytes are relayed unchanged (only tags, ReadyForQuery
//! status and ParameterStatus are looked at); the server goes back when Postgres says
//! the session is idle (`Z` with `I`), every request has had its reply, the client has
//! not sent half of a message or an unsynced extended-protocol batch, and everything
//! has been written to the client.

use std::ops::ControlFlow;

use bytes::{Buf, BytesMut};
use postgres_protocol::message::backend::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::cursor::Cursor;
use super::login::Session;
use super::prepared::{Replies, Rewriter};
use super::tracker::{MAX_PENDING, Tracker};
use super::{SessionError, fatal};
use crate::auth::cache::{PoolMode, RoleAuth};
use crate::backend::ServerConn;
use crate::pool::{Checkout, PoolError, RoleLimits};
use crate::proto::SqlState;
use crate::proto::frame::Side;
use crate::shared::{RoleShared, Shared};

/// Initial read buffer; grows only while a message we must see whole is larger.
const READ_CHUNK: usize = 16 * 1024;

/// How a linked stretch ended.
enum Linked {
    /// The server is idle and clean: give it back.
    Done,
    /// The client left (Terminate or EOF); `clean` if its server can be reused.
    ClientLeft { clean: bool },
}

pub async fn run(mut s: Session, shared: &Shared) -> Result<(), SessionError> {
    let mut revoked = s.revoked.clone();
    let mut shutdown = shared.shutdown.clone();
    loop {
        // Idle: no server. Wait for a whole message header from the client.
        while s.buf.len() < 5 {
            if s.buf.capacity() - s.buf.len() < 5 {
                s.buf.reserve(READ_CHUNK);
            }
            tokio::select! {
                n = s.stream.read_buf(&mut s.buf) => {
                    if n? == 0 {
                        return Ok(());
                    }
                }
                _ = revoked.changed() => return revoked_error(&mut s).await,
                _ = shutdown.changed() => {
                    return fatal(&mut s.stream, SqlState::ADMIN_SHUTDOWN, "the pooler is shutting down".into()).await;
                }
            }
        }
        if s.buf[0] == b'X' {
            return Ok(());
        }
        let mut server = match checkout(shared, &s.role, &s.auth).await {
            Ok(server) => server,
            Err((code, message)) => return fatal(&mut s.stream, code, message).await,
        };
        let outcome = link(
            &mut s,
            &mut server,
            &mut revoked,
            shared.config.max_prepared_statements,
        )
        .await;
        s.cancel.slot.unlink();
        match outcome {
            Ok(Linked::Done) => server.release(),
            Ok(Linked::ClientLeft { clean }) => {
                if !clean {
                    // Mid-transaction: never hand it on; closing rolls it back.
                    server.discard();
                } else if s.mode == PoolMode::Session {
                    // A whole session's state (SET, LISTEN, prepared statements,
                    // advisory locks) goes with its client.
                    match reset(&mut server).await {
                        Ok(()) => server.release(),
                        Err(e) => {
                            tracing::debug!(error = %e, "resetting a session server failed");
                            server.discard();
                        }
                    }
                } else {
                    server.release();
                }
                return Ok(());
            }
            Err(e) => {
                server.discard();
                return Err(e);
            }
        }
    }
}

/// Checks a server out of the role's pool, mapping failures to what the client is told.
pub(super) async fn checkout(
    shared: &Shared,
    role: &RoleShared,
    auth: &RoleAuth,
) -> Result<Checkout<ServerConn>, (SqlState, String)> {
    let pool_size = auth.pool_size.unwrap_or(shared.config.default_pool_size);
    let limits = RoleLimits {
        pool_size: u32::try_from(pool_size).unwrap_or(u32::MAX),
        weight: 1,
    };
    let wait = shared.config.query_wait_timeout();
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
        if server.idle_for() > shared.config.server_check_delay() {
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

fn checkout_result(
    result: Result<Checkout<ServerConn>, PoolError>,
) -> Result<Checkout<ServerConn>, (SqlState, String)> {
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

/// Relays between the client and its server until the server can be released (in
/// transaction mode) or the client leaves.
///
/// Writes to either side go on while the other side is read: a client pipelining more
/// than the sockets buffer while Postgres answers as much would otherwise deadlock
/// (each side blocked writing to the other).
async fn link(
    s: &mut Session,
    server: &mut ServerConn,
    revoked: &mut tokio::sync::watch::Receiver<u64>,
    max_prepared: usize,
) -> Result<Linked, SessionError> {
    sync_params(s, server).await?;
    // After the pooler's own SETs: a cancel now reaches the client's query only.
    s.cancel.slot.link(server.key);
    let mut client_cursor = Cursor::default();
    let mut server_cursor = Cursor::default();
    let mut sbuf = std::mem::take(&mut server.buf);
    let mut tracker = Tracker::default();
    let mut replies = Replies::default();
    // Reused across batches: no allocation per relayed message once warm.
    let mut edits: Vec<(usize, usize, usize, usize)> = Vec::new();
    let mut scratch = BytesMut::new();
    let mut rewritten = BytesMut::new();
    let mut dropped: Vec<(usize, usize)> = Vec::new();
    let session_mode = s.mode == PoolMode::Session;
    loop {
        if !s.buf.is_empty() {
            let mut too_many = false;
            let mut malformed = false;
            // Named statements are renamed and prepared where needed (prepared.rs):
            // whole messages that change are collected as edits.
            edits.clear();
            let mut rewriter = Rewriter {
                client: &mut s.statements,
                server: &mut server.statements,
                replies: &mut replies,
                max_per_server: max_prepared,
            };
            let walked = client_cursor.advance(
                &s.buf,
                Side::Frontend,
                Rewriter::needs_body,
                |tag, at, body| {
                    match tracker.client(tag) {
                        Ok(ControlFlow::Break(())) => return ControlFlow::Break(()),
                        Ok(ControlFlow::Continue(())) => {}
                        Err(_) => {
                            too_many = true;
                            return ControlFlow::Break(());
                        }
                    }
                    if Rewriter::needs_body(tag) {
                        let raw = &s.buf[at..at + 5 + body.len()];
                        let start = scratch.len();
                        if rewriter.message(tag, raw, &mut scratch).is_err() {
                            malformed = true;
                            return ControlFlow::Break(());
                        }
                        if &scratch[start..] != raw {
                            edits.push((at, raw.len(), start, scratch.len()));
                        } else {
                            scratch.truncate(start);
                        }
                    }
                    ControlFlow::Continue(())
                },
            );
            let n = match walked {
                Ok(n) if !malformed => n,
                Ok(_) => {
                    return fatal(
                        &mut s.stream,
                        SqlState::PROTOCOL_VIOLATION,
                        "malformed extended-protocol message".into(),
                    )
                    .await;
                }
                Err(e) => {
                    return fatal(&mut s.stream, SqlState::PROTOCOL_VIOLATION, e.to_string()).await;
                }
            };
            if too_many {
                let message = format!(
                    "more than {MAX_PENDING} pipelined requests without reading their replies"
                );
                return fatal(&mut s.stream, SqlState::PROTOCOL_VIOLATION, message).await;
            }
            // What goes to the server: the client's bytes, or with edits applied.
            let outgoing: &[u8] = if edits.is_empty() {
                &s.buf[..n]
            } else {
                rewritten.clear();
                let mut from = 0;
                for &(at, len, start, end) in &edits {
                    rewritten.extend_from_slice(&s.buf[from..at]);
                    rewritten.extend_from_slice(&scratch[start..end]);
                    from = at + len;
                }
                rewritten.extend_from_slice(&s.buf[from..n]);
                &rewritten
            };
            // Forward it while draining the server into the client.
            let mut written = 0;
            let total = outgoing.len();
            while written < total {
                let (mut from_server, mut to_server) = tokio::io::split(&mut server.stream);
                if sbuf.capacity() - sbuf.len() < 1024 {
                    sbuf.reserve(READ_CHUNK);
                }
                tokio::select! {
                    w = to_server.write(&outgoing[written..]) => match w {
                        Ok(0) => return server_lost(s, "the server stopped reading".into()).await,
                        Ok(w) => written += w,
                        Err(e) => return server_lost(s, e.to_string()).await,
                    },
                    r = from_server.read_buf(&mut sbuf) => {
                        drop((from_server, to_server));
                        if let Some(why) = server_gone(r) {
                            return server_lost(s, why).await;
                        }
                        let to_client = match scan_server(&mut server_cursor, &mut tracker, &mut replies, &mut dropped, &sbuf, server, &mut s.params) {
                            Ok(k) => k,
                            Err(e) => return server_lost(s, e).await,
                        };
                        write_skipping(&mut s.stream, &sbuf[..to_client], &dropped).await?;
                        sbuf.advance(to_client);
                    }
                }
            }
            s.buf.advance(n);
            scratch.clear();
            if tracker.terminated() {
                let clean = tracker.idle() && sbuf.is_empty() && server_cursor.at_boundary();
                return Ok(Linked::ClientLeft { clean });
            }
        }
        // Half a client message waiting for the rest (a Parse to rewrite is held until
        // whole) keeps the server too.
        let idle = tracker.idle()
            && s.buf.is_empty()
            && client_cursor.at_boundary()
            && server_cursor.at_boundary()
            && sbuf.is_empty();
        if idle && !session_mode {
            return Ok(Linked::Done);
        }
        if s.buf.capacity() - s.buf.len() < 1024 {
            s.buf.reserve(READ_CHUNK);
        }
        if sbuf.capacity() - sbuf.len() < 1024 {
            sbuf.reserve(READ_CHUNK);
        }
        tokio::select! {
            n = s.stream.read_buf(&mut s.buf) => {
                if n? == 0 {
                    return Ok(Linked::ClientLeft { clean: idle });
                }
            }
            n = server.stream.read_buf(&mut sbuf) => {
                if let Some(why) = server_gone(n) {
                    return server_lost(s, why).await;
                }
                let to_client = match scan_server(&mut server_cursor, &mut tracker, &mut replies, &mut dropped, &sbuf, server, &mut s.params) {
                    Ok(k) => k,
                    Err(e) => return server_lost(s, e).await,
                };
                if to_client > 0 {
                    write_skipping(&mut s.stream, &sbuf[..to_client], &dropped).await?;
                    sbuf.advance(to_client);
                }
            }
            _ = revoked.changed() => return revoked_error(s).await,
        }
    }
}

/// Walks the server's bytes: ReadyForQuery and copy starts feed the tracker,
/// ParameterStatus updates both sides' parameters. Returns how many bytes may go to
/// the client now.
fn scan_server(
    cursor: &mut Cursor,
    tracker: &mut Tracker,
    replies: &mut Replies,
    dropped: &mut Vec<(usize, usize)>,
    sbuf: &[u8],
    server: &mut ServerConn,
    params: &mut crate::session::params::ClientParams,
) -> Result<usize, String> {
    dropped.clear();
    cursor
        .advance(
            sbuf,
            Side::Backend,
            |tag| matches!(tag, b'Z' | b'S' | b'1' | b'3'),
            |tag, at, body| {
                match tag {
                    b'S' => {
                        if let Some((name, value)) = parameter_status(body) {
                            server.state.record(name, value);
                            params.record(name, value);
                        }
                    }
                    _ => {
                        tracker.server(tag, body);
                        if replies.server(tag) {
                            // The reply to a Parse or Close the pooler added.
                            dropped.push((at, 5 + body.len()));
                        }
                    }
                }
                ControlFlow::Continue(())
            },
        )
        .map_err(|e| format!("malformed message from the server: {e}"))
}

/// Why a read from the server ended the link, if it did.
fn server_gone(read: std::io::Result<usize>) -> Option<String> {
    match read {
        Ok(0) => Some("the server closed the connection".into()),
        Ok(_) => None,
        Err(e) => Some(e.to_string()),
    }
}

/// Writes `bytes` to the client but for the `skip` ranges (replies it did not ask for).
async fn write_skipping(
    stream: &mut crate::net::stream::Stream,
    bytes: &[u8],
    skip: &[(usize, usize)],
) -> std::io::Result<()> {
    let mut from = 0;
    for &(at, len) in skip {
        if at > from {
            stream.write_all(&bytes[from..at]).await?;
        }
        from = at + len;
    }
    if from < bytes.len() {
        stream.write_all(&bytes[from..]).await?;
    }
    Ok(())
}

/// Runs one simple query on an idle server and reads its reply up to ReadyForQuery,
/// which must say idle. Used for health checks and session resets.
async fn simple(server: &mut ServerConn, sql: &str) -> Result<(), std::io::Error> {
    let bad = |what: &str| std::io::Error::other(what.to_owned());
    let mut out = BytesMut::new();
    postgres_protocol::message::frontend::query(sql, &mut out)?;
    server.stream.write_all(&out).await?;
    loop {
        match Message::parse(&mut server.buf).map_err(|e| bad(&e.to_string()))? {
            Some(Message::ReadyForQuery(body)) if body.status() == b'I' => return Ok(()),
            Some(Message::ReadyForQuery(_)) => return Err(bad("server not idle after a reset")),
            Some(Message::ErrorResponse(_)) => return Err(bad("the server reported an error")),
            Some(Message::ParameterStatus(body)) => {
                if let (Ok(n), Ok(v)) = (body.name(), body.value()) {
                    server.state.record(n, v);
                }
            }
            Some(_) => {}
            None => {
                if server.stream.read_buf(&mut server.buf).await? == 0 {
                    return Err(std::io::ErrorKind::UnexpectedEof.into());
                }
            }
        }
    }
}

/// How long a health check or a reset may take before the server is given up.
const SERVER_ROUND_TRIP: std::time::Duration = std::time::Duration::from_secs(5);

async fn bounded(server: &mut ServerConn, sql: &str) -> Result<(), std::io::Error> {
    tokio::time::timeout(SERVER_ROUND_TRIP, simple(server, sql))
        .await
        .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
}

/// An empty query: the cheapest round trip that proves the server is alive.
async fn check(server: &mut ServerConn) -> Result<(), std::io::Error> {
    bounded(server, "").await
}

/// Whether an idle server has something to say before anyone asked: a FATAL (idle
/// session timeout, an administrator's terminate, a restart) or end of file means it is
/// gone; notices and notifications would reach the wrong client, so they are dropped.
/// Only plaintext sockets can be peeked without blocking; TLS servers are covered by
/// the health check of servers idle past `server_check_delay`.
fn stale(server: &mut ServerConn) -> bool {
    let crate::net::stream::Stream::Plain(tcp) = &server.stream else {
        return false;
    };
    let mut chunk = [0u8; 4096];
    loop {
        match tcp.try_read(&mut chunk) {
            Ok(0) => return true,
            Ok(n) => server.buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(_) => return true,
        }
    }
    loop {
        match Message::parse(&mut server.buf) {
            Ok(Some(Message::ErrorResponse(_))) | Err(_) => return true,
            Ok(Some(Message::ParameterStatus(body))) => {
                if let (Ok(n), Ok(v)) = (body.name(), body.value()) {
                    server.state.record(n, v);
                }
            }
            Ok(Some(_)) => {}
            Ok(None) => return !server.buf.is_empty(),
        }
    }
}

/// Back to a fresh session: `DISCARD ALL` drops temp tables, prepared statements,
/// LISTENs, advisory locks and session settings (the role's defaults come back).
async fn reset(server: &mut ServerConn) -> Result<(), std::io::Error> {
    bounded(server, "DISCARD ALL").await?;
    server.statements.clear();
    server.state = crate::session::params::ServerParams::from_login(&server.params);
    Ok(())
}

/// Makes the server's session parameters what this client expects, before its first
/// message. One round trip, and only when something differs.
async fn sync_params(s: &mut Session, server: &mut ServerConn) -> Result<(), SessionError> {
    let Some(sql) = server.state.sync_sql(&s.params) else {
        return Ok(());
    };
    let mut out = BytesMut::new();
    postgres_protocol::message::frontend::query(&sql, &mut out)?;
    if let Err(e) = server.stream.write_all(&out).await {
        return server_lost(s, e.to_string()).await;
    }
    loop {
        let msg = match Message::parse(&mut server.buf) {
            Ok(Some(m)) => m,
            Ok(None) => {
                match server.stream.read_buf(&mut server.buf).await {
                    Ok(0) => {
                        return server_lost(s, "the server closed the connection".into()).await;
                    }
                    Ok(_) => {}
                    Err(e) => return server_lost(s, e.to_string()).await,
                }
                continue;
            }
            Err(e) => return server_lost(s, e.to_string()).await,
        };
        match msg {
            Message::ParameterStatus(body) => {
                if let (Ok(n), Ok(v)) = (body.name(), body.value()) {
                    server.state.record(n, v);
                }
            }
            Message::ErrorResponse(body) => {
                // A startup parameter the server rejects (a bogus TimeZone): Postgres
                // would have refused the connection, so do the same.
                let e = crate::backend::server_error(&mut body.fields());
                return fatal(
                    &mut s.stream,
                    SqlState::FEATURE_NOT_SUPPORTED,
                    format!("invalid startup parameter: {e}"),
                )
                .await;
            }
            Message::ReadyForQuery(_) => break,
            _ => {}
        }
    }
    server.state.synced(&s.params);
    Ok(())
}

fn parameter_status(body: &[u8]) -> Option<(&str, &str)> {
    let mut parts = body.split(|b| *b == 0);
    let name = std::str::from_utf8(parts.next()?).ok()?;
    let value = std::str::from_utf8(parts.next()?).ok()?;
    Some((name, value))
}

async fn server_lost<T>(s: &mut Session, why: String) -> Result<T, SessionError> {
    tracing::warn!(role = %s.role.name, why = %why, "server connection lost");
    fatal(
        &mut s.stream,
        SqlState::ADMIN_SHUTDOWN,
        format!("the server connection was lost ({why}); an open transaction was rolled back"),
    )
    .await
}

async fn revoked_error<T>(s: &mut Session) -> Result<T, SessionError> {
    fatal(
        &mut s.stream,
        SqlState::ADMIN_SHUTDOWN,
        format!(
            "terminating connection: role \"{}\" was suspended or deleted",
            s.role.name
        ),
    )
    .await
}
