//! The pooling loop. The client holds no server while idle; its first message checks
//! one out of the role's pool; bytes are relayed unchanged (only tags, ReadyForQuery
//! status and ParameterStatus are looked at); the server goes back when Postgres says
//! the session is idle (`Z` with `I`), every request has had its reply, the client has
//! not sent half of a message or an unsynced extended-protocol batch, and everything
//! has been written to the client.

use std::ops::ControlFlow;
use std::pin::Pin;
use std::task::Poll;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::cursor::Cursor;
use super::login::Session;
use super::prepared::{Action, PreparedLimits, Replies, Rewriter, renamed_error};
use super::state::Effect;
use super::tracker::{MAX_PENDING, Tracker};
use super::upkeep::{check, reset, settle, stale, sync_params};
use super::{SessionError, fatal};
use crate::auth::cache::{PoolMode, RoleAuth};
use crate::backend::ServerConn;
use crate::pool::{Checkout, PoolError, RoleLimits};
use crate::proto::SqlState;
use crate::proto::frame::Side;
use crate::registry::ClientInfo;
use crate::shared::{RoleShared, Shared};

/// A linked stretch's read buffers; grow only while a message we must see whole is
/// larger.
const READ_CHUNK: usize = 16 * 1024;

/// What an idle client keeps for the start of its next request: the big buffers are
/// the server's, lent for the stretch (10,000 idle clients must cost little memory).
const IDLE_CHUNK: usize = 256;

/// How a linked stretch ended.
enum Linked {
    /// The server is idle and clean: give it back.
    Done,
    /// The client left (Terminate or EOF); `clean` if its server can be reused.
    ClientLeft { clean: bool },
    /// Idle, but its session parameters are not known: close it, the client goes on.
    Unknown,
    /// Idle, and the pooler is shutting down: the server goes back (reset if the
    /// client had session state), the client is told to leave.
    Drained,
}

/// The signals a client listens to. Read by version (an atomic load) while the
/// client waits on its own waker in the registry, which every sender wakes after
/// sending: a watch future per wait would lock a channel every client shares, several
/// times a transaction.
struct Signals {
    /// The role was revoked or killed: leave now.
    revoked: tokio::sync::watch::Receiver<u64>,
    /// Draining: leave at the next idle point.
    shutdown: tokio::sync::watch::Receiver<bool>,
    /// The grace period is over: leave now.
    closing: tokio::sync::watch::Receiver<bool>,
}

/// What a signal asks of the client.
enum Stop {
    Revoked,
    Draining,
    Closing,
}

impl Signals {
    /// The first signal not yet acted on; `draining` once the drain has been noted.
    /// A closed channel counts as fired, as `changed()` would report it.
    fn fired(&self, draining: bool) -> Option<Stop> {
        let fired = |r: Result<bool, _>| r.unwrap_or(true);
        if fired(self.closing.has_changed()) {
            Some(Stop::Closing)
        } else if fired(self.revoked.has_changed()) {
            Some(Stop::Revoked)
        } else if !draining && fired(self.shutdown.has_changed()) {
            Some(Stop::Draining)
        } else {
            None
        }
    }

    /// Resolves with the first signal that fires: registers first, then looks, so a
    /// wake between the two is not lost.
    fn wait<'a>(
        &'a self,
        client: &'a ClientInfo,
        draining: bool,
    ) -> impl std::future::Future<Output = Stop> + 'a {
        std::future::poll_fn(move |cx| {
            client.signal().register(cx.waker());
            match self.fired(draining) {
                Some(stop) => Poll::Ready(stop),
                None => Poll::Pending,
            }
        })
    }
}

