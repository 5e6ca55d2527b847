//! One test per rule of design.md's budget section. Connections and waiters are plain
//! tags (`u32`), so every decision is checked as data.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use super::*;

type Sched = Scheduler<u32, u32>;
type Out = Vec<Action<u32, u32>>;

fn t(ms: u64) -> Instant {
    static BASE: OnceLock<Instant> = OnceLock::new();
    *BASE.get_or_init(Instant::now) + Duration::from_millis(ms)
}

fn sched(budget: u32) -> Sched {
    Scheduler::new(SchedulerConfig {
        max_server_connections: budget,
        ..SchedulerConfig::default()
    })
}

fn role(s: &mut Sched, pool_size: u32) -> RoleId {
    s.add_role(RoleConfig {
        pool_size,
        weight: 1,
    })
}

fn opens(out: &Out) -> Vec<(ServerId, RoleId)> {
    out.iter()
        .filter_map(|a| match a {
            Action::Open { server, role } => Some((*server, *role)),
            _ => None,
        })
        .collect()
}

fn grants(out: &Out) -> Vec<(u32, ServerId)> {
    out.iter()
        .filter_map(|a| match a {
            Action::Grant { waiter, server, .. } => Some((*waiter, *server)),
            _ => None,
        })
        .collect()
}

fn closes(out: &Out) -> Vec<(ServerId, CloseReason)> {
    out.iter()
        .filter_map(|a| match a {
            Action::Close { server, reason, .. } => Some((*server, *reason)),
            _ => None,
        })
        .collect()
}

/// A client of `r` gets a freshly opened server (the budget must have room).
fn checkout_new(s: &mut Sched, r: RoleId, tag: u32, now: Instant) -> ServerId {
    let mut out = Vec::new();
    s.enqueue(r, tag, now, &mut out).unwrap();
    let [(server, role)] = opens(&out)[..] else {
        panic!("expected one open, got {out:?}")
    };
    assert_eq!(role, r);
    let mut out = Vec::new();
    s.opened(server, server.index(), now, &mut out).unwrap();
    assert_eq!(grants(&out), vec![(tag, server)]);
    server
}

fn release(s: &mut Sched, server: ServerId, now: Instant) -> Out {
    let mut out = Vec::new();
    s.release(server, server.index(), now, &mut out).unwrap();
    out
}

#[test]
fn rule1_idle_servers_are_reused_lifo() {
    let mut s = sched(10);
    let a = role(&mut s, 5);
    let s1 = checkout_new(&mut s, a, 1, t(0));
    let s2 = checkout_new(&mut s, a, 2, t(0));
    assert!(release(&mut s, s1, t(1)).is_empty());
    assert!(release(&mut s, s2, t(2)).is_empty());
    assert_eq!(
        s.take_idle(a, t(3)).map(|x| (x.0, x.2)),
        Some((s2, Duration::from_millis(1)))
    );
    assert_eq!(
        s.take_idle(a, t(3)).map(|x| (x.0, x.2)),
        Some((s1, Duration::from_millis(2)))
    );
    assert_eq!(s.take_idle(a, t(3)), None);
    assert_eq!(s.counters().opens, 2);
}

#[test]
fn rule2_opens_under_pool_size_and_budget_then_waits() {
    let mut s = sched(3);
    let a = role(&mut s, 2);
    let b = role(&mut s, 5);
    let mut out = Vec::new();
    s.enqueue(a, 1, t(0), &mut out).unwrap();
    s.enqueue(a, 2, t(0), &mut out).unwrap();
    s.enqueue(a, 3, t(0), &mut out).unwrap(); // pool_size 2 reached: waits
    assert_eq!(opens(&out).len(), 2);
    out.clear();
    s.enqueue(b, 4, t(0), &mut out).unwrap();
    s.enqueue(b, 5, t(0), &mut out).unwrap(); // budget 3 reached: waits
    assert_eq!(opens(&out).len(), 1);
    assert_eq!(s.total_servers(), 3);
    let st = s.role_stats(a).unwrap();
    assert_eq!((st.opening, st.waiting), (2, 3));
}

