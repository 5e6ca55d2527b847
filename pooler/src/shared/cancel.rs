//! Cancel keys. Clients get a key the pooler minted (BackendKeyData); a CancelRequest
//! carrying it is found in a map, not by scanning sessions, and forwarded to Postgres
//! with the real key of the server the client is linked to at that moment.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use subtle::ConstantTimeEq;

use crate::backend::BackendKey;
use crate::pool::share::ReplicaId;
use crate::replicas::key;

/// What a CancelRequest for one client reaches: the server it is linked to, if any.
#[derive(Default)]
pub struct CancelSlot {
    linked: Mutex<Option<BackendKey>>,
}

impl CancelSlot {
    pub fn link(&self, key: BackendKey) {
        *self.linked.lock().unwrap_or_else(|p| p.into_inner()) = Some(key);
    }

    pub fn unlink(&self) {
        *self.linked.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    fn linked(&self) -> Option<BackendKey> {
        *self.linked.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[derive(Default)]
pub struct CancelMap {
    entries: Mutex<HashMap<i32, (i32, Arc<CancelSlot>)>>,
}

/// A client's registration; removing it from the map on drop.
pub struct CancelHandle {
    pub key: BackendKey,
    pub slot: Arc<CancelSlot>,
    map: Arc<CancelMap>,
}

impl Drop for CancelHandle {
    fn drop(&mut self) {
        self.map
            .entries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.key.pid);
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MintError {
    #[error("the operating system's random source failed: {0}")]
    Random(getrandom::Error),
    #[error("no free cancel key: {0} keys are live")]
    Full(usize),
}

/// Attempts at a pid no live client has. With at most `max_client_conn` live keys out
/// of [`key::PIDS_PER_REPLICA`], a run of this many collisions means the space is full.
const MINT_ATTEMPTS: usize = 64;

impl CancelMap {
    /// Mints a key no live client has and registers it. `owner` is this replica's id
    /// in the registry (0 before it has one), carried in the pid (`replicas/key.rs`)
    /// so that any replica can route a CancelRequest for the key to this one.
    pub fn register(self: &Arc<Self>, owner: ReplicaId) -> Result<CancelHandle, MintError> {
        let slot = Arc::new(CancelSlot::default());
        for _ in 0..MINT_ATTEMPTS {
            let mut bytes = [0u8; 8];
            getrandom::fill(&mut bytes).map_err(MintError::Random)?;
            let [a, b, c, d, e, f, g, h] = bytes;
            let pid = key::mint_pid(owner, u32::from_be_bytes([a, b, c, d]));
            let secret = i32::from_be_bytes([e, f, g, h]);
            let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
            if pid == 0 || entries.contains_key(&pid) {
                continue;
            }
            entries.insert(pid, (secret, slot.clone()));
            return Ok(CancelHandle {
                key: BackendKey { pid, secret },
                slot,
                map: self.clone(),
            });
        }
        let live = self.entries.lock().unwrap_or_else(|p| p.into_inner()).len();
        Err(MintError::Full(live))
    }

    /// The server key to cancel for a client's key, if the key is live and linked.
    /// Unknown keys yield `None`, and the caller drops the request silently, as
    /// PostgreSQL does.
    pub fn resolve(&self, pid: i32, secret: i32) -> Option<BackendKey> {
        let slot = {
            let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
            let (expected, slot) = entries.get(&pid)?;
            if !bool::from(expected.to_be_bytes().ct_eq(&secret.to_be_bytes())) {
                return None;
            }
            slot.clone()
        };
        slot.linked()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_only_live_linked_keys_with_the_right_secret() {
        let map = Arc::new(CancelMap::default());
        let h = map.register(3).unwrap();
        assert_eq!(key::owner(h.key.pid), 3, "the key names its replica");
        assert_eq!(map.resolve(h.key.pid, h.key.secret), None, "not linked");
        let server = BackendKey { pid: 42, secret: 7 };
        h.slot.link(server);
        assert_eq!(map.resolve(h.key.pid, h.key.secret), Some(server));
        assert_eq!(map.resolve(h.key.pid, h.key.secret.wrapping_add(1)), None);
        let pid = h.key.pid;
        drop(h);
        assert_eq!(map.resolve(pid, 0), None);
    }
}
