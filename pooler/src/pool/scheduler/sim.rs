// Test-only: declared under #[cfg(test)] in scheduler.rs.
//! Deterministic simulation of the scheduler: a fake clock, an event queue, closed-loop
//! clients (transaction, think, repeat) and logins that take time. No tokio, no real
//! time; a fixed-seed generator jitters durations so clients do not run in lockstep.
//! Run with `--nocapture` to see the numbers.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::time::{Duration, Instant};

use super::*;

mod replicas;

#[derive(Clone, Copy)]
struct Workload {
    /// Clients per role, one entry per role.
    tx_us: u64,
    think_us: u64,
    login_us: u64,
    seconds: u64,
}

const SHORT: Workload = Workload {
    tx_us: 2_000,
    think_us: 3_000,
    login_us: 2_000,
    seconds: 15,
};

enum Event {
    Want(usize),
    Done(usize),
    Opened(ServerId),
    Tick,
}

struct Client {
    role: RoleId,
    server: Option<ServerId>,
    since_us: u64,
}

#[derive(Default)]
struct Report {
    logins: u64,
    closes: u64,
    done: Vec<u64>,
    max_wait_us: Vec<u64>,
    peak_held: Vec<u32>,
}

/// The fake clock and its event queue (ties in order of scheduling), with a
/// fixed-seed generator for jitter.
struct Timeline<E> {
    base: Instant,
    now_us: u64,
    seq: u64,
    queue: BinaryHeap<Reverse<(u64, u64)>>,
    events: HashMap<u64, E>,
    rng: u64,
}

impl<E> Timeline<E> {
    fn new(seed: u64) -> Self {
        Self {
            base: Instant::now(),
            now_us: 0,
            seq: 0,
            queue: BinaryHeap::new(),
            events: HashMap::new(),
            rng: seed,
        }
    }

    /// Uniform in [d/2, 3d/2): xorshift, fixed seed.
    fn jitter(&mut self, d: u64) -> u64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        d / 2 + self.rng % d.max(1)
    }

    /// `e` happens `delay_us` from now.
    fn at(&mut self, delay_us: u64, e: E) {
        self.at_us(self.now_us + delay_us, e);
    }

    /// `e` happens at `t_us` since the start.
    fn at_us(&mut self, t_us: u64, e: E) {
        self.seq += 1;
        self.queue.push(Reverse((t_us, self.seq)));
        self.events.insert(self.seq, e);
    }

    /// The next event up to `end_us`, with the clock moved to it.
    fn next(&mut self, end_us: u64) -> Option<E> {
        let Reverse((t, seq)) = self.queue.pop()?;
        if t > end_us {
            return None;
        }
        self.now_us = t;
        self.events.remove(&seq)
    }

    fn now(&self) -> Instant {
        self.base + Duration::from_micros(self.now_us)
    }
}

struct Sim {
    sched: Scheduler<(), usize>,
    clock: Timeline<Event>,
    clients: Vec<Client>,
    w: Workload,
    r: Report,
    /// When each role's clients start (0 unless `starting_at` says otherwise).
    starts_us: Vec<u64>,
    /// Transactions finished before this are not counted in `done`.
    count_from_us: u64,
}

impl Sim {
    fn new(config: SchedulerConfig, roles: &[(u32, usize)], w: Workload) -> Self {
        let mut sched = Scheduler::new(config);
        let mut clients = Vec::new();
        for &(pool_size, n) in roles {
            let role = sched.add_role(RoleConfig {
                pool_size,
                weight: 1,
            });
            for _ in 0..n {
                clients.push(Client {
                    role,
                    server: None,
                    since_us: 0,
                });
            }
        }
        let mut sim = Self {
            sched,
            clock: Timeline::new(0x9e37_79b9_7f4a_7c15),
            clients,
            w,
            r: Report {
                done: vec![0; roles.len()],
                max_wait_us: vec![0; roles.len()],
                peak_held: vec![0; roles.len()],
                ..Report::default()
            },
            starts_us: vec![0; roles.len()],
            count_from_us: 0,
        };
        for c in 0..sim.clients.len() {
            let start = sim.jitter(w.think_us);
            sim.at(start, Event::Want(c));
        }
        sim.at(100_000, Event::Tick);
        sim
    }

    /// The clients of `roles` connect at `at_us` instead of at the start, and `done`
    /// counts only what finishes from then on.
    fn starting_at(mut self, roles: std::ops::Range<usize>, at_us: u64) -> Self {
        for r in roles {
            self.starts_us[r] = at_us;
        }
        self.count_from_us = at_us;
        self
    }

