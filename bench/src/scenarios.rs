//! The scenarios of issue 6, (a) to (g) plus pgbench, issue 13's (h) (LISTEN), and how
//! one run of a scenario against one target becomes a [`Row`] of numbers.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::fixture::Fixture;
use crate::listen::{self, ListenOutcome, ListenPlan};
use crate::load::{self, Group, Outcome, Plan, Workload};
use crate::pgbench::{self, PgbenchRun};
use crate::procfs::{Probe, Snapshot};
use crate::syscalls::SyscallCounts;
use crate::targets::{Budget, Target, TargetKind};

/// Which roles a fairness figure is taken over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fairness {
    /// Every role that ran.
    AllRoles,
    /// Every role but app 0, the noisy one.
    QuietRoles,
}

#[derive(Debug, Clone)]
pub enum Shape {
    Closed {
        groups: Vec<Group>,
        workload: Workload,
        fairness: Option<Fairness>,
    },
    Idle {
        clients: usize,
    },
    Pgbench(PgbenchShape),
    /// `per_app` listening clients and one notifier for each of `apps` apps (listen.rs).
    Listen {
        apps: usize,
        per_app: usize,
    },
}

/// A pgbench run: the same C client for every target, so differences are the target's.
#[derive(Debug, Clone)]
pub struct PgbenchShape {
    pub clients: usize,
    /// pgbench threads (`-j`).
    pub threads: usize,
    /// `-M prepared` rather than the simple protocol.
    pub prepared: bool,
    /// The hot app (pool = both targets' `default_pool_size`, set to `servers`) rather
    /// than app 0 (pool of the shared budget).
    pub hot: Option<HotPool>,
}

/// Server connections of the hot app in a scenario: both poolers are started with
/// `default_pool_size` set to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HotPool {
    pub servers: usize,
}

impl Scenario {
    /// The budget its target is started with.
    pub fn budget(&self, base: &Budget) -> Budget {
        match &self.shape {
            Shape::Pgbench(PgbenchShape {
                hot: Some(HotPool { servers }),
                ..
            }) => Budget {
                pool_size: *servers,
                server_connections: base.server_connections.max(*servers),
                ..*base
            },
            Shape::Listen { .. } => Budget {
                server_connections: LISTEN_BUDGET,
                ..*base
            },
            _ => *base,
        }
    }

    /// LISTEN works through PgBouncer in session mode only.
    pub fn pgbouncer_session_mode(&self) -> bool {
        matches!(self.shape, Shape::Listen { .. })
    }
}

/// The budget of (h): a listener server for each of its apps and their notifiers'
/// transactions. PgBouncer gets the same; it needs a server per listening client.
pub const LISTEN_BUDGET: usize = 200;

#[derive(Debug, Clone)]
pub struct Scenario {
    pub key: &'static str,
    pub title: String,
    pub shape: Shape,
    /// Run in rounds interleaved across the targets, a row being the median round
    /// (rounds.rs): its CPU per transaction is held against PgBouncer's, on a noisy machine.
    pub interleaved: bool,
}

/// How long and how big a run is.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Sizes {
    pub warmup_secs: f64,
    pub duration_secs: f64,
    pub op_timeout_secs: u64,
    pub idle_clients: usize,
    pub idle_max_open_secs: u64,
    /// (h): apps, and listening clients per app.
    #[serde(default = "default_listen_apps")]
    pub listen_apps: usize,
    #[serde(default = "default_listen_per_app")]
    pub listen_per_app: usize,
}

fn default_listen_apps() -> usize {
    100
}

fn default_listen_per_app() -> usize {
    10
}

fn group(apps: std::ops::Range<usize>, clients: usize) -> Group {
    Group { apps, clients }
}

