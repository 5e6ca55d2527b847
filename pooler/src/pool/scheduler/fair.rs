//! The scheduler's bookkeeping: fair shares, service accounting, and where a free or
//! released server goes. Kept apart from the entry points in `scheduler.rs` so the rules
//! of design.md read as one piece.

use std::time::Instant;

use super::{Action, CloseReason, RoleConfig, RoleId, Scheduler, Server, ServerId, ServerState};
use crate::pool::slab::Links;

/// Service is kept in microseconds × this / weight, so weights divide without losing
/// the short transactions that make up most of the service. u64 holds about 14 years
/// of a role holding 40 servers continuously at weight 1.
pub(super) const WEIGHT_SCALE: u64 = 1000;

pub(super) fn normalize(mut config: RoleConfig) -> RoleConfig {
    config.weight = config.weight.max(1);
    config
}

/// Which hungry roles may receive a slot.
#[derive(Clone, Copy)]
pub(super) enum Need {
    /// Any role that needs a slot (a slot is free).
    Any,
    /// Only a role strictly under its fair share (a slot is taken from someone).
    UnderShare,
    /// Only a role holding no server at all (the quantum rule).
    Starving,
}

impl<C, W> Scheduler<C, W> {
    /// Re-derives a role's membership in the demand sum, the hungry set and the starving
    /// set after any change to its counts. O(log roles) when membership or its service
    /// key changes, O(1) otherwise (the idle hot path changes none of them).
    pub(super) fn refresh(&mut self, r: RoleId, now: Instant) {
        let floor = self.demand_floor(r);
        let Some(role) = self.roles.get_mut(r.index()) else {
            return;
        };
        let w = u64::from(role.config.weight);
        let bucket = u64::try_from(self.config.switch_quantum.as_micros())
            .unwrap_or(u64::MAX)
            .saturating_mul(WEIGHT_SCALE)
            .max(1);
        let demand = role.waiters.len() > 0 || role.active > 0 || role.opening > 0;
        // Servers the role could use now: what the replica reports as its demand. A
        // login in flight is for a waiter, so the two are not added.
        let waiting = u32::try_from(role.waiters.len()).unwrap_or(u32::MAX);
        let wanted = role
            .active
            .saturating_add(role.opening.max(waiting))
            .min(role.config.pool_size);
        if wanted != role.wanted {
            self.wanted = (self.wanted + u64::from(wanted)).saturating_sub(u64::from(role.wanted));
            self.wanted_peak = self.wanted_peak.max(self.wanted);
            role.wanted = wanted;
        }
        if demand != role.in_demand {
            role.in_demand = demand;
            if demand {
                self.demand_weight += w;
                role.vservice = role.vservice.max(self.vclock).max(floor);
            } else {
                self.demand_weight = self.demand_weight.saturating_sub(w);
            }
        }
        let held = role.held();
        // Service is compared in whole quanta (`bucket`): differences below one tenure
        // are noise (a few transactions more or less), and letting them reorder the
        // line makes a role with slightly more service wait a second rotation. Within
        // a quantum, first come, first served.
        let hungry = role.waiters.len() > role.opening as usize && held < role.config.pool_size;
        let key = hungry.then(|| {
            // A role keeps its place in line while its service changes.
            let seq = role.hungry_key.map_or_else(
                || {
                    self.hungry_seq += 1;
                    self.hungry_seq
                },
                |(_, seq)| seq,
            );
            (role.vservice / bucket, seq)
        });
        if key != role.hungry_key {
            if let Some((v, seq)) = role.hungry_key {
                self.hungry.remove(&(v, seq, r));
            }
            if let Some((v, seq)) = key {
                self.hungry.insert((v, seq, r));
            }
            role.hungry_key = key;
        }
        match (hungry && held == 0, role.starving_since) {
            (true, None) => {
                role.starving_since = Some(now);
                self.starving.insert((now, r));
            }
            (false, Some(since)) => {
                role.starving_since = None;
                self.starving.remove(&(since, r));
            }
            _ => {}
        }
    }

    /// Where `r`'s service starts if it is gaining demand now: level with the
    /// least-served role that has demand, when some role waits for a slot. Otherwise
    /// roles that have shared the budget for a while rank behind every newcomer until
    /// it has caught up with all their history (seen in the bench as busy roles
    /// starved for a whole run). O(roles), and only on a transition under contention.
    fn demand_floor(&self, r: RoleId) -> u64 {
        let gaining = self.roles.get(r.index()).is_some_and(|role| {
            !role.in_demand && (role.waiters.len() > 0 || role.active > 0 || role.opening > 0)
        });
        if !gaining || self.hungry.is_empty() {
            return 0;
        }
        self.roles
            .iter()
            .filter(|x| x.in_demand)
            .map(|x| x.vservice)
            .min()
            .unwrap_or(0)
    }

    /// Σ weights of roles with demand, counting `r` as one of them.
    fn weight_with(&self, r: RoleId) -> (u128, u128) {
        let Some(role) = self.roles.get(r.index()) else {
            return (1, 1);
        };
        let w = u64::from(role.config.weight);
        let total = if role.in_demand {
            self.demand_weight
        } else {
            self.demand_weight + w
        };
        (u128::from(w), u128::from(total.max(1)))
    }

