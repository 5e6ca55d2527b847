//! The break-glass subcommands of the `provisioner` binary: the API's operations run
//! straight against the database through the library, for when the HTTP layer is down
//! or unreachable (`kubectl exec` into a provisioner pod, whose environment already
//! names the database and the pooler).
//!
//! Each prints one JSON object on stdout: the body the API returns for the same
//! operation, so scripts work with either. A failure prints `{"code", "detail"}` (the
//! API's problem codes) and exits non-zero; logs go to stderr. Every change is in the
//! audit log under a request id `cli-<uuid>`, so break-glass use stands out there.

use std::process::ExitCode;

use clap::{Args, Subcommand};
use provisioner::Provisioner;
use provisioner::ddl::execute::DeleteOutcome;
use provisioner::ddl::{EnsureOutcome, Limits, LimitsPatch, OpContext, PoolMode, ProvisionError};
use provisioner::names::{AppName, NameError, TenantId};
use provisioner::view::{AppList, AppView};
use serde::Serialize;
use tracing::Instrument;

use crate::{DatabaseArgs, PublicArgs};

#[derive(Subcommand)]
pub enum OpCommand {
    /// Break-glass: create an app unless it exists; prints its password once.
    Ensure(WithLimits),
    /// Break-glass: show one app.
    Get(OneApp),
    /// Break-glass: list every app, or one tenant's.
    List(ListArgs),
    /// Break-glass: a new password (printed once); the old one stops working.
    Rotate(OneApp),
    /// Break-glass: change an app's limits.
    Limits(WithLimits),
    /// Break-glass: NOLOGIN, sessions ended, the pooler told.
    Suspend(OneApp),
    /// Break-glass: undo suspend.
    Resume(OneApp),
    /// Break-glass: remove the app's schema, role and credentials row.
    Delete(OneApp),
}

/// The database to act on and the pooler address the printed URIs name.
#[derive(Args)]
pub struct Target {
    #[command(flatten)]
    database: DatabaseArgs,
    #[command(flatten)]
    public: PublicArgs,
}

/// An app, named as in the API's path: `/v1/apps/{tenant_id}/{slug}/{env}`.
#[derive(Args)]
pub struct AppArgs {
    /// Tenant id: 1 to 12 digits.
    tenant_id: String,
    /// The app's slug, as the user typed it (`my-shop`).
    slug: String,
    /// The environment (`prod`, `dev`, ...).
    env: String,
}

#[derive(Args)]
pub struct OneApp {
    #[command(flatten)]
    target: Target,
    #[command(flatten)]
    app: AppArgs,
}

#[derive(Args)]
pub struct WithLimits {
    #[command(flatten)]
    target: Target,
    #[command(flatten)]
    app: AppArgs,
    #[command(flatten)]
    limits: LimitArgs,
}

#[derive(Args)]
pub struct ListArgs {
    #[command(flatten)]
    target: Target,
    /// Only this tenant's apps.
    #[arg(long)]
    tenant_id: Option<String>,
}

/// The API's limits body as flags; absent flags keep their value (or the default, for a
/// new app).
#[derive(Args)]
pub struct LimitArgs {
    /// CONNECTION LIMIT of the role (-1: none).
    #[arg(long, allow_negative_numbers = true)]
    connection_limit: Option<i32>,
    /// statement_timeout of the role, in ms (0: none).
    #[arg(long)]
    statement_timeout_ms: Option<i32>,
    /// idle_in_transaction_session_timeout of the role, in ms (0: none).
    #[arg(long)]
    idle_in_transaction_session_timeout_ms: Option<i32>,
    /// lock_timeout of the role, in ms (0: none).
    #[arg(long)]
    lock_timeout_ms: Option<i32>,
    /// Server connections per pooler replica.
    #[arg(long)]
    pool_size: Option<i32>,
    /// `transaction` or `session`.
    #[arg(long, value_parser = parse_pool_mode)]
    pool_mode: Option<PoolMode>,
    /// Client connections per pooler replica.
    #[arg(long)]
    max_client_conn: Option<i32>,
}

fn parse_pool_mode(s: &str) -> Result<PoolMode, String> {
    PoolMode::parse(s).ok_or_else(|| format!("{s:?}: expected transaction or session"))
}

