//! A checked-out server (pgdog's guard pattern, with the default inverted).
//!
//! Only an explicit [`Checkout::release`] returns the server to the pool. Every other
//! way a checkout ends (an error unwinding the session, the client disconnecting mid
//! transaction, a task being aborted) drops it, and that closes the server and frees
//! its slot: a server nobody vouched for as clean is never handed to the next client.

use std::ops::{Deref, DerefMut};
use std::time::Duration;

use super::Pools;
use super::scheduler::ServerId;

pub struct Checkout<S: Send + 'static> {
    // Field order matters: on drop the connection is closed first, then the ticket
    // tells the scheduler the slot is free. Neither happens under the pool's lock.
    conn: S,
    ticket: Ticket<S>,
    idle_for: Duration,
}

/// The slot of a checked-out server. Split from the connection so `release` can move
/// the connection out (a type with `Drop` cannot be destructured) with no `Option`.
struct Ticket<S: Send + 'static> {
    pools: Pools<S>,
    server: ServerId,
    armed: bool,
}

impl<S: Send + 'static> Drop for Ticket<S> {
    fn drop(&mut self) {
        if self.armed {
            self.pools.discard_server(self.server);
        }
    }
}

impl<S: Send + 'static> Checkout<S> {
    pub(super) fn new(pools: Pools<S>, server: ServerId, conn: S, idle_for: Duration) -> Self {
        Self {
            conn,
            idle_for,
            ticket: Ticket {
                pools,
                server,
                armed: true,
            },
        }
    }

    /// The scheduler's id of this server (for logs and metrics labels).
    pub fn server_id(&self) -> ServerId {
        self.ticket.server
    }

    /// How long the server sat idle before this checkout (zero when it came straight
    /// from another client or a fresh login). design.md, checkout rule 1: a server idle
    /// past a threshold is health-checked before use; the backend decides how.
    pub fn idle_for(&self) -> Duration {
        self.idle_for
    }

    /// Returns a clean server (idle, no transaction, nothing pinned) to the pool. The
    /// caller vouches for its state: design.md, "Pooler" point 7.
    pub fn release(self) {
        let (server, conn, pools) = self.disarm();
        pools.release_server(server, conn);
    }

    /// Closes the server (broken, dirty, or state that cannot be reset) and frees its
    /// slot for whoever waits. Unlike dropping the checkout, the connection is ended
    /// with Terminate and its slot is taken again only once Postgres has let go of it.
    pub fn discard(self) {
        let (server, conn, pools) = self.disarm();
        pools.discard_conn(server, conn);
    }

    /// Takes the connection back without telling the scheduler anything: for the pool's
    /// own use when a grant finds its waiter gone.
    pub(super) fn into_parts(self) -> (ServerId, S) {
        let (server, conn, _pools) = self.disarm();
        (server, conn)
    }

    fn disarm(self) -> (ServerId, S, Pools<S>) {
        let Checkout {
            conn, mut ticket, ..
        } = self;
        ticket.armed = false;
        (ticket.server, conn, ticket.pools.clone())
    }
}

impl<S: Send + 'static> Deref for Checkout<S> {
    type Target = S;
    fn deref(&self) -> &S {
        &self.conn
    }
}

impl<S: Send + 'static> DerefMut for Checkout<S> {
    fn deref_mut(&mut self) -> &mut S {
        &mut self.conn
    }
}

impl<S: Send + 'static> std::fmt::Debug for Checkout<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkout")
            .field("server", &self.ticket.server)
            .finish_non_exhaustive()
    }
}