pub async fn run(
    mut s: Box<Session>,
    shared: &Shared,
    client: &ClientInfo,
) -> Result<(), SessionError> {
    let signals = Signals {
        revoked: s.revoked.clone(),
        shutdown: shared.shutdown.clone(),
        closing: shared.closing.clone(),
    };
    loop {
        // Idle: no server. Wait for a whole message header from the client.
        while s.buf.len() < 5 {
            let woke = if s.buf.is_empty() {
                // Nothing pending: wait for readability holding no buffer at all (a
                // plaintext client; TLS may hold decrypted bytes, so it reads).
                s.buf = BytesMut::new();
                wait_readable(&mut s.stream, &mut s.buf, &signals, client).await
            } else {
                if s.buf.capacity() - s.buf.len() < 5 {
                    s.buf.reserve(IDLE_CHUNK);
                }
                tokio::select! {
                    biased;
                    n = s.stream.read_buf(&mut s.buf) => Ok(n),
                    stop = signals.wait(client, false) => Err(stop),
                }
            };
            match woke {
                Ok(n) => {
                    if n? == 0 {
                        return Ok(());
                    }
                }
                Err(Stop::Revoked) => return revoked_error(&mut s).await,
                Err(Stop::Draining | Stop::Closing) => {
                    return fatal(
                        &mut s.stream,
                        SqlState::ADMIN_SHUTDOWN,
                        "the pooler is shutting down".into(),
                    )
                    .await;
                }
            }
        }
        if s.buf[0] == b'X' {
            return Ok(());
        }
        // Boxed: a task's future is as big as its biggest state, and only a linked
        // client should carry a server, its buffers and the link's state.
        if Box::pin(transaction(&mut s, shared, client, &signals))
            .await?
            .is_break()
        {
            return Ok(());
        }
    }
}

/// One linked stretch: checks a server out, relays until it can go back, and gives
/// it back. `Break`: the client is done.
async fn transaction(
    s: &mut Session,
    shared: &Shared,
    client: &ClientInfo,
    signals: &Signals,
) -> Result<ControlFlow<()>, SessionError> {
    client.waiting();
    let asked = std::time::Instant::now();
    let mut server = match checkout(shared, &s.role, &s.auth).await {
        Ok(server) => server,
        Err((code, message)) => {
            if code == SqlState::TOO_MANY_CONNECTIONS {
                shared.metrics.checkout_timeouts.inc();
            }
            return fatal(&mut s.stream, code, message).await;
        }
    };
    let linked = std::time::Instant::now();
    shared
        .metrics
        .checkout_wait
        .observe((linked - asked).as_secs_f64());
    client.active(server.id());
    let (max_pinned, max_prepared) = {
        let config = shared.config();
        (
            config.max_pinned(pool_size(shared, &s.auth)),
            PreparedLimits {
                per_server: config.max_prepared_statements,
                per_client: config.max_client_prepared_statements,
            },
        )
    };
    let mut scan = ServerScan::default();
    let outcome = match sync_params(s, &mut server).await {
        Ok(()) => {
            let mut sbuf = std::mem::take(&mut server.buf);
            let small = borrow_buffer(s, &mut server);
            let outcome = link(
                s,
                &mut server,
                &mut sbuf,
                &mut scan,
                client,
                signals,
                max_prepared,
                max_pinned,
            )
            .await;
            return_buffer(s, &mut server, small);
            if server.buf.is_empty() {
                server.buf = sbuf;
            }
            outcome
        }
        Err(e) => Err(e),
    };
    scan.count(shared, &s.role);
    if matches!(outcome, Ok(Linked::Done)) {
        shared
            .metrics
            .transaction_duration
            .observe(linked.elapsed().as_secs_f64());
    }
    s.cancel.slot.unlink();
    client.idle();
    match outcome {
        Ok(Linked::Done) => server.release(),
        Ok(Linked::Unknown) => server.discard(),
        Ok(Linked::Drained) => {
            give_back(s, server).await;
            return fatal(
                &mut s.stream,
                SqlState::ADMIN_SHUTDOWN,
                "the pooler is shutting down".into(),
            )
            .await;
        }
        Ok(Linked::ClientLeft { clean }) => {
            if clean {
                give_back(s, server).await;
            } else {
                // Mid-transaction: never hand it on; closing rolls it back.
                server.discard();
            }
            return Ok(ControlFlow::Break(()));
        }
        Err(e) => {
            server.discard();
            return Err(e);
        }
    }
    Ok(ControlFlow::Continue(()))
}

