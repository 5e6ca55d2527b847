//! The channels of one role's listening clients, and what its listener server must
//! LISTEN on for them. Pure bookkeeping (no I/O), so every corner is a unit test.
//!
//! The listener server holds the union of its clients' channels. A client's set is
//! replaced whole (what its transaction left, read back from Postgres); the union's
//! changes are kept as a dirty set, handed to the listener task as one batch at a time,
//! and acknowledged by version: a client whose LISTEN added a channel waits until a
//! batch at least as new as its change has been applied on the server, so a
//! notification sent after its LISTEN returned is never missed.
//!
//! A channel a client adds counts for it only from that batch on, even when the server
//! listened on it already for others: Postgres sends a session the notifications
//! committed before a command ends ahead of the command's ReadyForQuery, so what the
//! listener reads before that batch's answer was sent before the client's LISTEN, and
//! the client must not get it (as from Postgres it would not). A channel it drops stops
//! at once.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;

/// Longest channel name Postgres keeps (`NAMEDATALEN - 1`): longer identifiers are
/// truncated by its parser, so `pg_listening_channels()` never returns more.
pub const MAX_CHANNEL_BYTES: usize = 63;

/// A channel name as Postgres reports it (UTF-8, 1 to 63 bytes, no NUL).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Channel(Arc<str>);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("not a channel name Postgres could report ({len} bytes)")]
pub struct BadChannel {
    len: usize,
}

impl Channel {
    pub fn new(name: &str) -> Result<Channel, BadChannel> {
        if name.is_empty() || name.len() > MAX_CHANNEL_BYTES || name.contains('\0') {
            return Err(BadChannel { len: name.len() });
        }
        Ok(Channel(Arc::from(name)))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::borrow::Borrow<str> for Channel {
    fn borrow(&self) -> &str {
        &self.0
    }
}

/// A client asked for more channels than it may listen on.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{wanted} channels, more than max_client_listen_channels ({max})")]
pub struct TooManyChannels {
    pub wanted: usize,
    pub max: usize,
}

/// What a client's new set means for it.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Changed {
    /// Wait until the listener has applied this version (`None`: every channel of the
    /// client is on the server already).
    pub wait_for: Option<u64>,
    /// Channels the client no longer listens on: its undelivered notifications on them
    /// go (Postgres does not deliver what arrives for a channel after its UNLISTEN).
    pub dropped: Vec<Channel>,
}

/// One batch of changes for the listener server.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Batch {
    pub listen: Vec<Channel>,
    pub unlisten: Vec<Channel>,
    /// Acknowledges every change up to this version once applied.
    pub version: u64,
}

impl Batch {
    pub fn is_empty(&self) -> bool {
        self.listen.is_empty() && self.unlisten.is_empty()
    }
}

/// A role's listening clients (by client id) and its listener server's channels.
#[derive(Debug, Default)]
pub struct Union {
    by_client: HashMap<u64, BTreeSet<Channel>>,
    /// Listeners of each channel, in the order they subscribed, with the version from
    /// which the channel counts for each; never empty.
    by_channel: HashMap<Channel, Vec<(u64, u64)>>,
    /// What the server listens on (as far as applied batches tell).
    applied: HashSet<Channel>,
    /// Channels whose membership changed since the last batch was taken.
    dirty: BTreeSet<Channel>,
    /// The version of the newest change; a batch taken now carries it.
    version: u64,
    /// Every change up to this version is on the server.
    applied_version: u64,
    /// A batch is on its way to the server.
    in_flight: bool,
    /// A batch is owed even with nothing dirty: a client waits for the server's word
    /// that notifications from now on count for it.
    sync: bool,
}

impl Union {
    /// Replaces `client`'s channels with `channels` (at most `max`). An empty set
    /// removes the client.
    pub fn set(
        &mut self,
        client: u64,
        channels: BTreeSet<Channel>,
        max: usize,
    ) -> Result<Changed, TooManyChannels> {
        if channels.len() > max {
            return Err(TooManyChannels {
                wanted: channels.len(),
                max,
            });
        }
        let old = self.by_client.remove(&client).unwrap_or_default();
        let dropped: Vec<Channel> = old.difference(&channels).cloned().collect();
        for c in &dropped {
            self.leave(c, client);
        }
        let added: Vec<&Channel> = channels.difference(&old).collect();
        if !added.is_empty() {
            // Every addition waits for a batch of its own version: its channels count
            // from that batch's answer on.
            self.version += 1;
            self.sync = true;
        }
        for c in &added {
            let listeners = self.by_channel.entry((*c).clone()).or_default();
            listeners.push((client, self.version));
            if listeners.len() == 1 {
                self.dirty.insert((*c).clone());
            }
        }
        let wait_for = (!added.is_empty()).then_some(self.version);
        if !channels.is_empty() {
            self.by_client.insert(client, channels);
        }
        Ok(Changed { wait_for, dropped })
    }

