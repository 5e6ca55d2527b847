//! What the relay knows about a linked server's conversation, from message tags alone:
//! which requests still owe a ReadyForQuery, whether the client is mid-way through an
//! extended-protocol batch, and the transaction status. Pure, so every protocol corner
//! below is a unit test.
//!
//! The corner that makes a plain counter wrong: during COPY FROM STDIN, PostgreSQL
//! ignores Sync (copyfromparse.c: "Ignore Flush/Sync for the convenience of client
//! libraries (such as libpq) that may send those without noticing that the command
//! they just sent was COPY"). An extended-protocol COPY (Bind, Execute, Sync, CopyData…,
//! CopyDone, Sync) therefore gets one ReadyForQuery for two Syncs.

use std::collections::VecDeque;
use std::ops::ControlFlow;

/// More pipelined requests than this without reading a reply is not a client but a
/// memory attack.
pub const MAX_PENDING: usize = 1 << 20;

const COPY_END: u8 = b'c';

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("more than {MAX_PENDING} pipelined requests without reading their replies")]
pub struct TooManyPending;

#[derive(Debug)]
pub struct Tracker {
    /// Replies due, in order: `Q`, `S`, `F` (each answered by one ReadyForQuery), and
    /// `c` markers where the client ended a COPY.
    pending: VecDeque<u8>,
    /// The server is in COPY FROM STDIN and the client's copy-end has not been seen:
    /// Syncs sent meanwhile get no reply.
    ignoring_syncs: bool,
    /// Extended-protocol messages sent since the last Sync.
    unsynced: bool,
    /// The last ReadyForQuery status: `I`, `T` or `E`.
    status: u8,
    /// The client sent Terminate.
    terminated: bool,
}

impl Default for Tracker {
    fn default() -> Self {
        Tracker {
            pending: VecDeque::new(),
            ignoring_syncs: false,
            unsynced: false,
            status: b'I',
            terminated: false,
        }
    }
}

impl Tracker {
    /// A message from the client. `Break` at Terminate: it is not forwarded.
    pub fn client(&mut self, tag: u8) -> Result<ControlFlow<()>, TooManyPending> {
        match tag {
            b'X' => {
                self.terminated = true;
                return Ok(ControlFlow::Break(()));
            }
            b'Q' | b'F' => self.push(tag)?,
            b'S' => {
                self.unsynced = false;
                if !self.ignoring_syncs {
                    self.push(tag)?;
                }
            }
            // CopyDone, CopyFail.
            b'c' | b'f' => {
                if self.ignoring_syncs {
                    self.ignoring_syncs = false;
                } else {
                    self.push(COPY_END)?;
                }
            }
            b'P' | b'B' | b'D' | b'E' | b'C' | b'H' => self.unsynced = true,
            _ => {}
        }
        Ok(ControlFlow::Continue(()))
    }

    /// A message from the server; `body` is whole for `Z`.
    pub fn server(&mut self, tag: u8, body: &[u8]) {
        match tag {
            b'Z' => {
                while let Some(item) = self.pending.pop_front() {
                    if item != COPY_END {
                        break;
                    }
                }
                self.status = body.first().copied().unwrap_or(b'I');
            }
            // CopyInResponse, CopyBothResponse: Syncs up to the client's copy-end are
            // ignored by the server, so they owe nothing.
            b'G' | b'W' => self.copy_in_started(),
            _ => {}
        }
    }

    fn copy_in_started(&mut self) {
        let end = self.pending.iter().position(|&t| t == COPY_END);
        let upto = end.unwrap_or(self.pending.len());
        // The request being served (a simple Query's `Q`) stays; Syncs before the
        // copy-end go, and so does the marker itself.
        let mut kept = VecDeque::with_capacity(self.pending.len());
        for (i, t) in self.pending.drain(..).enumerate() {
            let drop = (i < upto && t == b'S') || Some(i) == end;
            if !drop {
                kept.push_back(t);
            }
        }
        self.pending = kept;
        self.ignoring_syncs = end.is_none();
    }

    fn push(&mut self, tag: u8) -> Result<(), TooManyPending> {
        if self.pending.len() >= MAX_PENDING {
            return Err(TooManyPending);
        }
        self.pending.push_back(tag);
        Ok(())
    }

    /// The server is idle and owes nothing: it may go back to the pool (given that the
    /// bytes in between are fully relayed, which the caller checks).
    pub fn idle(&self) -> bool {
        self.status == b'I'
            && !self.unsynced
            && !self.ignoring_syncs
            && self.pending.iter().all(|&t| t == COPY_END)
    }

    /// The last ReadyForQuery status: `I`, `T` or `E`.
    pub fn status(&self) -> u8 {
        self.status
    }