/// Every scenario, in report order. App 0 is the busy or noisy role everywhere.
pub fn all(sizes: &Sizes) -> Vec<Scenario> {
    let closed = |key, title: &str, groups, workload, fairness| Scenario {
        key,
        title: title.to_owned(),
        shape: Shape::Closed {
            groups,
            workload,
            fairness,
        },
        interleaved: false,
    };
    let hot = |key, title: &str, prepared| Scenario {
        key,
        title: title.to_owned(),
        shape: Shape::Pgbench(PgbenchShape {
            clients: 100,
            threads: 2,
            prepared,
            hot: Some(HotPool { servers: 20 }),
        }),
        interleaved: true,
    };
    vec![
        closed(
            "a",
            "1 role × 100 clients, point selects",
            vec![group(0..1, 100)],
            Workload::PointSelect,
            None,
        ),
        hot(
            "a-pgbench",
            "pgbench point selects (simple protocol), 1 role × 100 clients over 20 servers",
            false,
        ),
        hot(
            "a-pgbench-prepared",
            "pgbench -M prepared point selects, 1 role × 100 clients over 20 servers",
            true,
        ),
        closed(
            "b",
            "40 roles × 5 clients, budget 40",
            vec![group(0..40, 5)],
            Workload::PointSelect,
            Some(Fairness::AllRoles),
        ),
        closed(
            "c",
            "100 roles × 2 clients, budget 40",
            vec![group(0..100, 2)],
            Workload::PointSelect,
            Some(Fairness::AllRoles),
        ),
        closed(
            "d",
            "noisy role × 50 clients beside 50 quiet roles × 1",
            vec![group(0..1, 50), group(1..51, 1)],
            Workload::PointSelect,
            Some(Fairness::QuietRoles),
        ),
        closed(
            "e",
            "prepared statements (named, extended protocol), 1 role × 20 clients",
            vec![group(0..1, 20)],
            Workload::Prepared,
            None,
        ),
        Scenario {
            key: "e-pgbench",
            title: "pgbench -M prepared, 1 role × 8 clients (-j 8)".into(),
            shape: Shape::Pgbench(PgbenchShape {
                clients: 8,
                threads: 8,
                prepared: true,
                hot: None,
            }),
            interleaved: false,
        },
        closed(
            "f",
            "login storm: 10 roles × 2 clients, a new connection per transaction",
            vec![group(0..10, 2)],
            Workload::LoginStorm,
            Some(Fairness::AllRoles),
        ),
        Scenario {
            key: "g",
            title: format!(
                "{} idle clients (logged in, no query) held open over 100 roles",
                sizes.idle_clients
            ),
            shape: Shape::Idle {
                clients: sizes.idle_clients,
            },
            interleaved: false,
        },
        Scenario {
            key: "h",
            title: format!(
                "LISTEN: {} listening clients over {} apps, a notifier per app (10/s), \
                 budget {LISTEN_BUDGET}; latency is NOTIFY to client",
                sizes.listen_apps * sizes.listen_per_app,
                sizes.listen_apps
            ),
            shape: Shape::Listen {
                apps: sizes.listen_apps,
                per_app: sizes.listen_per_app,
            },
            interleaved: false,
        },
    ]
}

/// The apps a run needs: the most any scenario touches.
pub const APPS: usize = 100;

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

fn top_errors(errors: BTreeMap<String, u64>) -> (u64, Vec<(String, u64)>) {
    let total = errors.values().sum();
    let mut kinds: Vec<_> = errors.into_iter().collect();
    kinds.sort_by_key(|k| std::cmp::Reverse(k.1));
    kinds.truncate(3);
    (total, kinds)
}

/// CPU seconds per 1,000 transactions between two readings.
fn per_1k(before: Option<f64>, after: Option<f64>, transactions: u64) -> Option<f64> {
    let spent = after? - before?;
    (transactions > 0).then(|| spent * 1000.0 / transactions as f64)
}

