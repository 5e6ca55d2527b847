//! The results as Markdown (ratios, the goals, every number, the machine) and
//! JSON. The Markdown is also what the terminal shows at the end.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::row::Row;
use crate::scenarios::{Scenario, Sizes};
use crate::targets::{Budget, TargetKind};

/// Where and how the numbers were taken.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Meta {
    pub date: String,
    pub command: String,
    pub quick: bool,
    pub nproc: String,
    pub cpu: String,
    pub uname: String,
    pub memory: String,
    pub postgres: String,
    pub pgbouncer: String,
    pub pooler: String,
    pub pgbench: String,
    pub nofile: String,
    pub budget: Budget,
    pub sizes: Sizes,
    pub fresh_process_per_scenario: bool,
}

#[derive(Serialize, Deserialize)]
pub struct Report {
    pub meta: Meta,
    pub rows: Vec<Row>,
}

fn find<'a>(rows: &'a [Row], scenario: &str, target: TargetKind) -> Option<&'a Row> {
    rows.iter()
        .find(|r| r.scenario == scenario && r.target == Some(target))
}

pub fn num(v: Option<f64>, decimals: usize) -> String {
    match v {
        Some(v) if v.is_finite() => format!("{v:.decimals$}"),
        _ => "–".into(),
    }
}

/// Ours over theirs, when both exist and theirs is not zero.
fn ratio(ours: Option<f64>, theirs: Option<f64>) -> Option<f64> {
    let (o, t) = (ours?, theirs?);
    (t > 0.0).then(|| o / t)
}

fn times(v: Option<f64>) -> String {
    match v {
        Some(v) if v.is_finite() => format!("{v:.2}×"),
        _ => "–".into(),
    }
}

/// The figure of `row` that a ratio or goal compares.
type Metric = fn(&Row) -> Option<f64>;

fn tps(r: &Row) -> Option<f64> {
    r.tps
}
fn p99(r: &Row) -> Option<f64> {
    r.p99_ms
}
fn fair_p99(r: &Row) -> Option<f64> {
    r.fair_p99_ms
}
fn cpu(r: &Row) -> Option<f64> {
    r.target_cpu_s_per_1k
}
fn logins(r: &Row) -> Option<f64> {
    Some(r.server_logins as f64)
}
fn idle_bytes(r: &Row) -> Option<f64> {
    r.idle_bytes_per_client
}

fn us_over(rows: &[Row], scenario: &str, other: TargetKind, metric: Metric) -> Option<f64> {
    ratio(
        find(rows, scenario, TargetKind::Pooler).and_then(metric),
        find(rows, scenario, other).and_then(metric),
    )
}

fn ratios_table(out: &mut String, scenarios: &[Scenario], rows: &[Row]) {
    out.push_str(
        "| scenario | tps us/PgBouncer | tps us/direct | p99 us/PgBouncer | p99 us/direct \
         | pooler CPU per tx us/PgBouncer | server logins us/PgBouncer | RSS per idle client us/PgBouncer |\n\
         |---|---|---|---|---|---|---|---|\n",
    );
    let pgb = TargetKind::Pgbouncer;
    let direct = TargetKind::Direct;
    for s in scenarios {
        let _ = writeln!(
            out,
            "| ({}) {} | {} | {} | {} | {} | {} | {} | {} |",
            s.key,
            s.title,
            times(us_over(rows, s.key, pgb, tps)),
            times(us_over(rows, s.key, direct, tps)),
            times(us_over(rows, s.key, pgb, p99)),
            times(us_over(rows, s.key, direct, p99)),
            times(us_over(rows, s.key, pgb, cpu)),
            times(us_over(rows, s.key, pgb, logins)),
            times(us_over(rows, s.key, pgb, idle_bytes)),
        );
    }
}

/// What a goal's check found: the measured value as shown, and whether it is met.
type Verdict = Option<(String, bool)>;

/// Finds a goal's verdict in the rows.
type Check = Box<dyn Fn(&[Row]) -> Verdict>;

/// One of the targets, checked against the rows.
struct Goal {
    scenario: &'static str,
    text: String,
    check: Check,
}

