//! Protocol corners where the pooler's books (renamed statements, replies owed) could
//! drift from the server's, and what a client is told when its server is lost. Raw
//! protocol messages over a TcpStream: a driver would hide the exact sequence.

use std::time::Duration;

use crate::common::{Env, env};
use crate::raw::{Raw, batch, bind, errors, execute, msg, parse, query, sqlstate, sync, tags};

/// (a) A simple-query DEALLOCATE of a statement the client's new server lacks, and
/// that could no longer be prepared there: before, the pooler re-prepared it first,
/// the Parse failed, Postgres skipped the Query, and the client waited forever.
#[tokio::test]
async fn simple_deallocate_of_a_statement_that_cannot_be_prepared_again_answers() {
    let e = env(|_| {}).await;
    let app = e.app_with_pool(2).await;
    let mut a = Raw::connect(&e, &app).await;
    a.send(&query("CREATE TABLE gone (x int)")).await;
    a.until_ready(1).await;
    a.send(&batch(&[parse("s1", "SELECT x FROM gone"), sync()]))
        .await;
    let got = a.until_ready(1).await;
    assert_eq!(tags(&got), "1Z");
    a.send(&query("DROP TABLE gone")).await;
    a.until_ready(1).await;
    // Another client holds the server that has the statement: the next one lacks it.
    let b = e.connect(&app).await;
    b.batch_execute("BEGIN").await.unwrap();
    a.send(&query("DEALLOCATE s1")).await;
    let got = a.until_ready(1).await;
    assert_eq!(errors(&got), Vec::<String>::new());
    assert!(
        got.iter()
            .any(|(t, b)| *t == b'C' && b.as_slice() == b"DEALLOCATE\0"),
        "{}",
        tags(&got)
    );
    // The name is free again.
    a.send(&batch(&[parse("s1", "SELECT 1"), sync()])).await;
    assert_eq!(tags(&a.until_ready(1).await), "1Z");
    b.batch_execute("COMMIT").await.unwrap();
}

/// (b) `DEALLOCATE name` by Parse/Bind/Execute (psycopg 3 with libpq 15): the server's
/// statement is the one deallocated, and the client's name is free again.
#[tokio::test]
async fn extended_deallocate_uses_the_server_name() {
    let e = env(|_| {}).await;
    let app = e.app_with_pool(1).await;
    let mut a = Raw::connect(&e, &app).await;
    a.send(&batch(&[parse("s1", "SELECT 1"), sync()])).await;
    assert_eq!(tags(&a.until_ready(1).await), "1Z");
    a.send(&batch(&[
        parse("", "DEALLOCATE s1"),
        bind(""),
        execute(),
        sync(),
    ]))
    .await;
    let got = a.until_ready(1).await;
    assert_eq!(errors(&got), Vec::<String>::new());
    assert_eq!(tags(&got), "12CZ");
    // One server: it holds no statement any more.
    a.send(&query("SELECT count(*) FROM pg_prepared_statements"))
        .await;
    let got = a.until_ready(1).await;
    let row = got.iter().find(|(t, _)| *t == b'D').expect("a row");
    assert!(
        row.1.ends_with(b"0"),
        "{:?}",
        String::from_utf8_lossy(&row.1)
    );
    a.send(&batch(&[
        parse("s1", "SELECT 2"),
        bind("s1"),
        execute(),
        sync(),
    ]))
    .await;
    let got = a.until_ready(1).await;
    assert_eq!(errors(&got), Vec::<String>::new());
}

/// (c) DISCARD ALL followed, in the same pipeline, by a new statement: the DISCARD
/// clears what came before it, not the statement recorded after it.
#[tokio::test]
async fn discard_all_in_a_pipeline_keeps_the_statements_after_it() {
    let e = env(|_| {}).await;
    let app = e.app_with_pool(1).await;
    let mut a = Raw::connect(&e, &app).await;
    a.send(&batch(&[parse("old", "SELECT 0"), sync()])).await;
    a.until_ready(1).await;
    a.send(&batch(&[
        parse("", "DISCARD ALL"),
        bind(""),
        execute(),
        sync(),
        parse("s1", "SELECT 1"),
        bind("s1"),
        execute(),
        sync(),
    ]))
    .await;
    let got = a.until_ready(2).await;
    assert_eq!(errors(&got), Vec::<String>::new());
    a.send(&batch(&[bind("s1"), execute(), sync()])).await;
    let got = a.until_ready(1).await;
    assert_eq!(errors(&got), Vec::<String>::new());
    assert_eq!(tags(&got), "2DCZ");
    // What came before it is gone, as on Postgres.
    a.send(&batch(&[bind("old"), execute(), sync()])).await;
    let got = a.until_ready(1).await;
    assert_eq!(errors(&got).len(), 1, "{}", tags(&got));
    assert!(errors(&got)[0].starts_with("26000"), "{:?}", errors(&got));
}