/// An idle client's wait for its next request: `Ok` with a read's result (0: the
/// client left), or the signal that came first. A plaintext client is read only once
/// readable, into a buffer allocated then, so an idle one holds none.
async fn wait_readable(
    stream: &mut crate::net::stream::Stream,
    buf: &mut BytesMut,
    signals: &Signals,
    client: &ClientInfo,
) -> Result<std::io::Result<usize>, Stop> {
    let crate::net::stream::Stream::Plain(tcp) = stream else {
        buf.reserve(IDLE_CHUNK);
        return tokio::select! {
            biased;
            n = stream.read_buf(buf) => Ok(n),
            stop = signals.wait(client, false) => Err(stop),
        };
    };
    loop {
        tokio::select! {
            biased;
            ready = tcp.readable() => {
                if let Err(e) = ready {
                    return Ok(Err(e));
                }
            }
            stop = signals.wait(client, false) => return Err(stop),
        }
        buf.reserve(IDLE_CHUNK);
        match tcp.try_read_buf(buf) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            read => return Ok(read),
        }
    }
}

/// Lends the server's big read buffer to its client for a linked stretch, carrying
/// over what the client has sent so far; returns the client's own small buffer.
fn borrow_buffer(s: &mut Session, server: &mut ServerConn) -> BytesMut {
    let mut big = std::mem::take(&mut server.client_buf);
    big.clear();
    big.extend_from_slice(&s.buf);
    std::mem::replace(&mut s.buf, big)
}

/// Gives the lent buffer back, keeping what the client sent past the stretch (the
/// next request, pipelined) in its small one. A large leftover keeps the big buffer.
fn return_buffer(s: &mut Session, server: &mut ServerConn, mut small: BytesMut) {
    if s.buf.len() > IDLE_CHUNK {
        return;
    }
    if small.capacity() > IDLE_CHUNK * 4 {
        small = BytesMut::with_capacity(IDLE_CHUNK);
    }
    small.clear();
    small.extend_from_slice(&s.buf);
    server.client_buf = std::mem::replace(&mut s.buf, small);
}

/// Returns an idle server its client is done with. A whole session's state (SET,
/// LISTEN, prepared statements, advisory locks) goes with its client: a session-mode
/// or pinned client's server is reset first.
async fn give_back(s: &mut Session, mut server: Checkout<Box<ServerConn>>) {
    if s.mode == PoolMode::Session || s.pin.is_some() {
        match reset(&mut server).await {
            Ok(()) => server.release(),
            Err(e) => {
                tracing::debug!(error = %e, "resetting a session server failed");
                server.discard();
            }
        }
        s.pin = None;
    } else {
        server.release();
    }
}

