//! Scenario (h): LISTEN/NOTIFY at platform scale. Per app, one notifier and several
//! listening clients; the notifier sends a notification every [`INTERVAL`] carrying
//! its send time, every listener records how long each took to arrive. Through the
//! pooler the listeners share one listener server per app; through PgBouncer (session
//! mode, the only mode in which LISTEN works there) each holds a server of its own,
//! within the same budget. Every wait is bounded: a listener that never gets a server
//! is an error, not a hang.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use tokio::task::JoinSet;
use tokio_postgres::{AsyncMessage, NoTls};

use crate::load::error_key;
use crate::procfs::{Probe, Snapshot};

/// How often each app's notifier sends.
pub const INTERVAL: Duration = Duration::from_millis(100);
const CHANNEL: &str = "bench_events";

/// One LISTEN run.
pub struct ListenPlan {
    pub apps: usize,
    pub per_app: usize,
    pub warmup: Duration,
    pub duration: Duration,
    pub op_timeout: Duration,
}

pub struct ListenOutcome {
    /// Send-to-receive latency of the notifications sent in the window, in µs.
    pub latency_us: Histogram<u64>,
    /// Deliveries of notifications sent in the window.
    pub delivered: u64,
    /// Deliveries owed: each notification sent in the window, once per listener of its
    /// app that was listening.
    pub owed: u64,
    /// Deliveries of other apps' notifications (the channel name is the same in every
    /// app, and channels are per database): what isolation must keep at zero.
    pub foreign: u64,
    pub listening: usize,
    pub listeners: usize,
    /// The most server connections the apps had at once in the window, and of them the
    /// most that were listening (a client's session-mode server, or the pooler's
    /// listener server).
    pub servers_max: Option<u64>,
    pub listening_servers_max: Option<u64>,
    pub errors: BTreeMap<String, u64>,
    pub before: Snapshot,
    pub after: Snapshot,
}

/// Microseconds since `epoch`: what a notification carries and is compared with.
fn since(epoch: Instant) -> u64 {
    u64::try_from(epoch.elapsed().as_micros()).unwrap_or(u64::MAX)
}

fn histogram() -> anyhow::Result<Histogram<u64>> {
    Ok(Histogram::new_with_bounds(1, 600_000_000, 3)?)
}

/// The window, in µs since the epoch, whose notifications count.
#[derive(Clone, Copy)]
struct Window {
    from: u64,
    to: u64,
}

/// Where a listener says, once, whether it listens.
struct Ready {
    app: usize,
    tx: tokio::sync::mpsc::UnboundedSender<(usize, Result<(), String>)>,
    /// Told too, so the app's next listener may start.
    done: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Ready {
    fn send(&mut self, r: Result<(), String>) {
        let _ = self.tx.send((self.app, r));
        if let Some(done) = self.done.take() {
            let _ = done.send(());
        }
    }
}

struct ListenerResult {
    latency_us: Histogram<u64>,
    received: u64,
    foreign: u64,
}

/// Connects, LISTENs and records until `stop`; `None` (and an error) if it could not
/// listen within the timeout.
async fn listener(
    config: tokio_postgres::Config,
    limit: Duration,
    epoch: Instant,
    window: Window,
    stop: Arc<AtomicBool>,
    mut listening: Ready,
) -> anyhow::Result<ListenerResult> {
    let mut result = ListenerResult {
        latency_us: histogram()?,
        received: 0,
        foreign: 0,
    };
    let connected = tokio::time::timeout(limit, config.connect(NoTls)).await;
    let (client, mut connection) = match connected {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            listening.send(Err(format!("connect: {}", error_key(&e))));
            return Ok(result);
        }
        Err(_) => {
            listening.send(Err("connect: timed out".into()));
            return Ok(result);
        }
    };
    let (tx, mut notes) = tokio::sync::mpsc::unbounded_channel();
    let driver = tokio::spawn(async move {
        while let Some(Ok(m)) = std::future::poll_fn(|cx| connection.poll_message(cx)).await {
            if let AsyncMessage::Notification(n) = m {
                let _ = tx.send((since(epoch), n));
            }
        }
    });
    match tokio::time::timeout(limit, client.batch_execute(&format!("LISTEN {CHANNEL}"))).await {
        Ok(Ok(())) => {
            listening.send(Ok(()));
        }
        Ok(Err(e)) => {
            listening.send(Err(format!("LISTEN: {}", error_key(&e))));
            driver.abort();
            return Ok(result);
        }
        Err(_) => {
            listening.send(Err("LISTEN: timed out".into()));
            driver.abort();
            return Ok(result);
        }
    }
    while !stop.load(Ordering::Relaxed) {
        let Ok(Some((at, n))) = tokio::time::timeout(INTERVAL, notes.recv()).await else {
            continue;
        };
        let Some((app, sent)) = n.payload().split_once(':') else {
            continue;
        };
        let (Ok(app), Ok(sent)) = (app.parse::<usize>(), sent.parse::<u64>()) else {
            continue;
        };
        if app != listening.app {
            result.foreign += 1;
            continue;
        }
        if (window.from..window.to).contains(&sent) {
            result.received += 1;
            let _ = result.latency_us.record(at.saturating_sub(sent).max(1));
        }
    }
    driver.abort();
    drop(client);
    Ok(result)
}

