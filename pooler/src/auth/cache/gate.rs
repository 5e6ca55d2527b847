//! The gate in front of the lookup connections: two lanes, so names nobody has logged
//! in with cannot starve the roles that do.
//!
//! - **Known**: roles this pooler has found before (and re-reads the LISTEN connection
//!   asks for). They go first whenever a connection frees up, and may use every
//!   connection. They need no bound: one lookup per role at a time (single-flight), and
//!   the known roles are bounded by `auth_cache_max_roles`.
//! - **Unknown**: every other name. At most `auth_lookup_queue` wait at once (past it
//!   the login is refused: [`Full`]), and they hold at most all connections but one,
//!   so a known role always finds one within a lookup's time.

use std::sync::Mutex;

/// Which lane a lookup waits in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lane {
    Known,
    Unknown,
}

/// The unknown lane's queue is full.
#[derive(Debug, PartialEq, Eq)]
pub struct Full;

#[derive(Debug, Default)]
struct Counts {
    busy: usize,
    unknown_busy: usize,
    known_waiting: usize,
    unknown_waiting: usize,
}

pub struct Gate {
    conns: usize,
    /// Connections the unknown lane may hold at once.
    unknown_max: usize,
    /// `auth_lookup_queue`.
    queue: usize,
    counts: Mutex<Counts>,
    wake: tokio::sync::Notify,
}

/// A place at a lookup connection; freed on drop.
pub struct Permit<'a> {
    gate: &'a Gate,
    lane: Lane,
}

/// A place in a lane's queue; left on drop (a login that leaves while waiting).
struct Waiting<'a> {
    gate: &'a Gate,
    lane: Lane,
    /// Still in the queue (not yet moved to a connection).
    queued: bool,
}

impl Gate {
    pub fn new(conns: usize, queue: usize) -> Self {
        let conns = conns.max(1);
        Gate {
            conns,
            unknown_max: (conns - 1).max(1),
            queue: queue.max(1),
            counts: Mutex::new(Counts::default()),
            wake: tokio::sync::Notify::new(),
        }
    }

    fn counts(&self) -> std::sync::MutexGuard<'_, Counts> {
        self.counts.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits for a lookup connection in `lane`. Cancel-safe: a waiter that is dropped
    /// leaves its queue.
    pub async fn enter(&self, lane: Lane) -> Result<Permit<'_>, Full> {
        let waiting = {
            let mut c = self.counts();
            match lane {
                Lane::Unknown if c.unknown_waiting >= self.queue => return Err(Full),
                Lane::Unknown => c.unknown_waiting += 1,
                Lane::Known => c.known_waiting += 1,
            }
            Waiting {
                gate: self,
                lane,
                queued: true,
            }
        };
        let mut waiting = waiting;
        loop {
            // Registered before looking, so a permit freed between the look and the
            // wait still wakes this one.
            let woken = self.wake.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            {
                let mut c = self.counts();
                let free = c.busy < self.conns;
                let allowed = match lane {
                    Lane::Known => free,
                    Lane::Unknown => {
                        free && c.unknown_busy < self.unknown_max && c.known_waiting == 0
                    }
                };
                if allowed {
                    c.busy += 1;
                    match lane {
                        Lane::Known => c.known_waiting -= 1,
                        Lane::Unknown => {
                            c.unknown_waiting -= 1;
                            c.unknown_busy += 1;
                        }
                    }
                    waiting.queued = false;
                    return Ok(Permit { gate: self, lane });
                }
            }
            woken.await;
        }
    }

    /// Lookups (waiting, running) per lane: (known, unknown).
    #[cfg(test)]
    fn load(&self) -> ((usize, usize), (usize, usize)) {
        let c = self.counts();
        (
            (c.known_waiting, c.busy - c.unknown_busy),
            (c.unknown_waiting, c.unknown_busy),
        )
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        {
            let mut c = self.gate.counts();
            c.busy -= 1;
            if self.lane == Lane::Unknown {
                c.unknown_busy -= 1;
            }
        }
        self.gate.wake.notify_waiters();
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if !self.queued {
            return;
        }
        {
            let mut c = self.gate.counts();
            match self.lane {
                Lane::Known => c.known_waiting -= 1,
                Lane::Unknown => c.unknown_waiting -= 1,
            }
        }
        // A known waiter leaving may let an unknown one in.
        self.gate.wake.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::poll;

    #[tokio::test]
    async fn unknown_names_queue_boundedly_and_leave_a_connection_to_known_roles() {
        let gate = Gate::new(2, 3);
        let first = gate.enter(Lane::Unknown).await.unwrap();
        // The unknown lane holds at most one of the two connections.
        let mut queued: Vec<_> = (0..3)
            .map(|_| Box::pin(gate.enter(Lane::Unknown)))
            .collect();
        for q in &mut queued {
            assert!(poll!(q.as_mut()).is_pending());
        }
        assert_eq!(
            gate.enter(Lane::Unknown).await.err(),
            Some(Full),
            "queue full"
        );
        let known = gate.enter(Lane::Known).await.unwrap();
        assert_eq!(gate.load(), ((0, 1), (3, 1)));
        // A known role waiting goes before the unknown names when a connection frees.
        let mut second = Box::pin(gate.enter(Lane::Known));
        assert!(poll!(second.as_mut()).is_pending());
        drop(first);
        assert!(
            poll!(queued[0].as_mut()).is_pending(),
            "the known one first"
        );
        let second = second.await.unwrap();
        drop((known, second));
        let next = queued.remove(0).await.unwrap();
        // A waiter that leaves gives its place back.
        drop(queued);
        assert_eq!(gate.load(), ((0, 0), (0, 1)));
        drop(next);
        assert_eq!(gate.load(), ((0, 0), (0, 0)));
    }
}