#[test]
fn rule3_evicts_only_servers_idle_long_enough_oldest_first() {
    let mut s = sched(2);
    let a = role(&mut s, 5);
    let b = role(&mut s, 5);
    let c = role(&mut s, 5);
    let sa = checkout_new(&mut s, a, 1, t(0));
    let sb = checkout_new(&mut s, b, 2, t(0));
    release(&mut s, sa, t(100));
    release(&mut s, sb, t(200));
    let mut out = Vec::new();
    // Idle 0.9 s: a busy client between transactions, not stolen.
    s.enqueue(c, 3, t(1000), &mut out).unwrap();
    assert!(out.is_empty(), "{out:?}");
    // Deferred rule 3: the tick evicts A's server (idle longest) once it is 1 s idle.
    s.tick(t(1100), &mut out);
    assert_eq!(closes(&out), vec![(sa, CloseReason::Evicted)]);
    assert_eq!(opens(&out).iter().map(|o| o.1).collect::<Vec<_>>(), vec![c]);
    assert_eq!(s.counters().evictions, 1);
    // Direct rule 3 at checkout: B's server is now 1 s idle.
    let d = role(&mut s, 5);
    out.clear();
    s.enqueue(d, 4, t(1200), &mut out).unwrap();
    assert_eq!(closes(&out), vec![(sb, CloseReason::Evicted)]);
    assert_eq!(opens(&out)[0].1, d);
}

#[test]
fn rule3_needs_the_role_under_its_fair_share() {
    let mut s = sched(2);
    let a = role(&mut s, 5);
    let b = role(&mut s, 5);
    let _sa = checkout_new(&mut s, a, 1, t(0));
    let sb = checkout_new(&mut s, b, 2, t(0));
    release(&mut s, sb, t(0));
    // A (active, 1 server) and B (no demand now): A's share is 2, it may take B's.
    let mut out = Vec::new();
    s.enqueue(a, 3, t(2000), &mut out).unwrap();
    assert_eq!(closes(&out), vec![(sb, CloseReason::Evicted)]);
    // Now A holds 2 = budget; a third A client waits, nothing left to evict.
    out.clear();
    s.enqueue(a, 4, t(5000), &mut out).unwrap();
    assert!(out.is_empty());
}

#[test]
fn release_without_other_waiters_hands_to_own_waiter_or_parks() {
    let mut s = sched(1);
    let a = role(&mut s, 5);
    let sa = checkout_new(&mut s, a, 1, t(0));
    let mut out = Vec::new();
    s.enqueue(a, 2, t(1), &mut out).unwrap();
    assert!(out.is_empty());
    // Even long past the quantum, with nobody else waiting the slot stays.
    assert_eq!(grants(&release(&mut s, sa, t(5000))), vec![(2, sa)]);
    assert!(release(&mut s, sa, t(6000)).is_empty());
    assert_eq!(s.role_stats(a).unwrap().idle, 1);
}

#[test]
fn release_over_fair_share_moves_the_slot() {
    let mut s = sched(2);
    let a = role(&mut s, 5);
    let b = role(&mut s, 5);
    let a1 = checkout_new(&mut s, a, 1, t(0));
    let _a2 = checkout_new(&mut s, a, 2, t(0));
    let mut out = Vec::new();
    s.enqueue(a, 3, t(1), &mut out).unwrap();
    s.enqueue(b, 4, t(1), &mut out).unwrap();
    assert!(out.is_empty());
    // A holds 2 of 2 with B waiting: share is 1, so A's released server moves to B
    // even though A has its own waiter and the quantum has not passed.
    let out = release(&mut s, a1, t(10));
    assert_eq!(closes(&out), vec![(a1, CloseReason::Switched)]);
    assert_eq!(opens(&out)[0].1, b);
    assert_eq!(s.counters().switches, 1);
}

#[test]
fn release_at_fair_share_moves_only_after_the_quantum() {
    let mut s = sched(2);
    let a = role(&mut s, 5);
    let b = role(&mut s, 5);
    let c = role(&mut s, 5);
    let sa = checkout_new(&mut s, a, 1, t(0));
    let _sb = checkout_new(&mut s, b, 2, t(0));
    let mut out = Vec::new();
    s.enqueue(a, 3, t(0), &mut out).unwrap();
    s.enqueue(c, 4, t(100), &mut out).unwrap();
    assert!(out.is_empty());
    // Held 0.4 s < quantum: A keeps it (its own waiter).
    assert_eq!(grants(&release(&mut s, sa, t(400))), vec![(3, sa)]);
    // Held 0.55 s, but C has starved only 0.45 s: still A's.
    s.enqueue(a, 5, t(500), &mut out).unwrap();
    assert_eq!(grants(&release(&mut s, sa, t(550))), vec![(5, sa)]);
    // Both past the quantum: the slot moves to C.
    let out = release(&mut s, sa, t(700));
    assert_eq!(closes(&out), vec![(sa, CloseReason::Switched)]);
    assert_eq!(opens(&out)[0].1, c);
}

