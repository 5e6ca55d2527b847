//! SQL that reaches past the pooler's books: `LOAD`, the pooler's own statement names
//! (`dp_…`) in `DEALLOCATE`/`EXECUTE`/`PREPARE`, and `DEALLOCATE` in a failed
//! transaction. Each through the transaction port and the session port.

use crate::common::{App, Env, env, message, sqlstate, value};

/// The name tokio-postgres gave a statement on the wire (it shows it only in `Debug`).
fn statement_name(statement: &tokio_postgres::Statement) -> String {
    let debug = format!("{statement:?}");
    let start = debug.find("name: \"").unwrap() + "name: \"".len();
    let len = debug[start..].find('"').unwrap();
    debug[start..start + len].to_owned()
}

/// A pooler with a session port, an app, and both ports. Two servers at most: a
/// session-mode client holds one for its whole session.
async fn both_ports(tweak: impl FnOnce(&mut pooler::config::Config)) -> (Env, App, [u16; 2]) {
    let e = env(|c| {
        c.session_listen = Some("127.0.0.1:0".parse().unwrap());
        tweak(c);
    })
    .await;
    let app = e.app_with_pool(2).await;
    let ports = [e.pooler.addr.port(), e.pooler.session_addr.unwrap().port()];
    (e, app, ports)
}

/// A server a client ran `LOAD` on is closed when the client is done with it, in
/// either mode: no reset unloads a library, so nobody else may get it.
#[tokio::test]
async fn a_server_that_ran_load_is_never_reused() {
    let (e, app, ports) = both_ports(|_| {}).await;
    for port in ports {
        let first = e.connect_on(&app, port).await;
        let pid = value(&first, "SELECT pg_backend_pid()").await;
        // Apps may load only from $libdir/plugins: refused here, which the pooler
        // cannot tell from a library half-loaded, so it treats both alike.
        let _ = first.batch_execute("LOAD 'auto_explain'").await;
        for _ in 0..3 {
            assert_eq!(
                value(&first, "SELECT pg_backend_pid()").await,
                pid,
                "port {port}: the client keeps its server"
            );
        }
        drop(first);
        let next = e.connect_on(&app, port).await;
        for _ in 0..5 {
            let now = value(&next, "SELECT pg_backend_pid()").await;
            assert_ne!(now, pid, "port {port}: the loaded server was reused");
        }
        // Closed, not parked: its backend goes away (the close is asynchronous).
        let admin = e.fixture.admin().await;
        let mut alive = 1;
        for _ in 0..200 {
            alive = admin
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity WHERE pid = $1::text::int",
                    &[&pid],
                )
                .await
                .unwrap()
                .get::<_, i64>(0);
            if alive == 0 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(25)).await;
        }
        assert_eq!(alive, 0, "port {port}: the loaded server is closed");
    }
}

