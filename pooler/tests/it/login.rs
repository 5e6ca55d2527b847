//! Logging in: SCRAM against the provisioner's verifier, identical failures, throttling,
//! and a warm pool that logs clients in without Postgres.

use tokio::process::Command;

use provisioner::ddl::LimitsPatch;

use crate::common::{env, message, sqlstate};

#[tokio::test]
async fn tokio_postgres_and_psql_log_in_and_reach_their_schema() {
    let e = env(|_| {}).await;
    let app = e.app(Default::default()).await;
    let client = e.connect(&app).await;
    let row = client
        .query_one("SELECT current_user::text, current_schema()::text", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), app.role);
    assert_eq!(row.get::<_, String>(1), app.role);
    client
        .batch_execute("CREATE TABLE t (x int); INSERT INTO t VALUES (42)")
        .await
        .unwrap();

    // psql runs in tokio's process API: the pooler lives on this test's runtime, and
    // a blocking wait here would stop it from answering.
    let bindir = e.fixture.cluster.bindir().to_owned();
    let out = Command::new(bindir.join("psql"))
        .args([
            "-X",
            "-A",
            "-t",
            "-h",
            "127.0.0.1",
            "-p",
            &e.pooler.addr.port().to_string(),
        ])
        .args([
            "-U",
            &app.role,
            "-d",
            &e.fixture.db,
            "-c",
            "SELECT x FROM t",
        ])
        .env("PGPASSWORD", &app.password)
        .env("PGSSLMODE", "disable")
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "psql: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "42");
}

#[tokio::test]
async fn wrong_password_unknown_and_suspended_roles_fail_identically() {
    let e = env(|_| {}).await;
    let app = e.app(Default::default()).await;
    let suspended = e.app(Default::default()).await;
    e.provisioner
        .set_disabled(&e.name(&suspended), true, &Default::default())
        .await
        .unwrap();

    let cases = [
        (app.role.clone(), "not-the-password".to_owned()),
        ("tk_t999999_pnobody_dev".to_owned(), "whatever".to_owned()),
        ("dp_pooler".to_owned(), "dp-pooler-test-password".to_owned()),
        (suspended.role.clone(), suspended.password.clone()),
    ];
    for (user, password) in cases {
        let err = e
            .try_connect(&user, &password)
            .await
            .expect_err("login must fail");
        assert_eq!(sqlstate(&err), "28P01", "{user}: {err}");
        assert_eq!(
            message(&err),
            format!("password authentication failed for user \"{user}\"")
        );
    }
    // The right password still works.
    e.connect(&app).await;
}

#[tokio::test]
async fn a_hundred_wrong_attempts_from_one_address_are_throttled() {
    let e = env(|_| {}).await;
    let app = e.app(Default::default()).await;
    let mut throttled = 0;
    for i in 0..100 {
        let err = e
            .try_connect(&format!("tk_t{i}_pguess_dev"), "guess")
            .await
            .err()
            .unwrap();
        if message(&err).contains("too many failed login attempts") {
            throttled += 1;
        }
    }
    assert!(
        throttled >= 50,
        "only {throttled} of 100 attempts were throttled"
    );
    // While throttled, even the right password from this address is refused.
    let err = e.try_connect(&app.role, &app.password).await.err().unwrap();
    assert!(
        message(&err).contains("too many failed login attempts"),
        "{err}"
    );
}

#[tokio::test]
async fn a_warm_pool_logs_clients_in_without_a_new_server() {
    let e = env(crate::common::with_admin).await;
    let app = e.app(Default::default()).await;
    let first = e.connect(&app).await;
    first.simple_query("SELECT 1").await.unwrap();
    let before = e.backends(&app.role).await;
    assert_eq!(before, 1);
    let mut clients = Vec::new();
    for _ in 0..10 {
        clients.push(e.connect(&app).await);
    }
    assert_eq!(
        e.backends(&app.role).await,
        before,
        "logins alone opened servers"
    );
    // And they all work, on that one server, one transaction at a time. The server goes
    // back to the pool once the reply has been flushed to the client (design.md), so
    // another client's request sent the moment a reply arrives can find it still
    // linked and have a second one opened: each waits until the server is back.
    let console = e.console().await;
    for c in &clients {
        c.simple_query("SELECT 1").await.unwrap();
        crate::common::eventually("the server back in the pool", async || {
            let pool = crate::admin::pool_row(&console, &app.role).await.unwrap();
            pool["sv_active"] == "0"
        })
        .await;
    }
    assert_eq!(e.backends(&app.role).await, 1);
}

#[tokio::test]
async fn an_unknown_database_is_3d000() {
    let e = env(|_| {}).await;
    let app = e.app(Default::default()).await;
    let mut config = e.config(&app.role, &app.password);
    config.dbname("postgres");
    let err = dataplane_tests::connect(&config).await.err().unwrap();
    assert_eq!(sqlstate(&err), "3D000");
}

