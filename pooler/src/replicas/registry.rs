//! The registry's SQL (sql/0002): `dataplane_auth.replica_heartbeat` and
//! `replica_leave`, the only two things `dp_pooler` may do to it.

use crate::pool::share::{ReplicaId, Report, Row};

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("connecting as the auth user: {0}")]
    Connect(String),
    #[error("the replica registry: {0}")]
    Postgres(#[from] tokio_postgres::Error),
    #[error("the replica registry did not answer within {0:?}")]
    Timeout(std::time::Duration),
    #[error("the replica registry answered without this replica's row")]
    NoOwnRow,
}

const HEARTBEAT: &str = "SELECT replica_id, advertise_addr, started_ms, heartbeat_ms, lease_ms, \
                         budget, demand, holding, is_self, now_ms \
                         FROM dataplane_auth.replica_heartbeat($1, $2, $3, $4, $5, $6, $7, $8)";
const LEAVE: &str = "SELECT dataplane_auth.replica_leave($1)";

/// One replica as the registry has it, with where to forward its cancels.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Peer {
    pub row: Row,
    pub addr: Option<String>,
}

/// A heartbeat's answer: this replica's id, every live replica, the database's clock.
#[derive(Clone, Debug)]
pub struct Answer {
    pub me: ReplicaId,
    pub peers: Vec<Peer>,
    pub now_ms: i64,
}

impl Answer {
    pub fn rows(&self) -> Vec<Row> {
        self.peers.iter().map(|p| p.row.clone()).collect()
    }

    /// What the registry now records this replica as holding.
    pub fn holding(&self) -> u32 {
        self.peers
            .iter()
            .find(|p| p.row.id == self.me)
            .map_or(0, |p| p.row.holding)
    }
}

/// What a heartbeat says about this replica.
pub struct Beat<'a> {
    pub instance: &'a str,
    pub addr: Option<&'a str>,
    pub lease_ms: u64,
    pub budget: u32,
    pub report: Report,
    /// The id it had, asked for again if its row was reaped.
    pub prefer: Option<ReplicaId>,
}

fn int(v: u32) -> i32 {
    i32::try_from(v).unwrap_or(i32::MAX)
}

fn uint(v: i32) -> u32 {
    u32::try_from(v).unwrap_or(0)
}

pub async fn heartbeat(
    client: &tokio_postgres::Client,
    beat: &Beat<'_>,
) -> Result<Answer, RegistryError> {
    let lease = i32::try_from(beat.lease_ms).unwrap_or(i32::MAX);
    let (budget, demand) = (int(beat.budget), int(beat.report.demand));
    let (holding, claim) = (int(beat.report.holding), int(beat.report.claim));
    let prefer = beat.prefer.map(i32::from);
    let rows = client
        .query(
            HEARTBEAT,
            &[
                &beat.instance,
                &beat.addr,
                &lease,
                &budget,
                &demand,
                &holding,
                &claim,
                &prefer,
            ],
        )
        .await?;
    let mut peers = Vec::with_capacity(rows.len());
    let (mut me, mut now_ms) = (None, 0);
    for r in &rows {
        let id: i32 = r.try_get(0)?;
        let Ok(id) = ReplicaId::try_from(id) else {
            continue;
        };
        if r.try_get::<_, bool>(8)? {
            me = Some(id);
        }
        now_ms = r.try_get(9)?;
        peers.push(Peer {
            row: Row {
                id,
                started_ms: r.try_get(2)?,
                heartbeat_ms: r.try_get(3)?,
                lease_ms: i64::from(r.try_get::<_, i32>(4)?),
                budget: uint(r.try_get(5)?),
                demand: uint(r.try_get(6)?),
                holding: uint(r.try_get(7)?),
            },
            addr: r.try_get(1)?,
        });
    }
    let me = me.ok_or(RegistryError::NoOwnRow)?;
    Ok(Answer { me, peers, now_ms })
}

/// Deletes this replica's row: what it held is free for the others at once.
pub async fn leave(client: &tokio_postgres::Client, instance: &str) -> Result<bool, RegistryError> {
    Ok(client.query_one(LEAVE, &[&instance]).await?.try_get(0)?)
}
