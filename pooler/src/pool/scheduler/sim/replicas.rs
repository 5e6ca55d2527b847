// Test-only: declared under #[cfg(test)] in scheduler.rs (through sim.rs).
//! Several replicas, one budget: each replica runs its own [`Scheduler`] with
//! closed-loop clients; a registry model (the grant rule of sql/0002, through
//! [`share::grant`]) answers heartbeats after a network delay; each replica follows
//! [`share::Member`] exactly as the async heartbeat task does: heartbeat, then claim
//! (grow only by a committed grant) or lower its cap and publish the release once its
//! servers are down to it. Replicas join, go idle, come back, crash, lose Postgres for
//! a while and drain. At every event the servers of all replicas together stay within
//! the budget. `--nocapture` prints the shares over time.

use std::time::Instant;

use super::super::*;
use super::Timeline;
use crate::pool::share::{self, Member, ReplicaId, Report, Row, Step};

const BUDGET: u32 = 40;
const HEARTBEAT_US: u64 = 1_000_000;
const LEASE_MS: i64 = 5_000;
/// Each way, jittered: a heartbeat's answer is at least this old when it arrives.
const DB_DELAY_US: u64 = 10_000;
const LOGIN_US: u64 = 2_000;
const TX_US: u64 = 10_000;
const THINK_US: u64 = 2_000;
const ROLES_PER_REPLICA: usize = 3;
const POOL_SIZE: u32 = 20;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Life {
    NotStarted,
    Up,
    Draining,
    Gone,
}

#[derive(Clone, Copy, Debug)]
enum Call {
    Beat(Report),
    Claim(Report),
    Release(Report),
    Leave,
}

enum Event {
    Want(usize),
    Done(usize),
    Opened(usize, ServerId),
    Tick(usize),
    Heartbeat(usize),
    /// A call reaches the registry (applied atomically there).
    AtDb(usize, Call),
    /// Its answer reaches the replica: this replica's id and every live row.
    Answer(usize, Call, Option<(ReplicaId, Vec<Row>)>),
    Start(usize),
    Load(usize, usize),
    Crash(usize),
    Drain(usize),
    Unreachable(usize, u64),
    Sample,
}

struct Replica {
    sched: Scheduler<(), usize>,
    member: Member,
    life: Life,
    roles: Vec<RoleId>,
    clients: Vec<usize>,
    /// Calls to the registry fail until then (Postgres unreachable from this replica).
    cut_until_us: u64,
    id: Option<ReplicaId>,
    demand: u32,
}

struct Client {
    replica: usize,
    role: RoleId,
    server: Option<ServerId>,
    /// Wants to run transactions (the replica's load includes it).
    on: bool,
    /// Has a Want or Done scheduled, or waits in a queue.
    busy: bool,
}

#[derive(Default)]
struct Registry {
    /// (instance, row)
    rows: Vec<(usize, Row)>,
}

impl Registry {
    /// `dataplane_auth.replica_heartbeat`, step by step.
    fn heartbeat(&mut self, instance: usize, report: Report, now_ms: i64) -> (ReplicaId, Vec<Row>) {
        self.rows.retain(|(i, r)| *i == instance || r.alive(now_ms));
        let me = match self.rows.iter().find(|(i, _)| *i == instance) {
            Some((_, r)) => r.id,
            None => {
                let id = (1..=255u8)
                    .find(|id| self.rows.iter().all(|(_, r)| r.id != *id))
                    .unwrap();
                self.rows.push((
                    instance,
                    Row {
                        id,
                        started_ms: now_ms,
                        heartbeat_ms: now_ms,
                        lease_ms: LEASE_MS,
                        budget: BUDGET,
                        demand: report.demand,
                        holding: report.holding,
                    },
                ));
                id
            }
        };
        let others: Vec<Row> = self
            .rows
            .iter()
            .filter(|(_, r)| r.id != me)
            .map(|(_, r)| r.clone())
            .collect();
        let granted = share::grant(&others, BUDGET, report);
        for (_, r) in self.rows.iter_mut().filter(|(_, r)| r.id == me) {
            r.heartbeat_ms = now_ms;
            r.demand = report.demand;
            r.holding = granted;
        }
        let mut rows: Vec<Row> = self.rows.iter().map(|(_, r)| r.clone()).collect();
        rows.sort_by_key(|r| r.id);
        (me, rows)
    }

