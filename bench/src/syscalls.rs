//! System calls a target makes during a measurement window, counted by the kernel's
//! syscall tracepoints through `perf stat` attached to the target's process.
//!
//! Why perf and not `strace -c`: strace stops the target at every system call
//! (ptrace), which slows it several times over and changes what it does (a slower
//! relay finds more bytes per read and more events per `epoll_wait`), so its counts
//! would not describe the run whose CPU time is reported beside them, and the tps of
//! that run would be worthless. The tracepoint counters are kept in the kernel, cost
//! the target little, and count every thread of the process (`-p` attaches to all of
//! them; the targets start their threads before the window). `/proc/<pid>/io` counts
//! only `read`-family calls, not `recvfrom`/`sendto`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::process::{Child, Command};

/// The calls shown one by one; the rest are summed into `other`.
pub const NAMED: [&str; 12] = [
    "recvfrom",
    "sendto",
    "read",
    "write",
    "readv",
    "writev",
    "recvmsg",
    "sendmsg",
    "epoll_wait",
    "epoll_pwait",
    "epoll_ctl",
    "futex",
];

const ALL: &str = "raw_syscalls:sys_enter";

/// Counts of one window.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SyscallCounts {
    pub total: u64,
    /// Every call of [`NAMED`] by name, and `other` for the rest.
    pub by_name: BTreeMap<String, u64>,
}

/// A running count; [`Counting::finish`] stops it and reads the numbers.
pub struct Counting {
    child: Child,
    out: PathBuf,
}

/// Starts counting the system calls of `pid` (every thread). `Err` says why not
/// (perf missing, tracepoints not readable), for the row's note.
pub async fn start(pid: u32, dir: &Path) -> Result<Counting, String> {
    let out = dir.join(format!("perf-stat-{pid}.csv"));
    let mut events = vec![ALL.to_owned()];
    events.extend(NAMED.iter().map(|n| format!("syscalls:sys_enter_{n}")));
    let mut child = Command::new("perf")
        .args(["stat", "-x", ",", "--no-big-num", "-o"])
        .arg(&out)
        .args(["-e", &events.join(","), "-p", &pid.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("perf not runnable ({e}); bench/setup installs linux-perf"))?;
    // perf exits at once when it cannot open the tracepoints: give it a moment to
    // say so, rather than count nothing silently.
    tokio::time::sleep(Duration::from_millis(200)).await;
    if let Ok(Some(status)) = child.try_wait() {
        let stderr = match child.wait_with_output().await {
            Ok(o) => String::from_utf8_lossy(&o.stderr).trim().to_owned(),
            Err(e) => e.to_string(),
        };
        return Err(format!(
            "perf stat exited ({status}): {}",
            stderr.chars().take(200).collect::<String>()
        ));
    }
    Ok(Counting { child, out })
}

impl Counting {
    /// Stops perf (SIGINT makes it print its counts) and parses them.
    pub async fn finish(mut self) -> Result<SyscallCounts, String> {
        if let Some(pid) = self
            .child
            .id()
            .and_then(|p| rustix::process::Pid::from_raw(p as i32))
        {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::INT);
        }
        match tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(format!("waiting for perf: {e}")),
            Err(_) => {
                let _ = self.child.kill().await;
                return Err("perf did not stop within 10 s".into());
            }
        }
        let text = std::fs::read_to_string(&self.out)
            .map_err(|e| format!("reading {}: {e}", self.out.display()))?;
        parse(&text)
    }
}

/// `perf stat -x,` lines: `count,unit,event,...`; comment lines start with `#`.
fn parse(text: &str) -> Result<SyscallCounts, String> {
    let mut counts = SyscallCounts::default();
    let mut named_sum = 0;
    let mut seen_all = false;
    for line in text.lines() {
        let mut fields = line.split(',');
        let (Some(count), Some(_unit), Some(event)) = (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        let Ok(count) = count.trim().parse::<u64>() else {
            // "<not counted>" or "<not supported>": that event is unknown here.
            continue;
        };
        if event == ALL {
            counts.total = count;
            seen_all = true;
        } else if let Some(name) = event.strip_prefix("syscalls:sys_enter_") {
            named_sum += count;
            counts.by_name.insert(name.to_owned(), count);
        }
    }
    if !seen_all {
        return Err(format!(
            "perf printed no {ALL} count: {}",
            text.chars().take(200).collect::<String>()
        ));
    }
    counts
        .by_name
        .insert("other".into(), counts.total.saturating_sub(named_sum));
    Ok(counts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_perf_stat_csv() {
        let text = "# started on Sat Dec  5 10:00:00 2026\n\n\
                    1000,,raw_syscalls:sys_enter,5000000,100.00,,\n\
                    300,,syscalls:sys_enter_recvfrom,5000000,100.00,,\n\
                    200,,syscalls:sys_enter_sendto,5000000,100.00,,\n\
                    <not supported>,,syscalls:sys_enter_epoll_pwait,0,100.00,,\n";
        let c = parse(text).unwrap();
        assert_eq!(c.total, 1000);
        assert_eq!(c.by_name["recvfrom"], 300);
        assert_eq!(c.by_name["other"], 500);
        assert!(!c.by_name.contains_key("epoll_pwait"));
        assert!(parse("# nothing\n").is_err());
    }
}
