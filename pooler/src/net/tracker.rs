//! Counts live client tasks so shutdown can wait for them to finish.

use std::future::Future;
use std::sync::Arc;

use tokio::sync::Notify;

#[derive(Clone, Default)]
pub struct Tracker {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    live: std::sync::atomic::AtomicUsize,
    idle: Notify,
}

/// One live client counted by its [`Tracker`]: a task's, or a parked client's that
/// has none (`Tracker::hold`), so shutdown waits for it as for a task.
pub struct Hold(Arc<Inner>);

impl Drop for Hold {
    fn drop(&mut self) {
        if self
            .0
            .live
            .fetch_sub(1, std::sync::atomic::Ordering::AcqRel)
            == 1
        {
            self.0.idle.notify_waiters();
        }
    }
}

impl Tracker {
    pub fn spawn<F>(&self, fut: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let guard = self.hold();
        // Boxed: an async block stores a future it awaits twice (as the captured
        // value and as the awaited one), which for a client's task is kilobytes per
        // idle client.
        let fut = Box::pin(fut);
        tokio::spawn(async move {
            let _guard = guard;
            fut.await;
        });
    }

    /// Counts one more live client until the returned [`Hold`] is dropped.
    pub fn hold(&self) -> Hold {
        self.inner
            .live
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        Hold(self.inner.clone())
    }

    pub fn live(&self) -> usize {
        self.inner.live.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Resolves once no tracked task is running.
    pub async fn wait(&self) {
        loop {
            let notified = self.inner.idle.notified();
            if self.live() == 0 {
                return;
            }
            notified.await;
        }
    }
}
