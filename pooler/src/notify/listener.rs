//! The task that holds one role's listener server: it gets a server from the role's
//! listener pool, keeps it listening on the union of the role's clients' channels (one
//! batch of LISTEN/UNLISTEN at a time), hands every notification a session of the role
//! sent to the inboxes of the clients listening on its channel, and drops the rest.
//!
//! A lost server (Postgres restarted, an administrator's terminate, a network drop) is
//! reported to every client as a WARNING notice, and a new one is logged in and given
//! the whole union again. The task ends, closing its server, once no client listens.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::channels::Batch;
use super::role::{Common, RoleListener, State};
use super::sql;
use crate::backend::ServerConn;
use crate::proto::SqlState;
use crate::proto::backend::{self as msg, Diagnostic, Severity};
use crate::proto::frame::{self, Side};

/// Largest message a listener server may send: notifications carry at most 8000 bytes
/// of payload and a 63-byte channel, errors and notices are short.
const MAX_MESSAGE: usize = 64 * 1024;
const READ_CHUNK: usize = 8 * 1024;
/// How long one attempt to get a server waits for a slot in the budget; the task tries
/// again for as long as clients listen (each client's own wait is bounded apart).
const CHECKOUT_WAIT: Duration = Duration::from_secs(30);
/// Between failed attempts to get a server: doubling from the first to the last.
const RETRY_FIRST: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(5);
/// A batch or the set-up that takes longer means the server is not answering.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

/// The session as the listener needs it: UTF-8 channel names and payloads whatever the
/// role's defaults say, never closed for being idle (it is idle by design), and named in
/// `pg_stat_activity` for operators.
const SETUP: &str = "SET client_encoding = 'UTF8'; \
    SET application_name = 'dataplane-pooler LISTEN'; \
    SELECT pg_catalog.set_config('idle_session_timeout', '0', false) \
    WHERE pg_catalog.current_setting('server_version_num')::int >= 140000";

enum Ended {
    /// Nobody listens any more; the listener is closed.
    Unused,
    Lost(String),
}

/// What the server is answering.
enum Command {
    Setup,
    Batch(Batch),
}

pub(super) async fn run(hub: Arc<Common>, listener: Arc<RoleListener>) {
    let mut retry = RETRY_FIRST;
    loop {
        if hub.close_if_unused(&listener) {
            return;
        }
        let checkout = hub.pools.checkout_listener(&listener.role, CHECKOUT_WAIT);
        tokio::pin!(checkout);
        let got = loop {
            tokio::select! {
                got = &mut checkout => break Some(got),
                () = listener.changed.notified() => {
                    if listener.lock().subscribers.is_empty() {
                        break None;
                    }
                }
            }
        };
        let mut server = match got {
            None => continue,
            Some(Ok(server)) => server,
            Some(Err(e)) => {
                tracing::warn!(role = %listener.role, error = %e, "no server for the LISTEN connection");
                let _ = tokio::time::timeout(retry, listener.changed.notified()).await;
                retry = (retry * 2).min(RETRY_MAX);
                continue;
            }
        };
        if let Some(info) = &server.registered {
            info.entry.mark_listener();
        }
        match serve(&hub, &listener, &mut server).await {
            Ended::Unused => {
                server.discard();
                return;
            }
            Ended::Lost(why) => {
                server.discard();
                hub.metrics.listener_losses.inc();
                tracing::warn!(role = %listener.role, why = %why, "LISTEN connection lost; re-establishing it");
                lost(&listener, &why);
                let _ = tokio::time::timeout(retry, listener.changed.notified()).await;
                retry = (retry * 2).min(RETRY_MAX);
            }
        }
    }
}

/// Tells every client its notifications may have been lost, and owes the whole union
/// to the next server.
fn lost(listener: &RoleListener, why: &str) {
    let message = format!(
        "the pooler's LISTEN connection for this app was lost ({why}); it is being \
         re-established, and notifications sent until then are lost"
    );
    let mut notice = BytesMut::new();
    msg::notice_response(
        &mut notice,
        &Diagnostic::new(Severity::Warning, SqlState::CONNECTION_FAILURE, &message),
    );
    let notice = notice.freeze();
    let mut st = listener.lock();
    st.union.server_lost();
    for sub in st.subscribers.values() {
        // An overflowed inbox is already set to end its session.
        if sub.inbox.push(notice.clone(), None).unwrap_or(true) {
            sub.client.signal().wake();
        }
    }
}

/// Acknowledges to waiting clients every change the server has.
fn publish(listener: &RoleListener, st: &State) {
    let version = st.union.applied_version();
    listener.applied.send_if_modified(|v| {
        let newer = *v < version;
        if newer {
            *v = version;
        }
        newer
    });
}

