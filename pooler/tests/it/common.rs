//! Each test gets a migrated database on the binary's shared cluster (or its own
//! cluster), apps from the provisioner library, and its own pooler.

use std::time::Duration;

use dataplane_tests::fixtures::MigratedDb;
use dataplane_tests::stack;
use pooler::Running;
use pooler::config::Config;
use provisioner::Provisioner;
use provisioner::ddl::LimitsPatch;
use provisioner::names::AppName;

pub use stack::App;

pub struct Env {
    pub fixture: MigratedDb,
    pub provisioner: Provisioner,
    pub pooler: Running,
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
