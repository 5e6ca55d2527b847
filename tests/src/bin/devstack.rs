//! `devstack`: the whole data-plane on one machine, for trying it out.
//!
//! Starts a throwaway PostgreSQL (the test harness's), migrates it, serves the
//! provisioner API and the pooler (`--replicas N`: N pooler replicas sharing one
//! budget, as in production), provisions a demo app and prints a ready `psql` line
//! that goes through each replica. Ctrl-C stops everything and removes the cluster's
//! directory.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use dataplane_tests::{PgCluster, StartOptions};
use provisioner::config::{ApiToken, PublicEndpoint};
use provisioner::ddl::{EnsureOutcome, Limits, LimitsPatch, OpContext};
use provisioner::http::{AppState, app};
use provisioner::metrics::Metrics;
use provisioner::names::AppName;
use provisioner::{Provisioner, migrate};

/// The database all apps share, as on cluster B.
const DATABASE: &str = "talkide_dataplane";

#[derive(Parser)]
#[command(
    about = "Run Postgres + provisioner locally with a demo app (Ctrl-C stops and cleans up)"
)]
struct Args {
    /// Where the provisioner API listens.
    #[arg(long, env = "PROVISIONER_LISTEN", default_value = "127.0.0.1:8080")]
    provisioner_listen: SocketAddr,
    /// Where the pooler listens for apps (transaction pooling).
    #[arg(long, default_value = "127.0.0.1:6432")]
    pooler_listen: SocketAddr,
    /// The pooler's session-pooling port.
    #[arg(long, default_value = "127.0.0.1:6433")]
    pooler_session_listen: SocketAddr,
    /// The pooler's /healthz and /readyz.
    #[arg(long, default_value = "127.0.0.1:9930")]
    pooler_admin_listen: SocketAddr,
    /// Pooler replicas, sharing one budget through the registry in Postgres. Replica
    /// i listens on the ports above plus 2i (client, session) and i (admin).
    #[arg(long, env = "DEV_REPLICAS", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=8))]
    replicas: u16,
    /// The demo app to provision: tenant id, slug, env.
    #[arg(long, num_args = 3, value_names = ["TENANT", "SLUG", "ENV"], default_values = ["1", "demo", "dev"])]
    demo: Vec<String>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    provisioner::logging::init(false);

    eprintln!("starting a throwaway PostgreSQL …");
    let cluster = PgCluster::start(StartOptions::default()).context("starting PostgreSQL")?;
    let runtime = tokio::runtime::Runtime::new()?;
    let result = runtime.block_on(run(&cluster, &args));
    // Dropping the cluster stops it and removes its directory.
    drop(cluster);
    eprintln!("stopped; the cluster's directory is gone");
    result
}