/// Sends a notification every [`INTERVAL`] until `stop`; returns how many were sent in
/// the window, and the errors.
async fn notifier(
    app: usize,
    client: tokio_postgres::Client,
    limit: Duration,
    epoch: Instant,
    window: Window,
    stop: Arc<AtomicBool>,
) -> (u64, BTreeMap<String, u64>) {
    let mut sent = 0;
    let mut errors = BTreeMap::new();
    let mut tick = tokio::time::interval(INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while !stop.load(Ordering::Relaxed) {
        tick.tick().await;
        let at = since(epoch);
        let payload = format!("{app}:{at}");
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 2] = [&CHANNEL, &payload];
        let notify = client.execute("SELECT pg_notify($1, $2)", &params);
        match tokio::time::timeout(limit, notify).await {
            Ok(Ok(_)) if (window.from..window.to).contains(&at) => sent += 1,
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                *errors
                    .entry(format!("NOTIFY: {}", error_key(&e)))
                    .or_default() += 1
            }
            Err(_) => *errors.entry("NOTIFY: timed out".into()).or_default() += 1,
        }
    }
    (sent, errors)
}

/// The apps' server connections now (every app role is a `tk_` role), and of them
/// those that listen: a session-mode client's server, whose last statement was its
/// LISTEN, or a pooler's listener server, which names itself.
async fn app_servers(admin: &tokio_postgres::Client) -> Option<(u64, u64)> {
    let row = admin
        .query_one(
            "SELECT count(*), count(*) FILTER (WHERE query LIKE 'LISTEN%' \
                 OR application_name = 'dataplane-pooler LISTEN') \
             FROM pg_catalog.pg_stat_activity WHERE usename LIKE 'tk\\_%'",
            &[],
        )
        .await
        .ok()?;
    let n = |i| u64::try_from(row.get::<_, i64>(i)).ok();
    Some((n(0)?, n(1)?))
}

