// Test-only: declared under #[cfg(test)] in scheduler.rs.
//! Randomized operations (checkouts, releases, discards, cancels, failed logins,
//! revocations, pool_size changes, ticks) with the scheduler's invariants checked after
//! every step, then a drain that proves no waiter is left stuck.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use super::*;

impl<C, W> Scheduler<C, W> {
    /// Recounts everything from the server and waiter tables and compares it with the
    /// incrementally kept counters, sets and sums.
    fn check(&mut self) {
        let n = self.roles.len();
        let (mut opening, mut active, mut idle) = (vec![0u32; n], vec![0u32; n], vec![0u32; n]);
        for k in self.servers.keys() {
            let s = self.servers.get(k).unwrap();
            let r = s.role.index();
            match s.state {
                ServerState::Opening => opening[r] += 1,
                ServerState::Active { .. } => active[r] += 1,
                ServerState::Idle { .. } => idle[r] += 1,
            }
        }
        let mut waiting = vec![0usize; n];
        for k in self.waiters.keys() {
            waiting[self.waiters.get(k).unwrap().role.index()] += 1;
        }
        assert_eq!(self.idle_lru.len(), idle.iter().sum::<u32>() as usize);
        let mut demand = 0;
        let bucket = self.config.switch_quantum.as_micros() as u64 * fair::WEIGHT_SCALE;
        for (i, role) in self.roles.iter().enumerate() {
            let r = RoleId(i as u32);
            assert_eq!(role.opening, opening[i], "opening of {r:?}");
            assert_eq!(role.active, active[i], "active of {r:?}");
            assert_eq!(role.idle.len() as u32, idle[i], "idle of {r:?}");
            assert_eq!(role.waiters.len(), waiting[i], "waiters of {r:?}");
            for s in &role.idle {
                let server = self.servers.get(s.0).unwrap();
                assert!(matches!(server.state, ServerState::Idle { .. }));
                assert_eq!(server.role, r);
            }
            assert!(
                role.idle.is_empty() || role.waiters.len() == 0,
                "{r:?} has idle servers and waiters"
            );
            let in_demand = waiting[i] > 0 || active[i] > 0 || opening[i] > 0;
            assert_eq!(role.in_demand, in_demand);
            if in_demand {
                demand += u64::from(role.config.weight);
            }
            let held = role.held();
            let hungry = waiting[i] > opening[i] as usize && held < role.config.pool_size;
            assert_eq!(role.hungry_key.is_some(), hungry, "hungry {r:?}");
            if let Some((v, seq)) = role.hungry_key {
                assert_eq!(v, role.vservice / bucket);
                assert!(self.hungry.contains(&(v, seq, r)));
            }
            assert_eq!(role.starving_since.is_some(), hungry && held == 0);
            if let Some(t) = role.starving_since {
                assert!(self.starving.contains(&(t, r)));
            }
        }
        assert_eq!(self.demand_weight, demand);
        let hungry_roles = self.roles.iter().filter(|r| r.hungry_key.is_some()).count();
        assert_eq!(self.hungry.len(), hungry_roles);
        let starving = self
            .roles
            .iter()
            .filter(|r| r.starving_since.is_some())
            .count();
        assert_eq!(self.starving.len(), starving);
        // Work conservation: a free slot never sits unused while a role needs one.
        assert!(
            self.hungry.is_empty() || self.total_servers() >= self.config.max_server_connections,
            "free slot with hungry roles"
        );
    }
}

struct Chaos {
    s: Scheduler<u32, u64>,
    now: Instant,
    rng: u64,
    opens: Vec<ServerId>,
    busy: Vec<ServerId>,
    waiters: HashMap<u64, WaiterId>,
    next_tag: u64,
}

