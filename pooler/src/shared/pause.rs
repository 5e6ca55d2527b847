//! The pause switch that `PAUSE`/`RESUME` turn and every checkout reads.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

/// What is paused: everything, or some roles.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Paused {
    pub all: bool,
    pub roles: BTreeSet<Arc<str>>,
}

impl Paused {
    pub fn covers(&self, role: &str) -> bool {
        self.all || self.roles.contains(role)
    }

    pub fn is_empty(&self) -> bool {
        !self.all && self.roles.is_empty()
    }
}

/// The pause switch. Checkouts read one atomic while nothing is paused, so the switch
/// costs the hot path nothing in normal operation.
pub struct Pause {
    any: AtomicBool,
    state: watch::Sender<Paused>,
    /// Bumped by every change, so a client holding a server looks again at a new pause.
    version: AtomicU64,
    /// Clients that hold a server through a pause because their session has state that
    /// cannot move to another server, by client id: what `PAUSE` reports it waits for.
    /// At most one entry per client, removed when it lets go or leaves.
    held: Mutex<BTreeMap<u64, Held>>,
}

/// A client that keeps its server through a pause, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held {
    pub role: Arc<str>,
    /// What is left on its server, e.g. "LISTEN channels: 1, temporary relations: 2".
    pub what: String,
}

impl Default for Pause {
    fn default() -> Self {
        Pause {
            any: AtomicBool::new(false),
            state: watch::Sender::new(Paused::default()),
            version: AtomicU64::new(0),
            held: Mutex::new(BTreeMap::new()),
        }
    }
}

impl Pause {
    pub fn is_paused(&self, role: &str) -> bool {
        self.any.load(Ordering::Acquire) && self.state.borrow().covers(role)
    }

    /// Changes with every pause and resume.
    pub fn version(&self) -> u64 {
        self.version.load(Ordering::Acquire)
    }

    fn held_map(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Held>> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Client `id` keeps its server through the pause, for `held.what`.
    pub fn hold(&self, id: u64, held: Held) {
        self.held_map().insert(id, held);
    }

    /// Client `id` no longer holds a server for the pause (it let go, acted, or left).
    pub fn let_go(&self, id: u64) {
        self.held_map().remove(&id);
    }

    /// The clients holding servers of `role` (or of any role) through the pause.
    pub fn holders(&self, role: Option<&str>) -> Vec<(u64, Held)> {
        self.held_map()
            .iter()
            .filter(|(_, h)| role.is_none_or(|r| *h.role == *r))
            .map(|(id, h)| (*id, h.clone()))
            .collect()
    }

    pub fn snapshot(&self) -> Paused {
        self.state.borrow().clone()
    }

    /// Waits until `role` is not paused; `false` if `deadline` came first.
    ///
    /// Cancel-safe: it only watches.
    pub async fn wait(&self, role: &str, deadline: tokio::time::Instant) -> bool {
        let mut rx = self.state.subscribe();
        loop {
            if !rx.borrow_and_update().covers(role) {
                return true;
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => {}
                // The sender lives in `Shared`, so this is the pooler going away.
                Ok(Err(_)) => return true,
                Err(_) => return false,
            }
        }
    }

    /// Changes what is paused through `f`; an error from `f` is returned as it is.
    pub fn update<E>(&self, f: impl FnOnce(&mut Paused) -> Result<(), E>) -> Result<(), E> {
        let mut result = Ok(());
        self.state.send_if_modified(|p| {
            let before = p.clone();
            result = f(p);
            self.any.store(!p.is_empty(), Ordering::Release);
            *p != before
        });
        self.version.fetch_add(1, Ordering::AcqRel);
        if !self.any.load(Ordering::Acquire) {
            self.held_map().clear();
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn a_paused_role_waits_until_resumed_or_its_deadline() {
        let pause = Arc::new(Pause::default());
        assert!(!pause.is_paused("a"));
        pause
            .update(|p| {
                p.roles.insert("a".into());
                Ok::<(), ()>(())
            })
            .unwrap();
        assert!(pause.is_paused("a") && !pause.is_paused("b"));
        let deadline = tokio::time::Instant::now() + Duration::from_millis(50);
        assert!(!pause.wait("a", deadline).await, "times out while paused");
        assert!(pause.wait("b", deadline).await);

        let waiter = {
            let pause = pause.clone();
            tokio::spawn(async move {
                let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
                pause.wait("a", deadline).await
            })
        };
        tokio::time::sleep(Duration::from_millis(10)).await;
        pause
            .update(|p| {
                p.roles.clear();
                Ok::<(), ()>(())
            })
            .unwrap();
        assert!(waiter.await.unwrap(), "released by the resume");
        assert!(!pause.is_paused("a"));
    }
}