#[test]
fn moved_slot_goes_to_the_waiting_role_with_least_service() {
    let mut s = sched(1);
    let a = role(&mut s, 5);
    let b = role(&mut s, 5);
    let c = role(&mut s, 5);
    // B gets 2 s of service, then leaves.
    let sb = checkout_new(&mut s, b, 1, t(0));
    release(&mut s, sb, t(2000));
    let mut out = Vec::new();
    s.enqueue(a, 2, t(4000), &mut out).unwrap(); // evicts B's idle server
    let (sa, _) = opens(&out)[0];
    s.opened(sa, 0, t(4000), &mut out).unwrap();
    // B queues first, C second; C has had less service, so C gets the slot.
    s.enqueue(b, 3, t(4100), &mut out).unwrap();
    s.enqueue(c, 4, t(4200), &mut out).unwrap();
    let out = release(&mut s, sa, t(5000));
    assert_eq!(closes(&out), vec![(sa, CloseReason::Switched)]);
    assert_eq!(opens(&out)[0].1, c);
}

#[test]
fn cancelled_waiter_leaves_the_queue() {
    let mut s = sched(1);
    let a = role(&mut s, 5);
    let sa = checkout_new(&mut s, a, 1, t(0));
    let mut out = Vec::new();
    let w2 = s.enqueue(a, 2, t(1), &mut out).unwrap();
    let _w3 = s.enqueue(a, 3, t(1), &mut out).unwrap();
    assert_eq!(s.cancel(w2, t(2)), Some(2));
    assert_eq!(s.cancel(w2, t(2)), None);
    assert_eq!(grants(&release(&mut s, sa, t(3))), vec![(3, sa)]);
    assert_eq!(s.role_stats(a).unwrap().waiting, 0);
}

#[test]
fn waiters_past_their_deadline_expire_in_any_queue_order() {
    let mut s = sched(1);
    let a = role(&mut s, 5);
    let sa = checkout_new(&mut s, a, 1, t(0));
    let mut out = Vec::new();
    s.enqueue_until(a, 2, t(1), Some(t(500)), &mut out).unwrap();
    // Queued later with an earlier deadline (it waited out a PAUSE first).
    s.enqueue_until(a, 3, t(2), Some(t(100)), &mut out).unwrap();
    s.enqueue(a, 4, t(3), &mut out).unwrap();
    assert!(s.expire_waiters(t(99)).is_empty());
    assert_eq!(s.expire_waiters(t(100)), vec![3]);
    assert_eq!(s.role_stats(a).unwrap().waiting, 2);
    assert_eq!(s.expire_waiters(t(600)), vec![2]);
    assert!(s.expire_waiters(t(10_000)).is_empty(), "no deadline: never");
    assert_eq!(grants(&release(&mut s, sa, t(700))), vec![(4, sa)]);
}

#[test]
fn open_failure_fails_one_waiter_frees_the_slot_and_does_not_spin() {
    let mut s = sched(1);
    let a = role(&mut s, 5);
    let mut out = Vec::new();
    s.enqueue(a, 1, t(0), &mut out).unwrap();
    s.enqueue(a, 2, t(0), &mut out).unwrap();
    let [(first, _)] = opens(&out)[..] else {
        panic!("{out:?}")
    };
    out.clear();
    // The longest waiter gets the error; the slot is retried for the next one.
    assert_eq!(s.open_failed(first, t(5), &mut out), Ok(Some(1)));
    let [(second, _)] = opens(&out)[..] else {
        panic!("{out:?}")
    };
    out.clear();
    assert_eq!(s.open_failed(second, t(10), &mut out), Ok(Some(2)));
    // Nobody left waiting: no further attempt.
    assert!(out.is_empty());
    assert_eq!(s.total_servers(), 0);
    assert_eq!(s.counters().open_failures, 2);
    assert_eq!(
        s.open_failed(second, t(10), &mut out),
        Err(SchedulerError::UnknownServer(second))
    );
}

