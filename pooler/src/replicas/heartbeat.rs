//! The heartbeat task: one round per `replica_heartbeat_ms` (four per while slots are
//! moving), over a `dp_pooler` connection of its own. A round follows
//! [`Member`](crate::pool::share::Member): report demand and holding; from every
//! live row compute this replica's share; grow only by a grant the registry commits,
//! or lower the cap (idle servers close at once, busy ones as they come back) and
//! publish the release once the servers are down to it. A round that fails changes
//! nothing: the replica keeps its last share and never grows until Postgres answers.

use std::sync::Arc;
use std::time::Duration;

use super::registry::{self, Answer, Beat, RegistryError};
use super::{Replicas, View};
use crate::auth::cache::VerifierCache;
use crate::pool::Pools;
use crate::pool::share::{self, Member, Report, Step};

/// What a round reads from the configuration in force (so a reload applies).
#[derive(Clone, Debug)]
pub struct Settings {
    pub heartbeat: Duration,
    pub lease: Duration,
    /// `max_server_connections`: the cluster's budget as this replica sees it.
    pub budget: u32,
    pub addr: Option<String>,
}

/// A call that takes longer is abandoned with its connection: it must not make this
/// replica miss its lease.
fn call_timeout(s: &Settings) -> Duration {
    (s.lease / 3).clamp(Duration::from_millis(300), Duration::from_secs(5))
}

/// How long `leave` waits for the last servers to close before it leaves anyway (the
/// process is exiting; its sockets close with it).
const LEAVE_WAIT: Duration = Duration::from_secs(2);

const APPLICATION_NAME: &str = "dataplane-pooler-replicas";

struct Round<'a, S: Send + 'static> {
    replicas: &'a Replicas,
    pools: &'a Pools<S>,
    client: &'a tokio_postgres::Client,
    settings: &'a Settings,
    demand: u32,
}

impl<S: Send + 'static> Round<'_, S> {
    async fn call(&self, report: Report) -> Result<Answer, RegistryError> {
        let addr = self.settings.addr.as_deref();
        let beat = Beat {
            instance: &self.replicas.instance,
            addr,
            lease_ms: u64::try_from(self.settings.lease.as_millis()).unwrap_or(u64::MAX),
            budget: self.settings.budget,
            report,
            prefer: Some(self.replicas.id()).filter(|&id| id != 0),
        };
        let limit = call_timeout(self.settings);
        let answer = tokio::time::timeout(limit, registry::heartbeat(self.client, &beat))
            .await
            .map_err(|_| RegistryError::Timeout(limit))??;
        self.replicas.observed(View {
            me: answer.me,
            shares: share::shares(&answer.rows(), answer.now_ms),
            peers: answer.peers.clone(),
            now_ms: answer.now_ms,
            at: Some(tokio::time::Instant::now()),
        });
        Ok(answer)
    }

    async fn run(&self, member: &mut Member) -> Result<(), RegistryError> {
        let answer = self
            .call(member.report(self.demand, self.pools.servers()))
            .await?;
        match member.observed(answer.me, &answer.rows(), answer.now_ms) {
            Step::Claim(target) => {
                // What was granted before is usable while the claim is out.
                self.pools.set_share(member.cap());
                let mut report = member.report(self.demand, self.pools.servers());
                report.claim = target;
                let answer = self.call(report).await?;
                self.pools.set_share(member.granted_now(answer.holding()));
            }
            Step::Cap(cap) => {
                let servers = self.pools.set_share(cap);
                if let Some(holding) = member.release(servers) {
                    let report = Report {
                        demand: self.demand,
                        holding,
                        claim: holding,
                    };
                    self.call(report).await?;
                    member.released(holding);
                }
            }
        }
        Ok(())
    }
}

