//! What `/metrics` reads at scrape time rather than as it happens: the verifier
//! cache's atomics copied into counters, and the replica's share and heartbeat.

use super::*;

/// What the verifier cache (auth/cache.rs) did: atomics it adds to, read when scraped.
#[derive(Debug, Default)]
pub struct AuthCounters {
    /// Queries of `dataplane_auth.lookup`.
    pub lookups: AtomicU64,
    /// Logins refused because the gate's queue for unknown names was full.
    pub lookups_refused: AtomicU64,
    /// Names answered as unknown without a lookup: longer than 63 bytes.
    pub names_too_long: AtomicU64,
    /// `NOTIFY dataplane_auth` payloads: queued for a re-read, dropped as a duplicate of
    /// one already queued, ignored (no role this pooler knows), or dropped with the whole
    /// queue when it overflowed.
    pub notify_queued: AtomicU64,
    pub notify_coalesced: AtomicU64,
    pub notify_ignored: AtomicU64,
    pub notify_overflows: AtomicU64,
}

/// [`AuthCounters`] copied into Prometheus counters when scraped.
pub(super) struct AuthCollector {
    pub(super) counters: Arc<AuthCounters>,
    pub(super) lookups: IntCounterVec,
    pub(super) notifications: IntCounterVec,
    /// One scrape at a time sets the copies.
    pub(super) scrape: std::sync::Mutex<()>,
}

impl prometheus::core::Collector for AuthCollector {
    fn desc(&self) -> Vec<&prometheus::core::Desc> {
        let mut d = self.lookups.desc();
        d.extend(self.notifications.desc());
        d
    }

    fn collect(&self) -> Vec<prometheus::proto::MetricFamily> {
        let _one = self.scrape.lock().unwrap_or_else(|p| p.into_inner());
        let c = &self.counters;
        let set = |vec: &IntCounterVec, label: &str, v: &AtomicU64| {
            let counter = vec.with_label_values(&[label]);
            counter.reset();
            counter.inc_by(v.load(Ordering::Relaxed));
        };
        set(&self.lookups, "queried", &c.lookups);
        set(&self.lookups, "refused", &c.lookups_refused);
        set(&self.lookups, "too_long", &c.names_too_long);
        set(&self.notifications, "queued", &c.notify_queued);
        set(&self.notifications, "coalesced", &c.notify_coalesced);
        set(&self.notifications, "ignored", &c.notify_ignored);
        set(&self.notifications, "overflow", &c.notify_overflows);
        let mut families = self.lookups.collect();
        families.extend(self.notifications.collect());
        families
    }
}

/// The replica's share of the cluster's budget, its demand and heartbeat, the other
/// replicas, and the cancels it forwarded.
pub(super) fn scrape_replicas(
    scrape: &Registry,
    pools: &PoolStats,
    r: &ReplicaSample,
) -> Result<(), MetricsError> {
    let gauge = |short: &str, help: &str, v: f64| -> Result<(), MetricsError> {
        let g = prometheus::Gauge::new(name(short), help)?;
        g.set(v);
        scrape.register(Box::new(g))?;
        Ok(())
    };
    gauge(
        "cluster_budget_limit",
        "max_server_connections: server connections for all replicas together.",
        f64::from(pools.cluster_budget),
    )?;
    gauge(
        "replica_share",
        "This replica's share of the cluster's budget, computed from the registry.",
        f64::from(r.share),
    )?;
    gauge(
        "replica_demand",
        "Server connections this replica's roles could use (peak since the last heartbeat).",
        f64::from(r.demand),
    )?;
    gauge(
        "replicas",
        "Live replicas in the registry, as this replica last saw it.",
        r.replicas as f64,
    )?;
    gauge(
        "replica_heartbeat_age_seconds",
        "Since this replica's last answered heartbeat (+Inf before the first).",
        r.heartbeat_age.map_or(f64::INFINITY, |d| d.as_secs_f64()),
    )?;
    let beats = IntCounterVec::new(
        Opts::new(
            name("replica_heartbeats_total"),
            "Heartbeats into the replica registry by result.",
        ),
        &["result"],
    )?;
    beats.with_label_values(&["ok"]).inc_by(r.heartbeats_ok);
    beats
        .with_label_values(&["error"])
        .inc_by(r.heartbeats_failed);
    scrape.register(Box::new(beats))?;
    let forwards = IntCounterVec::new(
        Opts::new(
            name("cancel_forwards_total"),
            "CancelRequests for another replica's clients, by what became of them.",
        ),
        &["result"],
    )?;
    for &(result, n) in &r.forwards {
        forwards.with_label_values(&[result]).inc_by(n);
    }
    scrape.register(Box::new(forwards))?;
    Ok(())
}
