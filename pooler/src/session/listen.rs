//! LISTEN in transaction mode, the session's side (design.md, "LISTEN/NOTIFY"; the
//! listener itself is `notify/`).
//!
//! A client's LISTEN and UNLISTEN run on its transaction server as they are, so
//! Postgres decides what takes effect. Before a batch that may UNLISTEN, the server gets
//! the client's channels ([`prime`]); once the transaction is over, [`settle`] reads
//! what the server listens on, takes it off the server, and hands the client's new set
//! to its role's listener, holding back the client's last ReadyForQuery until the
//! listener listens (so a NOTIFY sent after the LISTEN returned always arrives).
//! Notifications then wait in the client's inbox and go out between its transactions
//! ([`deliver`]); every notification a server relays directly (a pinned or
//! session-mode server) passes [`Filter`] first, which keeps other apps' out.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::task::Poll;

use bytes::BytesMut;
use postgres_protocol::message::backend::Message;
use tokio::io::AsyncWriteExt;

use super::client::{Session, server_lost};
use super::signals::Signals;
use super::upkeep::{bounded_rows, next_message};
use crate::backend::ServerConn;
use crate::frontdoor::{SessionError, fatal};
use crate::notify::channels::Channel;
use crate::notify::senders::Senders;
use crate::notify::sql::{self, Primed};
use crate::notify::{Ack, Limits, ListenError};
use crate::proto::SqlState;
use crate::proto::backend::parse_notification_response;
use crate::registry::ClientInfo;
use crate::shared::Shared;

/// The ReadyForQuery (idle) held back until the listener listens.
pub(super) const READY_IDLE: &[u8] = b"Z\0\0\0\x05I";

/// Notifications are written to a client at most this many bytes at a time.
const DELIVERY_CHUNK: usize = 64 * 1024;

/// How long a client that does not read gets to take its FATAL error before it is
/// closed without it.
const LAST_WORDS: std::time::Duration = std::time::Duration::from_secs(1);

/// What happens to a notification a server relays straight to its client.
pub(super) enum Verdict {
    Pass,
    Drop,
    /// Its sender is not known yet: look it up, then walk on.
    Resolve(i32),
}

/// What a directly relayed notification is checked against.
pub(super) struct Filter<'a> {
    pub(super) role: &'a str,
    pub(super) senders: &'a Senders,
    /// The client's multiplexed channels: their notifications come from the listener,
    /// and a primed server's copy would be a duplicate.
    pub(super) mine: Option<&'a BTreeSet<Channel>>,
    pub(super) dropped: &'a prometheus::IntCounter,
}

impl Filter<'_> {
    /// Whether a NotificationResponse (`body` without tag and length) may reach the
    /// client: only what a session of its own role sent.
    pub(super) fn verdict(&self, body: &[u8]) -> Verdict {
        let Ok(n) = parse_notification_response(body) else {
            return Verdict::Drop;
        };
        let multiplexed = self
            .mine
            .is_some_and(|mine| std::str::from_utf8(n.channel).is_ok_and(|c| mine.contains(c)));
        if multiplexed {
            return Verdict::Drop;
        }
        match self.senders.known(n.pid) {
            Some(Some(role)) if *role == *self.role => Verdict::Pass,
            Some(_) => {
                self.dropped.inc();
                Verdict::Drop
            }
            None => Verdict::Resolve(n.pid),
        }
    }
}

