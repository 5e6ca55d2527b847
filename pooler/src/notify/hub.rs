//! Who listens: per app role with listening clients, one [`RoleListener`] whose task
//! holds the role's listener server, and each client's [`Subscription`] to it.
//!
//! A client's session calls [`Hub::listen`] with its whole new set of channels once a
//! transaction that changed them is over; the call returns once the listener server
//! listens on every one of them, so a NOTIFY sent after the client's LISTEN returned is
//! never missed. Dropping the subscription (the client left) takes its channels out of
//! the union; the last one out closes the listener server.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::channels::{Channel, TooManyChannels, Union};
use super::inbox::Inbox;
use super::listener;
use super::senders::Senders;
use crate::backend::ServerConn;
use crate::pool::Pools;
use crate::registry::ClientInfo;

/// The bounds a [`Hub::listen`] call works within, read from the configuration.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// `max_listener_servers`.
    pub max_listeners: usize,
    /// `max_client_listen_channels`.
    pub max_channels: usize,
    /// `max_client_notification_bytes`.
    pub max_bytes: usize,
    /// How long a client waits for its role's listener to listen (`query_wait_timeout`).
    pub wait: Duration,
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

/// What passed through the hub since start, for `/metrics`.
#[derive(Debug, Default)]
pub struct Counts {
    /// Notifications queued for clients (one per client).
    pub delivered: AtomicU64,
    /// Notifications from sessions of another role (or of no known role), dropped.
    pub foreign: AtomicU64,
    /// Clients disconnected because they did not read their notifications.
    pub overflows: AtomicU64,
    /// Listener servers lost (and re-established while clients listen).
    pub losses: AtomicU64,
}

pub struct Hub {
    pub(super) pools: Pools<Box<ServerConn>>,
    pub senders: Arc<Senders>,
    /// The listeners by role. Locked before a listener's own state, never after.
    pub(super) listeners: Mutex<HashMap<Arc<str>, Arc<RoleListener>>>,
    pub counts: Arc<Counts>,
}

/// One role's listener: its clients' channels and inboxes, and the task that holds the
/// server.
pub(super) struct RoleListener {
    pub(super) role: Arc<str>,
    pub(super) state: Mutex<State>,
    /// Wakes the task: a batch is owed, or the last client left.
    pub(super) changed: tokio::sync::Notify,
    /// Every change up to this version is on the server.
    pub(super) applied: tokio::sync::watch::Sender<u64>,
}

pub(super) struct State {
    pub(super) union: Union,
    pub(super) subscribers: HashMap<u64, Subscriber>,
    /// The task has stopped: a newcomer needs a new listener.
    pub(super) closed: bool,
}

pub(super) struct Subscriber {
    pub(super) client: Arc<ClientInfo>,
    pub(super) inbox: Arc<Inbox>,
}

/// A client's place in its role's listener; leaving it (drop) takes its channels out.
pub struct Subscription {
    listener: Arc<RoleListener>,
    client: u64,
    inbox: Arc<Inbox>,
    channels: BTreeSet<Channel>,
}

impl Subscription {
    /// The client's notifications waiting for it.
    pub fn inbox(&self) -> &Inbox {
        &self.inbox
    }

    /// The channels the client listens on now.
    pub fn channels(&self) -> &BTreeSet<Channel> {
        &self.channels
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

impl RoleListener {
    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Hub {
    pub fn new(pools: Pools<Box<ServerConn>>, senders: Arc<Senders>) -> Arc<Hub> {
        Arc::new(Hub {
            pools,
            senders,
            listeners: Mutex::new(HashMap::new()),
            counts: Arc::default(),
        })
    }

    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Arc<str>, Arc<RoleListener>>> {
        self.listeners.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Roles with a listener now.
    pub fn listeners(&self) -> usize {
        self.lock().len()
    }

    /// Gives `client` (of `role`) exactly `channels`, replacing what `current` held; an
    /// empty set leaves. Returns once the role's listener server listens on all of them,
    /// or fails within `limits.wait`.
    ///
    /// Cancel-safe: the books change before the wait, and a dropped call leaves the
    /// client subscribed to what it asked for, as `current` says.
    pub async fn listen(
        self: &Arc<Self>,
        current: &mut Option<Subscription>,
        role: &Arc<str>,
        client: &Arc<ClientInfo>,
        channels: BTreeSet<Channel>,
        limits: &Limits,
    ) -> Result<(), ListenError> {
        if channels.is_empty() {
            *current = None;
            return Ok(());
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
                    })
                }
            }
            break (changed.wait_for, listener);
        };
        listener.changed.notify_one();
        let Some(version) = wait_for else {
            return Ok(());
        };
        let mut applied = listener.applied.subscribe();
        match tokio::time::timeout(limits.wait, applied.wait_for(|v| *v >= version)).await {
            Ok(Ok(_)) => Ok(()),
            // The task ended, which it does only once nobody listens: not this client.
            Ok(Err(_)) | Err(_) => Err(ListenError::NotApplied(limits.wait)),
        }
    }

    /// The role's running listener, or a new one if fewer than `max` roles have one.
    fn listener_for(
        self: &Arc<Self>,
        role: &Arc<str>,
        max: usize,
    ) -> Result<Arc<RoleListener>, ListenError> {
        let mut map = self.lock();
        if let Some(l) = map.get(role) {
            return Ok(l.clone());
        }
        if map.len() >= max {
            return Err(ListenError::TooManyListeners { max });
        }
        let listener = Arc::new(RoleListener {
            role: role.clone(),
            state: Mutex::new(State {
                union: Union::default(),
                subscribers: HashMap::new(),
                closed: false,
            }),
            changed: tokio::sync::Notify::new(),
            applied: tokio::sync::watch::Sender::new(0),
        });
        map.insert(role.clone(), listener.clone());
        tokio::spawn(listener::run(self.clone(), listener.clone()));
        Ok(listener)
    }

    /// Stops `listener` if nobody listens: it leaves the map (a newcomer makes a new
    /// one) and is marked closed under both locks, so no subscription can slip in.
    pub(super) fn close_if_unused(&self, listener: &Arc<RoleListener>) -> bool {
        let mut map = self.lock();
        let mut st = listener.lock();
        if !st.subscribers.is_empty() {
            return false;
        }
        st.closed = true;
        if map
            .get(&listener.role)
            .is_some_and(|l| Arc::ptr_eq(l, listener))
        {
            map.remove(&listener.role);
        }
        true
    }
}
