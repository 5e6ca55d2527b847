//! One target × scenario result, and how a run's outcome becomes one.

use std::collections::BTreeMap;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::listen::ListenOutcome;
use crate::load::Outcome;
use crate::procfs::{Probe, Snapshot};
use crate::scenarios::Fairness;
use crate::syscalls::SyscallCounts;
use crate::targets::TargetKind;

/// One target × scenario result. `None` where a figure does not apply or could not be
/// had; errors are counted, never hidden.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Row {
    pub target: Option<TargetKind>,
    pub scenario: String,
    pub window_secs: f64,
    pub transactions: u64,
    pub tps: Option<f64>,
    pub mean_ms: Option<f64>,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub p999_ms: Option<f64>,
    /// p99 over the transactions of the roles fairness is taken over (in (d), the quiet
    /// ones: a noisy role's many fast transactions would hide their waits).
    pub fair_p99_ms: Option<f64>,
    pub errors: u64,
    /// The most frequent error messages with their counts.
    pub error_kinds: Vec<(String, u64)>,
    pub roles: usize,
    pub role_tps_min: Option<f64>,
    pub role_tps_mean: Option<f64>,
    pub jain: Option<f64>,
    /// (d) only: the noisy role's tps.
    pub noisy_tps: Option<f64>,
    /// Every role's tps by app index (app 0 is the busy or noisy one), for finding the
    /// role a low minimum belongs to.
    pub tps_by_app: Vec<(usize, f64)>,
    /// Share of the machine's CPU time in the window used by other processes than the
    /// bench, the target and Postgres (0 to 1): on a shared machine, how disturbed the
    /// row is.
    pub other_cpu_share: Option<f64>,
    pub server_logins: u64,
    pub target_cpu_s_per_1k: Option<f64>,
    /// The kernel's part of `target_cpu_s_per_1k` (system calls, wake-ups).
    #[serde(default)]
    pub target_system_cpu_s_per_1k: Option<f64>,
    pub postgres_cpu_s_per_1k: Option<f64>,
    pub target_rss_kib: Option<u64>,
    /// The target's system calls in the window (pgbench scenarios; `perf stat`).
    #[serde(default)]
    pub syscalls: Option<SyscallCounts>,
    /// (g) only.
    pub idle_opened: Option<usize>,
    pub idle_bytes_per_client: Option<f64>,
    /// (h): the most server connections the apps held at once in the window, and of
    /// them the most that were listening.
    #[serde(default)]
    pub servers_max: Option<u64>,
    #[serde(default)]
    pub listening_servers_max: Option<u64>,
    /// (h): notifications a client got from another app's sessions.
    #[serde(default)]
    pub foreign_notifications: Option<u64>,
    pub note: Option<String>,
    /// An interleaved scenario's rounds, of which this row is the median one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rounds: Option<crate::rounds::Rounds>,
    /// How long the whole run of this scenario took, logins and draining included.
    pub run_secs: f64,
}

/// Jain's fairness index: (Σx)² / (n·Σx²); 1 when all are equal, 1/n when one has all.
pub fn jain(xs: &[f64]) -> Option<f64> {
    let sum: f64 = xs.iter().sum();
    let squares: f64 = xs.iter().map(|x| x * x).sum();
    (squares > 0.0).then(|| sum * sum / (xs.len() as f64 * squares))
}

pub(crate) fn top_errors(errors: BTreeMap<String, u64>) -> (u64, Vec<(String, u64)>) {
    let total = errors.values().sum();
    let mut kinds: Vec<_> = errors.into_iter().collect();
    kinds.sort_by_key(|k| std::cmp::Reverse(k.1));
    kinds.truncate(3);
    (total, kinds)
}

/// CPU seconds per 1,000 transactions between two readings.
pub(crate) fn per_1k(before: Option<f64>, after: Option<f64>, transactions: u64) -> Option<f64> {
    let spent = after? - before?;
    (transactions > 0).then(|| spent * 1000.0 / transactions as f64)
}

pub(crate) fn common(row: &mut Row, probe: &Probe, before: &Snapshot, after: &Snapshot) {
    row.window_secs = after.at.duration_since(before.at).as_secs_f64();
    row.server_logins = probe.logins_between(before, after);
    row.target_cpu_s_per_1k = per_1k(before.target_cpu, after.target_cpu, row.transactions);
    row.target_system_cpu_s_per_1k = per_1k(
        before.target_system_cpu,
        after.target_system_cpu,
        row.transactions,
    );
    row.postgres_cpu_s_per_1k = per_1k(before.postgres_cpu, after.postgres_cpu, row.transactions);
    row.target_rss_kib = probe.target_rss_kib();
    row.other_cpu_share = probe.other_cpu_share(before, after);
}