#[test]
fn discarded_server_frees_its_slot_for_a_waiter() {
    let mut s = sched(1);
    let a = role(&mut s, 5);
    let b = role(&mut s, 5);
    let sa = checkout_new(&mut s, a, 1, t(0));
    let mut out = Vec::new();
    s.enqueue(b, 2, t(1), &mut out).unwrap();
    assert!(out.is_empty());
    s.discard(sa, t(2), &mut out).unwrap();
    assert_eq!(opens(&out)[0].1, b);
    assert_eq!(s.total_servers(), 1);
    assert!(
        s.release(sa, 0, t(3), &mut out).is_err(),
        "a discarded id is stale"
    );
}

#[test]
fn tick_closes_idle_timeout_and_lifetime() {
    let mut s = Scheduler::new(SchedulerConfig {
        max_server_connections: 5,
        server_idle_timeout: Duration::from_secs(10),
        server_lifetime: Duration::from_secs(30),
        ..SchedulerConfig::default()
    });
    let a = role(&mut s, 5);
    let old = checkout_new(&mut s, a, 1, t(0));
    let young = checkout_new(&mut s, a, 2, t(0));
    release(&mut s, old, t(1_000));
    let mut out = Vec::new();
    s.tick(t(10_999), &mut out);
    assert!(out.is_empty());
    s.tick(t(11_000), &mut out);
    assert_eq!(closes(&out), vec![(old, CloseReason::IdleTimeout)]);
    // Past its lifetime: closed on release rather than reused, and when idle by tick.
    out.clear();
    s.release(young, 0, t(30_000), &mut out).unwrap();
    assert_eq!(closes(&out), vec![(young, CloseReason::Lifetime)]);
    let third = checkout_new(&mut s, a, 3, t(30_000));
    release(&mut s, third, t(55_000));
    out.clear();
    s.tick(t(60_000), &mut out);
    assert_eq!(closes(&out), vec![(third, CloseReason::Lifetime)]);
    assert_eq!(s.total_servers(), 0);
}

#[test]
fn close_role_closes_idle_now_and_checked_out_on_release() {
    let mut s = sched(5);
    let a = role(&mut s, 5);
    let idle = checkout_new(&mut s, a, 1, t(0));
    let busy = checkout_new(&mut s, a, 2, t(0));
    let mut out = Vec::new();
    let w = s.enqueue(a, 3, t(1), &mut out).unwrap();
    let [(opening, _)] = opens(&out)[..] else {
        panic!("{out:?}")
    };
    assert_eq!(s.cancel(w, t(1)), Some(3));
    assert!(release(&mut s, idle, t(2)).is_empty());
    out.clear();
    s.close_role(a, t(4), &mut out);
    assert_eq!(closes(&out), vec![(idle, CloseReason::Revoked)]);
    out.clear();
    s.release(busy, 0, t(5), &mut out).unwrap();
    assert_eq!(closes(&out), vec![(busy, CloseReason::Revoked)]);
    out.clear();
    s.enqueue(a, 4, t(5), &mut out).unwrap();
    assert!(out.is_empty(), "the login in flight will serve it: {out:?}");
    // That login started before the revocation, so it is not used; the waiter gets a
    // fresh one.
    s.opened(opening, 0, t(6), &mut out).unwrap();
    assert_eq!(closes(&out), vec![(opening, CloseReason::Revoked)]);
    let [(fresh, _)] = opens(&out)[..] else {
        panic!("{out:?}")
    };
    out.clear();
    s.opened(fresh, 7, t(7), &mut out).unwrap();
    assert_eq!(grants(&out), vec![(4, fresh)]);
}

