//! Transaction pooling: servers never cross roles, never carry a dead client's
//! transaction, stay linked through a transaction, and are shared fairly.

use std::time::{Duration, Instant};

use futures_util::future::join_all;

use crate::common::{env, sqlstate};

#[tokio::test]
async fn fifty_roles_never_see_each_others_servers() {
    let e = env(|c| c.max_server_connections = 10).await;
    let mut apps = Vec::new();
    for _ in 0..50 {
        apps.push(e.app(Default::default()).await);
    }
    let mut tasks = Vec::new();
    for app in &apps {
        for _ in 0..4 {
            let config = e.config(&app.role, &app.password);
            let role = app.role.clone();
            tasks.push(tokio::spawn(async move {
                let client = dataplane_tests::connect(&config).await.unwrap();
                let mut mismatches = 0;
                for _ in 0..25 {
                    // Simple protocol: named prepared statements across transactions
                    // are the driver-compatibility issue's, not this test's.
                    let rows = client.simple_query("SELECT current_user").await.unwrap();
                    let who = rows.iter().find_map(|m| match m {
                        tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
                        _ => None,
                    });
                    mismatches += usize::from(who.as_deref() != Some(role.as_str()));
                }
                mismatches
            }));
        }
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap();
    }
    assert_eq!(total, 0, "a server was handed across roles");
    let servers = e.pooler.shared.pools.stats().servers_in_use;
    assert!(servers <= 10, "{servers} servers over a budget of 10");
}

#[tokio::test]
async fn a_client_dying_mid_transaction_leaves_nothing_behind() {
    let e = env(|_| {}).await;
    let app = e.app_with_pool(1).await;
    let setup = e.connect(&app).await;
    setup.batch_execute("CREATE TABLE t (x int)").await.unwrap();
    drop(setup);

    let dying = e.connect(&app).await;
    dying
        .batch_execute("BEGIN; INSERT INTO t VALUES (1)")
        .await
        .unwrap();
    drop(dying);

    let next = e.connect(&app).await;
    let row = next
        .query_one(
            "SELECT (SELECT count(*) FROM t), txid_current_if_assigned() IS NULL, \
             (SELECT count(*) FROM pg_stat_activity WHERE usename = current_user AND state LIKE 'idle in transaction%')",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        row.get::<_, i64>(0),
        0,
        "the dead client's row is invisible"
    );
    assert!(row.get::<_, bool>(1), "no transaction carried over");
    assert_eq!(row.get::<_, i64>(2), 0);
}

#[tokio::test]
async fn a_transaction_keeps_its_server_and_two_hundred_clients_share_five() {
    let e = env(|_| {}).await;
    let app = e.app_with_pool(5).await;
    let c = e.connect(&app).await;
    c.batch_execute("CREATE TABLE counter (n int)")
        .await
        .unwrap();

    let mut tasks = Vec::new();
    for _ in 0..200 {
        let config = e.config(&app.role, &app.password);
        tasks.push(tokio::spawn(async move {
            let mut client = dataplane_tests::connect(&config).await.unwrap();
            let tx = client.transaction().await.unwrap();
            let pid1: i32 = tx
                .query_one("SELECT pg_backend_pid()", &[])
                .await
                .unwrap()
                .get(0);
            tx.execute("INSERT INTO counter VALUES (1)", &[])
                .await
                .unwrap();
            let pid2: i32 = tx
                .query_one("SELECT pg_backend_pid()", &[])
                .await
                .unwrap()
                .get(0);
            tx.commit().await.unwrap();
            pid1 == pid2
        }));
    }
    for t in tasks {
        assert!(t.await.unwrap(), "a transaction moved between servers");
    }
    let n: i64 = c
        .query_one("SELECT count(*) FROM counter", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 200);
    assert!(e.backends(&app.role).await <= 5);
}

