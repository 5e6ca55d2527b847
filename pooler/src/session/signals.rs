//! The signals a client listens to (revocation, drain, the end of the grace
//! period), and an idle client's wait for its next request, one of them, or
//! notifications waiting in its inbox.

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

    /// Resolves with the first signal that fires: registers first, then looks, so a
    /// wake between the two is not lost.
    pub(super) fn wait<'a>(
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

/// Resolves once `role` is paused: a client that keeps its server between transactions
/// then looks whether it can let it go. `PAUSE` wakes every client after the switch.
pub(super) fn paused<'a>(
    pause: &'a crate::shared::Pause,
    role: &'a str,
    client: &'a ClientInfo,
) -> impl std::future::Future<Output = ()> + 'a {
    std::future::poll_fn(move |cx| {
        client.signal().register(cx.waker());
        if pause.is_paused(role) {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    })
}

/// What ended an idle client's wait.
pub(super) enum Woke {
    /// A read's result (0: the client left).
    Read(std::io::Result<usize>),
    Stop(Stop),
    /// The parking sweep found it idle for a whole period: park it (park.rs).
    Park,
    /// Notifications wait in its inbox (or it overflowed): deliver them (listen.rs).
    Deliver,
}

impl Signals {
    /// An idle client's signals: a stop, notifications to deliver, or a request to
    /// park. The listener task rings the same waker when it fills an empty inbox.
    fn idle<'a>(
        &'a self,
        client: &'a ClientInfo,
        inbox: Option<&'a Inbox>,
    ) -> impl std::future::Future<Output = Woke> + 'a {
        std::future::poll_fn(move |cx| {
            client.signal().register(cx.waker());
            if let Some(stop) = self.fired(false) {
                Poll::Ready(Woke::Stop(stop))
            } else if inbox.is_some_and(Inbox::is_ready) {
                Poll::Ready(Woke::Deliver)
            } else if client.take_park_request() {
                Poll::Ready(Woke::Park)
            } else {
                Poll::Pending
            }
        })
    }
}

/// An idle client's wait for (more of) its next request, a signal, or a request to
/// park. A plaintext client is read only once readable, and then with one read that,
/// when it comes back short, tells tokio the socket is drained: the relay's next read
/// does not find it empty first (a `recvfrom` per transaction). Its small buffer is
/// kept while it runs in a task (parking drops it); one grown past a few chunks by a
/// large request is dropped here. TLS may hold decrypted bytes, so it reads.
pub(super) async fn wait_idle(
    stream: &mut crate::net::stream::Stream,
    buf: &mut BytesMut,
    signals: &Signals,
    client: &ClientInfo,
    inbox: Option<&Inbox>,
) -> Woke {
    if buf.is_empty() && buf.capacity() > IDLE_CHUNK * 4 {
        *buf = BytesMut::new();
    }
    let crate::net::stream::Stream::Plain(tcp) = stream else {
        buf.reserve(IDLE_CHUNK);
        return tokio::select! {
            biased;
            n = stream.read_buf(buf) => Woke::Read(n),
            woke = signals.idle(client, inbox) => woke,
        };
    };
    loop {
        tokio::select! {
            biased;
            ready = tcp.readable() => {
                if let Err(e) = ready {
                    return Woke::Read(Err(e));
                }
            }
            woke = signals.idle(client, inbox) => return woke,
        }
        buf.reserve(IDLE_CHUNK);
        // Once: a spurious readiness leaves our waker registered, and the loop waits.
        let read = std::future::poll_fn(|cx| {
            match tokio_util::io::poll_read_buf(std::pin::Pin::new(&mut *tcp), cx, buf) {
                Poll::Pending => Poll::Ready(None),
                Poll::Ready(r) => Poll::Ready(Some(r)),
            }
        })
        .await;
        if let Some(read) = read {
            return Woke::Read(read);
        }
    }
}