fn goal(
    scenario: &'static str,
    text: &str,
    check: impl Fn(&[Row], &'static str) -> Verdict + 'static,
) -> Goal {
    Goal {
        scenario,
        text: text.to_owned(),
        check: Box::new(move |rows| check(rows, scenario)),
    }
}

fn at_least(v: Option<f64>, goal: f64, show: impl Fn(f64) -> String) -> Verdict {
    let v = v?;
    Some((show(v), v >= goal))
}

fn at_most(v: Option<f64>, goal: f64, show: impl Fn(f64) -> String) -> Verdict {
    let v = v?;
    Some((show(v), v <= goal))
}

fn ours(rows: &[Row], s: &str) -> Option<Row> {
    find(rows, s, TargetKind::Pooler).cloned()
}

fn x(v: f64) -> String {
    format!("{v:.2}×")
}

/// A goal on us over PgBouncer in one figure: at least `bound` (tps) or at most
/// (CPU).
fn vs_pgbouncer(scenario: &'static str, text: &str, metric: Metric, bound: f64) -> Goal {
    let at_least_bound = text.starts_with("tps");
    goal(scenario, text, move |r, s| {
        let v = us_over(r, s, TargetKind::Pgbouncer, metric);
        if at_least_bound {
            at_least(v, bound, x)
        } else {
            at_most(v, bound, x)
        }
    })
}

/// The targets of issue 6, and issue 16's for the pgbench (a).
fn goals() -> Vec<Goal> {
    let pgb = TargetKind::Pgbouncer;
    let mut goals = vec![
        vs_pgbouncer(
            "a-pgbench",
            "pooler CPU per transaction ≤ 0.8× PgBouncer's",
            cpu,
            0.8,
        ),
        vs_pgbouncer("a-pgbench", "tps ≥ PgBouncer's", tps, 1.0),
        vs_pgbouncer("a", "tps ≥ 1.5× PgBouncer", tps, 1.5),
        vs_pgbouncer(
            "a",
            "pooler CPU per transaction ≤ 0.6× PgBouncer's",
            cpu,
            0.6,
        ),
        vs_pgbouncer("b", "tps ≥ 3× PgBouncer", tps, 3.0),
        goal("b", "server logins ≤ 1% of PgBouncer's", move |r, s| {
            let ours = ours(r, s)?.server_logins;
            let theirs = find(r, s, pgb)?.server_logins;
            Some((
                format!("{ours} vs {theirs}"),
                ours as f64 <= theirs as f64 * 0.01,
            ))
        }),
    ];
    // (c) over every role; (d) over the quiet ones, whose p99 the noisy role's many
    // fast transactions would otherwise hide.
    for (s, roles, p99_of) in [("c", "role", p99 as Metric), ("d", "quiet role", fair_p99)] {
        goals.push(goal(
            s,
            &format!("every {roles} ≥ 50% of the mean {roles} tps"),
            min_over_mean,
        ));
        goals.push(goal(
            s,
            &format!("Jain's index over {roles}s ≥ 0.95"),
            |r, s| at_least(ours(r, s)?.jain, 0.95, |v| format!("{v:.3}")),
        ));
        goals.push(goal(
            s,
            &format!("p99 of {roles}s ≤ 0.5× PgBouncer's"),
            move |r, s| at_most(us_over(r, s, pgb, p99_of), 0.5, x),
        ));
    }
    goals.push(vs_pgbouncer("e", "tps ≥ 1.5× PgBouncer", tps, 1.5));
    goals.push(goal("g", "≤ 1 KiB RSS per idle client", |r, s| {
        at_most(ours(r, s)?.idle_bytes_per_client, 1024.0, |v| {
            format!("{v:.0} B")
        })
    }));
    goals
}

fn min_over_mean(rows: &[Row], s: &str) -> Verdict {
    let r = ours(rows, s)?;
    let share = r.role_tps_min? / r.role_tps_mean?;
    Some((
        format!(
            "min {:.1} / mean {:.1} tps = {:.0}%",
            r.role_tps_min?,
            r.role_tps_mean?,
            share * 100.0
        ),
        share >= 0.5,
    ))
}

fn goals_table(out: &mut String, rows: &[Row]) {
    out.push_str("| scenario | goal | measured | met |\n|---|---|---|---|\n");
    for g in goals() {
        let (shown, met) = match (g.check)(rows) {
            Some((shown, met)) => (shown, if met { "yes" } else { "**no**" }),
            None => ("–".into(), "not measured"),
        };
        let _ = writeln!(out, "| ({}) | {} | {shown} | {met} |", g.scenario, g.text);
    }
}

fn results_table(out: &mut String, scenarios: &[Scenario], rows: &[Row]) {
    out.push_str(
        "| scenario | target | tps | p50 ms | p99 ms | p99.9 ms | errors | role tps min / mean | Jain \
         | server logins | servers held (h) | target CPU s / 1k tx | Postgres CPU s / 1k tx | target RSS MiB |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for s in scenarios {
        for r in rows.iter().filter(|r| r.scenario == s.key) {
            let target = r.target.map(TargetKind::label).unwrap_or_default();
            let roles = match (r.role_tps_min, r.role_tps_mean) {
                (Some(min), Some(mean)) => format!("{min:.1} / {mean:.1}"),
                _ => "–".into(),
            };
            let p50 = if r.p50_ms.is_none() && r.mean_ms.is_some() {
                format!("{} (mean)", num(r.mean_ms, 2))
            } else {
                num(r.p50_ms, 2)
            };
            let _ = writeln!(
                out,
                "| ({}) | {target} | {} | {p50} | {} | {} | {} | {roles} | {} | {} | {} | {} | {} | {} |",
                s.key,
                num(r.tps, 0),
                num(r.p99_ms, 2),
                num(r.p999_ms, 2),
                r.errors,
                num(r.jain, 3),
                r.server_logins,
                match (r.servers_max, r.listening_servers_max) {
                    (Some(all), Some(listening)) => format!("{all} ({listening} listening)"),
                    _ => "–".into(),
                },
                num(r.target_cpu_s_per_1k, 3),
                num(r.postgres_cpu_s_per_1k, 3),
                num(r.target_rss_kib.map(|k| k as f64 / 1024.0), 1),
            );
        }
    }
}

/// CPU and system calls per transaction of the runs whose system calls were counted
/// (the pgbench scenarios): what the hot path costs each target.
fn per_transaction_table(out: &mut String, scenarios: &[Scenario], rows: &[Row]) {
    let mut names: Vec<&str> = crate::syscalls::NAMED
        .iter()
        .copied()
        .filter(|n| {
            rows.iter()
                .filter_map(|r| r.syscalls.as_ref())
                .any(|c| c.by_name.get(*n).is_some_and(|v| *v > 0))
        })
        .collect();
    names.push("other");
    let _ = writeln!(
        out,
        "| scenario | target | tps | target CPU µs / tx | of which system | Postgres CPU µs / tx | system calls / tx | {} |\n\
         |---|---|---|---|---|---|---|{}",
        names.join(" | "),
        "---|".repeat(names.len())
    );
    for s in scenarios {
        for r in rows.iter().filter(|r| {
            r.scenario == s.key && matches!(s.shape, crate::scenarios::Shape::Pgbench(_))
        }) {
            let target = r.target.map(TargetKind::label).unwrap_or_default();
            let per_tx = |n: u64| (r.transactions > 0).then(|| n as f64 / r.transactions as f64);
            let calls = r.syscalls.as_ref();
            let by_name: Vec<String> = names
                .iter()
                .map(|n| num(calls.and_then(|c| per_tx(*c.by_name.get(*n)?)), 2))
                .collect();
            let _ = writeln!(
                out,
                "| ({}) | {target} | {} | {} | {} | {} | {} | {} |",
                s.key,
                num(r.tps, 0),
                num(r.target_cpu_s_per_1k.map(|v| v * 1000.0), 1),
                num(r.target_system_cpu_s_per_1k.map(|v| v * 1000.0), 1),
                num(r.postgres_cpu_s_per_1k.map(|v| v * 1000.0), 1),
                num(calls.and_then(|c| per_tx(c.total)), 2),
                by_name.join(" | "),
            );
        }
    }
}

fn details(out: &mut String, rows: &[Row]) {
    for r in rows {
        let target = r.target.map(TargetKind::label).unwrap_or_default();
        let mut parts = Vec::new();
        if let Some(n) = r.noisy_tps {
            parts.push(format!(
                "noisy role {n:.0} tps; quiet roles' p99 {} ms",
                num(r.fair_p99_ms, 2)
            ));
        }
        if let Some(b) = r.idle_bytes_per_client {
            parts.push(format!("{b:.0} bytes RSS per idle client"));
        }
        if let Some(note) = &r.note {
            parts.push(note.clone());
        }
        if let (Some(min), Some((app, _))) = (
            r.role_tps_min,
            r.tps_by_app
                .iter()
                .filter(|(app, _)| r.noisy_tps.is_none() || *app != 0)
                .min_by(|a, b| a.1.total_cmp(&b.1)),
        ) {
            parts.push(format!("slowest role: app {app} at {min:.1} tps"));
        }
        if let Some(other) = r.other_cpu_share.filter(|o| *o >= 0.05) {
            parts.push(format!(
                "{:.0}% of the machine's CPU time not accounted to the bench, the target or Postgres",
                other * 100.0
            ));
        }
        for (e, n) in &r.error_kinds {
            parts.push(format!("{n} × `{}`", e.replace('`', "'").replace('|', "/")));
        }
        if !parts.is_empty() {
            let _ = writeln!(out, "- ({}) {target}: {}", r.scenario, parts.join("; "));
        }
    }
}

pub fn markdown(meta: &Meta, scenarios: &[Scenario], rows: &[Row], chart: Option<&str>) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# Benchmark: the pooler beside PgBouncer and direct Postgres\n\n\
         {} run of {}, one throwaway Postgres, every target against it in turn.\n\n\
         Command: `{}`\n",
        if meta.quick {
            "A quick (smoke)"
        } else {
            "A full"
        },
        meta.date,
        meta.command
    );
    out.push_str("## Ratios (us / PgBouncer, us / direct)\n\nAbove 1× is better for tps, below 1× for latency, CPU, logins and memory.\n\n");
    ratios_table(&mut out, scenarios, rows);
    out.push_str("\n## The goals (issue 6; issue 16 for the pgbench (a))\n\n");
    goals_table(&mut out, rows);
    if let Some(chart) = chart {
        let _ = writeln!(out, "\n![tps and p99 per scenario and target]({chart})");
    }
    out.push_str("\n## Every number\n\n");
    results_table(&mut out, scenarios, rows);
    out.push_str(
        "\n## CPU and system calls per transaction (pgbench: the same C client for every target)\n\n",
    );
    per_transaction_table(&mut out, scenarios, rows);
    crate::rounds::ranges(&mut out, scenarios, rows);
    out.push_str("\nPer row: errors, notes, the noisy role (d), memory per idle client (g).\n\n");
    details(&mut out, rows);
    let b = &meta.budget;
    let s = &meta.sizes;
    let _ = write!(
        out,
        "\n## How\n\n\
         - Machine: {nproc} CPUs ({cpu}), {memory}; `{uname}`.\n\
         - Versions: {postgres}; {pgbouncer}; {pooler}; {pgbench}.\n\
         - Both poolers: {conns} server connections in all (`max_server_connections` / \
           `max_db_connections`), {pool} per role (each app's `pool_size` / `default_pool_size`), \
           transaction mode, a client waiting {wait} s for a server gets an error; auth through \
           `dataplane_auth.lookup` as `dp_pooler` and SCRAM pass-through (PgBouncer: \
           `auth_type = scram-sha-256`, `auth_query = SELECT role_name, scram_verifier FROM \
           dataplane_auth.lookup($1)`). Direct: every client is a Postgres backend.\n\
         - Clients: tokio-postgres in this process, SCRAM logins with the apps' real \
           passwords; closed loops of `SELECT v FROM kv WHERE id = <random>` on a {rows}-row \
           table in each app's schema. Each scenario: all clients log in, {warmup} s warm-up, \
           then {duration} s measured. Every connect and transaction is bounded by {timeout} s.\n\
         - Server logins: `connection authorized` lines of the Postgres log (`log_connections = on`) \
           written during the window. CPU: user + system time from `/proc/<pid>/stat` of the \
           pooler process (Postgres: every backend, including those that ended). RSS: `VmRSS`. \
           Per idle client: RSS with all (g) clients open minus RSS before, over the clients opened.\n\
         - pgbench scenarios: `pgbench -n -f <point select>` with `-M simple` or `-M prepared`, \
           `-c`/`-j` as titled, for the scenario's duration (its window includes its logins). The \
           (a-pgbench) scenarios use an app without a `pool_size` of its own, and both poolers \
           are started with `default_pool_size = 20`. System calls: `perf stat -e \
           raw_syscalls:sys_enter,syscalls:sys_enter_<name>…` attached to the target's process \
           (every thread) for the whole pgbench run, the kernel's tracepoint counters (strace \
           would slow the target several times over and change its batching), over pgbench's \
           count of transactions.\n\
         {rounds}\
         - {process}\n\
         - Other work on the machine: each row's window is checked against `/proc/stat`; where \
           over 5% of the CPU time is not accounted to the bench, the target or Postgres \
           (other processes, or kernel work on nobody's account), the details above say so.\n\
         - Open files: {nofile}.\n\
         - PgBouncer 1.18 (Debian 12's) has no `max_prepared_statements` (it came in 1.21): in \
           transaction mode a named statement prepared on one server is missing when the client's \
           next transaction lands on another; the (e) rows count those errors rather than hide \
           them. pgbench names its statements alike in every client (`P_0`), so through PgBouncer \
           it passes or fails by timing: a Bind on a server where nobody prepared yet fails \
           (`does not exist`, and pgbench aborts that client); a Parse on a server that has one \
           logs `already exists` and goes on.\n\
         - (h) LISTEN: each app's notifier sends `pg_notify` with its send time every 100 ms; \
           every listening client records when each arrives. Both poolers get {listen_budget} \
           server connections for it (the pooler may use half for listener servers, one per app \
           with listeners); PgBouncer runs in session mode, the only mode where LISTEN works \
           there, so each listening client needs a server of its own. `tps` counts deliveries, \
           the latency is NOTIFY to client, and “servers held” is the most server connections \
           the apps had at once (`pg_stat_activity`, every 200 ms), with how many of them \
           listened (a session-mode server whose last statement was LISTEN, or the pooler's \
           listener servers, named `dataplane-pooler LISTEN`); the rest are the pools' \
           servers, idle ones included. Every app uses the same channel name, so a client that \
           hears another app's notifications (no isolation) is counted apart.\n\
         - The load generator, the target and Postgres share the same {nproc} CPUs; compare rows \
           of one run, not across machines.\n",
        nproc = meta.nproc,
        cpu = meta.cpu,
        memory = meta.memory,
        uname = meta.uname,
        postgres = meta.postgres,
        pgbouncer = meta.pgbouncer,
        pooler = meta.pooler,
        pgbench = meta.pgbench,
        conns = b.server_connections,
        pool = b.pool_size,
        wait = b.query_wait_timeout_secs,
        rows = crate::fixture::ROWS,
        warmup = s.warmup_secs,
        duration = s.duration_secs,
        timeout = s.op_timeout_secs,
        nofile = meta.nofile,
        listen_budget = crate::scenarios::LISTEN_BUDGET,
        rounds = crate::rounds::how(rows)
            .map(|how| format!("- {how}\n"))
            .unwrap_or_default(),
        process = if meta.fresh_process_per_scenario {
            "Each scenario runs against a freshly started pooler or PgBouncer."
        } else {
            "Each target ran all its scenarios in one process (`--one-process`)."
        },
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(target: TargetKind, scenario: &str, tps: f64) -> Row {
        Row {
            target: Some(target),
            scenario: scenario.into(),
            tps: Some(tps),
            ..Row::default()
        }
    }

    #[test]
    fn ratios_need_both_sides() {
        let rows = [
            row(TargetKind::Pooler, "a", 300.0),
            row(TargetKind::Pgbouncer, "a", 200.0),
        ];
        assert_eq!(us_over(&rows, "a", TargetKind::Pgbouncer, tps), Some(1.5));
        assert_eq!(us_over(&rows, "a", TargetKind::Direct, tps), None);
        assert_eq!(ratio(Some(1.0), Some(0.0)), None);
    }

    #[test]
    fn a_goal_is_met_missed_or_not_measured() {
        let rows = [
            row(TargetKind::Pooler, "a", 300.0),
            row(TargetKind::Pgbouncer, "a", 250.0),
        ];
        let mut out = String::new();
        goals_table(&mut out, &rows);
        assert!(
            out.contains("| (a) | tps ≥ 1.5× PgBouncer | 1.20× | **no** |"),
            "{out}"
        );
        assert!(
            out.contains("| (g) | ≤ 1 KiB RSS per idle client | – | not measured |"),
            "{out}"
        );
    }
}