/// Checks a server out of the role's pool, mapping failures to what the client is told.
pub(super) async fn checkout(
    shared: &Shared,
    role: &RoleShared,
    auth: &RoleAuth,
) -> Result<Checkout<Box<ServerConn>>, (SqlState, String)> {
    let limits = RoleLimits {
        pool_size: u32::try_from(pool_size(shared, auth)).unwrap_or(u32::MAX),
        weight: 1,
    };
    let (mut wait, check_delay) = {
        let config = shared.config();
        (config.query_wait_timeout(), config.server_check_delay())
    };
    if shared.pause.is_paused(&role.name) {
        // PAUSE: wait for RESUME within the same query_wait_timeout.
        let started = tokio::time::Instant::now();
        if !shared.pause.wait(&role.name, started + wait).await {
            let message = format!(
                "role \"{}\" is paused by the administrator and was not resumed within \
                 query_wait_timeout ({wait:?})",
                role.name
            );
            return Err((SqlState::TOO_MANY_CONNECTIONS, message));
        }
        wait = wait.saturating_sub(started.elapsed());
    }
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
        if server.idle_for() > check_delay {
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

fn pool_size(shared: &Shared, auth: &RoleAuth) -> usize {
    auth.pool_size.unwrap_or(shared.config().default_pool_size)
}

/// Notes what the client's last messages may have done to its session; pins it to
/// its server (within the role's bound) when they may have made state that cannot
/// follow it. Runs before those messages are forwarded, so a refused pin leaves
/// nothing behind.
async fn take_effect(
    s: &mut Session,
    effect: Effect,
    max_pinned: usize,
) -> Result<(), SessionError> {
    if effect.pin && s.pin.is_none() {
        match s.role.try_pin(max_pinned) {
            Some(slot) => s.pin = Some(slot),
            None => {
                let message = format!(
                    "too many clients of role \"{}\" hold session state (max_pinned_per_role = {max_pinned}); \
                     LISTEN, temporary tables, session advisory locks, SQL PREPARE, SET ROLE and \
                     SET of untracked parameters need session mode: connect to the session port \
                     or set the app's pool_mode to session",
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
    s.pending.merge(Effect {
        pin: false,
        ..effect
    });
    Ok(())
}

fn checkout_result(
    result: Result<Checkout<Box<ServerConn>>, PoolError>,
) -> Result<Checkout<Box<ServerConn>>, (SqlState, String)> {
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
#[allow(clippy::too_many_arguments)]
async fn link(
    s: &mut Session,
    server: &mut ServerConn,
    sbuf: &mut BytesMut,
    scan: &mut ServerScan,
    client: &ClientInfo,
    signals: &Signals,
    max_prepared: PreparedLimits,
    max_pinned: usize,
) -> Result<Linked, SessionError> {
    // After the pooler's own SETs: a cancel now reaches the client's query only.
    s.cancel.slot.link(server.key);
    let mut client_cursor = Cursor::default();
    // Reused across batches: no allocation per relayed message once warm.
    let mut edits: Vec<(usize, usize, usize, usize)> = Vec::new();
    let mut scratch = BytesMut::new();
    let mut rewritten = BytesMut::new();
    let session_mode = s.mode == PoolMode::Session;
    let mut draining = *signals.shutdown.borrow();
    loop {
        // Atomic loads: a stream that keeps the reads below ready must not hide these.
        match signals.fired(true) {
            Some(Stop::Closing) => return closing_error(s, scan.tracker.in_flight()).await,
            Some(Stop::Revoked) => return revoked_error(s).await,
            _ => {}
        }
        if !s.buf.is_empty() {
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
                effect: Effect::default(),
                customs: &mut s.customs,
            };
            let walked = client_cursor.advance(
                &s.buf,
                Side::Frontend,
                Rewriter::needs_body,
                |tag, at, body| {
                    match scan.tracker.client(tag) {
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
            let effect = rewriter.effect;
            if !effect.is_none() && !session_mode {
                take_effect(s, effect, max_pinned).await?;
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
                        let to_client =
                            match scan.server(sbuf, server, &mut s.params, &mut s.statements) {
                                Ok(k) => k,
                                Err(e) => return server_lost(s, scan.tracker.in_flight(), e).await,
                            };
                        write_skipping(&mut s.stream, &sbuf[..to_client], &scan.edits).await?;
                        scan.bytes_out += to_client as u64;
                        sbuf.advance(to_client);
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
            if !s.pending.is_none() {
                // settle talks to the server through its own buffer: lend it back.
                std::mem::swap(&mut server.buf, sbuf);
                let settled = settle(s, server, max_pinned).await;
                std::mem::swap(&mut server.buf, sbuf);
                if !settled? {
                    return Ok(Linked::Unknown);
                }
            }
            if s.pin.is_none() {
                return Ok(Linked::Done);
            }
        }
        if idle && draining {
            return Ok(Linked::Drained);
        }
        if s.buf.capacity() - s.buf.len() < 1024 {
            s.buf.reserve(READ_CHUNK);
        }
        if sbuf.capacity() - sbuf.len() < 1024 {
            sbuf.reserve(READ_CHUNK);
        }
        tokio::select! {
            // Fixed order, no random start: the I/O first (the loop's top looks at
            // the signals whatever the I/O does).
            biased;
            n = server.stream.read_buf(sbuf) => {
                if let Some(why) = server_gone(n) {
                    return server_lost(s, scan.tracker.in_flight(), why).await;
                }
                let to_client = match scan.server(sbuf, server, &mut s.params, &mut s.statements) {
                    Ok(k) => k,
                    Err(e) => return server_lost(s, scan.tracker.in_flight(), e).await,
                };
                if to_client > 0 {
                    write_skipping(&mut s.stream, &sbuf[..to_client], &scan.edits).await?;
                    scan.bytes_out += to_client as u64;
                    sbuf.advance(to_client);
                }
            }
            n = s.stream.read_buf(&mut s.buf) => {
                if n? == 0 {
                    return Ok(Linked::ClientLeft { clean: idle });
                }
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

/// What the relay knows about the server's side of a linked stretch.
#[derive(Default)]
struct ServerScan {
    cursor: Cursor,
    tracker: Tracker,
    replies: Replies,
    /// Changes to the bytes last scanned, for the client.
    edits: Vec<Edit>,
    /// ReadyForQuery messages, and those that said idle (a transaction ended).
    queries: u64,
    transactions: u64,
    bytes_in: u64,
    bytes_out: u64,
}

impl ServerScan {
    /// Adds this stretch's counts to the metrics: once per stretch, not per message.
    fn count(&self, shared: &Shared, role: &RoleShared) {
        let m = &shared.metrics;
        m.transactions.inc_by(self.transactions);
        m.queries.inc_by(self.queries);
        m.bytes_received.inc_by(self.bytes_in);
        m.bytes_sent.inc_by(self.bytes_out);
        m.prepared_hits.inc_by(self.replies.hits);
        m.prepared_misses.inc_by(self.replies.misses);
        role.counts.add(self.transactions, self.queries);
    }

    /// Walks the server's bytes: ReadyForQuery and copy starts feed the tracker,
    /// ParameterStatus updates both sides' parameters, replies to what the pooler
    /// added are dropped. Returns how many bytes may go to the client now.
    fn server(
        &mut self,
        sbuf: &[u8],
        server: &mut ServerConn,
        params: &mut crate::session::params::ClientParams,
        statements: &mut crate::session::prepared::ClientStatements,
    ) -> Result<usize, String> {
        let ServerScan {
            cursor,
            tracker,
            replies,
            edits,
            queries,
            transactions,
            ..
        } = self;
        edits.clear();
        cursor
            .advance(
                sbuf,
                Side::Backend,
                |tag| matches!(tag, b'Z' | b'S' | b'1' | b'3') || Replies::needs_body(tag),
                |tag, at, body| {
                    match tag {
                        b'S' => {
                            if let Some((name, value)) = parameter_status(body) {
                                server.state.record(name, value);
                                params.record(name, value);
                            }
                        }
                        _ => {
                            if tag == b'Z' {
                                *queries += 1;
                                if body.first() == Some(&b'I') {
                                    *transactions += 1;
                                }
                            }
                            tracker.server(tag, body);
                            let len = 5 + body.len();
                            let action =
                                replies.server(tag, body, statements, &mut server.statements);
                            if tag == b'E' {
                                // Queries the server skipped after an extended error.
                                tracker.skipped(replies.take_skipped());
                            }
                            match action {
                                Action::Pass => {}
                                Action::Drop => edits.push(Edit {
                                    at,
                                    len,
                                    with: None,
                                }),
                                Action::Replace(with) => edits.push(Edit {
                                    at,
                                    len,
                                    with: Some(with.to_vec()),
                                }),
                                Action::Rename { from, to } => {
                                    let with = renamed_error(&sbuf[at..at + len], &from, &to);
                                    edits.push(Edit {
                                        at,
                                        len,
                                        with: Some(with),
                                    });
                                }
                            }
                        }
                    }
                    ControlFlow::Continue(())
                },
            )
            .map_err(|e| format!("malformed message from the server: {e}"))
    }
}

/// A server message the client gets changed: dropped (`with: None`) or replaced.
struct Edit {
    at: usize,
    len: usize,
    with: Option<Vec<u8>>,
}

/// What happened first while forwarding to the server.
enum Relayed {
    Wrote(std::io::Result<usize>),
    Read(std::io::Result<usize>),
}

/// Writes to the server, or reads its replies if it answers (or stops reading) first.
/// One stream polled both ways: no split halves to allocate per batch.
async fn write_or_read(
    stream: &mut crate::net::stream::Stream,
    bytes: &[u8],
    sbuf: &mut BytesMut,
) -> Relayed {
    std::future::poll_fn(|cx| {
        if let Poll::Ready(r) = Pin::new(&mut *stream).poll_write(cx, bytes) {
            return Poll::Ready(Relayed::Wrote(r));
        }
        tokio_util::io::poll_read_buf(Pin::new(&mut *stream), cx, sbuf).map(Relayed::Read)
    })
    .await
}

/// Why a read from the server ended the link, if it did.
fn server_gone(read: std::io::Result<usize>) -> Option<String> {
    match read {
        Ok(0) => Some("the server closed the connection".into()),
        Ok(_) => None,
        Err(e) => Some(e.to_string()),
    }
}

/// Writes `bytes` to the client with `edits` applied.
async fn write_skipping(
    stream: &mut crate::net::stream::Stream,
    bytes: &[u8],
    edits: &[Edit],
) -> std::io::Result<()> {
    let mut from = 0;
    for edit in edits {
        if edit.at > from {
            stream.write_all(&bytes[from..edit.at]).await?;
        }
        if let Some(with) = &edit.with {
            stream.write_all(with).await?;
        }
        from = edit.at + edit.len;
    }
    if from < bytes.len() {
        stream.write_all(&bytes[from..]).await?;
    }
    Ok(())
}

fn parameter_status(body: &[u8]) -> Option<(&str, &str)> {
    let mut parts = body.split(|b| *b == 0);
    let name = std::str::from_utf8(parts.next()?).ok()?;
    let value = std::str::from_utf8(parts.next()?).ok()?;
    Some((name, value))
}

/// Tells the client its server is gone. With a request of its unanswered (a COMMIT
/// perhaps) nobody knows whether its transaction committed: 08007, as libpq-based
/// drivers and JDBC expect for that case; with nothing in flight an open transaction
/// was certainly rolled back.
pub(super) async fn server_lost<T>(
    s: &mut Session,
    in_flight: bool,
    why: String,
) -> Result<T, SessionError> {
    tracing::warn!(role = %s.role.name, why = %why, "server connection lost");
    let (code, message) = if in_flight {
        (
            SqlState::TRANSACTION_RESOLUTION_UNKNOWN,
            format!(
                "the server connection was lost ({why}) while a request was unanswered; \
                 whether its transaction committed is unknown"
            ),
        )
    } else {
        (
            SqlState::ADMIN_SHUTDOWN,
            format!("the server connection was lost ({why}); an open transaction was rolled back"),
        )
    };
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

async fn revoked_error<T>(s: &mut Session) -> Result<T, SessionError> {
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