/// (d) A Query inside an extended batch whose Execute failed: Postgres skips it and
/// answers only the Sync. The pooler must not wait for the Query's ReadyForQuery (it
/// kept the server, and its pool of one, forever).
#[tokio::test]
async fn a_query_skipped_after_an_error_in_its_batch_owes_nothing() {
    let e = env(|_| {}).await;
    let app = e.app_with_pool(1).await;
    let mut a = Raw::connect(&e, &app).await;
    a.send(&batch(&[
        // Not folded at Bind: fails in Execute.
        parse("", "SELECT 1 / (random() * 0)::int"),
        bind(""),
        execute(),
        query("SELECT 1"),
        parse("s9", "SELECT 9"),
        sync(),
    ]))
    .await;
    let got = a.until_ready(1).await;
    assert_eq!(tags(&got), "12EZ");
    let other = e.connect(&app).await;
    let n: i32 = tokio::time::timeout(Duration::from_secs(5), other.query_one("SELECT 2", &[]))
        .await
        .expect("the server was never released")
        .unwrap()
        .get(0);
    assert_eq!(n, 2);
    // The skipped Parse made nothing: the name is free.
    a.send(&batch(&[parse("s9", "SELECT 9"), sync()])).await;
    assert_eq!(tags(&a.until_ready(1).await), "1Z");

    // The same batch without the error: the Query runs and has its own reply.
    a.send(&batch(&[
        parse("", "SELECT 1"),
        bind(""),
        execute(),
        query("SELECT 2"),
        sync(),
    ]))
    .await;
    let got = a.until_ready(2).await;
    assert_eq!(tags(&got), "12DCTDCZZ");
    // And a Query that fails itself inside a batch skips nothing after it.
    a.send(&batch(&[
        parse("", "SELECT 1"),
        bind(""),
        execute(),
        query("SELECT 1/0"),
        parse("s10", "SELECT 10"),
        sync(),
    ]))
    .await;
    let got = a.until_ready(2).await;
    assert_eq!(tags(&got), "12DCEZ1Z");
    a.send(&batch(&[bind("s10"), execute(), sync()])).await;
    assert_eq!(tags(&a.until_ready(1).await), "2DCZ");
}

