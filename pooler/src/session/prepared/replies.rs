//! What the server will answer to the messages the rewriter cares about, and what to
//! undo when an error makes it skip them.
//!
//! The rewriter updates its books as it sends (a Bind later in the same batch must
//! find the statement a Parse just created), so the books are optimistic. After an
//! ErrorResponse to an extended-protocol message, Postgres skips every message up to
//! the next Sync, simple Queries and FunctionCalls included (postgres.c: `if
//! (ignore_till_sync && firstchar != EOF) continue;`): the Parses among them created
//! nothing, the Closes closed nothing and the Queries owe no ReadyForQuery. Their
//! entries here say how to put the books back, latest first, so the books always
//! match the server.
//!
//! COPY FROM STDIN: Postgres ignores Sync from the client until its CopyDone or
//! CopyFail (copyfromparse.c), so those Syncs get no ReadyForQuery and their entries
//! go when the copy starts, exactly as in the tracker (tracker.rs): a stale entry at
//! the front would make the next reply the pooler must drop reach the client.

use std::collections::{HashSet, VecDeque};

use bytes::Bytes;

use super::{ClientStatements, ServerStatements, Statement};

/// The CommandComplete Postgres sends for `DEALLOCATE`, given to a client whose
/// `DEALLOCATE` the pooler turned into an empty query (the server never had it).
const DEALLOCATE_COMPLETE: &[u8] = b"C\0\0\0\x0fDEALLOCATE\0";

/// A client's statement that a `DEALLOCATE` removed from the books, restored if the
/// server did not run it.
#[derive(Debug)]
pub(super) struct Undo {
    pub name: Bytes,
    pub stmt: Statement,
    /// The server held it and was asked to deallocate it.
    pub on_server: bool,
}

#[derive(Debug)]
pub(super) enum Reply {
    /// ParseComplete. `drop`: the pooler sent that Parse, not the client. If skipped,
    /// `global` is not on the server and the client's name (if any) does not exist.
    Parse {
        drop: bool,
        global: Bytes,
        client: Option<Bytes>,
    },
    /// CloseComplete. If skipped, the server still holds `server` and the client
    /// still has `client`.
    Close {
        drop: bool,
        server: Option<Bytes>,
        client: Option<(Bytes, Statement)>,
    },
    /// A client's Parse that reuses one of its names without a Close: the pooler sends
    /// the existing statement's own Parse again (its server name and its text), for
    /// the server to refuse with 42P05; the error names `global`, the client must read
    /// `client`. The books already map `client` to the new statement (what Postgres
    /// would do if the name were free); `previous` is what a refusal or a skip
    /// restores (`None`: the name did not exist then).
    ///
    /// Why the old text: a `DISCARD ALL` or `DEALLOCATE` earlier in the same pipeline,
    /// not answered yet when the pooler rewrote this Parse, may have freed `global` on
    /// the server. The Parse then succeeds; with the new text it would have left
    /// `global` holding a text other than the one its hash names, which every client
    /// sharing that name would later run. With the old text the server only gets back
    /// the statement the name stands for, and the client's name (already booked to
    /// the new statement, prepared on demand like any other) is what Postgres would
    /// have made it. Every Parse the pooler sends for a `dp_` name carries that
    /// name's own text: this is the one place that was not so.
    Duplicate {
        client: Bytes,
        global: Bytes,
        previous: Option<Statement>,
    },
    /// A Parse the pooler sent in place of one it refuses (past
    /// `max_client_prepared_statements`): a text Postgres cannot parse, so the server
    /// fails it and skips the rest of the batch up to Sync as for any error; its
    /// ErrorResponse is replaced by `error`.
    Refused { error: Bytes },
    /// The client ended a COPY (CopyDone or CopyFail): Syncs before it that a copy
    /// started meanwhile swallows owe nothing.
    CopyEnd,
    /// A `DEALLOCATE` of one of the client's statements, rewritten to the server's
    /// name, or to an empty query (`emptied`) when the server never had it: its
    /// CommandComplete (or EmptyQueryResponse, answered as CommandComplete) confirms
    /// it; an error, a skip or a ReadyForQuery first restores `undo`. `query`: sent as
    /// a simple Query, whose own failure skips nothing.
    Deallocate {
        undo: Option<Undo>,
        emptied: bool,
        query: bool,
        /// An emptied simple Query's EmptyQueryResponse came (and was dropped): its
        /// ReadyForQuery says whether the client gets a CommandComplete or, in a
        /// transaction that had already failed, 25P02.
        answered: bool,
    },
    /// Answered by ReadyForQuery: a Sync (`sync`), or a Query or FunctionCall.
    End { sync: bool },
}

