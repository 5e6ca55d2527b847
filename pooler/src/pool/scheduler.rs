//! The budget scheduler: a pure state machine (no I/O, no tokio, time passed in) that
//! decides which role gets which of the cluster's few server slots (design.md, "The
//! budget: many roles, few server slots").
//!
//! Every entry point takes `now` and appends [`Action`]s to `out`; the async layer
//! performs them after dropping its lock. The scheduler is generic over the connection
//! `C` it parks while a server is idle and over the waiter payload `W` (a channel in
//! production, a tag in tests), so a decision hands the async layer exactly the objects
//! it must act on and the async layer keeps no parallel tables that could drift.
//!
//! Deliberate readings of design.md where it leaves room:
//! * "more than its fair share" on release means more than the share rounded *up* to
//!   whole slots. With more roles than slots the share is below one, and the literal
//!   reading would move every released server, a login per transaction: the thrash this
//!   scheduler exists to avoid. Fractional shares are settled by the quantum rule.
//! * "Service" for deficit round robin is checked-out time (what a role's clients
//!   actually used), divided by weight and compared in whole quanta; an idle server
//!   costs its role nothing because it can be evicted once `min_idle_before_evict` old.
//! * A failed login is charged to the role's longest-waiting client, which gets the
//!   error; the others keep waiting and the freed slot goes through the normal fill
//!   rule. Each failed attempt thus consumes one waiter: an outage fails each queued
//!   client once, after one attempt each, and never spins.

#[cfg(test)]
mod chaos;
mod fair;
#[cfg(test)]
mod sim;
#[cfg(test)]
mod tests;
mod types;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use super::slab::{Linked, Links, List, Slab};
pub use types::{
    Action, CloseReason, Counters, RoleConfig, RoleId, RoleStats, SchedulerConfig, SchedulerError,
    ServerId, WaiterId,
};

struct Role {
    config: RoleConfig,
    active: u32,
    opening: u32,
    /// LIFO: newest last, so the oldest idle server of the role is at index 0.
    idle: Vec<ServerId>,
    waiters: List,
    /// Checked-out time received, in microseconds × [`fair::WEIGHT_SCALE`] / weight.
    vservice: u64,
    /// Bumped by [`Scheduler::close_role`]; servers of an older epoch close on release.
    epoch: u32,
    in_demand: bool,
    /// min(pool_size, active + max(opening, waiting)): its part of [`Scheduler::demand`].
    wanted: u32,
    /// `Some((service in quanta, seq))` while in the hungry set: its key there.
    hungry_key: Option<(u64, u64)>,
    starving_since: Option<Instant>,
}

impl Role {
    fn held(&self) -> u32 {
        let idle = u32::try_from(self.idle.len()).unwrap_or(u32::MAX);
        self.active
            .saturating_add(self.opening)
            .saturating_add(idle)
    }
}

enum ServerState<C> {
    Opening,
    Idle { since: Instant, conn: C },
    Active { since: Instant },
}

struct Server<C> {
    role: RoleId,
    epoch: u32,
    /// When the slot was given to this role: the start of the quantum and of the lifetime.
    assigned_at: Instant,
    /// Position in the global idle list (oldest first).
    links: Links,
    state: ServerState<C>,
}

impl<C> Linked for Server<C> {
    fn links(&mut self) -> &mut Links {
        &mut self.links
    }
}

struct Waiter<W> {
    role: RoleId,
    payload: W,
    links: Links,
    /// When [`Scheduler::expire_waiters`] gives up on it; `None`: never.
    deadline: Option<Instant>,
}

impl<W> Linked for Waiter<W> {
    fn links(&mut self) -> &mut Links {
        &mut self.links
    }
}

pub struct Scheduler<C, W> {
    config: SchedulerConfig,
    roles: Vec<Role>,
    servers: Slab<Server<C>>,
    waiters: Slab<Waiter<W>>,
    /// Every idle server, in the order it was parked: the front has been idle longest.
    idle_lru: List,
    /// Σ weight of roles with demand (waiting, active or opening).
    demand_weight: u64,
    /// Roles that need another slot, least service first (deficit round robin, in whole
    /// quanta), then longest hungry (a tie broken by role id would serve low ids first
    /// every rotation).
    hungry: BTreeSet<(u64, u64, RoleId)>,
    /// Next arrival number for the hungry set's tie-break.
    hungry_seq: u64,
    /// Hungry roles that hold no server at all, longest first.
    starving: BTreeSet<(Instant, RoleId)>,
    /// Service level of the last role picked; a role that gains demand starts no lower,
    /// so a role back from a long quiet spell cannot claim all the slots to catch up.
    vclock: u64,
    /// No queued waiter's deadline is earlier (it may be earlier than every deadline
    /// still queued): the periodic expiry skips its scan until then.
    next_deadline: Option<Instant>,
    /// Σ `Role::wanted`, and its highest value since [`Scheduler::take_demand_peak`].
    wanted: u64,
    wanted_peak: u64,
    counters: Counters,
}

