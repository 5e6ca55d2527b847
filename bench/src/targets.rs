//! The three things clients are pointed at, one at a time, against the same Postgres:
//! our pooler (the built `pooler` binary, a separate process so /proc shows its CPU and
//! memory), PgBouncer configured equivalently, and Postgres itself.

use std::fs;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};

use crate::fixture::{App, Fixture};

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum TargetKind {
    Pooler,
    Pgbouncer,
    Direct,
}

impl TargetKind {
    pub const ALL: [TargetKind; 3] = [
        TargetKind::Pooler,
        TargetKind::Pgbouncer,
        TargetKind::Direct,
    ];

    pub fn label(self) -> &'static str {
        match self {
            TargetKind::Pooler => "pooler (us)",
            TargetKind::Pgbouncer => "PgBouncer",
            TargetKind::Direct => "direct Postgres",
        }
    }
}

/// What both poolers are given, so they are compared on the same budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Budget {
    /// Server connections for all roles together (`max_server_connections` /
    /// PgBouncer's `max_db_connections`).
    pub server_connections: usize,
    /// Per role (`pool_size` in each credentials row / PgBouncer's `default_pool_size`).
    pub pool_size: usize,
    /// A client waiting longer than this for a server gets an error, not a hang.
    pub query_wait_timeout_secs: u64,
    pub max_client_conn: usize,
}

/// Where the binaries are.
#[derive(Debug, Clone)]
pub struct Binaries {
    pub pooler: PathBuf,
    pub pgbouncer: Option<PathBuf>,
}

/// A running target. Dropping it kills its process; [`Target::stop`] asks first.
pub struct Target {
    pub kind: TargetKind,
    pub port: u16,
    pub pid: Option<u32>,
    child: Option<Child>,
    log: Option<PathBuf>,
    // Holds the configuration files until the target is stopped.
    _dir: Option<tempfile::TempDir>,
}

impl Target {
    /// `session`: PgBouncer in session mode (for LISTEN), else transaction mode.
    pub async fn start(
        kind: TargetKind,
        fixture: &Fixture,
        budget: &Budget,
        bins: &Binaries,
        session: bool,
    ) -> anyhow::Result<Target> {
        match kind {
            TargetKind::Direct => Ok(Target {
                kind,
                port: fixture.cluster().port(),
                pid: None,
                child: None,
                log: None,
                _dir: None,
            }),
            TargetKind::Pooler => start_pooler(fixture, budget, &bins.pooler).await,
            TargetKind::Pgbouncer => match &bins.pgbouncer {
                Some(bin) => start_pgbouncer(fixture, budget, bin, session).await,
                None => bail!("pgbouncer is not installed (bench/setup installs it)"),
            },
        }
    }

    /// A client's configuration for `app` through this target.
    pub fn client_config(&self, app: &App, dbname: &str) -> tokio_postgres::Config {
        let mut c = tokio_postgres::Config::new();
        c.host("127.0.0.1")
            .port(self.port)
            .user(&app.role)
            .password(&app.password)
            .dbname(dbname)
            .ssl_mode(tokio_postgres::config::SslMode::Disable)
            .connect_timeout(Duration::from_secs(10));
        c
    }

    /// The last lines of the target's own log, for error messages.
    pub fn log_tail(&self) -> String {
        let Some(log) = &self.log else {
            return String::new();
        };
        let text = fs::read_to_string(log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(5)..].join("\n")
    }

    /// SIGTERM, then SIGKILL if it has not exited within a few seconds.
    pub async fn stop(mut self) {
        let Some(child) = self.child.as_mut() else {
            return;
        };
        if let Some(pid) = self
            .pid
            .and_then(|p| rustix::process::Pid::from_raw(p as i32))
        {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
        if tokio::time::timeout(Duration::from_secs(5), child.wait())
            .await
            .is_err()
        {
            let _ = child.kill().await;
        }
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind(("127.0.0.1", 0))?.local_addr()?.port())
}

/// `setpriv` execs in place, so the pid we get is the target's own; `--pdeathsig`
/// kills the target if the bench dies without stopping it. `as_postgres` drops root,
/// which PgBouncer refuses to run as.
fn command(bin: &Path, as_postgres: bool) -> Command {
    let mut cmd = Command::new("setpriv");
    if as_postgres {
        cmd.args(["--reuid=postgres", "--regid=postgres", "--init-groups"]);
    }
    cmd.args(["--pdeathsig", "KILL", "--"]).arg(bin);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .kill_on_drop(true);
    cmd
}

async fn start_pooler(fixture: &Fixture, budget: &Budget, bin: &Path) -> anyhow::Result<Target> {
    if !bin.is_file() {
        bail!(
            "no pooler binary at {} (build it: cargo build --release -p pooler, or pass --pooler-bin)",
            bin.display()
        );
    }
    let dir = tempfile::tempdir()?;
    let (port, admin_port) = (free_port()?, free_port()?);
    let cluster = fixture.cluster();
    let config = format!(
        "listen = \"127.0.0.1:{port}\"\n\
         admin_listen = \"127.0.0.1:{admin_port}\"\n\
         max_client_conn = {max_client}\n\
         max_server_connections = {budget_conns}\n\
         default_pool_size = {pool}\n\
         query_wait_timeout_ms = {wait}\n\
         max_listener_servers = {listeners}\n\
         [upstream]\n\
         host = \"{host}\"\nport = {pg_port}\ndbname = \"{db}\"\nauth_user = \"dp_pooler\"\n\
         [client_tls]\nmode = \"disable\"\n",
        max_client = budget.max_client_conn,
        budget_conns = budget.server_connections,
        pool = budget.pool_size,
        wait = budget.query_wait_timeout_secs * 1000,
        // Half the budget for LISTEN servers: (h) has one per app.
        listeners = (budget.server_connections / 2).max(1),
        host = cluster.host(),
        pg_port = cluster.port(),
        db = fixture.db.db,
    );
    let path = dir.path().join("pooler.toml");
    fs::write(&path, config)?;
    let mut cmd = command(bin, false);
    cmd.arg("--config")
        .arg(&path)
        .args(["--shutdown-grace-secs", "1"])
        .env("POOLER_AUTH_PASSWORD", fixture.auth_password())
        .env("RUST_LOG", "warn");
    // Ready means its LISTEN connection is up (/readyz), as the tests wait for.
    launch(TargetKind::Pooler, cmd, port, dir, || {
        http_ok(admin_port, "/readyz")
    })
    .await
}

/// Spawns `cmd` with its stderr in a log beside its configuration and waits until
/// `ready` (or fails with the log if it exits or takes over 30 s).
async fn launch<F, Fut>(
    kind: TargetKind,
    mut cmd: Command,
    port: u16,
    dir: tempfile::TempDir,
    ready: F,
) -> anyhow::Result<Target>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let log = dir.path().join(format!("{kind:?}.log").to_lowercase());
    cmd.stderr(fs::File::create(&log)?);
    let child = cmd
        .spawn()
        .with_context(|| format!("starting {}", kind.label()))?;
    let mut target = Target {
        kind,
        port,
        pid: child.id(),
        child: Some(child),
        log: Some(log),
        _dir: Some(dir),
    };
    target
        .wait_until(ready)
        .await
        .with_context(|| format!("{} did not become ready", kind.label()))?;
    Ok(target)
}