    /// `held < budget × w / W`: one more slot does not put `r` past what is fair (a
    /// role with no server is always under).
    pub(super) fn under_share(&self, r: RoleId) -> bool {
        let Some(role) = self.roles.get(r.index()) else {
            return false;
        };
        let (w, total) = self.weight_with(r);
        u128::from(role.held()) * total < u128::from(self.config.max_server_connections) * w
    }

    /// `held − 1 ≥ budget × w / W`, with `in_hand` servers not yet counted in `held`:
    /// `r` keeps its whole share (rounded up) without one slot. See the module docs.
    fn over_share(&self, r: RoleId, in_hand: u32) -> bool {
        let Some(role) = self.roles.get(r.index()) else {
            return false;
        };
        let held = role.held().saturating_add(in_hand);
        if held == 0 {
            return false;
        }
        let (w, total) = self.weight_with(r);
        u128::from(held - 1) * total >= u128::from(self.config.max_server_connections) * w
    }

    /// The hungry role with the least service that satisfies `need` (deficit round robin
    /// over checked-out time). Linear only past roles that fail `need`.
    pub(super) fn pick_hungry(&mut self, exclude: Option<RoleId>, need: Need) -> Option<RoleId> {
        let found = self.hungry.iter().map(|&(_, _, r)| r).find(|&r| {
            Some(r) != exclude
                && match need {
                    Need::Any => true,
                    Need::UnderShare => self.under_share(r),
                    Need::Starving => self.roles.get(r.index()).is_some_and(|x| x.held() == 0),
                }
        })?;
        if let Some(role) = self.roles.get(found.index()) {
            self.vclock = self.vclock.max(role.vservice);
        }
        Some(found)
    }

    /// Checked-out time counts as service, divided by weight.
    fn accrue(&mut self, r: RoleId, since: Instant, now: Instant) {
        let Some(role) = self.roles.get_mut(r.index()) else {
            return;
        };
        let micros =
            u64::try_from(now.saturating_duration_since(since).as_micros()).unwrap_or(u64::MAX);
        let add = micros.saturating_mul(WEIGHT_SCALE) / u64::from(role.config.weight.max(1));
        role.vservice = role.vservice.saturating_add(add);
    }

    /// Ends a checkout: the server stays `Active` ("in hand") but no longer counts in
    /// `role.active`, so [`Self::place`] sees it as on release.
    pub(super) fn finish_checkout(
        &mut self,
        s: ServerId,
        now: Instant,
    ) -> Result<(), super::SchedulerError> {
        let server = self
            .servers
            .get(s.0)
            .ok_or(super::SchedulerError::UnknownServer(s))?;
        let ServerState::Active { since } = server.state else {
            return Err(super::SchedulerError::WrongState(s));
        };
        let r = server.role;
        self.accrue(r, since, now);
        if let Some(role) = self.roles.get_mut(r.index()) {
            role.active = role.active.saturating_sub(1);
        }
        Ok(())
    }

    /// Where a server in hand (just released or just opened) goes: release rules 1–3.
    pub(super) fn place(
        &mut self,
        s: ServerId,
        conn: C,
        now: Instant,
        out: &mut Vec<Action<C, W>>,
    ) {
        let Some(server) = self.servers.get(s.0) else {
            out.push(Action::Close {
                server: s,
                conn,
                reason: CloseReason::Unknown,
            });
            return;
        };
        let (r, assigned_at, epoch) = (server.role, server.assigned_at, server.epoch);
        let Some(role) = self.roles.get(r.index()) else {
            return self.drop_in_hand(s, conn, CloseReason::Unknown, now, out);
        };
        let cfg = &self.config;
        let r_hungry = role.hungry_key.is_some();
        let must_close = if epoch != role.epoch {
            Some(CloseReason::Revoked)
        } else if now.saturating_duration_since(assigned_at) >= cfg.server_lifetime {
            Some(CloseReason::Lifetime)
        } else if role.held() >= role.config.pool_size
            || self.total_servers() > cfg.max_server_connections
        {
            Some(CloseReason::OverLimit)
        } else {
            None
        };
        if let Some(reason) = must_close {
            self.drop_in_hand(s, conn, reason, now, out);
            return self.fill_slots(now, out);
        }
        let others_wait = self.hungry.len() > usize::from(r_hungry);
        if others_wait {
            // Rule 2a: r keeps its (rounded-up) share even without this slot.
            if self.over_share(r, 1) {
                if let Some(to) = self.pick_hungry(Some(r), Need::UnderShare) {
                    return self.switch(s, conn, to, now, out);
                }
            }
            // Rule 2b: r has had this slot a quantum and someone has had none for as long.
            let quantum = self.config.switch_quantum;
            let starved = self
                .starving
                .first()
                .is_some_and(|&(t, q)| q != r && now.saturating_duration_since(t) >= quantum);
            if starved && now.saturating_duration_since(assigned_at) >= quantum {
                if let Some(to) = self.pick_hungry(Some(r), Need::Starving) {
                    return self.switch(s, conn, to, now, out);
                }
            }
        }
        // Rules 1 and 3: r's next waiter, else park (the newest idle, taken first).
        let Some(role) = self.roles.get_mut(r.index()) else {
            return;
        };
        let next = role.waiters.pop_front(&mut self.waiters);
        let waiter = next.and_then(|k| self.waiters.remove(k));
        let Some(server) = self.servers.get_mut(s.0) else {
            return;
        };
        match waiter {
            Some(waiter) => {
                server.state = ServerState::Active { since: now };
                role.active += 1;
                out.push(Action::Grant {
                    waiter: waiter.payload,
                    server: s,
                    conn,
                });
            }
            None => {
                server.state = ServerState::Idle { since: now, conn };
                role.idle.push(s);
                self.idle_lru.push_back(&mut self.servers, s.0);
            }
        }
        self.refresh(r, now);
    }

