//! `bench`: our pooler beside PgBouncer and direct Postgres, in one run, on one
//! throwaway cluster, multi-tenant scenarios first (issue 6).
//!
//! `main` (flags, order of work) → [`fixture`] (the harness's Postgres, R apps from
//! the provisioner library, a table each) → the CPU scenarios in [`rounds`]
//! interleaved across the targets, then for each target in turn the rest, [`targets`]
//! (start the `pooler` binary, PgBouncer, or nothing for direct) → [`scenarios`] (what
//! each run is and the [`row::Row`] it yields) → [`load`] (our clients) or
//! [`pgbench`], with [`procfs`] (CPU, RSS, server logins) and [`syscalls`] (the
//! target's system calls, by `perf stat`) → [`report`] and [`chart`]
//! (Markdown, JSON, SVG under `bench/results/`).

mod chart;
mod fixture;
mod listen;
mod load;
mod pgbench;
mod procfs;
mod report;
mod rounds;
mod row;
mod scenarios;
mod syscalls;
mod targets;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use dataplane_tests::PgCluster;
use indicatif::{ProgressBar, ProgressStyle};

use crate::fixture::Fixture;
use crate::procfs::Probe;
use crate::report::{Meta, Report};
use crate::row::Row;
use crate::scenarios::{Scenario, Sizes};
use crate::targets::{Binaries, Budget, Target, TargetKind};

#[derive(Parser)]
#[command(about = "Load benchmark: the pooler beside PgBouncer and direct Postgres, in one run")]
struct Args {
    /// A small run (seconds per scenario, 500 idle clients) for CI; under two minutes.
    #[arg(long)]
    quick: bool,
    /// Where the Markdown, SVG and JSON go (`results.*`, or `quick.*` with --quick).
    #[arg(long, default_value = "bench/results")]
    out: PathBuf,
    /// The pooler binary. Default: `pooler` beside this binary (same cargo profile).
    #[arg(long)]
    pooler_bin: Option<PathBuf>,
    /// The PgBouncer binary. Default: from PATH, else /usr/sbin/pgbouncer.
    #[arg(long)]
    pgbouncer_bin: Option<PathBuf>,
    /// Seconds each scenario is measured, after its warm-up. Default 15 (--quick: 1.5).
    #[arg(long)]
    duration: Option<f64>,
    /// Idle clients held open in (g). Default 10000 (--quick: 500).
    #[arg(long)]
    idle_clients: Option<usize>,
    /// Only these targets, comma-separated. Default: all three.
    #[arg(long, value_delimiter = ',')]
    targets: Vec<TargetKind>,
    /// Only these scenarios by key (a, a-pgbench, a-pgbench-prepared, b, c, d, e,
    /// e-pgbench, f, g, h), comma-separated.
    #[arg(long, value_delimiter = ',')]
    scenarios: Vec<String>,
    /// Only rewrite the Markdown and chart from a results JSON of an earlier run (into
    /// --out, named as that run named them), without running anything.
    #[arg(long, value_name = "JSON")]
    render: Option<PathBuf>,
    /// Keep one process per target across its scenarios (default: a fresh one for each
    /// scenario), to see how what one workload leaves behind affects the next. Not for
    /// the rounds of --rounds: each of those starts a fresh process.
    #[arg(long)]
    one_process: bool,
    /// Rounds of the CPU scenarios (a-pgbench, a-pgbench-prepared), each running every
    /// target once, interleaved, a fresh process each time; a target's row is its round
    /// with the median CPU per transaction (of an even number, the lower middle one).
    /// Default 3 (--quick: 1).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    rounds: Option<u32>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run_main(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run_main(args: &Args) -> anyhow::Result<()> {
    if let Some(json) = &args.render {
        let text =
            std::fs::read_to_string(json).with_context(|| format!("reading {}", json.display()))?;
        let report: Report = serde_json::from_str(&text)?;
        let scenarios = scenarios::all(&report.meta.sizes);
        return write_results(args, &report, &scenarios);
    }
    // 10,000 idle clients need 10,000 descriptors here and in the target (which
    // inherits the limit); the usual soft limit is 1,024.
    let nofile = match procfs::raise_nofile_limit() {
        Some((before, after)) => {
            eprintln!(
                "bench: raised the soft open-files limit from {before} to the hard limit {after}; the targets inherit it"
            );
            format!(
                "the bench raised its soft limit from {before} to the hard limit {after} at start-up; the targets inherit it"
            )
        }
        None => format!(
            "soft limit {} (already the hard limit)",
            procfs::nofile_limit().map_or("unlimited".into(), |n| n.to_string())
        ),
    };
    let sizes = if args.quick {
        Sizes {
            warmup_secs: 0.5,
            duration_secs: args.duration.unwrap_or(1.5),
            op_timeout_secs: 5,
            idle_clients: args.idle_clients.unwrap_or(500),
            idle_max_open_secs: 30,
            listen_apps: 20,
            listen_per_app: 5,
        }
    } else {
        Sizes {
            warmup_secs: 3.0,
            duration_secs: args.duration.unwrap_or(15.0),
            op_timeout_secs: 10,
            idle_clients: args.idle_clients.unwrap_or(10_000),
            idle_max_open_secs: 180,
            listen_apps: 100,
            listen_per_app: 10,
        }
    };
    let budget = Budget {
        server_connections: 40,
        pool_size: 5,
        query_wait_timeout_secs: if args.quick { 3 } else { 5 },
        // Every idle client of (g) and the busiest closed loop (200 clients), under the
        // open-files limit, which the pooler checks its max_client_conn against.
        max_client_conn: (sizes.idle_clients + 1000)
            .min(procfs::nofile_limit().map_or(usize::MAX, |n| n.saturating_sub(200) as usize)),
    };
    eprintln!("bench: starting a throwaway PostgreSQL …");
    // Direct clients of (b) and (c) are 200 backends, beside the bench's own.
    let cluster = fixture::start_cluster(400)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let result = runtime.block_on(run(args, cluster, sizes, budget, nofile));
    drop(runtime);
    cluster.stop();
    result
}