    /// The client left: its channels go.
    pub fn remove(&mut self, client: u64) {
        // An empty set is always within any bound.
        let _ = self.set(client, BTreeSet::new(), 0);
    }

    fn leave(&mut self, channel: &Channel, client: u64) {
        if let Some(listeners) = self.by_channel.get_mut(channel) {
            listeners.retain(|&(c, _)| c != client);
            if listeners.is_empty() {
                self.by_channel.remove(channel);
                self.dirty.insert(channel.clone());
            }
        }
    }

    /// The clients a notification on `channel` read now goes to (its channel counts
    /// for them by the batches applied so far), in the order they subscribed.
    pub fn listeners(&self, channel: &str) -> impl Iterator<Item = u64> + '_ {
        self.channel(channel).into_iter().flat_map(|(_, l)| l)
    }

    /// The channel by its name, with the clients a notification on it read now goes
    /// to, if anyone listens on it.
    pub fn channel(&self, name: &str) -> Option<(&Channel, impl Iterator<Item = u64> + '_)> {
        let applied = self.applied_version;
        self.by_channel.get_key_value(name).map(|(c, l)| {
            let live = l
                .iter()
                .filter(move |(_, since)| *since <= applied)
                .map(|(client, _)| *client);
            (c, live)
        })
    }

    pub fn channels_of(&self, client: u64) -> Option<&BTreeSet<Channel>> {
        self.by_client.get(&client)
    }

    /// Clients listening now.
    pub fn clients(&self) -> usize {
        self.by_client.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_client.is_empty()
    }

    /// Channels of the union.
    pub fn len(&self) -> usize {
        self.by_channel.len()
    }

    /// Every change up to this version is on the server.
    pub fn applied_version(&self) -> u64 {
        self.applied_version
    }

    /// The next batch for the server, unless one is in flight or nothing is owed. A
    /// channel that came and went since the last batch is in neither list; a batch with
    /// neither is still sent when a client waits for the server's word (`sync`).
    pub fn take_batch(&mut self) -> Option<Batch> {
        if self.in_flight || (self.dirty.is_empty() && !self.sync) {
            return None;
        }
        let mut batch = Batch {
            version: self.version,
            ..Batch::default()
        };
        for c in std::mem::take(&mut self.dirty) {
            match (self.by_channel.contains_key(&c), self.applied.contains(&c)) {
                (true, false) => batch.listen.push(c),
                (false, true) => batch.unlisten.push(c),
                _ => {}
            }
        }
        if batch.is_empty() && !self.sync {
            return None;
        }
        self.sync = false;
        self.in_flight = true;
        Some(batch)
    }

    /// The server ran `batch` (every statement of it, in one transaction).
    pub fn applied(&mut self, batch: Batch) {
        self.in_flight = false;
        for c in batch.unlisten {
            self.applied.remove(&c);
        }
        for c in batch.listen {
            self.applied.insert(c);
        }
        self.applied_version = self.applied_version.max(batch.version);
    }

    /// The server is gone (or refused a batch, which then did nothing): a new one starts
    /// with nothing, and the whole union is owed to it.
    pub fn server_lost(&mut self) {
        self.in_flight = false;
        self.applied.clear();
        self.dirty = self.by_channel.keys().cloned().collect();
        self.sync = true;
        self.version += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(names: &[&str]) -> BTreeSet<Channel> {
        names.iter().map(|n| Channel::new(n).unwrap()).collect()
    }

    fn names(v: &[Channel]) -> Vec<&str> {
        v.iter().map(Channel::as_str).collect()
    }

    #[test]
    fn channel_names_are_what_postgres_can_report() {
        assert!(Channel::new("orders").is_ok());
        assert!(Channel::new("Mixed Case; \"quoted\"").is_ok());
        assert!(Channel::new(&"x".repeat(63)).is_ok());
        assert!(Channel::new(&"x".repeat(64)).is_err());
        assert!(Channel::new("").is_err());
        assert!(Channel::new("a\0b").is_err());
    }

    #[test]
    fn the_union_listens_once_per_channel_and_unlistens_after_the_last_client() {
        let mut u = Union::default();
        let a = u.set(1, set(&["x", "y"]), 10).unwrap();
        let v1 = a.wait_for.unwrap();
        let b = u.set(2, set(&["y", "z"]), 10).unwrap();
        let v2 = b.wait_for.unwrap();
        assert!(v2 > v1);
        let batch = u.take_batch().unwrap();
        assert_eq!(names(&batch.listen), ["x", "y", "z"]);
        assert!(batch.unlisten.is_empty());
        assert_eq!(batch.version, v2);
        assert!(u.take_batch().is_none(), "one batch in flight at a time");
        assert_eq!(
            u.listeners("y").count(),
            0,
            "nobody hears what is read before the LISTEN is answered"
        );
        u.applied(batch);
        assert!(u.applied_version() >= v2);
        assert_eq!(u.listeners("y").collect::<Vec<_>>(), [1, 2]);

        // A channel already on the server still waits for the server's word, with an
        // empty batch: what the server sent before it is not the newcomer's.
        let c = u.set(3, set(&["x"]), 10).unwrap();
        let wait = c.wait_for.unwrap();
        assert_eq!(u.listeners("x").collect::<Vec<_>>(), [1]);
        let sync = u.take_batch().unwrap();
        assert!(sync.is_empty());
        u.applied(sync);
        assert!(u.applied_version() >= wait);
        assert_eq!(u.listeners("x").collect::<Vec<_>>(), [1, 3]);

        // Client 2 leaves: z goes, y stays for client 1.
        u.remove(2);
        let batch = u.take_batch().unwrap();
        assert!(batch.listen.is_empty());
        assert_eq!(names(&batch.unlisten), ["z"]);
        u.applied(batch);
        assert_eq!(u.listeners("y").collect::<Vec<_>>(), [1]);
        assert_eq!(u.clients(), 2);
    }

    #[test]
    fn a_channel_that_came_and_went_between_batches_costs_no_listen() {
        let mut u = Union::default();
        u.set(1, set(&["x"]), 10).unwrap();
        u.set(1, set(&[]), 10).unwrap();
        let b = u.take_batch().unwrap();
        assert!(b.is_empty(), "only the owed word");
        u.applied(b);
        assert!(u.take_batch().is_none());
        assert!(u.is_empty());
        assert_eq!(u.applied_version(), u.version);
    }

    #[test]
    fn a_client_waits_for_the_batch_in_flight_to_be_followed_by_its_own() {
        let mut u = Union::default();
        u.set(1, set(&["x"]), 10).unwrap();
        let first = u.take_batch().unwrap();
        // Client 2 wants x while the batch that adds it is on its way.
        let c = u.set(2, set(&["x", "w"]), 10).unwrap();
        let wait = c.wait_for.unwrap();
        u.applied(first);
        assert!(u.applied_version() < wait);
        let second = u.take_batch().unwrap();
        assert_eq!(names(&second.listen), ["w"]);
        u.applied(second);
        assert!(u.applied_version() >= wait);
    }

    #[test]
    fn dropped_channels_are_reported_and_the_cap_holds() {
        let mut u = Union::default();
        u.set(1, set(&["a", "b"]), 2).unwrap();
        let c = u.set(1, set(&["b", "c"]), 2).unwrap();
        assert_eq!(names(&c.dropped), ["a"]);
        assert_eq!(
            u.set(1, set(&["a", "b", "c"]), 2),
            Err(TooManyChannels { wanted: 3, max: 2 })
        );
        // A refused set changes nothing.
        assert_eq!(
            u.channels_of(1).unwrap(),
            &set(&["b", "c"]),
            "the refused set left the old one"
        );
    }

    #[test]
    fn a_lost_server_owes_the_whole_union_to_the_next() {
        let mut u = Union::default();
        u.set(1, set(&["x", "y"]), 10).unwrap();
        let b = u.take_batch().unwrap();
        u.applied(b);
        u.server_lost();
        let again = u.take_batch().unwrap();
        assert_eq!(names(&again.listen), ["x", "y"]);
        // A batch lost in flight is owed too.
        u.server_lost();
        let c = u.set(2, set(&["z"]), 10).unwrap();
        let batch = u.take_batch().unwrap();
        assert_eq!(names(&batch.listen), ["x", "y", "z"]);
        u.applied(batch);
        assert!(u.applied_version() >= c.wait_for.unwrap());
    }
}
