//! Several pooler replicas act as one (README, "Running several replicas"), through
//! the one thing they all share, Postgres; no gossip, no consensus of our own.
//!
//! * [`registry`]: the SQL of sql/0002 (heartbeat, leave), as `dp_pooler`.
//! * `heartbeat.rs`: the task that heartbeats this replica's demand and holding,
//!   computes every replica's share with [`crate::pool::share`] and sets this
//!   replica's share as its scheduler's budget, growing only by grants the registry
//!   makes out of released slots. Without Postgres it keeps its last share.
//! * [`key`]: the replica id inside the cancel keys this replica mints.
//! * `forward.rs`: a CancelRequest for another replica's key goes to that replica's
//!   advertised address, once, rate-limited per client address.

mod forward;
mod heartbeat;
pub mod key;
pub mod registry;

use std::net::IpAddr;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

pub use forward::{MAX_FORWARDS_IN_FLIGHT, Outcome, Route};
pub use heartbeat::Settings;

use crate::auth::limiter::PerAddress;
use crate::pool::share::{ReplicaId, Shares};
use registry::Peer;

/// This replica's view of the registry, as of its last answered heartbeat.
#[derive(Clone, Debug, Default)]
pub struct View {
    pub me: ReplicaId,
    pub peers: Vec<Peer>,
    pub shares: Shares,
    /// The database's clock when the registry answered, and when that was here.
    pub now_ms: i64,
    pub at: Option<Instant>,
}

impl View {
    /// The database's clock now, as well as this replica can tell.
    pub fn now_ms(&self) -> i64 {
        let since = self.at.map_or(Duration::ZERO, |at| at.elapsed());
        self.now_ms
            .saturating_add(i64::try_from(since.as_millis()).unwrap_or(i64::MAX))
    }

    /// A live replica other than this one, by id.
    fn peer(&self, id: ReplicaId) -> Option<&Peer> {
        let now = self.now_ms();
        self.peers
            .iter()
            .find(|p| p.row.id == id && id != self.me && p.row.alive(now))
    }
}

/// What `/metrics`, `SHOW PEERS` and `/v1/replicas` show.
#[derive(Clone, Debug, Default)]
pub struct ReplicaStats {
    /// 0 until registered.
    pub id: ReplicaId,
    pub view: Arc<View>,
    /// This replica's share of the cluster's budget, as computed from the rows.
    pub share: u32,
    /// The cap its scheduler uses now (lags the share while slots move).
    pub cap: u32,
    /// Its demand as last reported.
    pub demand: u32,
    /// Since the last answered heartbeat; `None` before the first.
    pub heartbeat_age: Option<Duration>,
    pub heartbeats_ok: u64,
    pub heartbeats_failed: u64,
    /// Forwarded cancels by [`Outcome`], in [`Outcome::ALL`]'s order.
    pub forwards: [u64; Outcome::ALL.len()],
}

impl ReplicaStats {
    /// What `/metrics` shows of it.
    pub fn sample(&self) -> crate::metrics::ReplicaSample {
        crate::metrics::ReplicaSample {
            share: self.share,
            demand: self.demand,
            replicas: self.view.peers.len(),
            heartbeat_age: self.heartbeat_age,
            heartbeats_ok: self.heartbeats_ok,
            heartbeats_failed: self.heartbeats_failed,
            forwards: Outcome::ALL
                .iter()
                .map(|o| o.as_str())
                .zip(self.forwards)
                .collect(),
        }
    }
}

/// This replica's membership: its identity in the registry, its last view of the
/// others, and the cancel forwarder.
pub struct Replicas {
    /// A random name for this process's row (a restart is a new replica).
    instance: String,
    id: AtomicU8,
    view: Mutex<Arc<View>>,
    progress: Mutex<Progress>,
    heartbeats_ok: AtomicU64,
    heartbeats_failed: AtomicU64,
    forwards: [AtomicU64; Outcome::ALL.len()],
    forward_limit: PerAddress,
    forward_slots: Arc<tokio::sync::Semaphore>,
    stop: watch::Sender<bool>,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

#[derive(Default)]
struct Progress {
    share: u32,
    cap: u32,
    demand: u32,
    last_ok: Option<Instant>,
}

impl Replicas {
    /// `forwards_per_minute`: cancel forwards allowed per client address per minute.
    pub fn new(forwards_per_minute: u32) -> Result<Arc<Self>, getrandom::Error> {
        let mut bytes = [0u8; 16];
        getrandom::fill(&mut bytes)?;
        let instance = bytes.iter().map(|b| format!("{b:02x}")).collect();
        Ok(Arc::new(Replicas {
            instance,
            id: AtomicU8::new(0),
            view: Mutex::new(Arc::default()),
            progress: Mutex::default(),
            heartbeats_ok: AtomicU64::new(0),
            heartbeats_failed: AtomicU64::new(0),
            forwards: Default::default(),
            forward_limit: PerAddress::new(forwards_per_minute),
            forward_slots: Arc::new(tokio::sync::Semaphore::new(MAX_FORWARDS_IN_FLIGHT)),
            stop: watch::Sender::new(false),
            task: Mutex::new(None),
        }))
    }

    /// This replica's id in the registry; 0 until its first heartbeat is answered.
    pub fn id(&self) -> ReplicaId {
        self.id.load(Ordering::Relaxed)
    }

    /// Whether the registry has answered at least once (part of `/readyz`: before
    /// that, this replica holds no share and could serve nobody).
    pub fn registered(&self) -> bool {
        self.id() != 0
    }

    pub fn view(&self) -> Arc<View> {
        self.view.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn stats(&self) -> ReplicaStats {
        let p = self.progress.lock().unwrap_or_else(|p| p.into_inner());
        ReplicaStats {
            id: self.id(),
            view: self.view(),
            share: p.share,
            cap: p.cap,
            demand: p.demand,
            heartbeat_age: p.last_ok.map(|t| t.elapsed()),
            heartbeats_ok: self.heartbeats_ok.load(Ordering::Relaxed),
            heartbeats_failed: self.heartbeats_failed.load(Ordering::Relaxed),
            forwards: std::array::from_fn(|i| {
                self.forwards
                    .get(i)
                    .map_or(0, |c| c.load(Ordering::Relaxed))
            }),
        }
    }

    fn observed(&self, view: View) {
        self.id.store(view.me, Ordering::Relaxed);
        *self.view.lock().unwrap_or_else(|p| p.into_inner()) = Arc::new(view);
    }

    fn progress(&self, f: impl FnOnce(&mut Progress)) {
        f(&mut self.progress.lock().unwrap_or_else(|p| p.into_inner()));
    }

    fn count(&self, outcome: Outcome) {
        if let Some(c) = self.forwards.get(outcome as usize) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Whether a forward from this client address is within its rate.
    fn forward_allowed(&self, addr: IpAddr) -> bool {
        self.forward_limit.allow(addr, std::time::Instant::now())
    }
}