/// What to do with one server message.
#[derive(Debug, PartialEq, Eq)]
pub enum Action {
    Pass,
    /// The reply to a message the pooler added.
    Drop,
    /// An error to pass on with `from` replaced by `to`.
    Rename {
        from: Bytes,
        to: Bytes,
    },
    /// A whole message the client gets instead.
    Replace(Bytes),
}

#[derive(Debug, Default)]
pub struct Replies {
    queue: VecDeque<Reply>,
    /// Binds and Describes of named statements the server had (hits) or had to be
    /// given first (misses), for the metrics.
    pub hits: u64,
    pub misses: u64,
    /// Extended-protocol messages were sent since the last Sync: an error among them
    /// makes the server skip a Query or FunctionCall sent now.
    pub(super) unsynced: bool,
    /// Queries and FunctionCalls skipped after an error, not yet taken by
    /// [`Replies::take_skipped`]: they owe no ReadyForQuery.
    skipped: usize,
    /// A `DEALLOCATE` of a client's statement parsed as the unnamed statement, and the
    /// portal it was last bound to: it runs (and the books change) at that Execute.
    pub(super) unnamed: Option<Deallocating>,
    pub(super) portal: Option<(Bytes, Deallocating)>,
    /// The server is in COPY FROM STDIN and the client's CopyDone or CopyFail has not
    /// been seen: its Syncs until then get no reply (and no entry).
    pub(super) ignoring_syncs: bool,
    /// A statement name of the pooler's was moved to the client's space in this
    /// stretch (reserved.rs): errors may name it with its suffix.
    pub(super) reserved: bool,
    /// The last ReadyForQuery said the transaction has failed (a stretch starts idle).
    failed: bool,
}

/// What an unnamed statement's `DEALLOCATE` removes when it runs.
#[derive(Debug, Clone)]
pub(super) struct Deallocating {
    pub name: Bytes,
    pub emptied: bool,
}

impl Replies {
    /// No reply is due.
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// The server is in a failed transaction now: its last ReadyForQuery said so and
    /// nothing was sent since (a message not yet answered could end the transaction).
    pub(super) fn failed_now(&self) -> bool {
        self.failed && !self.unsynced && self.queue.is_empty()
    }

    pub(super) fn push(&mut self, reply: Reply) {
        self.queue.push_back(reply);
    }

    /// How many Queries and FunctionCalls the server skipped since the last call: the
    /// relay's tracker must not wait for their ReadyForQuery.
    pub fn take_skipped(&mut self) -> usize {
        std::mem::take(&mut self.skipped)
    }

    /// One server message. `body` is whole for CommandComplete, and at least the
    /// head of an ErrorResponse (the fields the pooler reads come first).
    pub fn server(
        &mut self,
        tag: u8,
        body: &[u8],
        client: &mut ClientStatements,
        server: &mut ServerStatements,
    ) -> Action {
        if matches!(tag, b'1' | b'3' | b'E' | b'C' | b'I' | b'Z') {
            // A copy-end marker still in front belongs to a copy that never started
            // (its statement failed, or it was no COPY): Postgres ignored the
            // CopyDone, and every reply from here on is to a later message.
            while matches!(self.queue.front(), Some(Reply::CopyEnd)) {
                self.queue.pop_front();
            }
        }
        match tag {
            b'1' => match self.queue.front() {
                Some(&Reply::Parse { drop, .. }) => {
                    self.queue.pop_front();
                    if drop { Action::Drop } else { Action::Pass }
                }
                // The reused name was free on the server after all (see Duplicate):
                // the server holds `global` again, with its own text.
                Some(Reply::Duplicate { .. }) => {
                    if let Some(Reply::Duplicate { global, .. }) = self.queue.pop_front() {
                        server.touch(&global);
                    }
                    Action::Pass
                }
                _ => Action::Pass,
            },
            b'3' => match self.queue.front() {
                Some(&Reply::Close { drop, .. }) => {
                    self.queue.pop_front();
                    if drop { Action::Drop } else { Action::Pass }
                }
                _ => Action::Pass,
            },
            b'E' => {
                let action = self.error(client, server);
                let suffix = super::reserved::CLIENT_SUFFIX;
                if self.reserved
                    && action == Action::Pass
                    && body.windows(suffix.len()).any(|w| w == suffix)
                {
                    // The client named it without the suffix (reserved.rs).
                    return Action::Rename {
                        from: Bytes::from_static(suffix),
                        to: Bytes::new(),
                    };
                }
                action
            }
            b'C' => {
                if body.starts_with(b"DEALLOCATE\0") {
                    if let Some(Reply::Deallocate { emptied: false, .. }) = self.queue.front() {
                        self.queue.pop_front();
                    }
                } else if body.starts_with(b"DISCARD ALL\0")
                    || body.starts_with(b"DEALLOCATE ALL\0")
                {
                    self.clear(client, server);
                }
                Action::Pass
            }
            // EmptyQueryResponse: the client asked for a DEALLOCATE.
            b'I' => match self.queue.front_mut() {
                // An empty query runs even in a failed transaction, where Postgres
                // would refuse the DEALLOCATE: the ReadyForQuery after it decides.
                Some(Reply::Deallocate {
                    emptied: true,
                    query: true,
                    answered,
                    ..
                }) => {
                    *answered = true;
                    Action::Drop
                }
                // Extended: in a failed transaction the Bind of the empty statement
                // fails (25P02) before any EmptyQueryResponse.
                Some(Reply::Deallocate { emptied: true, .. }) => {
                    self.queue.pop_front();
                    Action::Replace(Bytes::from_static(DEALLOCATE_COMPLETE))
                }
                _ => Action::Pass,
            },
            b'Z' => {
                self.failed = body.first() == Some(&b'E');
                let mut instead = None;
                while let Some(r) = self.queue.pop_front() {
                    match r {
                        Reply::End { .. } => break,
                        Reply::Deallocate {
                            undo,
                            answered: true,
                            ..
                        } => instead = Some(emptied_outcome(undo, body, client, server)),
                        // Never executed (bound, not run, before the Sync).
                        Reply::Deallocate { undo, .. } => restore(undo, client, server),
                        _ => {}
                    }
                }
                instead.map_or(Action::Pass, Action::Replace)
            }
            // CopyInResponse, CopyBothResponse.
            b'G' | b'W' => {
                self.copy_in_started();
                Action::Pass
            }
            _ => Action::Pass,
        }
    }

