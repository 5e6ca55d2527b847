//! The signals a client listens to (revocation, drain, the end of the grace
//! period, notifications waiting in its inbox), and an idle client's wait for its next
//! request or one of them.

use std::task::Poll;

use bytes::BytesMut;
use tokio::io::AsyncReadExt;

use super::client::IDLE_CHUNK;
use crate::notify::Inbox;
use crate::registry::ClientInfo;

/// The signals a client listens to. Read by version (an atomic load) while the
/// client waits on its own waker in the registry, which every sender wakes after
/// sending: a watch future per wait would lock a channel every client shares, several
/// times a transaction.
pub(super) struct Signals {
    /// The role was revoked or killed: leave now.
    pub(super) revoked: tokio::sync::watch::Receiver<u64>,
    /// Draining: leave at the next idle point.
    pub(super) shutdown: tokio::sync::watch::Receiver<bool>,
    /// The grace period is over: leave now.
    pub(super) closing: tokio::sync::watch::Receiver<bool>,
}

/// What a signal asks of the client.
pub(super) enum Stop {
    Revoked,
    Draining,
    Closing,
    /// Notifications wait in the client's inbox (or it overflowed): deliver them. Only
    /// asked for where the client is between transactions.
    Deliver,
}

impl Signals {
    /// The first signal not yet acted on; `draining` once the drain has been noted.
    /// A closed channel counts as fired, as `changed()` would report it.
    pub(super) fn fired(&self, draining: bool) -> Option<Stop> {
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

    /// Resolves with the first signal that fires, or [`Stop::Deliver`] once `inbox` has
    /// something: registers first, then looks, so a wake between the two is not lost.
    /// The listener task wakes the same waker when it fills an empty inbox.
    pub(super) fn wait<'a>(
        &'a self,
        client: &'a ClientInfo,
        draining: bool,
        inbox: Option<&'a Inbox>,
    ) -> impl std::future::Future<Output = Stop> + 'a {
        std::future::poll_fn(move |cx| {
            client.signal().register(cx.waker());
            match self.fired(draining) {
                Some(stop) => Poll::Ready(stop),
                None if inbox.is_some_and(Inbox::is_ready) => Poll::Ready(Stop::Deliver),
                None => Poll::Pending,
            }
        })
    }
}

/// An idle client's wait for (more of) its next request: `Ok` with a read's result
/// (0: the client left), or the signal that came first. A plaintext client with
/// nothing pending is read only once readable, into a buffer allocated then, so an
/// idle one holds none; TLS may hold decrypted bytes, so it reads.
pub(super) async fn wait_idle(
    stream: &mut crate::net::stream::Stream,
    buf: &mut BytesMut,
    signals: &Signals,
    client: &ClientInfo,
    inbox: Option<&Inbox>,
) -> Result<std::io::Result<usize>, Stop> {
    if buf.is_empty() {
        *buf = BytesMut::new();
    } else {
        buf.reserve(IDLE_CHUNK);
        return read_or_stop(stream, buf, signals, client, inbox).await;
    }
    let crate::net::stream::Stream::Plain(tcp) = stream else {
        buf.reserve(IDLE_CHUNK);
        return read_or_stop(stream, buf, signals, client, inbox).await;
    };
    loop {
        tokio::select! {
            biased;
            ready = tcp.readable() => {
                if let Err(e) = ready {
                    return Ok(Err(e));
                }
            }
            stop = signals.wait(client, false, inbox) => return Err(stop),
        }
        buf.reserve(IDLE_CHUNK);
        match tcp.try_read_buf(buf) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            read => return Ok(read),
        }
    }
}

/// Reads what the client sends, or the signal that came first.
async fn read_or_stop(
    stream: &mut crate::net::stream::Stream,
    buf: &mut BytesMut,
    signals: &Signals,
    client: &ClientInfo,
    inbox: Option<&Inbox>,
) -> Result<std::io::Result<usize>, Stop> {
    tokio::select! {
        biased;
        n = stream.read_buf(buf) => Ok(n),
        stop = signals.wait(client, false, inbox) => Err(stop),
    }
}
