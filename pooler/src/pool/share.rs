//! The cluster's budget shared by pooler replicas (README, "Running several replicas").
//! Pure: registry rows and the database's clock in, shares out; no I/O, no tokio.
//!
//! Every replica heartbeats a row into `dataplane_auth.replicas` (sql/0002) with its
//! demand and what it holds, and reads every live row back. From the same rows every
//! replica computes every replica's share with [`shares`], so they agree without
//! talking to each other. Safety does not rest on that agreement, though: a replica
//! grows only by a grant the registry makes under a lock out of slots no live replica
//! holds ([`grant`] mirrors the SQL), and publishes a smaller holding only once its
//! servers are down to it ([`Member`]). So Σ servers ≤ Σ holding ≤ budget at every
//! instant, however stale a replica's view is.
//!
//! Shares, in order:
//! 1. one slot per live replica (lowest ids first while the budget lasts), so a replica
//!    that gets its first client serves it without waiting for a heartbeat;
//! 2. demand, max-min fair: nobody gets more than it wants until everyone has what it
//!    wants or an equal part of what is left;
//! 3. what nobody wants stays where it is (up to each replica's current holding,
//!    again max-min fair), so shares do not churn servers while demand is low;
//! 4. the rest evenly, lowest ids first for the remainder.

/// A replica's id in the registry: 1..=255, carried in the cancel keys it mints.
pub type ReplicaId = u8;

/// One live replica's row, as the heartbeat returns it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Row {
    pub id: ReplicaId,
    /// Milliseconds since the epoch, by the database's clock.
    pub started_ms: i64,
    pub heartbeat_ms: i64,
    /// The row is dead once `heartbeat_ms + lease_ms` has passed.
    pub lease_ms: i64,
    /// Its configured `max_server_connections`; the least of them binds everyone.
    pub budget: u32,
    /// Servers it wants: in use + waiting, at the peak since its last heartbeat.
    pub demand: u32,
    /// Servers it may have open (never below what it has).
    pub holding: u32,
}

impl Row {
    pub fn alive(&self, now_ms: i64) -> bool {
        self.heartbeat_ms.saturating_add(self.lease_ms) > now_ms
    }
}

/// Every live replica's share of the cluster's budget.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Shares {
    /// The least budget any live replica declares.
    pub budget: u32,
    /// By id.
    pub shares: Vec<(ReplicaId, u32)>,
}

impl Shares {
    pub fn of(&self, id: ReplicaId) -> Option<u32> {
        self.shares.iter().find(|(r, _)| *r == id).map(|&(_, s)| s)
    }

    pub fn total(&self) -> u64 {
        self.shares.iter().map(|&(_, s)| u64::from(s)).sum()
    }
}

/// The live rows, by id (a duplicate id keeps its first row).
fn live(rows: &[Row], now_ms: i64) -> Vec<&Row> {
    let mut live: Vec<&Row> = rows.iter().filter(|r| r.alive(now_ms)).collect();
    live.sort_by_key(|r| r.id);
    live.dedup_by_key(|r| r.id);
    live
}

/// Raises `alloc[i]` toward `alloc[i] + wants[i]` out of `left`, max-min fair: in order
/// of want (then position), each gets its want or an equal part of what remains.
fn water_fill(alloc: &mut [u32], wants: &[u32], left: &mut u32) {
    let mut order: Vec<usize> = (0..alloc.len()).collect();
    order.sort_by_key(|&i| (wants.get(i).copied().unwrap_or(0), i));
    let mut remaining = u32::try_from(order.len()).unwrap_or(u32::MAX);
    for i in order {
        let part = *left / remaining.max(1);
        let give = wants.get(i).copied().unwrap_or(0).min(part);
        if let Some(a) = alloc.get_mut(i) {
            *a += give;
        }
        *left -= give;
        remaining = remaining.saturating_sub(1);
    }
}

/// Every live replica's share (see the module docs). Deterministic: the same rows and
/// clock give the same shares on every replica. Σ shares = the budget when anyone is
/// alive.
pub fn shares(rows: &[Row], now_ms: i64) -> Shares {
    let live = live(rows, now_ms);
    let Some(budget) = live.iter().map(|r| r.budget).min() else {
        return Shares::default();
    };
    let n = live.len();
    let mut alloc = vec![0u32; n];
    let mut left = budget;
    // 1. A slot each, lowest ids first.
    for a in alloc.iter_mut() {
        if left == 0 {
            break;
        }
        *a = 1;
        left -= 1;
    }
    // 2. Demand.
    let wants: Vec<u32> = live
        .iter()
        .zip(&alloc)
        .map(|(r, &a)| r.demand.min(budget).saturating_sub(a))
        .collect();
    water_fill(&mut alloc, &wants, &mut left);
    // 3. What each holds already.
    let wants: Vec<u32> = live
        .iter()
        .zip(&alloc)
        .map(|(r, &a)| r.holding.min(budget).saturating_sub(a))
        .collect();
    water_fill(&mut alloc, &wants, &mut left);
    // 4. The rest, evenly.
    let n32 = u32::try_from(n).unwrap_or(u32::MAX).max(1);
    let (each, extra) = (left / n32, left % n32);
    for (i, a) in alloc.iter_mut().enumerate() {
        *a += each + u32::from(u32::try_from(i).unwrap_or(u32::MAX) < extra);
    }
    Shares {
        budget,
        shares: live.iter().map(|r| r.id).zip(alloc).collect(),
    }
}