fn command_output(program: &str, args: &[&str]) -> String {
    std::process::Command::new(program)
        .args(args)
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or_default()
                .trim()
                .to_owned()
        })
        .unwrap_or_default()
}

fn machine_file_value(path: &str, key: &str) -> String {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .map(|v| v.trim_start_matches([' ', '\t', ':']).trim().to_owned())
        .unwrap_or_default()
}

async fn run(
    args: &Args,
    cluster: &'static PgCluster,
    sizes: Sizes,
    budget: Budget,
    nofile: String,
) -> anyhow::Result<()> {
    let scenarios: Vec<Scenario> = scenarios::all(&sizes)
        .into_iter()
        .filter(|s| args.scenarios.is_empty() || args.scenarios.iter().any(|k| k == s.key))
        .collect();
    let kinds: Vec<TargetKind> = TargetKind::ALL
        .into_iter()
        .filter(|k| args.targets.is_empty() || args.targets.contains(k))
        .collect();
    let bins = Binaries {
        pooler: match &args.pooler_bin {
            Some(p) => p.clone(),
            None => std::env::current_exe()?
                .parent()
                .map(|d| d.join("pooler"))
                .context("locating the pooler binary")?,
        },
        pgbouncer: args.pgbouncer_bin.clone().or_else(targets::find_pgbouncer),
    };

    eprintln!("bench: provisioning {} apps …", scenarios::APPS);
    let fixture = fixture::prepare(cluster, scenarios::APPS, budget.pool_size as i32).await?;
    let postgres: String = fixture
        .db
        .admin()
        .await
        .query_one("SELECT version()", &[])
        .await?
        .get(0);
    let pgbench_bin = cluster.bindir().join("pgbench");
    let meta = Meta {
        date: command_output("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
        command: std::iter::once("bench".to_owned())
            .chain(std::env::args().skip(1))
            .collect::<Vec<_>>()
            .join(" "),
        quick: args.quick,
        nproc: command_output("nproc", &[]),
        cpu: machine_file_value("/proc/cpuinfo", "model name"),
        uname: command_output("uname", &["-a"]),
        memory: format!("{} RAM", machine_file_value("/proc/meminfo", "MemTotal:")),
        postgres: postgres.split(" on ").next().unwrap_or_default().to_owned(),
        pgbouncer: bins
            .pgbouncer
            .as_ref()
            .map(|p| command_output(&p.to_string_lossy(), &["--version"]))
            .unwrap_or_else(|| "PgBouncer not installed".into()),
        pooler: command_output(&bins.pooler.to_string_lossy(), &["--version"]),
        pgbench: command_output(&pgbench_bin.to_string_lossy(), &["--version"]),
        nofile,
        budget,
        sizes,
        fresh_process_per_scenario: !args.one_process,
    };

    let rounds = args
        .rounds
        .map_or(if args.quick { 1 } else { 3 }, |r| r as usize);
    let (interleaved, per_target): (Vec<&Scenario>, Vec<&Scenario>) =
        scenarios.iter().partition(|s| s.interleaved);
    let total = kinds.len() * (interleaved.len() * rounds + per_target.len());
    let progress = ProgressBar::new(total as u64);
    progress.set_style(
        ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} {msg}")?
            .progress_chars("=> "),
    );
    let work_dir = tempfile::tempdir()?;
    let admin = fixture.db.admin().await;
    let mut runner = Runner {
        cluster,
        fixture: &fixture,
        admin: &admin,
        sizes: &sizes,
        budget,
        bins: &bins,
        work_dir: work_dir.path(),
        progress: &progress,
        quick: args.quick,
        start_failed: BTreeMap::new(),
    };
    let mut rows = Vec::new();
    for s in interleaved {
        let mut by_kind: BTreeMap<TargetKind, Vec<Row>> = BTreeMap::new();
        for (round, kind) in rounds::order(&kinds, rounds) {
            let row = match runner.start(kind, s).await {
                Ok(target) => {
                    let row = runner.measure(s, &target, Some((round, rounds))).await;
                    target.stop().await;
                    runner.settle().await;
                    row
                }
                Err(row) => row,
            };
            by_kind.entry(kind).or_default().push(row);
        }
        for row in by_kind.into_values().filter_map(rounds::median) {
            if let Some(r) = row.rounds.as_ref().filter(|r| r.each.len() > 1) {
                runner.say(format!(
                    "{}  median of {} rounds: round {}",
                    summary_line(&row),
                    r.each.len(),
                    r.chosen + 1
                ));
            }
            rows.push(row);
        }
    }
    for kind in kinds {
        let mut running: Option<(Target, (Budget, bool))> = None;
        for s in &per_target {
            let wanted = (s.budget(&budget), s.pgbouncer_session_mode());
            if let Some((t, _)) = running.take_if(|(_, b)| *b != wanted) {
                t.stop().await;
            }
            if running.is_none() {
                match runner.start(kind, s).await {
                    Ok(t) => running = Some((t, wanted)),
                    Err(row) => {
                        rows.push(row);
                        continue;
                    }
                }
            }
            let Some((target, _)) = running.as_ref() else {
                continue;
            };
            rows.push(runner.measure(s, target, None).await);
            // Each scenario gets a fresh process unless asked otherwise: what one
            // scenario left behind (idle servers, a scheduler's memory of who was
            // served) must not decide the next one's numbers.
            if !args.one_process
                && let Some((t, _)) = running.take()
            {
                t.stop().await;
            }
            runner.settle().await;
        }
        if let Some((t, _)) = running.take() {
            t.stop().await;
        }
    }
    progress.finish_and_clear();
    write_results(args, &Report { meta, rows }, &scenarios)
}

