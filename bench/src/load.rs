//! The clients: closed loops of point selects (simple protocol, named prepared
//! statements, or a new login per transaction) and idle clients held open.
//! Every wait is bounded, so a hung target becomes errors, never a hung bench.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use tokio::task::JoinSet;
use tokio_postgres::{Client, NoTls, Statement};

use crate::fixture::ROWS;
use crate::procfs::{Probe, Snapshot};

/// What each client does per transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workload {
    /// `SELECT v FROM kv WHERE id = <n>` over the simple protocol.
    PointSelect,
    /// The same query as a named statement prepared once per connection and bound in
    /// every transaction (extended protocol): what PgJDBC and asyncpg do.
    Prepared,
    /// Log in, one point select, log out.
    LoginStorm,
}

/// `clients` connections for each app index in `apps`.
#[derive(Debug, Clone)]
pub struct Group {
    pub apps: std::ops::Range<usize>,
    pub clients: usize,
}

/// One closed-loop run.
#[derive(Debug, Clone)]
pub struct Plan {
    pub groups: Vec<Group>,
    pub workload: Workload,
    pub warmup: Duration,
    pub duration: Duration,
    /// Bounds every connect and every transaction.
    pub op_timeout: Duration,
}

/// What one app's clients did in the window.
pub struct AppStats {
    pub ok: u64,
    pub latency_us: Histogram<u64>,
}

/// What a closed-loop run measured in its window.
pub struct Outcome {
    /// Per app index, every app of the plan (also those that completed nothing).
    pub per_app: BTreeMap<usize, AppStats>,
    pub errors: BTreeMap<String, u64>,
    pub before: Snapshot,
    pub after: Snapshot,
}

impl Outcome {
    pub fn window(&self) -> Duration {
        self.after.at.duration_since(self.before.at)
    }
}

/// Per-run state the workers share with the coordinator.
struct Shared {
    recording: AtomicBool,
    stop: AtomicBool,
    ready: AtomicUsize,
}

struct WorkerResult {
    app: usize,
    latency_us: Histogram<u64>,
    ok: u64,
    errors: BTreeMap<String, u64>,
}

/// Latencies in µs, 1 µs to 10 min at 3 significant digits.
fn histogram() -> anyhow::Result<Histogram<u64>> {
    Ok(Histogram::new_with_bounds(1, 600_000_000, 3)?)
}

/// A cheap per-client random id (xorshift), so the load generator spends its CPU on
/// the protocol, not on a random-number crate.
struct Ids(u64);

impl Ids {
    fn next(&mut self) -> u32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % u64::from(ROWS)) as u32 + 1
    }
}

/// An error's SQLSTATE and message with numbers masked (statement names, waited
/// durations), so errors of one kind are counted together.
pub fn error_key(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{}: {}", db.code().code(), mask_numbers(db.message())),
        None => mask_numbers(&e.to_string()),
    }
}

pub fn mask_numbers(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if !c.is_ascii_digit() {
            out.push(c);
        } else if !out.ends_with('#') {
            out.push('#');
        }
    }
    out.chars().take(160).collect()
}

/// Connects and drives the connection on its own task, all within `limit`.
pub async fn connect(config: &tokio_postgres::Config, limit: Duration) -> Result<Client, String> {
    match tokio::time::timeout(limit, config.connect(NoTls)).await {
        Ok(Ok((client, connection))) => {
            tokio::spawn(async move {
                // Its error, if any, surfaces on the client's next call.
                let _ = connection.await;
            });
            Ok(client)
        }
        Ok(Err(e)) => Err(format!("connect: {}", error_key(&e))),
        Err(_) => Err("connect: timed out".into()),
    }
}

const QUERY: &str = "SELECT v FROM kv WHERE id = $1";

async fn point_select(client: &Client, id: u32) -> Result<(), String> {
    let rows = client
        .simple_query(&format!("SELECT v FROM kv WHERE id = {id}"))
        .await
        .map_err(|e| error_key(&e))?;
    let found = rows
        .iter()
        .filter(|m| matches!(m, tokio_postgres::SimpleQueryMessage::Row(_)))
        .count();
    if found == 1 {
        Ok(())
    } else {
        Err(format!("expected one row, got {found}"))
    }
}

/// A connected client, with its prepared statement when the workload wants one.
struct Conn {
    client: Client,
    stmt: Option<Statement>,
}