    fn holding(&self, instance: usize) -> Option<u32> {
        self.rows
            .iter()
            .find(|(i, _)| *i == instance)
            .map(|(_, r)| r.holding)
    }
}

/// One second of the timeline: per replica (cap, servers, demand).
type Sample = (u64, Vec<(u32, u32, u32)>);

struct Multi {
    clock: Timeline<Event>,
    replicas: Vec<Replica>,
    clients: Vec<Client>,
    registry: Registry,
    samples: Vec<Sample>,
    peak_total: u32,
}

impl Multi {
    fn new(replicas: usize, clients_each: usize) -> Self {
        let mut m = Multi {
            clock: Timeline::new(0x2545_f491_4f6c_dd1d),
            replicas: Vec::new(),
            clients: Vec::new(),
            registry: Registry::default(),
            samples: Vec::new(),
            peak_total: 0,
        };
        for r in 0..replicas {
            // Cap 0 until the registry grants something.
            let mut sched = Scheduler::new(SchedulerConfig {
                max_server_connections: 0,
                ..SchedulerConfig::default()
            });
            let roles: Vec<RoleId> = (0..ROLES_PER_REPLICA)
                .map(|_| {
                    sched.add_role(RoleConfig {
                        pool_size: POOL_SIZE,
                        weight: 1,
                    })
                })
                .collect();
            let mut mine = Vec::new();
            for i in 0..clients_each {
                mine.push(m.clients.len());
                m.clients.push(Client {
                    replica: r,
                    role: roles[i % roles.len()],
                    server: None,
                    on: false,
                    busy: false,
                });
            }
            m.replicas.push(Replica {
                sched,
                member: Member::default(),
                life: Life::NotStarted,
                roles,
                clients: mine,
                cut_until_us: 0,
                id: None,
                demand: 0,
            });
        }
        m.at(0, Event::Sample);
        m
    }

    fn jitter(&mut self, d: u64) -> u64 {
        self.clock.jitter(d)
    }

    fn at(&mut self, delay_us: u64, e: Event) {
        self.clock.at(delay_us, e);
    }

    fn script(&mut self, at_s: f64, e: Event) {
        self.clock.at_us((at_s * 1e6) as u64, e);
    }

    fn now(&self) -> Instant {
        self.clock.now()
    }

    fn now_us(&self) -> u64 {
        self.clock.now_us
    }

    fn now_ms(&self) -> i64 {
        (self.clock.now_us / 1000) as i64
    }

    fn live(&self, r: usize) -> bool {
        matches!(self.replicas[r].life, Life::Up | Life::Draining)
    }

    fn set_cap(&mut self, r: usize, cap: u32) {
        let now = self.now();
        let mut out = Vec::new();
        let config = SchedulerConfig {
            max_server_connections: cap,
            ..self.replicas[r].sched.config().clone()
        };
        self.replicas[r].sched.set_config(config, now, &mut out);
        self.apply(r, out);
    }

    fn apply(&mut self, r: usize, out: Vec<Action<(), usize>>) {
        for a in out {
            match a {
                Action::Grant { waiter, server, .. } => self.start_tx(waiter, server),
                Action::Open { server, .. } => {
                    let d = self.jitter(LOGIN_US);
                    self.at(d, Event::Opened(r, server));
                }
                Action::Close { .. } => {}
            }
        }
    }

    fn start_tx(&mut self, c: usize, server: ServerId) {
        self.clients[c].server = Some(server);
        let d = self.jitter(TX_US);
        self.at(d, Event::Done(c));
    }

    fn want(&mut self, c: usize) {
        self.clients[c].busy = true;
        let d = self.jitter(THINK_US);
        self.at(d, Event::Want(c));
    }

