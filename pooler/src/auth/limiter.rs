//! Failed-login throttling that cannot lock a role out.
//!
//! Failures are counted per **source** (the client's IPv4 address, or its IPv6 /64:
//! a host gets a whole /64 and could otherwise rotate through it) and per **(role,
//! source)**, over one-minute windows. Never per role alone: then strangers' wrong
//! guesses would refuse the role's right password from everywhere. A source that has
//! not failed always gets to try.
//!
//! An attempt is recorded before its exchange ([`AuthLimiter::admit`]), as in flight,
//! and settled after it: a success takes it back, a failure counts. In-flight attempts
//! count against the limits, so a thousand guesses sent in parallel are no more than the
//! limit allows; an attempt that would exceed a limit only because of attempts still in
//! flight waits for one to settle (so a pod opening fifty connections at once is slowed,
//! never refused).
//!
//! Both maps are bounded ([`Lru`]: the least recently used entry goes), keyed by what a
//! client controls the least: its source, and its source with the role name it asked
//! for (cut to PostgreSQL's 63 bytes).

use std::net::{IpAddr, Ipv6Addr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::lru::Lru;

/// Failures are forgotten a minute after the first of a window.
const WINDOW: Duration = Duration::from_secs(60);

/// PostgreSQL's longest identifier (NAMEDATALEN - 1): longer names are unknown roles,
/// and count under their first 63 bytes.
pub const MAX_NAME: usize = 63;

/// The limits, from the configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// `auth_failures_per_address_per_minute`.
    pub per_source: u32,
    /// `auth_failures_per_role_per_address_per_minute`.
    pub per_role_source: u32,
    /// `auth_throttle_max_entries`: entries kept per map.
    pub max_entries: usize,
}