/// Before forwarding a batch that may UNLISTEN: gives the server the client's channels,
/// so that what it reports afterwards is the client's whole set. `status` is the
/// server's transaction status before the batch, `None` if requests of the client's
/// are still in flight (a pipeline): then no prime, and an UNLISTEN in that batch of a
/// channel the client had is not seen (see [`Primed::No`]).
pub(super) async fn prime(
    s: &mut Session,
    server: &mut ServerConn,
    status: Option<u8>,
) -> Result<(), SessionError> {
    let channels = match s.listening.as_deref() {
        Some(sub) if sub.primed() == Primed::No => sub.channels(),
        _ => return Ok(()),
    };
    let primed = match status {
        Some(b'I') => Primed::Outside,
        Some(b'T') => Primed::Inside,
        // A failed transaction runs nothing; a pipeline cannot take a query between.
        _ => return Ok(()),
    };
    let text = sql::prime(channels, primed == Primed::Inside);
    let mut out = BytesMut::new();
    postgres_protocol::message::frontend::query(&text, &mut out)?;
    // Nothing of the batch has been sent: the client has nothing in flight.
    if let Err(e) = server.stream.write_all(&out).await {
        return server_lost(s, false, e.to_string()).await;
    }
    let mut failed = None;
    loop {
        match next_message(s, server).await? {
            Message::ErrorResponse(body) => {
                failed = Some(crate::backend::server_error(&mut body.fields()).to_string());
            }
            Message::ReadyForQuery(_) => break,
            // Notifications on the primed channels come from the listener too.
            _ => {}
        }
    }
    if let Some(e) = failed {
        // Inside the client's transaction this has aborted it: it must not go on as if
        // nothing happened.
        let message = format!("the pooler could not carry the session's LISTEN channels: {e}");
        return fatal(&mut s.stream, SqlState::CONNECTION_FAILURE, message).await;
    }
    if let Some(sub) = s.listening.as_deref_mut() {
        sub.set_primed(primed);
    }
    Ok(())
}

/// Once the transaction that may have changed the client's channels is over (the
/// server is idle): reads them, takes them off the server, and gives the client exactly
/// those on its role's listener. Returns what to wait for before the client may go on
/// ([`finish`]), which the caller does after giving its server back. A failure ends the
/// session.
pub(super) async fn settle(
    s: &mut Session,
    server: &mut ServerConn,
    shared: &Shared,
    client: &Arc<ClientInfo>,
) -> Result<Option<Ack>, SessionError> {
    let primed = s.listening.as_deref_mut().map_or(Primed::No, |sub| {
        let primed = sub.primed();
        sub.set_primed(Primed::No);
        primed
    });
    s.pending.listen = false;
    s.pending.unlisten = false;
    let max_channels = shared.config().max_client_listen_channels;
    let text = sql::read_back(primed == Primed::Inside, max_channels);
    let rows = match bounded_rows(server, &text).await {
        Ok(rows) => rows,
        Err(e) => return server_lost(s, false, format!("reading the LISTEN channels: {e}")).await,
    };
    let read = match sql::parse_read_back(&rows) {
        Ok(read) => read,
        Err(e) => return server_lost(s, false, e.to_string()).await,
    };
    let empty = BTreeSet::new();
    let before = s.listening.as_deref().map_or(&empty, |sub| sub.channels());
    let channels = sql::new_set(before, primed, read);
    if s.listening.is_none() && channels.is_empty() {
        return Ok(None);
    }
    let limits = {
        let config = shared.config();
        Limits {
            max_listeners: config.max_listener_servers(),
            max_channels: config.max_client_listen_channels,
            max_bytes: config.max_client_notification_bytes,
        }
    };
    let mut current = s.listening.take().map(|b| *b);
    let result = shared
        .notify
        .subscribe(&mut current, &s.role.name, client, channels, &limits);
    s.listening = current.map(Box::new);
    match result {
        Ok(ack) => Ok(ack),
        Err(e) => listen_failed(s, e).await,
    }
}

/// The end of a stretch that changed the client's channels: waits for the listener
/// server to listen on them (a client that gave its server back holds none meanwhile),
/// then lets the held-back ReadyForQuery through.
pub(super) async fn finish(
    s: &mut Session,
    shared: &Shared,
    ack: Option<Ack>,
    held_ready: bool,
) -> Result<(), SessionError> {
    if let Some(ack) = ack {
        let wait = shared.config().query_wait_timeout();
        if let Err(e) = ack.wait(wait).await {
            return listen_failed(s, e).await;
        }
    }
    if held_ready {
        s.stream.write_all(READY_IDLE).await?;
    }
    Ok(())
}