impl From<LimitArgs> for LimitsPatch {
    fn from(a: LimitArgs) -> Self {
        LimitsPatch {
            connection_limit: a.connection_limit,
            statement_timeout_ms: a.statement_timeout_ms,
            idle_in_transaction_session_timeout_ms: a.idle_in_transaction_session_timeout_ms,
            lock_timeout_ms: a.lock_timeout_ms,
            pool_size: a.pool_size,
            pool_mode: a.pool_mode,
            max_client_conn: a.max_client_conn,
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum OpError {
    #[error(transparent)]
    Name(#[from] NameError),
    #[error("{0}")]
    Arguments(String),
    #[error(transparent)]
    Provision(#[from] ProvisionError),
    #[error("encoding the output: {0}")]
    Output(#[from] serde_json::Error),
}

impl OpError {
    /// The API's problem code for the same failure, and the exit status: 2 for input
    /// the command refuses (as clap's usage errors), 3 not found, 4 conflict, 1 else.
    fn code(&self) -> (&'static str, u8) {
        match self {
            OpError::Name(_) => ("invalid_name", 2),
            OpError::Arguments(_) => ("invalid_arguments", 2),
            OpError::Provision(ProvisionError::InvalidLimits(_)) => ("invalid_limits", 2),
            OpError::Provision(ProvisionError::NotFound(_)) => ("not_found", 3),
            OpError::Provision(ProvisionError::Conflict(_)) => ("conflict", 4),
            OpError::Provision(ProvisionError::Unavailable(_) | ProvisionError::Transient(_)) => {
                ("database_unavailable", 1)
            }
            OpError::Provision(_) | OpError::Output(_) => ("internal", 1),
        }
    }
}

/// Runs one subcommand and prints its result.
pub async fn run(command: OpCommand) -> ExitCode {
    let ctx = OpContext {
        request_id: Some(format!("cli-{}", uuid::Uuid::new_v4())),
    };
    let span = tracing::info_span!(
        "cli",
        request_id = ctx.request_id.as_deref().unwrap_or_default()
    );
    match execute(command, &ctx).instrument(span).await {
        Ok(out) => {
            println!("{out}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            let (code, status) = e.code();
            tracing::error!(code, "{e}");
            println!(
                "{}",
                serde_json::json!({ "code": code, "detail": e.to_string() })
            );
            ExitCode::from(status)
        }
    }
}

/// `ensure` says whether it created the app, which the API says with 201 or 200.
#[derive(Serialize)]
struct Ensured {
    outcome: &'static str,
    #[serde(flatten)]
    app: AppView,
}

#[derive(Serialize)]
struct Deleted {
    role: String,
    outcome: &'static str,
}

async fn execute(command: OpCommand, ctx: &OpContext) -> Result<String, OpError> {
    let json = match command {
        OpCommand::Ensure(a) => {
            let (p, public, name) = open(a.target, &a.app)?;
            let patch = LimitsPatch::from(a.limits);
            let (outcome, app) = match p.ensure(&name, &patch, ctx).await? {
                EnsureOutcome::Created { record, password } => {
                    ("created", AppView::new(record, &public, Some(&password)))
                }
                EnsureOutcome::Existing { record } => {
                    ("existing", AppView::new(record, &public, None))
                }
            };
            serde_json::to_string(&Ensured { outcome, app })?
        }
        OpCommand::Get(a) => {
            let (p, public, name) = open(a.target, &a.app)?;
            serde_json::to_string(&AppView::new(p.get(&name).await?, &public, None))?
        }
        OpCommand::List(a) => {
            let tenant = a.tenant_id.as_deref().map(TenantId::parse).transpose()?;
            let (p, public) = connect(a.target)?;
            serde_json::to_string(&AppList::new(p.list(tenant).await?, &public))?
        }
        OpCommand::Rotate(a) => {
            let (p, public, name) = open(a.target, &a.app)?;
            let out = p.rotate(&name, ctx).await?;
            serde_json::to_string(&AppView::new(out.record, &public, Some(&out.password)))?
        }
        OpCommand::Limits(a) => {
            let (p, public, name) = open(a.target, &a.app)?;
            let patch = LimitsPatch::from(a.limits);
            if patch.is_empty() {
                return Err(OpError::Arguments(
                    "give at least one limit (see `provisioner limits --help`)".into(),
                ));
            }
            let record = p.set_limits(&name, &patch, ctx).await?;
            serde_json::to_string(&AppView::new(record, &public, None))?
        }
        OpCommand::Suspend(a) => set_disabled(a, true, ctx).await?,
        OpCommand::Resume(a) => set_disabled(a, false, ctx).await?,
        OpCommand::Delete(a) => {
            let (p, _, name) = open(a.target, &a.app)?;
            let outcome = match p.delete(&name, ctx).await? {
                DeleteOutcome::Deleted => "deleted",
                DeleteOutcome::AlreadyGone => "already_gone",
            };
            serde_json::to_string(&Deleted {
                role: name.ident().to_owned(),
                outcome,
            })?
        }
    };
    Ok(json)
}

async fn set_disabled(a: OneApp, disabled: bool, ctx: &OpContext) -> Result<String, OpError> {
    let (p, public, name) = open(a.target, &a.app)?;
    let record = p.set_disabled(&name, disabled, ctx).await?;
    Ok(serde_json::to_string(&AppView::new(record, &public, None))?)
}

/// The app's name is checked before anything connects, as the API answers 422 first.
fn open(
    target: Target,
    app: &AppArgs,
) -> Result<(Provisioner, provisioner::PublicEndpoint, AppName), OpError> {
    let name = AppName::parse(&app.tenant_id, &app.slug, &app.env)?;
    let (p, public) = connect(target)?;
    Ok((p, public, name))
}

fn connect(target: Target) -> Result<(Provisioner, provisioner::PublicEndpoint), OpError> {
    let config = target
        .database
        .config()
        .map_err(|e| OpError::Arguments(format!("{e:#}")))?;
    // One connection: a command runs one operation, one statement at a time.
    let p = Provisioner::new(config, 1, Limits::default())?;
    Ok((p, target.public.endpoint()))
}