/// The registry connection, opened again when it was lost.
async fn connected<'c>(
    client: &'c mut Option<tokio_postgres::Client>,
    cache: &VerifierCache,
    s: &Settings,
) -> Result<&'c tokio_postgres::Client, RegistryError> {
    if client.as_ref().is_none_or(|c| c.is_closed()) {
        *client = None;
        let limit = call_timeout(s);
        let c = tokio::time::timeout(limit, cache.connect_auth_user(APPLICATION_NAME))
            .await
            .map_err(|_| RegistryError::Timeout(limit))?
            .map_err(RegistryError::Connect)?;
        return Ok(client.insert(c));
    }
    client
        .as_ref()
        .ok_or_else(|| RegistryError::Connect("no connection".into()))
}

impl Replicas {
    /// Starts the heartbeat task; [`Replicas::leave`] stops it.
    pub fn spawn<S: Send + 'static>(
        self: &Arc<Self>,
        pools: Pools<S>,
        cache: Arc<VerifierCache>,
        settings: impl Fn() -> Settings + Send + 'static,
    ) {
        // Nothing may open before the registry grants a share: set before any client
        // can be accepted, not when the task first runs.
        pools.set_share(0);
        let task = tokio::spawn(self.clone().run(pools, cache, settings));
        *self.task.lock().unwrap_or_else(|p| p.into_inner()) = Some(task);
    }

    async fn run<S: Send + 'static>(
        self: Arc<Self>,
        pools: Pools<S>,
        cache: Arc<VerifierCache>,
        settings: impl Fn() -> Settings,
    ) {
        let mut member = Member::default();
        let mut client: Option<tokio_postgres::Client> = None;
        let mut stop = self.stop.subscribe();
        let mut failing = false;
        loop {
            let s = settings();
            let demand = pools.take_demand_peak();
            let round = async {
                let c = connected(&mut client, &cache, &s).await?;
                let round = Round {
                    replicas: &self,
                    pools: &pools,
                    client: c,
                    settings: &s,
                    demand,
                };
                round.run(&mut member).await
            };
            // A round cut short changes nothing unsafe: a grant the registry made but
            // this replica never used only leaves a slot idle until the next round.
            let result = tokio::select! {
                r = round => r,
                _ = stop.wait_for(|stopped| *stopped) => return,
            };
            match result {
                Ok(()) => {
                    self.heartbeats_ok
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if failing {
                        tracing::info!(id = self.id(), "replica registry reachable again");
                        failing = false;
                    }
                    self.progress(|p| p.last_ok = Some(tokio::time::Instant::now()));
                }
                Err(error) => {
                    self.heartbeats_failed
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if !failing {
                        tracing::warn!(%error, cap = member.cap(), "replica heartbeat failed; keeping the current share");
                        failing = true;
                    }
                    client = None;
                }
            }
            self.progress(|p| {
                p.share = member.target();
                p.cap = member.cap();
                p.demand = demand;
            });
            // Quicker while slots move, but never against a registry that is failing:
            // a restarting Postgres gets one attempt per heartbeat from each replica.
            let pause = if !failing && member.unsettled(pools.servers()) {
                s.heartbeat / 4
            } else {
                s.heartbeat
            };
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = stop.wait_for(|stopped| *stopped) => return,
            }
        }
    }

    /// At the end of a drain: stops the heartbeat, closes the servers that are left
    /// (the clients are gone), then deletes this replica's row so the others may grow
    /// into its share at once instead of after its lease.
    pub async fn leave<S: Send + 'static>(&self, pools: &Pools<S>, cache: &VerifierCache) {
        let _ = self.stop.send(true);
        let task = self.task.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(task) = task {
            let _ = task.await;
        }
        pools.set_share(0);
        let deadline = tokio::time::Instant::now() + LEAVE_WAIT;
        while pools.servers() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if !self.registered() {
            return;
        }
        let left = tokio::time::timeout(LEAVE_WAIT, async {
            let client = cache
                .connect_auth_user(APPLICATION_NAME)
                .await
                .map_err(RegistryError::Connect)?;
            registry::leave(&client, &self.instance).await
        })
        .await;
        match left {
            Ok(Ok(_)) => tracing::info!(id = self.id(), "left the replica registry"),
            Ok(Err(error)) => {
                tracing::warn!(%error, "leaving the replica registry failed; the lease will expire");
            }
            Err(_) => {
                tracing::warn!("leaving the replica registry timed out; the lease will expire")
            }
        }
    }
}
