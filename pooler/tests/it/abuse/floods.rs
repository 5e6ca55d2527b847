//! Issue 11, items 3 to 6 against the real binary with its default configuration (a
//! budget of 4): quadratic input, lock-out by strangers, a lookup flood, a NOTIFY
//! flood. Each is checked from the victim's side.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{HANG_GUARD, MIB, setup, victim_answers};
use crate::common::sqlstate;
use crate::flood::connect_from;
use crate::raw::startup;

/// Item 3: a megabyte of `set_config(` (the text that took 35 s and held every other
/// app up for 30) is answered, while the victim keeps logging in and querying. On one
/// worker thread (tokio's current-thread scheduler), where nothing else could take
/// over while the attacker's text is read.
#[tokio::test]
async fn a_megabyte_of_set_config_is_answered_and_the_victim_is_served_meanwhile() {
    let (e, mut bin, attacker, victim) = setup("worker_threads = 1").await;
    let client = dataplane_tests::connect(&bin.config(&e, &attacker.role, &attacker.password))
        .await
        .unwrap();
    let mut sql = String::from("SELECT ");
    while sql.len() < MIB {
        sql.push_str("set_config(");
    }
    let adversarial = async {
        // Postgres refuses it (a syntax error, or nested too deep): that error is the
        // answer; what matters is that it comes, and the session goes on.
        for _ in 0..3 {
            assert!(client.simple_query(&sql).await.is_err());
        }
        client.simple_query("SELECT 1").await.unwrap();
    };
    let bystander = async {
        for _ in 0..10 {
            victim_answers(&bin, &e, &victim).await;
        }
    };
    tokio::time::timeout(HANG_GUARD, async { tokio::join!(adversarial, bystander) })
        .await
        .expect("a megabyte of set_config( held the pooler up");
    bin.assert_up().await;
}

/// Item 4: 40 wrong passwords for the victim's role from 127.0.0.2 refuse that
/// address (28000 after `auth_failures_per_role_per_address_per_minute`, 20), never
/// the app: its right password from 127.0.0.1 logs in.
#[tokio::test]
async fn strangers_guessing_an_apps_password_cannot_lock_it_out() {
    let (e, mut bin, _attacker, victim) = setup("").await;
    let stranger = IpAddr::from([127, 0, 0, 2]);
    let guess = bin.config(&e, &victim.role, "not-the-password");
    let mut codes = std::collections::BTreeMap::<String, usize>::new();
    for _ in 0..40 {
        let Err(err) = tokio::time::timeout(HANG_GUARD, connect_from(stranger, bin.addr, &guess))
            .await
            .expect("a guess hung")
        else {
            panic!("a wrong password logged in");
        };
        *codes.entry(sqlstate(&err)).or_default() += 1;
    }
    eprintln!("40 guesses from {stranger}: {codes:?}");
    assert_eq!(codes.get("28P01"), Some(&20), "{codes:?}");
    assert_eq!(codes.get("28000"), Some(&20), "{codes:?}");
    // The stranger's address is refused even with the right password …
    let right = bin.config(&e, &victim.role, &victim.password);
    let err = connect_from(stranger, bin.addr, &right)
        .await
        .err()
        .unwrap();
    assert_eq!(sqlstate(&err), "28000");
    // … and the app, from its own address, is not.
    let own = IpAddr::from([127, 0, 0, 1]);
    let client = connect_from(own, bin.addr, &right).await.unwrap();
    client.simple_query("SELECT 1").await.unwrap();
    assert!(
        bin.metric("dataplane_pooler_auth_total{result=\"throttled\"}")
            .await
            >= 21.0
    );
    bin.assert_up().await;
}

/// One made-up login from `source`: the startup packet, then the pooler's first
/// answer (AuthenticationSASL once the name has been looked up, or an error), then
/// hang up. No SCRAM proof is computed: the flood costs the attacker nothing.
async fn made_up_login(source: IpAddr, pooler: SocketAddr, role: String, db: String) -> u8 {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(source, 0)).unwrap();
    let mut s = socket.connect(pooler).await.unwrap();
    s.write_all(&startup(&role, &db)).await.unwrap();
    let mut first = [0u8; 1];
    match s.read(&mut first).await {
        Ok(1) => first[0],
        _ => 0,
    }
}

