//! Floods against the login path and the pooler's own NOTIFY channel, each checked from
//! the victim's side: a real app keeps logging in and getting answers, revocations keep
//! arriving at once, and the flood costs the pooler bounded work (issue 11).

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::common::{env, message, sqlstate};

/// A hang guard, never a measure: what takes longer than this is stuck.
const GUARD: Duration = Duration::from_secs(60);

/// Logs in to the pooler from `source` (any 127.0.0.0/8 address is this machine).
pub async fn connect_from(
    source: IpAddr,
    pooler: SocketAddr,
    config: &tokio_postgres::Config,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(source, 0)).unwrap();
    let stream = socket.connect(pooler).await.unwrap();
    let (client, connection) = config.connect_raw(stream, tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

pub(crate) async fn disconnected_within(client: &tokio_postgres::Client, guard: Duration) -> bool {
    let until = Instant::now() + guard;
    while Instant::now() < until {
        if client.is_closed() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    client.is_closed()
}

#[tokio::test]
async fn names_over_63_bytes_fail_like_unknown_roles_and_unknown_names_are_looked_up_once() {
    let e = env(|_| {}).await;
    let counters = &e.pooler.shared.cache.counters;
    let long = format!("tk_t1_p{}_dev", "x".repeat(60));
    let before = counters.lookups.load(Ordering::Relaxed);
    let err = e.try_connect(&long, "whatever").await.err().unwrap();
    assert_eq!(sqlstate(&err), "28P01");
    assert_eq!(
        message(&err),
        format!("password authentication failed for user \"{long}\"")
    );
    assert_eq!(
        counters.lookups.load(Ordering::Relaxed),
        before,
        "no lookup"
    );
    assert_eq!(counters.names_too_long.load(Ordering::Relaxed), 1);
    // An unknown name of a legal length is looked up once, then answered from memory.
    let unknown = format!("tk_t{}_pnobody_dev", dataplane_tests::unique_tenant_id());
    for _ in 0..3 {
        let err = e.try_connect(&unknown, "whatever").await.err().unwrap();
        assert_eq!(sqlstate(&err), "28P01");
    }
    assert_eq!(counters.lookups.load(Ordering::Relaxed), before + 1);
    // A name found disabled is kept as missing too, but a change to its row (the
    // credentials trigger's NOTIFY) ends that at once: a resumed app logs in without
    // waiting for auth_negative_cache_ttl_ms.
    let app = e.app(Default::default()).await;
    let name = e.name(&app);
    e.provisioner
        .set_disabled(&name, true, &Default::default())
        .await
        .unwrap();
    let err = e.try_connect(&app.role, &app.password).await.err().unwrap();
    assert_eq!(sqlstate(&err), "28P01");
    e.provisioner
        .set_disabled(&name, false, &Default::default())
        .await
        .unwrap();
    let mut resumed = false;
    for _ in 0..50 {
        if e.try_connect(&app.role, &app.password).await.is_ok() {
            resumed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        resumed,
        "the resumed app waited for its negative entry to expire"
    );
}

#[tokio::test]
async fn a_flood_of_unknown_names_cannot_starve_a_known_role() {
    // A TTL of 1 ms: every login of the known app reads its row again, so it needs the
    // lookup connections the flood is after.
    let e = env(|c| c.auth_cache_ttl_ms = 1).await;
    let app = e.app(Default::default()).await;
    e.connect(&app)
        .await
        .simple_query("SELECT 1")
        .await
        .unwrap();
    let pooler = e.pooler.addr;
    let flood: Vec<_> = (0..400u32)
        .map(|i| {
            // 100 sources, 4 attempts each: under the per-address throttle, so every
            // attempt costs a lookup (or a refusal from the lookup queue).
            let source = IpAddr::from([127, 0, 0, 2 + (i % 100) as u8]);
            let config = e.config(&format!("tk_t{i}_pflood{i}_dev"), "guess");
            tokio::spawn(async move { connect_from(source, pooler, &config).await.err() })
        })
        .collect();
    let victim = async {
        for _ in 0..20 {
            let c = e.connect(&app).await;
            let rows = c.simple_query("SELECT 1").await.unwrap();
            assert!(
                rows.iter()
                    .any(|m| matches!(m, tokio_postgres::SimpleQueryMessage::Row(_)))
            );
        }
    };
    tokio::time::timeout(GUARD, victim)
        .await
        .expect("the known app was held up by the flood");
    let mut codes = std::collections::BTreeMap::<String, usize>::new();
    for attempt in flood {
        let err = tokio::time::timeout(GUARD, attempt)
            .await
            .expect("a flood attempt hung")
            .unwrap()
            .expect("a made-up name logged in");
        *codes.entry(sqlstate(&err)).or_default() += 1;
    }
    eprintln!("flood outcomes: {codes:?}");
    assert!(
        codes.keys().all(|c| c == "28P01" || c == "53300"),
        "{codes:?}"
    );
    let (found, missing, flights) = e.pooler.shared.cache.len();
    assert!(
        missing <= 10_000 && flights == 0,
        "{found} {missing} {flights}"
    );
}

#[tokio::test]
async fn revocation_is_prompt_under_a_flood_of_bogus_notifications() {
    let e = env(|_| {}).await;
    let victim = e.app(Default::default()).await;
    let attacker = e.app(Default::default()).await;
    let idle = e.connect(&victim).await;
    idle.simple_query("SELECT 1").await.unwrap();
    let counters = &e.pooler.shared.cache.counters;
    let lookups = counters.lookups.load(Ordering::Relaxed);
    // Any app may notify the pooler's channel: 100,000 made-up names in one
    // transaction, then the victim's and its own name 500 times each, a transaction
    // each (Postgres folds duplicates within one).
    let flood = e.connect(&attacker).await;
    flood
        .simple_query(
            "SELECT count(pg_notify('dataplane_auth', 'tk_t' || g || '_pbogus_dev')) \
               FROM generate_series(1, 100000) g",
        )
        .await
        .unwrap();
    flood
        .simple_query(&format!(
            "DO $$ BEGIN FOR i IN 1..500 LOOP \
               PERFORM pg_notify('dataplane_auth', '{}'); \
               PERFORM pg_notify('dataplane_auth', '{}'); COMMIT; END LOOP; END $$",
            victim.role, attacker.role
        ))
        .await
        .unwrap();
    let start = Instant::now();
    e.provisioner
        .set_disabled(&e.name(&victim), true, &Default::default())
        .await
        .unwrap();
    let committed = start.elapsed();
    assert!(
        disconnected_within(&idle, GUARD).await,
        "the suspended app's client is still connected"
    );
    // Printed, not asserted (a test never asserts wall-clock time): the suspension's
    // own transaction, then the pooler's part.
    eprintln!(
        "suspension committed in {} ms; client disconnected {} ms later, behind 101,000 notifications",
        committed.as_millis(),
        (start.elapsed() - committed).as_millis()
    );
    // The flood cost a map probe per made-up name, and a few re-reads of real ones.
    let ignored = counters.notify_ignored.load(Ordering::Relaxed);
    let coalesced = counters.notify_coalesced.load(Ordering::Relaxed);
    let reads = counters.lookups.load(Ordering::Relaxed) - lookups;
    eprintln!("ignored {ignored}, coalesced {coalesced}, lookups {reads}");
    assert!(ignored >= 100_000, "{ignored}");
    assert!(reads <= 1_010, "{reads} lookups for 101,000 notifications");
    // The attacker's own app is untouched, and answers.
    flood.simple_query("SELECT 1").await.unwrap();
}

#[tokio::test]
async fn a_megabyte_of_adversarial_sql_is_answered_and_holds_up_nobody() {
    let e = env(|_| {}).await;
    let heavy = e.app(Default::default()).await;
    let other = e.app(Default::default()).await;
    let client = e.connect(&heavy).await;
    let mut sql = String::from("SELECT ");
    while sql.len() < 1 << 20 {
        sql.push_str("set_config(");
    }
    let adversarial = async {
        // Postgres refuses it (nested too deep, or a syntax error): an error is the
        // answer; what matters is that it comes.
        let answer = client.simple_query(&sql).await;
        assert!(answer.is_err());
        client.simple_query("SELECT 1").await.unwrap();
    };
    let bystander = async {
        for _ in 0..10 {
            let c = e.connect(&other).await;
            c.simple_query("SELECT 1").await.unwrap();
        }
    };
    tokio::time::timeout(GUARD, async { tokio::join!(adversarial, bystander) })
        .await
        .expect("a megabyte of set_config( held the pooler up");
}
