//! One linked stretch: the client's and its server's bytes moved both ways until
//! the server can go back (relay.rs decides what happens to it then), with the
//! deadlines and limits of the stretch.

use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::AsyncReadExt;

use super::client::{Session, server_lost};
use super::cursor::{Cursor, CursorError, Event, Need};
use super::hold::Hold;
use super::listen;
use super::prepared::{PreparedLimits, Rest, Rewriter, StreamedText};
use super::signals::{Signals, Stop};
use super::stall::{Wait, Watch};
use super::state::{Effect, Windows};
use super::tracker::MAX_PENDING;
use super::upkeep::{after_reset, settle};
use super::wire::{ClientSide, Gone, Relayed, ServerScan, from_server, server_gone, write_or_read};
use crate::auth::cache::PoolMode;
use crate::backend::ServerConn;
use crate::frontdoor::{SessionError, fatal};
use crate::metrics::Limit;
use crate::proto::SqlState;
use crate::proto::frame::Side;
use crate::registry::ClientInfo;
use crate::shared::Shared;

/// A linked stretch's read buffers; grow only while a message we must see whole is
/// larger.
pub(super) const READ_CHUNK: usize = 16 * 1024;

/// How a linked stretch ended.
pub(super) enum Linked {
    /// The server is idle and clean: give it back.
    Done,
    /// The client left (Terminate or EOF); `clean` if its server can be reused.
    ClientLeft { clean: bool },
    /// Idle, but its session parameters are not known: close it, the client goes on.
    Unknown,
    /// Idle, and the pooler is shutting down: the server goes back (reset if the
    /// client had session state), the client is told to leave.
    Drained,
    /// Idle, its role paused, and nothing on the server that cannot move: a client
    /// that keeps its server between transactions (session mode, pinned) lets it go
    /// (reset), and gets another after RESUME (hold.rs).
    Paused,
}

/// What a linked stretch works with besides the session and its server.
pub(super) struct Around<'a> {
    pub(super) shared: &'a Shared,
    pub(super) client: &'a Arc<ClientInfo>,
    pub(super) signals: &'a Signals,
    pub(super) limits: &'a Limits,
}

/// A linked stretch's bounds, read from the configuration once per stretch, and what
/// else it may have to look at.
pub(super) struct Limits {
    pub(super) max_pinned: usize,
    pub(super) prepared: PreparedLimits,
    /// `client_stall_timeout`.
    pub(super) stall: Duration,
    /// `idle_transaction_timeout`, when on.
    pub(super) idle_transaction: Option<Duration>,
    /// The app's functions are due for a look (routines.rs).
    pub(super) routines_due: bool,
}

/// Notes what the client's last messages may have done to its session; pins it to
/// its server (within the role's bound) when they may have made state that cannot
/// follow it, and gives the server the client's channels before an UNLISTEN. Runs
/// before those messages are forwarded, so a refused pin leaves nothing behind.
/// `quiet`: the server's transaction status, if none of the client's requests is in
/// flight.
async fn take_effect(
    s: &mut Session,
    effect: Effect,
    max_pinned: usize,
    server: &mut ServerConn,
    sbuf: &mut BytesMut,
    quiet: Option<u8>,
) -> Result<(), SessionError> {
    if effect.pin && s.pin.is_none() {
        match s.role.try_pin(max_pinned) {
            Some(slot) => s.pin = Some(slot),
            None => {
                let message = format!(
                    "too many clients of role \"{}\" hold session state (max_pinned_per_role = {max_pinned}); \
                     temporary tables, session advisory locks, SQL PREPARE, SET ROLE and SET of \
                     untracked parameters need session mode: connect to the session port or set \
                     the app's pool_mode to session",
                    s.role.name
                );
                return fatal(
                    &mut s.stream,
                    SqlState::CONFIGURATION_LIMIT_EXCEEDED,
                    message,
                )
                .await;
            }
        }
    }
    if effect.unlisten {
        // The prime talks to the server through its own buffer, empty while quiet.
        std::mem::swap(&mut server.buf, sbuf);
        let primed = listen::prime(s, server, quiet).await;
        std::mem::swap(&mut server.buf, sbuf);
        primed?;
    }
    s.pending.merge(Effect {
        pin: false,
        ..effect
    });
    Ok(())
}

