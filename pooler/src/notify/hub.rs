//! Who listens: per app role with listening clients, one [`RoleListener`] whose task
//! holds the role's listener server, and each client's [`Subscription`] to it.
//!
//! A client's session calls [`Hub::subscribe`] with its whole new set of channels once a
//! transaction that changed them is over, gives its server back, and waits for the
//! [`Ack`]: the listener server listens on every one of them, so a NOTIFY sent after the
//! client's LISTEN returned is never missed. Dropping the subscription (the client left) takes its channels out of
//! the union; the last one out closes the listener server.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::channels::{Channel, TooManyChannels};
use super::inbox::Inbox;
use super::listener;
use super::role::{Common, RoleListener, Subscriber};
use super::senders::Senders;
use super::sql::Primed;
use crate::backend::ServerConn;
use crate::metrics::Metrics;
use crate::pool::Pools;
use crate::registry::ClientInfo;

/// The bounds a [`Hub::subscribe`] works within, read from the configuration.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// `max_listener_servers`.
    pub max_listeners: usize,
    /// `max_client_listen_channels`.
    pub max_channels: usize,
    /// `max_client_notification_bytes`.
    pub max_bytes: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error(
        "too many apps listen through this pooler at once (max_listener_servers = {max}); \
         LISTEN needs session mode here: connect to the session port or set the app's \
         pool_mode to session"
    )]
    TooManyListeners { max: usize },
    #[error("this session listens on {0}")]
    TooManyChannels(#[from] TooManyChannels),
    #[error(
        "the pooler's LISTEN connection for this app did not listen on the session's channels \
         within query_wait_timeout ({0:?})"
    )]
    NotApplied(Duration),
}

/// Every role's listener.
pub struct Hub {
    common: Arc<Common>,
}

/// The listener server's word, to come, that it listens on a client's new channels.
pub struct Ack {
    applied: tokio::sync::watch::Receiver<u64>,
    version: u64,
}

impl Ack {
    /// Waits for it, at most `limit`.
    pub async fn wait(mut self, limit: Duration) -> Result<(), ListenError> {
        let version = self.version;
        match tokio::time::timeout(limit, self.applied.wait_for(|v| *v >= version)).await {
            Ok(Ok(_)) => Ok(()),
            // The task ended, which it does only once nobody listens: not this client.
            Ok(Err(_)) | Err(_) => Err(ListenError::NotApplied(limit)),
        }
    }
}

/// A client's place in its role's listener; leaving it (drop) takes its channels out.
pub struct Subscription {
    listener: Arc<RoleListener>,
    client: u64,
    inbox: Arc<Inbox>,
    channels: BTreeSet<Channel>,
    /// Whether the client's transaction server holds its channels for the
    /// transaction under way (session/listen.rs): kept here, so a client that never
    /// listens carries nothing for it.
    primed: Primed,
}

impl Subscription {
    /// The client's notifications waiting for it.
    pub fn inbox(&self) -> &Arc<Inbox> {
        &self.inbox
    }

    /// The channels the client listens on now.
    pub fn channels(&self) -> &BTreeSet<Channel> {
        &self.channels
    }

    pub fn primed(&self) -> Primed {
        self.primed
    }

    pub fn set_primed(&mut self, primed: Primed) {
        self.primed = primed;
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let mut st = self.listener.lock();
        st.union.remove(self.client);
        st.subscribers.remove(&self.client);
        let last = st.subscribers.is_empty();
        drop(st);
        if last {
            self.listener.changed.notify_one();
        }
    }
}

impl Hub {
    pub fn new(pools: Pools<Box<ServerConn>>, senders: Arc<Senders>, metrics: Arc<Metrics>) -> Hub {
        Hub {
            common: Arc::new(Common {
                pools,
                senders,
                listeners: Mutex::new(HashMap::new()),
                metrics,
            }),
        }
    }

    /// Who sent a notification: also what pinned and session-mode servers'
    /// notifications are checked against.
    pub fn senders(&self) -> &Senders {
        &self.common.senders
    }

    /// Roles with a listener now.
    pub fn listeners(&self) -> usize {
        self.common.lock().len()
    }

    /// Gives `client` (of `role`) exactly `channels`, replacing what `current` held; an
    /// empty set leaves. The books change now; the returned [`Ack`] (if any) says when
    /// the role's listener server listens on all of them, so the caller can let go of
    /// what it holds (a transaction server) before it waits.
    pub fn subscribe(
        &self,
        current: &mut Option<Subscription>,
        role: &Arc<str>,
        client: &Arc<ClientInfo>,
        channels: BTreeSet<Channel>,
        limits: &Limits,
    ) -> Result<Option<Ack>, ListenError> {
        if channels.is_empty() {
            *current = None;
            return Ok(None);
        }
        let (wait_for, listener) = loop {
            let listener = match current {
                Some(sub) => sub.listener.clone(),
                None => self.listener_for(role, limits.max_listeners)?,
            };
            let mut st = listener.lock();
            if st.closed {
                // Stopped between the lookup and now (its last client had just left).
                drop(st);
                *current = None;
                continue;
            }
            let changed = st
                .union
                .set(client.id, channels.clone(), limits.max_channels)?;
            let inbox = st
                .subscribers
                .entry(client.id)
                .or_insert_with(|| Subscriber {
                    client: client.clone(),
                    inbox: Arc::new(Inbox::new(limits.max_bytes)),
                })
                .inbox
                .clone();
            drop(st);
            inbox.forget(&changed.dropped);
            match current {
                Some(sub) => sub.channels = channels,
                None => {
                    *current = Some(Subscription {
                        listener: listener.clone(),
                        client: client.id,
                        inbox,
                        channels,
                        primed: Primed::No,
                    })
                }
            }
            break (changed.wait_for, listener);
        };
        listener.changed.notify_one();
        Ok(wait_for.map(|version| Ack {
            applied: listener.applied.subscribe(),
            version,
        }))
    }

    /// The role's running listener, or a new one if fewer than `max` roles have one.
    fn listener_for(&self, role: &Arc<str>, max: usize) -> Result<Arc<RoleListener>, ListenError> {
        let mut map = self.common.lock();
        if let Some(l) = map.get(role) {
            return Ok(l.clone());
        }
        if map.len() >= max {
            return Err(ListenError::TooManyListeners { max });
        }
        let listener = Arc::new(RoleListener::new(role.clone()));
        map.insert(role.clone(), listener.clone());
        tokio::spawn(listener::run(self.common.clone(), listener.clone()));
        Ok(listener)
    }
}