/// `DEALLOCATE dp_…`, `EXECUTE dp_…` and `PREPARE dp_…` in SQL never touch the
/// statement the pooler holds under that name for every client of the app: a client
/// that did not prepare it gets Postgres' own 26000, its transaction fails as it would,
/// and one that prepares it in SQL has its own.
#[tokio::test]
async fn the_poolers_statement_names_are_out_of_sqls_reach() {
    let (e, app, ports) = both_ports(|_| {}).await;
    for port in ports {
        let a = e.connect_on(&app, port).await;
        let b = e.connect_on(&app, port).await;
        let stmt = a.prepare("SELECT 41 + 1").await.unwrap();
        let theirs = b.prepare("SELECT 41 + 1").await.unwrap();
        assert_eq!(a.query_one(&stmt, &[]).await.unwrap().get::<_, i32>(0), 42);
        // The server `a` runs on holds the pooler's name for it.
        let global = value(
            &a,
            "SELECT name FROM pg_prepared_statements WHERE NOT from_sql \
             AND statement = 'SELECT 41 + 1'",
        )
        .await;
        assert!(global.starts_with("dp_"), "{global}");

        for sql in [
            format!("DEALLOCATE {global}"),
            format!("DEALLOCATE PREPARE \"{global}\""),
            format!("EXECUTE {global}"),
            format!("EXPLAIN EXECUTE {}", global.to_uppercase()),
        ] {
            let err = a.batch_execute(&sql).await.unwrap_err();
            assert_eq!(sqlstate(&err), "26000", "port {port}: {sql}");
            assert_eq!(
                message(&err),
                format!("prepared statement \"{global}\" does not exist"),
                "port {port}: {sql}"
            );
        }
        // In a transaction it fails the transaction, as Postgres does.
        a.batch_execute("BEGIN").await.unwrap();
        let err = a
            .batch_execute(&format!("DEALLOCATE {global}"))
            .await
            .unwrap_err();
        assert_eq!(sqlstate(&err), "26000");
        let err = a.batch_execute("SELECT 1").await.unwrap_err();
        assert_eq!(sqlstate(&err), "25P02", "port {port}");
        a.batch_execute("ROLLBACK").await.unwrap();

        // The client's own SQL statement of that name is its own.
        a.batch_execute(&format!("PREPARE {global} AS SELECT 7"))
            .await
            .unwrap();
        assert_eq!(value(&a, &format!("EXECUTE {global}")).await, "7");
        a.batch_execute(&format!("DEALLOCATE {global}"))
            .await
            .unwrap();

        // Nothing of the pooler's moved: both clients' statements still run.
        assert_eq!(a.query_one(&stmt, &[]).await.unwrap().get::<_, i32>(0), 42);
        assert_eq!(
            b.query_one(&theirs, &[]).await.unwrap().get::<_, i32>(0),
            42
        );
        assert_eq!(
            value(
                &a,
                "SELECT count(*) FROM pg_prepared_statements WHERE statement = 'SELECT 41 + 1'"
            )
            .await,
            "1",
            "port {port}"
        );
    }
}

/// A `DEALLOCATE` of a statement the client has but its server lacks (the pooler would
/// prepare it on demand, and answers the DEALLOCATE itself): in a transaction that has
/// already failed Postgres refuses it with 25P02 and keeps the statement, so the
/// pooler does too.
#[tokio::test]
async fn deallocate_in_a_failed_transaction_is_25p02() {
    // One statement per server: preparing a second one pushes the first off it.
    let (e, app, ports) = both_ports(|c| c.max_prepared_statements = 1).await;
    for port in ports {
        let a = e.connect_on(&app, port).await;
        let first = a.prepare("SELECT 1").await.unwrap();
        let second = a.prepare("SELECT 2").await.unwrap();
        assert_eq!(a.query_one(&second, &[]).await.unwrap().get::<_, i32>(0), 2);
        a.batch_execute("BEGIN").await.unwrap();
        assert!(a.batch_execute("SELECT 1/0").await.is_err());
        let err = a
            .batch_execute(&format!("DEALLOCATE {}", statement_name(&first)))
            .await
            .unwrap_err();
        assert_eq!(sqlstate(&err), "25P02", "port {port}: {err}");
        assert_eq!(
            message(&err),
            "current transaction is aborted, commands ignored until end of transaction block"
        );
        a.batch_execute("ROLLBACK").await.unwrap();
        // Still the client's, as Postgres kept it.
        assert_eq!(a.query_one(&first, &[]).await.unwrap().get::<_, i32>(0), 1);
        // Outside a failed transaction it is deallocated as asked.
        a.batch_execute(&format!("DEALLOCATE {}", statement_name(&first)))
            .await
            .unwrap();
        let err = a.query_one(&first, &[]).await.unwrap_err();
        assert_eq!(sqlstate(&err), "26000", "port {port}");
    }
}

