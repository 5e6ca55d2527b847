//! The pooling loop. The client holds no server while idle; its first message checks
//! one out of the role's pool; bytes are relayed unchanged (only tags, ReadyForQuery
//! status and ParameterStatus are looked at); the server goes back when Postgres says
//! the session is idle (`Z` with `I`), every request has had its reply, the client has
//! not sent half of a message or an unsynced extended-protocol batch, and everything
//! has been written to the client.

use std::ops::ControlFlow;
use std::sync::Arc;

use bytes::BytesMut;

use super::checkout::{checkout, give_back, pool_size};
use super::client::{IDLE_CHUNK, Session};
use super::listen;
use super::prepared::PreparedLimits;
use super::routines::REFRESH as ROUTINES_REFRESH;
use super::signals::{Signals, Stop, Woke, wait_idle};
use super::upkeep::sync_params;
use super::wire::ServerScan;
use crate::backend::ServerConn;
use crate::frontdoor::{SessionError, fatal};
use crate::proto::SqlState;
use crate::registry::{ClientInfo, Registered};
use crate::shared::Shared;

use super::link::{Around, Limits, Linked, READ_CHUNK, link, revoked_error};

/// An idle client with nothing buffered, for its caller to park (park.rs).
pub(super) type ToPark = (Box<Session>, Registered<ClientInfo>);

/// Relays for a logged-in client until it leaves (`None`) or is to be parked:
/// `park_now` at its first idle moment (just logged in), else when the sweep asks.
pub(super) async fn run(
    mut s: Box<Session>,
    shared: &Shared,
    client: Registered<ClientInfo>,
    mut park_now: bool,
) -> Result<Option<ToPark>, SessionError> {
    let signals = Signals {
        revoked: s.revoked.clone(),
        shutdown: shared.shutdown.clone(),
        closing: shared.closing.clone(),
    };
    loop {
        // Between transactions: what waits in the inbox goes out now, also to a client
        // whose next request is already here (one that always sends its next request
        // at once would otherwise never get any).
        if s.notified() {
            listen::deliver(&mut s, shared, &signals, &client).await?;
        }
        // Idle: no server. Wait for a whole message header from the client, and give
        // it its notifications as they come.
        while s.buf.len() < 5 {
            if park_now && s.buf.is_empty() && !s.notified() {
                return Ok(Some((s, client)));
            }
            client.idle_in_task(shared.lot.epoch());
            let inbox = s.listening.as_deref().map(|sub| sub.inbox().clone());
            let woke = wait_idle(
                &mut s.stream,
                &mut s.buf,
                &signals,
                &client,
                inbox.as_deref(),
            )
            .await;
            match woke {
                Woke::Read(n) => {
                    if n? == 0 {
                        return Ok(None);
                    }
                }
                Woke::Park => park_now = true,
                Woke::Deliver => listen::deliver(&mut s, shared, &signals, &client).await?,
                Woke::Stop(Stop::Revoked) => return revoked_error(&mut s).await,
                Woke::Stop(Stop::Draining | Stop::Closing) => {
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
            return Ok(None);
        }
        // Not boxed (an allocation per transaction): the task of a client that is
        // idle for long ends when it parks, so its size costs only busy clients.
        if transaction(&mut s, shared, &client.entry, &signals)
            .await?
            .is_break()
        {
            return Ok(None);
        }
        // Busy again: it parks when the sweep next finds it idle for long.
        park_now = false;
    }
}

/// One linked stretch: checks a server out, relays until it can go back, and gives
/// it back. `Break`: the client is done.
async fn transaction(
    s: &mut Session,
    shared: &Shared,
    client: &Arc<ClientInfo>,
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
    let limits = {
        let config = shared.config();
        Limits {
            max_pinned: config.max_pinned(pool_size(shared, &s.auth)),
            prepared: PreparedLimits {
                per_server: config.max_prepared_statements,
                per_client: config.max_client_prepared_statements,
                client_bytes: config.max_client_prepared_bytes,
                message: config.max_message_bytes,
            },
            stall: config.client_stall_timeout(),
            idle_transaction: config.idle_transaction_timeout(),
            routines_due: s.role.routines_due(linked, ROUTINES_REFRESH),
        }
    };
    let mut scan = ServerScan {
        max_message: limits.prepared.message,
        ..ServerScan::default()
    };
    let outcome = match sync_params(s, &mut server).await {
        Ok(()) => {
            let mut sbuf = std::mem::take(&mut server.buf);
            let small = borrow_buffer(s, &mut server);
            let outcome = link(
                s,
                &mut server,
                &mut sbuf,
                &mut scan,
                Around {
                    shared,
                    client,
                    signals,
                    limits: &limits,
                },
            )
            .await;
            return_buffer(s, &mut server, small);
            if server.buf.is_empty() {
                // A large message grew it: an idle server keeps a small one.
                if sbuf.capacity() > KEEP_CAPACITY {
                    sbuf = BytesMut::new();
                }
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
        Ok(Linked::Done) if server.loaded => server.discard(),
        Ok(Linked::Done) => server.release(),
        Ok(Linked::Unknown) => server.discard(),
        Ok(Linked::Paused) => give_back(s, server).await,
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
    // With the server given back: the listener's word on the client's new channels,
    // then the ReadyForQuery that ends its transaction.
    listen::finish(s, shared, scan.ack.take(), scan.held_ready).await?;
    Ok(ControlFlow::Continue(()))
}

/// A read buffer grown past this for a large message is not kept once the stretch
/// is over (a server parked with a 1 MiB buffer per connection adds up).
const KEEP_CAPACITY: usize = 4 * READ_CHUNK;

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
    let mut big = std::mem::replace(&mut s.buf, small);
    if big.capacity() > KEEP_CAPACITY {
        big = BytesMut::new();
    }
    server.client_buf = big;
}