    fn jitter(&mut self, d: u64) -> u64 {
        self.clock.jitter(d)
    }

    fn at(&mut self, delay_us: u64, e: Event) {
        self.clock.at(delay_us, e);
    }

    fn start_tx(&mut self, c: usize, server: ServerId) {
        let role = self.clients[c].role.index();
        let wait = self.clock.now_us - self.clients[c].since_us;
        self.r.max_wait_us[role] = self.r.max_wait_us[role].max(wait);
        self.clients[c].server = Some(server);
        let st = self.sched.role_stats(self.clients[c].role).unwrap();
        let held = st.active + st.idle + st.opening;
        self.r.peak_held[role] = self.r.peak_held[role].max(held);
        let d = self.jitter(self.w.tx_us);
        self.at(d, Event::Done(c));
    }

    fn apply(&mut self, out: Vec<Action<(), usize>>) {
        for a in out {
            match a {
                Action::Grant { waiter, server, .. } => self.start_tx(waiter, server),
                Action::Open { server, .. } => {
                    self.r.logins += 1;
                    let d = self.jitter(self.w.login_us);
                    self.at(d, Event::Opened(server));
                }
                Action::Close { .. } => self.r.closes += 1,
            }
        }
    }

    fn run(mut self) -> Report {
        let end = self.w.seconds * 1_000_000;
        while let Some(event) = self.clock.next(end) {
            let (t, now) = (self.clock.now_us, self.clock.now());
            let mut out = Vec::new();
            match event {
                Event::Want(c) if t < self.starts_us[self.clients[c].role.index()] => {
                    let wait = self.starts_us[self.clients[c].role.index()] - t;
                    let d = self.jitter(self.w.think_us);
                    self.at(wait + d, Event::Want(c));
                }
                Event::Want(c) => {
                    self.clients[c].since_us = t;
                    let role = self.clients[c].role;
                    match self.sched.take_idle(role, now) {
                        Some((server, (), _)) => self.start_tx(c, server),
                        None => {
                            self.sched.enqueue(role, c, now, &mut out).unwrap();
                        }
                    }
                }
                Event::Done(c) => {
                    let server = self.clients[c].server.take().unwrap();
                    if t >= self.count_from_us {
                        self.r.done[self.clients[c].role.index()] += 1;
                    }
                    self.sched.release(server, (), now, &mut out).unwrap();
                    let d = self.jitter(self.w.think_us);
                    self.at(d, Event::Want(c));
                }
                Event::Opened(s) => self.sched.opened(s, (), now, &mut out).unwrap(),
                Event::Tick => {
                    self.sched.tick(now, &mut out);
                    self.at(100_000, Event::Tick);
                }
            }
            assert!(self.sched.total_servers() <= self.sched.config().max_server_connections);
            self.apply(out);
        }
        self.r
    }
}

fn jain(x: &[u64]) -> f64 {
    let sum: f64 = x.iter().map(|&v| v as f64).sum();
    let sq: f64 = x.iter().map(|&v| (v as f64) * (v as f64)).sum();
    sum * sum / (x.len() as f64 * sq)
}

fn summary(name: &str, r: &Report, roles: std::ops::Range<usize>, seconds: u64) -> (f64, u64, f64) {
    let done = &r.done[roles.clone()];
    let total: u64 = done.iter().sum();
    let mean = total as f64 / done.len() as f64;
    let min = done.iter().copied().min().unwrap_or(0);
    let max_wait = r.max_wait_us[roles].iter().copied().max().unwrap_or(0);
    println!(
        "sim {name}: {} tx ({:.0}/s), per role mean {mean:.0} min {min} (min/mean {:.2}), \
         Jain {:.3}, max wait {:.0} ms, logins {} ({:.1}/s), closes {}",
        total,
        total as f64 / seconds as f64,
        min as f64 / mean,
        jain(done),
        max_wait as f64 / 1000.0,
        r.logins,
        r.logins as f64 / seconds as f64,
        r.closes,
    );
    (mean, min, jain(done))
}

fn budget(n: u32) -> SchedulerConfig {
    SchedulerConfig {
        max_server_connections: n,
        ..SchedulerConfig::default()
    }
}

