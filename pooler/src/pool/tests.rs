//! The async layer against a fake connector.
//!
//! On real time with short durations: tokio's `test-util` feature (paused clock) is not
//! enabled for this crate, so the timings below are scaled down instead.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use tokio::time::sleep;

use super::*;

/// A fake server: its id and role, counting its own close.
#[derive(Debug)]
struct Conn {
    id: u64,
    role: String,
    closed: Arc<AtomicU64>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.closed.fetch_add(1, Ordering::SeqCst);
    }
}

#[derive(Default)]
struct Fake {
    connects: AtomicU64,
    closed: Arc<AtomicU64>,
    fail: AtomicBool,
}

impl Fake {
    fn connects(&self) -> u64 {
        self.connects.load(Ordering::SeqCst)
    }
    fn closed(&self) -> u64 {
        self.closed.load(Ordering::SeqCst)
    }
}

impl Connector<Conn> for Fake {
    fn connect(&self, role: &str) -> BoxFuture<'static, Result<Conn, ConnectError>> {
        let id = self.connects.fetch_add(1, Ordering::SeqCst) + 1;
        let fail = self.fail.load(Ordering::SeqCst);
        let closed = Arc::clone(&self.closed);
        let role = role.to_owned();
        async move {
            // A login takes a moment, as a fork and SCRAM exchange do.
            sleep(Duration::from_millis(2)).await;
            if fail {
                return Err(ConnectError::new(io::Error::new(
                    io::ErrorKind::ConnectionRefused,
                    "connection refused",
                )));
            }
            Ok(Conn { id, role, closed })
        }
        .boxed()
    }
}

fn pools(budget: u32) -> (Pools<Conn>, Arc<Fake>) {
    let fake = Arc::new(Fake::default());
    let config = PoolConfig {
        max_server_connections: budget,
        ..PoolConfig::default()
    };
    (
        Pools::new(config, Arc::clone(&fake) as Arc<dyn Connector<Conn>>),
        fake,
    )
}

const LIMITS: RoleLimits = RoleLimits {
    pool_size: 5,
    weight: 1,
};
const WAIT: Duration = Duration::from_secs(5);

#[tokio::test]
async fn release_reuses_servers_lifo() {
    let (p, fake) = pools(10);
    let a = p.checkout("app_a", LIMITS, WAIT).await.unwrap();
    let b = p.checkout("app_a", LIMITS, WAIT).await.unwrap();
    assert_eq!((a.id, b.id, &*a.role), (1, 2, "app_a"));
    a.release();
    b.release();
    sleep(Duration::from_millis(20)).await;
    let again = p.checkout("app_a", LIMITS, WAIT).await.unwrap();
    assert_eq!(again.id, 2, "most recently released first");
    assert!(again.idle_for() >= Duration::from_millis(20));
    let other = p.checkout("app_a", LIMITS, WAIT).await.unwrap();
    assert_eq!(other.id, 1);
    assert_eq!(fake.connects(), 2);
    let s = p.stats();
    assert_eq!(s.role("app_a").unwrap().active, 2);
    assert_eq!(s.servers_in_use, 2);
    assert_eq!(s.counters.opens, 2);
}

#[tokio::test]
async fn drop_without_release_closes_the_server() {
    let (p, fake) = pools(1);
    let c = p.checkout("app_a", LIMITS, WAIT).await.unwrap();
    drop(c); // a client that died mid-transaction
    assert_eq!(fake.closed(), 1);
    assert_eq!(p.stats().servers_in_use, 0);
    let c = p.checkout("app_a", LIMITS, WAIT).await.unwrap();
    assert_eq!(c.id, 2, "a fresh login, never the dirty server");
    c.discard();
    assert_eq!(fake.closed(), 2);
    assert_eq!(p.stats().servers_in_use, 0);
}

