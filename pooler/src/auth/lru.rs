//! A map bounded by its number of entries that, when full, forgets the entry used least
//! recently: one at a time, never the whole map. Every map whose keys come from clients
//! (role names, client addresses) is one of these, so a spray of made-up keys costs a
//! bounded amount of memory and pushes out only entries nobody used since.

use std::borrow::Borrow;
use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, HashMap};
use std::hash::Hash;

#[derive(Debug)]
pub struct Lru<K, V> {
    map: HashMap<K, (V, u64)>,
    /// Use stamps, oldest first: the next to evict is the first.
    order: BTreeMap<u64, K>,
    clock: u64,
    cap: usize,
}

impl<K: Hash + Eq + Clone, V> Lru<K, V> {
    /// At most `cap` entries (at least one).
    pub fn new(cap: usize) -> Self {
        Lru {
            map: HashMap::new(),
            order: BTreeMap::new(),
            clock: 0,
            cap: cap.max(1),
        }
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    fn stamp(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }

    /// The entry, marked as just used.
    pub fn get<Q>(&mut self, key: &Q) -> Option<&mut V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let now = self.stamp();
        let (k, (_, used)) = self.map.get_key_value(key)?;
        let (k, old) = (k.clone(), *used);
        self.order.remove(&old);
        self.order.insert(now, k);
        let (value, used) = self.map.get_mut(key)?;
        *used = now;
        Some(value)
    }

    /// The entry, without marking it used.
    pub fn peek<Q>(&self, key: &Q) -> Option<&V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.map.get(key).map(|(v, _)| v)
    }

    pub fn contains<Q>(&self, key: &Q) -> bool
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.map.contains_key(key)
    }

    /// Inserts or replaces `key`, marked as just used; returns the entry evicted to
    /// make room, if any.
    pub fn insert(&mut self, key: K, value: V) -> Option<(K, V)> {
        let now = self.stamp();
        if let Some((_, old)) = self.map.insert(key.clone(), (value, now)) {
            self.order.remove(&old);
            self.order.insert(now, key);
            return None;
        }
        self.order.insert(now, key);
        if self.map.len() <= self.cap {
            return None;
        }
        let (_, oldest) = self.order.pop_first()?;
        self.map.remove(&oldest).map(|(v, _)| (oldest, v))
    }

    pub fn remove<Q>(&mut self, key: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let (value, used) = self.map.remove(key)?;
        self.order.remove(&used);
        Some(value)
    }

    /// The entry for `key`, made with `make` (and marked used) if it is missing.
    pub fn get_or_insert_with(&mut self, key: K, make: impl FnOnce() -> V) -> &mut V {
        if !self.map.contains_key(&key) && self.map.len() >= self.cap {
            if let Some((_, oldest)) = self.order.pop_first() {
                self.map.remove(&oldest);
            }
        }
        let now = self.stamp();
        let order = &mut self.order;
        match self.map.entry(key.clone()) {
            Entry::Occupied(e) => {
                let entry = e.into_mut();
                order.remove(&std::mem::replace(&mut entry.1, now));
                order.insert(now, key);
                &mut entry.0
            }
            Entry::Vacant(e) => {
                order.insert(now, key);
                &mut e.insert((make(), now)).0
            }
        }
    }

    /// Every value, in no particular order, without marking any used.
    pub fn values_mut(&mut self) -> impl Iterator<Item = &mut V> {
        self.map.values_mut().map(|(v, _)| v)
    }

    pub fn clear(&mut self) {
        self.map.clear();
        self.order.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_least_recently_used_entry_goes_first_and_only_it() {
        let mut lru = Lru::new(3);
        for k in ["a", "b", "c"] {
            assert!(lru.insert(k, k.len()).is_none());
        }
        lru.get("a");
        assert_eq!(lru.insert("d", 1).map(|(k, _)| k), Some("b"));
        assert!(lru.contains("a") && lru.contains("c") && lru.contains("d"));
        assert_eq!(lru.len(), 3);
        *lru.get_or_insert_with("e", || 7) += 1;
        assert_eq!(lru.peek("e"), Some(&8));
        assert!(!lru.contains("c"), "c was the oldest");
        assert_eq!(lru.remove("a"), Some(1));
        assert_eq!(lru.len(), 2);
    }

    #[test]
    fn a_flood_of_new_keys_keeps_the_entries_in_use() {
        let mut lru = Lru::new(100);
        lru.insert(u64::MAX, ());
        for k in 0..100_000u64 {
            lru.insert(k, ());
            // The entry in use is used between every two new keys.
            assert!(lru.get(&u64::MAX).is_some(), "evicted at {k}");
        }
        assert_eq!(lru.len(), 100);
    }
}
