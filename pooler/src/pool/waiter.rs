//! A queued checkout that leaves the queue when dropped (pgdog's `Waiting`), closing
//! the race pgdog leaves open: a grant already sent but not yet received.

use tokio::sync::oneshot;

use super::scheduler::WaiterId;
use super::{Grant, Pools};

pub(super) struct Waiter<S: Send + 'static> {
    pools: Pools<S>,
    id: WaiterId,
    rx: oneshot::Receiver<Grant<S>>,
    /// Set once the answer has been received; until then `Drop` must clean up.
    answered: bool,
}

impl<S: Send + 'static> Waiter<S> {
    pub(super) fn new(pools: Pools<S>, id: WaiterId, rx: oneshot::Receiver<Grant<S>>) -> Self {
        Self {
            pools,
            id,
            rx,
            answered: false,
        }
    }

    /// Waits for a server or a login error. Cancel-safe: see `Drop`.
    pub(super) async fn recv(&mut self) -> Result<Grant<S>, oneshot::error::RecvError> {
        let answer = (&mut self.rx).await;
        self.answered = true;
        answer
    }
}

impl<S: Send + 'static> Drop for Waiter<S> {
    fn drop(&mut self) {
        if self.answered {
            return;
        }
        if let Some(tx) = self.pools.cancel_waiter(self.id) {
            // Still queued: it is out of the queue now; the sender just goes away.
            drop(tx);
            return;
        }
        // Already answered by the scheduler: the answer is either in the channel or
        // about to be sent. Closing first makes a later send fail, and the sender then
        // returns the server itself; one already in the channel we return here. Either
        // way the server goes back clean instead of being dropped (closed) unused.
        self.rx.close();
        if let Ok(Ok(checkout)) = self.rx.try_recv() {
            checkout.release();
        }
    }
}