impl<C, W> Scheduler<C, W> {
    pub fn new(config: SchedulerConfig) -> Self {
        Self {
            config,
            roles: Vec::new(),
            servers: Slab::default(),
            waiters: Slab::default(),
            idle_lru: List::default(),
            demand_weight: 0,
            hungry: BTreeSet::new(),
            hungry_seq: 0,
            starving: BTreeSet::new(),
            vclock: 0,
            next_deadline: None,
            wanted: 0,
            wanted_peak: 0,
            counters: Counters::default(),
        }
    }

    pub fn config(&self) -> &SchedulerConfig {
        &self.config
    }

    pub fn counters(&self) -> Counters {
        self.counters
    }

    /// Live server slots (opening, active and idle): what counts against the budget.
    pub fn total_servers(&self) -> u32 {
        u32::try_from(self.servers.len()).unwrap_or(u32::MAX)
    }

    /// Servers this replica could use now: Σ over roles of min(pool_size, in use +
    /// max(logging in, waiting)).
    pub fn demand(&self) -> u32 {
        u32::try_from(self.wanted).unwrap_or(u32::MAX)
    }

    /// The highest [`Scheduler::demand`] since the last call, which it restarts: what a
    /// replica heartbeats. A peak, not a sample: between two transactions of a busy
    /// client its server is idle for microseconds, and a sample would miss it.
    pub fn take_demand_peak(&mut self) -> u32 {
        let peak = self.wanted_peak.max(self.wanted);
        self.wanted_peak = self.wanted;
        u32::try_from(peak).unwrap_or(u32::MAX)
    }

    pub fn add_role(&mut self, config: RoleConfig) -> RoleId {
        let id = RoleId(u32::try_from(self.roles.len()).unwrap_or(u32::MAX));
        self.roles.push(Role {
            config: fair::normalize(config),
            active: 0,
            opening: 0,
            idle: Vec::new(),
            waiters: List::default(),
            vservice: 0,
            epoch: 0,
            in_demand: false,
            wanted: 0,
            hungry_key: None,
            starving_since: None,
        });
        id
    }

    pub fn role_config(&self, r: RoleId) -> Option<RoleConfig> {
        self.roles.get(r.index()).map(|role| role.config)
    }

    pub fn role_stats(&self, r: RoleId) -> Option<RoleStats> {
        self.roles.get(r.index()).map(|role| RoleStats {
            active: role.active,
            idle: u32::try_from(role.idle.len()).unwrap_or(u32::MAX),
            opening: role.opening,
            waiting: u32::try_from(role.waiters.len()).unwrap_or(u32::MAX),
            pool_size: role.config.pool_size,
        })
    }

    /// Checkout rule 1, the hot path: the role's most recently parked idle server, with
    /// how long it sat idle (the caller health-checks one idle past its threshold).
    /// Returns `None` when the role has none; then call [`Scheduler::enqueue`].
    pub fn take_idle(&mut self, r: RoleId, now: Instant) -> Option<(ServerId, C, Duration)> {
        let s = self.roles.get_mut(r.index())?.idle.pop()?;
        self.idle_lru.remove(&mut self.servers, s.0);
        let server = self.servers.get_mut(s.0)?;
        let ServerState::Idle { conn, since } =
            std::mem::replace(&mut server.state, ServerState::Active { since: now })
        else {
            return None;
        };
        if let Some(role) = self.roles.get_mut(r.index()) {
            role.active += 1;
        }
        self.refresh(r, now);
        Some((s, conn, now.saturating_duration_since(since)))
    }

    /// Checkout rules 2–4 for a client that found no idle server: open a server under
    /// pool_size and budget, else take an old idle server of another role if `r` is under
    /// its fair share, else wait in `r`'s FIFO queue.
    pub fn enqueue(
        &mut self,
        r: RoleId,
        payload: W,
        now: Instant,
        out: &mut Vec<Action<C, W>>,
    ) -> Result<WaiterId, SchedulerError> {
        self.enqueue_until(r, payload, now, None, out)
    }