/// The unit a client controls: one IPv4 address, or an IPv6 /64.
pub fn source(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V4(_) => addr,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

/// A role name as a key: at most [`MAX_NAME`] bytes (on a character boundary).
fn role_key(role: &str) -> Box<str> {
    let mut end = role.len().min(MAX_NAME);
    while !role.is_char_boundary(end) {
        end -= 1;
    }
    role[..end].into()
}

#[derive(Debug, Clone, Copy)]
struct Window {
    start: Instant,
    failures: u32,
    in_flight: u32,
}

impl Window {
    fn new(now: Instant) -> Self {
        Window {
            start: now,
            failures: 0,
            in_flight: 0,
        }
    }

    fn refresh(&mut self, now: Instant) {
        if now.saturating_duration_since(self.start) >= WINDOW {
            self.start = now;
            self.failures = 0;
        }
    }
}

struct Maps {
    sources: Lru<IpAddr, Window>,
    pairs: Lru<(Box<str>, IpAddr), Window>,
}

/// What [`AuthLimiter::try_admit`] decided.
#[derive(Debug, PartialEq, Eq)]
pub enum Admission {
    /// Recorded as in flight: settle it.
    Go,
    /// Over a limit only counting attempts in flight: try again when one settles.
    Wait,
    /// Over a limit on failures alone.
    Throttled,
}

/// The limiter refused the attempt: too many failures from its source.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("too many failed login attempts; try again in a minute")]
pub struct Throttled;

pub struct AuthLimiter {
    limits: Limits,
    maps: Mutex<Maps>,
    /// Woken whenever an attempt settles.
    settled: tokio::sync::Notify,
}

impl AuthLimiter {
    pub fn new(limits: Limits) -> Self {
        AuthLimiter {
            limits,
            maps: Mutex::new(Maps {
                sources: Lru::new(limits.max_entries),
                pairs: Lru::new(limits.max_entries),
            }),
            settled: tokio::sync::Notify::new(),
        }
    }

    fn maps(&self) -> std::sync::MutexGuard<'_, Maps> {
        self.maps.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records an attempt for `role` from `addr` as in flight, if the limits allow it.
    pub fn try_admit(&self, role: &str, addr: IpAddr, now: Instant) -> Admission {
        let source = source(addr);
        let mut maps = self.maps();
        let Maps { sources, pairs } = &mut *maps;
        let s = sources.get_or_insert_with(source, || Window::new(now));
        s.refresh(now);
        let p = pairs.get_or_insert_with((role_key(role), source), || Window::new(now));
        p.refresh(now);
        let (s, p) = (*s, *p);
        let (ls, lp) = (self.limits.per_source, self.limits.per_role_source);
        if s.failures >= ls || p.failures >= lp {
            return Admission::Throttled;
        }
        if s.failures + s.in_flight >= ls || p.failures + p.in_flight >= lp {
            return Admission::Wait;
        }
        for w in [sources.get(&source), pairs.get(&(role_key(role), source))]
            .into_iter()
            .flatten()
        {
            w.in_flight += 1;
        }
        Admission::Go
    }

    /// Records an attempt, waiting (until `deadline`) while it would exceed a limit only
    /// because of attempts in flight. Cancel-safe: nothing is recorded until it returns.
    pub async fn admit(
        &self,
        role: &str,
        addr: IpAddr,
        deadline: tokio::time::Instant,
    ) -> Result<Attempt<'_>, AdmitError> {
        loop {
            // Registered before looking, so a settle between the look and the wait
            // still wakes this one.
            let settled = self.settled.notified();
            tokio::pin!(settled);
            settled.as_mut().enable();
            match self.try_admit(role, addr, Instant::now()) {
                Admission::Go => {
                    return Ok(Attempt {
                        limiter: self,
                        role: role_key(role),
                        source: source(addr),
                        settled: false,
                    });
                }
                Admission::Throttled => return Err(AdmitError::Throttled),
                Admission::Wait => {
                    if tokio::time::timeout_at(deadline, settled).await.is_err() {
                        return Err(AdmitError::TimedOut);
                    }
                }
            }
        }
    }

    /// Takes an in-flight attempt back; a failure counts.
    pub fn settle(&self, role: &str, addr: IpAddr, failed: bool, now: Instant) {
        let source = source(addr);
        {
            let mut maps = self.maps();
            let Maps { sources, pairs } = &mut *maps;
            let key = (role_key(role), source);
            for w in [sources.get(&source), pairs.get(&key)]
                .into_iter()
                .flatten()
            {
                w.in_flight = w.in_flight.saturating_sub(1);
                if failed {
                    w.refresh(now);
                    w.failures = w.failures.saturating_add(1);
                }
            }
        }
        self.settled.notify_waiters();
    }

    /// Entries held, per map (sources, (role, source) pairs).
    pub fn len(&self) -> (usize, usize) {
        let maps = self.maps();
        (maps.sources.len(), maps.pairs.len())
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AdmitError {
    #[error("too many failed login attempts; try again in a minute")]
    Throttled,
    #[error("login not completed within client_login_timeout")]
    TimedOut,
}

/// One login attempt in flight. Settle it with [`Attempt::succeeded`],
/// [`Attempt::failed`] or [`Attempt::withdrawn`]; dropped unsettled (the client left
/// mid-exchange, or broke the protocol) it counts as failed.
pub struct Attempt<'a> {
    limiter: &'a AuthLimiter,
    role: Box<str>,
    source: IpAddr,
    settled: bool,
}

impl Attempt<'_> {
    /// The right password: the attempt is taken back.
    pub fn succeeded(mut self) {
        self.settle(false);
    }

    /// A wrong password (or an unknown role): it counts.
    pub fn failed(mut self) {
        self.settle(true);
    }

    /// Ended for a reason of the pooler's (the lookup failed, a limit, shutdown): taken
    /// back without counting.
    pub fn withdrawn(mut self) {
        self.settle(false);
    }

    fn settle(&mut self, failed: bool) {
        if !std::mem::replace(&mut self.settled, true) {
            self.limiter
                .settle(&self.role, self.source, failed, Instant::now());
        }
    }
}

impl Drop for Attempt<'_> {
    fn drop(&mut self) {
        self.settle(true);
    }
}

/// Counts every attempt (not only failures) per client address, with the same
/// window and address unit as [`AuthLimiter`]: for requests that cost the pooler
/// work on someone else's behalf, such as forwarding a cancel to another replica.
pub struct PerAddress {
    limit: u32,
    /// Counts per source, the least recently used forgotten first past
    /// [`PER_ADDRESS_MAX_ENTRIES`].
    addresses: Mutex<Lru<IpAddr, Window>>,
}

/// Sources [`PerAddress`] remembers.
const PER_ADDRESS_MAX_ENTRIES: usize = 100_000;

impl PerAddress {
    pub fn new(limit: u32) -> Self {
        PerAddress {
            limit,
            addresses: Mutex::new(Lru::new(PER_ADDRESS_MAX_ENTRIES)),
        }
    }

