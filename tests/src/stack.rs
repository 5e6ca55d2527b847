//! An in-process pooler in front of a migrated database, and apps made by the
//! provisioner library: what the pooler's own tests and the cross-crate driver tests
//! both start from.

use std::time::Duration;

use pooler::Running;
use pooler::config::{Config, Secret};
use provisioner::Provisioner;
use provisioner::ddl::{EnsureOutcome, LimitsPatch, OpContext};
use provisioner::names::AppName;

use crate::fixtures::{MigratedDb, POOLER_PASSWORD};

/// The pooler's warnings and errors show up in a failing test's output (`RUST_LOG`
/// overrides the level, e.g. `RUST_LOG=pooler=debug`).
pub fn init_test_logging() {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .try_init();
}

/// A pooler configured for tests: loopback, short timeouts.
pub fn pooler_config(fixture: &MigratedDb) -> Config {
    let mut c = Config {
        listen: "127.0.0.1:0".parse().expect("a socket address"),
        admin_listen: "127.0.0.1:0".parse().expect("a socket address"),
        query_wait_timeout_ms: 10_000,
        ..Config::default()
    };
    c.upstream.host = fixture.cluster.host().to_owned();
    c.upstream.port = fixture.cluster.port();
    c.upstream.dbname = fixture.db.clone();
    c.upstream.auth_password = Some(Secret::new(POOLER_PASSWORD));
    c
}

/// Starts the pooler on a runtime of its own, as in production: the test's clients
/// (SCRAM logins cost CPU) then cannot starve it, and it cannot starve them. Returns
/// once its LISTEN connection is up: before that, a revocation could be missed.
pub async fn start_pooler(config: Config) -> Running {
    start_pooler_with(config, pooler::Hooks::default()).await
}

/// [`start_pooler`], with what reloads need.
pub async fn start_pooler_with(config: Config, hooks: pooler::Hooks) -> Running {
    let (tx, rx) = tokio::sync::oneshot::channel();
    // The pooler serves until the runtime that started it (the test's) is gone: a task
    // there holds `stop`, and its drop ends the pooler's thread, so a test binary's
    // poolers do not pile up their connections in the shared Postgres.
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let _stop = stop;
        std::future::pending::<()>().await;
    });
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("a runtime for the pooler");
        runtime.block_on(async move {
            let running = pooler::start_with(config, hooks)
                .await
                .expect("the pooler starts");
            let _ = tx.send(running);
            let _ = stopped.await;
        });
    });
    let running = rx.await.expect("the pooler's thread hands it over");
    wait_ready(&running).await;
    running
}

async fn wait_ready(pooler: &Running) {
    for _ in 0..200 {
        if pooler.shared.cache.is_listening() && pooler.shared.replicas.registered() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("the pooler never became ready");
}

/// An app and the password the provisioner showed once.
pub struct App {
    pub role: String,
    pub password: String,
    pub tenant: u64,
    pub slug: String,
}

impl App {
    pub fn name(&self) -> AppName {
        AppName::parse(&self.tenant.to_string(), &self.slug, "dev").expect("a valid app name")
    }
}

/// A new app through the provisioner library (never hand-written SQL).
pub async fn provision(provisioner: &Provisioner, limits: &LimitsPatch) -> App {
    let tenant = crate::unique_tenant_id();
    let slug = "app";
    let name = AppName::parse(&tenant.to_string(), slug, "dev").expect("a valid app name");
    match provisioner
        .ensure(&name, limits, &OpContext::default())
        .await
        .expect("ensure succeeds")
    {
        EnsureOutcome::Created { record, password } => App {
            role: record.role,
            password: password.expose().to_owned(),
            tenant,
            slug: slug.into(),
        },
        EnsureOutcome::Existing { .. } => panic!("app {name:?} existed"),
    }
}