    fn call(&mut self, r: usize, call: Call) {
        let d = self.jitter(DB_DELAY_US);
        self.at(d, Event::AtDb(r, call));
    }

    /// As the heartbeat task: early while slots are still moving.
    fn next_heartbeat(&mut self, r: usize) {
        let rep = &self.replicas[r];
        let delay = if rep.member.unsettled(rep.sched.total_servers()) {
            HEARTBEAT_US / 4
        } else {
            HEARTBEAT_US
        };
        self.at(delay, Event::Heartbeat(r));
    }

    fn report(&mut self, r: usize) -> Report {
        let rep = &mut self.replicas[r];
        rep.demand = rep.sched.take_demand_peak();
        rep.member.report(rep.demand, rep.sched.total_servers())
    }

    fn heartbeat(&mut self, r: usize) {
        match self.replicas[r].life {
            Life::Up => {
                let report = self.report(r);
                self.call(r, Call::Beat(report));
            }
            Life::Draining => {
                let rep = &self.replicas[r];
                let in_use = rep.sched.total_servers() - idle_of(rep);
                if in_use == 0 {
                    // Drained: close everything, then leave the registry.
                    self.set_cap(r, 0);
                    self.call(r, Call::Leave);
                } else {
                    let report = self.report(r);
                    self.call(r, Call::Beat(report));
                }
            }
            Life::NotStarted | Life::Gone => {}
        }
    }

    fn answered(&mut self, r: usize, call: Call, answer: Option<(ReplicaId, Vec<Row>)>) {
        if !self.live(r) {
            return;
        }
        let Some((me, rows)) = answer else {
            // Postgres unreachable: keep the cap, try again next time.
            return self.next_heartbeat(r);
        };
        self.replicas[r].id = Some(me);
        let now_ms = self.now_ms();
        match call {
            Call::Beat(_) => match self.replicas[r].member.observed(me, &rows, now_ms) {
                Step::Claim(target) => {
                    let cap = self.replicas[r].member.cap();
                    self.set_cap(r, cap);
                    let rep = &self.replicas[r];
                    let mut report = rep.member.report(rep.demand, rep.sched.total_servers());
                    report.claim = target;
                    self.call(r, Call::Claim(report));
                }
                Step::Cap(cap) => {
                    self.set_cap(r, cap);
                    let servers = self.replicas[r].sched.total_servers();
                    match self.replicas[r].member.release(servers) {
                        Some(holding) => {
                            let report = Report {
                                demand: self.replicas[r].demand,
                                holding,
                                claim: holding,
                            };
                            self.call(r, Call::Release(report));
                        }
                        None => self.next_heartbeat(r),
                    }
                }
            },
            Call::Claim(_) => {
                let granted = rows.iter().find(|x| x.id == me).map_or(0, |x| x.holding);
                let cap = self.replicas[r].member.granted_now(granted);
                self.set_cap(r, cap);
                self.next_heartbeat(r);
            }
            Call::Release(report) => {
                self.replicas[r].member.released(report.holding);
                self.next_heartbeat(r);
            }
            Call::Leave => {}
        }
    }

    fn check(&mut self) {
        let mut total = 0;
        for (i, rep) in self.replicas.iter().enumerate() {
            if !matches!(rep.life, Life::Up | Life::Draining) {
                continue;
            }
            let servers = rep.sched.total_servers();
            total += servers;
            // What the registry records for a replica covers what it has open.
            if let Some(holding) = self.registry.holding(i) {
                assert!(
                    servers <= holding,
                    "t={} µs replica {i}: {servers} servers, registry says {holding}",
                    self.now_us()
                );
            }
        }
        assert!(
            total <= BUDGET,
            "t={} µs: {total} servers over the budget",
            self.now_us()
        );
        self.peak_total = self.peak_total.max(total);
    }

    fn run(&mut self, seconds: u64) {
        while let Some(e) = self.clock.next(seconds * 1_000_000) {
            let now = self.now();
            self.step(e, now);
            self.check();
        }
    }

