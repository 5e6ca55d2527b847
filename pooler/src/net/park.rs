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
//! A plaintext socket is watched by the lot's own epoll rather than tokio's reactor:
//! a registration with tokio (`ScheduledIo`) costs 256 bytes, a quarter of what an
//! idle client may cost. A thread of the lot's own (`pooler-park`) waits on that
//! epoll and hands the slots whose socket became readable to the watcher task, as a
//! wake does (tokio's way to watch a foreign descriptor, `AsyncFd`, now takes
//! `unsafe`). A parked socket is registered once, at arrival, and deregistered when
//! it leaves: parking costs two `epoll_ctl` there and two in tokio, once per idle
//! period, never per transaction.
//!
//! The lot also keeps the parking clock: a coarse epoch that the session's sweep
//! advances, by which it tells who has been idle in a task for a whole period.

use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::task::{Context, Poll, Wake, Waker};

use futures_util::task::AtomicWaker;
use mio::unix::SourceFd;
use mio::{Interest, Token};

/// Events taken from the lot's epoll per `epoll_wait`; more are taken by the next.
const EVENTS: usize = 256;
/// The token of the waker that tells the epoll thread to look whether the lot ended.
const STOP: Token = Token(usize::MAX);

/// Something parked: an idle connection and what it needs to resume.
pub trait Parked: Send + 'static {
    /// Registers `cx`'s waker with everything that may give it work, then says
    /// whether it has work now (registering first, so a wake in between is kept).
    fn poll_wake(&mut self, cx: &mut Context<'_>) -> Poll<()>;

    /// Leaves the lot to do that work: typically spawns a task that carries on.
    fn resume(self: Box<Self>);

    /// A socket out of tokio's reactor for the lot to watch itself: readable (a
    /// request or a hang-up) means work. Registered when the item arrives,
    /// deregistered before it resumes.
    fn socket(&self) -> Option<RawFd> {
        None
    }
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
    /// Slots whose socket the epoll thread found readable; bounded by the readiness
    /// edges of parked sockets before the watcher deregisters them (one, unless a
    /// client keeps sending while the watcher is behind: linear in what it sent).
    readable: Mutex<Vec<(u32, u32)>>,
    /// The lot's epoll, to register parked sockets with.
    epoll: mio::Registry,
    /// Wakes the epoll thread to end once `closed` is set.
    stop: mio::Waker,
    /// The `Lot` is gone: nobody can park or look any more.
    closed: std::sync::atomic::AtomicBool,
    watcher: AtomicWaker,
    epoch: AtomicU32,
    parked: AtomicUsize,
    /// Sockets the epoll refused since the last warning, and when that was: a client
    /// refused is resumed and asked to park again at the next sweep, so while the
    /// kernel's limit lasts (`max_user_watches`) every idle client would log once a
    /// second.
    unwatched: Mutex<(u64, Option<std::time::Instant>)>,
}

/// At most one warning about sockets the lot's epoll refused in this long.
const UNWATCHED_WARNING_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

