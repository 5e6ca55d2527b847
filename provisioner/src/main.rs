//! `provisioner`: the command line. Parses flags (each also from the environment),
//! sets up logging, and hands over to the library. The break-glass subcommands live in
//! `ops.rs`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::str::FromStr;
use std::sync::Arc;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand, ValueEnum};
use provisioner::config::{ApiToken, PublicEndpoint};
use provisioner::ddl::Limits;
use provisioner::http::{AppState, app};
use provisioner::metrics::Metrics;
use provisioner::{Provisioner, migrate};

mod ops;

#[derive(Parser)]
#[command(
    version,
    about = "Creates, rotates, limits and deletes each app's schema, role and credentials"
)]
struct Cli {
    /// Log format: `text` for people, `json` for log pipelines.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Apply the migrations in sql/ (as an administrator: superuser or managed admin).
    Migrate {
        /// Postgres URL of an administrator on the apps' database.
        #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
        database_url: String,
        /// The login the provisioner will serve as; created unless it exists.
        #[arg(long, env = "PROVISIONER_ROLE", default_value = migrate::DEFAULT_PROVISIONER_ROLE)]
        provisioner_role: String,
    },
    /// Serve the HTTP API.
    Serve(ServeArgs),
    #[command(flatten)]
    Op(ops::OpCommand),
}

/// The provisioner's own login, shared by `serve` and the break-glass subcommands.
#[derive(clap::Args)]
struct DatabaseArgs {
    /// Postgres URL of the provisioner's own login (dp_provisioner) on the apps' database.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    database_url: String,
}

impl DatabaseArgs {
    fn config(&self) -> anyhow::Result<tokio_postgres::Config> {
        tokio_postgres::Config::from_str(&self.database_url).context("parsing --database-url")
    }
}

/// Where apps reach their database, put into the URIs the API and the CLI return.
#[derive(clap::Args)]
struct PublicArgs {
    /// Host apps connect to (the pooler's Service), put into the returned URIs.
    #[arg(long, env = "PROVISIONER_PUBLIC_HOST", default_value = "localhost")]
    public_host: String,
    /// Port apps connect to.
    #[arg(long, env = "PROVISIONER_PUBLIC_PORT", default_value_t = 5432)]
    public_port: u16,
    /// `sslmode` put into the returned URIs.
    #[arg(long, env = "PROVISIONER_PUBLIC_SSLMODE", default_value = "prefer")]
    public_sslmode: String,
}

impl PublicArgs {
    fn endpoint(self) -> PublicEndpoint {
        PublicEndpoint {
            host: self.public_host,
            port: self.public_port,
            sslmode: self.public_sslmode,
        }
    }
}

#[derive(clap::Args)]
struct ServeArgs {
    #[command(flatten)]
    database: DatabaseArgs,
    #[command(flatten)]
    public: PublicArgs,
    /// Address the HTTP API listens on.
    #[arg(long, env = "PROVISIONER_LISTEN", default_value = "0.0.0.0:8080")]
    listen: SocketAddr,
    /// Bearer token the deploy pipeline must present (at least 16 characters).
    /// Prefer --api-token-file; one of the two is required.
    #[arg(long, env = "PROVISIONER_API_TOKEN", hide_env_values = true)]
    api_token: Option<String>,
    /// File holding the bearer token (e.g. a mounted Kubernetes Secret).
    #[arg(long, env = "PROVISIONER_API_TOKEN_FILE")]
    api_token_file: Option<PathBuf>,
    /// Connections the provisioner keeps to Postgres (operations serialise on a lock,
    /// so a few are plenty).
    #[arg(long, env = "PROVISIONER_DB_POOL_SIZE", default_value_t = 4)]
    db_pool_size: usize,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("provisioner: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = match cli.command {
        Command::Migrate {
            database_url,
            provisioner_role,
        } => runtime.block_on(migrate(&database_url, &provisioner_role)),
        Command::Serve(args) => runtime.block_on(serve(args)),
        // The break-glass subcommands report failures as JSON with their own exit codes.
        Command::Op(op) => return runtime.block_on(ops::run(op)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("provisioner: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(format: LogFormat) {
    provisioner::logging::init(matches!(format, LogFormat::Json));
}

async fn migrate(database_url: &str, provisioner_role: &str) -> anyhow::Result<()> {
    let config =
        tokio_postgres::Config::from_str(database_url).context("parsing --database-url")?;
    let (mut client, connection) = config
        .connect(tokio_postgres::NoTls)
        .await
        .context("connecting to the database")?;
    tokio::spawn(connection);
    let report = migrate::run(&mut client, provisioner_role).await?;
    println!(
        "migrations: {} applied ({}), {} already applied",
        report.applied.len(),
        report.applied.join(", "),
        report.skipped.len()
    );
    Ok(())
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let token = match (&args.api_token, &args.api_token_file) {
        (Some(t), None) => t.clone(),
        (None, Some(path)) => {
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?
        }
        (Some(_), Some(_)) => bail!("give either --api-token or --api-token-file, not both"),
        (None, None) => {
            bail!("an API token is required: set PROVISIONER_API_TOKEN or --api-token-file")
        }
    };
    let token = ApiToken::new(&token)?;
    let provisioner = Provisioner::new(
        args.database.config()?,
        args.db_pool_size,
        Limits::default(),
    )?;
    let state = AppState {
        provisioner,
        token: Arc::new(token),
        public: Arc::new(args.public.endpoint()),
        metrics: Metrics::new()?,
    };
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    tracing::info!(listen = %listener.local_addr()?, "provisioner serving");
    axum::serve(listener, app(state))
        .with_graceful_shutdown(provisioner::logging::shutdown_signal())
        .await?;
    tracing::info!("provisioner stopped");
    Ok(())
}
