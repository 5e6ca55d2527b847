//! The prepared statements a server holds, by their pooler-wide names (`dp_<hash>`):
//! what the session's rewriter consults to know whether a statement must be prepared
//! on the server a client lands on.

use std::collections::HashMap;

use bytes::Bytes;

/// The statements one server holds, least recently used first out.
#[derive(Debug, Default)]
pub struct ServerStatements {
    used: HashMap<Bytes, u64>,
    clock: u64,
}

impl ServerStatements {
    pub fn has(&self, global: &[u8]) -> bool {
        self.used.contains_key(global)
    }

    pub fn touch(&mut self, global: &Bytes) {
        self.clock += 1;
        self.used.insert(global.clone(), self.clock);
    }

    pub fn forget(&mut self, global: &[u8]) {
        self.used.remove(global);
    }

    /// How many are held.
    pub fn len(&self) -> usize {
        self.used.len()
    }

    pub fn is_empty(&self) -> bool {
        self.used.is_empty()
    }

    /// Keeps only the statements `keep` says are still there.
    pub fn retain(&mut self, mut keep: impl FnMut(&Bytes) -> bool) {
        self.used.retain(|global, _| keep(global));
    }

    /// All of them are gone (DISCARD ALL, DEALLOCATE ALL, a reset).
    pub fn clear(&mut self) {
        self.used.clear();
    }

    /// The least recently used statement other than `keep`, once more than `max` are held.
    pub fn evictable(&self, max: usize, keep: &[u8]) -> Option<Bytes> {
        if self.used.len() <= max {
            return None;
        }
        self.used
            .iter()
            .filter(|(name, _)| name.as_ref() != keep)
            .min_by_key(|(_, stamp)| **stamp)
            .map(|(name, _)| name.clone())
    }
}
