//! The transaction helpers every provisioning operation shares: the global lock and
//! timeouts every transaction starts with, the catalog checks, the audit row, ending
//! an app's sessions, and retrying after a lost race.

use std::time::Duration;

use deadpool_postgres::{Object, Transaction};

use super::ProvisionError;
use super::plan::Present;
use crate::names::{AppName, TenantId};

/// Who asked, for the audit log.
#[derive(Debug, Clone, Default)]
pub struct OpContext {
    pub request_id: Option<String>,
}

/// `pg_advisory_xact_lock` key serialising every provisioning transaction ("dp_prov"); tests
/// that GRANT on the database take it too.
pub const PROVISION_LOCK: i64 = 0x0064_705f_7072_6f76;

/// How long delete and suspend wait for an app's sessions to end.
const TERMINATE_WAIT: Duration = Duration::from_secs(10);

/// Runs an idempotent operation again when it lost a race with a concurrent
/// transaction (each attempt is its own transaction, so a retry starts clean).
pub(super) async fn retry<T, F, Fut>(mut op: F) -> Result<T, ProvisionError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, ProvisionError>>,
{
    let mut attempt = 0u64;
    loop {
        match op().await {
            Err(ProvisionError::Transient(why)) if attempt < 4 => {
                attempt += 1;
                tracing::debug!(attempt, %why, "retrying after a concurrent update");
                tokio::time::sleep(Duration::from_millis(20 * attempt)).await;
            }
            other => return other,
        }
    }
}

pub(super) fn tenant_i64(t: TenantId) -> i64 {
    // At most 12 digits, so always in range.
    i64::try_from(t.get()).unwrap_or(i64::MAX)
}

pub(super) async fn begin(client: &mut Object) -> Result<Transaction<'_>, ProvisionError> {
    let tx = client.transaction().await?;
    // Bounded waits: one operation stuck behind a lock must not hold the global lock
    // (and so every other operation) indefinitely.
    tx.batch_execute("SET LOCAL search_path TO ''; SET LOCAL lock_timeout = '10s'; SET LOCAL statement_timeout = '60s'")
        .await?;
    tx.execute(
        "SELECT pg_catalog.pg_advisory_xact_lock($1)",
        &[&PROVISION_LOCK],
    )
    .await?;
    Ok(tx)
}

pub(super) async fn observe(
    tx: &Transaction<'_>,
    name: &AppName,
) -> Result<Present, ProvisionError> {
    let row = tx
        .query_one(
            "SELECT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = $1), \
                    EXISTS (SELECT FROM pg_catalog.pg_namespace WHERE nspname = $1)",
            &[&name.ident()],
        )
        .await?;
    Ok(Present {
        role: row.try_get(0)?,
        schema: row.try_get(1)?,
    })
}

pub(super) async fn audit(
    tx: &Transaction<'_>,
    action: &str,
    name: &AppName,
    ctx: &OpContext,
    detail: &serde_json::Value,
) -> Result<(), ProvisionError> {
    tx.execute(
        "INSERT INTO dataplane_auth.audit_log (action, role_name, request_id, detail) \
         VALUES ($1, $2, $3, ($4::text)::jsonb)",
        &[&action, &name.ident(), &ctx.request_id, &detail.to_string()],
    )
    .await?;
    tracing::info!(action, role = %name, request_id = ctx.request_id.as_deref().unwrap_or(""), "app changed");
    Ok(())
}

pub(super) async fn role_oid(
    tx: &Transaction<'_>,
    name: &AppName,
) -> Result<Option<i64>, ProvisionError> {
    let row = tx
        .query_opt(
            "SELECT oid::int8 FROM pg_catalog.pg_roles WHERE rolname = $1",
            &[&name.ident()],
        )
        .await?;
    Ok(row.map(|r| r.try_get(0)).transpose()?)
}

/// Ends every session of the role (by name, and by oid for sessions whose role was
/// dropped under them) and waits for them to go; Postgres ≥ 14 waits inside
/// `pg_terminate_backend(pid, timeout)`. A session that outlives the wait is an error:
/// the caller must not report the app as gone while it still runs.
pub(super) async fn terminate_sessions(
    client: &Object,
    name: &AppName,
    oid: Option<i64>,
) -> Result<(), ProvisionError> {
    let timeout_ms = i64::try_from(TERMINATE_WAIT.as_millis()).unwrap_or(i64::MAX);
    let rows = client
        .query(
            "SELECT pid, pg_catalog.pg_terminate_backend(pid, $3) FROM pg_catalog.pg_stat_activity \
             WHERE (usename = $1 OR usesysid::int8 = $2) AND pid <> pg_catalog.pg_backend_pid()",
            &[&name.ident(), &oid, &timeout_ms],
        )
        .await?;
    // `false` also means the backend had exited before it could be signalled (the
    // pooler closing its server at the same moment): only those still there linger.
    let unconfirmed: Vec<i32> = rows
        .iter()
        .filter(|r| !r.try_get::<_, bool>(1).unwrap_or(false))
        .filter_map(|r| r.try_get::<_, i32>(0).ok())
        .collect();
    if !unconfirmed.is_empty() {
        // Say what they are doing, for the operator who has to look.
        let lingering = client
            .query(
                "SELECT pid, coalesce(state, ''), coalesce(wait_event_type || ':' || wait_event, ''), \
                        left(coalesce(query, ''), 60) FROM pg_catalog.pg_stat_activity \
                 WHERE pid = ANY($1)",
                &[&unconfirmed],
            )
            .await?;
        if !lingering.is_empty() {
            let detail = lingering
                .iter()
                .map(|r| {
                    format!(
                        "pid {} {} {} {:?}",
                        r.get::<_, i32>(0),
                        r.get::<_, String>(1),
                        r.get::<_, String>(2),
                        r.get::<_, String>(3)
                    )
                })
                .collect::<Vec<_>>()
                .join("; ");
            return Err(ProvisionError::Unavailable(format!(
                "{} session(s) of {name} did not end within {TERMINATE_WAIT:?} ({detail}); retry",
                lingering.len()
            )));
        }
    }
    if !rows.is_empty() {
        tracing::info!(role = %name, sessions = rows.len(), "terminated the app's sessions");
    }
    Ok(())
}