#[tokio::test]
async fn a_waiter_gets_53300_after_query_wait_timeout() {
    let e = env(|c| c.query_wait_timeout_ms = 300).await;
    let app = e.app_with_pool(2).await;
    let mut holders = Vec::new();
    for _ in 0..2 {
        let c = e.connect(&app).await;
        c.batch_execute("BEGIN; SELECT 1").await.unwrap();
        holders.push(c);
    }
    let waiter = e.connect(&app).await;
    let started = Instant::now();
    let err = waiter.simple_query("SELECT 1").await.err().unwrap();
    assert_eq!(sqlstate(&err), "53300", "{err}");
    assert!(
        crate::common::message(&err).contains("query_wait_timeout"),
        "{err}"
    );
    assert!(started.elapsed() >= Duration::from_millis(250));
    // The holders are unaffected.
    for h in &holders {
        h.batch_execute("COMMIT").await.unwrap();
    }
}

#[tokio::test]
async fn copy_in_and_out_ten_megabytes() {
    use futures_util::{SinkExt, StreamExt, pin_mut};
    let e = env(|_| {}).await;
    let app = e.app(Default::default()).await;
    let client = e.connect(&app).await;
    client
        .batch_execute("CREATE TABLE blob (line text)")
        .await
        .unwrap();
    let line = "x".repeat(1000);
    let rows = 10_000;
    let sink = client.copy_in("COPY blob FROM STDIN").await.unwrap();
    pin_mut!(sink);
    let mut chunk = String::new();
    for i in 0..rows {
        chunk.push_str(&line);
        chunk.push('\n');
        if i % 100 == 99 {
            sink.send(bytes::Bytes::from(std::mem::take(&mut chunk)))
                .await
                .unwrap();
        }
    }
    let copied = sink.finish().await.unwrap();
    assert_eq!(copied, rows);

    let stream = client.copy_out("COPY blob TO STDOUT").await.unwrap();
    pin_mut!(stream);
    let mut total = 0usize;
    while let Some(chunk) = stream.next().await {
        total += chunk.unwrap().len();
    }
    assert_eq!(total, rows as usize * (line.len() + 1));
    // The server is released after COPY: another transaction works.
    client.simple_query("SELECT 1").await.unwrap();
}

#[tokio::test]
async fn a_pipelined_batch_of_a_thousand_extended_queries() {
    let e = env(|_| {}).await;
    let app = e.app(Default::default()).await;
    let client = e.connect(&app).await;
    let stmt = client.prepare("SELECT $1::int + 1").await.unwrap();
    // tokio-postgres pipelines concurrent queries on one connection.
    let results = join_all((0..1000).map(|i| {
        let client = &client;
        let stmt = &stmt;
        async move {
            client
                .query_one(stmt, &[&i])
                .await
                .map(|r| r.get::<_, i32>(0))
        }
    }))
    .await;
    for (i, r) in results.into_iter().enumerate() {
        assert_eq!(r.unwrap(), i as i32 + 1);
    }
}