async fn terminate_backend_running(e: &Env, role: &str, like: &str) {
    let admin = e.fixture.admin().await;
    for _ in 0..200 {
        let n: i64 = admin
            .query_one(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
                 WHERE usename = $1 AND query LIKE $2 AND pid <> pg_backend_pid()",
                &[&role, &like],
            )
            .await
            .unwrap()
            .get(0);
        if n > 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("no backend of {role} ran {like}");
}

/// (e) The server is lost while the client waits for an answer: the outcome of its
/// transaction is unknown (08007), not "rolled back".
#[tokio::test]
async fn a_server_lost_with_a_request_in_flight_says_the_outcome_is_unknown() {
    let e = env(|_| {}).await;
    let app = e.app_with_pool(2).await;
    let mut a = Raw::connect(&e, &app).await;
    a.send(&query("SELECT pg_sleep(30) -- in flight")).await;
    terminate_backend_running(&e, &app.role, "%in flight%").await;
    let got = a.until_closed().await;
    let codes: Vec<String> = got
        .iter()
        .filter(|(t, _)| *t == b'E')
        .map(|(_, b)| sqlstate(b))
        .collect();
    assert_eq!(codes.last().map(String::as_str), Some("08007"), "{codes:?}");

    // Idle in a transaction, nothing asked: it was rolled back, and that is said.
    let mut b = Raw::connect(&e, &app).await;
    b.send(&query("BEGIN; SELECT 'idle in transaction'")).await;
    b.until_ready(1).await;
    terminate_backend_running(&e, &app.role, "%idle in transaction%").await;
    let got = b.until_closed().await;
    let codes: Vec<String> = got
        .iter()
        .filter(|(t, _)| *t == b'E')
        .map(|(_, b)| sqlstate(b))
        .collect();
    assert_eq!(codes.last().map(String::as_str), Some("57P01"), "{codes:?}");
}

/// (e) The shutdown grace period ends while a client waits for an answer: 08007.
#[tokio::test]
async fn closing_with_a_request_in_flight_says_the_outcome_is_unknown() {
    let e = env(|_| {}).await;
    let app = e.app_with_pool(2).await;
    let pooler =
        dataplane_tests::stack::start_pooler(dataplane_tests::stack::pooler_config(&e.fixture))
            .await;
    let config = e.config_on_port(&app.role, &app.password, pooler.addr.port());
    let busy = dataplane_tests::connect(&config).await.unwrap();
    let idle = dataplane_tests::connect(&config).await.unwrap();
    idle.batch_execute("BEGIN").await.unwrap();
    let running = tokio::spawn(async move { busy.batch_execute("SELECT pg_sleep(30)").await });
    terminate_wait(&e, &app.role).await;
    pooler.shutdown(Duration::from_millis(300)).await;
    let err = running.await.unwrap().expect_err("the query was cut short");
    assert_eq!(crate::common::sqlstate(&err), "08007", "{err}");
    let err = idle.batch_execute("SELECT 1").await.expect_err("closed");
    assert!(
        err.is_closed() || crate::common::sqlstate(&err) == "57P01",
        "{err}"
    );
}

/// Waits until a backend of `role` runs pg_sleep.
async fn terminate_wait(e: &Env, role: &str) {
    let admin = e.fixture.admin().await;
    for _ in 0..200 {
        let n: i64 = admin
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE usename = $1 \
                 AND query LIKE '%pg_sleep(30)%' AND state = 'active'",
                &[&role],
            )
            .await
            .unwrap()
            .get(0);
        if n > 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("pg_sleep never started");
}

fn copy_data(bytes: &[u8]) -> Vec<u8> {
    msg(b'd', &[bytes])
}

fn copy_done() -> Vec<u8> {
    msg(b'c', &[])
}

fn close_statement(name: &str) -> Vec<u8> {
    msg(b'C', &[b"S", name.as_bytes(), b"\0"])
}

/// (f) An extended-protocol COPY (Bind, Execute, Sync, CopyData, CopyDone, Sync, as
/// libpq and tokio-postgres send it) inside a transaction: Postgres ignores the Sync
/// sent during the copy. The pooler's reply queue kept an entry for it, so the next
/// reply it had to drop in the same transaction reached the client instead.
#[tokio::test]
async fn an_extended_copy_in_a_transaction_leaves_the_replies_in_step() {
    let e = env(|_| {}).await;
    let app = e.app_with_pool(1).await;
    let mut a = Raw::connect(&e, &app).await;
    a.send(&query("CREATE TABLE copied (x int)")).await;
    a.until_ready(1).await;
    a.send(&query("BEGIN")).await;
    a.until_ready(1).await;
    a.send(&batch(&[parse("a", "SELECT 1"), sync()])).await;
    assert_eq!(tags(&a.until_ready(1).await), "1Z");
    a.send(&batch(&[
        parse("", "COPY copied FROM STDIN"),
        bind(""),
        execute(),
        sync(),
        copy_data(b"1\n"),
        copy_done(),
        sync(),
    ]))
    .await;
    let got = a.until_ready(1).await;
    assert_eq!(errors(&got), Vec::<String>::new());
    assert_eq!(tags(&got), "12GCZ");
    // The same text under another name: the pooler closes its shared statement first
    // and drops that CloseComplete.
    a.send(&batch(&[parse("b", "SELECT 1"), sync()])).await;
    assert_eq!(tags(&a.until_ready(1).await), "1Z");
    a.send(&batch(&[bind("b"), execute(), sync()])).await;
    assert_eq!(tags(&a.until_ready(1).await), "2DCZ");
    a.send(&query("COMMIT")).await;
    assert_eq!(tags(&a.until_ready(1).await), "CZ");
}

/// The server name the pooler gives a statement without parameters.
fn server_name(sql: &str) -> String {
    use sha2::Digest;
    let mut text = sql.as_bytes().to_vec();
    text.extend_from_slice(b"\0\0\0");
    let digest = sha2::Sha256::digest(&text);
    let hex: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
    format!("dp_{hex}")
}

/// (g) A name reused after DISCARD ALL in the same pipeline: the pooler rewrote the
/// second Parse before the DISCARD's reply, as a re-parse of the first statement's
/// server name with the new text; the server (its name freed) accepted it, and that
/// name, shared by every client preparing the first text, held the second.
#[tokio::test]
async fn a_name_reused_after_discard_all_never_gives_a_server_name_another_text() {
    let e = env(|_| {}).await;
    let app = e.app_with_pool(1).await;
    let mut a = Raw::connect(&e, &app).await;
    a.send(&batch(&[
        parse("S_1", "SELECT 1"),
        query("DISCARD ALL"),
        parse("S_1", "SELECT 2"),
        bind("S_1"),
        execute(),
        sync(),
    ]))
    .await;
    let got = a.until_ready(2).await;
    assert_eq!(errors(&got), Vec::<String>::new());
    let rows: Vec<&[u8]> = got
        .iter()
        .filter(|(t, _)| *t == b'D')
        .map(|(_, b)| b.as_slice())
        .collect();
    assert_eq!(rows, vec![&b"\0\x01\0\0\0\x012"[..]], "{}", tags(&got));
    // One server: every statement it holds under a pooler name is that name's text.
    a.send(&query(
        "SELECT name || '=' || statement FROM pg_prepared_statements WHERE name LIKE 'dp\\_%'",
    ))
    .await;
    let got = a.until_ready(1).await;
    for (_, row) in got.iter().filter(|(t, _)| *t == b'D') {
        let text = String::from_utf8_lossy(&row[6..]);
        let (name, statement) = text.split_once('=').unwrap();
        assert_eq!(name, server_name(statement), "{text}");
    }
    // Another client preparing the first text runs the first text.
    let mut b = Raw::connect(&e, &app).await;
    b.send(&batch(&[
        parse("mine", "SELECT 1"),
        bind("mine"),
        execute(),
        sync(),
    ]))
    .await;
    let got = b.until_ready(1).await;
    assert_eq!(errors(&got), Vec::<String>::new());
    assert_eq!(tags(&got), "12DCZ");
    assert!(got.iter().any(|(t, b)| *t == b'D' && b.ends_with(b"1")));
    // And the first client's name means what it parsed last.
    a.send(&batch(&[bind("S_1"), execute(), sync()])).await;
    let got = a.until_ready(1).await;
    assert!(got.iter().any(|(t, b)| *t == b'D' && b.ends_with(b"2")));
}

/// (h) A client may hold `max_client_prepared_statements` named statements: one more
/// is an error for its batch (skipped up to Sync, as Postgres does after an error),
/// and the session goes on.
#[tokio::test]
async fn a_client_past_its_statement_limit_gets_53400_and_goes_on() {
    let e = env(|c| c.max_client_prepared_statements = 2).await;
    let app = e.app_with_pool(1).await;
    let mut a = Raw::connect(&e, &app).await;
    a.send(&batch(&[
        parse("s1", "SELECT 1"),
        parse("s2", "SELECT 2"),
        sync(),
    ]))
    .await;
    assert_eq!(tags(&a.until_ready(1).await), "11Z");
    a.send(&batch(&[
        parse("s3", "SELECT 3"),
        bind("s3"),
        execute(),
        query("SELECT 'skipped'"),
        sync(),
        bind("s1"),
        execute(),
        sync(),
    ]))
    .await;
    let got = a.until_ready(2).await;
    assert_eq!(tags(&got), "EZ2DCZ");
    let errs = errors(&got);
    assert!(errs[0].starts_with("53400"), "{errs:?}");
    assert!(
        errs[0].contains("max_client_prepared_statements"),
        "{errs:?}"
    );
    // Room again after a Close.
    a.send(&batch(&[
        close_statement("s2"),
        parse("s3", "SELECT 3"),
        bind("s3"),
        execute(),
        sync(),
    ]))
    .await;
    let got = a.until_ready(1).await;
    assert_eq!(errors(&got), Vec::<String>::new());
    assert_eq!(tags(&got), "312DCZ");
}
