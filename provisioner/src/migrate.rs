//! The versioned migrations in `sql/`, applied in order, each in one transaction,
//! recorded in `dataplane_auth.schema_migrations` with a checksum so a re-run skips what
//! is applied and refuses a migration that was edited after it ran.

use tokio_postgres::Client;

/// Serialises concurrent `migrate` runs against one database ("dp_migr").
const MIGRATE_LOCK: i64 = 0x0064_705f_6d69_6772;

/// The default login of the provisioner, created by the first migration unless it
/// exists (on managed Postgres it may be the operator's admin login).
pub const DEFAULT_PROVISIONER_ROLE: &str = "dp_provisioner";

pub struct Migration {
    pub version: i32,
    pub name: &'static str,
    pub sql: &'static str,
}

/// Every migration, oldest first. A new one is appended, never edited in place.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "0001_init",
        sql: include_str!("../../sql/0001_init.sql"),
    },
    Migration {
        version: 2,
        name: "0002_replicas",
        sql: include_str!("../../sql/0002_replicas.sql"),
    },
];

#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error("migration {version} ({name}) failed: {source}")]
    Failed {
        version: i32,
        name: &'static str,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error(
        "migration {version} ({name}) was applied with different contents; add a new migration instead of editing an applied one"
    )]
    Changed { version: i32, name: &'static str },
    #[error("provisioner role {0:?} is not a valid role name")]
    BadRole(String),
}

/// What `run` did, for the CLI to print.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Report {
    pub applied: Vec<&'static str>,
    pub skipped: Vec<&'static str>,
}

/// Applies every pending migration. `provisioner_role` is the login the provisioner
/// will use; the caller must be an administrator (superuser or managed-Postgres admin).
pub async fn run(client: &mut Client, provisioner_role: &str) -> Result<Report, MigrateError> {
    if provisioner_role.is_empty()
        || provisioner_role.len() > 63
        || provisioner_role.starts_with("tk_")
    {
        return Err(MigrateError::BadRole(provisioner_role.to_owned()));
    }
    let mut report = Report::default();
    for m in MIGRATIONS {
        // Roles and grants are cluster-wide but the advisory lock is per database, so
        // migrating two databases of one cluster at once can collide on CREATE ROLE;
        // the loser retries and then finds the role there.
        let mut attempt = 0;
        let applied = loop {
            match apply(client, m, provisioner_role).await {
                Err(MigrateError::Failed { ref source, .. })
                    if attempt < 5 && is_cluster_race(source) =>
                {
                    attempt += 1;
                    tokio::time::sleep(std::time::Duration::from_millis(50 * attempt)).await;
                }
                other => break other?,
            }
        };
        if applied {
            tracing::info!(version = m.version, name = m.name, "migration applied");
            report.applied.push(m.name);
        } else {
            report.skipped.push(m.name);
        }
    }
    Ok(report)
}

fn is_cluster_race(e: &tokio_postgres::Error) -> bool {
    // duplicate_object, unique_violation (on pg_authid), "tuple concurrently updated".
    e.code()
        .is_some_and(|c| matches!(c.code(), "42710" | "23505" | "XX000" | "40001" | "40P01"))
}

/// Applies one migration in one transaction; `false` if it was applied before.
async fn apply(
    client: &mut Client,
    m: &Migration,
    provisioner_role: &str,
) -> Result<bool, MigrateError> {
    let failed = |source| MigrateError::Failed {
        version: m.version,
        name: m.name,
        source,
    };
    let tx = client.transaction().await.map_err(failed)?;
    tx.execute(
        "SELECT pg_catalog.pg_advisory_xact_lock($1)",
        &[&MIGRATE_LOCK],
    )
    .await
    .map_err(failed)?;
    tx.execute(
        "SELECT pg_catalog.set_config('dataplane.provisioner_role', $1, true)",
        &[&provisioner_role],
    )
    .await
    .map_err(failed)?;
    let row = tx
        .query_one(
            "SELECT pg_catalog.to_regclass('dataplane_auth.schema_migrations') IS NOT NULL",
            &[],
        )
        .await
        .map_err(failed)?;
    let tracked: bool = row.try_get(0).map_err(failed)?;
    if tracked {
        let applied = tx
            .query_opt(
                "SELECT checksum = pg_catalog.md5($2) FROM dataplane_auth.schema_migrations WHERE version = $1",
                &[&m.version, &m.sql],
            )
            .await
            .map_err(failed)?;
        if let Some(row) = applied {
            let same: bool = row.try_get(0).map_err(failed)?;
            if !same {
                return Err(MigrateError::Changed {
                    version: m.version,
                    name: m.name,
                });
            }
            return Ok(false);
        }
    }
    tx.batch_execute(m.sql).await.map_err(failed)?;
    tx.execute(
        "INSERT INTO dataplane_auth.schema_migrations (version, name, checksum) VALUES ($1, $2, pg_catalog.md5($3))",
        &[&m.version, &m.name, &m.sql],
    )
    .await
    .map_err(failed)?;
    tx.commit().await.map_err(failed)?;
    Ok(true)
}