/// Item 5: startup packets naming made-up roles, 200 at a time from 200 addresses (a
/// new set of addresses each wave, so the per-address throttle never answers for the
/// lookup queue), until the victims are done. Meanwhile the victim, cached, logs in and
/// queries ten times, and an app that has never logged in here (its name needs a lookup
/// too) logs in; if the lookup queue is full it is told 53300 "try again shortly",
/// and does.
#[tokio::test]
async fn a_flood_of_made_up_names_cannot_keep_real_apps_out() {
    let (e, mut bin, _attacker, victim) = setup("").await;
    let newcomer = e.app_with_pool(1).await;
    let (pooler, db) = (bin.addr, e.fixture.db.clone());
    let unique = dataplane_tests::unique_tenant_id();
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicUsize::new(0));
    let flood = {
        let (stop, sent) = (stop.clone(), sent.clone());
        tokio::spawn(async move {
            let mut answers = std::collections::BTreeMap::<char, usize>::new();
            let mut wave = 0u32;
            while !stop.load(Ordering::Relaxed) {
                let logins: Vec<_> = (0..200u32)
                    .map(|i| {
                        let source = IpAddr::from([
                            127,
                            1 + (wave / 250) as u8,
                            (wave % 250) as u8,
                            1 + i as u8,
                        ]);
                        let role = format!("tk_t{unique}{wave}{i}_pflood_dev");
                        tokio::spawn(made_up_login(source, pooler, role, db.clone()))
                    })
                    .collect();
                for l in logins {
                    *answers.entry(l.await.unwrap() as char).or_default() += 1;
                    sent.fetch_add(1, Ordering::Relaxed);
                }
                wave += 1;
            }
            answers
        })
    };
    // The flood is under way before the victims start.
    while sent.load(Ordering::Relaxed) < 400 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let start = Instant::now();
    let cached = async {
        for _ in 0..10 {
            victim_answers(&bin, &e, &victim).await;
        }
        (start.elapsed(), sent.load(Ordering::Relaxed))
    };
    let first_login = async {
        let mut refused = 0;
        let config = bin.config(&e, &newcomer.role, &newcomer.password);
        let client = loop {
            match dataplane_tests::connect(&config).await {
                Ok(c) => break c,
                Err(err) if sqlstate(&err) == "53300" => {
                    refused += 1;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(err) => panic!("the newcomer: {err}"),
            }
        };
        client.simple_query("SELECT 1").await.unwrap();
        (start.elapsed(), sent.load(Ordering::Relaxed), refused)
    };
    let ((cached_in, by_then), (newcomer_in, by_then2, refused)) =
        tokio::time::timeout(HANG_GUARD, async { tokio::join!(cached, first_login) })
            .await
            .expect("a real app was kept out by the flood");
    stop.store(true, Ordering::Relaxed);
    let answers = tokio::time::timeout(HANG_GUARD, flood)
        .await
        .expect("the flood hung")
        .unwrap();
    // Printed, not asserted (a test never asserts wall-clock time).
    eprintln!(
        "the victim's 10 logins and queries done in {} ms ({by_then} made-up logins sent by \
         then); the newcomer in after {} ms ({by_then2} sent; told to try again {refused} \
         times); the flood's first answers: {answers:?}",
        cached_in.as_millis(),
        newcomer_in.as_millis(),
    );
    // Every made-up name got AuthenticationSASL (a mock exchange) or an error (53300
    // from the full lookup queue).
    assert!(
        answers.keys().all(|a| *a == 'R' || *a == 'E'),
        "{answers:?}"
    );
    let queried = bin
        .metric("dataplane_pooler_auth_lookups_total{result=\"queried\"}")
        .await;
    let refusals = bin
        .metric("dataplane_pooler_auth_lookups_total{result=\"refused\"}")
        .await;
    eprintln!("lookups queried {queried}, refused {refusals}");
    bin.assert_up().await;
}

/// Item 6: 100,000 `pg_notify('dataplane_auth', <made-up name>)` in one statement (any
/// app may notify the pooler's channel), then a suspension through the provisioner:
/// the suspended app's client is disconnected once the pooler has read past the flood.
/// The latency is printed (the issue asks for about a second); the deadline is a hang
/// guard.
#[tokio::test]
async fn a_suspension_arrives_through_a_flood_of_bogus_notifications() {
    let (e, mut bin, attacker, victim) = setup("").await;
    let idle = dataplane_tests::connect(&bin.config(&e, &victim.role, &victim.password))
        .await
        .unwrap();
    idle.simple_query("SELECT 1").await.unwrap();
    let flood = dataplane_tests::connect(&bin.config(&e, &attacker.role, &attacker.password))
        .await
        .unwrap();
    flood
        .simple_query(
            "SELECT count(pg_notify('dataplane_auth', 'tk_t' || g || '_pbogus_dev')) \
               FROM generate_series(1, 100000) g",
        )
        .await
        .unwrap();
    let start = Instant::now();
    e.provisioner
        .set_disabled(&e.name(&victim), true, &Default::default())
        .await
        .unwrap();
    let committed = start.elapsed();
    assert!(
        crate::flood::disconnected_within(&idle, HANG_GUARD).await,
        "the suspended app's client is still connected"
    );
    eprintln!(
        "suspension committed in {} ms; the client was disconnected {} ms later, behind \
         100,000 bogus notifications ({:?})",
        committed.as_millis(),
        (start.elapsed() - committed).as_millis(),
        crate::binary::program(),
    );
    let ignored = bin
        .metric("dataplane_pooler_auth_notifications_total{outcome=\"ignored\"}")
        .await;
    assert!(ignored >= 100_000.0, "{ignored}");
    // The attacker's own app is untouched.
    flood.simple_query("SELECT 1").await.unwrap();
    bin.assert_up().await;
}