impl Chaos {
    fn rand(&mut self, n: u64) -> u64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng % n.max(1)
    }

    fn pick<T: Copy>(&mut self, v: &[T]) -> Option<(usize, T)> {
        if v.is_empty() {
            return None;
        }
        let i = self.rand(v.len() as u64) as usize;
        Some((i, v[i]))
    }

    fn apply(&mut self, out: Vec<Action<u32, u64>>) {
        for a in out {
            match a {
                Action::Grant { waiter, server, .. } => {
                    assert!(self.waiters.remove(&waiter).is_some(), "grant to unknown");
                    self.busy.push(server);
                }
                Action::Open { server, .. } => self.opens.push(server),
                Action::Close { server, .. } => {
                    assert!(!self.busy.contains(&server), "closed a checked-out server");
                }
            }
        }
    }

    fn step(&mut self) {
        let mut out = Vec::new();
        let roles = self.s.roles.len() as u64;
        let dt = Duration::from_millis(self.rand(300));
        self.now += dt;
        let now = self.now;
        match self.rand(100) {
            0..30 => {
                let r = RoleId(self.rand(roles) as u32);
                if let Some((server, _, _)) = self.s.take_idle(r, now) {
                    self.busy.push(server);
                } else {
                    self.next_tag += 1;
                    let tag = self.next_tag;
                    let id = self.s.enqueue(r, tag, now, &mut out).unwrap();
                    self.waiters.insert(tag, id);
                }
            }
            30..50 => {
                if let Some((i, server)) = self.pick(&self.busy.clone()) {
                    self.busy.swap_remove(i);
                    self.s.release(server, 0, now, &mut out).unwrap();
                }
            }
            50..55 => {
                if let Some((i, server)) = self.pick(&self.busy.clone()) {
                    self.busy.swap_remove(i);
                    self.s.discard(server, now, &mut out).unwrap();
                }
            }
            55..75 => {
                if let Some((i, server)) = self.pick(&self.opens.clone()) {
                    self.opens.swap_remove(i);
                    if self.rand(4) == 0 {
                        if let Some(tag) = self.s.open_failed(server, now, &mut out).unwrap() {
                            assert!(self.waiters.remove(&tag).is_some());
                        }
                    } else {
                        self.s.opened(server, 0, now, &mut out).unwrap();
                    }
                }
            }
            75..85 => {
                let tags: Vec<u64> = self.waiters.keys().copied().collect();
                if let Some((_, tag)) = self.pick(&tags) {
                    let id = self.waiters.remove(&tag).unwrap();
                    assert_eq!(self.s.cancel(id, now), Some(tag));
                }
            }
            85..97 => self.s.tick(now, &mut out),
            97 => {
                let r = RoleId(self.rand(roles) as u32);
                self.s.close_role(r, now, &mut out);
            }
            _ => {
                let r = RoleId(self.rand(roles) as u32);
                let config = RoleConfig {
                    pool_size: self.rand(5) as u32,
                    weight: 1 + self.rand(3) as u32,
                };
                self.s.set_role_config(r, config, now, &mut out).unwrap();
            }
        }
        self.apply(out);
        self.s.check();
    }
}

#[test]
fn random_operations_keep_every_invariant_and_leave_no_waiter_stuck() {
    for seed in 1..=8u64 {
        let mut s = Scheduler::new(SchedulerConfig {
            max_server_connections: 6,
            ..SchedulerConfig::default()
        });
        for _ in 0..12 {
            s.add_role(RoleConfig {
                pool_size: 3,
                weight: 1,
            });
        }
        let mut c = Chaos {
            s,
            now: Instant::now(),
            rng: seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1,
            opens: Vec::new(),
            busy: Vec::new(),
            waiters: HashMap::new(),
            next_tag: 0,
        };
        let mut max_waiting = 0;
        for _ in 0..5_000 {
            c.step();
            max_waiting = max_waiting.max(c.waiters.len());
        }
        let k = c.s.counters();
        println!(
            "chaos seed {seed}: {k:?}, most waiting {max_waiting}, left waiting {}",
            c.waiters.len()
        );
        assert!(k.switches + k.evictions > 0 && k.open_failures > 0 && max_waiting > 3);
        // Drain: every role may hold a server again; finish every login, return every
        // server, let time pass. Every queued client must end up served.
        for i in 0..12 {
            let config = RoleConfig {
                pool_size: 2,
                weight: 1,
            };
            let mut out = Vec::new();
            c.s.set_role_config(RoleId(i), config, c.now, &mut out)
                .unwrap();
            c.apply(out);
        }
        for _ in 0..10_000 {
            if c.waiters.is_empty() {
                break;
            }
            c.now += Duration::from_millis(100);
            let now = c.now;
            let mut out = Vec::new();
            if let Some(server) = c.opens.pop() {
                c.s.opened(server, 0, now, &mut out).unwrap();
            } else if let Some(server) = c.busy.pop() {
                c.s.release(server, 0, now, &mut out).unwrap();
            } else {
                c.s.tick(now, &mut out);
            }
            c.apply(out);
            c.s.check();
        }
        assert!(
            c.waiters.is_empty(),
            "seed {seed}: {} stuck",
            c.waiters.len()
        );
    }
}