    /// [`Scheduler::enqueue`] for a waiter that gives up at `deadline`: the periodic
    /// [`Scheduler::expire_waiters`] takes it out of the queue then, so the async layer
    /// needs no timer per wait.
    pub fn enqueue_until(
        &mut self,
        r: RoleId,
        payload: W,
        now: Instant,
        deadline: Option<Instant>,
        out: &mut Vec<Action<C, W>>,
    ) -> Result<WaiterId, SchedulerError> {
        if r.index() >= self.roles.len() {
            return Err(SchedulerError::UnknownRole(r));
        }
        let key = self.waiters.insert(Waiter {
            role: r,
            payload,
            links: Links::default(),
            deadline,
        });
        if let Some(d) = deadline {
            self.next_deadline = Some(self.next_deadline.map_or(d, |n| n.min(d)));
        }
        if let Some(role) = self.roles.get_mut(r.index()) {
            role.waiters.push_back(&mut self.waiters, key);
        }
        self.refresh(r, now);
        // An idle server of this role means the caller skipped rule 1; serve it anyway.
        if let Some((server, conn, _)) = self.take_idle(r, now) {
            if let Some(payload) = self.cancel(WaiterId(key), now) {
                out.push(Action::Grant {
                    waiter: payload,
                    server,
                    conn,
                });
            }
            return Ok(WaiterId(key));
        }
        self.serve_role(r, now, out);
        Ok(WaiterId(key))
    }

    /// A waiter gave up (client gone, timeout). Returns its payload if it was still
    /// queued; `None` means it was already granted or failed.
    pub fn cancel(&mut self, w: WaiterId, now: Instant) -> Option<W> {
        let r = self.waiters.get(w.0)?.role;
        let role = self.roles.get_mut(r.index())?;
        role.waiters.remove(&mut self.waiters, w.0);
        let waiter = self.waiters.remove(w.0)?;
        self.refresh(r, now);
        Some(waiter.payload)
    }

    /// A client returns a clean server (release rules 1–3).
    pub fn release(
        &mut self,
        s: ServerId,
        conn: C,
        now: Instant,
        out: &mut Vec<Action<C, W>>,
    ) -> Result<(), SchedulerError> {
        match self.finish_checkout(s, now) {
            Ok(()) => {
                self.place(s, conn, now, out);
                Ok(())
            }
            Err(e) => {
                out.push(Action::Close {
                    server: s,
                    conn,
                    reason: CloseReason::Unknown,
                });
                Err(e)
            }
        }
    }

    /// A checked-out server that must not be reused (broken, dirty, client died): its
    /// slot is freed and offered to whoever waits. The caller drops the connection.
    pub fn discard(
        &mut self,
        s: ServerId,
        now: Instant,
        out: &mut Vec<Action<C, W>>,
    ) -> Result<(), SchedulerError> {
        self.finish_checkout(s, now)?;
        if let Some(server) = self.servers.remove(s.0) {
            self.counters.closes += 1;
            self.refresh(server.role, now);
        }
        self.fill_slots(now, out);
        Ok(())
    }

    /// A login started by [`Action::Open`] succeeded.
    pub fn opened(
        &mut self,
        s: ServerId,
        conn: C,
        now: Instant,
        out: &mut Vec<Action<C, W>>,
    ) -> Result<(), SchedulerError> {
        let ok = match self.servers.get_mut(s.0) {
            Some(server) if matches!(server.state, ServerState::Opening) => {
                server.assigned_at = now;
                server.state = ServerState::Active { since: now };
                let r = server.role;
                if let Some(role) = self.roles.get_mut(r.index()) {
                    role.opening = role.opening.saturating_sub(1);
                }
                Ok(())
            }
            Some(_) => Err(SchedulerError::WrongState(s)),
            None => Err(SchedulerError::UnknownServer(s)),
        };
        match ok {
            // `place` sees the server as in hand, exactly as on release.
            Ok(()) => {
                self.place(s, conn, now, out);
                Ok(())
            }
            Err(e) => {
                out.push(Action::Close {
                    server: s,
                    conn,
                    reason: CloseReason::Unknown,
                });
                Err(e)
            }
        }
    }

    /// A login started by [`Action::Open`] failed. Returns the waiter that gets the
    /// error (the role's longest-waiting client), if any; see the module docs.
    pub fn open_failed(
        &mut self,
        s: ServerId,
        now: Instant,
        out: &mut Vec<Action<C, W>>,
    ) -> Result<Option<W>, SchedulerError> {
        match self.servers.get(s.0) {
            Some(server) if matches!(server.state, ServerState::Opening) => {}
            Some(_) => return Err(SchedulerError::WrongState(s)),
            None => return Err(SchedulerError::UnknownServer(s)),
        }
        let Some(server) = self.servers.remove(s.0) else {
            return Err(SchedulerError::UnknownServer(s));
        };
        self.counters.open_failures += 1;
        let r = server.role;
        let mut failed = None;
        if let Some(role) = self.roles.get_mut(r.index()) {
            role.opening = role.opening.saturating_sub(1);
            if let Some(key) = role.waiters.pop_front(&mut self.waiters) {
                failed = self.waiters.remove(key).map(|w| w.payload);
            }
        }
        self.refresh(r, now);
        self.fill_slots(now, out);
        Ok(failed)
    }