/// What a replica tells the registry in a heartbeat.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Report {
    pub demand: u32,
    /// What it may have open now: its cap, or more while it is shrinking.
    pub holding: u32,
    /// Above `holding`: asks to grow to this.
    pub claim: u32,
}

/// The registry's grant, as `dataplane_auth.replica_heartbeat` computes it (the SQL is
/// the authority; this mirror is for the simulation and the tests): never below what
/// the replica reports it holds, and never into a slot another live replica holds.
/// `rows` are the other live replicas' rows as the registry has them.
pub fn grant(others: &[Row], budget: u32, report: Report) -> u32 {
    let held: u64 = others.iter().map(|r| u64::from(r.holding)).sum();
    let budget = others.iter().map(|r| r.budget).fold(budget, u32::min);
    let free = u64::from(budget).saturating_sub(held);
    let grown = u64::from(report.claim).min(free);
    u32::try_from(grown).unwrap_or(u32::MAX).max(report.holding)
}

/// What a replica does after a heartbeat answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Its share is above its grant: heartbeat again at once with this claim, then
    /// [`Member::granted`].
    Claim(u32),
    /// Use this cap (lower: idle servers close now, busy ones when released); then
    /// publish [`Member::release`] if it says so.
    Cap(u32),
}

/// One replica's side of the protocol: the cap its scheduler uses and what the
/// registry has granted it. The cap rises only after a grant is committed and never
/// above it; the holding it reports never falls below the servers it has.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Member {
    cap: u32,
    granted: u32,
    target: u32,
}

impl Member {
    /// What the scheduler may open. 0 until the first grant.
    pub fn cap(&self) -> u32 {
        self.cap
    }

    /// The last share computed for this replica.
    pub fn target(&self) -> u32 {
        self.target
    }

    /// What the registry last recorded as held.
    pub fn granted(&self) -> u32 {
        self.granted
    }

    /// The report of a plain heartbeat, with `servers` open now.
    pub fn report(&self, demand: u32, servers: u32) -> Report {
        let holding = self.cap.max(servers);
        Report {
            demand,
            holding,
            claim: holding,
        }
    }

    /// A heartbeat answered with every live row, this replica's among them (`me`).
    pub fn observed(&mut self, me: ReplicaId, rows: &[Row], now_ms: i64) -> Step {
        if let Some(row) = rows.iter().find(|r| r.id == me) {
            self.granted = row.holding;
        }
        let shares = shares(rows, now_ms);
        self.target = shares.of(me).unwrap_or(0);
        if self.target > self.granted {
            // Everything granted is usable while the claim for the rest is out.
            self.cap = self.cap.max(self.granted.min(self.target));
            Step::Claim(self.target)
        } else {
            self.cap = self.target;
            Step::Cap(self.cap)
        }
    }

    /// The claim was answered: the registry now records `granted` for this replica.
    /// Returns the new cap.
    pub fn granted_now(&mut self, granted: u32) -> u32 {
        self.granted = granted;
        self.cap = self.target.min(granted);
        self.cap
    }

    /// After a lower cap took effect and `servers` remain open: the holding to publish
    /// if it is below what the registry records, so the others may grow into the rest.
    pub fn release(&self, servers: u32) -> Option<u32> {
        let holding = self.cap.max(servers);
        (holding < self.granted).then_some(holding)
    }

    /// The release was recorded.
    pub fn released(&mut self, holding: u32) {
        self.granted = holding;
    }

    /// Whether the next heartbeat should come early: this replica waits for slots the
    /// others have yet to release, or still has slots of its own to release once its
    /// busy servers come back. Either way a quicker heartbeat moves the slots sooner,
    /// and a settled replica heartbeats at the normal pace.
    pub fn unsettled(&self, servers: u32) -> bool {
        self.target > self.granted || self.cap.max(servers) < self.granted
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: ReplicaId, demand: u32, holding: u32) -> Row {
        Row {
            id,
            started_ms: 0,
            heartbeat_ms: 1_000,
            lease_ms: 5_000,
            budget: 40,
            demand,
            holding,
        }
    }

    fn of(rows: &[Row]) -> Vec<u32> {
        shares(rows, 2_000).shares.iter().map(|&(_, s)| s).collect()
    }

    #[test]
    fn a_lone_replica_has_the_whole_budget() {
        assert_eq!(of(&[row(1, 0, 0)]), [40]);
        assert_eq!(of(&[row(1, 100, 40)]), [40]);
    }

