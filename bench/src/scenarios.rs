//! The scenarios of issue 6, (a) to (g) plus pgbench, issue 13's (h) (LISTEN), and how
//! one scenario is run against one target.

use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::fixture::Fixture;
use crate::listen::{self, ListenPlan};
use crate::load::{self, Group, Plan, Workload};
use crate::pgbench::{self, PgbenchRun};
use crate::procfs::Probe;
use crate::row::{Row, closed_row, common, listen_row, top_errors};
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
