//! Who sent a notification: the role of the backend whose process id a
//! NotificationResponse carries. Channels are per database and every app shares the
//! database, so this is what keeps app B from hearing app A: a client gets only what
//! sessions of its own role sent.
//!
//! The pooler's own servers answer first (the registry knows each one's pid and role,
//! for exactly as long as it is open). Any other pid is looked up in
//! `pg_stat_activity` (which shows every session's user to every role), and the answer
//! is cached for a while, bounded in entries. A pid that is not there (the sender has
//! gone, or is not a client session) is "unknown", and its notifications are dropped:
//! the safe side.
//!
//! A cached answer can outlive its backend, and Linux may give the pid to a new backend
//! of another role; the TTL bounds that window, and pids are reused only after the
//! kernel has cycled through `pid_max` of them.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;

use crate::registry::{Registry, ServerInfo};

/// How long a pid found in `pg_stat_activity` keeps its role here.
pub const KNOWN_TTL: Duration = Duration::from_secs(30);
/// How long a pid that was not found stays unknown: short, but it keeps a flood from
/// one departed sender to one lookup per this long.
pub const UNKNOWN_TTL: Duration = Duration::from_secs(5);
/// Foreign pids remembered at most; the oldest answers go first.
pub const MAX_CACHED: usize = 10_000;
/// A lookup that takes longer fails (its notifications are dropped, and logged).
pub const LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);

/// Finds the roles of backends by pid: `pg_stat_activity`, in production.
pub trait LookupPids: Send + Sync + 'static {
    /// `(pid, role)` for each of `pids` that is a session now; pids not returned are not.
    fn roles(&self, pids: Vec<i32>) -> BoxFuture<'static, Result<Vec<(i32, String)>, String>>;
}

/// `pg_stat_activity` through the pooler's auth connections.
pub struct PgStatActivity(pub Arc<crate::auth::cache::VerifierCache>);

impl LookupPids for PgStatActivity {
    fn roles(&self, pids: Vec<i32>) -> BoxFuture<'static, Result<Vec<(i32, String)>, String>> {
        let cache = self.0.clone();
        Box::pin(async move { cache.backend_roles(&pids).await.map_err(|e| e.to_string()) })
    }
}

/// The cache of foreign pids (pure: time passed in).
#[derive(Debug, Default)]
pub struct SenderCache {
    /// Role (or not a session), fresh until, insertion number.
    entries: HashMap<i32, (Option<Arc<str>>, Instant, u64)>,
    /// Insertion order, for eviction; entries replaced since are skipped.
    order: VecDeque<(i32, u64)>,
    inserted: u64,
}

impl SenderCache {
    /// `Some(role or None)` while an answer for `pid` is fresh; `None` when it must be
    /// looked up.
    pub fn get(&self, pid: i32, now: Instant) -> Option<Option<Arc<str>>> {
        let (role, until, _) = self.entries.get(&pid)?;
        (now < *until).then(|| role.clone())
    }