    fn step(&mut self, e: Event, now: Instant) {
        match e {
            Event::Want(c) => {
                let r = self.clients[c].replica;
                if !self.live(r) || !self.clients[c].on {
                    self.clients[c].busy = false;
                    return;
                }
                let role = self.clients[c].role;
                match self.replicas[r].sched.take_idle(role, now) {
                    Some((server, (), _)) => self.start_tx(c, server),
                    None => {
                        let mut out = Vec::new();
                        self.replicas[r]
                            .sched
                            .enqueue(role, c, now, &mut out)
                            .unwrap();
                        self.apply(r, out);
                    }
                }
            }
            Event::Done(c) => {
                let r = self.clients[c].replica;
                let server = self.clients[c].server.take().unwrap();
                if !self.live(r) {
                    return;
                }
                let mut out = Vec::new();
                self.replicas[r]
                    .sched
                    .release(server, (), now, &mut out)
                    .unwrap();
                self.apply(r, out);
                if self.clients[c].on {
                    self.want(c);
                } else {
                    self.clients[c].busy = false;
                }
            }
            Event::Opened(r, s) => {
                if self.live(r) {
                    let mut out = Vec::new();
                    self.replicas[r].sched.opened(s, (), now, &mut out).unwrap();
                    self.apply(r, out);
                }
            }
            Event::Tick(r) => {
                if self.live(r) {
                    let mut out = Vec::new();
                    self.replicas[r].sched.tick(now, &mut out);
                    self.apply(r, out);
                    self.at(100_000, Event::Tick(r));
                }
            }
            Event::Heartbeat(r) => self.heartbeat(r),
            Event::AtDb(r, call) => {
                let answer = if self.now_us() < self.replicas[r].cut_until_us {
                    None
                } else if let Call::Leave = call {
                    self.registry.rows.retain(|(i, _)| *i != r);
                    self.replicas[r].life = Life::Gone;
                    None
                } else {
                    let report = match call {
                        Call::Beat(x) | Call::Claim(x) | Call::Release(x) => x,
                        Call::Leave => unreachable!(),
                    };
                    Some(self.registry.heartbeat(r, report, self.now_ms()))
                };
                let d = self.jitter(DB_DELAY_US);
                self.at(d, Event::Answer(r, call, answer));
            }
            Event::Answer(r, call, answer) => self.answered(r, call, answer),
            Event::Start(r) => {
                self.replicas[r].life = Life::Up;
                self.at(100_000, Event::Tick(r));
                self.heartbeat(r);
            }
            Event::Load(r, n) => {
                let mine = self.replicas[r].clients.clone();
                for (i, c) in mine.into_iter().enumerate() {
                    self.clients[c].on = i < n;
                    if self.clients[c].on && !self.clients[c].busy {
                        self.want(c);
                    }
                }
            }
            Event::Crash(r) => {
                // kill -9: its servers' sockets close with it; its row stays until the
                // lease runs out.
                self.replicas[r].life = Life::Gone;
            }
            Event::Drain(r) => {
                self.replicas[r].life = Life::Draining;
                for c in self.replicas[r].clients.clone() {
                    self.clients[c].on = false;
                }
            }
            Event::Unreachable(r, us) => self.replicas[r].cut_until_us = self.now_us() + us,
            Event::Sample => {
                let row = self
                    .replicas
                    .iter()
                    .map(|rep| match rep.life {
                        Life::Up | Life::Draining => (
                            rep.member.cap(),
                            rep.sched.total_servers(),
                            rep.sched.demand(),
                        ),
                        _ => (0, 0, 0),
                    })
                    .collect();
                self.samples.push((self.now_us() / 1_000_000, row));
                self.at(1_000_000, Event::Sample);
            }
        }
    }

    /// The cap of replica `r` in the sample of second `s`.
    fn cap_at(&self, r: usize, s: u64) -> u32 {
        self.samples
            .iter()
            .find(|(t, _)| *t == s)
            .map_or(0, |(_, row)| row[r].0)
    }