/// Relays between the client and its server until the server can be released (in
/// transaction mode) or the client leaves.
///
/// Writes to either side go on while the other side is read: a client pipelining more
/// than the sockets buffer while Postgres answers as much would otherwise deadlock
/// (each side blocked writing to the other).
pub(super) async fn link(
    s: &mut Session,
    server: &mut ServerConn,
    sbuf: &mut BytesMut,
    scan: &mut ServerScan,
    around: Around<'_>,
) -> Result<Linked, SessionError> {
    let Around {
        shared,
        client,
        signals,
        limits,
    } = around;
    let max_pinned = limits.max_pinned;
    let max_prepared = limits.prepared;
    // After the pooler's own SETs: a cancel now reaches the client's query only.
    s.cancel.slot.link(server.key);
    let mut hold = Hold::new(&shared.pause, client.id, s.role.name.clone());
    let mut look_at_routines = limits.routines_due;
    let mut client_cursor = Cursor::default();
    // What becomes of the rest of a client message streamed past its head, and the
    // classification of its text (prepared.rs, state/window.rs).
    let mut rest = Rest::Pass;
    let mut windows = Windows::default();
    let mut streamed = StreamedText::default();
    let mut watch = Watch::default();
    // Reused across batches: no allocation per relayed message once warm.
    let mut edits: Vec<(usize, usize, usize, usize)> = Vec::new();
    let mut scratch = BytesMut::new();
    let mut rewritten = BytesMut::new();
    let session_mode = s.mode == PoolMode::Session;
    // An app whose functions may leave session state behind a plain call has every
    // transaction looked at once idle (routines.rs); session mode resets instead.
    let risky = !session_mode && s.role.routines_risky();
    let mut ran = false;
    let mut draining = *signals.shutdown.borrow();
    loop {
        // Atomic loads: a stream that keeps the reads below ready must not hide these.
        match signals.fired(true) {
            Some(Stop::Closing) => return closing_error(s, scan.tracker.in_flight()).await,
            Some(Stop::Revoked) => return revoked_error(s).await,
            _ => {}
        }
        // A pinned client between its transactions gets its notifications before its
        // next request goes on, even one already here.
        let between = scan.tracker.idle()
            && client_cursor.at_boundary()
            && scan.cursor.at_boundary()
            && sbuf.is_empty();
        if between && s.notified() {
            listen::deliver(s, shared, signals, client).await?;
        }
        if !s.buf.is_empty() {
            hold.acted();
            // Before this batch: the server's status, if nothing of the client's is in
            // flight (a prime may then go first).
            let quiet = (!scan.tracker.in_flight() && sbuf.is_empty() && scan.cursor.at_boundary())
                .then(|| scan.tracker.status());
            let mut too_many = false;
            let mut malformed = false;
            // Named statements are renamed and prepared where needed (prepared.rs):
            // whole messages that change are collected as edits.
            edits.clear();
            let mut rewriter = Rewriter {
                client: &mut s.statements,
                server: &mut server.statements,
                replies: &mut scan.replies,
                max_per_server: max_prepared.per_server,
                max_per_client: max_prepared.per_client,
                max_client_bytes: max_prepared.client_bytes,
                max_message: max_prepared.message,
                refused: Default::default(),
                effect: Effect::default(),
                customs: &mut s.customs,
                streamed: &mut streamed,
            };
            let walked = client_cursor.advance(
                &s.buf,
                Side::Frontend,
                max_prepared.message,
                Rewriter::need,
                |event| match event {
                    Event::Message { tag, at, body, len } => {
                        match scan.tracker.client(tag) {
                            Ok(ControlFlow::Break(())) => return ControlFlow::Break(()),
                            Ok(ControlFlow::Continue(())) => {}
                            Err(_) => {
                                too_many = true;
                                return ControlFlow::Break(());
                            }
                        }
                        if Rewriter::need(tag) == Need::Header {
                            return ControlFlow::Continue(());
                        }
                        let raw = &s.buf[at..at + 5 + body.len()];
                        let start = scratch.len();
                        match rewriter.head(tag, raw, len - body.len(), &mut scratch) {
                            Ok(r) => rest = r,
                            Err(_) => {
                                malformed = true;
                                return ControlFlow::Break(());
                            }
                        }
                        if rest == Rest::Classify {
                            windows.start(body);
                        }
                        if &scratch[start..] != raw {
                            edits.push((at, raw.len(), start, scratch.len()));
                        } else {
                            scratch.truncate(start);
                        }
                        ControlFlow::Continue(())
                    }
                    Event::Tail { at, bytes, last } => {
                        match rest {
                            Rest::Pass => {}
                            Rest::Classify => {
                                let effect = windows.feed(bytes, last, rewriter.customs);
                                rewriter.effect.merge(effect);
                                rewriter.effect.discard |= rewriter.streamed.feed(bytes);
                            }
                            // The rest of a refused message goes nowhere.
                            Rest::Drop => edits.push((at, bytes.len(), 0, 0)),
                        }
                        ControlFlow::Continue(())
                    }
                },
            );
            if rewriter.refused.iter().any(|&n| n > 0) {
                // Told to the client in its batch's error; logged here under its id.
                tracing::info!(role = %s.role.name, refused = ?rewriter.refused, "prepared statements refused (count, bytes, too long)");
                for (total, n) in scan.refused.iter_mut().zip(rewriter.refused) {
                    *total += n;
                }
            }
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
                Err(e @ CursorError::TooLong { .. }) => {
                    scan.cut_off = Some(Limit::MessageTooLong);
                    return fatal(
                        &mut s.stream,
                        SqlState::PROGRAM_LIMIT_EXCEEDED,
                        e.to_string(),
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
            let effect = rewriter.effect;
            ran |= risky;
            // In either mode: a library loaded is there until the connection closes.
            server.loaded |= effect.discard;
            if !effect.is_none() && !session_mode {
                take_effect(s, effect, max_pinned, server, sbuf, quiet).await?;
            }
            // Session mode keeps no books of its own server's state but one: a reset
            // must bring back the client's startup values.
            s.pending.reset_all |= session_mode && effect.reset_all;
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
                if sbuf.capacity() - sbuf.len() < 1024 {
                    sbuf.reserve(READ_CHUNK);
                }
                match write_or_read(&mut server.stream, &outgoing[written..], sbuf).await {
                    Relayed::Wrote(Ok(0)) => {
                        return server_lost(
                            s,
                            scan.tracker.in_flight(),
                            "the server stopped reading".into(),
                        )
                        .await;
                    }
                    Relayed::Wrote(Ok(w)) => written += w,
                    Relayed::Wrote(Err(e)) => {
                        return server_lost(s, scan.tracker.in_flight(), e.to_string()).await;
                    }
                    Relayed::Read(r) => {
                        if let Some(why) = server_gone(r) {
                            return server_lost(s, scan.tracker.in_flight(), why).await;
                        }
                        // Borrowed field by field: `outgoing` may be `s.buf`.
                        let c = ClientSide {
                            stream: &mut s.stream,
                            params: &mut s.params,
                            statements: &mut s.statements,
                            role: &s.role.name,
                            mine: s.listening.as_deref().map(|sub| sub.channels()),
                            hold_ready: false,
                        };
                        match from_server(c, server, sbuf, scan, shared, limits.stall).await {
                            Ok(wrote) => watch.progress += wrote,
                            Err(Gone::Server(e)) => {
                                return server_lost(s, scan.tracker.in_flight(), e).await;
                            }
                            Err(Gone::Client(e)) => return Err(not_reading(scan, limits, e)),
                        }
                    }
                }
            }
            s.buf.advance(n);
            scan.bytes_in += total as u64;
            scratch.clear();
            if scan.tracker.terminated() {
                let clean = scan.tracker.idle() && sbuf.is_empty() && scan.cursor.at_boundary();
                return Ok(Linked::ClientLeft { clean });
            }
        }
        // Half a client message waiting for the rest (a Parse to rewrite is held until
        // whole) keeps the server too.
        let idle = scan.tracker.idle()
            && s.buf.is_empty()
            && client_cursor.at_boundary()
            && scan.cursor.at_boundary()
            && sbuf.is_empty();
        if idle && !session_mode {
            let routine_kinds = if ran { s.role.routine_kinds() } else { 0 };
            if !s.pending.is_none() || look_at_routines || routine_kinds != 0 {
                // settle talks to the server through its own buffer: lend it back.
                std::mem::swap(&mut server.buf, sbuf);
                let listened = if s.pending.listen {
                    listen::settle(s, server, shared, client).await
                } else {
                    Ok(None)
                };
                let settled = match listened {
                    Ok(ack) => {
                        scan.ack = ack;
                        settle(s, server, max_pinned, look_at_routines, routine_kinds).await
                    }
                    Err(e) => Err(e),
                };
                std::mem::swap(&mut server.buf, sbuf);
                (look_at_routines, ran) = (false, false);
                // Given back (or closed) first, the transaction's end follows (finish).
                if !settled? {
                    return Ok(Linked::Unknown);
                }
            }
            if s.pin.is_none() {
                return Ok(Linked::Done);
            }
            if scan.ack.is_some() || scan.held_ready {
                // A pinned client keeps its server anyway.
                let held = std::mem::take(&mut scan.held_ready);
                listen::finish(s, shared, scan.ack.take(), held).await?;
            }
        }
        if idle && session_mode && s.pending.reset_all {
            std::mem::swap(&mut server.buf, sbuf);
            let done = after_reset(s, server).await;
            std::mem::swap(&mut server.buf, sbuf);
            done?;
        }
        if idle && draining {
            return Ok(Linked::Drained);
        }
        let holds = idle && (session_mode || s.pin.is_some());
        if hold.due(holds) && hold.look(s, server, sbuf).await {
            return Ok(Linked::Paused);
        }
        // Waiting on the client: for the rest of a message or a COPY it started (the
        // server waits), or, in a transaction, for its next request.
        let owes = !s.buf.is_empty() || !client_cursor.at_boundary() || scan.tracker.copying_in();
        watch.arm(if owes {
            Some((Wait::Stall, limits.stall))
        } else {
            limits
                .idle_transaction
                .filter(|_| scan.tracker.idle_in_transaction() && sbuf.is_empty())
                .map(|limit| (Wait::IdleTransaction, limit))
        });
        if s.buf.capacity() - s.buf.len() < 1024 {
            s.buf.reserve(READ_CHUNK);
        }
        if sbuf.capacity() - sbuf.len() < 1024 {
            sbuf.reserve(READ_CHUNK);
        }
        // Notifications go out only between transactions, never inside a reply.
        let inbox = s
            .listening
            .as_deref()
            .filter(|_| idle)
            .map(|sub| sub.inbox().clone());
        tokio::select! {
            // Fixed order, no random start: the I/O first (the loop's top looks at
            // the signals whatever the I/O does).
            biased;
            n = server.stream.read_buf(sbuf) => {
                if let Some(why) = server_gone(n) {
                    return server_lost(s, scan.tracker.in_flight(), why).await;
                }
                let hold_ready = s.pending.listen && s.buf.is_empty();
                let relayed =
                    from_server(ClientSide::of(s, hold_ready), server, sbuf, scan, shared, limits.stall)
                        .await;
                match relayed {
                    Ok(wrote) => watch.progress += wrote,
                    Err(Gone::Server(e)) => return server_lost(s, scan.tracker.in_flight(), e).await,
                    Err(Gone::Client(e)) => return Err(not_reading(scan, limits, e)),
                }
            }
            n = s.stream.read_buf(&mut s.buf) => {
                if n? == 0 {
                    return Ok(Linked::ClientLeft { clean: idle });
                }
                watch.progress += 1;
            }
            wait = watch.expired() => return stalled(s, scan, limits, wait).await,
            () = hold.wait(holds, client) => {}
            // A pinned client between its transactions: notifications go out now.
            () = listen::ready(client, inbox.as_deref()) => {
                listen::deliver(s, shared, signals, client).await?;
            }
            stop = signals.wait(client, draining) => match stop {
                Stop::Closing => return closing_error(s, scan.tracker.in_flight()).await,
                Stop::Revoked => return revoked_error(s).await,
                // Noted here, acted on at the next idle point above.
                Stop::Draining => draining = true,
            },
        }
    }
}

/// A write to the client failed; one that timed out is a client that stopped
/// reading: its server is closed (the caller discards it), and nothing can be told to
/// a client that reads nothing.
fn not_reading(scan: &mut ServerScan, limits: &Limits, e: std::io::Error) -> SessionError {
    if e.kind() != std::io::ErrorKind::TimedOut {
        return e.into();
    }
    scan.cut_off = Some(Limit::ClientStall);
    SessionError::Reported {
        code: SqlState::CONNECTION_FAILURE,
        message: format!(
            "the client read nothing of its results for client_stall_timeout ({} ms); \
             its server connection was closed and its transaction rolled back",
            limits.stall.as_millis()
        ),
    }
}

/// The client kept its server waiting past a limit: it is told (within the stall
/// limit), and the caller closes the server, which rolls its transaction back.
async fn stalled<T>(
    s: &mut Session,
    scan: &mut ServerScan,
    limits: &Limits,
    wait: Wait,
) -> Result<T, SessionError> {
    let (limit, code, message) = match wait {
        Wait::Stall => (
            Limit::ClientStall,
            SqlState::CONNECTION_FAILURE,
            format!(
                "the client left a message or COPY unfinished for client_stall_timeout \
                 ({} ms); its server connection was closed and its transaction rolled back",
                limits.stall.as_millis()
            ),
        ),
        Wait::IdleTransaction => (
            Limit::IdleTransaction,
            SqlState::IDLE_IN_TRANSACTION_TIMEOUT,
            format!(
                "terminating connection due to idle-in-transaction timeout \
                 (idle_transaction_timeout = {} ms); the transaction was rolled back",
                limits.idle_transaction.unwrap_or_default().as_millis()
            ),
        ),
    };
    scan.cut_off = Some(limit);
    fatal(&mut s.stream, code, message).await
}

/// The grace period after SIGTERM is over and the client is still linked.
async fn closing_error<T>(s: &mut Session, in_flight: bool) -> Result<T, SessionError> {
    let (code, message) = if in_flight {
        (
            SqlState::TRANSACTION_RESOLUTION_UNKNOWN,
            "the pooler is shutting down; the server connection was closed while a \
             request was unanswered: whether its transaction committed is unknown",
        )
    } else {
        (
            SqlState::ADMIN_SHUTDOWN,
            "the pooler is shutting down; the open transaction was rolled back",
        )
    };
    fatal(&mut s.stream, code, message.into()).await
}

pub(super) async fn revoked_error<T>(s: &mut Session) -> Result<T, SessionError> {
    let message = if s.role.was_killed() {
        "terminating connection due to administrator command (KILL)".to_owned()
    } else {
        format!(
            "terminating connection: role \"{}\" was suspended or deleted",
            s.role.name
        )
    };
    fatal(&mut s.stream, SqlState::ADMIN_SHUTDOWN, message).await
}
