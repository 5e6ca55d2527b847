//! The throwaway cluster every target runs against: the test harness's Postgres, a
//! migrated database, and R apps provisioned through the provisioner library, each
//! with a small table in its own schema.

use anyhow::Context;
use dataplane_tests::fixtures::{MigratedDb, POOLER_PASSWORD, migrated_database};
use dataplane_tests::{PgCluster, StartOptions};
use postgres_protocol::escape::escape_identifier;
use provisioner::ddl::{EnsureOutcome, LimitsPatch, OpContext};
use provisioner::names::AppName;

/// Rows in each app's table; point selects pick one at random.
pub const ROWS: u32 = 1000;

/// One provisioned app: its login role and the password the provisioner returned.
#[derive(Clone)]
pub struct App {
    pub role: String,
    pub password: String,
}

pub struct Fixture {
    pub db: MigratedDb,
    pub apps: Vec<App>,
    /// One more app with no `pool_size` of its own: its pool is the target's
    /// `default_pool_size`, which both poolers get alike (the pgbench (a) scenarios).
    pub hot: App,
}

impl Fixture {
    pub fn cluster(&self) -> &'static PgCluster {
        self.db.cluster
    }

    /// The password of `dp_pooler`, the login both poolers run the auth lookup as.
    pub fn auth_password(&self) -> &'static str {
        POOLER_PASSWORD
    }
}

/// Starts the cluster: enough `max_connections` for direct clients of every scenario,
/// and `log_connections` so server logins can be counted from the log.
pub fn start_cluster(max_connections: u32) -> anyhow::Result<&'static PgCluster> {
    let cluster = PgCluster::start(StartOptions {
        max_connections,
        extra_conf: vec!["log_connections = on".into()],
        tls: None,
    })
    .context("starting the throwaway PostgreSQL")?;
    // The harness's fixtures want a cluster that lives as long as the process; `main`
    // stops it explicitly, and the harness's watchdog does if we die first.
    Ok(Box::leak(Box::new(cluster)))
}

/// A migrated database with `apps` apps, each with `pool_size` server connections in
/// its credentials row, and the hot app with none (the pooler's default applies); no
/// connection limit (direct clients of one role reach 100), and a table `kv` of
/// [`ROWS`] rows that its search_path finds unqualified.
pub async fn prepare(
    cluster: &'static PgCluster,
    apps: usize,
    pool_size: i32,
) -> anyhow::Result<Fixture> {
    let db = migrated_database(cluster).await;
    let provisioner = db.provisioner();
    let admin = db.admin().await;
    let limits = LimitsPatch {
        pool_size: Some(pool_size),
        connection_limit: Some(-1),
        ..LimitsPatch::default()
    };
    let hot_limits = LimitsPatch {
        pool_size: None,
        ..limits.clone()
    };
    let mut out = Vec::with_capacity(apps + 1);
    for tenant in 1..=apps + 1 {
        let (slug, limits) = if tenant <= apps {
            ("bench", &limits)
        } else {
            ("hot", &hot_limits)
        };
        let name = AppName::parse(&tenant.to_string(), slug, "dev")?;
        let EnsureOutcome::Created { record, password } = provisioner
            .ensure(&name, limits, &OpContext::default())
            .await
            .with_context(|| format!("provisioning app {tenant}"))?
        else {
            anyhow::bail!("app {tenant} already existed in a fresh database");
        };
        let schema = escape_identifier(&record.schema);
        let role = escape_identifier(&record.role);
        admin
            .batch_execute(&format!(
                "CREATE TABLE {schema}.kv (id int PRIMARY KEY, v text NOT NULL);
                 INSERT INTO {schema}.kv SELECT g, md5(g::text) FROM generate_series(1, {ROWS}) g;
                 ALTER TABLE {schema}.kv OWNER TO {role};
                 ANALYZE {schema}.kv;"
            ))
            .await
            .with_context(|| format!("creating the table of app {tenant}"))?;
        out.push(App {
            role: record.role,
            password: password.expose().to_owned(),
        });
    }
    let hot = out.pop().context("no hot app")?;
    Ok(Fixture { db, apps: out, hot })
}
