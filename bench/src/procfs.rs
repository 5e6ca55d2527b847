//! What the kernel says about a process: CPU time and resident memory from `/proc`, the
//! open-files limit, and the server-login count from the Postgres log. Nothing here
//! talks to a target, so reading it never disturbs a measurement.

use std::fs;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::Instant;

use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};

/// Fields of `/proc/<pid>/stat` after the command name, which is in parentheses and may
/// itself contain spaces or parentheses (proc(5)).
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = text.rsplit_once(')')?;
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

/// Field `n` of proc(5)'s numbering (1-based, `pid` is 1, `comm` 2, `state` 3).
fn field(fields: &[String], n: usize) -> Option<u64> {
    fields.get(n.checked_sub(3)?)?.parse().ok()
}

fn ticks_to_seconds(ticks: u64) -> f64 {
    ticks as f64 / rustix::param::clock_ticks_per_second() as f64
}

/// User + system CPU seconds the process has used so far.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let f = stat_fields(pid)?;
    Some(ticks_to_seconds(field(&f, 14)? + field(&f, 15)?))
}

/// System (kernel) CPU seconds alone: with [`cpu_seconds`], how a process's time splits
/// between its own code and the system calls it makes.
pub fn system_cpu_seconds(pid: u32) -> Option<f64> {
    let f = stat_fields(pid)?;
    Some(ticks_to_seconds(field(&f, 15)?))
}

/// Resident set size in KiB (`VmRSS`).
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

/// CPU seconds of the whole Postgres server: the postmaster, its live children, and
/// (through the postmaster's `cutime`/`cstime`) every child it has reaped. A backend
/// that ends between two readings is counted fully in the second and partly in the
/// first, so a difference is exactly what was spent in between.
pub fn postgres_cpu_seconds(postmaster: u32) -> Option<f64> {
    let pm = stat_fields(postmaster)?;
    let mut ticks = field(&pm, 14)? + field(&pm, 15)? + field(&pm, 16)? + field(&pm, 17)?;
    for entry in fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if let Some(f) = stat_fields(pid)
            && field(&f, 4) == Some(u64::from(postmaster))
        {
            ticks += field(&f, 14).unwrap_or(0) + field(&f, 15).unwrap_or(0);
        }
    }
    Some(ticks_to_seconds(ticks))
}

/// Raises the soft open-files limit to the hard limit, so 10,000 idle clients fit (the
/// targets started later inherit it). Returns (before, after) when it changed.
pub fn raise_nofile_limit() -> Option<(u64, u64)> {
    let limit = getrlimit(Resource::Nofile);
    let (current, maximum) = (limit.current?, limit.maximum);
    let target = maximum.unwrap_or(1 << 20);
    if current >= target {
        return None;
    }
    setrlimit(
        Resource::Nofile,
        Rlimit {
            current: Some(target),
            maximum,
        },
    )
    .ok()?;
    Some((current, target))
}

/// The soft open-files limit in force.
pub fn nofile_limit() -> Option<u64> {
    getrlimit(Resource::Nofile).current
}

/// CPU seconds all CPUs of the machine have spent busy (not idle, not waiting for
/// I/O), from the first line of `/proc/stat`.
fn machine_busy_seconds() -> Option<f64> {
    let stat = fs::read_to_string("/proc/stat").ok()?;
    let ticks: Vec<u64> = stat
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    let total: u64 = ticks.iter().take(8).sum();
    let idle = ticks.get(3)? + ticks.get(4)?;
    Some(ticks_to_seconds(total - idle))
}

/// CPU seconds of this process and the children it has reaped (pgbench).
fn own_cpu_seconds() -> Option<f64> {
    let f = stat_fields(std::process::id())?;
    Some(ticks_to_seconds(
        field(&f, 14)? + field(&f, 15)? + field(&f, 16)? + field(&f, 17)?,
    ))
}

/// Readings taken at the edges of a measurement window.
#[derive(Debug, Clone, Copy)]
pub struct Snapshot {
    pub at: Instant,
    pub target_cpu: Option<f64>,
    pub target_system_cpu: Option<f64>,
    pub postgres_cpu: Option<f64>,
    own_cpu: Option<f64>,
    machine_busy: Option<f64>,
    log_offset: u64,
}

/// Takes [`Snapshot`]s of one target and the Postgres server behind it.
#[derive(Debug, Clone)]
pub struct Probe {
    pub target_pid: Option<u32>,
    pub postmaster_pid: Option<u32>,
    /// The server log, written with `log_connections = on`.
    pub log: PathBuf,
}

impl Probe {
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            at: Instant::now(),
            target_cpu: self.target_pid.and_then(cpu_seconds),
            target_system_cpu: self.target_pid.and_then(system_cpu_seconds),
            postgres_cpu: self.postmaster_pid.and_then(postgres_cpu_seconds),
            own_cpu: own_cpu_seconds(),
            machine_busy: machine_busy_seconds(),
            log_offset: fs::metadata(&self.log).map(|m| m.len()).unwrap_or(0),
        }
    }

    /// The share of the machine's CPU time between two snapshots that went to anything
    /// but the bench, the target and Postgres: other work on a shared machine, which
    /// makes a row's numbers less comparable.
    pub fn other_cpu_share(&self, from: &Snapshot, to: &Snapshot) -> Option<f64> {
        let d = |a: Option<f64>, b: Option<f64>| Some(b? - a?);
        let busy = d(from.machine_busy, to.machine_busy)?;
        let ours = d(from.own_cpu, to.own_cpu)?
            + d(from.target_cpu, to.target_cpu).unwrap_or(0.0)
            + d(from.postgres_cpu, to.postgres_cpu)?;
        let capacity = to.at.duration_since(from.at).as_secs_f64()
            * std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        (capacity > 0.0).then(|| ((busy - ours) / capacity).max(0.0))
    }

    pub fn target_rss_kib(&self) -> Option<u64> {
        self.target_pid.and_then(rss_kib)
    }

    /// Server logins between two snapshots: the `connection authorized` lines Postgres
    /// wrote in between. Exact, unlike sampling `pg_stat_activity`, which misses the
    /// short-lived connections that thrashing is made of.
    pub fn logins_between(&self, from: &Snapshot, to: &Snapshot) -> u64 {
        count_logins(&self.log, from.log_offset, to.log_offset).unwrap_or(0)
    }
}

fn count_logins(log: &Path, from: u64, to: u64) -> std::io::Result<u64> {
    let mut file = fs::File::open(log)?;
    file.seek(SeekFrom::Start(from))?;
    let mut text = Vec::new();
    file.take(to.saturating_sub(from)).read_to_end(&mut text)?;
    let text = String::from_utf8_lossy(&text);
    Ok(text.matches("connection authorized:").count() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_its_own_process() {
        let me = std::process::id();
        assert!(cpu_seconds(me).is_some());
        assert!(rss_kib(me).is_some_and(|k| k > 0));
        assert!(cpu_seconds(u32::MAX).is_none());
    }

    #[test]
    fn counts_logins_in_a_byte_range() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("postgres.log");
        let line = "LOG:  connection authorized: user=a database=b\n";
        fs::write(&log, format!("{line}LOG:  connection received\n{line}")).unwrap();
        let len = fs::metadata(&log).unwrap().len();
        assert_eq!(count_logins(&log, 0, len).unwrap(), 2);
        assert_eq!(count_logins(&log, line.len() as u64, len).unwrap(), 1);
        assert_eq!(count_logins(&log, 0, line.len() as u64).unwrap(), 1);
    }
}
