//! What the hub and the listener tasks share: each role's listener (its clients'
//! channels and inboxes), and the map of them.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::channels::Union;
use super::inbox::Inbox;
use super::senders::Senders;
use crate::backend::ServerConn;
use crate::metrics::Metrics;
use crate::pool::Pools;
use crate::registry::ClientInfo;

/// The hub's state, shared with every listener task.
pub(super) struct Common {
    pub(super) pools: Pools<Box<ServerConn>>,
    pub(super) senders: Arc<Senders>,
    /// The listeners by role. Locked before a listener's own state, never after.
    pub(super) listeners: Mutex<HashMap<Arc<str>, Arc<RoleListener>>>,
    pub(super) metrics: Arc<Metrics>,
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

impl RoleListener {
    pub(super) fn new(role: Arc<str>) -> RoleListener {
        RoleListener {
            role,
            state: Mutex::new(State {
                union: Union::default(),
                subscribers: HashMap::new(),
                closed: false,
            }),
            changed: tokio::sync::Notify::new(),
            applied: tokio::sync::watch::Sender::new(0),
        }
    }

    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Common {
    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Arc<str>, Arc<RoleListener>>> {
        self.listeners.lock().unwrap_or_else(|p| p.into_inner())
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