    fn print(&self) {
        println!("sim replicas: second | per replica cap/servers/demand (budget {BUDGET})");
        for (t, row) in &self.samples {
            let cells: Vec<String> = row
                .iter()
                .map(|(c, s, d)| format!("{c:>2}/{s:>2}/{d:>2}"))
                .collect();
            let sum: u32 = row.iter().map(|(_, s, _)| s).sum();
            println!("  {t:>3} s | {} | servers {sum}", cells.join("  "));
        }
        println!(
            "sim replicas: peak servers of all replicas {}",
            self.peak_total
        );
    }
}

fn idle_of(rep: &Replica) -> u32 {
    rep.roles
        .iter()
        .filter_map(|&r| rep.sched.role_stats(r))
        .map(|s| s.idle)
        .sum()
}

#[test]
fn sim_replicas_share_one_budget_as_they_join_idle_crash_and_drain() {
    let mut m = Multi::new(3, 40);
    // R0 alone and busy; R1 joins busy; R2 joins idle.
    m.script(0.0, Event::Start(0));
    m.script(0.0, Event::Load(0, 40));
    m.script(5.0, Event::Start(1));
    m.script(5.0, Event::Load(1, 40));
    m.script(15.0, Event::Start(2));
    // R0 goes idle, then busy again.
    m.script(20.0, Event::Load(0, 0));
    m.script(30.0, Event::Load(0, 40));
    // R1 is killed; R0 loses Postgres for 3 s; R2 gets busy; R0 drains.
    m.script(40.0, Event::Crash(1));
    m.script(42.0, Event::Unreachable(0, 3_000_000));
    m.script(52.0, Event::Load(2, 40));
    m.script(60.0, Event::Drain(0));
    m.run(70);
    m.print();

    // Alone, R0 has the whole budget; with R1 busy too they split it.
    assert_eq!(m.cap_at(0, 4), BUDGET);
    assert!(m.cap_at(0, 12) >= 15 && m.cap_at(1, 12) >= 15);
    // An idle newcomer gets its slot without taking the busy ones' shares.
    assert!(m.cap_at(2, 18) >= 1);
    // R0 idle from 20 s: R1 has its share within 5 s.
    assert!(m.cap_at(1, 25) >= BUDGET - 2, "R1 {}", m.cap_at(1, 25));
    assert!(m.cap_at(0, 35) >= 15 && m.cap_at(1, 35) >= 15);
    // R1 killed at 40 s: R0 has its share within 15 s (its lease is 5 s), though it
    // could not reach Postgres from 42 to 45 s, and kept its cap meanwhile.
    let before = m.cap_at(0, 42);
    for s in 43..45 {
        assert!(
            m.cap_at(0, s) <= before,
            "R0 grew at {s} s without Postgres"
        );
    }
    assert!(m.cap_at(0, 50) >= BUDGET - 1, "R0 {}", m.cap_at(0, 50));
    // R2 busy from 52 s: split with R0; then R0 drains and leaves at once.
    assert!(m.cap_at(0, 58) >= 15 && m.cap_at(2, 58) >= 15);
    assert_eq!(m.cap_at(2, 66), BUDGET);
}

#[test]
fn sim_replicas_three_busy_replicas_never_exceed_the_budget() {
    let mut m = Multi::new(3, 30);
    for r in 0..3 {
        m.script(0.3 * r as f64, Event::Start(r));
        m.script(0.3 * r as f64, Event::Load(r, 30));
    }
    // Demand moves around: one at a time goes quiet for a while.
    m.script(10.0, Event::Load(0, 5));
    m.script(15.0, Event::Load(0, 30));
    m.script(15.0, Event::Load(1, 2));
    m.script(20.0, Event::Load(1, 30));
    m.script(20.0, Event::Load(2, 0));
    m.run(30);
    m.print();
    assert!(m.peak_total <= BUDGET);
    // R2 idle from 20 s: R0 and R1 split what it gave away.
    let caps: Vec<u32> = (0..3).map(|r| m.cap_at(r, 28)).collect();
    assert!(caps[0] >= 18 && caps[1] >= 18, "{caps:?}");
}