impl Inner {
    /// Counts a socket the epoll refused; warns with the count at most once per
    /// [`UNWATCHED_WARNING_EVERY`].
    fn refused(&self, e: &io::Error) {
        let mut unwatched = lock(&self.unwatched);
        unwatched.0 += 1;
        let now = std::time::Instant::now();
        if unwatched
            .1
            .is_none_or(|at| now.duration_since(at) >= UNWATCHED_WARNING_EVERY)
        {
            tracing::warn!(
                error = %e,
                sockets = unwatched.0,
                "parked sockets could not be watched (the kernel's epoll limit?); they stay in their tasks"
            );
            *unwatched = (0, Some(now));
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Plain vectors pushed to and swapped out: nothing to leave half-done.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Lot {
    /// Creates the lot (and its epoll) and spawns its watcher. Must be called within a
    /// Tokio runtime.
    pub fn start() -> io::Result<Lot> {
        let poll = mio::Poll::new()?;
        let inner = Arc::new(Inner {
            arrivals: Mutex::new(Vec::new()),
            woken: Mutex::new(Vec::new()),
            readable: Mutex::new(Vec::new()),
            epoll: poll.registry().try_clone()?,
            stop: mio::Waker::new(poll.registry(), STOP)?,
            closed: std::sync::atomic::AtomicBool::new(false),
            watcher: AtomicWaker::new(),
            epoch: AtomicU32::new(0),
            parked: AtomicUsize::new(0),
            unwatched: Mutex::new((0, None)),
        });
        let weak = Arc::downgrade(&inner);
        std::thread::Builder::new()
            .name("pooler-park".into())
            .spawn(move || wait_readable(poll, weak))?;
        tokio::spawn(watch(inner.clone()));
        Ok(Lot { inner })
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
        self.inner.closed.store(true, Ordering::Release);
        self.inner.watcher.wake();
        // If this fails the thread ends at the next event of a parked socket, which
        // the watcher, ending too, closes.
        let _ = self.inner.stop.wake();
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

    /// Has the lot's epoll watch the socket of the item just put in `slot`; an item
    /// whose socket cannot be watched resumes at once (it is then watched by tokio).
    fn watch(&mut self, inner: &Inner, epoll: &mio::Registry, slot: u32, generation: u32) {
        let Some(fd) = self.item(slot, generation).and_then(|item| item.socket()) else {
            return;
        };
        let token = token(slot, generation);
        if let Err(e) = epoll.register(&mut SourceFd(&fd), token, Interest::READABLE) {
            inner.refused(&e);
            self.leave(inner, epoll, slot);
        }
    }

    fn item(&mut self, slot: u32, generation: u32) -> Option<&mut Box<dyn Parked>> {
        let s = self.slots.get_mut(slot as usize)?;
        if s.generation != generation {
            return None;
        }
        s.item.as_mut()
    }

    /// Takes the item out of `slot` (out of the lot's epoll first) and resumes it.
    fn leave(&mut self, inner: &Inner, epoll: &mio::Registry, slot: u32) {
        let Some(item) = self
            .slots
            .get_mut(slot as usize)
            .and_then(|s| s.item.take())
        else {
            return;
        };
        if let Some(fd) = item.socket() {
            // It may never have been registered (its registration failed).
            let _ = epoll.deregister(&mut SourceFd(&fd));
        }
        self.free.push(slot);
        inner.parked.fetch_sub(1, Ordering::Relaxed);
        item.resume();
    }

    /// The socket of the item in `slot` became readable: it has work, if it is still
    /// the `generation` registered.
    fn readable(&mut self, inner: &Inner, epoll: &mio::Registry, slot: u32, generation: u32) {
        if self.item(slot, generation).is_some() {
            self.leave(inner, epoll, slot);
        }
    }

    /// Polls the item in `slot` if it is still the `generation` woken; resumes it and
    /// frees the slot if it has work.
    fn poll(&mut self, inner: &Arc<Inner>, epoll: &mio::Registry, slot: u32, generation: u32) {
        let Some(item) = self.item(slot, generation) else {
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
        self.leave(inner, epoll, slot);
    }
}

/// A slot and its generation as an epoll token (both fit: usize is 64 bits on every
/// platform the pooler runs on; on a 32-bit one a stale generation could alias).
fn token(slot: u32, generation: u32) -> Token {
    let packed = (u64::from(generation) << 32) | u64::from(slot);
    Token(usize::try_from(packed).unwrap_or(slot as usize))
}

fn untoken(token: Token) -> (u32, u32) {
    let packed = token.0 as u64;
    ((packed & 0xffff_ffff) as u32, (packed >> 32) as u32)
}

async fn watch(inner: Arc<Inner>) {
    let mut slots = Slots {
        slots: Vec::new(),
        free: Vec::new(),
    };
    let mut arrivals = Vec::new();
    let mut woken = Vec::new();
    let mut readable = Vec::new();
    std::future::poll_fn(|cx| {
        inner.watcher.register(cx.waker());
        loop {
            std::mem::swap(&mut arrivals, &mut *lock(&inner.arrivals));
            std::mem::swap(&mut woken, &mut *lock(&inner.woken));
            std::mem::swap(&mut readable, &mut *lock(&inner.readable));
            if arrivals.is_empty() && woken.is_empty() && readable.is_empty() {
                break;
            }
            let registry = &inner.epoll;
            for item in arrivals.drain(..) {
                let (slot, generation) = slots.insert(item);
                slots.watch(&inner, registry, slot, generation);
                slots.poll(&inner, registry, slot, generation);
            }
            for (slot, generation) in woken.drain(..) {
                slots.poll(&inner, registry, slot, generation);
            }
            for (slot, generation) in readable.drain(..) {
                slots.readable(&inner, registry, slot, generation);
            }
        }
        if inner.closed.load(Ordering::Acquire) {
            return Poll::Ready(());
        }
        Poll::Pending
    })
    .await;
    // Whatever is still parked is dropped with `slots`, closing its connection.
}

/// The epoll thread: hands each parked socket that became readable to the watcher,
/// until the lot is closed.
fn wait_readable(mut poll: mio::Poll, inner: Weak<Inner>) {
    let mut events = mio::Events::with_capacity(EVENTS);
    loop {
        if let Err(e) = poll.poll(&mut events, None) {
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            // Not seen in practice: parked clients then wait for their doorbell (the
            // drain rings it), and whatever failed here fails for tokio too.
            tracing::error!(error = %e, "waiting on the parking lot's epoll failed");
            return;
        }
        let Some(inner) = inner.upgrade() else {
            return;
        };
        if inner.closed.load(Ordering::Acquire) {
            return;
        }
        let mut readable = lock(&inner.readable);
        readable.extend(
            events
                .iter()
                .filter(|e| e.token() != STOP)
                .map(|e| untoken(e.token())),
        );
        let any = !readable.is_empty();
        drop(readable);
        if any {
            inner.watcher.wake();
        }
    }
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
        let lot = Lot::start().expect("lot");
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

    /// An item whose only source of work is its socket, watched by the lot's epoll: a
    /// TCP stream, or a regular file, which epoll refuses (EPERM) as it refuses
    /// sockets past the kernel's `max_user_watches`.
    struct Socket<T> {
        io: T,
        resumed: tokio::sync::mpsc::Sender<u32>,
        id: u32,
    }

    impl<T: std::os::fd::AsRawFd + Send + 'static> Parked for Socket<T> {
        fn poll_wake(&mut self, _: &mut Context<'_>) -> Poll<()> {
            Poll::Pending
        }

        fn resume(self: Box<Self>) {
            let _ = self.resumed.try_send(self.id);
        }

        fn socket(&self) -> Option<RawFd> {
            Some(self.io.as_raw_fd())
        }
    }

    #[tokio::test]
    async fn a_socket_the_epoll_refuses_resumes_at_once_and_others_stay_parked() {
        let lot = Lot::start().expect("lot");
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::channel(8);
        let peer = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (tcp, _) = listener.accept().unwrap();
        tcp.set_nonblocking(true).unwrap();
        lot.park(Box::new(Socket {
            io: tcp,
            resumed: tx.clone(),
            id: 0,
        }));
        for id in 1..4 {
            let path =
                std::env::temp_dir().join(format!("pooler-park-{}-{id}", std::process::id()));
            let file = std::fs::File::create(&path).unwrap();
            // Open files outlive their name.
            std::fs::remove_file(&path).unwrap();
            lot.park(Box::new(Socket {
                io: file,
                resumed: tx.clone(),
                id,
            }));
        }
        // Each refused one goes back to its task, not left unwatched in the lot.
        let mut resumed: Vec<_> = Vec::new();
        for _ in 1..4 {
            resumed.push(rx.recv().await.unwrap());
        }
        resumed.sort();
        assert_eq!(resumed, [1, 2, 3]);
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(rx.try_recv().is_err(), "the watched socket stays parked");
        assert_eq!(lot.len(), 1);
        // Warned at the first; the next two wait for the next warning.
        assert_eq!(lock(&lot.inner.unwatched).0, 2);
        drop(peer);
        assert_eq!(rx.recv().await, Some(0));
    }

    #[tokio::test]
    async fn a_parked_socket_resumes_when_its_peer_sends_or_hangs_up_and_not_before() {
        use std::io::Write;
        let lot = Lot::start().expect("lot");
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::channel(4);
        // Parks the accepted end of a new connection as item `id`; returns the peer.
        let park = |id| {
            let peer = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
            let (tcp, _) = listener.accept().unwrap();
            tcp.set_nonblocking(true).unwrap();
            lot.park(Box::new(Socket {
                io: tcp,
                resumed: tx.clone(),
                id,
            }));
            peer
        };
        let mut peers: Vec<_> = (0..3).map(|id| Some(park(id))).collect();
        // Sent before the lot registered it: epoll reports it all the same.
        peers[2].as_mut().unwrap().write_all(b"Q").unwrap();
        assert_eq!(rx.recv().await, Some(2));
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(rx.try_recv().is_err(), "nothing sent, nothing resumed");
        assert_eq!(lot.len(), 2);
        peers[0].as_mut().unwrap().write_all(b"Q").unwrap();
        assert_eq!(rx.recv().await, Some(0));
        peers[1] = None;
        assert_eq!(rx.recv().await, Some(1));
        assert!(lot.is_empty());
        // A slot reused by the next item: the old registration's events are not its.
        let peer = park(3);
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(rx.try_recv().is_err());
        drop(peer);
        assert_eq!(rx.recv().await, Some(3));
    }
}