    fn drop_in_hand(
        &mut self,
        s: ServerId,
        conn: C,
        reason: CloseReason,
        now: Instant,
        out: &mut Vec<Action<C, W>>,
    ) {
        if let Some(server) = self.servers.remove(s.0) {
            self.counters.closes += 1;
            self.refresh(server.role, now);
        }
        out.push(Action::Close {
            server: s,
            conn,
            reason,
        });
    }

    /// Closes the server in hand and logs one in for `to`: the slot changes role.
    fn switch(
        &mut self,
        s: ServerId,
        conn: C,
        to: RoleId,
        now: Instant,
        out: &mut Vec<Action<C, W>>,
    ) {
        self.counters.switches += 1;
        self.drop_in_hand(s, conn, CloseReason::Switched, now, out);
        self.open_for(to, now, out);
    }

    pub(super) fn open_for(&mut self, r: RoleId, now: Instant, out: &mut Vec<Action<C, W>>) {
        let Some(role) = self.roles.get_mut(r.index()) else {
            return;
        };
        let key = self.servers.insert(Server {
            role: r,
            epoch: role.epoch,
            assigned_at: now,
            links: Links::default(),
            state: ServerState::Opening,
        });
        role.opening += 1;
        self.counters.opens += 1;
        self.refresh(r, now);
        out.push(Action::Open {
            server: ServerId(key),
            role: r,
        });
    }

    pub(super) fn close_idle(
        &mut self,
        s: ServerId,
        reason: CloseReason,
        now: Instant,
        out: &mut Vec<Action<C, W>>,
    ) {
        let Some(server) = self.servers.get(s.0) else {
            return;
        };
        if !matches!(server.state, ServerState::Idle { .. }) {
            return;
        }
        let r = server.role;
        self.idle_lru.remove(&mut self.servers, s.0);
        if let Some(role) = self.roles.get_mut(r.index()) {
            if let Some(pos) = role.idle.iter().position(|&x| x == s) {
                role.idle.remove(pos);
            }
        }
        if let Some(Server {
            state: ServerState::Idle { conn, .. },
            ..
        }) = self.servers.remove(s.0)
        {
            self.counters.closes += 1;
            out.push(Action::Close {
                server: s,
                conn,
                reason,
            });
        }
        self.refresh(r, now);
    }

    /// Checkout rules 2 and 3 for a role that just gained a waiter (or a larger pool).
    pub(super) fn serve_role(&mut self, r: RoleId, now: Instant, out: &mut Vec<Action<C, W>>) {
        while self.is_hungry(r) && self.total_servers() < self.config.max_server_connections {
            self.open_for(r, now, out);
        }
        if self.is_hungry(r) && self.under_share(r) {
            self.evict_for(r, now, out);
        }
    }

    fn is_hungry(&self, r: RoleId) -> bool {
        self.roles
            .get(r.index())
            .is_some_and(|role| role.hungry_key.is_some())
    }

    /// Closes the longest-idle server of another role if it has been idle at least
    /// `min_idle_before_evict`, and opens one for `r`.
    pub(super) fn evict_for(
        &mut self,
        r: RoleId,
        now: Instant,
        out: &mut Vec<Action<C, W>>,
    ) -> bool {
        let Some(k) = self.idle_lru.front() else {
            return false;
        };
        let Some(server) = self.servers.get(k) else {
            return false;
        };
        let ServerState::Idle { since, .. } = server.state else {
            return false;
        };
        if server.role == r
            || now.saturating_duration_since(since) < self.config.min_idle_before_evict
        {
            return false;
        }
        self.counters.evictions += 1;
        self.close_idle(ServerId(k), CloseReason::Evicted, now, out);
        self.open_for(r, now, out);
        true
    }

    /// Free slots go to hungry roles, least service first (checkout rule 2 for roles
    /// already queued when a slot frees up).
    pub(super) fn fill_slots(&mut self, now: Instant, out: &mut Vec<Action<C, W>>) {
        while self.total_servers() < self.config.max_server_connections {
            let Some(r) = self.pick_hungry(None, Need::Any) else {
                break;
            };
            self.open_for(r, now, out);
        }
    }
}
