//! What the server will answer to the messages the rewriter cares about, and what to
//! undo when an error makes it skip them.
//!
//! The rewriter updates its books as it sends (a Bind later in the same batch must
//! find the statement a Parse just created), so the books are optimistic. After an
//! ErrorResponse, Postgres skips every message up to the next Sync: the Parses among
//! them created nothing and the Closes closed nothing. Their entries here say how to
//! put the books back, latest first, so the books always match the server.

use std::collections::VecDeque;

use bytes::Bytes;

use super::{ClientStatements, ServerStatements, Statement};

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
    /// A Parse sent for the server to refuse with 42P05 because the client reused one
    /// of its names: the error names `global`, the client must read `client`.
    Duplicate { client: Bytes, global: Bytes },
    /// Sync, Query or FunctionCall: answered by ReadyForQuery. `undo`: the statement a
    /// Query's `DEALLOCATE` removed, restored if the Query fails.
    End { undo: Option<(Bytes, Statement)> },
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
}

#[derive(Debug, Default)]
pub struct Replies {
    queue: VecDeque<Reply>,
    /// Binds and Describes of named statements the server had (hits) or had to be
    /// given first (misses), for the metrics.
    pub hits: u64,
    pub misses: u64,
}

impl Replies {
    /// No reply is due.
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    pub(super) fn push(&mut self, reply: Reply) {
        self.queue.push_back(reply);
    }

    /// Tags whose body [`Replies::server`] reads.
    pub fn needs_body(tag: u8) -> bool {
        matches!(tag, b'C' | b'E')
    }

    pub fn server(
        &mut self,
        tag: u8,
        body: &[u8],
        client: &mut ClientStatements,
        server: &mut ServerStatements,
    ) -> Action {
        match tag {
            b'1' => match self.queue.front() {
                Some(&Reply::Parse { drop, .. }) => {
                    self.queue.pop_front();
                    if drop { Action::Drop } else { Action::Pass }
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
            b'E' => self.error(client, server),
            b'C' => {
                // Every statement of the session is gone, the protocol-level ones too.
                if body.starts_with(b"DISCARD ALL\0") || body.starts_with(b"DEALLOCATE ALL\0") {
                    client.clear();
                    server.clear();
                }
                Action::Pass
            }
            b'Z' => {
                while let Some(r) = self.queue.pop_front() {
                    if matches!(r, Reply::End { .. }) {
                        break;
                    }
                }
                Action::Pass
            }
            _ => Action::Pass,
        }
    }

    fn error(&mut self, client: &mut ClientStatements, server: &mut ServerStatements) -> Action {
        let mut action = Action::Pass;
        match self.queue.front_mut() {
            // The Query itself failed: its DEALLOCATE did not happen.
            Some(Reply::End { undo }) => {
                if let Some((name, stmt)) = undo.take() {
                    server.touch(&stmt.global);
                    client.by_name.insert(name, stmt);
                }
                return Action::Pass;
            }
            Some(Reply::Duplicate { client, global }) => {
                action = Action::Rename {
                    from: global.clone(),
                    to: client.clone(),
                };
                self.queue.pop_front();
            }
            _ => {}
        }
        let end = self
            .queue
            .iter()
            .position(|r| matches!(r, Reply::End { .. }))
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
                        client.by_name.remove(&name);
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
                        client.by_name.insert(name, stmt);
                    }
                }
                Reply::Duplicate { .. } | Reply::End { .. } => {}
            }
        }
        action
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