fn common(row: &mut Row, probe: &Probe, before: &Snapshot, after: &Snapshot) {
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

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

fn closed_row(mut row: Row, outcome: Outcome, fairness: Option<Fairness>, probe: &Probe) -> Row {
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
fn listen_row(mut row: Row, o: ListenOutcome, probe: &Probe) -> Row {
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

/// What a scenario run needs besides the scenario.
pub struct Context<'a> {
    pub admin: &'a tokio_postgres::Client,
    pub fixture: &'a Fixture,
    pub target: &'a Target,
    pub probe: &'a Probe,
    pub sizes: &'a Sizes,
    pub work_dir: &'a Path,
    pub tick: &'a dyn Fn(),
}

/// Runs one scenario against one target.
pub async fn run(scenario: &Scenario, cx: &Context<'_>) -> anyhow::Result<Row> {
    let started = std::time::Instant::now();
    let mut row = run_shape(scenario, cx).await?;
    row.run_secs = started.elapsed().as_secs_f64();
    Ok(row)
}

async fn run_shape(scenario: &Scenario, cx: &Context<'_>) -> anyhow::Result<Row> {
    let configs: Vec<_> = cx
        .fixture
        .apps
        .iter()
        .map(|app| cx.target.client_config(app, &cx.fixture.db.db))
        .collect();
    let op_timeout = Duration::from_secs(cx.sizes.op_timeout_secs);
    let row = Row {
        target: Some(cx.target.kind),
        scenario: scenario.key.to_owned(),
        ..Row::default()
    };
    match &scenario.shape {
        Shape::Closed {
            groups,
            workload,
            fairness,
        } => {
            let plan = Plan {
                groups: groups.clone(),
                workload: *workload,
                warmup: Duration::from_secs_f64(cx.sizes.warmup_secs),
                duration: Duration::from_secs_f64(cx.sizes.duration_secs),
                op_timeout,
            };
            let outcome = load::closed_loop(plan, &configs, cx.probe, cx.tick).await?;
            Ok(closed_row(row, outcome, *fairness, cx.probe))
        }
        Shape::Idle { clients } => {
            if cx.target.kind == TargetKind::Direct {
                return Ok(Row {
                    note: Some("not run: one Postgres backend (MiBs) per client".into()),
                    ..row
                });
            }
            let outcome = load::idle_clients(
                *clients,
                &configs,
                cx.probe,
                op_timeout,
                Duration::from_secs(cx.sizes.idle_max_open_secs),
                cx.tick,
            )
            .await;
            let mut row = Row {
                idle_opened: Some(outcome.opened),
                idle_bytes_per_client: outcome.bytes_per_client(),
                note: Some(format!(
                    "{} of {} opened in {:.1} s; RSS {} → {} KiB",
                    outcome.opened,
                    outcome.requested,
                    outcome.open_secs,
                    outcome.rss_before_kib.unwrap_or(0),
                    outcome.rss_after_kib.unwrap_or(0)
                )),
                ..row
            };
            common(&mut row, cx.probe, &outcome.before, &outcome.after);
            row.target_rss_kib = outcome.rss_after_kib;
            (row.errors, row.error_kinds) = top_errors(outcome.errors);
            Ok(row)
        }
        Shape::Listen { apps, per_app } => {
            if cx.target.kind == TargetKind::Direct {
                return Ok(Row {
                    note: Some(format!(
                        "not run: {} backends, one per client, past the cluster's max_connections",
                        apps * (per_app + 1)
                    )),
                    ..row
                });
            }
            let plan = ListenPlan {
                apps: *apps,
                per_app: *per_app,
                warmup: Duration::from_secs_f64(cx.sizes.warmup_secs),
                duration: Duration::from_secs_f64(cx.sizes.duration_secs),
                op_timeout,
            };
            let o = listen::run(&plan, &configs, cx.admin, cx.probe, cx.tick).await?;
            Ok(listen_row(row, o, cx.probe))
        }
        Shape::Pgbench(shape) => {
            let app = match shape.hot {
                Some(_) => &cx.fixture.hot,
                None => cx
                    .fixture
                    .apps
                    .first()
                    .ok_or_else(|| anyhow::anyhow!("no apps"))?,
            };
            let pgbench = cx.fixture.cluster().bindir().join("pgbench");
            let outcome = pgbench::run(
                PgbenchRun {
                    pgbench: &pgbench,
                    port: cx.target.port,
                    role: &app.role,
                    password: &app.password,
                    dbname: &cx.fixture.db.db,
                    clients: shape.clients,
                    threads: shape.threads,
                    prepared: shape.prepared,
                    duration: Duration::from_secs_f64(cx.sizes.duration_secs),
                    script_dir: cx.work_dir,
                },
                cx.probe,
            )
            .await;
            let mut note =
                "pgbench reports the mean latency only; its window includes its logins".to_owned();
            let mut row = Row {
                transactions: outcome.processed,
                tps: outcome.tps,
                mean_ms: outcome.latency_avg_ms,
                roles: 1,
                ..row
            };
            match outcome.syscalls {
                Some(Ok(counts)) => row.syscalls = Some(counts),
                Some(Err(why)) => note.push_str(&format!("; system calls not counted: {why}")),
                None => {}
            }
            row.note = Some(note);
            common(&mut row, cx.probe, &outcome.before, &outcome.after);
            let mut errors = outcome.errors;
            if let Some(e) = outcome.error {
                errors.insert(e, 1);
            }
            if outcome.failed > 0 {
                errors.insert(
                    "failed transactions (pgbench's count)".into(),
                    outcome.failed,
                );
            }
            (row.errors, row.error_kinds) = top_errors(errors);
            Ok(row)
        }
    }
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