#[tokio::test]
async fn pg_cancel_through_the_pooler() {
    let e = env(|_| {}).await;
    let app = e.app(Default::default()).await;
    let client = e.connect(&app).await;
    let token = client.cancel_token();
    let sleeper = tokio::spawn(async move {
        let started = Instant::now();
        let r = client.simple_query("SELECT pg_sleep(30)").await;
        (r.err().map(|e| sqlstate(&e)), started.elapsed())
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    token.cancel_query(tokio_postgres::NoTls).await.unwrap();
    let (code, took) = sleeper.await.unwrap();
    assert_eq!(code.as_deref(), Some("57014"));
    assert!(took < Duration::from_secs(5), "cancel took {took:?}");
}

#[tokio::test]
async fn an_extended_protocol_copy_gives_its_server_back() {
    use futures_util::{SinkExt, pin_mut};
    let e = env(|c| c.query_wait_timeout_ms = 3_000).await;
    let app = e.app_with_pool(1).await;
    let client = e.connect(&app).await;
    client
        .batch_execute("CREATE TABLE t (x int)")
        .await
        .unwrap();
    // tokio-postgres sends Bind, Execute, Sync, CopyData, CopyDone, Sync: Postgres
    // ignores the first Sync, so only one ReadyForQuery comes back.
    let sink = client.copy_in("COPY t FROM STDIN").await.unwrap();
    pin_mut!(sink);
    sink.send(bytes::Bytes::from_static(b"1\n2\n"))
        .await
        .unwrap();
    assert_eq!(sink.finish().await.unwrap(), 2);
    // pool_size 1: another client only gets a server if the copy gave it back.
    let other = e.connect(&app).await;
    let rows = other.simple_query("SELECT count(*) FROM t").await.unwrap();
    assert!(
        matches!(&rows[1], tokio_postgres::SimpleQueryMessage::Row(r) if r.get(0) == Some("2"))
    );
}

#[tokio::test]
async fn a_pipeline_larger_than_the_socket_buffers_does_not_deadlock() {
    let e = env(|_| {}).await;
    let app = e.app(Default::default()).await;
    let client = e.connect(&app).await;
    // 300 queries of 100 kB each way, all written before any reply is read: more than
    // the sockets between client, pooler and server can hold in either direction.
    let big = "x".repeat(100_000);
    let results = join_all((0..300).map(|_| {
        let client = &client;
        let big = big.as_str();
        async move {
            client
                .query_typed(
                    "SELECT $1::text",
                    &[(&big, tokio_postgres::types::Type::TEXT)],
                )
                .await
                .map(|rows| rows[0].get::<_, String>(0).len())
        }
    }));
    let results = tokio::time::timeout(Duration::from_secs(120), results)
        .await
        .expect("the pipeline deadlocked");
    assert!(results.into_iter().all(|r| r.unwrap() == 100_000));
}

#[tokio::test]
async fn a_server_terminated_while_idle_is_replaced_not_handed_out() {
    let e = env(|_| {}).await;
    let app = e.app_with_pool(1).await;
    let client = e.connect(&app).await;
    client.simple_query("SELECT 1").await.unwrap();
    // An administrator (or idle_session_timeout) ends the idle server.
    let admin = e.fixture.admin().await;
    admin
        .execute(
            "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity WHERE usename = $1",
            &[&app.role],
        )
        .await
        .unwrap();
    // The next transaction gets a fresh server, not the dead one's FATAL.
    let rows = client.simple_query("SELECT 2").await.unwrap();
    assert!(
        matches!(&rows[1], tokio_postgres::SimpleQueryMessage::Row(r) if r.get(0) == Some("2"))
    );
}

/// An app's client vanishes in the middle of a long query, on the only server of a
/// budget of 1. The pooler ends that server with Terminate and counts its slot until
/// Postgres lets go, but a backend busy in `pg_sleep` reads nothing and exits only
/// when it next talks to its socket: the wait for it is bounded (2 s), so another
/// app's query is served long before the sleep would end.
#[tokio::test]
async fn a_server_whose_backend_will_not_exit_holds_its_slot_for_a_bounded_time() {
    let e = env(|c| c.max_server_connections = 1).await;
    let (hog, victim) = (e.app_with_pool(1).await, e.app_with_pool(1).await);
    let (client, connection) = e
        .config(&hog.role, &hog.password)
        .connect(tokio_postgres::NoTls)
        .await
        .unwrap();
    let connection = tokio::spawn(connection);
    let sleeping = tokio::spawn(async move { client.simple_query("SELECT pg_sleep(60)").await });
    crate::common::eventually("the hog's query runs", async || {
        e.backends(&hog.role).await == 1
    })
    .await;
    // The client's socket goes away with its query unanswered.
    connection.abort();
    let _ = sleeping.await;

    let start = Instant::now();
    let victim_client = e.connect(&victim).await;
    let got = tokio::time::timeout(
        Duration::from_secs(30),
        victim_client.query_one("SELECT current_user::text", &[]),
    )
    .await
    .expect("the other app waited for the sleeping backend")
    .unwrap();
    assert_eq!(got.get::<_, String>(0), victim.role);
    println!(
        "the other app was served {} ms after the hog's client vanished",
        start.elapsed().as_millis()
    );
}