    pub fn insert(&mut self, pid: i32, role: Option<Arc<str>>, now: Instant) {
        let ttl = if role.is_some() {
            KNOWN_TTL
        } else {
            UNKNOWN_TTL
        };
        while self.entries.len() >= MAX_CACHED && !self.entries.contains_key(&pid) {
            let Some((old, seq)) = self.order.pop_front() else {
                break;
            };
            if self.entries.get(&old).is_some_and(|e| e.2 == seq) {
                self.entries.remove(&old);
            }
        }
        self.inserted += 1;
        self.entries.insert(pid, (role, now + ttl, self.inserted));
        self.order.push_back((pid, self.inserted));
        if self.order.len() > 2 * MAX_CACHED {
            // Re-inserted pids left stale numbers behind: keep only the live ones (at
            // most MAX_CACHED, so this runs once per MAX_CACHED inserts at most).
            let entries = &self.entries;
            self.order
                .retain(|(p, seq)| entries.get(p).is_some_and(|e| e.2 == *seq));
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// What every notification is checked against before a client sees it.
pub struct Senders {
    own: Arc<Registry<ServerInfo>>,
    cache: Mutex<SenderCache>,
    lookup: Arc<dyn LookupPids>,
    /// One lookup at a time: a storm of notifications from unknown pids costs one query
    /// per batch of them, not one per notification.
    looking: tokio::sync::Mutex<()>,
}

impl Senders {
    pub fn new(own: Arc<Registry<ServerInfo>>, lookup: Arc<dyn LookupPids>) -> Senders {
        Senders {
            own,
            cache: Mutex::new(SenderCache::default()),
            lookup,
            looking: tokio::sync::Mutex::new(()),
        }
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, SenderCache> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The sender's role if it is known now without asking Postgres: `Some(None)` for a
    /// pid known not to be a session, `None` when [`Senders::resolve`] must look.
    pub fn known(&self, pid: i32) -> Option<Option<Arc<str>>> {
        if let Some(role) = self
            .own
            .find_map(|s| (s.remote_pid == pid).then(|| s.role.clone()))
        {
            return Some(Some(role));
        }
        self.cache().get(pid, Instant::now())
    }

    /// Whether a notification from `pid` may go to a client of `role`, asking
    /// Postgres if needed (bounded by [`LOOKUP_TIMEOUT`]). Unknown senders are refused.
    pub async fn is_own(&self, pid: i32, role: &str) -> bool {
        if let Some(known) = self.known(pid) {
            return known.as_deref() == Some(role);
        }
        self.resolve(&[pid]).await;
        self.known(pid).flatten().as_deref() == Some(role)
    }

    /// Looks up every pid of `pids` that is not known yet, in one query.
    pub async fn resolve(&self, pids: &[i32]) {
        let _one = self.looking.lock().await;
        // Another task may have looked them up while this one waited.
        let mut wanted: Vec<i32> = pids
            .iter()
            .copied()
            .filter(|&p| self.known(p).is_none())
            .collect();
        wanted.sort_unstable();
        wanted.dedup();
        if wanted.is_empty() {
            return;
        }
        let found =
            match tokio::time::timeout(LOOKUP_TIMEOUT, self.lookup.roles(wanted.clone())).await {
                Ok(Ok(found)) => found,
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "looking up the senders of notifications failed");
                    return;
                }
                Err(_) => {
                    tracing::warn!("looking up the senders of notifications timed out");
                    return;
                }
            };
        let now = Instant::now();
        let mut cache = self.cache();
        for pid in wanted {
            let role = found
                .iter()
                .find(|(p, _)| *p == pid)
                .map(|(_, r)| Arc::<str>::from(r.as_str()));
            cache.insert(pid, role, now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn answers_expire_and_unknown_ones_sooner() {
        let mut c = SenderCache::default();
        let t0 = Instant::now();
        c.insert(10, Some(Arc::from("tk_a")), t0);
        c.insert(11, None, t0);
        assert_eq!(c.get(10, t0).unwrap().as_deref(), Some("tk_a"));
        assert_eq!(c.get(11, t0), Some(None));
        assert_eq!(c.get(12, t0), None);
        let later = t0 + UNKNOWN_TTL;
        assert!(c.get(10, later).is_some());
        assert_eq!(c.get(11, later), None, "unknown pids are asked again");
        assert_eq!(c.get(10, t0 + KNOWN_TTL), None);
    }

    #[test]
    fn the_cache_is_bounded_and_evicts_the_oldest() {
        let mut c = SenderCache::default();
        let t0 = Instant::now();
        for pid in 0..(MAX_CACHED as i32 + 5) {
            c.insert(pid, None, t0);
        }
        assert_eq!(c.len(), MAX_CACHED);
        assert_eq!(c.get(0, t0), None);
        assert_eq!(c.get(MAX_CACHED as i32 + 4, t0), Some(None));
        // Re-inserting the same pid many times keeps the order list bounded too.
        for _ in 0..(3 * MAX_CACHED) {
            c.insert(7, Some(Arc::from("tk_x")), t0);
        }
        assert!(c.order.len() <= 2 * MAX_CACHED + 1);
        assert_eq!(c.len(), MAX_CACHED);
    }

    struct Fake {
        calls: AtomicUsize,
    }

    impl LookupPids for Fake {
        fn roles(&self, pids: Vec<i32>) -> BoxFuture<'static, Result<Vec<(i32, String)>, String>> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            Box::pin(async move {
                Ok(pids
                    .into_iter()
                    .filter(|p| *p < 100)
                    .map(|p| (p, format!("tk_{p}")))
                    .collect())
            })
        }
    }

    #[tokio::test]
    async fn own_servers_answer_first_and_foreign_pids_are_looked_up_once() {
        let own: Arc<Registry<ServerInfo>> = Arc::default();
        let _server = own
            .register(
                1,
                ServerInfo {
                    id: 1,
                    role: Arc::from("tk_own"),
                    connected_at: std::time::SystemTime::now(),
                    remote_pid: 500,
                    local: None,
                    tls: String::new(),
                    listener: Default::default(),
                },
                usize::MAX,
            )
            .unwrap();
        let fake = Arc::new(Fake {
            calls: AtomicUsize::new(0),
        });
        let senders = Senders::new(own, fake.clone());
        assert!(senders.is_own(500, "tk_own").await);
        assert_eq!(fake.calls.load(Ordering::SeqCst), 0, "no query for our own");
        assert!(senders.is_own(7, "tk_7").await);
        assert!(!senders.is_own(7, "tk_8").await);
        assert!(
            !senders.is_own(700, "tk_700").await,
            "not a session: refused"
        );
        assert!(!senders.is_own(700, "tk_700").await);
        assert_eq!(fake.calls.load(Ordering::SeqCst), 2, "answers are cached");
        senders.resolve(&[1, 2, 3, 7]).await;
        assert_eq!(
            fake.calls.load(Ordering::SeqCst),
            3,
            "one query for a batch"
        );
        assert_eq!(senders.known(3), Some(Some(Arc::from("tk_3"))));
    }
}
