//! Each test gets a migrated database on the binary's shared cluster (or its own
//! cluster), apps from the provisioner library, and its own pooler.

use std::path::{Path, PathBuf};
use std::time::Duration;

use dataplane_tests::fixtures::MigratedDb;
use dataplane_tests::stack;
use pooler::config::{Config, Secret};
use pooler::{Hooks, Running};
use provisioner::Provisioner;
use provisioner::ddl::LimitsPatch;
use provisioner::names::AppName;

pub use stack::App;

pub struct Env {
    pub fixture: MigratedDb,
    pub provisioner: Provisioner,
    pub pooler: Running,
    /// The TOML file a reload re-reads, for poolers started by [`env_with_file`].
    pub config_file: Option<PathBuf>,
}

/// The admin console's role in tests, and its password (the pooler gets a verifier).
pub const ADMIN_USER: &str = "dp_admin";
pub const ADMIN_PASSWORD: &str = "console-password-for-tests";

/// Turns the admin console on, as `POOLER_ADMIN_PASSWORD` would.
pub fn with_admin(c: &mut Config) {
    c.admin.user = Some(ADMIN_USER.into());
    c.admin.scram_verifier = Some(Secret::new(postgres_protocol::password::scram_sha_256(
        ADMIN_PASSWORD.as_bytes(),
    )));
}

pub async fn env(tweak: impl FnOnce(&mut Config)) -> Env {
    let fixture = dataplane_tests::fixtures::shared_migrated_database().await;
    env_on(fixture, tweak).await
}

pub async fn env_on(fixture: MigratedDb, tweak: impl FnOnce(&mut Config)) -> Env {
    stack::init_test_logging();
    let mut config = stack::pooler_config(&fixture);
    tweak(&mut config);
    let pooler = stack::start_pooler(config).await;
    Env {
        provisioner: fixture.provisioner(),
        fixture,
        pooler,
        config_file: None,
    }
}

/// A pooler started as the binary starts one from a file: the configuration is written
/// as TOML, and a reload re-reads that file and puts back what the environment gives
/// (the secrets, which are never written to it).
pub async fn env_with_file(tweak: impl FnOnce(&mut Config)) -> Env {
    stack::init_test_logging();
    let fixture = dataplane_tests::fixtures::shared_migrated_database().await;
    let mut config = stack::pooler_config(&fixture);
    with_admin(&mut config);
    tweak(&mut config);
    let path = std::env::temp_dir().join(format!(
        "pooler-it-{}-{}.toml",
        std::process::id(),
        dataplane_tests::unique_tenant_id()
    ));
    write_config(&path, &config);
    let secrets = (
        config.upstream.auth_password.clone(),
        config.admin.scram_verifier.clone(),
    );
    let file = path.clone();
    let hooks = Hooks {
        load_config: Some(Box::new(move || {
            let mut c = Config::from_file(&file)?;
            c.upstream.auth_password = secrets.0.clone();
            c.admin.scram_verifier = secrets.1.clone();
            c.validate()?;
            Ok(c)
        })),
        set_log_filter: None,
    };
    let pooler = stack::start_pooler_with(config, hooks).await;
    Env {
        provisioner: fixture.provisioner(),
        fixture,
        pooler,
        config_file: Some(path),
    }
}

pub fn write_config(path: &Path, config: &Config) {
    std::fs::write(path, toml::to_string(config).unwrap()).unwrap();
}

impl Drop for Env {
    fn drop(&mut self) {
        if let Some(path) = &self.config_file {
            let _ = std::fs::remove_file(path);
        }
    }
}

impl Env {
    /// A new app through the provisioner library (never hand-written SQL).
    pub async fn app(&self, limits: LimitsPatch) -> App {
        stack::provision(&self.provisioner, &limits).await
    }

    pub async fn app_with_pool(&self, pool_size: i32) -> App {
        self.app(LimitsPatch {
            pool_size: Some(pool_size),
            ..Default::default()
        })
        .await
    }

    pub fn name(&self, app: &App) -> AppName {
        app.name()
    }

    /// tokio-postgres config for the pooler.
    pub fn config(&self, user: &str, password: &str) -> tokio_postgres::Config {
        self.config_on_port(user, password, self.pooler.addr.port())
    }

    /// The same, for another of the pooler's ports (the session port).
    pub fn config_on_port(&self, user: &str, password: &str, port: u16) -> tokio_postgres::Config {
        let mut c = tokio_postgres::Config::new();
        c.host("127.0.0.1")
            .port(port)
            .user(user)
            .password(password)
            .dbname(&self.fixture.db)
            .connect_timeout(Duration::from_secs(10));
        c
    }

    /// tokio-postgres config for the admin console.
    pub fn admin_config(&self, password: &str) -> tokio_postgres::Config {
        let mut c = self.config(ADMIN_USER, password);
        c.dbname("pgbouncer");
        c
    }

    /// A session of the admin console.
    pub async fn console(&self) -> tokio_postgres::Client {
        dataplane_tests::connect(&self.admin_config(ADMIN_PASSWORD))
            .await
            .unwrap()
    }

    /// A client of `app` through one of the pooler's ports.
    pub async fn connect_on(&self, app: &App, port: u16) -> tokio_postgres::Client {
        dataplane_tests::connect(&self.config_on_port(&app.role, &app.password, port))
            .await
            .unwrap()
    }

    pub async fn connect(&self, app: &App) -> tokio_postgres::Client {
        dataplane_tests::connect(&self.config(&app.role, &app.password))
            .await
            .unwrap()
    }

    pub async fn try_connect(
        &self,
        user: &str,
        password: &str,
    ) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
        dataplane_tests::connect(&self.config(user, password)).await
    }

    /// Server connections Postgres has for a role right now.
    pub async fn backends(&self, role: &str) -> i64 {
        self.fixture.backends(role).await
    }
}

/// A loopback port free a moment ago, for a pooler process of the test's own.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn sqlstate(e: &tokio_postgres::Error) -> String {
    e.code()
        .map(|c| c.code().to_owned())
        .unwrap_or_else(|| format!("no code: {e}"))
}

pub fn message(e: &tokio_postgres::Error) -> String {
    e.as_db_error()
        .map(|d| d.message().to_owned())
        .unwrap_or_else(|| e.to_string())
}

/// The first column of the first row a simple query returns.
pub async fn value(client: &tokio_postgres::Client, sql: &str) -> String {
    client
        .simple_query(sql)
        .await
        .unwrap()
        .iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
            _ => None,
        })
        .unwrap()
}

/// Waits for the pooler's books to settle (a client's task may still be finishing a
/// step after the client got its answer). A hang guard of 30 s, never a measure.
pub async fn eventually(what: &str, mut ok: impl AsyncFnMut() -> bool) {
    for _ in 0..1500 {
        if ok().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("never: {what}");
}