async fn open(
    config: &tokio_postgres::Config,
    workload: Workload,
    limit: Duration,
) -> Result<Conn, String> {
    let client = connect(config, limit).await?;
    let stmt = match workload {
        Workload::Prepared => Some(
            tokio::time::timeout(limit, client.prepare(QUERY))
                .await
                .map_err(|_| "prepare: timed out".to_owned())?
                .map_err(|e| format!("prepare: {}", error_key(&e)))?,
        ),
        _ => None,
    };
    Ok(Conn { client, stmt })
}

async fn transaction(
    conn: Option<&Conn>,
    config: &tokio_postgres::Config,
    workload: Workload,
    id: u32,
    limit: Duration,
) -> Result<(), String> {
    if workload == Workload::LoginStorm {
        let c = open(config, workload, limit).await?;
        return point_select(&c.client, id).await;
    }
    let Some(c) = conn else {
        return Err("not connected".into());
    };
    match &c.stmt {
        Some(stmt) => c
            .client
            .query_one(stmt, &[&(id as i32)])
            .await
            .map(drop)
            .map_err(|e| error_key(&e)),
        None => point_select(&c.client, id).await,
    }
}

async fn worker(
    app: usize,
    seed: u64,
    config: tokio_postgres::Config,
    plan: Arc<Plan>,
    shared: Arc<Shared>,
    latency_us: Histogram<u64>,
) -> WorkerResult {
    let mut result = WorkerResult {
        app,
        latency_us,
        ok: 0,
        errors: BTreeMap::new(),
    };
    let mut ids = Ids(seed | 1);
    let limit = plan.op_timeout;
    let mut conn = None;
    if plan.workload != Workload::LoginStorm {
        // A failure here is retried in the loop (and counted if it happens in the window).
        conn = open(&config, plan.workload, limit).await.ok();
    }
    shared.ready.fetch_add(1, Ordering::Relaxed);
    while !shared.stop.load(Ordering::Relaxed) {
        if conn.is_none() && plan.workload != Workload::LoginStorm {
            match open(&config, plan.workload, limit).await {
                Ok(c) => conn = Some(c),
                Err(e) => {
                    if shared.recording.load(Ordering::Relaxed) {
                        *result.errors.entry(e).or_default() += 1;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            }
        }
        let start = Instant::now();
        let outcome = tokio::time::timeout(
            limit,
            transaction(conn.as_ref(), &config, plan.workload, ids.next(), limit),
        )
        .await
        .unwrap_or_else(|_| Err("transaction timed out".into()));
        let recording = shared.recording.load(Ordering::Relaxed);
        match outcome {
            Ok(()) if recording => {
                let us = start.elapsed().as_micros().max(1) as u64;
                let _ = result.latency_us.record(us);
                result.ok += 1;
            }
            Ok(()) => {}
            Err(e) => {
                if recording {
                    *result.errors.entry(e).or_default() += 1;
                }
                // The connection's state is unknown: start over, as a driver's pool would.
                conn = None;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    result
}

/// Runs `plan` against the target `configs` point at: every client connects, the
/// warm-up passes, then transactions are counted for `plan.duration`.
pub async fn closed_loop(
    plan: Plan,
    configs: &[tokio_postgres::Config],
    probe: &Probe,
    tick: &dyn Fn(),
) -> anyhow::Result<Outcome> {
    let empty = histogram()?;
    let plan = Arc::new(plan);
    let shared = Arc::new(Shared {
        recording: AtomicBool::new(false),
        stop: AtomicBool::new(false),
        ready: AtomicUsize::new(0),
    });
    let mut tasks = JoinSet::new();
    let mut n = 0;
    for group in &plan.groups {
        for app in group.apps.clone() {
            for _ in 0..group.clients {
                n += 1;
                tasks.spawn(worker(
                    app,
                    0x9e37_79b9_7f4a_7c15_u64.wrapping_mul(n as u64),
                    configs[app].clone(),
                    plan.clone(),
                    shared.clone(),
                    empty.clone(),
                ));
            }
        }
    }
    // Logins first (bounded by the connect timeout), so the window sees steady state.
    let deadline = Instant::now() + plan.op_timeout + Duration::from_secs(2);
    while shared.ready.load(Ordering::Relaxed) < n && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(plan.warmup).await;
    shared.recording.store(true, Ordering::Relaxed);
    let before = probe.snapshot();
    let end = before.at + plan.duration;
    while Instant::now() < end {
        tokio::time::sleep(
            Duration::from_millis(250).min(end.saturating_duration_since(Instant::now())),
        )
        .await;
        tick();
    }
    shared.recording.store(false, Ordering::Relaxed);
    let after = probe.snapshot();
    shared.stop.store(true, Ordering::Relaxed);

    let mut outcome = Outcome {
        per_app: plan
            .groups
            .iter()
            .flat_map(|g| g.apps.clone())
            .map(|a| {
                let stats = AppStats {
                    ok: 0,
                    latency_us: empty.clone(),
                };
                (a, stats)
            })
            .collect(),
        errors: BTreeMap::new(),
        before,
        after,
    };
    let drain = tokio::time::timeout(plan.op_timeout + Duration::from_secs(2), async {
        while let Some(joined) = tasks.join_next().await {
            if let Ok(r) = joined
                && let Some(app) = outcome.per_app.get_mut(&r.app)
            {
                let _ = app.latency_us.add(&r.latency_us);
                app.ok += r.ok;
                for (k, v) in r.errors {
                    *outcome.errors.entry(k).or_default() += v;
                }
            }
        }
    })
    .await;
    if drain.is_err() {
        // Stuck past every timeout: their window counts are lost; say so.
        *outcome
            .errors
            .entry("client task stuck after the window (aborted)".into())
            .or_default() += tasks.len() as u64;
        tasks.abort_all();
    }
    Ok(outcome)
}

/// What holding many idle clients cost the target.
pub struct IdleOutcome {
    pub requested: usize,
    pub opened: usize,
    pub errors: BTreeMap<String, u64>,
    pub open_secs: f64,
    pub rss_before_kib: Option<u64>,
    pub rss_after_kib: Option<u64>,
    pub before: Snapshot,
    pub after: Snapshot,
}

impl IdleOutcome {
    pub fn bytes_per_client(&self) -> Option<f64> {
        let (b, a) = (self.rss_before_kib?, self.rss_after_kib?);
        (self.opened > 0).then(|| (a as f64 - b as f64) * 1024.0 / self.opened as f64)
    }
}

/// Opens `count` clients round-robin over `configs` (logged in, then idle: no query, so
/// what is measured is the clients, not server slots moving between 100 roles), measures
/// the target's RSS with all of them open, and closes them.
pub async fn idle_clients(
    count: usize,
    configs: &[tokio_postgres::Config],
    probe: &Probe,
    op_timeout: Duration,
    max_open_time: Duration,
    tick: &dyn Fn(),
) -> IdleOutcome {
    const CONCURRENT_LOGINS: usize = 32;
    let configs: Arc<Vec<_>> = Arc::new(configs.to_vec());
    let next = Arc::new(AtomicUsize::new(0));
    let before = probe.snapshot();
    let rss_before_kib = probe.target_rss_kib();
    let started = Instant::now();
    let deadline = started + max_open_time;
    let mut tasks = JoinSet::new();
    for _ in 0..CONCURRENT_LOGINS {
        let (configs, next) = (configs.clone(), next.clone());
        tasks.spawn(async move {
            let mut held = Vec::new();
            let mut errors: BTreeMap<String, u64> = BTreeMap::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= count || Instant::now() > deadline {
                    break;
                }
                match connect(&configs[i % configs.len()], op_timeout).await {
                    Ok(client) => held.push(client),
                    Err(e) => *errors.entry(e).or_default() += 1,
                }
            }
            (held, errors)
        });
    }
    let mut held = Vec::with_capacity(count);
    let mut errors = BTreeMap::new();
    while let Some(joined) = tasks.join_next().await {
        tick();
        if let Ok((h, e)) = joined {
            held.extend(h);
            for (k, v) in e {
                *errors.entry(k).or_default() += v;
            }
        }
    }
    let open_secs = started.elapsed().as_secs_f64();
    if held.len() < count && Instant::now() > deadline {
        *errors
            .entry(format!(
                "gave up opening after {} s",
                max_open_time.as_secs()
            ))
            .or_default() += (count - held.len()) as u64;
    }
    // Let the target settle (buffers freed after the first query) before reading RSS.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_after_kib = probe.target_rss_kib();
    let after = probe.snapshot();
    let opened = held.len();
    drop(held);
    tokio::time::sleep(Duration::from_millis(500)).await;
    IdleOutcome {
        requested: count,
        opened,
        errors,
        open_secs,
        rss_before_kib,
        rss_after_kib,
        before,
        after,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_of_one_kind_share_a_key() {
        assert_eq!(
            mask_numbers("prepared statement \"s1000\" does not exist"),
            mask_numbers("prepared statement \"s17\" does not exist"),
        );
        assert_eq!(mask_numbers("waited 3.0012s"), "waited #.#s");
    }

    #[test]
    fn ids_stay_in_the_table() {
        let mut ids = Ids(12345);
        for _ in 0..10_000 {
            let id = ids.next();
            assert!((1..=ROWS).contains(&id));
        }
    }
}
