//! A parking lot for idle connections: one task watches every parked connection, so
//! an idle client costs its own state and no task (a task's cell and future are
//! kilobytes; 10,000 idle clients must cost less than PgBouncer's ~1 KiB each).
//!
//! A parked item registers a waker of its own (a few bytes naming its slot) with
//! whatever may make it runnable: its socket's readiness, its client's doorbell. A
//! wake queues the slot for the watcher, which polls that item alone and, if it has
//! something to do, takes it out and lets it resume (in a task of its own again).
//! The lot knows sockets and wakers, not sessions: [`Parked`] says what an item is.
//!
//! The lot also keeps the parking clock: a coarse epoch that the session's sweep
//! advances, by which it tells who has been idle in a task for a whole period.

use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::task::{Context, Poll, Wake, Waker};

use futures_util::task::AtomicWaker;

/// Something parked: an idle connection and what it needs to resume.
pub trait Parked: Send + 'static {
    /// Registers `cx`'s waker with everything that may give it work, then says
    /// whether it has work now (registering first, so a wake in between is kept).
    fn poll_wake(&mut self, cx: &mut Context<'_>) -> Poll<()>;

    /// Leaves the lot to do that work: typically spawns a task that carries on.
    fn resume(self: Box<Self>);
}

/// The handle the parking side holds. Dropping the last one ends the watcher and
/// drops (closes) whatever is still parked.
pub struct Lot {
    inner: Arc<Inner>,
}

struct Inner {
    /// Parked since the watcher last looked. Bounded by the clients the pooler
    /// admits (`max_client_conn`): a client is parked at most once at a time.
    arrivals: Mutex<Vec<Box<dyn Parked>>>,
    /// Slots woken since the watcher last looked (slot, generation); as bounded.
    woken: Mutex<Vec<(u32, u32)>>,
    watcher: AtomicWaker,
    epoch: AtomicU32,
    parked: AtomicUsize,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Plain vectors pushed to and swapped out: nothing to leave half-done.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Lot {
    /// Creates the lot and spawns its watcher. Must be called within a Tokio runtime.
    pub fn start() -> Lot {
        let inner = Arc::new(Inner {
            arrivals: Mutex::new(Vec::new()),
            woken: Mutex::new(Vec::new()),
            watcher: AtomicWaker::new(),
            epoch: AtomicU32::new(0),
            parked: AtomicUsize::new(0),
        });
        tokio::spawn(watch(inner.clone()));
        Lot { inner }
    }

    /// Parks `item` until it has work.
    pub fn park(&self, item: Box<dyn Parked>) {
        self.inner.parked.fetch_add(1, Ordering::Relaxed);
        lock(&self.inner.arrivals).push(item);
        self.inner.watcher.wake();
    }

    /// How many items are parked now.
    pub fn len(&self) -> usize {
        self.inner.parked.load(Ordering::Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The parking clock's epoch.
    pub fn epoch(&self) -> u32 {
        self.inner.epoch.load(Ordering::Relaxed)
    }

    /// Advances the parking clock; returns the new epoch.
    pub fn advance(&self) -> u32 {
        self.inner
            .epoch
            .fetch_add(1, Ordering::Relaxed)
            .wrapping_add(1)
    }
}

impl Drop for Lot {
    fn drop(&mut self) {
        self.inner.watcher.wake();
    }
}

/// The waker a parked item registers: which slot, and which occupant of it (a stale
/// wake for a slot since reused is ignored).
struct SlotWaker {
    inner: Weak<Inner>,
    slot: u32,
    generation: u32,
}

impl Wake for SlotWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        if let Some(inner) = self.inner.upgrade() {
            lock(&inner.woken).push((self.slot, self.generation));
            inner.watcher.wake();
        }
    }
}

struct Slot {
    generation: u32,
    item: Option<Box<dyn Parked>>,
}

/// The watcher's own state: the parked items by slot.
struct Slots {
    slots: Vec<Slot>,
    free: Vec<u32>,
}

impl Slots {
    fn insert(&mut self, item: Box<dyn Parked>) -> (u32, u32) {
        match self.free.pop() {
            Some(i) => {
                let slot = &mut self.slots[i as usize];
                slot.generation = slot.generation.wrapping_add(1);
                slot.item = Some(item);
                (i, slot.generation)
            }
            None => {
                let i = u32::try_from(self.slots.len()).unwrap_or(u32::MAX);
                self.slots.push(Slot {
                    generation: 0,
                    item: Some(item),
                });
                (i, 0)
            }
        }
    }