/// What running a scenario against a target takes, for the interleaved rounds and
/// the per-target scenarios alike.
struct Runner<'a> {
    cluster: &'static PgCluster,
    fixture: &'a Fixture,
    admin: &'a tokio_postgres::Client,
    sizes: &'a Sizes,
    budget: Budget,
    bins: &'a Binaries,
    work_dir: &'a Path,
    progress: &'a ProgressBar,
    quick: bool,
    /// Why a target did not start: it is not tried again, and its later rows say why.
    start_failed: BTreeMap<TargetKind, String>,
}

impl Runner<'_> {
    /// A process of `kind` as `s` wants it (a scenario with a budget of its own, the
    /// hot app's pool or LISTEN's, or PgBouncer's session mode for LISTEN, gets one
    /// started with it), or the failed row, counted, saying why not.
    async fn start(&mut self, kind: TargetKind, s: &Scenario) -> Result<Target, Row> {
        let result = match self.start_failed.get(&kind) {
            Some(why) => Err(failed_row(kind, s, why)),
            None => {
                self.progress
                    .set_message(format!("starting {}", kind.label()));
                let (budget, session) = (s.budget(&self.budget), s.pgbouncer_session_mode());
                start_healthy(kind, self.fixture, &budget, self.bins, session)
                    .await
                    .map_err(|e| {
                        eprintln!("bench: {}: {e:#}", kind.label());
                        let why = format!("target did not start: {e:#}");
                        let row = failed_row(kind, s, &why);
                        self.start_failed.insert(kind, why);
                        row
                    })
            }
        };
        if result.is_err() {
            self.progress.inc(1);
        }
        result
    }

    /// Runs `s` against `target` (`round`: which of how many) and counts it done.
    async fn measure(&self, s: &Scenario, target: &Target, round: Option<(usize, usize)>) -> Row {
        let kind = target.kind;
        let probe = Probe {
            target_pid: target.pid,
            postmaster_pid: self.cluster.postmaster_pid(),
            log: self.cluster.dir().join("postgres.log"),
        };
        let of = round.map_or(String::new(), |(r, n)| format!(", round {}/{n}", r + 1));
        self.progress
            .set_message(format!("{}: ({}) {}{of}", kind.label(), s.key, s.title));
        let tick = || self.progress.tick();
        let cx = scenarios::Context {
            admin: self.admin,
            fixture: self.fixture,
            target,
            probe: &probe,
            sizes: self.sizes,
            work_dir: self.work_dir,
            tick: &tick,
        };
        let row = scenarios::run(s, &cx)
            .await
            .unwrap_or_else(|e| failed_row(kind, s, &format!("{e:#}")));
        self.say(format!("{}{of}", summary_line(&row)));
        self.progress.inc(1);
        row
    }

    fn say(&self, line: String) {
        // indicatif draws nothing without a terminal; the lines still belong in a log.
        if self.progress.is_hidden() {
            eprintln!("{line}");
        } else {
            self.progress.println(line);
        }
    }

    /// Clients of the last run are logging out; lets Postgres settle.
    async fn settle(&self) {
        tokio::time::sleep(Duration::from_millis(if self.quick { 200 } else { 1000 })).await;
    }
}

