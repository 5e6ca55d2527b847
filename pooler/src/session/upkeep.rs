//! The pooler's own conversations with a server between a client's messages: health
//! checks, resets, parameter syncs, and the look at a session after its client changed
//! something (read back unreported parameters, check whether pinning state is gone).

use bytes::BytesMut;
use fallible_iterator::FallibleIterator;
use postgres_protocol::escape::escape_literal;
use postgres_protocol::message::backend::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::client::{Session, server_lost};
use super::routines;
use super::state::{self, READ_BACK};
use crate::backend::ServerConn;
use crate::frontdoor::{SessionError, fatal};
use crate::proto::SqlState;

/// Runs one simple query on an idle server and reads its reply up to ReadyForQuery,
/// which must say idle. Returns the rows' values, if any. Used for health checks,
/// resets and the pooler's own look at a session.
async fn simple(server: &mut ServerConn, sql: &str) -> Result<Vec<Row>, std::io::Error> {
    let bad = |what: &str| std::io::Error::other(what.to_owned());
    let mut out = BytesMut::new();
    postgres_protocol::message::frontend::query(sql, &mut out)?;
    server.stream.write_all(&out).await?;
    let mut rows = Vec::new();
    let mut failed = false;
    loop {
        match Message::parse(&mut server.buf).map_err(|e| bad(&e.to_string()))? {
            // Read up to ReadyForQuery even after an error: the server stays usable.
            Some(Message::ReadyForQuery(body)) if body.status() == b'I' && !failed => {
                return Ok(rows);
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
            Some(Message::DataRow(row)) => {
                let buffer = row.buffer();
                let mut values = Vec::new();
                let mut ranges = row.ranges();
                while let Some(range) = ranges.next().map_err(|e| bad(&e.to_string()))? {
                    values.push(range.map(|r| String::from_utf8_lossy(&buffer[r]).into_owned()));
                }
                rows.push(values);
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
    Ok(bounded_rows(server, sql).await?.into_iter().next())
}

pub(super) async fn bounded_rows(
    server: &mut ServerConn,
    sql: &str,
) -> Result<Vec<Row>, std::io::Error> {
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
    loop {
        // Into the server's own buffer: no zeroed scratch on every checkout.
        if server.buf.capacity() - server.buf.len() < 512 {
            server.buf.reserve(4096);
        }
        match tcp.try_read_buf(&mut server.buf) {
            Ok(0) => return true,
            Ok(_) => {}
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
    server.state = crate::backend::params::ServerParams::from_login(&server.params);
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
    // Nothing of the client's has reached this server yet: `in_flight` is false.
    if let Err(e) = server.stream.write_all(&out).await {
        return server_lost(s, false, e.to_string()).await;
    }
    loop {
        match next_message(s, server).await? {
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

/// The next whole message of a server the pooler talks to on the client's behalf,
/// with nothing of the client's unanswered: a lost server ends the session.
pub(super) async fn next_message(
    s: &mut Session,
    server: &mut ServerConn,
) -> Result<Message, SessionError> {
    loop {
        match Message::parse(&mut server.buf) {
            Ok(Some(m)) => return Ok(m),
            Ok(None) => match server.stream.read_buf(&mut server.buf).await {
                Ok(0) => {
                    return server_lost(s, false, "the server closed the connection".into()).await;
                }
                Ok(_) => {}
                Err(e) => return server_lost(s, false, e.to_string()).await,
            },
            Err(e) => return server_lost(s, false, e.to_string()).await,
        }
    }
}

/// After a stretch in which the client may have changed its session (state.rs):
/// bring the books in line with the server, and pin or unpin the client by what state
/// is left. `false`: the server's parameters are unknown (the read-back failed, e.g.
/// under the client's own 1 ms statement_timeout) and an unpinned client's server must
/// be closed rather than handed on; a pinned client keeps it and the read-back is
/// retried. An error: the client made state it may not keep (no pin slot), and was told
/// so; its server must be closed.
///
/// `routines`: the app's functions are due for a look (routines.rs), which then runs
/// here too; so does it after the client changed one. `routine_kinds`: what the app's
/// functions may have left in this stretch, to look for (0: nothing).
pub(super) async fn settle(
    s: &mut Session,
    server: &mut ServerConn,
    max_pinned: usize,
    routines: bool,
    routine_kinds: u16,
) -> Result<bool, SessionError> {
    let pending = std::mem::take(&mut s.pending);
    if routines || pending.routines {
        if let Err(e) = look_at_routines(&s.role, server).await {
            tracing::debug!(role = %s.role.name, error = %e, "looking at the app's functions failed");
        }
    }
    let carried = carried(s);
    // A probe may have left state (a lock, a setting) whatever the books say: look even
    // when the client is not pinned. A check only matters to a pinned client. After an
    // app's function may have run, look for what its functions may leave.
    let full = pending.probe || (pending.check && s.pin.is_some());
    let kinds = if full {
        state::ALL_STATE
    } else {
        routine_kinds
    };
    let probe = pending.probe || routine_kinds != 0;
    let check = (kinds != 0).then(|| {
        let mut customs = s.customs.clone();
        for name in s.role.routine_customs() {
            customs.noted(&name);
        }
        state::state_left_sql(&escape_literal(&s.role.name), &customs, &carried, kinds)
    });
    // A SET of a parameter the client's startup settings carry pins and asks for a
    // check: read it back too, so its new value is what follows the client; so are
    // the tracked ones after a function that may set parameters.
    let read_back_too = pending.read_back
        || routine_kinds & state::kind::SETTINGS != 0
        || (!carried.is_empty() && (pending.check || probe));
    let mut checked = None;
    let read = if pending.reset_all {
        read_after_reset(s, server).await
    } else if read_back_too {
        // With the check in the same round trip, when both are due.
        let sql = match &check {
            Some(check) => format!("{}; {check}", state::read_back_sql(&carried)),
            None => state::read_back_sql(&carried),
        };
        match bounded_rows(server, &sql).await {
            Ok(rows) => {
                let mut rows = rows.into_iter();
                let read = apply_read_back(s, server, &carried, rows.next());
                checked = check.is_some().then(|| rows.next());
                read
            }
            Err(e) => Err(e),
        }
    } else {
        Ok(())
    };
    if let Err(e) = &read {
        tracing::debug!(role = %s.role.name, error = %e, "reading parameters back failed");
    }
    if let Some(sql) = &check {
        let row = match checked {
            Some(row) => Ok(row),
            None => bounded(server, sql).await,
        };
        let left = match row {
            Ok(Some(row)) => row.first().cloned().flatten().map(|n| n != "0"),
            Ok(None) => None,
            Err(e) => {
                tracing::debug!(role = %s.role.name, error = %e, "session state check failed");
                None
            }
        };
        match left {
            // A loaded library is state no check sees: the client stays pinned.
            Some(false) if server.loaded => {}
            Some(false) => {
                if s.pin.take().is_some() {
                    tracing::debug!(role = %s.role.name, "session state gone: client unpinned");
                }
            }
            Some(true) => {
                if s.pin.is_none() {
                    pin_or_refuse(s, max_pinned).await?;
                }
            }
            // Unknown: look again after the next statement; meanwhile a probe counts as
            // state left (the client must not lose a lock it may hold).
            None => {
                s.pending.check |= pending.check;
                s.pending.probe |= probe;
                if probe && s.pin.is_none() {
                    pin_or_refuse(s, max_pinned).await?;
                }
            }
        }
    }
    if pending.reset_all && read.is_ok() {
        resync(s, server).await?;
    }
    if read.is_err() {
        if s.pin.is_some() {
            // Same server next time: read again then.
            s.pending.read_back |= pending.read_back;
            s.pending.reset_all |= pending.reset_all;
        } else {
            // The server is closed, and whatever the reset did goes with it: the client
            // gets what a reset gives it, its startup values, on the next one.
            if pending.reset_all {
                s.params.reset_to_startup();
            }
            return Ok(false);
        }
    }
    Ok(true)
}

/// After a reset the server's parameters are at its login values, where a direct
/// client's are back at its startup values: set those again at once, and tell the
/// client of each reported one that changed (ParameterStatus), as Postgres tells a
/// client of every change it makes.
async fn resync(s: &mut Session, server: &mut ServerConn) -> Result<(), SessionError> {
    let before: Vec<(String, String)> = server
        .state
        .reported_values()
        .map(|(n, v)| (n.to_owned(), v.to_owned()))
        .collect();
    sync_params(s, server).await?;
    let mut out = BytesMut::new();
    for (name, value) in server.state.reported_values() {
        if !before.iter().any(|(n, v)| n == name && v == value) {
            // A value the protocol cannot carry (a NUL) is not announced.
            let _ = crate::proto::backend::parameter_status(&mut out, name, value.as_bytes());
        }
    }
    if !out.is_empty() {
        s.stream.write_all(&out).await?;
    }
    Ok(())
}

/// Session mode, after the client's `RESET` or `DISCARD ALL`: what `settle` does in
/// transaction mode for resets (its server is its own, nothing else is looked at).
pub(super) async fn after_reset(
    s: &mut Session,
    server: &mut ServerConn,
) -> Result<(), SessionError> {
    s.pending.reset_all = false;
    match read_after_reset(s, server).await {
        Ok(()) => resync(s, server).await,
        Err(e) => {
            tracing::debug!(role = %s.role.name, error = %e, "reading parameters back failed");
            Ok(())
        }
    }
}

/// The parameters the pooler sets for this client on every server besides the
/// tracked ones: its startup settings (`-c work_mem=…`, `app.tenant=…`), lower case.
fn carried(s: &Session) -> Vec<String> {
    s.params
        .iter()
        .map(|(name, _)| name.to_ascii_lowercase())
        .filter(|name| !state::TRACKED.contains(&name.as_str()))
        .collect()
}

/// Reads back the tracked parameters Postgres does not report, and the client's
/// carried ones.
async fn read_back(s: &mut Session, server: &mut ServerConn) -> Result<(), std::io::Error> {
    let carried = carried(s);
    let row = bounded(server, &state::read_back_sql(&carried)).await?;
    apply_read_back(s, server, &carried, row)
}

/// The row of `read_back_sql` into both sides' books.
fn apply_read_back(
    s: &mut Session,
    server: &mut ServerConn,
    carried: &[String],
    row: Option<Row>,
) -> Result<(), std::io::Error> {
    let row = row.ok_or_else(|| std::io::Error::other("no row from the read-back"))?;
    let names = READ_BACK
        .iter()
        .copied()
        .chain(carried.iter().map(String::as_str));
    for (name, value) in names.zip(row) {
        if let Some(value) = value {
            server.state.record(name, &value);
            s.params.record(name, &value);
        }
    }
    Ok(())
}

/// Looks at what the app's functions may leave on a session (routines.rs).
pub(super) async fn look_at_routines(
    role: &crate::shared::RoleShared,
    server: &mut ServerConn,
) -> Result<(), std::io::Error> {
    let rows = bounded_rows(server, &routines::routines_sql()).await?;
    let rows: Vec<(String, Option<String>)> = rows
        .into_iter()
        .map(|mut r| {
            let body = r.get_mut(1).and_then(Option::take);
            let language = r.into_iter().next().flatten().unwrap_or_default();
            (language, body)
        })
        .collect();
    let (kinds, customs) = routines::judge(rows.iter().map(|(l, b)| (l.as_str(), b.as_deref())));
    if (kinds != 0) != role.routines_risky() {
        tracing::info!(role = %role.name, risky = kinds != 0, "looked at the app's functions: every transaction is checked when they may leave session state");
    }
    role.set_routines(kinds, customs.to_names());
    Ok(())
}

/// After `RESET ALL` or `DISCARD ALL`, which may have failed or been rolled back (or
/// been followed by a `SET` in the same batch), nothing is assumed: every parameter the
/// books know of is read from the server, with the value a reset gives it. One that
/// differs from its reset value is the client's (a reset that did not happen, or a SET
/// after it); one at its reset value gets the client's startup value, as a reset gives
/// a client connected to Postgres directly.
///
/// One case comes out wrong, harmlessly: a rolled-back reset of a parameter the client
/// had set to exactly the server's reset value, which then returns to the client's
/// startup value. The server's books are always right, so nothing leaks.
async fn read_after_reset(s: &mut Session, server: &mut ServerConn) -> Result<(), std::io::Error> {
    let mut names: Vec<String> = Vec::new();
    let known = state::TRACKED
        .iter()
        .copied()
        .chain(server.state.names())
        .chain(s.params.iter().map(|(name, _)| name));
    for name in known {
        if !names.iter().any(|n| n.eq_ignore_ascii_case(name)) {
            names.push(name.to_owned());
        }
    }
    let sql = state::reset_read_sql(names.iter().map(String::as_str));
    let rows = bounded_rows(server, &sql).await?;
    let [now, reset] = <[Row; 2]>::try_from(rows)
        .map_err(|_| std::io::Error::other("not two rows from the read-back"))?;
    for ((name, value), reset) in names.iter().zip(now).zip(reset) {
        let Some(value) = value else { continue };
        // The in-between RESET ALL may have reported values: these are the real ones.
        server.state.record(name, &value);
        if reset.as_deref() == Some(value.as_str()) {
            s.params.back_to_startup(name);
        } else {
            s.params.record(name, &value);
        }
    }
    Ok(())
}

/// Under a pause: whether an idle client that keeps its server (session mode, pinned)
/// could move to another one. `None`: nothing is left that cannot follow it (its
/// unreported parameters are read back first, so they do); otherwise what is left,
/// for `PAUSE` to report.
pub(super) async fn what_holds(s: &mut Session, server: &mut ServerConn) -> Option<String> {
    if server.loaded {
        return Some("a library loaded with LOAD".into());
    }
    if let Err(e) = read_back(s, server).await {
        return Some(format!("its parameters could not be read: {e}"));
    }
    let carried = carried(s);
    let (sql, labels) = state::state_parts_sql(&escape_literal(&s.role.name), &s.customs, &carried);
    let row = match bounded(server, &sql).await {
        Ok(Some(row)) => row,
        Ok(None) => return Some("its session state could not be read".into()),
        Err(e) => return Some(format!("its session state could not be read: {e}")),
    };
    let left: Vec<String> = labels
        .iter()
        .zip(row)
        .filter_map(|(label, n)| {
            let n = n?;
            (n != "0").then(|| format!("{label}: {n}"))
        })
        .collect();
    (!left.is_empty()).then(|| left.join(", "))
}

/// Pins a client whose state turned out to be left on its server, or tells it it may
/// not keep it: the session ends and its server is closed with the state.
async fn pin_or_refuse(s: &mut Session, max_pinned: usize) -> Result<(), SessionError> {
    match s.role.try_pin(max_pinned) {
        Some(slot) => {
            s.pin = Some(slot);
            Ok(())
        }
        None => {
            let message = format!(
                "too many clients of role \"{}\" hold session state (max_pinned_per_role = \
                 {max_pinned}); the session advisory lock or setting this session made cannot \
                 be kept in transaction mode, and the session is closed: connect to the session \
                 port or set the app's pool_mode to session",
                s.role.name
            );
            fatal(
                &mut s.stream,
                SqlState::CONFIGURATION_LIMIT_EXCEEDED,
                message,
            )
            .await
        }
    }
}