#[test]
fn sim_40_roles_5_clients_budget_40_logs_in_rarely() {
    let r = Sim::new(budget(40), &[(20, 5); 40], SHORT).run();
    let (_, min, j) = summary("40x5/40", &r, 0..40, SHORT.seconds);
    // PgBouncer: ~290 logins/s here (~4,350 in 15 s). Converging on one slot per role
    // costs the initial logins plus one move per slot the first roles grabbed.
    assert!(r.logins <= 120, "logins {}", r.logins);
    assert!(min > 0 && j >= 0.95);
}

#[test]
fn sim_100_roles_2_clients_budget_40_serves_everyone_fairly() {
    let r = Sim::new(budget(40), &[(20, 2); 100], SHORT).run();
    let (mean, min, j) = summary("100x2/40", &r, 0..100, SHORT.seconds);
    assert!(min as f64 >= 0.5 * mean, "min {min} mean {mean}");
    assert!(j >= 0.95, "Jain {j}");
    // Switching is bounded by budget / quantum (80/s) plus the initial logins.
    assert!(r.logins <= 40 + 80 * SHORT.seconds, "logins {}", r.logins);
}

#[test]
fn sim_noisy_role_beside_50_quiet_roles() {
    let mut roles = vec![(40, 50)];
    roles.extend([(20, 1); 50]);
    let r = Sim::new(budget(40), &roles, SHORT).run();
    let (noisy, _, _) = summary("noisy 1x50", &r, 0..1, SHORT.seconds);
    let (mean, min, j) = summary("quiet 50x1", &r, 1..51, SHORT.seconds);
    assert!(min as f64 >= 0.5 * mean, "quiet min {min} mean {mean}");
    assert!(j >= 0.95, "quiet Jain {j}");
    // A quiet client waits at most a few quanta, never the whole run.
    let worst = r.max_wait_us[1..51].iter().copied().max().unwrap_or(0);
    assert!(worst <= 3_000_000, "quiet worst wait {worst} µs");
    println!("sim noisy: noisy role {noisy:.0} tx vs quiet mean {mean:.0}");
}

#[test]
fn sim_lone_busy_role_uses_the_budget_up_to_pool_size() {
    for pool_size in [40, 25] {
        let r = Sim::new(budget(40), &[(pool_size, 100)], SHORT).run();
        summary(
            &format!("lone pool_size {pool_size}"),
            &r,
            0..1,
            SHORT.seconds,
        );
        println!(
            "sim lone: peak servers {} of pool_size {pool_size}",
            r.peak_held[0]
        );
        assert_eq!(r.peak_held[0], pool_size);
        assert_eq!(r.logins, u64::from(pool_size));
    }
}

#[test]
fn sim_2000_roles_1_client_budget_100_rotates_through_everyone() {
    // Mostly idle apps: far more roles with demand than slots. Each tenure lasts about a
    // quantum, so a full rotation takes about roles × quantum / budget = 10 s.
    let w = Workload {
        think_us: 200_000,
        seconds: 30,
        ..SHORT
    };
    let r = Sim::new(budget(100), &[(20, 1); 2000], w).run();
    let (_, min, j) = summary("2000x1/100 think 200ms", &r, 0..2000, w.seconds);
    let worst = r.max_wait_us.iter().copied().max().unwrap_or(0);
    assert!(min > 0, "a role was never served");
    assert!(worst <= 15_000_000, "worst wait {worst} µs");
    assert!(j >= 0.9, "Jain {j}");
    assert!(r.logins <= 100 + 200 * w.seconds, "logins {}", r.logins);
}

#[test]
fn sim_roles_that_were_busy_are_not_held_back_by_newcomers() {
    // 40 roles share the budget for 15 s; then 60 more arrive. The first 40 have
    // received 15 s of service each; the newcomers must not be ranked ahead of them
    // until they have received as much (which would take the rest of the run).
    let w = Workload {
        seconds: 30,
        tx_us: 1_000,
        think_us: 100,
        ..SHORT
    };
    let r = Sim::new(budget(40), &[(20, 2); 100], w)
        .starting_at(40..100, 15_000_000)
        .run();
    let (old, old_min, _) = summary("busy 40x2 after 15 s", &r, 0..40, 15);
    let (new, _, _) = summary("newcomers 60x2", &r, 40..100, 15);
    let (mean, min, j) = summary("all 100x2", &r, 0..100, 15);
    assert!(
        old >= 0.8 * new,
        "busy roles {old:.0} tx vs newcomers {new:.0}"
    );
    assert!(
        old_min as f64 >= 0.5 * mean && min as f64 >= 0.5 * mean,
        "min {min} mean {mean}"
    );
    assert!(j >= 0.95, "Jain {j}");
}