    /// The client's message `c` (CopyDone) or `f` (CopyFail).
    pub(super) fn copy_end(&mut self) {
        if self.ignoring_syncs {
            self.ignoring_syncs = false;
        } else {
            self.push(Reply::CopyEnd);
        }
    }

    /// A COPY FROM STDIN started: the Syncs sent up to the client's copy-end are
    /// ignored by the server, as is the copy-end marker's purpose; with no copy-end
    /// sent yet, Syncs are ignored until it comes (the tracker does the same).
    fn copy_in_started(&mut self) {
        let end = self.queue.iter().position(|r| matches!(r, Reply::CopyEnd));
        let upto = end.unwrap_or(self.queue.len());
        let mut i = 0;
        self.queue.retain(|r| {
            let drop = (i < upto && matches!(r, Reply::End { sync: true })) || Some(i) == end;
            i += 1;
            !drop
        });
        self.ignoring_syncs = end.is_none();
    }

    fn error(&mut self, client: &mut ClientStatements, server: &mut ServerStatements) -> Action {
        let mut action = Action::Pass;
        match self.queue.front_mut() {
            // A Query or FunctionCall failed itself: a message of either kind sent
            // inside an extended batch follows a Close the pooler added (see the
            // rewriter), so an error before it would have found that Close in front.
            // Nothing is skipped; its ReadyForQuery follows.
            Some(Reply::End { sync: false }) => return Action::Pass,
            // The DEALLOCATE a Query was rewritten to failed: it did not happen.
            Some(Reply::Deallocate { query: true, .. }) => {
                if let Some(Reply::Deallocate { undo, .. }) = self.queue.pop_front() {
                    restore(undo, client, server);
                }
                return Action::Pass;
            }
            Some(Reply::Duplicate {
                client: name,
                global,
                ..
            }) => {
                action = Action::Rename {
                    from: global.clone(),
                    to: name.clone(),
                };
                if let Some(Reply::Duplicate {
                    client: name,
                    previous,
                    ..
                }) = self.queue.pop_front()
                {
                    restore_name(name, previous, client);
                }
            }
            Some(Reply::Refused { error }) => {
                action = Action::Replace(error.clone());
                self.queue.pop_front();
            }
            _ => {}
        }
        // An extended-protocol message failed: everything up to the next Sync is
        // skipped, Queries and FunctionCalls too.
        let end = self
            .queue
            .iter()
            .position(|r| matches!(r, Reply::End { sync: true }))
            .unwrap_or(self.queue.len());
        for skipped in self.queue.drain(..end).rev() {
            match skipped {
                Reply::Parse {
                    global,
                    client: name,
                    ..
                } => {
                    server.forget(&global);
                    if let Some(name) = name {
                        client.remove(&name);
                    }
                }
                Reply::Close {
                    server: held,
                    client: had,
                    ..
                } => {
                    if let Some(global) = held {
                        server.touch(&global);
                    }
                    if let Some((name, stmt)) = had {
                        client.insert(name, stmt);
                    }
                }
                Reply::Deallocate { undo, .. } => restore(undo, client, server),
                Reply::End { .. } => self.skipped += 1,
                Reply::Duplicate {
                    client: name,
                    previous,
                    ..
                } => restore_name(name, previous, client),
                Reply::Refused { .. } | Reply::CopyEnd => {}
            }
        }
        action
    }