    #[test]
    fn an_idle_replica_keeps_one_slot_and_the_busy_one_gets_the_rest() {
        assert_eq!(of(&[row(1, 0, 20), row(2, 100, 20)]), [1, 39]);
        assert_eq!(
            of(&[row(1, 0, 20), row(2, 100, 20), row(3, 0, 0)]),
            [1, 38, 1]
        );
    }

    #[test]
    fn busy_replicas_split_max_min_fair() {
        assert_eq!(of(&[row(1, 100, 0), row(2, 100, 0)]), [20, 20]);
        assert_eq!(
            of(&[row(1, 5, 0), row(2, 100, 0), row(3, 100, 0)]),
            [5, 17, 18]
        );
        // Whatever happens, the shares add up to the budget.
        for d in [0, 1, 7, 39, 40, 1000] {
            let s = shares(
                &[row(1, d, 3), row(2, 40 - d.min(40), 9), row(3, d / 2, 0)],
                2_000,
            );
            assert_eq!(s.total(), 40, "demand {d}");
        }
    }

    #[test]
    fn with_room_to_spare_a_replica_keeps_what_it_holds() {
        // Demands 3 and 5 leave 32: each keeps its 20 instead of churning servers.
        assert_eq!(of(&[row(1, 3, 20), row(2, 5, 20)]), [20, 20]);
        // A newcomer gets a slot and whatever nobody holds, until it has demand.
        assert_eq!(
            of(&[row(1, 3, 20), row(2, 5, 20), row(3, 0, 0)]),
            [19, 20, 1]
        );
        assert_eq!(
            of(&[row(1, 3, 20), row(2, 5, 20), row(3, 10, 0)]),
            [14, 16, 10]
        );
    }

    #[test]
    fn the_least_budget_binds_and_dead_rows_do_not_count() {
        let mut small = row(2, 100, 0);
        small.budget = 10;
        assert_eq!(of(&[row(1, 100, 0), small]), [5, 5]);
        let mut dead = row(2, 100, 40);
        dead.heartbeat_ms = -10_000;
        assert_eq!(of(&[row(1, 100, 0), dead]), [40]);
        assert_eq!(shares(&[], 0), Shares::default());
    }

    #[test]
    fn a_budget_smaller_than_the_replicas_gives_the_lowest_ids_a_slot() {
        let mut rows: Vec<Row> = (1..=4).map(|i| row(i, 0, 0)).collect();
        for r in &mut rows {
            r.budget = 2;
        }
        assert_eq!(of(&rows), [1, 1, 0, 0]);
    }

    #[test]
    fn the_grant_never_takes_a_held_slot() {
        let report = |holding, claim| Report {
            demand: 0,
            holding,
            claim,
        };
        assert_eq!(grant(&[row(2, 0, 30)], 40, report(0, 40)), 10);
        assert_eq!(grant(&[row(2, 0, 40)], 40, report(0, 40)), 0);
        // Never below what it reports: it cannot be made to drop busy servers.
        assert_eq!(grant(&[row(2, 0, 40)], 40, report(5, 10)), 5);
        let mut small = row(2, 0, 4);
        small.budget = 10;
        assert_eq!(grant(&[small], 40, report(0, 40)), 6);
    }

    #[test]
    fn a_member_grows_only_by_grants_and_releases_only_what_it_closed() {
        let mut m = Member::default();
        assert_eq!(m.cap(), 0);
        // Alone: the share is the budget, claimed, then usable.
        assert_eq!(m.observed(1, &[row(1, 0, 0)], 2_000), Step::Claim(40));
        assert_eq!(m.cap(), 0, "nothing usable before the grant");
        assert_eq!(m.granted_now(40), 40);
        // A busy newcomer: the share falls to 1; the cap follows at once, the
        // holding only as servers close.
        let rows = [row(1, 0, 40), row(2, 100, 0)];
        assert_eq!(m.observed(1, &rows, 2_000), Step::Cap(1));
        assert_eq!(m.report(0, 12).holding, 12);
        assert_eq!(m.release(12), Some(12));
        m.released(12);
        assert_eq!(m.release(12), None);
        assert_eq!(m.release(0), Some(1));
        // A partial grant is usable while the rest is claimed again next time.
        let mut m = Member::default();
        assert_eq!(m.observed(2, &rows, 2_000), Step::Claim(39));
        assert_eq!(m.granted_now(0), 0);
        let rows = [row(1, 0, 10), row(2, 100, 0)];
        assert_eq!(m.observed(2, &rows, 2_000), Step::Claim(39));
        assert_eq!(m.granted_now(30), 30);
        assert!(m.unsettled(30), "9 more to claim");
        assert_eq!(m.granted_now(39), 39);
        assert!(!m.unsettled(39));
        assert!(
            !m.unsettled(0),
            "idle servers below the cap are not a release"
        );
    }
}
