use std::fs;
use std::net::TcpListener;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Why a cluster could not be started.
#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    #[error(
        "PostgreSQL binaries not found (looked at `pg_config --bindir` and /usr/lib/postgresql/*/bin); install them with `apt-get install -y postgresql`"
    )]
    NoBinaries,
    #[error("running as root, but there is no `postgres` OS user to run initdb/postgres as")]
    NoPostgresUser,
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} failed ({status}); its output:\n{output}")]
    Command {
        what: String,
        status: std::process::ExitStatus,
        output: String,
    },
    #[error("postgres did not become ready within {secs} s; server log:\n{log}")]
    NotReady { secs: u64, log: String },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> HarnessError {
    let what = what.into();
    move |source| HarnessError::Io { what, source }
}

/// Knobs for [`PgCluster::start`]; the defaults suit tests.
#[derive(Debug, Clone)]
pub struct StartOptions {
    /// `max_connections` of the server: the pooler's tests open many roles' servers.
    pub max_connections: u32,
    /// Extra `postgresql.conf` lines.
    pub extra_conf: Vec<String>,
    /// PEM certificate and key: the server then accepts TLS (`ssl = on`).
    pub tls: Option<(String, String)>,
}

impl Default for StartOptions {
    fn default() -> Self {
        Self {
            max_connections: 300,
            extra_conf: Vec::new(),
            tls: None,
        }
    }
}

/// A running throwaway PostgreSQL. Dropping it stops the server and removes its
/// directory; a watchdog does the same when the owning process dies without dropping it.
#[derive(Debug)]
pub struct PgCluster {
    dir: PathBuf,
    bindir: PathBuf,
    port: u16,
    superuser_password: String,
    as_postgres: bool,
}

const SUPERUSER: &str = "postgres";
const HOST: &str = "127.0.0.1";

