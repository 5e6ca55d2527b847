//! The pause switch that `PAUSE`/`RESUME` turn and every checkout reads.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

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
}

impl Default for Pause {
    fn default() -> Self {
        Pause {
            any: AtomicBool::new(false),
            state: watch::Sender::new(Paused::default()),
        }
    }
}

impl Pause {
    pub fn is_paused(&self, role: &str) -> bool {
        self.any.load(Ordering::Acquire) && self.state.borrow().covers(role)
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
