//! Each test gets a migrated database on the binary's shared cluster (or its own
//! cluster), apps from the provisioner library, and its own pooler.

use std::path::{Path, PathBuf};
use std::time::Duration;

use dataplane_tests::fixtures::{MigratedDb, POOLER_PASSWORD};
use dataplane_tests::unique_tenant_id;
use pooler::config::{Config, Secret};
use pooler::{Hooks, Running};
use provisioner::Provisioner;
use provisioner::ddl::{EnsureOutcome, LimitsPatch, OpContext};
use provisioner::names::AppName;

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

/// A pooler configured for tests: loopback, short timeouts.
pub fn config_for(fixture: &MigratedDb) -> Config {
    let mut c = Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        admin_listen: "127.0.0.1:0".parse().unwrap(),
        query_wait_timeout_ms: 10_000,
        ..Config::default()
    };
    c.upstream.host = fixture.cluster.host().to_owned();
    c.upstream.port = fixture.cluster.port();
    c.upstream.dbname = fixture.db.clone();
    c.upstream.auth_password = Some(Secret::new(POOLER_PASSWORD));
    c
}

pub async fn env(tweak: impl FnOnce(&mut Config)) -> Env {
    let fixture = dataplane_tests::fixtures::shared_migrated_database().await;
    env_on(fixture, tweak).await
}

pub async fn env_on(fixture: MigratedDb, tweak: impl FnOnce(&mut Config)) -> Env {
    init_logs();
    let mut config = config_for(&fixture);
    tweak(&mut config);
    let pooler = start_on_own_runtime(config, Hooks::default()).await;
    wait_ready(&pooler).await;
    Env {
        provisioner: fixture.provisioner(),
        fixture,
        pooler,
        config_file: None,
    }
}

fn init_logs() {
    // The pooler's warnings and errors show up in a failing test's output.
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .try_init();
}

/// A pooler started as the binary starts one from a file: the configuration is written
/// as TOML, and a reload re-reads that file and puts back what the environment gives
/// (the secrets, which are never written to it).
pub async fn env_with_file(tweak: impl FnOnce(&mut Config)) -> Env {
    init_logs();
    let fixture = dataplane_tests::fixtures::shared_migrated_database().await;
    let mut config = config_for(&fixture);
    with_admin(&mut config);
    tweak(&mut config);
    let path = std::env::temp_dir().join(format!(
        "pooler-it-{}-{}.toml",
        std::process::id(),
        unique_tenant_id()
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
    let pooler = start_on_own_runtime(config, hooks).await;
    wait_ready(&pooler).await;
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

/// Starts the pooler on a runtime of its own, as in production: the test's clients
/// (SCRAM logins cost CPU) then cannot starve it, and it cannot starve them.
async fn start_on_own_runtime(config: Config, hooks: Hooks) -> Running {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let running = pooler::start_with(config, hooks).await.unwrap();
            let _ = tx.send(running);
            // Serve until the test process ends.
            std::future::pending::<()>().await;
        });
    });
    rx.await.unwrap()
}

/// Until the pooler's LISTEN connection is up: before that, a revocation could be missed.
pub async fn wait_ready(pooler: &Running) {
    for _ in 0..200 {
        if pooler.shared.cache.is_listening() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("the pooler never became ready");
}

pub struct App {
    pub role: String,
    pub password: String,
    pub tenant: u64,
    pub slug: String,
}

impl Env {
    /// A new app through the provisioner library (never hand-written SQL).
    pub async fn app(&self, limits: LimitsPatch) -> App {
        let tenant = unique_tenant_id();
        let name = AppName::parse(&tenant.to_string(), "app", "dev").unwrap();
        match self
            .provisioner
            .ensure(&name, &limits, &OpContext::default())
            .await
            .unwrap()
        {
            EnsureOutcome::Created { record, password } => App {
                role: record.role,
                password: password.expose().to_owned(),
                tenant,
                slug: "app".into(),
            },
            EnsureOutcome::Existing { .. } => panic!("app existed"),
        }
    }

    pub async fn app_with_pool(&self, pool_size: i32) -> App {
        self.app(LimitsPatch {
            pool_size: Some(pool_size),
            ..Default::default()
        })
        .await
    }

    pub fn name(&self, app: &App) -> AppName {
        AppName::parse(&app.tenant.to_string(), &app.slug, "dev").unwrap()
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
        let admin = self.fixture.admin().await;
        admin
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE usename = $1",
                &[&role],
            )
            .await
            .unwrap()
            .get(0)
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
