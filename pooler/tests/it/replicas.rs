//! Several pooler replicas (the real binary, two or three processes) in front of one
//! real Postgres act as one pooler: one budget for all of them, shares that follow
//! demand, a crashed or drained replica's share taken over, and cancel requests that
//! reach the replica whose client they are for. The time a share takes to move is
//! printed (`--nocapture`); the deadlines asserted are the README's promises.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use dataplane_tests::fixtures::{MigratedDb, POOLER_PASSWORD};
use dataplane_tests::stack::{self, App};
use provisioner::ddl::LimitsPatch;
use serde_json::Value;
use tokio::io::AsyncWriteExt;

use crate::common::free_port;
use crate::metrics::http_get;

/// One pooler process.
struct Replica {
    child: tokio::process::Child,
    addr: SocketAddr,
    admin: SocketAddr,
    _dir: TempDir,
}

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Replica {
    async fn start(fixture: &MigratedDb, budget: u32) -> Replica {
        Replica::start_with(fixture, budget, "").await
    }

    /// With `extra` top-level configuration lines.
    async fn start_with(fixture: &MigratedDb, budget: u32, extra: &str) -> Replica {
        let (port, admin_port) = (free_port(), free_port());
        let dir =
            std::env::temp_dir().join(format!("pooler-replica-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let config = dir.join("pooler.toml");
        std::fs::write(
            &config,
            format!(
                "listen = \"127.0.0.1:{port}\"\nadmin_listen = \"127.0.0.1:{admin_port}\"\n\
                 max_server_connections = {budget}\ndefault_pool_size = {budget}\n\
                 query_wait_timeout_ms = 20000\n{extra}\n\
                 [upstream]\nhost = \"{}\"\nport = {}\ndbname = \"{}\"\n",
                fixture.cluster.host(),
                fixture.cluster.port(),
                fixture.db
            ),
        )
        .unwrap();
        let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_pooler"))
            .arg("--config")
            .arg(&config)
            .args(["--shutdown-grace-secs", "30"])
            .env("POOLER_AUTH_PASSWORD", POOLER_PASSWORD)
            .env("RUST_LOG", "warn")
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let r = Replica {
            child,
            addr: format!("127.0.0.1:{port}").parse().unwrap(),
            admin: format!("127.0.0.1:{admin_port}").parse().unwrap(),
            _dir: TempDir(dir),
        };
        for _ in 0..400 {
            if tokio::net::TcpStream::connect(r.admin).await.is_ok()
                && http_get(r.admin, "/readyz").await.0 == 200
            {
                return r;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("a replica never became ready");
    }

    /// `/v1/replicas`: this replica's share and what it knows of the others.
    async fn replicas(&self) -> Value {
        let (status, body) = http_get(self.admin, "/v1/replicas").await;
        assert_eq!(status, 200, "{body}");
        serde_json::from_str(&body).unwrap()
    }

    /// The cap its scheduler uses now.
    async fn cap(&self) -> u64 {
        self.replicas().await["cap"].as_u64().unwrap()
    }

    fn pid(&self) -> String {
        self.child.id().unwrap().to_string()
    }

    fn signal(&self, sig: &str) {
        let ok = std::process::Command::new("kill")
            .args([sig, &self.pid()])
            .status()
            .unwrap()
            .success();
        assert!(ok);
    }

    fn config(&self, fixture: &MigratedDb, app: &App) -> tokio_postgres::Config {
        let mut c = tokio_postgres::Config::new();
        c.host("127.0.0.1")
            .port(self.addr.port())
            .user(&app.role)
            .password(&app.password)
            .dbname(&fixture.db)
            .connect_timeout(Duration::from_secs(10));
        c
    }
}

async fn app(fixture: &MigratedDb, pool_size: i32) -> App {
    stack::init_test_logging();
    stack::provision(
        &fixture.provisioner(),
        &LimitsPatch {
            pool_size: Some(pool_size),
            connection_limit: Some(100),
            ..Default::default()
        },
    )
    .await
}

/// A fresh database, an app with `pool_size`, and two replicas with `budget`.
async fn two_replicas(budget: u32, pool_size: i32) -> (MigratedDb, App, Replica, Replica) {
    let fixture = dataplane_tests::fixtures::shared_migrated_database().await;
    let app = app(&fixture, pool_size).await;
    let r0 = Replica::start(&fixture, budget).await;
    let r1 = Replica::start(&fixture, budget).await;
    (fixture, app, r0, r1)
}

/// Samples the apps' server connections in `pg_stat_activity` until stopped; the
/// highest count seen.
fn sample_backends(
    fixture: &MigratedDb,
    roles: Vec<String>,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<(i64, u64)> {
    let config = fixture.cluster.superuser_config(&fixture.db);
    tokio::spawn(async move {
        let admin = dataplane_tests::connect(&config).await.unwrap();
        let (mut peak, mut samples) = (0i64, 0u64);
        while !stop.load(Ordering::Relaxed) {
            let n: i64 = admin
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity WHERE usename = ANY($1)",
                    &[&roles],
                )
                .await
                .unwrap()
                .get(0);
            peak = peak.max(n);
            samples += 1;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        (peak, samples)
    })
}

/// `clients` loops of short transactions through `config` until `stop` (or until
/// their connection fails, which only a killed replica's clients should see); the
/// number that committed and the number of clients that saw an error.
fn load(
    config: tokio_postgres::Config,
    clients: usize,
    sleep: &'static str,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<(u64, usize)> {
    tokio::spawn(async move {
        let done = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        for _ in 0..clients {
            let (config, stop, done) = (config.clone(), stop.clone(), done.clone());
            tasks.push(tokio::spawn(async move {
                let client = dataplane_tests::connect(&config).await?;
                while !stop.load(Ordering::Relaxed) {
                    client
                        .batch_execute(&format!("SELECT pg_sleep({sleep})"))
                        .await?;
                    done.fetch_add(1, Ordering::Relaxed);
                }
                Ok::<(), tokio_postgres::Error>(())
            }));
        }
        let mut failed = 0;
        for t in tasks {
            if t.await.unwrap().is_err() {
                failed += 1;
            }
        }
        (done.load(Ordering::Relaxed), failed)
    })
}

/// A load that ran to its stop: what it committed.
async fn finished(load: tokio::task::JoinHandle<(u64, usize)>) -> u64 {
    let (done, failed) = load.await.unwrap();
    assert_eq!(failed, 0, "clients of a live replica saw errors");
    done
}

/// Polls `cond` every 50 ms for up to `limit`; how long it took, or `None`.
async fn within(limit: Duration, mut cond: impl AsyncFnMut() -> bool) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if cond().await {
            return Some(start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    None
}

#[tokio::test]
async fn two_then_three_replicas_under_load_never_exceed_the_budget() {
    const BUDGET: u32 = 8;
    let fixture = dataplane_tests::fixtures::shared_migrated_database().await;
    let (a, b) = (app(&fixture, 8).await, app(&fixture, 8).await);
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = sample_backends(&fixture, vec![a.role.clone(), b.role.clone()], stop.clone());

    let r0 = Replica::start(&fixture, BUDGET).await;
    let r1 = Replica::start(&fixture, BUDGET).await;
    // Every replica busy, with more clients than the whole budget, on both apps.
    let mut loads = Vec::new();
    for r in [&r0, &r1] {
        loads.push(load(r.config(&fixture, &a), 6, "0.005", stop.clone()));
        loads.push(load(r.config(&fixture, &b), 6, "0.005", stop.clone()));
    }
    tokio::time::sleep(Duration::from_secs(4)).await;
    let r2 = Replica::start(&fixture, BUDGET).await;
    loads.push(load(r2.config(&fixture, &a), 6, "0.005", stop.clone()));
    loads.push(load(r2.config(&fixture, &b), 6, "0.005", stop.clone()));
    tokio::time::sleep(Duration::from_secs(6)).await;
    let caps = [r0.cap().await, r1.cap().await, r2.cap().await];
    stop.store(true, Ordering::Relaxed);
    let mut done = Vec::new();
    for l in loads {
        done.push(finished(l).await);
    }
    let (peak, samples) = sampler.await.unwrap();
    println!(
        "replicas: peak app backends {peak} of budget {BUDGET} over {samples} samples; \
         caps at the end {caps:?}; transactions per load {done:?}"
    );
    assert!(samples > 100, "the sampler ran throughout");
    assert!(peak <= i64::from(BUDGET), "{peak} backends over the budget");
    assert!(
        done.iter().all(|&n| n > 0),
        "every replica served: {done:?}"
    );
    assert_eq!(caps.iter().sum::<u64>(), u64::from(BUDGET), "{caps:?}");
}

#[tokio::test]
async fn an_idle_replica_gives_its_share_to_a_busy_one() {
    const BUDGET: u32 = 6;
    let (fixture, app, r0, r1) = two_replicas(BUDGET, 6).await;
    let stop0 = Arc::new(AtomicBool::new(false));
    let stop1 = Arc::new(AtomicBool::new(false));
    let l0 = load(r0.config(&fixture, &app), 8, "0.02", stop0.clone());
    let l1 = load(r1.config(&fixture, &app), 8, "0.02", stop1.clone());
    let split = within(Duration::from_secs(20), async || {
        r0.cap().await == 3 && r1.cap().await == 3
    })
    .await;
    assert!(split.is_some(), "two busy replicas split the budget");

    // r0's clients leave; r1 takes all but the one slot every replica keeps.
    stop0.store(true, Ordering::Relaxed);
    finished(l0).await;
    let took = within(Duration::from_secs(20), async || r1.cap().await == 5).await;
    println!("replicas: the busy replica took the idle one's share after {took:?}");
    let took = took.expect("the busy replica never took the idle one's share");
    assert!(took <= Duration::from_secs(5), "took {took:?}");
    assert_eq!(r0.cap().await, 1);
    stop1.store(true, Ordering::Relaxed);
    finished(l1).await;
}

#[tokio::test]
async fn survivors_take_a_killed_replicas_share() {
    const BUDGET: u32 = 9;
    let fixture = dataplane_tests::fixtures::shared_migrated_database().await;
    let app = app(&fixture, 9).await;
    let mut rs = Vec::new();
    for _ in 0..3 {
        rs.push(Replica::start(&fixture, BUDGET).await);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let mut loads = Vec::new();
    for r in &rs[..2] {
        loads.push(load(r.config(&fixture, &app), 10, "0.02", stop.clone()));
    }
    // The third one's clients will lose their connections with it.
    let doomed = load(rs[2].config(&fixture, &app), 10, "0.02", Arc::default());
    let split = within(Duration::from_secs(20), async || {
        rs[0].cap().await == 3 && rs[1].cap().await == 3 && rs[2].cap().await == 3
    })
    .await;
    assert!(split.is_some(), "three busy replicas split the budget");

    rs[2].signal("-KILL");
    let killed = Instant::now();
    let (_, cut_off) = doomed.await.unwrap();
    assert_eq!(
        cut_off, 10,
        "the killed replica's clients lost their connections"
    );
    let took = within(Duration::from_secs(30), async || {
        rs[0].cap().await + rs[1].cap().await == u64::from(BUDGET)
    })
    .await;
    println!(
        "replicas: survivors took a killed replica's share after {:?}",
        took.map(|_| killed.elapsed())
    );
    assert!(took.is_some(), "the survivors never took the share");
    assert!(
        killed.elapsed() <= Duration::from_secs(15),
        "{:?}",
        killed.elapsed()
    );
    stop.store(true, Ordering::Relaxed);
    for l in loads {
        finished(l).await;
    }
}

#[tokio::test]
async fn sigterm_drain_of_one_replica_under_load_loses_no_committed_transaction() {
    const BUDGET: u32 = 6;
    let (fixture, app, mut r0, r1) = two_replicas(BUDGET, 6).await;
    let setup = dataplane_tests::connect(&r1.config(&fixture, &app))
        .await
        .unwrap();
    setup
        .batch_execute("CREATE TABLE ledger (client int, seq int, PRIMARY KEY (client, seq))")
        .await
        .unwrap();
    drop(setup);

    // Each client writes numbered rows; a client of the draining replica that is told
    // to leave reconnects to the other one, as a Service would send it there.
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for i in 0..12i32 {
        let first = if i % 2 == 0 { &r0 } else { &r1 };
        let configs = [first.config(&fixture, &app), r1.config(&fixture, &app)];
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            let mut committed = Vec::new();
            let mut client = dataplane_tests::connect(&configs[0]).await.unwrap();
            let mut seq = 0i32;
            while !stop.load(Ordering::Relaxed) {
                seq += 1;
                let tx = async {
                    client.batch_execute("BEGIN").await?;
                    client
                        .execute("INSERT INTO ledger VALUES ($1, $2)", &[&i, &seq])
                        .await?;
                    client.batch_execute("SELECT pg_sleep(0.01)").await?;
                    client.batch_execute("COMMIT").await
                };
                match tx.await {
                    Ok(()) => committed.push(seq),
                    // Told to leave (57P01) or cut off: its outcome may be unknown,
                    // but it was never reported committed.
                    Err(_) => client = dataplane_tests::connect(&configs[1]).await.unwrap(),
                }
            }
            (i, committed)
        }));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    r0.signal("-TERM");
    let status = tokio::time::timeout(Duration::from_secs(60), r0.child.wait())
        .await
        .expect("the drained replica exits")
        .unwrap();
    assert!(status.success(), "{status}");
    // The survivor takes the share the drained one left behind.
    let took = within(Duration::from_secs(10), async || {
        r1.cap().await == u64::from(BUDGET)
    })
    .await;
    println!("replicas: the survivor had the drained replica's share after {took:?}");
    assert!(took.is_some());
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);

    let admin = fixture.admin().await;
    let schema = app.name().quoted();
    let mut total = 0;
    for t in tasks {
        let (i, committed) = t.await.unwrap();
        let rows: HashSet<i32> = admin
            .query(
                &format!("SELECT seq FROM {schema}.ledger WHERE client = $1"),
                &[&i],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        for seq in &committed {
            assert!(rows.contains(seq), "client {i}: committed {seq} is missing");
        }
        total += committed.len();
    }
    println!("replicas: {total} committed transactions, all present after the drain");
    assert!(total > 100);
}

#[tokio::test]
async fn without_the_registry_a_replica_keeps_its_share_and_never_grows() {
    const BUDGET: u32 = 6;
    // A lease longer than the outage below (up to ~15 s on a loaded machine): past its
    // lease a replica is counted dead, and the cluster may hold more than the budget
    // until it re-registers (README, "When Postgres is unreachable"). What is tested
    // here is the outage within the lease.
    let fixture = dataplane_tests::fixtures::shared_migrated_database().await;
    let app = app(&fixture, 6).await;
    let lease = "replica_lease_ms = 60000";
    let r0 = Replica::start_with(&fixture, BUDGET, lease).await;
    let r1 = Replica::start_with(&fixture, BUDGET, lease).await;
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = sample_backends(&fixture, vec![app.role.clone()], stop.clone());
    let stop0 = Arc::new(AtomicBool::new(false));
    let l0 = load(r0.config(&fixture, &app), 8, "0.02", stop0.clone());
    let settled = within(Duration::from_secs(20), async || {
        r0.cap().await == 5 && r1.cap().await == 1
    })
    .await;
    assert!(settled.is_some(), "the busy replica has all but one slot");

    // The registry stops answering (as when Postgres refuses dp_pooler).
    let admin = fixture.admin().await;
    let heartbeat = "dataplane_auth.replica_heartbeat(text, text, integer, integer, integer, \
                     integer, integer, integer)";
    admin
        .batch_execute(&format!(
            "REVOKE EXECUTE ON FUNCTION {heartbeat} FROM dp_pooler"
        ))
        .await
        .unwrap();
    let failing = within(Duration::from_secs(10), async || {
        let mut all = true;
        for r in [&r0, &r1] {
            all &= r.replicas().await["heartbeats"]["failed"].as_u64() > Some(0);
        }
        all
    })
    .await;
    assert!(failing.is_some(), "both heartbeats fail");
    // Demand moves to r1, which may not grow: it serves with the one slot it has.
    stop0.store(true, Ordering::Relaxed);
    finished(l0).await;
    let stop1 = Arc::new(AtomicBool::new(false));
    let l1 = load(r1.config(&fixture, &app), 8, "0.02", stop1.clone());
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert_eq!(
            (r0.cap().await, r1.cap().await),
            (5, 1),
            "a share changed without the registry"
        );
    }

    // Back: the shares follow the demand again.
    admin
        .batch_execute(&format!(
            "GRANT EXECUTE ON FUNCTION {heartbeat} TO dp_pooler"
        ))
        .await
        .unwrap();
    let moved = within(Duration::from_secs(20), async || r1.cap().await == 5).await;
    assert!(moved.is_some(), "the share never followed the demand again");
    stop1.store(true, Ordering::Relaxed);
    assert!(finished(l1).await > 0, "r1 served its clients throughout");
    stop.store(true, Ordering::Relaxed);
    let (peak, _) = sampler.await.unwrap();
    assert!(peak <= i64::from(BUDGET), "{peak} backends over the budget");
}

/// A CancelRequest with a key, sent as the first packet of a connection to `to`.
async fn send_cancel(to: SocketAddr, pid: i32, secret: i32) {
    let mut tcp = tokio::net::TcpStream::connect(to).await.unwrap();
    let mut packet = 16i32.to_be_bytes().to_vec();
    packet.extend_from_slice(&80_877_102i32.to_be_bytes());
    packet.extend_from_slice(&pid.to_be_bytes());
    packet.extend_from_slice(&secret.to_be_bytes());
    tcp.write_all(&packet).await.unwrap();
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        let mut sink = [0u8; 1];
        let _ = tokio::io::AsyncReadExt::read(&mut tcp, &mut sink).await;
    })
    .await;
}

#[tokio::test]
async fn a_query_through_one_replica_is_cancelled_through_another() {
    let (fixture, app, r0, r1) = two_replicas(8, 4).await;
    let client = dataplane_tests::connect(&r0.config(&fixture, &app))
        .await
        .unwrap();
    let token = client.cancel_token();
    let running = tokio::spawn(async move {
        let started = Instant::now();
        let r = client.batch_execute("SELECT pg_sleep(30)").await;
        (r, started)
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The Service sent the cancel's connection to the other replica.
    let tcp = tokio::net::TcpStream::connect(r1.addr).await.unwrap();
    let sent = Instant::now();
    token
        .cancel_query_raw(tcp, tokio_postgres::NoTls)
        .await
        .unwrap();
    let (result, _) = tokio::time::timeout(Duration::from_secs(20), running)
        .await
        .expect("the query was never cancelled")
        .unwrap();
    let err = result.expect_err("the query was cancelled");
    println!(
        "replicas: cancelled through the other replica after {:?}",
        sent.elapsed()
    );
    assert_eq!(crate::common::sqlstate(&err), "57014", "{err}");
    // Counted once the owner has closed the forwarded connection.
    let counted = within(Duration::from_secs(10), async || {
        r1.replicas().await["cancel_forwards"]["forwarded"].as_u64() == Some(1)
    })
    .await;
    assert!(counted.is_some(), "{}", r1.replicas().await);
}

#[tokio::test]
async fn bogus_cancel_keys_do_nothing_on_any_replica() {
    let (fixture, app, r0, r1) = two_replicas(8, 4).await;
    let mut ids = Vec::new();
    for r in [&r0, &r1] {
        ids.push(r.replicas().await["id"].as_i64().unwrap() as i32);
    }
    let client = dataplane_tests::connect(&r0.config(&fixture, &app))
        .await
        .unwrap();
    let running = tokio::spawn(async move { client.batch_execute("SELECT pg_sleep(2)").await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Keys naming each live replica, an unknown replica, no replica, and keys with the
    // hop bit set, with secrets nobody was given, to both replicas.
    for to in [r0.addr, r1.addr] {
        for owner in ids.iter().copied().chain([0, 200]) {
            for hop in [0, 1 << 30] {
                for random in [1, 12345, 0x3f_ffff] {
                    send_cancel(to, (owner << 22) | hop | random, 0x5eed).await;
                }
            }
        }
    }
    running
        .await
        .unwrap()
        .expect("the running query was not disturbed");
    for r in [&r0, &r1] {
        let v = r.replicas().await;
        let f = &v["cancel_forwards"];
        assert_eq!(f["failed"].as_u64(), Some(0), "{v}");
        assert!(f["unknown_replica"].as_u64().unwrap() > 0, "{v}");
        assert_eq!(http_get(r.admin, "/readyz").await.0, 200);
    }
}

#[tokio::test]
async fn cancel_forwards_are_rate_limited_per_client_address() {
    let (fixture, app, r0, r1) = two_replicas(8, 4).await;
    let owner = r0.replicas().await["id"].as_i64().unwrap() as i32;
    // A flood from one address of keys naming r0, sent to r1: forwarded up to the
    // per-address limit (600 a minute), then dropped without leaving r1.
    use futures_util::StreamExt;
    futures_util::stream::iter(0..650)
        .map(|i| send_cancel(r1.addr, (owner << 22) | (i + 1), 7))
        .buffer_unordered(16)
        .collect::<Vec<()>>()
        .await;
    let f = r1.replicas().await["cancel_forwards"].clone();
    assert_eq!(f["forwarded"].as_u64(), Some(600), "{f}");
    assert_eq!(f["throttled"].as_u64(), Some(50), "{f}");
    // Another client's cancel, from another address, still goes through.
    let client = dataplane_tests::connect(&r0.config(&fixture, &app))
        .await
        .unwrap();
    let token = client.cancel_token();
    let running = tokio::spawn(async move { client.batch_execute("SELECT pg_sleep(30)").await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
    let tcp = socket.connect(r1.addr).await.unwrap();
    token
        .cancel_query_raw(tcp, tokio_postgres::NoTls)
        .await
        .unwrap();
    let err = tokio::time::timeout(Duration::from_secs(20), running)
        .await
        .expect("the victim's cancel was not forwarded")
        .unwrap()
        .expect_err("cancelled");
    assert_eq!(crate::common::sqlstate(&err), "57014", "{err}");
}