    /// Polls the item in `slot` if it is still the `generation` woken; resumes it and
    /// frees the slot if it has work.
    fn poll(&mut self, inner: &Arc<Inner>, slot: u32, generation: u32) {
        let Some(s) = self.slots.get_mut(slot as usize) else {
            return;
        };
        if s.generation != generation {
            return;
        }
        let Some(item) = s.item.as_mut() else {
            return;
        };
        let waker = Waker::from(Arc::new(SlotWaker {
            inner: Arc::downgrade(inner),
            slot,
            generation,
        }));
        if item
            .poll_wake(&mut Context::from_waker(&waker))
            .is_pending()
        {
            return;
        }
        if let Some(item) = s.item.take() {
            self.free.push(slot);
            inner.parked.fetch_sub(1, Ordering::Relaxed);
            item.resume();
        }
    }
}

async fn watch(inner: Arc<Inner>) {
    let mut slots = Slots {
        slots: Vec::new(),
        free: Vec::new(),
    };
    let mut arrivals = Vec::new();
    let mut woken = Vec::new();
    std::future::poll_fn(|cx| {
        inner.watcher.register(cx.waker());
        loop {
            std::mem::swap(&mut arrivals, &mut *lock(&inner.arrivals));
            std::mem::swap(&mut woken, &mut *lock(&inner.woken));
            if arrivals.is_empty() && woken.is_empty() {
                break;
            }
            for item in arrivals.drain(..) {
                let (slot, generation) = slots.insert(item);
                slots.poll(&inner, slot, generation);
            }
            for (slot, generation) in woken.drain(..) {
                slots.poll(&inner, slot, generation);
            }
        }
        // Every `Lot` is gone: nobody can park or look any more.
        if Arc::strong_count(&inner) == 1 {
            return Poll::Ready(());
        }
        Poll::Pending
    })
    .await;
    // Whatever is still parked is dropped with `slots`, closing its connection.
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicBool;

    use super::*;

    /// An item that has work once its flag is set and its waker called.
    struct Flagged {
        ready: Arc<AtomicBool>,
        waker: Arc<Mutex<Option<Waker>>>,
        resumed: tokio::sync::mpsc::Sender<u32>,
        id: u32,
    }

    impl Parked for Flagged {
        fn poll_wake(&mut self, cx: &mut Context<'_>) -> Poll<()> {
            *lock(&self.waker) = Some(cx.waker().clone());
            if self.ready.load(Ordering::Acquire) {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        }

        fn resume(self: Box<Self>) {
            let _ = self.resumed.try_send(self.id);
        }
    }

    #[tokio::test]
    async fn a_parked_item_resumes_when_woken_with_work_and_not_before() {
        let lot = Lot::start();
        let (tx, mut rx) = tokio::sync::mpsc::channel(4);
        let mut handles = Vec::new();
        for id in 0..3 {
            let ready = Arc::new(AtomicBool::new(id == 2));
            let waker = Arc::new(Mutex::new(None));
            lot.park(Box::new(Flagged {
                ready: ready.clone(),
                waker: waker.clone(),
                resumed: tx.clone(),
                id,
            }));
            handles.push((ready, waker));
        }
        // Work at parking time: resumed at once.
        assert_eq!(rx.recv().await, Some(2));
        tokio::task::yield_now().await;
        assert_eq!(lot.len(), 2);
        // A wake without work changes nothing.
        let wake = |i: usize| {
            if let Some(w) = lock(&handles[i].1).take() {
                w.wake();
            }
        };
        wake(0);
        tokio::task::yield_now().await;
        assert!(rx.try_recv().is_err());
        handles[1].0.store(true, Ordering::Release);
        wake(1);
        assert_eq!(rx.recv().await, Some(1));
        assert_eq!(lot.len(), 1);
        assert_eq!(lot.advance(), 1);
        assert_eq!(lot.epoch(), 1);
    }
}
