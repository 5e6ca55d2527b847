//! Where a cancel key names its replica. The pooler mints every client's
//! BackendKeyData itself (the pid and secret Postgres would send), so it can lay the
//! pid out as it likes; PgBouncer's `peer_id` does the same.
//!
//! ```text
//!  bit 31   30      29..22      21..0
//!  sign=0 | hop | replica id | random
//! ```
//!
//! The sign bit stays 0: some clients print or compare pids and expect them positive.
//! `hop` is set only by a replica forwarding the request to the key's owner, which then
//! answers it from its own map or drops it, and never forwards it again: a request
//! crosses at most one hop, whatever the registry says. A client that sets `hop` itself
//! only keeps its request from being forwarded. The secret stays 32 random bits.

use crate::pool::share::ReplicaId;

const HOP: i32 = 1 << 30;
const ID_SHIFT: u32 = 22;
const RANDOM: i32 = (1 << ID_SHIFT) - 1;

/// A pid for a client of `owner` (0 before this replica has an id) from random bits.
pub fn mint_pid(owner: ReplicaId, random: u32) -> i32 {
    // The mask keeps 22 bits, which always fit an i32.
    let random = i32::try_from(random & RANDOM.unsigned_abs()).unwrap_or(0);
    (i32::from(owner) << ID_SHIFT) | random
}

/// The replica that minted `pid` (0: none, or a key from before it had an id).
pub fn owner(pid: i32) -> ReplicaId {
    ReplicaId::try_from((pid >> ID_SHIFT) & 0xff).unwrap_or(0)
}

/// Whether another replica forwarded this request.
pub fn forwarded(pid: i32) -> bool {
    pid & HOP != 0
}

/// The pid as a forwarding replica sends it on.
pub fn mark_forwarded(pid: i32) -> i32 {
    pid | HOP
}

/// The pid as it was minted.
pub fn unmarked(pid: i32) -> i32 {
    pid & !HOP
}

/// How many distinct pids one replica can mint: a bound on its live clients' keys.
pub const PIDS_PER_REPLICA: usize = 1 << ID_SHIFT;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_owner_survives_a_hop_and_pids_stay_positive() {
        for owner_id in [0u8, 1, 7, 255] {
            for random in [0u32, 1, 0x3f_ffff, u32::MAX] {
                let pid = mint_pid(owner_id, random);
                assert!(pid >= 0, "{pid}");
                assert!(!forwarded(pid));
                assert_eq!(owner(pid), owner_id);
                let hop = mark_forwarded(pid);
                assert!(hop >= 0 && forwarded(hop));
                assert_eq!(owner(hop), owner_id);
                assert_eq!(unmarked(hop), pid);
            }
        }
        assert_eq!(mint_pid(3, 5), (3 << 22) | 5);
    }
}