    /// `DISCARD ALL` or `DEALLOCATE ALL` completed: every statement the session had
    /// *at that point* is gone. What the client sent after it and the server has not
    /// answered yet is still in the queue; what that creates survives, and the undo
    /// records that would bring back a statement from before are void.
    fn clear(&mut self, client: &mut ClientStatements, server: &mut ServerStatements) {
        let mut names: HashSet<Bytes> = HashSet::new();
        let mut globals: HashSet<Bytes> = HashSet::new();
        for reply in self.queue.iter_mut() {
            match reply {
                Reply::Parse {
                    global,
                    client: name,
                    ..
                } => {
                    globals.insert(global.clone());
                    if let Some(name) = name {
                        names.insert(name.clone());
                    }
                }
                Reply::Close {
                    server: held,
                    client: had,
                    ..
                } => {
                    if held.as_ref().is_some_and(|g| !globals.contains(g)) {
                        *held = None;
                    }
                    if had.as_ref().is_some_and(|(n, _)| !names.contains(n)) {
                        *had = None;
                    }
                }
                Reply::Deallocate { undo, .. } => {
                    if let Some(u) = undo {
                        if !names.contains(&u.name) {
                            *undo = None;
                        } else if !globals.contains(&u.stmt.global) {
                            u.on_server = false;
                        }
                    }
                }
                // If the server accepts it, the name is the client's new statement
                // and the server holds `global`; if not, the name was gone anyway.
                Reply::Duplicate {
                    client: name,
                    global,
                    previous,
                } => {
                    // What it replaced is void unless made after the DISCARD.
                    if !names.contains(name) {
                        *previous = None;
                    }
                    names.insert(name.clone());
                    globals.insert(global.clone());
                }
                Reply::End { .. } | Reply::Refused { .. } | Reply::CopyEnd => {}
            }
        }
        client.retain(|name| names.contains(name));
        server.retain(|global| globals.contains(global));
        self.unnamed = None;
        self.portal = None;
    }
}

/// What the client gets, in place of the ReadyForQuery `ready` (its body), for a
/// `DEALLOCATE` the pooler sent as an empty query: Postgres' CommandComplete, or, when
/// the transaction had already failed, the 25P02 Postgres answers every statement
/// there with, the statement left as it was.
fn emptied_outcome(
    undo: Option<Undo>,
    ready: &[u8],
    client: &mut ClientStatements,
    server: &mut ServerStatements,
) -> Bytes {
    let mut out = bytes::BytesMut::with_capacity(160);
    if ready.first() == Some(&b'E') {
        restore(undo, client, server);
        crate::proto::backend::write_error(
            &mut out,
            crate::proto::SqlState::IN_FAILED_SQL_TRANSACTION,
            "current transaction is aborted, commands ignored until end of transaction block",
        );
    } else {
        out.extend_from_slice(DEALLOCATE_COMPLETE);
    }
    out.extend_from_slice(b"Z\0\0\0\x05");
    out.extend_from_slice(ready.get(..1).unwrap_or(b"I"));
    out.freeze()
}

fn restore(undo: Option<Undo>, client: &mut ClientStatements, server: &mut ServerStatements) {
    if let Some(Undo {
        name,
        stmt,
        on_server,
    }) = undo
    {
        if on_server {
            server.touch(&stmt.global);
        }
        client.insert(name, stmt);
    }
}

/// A refused or skipped Parse that reused `name`: it names what it did before.
fn restore_name(name: Bytes, previous: Option<Statement>, client: &mut ClientStatements) {
    match previous {
        Some(stmt) => {
            client.insert(name, stmt);
        }
        None => {
            client.remove(&name);
        }
    }
}

/// An ErrorResponse (whole message) with `from` replaced by `to` in its fields.
pub fn renamed_error(message: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
    let body = message.get(5..).unwrap_or_default();
    let mut out_body = Vec::with_capacity(body.len() + to.len());
    let mut rest = body;
    while !rest.is_empty() {
        match rest.windows(from.len()).position(|w| w == from) {
            Some(at) if !from.is_empty() => {
                out_body.extend_from_slice(&rest[..at]);
                out_body.extend_from_slice(to);
                rest = &rest[at + from.len()..];
            }
            _ => {
                out_body.extend_from_slice(rest);
                break;
            }
        }
    }
    let mut out = Vec::with_capacity(5 + out_body.len());
    out.push(b'E');
    let len = i32::try_from(4 + out_body.len()).unwrap_or(i32::MAX);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&out_body);
    out
}