impl PgCluster {
    /// The cluster shared by every test of this process, started on first use.
    pub fn shared() -> &'static PgCluster {
        static SHARED: OnceLock<PgCluster> = OnceLock::new();
        SHARED.get_or_init(|| match PgCluster::start(StartOptions::default()) {
            Ok(cluster) => cluster,
            Err(e) => panic!("cannot start the test PostgreSQL: {e}"),
        })
    }

    /// `initdb` into a new temp dir, start `postgres` on a free port, wait until it
    /// accepts connections. Blocking: call it before or outside an async runtime, or
    /// from `spawn_blocking`.
    pub fn start(options: StartOptions) -> Result<PgCluster, HarnessError> {
        let bindir = find_bindir().ok_or(HarnessError::NoBinaries)?;
        let as_postgres = running_as_root();
        let owner = if as_postgres {
            Some(postgres_ids().ok_or(HarnessError::NoPostgresUser)?)
        } else {
            None
        };

        let dir = make_dir(owner)?;
        let mut cluster = PgCluster {
            dir,
            bindir,
            port: 0,
            superuser_password: random_hex(16),
            as_postgres,
        };
        // From here on, a failure must not leave the directory (or a server) behind.
        cluster.spawn_watchdog()?;
        cluster.initdb(owner)?;
        if let Some((cert, key)) = &options.tls {
            cluster.install_tls(owner, cert, key)?;
        }
        // Another process may grab the free port between our probe and the postmaster's
        // bind; a few attempts make that race harmless.
        let mut last_err = None;
        for _ in 0..5 {
            cluster.port = free_port()?;
            cluster.write_conf(&options)?;
            match cluster.run_postgres() {
                Ok(()) => return Ok(cluster),
                Err(e) => last_err = Some(e),
            }
        }
        Err(last_err.unwrap_or(HarnessError::NotReady {
            secs: 0,
            log: String::new(),
        }))
    }

    pub fn host(&self) -> &str {
        HOST
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The temp directory that holds the data dir, socket and log.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn bindir(&self) -> &Path {
        &self.bindir
    }

    /// Pid of the postmaster, from `postmaster.pid`.
    pub fn postmaster_pid(&self) -> Option<u32> {
        let text = fs::read_to_string(self.data_dir().join("postmaster.pid")).ok()?;
        text.lines().next()?.trim().parse().ok()
    }

    pub fn superuser(&self) -> &str {
        SUPERUSER
    }

    pub fn superuser_password(&self) -> &str {
        &self.superuser_password
    }

    /// tokio-postgres config for the superuser over TCP (SCRAM), on `dbname`.
    pub fn superuser_config(&self, dbname: &str) -> tokio_postgres::Config {
        self.config(SUPERUSER, &self.superuser_password, dbname)
    }

    /// tokio-postgres config for any login over TCP.
    pub fn config(&self, user: &str, password: &str, dbname: &str) -> tokio_postgres::Config {
        let mut config = tokio_postgres::Config::new();
        config
            .host(HOST)
            .port(self.port)
            .user(user)
            .password(password)
            .dbname(dbname)
            .connect_timeout(Duration::from_secs(10));
        config
    }

    /// A `postgres://` URL for the superuser (for CLIs that take one).
    pub fn superuser_url(&self, dbname: &str) -> String {
        format!(
            "postgres://{SUPERUSER}:{}@{HOST}:{}/{dbname}",
            self.superuser_password, self.port
        )
    }

    /// Creates a new, empty database with a name unique in this process and returns
    /// the name. Tests use one each, so they can run in parallel.
    pub async fn fresh_database(&self) -> String {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        let name = format!(
            "t{}_{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let client = crate::connect(&self.superuser_config("postgres"))
            .await
            .expect("superuser connects to the test cluster");
        // The name is ours (digits and `t`/`_`), so plain interpolation is safe here.
        client
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .expect("create a test database");
        name
    }

    /// The server log, for error messages and for tests that search it.
    pub fn server_log(&self) -> String {
        fs::read_to_string(self.dir.join("postgres.log")).unwrap_or_default()
    }

    /// Stops the server now (immediate mode) and removes the directory.
    pub fn stop(&self) {
        if let Some(pid) = self.postmaster_pid() {
            stop_pid(pid);
        }
        let _ = fs::remove_dir_all(&self.dir);
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    fn command(&self, program: &str) -> Command {
        let path = self.bindir.join(program);
        if self.as_postgres {
            // setpriv execs in place (runuser would fork), so the pid we see is the
            // program's own and signals reach it directly.
            let mut cmd = Command::new("setpriv");
            cmd.args([
                "--reuid=postgres",
                "--regid=postgres",
                "--init-groups",
                "--",
            ]);
            cmd.arg(path);
            cmd
        } else {
            Command::new(path)
        }
    }

    fn initdb(&self, owner: Option<(u32, u32)>) -> Result<(), HarnessError> {
        let pwfile = self.dir.join("pwfile");
        fs::write(&pwfile, format!("{}\n", self.superuser_password)).map_err(io("write pwfile"))?;
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::chown(&pwfile, Some(uid), Some(gid)).map_err(io("chown pwfile"))?;
        }
        let output = self
            .command("initdb")
            .arg("-D")
            .arg(self.data_dir())
            .args([
                "-U",
                SUPERUSER,
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
            ])
            .args(["--encoding=UTF8", "--locale=C", "--no-sync"])
            .arg(format!("--pwfile={}", pwfile.display()))
            .stdin(Stdio::null())
            .output()
            .map_err(io("run initdb"))?;
        let _ = fs::remove_file(&pwfile);
        if !output.status.success() {
            return Err(HarnessError::Command {
                what: "initdb".into(),
                status: output.status,
                output: format!(
                    "{}{}",
                    String::from_utf8_lossy(&output.stdout),
                    String::from_utf8_lossy(&output.stderr)
                ),
            });
        }
        Ok(())
    }

    fn install_tls(
        &self,
        owner: Option<(u32, u32)>,
        cert: &str,
        key: &str,
    ) -> Result<(), HarnessError> {
        for (name, pem) in [("server.crt", cert), ("server.key", key)] {
            let path = self.data_dir().join(name);
            fs::write(&path, pem).map_err(io(format!("write {name}")))?;
            // Postgres refuses a key readable by others.
            fs::set_permissions(&path, fs::Permissions::from_mode(0o600))
                .map_err(io("chmod tls file"))?;
            if let Some((uid, gid)) = owner {
                std::os::unix::fs::chown(&path, Some(uid), Some(gid))
                    .map_err(io("chown tls file"))?;
            }
        }
        Ok(())
    }

    /// Stops the server (fast mode: sessions are ended, as in a real restart) and
    /// starts it again on the same port and data.
    pub fn restart(&self) -> Result<(), HarnessError> {
        if let Some(pid) = self.postmaster_pid() {
            let _ = Command::new("kill")
                .args(["-INT", &pid.to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(30);
            while alive(pid) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        self.run_postgres()
    }

    fn write_conf(&self, options: &StartOptions) -> Result<(), HarnessError> {
        // postgresql.auto.conf is read last, so rewriting it wholesale on every attempt
        // (a new port) overrides initdb's postgresql.conf without editing it.
        let mut conf = format!(
            "listen_addresses = '{HOST}'\n\
             port = {port}\n\
             unix_socket_directories = '{sock}'\n\
             max_connections = {max}\n\
             password_encryption = 'scram-sha-256'\n\
             fsync = off\n\
             synchronous_commit = off\n\
             full_page_writes = off\n\
             shared_buffers = '64MB'\n\
             log_min_messages = warning\n\
             log_connections = off\n",
            port = self.port,
            sock = self.dir.display(),
            max = options.max_connections,
        );
        if options.tls.is_some() {
            conf.push_str("ssl = on\n");
        }
        for line in &options.extra_conf {
            conf.push_str(line);
            conf.push('\n');
        }
        fs::write(self.data_dir().join("postgresql.auto.conf"), conf)
            .map_err(io("write postgresql.auto.conf"))
    }

    fn run_postgres(&self) -> Result<(), HarnessError> {
        let log_path = self.dir.join("postgres.log");
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(io("open server log"))?;
        let log2 = log.try_clone().map_err(io("clone log handle"))?;
        let mut child = self
            .command("postgres")
            .arg("-D")
            .arg(self.data_dir())
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            // Its own process group: a Ctrl-C in the terminal goes to the test, and the
            // watchdog, not the terminal, decides when the server stops.
            .process_group(0)
            .spawn()
            .map_err(io("start postgres"))?;

        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(Some(_status)) = child.try_wait() {
                return Err(HarnessError::NotReady {
                    secs: 0,
                    log: self.server_log(),
                });
            }
            // Through our own socket directory: on the TCP port, a cluster of another
            // process that grabbed the port first would answer "ready" for us.
            let ready = Command::new(self.bindir.join("pg_isready"))
                .arg("-q")
                .arg("-h")
                .arg(&self.dir)
                .args(["-p", &self.port.to_string(), "-d", "postgres"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if ready {
                // The `Child` is dropped without waiting: the postmaster outlives this
                // call and is reaped by init once the owner is gone.
                return Ok(());
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                return Err(HarnessError::NotReady {
                    secs: 60,
                    log: self.server_log(),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// A detached shell that waits for this process to exit, then stops the server
    /// and deletes the directory. It runs as the current user (root in CI), which may
    /// signal the postmaster and remove files that `postgres` owns.
    fn spawn_watchdog(&self) -> Result<(), HarnessError> {
        let script = r#"
owner="$1"; dir="$2"
while kill -0 "$owner" 2>/dev/null; do sleep 0.2; done
pidfile="$dir/data/postmaster.pid"
if [ -f "$pidfile" ]; then
  pm=$(head -n 1 "$pidfile")
  if [ -n "$pm" ] && kill -QUIT "$pm" 2>/dev/null; then
    i=0
    while kill -0 "$pm" 2>/dev/null && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
    kill -KILL "$pm" 2>/dev/null
  fi
fi
rm -rf "$dir"
"#;
        Command::new("sh")
            .arg("-c")
            .arg(script)
            .arg("dataplane-pg-watchdog")
            .arg(std::process::id().to_string())
            .arg(&self.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .map_err(io("start the cleanup watchdog"))?;
        Ok(())
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Sends SIGQUIT (immediate shutdown) and waits up to 10 s for the process to go.
fn stop_pid(pid: u32) {
    let _ = Command::new("kill")
        .args(["-QUIT", &pid.to_string()])
        .status();
    let deadline = Instant::now() + Duration::from_secs(10);
    while alive(pid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    if alive(pid) {
        let _ = Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status();
    }
}

/// Whether `pid` still runs. The postmaster is our child and nobody reaps it while we
/// live, so an exited one lingers as a zombie: that counts as gone.
fn alive(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name, which is in parentheses.
        Ok(stat) => !stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

fn find_bindir() -> Option<PathBuf> {
    let has_initdb = |dir: &Path| dir.join("initdb").is_file() && dir.join("postgres").is_file();
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if out.status.success() && has_initdb(&dir) {
            return Some(dir);
        }
    }
    // Debian's pg_config (from libpq-dev) may point at /usr/bin, which has wrappers
    // but no server binaries; the versioned directories have both.
    let mut candidates: Vec<PathBuf> = fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|p| has_initdb(p))
        .collect();
    candidates.sort_by_key(|p| {
        p.parent()
            .and_then(|v| v.file_name())
            .and_then(|v| v.to_str())
            .and_then(|v| v.parse::<u32>().ok())
            .unwrap_or(0)
    });
    candidates.pop()
}

fn running_as_root() -> bool {
    fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false)
}

fn postgres_ids() -> Option<(u32, u32)> {
    let id = |flag: &str| -> Option<u32> {
        let out = Command::new("id").args([flag, "postgres"]).output().ok()?;
        if !out.status.success() {
            return None;
        }
        String::from_utf8_lossy(&out.stdout).trim().parse().ok()
    };
    Some((id("-u")?, id("-g")?))
}

fn make_dir(owner: Option<(u32, u32)>) -> Result<PathBuf, HarnessError> {
    let dir = std::env::temp_dir().join(format!(
        "dataplane-pg-{}-{}",
        std::process::id(),
        random_hex(4)
    ));
    fs::create_dir(&dir).map_err(io(format!("create {}", dir.display())))?;
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).map_err(io("chmod temp dir"))?;
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::chown(&dir, Some(uid), Some(gid))
            .map_err(io("chown temp dir to postgres"))?;
    }
    Ok(dir)
}

fn free_port() -> Result<u16, HarnessError> {
    let listener = TcpListener::bind((HOST, 0)).map_err(io("find a free port"))?;
    let port = listener
        .local_addr()
        .map_err(io("find a free port"))?
        .port();
    Ok(port)
}

fn random_hex(bytes: usize) -> String {
    use std::fmt::Write as _;
    let mut buf = vec![0u8; bytes];
    getrandom::fill(&mut buf).expect("the OS random source works");
    buf.iter()
        .fold(String::with_capacity(bytes * 2), |mut out, b| {
            let _ = write!(out, "{b:02x}");
            out
        })
}