async fn listen_failed<T>(s: &mut Session, e: ListenError) -> Result<T, SessionError> {
    let code = match e {
        ListenError::NotApplied(_) => SqlState::CONNECTION_FAILURE,
        ListenError::TooManyListeners { .. } | ListenError::TooManyChannels(_) => {
            SqlState::CONFIGURATION_LIMIT_EXCEEDED
        }
    };
    fatal(&mut s.stream, code, e.to_string()).await
}

/// Writes the client's waiting notifications (and notices of a lost listener) while it
/// is between transactions. A client that lets its inbox overflow, or stops reading
/// until a signal comes, is disconnected.
pub(super) async fn deliver(
    s: &mut Session,
    shared: &Shared,
    signals: &Signals,
    client: &ClientInfo,
) -> Result<(), SessionError> {
    let Some(inbox) = s.listening.as_deref().map(|sub| sub.inbox().clone()) else {
        return Ok(());
    };
    let mut out = BytesMut::new();
    loop {
        out.clear();
        match inbox.take(&mut out, DELIVERY_CHUNK) {
            Ok(0) => return Ok(()),
            Ok(_) => {}
            Err(overflow) => return overflowed(s, shared, overflow.to_string()).await,
        }
        // A client that does not read blocks this write: its inbox then overflows, or
        // a signal comes, and either ends it.
        let stuck = std::future::poll_fn(|cx| {
            client.signal().register(cx.waker());
            match signals.fired(true) {
                Some(stop) => Poll::Ready(Some(stop)),
                None if inbox.overflowed() => Poll::Ready(None),
                None => Poll::Pending,
            }
        });
        let stop = tokio::select! {
            biased;
            written = s.stream.write_all(&out) => {
                written?;
                continue;
            }
            stop = stuck => stop,
        };
        return match stop {
            None => {
                let message = inbox
                    .take(&mut BytesMut::new(), 0)
                    .err()
                    .map_or_else(String::new, |o| o.to_string());
                overflowed(s, shared, message).await
            }
            Some(_) => {
                let message = "terminating connection: the pooler is closing it".to_owned();
                last_words(s, SqlState::ADMIN_SHUTDOWN, message).await
            }
        };
    }
}

async fn overflowed(s: &mut Session, shared: &Shared, message: String) -> Result<(), SessionError> {
    shared.metrics.notification_overflows.inc();
    tracing::info!(role = %s.role.name, "a listening client does not read its notifications");
    last_words(s, SqlState::CONFIGURATION_LIMIT_EXCEEDED, message).await
}

/// A FATAL error for a client that may not be reading: written if it goes out within
/// [`LAST_WORDS`], the session ends either way.
async fn last_words(s: &mut Session, code: SqlState, message: String) -> Result<(), SessionError> {
    let reported = SessionError::Reported {
        code,
        message: message.clone(),
    };
    match tokio::time::timeout(LAST_WORDS, fatal::<()>(&mut s.stream, code, message)).await {
        Ok(result) => result,
        Err(_) => Err(reported),
    }
}

/// Resolves once `inbox` has something to deliver (or overflowed); never without an
/// inbox. Registers on the client's waker first, then looks, as the stop signals do:
/// the listener task rings it when it fills an empty inbox.
pub(super) fn ready<'a>(
    client: &'a ClientInfo,
    inbox: Option<&'a crate::notify::Inbox>,
) -> impl std::future::Future<Output = ()> + 'a {
    std::future::poll_fn(move |cx| {
        let Some(inbox) = inbox else {
            return Poll::Pending;
        };
        client.signal().register(cx.waker());
        if inbox.is_ready() {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    })
}