/// Runs the plan against `configs[app]` (one per app, in order). Notifiers log in and
/// take a server first, then the listeners; the window starts once all have tried.
pub async fn run(
    plan: &ListenPlan,
    configs: &[tokio_postgres::Config],
    admin: &tokio_postgres::Client,
    probe: &Probe,
    tick: &dyn Fn(),
) -> anyhow::Result<ListenOutcome> {
    let epoch = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    let apps = &configs[..plan.apps.min(configs.len())];
    // The window is set once everyone is in; until then nothing counts.
    let setup_limit = plan.op_timeout * 3;
    let window = Window {
        from: u64::try_from((setup_limit + plan.warmup).as_micros()).unwrap_or(u64::MAX),
        to: u64::try_from((setup_limit + plan.warmup + plan.duration).as_micros())
            .unwrap_or(u64::MAX),
    };
    let mut notifiers = Vec::new();
    for config in apps {
        match crate::load::connect(config, plan.op_timeout).await {
            Ok(client) => {
                // A first query, so a session-mode pooler gives it its server now.
                match tokio::time::timeout(plan.op_timeout, client.simple_query("SELECT 1")).await {
                    Ok(Ok(_)) => notifiers.push(Some(client)),
                    _ => {
                        *errors.entry("notifier: no server".into()).or_default() += 1;
                        notifiers.push(None);
                    }
                }
            }
            Err(e) => {
                *errors.entry(format!("notifier {e}")).or_default() += 1;
                notifiers.push(None);
            }
        }
        tick();
    }
    let (ready_tx, mut ready) = tokio::sync::mpsc::unbounded_channel();
    // Apps at once, each app's listeners one after another, as pods come up: a burst
    // of one app's LISTENs would have its pool open servers it then keeps idle.
    let mut listeners = JoinSet::new();
    let mut listening_of_app = vec![0u64; apps.len()];
    for (app, config) in apps.iter().enumerate() {
        let ready_tx = ready_tx.clone();
        let (config, stop) = (config.clone(), stop.clone());
        let (limit, per_app) = (plan.op_timeout, plan.per_app);
        listeners.spawn(async move {
            let mut all = Vec::new();
            for _ in 0..per_app {
                let (done, listens) = tokio::sync::oneshot::channel();
                let ready = Ready {
                    app,
                    tx: ready_tx.clone(),
                    done: Some(done),
                };
                let own = listener(config.clone(), limit, epoch, window, stop.clone(), ready);
                // One after another until each listens (or gave up); then side by side.
                all.push(tokio::spawn(own));
                let _ = listens.await;
            }
            let mut results = Vec::new();
            for task in all {
                results.push(task.await);
            }
            results
        });
    }
    drop(ready_tx);
    let total = apps.len() * plan.per_app;
    let mut listening = 0;
    let mut answered = 0;
    // Each listener reports once whether it listens; the set-up is bounded anyway.
    let deadline = tokio::time::Instant::now() + setup_limit;
    while answered < total {
        match tokio::time::timeout_at(deadline, ready.recv()).await {
            Ok(Some((app, Ok(())))) => {
                listening += 1;
                listening_of_app[app] += 1;
                answered += 1;
            }
            Ok(Some((_, Err(e)))) => {
                *errors.entry(e).or_default() += 1;
                answered += 1;
            }
            Ok(None) | Err(_) => break,
        }
        tick();
    }
    let mut senders = JoinSet::new();
    for (app, client) in notifiers.into_iter().enumerate() {
        if let Some(client) = client {
            let stop = stop.clone();
            let limit = plan.op_timeout;
            senders.spawn(
                async move { (app, notifier(app, client, limit, epoch, window, stop).await) },
            );
        }
    }
    // Wait for the window, sampling the servers the apps hold.
    let start = epoch + Duration::from_micros(window.from);
    tokio::time::sleep_until(start.into()).await;
    let before = probe.snapshot();
    let end = epoch + Duration::from_micros(window.to);
    let (mut servers_max, mut listening_servers_max) = (None::<u64>, None::<u64>);
    while Instant::now() < end {
        if let Some((all, listening)) = app_servers(admin).await {
            servers_max = Some(servers_max.map_or(all, |m| m.max(all)));
            listening_servers_max =
                Some(listening_servers_max.map_or(listening, |m| m.max(listening)));
        }
        tick();
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let after = probe.snapshot();
    // Late deliveries of the window's last notifications still count.
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    let mut sent_of_app = vec![0u64; apps.len()];
    while let Some(done) = senders.join_next().await {
        if let Ok((app, (sent, errs))) = done {
            sent_of_app[app] = sent;
            for (e, n) in errs {
                *errors.entry(e).or_default() += n;
            }
        }
    }
    let mut latency_us = histogram()?;
    let (mut delivered, mut foreign) = (0, 0);
    while let Some(done) = listeners.join_next().await {
        let Ok(results) = done else {
            *errors.entry("listener task failed".into()).or_default() += 1;
            continue;
        };
        for r in results {
            match r {
                Ok(Ok(r)) => {
                    delivered += r.received;
                    foreign += r.foreign;
                    let _ = latency_us.add(&r.latency_us);
                }
                Ok(Err(e)) => *errors.entry(format!("{e:#}")).or_default() += 1,
                Err(e) => *errors.entry(format!("listener task: {e}")).or_default() += 1,
            }
        }
    }
    // Each notification sent in the window is owed once to every client of its app
    // that listens.
    let owed = sent_of_app
        .iter()
        .zip(&listening_of_app)
        .map(|(s, l)| s * l)
        .sum();
    Ok(ListenOutcome {
        latency_us,
        delivered,
        owed,
        foreign,
        listening,
        listeners: total,
        servers_max,
        listening_servers_max,
        errors,
        before,
        after,
    })
}
