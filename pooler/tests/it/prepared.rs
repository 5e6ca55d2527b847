//! Named prepared statements in transaction mode: a statement prepared on one server
//! is found again when the client lands on another.

use crate::common::{App, Env, env};

#[tokio::test]
async fn named_statements_follow_clients_across_servers() {
    let e = env(|_| {}).await;
    let app = e.app_with_pool(2).await;
    let mut tasks = Vec::new();
    for i in 0..20 {
        let config = e.config(&app.role, &app.password);
        tasks.push(tokio::spawn(async move {
            let client = dataplane_tests::connect(&config).await.unwrap();
            // tokio-postgres prepares named statements (s0, s1, ...) and binds them in
            // later transactions: with 20 clients on 2 servers they land elsewhere.
            let stmt = client.prepare("SELECT $1::int + $2::int").await.unwrap();
            for n in 0..50 {
                let row = client.query_one(&stmt, &[&i, &n]).await.unwrap();
                assert_eq!(row.get::<_, i32>(0), i + n);
                let who: String = client
                    .query_one("SELECT current_user::text", &[])
                    .await
                    .unwrap()
                    .get(0);
                assert!(who.starts_with("tk_t"));
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert!(e.backends(&app.role).await <= 2);
}

/// pgbench through the pooler with `pool_size = 2`: `clients` clients of one app and,
/// at the same time, 8 of a second app, `tx` transactions each, zero failures.
async fn pgbench(mode: &str, clients: u32, tx: u32) {
    let e = env(|_| {}).await;
    let (first, second) = (e.app_with_pool(2).await, e.app_with_pool(2).await);
    let runs = [(&first, clients), (&second, 8)]
        .map(|(app, clients)| pgbench_as(&e, app, mode, clients, tx));
    let [a, b] = runs;
    tokio::join!(a, b);
    assert!(e.backends(&first.role).await <= 2);
}

async fn pgbench_as(e: &Env, app: &App, mode: &str, clients: u32, tx: u32) {
    let bindir = e.fixture.cluster.bindir().to_owned();
    let port = e.pooler.addr.port().to_string();
    let run = |args: Vec<String>| {
        let mut cmd = tokio::process::Command::new(bindir.join("pgbench"));
        cmd.args(["-h", "127.0.0.1", "-p", &port, "-U", &app.role])
            .args(args)
            .arg(&e.fixture.db)
            .env("PGPASSWORD", &app.password)
            .env("PGSSLMODE", "disable");
        cmd
    };
    let init = run(vec!["-i".into(), "-s".into(), "1".into(), "-q".into()])
        .output()
        .await
        .unwrap();
    assert!(
        init.status.success(),
        "pgbench -i: {}",
        String::from_utf8_lossy(&init.stderr)
    );
    let args = [
        "-M",
        mode,
        "-c",
        &clients.to_string(),
        "-j",
        &clients.to_string(),
        "-t",
        &tx.to_string(),
        "-n",
    ]
    .map(String::from);
    let out = tokio::time::timeout(
        std::time::Duration::from_secs(180),
        run(args.to_vec()).output(),
    )
    .await
    .expect("pgbench hung")
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "pgbench -M {mode}: {}{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("number of failed transactions: 0"),
        "{stdout}"
    );
    let done = format!(
        "number of transactions actually processed: {0}/{0}",
        clients * tx
    );
    assert!(stdout.contains(&done), "{stdout}");
}

#[tokio::test]
async fn pgbench_extended_through_the_pooler() {
    pgbench("extended", 20, 30).await;
}

#[tokio::test]
async fn pgbench_prepared_through_the_pooler_two_clients() {
    pgbench("prepared", 2, 20).await;
}

/// `-M prepared` at 20 clients on 2 servers. One pgbench thread per client: pgbench
/// prepares each command synchronously (PQprepare) on first use, even inside a
/// transaction, so a thread that serves several clients blocks in one client's prepare
/// (waiting for a server) while another of its clients sits idle in a transaction
/// holding one. With fewer servers than clients that deadlocks until query_wait_timeout
/// behind any transaction pooler, PgBouncer included; it is pgbench's, not ours.
#[tokio::test]
async fn pgbench_prepared_through_the_pooler_twenty_clients() {
    pgbench("prepared", 20, 30).await;
}

#[tokio::test]
async fn one_client_prepares_and_queries() {
    let e = env(|_| {}).await;
    let app = e.app_with_pool(2).await;
    let client = e.connect(&app).await;
    let stmt = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        client.prepare("SELECT $1::int + 1"),
    )
    .await
    .expect("prepare hung")
    .unwrap();
    let row = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        client.query_one(&stmt, &[&1i32]),
    )
    .await
    .expect("query hung")
    .unwrap();
    assert_eq!(row.get::<_, i32>(0), 2);
}