#[tokio::test]
async fn wait_timeout_reports_the_role_and_leaves_the_queue() {
    let (p, _fake) = pools(1);
    let held = p.checkout("app_a", LIMITS, WAIT).await.unwrap();
    let start = tokio::time::Instant::now();
    let err = p
        .checkout("app_a", LIMITS, Duration::from_millis(250))
        .await
        .unwrap_err();
    assert!(start.elapsed() >= Duration::from_millis(250));
    match &err {
        PoolError::WaitTimeout {
            role,
            waited,
            pool_size,
            ..
        } => {
            assert_eq!(&**role, "app_a");
            assert!(*waited >= Duration::from_millis(250));
            assert_eq!(*pool_size, 5);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(err.sqlstate(), "53300");
    assert!(err.to_string().contains("query_wait_timeout"), "{err}");
    assert_eq!(p.stats().role("app_a").unwrap().waiting, 0);
    drop(held);
}

#[tokio::test]
async fn cancelled_waiter_leaves_the_queue_and_leaks_no_slot() {
    let (p, fake) = pools(1);
    let held = p.checkout("app_a", LIMITS, WAIT).await.unwrap();
    let p2 = p.clone();
    let task = tokio::spawn(async move { p2.checkout("app_a", LIMITS, WAIT).await });
    sleep(Duration::from_millis(10)).await;
    assert_eq!(p.stats().role("app_a").unwrap().waiting, 1);
    task.abort();
    assert!(task.await.unwrap_err().is_cancelled());
    assert_eq!(p.stats().role("app_a").unwrap().waiting, 0);
    held.release();
    let s = p.stats();
    assert_eq!((s.role("app_a").unwrap().idle, s.servers_in_use), (1, 1));
    let c = p.checkout("app_a", LIMITS, WAIT).await.unwrap();
    assert_eq!((c.id, fake.connects()), (1, 1));
}

#[tokio::test]
async fn a_grant_racing_a_dropped_waiter_goes_back_to_the_pool() {
    let (p, fake) = pools(1);
    let held = p.checkout("app_a", LIMITS, WAIT).await.unwrap();
    let mut waiting = Box::pin(p.checkout("app_a", LIMITS, WAIT));
    assert!((&mut waiting).now_or_never().is_none(), "queued");
    held.release(); // granted: the server now sits in the waiter's channel
    drop(waiting); // the client goes away before reading it
    let s = p.stats();
    assert_eq!((s.role("app_a").unwrap().idle, s.servers_in_use), (1, 1));
    assert_eq!(fake.closed(), 0, "returned clean, not closed");
}

#[tokio::test]
async fn two_roles_with_budget_one_alternate_fairly() {
    let fake = Arc::new(Fake::default());
    let config = PoolConfig {
        max_server_connections: 1,
        switch_quantum: Duration::from_millis(50),
        min_idle_before_evict: Duration::from_millis(100),
        maintenance_interval: Duration::from_millis(10),
        ..PoolConfig::default()
    };
    let p = Pools::new(config, Arc::clone(&fake) as Arc<dyn Connector<Conn>>);
    let done: Arc<[AtomicU64; 2]> = Arc::new([AtomicU64::new(0), AtomicU64::new(0)]);
    let mut tasks = Vec::new();
    for (i, role) in ["app_a", "app_b"].into_iter().enumerate() {
        let (p, done) = (p.clone(), Arc::clone(&done));
        tasks.push(tokio::spawn(async move {
            let end = tokio::time::Instant::now() + Duration::from_secs(2);
            while tokio::time::Instant::now() < end {
                let c = p.checkout(role, LIMITS, WAIT).await.unwrap();
                sleep(Duration::from_millis(5)).await;
                c.release();
                done[i].fetch_add(1, Ordering::SeqCst);
                sleep(Duration::from_millis(1)).await;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let (a, b) = (
        done[0].load(Ordering::SeqCst),
        done[1].load(Ordering::SeqCst),
    );
    println!(
        "budget 1, two roles, 2 s, quantum 50 ms: a {a} b {b} tx, {} logins",
        fake.connects()
    );
    assert!(a.min(b) * 10 >= a.max(b) * 7, "a {a} b {b}");
    // The slot moves about once per quantum (40 in 2 s), not once per transaction.
    assert!(fake.connects() <= 50, "{} logins", fake.connects());
    assert!(a + b > 2 * fake.connects(), "a {a} b {b}");
}

#[tokio::test]
async fn revocation_closes_idle_now_and_busy_on_release() {
    let (p, fake) = pools(5);
    let idle = p.checkout("app_a", LIMITS, WAIT).await.unwrap();
    let busy = p.checkout("app_a", LIMITS, WAIT).await.unwrap();
    idle.release();
    p.close_role("app_a");
    assert_eq!(fake.closed(), 1);
    busy.release();
    assert_eq!(fake.closed(), 2, "closed on release, not reused");
    let s = p.stats();
    assert_eq!(s.servers_in_use, 0);
    let c = p.checkout("app_a", LIMITS, WAIT).await.unwrap();
    assert_eq!(c.id, 3, "a new login after revocation");
    p.close_role("unknown_role"); // no-op
}

#[tokio::test]
async fn connect_failure_reaches_the_waiter_and_frees_the_slot() {
    let (p, fake) = pools(1);
    fake.fail.store(true, Ordering::SeqCst);
    let err = p.checkout("app_a", LIMITS, WAIT).await.unwrap_err();
    assert!(matches!(err, PoolError::Connect { .. }), "{err:?}");
    assert!(err.to_string().contains("connection refused"), "{err}");
    let s = p.stats();
    assert_eq!((s.servers_in_use, s.counters.open_failures), (0, 1));
    fake.fail.store(false, Ordering::SeqCst);
    let c = p.checkout("app_a", LIMITS, WAIT).await.unwrap();
    assert_eq!(c.id, 2);
}

#[tokio::test]
async fn hung_login_times_out() {
    struct Hang;
    impl Connector<Conn> for Hang {
        fn connect(&self, _: &str) -> BoxFuture<'static, Result<Conn, ConnectError>> {
            futures_util::future::pending().boxed()
        }
    }
    let config = PoolConfig {
        connect_timeout: Duration::from_millis(200),
        ..PoolConfig::default()
    };
    let p = Pools::new(config, Arc::new(Hang));
    let err = p.checkout("app_a", LIMITS, WAIT).await.unwrap_err();
    assert!(err.to_string().contains("connect_timeout"), "{err}");
    assert_eq!(p.stats().servers_in_use, 0);
}

#[tokio::test]
async fn maintenance_closes_idle_servers_and_limits_follow_the_credentials_row() {
    let fake = Arc::new(Fake::default());
    let config = PoolConfig {
        server_idle_timeout: Duration::from_millis(300),
        maintenance_interval: Duration::from_millis(20),
        ..PoolConfig::default()
    };
    let p = Pools::new(config, Arc::clone(&fake) as Arc<dyn Connector<Conn>>);
    let a = p.checkout("app_a", LIMITS, WAIT).await.unwrap();
    let b = p.checkout("app_a", LIMITS, WAIT).await.unwrap();
    a.release();
    b.release();
    // pool_size lowered in the credentials row: the next checkout applies it.
    let one = RoleLimits {
        pool_size: 1,
        weight: 1,
    };
    let c = p.checkout("app_a", one, WAIT).await.unwrap();
    assert_eq!(fake.closed(), 1);
    assert_eq!(p.stats().role("app_a").unwrap().pool_size, 1);
    c.release();
    sleep(Duration::from_millis(600)).await;
    assert_eq!(fake.closed(), 2, "idle timeout");
    assert_eq!(p.stats().servers_in_use, 0);
}

#[tokio::test]
async fn set_config_lowers_the_budget() {
    let (p, fake) = pools(3);
    let a = p.checkout("app_a", LIMITS, WAIT).await.unwrap();
    let b = p.checkout("app_a", LIMITS, WAIT).await.unwrap();
    a.release();
    p.set_config(PoolConfig {
        max_server_connections: 1,
        ..PoolConfig::default()
    });
    assert_eq!(fake.closed(), 1);
    assert_eq!(p.stats().max_server_connections, 1);
    b.release();
    // A NOTIFY-driven limit change closes the idle server over the new pool_size.
    p.set_role_limits(
        "app_a",
        RoleLimits {
            pool_size: 0,
            weight: 1,
        },
    );
    assert_eq!(fake.closed(), 2);
    assert_eq!(p.stats().role("app_a").unwrap().pool_size, 0);
}

#[tokio::test]
async fn a_replica_share_caps_the_budget_and_survives_a_reload() {
    let (p, fake) = pools(10);
    // Before the registry grants anything, nothing opens: the client waits.
    assert_eq!(p.set_share(0), 0);
    let waiting = {
        let p = p.clone();
        tokio::spawn(async move { p.checkout("app_a", LIMITS, WAIT).await })
    };
    sleep(Duration::from_millis(20)).await;
    assert_eq!(fake.connects(), 0);
    assert_eq!(p.take_demand_peak(), 1, "the waiting client is demand");
    // A grant serves it.
    assert_eq!(p.set_share(2), 1, "the login it started counts at once");
    let a = waiting.await.unwrap().unwrap();
    let b = p.checkout("app_a", LIMITS, WAIT).await.unwrap();
    a.release();
    // A smaller share closes the idle server now and the busy one when it comes back;
    // until then it is still held.
    assert_eq!(p.set_share(0), 1);
    assert_eq!(fake.closed(), 1);
    b.release();
    assert_eq!((fake.closed(), p.servers()), (2, 0));
    // A reload keeps the share; the share never exceeds the configured budget.
    p.set_config(PoolConfig {
        max_server_connections: 1,
        ..PoolConfig::default()
    });
    assert_eq!(p.stats().max_server_connections, 0);
    p.set_share(5);
    let s = p.stats();
    assert_eq!((s.max_server_connections, s.cluster_budget), (1, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_churn_leaks_no_slot_and_no_connection() {
    let fake = Arc::new(Fake::default());
    let config = PoolConfig {
        max_server_connections: 4,
        switch_quantum: Duration::from_millis(20),
        min_idle_before_evict: Duration::from_millis(50),
        maintenance_interval: Duration::from_millis(10),
        ..PoolConfig::default()
    };
    let p = Pools::new(config, Arc::clone(&fake) as Arc<dyn Connector<Conn>>);
    let served = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for t in 0..32u64 {
        let (p, served) = (p.clone(), Arc::clone(&served));
        tasks.push(tokio::spawn(async move {
            let mut rng = (t + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
            let mut next = move |n: u64| {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                rng % n
            };
            let role = format!("app_{}", t % 8);
            for _ in 0..150 {
                let wait = Duration::from_millis(next(20));
                let Ok(c) = p.checkout(&role, LIMITS, wait).await else {
                    continue;
                };
                served.fetch_add(1, Ordering::Relaxed);
                if next(2) == 0 {
                    tokio::task::yield_now().await;
                } else {
                    sleep(Duration::from_millis(1)).await;
                }
                match next(10) {
                    0 => c.discard(),
                    1 | 2 => drop(c),
                    _ => c.release(),
                }
            }
        }));
    }
    // Some clients vanish mid-wait.
    for t in tasks.iter().step_by(5) {
        sleep(Duration::from_millis(50)).await;
        t.abort();
    }
    for t in tasks {
        let _ = t.await;
    }
    sleep(Duration::from_millis(100)).await; // logins in flight finish
    let s = p.stats();
    let idle: u32 = s.roles.iter().map(|r| r.idle).sum();
    for r in &s.roles {
        assert_eq!((r.active, r.opening, r.waiting), (0, 0, 0), "{r:?}");
    }
    assert_eq!(s.servers_in_use, idle);
    assert_eq!(
        fake.connects() - fake.closed(),
        u64::from(idle),
        "leaked connections"
    );
    println!(
        "churn: {} checkouts served, {:?}, {} idle at the end",
        served.load(Ordering::Relaxed),
        s.counters,
        idle
    );
}

/// Hot-path cost: checkout of an idle server of the same role and release back. Run
/// with `cargo test --release -p pooler hot_path -- --ignored --nocapture`.
#[tokio::test]
#[ignore = "timing; meaningful only in release builds"]
async fn hot_path_cost() {
    let (p, _fake) = pools(1000);
    for i in 0..1000 {
        let role = format!("app_{i}");
        p.checkout(&role, LIMITS, WAIT).await.unwrap().release();
    }
    let n = 1_000_000u32;
    let start = std::time::Instant::now();
    for _ in 0..n {
        let c = p
            .checkout("app_7", LIMITS, WAIT)
            .now_or_never()
            .unwrap()
            .unwrap();
        c.release();
    }
    let per = start.elapsed() / n;
    println!("hot path: checkout idle + release = {per:?} per pair (1,000 roles known)");
}

#[tokio::test]
async fn a_listener_server_is_outside_the_pool_size_but_inside_the_budget() {
    let (p, fake) = pools(3);
    let one = RoleLimits {
        pool_size: 1,
        weight: 1,
    };
    let tx = p.checkout("app_a", one, WAIT).await.unwrap();
    let listener = p.checkout_listener("app_a", WAIT).await.unwrap();
    assert_eq!(&*listener.role, "app_a", "logged in as the role itself");
    let s = p.stats();
    let a = s.role("app_a").unwrap();
    assert_eq!((a.active, a.listener, s.servers_in_use), (1, 1, 2));
    // The budget has one slot left; a second listener of the role waits for the first.
    assert!(
        p.checkout_listener("app_a", Duration::from_millis(50))
            .await
            .is_err()
    );
    let other = p.checkout("app_b", LIMITS, WAIT).await.unwrap();
    assert_eq!(p.stats().servers_in_use, 3);
    // Full: the listener of another role waits for a slot like any checkout.
    assert!(
        p.checkout_listener("app_b", Duration::from_millis(50))
            .await
            .is_err()
    );
    other.discard();
    let b_listener = p.checkout_listener("app_b", WAIT).await.unwrap();
    // A role whose only server is its listener still shows.
    tx.release();
    listener.discard();
    let s = p.stats();
    assert_eq!(s.role("app_a").unwrap().listener, 0);
    assert_eq!(s.role("app_b").unwrap().listener, 1);
    b_listener.discard();
    assert_eq!(p.stats().role("app_b").unwrap().listener, 0);
    assert!(fake.connects() >= 4);
}

/// A server whose backend takes its time to exit after it is closed.
struct Lingering {
    fake: Arc<Fake>,
    exited: Arc<tokio::sync::Semaphore>,
}

impl Connector<Conn> for Lingering {
    fn connect(&self, role: &str) -> BoxFuture<'static, Result<Conn, ConnectError>> {
        self.fake.connect(role)
    }

    fn close(&self, conn: Conn) -> Option<BoxFuture<'static, ()>> {
        let exited = Arc::clone(&self.exited);
        Some(
            async move {
                let _ = exited.acquire().await.map(|p| p.forget());
                drop(conn);
            }
            .boxed(),
        )
    }
}

#[tokio::test]
async fn a_closed_server_is_held_until_its_backend_has_gone() {
    let fake = Arc::new(Fake::default());
    let exited = Arc::new(tokio::sync::Semaphore::new(0));
    let connector = Lingering {
        fake: Arc::clone(&fake),
        exited: Arc::clone(&exited),
    };
    let p = Pools::new(PoolConfig::default(), Arc::new(connector));
    let a = p.checkout("app_a", LIMITS, WAIT).await.unwrap();
    let b = p.checkout("app_a", LIMITS, WAIT).await.unwrap();
    a.release();
    b.release();
    assert_eq!(p.servers(), 2);
    // A smaller share closes both idle servers; a replica must not publish them as
    // released while Postgres still counts their backends.
    p.set_share(0);
    sleep(Duration::from_millis(20)).await;
    assert_eq!((fake.closed(), p.servers()), (0, 2));
    exited.add_permits(1);
    sleep(Duration::from_millis(20)).await;
    assert_eq!((fake.closed(), p.servers()), (1, 1));
    exited.add_permits(1);
    sleep(Duration::from_millis(20)).await;
    assert_eq!((fake.closed(), p.servers()), (2, 0));
}

#[tokio::test]
async fn a_slot_that_changes_role_logs_in_only_once_the_old_backend_has_gone() {
    let fake = Arc::new(Fake::default());
    let exited = Arc::new(tokio::sync::Semaphore::new(0));
    let connector = Lingering {
        fake: Arc::clone(&fake),
        exited: Arc::clone(&exited),
    };
    let config = PoolConfig {
        max_server_connections: 1,
        min_idle_before_evict: Duration::ZERO,
        ..PoolConfig::default()
    };
    let p = Pools::new(config, Arc::new(connector));
    p.checkout("app_a", LIMITS, WAIT).await.unwrap().release();
    // app_b takes app_a's idle slot: the scheduler closes app_a's server at once, but
    // Postgres still counts its backend, so app_b's login waits for it to exit.
    let b = {
        let p = p.clone();
        tokio::spawn(async move { p.checkout("app_b", LIMITS, WAIT).await })
    };
    sleep(Duration::from_millis(50)).await;
    assert_eq!(
        (fake.connects(), p.servers()),
        (1, 2),
        "app_b's login started early"
    );
    exited.add_permits(1);
    let b = b.await.unwrap().unwrap();
    assert_eq!(
        (b.role.as_str(), fake.connects(), p.servers()),
        ("app_b", 2, 1)
    );
}
