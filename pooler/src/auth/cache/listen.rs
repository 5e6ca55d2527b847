//! `LISTEN dataplane_auth`: the credentials trigger names a role whose row changed,
//! and the pooler re-reads that row.
//!
//! The channel is open to every app (`pg_notify` needs no privilege, and channels are
//! per database), so a payload is only ever a hint of which row to read again: the row
//! is the truth, never the payload. A hint costs bounded work whatever arrives:
//! - a name this pooler knows nothing of (not cached, no clients) is dropped after one
//!   map probe: there is nothing to revoke (a negative entry for it is forgotten, so an
//!   app created a moment ago logs in at once);
//! - a name it knows is queued once: duplicates are dropped while it waits, and a name
//!   whose re-read has started is queued again (the change may have come after the
//!   read);
//! - the queue holds at most `auth_notify_queue` names; past that it is dropped whole
//!   and every known role re-read (as after a lost LISTEN connection).
//!
//! So a flood of bogus notifications costs a hash probe each, and one naming every role
//! this pooler knows costs a re-read per role: a real revocation waits behind at most
//! one re-read per known role, never behind the flood.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;

use super::{Change, MAX_NAME, Status, VerifierCache};

/// Whether a role matters to this pooler beyond the cache (it has clients or servers):
/// given by the caller, which knows the connected roles.
pub type Interest = Arc<dyn Fn(&str) -> bool + Send + Sync>;

/// Role names waiting to be re-read.
pub(super) struct Notices {
    cap: usize,
    queue: Mutex<Queue>,
    wake: tokio::sync::Notify,
}

#[derive(Default)]
struct Queue {
    order: VecDeque<Arc<str>>,
    queued: HashSet<Arc<str>>,
    overflow: bool,
}

enum Job {
    Reread(Arc<str>),
    /// The queue overflowed: re-read everything.
    Resync,
}

impl Notices {
    pub(super) fn new(cap: usize) -> Self {
        Notices {
            cap: cap.max(1),
            queue: Mutex::new(Queue::default()),
            wake: tokio::sync::Notify::new(),
        }
    }