async fn serve(hub: &Common, listener: &Arc<RoleListener>, server: &mut ServerConn) -> Ended {
    let mut buf = std::mem::take(&mut server.buf);
    let mut out = BytesMut::new();
    if let Err(e) = postgres_protocol::message::frontend::query(SETUP, &mut out) {
        return Ended::Lost(format!("encoding the set-up: {e}"));
    }
    if let Err(e) = server.stream.write_all(&out).await {
        return Ended::Lost(e.to_string());
    }
    let mut in_flight = Some(Command::Setup);
    let mut since = tokio::time::Instant::now();
    let mut failure: Option<String> = None;
    loop {
        if in_flight.is_none() {
            let batch = {
                let mut st = listener.lock();
                let batch = st.union.take_batch();
                publish(listener, &st);
                batch
            };
            match batch {
                Some(batch) => {
                    out.clear();
                    if let Err(e) =
                        postgres_protocol::message::frontend::query(&sql::batch(&batch), &mut out)
                    {
                        return Ended::Lost(format!("encoding a LISTEN batch: {e}"));
                    }
                    if let Err(e) = server.stream.write_all(&out).await {
                        return Ended::Lost(e.to_string());
                    }
                    in_flight = Some(Command::Batch(batch));
                    since = tokio::time::Instant::now();
                }
                None if hub.close_if_unused(listener) => return Ended::Unused,
                None => {}
            }
        }
        if buf.capacity() - buf.len() < 1024 {
            buf.reserve(READ_CHUNK);
        }
        let deadline = since + COMMAND_TIMEOUT;
        tokio::select! {
            read = server.stream.read_buf(&mut buf) => match read {
                Ok(0) => {
                    let why = failure.take().unwrap_or_else(|| "the server closed the connection".into());
                    return Ended::Lost(why);
                }
                Ok(_) => {}
                Err(e) => return Ended::Lost(e.to_string()),
            },
            () = listener.changed.notified(), if in_flight.is_none() => continue,
            () = tokio::time::sleep_until(deadline), if in_flight.is_some() => {
                return Ended::Lost(format!("no answer to a LISTEN batch within {COMMAND_TIMEOUT:?}"));
            }
        }
        // Senders this read brought that are not known yet: one lookup for all of them,
        // before anything is delivered, so the order of notifications stays.
        let unknown = unknown_senders(&buf, hub);
        if !unknown.is_empty() {
            hub.senders.resolve(&unknown).await;
        }
        loop {
            let header = match frame::peek(&buf, Side::Backend) {
                Ok(Some(h)) => h,
                Ok(None) => break,
                Err(e) => return Ended::Lost(format!("malformed message: {e}")),
            };
            if header.len > MAX_MESSAGE {
                return Ended::Lost(format!("a message of {} bytes", header.len));
            }
            if buf.len() < header.len {
                break;
            }
            let message = &buf[..header.len];
            match header.tag {
                b'A' => {
                    if let Err(e) = deliver(hub, listener, message) {
                        return Ended::Lost(e);
                    }
                }
                b'E' => {
                    let text = msg::parse_error_response(&message[5..])
                        .map(|d| format!("{}: {}", d.code, d.message))
                        .unwrap_or_else(|e| e.to_string());
                    failure = Some(text);
                }
                b'Z' => match in_flight.take() {
                    Some(_) if failure.is_some() => {
                        let why = failure.take().unwrap_or_default();
                        return Ended::Lost(format!("the server refused a LISTEN batch ({why})"));
                    }
                    Some(Command::Batch(batch)) => {
                        let mut st = listener.lock();
                        st.union.applied(batch);
                        publish(listener, &st);
                    }
                    Some(Command::Setup) | None => {}
                },
                _ => {}
            }
            buf.advance(header.len);
        }
    }
}

/// The pids of the complete notifications in `buf` whose role is not known yet.
fn unknown_senders(buf: &[u8], hub: &Common) -> Vec<i32> {
    let mut pids = Vec::new();
    let _ = frame::for_each_message(buf, Side::Backend, |tag, body| {
        if tag == b'A' {
            if let Ok(n) = msg::parse_notification_response(body) {
                if hub.senders.known(n.pid).is_none() && !pids.contains(&n.pid) {
                    pids.push(n.pid);
                }
            }
        }
        std::ops::ControlFlow::Continue(())
    });
    pids
}

/// Queues a notification (a whole message) for every client of the role listening on
/// its channel, if a session of the role sent it.
fn deliver(hub: &Common, listener: &RoleListener, message: &[u8]) -> Result<(), String> {
    let n = msg::parse_notification_response(&message[5..])
        .map_err(|e| format!("malformed notification: {e}"))?;
    let own = hub.senders.known(n.pid).flatten().as_deref() == Some(&*listener.role);
    if !own {
        hub.metrics.notifications_dropped.inc();
        return Ok(());
    }
    // Names are UTF-8 (SETUP); one that is not cannot be anyone's channel.
    let Ok(name) = std::str::from_utf8(n.channel) else {
        return Ok(());
    };
    let st = listener.lock();
    // Nobody listens on it now: an UNLISTEN the server has not run yet.
    let Some((channel, clients)) = st.union.channel(name) else {
        return Ok(());
    };
    // One copy, shared by every inbox: not a slice of the read buffer, which a slow
    // client's inbox would otherwise keep whole.
    let bytes = Bytes::copy_from_slice(message);
    for id in clients {
        let Some(sub) = st.subscribers.get(&id) else {
            continue;
        };
        match sub.inbox.push(bytes.clone(), Some(channel)) {
            Ok(first) => {
                hub.metrics.notifications_delivered.inc();
                if first {
                    sub.client.signal().wake();
                }
            }
            // The client learns of it when it next looks; the others go on.
            Err(_) => sub.client.signal().wake(),
        }
    }
    Ok(())
}