/// Starts a target and proves it serves one point select.
/// `session`: PgBouncer in session mode.
async fn start_healthy(
    kind: TargetKind,
    fixture: &Fixture,
    budget: &Budget,
    bins: &Binaries,
    session: bool,
) -> anyhow::Result<Target> {
    let target = Target::start(kind, fixture, budget, bins, session).await?;
    let app = fixture.apps.first().context("no apps")?;
    let check = || async {
        let limit = Duration::from_secs(10);
        let client = load::connect(&target.client_config(app, &fixture.db.db), limit)
            .await
            .map_err(anyhow::Error::msg)?;
        tokio::time::timeout(limit, client.simple_query("SELECT 1"))
            .await
            .context("timed out")??;
        anyhow::Ok(())
    };
    // A few tries: on a busy machine a target's first server login (PgBouncer's
    // auth_query, then the login itself) can outlast its query_wait_timeout once.
    let mut result = check().await;
    for _ in 1..3 {
        if result.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        result = check().await;
    }
    if let Err(e) = result {
        let tail = target.log_tail();
        target.stop().await;
        anyhow::bail!("a first query through it failed: {e:#}\n{tail}");
    }
    Ok(target)
}

fn failed_row(kind: TargetKind, s: &Scenario, why: &str) -> Row {
    Row {
        target: Some(kind),
        scenario: s.key.to_owned(),
        errors: 1,
        error_kinds: vec![(why.chars().take(300).collect(), 1)],
        note: Some("no numbers: the run failed".into()),
        ..Row::default()
    }
}

fn summary_line(r: &Row) -> String {
    let label = r.target.map(TargetKind::label).unwrap_or_default();
    let f = |v: Option<f64>, d: usize| v.map_or("–".into(), |v| format!("{v:.d$}"));
    format!(
        "({}) {label:<16} tps {:>8}  p99 {:>8} ms  CPU {:>6} µs/tx  errors {:>5}  logins {:>6}  jain {}  ({:.1} s)",
        r.scenario,
        f(r.tps, 0),
        f(r.p99_ms, 2),
        f(r.target_cpu_s_per_1k.map(|v| v * 1000.0), 1),
        r.errors,
        r.server_logins,
        f(r.jain, 3),
        r.run_secs
    )
}

fn write_results(args: &Args, report: &Report, scenarios: &[Scenario]) -> anyhow::Result<()> {
    let (meta, rows) = (&report.meta, &report.rows);
    let prefix = if meta.quick { "quick" } else { "results" };
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let chart_name = format!("{prefix}.svg");
    let subtitle = format!(
        "{} · {} CPUs · budget {} server connections, pool {} per role",
        meta.date, meta.nproc, meta.budget.server_connections, meta.budget.pool_size
    );
    let chart = match chart::svg(scenarios, rows, &subtitle) {
        Ok(svg) => {
            std::fs::write(args.out.join(&chart_name), svg)?;
            Some(chart_name.as_str())
        }
        Err(e) => {
            eprintln!("bench: no chart: {e:#}");
            None
        }
    };
    let md = report::markdown(meta, scenarios, rows, chart);
    std::fs::write(args.out.join(format!("{prefix}.md")), &md)?;
    if args.render.is_none() {
        let json = serde_json::to_string_pretty(report)?;
        std::fs::write(args.out.join(format!("{prefix}.json")), json)?;
    }
    println!("{md}");
    eprintln!(
        "bench: wrote {}/{prefix}.{{md,svg,json}}",
        args.out.display()
    );
    Ok(())
}
