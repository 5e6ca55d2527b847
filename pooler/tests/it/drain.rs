//! SIGTERM on the real binary: /readyz goes 503, no new clients, the transactions in
//! flight all commit, idle clients are told 57P01, and the process exits 0.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use dataplane_tests::fixtures::POOLER_PASSWORD;

use crate::common::env;
use crate::common::free_port;
use crate::metrics::http_get;

#[tokio::test]
async fn sigterm_lets_twenty_running_transactions_commit_and_exits_zero() {
    // The in-process pooler of `env` provisions the app; the binary under test is a
    // second pooler in front of the same database.
    let e = env(|_| {}).await;
    let app = e.app_with_pool(20).await;
    let (port, admin_port) = (free_port(), free_port());
    let dir = tempfile_dir();
    let config = dir.join("pooler.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:{port}\"\nadmin_listen = \"127.0.0.1:{admin_port}\"\n\
             [upstream]\nhost = \"{}\"\nport = {}\ndbname = \"{}\"\n",
            e.fixture.cluster.host(),
            e.fixture.cluster.port(),
            e.fixture.db
        ),
    )
    .unwrap();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_pooler"))
        .arg("--config")
        .arg(&config)
        .args(["--shutdown-grace-secs", "60"])
        .env("POOLER_AUTH_PASSWORD", POOLER_PASSWORD)
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let admin: std::net::SocketAddr = format!("127.0.0.1:{admin_port}").parse().unwrap();
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(admin).await.is_ok()
            && http_get(admin, "/readyz").await.0 == 200
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(http_get(admin, "/readyz").await.0, 200);

    let config_for = |p: u16| e.config_on_port(&app.role, &app.password, p);
    let setup = dataplane_tests::connect(&config_for(port)).await.unwrap();
    setup
        .batch_execute("CREATE TABLE drained (client int, step int)")
        .await
        .unwrap();

    let started = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for i in 0..20 {
        let client = dataplane_tests::connect(&config_for(port)).await.unwrap();
        let started = started.clone();
        tasks.push(tokio::spawn(async move {
            client.batch_execute("BEGIN").await?;
            client
                .execute("INSERT INTO drained VALUES ($1, 1)", &[&i])
                .await?;
            started.fetch_add(1, Ordering::SeqCst);
            client.batch_execute("SELECT pg_sleep(1.5)").await?;
            client
                .execute("INSERT INTO drained VALUES ($1, 2)", &[&i])
                .await?;
            client.batch_execute("COMMIT").await?;
            // Idle now: the draining pooler tells it to leave.
            let after = client.batch_execute("SELECT 1").await;
            Ok::<_, tokio_postgres::Error>(after.err())
        }));
    }
    drop(setup);
    while started.load(Ordering::SeqCst) < 20 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let pid = child.id().unwrap().to_string();
    let kill = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(kill.success());

    // Draining: not ready, and no new clients.
    let mut saw_503 = false;
    for _ in 0..100 {
        if http_get(admin, "/readyz").await.0 == 503 {
            saw_503 = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(saw_503, "/readyz never said 503 while draining");
    assert!(dataplane_tests::connect(&config_for(port)).await.is_err());

    for t in tasks {
        let after_commit = t.await.unwrap().expect("a transaction in flight failed");
        if let Some(err) = after_commit {
            let code = err.code().map(|c| c.code().to_owned());
            assert!(
                code.as_deref() == Some("57P01") || err.is_closed(),
                "an idle client after the drain got {err}"
            );
        }
    }
    let status = tokio::time::timeout(Duration::from_secs(60), child.wait())
        .await
        .expect("the pooler did not exit")
        .unwrap();
    assert!(status.success(), "exit status {status}");

    let direct = e.fixture.admin().await;
    let rows: i64 = direct
        .query_one(
            &format!("SELECT count(*) FROM {}.drained", e.name(&app).quoted()),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, 40, "every transaction in flight committed");
}

fn tempfile_dir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("pooler-drain-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