    fn queue(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `false`: a duplicate of a name already waiting.
    fn push(&self, name: &str) -> Result<bool, Overflow> {
        let mut q = self.queue();
        if q.queued.contains(name) {
            return Ok(false);
        }
        if q.order.len() >= self.cap {
            q.order.clear();
            q.queued.clear();
            q.overflow = true;
            drop(q);
            self.wake.notify_one();
            return Err(Overflow);
        }
        let name: Arc<str> = Arc::from(name);
        q.queued.insert(name.clone());
        q.order.push_back(name);
        drop(q);
        self.wake.notify_one();
        Ok(true)
    }

    fn pop(&self) -> Option<Job> {
        let mut q = self.queue();
        if std::mem::take(&mut q.overflow) {
            return Some(Job::Resync);
        }
        let name = q.order.pop_front()?;
        q.queued.remove(&name);
        Some(Job::Reread(name))
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.queue().order.len()
    }
}

struct Overflow;

/// Where the LISTEN connection's driver puts what it receives.
pub(super) struct Sink {
    cache: Arc<VerifierCache>,
    interest: Interest,
    /// Told once when the connection ends, with why.
    closed: Option<tokio::sync::oneshot::Sender<String>>,
}

impl VerifierCache {
    /// One notification's payload, from the LISTEN connection's driver: never blocks,
    /// never grows anything past its bound.
    fn notice(&self, payload: &str, interest: &Interest) {
        let c = &self.counters;
        if payload.is_empty() || payload.len() > MAX_NAME {
            c.notify_ignored.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let known = {
            let mut state = self.state();
            // A name not found before may exist now (a new app): ask again next time.
            state.missing.remove(payload);
            Self::is_known(&state, payload)
        };
        if !known && !interest(payload) {
            c.notify_ignored.fetch_add(1, Ordering::Relaxed);
            return;
        }
        // Logins from now on read the row again, even before the re-read below.
        self.invalidate(payload);
        match self.notices.push(payload) {
            Ok(true) => c.notify_queued.fetch_add(1, Ordering::Relaxed),
            Ok(false) => c.notify_coalesced.fetch_add(1, Ordering::Relaxed),
            Err(Overflow) => c.notify_overflows.fetch_add(1, Ordering::Relaxed),
        };
    }

    /// Keeps a `LISTEN dataplane_auth` connection up until `shutdown` fires; each role
    /// a notification names is re-read, and a [`Change`] published when it matters.
    pub async fn run_listener(
        self: Arc<Self>,
        mut shutdown: tokio::sync::watch::Receiver<bool>,
        interest: Interest,
    ) {
        let mut backoff = Duration::from_millis(100);
        loop {
            if *shutdown.borrow() {
                return;
            }
            match self.listen_once(&mut shutdown, &interest).await {
                Ok(()) => return,
                Err(e) => {
                    self.listening.store(false, Ordering::Relaxed);
                    tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "auth LISTEN connection lost");
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = shutdown.changed() => return,
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }

    async fn listen_once(
        self: &Arc<Self>,
        shutdown: &mut tokio::sync::watch::Receiver<bool>,
        interest: &Interest,
    ) -> Result<(), String> {
        let (closed_tx, mut closed) = tokio::sync::oneshot::channel();
        let sink = Sink {
            cache: self.clone(),
            interest: interest.clone(),
            closed: Some(closed_tx),
        };
        let (client, driver) = self.open(Some(sink), "dataplane-pooler-auth").await?;
        let result = async {
            client
                .batch_execute("LISTEN dataplane_auth")
                .await
                .map_err(|e| e.to_string())?;
            // Anything cached may have changed while we were not listening.
            self.expire_all();
            let _ = self.changes.send(Change::Resync);
            self.listening.store(true, Ordering::Relaxed);
            tracing::info!("listening for credential changes");
            loop {
                let woken = self.notices.wake.notified();
                tokio::pin!(woken);
                woken.as_mut().enable();
                while let Some(job) = self.notices.pop() {
                    tokio::select! {
                        _ = self.run_job(job) => {}
                        _ = shutdown.changed() => return Ok(()),
                    }
                }
                tokio::select! {
                    _ = woken => {}
                    why = &mut closed => {
                        return Err(why.unwrap_or_else(|_| "connection closed".into()));
                    }
                    _ = shutdown.changed() => return Ok(()),
                }
            }
        }
        .await;
        driver.abort();
        result
    }

    async fn run_job(&self, job: Job) {
        match job {
            Job::Reread(role) => self.on_notify(&role).await,
            Job::Resync => {
                tracing::warn!(
                    "more credential changes queued than auth_notify_queue; re-reading every role"
                );
                self.expire_all();
                let _ = self.changes.send(Change::Resync);
            }
        }
    }

    async fn on_notify(&self, role: &str) {
        let before = self.state().found.peek(role).map(|f| f.auth.clone());
        let after = match self.reread(role).await {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(role, error = %e, "re-reading a changed role failed");
                return;
            }
        };
        let role: Arc<str> = after.role.clone();
        if after.status != Status::Ok {
            if before.is_some() {
                tracing::info!(role = %role, status = after.status.as_str(), "role revoked");
            }
            let _ = self.changes.send(Change::Revoked(role));
        } else if before.is_none_or(|b| b.generation != after.generation) {
            let _ = self.changes.send(Change::Rotated {
                role,
                generation: after.generation,
            });
        }
    }
}

/// Drives a connection until it ends, passing notifications to `sink`.
pub(super) async fn drive<S, T>(
    mut connection: tokio_postgres::Connection<S, T>,
    mut sink: Option<Sink>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
    let mut why = "connection closed".to_owned();
    while let Some(msg) = messages.next().await {
        match msg {
            Ok(tokio_postgres::AsyncMessage::Notification(n)) => {
                if let Some(s) = &sink {
                    s.cache.notice(n.payload(), &s.interest);
                }
            }
            Ok(_) => {}
            Err(e) => {
                why = e.to_string();
                break;
            }
        }
    }
    if let Some(tx) = sink.as_mut().and_then(|s| s.closed.take()) {
        let _ = tx.send(why);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_queued_once_and_an_overflow_asks_for_everything() {
        let n = Notices::new(3);
        assert_eq!(n.push("a").ok(), Some(true));
        assert_eq!(n.push("a").ok(), Some(false), "a duplicate while it waits");
        assert_eq!(n.push("b").ok(), Some(true));
        assert!(matches!(n.pop(), Some(Job::Reread(r)) if &*r == "a"));
        assert_eq!(n.push("a").ok(), Some(true), "read since: queued again");
        assert_eq!(n.push("c").ok(), Some(true));
        assert!(n.push("d").is_err());
        assert_eq!(n.len(), 0, "dropped whole");
        assert!(matches!(n.pop(), Some(Job::Resync)));
        assert!(n.pop().is_none());
    }
}
