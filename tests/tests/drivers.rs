//! The driver matrix: real client drivers, unmodified, through the pooler in transaction
//! mode with `pool_size = 2`, 20 clients of one app and 8 of a second app at once.
//!
//! Each scenario is a script under `tests/drivers/` that checks every result itself,
//! prints one summary line and exits non-zero on any error. Every client does the same
//! work with its driver's own idioms: 50 rounds of two parameterised statements in
//! autocommit and a short transaction with a statement of its own (so statements exist
//! on some servers and not others); in three rounds a statement that fails inside a
//! transaction, followed by another before the rollback (25P02, as Postgres says; in
//! pipeline mode, one that Postgres skips); a batch insert; a rolled-back and a committed
//! transaction, then a check that exactly the committed rows are there. The drivers live where
//! `.ci/install-deps` puts them (`target/driver-env/`, PgJDBC from Debian); when one is
//! missing the test fails and says to run it.
//!
//! The LISTEN scenarios (`*_listen`): each driver's own way of listening, through the
//! transaction port, with 50 listening clients of one app while others run transactions
//! and a second app listens on the same channel names (see the scripts' headers).
//!
//! `DP_DRIVERS_DIRECT=1` points the scripts at Postgres instead of the pooler, to tell a
//! script's bug from the pooler's.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use dataplane_tests::fixtures::{MigratedDb, shared_migrated_database};
use dataplane_tests::stack::{self, App};
use pooler::Running;
use provisioner::ddl::LimitsPatch;
use tokio::io::AsyncReadExt;
use tokio::process::Command;

/// Generous for a slow CI machine: a scenario takes seconds here.
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(300);
const POOL_SIZE: i32 = 2;
/// Clients of the first app and of the second, all at once.
const CLIENTS: [u32; 2] = [20, 8];
const JDBC_JAR: &str = "/usr/share/java/postgresql.jar";
const INSTALL_HINT: &str = "run .ci/install-deps (make test does) to install the driver matrix";

