//! The pooler's own conversations with a server between a client's messages: health
//! checks, resets, parameter syncs, and the look at a session after its client changed
//! something (read back unreported parameters, check whether pinning state is gone).

use bytes::BytesMut;
use fallible_iterator::FallibleIterator;
use postgres_protocol::escape::escape_literal;
use postgres_protocol::message::backend::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::login::Session;
use super::relay::server_lost;
use super::state::{self, READ_BACK};
use super::{SessionError, fatal};
use crate::backend::ServerConn;
use crate::proto::SqlState;

/// Runs one simple query on an idle server and reads its reply up to ReadyForQuery,
/// which must say idle. Returns the first row's values, if any. Used for health
/// checks, resets and the pooler's own look at a session.
async fn simple(server: &mut ServerConn, sql: &str) -> Result<Option<Row>, std::io::Error> {
    let bad = |what: &str| std::io::Error::other(what.to_owned());
    let mut out = BytesMut::new();
    postgres_protocol::message::frontend::query(sql, &mut out)?;
    server.stream.write_all(&out).await?;
    let mut first = None;
    let mut failed = false;
    loop {
        match Message::parse(&mut server.buf).map_err(|e| bad(&e.to_string()))? {
            // Read up to ReadyForQuery even after an error: the server stays usable.
            Some(Message::ReadyForQuery(body)) if body.status() == b'I' && !failed => {
                return Ok(first);
            }
            Some(Message::ReadyForQuery(body)) if body.status() == b'I' => {
                return Err(bad("the server reported an error"));
            }
            Some(Message::ReadyForQuery(_)) => return Err(bad("server not idle after a reset")),
            Some(Message::ErrorResponse(_)) => failed = true,
            Some(Message::ParameterStatus(body)) => {
                if let (Ok(n), Ok(v)) = (body.name(), body.value()) {
                    server.state.record(n, v);
                }
            }
            Some(Message::DataRow(row)) if first.is_none() => {
                let buffer = row.buffer();
                let mut values = Vec::new();
                let mut ranges = row.ranges();
                while let Some(range) = ranges.next().map_err(|e| bad(&e.to_string()))? {
                    values.push(range.map(|r| String::from_utf8_lossy(&buffer[r]).into_owned()));
                }
                first = Some(values);
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

/// One row of text values (NULL is `None`).
type Row = Vec<Option<String>>;

/// How long a health check or a reset may take before the server is given up.
const SERVER_ROUND_TRIP: std::time::Duration = std::time::Duration::from_secs(5);

async fn bounded(server: &mut ServerConn, sql: &str) -> Result<Option<Row>, std::io::Error> {
    tokio::time::timeout(SERVER_ROUND_TRIP, simple(server, sql))
        .await
        .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
}

/// An empty query: the cheapest round trip that proves the server is alive.
pub(super) async fn check(server: &mut ServerConn) -> Result<(), std::io::Error> {
    bounded(server, "").await.map(drop)
}

/// Whether an idle server has something to say before anyone asked: a FATAL (idle
/// session timeout, an administrator's terminate, a restart) or end of file means it is
/// gone; notices and notifications would reach the wrong client, so they are dropped.
/// Only plaintext sockets can be peeked without blocking; TLS servers are covered by
/// the health check of servers idle past `server_check_delay`.
pub(super) fn stale(server: &mut ServerConn) -> bool {
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
pub(super) async fn reset(server: &mut ServerConn) -> Result<(), std::io::Error> {
    bounded(server, "DISCARD ALL").await?;
    server.statements.clear();
    server.state = crate::session::params::ServerParams::from_login(&server.params);
    Ok(())
}

/// Makes the server's session parameters what this client expects, before its first
/// message. One round trip, and only when something differs.
pub(super) async fn sync_params(
    s: &mut Session,
    server: &mut ServerConn,
) -> Result<(), SessionError> {
    let Some(sql) = server.state.sync_sql(&s.params) else {
        server.state.matches(&s.params);
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

/// After a stretch in which the client may have changed its session (state.rs):
/// bring the books in line with the server, and unpin the client if its state is gone.
/// `false`: the server's parameters are unknown (the read-back failed, e.g. under the
/// client's own 1 ms statement_timeout) and an unpinned client's server must be closed
/// rather than handed on; a pinned client keeps it and the read-back is retried.
pub(super) async fn settle(s: &mut Session, server: &mut ServerConn) -> Result<bool, SessionError> {
    let pending = std::mem::take(&mut s.pending);
    if pending.reset_all {
        // RESET ALL / DISCARD ALL brought back the values of the server's login, not
        // the client's startup ones; the next sync restores the client's.
        s.params.reset_to_startup();
        server.state = crate::session::params::ServerParams::from_login(&server.params);
    }
    if pending.read_back {
        match bounded(server, &state::read_back_sql()).await {
            Ok(Some(row)) => {
                for (name, value) in READ_BACK.iter().zip(row) {
                    if let Some(value) = value {
                        server.state.record(name, &value);
                        s.params.record(name, &value);
                    }
                }
            }
            Ok(None) => {}
            Err(e) => {
                tracing::debug!(role = %s.role.name, error = %e, "reading parameters back failed");
                s.pending.read_back = true;
                s.pending.check |= pending.check;
                return Ok(s.pin.is_some());
            }
        }
    }
    if pending.check && s.pin.is_some() {
        let sql = state::state_left_sql(&escape_literal(&s.role.name));
        match bounded(server, &sql).await {
            Ok(Some(row)) => {
                let left = row.first().cloned().flatten().unwrap_or_default();
                if left == "0" {
                    tracing::debug!(role = %s.role.name, "session state gone: client unpinned");
                    s.pin = None;
                }
            }
            Ok(None) => {}
            // Stays pinned: safe, and checked again after its next statement.
            Err(e) => {
                tracing::debug!(role = %s.role.name, error = %e, "session state check failed")
            }
        }
    }
    Ok(true)
}