    /// The server waits for the client's COPY data (a COPY FROM STDIN it has not
    /// ended yet).
    pub fn copying_in(&self) -> bool {
        self.ignoring_syncs
    }

    /// Nothing is owed either way, but the server is inside a transaction (or an
    /// unsynced extended batch): it waits for the client's next request.
    pub fn idle_in_transaction(&self) -> bool {
        (self.status != b'I' || self.unsynced)
            && !self.ignoring_syncs
            && self.pending.iter().all(|&t| t == COPY_END)
    }

    pub fn terminated(&self) -> bool {
        self.terminated
    }

    /// The client sent something the server has not answered yet: if the server is
    /// lost now, whatever it was (a COMMIT perhaps) may or may not have happened.
    pub fn in_flight(&self) -> bool {
        self.unsynced || self.ignoring_syncs || self.pending.iter().any(|&t| t != COPY_END)
    }

    /// `n` Queries or FunctionCalls the server skipped after an error in the extended
    /// batch they were sent in (it skips every message up to the next Sync): they owe
    /// no ReadyForQuery. They are the first ones before that Sync.
    pub fn skipped(&mut self, mut n: usize) {
        let mut i = 0;
        while n > 0 && i < self.pending.len() {
            match self.pending[i] {
                b'S' => break,
                b'Q' | b'F' => {
                    self.pending.remove(i);
                    n -= 1;
                }
                _ => i += 1,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(t: &mut Tracker, tags: &[u8]) {
        for &tag in tags {
            let _ = t.client(tag).unwrap();
        }
    }

    #[test]
    fn simple_and_pipelined_queries() {
        let mut t = Tracker::default();
        client(&mut t, b"QQ");
        assert!(!t.idle());
        t.server(b'Z', b"I");
        assert!(!t.idle());
        t.server(b'Z', b"I");
        assert!(t.idle());
    }

    #[test]
    fn a_transaction_keeps_the_server() {
        let mut t = Tracker::default();
        client(&mut t, b"Q");
        t.server(b'Z', b"T");
        assert!(!t.idle());
        client(&mut t, b"Q");
        t.server(b'Z', b"I");
        assert!(t.idle());
    }

    #[test]
    fn unsynced_extended_messages_keep_the_server() {
        let mut t = Tracker::default();
        client(&mut t, b"PBDE");
        assert!(!t.idle());
        client(&mut t, b"S");
        t.server(b'Z', b"I");
        assert!(t.idle());
        client(&mut t, b"PH");
        assert!(!t.idle(), "Flush does not end a batch");
    }

    #[test]
    fn extended_copy_in_owes_one_reply_for_two_syncs() {
        // tokio-postgres and libpq: Bind, Execute, Sync, CopyData, CopyDone, Sync.
        for g_arrives_after in 0..=4 {
            let mut t = Tracker::default();
            let msgs = b"BESdcS";
            client(&mut t, &msgs[..2 + g_arrives_after]);
            t.server(b'G', b"");
            client(&mut t, &msgs[2 + g_arrives_after..]);
            assert!(!t.idle());
            t.server(b'Z', b"I");
            assert!(t.idle(), "G after {g_arrives_after} more messages");
        }
    }

    #[test]
    fn simple_copy_in_and_copy_fail() {
        let mut t = Tracker::default();
        client(&mut t, b"Qdd");
        t.server(b'G', b"");
        client(&mut t, b"f");
        assert!(!t.idle());
        t.server(b'Z', b"I");
        assert!(t.idle());
        // With the copy-end already sent when G arrives.
        client(&mut t, b"Qdc");
        t.server(b'G', b"");
        t.server(b'Z', b"I");
        assert!(t.idle());
    }

    #[test]
    fn an_error_in_a_pipeline_still_answers_each_sync() {
        let mut t = Tracker::default();
        client(&mut t, b"PBESPBES");
        t.server(b'Z', b"I");
        assert!(!t.idle());
        t.server(b'Z', b"I");
        assert!(t.idle());
    }

    #[test]
    fn a_query_skipped_in_a_failed_batch_owes_nothing() {
        // Bind, Execute (fails), Query (skipped), Sync: one ReadyForQuery.
        let mut t = Tracker::default();
        client(&mut t, b"BEQS");
        assert!(t.in_flight());
        t.skipped(1);
        t.server(b'Z', b"I");
        assert!(t.idle());
        assert!(!t.in_flight());
    }

    #[test]
    fn terminate_stops_the_walk() {
        let mut t = Tracker::default();
        assert_eq!(t.client(b'X'), Ok(ControlFlow::Break(())));
        assert!(t.terminated());
    }
}
