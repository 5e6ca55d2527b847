//! Issue 11's attacks against the real binary with its default configuration (but for
//! a small budget: 4 server connections, as a new user would try it), each checked
//! from the victim's side: another app's queries keep being answered (the deadline is
//! a hang guard, not a timing assert), the pooler's resident memory stays bounded, no
//! server is held past its deadline, and the pooler stays up.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::binary::Binary;
use crate::common::{App, Env, env, sqlstate};
use crate::raw::{Raw, msg, query, startup, sync, tags};

/// The default configuration but for the budget.
const SMALL_BUDGET: &str = "max_server_connections = 4";
/// Long enough for any honest wait here (a 10 s stall deadline, a 30 s checkout wait);
/// only a hang gets past it.
const HANG_GUARD: Duration = Duration::from_secs(90);
const MIB: usize = 1 << 20;

/// Another app's query through the pooler is answered.
async fn victim_answers(bin: &Binary, e: &Env, victim: &App) {
    let run = async {
        let client =
            dataplane_tests::connect(&bin.config(e, &victim.role, &victim.password)).await?;
        let row = client.query_one("SELECT 41 + 1", &[]).await?;
        Ok::<i32, tokio_postgres::Error>(row.get(0))
    };
    let answer = tokio::time::timeout(HANG_GUARD, run)
        .await
        .expect("the victim's query hung")
        .expect("the victim's query failed");
    assert_eq!(answer, 42);
}

