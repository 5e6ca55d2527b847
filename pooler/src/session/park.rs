//! Idle app clients parked without a task of their own (net/park.rs is the lot).
//!
//! A client parks right after login (most clients of a platform with many small apps
//! sit idle) and, once busy, when the sweep finds it idle in its task for a whole
//! period ([`PARK_SWEEP`]): a busy client between two transactions keeps its task and
//! its warm buffers, and pays nothing for parking. Parked, a client is its [`Session`]
//! (socket, ids, shared startup parameters, statement map) and its registry entry.
//!
//! What wakes a parked client (all through wakers, none by polling):
//! - its socket becoming readable (a request, or a hang-up);
//! - its doorbell, [`ClientInfo::signal`]: revocation and KILL, the drain and the end
//!   of the grace period ring it (`Registry::wake_all`); it resumes only if one of
//!   them concerns it ([`Signals::fired`]);
//! - "something to send" ([`has_output`]): whoever queues output for an idle client
//!   (LISTEN's notifications) makes it visible there, then rings the same doorbell.
//!
//! Resumed, it gets a task again (the session's [`Resume`], which runs the relay
//! from its idle wait: the wait sees at once what woke it).

use std::os::fd::RawFd;
use std::sync::{Arc, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::BytesMut;

use super::Session;
use super::signals::Signals;
use crate::net::Hold;
use crate::net::park::Parked;
use crate::registry::{ClientInfo, Parking, Registered};
use crate::shared::Shared;

/// How often the sweep asks clients idle in their task since the last sweep to park:
/// a client parks after one to two periods without a request.
pub const PARK_SWEEP: Duration = Duration::from_secs(1);

/// Gives a resumed client a task of its own again; called with it counted as live.
pub(super) type Resume = fn(Box<Session>, Registered<ClientInfo>, Arc<Shared>, Hold);

/// A parked client: what it needs to resume, and nothing else (no read buffer, no
/// task, no future).
struct ParkedClient {
    session: Box<Session>,
    client: Registered<ClientInfo>,
    shared: Arc<Shared>,
    /// Counts it as live while it has no task, so a drain waits for it.
    hold: Hold,
    resume: Resume,
}

/// Parks an idle client with nothing buffered: its task may end.
pub(super) fn park(
    mut session: Box<Session>,
    client: Registered<ClientInfo>,
    shared: &Arc<Shared>,
    resume: Resume,
) {
    session.buf = BytesMut::new();
    session.statements.shed();
    if let Err(e) = session.stream.detach() {
        // Closed: the lot resumes it at once, and its task sees the socket gone.
        tracing::debug!(client = client.id, error = %e, "detaching a parked socket");
    }
    client.set_parking(Parking::Parked);
    let parked = ParkedClient {
        session,
        client,
        shared: shared.clone(),
        hold: shared.tasks.hold(),
        resume,
    };
    shared.lot.park(Box::new(parked));
}

/// The hook for output queued for an idle client: LISTEN's notifications (or an
/// overflow to report), which the role's listener task makes visible in the client's
/// inbox before it rings `client.signal()`; the resumed relay sends them from its idle
/// wait (listen.rs).
fn has_output(session: &Session, _client: &ClientInfo) -> bool {
    session.notified()
}

impl Parked for ParkedClient {
    fn poll_wake(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        self.client.signal().register(cx.waker());
        let signals = Signals {
            revoked: self.session.revoked.clone(),
            shutdown: self.shared.shutdown.clone(),
            closing: self.shared.closing.clone(),
        };
        if signals.fired(false).is_some() || has_output(&self.session, &self.client) {
            return Poll::Ready(());
        }
        self.session.stream.poll_idle_ready(cx)
    }

    fn socket(&self) -> Option<RawFd> {
        self.session.stream.detached_fd()
    }

    fn resume(self: Box<Self>) {
        let ParkedClient {
            mut session,
            client,
            shared,
            hold,
            resume,
        } = *self;
        if let Err(e) = session.stream.attach() {
            // Out of memory or file table in the kernel: the client is closed (its
            // socket already is) and its entry goes with it.
            tracing::warn!(client = client.id, error = %e, "a parked client could not resume");
            return;
        }
        client.set_parking(Parking::InTask);
        resume(session, client, shared, hold);
    }
}

/// Every [`PARK_SWEEP`], advances the parking clock and asks the clients idle in
/// their task since before the previous sweep to park. Ends with the pooler.
pub async fn sweep(shared: Weak<Shared>) {
    loop {
        tokio::time::sleep(PARK_SWEEP).await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let epoch = shared.lot.advance();
        shared.clients.for_each(|c| {
            c.ask_to_park(epoch);
        });
    }
}

#[cfg(test)]
mod tests {
    /// What an idle client costs is mostly these (README, "What a parked idle client
    /// costs"): a field added to one of them moves it to the next allocation size
    /// class for every idle client. Grow one only knowing that; box what is cold.
    #[test]
    fn a_parked_clients_parts_stay_within_their_size_classes() {
        use std::mem::size_of;
        assert!(
            size_of::<super::Session>() <= 224,
            "{}",
            size_of::<super::Session>()
        );
        // Within an `Arc` (two counters): 224 in all.
        let info = size_of::<crate::registry::ClientInfo>();
        assert!(info <= 208, "{info}");
        assert!(size_of::<super::ParkedClient>() <= 64);
    }
}