#[tokio::test]
async fn an_apps_max_client_conn_is_enforced() {
    let e = env(|_| {}).await;
    let app = e
        .app(provisioner::ddl::LimitsPatch {
            max_client_conn: Some(2),
            ..Default::default()
        })
        .await;
    let first = e.connect(&app).await;
    let second = e.connect(&app).await;
    let err = e
        .try_connect(&app.role, &app.password)
        .await
        .expect_err("a third client");
    assert_eq!(sqlstate(&err), "53300");
    assert!(message(&err).contains("max_client_conn"), "{err}");
    drop(first);
    // The slot comes back when a client leaves.
    let mut admitted = false;
    for _ in 0..50 {
        if e.try_connect(&app.role, &app.password).await.is_ok() {
            admitted = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(admitted);
    drop(second);
}

#[tokio::test]
async fn a_verifier_that_disagrees_with_pg_authid_is_reported_exactly() {
    let e = env(|_| {}).await;
    let app = e.app(Default::default()).await;
    // The app changes its own password behind the provisioner's back (Postgres lets
    // every role do that): pg_authid now has another salt than the credentials row.
    let direct = dataplane_tests::connect(&e.fixture.cluster.config(
        &app.role,
        &app.password,
        &e.fixture.db,
    ))
    .await
    .unwrap();
    direct
        .batch_execute("ALTER ROLE CURRENT_USER PASSWORD 'changed-behind-our-back'")
        .await
        .unwrap();
    let err = e
        .try_connect(&app.role, &app.password)
        .await
        .expect_err("pass-through must fail");
    assert_eq!(sqlstate(&err), "57P03", "{err}");
    assert!(message(&err).contains("differ"), "{}", message(&err));
    // Later clients are refused at once (backoff), with what to do about it.
    let err = e
        .try_connect(&app.role, &app.password)
        .await
        .expect_err("still broken");
    assert!(message(&err).contains("rotate"), "{}", message(&err));
    // Rotating through the provisioner repairs it.
    let rotated = e
        .provisioner
        .rotate(&e.name(&app), &Default::default())
        .await
        .unwrap();
    let mut repaired = false;
    for _ in 0..50 {
        if let Ok(c) = e.try_connect(&app.role, rotated.password.expose()).await {
            repaired = c.simple_query("SELECT 1").await.is_ok();
            if repaired {
                break;
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(repaired, "rotation did not repair pass-through");
}

#[tokio::test]
async fn strangers_wrong_guesses_never_refuse_the_right_password_from_elsewhere() {
    let e = env(|_| {}).await;
    let app = e.app(Default::default()).await;
    let pooler = e.pooler.addr;
    let stranger = std::net::IpAddr::from([127, 0, 0, 2]);
    let mut throttled = 0;
    for _ in 0..40 {
        let err = crate::flood::connect_from(stranger, pooler, &e.config(&app.role, "guess"))
            .await
            .err()
            .unwrap();
        if sqlstate(&err) == "28000" {
            assert!(message(&err).contains("too many failed login attempts"));
            throttled += 1;
        }
    }
    // Past the per-(role, address) limit (20) the stranger's address is refused...
    assert_eq!(throttled, 20);
    let err = crate::flood::connect_from(stranger, pooler, &e.config(&app.role, &app.password))
        .await
        .err()
        .unwrap();
    assert_eq!(sqlstate(&err), "28000", "even with the right password");
    // ...and the app itself, from its own address, logs in and is answered.
    let client = e.connect(&app).await;
    client.simple_query("SELECT 1").await.unwrap();
}

#[tokio::test]
async fn parallel_guesses_are_counted_before_they_finish() {
    let e = env(|_| {}).await;
    let app = e.app(Default::default()).await;
    let pooler = e.pooler.addr;
    let guesser = std::net::IpAddr::from([127, 0, 0, 3]);
    let guesses: Vec<_> = (0..100)
        .map(|_| {
            let config = e.config(&app.role, "guess");
            tokio::spawn(async move {
                crate::flood::connect_from(guesser, pooler, &config)
                    .await
                    .err()
                    .unwrap()
            })
        })
        .collect();
    let mut tried = 0;
    for g in guesses {
        match sqlstate(&g.await.unwrap()).as_str() {
            "28P01" => tried += 1,
            "28000" => {}
            other => panic!("{other}"),
        }
    }
    // Each guess was recorded before its exchange: a hundred at once got no more
    // than the limit's twenty answers.
    assert_eq!(tried, 20);
    e.connect(&app)
        .await
        .simple_query("SELECT 1")
        .await
        .unwrap();
}

#[tokio::test]
async fn a_burst_of_right_logins_from_one_address_is_slowed_never_refused() {
    let e = env(|_| {}).await;
    let app = e
        .app(LimitsPatch {
            max_client_conn: Some(200),
            ..Default::default()
        })
        .await;
    // More logins at once than the per-(role, address) limit: they wait for each
    // other's settling, and all get in.
    let logins: Vec<_> = (0..60)
        .map(|_| {
            let config = e.config(&app.role, &app.password);
            tokio::spawn(async move { dataplane_tests::connect(&config).await.map(|_| ()) })
        })
        .collect();
    for l in logins {
        l.await.unwrap().unwrap();
    }
}