    /// Whether one more request from `addr` is allowed now; an allowed one counts.
    pub fn allow(&self, addr: IpAddr, now: Instant) -> bool {
        let mut addresses = self.addresses.lock().unwrap_or_else(|p| p.into_inner());
        let w = addresses.get_or_insert_with(source(addr), || Window::new(now));
        w.refresh(now);
        if w.failures >= self.limit {
            return false;
        }
        w.failures = w.failures.saturating_add(1);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(per_source: u32, per_role_source: u32) -> AuthLimiter {
        AuthLimiter::new(Limits {
            per_source,
            per_role_source,
            max_entries: 1000,
        })
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn strangers_failures_never_refuse_the_right_password_from_elsewhere() {
        let l = limiter(50, 20);
        let (attacker, app) = (ip("127.0.0.2"), ip("127.0.0.1"));
        let t0 = Instant::now();
        for _ in 0..40 {
            if l.try_admit("app", attacker, t0) == Admission::Go {
                l.settle("app", attacker, true, t0);
            }
        }
        assert_eq!(l.try_admit("app", attacker, t0), Admission::Throttled);
        assert_eq!(l.try_admit("app", app, t0), Admission::Go, "another source");
        l.settle("app", app, false, t0);
        // The attacker's source is throttled for every role once over its own limit.
        for i in 0..50 {
            if l.try_admit(&format!("r{i}"), attacker, t0) == Admission::Go {
                l.settle(&format!("r{i}"), attacker, true, t0);
            }
        }
        assert_eq!(l.try_admit("fresh", attacker, t0), Admission::Throttled);
        // A minute later the window is fresh.
        assert_eq!(l.try_admit("app", attacker, t0 + WINDOW), Admission::Go);
    }

    #[test]
    fn parallel_attempts_count_before_they_finish_and_successes_are_taken_back() {
        let l = limiter(50, 3);
        let a = ip("10.0.0.1");
        let t0 = Instant::now();
        for _ in 0..3 {
            assert_eq!(l.try_admit("r", a, t0), Admission::Go);
        }
        // Three in flight: a fourth waits rather than racing them.
        assert_eq!(l.try_admit("r", a, t0), Admission::Wait);
        l.settle("r", a, false, t0);
        assert_eq!(
            l.try_admit("r", a, t0),
            Admission::Go,
            "a success made room"
        );
        for _ in 0..3 {
            l.settle("r", a, true, t0);
        }
        assert_eq!(l.try_admit("r", a, t0), Admission::Throttled);
    }

    #[test]
    fn ipv6_counts_per_64_and_mapped_ipv4_as_ipv4() {
        assert_eq!(source(ip("2001:db8:1:2:3:4:5:6")), ip("2001:db8:1:2::"));
        assert_eq!(source(ip("::ffff:10.1.2.3")), ip("10.1.2.3"));
        let l = limiter(2, 100);
        let t0 = Instant::now();
        for host in ["2001:db8::1", "2001:db8::2"] {
            assert_eq!(l.try_admit(host, ip(host), t0), Admission::Go);
            l.settle(host, ip(host), true, t0);
        }
        assert_eq!(
            l.try_admit("x", ip("2001:db8::3"), t0),
            Admission::Throttled
        );
        assert_eq!(l.try_admit("x", ip("2001:db8:0:1::3"), t0), Admission::Go);
    }

    #[test]
    fn maps_are_bounded_and_long_names_share_a_key() {
        let l = AuthLimiter::new(Limits {
            per_source: 1_000_000,
            per_role_source: 5,
            max_entries: 100,
        });
        let t0 = Instant::now();
        let long = "x".repeat(10_000);
        for i in 0..5 {
            assert_eq!(
                l.try_admit(&format!("{long}{i}"), ip("10.0.0.1"), t0),
                Admission::Go
            );
            l.settle(&format!("{long}{i}"), ip("10.0.0.1"), true, t0);
        }
        assert_eq!(l.try_admit(&long, ip("10.0.0.1"), t0), Admission::Throttled);
        for i in 0..10_000u32 {
            let addr = IpAddr::from(i.to_be_bytes());
            if l.try_admit("r", addr, t0) == Admission::Go {
                l.settle("r", addr, true, t0);
            }
        }
        let (sources, pairs) = l.len();
        assert!(sources <= 100 && pairs <= 100, "{sources} {pairs}");
    }

    #[tokio::test]
    async fn an_attempt_waits_for_one_in_flight_and_a_dropped_one_counts() {
        let l = limiter(50, 1);
        let a = ip("10.0.0.9");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        let first = l.admit("r", a, deadline).await.unwrap();
        let waiting = l.admit("r", a, deadline);
        tokio::pin!(waiting);
        assert!(
            futures_util::poll!(&mut waiting).is_pending(),
            "must wait for the first"
        );
        first.succeeded();
        let second = waiting.await.unwrap();
        drop(second);
        assert_eq!(
            l.admit("r", a, deadline).await.err(),
            Some(AdmitError::Throttled),
            "dropped mid-exchange: a failure"
        );
    }

    #[test]
    fn per_address_counts_every_request() {
        let l = PerAddress::new(2);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "fd00::1".parse().unwrap();
        let b_too: IpAddr = "fd00::2".parse().unwrap();
        let t0 = Instant::now();
        assert!(l.allow(a, t0) && l.allow(a, t0));
        assert!(!l.allow(a, t0));
        assert!(l.allow(b, t0) && l.allow(b_too, t0));
        assert!(!l.allow(b, t0), "one /64 is one source");
        assert!(l.allow(a, t0 + WINDOW));
    }
}
