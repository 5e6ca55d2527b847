//! A generational slab and an intrusive doubly linked list threaded through it.
//!
//! The scheduler keeps servers and waiters here so that every id resolves in O(1) and a
//! stale id (a server already closed, a waiter already served) is detected by its
//! generation instead of aliasing a newer entry. The intrusive list gives O(1) removal
//! from the middle, which a waiter that gives up and an idle server taken LIFO both need,
//! without allocating a node per entry.

/// Index plus generation; only equal to a key handed out for the same live entry.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub(crate) struct Key {
    idx: u32,
    generation: u32,
}

impl Key {
    /// The slot index: stable while the entry lives, reused after removal.
    pub(crate) fn index(self) -> u32 {
        self.idx
    }
}

enum Slot<T> {
    Occupied(T),
    Vacant { next_free: Option<u32> },
}

struct Entry<T> {
    generation: u32,
    slot: Slot<T>,
}

pub(crate) struct Slab<T> {
    entries: Vec<Entry<T>>,
    free: Option<u32>,
    len: usize,
}

impl<T> Default for Slab<T> {
    fn default() -> Self {
        Self {
            entries: Vec::new(),
            free: None,
            len: 0,
        }
    }
}

impl<T> Slab<T> {
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn insert(&mut self, value: T) -> Key {
        self.len += 1;
        if let Some(idx) = self.free {
            if let Some(entry) = self.entries.get_mut(idx as usize) {
                if let Slot::Vacant { next_free } = entry.slot {
                    self.free = next_free;
                    entry.slot = Slot::Occupied(value);
                    return Key {
                        idx,
                        generation: entry.generation,
                    };
                }
            }
        }
        // Slot count is bounded by the live entries (budget-sized for servers), far below
        // u32::MAX; saturating keeps this panic-free without a fallible insert.
        let idx = u32::try_from(self.entries.len()).unwrap_or(u32::MAX);
        self.entries.push(Entry {
            generation: 0,
            slot: Slot::Occupied(value),
        });
        Key { idx, generation: 0 }
    }

    pub(crate) fn remove(&mut self, key: Key) -> Option<T> {
        let entry = self.entries.get_mut(key.idx as usize)?;
        if entry.generation != key.generation || !matches!(entry.slot, Slot::Occupied(_)) {
            return None;
        }
        let old = std::mem::replace(
            &mut entry.slot,
            Slot::Vacant {
                next_free: self.free,
            },
        );
        // A new generation makes every copy of the old key stale.
        entry.generation = entry.generation.wrapping_add(1);
        self.free = Some(key.idx);
        self.len -= 1;
        match old {
            Slot::Occupied(v) => Some(v),
            Slot::Vacant { .. } => None,
        }
    }

    pub(crate) fn get(&self, key: Key) -> Option<&T> {
        let entry = self.entries.get(key.idx as usize)?;
        match &entry.slot {
            Slot::Occupied(v) if entry.generation == key.generation => Some(v),
            _ => None,
        }
    }

    pub(crate) fn get_mut(&mut self, key: Key) -> Option<&mut T> {
        let entry = self.entries.get_mut(key.idx as usize)?;
        match &mut entry.slot {
            Slot::Occupied(v) if entry.generation == key.generation => Some(v),
            _ => None,
        }
    }

    /// Every live entry, for consistency checks in tests.
    #[cfg(test)]
    pub(crate) fn keys(&self) -> Vec<Key> {
        self.entries
            .iter()
            .enumerate()
            .filter(|(_, e)| matches!(e.slot, Slot::Occupied(_)))
            .map(|(i, e)| Key {
                idx: u32::try_from(i).unwrap_or(u32::MAX),
                generation: e.generation,
            })
            .collect()
    }
}

/// Links of an entry that can sit in one [`List`].
#[derive(Clone, Copy, Default, Debug)]
pub(crate) struct Links {
    prev: Option<Key>,
    next: Option<Key>,
}

pub(crate) trait Linked {
    fn links(&mut self) -> &mut Links;
}

/// A FIFO list of slab entries. Each entry is in at most one list of a given kind; the
/// caller guarantees it only removes an entry from the list it pushed it to.
#[derive(Default, Debug)]
pub(crate) struct List {
    head: Option<Key>,
    tail: Option<Key>,
    len: usize,
}

impl List {
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn front(&self) -> Option<Key> {
        self.head
    }

    pub(crate) fn push_back<T: Linked>(&mut self, slab: &mut Slab<T>, key: Key) {
        let old_tail = self.tail;
        if let Some(node) = slab.get_mut(key) {
            *node.links() = Links {
                prev: old_tail,
                next: None,
            };
        } else {
            return;
        }
        match old_tail.and_then(|t| slab.get_mut(t)) {
            Some(tail) => tail.links().next = Some(key),
            None => self.head = Some(key),
        }
        self.tail = Some(key);
        self.len += 1;
    }

    pub(crate) fn remove<T: Linked>(&mut self, slab: &mut Slab<T>, key: Key) {
        let Some(node) = slab.get_mut(key) else {
            return;
        };
        let links = std::mem::take(node.links());
        match links.prev.and_then(|p| slab.get_mut(p)) {
            Some(prev) => prev.links().next = links.next,
            None => self.head = links.next,
        }
        match links.next.and_then(|n| slab.get_mut(n)) {
            Some(next) => next.links().prev = links.prev,
            None => self.tail = links.prev,
        }
        self.len = self.len.saturating_sub(1);
    }

    pub(crate) fn pop_front<T: Linked>(&mut self, slab: &mut Slab<T>) -> Option<Key> {
        let head = self.head?;
        self.remove(slab, head);
        Some(head)
    }

    /// The entry after `key`, for walking a list from [`List::front`].
    pub(crate) fn next_of<T: Linked>(slab: &mut Slab<T>, key: Key) -> Option<Key> {
        slab.get_mut(key).and_then(|n| n.links().next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Node(u32, Links);
    impl Linked for Node {
        fn links(&mut self) -> &mut Links {
            &mut self.1
        }
    }

    fn collect(list: &List, slab: &mut Slab<Node>) -> Vec<u32> {
        let mut out = Vec::new();
        let mut cur = list.front();
        while let Some(k) = cur {
            out.push(slab.get(k).unwrap().0);
            cur = List::next_of(slab, k);
        }
        out
    }

    #[test]
    fn stale_keys_are_rejected_after_reuse() {
        let mut slab = Slab::default();
        let a = slab.insert(Node(1, Links::default()));
        assert!(slab.remove(a).is_some());
        let b = slab.insert(Node(2, Links::default()));
        assert_eq!(a.index(), b.index());
        assert!(slab.get(a).is_none());
        assert!(slab.remove(a).is_none());
        assert_eq!(slab.get(b).unwrap().0, 2);
        assert_eq!(slab.len(), 1);
    }

    #[test]
    fn list_removes_from_anywhere() {
        let mut slab = Slab::default();
        let mut list = List::default();
        let keys: Vec<_> = (0..5)
            .map(|i| slab.insert(Node(i, Links::default())))
            .collect();
        for &k in &keys {
            list.push_back(&mut slab, k);
        }
        list.remove(&mut slab, keys[2]);
        list.remove(&mut slab, keys[0]);
        list.remove(&mut slab, keys[4]);
        assert_eq!(collect(&list, &mut slab), vec![1, 3]);
        assert_eq!(list.pop_front(&mut slab), Some(keys[1]));
        assert_eq!(list.len(), 1);
        list.push_back(&mut slab, keys[0]);
        assert_eq!(collect(&list, &mut slab), vec![3, 0]);
    }
}