// Each test builds its command first, so a missing driver fails before any set-up.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgjdbc_default_prepare_threshold() {
    let cmd = java("default");
    Matrix::start().await.run(cmd).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgjdbc_prepare_threshold_1() {
    let cmd = java("1");
    Matrix::start().await.run(cmd).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psycopg_prepare_threshold_0() {
    let cmd = python("psycopg_matrix.py", &["prepare"]);
    Matrix::start().await.run(cmd).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psycopg_pipeline_mode() {
    let cmd = python("psycopg_matrix.py", &["pipeline"]);
    Matrix::start().await.run(cmd).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn asyncpg_fetch_executemany_prepared() {
    let cmd = python("asyncpg_matrix.py", &[]);
    Matrix::start().await.run(cmd).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_postgres_named_queries() {
    let cmd = node("named_queries.js");
    Matrix::start().await.run(cmd).await;
}

// LISTEN through the transaction port (tests/drivers/*/listen scripts): 50 listening
// clients of one app beside clients running transactions, and a second app on the same
// channel names. Each notification arrives exactly once, in order per sender, only at
// its own app's listeners; the app has at most pool_size + 1 servers all along.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_postgres_listen() {
    let cmd = node("listen.js");
    Matrix::start().await.run_listen(cmd).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psycopg_listen() {
    let cmd = python("psycopg_listen.py", &[]);
    Matrix::start().await.run_listen(cmd).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn asyncpg_listen() {
    let cmd = python("asyncpg_listen.py", &[]);
    Matrix::start().await.run_listen(cmd).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgjdbc_listen() {
    let jar = installed(PathBuf::from(JDBC_JAR));
    let mut cmd = Command::new("java");
    cmd.arg("-cp")
        .arg(jar)
        .arg(drivers_dir().join("java/PgJdbcListen.java"));
    Matrix::start().await.run_listen(cmd).await;
}

/// Listening clients of the first app in the LISTEN scenarios.
const LISTENERS: u32 = 50;

/// Two apps with `pool_size = 2` behind their own pooler, each with the scripts' tables.
struct Matrix {
    fixture: MigratedDb,
    pooler: Running,
    apps: [App; 2],
}

impl Matrix {
    async fn start() -> Matrix {
        stack::init_test_logging();
        let fixture = shared_migrated_database().await;
        let pooler = stack::start_pooler(stack::pooler_config(&fixture)).await;
        let provisioner = fixture.provisioner();
        let limits = LimitsPatch {
            pool_size: Some(POOL_SIZE),
            ..Default::default()
        };
        let apps = [
            stack::provision(&provisioner, &limits).await,
            stack::provision(&provisioner, &limits).await,
        ];
        let m = Matrix {
            fixture,
            pooler,
            apps,
        };
        for app in &m.apps {
            // As the app itself, so the tables land in its schema and are its own.
            let client = dataplane_tests::connect(&m.config(app)).await.unwrap();
            client
                .batch_execute(
                    "CREATE TABLE kv (k int PRIMARY KEY, v text NOT NULL);
                     INSERT INTO kv SELECT g, current_user || ':' || g
                         FROM generate_series(1, 100) g;
                     CREATE TABLE items (run text NOT NULL, client int NOT NULL,
                         n int NOT NULL, note text NOT NULL);",
                )
                .await
                .unwrap();
        }
        m
    }

    fn direct() -> bool {
        std::env::var("DP_DRIVERS_DIRECT").is_ok_and(|v| v == "1")
    }

    /// Where the scripts connect: the pooler, or Postgres itself when asked.
    fn endpoint(&self) -> (String, u16) {
        if Self::direct() {
            let cluster = self.fixture.cluster;
            (cluster.host().to_owned(), cluster.port())
        } else {
            ("127.0.0.1".to_owned(), self.pooler.addr.port())
        }
    }

    fn config(&self, app: &App) -> tokio_postgres::Config {
        let (host, port) = self.endpoint();
        let mut c = tokio_postgres::Config::new();
        c.host(&host)
            .port(port)
            .user(&app.role)
            .password(&app.password)
            .dbname(&self.fixture.db)
            .connect_timeout(Duration::from_secs(10));
        c
    }

    /// Runs one scenario script against both apps and fails with its output unless it
    /// exits 0; then checks the pool bound held.
    async fn run(&self, mut cmd: Command) {
        let (host, port) = self.endpoint();
        cmd.env("DP_HOST", host)
            .env("DP_PORT", port.to_string())
            .env("DP_DBNAME", &self.fixture.db);
        for (i, (app, clients)) in self.apps.iter().zip(CLIENTS).enumerate() {
            let n = i + 1;
            cmd.env(format!("DP_APP{n}_USER"), &app.role)
                .env(format!("DP_APP{n}_PASSWORD"), &app.password)
                .env(format!("DP_APP{n}_CLIENTS"), clients.to_string());
        }
        let (stdout, stderr) = run_script(cmd).await;
        // Shown by cargo test for a failing test or with --nocapture.
        println!("{}", stdout.trim_end());
        if !stderr.is_empty() {
            println!("--- stderr\n{}", stderr.trim_end());
        }
        for app in &self.apps {
            let backends = self.fixture.backends(&app.role).await;
            assert!(
                Self::direct() || backends <= i64::from(POOL_SIZE),
                "{} has {backends} server connections, pool_size is {POOL_SIZE}",
                app.role
            );
        }
    }
}

impl Matrix {
    /// Runs a LISTEN scenario script, watching the first app's server count all along:
    /// its pool and one listener server, never more.
    async fn run_listen(&self, mut cmd: Command) {
        let (host, port) = self.endpoint();
        cmd.env("DP_HOST", host)
            .env("DP_PORT", port.to_string())
            .env("DP_DBNAME", &self.fixture.db)
            .env("DP_LISTENERS", LISTENERS.to_string())
            .env("DP_ISOLATED", if Self::direct() { "0" } else { "1" });
        for (i, app) in self.apps.iter().enumerate() {
            let n = i + 1;
            cmd.env(format!("DP_APP{n}_USER"), &app.role)
                .env(format!("DP_APP{n}_PASSWORD"), &app.password);
        }
        let role = self.apps[0].role.clone();
        let admin = self.fixture.admin().await;
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        let watcher = tokio::spawn(async move {
            let mut most = 0i64;
            loop {
                let n: i64 = admin
                    .query_one(
                        "SELECT count(*) FROM pg_stat_activity WHERE usename = $1",
                        &[&role],
                    )
                    .await
                    .unwrap()
                    .get(0);
                most = most.max(n);
                tokio::select! {
                    _ = stopped.changed() => return most,
                    () = tokio::time::sleep(Duration::from_millis(20)) => {}
                }
            }
        });
        let (stdout, stderr) = run_script(cmd).await;
        println!("{}", stdout.trim_end());
        if !stderr.is_empty() {
            println!("--- stderr\n{}", stderr.trim_end());
        }
        stop.send(true).unwrap();
        let most = watcher.await.unwrap();
        println!("{}: at most {most} server connections", self.apps[0].role);
        assert!(
            Self::direct() || most <= i64::from(POOL_SIZE) + 1,
            "{} had {most} server connections at once; pool_size {POOL_SIZE} and one listener",
            self.apps[0].role
        );
    }
}

/// Runs `cmd` to its end within [`SCRIPT_TIMEOUT`] and returns what it printed (stdout,
/// stderr); panics with all of it unless it exits 0.
async fn run_script(mut cmd: Command) -> (String, String) {
    // Not `{cmd:?}`: that would show the passwords in the environment.
    let std = cmd.as_std();
    let shown = std::iter::once(std.get_program())
        .chain(std.get_args())
        .map(|a| a.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ");
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {shown}: {e}; {INSTALL_HINT}"));
    let stdout = read_all(child.stdout.take().unwrap());
    let stderr = read_all(child.stderr.take().unwrap());
    let status = match tokio::time::timeout(SCRIPT_TIMEOUT, child.wait()).await {
        Ok(status) => Some(status.unwrap()),
        Err(_) => {
            child.kill().await.unwrap();
            None
        }
    };
    let stdout = stdout.await.unwrap();
    let stderr = stderr.await.unwrap();
    match status {
        Some(s) if s.success() => (stdout, stderr),
        Some(s) => panic!("{shown} failed ({s})\n--- stdout\n{stdout}\n--- stderr\n{stderr}"),
        None => panic!(
            "{shown} did not finish within {SCRIPT_TIMEOUT:?}\n--- stdout\n{stdout}\n--- stderr\n{stderr}"
        ),
    }
}

fn read_all(
    mut pipe: impl tokio::io::AsyncRead + Unpin + Send + 'static,
) -> tokio::task::JoinHandle<String> {
    tokio::spawn(async move {
        let mut buf = Vec::new();
        let _ = pipe.read_to_end(&mut buf).await;
        String::from_utf8_lossy(&buf).into_owned()
    })
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

fn drivers_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("drivers")
}

/// A path the installer makes; its absence fails the test with how to get it.
fn installed(path: PathBuf) -> PathBuf {
    assert!(
        path.exists(),
        "{} is missing: {INSTALL_HINT}",
        path.display()
    );
    path
}

fn driver_env() -> PathBuf {
    workspace_root().join("target/driver-env")
}

fn java(prepare_threshold: &str) -> Command {
    let jar = installed(PathBuf::from(JDBC_JAR));
    let mut cmd = Command::new("java");
    cmd.arg("-cp")
        .arg(jar)
        .arg(drivers_dir().join("java/PgJdbcMatrix.java"))
        .arg(prepare_threshold);
    cmd
}

fn python(script: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new(installed(driver_env().join("venv/bin/python")));
    cmd.arg(drivers_dir().join("python").join(script))
        .args(args);
    cmd
}

fn node(script: &str) -> Command {
    let modules = installed(driver_env().join("node/node_modules"));
    installed(modules.join("pg"));
    let mut cmd = Command::new("node");
    cmd.arg(drivers_dir().join("node").join(script))
        .env("NODE_PATH", modules);
    cmd
}