pub(crate) fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

pub(crate) fn closed_row(
    mut row: Row,
    outcome: Outcome,
    fairness: Option<Fairness>,
    probe: &Probe,
) -> Row {
    let secs = outcome.window().as_secs_f64().max(1e-9);
    let in_fair_set = |app: usize| fairness != Some(Fairness::QuietRoles) || app != 0;
    let mut all = None::<Histogram<u64>>;
    let mut fair = None::<Histogram<u64>>;
    for (app, stats) in &outcome.per_app {
        for (merged, wanted) in [(&mut all, true), (&mut fair, in_fair_set(*app))] {
            match merged {
                Some(h) if wanted => {
                    let _ = h.add(&stats.latency_us);
                }
                None if wanted => *merged = Some(stats.latency_us.clone()),
                _ => {}
            }
        }
    }
    if let Some(h) = all.filter(|h| !h.is_empty()) {
        row.transactions = h.len();
        row.mean_ms = Some(h.mean() / 1000.0);
        row.p50_ms = Some(ms(h.value_at_quantile(0.5)));
        row.p99_ms = Some(ms(h.value_at_quantile(0.99)));
        row.p999_ms = Some(ms(h.value_at_quantile(0.999)));
    }
    row.tps = Some(row.transactions as f64 / secs);
    let role_tps: Vec<f64> = outcome
        .per_app
        .iter()
        .filter(|(app, _)| in_fair_set(**app))
        .map(|(_, s)| s.ok as f64 / secs)
        .collect();
    row.roles = role_tps.len();
    row.tps_by_app = outcome
        .per_app
        .iter()
        .map(|(app, s)| (*app, s.ok as f64 / secs))
        .collect();
    if fairness.is_some() {
        row.role_tps_min = role_tps.iter().copied().reduce(f64::min);
        row.role_tps_mean = Some(role_tps.iter().sum::<f64>() / role_tps.len().max(1) as f64);
        row.jain = jain(&role_tps);
        row.fair_p99_ms = fair
            .filter(|h| !h.is_empty())
            .map(|h| ms(h.value_at_quantile(0.99)));
    }
    if fairness == Some(Fairness::QuietRoles) {
        row.noisy_tps = outcome.per_app.get(&0).map(|s| s.ok as f64 / secs);
    }
    common(&mut row, probe, &outcome.before, &outcome.after);
    (row.errors, row.error_kinds) = top_errors(outcome.errors);
    row
}

/// (h): deliveries per second as tps, their latency, the servers the apps held.
pub(crate) fn listen_row(mut row: Row, o: ListenOutcome, probe: &Probe) -> Row {
    let secs = o
        .after
        .at
        .duration_since(o.before.at)
        .as_secs_f64()
        .max(1e-9);
    let h = &o.latency_us;
    if !h.is_empty() {
        row.mean_ms = Some(h.mean() / 1000.0);
        row.p50_ms = Some(ms(h.value_at_quantile(0.5)));
        row.p99_ms = Some(ms(h.value_at_quantile(0.99)));
        row.p999_ms = Some(ms(h.value_at_quantile(0.999)));
    }
    row.transactions = o.delivered;
    row.tps = Some(o.delivered as f64 / secs);
    row.servers_max = o.servers_max;
    row.listening_servers_max = o.listening_servers_max;
    row.foreign_notifications = Some(o.foreign);
    let shown = |v: Option<u64>| v.map_or("–".into(), |n| n.to_string());
    row.note = Some(format!(
        "{} of {} clients listening; {} of {} notifications owed in the window delivered; \
         {} deliveries of other apps' notifications; at most {} server connections for the \
         apps, {} of them listening; tps counts deliveries",
        o.listening,
        o.listeners,
        o.delivered,
        o.owed,
        o.foreign,
        shown(o.servers_max),
        shown(o.listening_servers_max),
    ));
    common(&mut row, probe, &o.before, &o.after);
    (row.errors, row.error_kinds) = top_errors(o.errors);
    row
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jain_is_one_when_equal_and_one_over_n_when_one_takes_all() {
        assert!((jain(&[3.0, 3.0, 3.0]).unwrap() - 1.0).abs() < 1e-12);
        assert!((jain(&[5.0, 0.0, 0.0, 0.0]).unwrap() - 0.25).abs() < 1e-12);
        assert_eq!(jain(&[0.0, 0.0]), None);
    }

    #[test]
    fn cpu_per_thousand_needs_both_readings_and_some_transactions() {
        assert_eq!(per_1k(Some(1.0), Some(3.0), 2000), Some(1.0));
        assert_eq!(per_1k(None, Some(3.0), 2000), None);
        assert_eq!(per_1k(Some(1.0), Some(3.0), 0), None);
    }
}
