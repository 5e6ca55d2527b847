//! CancelRequests for another replica's clients. A client's cancel arrives on a new
//! TCP connection that the Service may route to any replica; the key says which one
//! minted it ([`super::key`]), and this replica sends the request on to that one's
//! advertised address, once.
//!
//! Never a loop: the forwarded request carries the hop bit, and a replica answers such
//! a request from its own map or drops it. Never an amplifier: one request in, at most
//! one out, at most `cancel_forwards_per_address_per_minute` per client address, at
//! most [`MAX_FORWARDS_IN_FLIGHT`] at once, each within [`FORWARD_TIMEOUT`]. A key that
//! names no live replica is dropped silently, as PostgreSQL drops an unknown key.

use std::net::IpAddr;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::{Replicas, key};
use crate::pool::share::ReplicaId;
use crate::proto::startup;

/// Forwards in flight at once; past it, further ones are dropped.
pub const MAX_FORWARDS_IN_FLIGHT: usize = 64;
/// Connecting to the owner and handing it the request.
pub const FORWARD_TIMEOUT: Duration = Duration::from_secs(2);

/// What to do with a CancelRequest whose key this replica's own map does not hold.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Route {
    /// The key is this replica's (or forwarded here already): nothing more to try.
    Drop,
    /// Another live replica minted it.
    Forward { owner: ReplicaId, addr: String },
    /// It names a replica that is not alive, or that advertises no address.
    Unknown,
}

/// A forward's fate: a metric label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(usize)]
pub enum Outcome {
    Forwarded = 0,
    UnknownReplica = 1,
    Throttled = 2,
    Busy = 3,
    Failed = 4,
}

impl Outcome {
    pub const ALL: [Outcome; 5] = [
        Outcome::Forwarded,
        Outcome::UnknownReplica,
        Outcome::Throttled,
        Outcome::Busy,
        Outcome::Failed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Forwarded => "forwarded",
            Outcome::UnknownReplica => "unknown_replica",
            Outcome::Throttled => "throttled",
            Outcome::Busy => "busy",
            Outcome::Failed => "failed",
        }
    }
}

impl Replicas {
    /// Where a CancelRequest for `pid` goes when this replica's map does not know it.
    pub fn route(&self, pid: i32) -> Route {
        if key::forwarded(pid) {
            return Route::Drop;
        }
        let owner = key::owner(pid);
        if owner == 0 || owner == self.id() {
            return Route::Drop;
        }
        match self.view().peer(owner) {
            Some(peer) => match &peer.addr {
                Some(addr) => Route::Forward {
                    owner,
                    addr: addr.clone(),
                },
                None => Route::Unknown,
            },
            None => Route::Unknown,
        }
    }

    /// Handles a CancelRequest from `client` that this replica's map does not hold:
    /// forwards it to its owner or drops it. Counts the outcome; never fails the
    /// caller (a cancel is best-effort, and the client waits for no answer).
    ///
    /// Cancel-safe: dropping the future drops the half-open socket.
    pub async fn forward_cancel(&self, client: IpAddr, pid: i32, secret: i32) -> Option<Outcome> {
        let (owner, addr) = match self.route(pid) {
            Route::Drop => return None,
            Route::Unknown => {
                self.count(Outcome::UnknownReplica);
                return Some(Outcome::UnknownReplica);
            }
            Route::Forward { owner, addr } => (owner, addr),
        };
        let outcome = if !self.forward_allowed(client) {
            Outcome::Throttled
        } else if let Ok(_slot) = self.forward_slots.clone().try_acquire_owned() {
            match tokio::time::timeout(FORWARD_TIMEOUT, send(&addr, pid, secret)).await {
                Ok(Ok(())) => Outcome::Forwarded,
                Ok(Err(error)) => {
                    tracing::warn!(replica = owner, %addr, %error, "forwarding a cancel request failed");
                    Outcome::Failed
                }
                Err(_) => {
                    tracing::warn!(replica = owner, %addr, "forwarding a cancel request timed out");
                    Outcome::Failed
                }
            }
        } else {
            Outcome::Busy
        };
        self.count(outcome);
        Some(outcome)
    }
}

/// Sends the CancelRequest, hop bit set, as its first and only packet.
async fn send(addr: &str, pid: i32, secret: i32) -> std::io::Result<()> {
    let (host, port) = crate::config::parse_advertise_addr(addr)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let mut tcp = TcpStream::connect((host, port)).await?;
    let _ = tcp.set_nodelay(true);
    let mut buf = BytesMut::with_capacity(16);
    startup::write_cancel_request(&mut buf, key::mark_forwarded(pid), secret);
    tcp.write_all(&buf).await?;
    // The owner closes without a reply, as Postgres does; wait for that (within the
    // caller's deadline) so the request is read before this side goes away.
    let mut sink = [0u8; 1];
    let _ = tcp.read(&mut sink).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::View;
    use super::super::registry::Peer;
    use super::*;
    use crate::pool::share::Row;

    fn peer(id: ReplicaId, addr: Option<&str>, heartbeat_ms: i64) -> Peer {
        Peer {
            row: Row {
                id,
                started_ms: 0,
                heartbeat_ms,
                lease_ms: 5_000,
                budget: 10,
                demand: 0,
                holding: 1,
            },
            addr: addr.map(str::to_owned),
        }
    }

    #[test]
    fn a_key_goes_once_to_its_live_owner_and_nowhere_else() {
        let r = Replicas::new(10).unwrap();
        assert_eq!(r.route(key::mint_pid(2, 5)), Route::Unknown, "no view yet");
        r.observed(View {
            me: 1,
            peers: vec![
                peer(1, Some("10.0.0.1:5432"), 10_000),
                peer(2, Some("10.0.0.2:5432"), 10_000),
                peer(3, None, 10_000),
                peer(4, Some("10.0.0.4:5432"), 1_000),
            ],
            shares: Default::default(),
            now_ms: 10_000,
            at: Some(tokio::time::Instant::now()),
        });
        let forward = Route::Forward {
            owner: 2,
            addr: "10.0.0.2:5432".into(),
        };
        assert_eq!(r.route(key::mint_pid(2, 5)), forward);
        assert_eq!(
            r.route(key::mark_forwarded(key::mint_pid(2, 5))),
            Route::Drop,
            "forwarded once already"
        );
        assert_eq!(r.route(key::mint_pid(1, 5)), Route::Drop, "its own");
        assert_eq!(r.route(key::mint_pid(0, 5)), Route::Drop, "no replica's");
        assert_eq!(r.route(key::mint_pid(3, 5)), Route::Unknown, "no address");
        assert_eq!(r.route(key::mint_pid(4, 5)), Route::Unknown, "lease over");
        assert_eq!(r.route(key::mint_pid(9, 5)), Route::Unknown, "never seen");
    }
}