/// A text too long to hold whole streams past its head, so a name of the pooler's in
/// it cannot be moved: the server it reached is closed once its client is done, and
/// the app's other clients never find the pooler's books wrong.
#[tokio::test]
async fn a_streamed_text_naming_the_poolers_statement_costs_its_server_only() {
    let e = env(|c| c.max_message_bytes = pooler::config::MIN_MESSAGE_BYTES).await;
    let app = e.app_with_pool(1).await;
    let a = e.connect(&app).await;
    let b = e.connect(&app).await;
    let theirs = b.prepare("SELECT 41 + 1").await.unwrap();
    assert_eq!(
        b.query_one(&theirs, &[]).await.unwrap().get::<_, i32>(0),
        42
    );
    let global = value(
        &a,
        "SELECT name FROM pg_prepared_statements WHERE statement = 'SELECT 41 + 1'",
    )
    .await;
    let pid = value(&a, "SELECT pg_backend_pid()").await;
    let long = format!(
        "DEALLOCATE {global}; SELECT 1 /* {} */",
        "x".repeat(64 * 1024)
    );
    a.batch_execute(&long).await.unwrap();
    // pool_size 1: the next transaction is on a new server, where it is prepared again.
    assert_eq!(
        b.query_one(&theirs, &[]).await.unwrap().get::<_, i32>(0),
        42
    );
    assert_ne!(value(&b, "SELECT pg_backend_pid()").await, pid);
}

/// What a client reads of one message: its tag and body, an error's or notice's body
/// cut to severity, code and message (a pooler's own error has no file or line).
fn readable(msgs: &[crate::raw::Msg]) -> Vec<(char, String)> {
    msgs.iter()
        .map(|(tag, body)| {
            let text = if matches!(tag, b'E' | b'N') {
                body.split(|b| *b == 0)
                    .filter(|f| matches!(f.first(), Some(b'V' | b'C' | b'M')))
                    .map(|f| String::from_utf8_lossy(f).into_owned())
                    .collect::<Vec<_>>()
                    .join("|")
            } else {
                String::from_utf8_lossy(body).into_owned()
            };
            (*tag as char, text)
        })
        .collect()
}

/// `DEALLOCATE` of a statement its server lacks, in a transaction that already failed,
/// by a simple Query and by Parse/Bind/Execute (psycopg 3 deallocates so): a client
/// through either port reads the very messages a client straight to Postgres reads
/// (the 25P02 where Postgres gives it, the statement kept), and afterwards the same.
#[tokio::test]
async fn deallocate_in_a_failed_transaction_reads_as_postgres_over_both_protocols() {
    use crate::raw::{Raw, batch, bind, execute, parse, query, sync};
    // One statement per server: preparing s2 pushes s1 off the pooler's server.
    let (e, app, ports) = both_ports(|c| c.max_prepared_statements = 1).await;
    let direct = std::net::SocketAddr::from(([127, 0, 0, 1], e.fixture.cluster.port()));
    let addrs = [
        direct,
        std::net::SocketAddr::from(([127, 0, 0, 1], ports[0])),
        std::net::SocketAddr::from(([127, 0, 0, 1], ports[1])),
    ];
    let extended = || batch(&[parse("", "DEALLOCATE s1"), bind(""), execute(), sync()]);
    let run_s1 = || batch(&[bind("s1"), execute(), sync()]);
    let steps: Vec<(&str, Vec<u8>)> = vec![
        (
            "prepare",
            batch(&[
                parse("s1", "SELECT 1"),
                parse("s2", "SELECT 2"),
                bind("s2"),
                execute(),
                sync(),
            ]),
        ),
        ("begin", query("BEGIN")),
        ("fail", query("SELECT 1/0")),
        ("extended, failed", extended()),
        ("simple, failed", query("DEALLOCATE s1")),
        ("rollback", query("ROLLBACK")),
        ("s1 kept", run_s1()),
        ("s2 pushes s1 off", batch(&[bind("s2"), execute(), sync()])),
        ("extended", extended()),
        ("s1 gone", run_s1()),
    ];
    let mut seen = Vec::new();
    for addr in addrs {
        let mut c = Raw::connect_to(addr, &e.fixture.db, &app).await;
        let mut answers = Vec::new();
        for (step, bytes) in &steps {
            c.send(bytes).await;
            answers.push((*step, readable(&c.until_ready(1).await)));
        }
        seen.push(answers);
    }
    for (port, ours) in ports.iter().zip(&seen[1..]) {
        for ((step, theirs), (_, ours)) in seen[0].iter().zip(ours) {
            assert_eq!(ours, theirs, "port {port}, step {step}");
        }
    }
}