#[test]
fn pool_size_changes_at_runtime() {
    let mut s = sched(10);
    let a = role(&mut s, 3);
    let servers: Vec<_> = (0..3).map(|i| checkout_new(&mut s, a, i, t(0))).collect();
    let mut out = Vec::new();
    s.enqueue(a, 9, t(1), &mut out).unwrap();
    assert!(out.is_empty(), "at pool_size");
    release(&mut s, servers[0], t(2)); // handed to waiter 9
    release(&mut s, servers[1], t(3)); // parked
    s.set_role_config(
        a,
        RoleConfig {
            pool_size: 1,
            weight: 1,
        },
        t(4),
        &mut out,
    )
    .unwrap();
    assert_eq!(closes(&out), vec![(servers[1], CloseReason::OverLimit)]);
    out.clear();
    s.release(servers[2], 0, t(5), &mut out).unwrap();
    assert_eq!(closes(&out), vec![(servers[2], CloseReason::OverLimit)]);
    out.clear();
    s.enqueue(a, 10, t(6), &mut out).unwrap();
    assert!(out.is_empty(), "at the new pool_size 1");
    s.set_role_config(
        a,
        RoleConfig {
            pool_size: 4,
            weight: 1,
        },
        t(7),
        &mut out,
    )
    .unwrap();
    assert_eq!(opens(&out).len(), 1);
}

#[test]
fn lowered_budget_closes_idle_then_on_release() {
    let mut s = sched(3);
    let a = role(&mut s, 5);
    let x = checkout_new(&mut s, a, 1, t(0));
    let y = checkout_new(&mut s, a, 2, t(0));
    let z = checkout_new(&mut s, a, 3, t(0));
    release(&mut s, x, t(1));
    let mut out = Vec::new();
    let config = SchedulerConfig {
        max_server_connections: 1,
        ..s.config().clone()
    };
    s.set_config(config, t(2), &mut out);
    assert_eq!(closes(&out), vec![(x, CloseReason::OverLimit)]);
    out.clear();
    s.release(y, 0, t(3), &mut out).unwrap();
    assert_eq!(closes(&out), vec![(y, CloseReason::OverLimit)]);
    assert!(
        release(&mut s, z, t(4)).is_empty(),
        "back within budget: parked"
    );
}

#[test]
fn weights_scale_the_fair_share() {
    let mut s = sched(3);
    let a = s.add_role(RoleConfig {
        pool_size: 5,
        weight: 2,
    });
    let b = role(&mut s, 5);
    let a1 = checkout_new(&mut s, a, 1, t(0));
    let _a2 = checkout_new(&mut s, a, 2, t(0));
    let b1 = checkout_new(&mut s, b, 3, t(0));
    let mut out = Vec::new();
    s.enqueue(a, 4, t(1), &mut out).unwrap();
    s.enqueue(b, 5, t(1), &mut out).unwrap();
    // A's share is 2 of 3: A keeps its slot; B (share 1) keeps its own.
    assert_eq!(grants(&release(&mut s, a1, t(2))), vec![(4, a1)]);
    assert_eq!(grants(&release(&mut s, b1, t(2))), vec![(5, b1)]);
}

#[test]
fn unknown_ids_close_the_connection_and_report() {
    let mut s = sched(1);
    let a = role(&mut s, 1);
    let sa = checkout_new(&mut s, a, 1, t(0));
    s.discard(sa, t(1), &mut Vec::new()).unwrap();
    let mut out = Vec::new();
    assert_eq!(
        s.release(sa, 42, t(2), &mut out),
        Err(SchedulerError::UnknownServer(sa))
    );
    assert_eq!(closes(&out), vec![(sa, CloseReason::Unknown)]);
}

#[test]
fn demand_counts_what_roles_could_use_and_its_peak_outlives_a_release() {
    let mut s = sched(10);
    let small = role(&mut s, 2);
    let big = role(&mut s, 10);
    let a = checkout_new(&mut s, small, 1, t(0));
    checkout_new(&mut s, small, 2, t(0));
    let mut out = Vec::new();
    // A third client of a role at its pool_size waits, but could not use a server.
    s.enqueue(small, 3, t(0), &mut out).unwrap();
    let b = checkout_new(&mut s, big, 4, t(0));
    assert_eq!(s.demand(), 3);
    release(&mut s, b, t(1));
    assert_eq!(s.demand(), 2);
    assert_eq!(s.take_demand_peak(), 3, "the peak since the last read");
    assert_eq!(s.take_demand_peak(), 2, "restarted at the current demand");
    // The waiter gets the released server; then nothing waits and one is in use.
    let out = release(&mut s, a, t(2));
    assert_eq!(grants(&out).len(), 1);
    assert_eq!(s.demand(), 2);
}