    /// Revocation: close `r`'s idle servers now and its checked-out or opening servers
    /// when they come back. Queued clients keep waiting (the session layer ends the
    /// clients of a disabled role; after a key rotation they are served by new logins).
    pub fn close_role(&mut self, r: RoleId, now: Instant, out: &mut Vec<Action<C, W>>) {
        let Some(role) = self.roles.get_mut(r.index()) else {
            return;
        };
        role.epoch = role.epoch.wrapping_add(1);
        let idle = std::mem::take(&mut role.idle);
        for s in idle {
            self.close_idle(s, CloseReason::Revoked, now, out);
        }
        self.refresh(r, now);
        self.fill_slots(now, out);
    }

    /// Runtime change of a role's limits: servers over a lowered pool_size close (idle
    /// ones now, oldest first; checked-out ones on release); a raised one may open more.
    pub fn set_role_config(
        &mut self,
        r: RoleId,
        config: RoleConfig,
        now: Instant,
        out: &mut Vec<Action<C, W>>,
    ) -> Result<(), SchedulerError> {
        let config = fair::normalize(config);
        let role = self
            .roles
            .get_mut(r.index())
            .ok_or(SchedulerError::UnknownRole(r))?;
        if role.in_demand {
            self.demand_weight = self
                .demand_weight
                .saturating_sub(u64::from(role.config.weight))
                + u64::from(config.weight);
        }
        role.config = config;
        // Oldest idle servers first: they are the least likely to be wanted again soon.
        while let Some(role) = self.roles.get_mut(r.index()) {
            if role.held() <= config.pool_size || role.idle.is_empty() {
                break;
            }
            let s = role.idle.remove(0);
            self.close_idle(s, CloseReason::OverLimit, now, out);
        }
        self.refresh(r, now);
        self.serve_role(r, now, out);
        self.fill_slots(now, out);
        Ok(())
    }

    /// Reload of the global knobs: a lowered budget closes idle servers (oldest first)
    /// now and checked-out ones on release; a raised one is filled from the waiters.
    pub fn set_config(
        &mut self,
        config: SchedulerConfig,
        now: Instant,
        out: &mut Vec<Action<C, W>>,
    ) {
        self.config = config;
        while self.total_servers() > self.config.max_server_connections {
            let Some(s) = self.idle_lru.front() else {
                break;
            };
            self.close_idle(ServerId(s), CloseReason::OverLimit, now, out);
        }
        self.fill_slots(now, out);
    }

    /// Takes every queued waiter whose deadline is `now` or earlier out of its queue and
    /// returns their payloads (the caller tells them they waited too long). Called
    /// from the periodic maintenance; a scan only when a deadline is due.
    pub fn expire_waiters(&mut self, now: Instant) -> Vec<W> {
        if self.next_deadline.is_none_or(|d| d > now) {
            return Vec::new();
        }
        let mut due = Vec::new();
        let mut next: Option<Instant> = None;
        for role in &self.roles {
            let mut cur = role.waiters.front();
            while let Some(k) = cur {
                cur = List::next_of(&mut self.waiters, k);
                match self.waiters.get(k).and_then(|w| w.deadline) {
                    Some(d) if d <= now => due.push(k),
                    Some(d) => next = Some(next.map_or(d, |n| n.min(d))),
                    None => {}
                }
            }
        }
        self.next_deadline = next;
        due.into_iter()
            .filter_map(|k| self.cancel(WaiterId(k), now))
            .collect()
    }

    /// Periodic maintenance: idle timeout, lifetime of idle servers, the deferred form
    /// of checkout rule 3 (an idle server became old enough to move while a role waits),
    /// and filling free slots.
    pub fn tick(&mut self, now: Instant, out: &mut Vec<Action<C, W>>) {
        let mut cur = self.idle_lru.front();
        let mut expired = Vec::new();
        while let Some(k) = cur {
            if let Some(server) = self.servers.get(k) {
                if let ServerState::Idle { since, .. } = server.state {
                    if now.saturating_duration_since(since) >= self.config.server_idle_timeout {
                        expired.push((k, CloseReason::IdleTimeout));
                    } else if now.saturating_duration_since(server.assigned_at)
                        >= self.config.server_lifetime
                    {
                        expired.push((k, CloseReason::Lifetime));
                    }
                }
            }
            cur = List::next_of(&mut self.servers, k);
        }
        for (k, reason) in expired {
            self.close_idle(ServerId(k), reason, now, out);
        }
        self.fill_slots(now, out);
        while let Some(r) = self.pick_hungry(None, fair::Need::UnderShare) {
            if !self.evict_for(r, now, out) {
                break;
            }
        }
    }
}