/// The largest resident memory of the pooler while `work` runs, sampled every 10 ms.
async fn peak_rss_during<T>(bin: &Binary, work: impl std::future::Future<Output = T>) -> (u64, T) {
    let pid = bin.pid();
    let peak = Arc::new(AtomicU64::new(bin.rss_bytes()));
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (peak, done) = (peak.clone(), done.clone());
        tokio::spawn(async move {
            while !done.load(Ordering::Relaxed) {
                if let Some(rss) = rss_of(pid) {
                    peak.fetch_max(rss, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };
    let out = work.await;
    done.store(true, Ordering::Relaxed);
    sampler.await.unwrap();
    (peak.load(Ordering::Relaxed), out)
}

fn rss_of(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(kb * 1024)
}

/// A binary with a warm pool (so its buffers are counted in the baseline), the
/// attacker and the victim.
async fn setup(extra: &str) -> (Env, Binary, App, App) {
    let e = env(|_| {}).await;
    let attacker = e.app_with_pool(4).await;
    let victim = e.app_with_pool(2).await;
    let bin = Binary::start(&e, &format!("{SMALL_BUDGET}\n{extra}"), &[]).await;
    victim_answers(&bin, &e, &victim).await;
    let warm = dataplane_tests::connect(&bin.config(&e, &attacker.role, &attacker.password))
        .await
        .unwrap();
    warm.batch_execute("SELECT 1").await.unwrap();
    (e, bin, attacker, victim)
}

/// Item 1, before login: a `Q` announcing 1 GiB in the middle of SCRAM is refused at
/// its header; the 64 MiB that follow are never buffered.
#[tokio::test]
async fn a_query_frame_during_sasl_is_refused_at_its_header() {
    let (e, mut bin, attacker, victim) = setup("").await;
    let before = bin.rss_bytes();
    let (peak, reply) = peak_rss_during(&bin, async {
        let mut s = TcpStream::connect(bin.addr).await.unwrap();
        s.write_all(&startup(&attacker.role, &e.fixture.db))
            .await
            .unwrap();
        let mut sasl = [0u8; 64];
        let n = s.read(&mut sasl).await.unwrap();
        assert_eq!(sasl[0], b'R', "{:?}", &sasl[..n]);
        let mut flood = vec![b'Q'];
        flood.extend_from_slice(&0x3fff_fff0u32.to_be_bytes());
        let _ = s.write_all(&flood).await;
        let chunk = vec![b'x'; MIB];
        for _ in 0..64 {
            if s.write_all(&chunk).await.is_err() {
                break;
            }
        }
        let mut reply = Vec::new();
        let _ = tokio::time::timeout(HANG_GUARD, s.read_to_end(&mut reply)).await;
        reply
    })
    .await;
    let error = reply.windows(6).any(|w| w == b"C08P01");
    assert!(error, "no 08P01: {:?}", String::from_utf8_lossy(&reply));
    assert!(
        peak < before + 16 * MIB as u64,
        "the pooler grew from {before} to {peak} bytes"
    );
    victim_answers(&bin, &e, &victim).await;
    bin.assert_up().await;
}

/// Item 1: a 64 MiB simple query, a 64 MiB bind parameter and a 64 MiB error all
/// reach their peer whole, and the pooler holds none of them.
#[tokio::test]
async fn huge_queries_parameters_and_errors_stream_through_with_flat_memory() {
    let (e, mut bin, attacker, victim) = setup("").await;
    let before = bin.rss_bytes();
    let size = 64 * MIB;
    let (peak, ()) = peak_rss_during(&bin, async {
        let mut raw = Raw::connect_to(bin.addr, &e.fixture.db, &attacker).await;
        let mut sql = b"SELECT length('".to_vec();
        sql.resize(sql.len() + size, b'x');
        sql.extend_from_slice(b"')");
        raw.send(&msg(b'Q', &[&sql, b"\0"])).await;
        drop(sql);
        let replies = raw.until_ready(1).await;
        let row = replies.iter().find(|(t, _)| *t == b'D').expect("a row");
        assert!(
            row.1.ends_with(size.to_string().as_bytes()),
            "{}",
            tags(&replies)
        );

        let client = dataplane_tests::connect(&bin.config(&e, &attacker.role, &attacker.password))
            .await
            .unwrap();
        let blob = vec![7u8; size];
        let row = client
            .query_one("SELECT length($1::bytea)", &[&blob])
            .await
            .unwrap();
        assert_eq!(row.get::<_, i32>(0) as usize, size);
        drop(blob);

        let raised = client
            .batch_execute(&format!(
                "DO $$ BEGIN RAISE EXCEPTION '%', repeat('e', {size}); END $$"
            ))
            .await
            .unwrap_err();
        assert_eq!(sqlstate(&raised), "P0001");
        let message = raised.as_db_error().unwrap().message().len();
        assert_eq!(message, size);
    })
    .await;
    assert!(
        peak < before + 24 * MIB as u64,
        "the pooler grew from {before} to {peak} bytes"
    );
    victim_answers(&bin, &e, &victim).await;
    bin.assert_up().await;
}

/// Item 1: 4,000 names for one 64 KiB text hold it once; distinct texts past
/// `max_client_prepared_bytes` (8 MiB) get 53400 and the session goes on.
#[tokio::test]
async fn named_statements_share_their_text_and_their_bytes_are_bounded() {
    let (e, mut bin, attacker, victim) = setup("").await;
    let before = bin.rss_bytes();
    let text = format!("SELECT 1 -- {}", "t".repeat(64 * 1024));
    let (peak, ()) = peak_rss_during(&bin, async {
        let mut raw = Raw::connect_to(bin.addr, &e.fixture.db, &attacker).await;
        for batch in 0..40 {
            let mut bytes = Vec::new();
            for i in 0..100 {
                bytes.extend(crate::raw::parse(&format!("s{batch}_{i}"), &text));
            }
            bytes.extend(sync());
            raw.send(&bytes).await;
            let replies = raw.until_ready(1).await;
            assert!(
                !replies.iter().any(|(t, _)| *t == b'E'),
                "{}",
                tags(&replies)
            );
        }
    })
    .await;
    assert!(
        peak < before + 32 * MIB as u64,
        "4,000 names of a 64 KiB text: the pooler grew from {before} to {peak} bytes"
    );

    let mut raw = Raw::connect_to(bin.addr, &e.fixture.db, &attacker).await;
    // A named statement whose text is over max_message_bytes (1 MiB): the pooler
    // would have to keep it whole, so it is refused for its batch, and its 3 MiB
    // stream past without being held.
    let huge = format!("SELECT 1 -- {}", "h".repeat(3 * MIB));
    let mut bytes = crate::raw::parse("huge", &huge);
    bytes.extend(sync());
    raw.send(&bytes).await;
    let replies = raw.until_ready(1).await;
    let error = crate::raw::errors(&replies).join(" ");
    assert!(
        error.starts_with("54000") && error.contains("max_message_bytes"),
        "{error}"
    );
    let mut refused = None;
    for i in 0..12 {
        let text = format!("SELECT {i} -- {}", "u".repeat(MIB - 4096));
        let mut bytes = crate::raw::parse(&format!("big{i}"), &text);
        bytes.extend(sync());
        raw.send(&bytes).await;
        let replies = raw.until_ready(1).await;
        if let Some((_, body)) = replies.iter().find(|(t, _)| *t == b'E') {
            refused = Some((i, String::from_utf8_lossy(body).into_owned()));
            break;
        }
    }
    let (at, error) = refused.expect("no statement was refused");
    assert!(at >= 6, "refused too early, at {at}: {error}");
    assert!(
        error.contains("C53400") && error.contains("max_client_prepared_bytes"),
        "{error}"
    );
    raw.send(&query("SELECT 1")).await;
    let replies = raw.until_ready(1).await;
    assert_eq!(tags(&replies), "TDCZ", "the session goes on");
    assert!(
        bin.metric("dataplane_pooler_limit_refusals_total{kind=\"prepared_bytes\"}")
            .await
            >= 1.0
    );
    victim_answers(&bin, &e, &victim).await;
    bin.assert_up().await;
}

/// A client linked to a server that stops making progress.
async fn stall(raw: &mut Raw, how: &str) {
    match how {
        // A result larger than every socket buffer, never read.
        "not reading" => {
            raw.send(&query(
                "SELECT repeat('r', 1048576) FROM generate_series(1, 512)",
            ))
            .await
        }
        // Half of a message, inside a transaction.
        "half a message" => {
            raw.send(&query("BEGIN")).await;
            raw.until_ready(1).await;
            let whole = query("SELECT 'the rest never comes'");
            raw.send(&whole[..whole.len() / 2]).await;
        }
        // A COPY FROM STDIN that never ends.
        "copy" => {
            raw.send(&query("COPY stalled FROM STDIN")).await;
            let (tag, _) = raw.next().await.unwrap();
            assert_eq!(tag, b'G');
            raw.send(&msg(b'd', &[b"one row\n"])).await;
        }
        other => panic!("{other}"),
    }
}

/// Item 2: four clients of one app hold the whole budget and make no progress: they
/// lose their servers after `client_stall_timeout` (10 s), are told so with 08006 when
/// they can still hear it, and the other app is served meanwhile.
#[tokio::test]
async fn clients_that_stall_lose_their_servers_and_the_other_app_is_served() {
    let (e, mut bin, attacker, victim) = setup("").await;
    let setup_client =
        dataplane_tests::connect(&bin.config(&e, &attacker.role, &attacker.password))
            .await
            .unwrap();
    setup_client
        .batch_execute("CREATE TABLE stalled (line text)")
        .await
        .unwrap();
    drop(setup_client);
    let before = bin.rss_bytes();
    let mut stallers = Vec::new();
    for how in ["not reading", "not reading", "half a message", "copy"] {
        let mut raw = Raw::connect_to(bin.addr, &e.fixture.db, &attacker).await;
        stall(&mut raw, how).await;
        stallers.push((how, raw));
    }
    let (peak, ()) = peak_rss_during(&bin, victim_answers(&bin, &e, &victim)).await;
    assert!(
        peak < before + 64 * MIB as u64,
        "the pooler grew from {before} to {peak} bytes"
    );
    // No slot is held past the deadline: the attacker's busy servers are gone (an
    // idle one from the warm-up may stay in the pool).
    let admin = e.fixture.admin().await;
    let gone = async {
        loop {
            let busy: i64 = admin
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity WHERE usename = $1 AND state <> 'idle'",
                    &[&attacker.role],
                )
                .await
                .unwrap()
                .get(0);
            if busy == 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    tokio::time::timeout(HANG_GUARD, gone)
        .await
        .expect("the stalled clients kept their servers");
    for (how, mut raw) in stallers {
        if how == "not reading" {
            continue;
        }
        let heard = raw.until_closed().await;
        let error = crate::raw::errors(&heard).join(" ");
        assert!(error.starts_with("08006"), "{how}: {error}");
    }
    assert!(
        bin.metric("dataplane_pooler_limit_refusals_total{kind=\"client_stall\"}")
            .await
            >= 4.0
    );
    bin.assert_up().await;
}

/// Item 2, optional: `idle_transaction_timeout_ms` (off by default, so this test turns
/// it on) closes a transaction left idle even when the app turned Postgres's own
/// timeout off for it.
#[tokio::test]
async fn idle_transactions_end_at_the_optional_timeout() {
    let (e, mut bin, attacker, victim) = setup("idle_transaction_timeout_ms = 2000").await;
    let mut idlers = Vec::new();
    for _ in 0..4 {
        let client = dataplane_tests::connect(&bin.config(&e, &attacker.role, &attacker.password))
            .await
            .unwrap();
        client
            .batch_execute("BEGIN; SET LOCAL idle_in_transaction_session_timeout = 0")
            .await
            .unwrap();
        idlers.push(client);
    }
    victim_answers(&bin, &e, &victim).await;
    let sample = "dataplane_pooler_limit_refusals_total{kind=\"idle_transaction\"}";
    let ended = async {
        while bin.metric(sample).await < 4.0 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    tokio::time::timeout(HANG_GUARD, ended)
        .await
        .expect("the idle transactions kept their servers");
    for client in idlers {
        let err = client.batch_execute("SELECT 1").await.unwrap_err();
        assert!(
            sqlstate(&err) == "25P03" || err.is_closed(),
            "an idle transaction got {err}"
        );
    }
    victim_answers(&bin, &e, &victim).await;
    bin.assert_up().await;
}

/// Item 2: answers before login are written under the login deadline. A client that
/// floods GSSENCRequest and never reads the `N`s is cut off at `client_login_timeout`
/// (15 s): the pooler does not sit forever on a write nobody reads.
#[tokio::test]
async fn answers_before_login_are_under_the_login_deadline() {
    let (e, mut bin, _attacker, victim) = setup("").await;
    let mut s = TcpStream::connect(bin.addr).await.unwrap();
    let request = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x30];
    let flood: Vec<u8> = request.iter().copied().cycle().take(MIB).collect();
    let cut_off = tokio::time::timeout(HANG_GUARD, async {
        loop {
            if s.write_all(&flood).await.is_err() {
                return;
            }
        }
    })
    .await;
    assert!(cut_off.is_ok(), "the pooler kept a client that never reads");
    victim_answers(&bin, &e, &victim).await;
    bin.assert_up().await;
}

/// Item 2: TCP keepalive on the pooler's client sockets and server sockets (a peer
/// that vanished without a FIN is noticed in about a minute, not two hours).
#[tokio::test]
async fn client_and_server_sockets_have_keepalive() {
    let (e, mut bin, attacker, _victim) = setup("").await;
    let client = dataplane_tests::connect(&bin.config(&e, &attacker.role, &attacker.password))
        .await
        .unwrap();
    client.batch_execute("SELECT 1").await.unwrap();
    let ss = |filter: String| {
        let out = std::process::Command::new("ss")
            .args(["-tnopH", "state", "established", &filter])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let pid = format!("pid={},", bin.pid());
    let ours = |lines: String| -> Vec<String> {
        lines
            .lines()
            .filter(|l| l.contains(&pid))
            .map(str::to_owned)
            .collect()
    };
    // A socket with bytes not yet acknowledged shows its retransmission timer instead:
    // look again until every one is quiet.
    let mut seen = (Vec::new(), Vec::new());
    for _ in 0..100 {
        seen = (
            ours(ss(format!("( sport = :{} )", bin.addr.port()))),
            ours(ss(format!("( dport = :{} )", e.fixture.cluster.port()))),
        );
        let quiet = seen
            .0
            .iter()
            .chain(&seen.1)
            .all(|l| !l.contains("timer:(on"));
        if quiet {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (clients, servers) = seen;
    assert!(
        !clients.is_empty() && !servers.is_empty(),
        "{clients:?} {servers:?}"
    );
    for line in clients.iter().chain(&servers) {
        assert!(line.contains("timer:(keepalive"), "{line}");
    }
    bin.assert_up().await;
}

// Items 3 to 6 (classification, throttling, lookups, the NOTIFY channel), and the
// admin HTTP listener, with the same helpers.
mod floods;
mod http;