async fn run(cluster: &PgCluster, args: &Args) -> anyhow::Result<()> {
    let admin = dataplane_tests::connect(&cluster.superuser_config("postgres")).await?;
    admin
        .batch_execute(&format!("CREATE DATABASE {DATABASE}"))
        .await?;
    let mut admin = dataplane_tests::connect(&cluster.superuser_config(DATABASE)).await?;
    migrate::run(&mut admin, migrate::DEFAULT_PROVISIONER_ROLE).await?;
    let provisioner_password = random_token()?;
    let pooler_password = random_token()?;
    admin
        .batch_execute(&format!(
            "ALTER ROLE {} PASSWORD {}; ALTER ROLE dp_pooler PASSWORD {}",
            migrate::DEFAULT_PROVISIONER_ROLE,
            postgres_protocol::escape::escape_literal(&provisioner_password),
            postgres_protocol::escape::escape_literal(&pooler_password),
        ))
        .await?;

    let console_password = random_token()?;
    let mut poolers = Vec::new();
    for i in 0..args.replicas {
        let shift =
            |addr: SocketAddr, by: u16| SocketAddr::new(addr.ip(), addr.port().saturating_add(by));
        let mut config = pooler::config::Config {
            listen: shift(args.pooler_listen, 2 * i),
            session_listen: Some(shift(args.pooler_session_listen, 2 * i)),
            admin_listen: shift(args.pooler_admin_listen, i),
            ..Default::default()
        };
        config.upstream.host = cluster.host().to_owned();
        config.upstream.port = cluster.port();
        config.upstream.dbname = DATABASE.to_owned();
        config.upstream.auth_password = Some(pooler::config::Secret::new(pooler_password.clone()));
        config.admin.user = Some("dp_admin".into());
        config.admin.scram_verifier = Some(pooler::config::Secret::new(
            postgres_protocol::password::scram_sha_256(console_password.as_bytes()),
        ));
        let session = config.session_listen;
        let pooler = pooler::start(config)
            .await
            .with_context(|| format!("starting pooler replica {i}"))?;
        poolers.push((pooler, session));
    }
    let Some((pooler, _)) = poolers.first() else {
        anyhow::bail!("no pooler replica started");
    };

    let provisioner = Provisioner::new(
        cluster.config(
            migrate::DEFAULT_PROVISIONER_ROLE,
            &provisioner_password,
            DATABASE,
        ),
        4,
        Limits::default(),
    )?;
    let [tenant, slug, env] = args.demo.as_slice() else {
        anyhow::bail!("--demo takes three values: TENANT SLUG ENV");
    };
    let name = AppName::parse(tenant, slug, env)?;
    let EnsureOutcome::Created { record, password } = provisioner
        .ensure(&name, &LimitsPatch::default(), &OpContext::default())
        .await?
    else {
        anyhow::bail!("the demo app already existed in a brand-new cluster");
    };

    let token = random_token()?;
    let public = PublicEndpoint {
        host: pooler.addr.ip().to_string(),
        port: pooler.addr.port(),
        sslmode: "disable".into(),
    };
    let state = AppState {
        provisioner,
        token: Arc::new(ApiToken::new(&token)?),
        public: Arc::new(public),
        metrics: Metrics::new()?,
    };
    let listener = tokio::net::TcpListener::bind(args.provisioner_listen)
        .await
        .with_context(|| format!("binding {}", args.provisioner_listen))?;
    let api = listener.local_addr()?;

    println!();
    println!("dataplane dev stack is up (Ctrl-C stops it and deletes everything)");
    println!();
    println!("  postgres     {}", cluster.superuser_url(DATABASE));
    for (i, (p, session)) in poolers.iter().enumerate() {
        let name = if poolers.len() > 1 {
            format!("pooler {i}")
        } else {
            "pooler".into()
        };
        let session = session.map_or_else(String::new, |s| s.to_string());
        println!(
            "  {name:<12} {} (transaction), {session} (session), http://{}/readyz, http://{}/v1/replicas",
            p.addr, p.admin_addr, p.admin_addr
        );
        println!(
            "  {:<12} psql \"postgresql://dp_admin:{console_password}@{}:{}/pgbouncer?sslmode=disable\" -c 'SHOW PEERS'",
            "  console",
            p.addr.ip(),
            p.addr.port()
        );
    }
    println!("  provisioner  http://{api}   token {token}");
    println!();
    println!(
        "demo app {} through the pooler (password shown once, as the API does):",
        record.role
    );
    for (p, _) in &poolers {
        println!(
            "  psql \"postgresql://{}:{}@{}:{}/{DATABASE}?sslmode=disable\"",
            record.role,
            password.expose(),
            p.addr.ip(),
            p.addr.port()
        );
    }
    println!();
    println!("provision another:");
    println!("  curl -s -X PUT -H 'Authorization: Bearer {token}' http://{api}/v1/apps/1/shop/dev");
    println!();

    axum::serve(listener, app(state))
        .with_graceful_shutdown(provisioner::logging::shutdown_signal())
        .await?;
    for (p, _) in poolers {
        p.shutdown(std::time::Duration::from_secs(5)).await;
    }
    Ok(())
}

fn random_token() -> anyhow::Result<String> {
    let mut bytes = [0u8; 18];
    getrandom::fill(&mut bytes).map_err(|e| anyhow::anyhow!("random source: {e}"))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}