async fn start_pgbouncer(
    fixture: &Fixture,
    budget: &Budget,
    bin: &Path,
    session: bool,
) -> anyhow::Result<Target> {
    let as_postgres = rustix::process::geteuid().is_root();
    let dir = tempfile::tempdir()?;
    let port = free_port()?;
    let cluster = fixture.cluster();
    let db = &fixture.db.db;
    let userlist = dir.path().join("userlist.txt");
    // Only the auth_query login is listed; apps' verifiers come from the lookup.
    fs::write(
        &userlist,
        format!("\"dp_pooler\" \"{}\"\n", fixture.auth_password()),
    )?;
    let ini = format!(
        "[databases]\n\
         {db} = host={host} port={pg_port} dbname={db} auth_user=dp_pooler\n\
         [pgbouncer]\n\
         listen_addr = 127.0.0.1\n\
         listen_port = {port}\n\
         unix_socket_dir =\n\
         auth_type = scram-sha-256\n\
         auth_file = {userlist}\n\
         auth_user = dp_pooler\n\
         auth_query = SELECT role_name, scram_verifier FROM dataplane_auth.lookup($1)\n\
         pool_mode = {mode}\n\
         max_client_conn = {max_client}\n\
         default_pool_size = {pool}\n\
         max_db_connections = {budget_conns}\n\
         query_wait_timeout = {wait}\n\
         ignore_startup_parameters = extra_float_digits\n",
        host = cluster.host(),
        pg_port = cluster.port(),
        userlist = userlist.display(),
        max_client = budget.max_client_conn,
        pool = budget.pool_size,
        budget_conns = budget.server_connections,
        wait = budget.query_wait_timeout_secs,
        mode = if session { "session" } else { "transaction" },
    );
    let path = dir.path().join("pgbouncer.ini");
    fs::write(&path, ini)?;
    if as_postgres {
        let (uid, gid) = postgres_ids().context("no `postgres` OS user to run PgBouncer as")?;
        for p in [dir.path(), &userlist, &path] {
            std::os::unix::fs::chown(p, Some(uid), Some(gid))?;
        }
    }
    let mut cmd = command(bin, as_postgres);
    cmd.arg(&path);
    launch(TargetKind::Pgbouncer, cmd, port, dir, || async move {
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
    })
    .await
}

impl Target {
    /// Polls `ready` for up to 30 s; fails early, with the log, if the process exits.
    async fn wait_until<F, Fut>(&mut self, ready: F) -> anyhow::Result<()>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                bail!("exited ({status}); its log:\n{}", self.log_tail());
            }
            if ready().await {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("not ready after 30 s; its log:\n{}", self.log_tail());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

async fn http_ok(port: u16, path: &str) -> bool {
    let attempt = async {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        stream
            .write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes())
            .await?;
        let mut reply = Vec::new();
        stream.read_to_end(&mut reply).await?;
        Ok::<_, std::io::Error>(
            reply.starts_with(b"HTTP/1.1 200") || reply.starts_with(b"HTTP/1.0 200"),
        )
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(2), attempt).await,
        Ok(Ok(true))
    )
}

fn postgres_ids() -> Option<(u32, u32)> {
    let id = |flag: &str| -> Option<u32> {
        let out = std::process::Command::new("id")
            .args([flag, "postgres"])
            .output()
            .ok()?;
        String::from_utf8_lossy(&out.stdout).trim().parse().ok()
    };
    Some((id("-u")?, id("-g")?))
}

/// PgBouncer from PATH, or Debian's /usr/sbin (not on a non-root PATH).
pub fn find_pgbouncer() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin")])
        .map(|d| d.join("pgbouncer"))
        .find(|p| p.is_file())
}
