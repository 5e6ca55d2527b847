//! Runs the planned statements: one transaction per step, `SET LOCAL search_path TO ''`
//! first (CVE-2018-1058), then one global advisory lock, then check-then-change.
//!
//! The lock is global, not per app: concurrent `GRANT CONNECT` on the shared
//! `pg_database` row fails with "tuple concurrently updated" even for different roles.

use std::time::Duration;

use deadpool_postgres::{Object, Pool, Transaction};
use tokio_postgres::Row;

use super::plan::{self, Present};
use super::tx::{
    OpContext, audit, begin, observe, retry, role_oid, tenant_i64, terminate_sessions,
};
use super::{AppRecord, Limits, LimitsPatch, PoolLimits, PoolMode, ProvisionError, RoleLimits};
use crate::names::{AppName, TenantId};
use crate::secret::Password;

#[derive(Debug)]
pub enum EnsureOutcome {
    /// The app did not exist; here is its one-time password.
    Created {
        record: AppRecord,
        password: Password,
    },
    /// The app existed and is unchanged.
    Existing { record: AppRecord },
}

#[derive(Debug)]
pub struct RotateOutcome {
    pub record: AppRecord,
    pub password: Password,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeleteOutcome {
    Deleted,
    AlreadyGone,
}

/// The provisioning operations, over a small pool of connections as the provisioner's
/// own role.
#[derive(Clone)]
pub struct Provisioner {
    pool: Pool,
    database: String,
    defaults: Limits,
}

const RECORD_COLUMNS: &str = "role_name, tenant_id, slug, env, disabled, generation, \
     pool_size, pool_mode, max_client_conn, connection_limit, statement_timeout_ms, \
     idle_in_transaction_session_timeout_ms, lock_timeout_ms, \
     to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'), \
     to_char(updated_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'), \
     to_char(rotated_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')";

impl Provisioner {
    /// A provisioner for the database `config` names. Connects lazily: a database that
    /// is down at start-up makes requests fail with `Unavailable`, not the process.
    pub fn new(
        config: tokio_postgres::Config,
        max_connections: usize,
        defaults: Limits,
    ) -> Result<Self, ProvisionError> {
        let database = config
            .get_dbname()
            .or(config.get_user())
            .unwrap_or("postgres")
            .to_owned();
        let manager = deadpool_postgres::Manager::from_config(
            config,
            tokio_postgres::NoTls,
            deadpool_postgres::ManagerConfig {
                recycling_method: deadpool_postgres::RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(max_connections)
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .wait_timeout(Some(Duration::from_secs(10)))
            .create_timeout(Some(Duration::from_secs(5)))
            .recycle_timeout(Some(Duration::from_secs(5)))
            .build()
            .map_err(|e| ProvisionError::Unavailable(e.to_string()))?;
        Ok(Provisioner {
            pool,
            database,
            defaults,
        })
    }

    /// The database the apps live in.
    pub fn database(&self) -> &str {
        &self.database
    }

    /// Succeeds when the database answers a query.
    pub async fn ping(&self) -> Result<(), ProvisionError> {
        let client = self.client().await?;
        client.simple_query("SELECT 1").await?;
        Ok(())
    }

    /// Creates the app if it does not exist, with `patch` over the default limits. An
    /// existing app is returned unchanged: never its password, nor its limits.
    pub async fn ensure(
        &self,
        name: &AppName,
        patch: &LimitsPatch,
        ctx: &OpContext,
    ) -> Result<EnsureOutcome, ProvisionError> {
        retry(|| self.ensure_once(name, patch, ctx)).await
    }

    async fn ensure_once(
        &self,
        name: &AppName,
        patch: &LimitsPatch,
        ctx: &OpContext,
    ) -> Result<EnsureOutcome, ProvisionError> {
        let mut client = self.client().await?;
        let tx = begin(&mut client).await?;
        let present = observe(&tx, name).await?;
        let existing = self.record(&tx, name).await?;
        let outcome = match (existing, present.role) {
            // The rule: an existing app is left exactly as it is (limits change
            // through PATCH), so concurrent or repeated deploys cannot fight.
            (Some(record), true) => EnsureOutcome::Existing { record },
            (None, false) if !present.schema => {
                let limits = patch
                    .apply(&self.defaults)
                    .map_err(ProvisionError::InvalidLimits)?;
                let password = Password::generate()?;
                let verifier = password.verifier();
                for sql in plan::create_app(name, &self.database, &limits.role, &verifier) {
                    tx.batch_execute(&sql).await?;
                }
                let sql = format!(
                    "INSERT INTO dataplane_auth.credentials (role_name, tenant_id, slug, env, scram_verifier, \
                     pool_size, pool_mode, max_client_conn, connection_limit, statement_timeout_ms, \
                     idle_in_transaction_session_timeout_ms, lock_timeout_ms) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12) RETURNING {RECORD_COLUMNS}"
                );
                let tenant = tenant_i64(name.tenant());
                let row = tx
                    .query_one(
                        &sql,
                        &[
                            &name.ident(),
                            &tenant,
                            &name.slug().as_str(),
                            &name.env().as_str(),
                            &verifier.as_str(),
                            &limits.pool.pool_size,
                            &limits.pool.pool_mode.as_str(),
                            &limits.pool.max_client_conn,
                            &limits.role.connection_limit,
                            &limits.role.statement_timeout_ms,
                            &limits.role.idle_in_transaction_session_timeout_ms,
                            &limits.role.lock_timeout_ms,
                        ],
                    )
                    .await?;
                audit(
                    &tx,
                    "create",
                    name,
                    ctx,
                    &serde_json::to_value(limits).unwrap_or_default(),
                )
                .await?;
                EnsureOutcome::Created {
                    record: self.record_from_row(&row)?,
                    password,
                }
            }
            (Some(_), false) => {
                return Err(ProvisionError::Conflict(format!(
                    "{name} has a credentials row but no role; delete it and ensure again"
                )));
            }
            (None, _) => {
                return Err(ProvisionError::Conflict(format!(
                    "a role or schema named {name} exists but is not managed by the provisioner"
                )));
            }
        };
        tx.commit().await?;
        Ok(outcome)
    }

    pub async fn get(&self, name: &AppName) -> Result<AppRecord, ProvisionError> {
        let client = self.client().await?;
        let sql =
            format!("SELECT {RECORD_COLUMNS} FROM dataplane_auth.credentials WHERE role_name = $1");
        match client.query_opt(&sql, &[&name.ident()]).await? {
            Some(row) => self.record_from_row(&row),
            None => Err(ProvisionError::NotFound(name.to_string())),
        }
    }

    /// Every app, or a tenant's apps, ordered by role name.
    pub async fn list(&self, tenant: Option<TenantId>) -> Result<Vec<AppRecord>, ProvisionError> {
        let client = self.client().await?;
        let sql = format!(
            "SELECT {RECORD_COLUMNS} FROM dataplane_auth.credentials \
             WHERE $1::int8 IS NULL OR tenant_id = $1 ORDER BY role_name"
        );
        let tenant = tenant.map(tenant_i64);
        let rows = client.query(&sql, &[&tenant]).await?;
        rows.iter().map(|r| self.record_from_row(r)).collect()
    }

    /// A new password; the old one stops working when this commits. The role's
    /// verifier and the credentials row change in the same transaction.
    pub async fn rotate(
        &self,
        name: &AppName,
        ctx: &OpContext,
    ) -> Result<RotateOutcome, ProvisionError> {
        retry(|| self.rotate_once(name, ctx)).await
    }

    async fn rotate_once(
        &self,
        name: &AppName,
        ctx: &OpContext,
    ) -> Result<RotateOutcome, ProvisionError> {
        let mut client = self.client().await?;
        let tx = begin(&mut client).await?;
        self.require(&tx, name).await?;
        let password = Password::generate()?;
        let verifier = password.verifier();
        for sql in plan::set_password(name, &verifier) {
            tx.batch_execute(&sql).await?;
        }
        let sql = format!(
            "UPDATE dataplane_auth.credentials SET scram_verifier = $2, generation = generation + 1, \
             rotated_at = now(), updated_at = now() WHERE role_name = $1 RETURNING {RECORD_COLUMNS}"
        );
        let row = tx
            .query_one(&sql, &[&name.ident(), &verifier.as_str()])
            .await?;
        audit(&tx, "rotate_password", name, ctx, &serde_json::json!({})).await?;
        let record = self.record_from_row(&row)?;
        tx.commit().await?;
        Ok(RotateOutcome { record, password })
    }

    /// Suspend (`disabled = true`: NOLOGIN, sessions ended) or resume an app.
    pub async fn set_disabled(
        &self,
        name: &AppName,
        disabled: bool,
        ctx: &OpContext,
    ) -> Result<AppRecord, ProvisionError> {
        retry(|| self.set_disabled_once(name, disabled, ctx)).await
    }

    async fn set_disabled_once(
        &self,
        name: &AppName,
        disabled: bool,
        ctx: &OpContext,
    ) -> Result<AppRecord, ProvisionError> {
        let mut client = self.client().await?;
        let tx = begin(&mut client).await?;
        let record = self.require(&tx, name).await?;
        let record = if record.disabled == disabled {
            record
        } else {
            for sql in plan::set_login(name, !disabled) {
                tx.batch_execute(&sql).await?;
            }
            let sql = format!(
                "UPDATE dataplane_auth.credentials SET disabled = $2, updated_at = now() \
                 WHERE role_name = $1 RETURNING {RECORD_COLUMNS}"
            );
            let row = tx.query_one(&sql, &[&name.ident(), &disabled]).await?;
            let action = if disabled { "suspend" } else { "resume" };
            audit(&tx, action, name, ctx, &serde_json::json!({})).await?;
            self.record_from_row(&row)?
        };
        let oid = role_oid(&tx, name).await?;
        tx.commit().await?;
        if disabled {
            // After the commit, so the role cannot log straight back in.
            terminate_sessions(&client, name, oid).await?;
        }
        Ok(record)
    }

    pub async fn set_limits(
        &self,
        name: &AppName,
        patch: &LimitsPatch,
        ctx: &OpContext,
    ) -> Result<AppRecord, ProvisionError> {
        retry(|| self.set_limits_once(name, patch, ctx)).await
    }

    async fn set_limits_once(
        &self,
        name: &AppName,
        patch: &LimitsPatch,
        ctx: &OpContext,
    ) -> Result<AppRecord, ProvisionError> {
        let mut client = self.client().await?;
        let tx = begin(&mut client).await?;
        let record = self.require(&tx, name).await?;
        let record = self.apply_limits(&tx, name, record, patch, ctx).await?;
        tx.commit().await?;
        Ok(record)
    }

    /// Removes everything of the app, in design.md's order, each step idempotent:
    /// disable the row and NOLOGIN (committed, so the pooler drops it and nobody logs
    /// in again), end its sessions, then drop schema, owned objects, role and row.
    pub async fn delete(
        &self,
        name: &AppName,
        ctx: &OpContext,
    ) -> Result<DeleteOutcome, ProvisionError> {
        retry(|| self.delete_once(name, ctx)).await
    }

    async fn delete_once(
        &self,
        name: &AppName,
        ctx: &OpContext,
    ) -> Result<DeleteOutcome, ProvisionError> {
        let mut client = self.client().await?;
        let oid = {
            let tx = begin(&mut client).await?;
            let present = observe(&tx, name).await?;
            let record = self.record(&tx, name).await?;
            match (&record, present) {
                (
                    None,
                    Present {
                        role: false,
                        schema: false,
                    },
                ) => return Ok(DeleteOutcome::AlreadyGone),
                (None, _) => {
                    return Err(ProvisionError::Conflict(format!(
                        "a role or schema named {name} exists but is not managed by the provisioner"
                    )));
                }
                (Some(record), _) => {
                    if !record.disabled {
                        tx.execute(
                            "UPDATE dataplane_auth.credentials SET disabled = true, updated_at = now() \
                             WHERE role_name = $1",
                            &[&name.ident()],
                        )
                        .await?;
                    }
                }
            }
            if present.role {
                for sql in plan::set_login(name, false) {
                    tx.batch_execute(&sql).await?;
                }
            }
            let oid = role_oid(&tx, name).await?;
            tx.commit().await?;
            oid
        };
        terminate_sessions(&client, name, oid).await?;
        let tx = begin(&mut client).await?;
        let present = observe(&tx, name).await?;
        // A resume between the two transactions would let sessions in again.
        let row = tx
            .query_opt(
                "SELECT r.rolcanlogin, c.disabled FROM pg_catalog.pg_roles r \
                 FULL JOIN dataplane_auth.credentials c ON c.role_name = r.rolname \
                 WHERE r.rolname = $1 OR c.role_name = $1",
                &[&name.ident()],
            )
            .await?;
        if let Some(row) = row {
            let can_login: Option<bool> = row.try_get(0)?;
            let disabled: Option<bool> = row.try_get(1)?;
            if can_login == Some(true) || disabled == Some(false) {
                return Err(ProvisionError::Conflict(format!(
                    "{name} was resumed while it was being deleted; delete it again"
                )));
            }
        }
        for sql in plan::drop_app(name, present) {
            tx.batch_execute(&sql).await?;
        }
        tx.execute(
            "DELETE FROM dataplane_auth.credentials WHERE role_name = $1",
            &[&name.ident()],
        )
        .await?;
        audit(&tx, "delete", name, ctx, &serde_json::json!({})).await?;
        tx.commit().await?;
        // A login that was mid-authentication when we looked has a session now that
        // outlives DROP ROLE; end it by the role's oid.
        terminate_sessions(&client, name, oid).await?;
        Ok(DeleteOutcome::Deleted)
    }

    async fn client(&self) -> Result<Object, ProvisionError> {
        Ok(self.pool.get().await?)
    }

    async fn record(
        &self,
        tx: &Transaction<'_>,
        name: &AppName,
    ) -> Result<Option<AppRecord>, ProvisionError> {
        let sql =
            format!("SELECT {RECORD_COLUMNS} FROM dataplane_auth.credentials WHERE role_name = $1");
        tx.query_opt(&sql, &[&name.ident()])
            .await?
            .map(|row| self.record_from_row(&row))
            .transpose()
    }

    async fn require(
        &self,
        tx: &Transaction<'_>,
        name: &AppName,
    ) -> Result<AppRecord, ProvisionError> {
        self.record(tx, name)
            .await?
            .ok_or_else(|| ProvisionError::NotFound(name.to_string()))
    }

    async fn apply_limits(
        &self,
        tx: &Transaction<'_>,
        name: &AppName,
        record: AppRecord,
        patch: &LimitsPatch,
        ctx: &OpContext,
    ) -> Result<AppRecord, ProvisionError> {
        let new = patch
            .apply(&record.limits)
            .map_err(ProvisionError::InvalidLimits)?;
        if new == record.limits {
            return Ok(record);
        }
        for sql in plan::change_limits(name, &record.limits.role, &new.role) {
            tx.batch_execute(&sql).await?;
        }
        let sql = format!(
            "UPDATE dataplane_auth.credentials SET pool_size = $2, pool_mode = $3, max_client_conn = $4, \
             connection_limit = $5, statement_timeout_ms = $6, idle_in_transaction_session_timeout_ms = $7, \
             lock_timeout_ms = $8, updated_at = now() WHERE role_name = $1 RETURNING {RECORD_COLUMNS}"
        );
        let row = tx
            .query_one(
                &sql,
                &[
                    &name.ident(),
                    &new.pool.pool_size,
                    &new.pool.pool_mode.as_str(),
                    &new.pool.max_client_conn,
                    &new.role.connection_limit,
                    &new.role.statement_timeout_ms,
                    &new.role.idle_in_transaction_session_timeout_ms,
                    &new.role.lock_timeout_ms,
                ],
            )
            .await?;
        audit(
            tx,
            "set_limits",
            name,
            ctx,
            &serde_json::to_value(patch).unwrap_or_default(),
        )
        .await?;
        self.record_from_row(&row)
    }

    fn record_from_row(&self, row: &Row) -> Result<AppRecord, ProvisionError> {
        let role: String = row.try_get(0)?;
        let tenant: i64 = row.try_get(1)?;
        let pool_mode: String = row.try_get(7)?;
        let pool_mode = PoolMode::parse(&pool_mode).ok_or_else(|| {
            ProvisionError::Conflict(format!("{role} has an unknown pool_mode {pool_mode:?}"))
        })?;
        Ok(AppRecord {
            schema: role.clone(),
            role,
            database: self.database.clone(),
            tenant_id: u64::try_from(tenant).unwrap_or_default(),
            slug: row.try_get(2)?,
            env: row.try_get(3)?,
            disabled: row.try_get(4)?,
            generation: row.try_get(5)?,
            limits: Limits {
                role: RoleLimits {
                    connection_limit: row.try_get(9)?,
                    statement_timeout_ms: row.try_get(10)?,
                    idle_in_transaction_session_timeout_ms: row.try_get(11)?,
                    lock_timeout_ms: row.try_get(12)?,
                },
                pool: PoolLimits {
                    pool_size: row.try_get(6)?,
                    pool_mode,
                    max_client_conn: row.try_get(8)?,
                },
            },
            created_at: row.try_get(13)?,
            updated_at: row.try_get(14)?,
            rotated_at: row.try_get(15)?,
        })
    }
}
