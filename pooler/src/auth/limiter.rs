//! Failed-login throttling per role and per client address: an attacker guessing
//! passwords gets a fixed number of tries a minute, whether the role exists or not.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

const WINDOW: Duration = Duration::from_secs(60);
/// Past this many tracked keys, expired windows are swept (bounds memory under a
/// spray of random role names).
const SWEEP_AT: usize = 10_000;

struct Window<K> {
    counts: HashMap<K, (Instant, u32)>,
}

impl<K: Hash + Eq + Clone> Window<K> {
    fn over(&self, key: &K, limit: u32, now: Instant) -> bool {
        matches!(self.counts.get(key), Some((start, n)) if now.duration_since(*start) < WINDOW && *n >= limit)
    }

    fn fail(&mut self, key: &K, now: Instant) {
        if self.counts.len() >= SWEEP_AT {
            self.counts
                .retain(|_, (start, _)| now.duration_since(*start) < WINDOW);
        }
        let entry = self.counts.entry(key.clone()).or_insert((now, 0));
        if now.duration_since(entry.0) >= WINDOW {
            *entry = (now, 0);
        }
        entry.1 = entry.1.saturating_add(1);
    }
}

/// The unit a client controls: one IPv4 address, or an IPv6 /64 (a host gets a
/// whole /64 and could otherwise rotate through it).
fn source(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V4(_) => addr,
        IpAddr::V6(v6) => {
            let s = v6.segments();
            IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
        }
    }
}

pub struct AuthLimiter {
    per_role: u32,
    per_address: u32,
    roles: Mutex<Window<String>>,
    addresses: Mutex<Window<IpAddr>>,
}

impl AuthLimiter {
    pub fn new(per_role: u32, per_address: u32) -> Self {
        AuthLimiter {
            per_role,
            per_address,
            roles: Mutex::new(Window {
                counts: HashMap::new(),
            }),
            addresses: Mutex::new(Window {
                counts: HashMap::new(),
            }),
        }
    }

    /// Whether another attempt for `role` from `addr` is refused outright.
    pub fn throttled(&self, role: &str, addr: IpAddr, now: Instant) -> bool {
        let role_over = self.roles.lock().unwrap_or_else(|p| p.into_inner()).over(
            &role.to_owned(),
            self.per_role,
            now,
        );
        role_over
            || self
                .addresses
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .over(&source(addr), self.per_address, now)
    }

    pub fn failed(&self, role: &str, addr: IpAddr, now: Instant) {
        self.roles
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .fail(&role.to_owned(), now);
        self.addresses
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .fail(&source(addr), now);
    }
}

/// Counts every attempt (not only failures) per client address, with the same
/// window and address unit as [`AuthLimiter`]: for requests that cost the pooler
/// work on someone else's behalf, such as forwarding a cancel to another replica.
pub struct PerAddress {
    limit: u32,
    addresses: Mutex<Window<IpAddr>>,
}

impl PerAddress {
    pub fn new(limit: u32) -> Self {
        PerAddress {
            limit,
            addresses: Mutex::new(Window {
                counts: HashMap::new(),
            }),
        }
    }

    /// Whether one more request from `addr` is allowed now; an allowed one counts.
    pub fn allow(&self, addr: IpAddr, now: Instant) -> bool {
        let mut w = self.addresses.lock().unwrap_or_else(|p| p.into_inner());
        let key = source(addr);
        if w.over(&key, self.limit, now) {
            return false;
        }
        w.fail(&key, now);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn throttles_after_the_limit_and_forgets_after_a_minute() {
        let l = AuthLimiter::new(3, 5);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let t0 = Instant::now();
        for _ in 0..3 {
            assert!(!l.throttled("r", a, t0));
            l.failed("r", a, t0);
        }
        assert!(l.throttled("r", a, t0), "per role");
        assert!(l.throttled("r", b, t0), "per role, any address");
        assert!(!l.throttled("other", b, t0));
        for i in 0..5 {
            l.failed(&format!("x{i}"), b, t0);
        }
        assert!(l.throttled("fresh", b, t0), "per address");
        assert!(!l.throttled("r", a, t0 + WINDOW));
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
