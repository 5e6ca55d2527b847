//! The real `pooler` binary as a process of its own, in front of a test's database:
//! what a new user would run, with `/proc` showing its memory.

use std::net::SocketAddr;
use std::time::Duration;

use dataplane_tests::fixtures::POOLER_PASSWORD;

use crate::common::{Env, free_port};
use crate::metrics::http_get;

pub struct Binary {
    pub child: tokio::process::Child,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    dir: std::path::PathBuf,
}

/// The `pooler` binary cargo built with the tests, or `POOLER_BINARY` (a release build,
/// to measure with the same tests).
pub fn program() -> std::ffi::OsString {
    std::env::var_os("POOLER_BINARY").unwrap_or_else(|| env!("CARGO_BIN_EXE_pooler").into())
}

impl Binary {
    /// Starts the binary ([`program`]) with the default configuration but for its
    /// addresses, the test's database, and `extra` TOML lines; returns once `/readyz`
    /// says 200.
    pub async fn start(e: &Env, extra: &str, args: &[&str]) -> Binary {
        let (port, admin_port) = (free_port(), free_port());
        let dir = std::env::temp_dir().join(format!(
            "pooler-bin-{}-{}",
            std::process::id(),
            dataplane_tests::unique_tenant_id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let config = dir.join("pooler.toml");
        std::fs::write(
            &config,
            format!(
                "listen = \"127.0.0.1:{port}\"\nadmin_listen = \"127.0.0.1:{admin_port}\"\n{extra}\n\
                 [upstream]\nhost = \"{}\"\nport = {}\ndbname = \"{}\"\n",
                e.fixture.cluster.host(),
                e.fixture.cluster.port(),
                e.fixture.db
            ),
        )
        .unwrap();
        let child = tokio::process::Command::new(program())
            .arg("--config")
            .arg(&config)
            .args(args)
            .env("POOLER_AUTH_PASSWORD", POOLER_PASSWORD)
            .env_remove("RUST_LOG")
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let admin: SocketAddr = format!("127.0.0.1:{admin_port}").parse().unwrap();
        let binary = Binary {
            child,
            addr: format!("127.0.0.1:{port}").parse().unwrap(),
            admin,
            dir,
        };
        for _ in 0..400 {
            if tokio::net::TcpStream::connect(admin).await.is_ok()
                && http_get(admin, "/readyz").await.0 == 200
            {
                return binary;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("the pooler binary never became ready");
    }

    pub fn pid(&self) -> u32 {
        self.child.id().expect("the pooler is running")
    }

    /// Resident memory, from `/proc/<pid>/status`.
    pub fn rss_bytes(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        let kb: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .expect("VmRSS in /proc/<pid>/status");
        kb * 1024
    }

    /// Still running and ready.
    pub async fn assert_up(&mut self) {
        assert!(
            self.child.try_wait().unwrap().is_none(),
            "the pooler exited"
        );
        assert_eq!(http_get(self.admin, "/readyz").await.0, 200);
    }

    /// One sample of `/metrics`, e.g. `dataplane_pooler_limit_refusals_total{kind="client_stall"}`.
    pub async fn metric(&self, sample: &str) -> f64 {
        let (_, text) = http_get(self.admin, "/metrics").await;
        text.lines()
            .find_map(|l| l.strip_prefix(sample)?.trim().parse().ok())
            .unwrap_or(0.0)
    }

    /// tokio-postgres config for this pooler.
    pub fn config(&self, e: &Env, user: &str, password: &str) -> tokio_postgres::Config {
        e.config_on_port(user, password, self.addr.port())
    }
}

impl Drop for Binary {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
