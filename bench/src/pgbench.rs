//! pgbench through a target: the same C client for every target (so a difference in
//! CPU or system calls per transaction is the target's), and the standard tool's view
//! of prepared statements in transaction mode, beside our own clients'.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use crate::fixture::ROWS;
use crate::load::mask_numbers;
use crate::procfs::{Probe, Snapshot};
use crate::syscalls::{self, SyscallCounts};

/// What pgbench reported.
pub struct PgbenchOutcome {
    pub tps: Option<f64>,
    pub latency_avg_ms: Option<f64>,
    pub processed: u64,
    pub failed: u64,
    /// Why pgbench did not finish cleanly.
    pub error: Option<String>,
    /// Errors it printed (by message) while going on.
    pub errors: BTreeMap<String, u64>,
    pub before: Snapshot,
    pub after: Snapshot,
    /// The target's system calls over the same window, where it is a process of its
    /// own (`None` for direct Postgres), or why they could not be counted.
    pub syscalls: Option<Result<SyscallCounts, String>>,
}

pub struct PgbenchRun<'a> {
    pub pgbench: &'a Path,
    pub port: u16,
    pub role: &'a str,
    pub password: &'a str,
    pub dbname: &'a str,
    pub clients: usize,
    /// `-j`: with `-M prepared` through a pooler whose servers can all be taken, a
    /// thread serving several clients prepares synchronously and may wait behind the
    /// others (e-pgbench gives each client a thread).
    pub threads: usize,
    /// `-M prepared`, else the simple protocol.
    pub prepared: bool,
    pub duration: Duration,
    pub script_dir: &'a Path,
}

/// pgbench with a point-select script. Killed if it outlives its time by 30 s.
pub async fn run(run: PgbenchRun<'_>, probe: &Probe) -> PgbenchOutcome {
    let script = run.script_dir.join("point_select.sql");
    let counting = match probe.target_pid {
        Some(pid) => Some(syscalls::start(pid, run.script_dir).await),
        None => None,
    };
    let before = probe.snapshot();
    let mut outcome = PgbenchOutcome {
        tps: None,
        latency_avg_ms: None,
        processed: 0,
        failed: 0,
        error: None,
        errors: BTreeMap::new(),
        before,
        after: before,
        syscalls: None,
    };
    if let Err(e) = std::fs::write(
        &script,
        format!("\\set id random(1, {ROWS})\nSELECT v FROM kv WHERE id = :id;\n"),
    ) {
        outcome.error = Some(format!("writing the pgbench script: {e}"));
        return outcome;
    }
    let clients = run.clients.to_string();
    let threads = run.threads.min(run.clients).max(1).to_string();
    let mode = if run.prepared { "prepared" } else { "simple" };
    // pgbench's -T clock runs while its clients log in (SCRAM, one PBKDF2 each on
    // pgbench's side): a short run of many clients on a busy machine could end
    // before the first transaction. A second per 20 clients leaves room for that.
    let secs = run
        .duration
        .as_secs()
        .max(1 + run.clients as u64 / 20)
        .to_string();
    let mut cmd = tokio::process::Command::new(run.pgbench);
    cmd.args([
        "-h",
        "127.0.0.1",
        "-p",
        &run.port.to_string(),
        "-U",
        run.role,
    ])
    .args([
        "-n", "-M", mode, "-c", &clients, "-j", &threads, "-T", &secs,
    ])
    .arg("-f")
    .arg(&script)
    .arg(run.dbname)
    .env("PGPASSWORD", run.password)
    .env("PGSSLMODE", "disable")
    .stdin(std::process::Stdio::null())
    .kill_on_drop(true);
    let limit = run.duration + Duration::from_secs(30);
    let output = tokio::time::timeout(limit, cmd.output()).await;
    outcome.after = probe.snapshot();
    outcome.syscalls = match counting {
        Some(Ok(counting)) => Some(counting.finish().await),
        Some(Err(why)) => Some(Err(why)),
        None => None,
    };
    let output = match output {
        Ok(Ok(o)) => o,
        Ok(Err(e)) => {
            outcome.error = Some(format!("running pgbench: {e}"));
            return outcome;
        }
        Err(_) => {
            outcome.error = Some(format!("pgbench hung; killed after {} s", limit.as_secs()));
            return outcome;
        }
    };
    let stdout = String::from_utf8_lossy(&output.stdout);
    let number = |prefix: &str| -> Option<f64> {
        let line = stdout.lines().find_map(|l| l.trim().strip_prefix(prefix))?;
        line.trim_start_matches([' ', '=', ':'])
            .split(|c: char| c.is_whitespace() || c == '/')
            .next()?
            .parse()
            .ok()
    };
    outcome.tps = number("tps");
    outcome.latency_avg_ms = number("latency average");
    outcome.processed = number("number of transactions actually processed").unwrap_or(0.0) as u64;
    outcome.failed = number("number of failed transactions").unwrap_or(0.0) as u64;
    let stderr = String::from_utf8_lossy(&output.stderr);
    // pgbench only logs a failed PQprepare and carries on, so a statement a client
    // "prepared" on a server that already had one of that name is an error it saw
    // without failing a transaction: count those too.
    for line in stderr.lines().filter(|l| l.contains("ERROR:")) {
        let key = line.split_once("ERROR:").map_or(line, |(_, m)| m).trim();
        *outcome.errors.entry(mask_numbers(key)).or_default() += 1;
    }
    if output.status.success() && outcome.tps.is_none() {
        let said: String = stdout
            .lines()
            .chain(stderr.lines())
            .filter(|l| !l.trim().is_empty())
            .take(4)
            .collect::<Vec<_>>()
            .join(" / ");
        outcome.error = Some(format!(
            "pgbench reported no tps: {}",
            said.chars().take(300).collect::<String>()
        ));
    }
    if !output.status.success() {
        let aborted = stderr.matches("aborted in command").count();
        let first = stderr
            .lines()
            .find(|l| l.contains("ERROR") || l.contains("error") || l.contains("FATAL"))
            .unwrap_or_else(|| stderr.lines().next().unwrap_or_default());
        outcome.error = Some(format!(
            "pgbench exited with {} ({aborted} of {} clients aborted): {}",
            output.status,
            run.clients,
            first.chars().take(160).collect::<String>()
        ));
    }
    outcome
}
