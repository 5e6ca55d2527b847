//! A fresh, migrated database on a cluster, with the service roles' passwords set:
//! what every provisioner and pooler test starts from.

use provisioner::ddl::Limits;
use provisioner::{Provisioner, migrate};

use crate::PgCluster;

/// Test passwords of the service roles (roles are cluster-wide, so every database of
/// a cluster shares them).
pub const PROVISIONER_PASSWORD: &str = "dp-provisioner-test-password";
pub const POOLER_PASSWORD: &str = "dp-pooler-test-password";

pub struct MigratedDb {
    pub cluster: &'static PgCluster,
    pub db: String,
}

/// Roles are cluster-wide, so migrations of parallel tests' databases take turns.
static MIGRATE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A new database on `cluster` with every migration applied.
pub async fn migrated_database(cluster: &'static PgCluster) -> MigratedDb {
    let db = cluster.fresh_database().await;
    let _turn = MIGRATE.lock().await;
    let mut admin = crate::connect(&cluster.superuser_config(&db))
        .await
        .expect("superuser connects");
    migrate::run(&mut admin, migrate::DEFAULT_PROVISIONER_ROLE)
        .await
        .expect("migrations apply");
    admin
        .batch_execute(&format!(
            "ALTER ROLE dp_provisioner PASSWORD '{PROVISIONER_PASSWORD}'; \
             ALTER ROLE dp_pooler PASSWORD '{POOLER_PASSWORD}'"
        ))
        .await
        .expect("set service passwords");
    MigratedDb { cluster, db }
}

/// The shared cluster of this test binary, with a fresh migrated database.
pub async fn shared_migrated_database() -> MigratedDb {
    let cluster = tokio::task::spawn_blocking(PgCluster::shared)
        .await
        .expect("cluster start-up does not panic");
    migrated_database(cluster).await
}

impl MigratedDb {
    /// A provisioner serving as the least-privileged `dp_provisioner`, as in production.
    pub fn provisioner(&self) -> Provisioner {
        Provisioner::new(
            self.cluster
                .config("dp_provisioner", PROVISIONER_PASSWORD, &self.db),
            4,
            Limits::default(),
        )
        .expect("a provisioner")
    }

    pub async fn admin(&self) -> tokio_postgres::Client {
        crate::connect(&self.cluster.superuser_config(&self.db))
            .await
            .expect("superuser connects")
    }

    /// Server connections Postgres has for a role right now.
    pub async fn backends(&self, role: &str) -> i64 {
        self.admin()
            .await
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE usename = $1",
                &[&role],
            )
            .await
            .expect("pg_stat_activity")
            .get(0)
    }
}
