//! Named prepared statements in transaction mode (design.md point 9).
//!
//! A client prepares `S_1` on whatever server it has at that moment and may bind it
//! in a later transaction on another server. The pooler therefore renames every
//! named statement to a pooler-wide name derived from its text and parameter types
//! (`dp_<hash>`), remembers per client which name is which, remembers per server which
//! statements it holds, and prepares a statement on the server a client lands on
//! before the first Bind or Describe that needs it. The Parse (and Close) messages the
//! pooler adds have replies the client never asked for; [`Replies`] knows which
//! ParseComplete and CloseComplete to drop. Unnamed statements pass through untouched.

mod books;
mod limits;
mod replies;
mod reserved;
pub use reserved::Streamed as StreamedText;

use bytes::{BufMut, Bytes, BytesMut};
use sha2::{Digest, Sha256};

pub use books::{ClientStatements, Statement};
pub use limits::{Refusal, Rest};
pub use replies::{Action, Replies, renamed_error};
use replies::{Deallocating, Reply, Undo};

use super::cursor::Need;
use super::state::{self, Effect};
use crate::backend::statements::ServerStatements;

/// A Parse, Bind, Describe or Close whose names are not NUL-terminated.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("malformed extended-protocol message")]
pub struct Malformed;

/// Splits a NUL-terminated string off the front of `body`.
fn cstr(body: &[u8]) -> Option<(&[u8], &[u8])> {
    let end = body.iter().position(|b| *b == 0)?;
    Some((&body[..end], &body[end + 1..]))
}

fn message(out: &mut BytesMut, tag: u8, parts: &[&[u8]]) {
    message_with_tail(out, tag, parts, 0);
}

/// The start of a message whose last `tail` bytes are not in `parts` (they follow as
/// the client sends them).
fn message_with_tail(out: &mut BytesMut, tag: u8, parts: &[&[u8]], tail: usize) {
    let len: usize = 4 + tail + parts.iter().map(|p| p.len()).sum::<usize>();
    out.reserve(1 + len);
    out.put_u8(tag);
    // Bodies here are at most a client message plus a short name: within i32.
    out.put_i32(i32::try_from(len).unwrap_or(i32::MAX));
    for p in parts {
        out.put_slice(p);
    }
}

/// The pooler-wide name of a statement: a hash of its text and parameter types, so
/// every client that prepares the same statement shares it on a server.
fn global_name(query_and_types: &[u8]) -> Bytes {
    let digest = Sha256::digest(query_and_types);
    let mut name = Vec::with_capacity(3 + 32);
    name.extend_from_slice(b"dp_");
    for b in &digest[..16] {
        name.extend_from_slice(format!("{b:02x}").as_bytes());
    }
    Bytes::from(name)
}

/// The configured bounds, read once per linked stretch.
#[derive(Debug, Clone, Copy)]
pub struct PreparedLimits {
    /// `max_prepared_statements`: statements kept per server.
    pub per_server: usize,
    /// `max_client_prepared_statements`: named statements one client may hold.
    pub per_client: usize,
    /// `max_client_prepared_bytes`: bytes of names and texts one client may hold.
    pub client_bytes: usize,
    /// `max_message_bytes`: the most of one message held whole.
    pub message: usize,
}

/// The client-to-server rewriting for one session.
pub struct Rewriter<'a> {
    pub client: &'a mut ClientStatements,
    pub server: &'a mut ServerStatements,
    pub replies: &'a mut Replies,
    pub max_per_server: usize,
    /// Named statements one client may hold (`max_client_prepared_statements`).
    pub max_per_client: usize,
    /// Bytes of names and texts one client may hold (`max_client_prepared_bytes`).
    pub max_client_bytes: usize,
    /// `max_message_bytes`, for the message of a refusal.
    pub max_message: usize,
    /// Statements refused since the caller last looked, by [`Refusal`] (for the
    /// metrics).
    pub refused: [u64; Refusal::KINDS],
    /// What the messages seen so far may do to the session.
    pub effect: Effect,
    /// Custom parameters the client's statements may set (state.rs).
    pub customs: &'a mut state::Customs,
    /// The text streaming past its head, watched for the pooler's names (reserved.rs).
    pub streamed: &'a mut StreamedText,
}

impl Rewriter<'_> {
    /// How much of a client message must be looked at. Parse, Bind, Query and
    /// FunctionCall: the head (names, the start of a text), the rest may stream.
    /// Execute: it runs a `DEALLOCATE` the rewriter renamed, and it opens a batch.
    /// CopyDone and CopyFail: they end the stretch of ignored Syncs (replies.rs).
    /// Those and Describe, Close and Sync are short by the protocol's own limits.
    pub fn need(tag: u8) -> Need {
        match tag {
            b'P' | b'B' | b'Q' | b'F' => Need::Head,
            b'D' | b'E' | b'C' | b'S' | b'c' | b'f' => Need::Whole,
            _ => Need::Header,
        }
    }

    /// Appends to `out` what the server should get for one whole client message
    /// (`raw` is the message itself, tag included).
    pub fn message(&mut self, tag: u8, raw: &[u8], out: &mut BytesMut) -> Result<(), Malformed> {
        self.head(tag, raw, 0, out).map(|_| ())
    }

    /// Appends to `out` what the server should get for the start of a client message:
    /// `raw` (tag included) and `tail` more bytes the client is still sending, which
    /// pass on as they come unless the answer says otherwise.
    pub fn head(
        &mut self,
        tag: u8,
        raw: &[u8],
        tail: usize,
        out: &mut BytesMut,
    ) -> Result<Rest, Malformed> {
        if tail > 0 {
            return self.streamed(tag, raw, tail, out);
        }
        let body = raw.get(5..).ok_or(Malformed)?;
        // Read before this message counts as sent: nothing outstanding means the last
        // ReadyForQuery's status is the server's now.
        let failed = self.replies.failed_now();
        if matches!(tag, b'P' | b'B' | b'D' | b'E' | b'C') {
            self.replies.unsynced = true;
        }
        match tag {
            b'P' => self.parse(raw, body, failed, out)?,
            b'B' => {
                let (portal, rest) = cstr(body).ok_or(Malformed)?;
                let (name, rest) = cstr(rest).ok_or(Malformed)?;
                self.bound(portal, name);
                match self.ensure(name, out) {
                    Some(stmt) => {
                        self.effect.merge(stmt.effect);
                        message(out, b'B', &[portal, b"\0", &stmt.global, b"\0", rest]);
                    }
                    None => out.extend_from_slice(raw),
                }
            }
            b'D' => {
                let (&kind, rest) = body.split_first().ok_or(Malformed)?;
                let (name, _) = cstr(rest).ok_or(Malformed)?;
                match self.ensure(if kind == b'S' { name } else { b"" }, out) {
                    Some(stmt) => message(out, b'D', &[b"S", &stmt.global, b"\0"]),
                    None => out.extend_from_slice(raw),
                }
            }
            b'C' => {
                let (&kind, rest) = body.split_first().ok_or(Malformed)?;
                let (name, _) = cstr(rest).ok_or(Malformed)?;
                // The client is done with its name; the server's statement may serve
                // other clients and stays (the LRU bound closes it later). The client
                // still gets its CloseComplete: from a harmless Close of the name it
                // gave, which the server does not have.
                let had = if kind == b'S' && !name.is_empty() {
                    self.client.remove(name)
                } else {
                    None
                };
                self.replies.push(Reply::Close {
                    drop: false,
                    server: None,
                    client: had,
                });
                out.extend_from_slice(raw);
            }
            b'E' => {
                let (portal, _) = cstr(body).ok_or(Malformed)?;
                self.execute(portal);
                out.extend_from_slice(raw);
            }
            b'S' => {
                self.replies.unsynced = false;
                // In COPY FROM STDIN the server ignores it: no ReadyForQuery.
                if !self.replies.ignoring_syncs {
                    self.replies.push(Reply::End { sync: true });
                }
                out.extend_from_slice(raw);
            }
            b'c' | b'f' => {
                self.replies.copy_end();
                out.extend_from_slice(raw);
            }
            b'F' => {
                // A function the pooler cannot see into: as DO and CALL.
                self.effect.merge(state::Effect::OPAQUE);
                self.in_batch(out);
                self.replies.push(Reply::End { sync: false });
                out.extend_from_slice(raw);
            }
            b'Q' => {
                let text = cstr(body).map(|(q, _)| q).unwrap_or(body);
                self.query(text, out);
                match self.deallocate(text) {
                    Some(undo) => {
                        // Never a Parse added before a simple Query: nothing would
                        // sync it, and if it failed Postgres would skip the Query and
                        // the client would wait for its ReadyForQuery forever. A
                        // statement the server does not hold needs no DEALLOCATE:
                        // an empty query, answered to the client as one.
                        let emptied = !undo.on_server;
                        if emptied {
                            message(out, b'Q', &[b"\0"]);
                        } else {
                            message(out, b'Q', &[b"DEALLOCATE ", &undo.stmt.global, b"\0"]);
                        }
                        self.replies.push(Reply::Deallocate {
                            undo: Some(undo),
                            emptied,
                            query: true,
                            answered: false,
                        });
                    }
                    None => match reserved::rewrite(text) {
                        Some(moved) => {
                            self.replies.reserved = true;
                            message(out, b'Q', &[&moved, b"\0"]);
                        }
                        None => out.extend_from_slice(raw),
                    },
                }
                self.replies.push(Reply::End { sync: false });
            }
            _ => out.extend_from_slice(raw),
        }
        Ok(Rest::Pass)
    }

    /// What every simple Query does, whole or streamed: classified (its head, if that
    /// is all there is), marked in an unsynced batch, and the unnamed statement and
    /// portal gone (postgres.c, exec_simple_query).
    fn query(&mut self, text: &[u8], out: &mut BytesMut) {
        self.effect.merge(state::classify(text, self.customs));
        self.in_batch(out);
        self.replies.unnamed = None;
        if self
            .replies
            .portal
            .as_ref()
            .is_some_and(|(p, _)| p.is_empty())
        {
            self.replies.portal = None;
        }
    }

    /// `failed`: the server is known to be in a transaction that has failed.
    fn parse(
        &mut self,
        raw: &[u8],
        body: &[u8],
        failed: bool,
        out: &mut BytesMut,
    ) -> Result<(), Malformed> {
        let (name, rest) = cstr(body).ok_or(Malformed)?;
        let (query, types) = cstr(rest).ok_or(Malformed)?;
        // Lexed once: the reserved-name check and the books below both need it.
        let dealloc = if name.is_empty() {
            deallocated_name(query)
        } else {
            None
        };
        let own_deallocate = dealloc
            .as_ref()
            .is_some_and(|n| self.client.by_name.contains_key(&n[..]));
        if !own_deallocate {
            if let Some(moved) = reserved::rewrite(query) {
                // The text that reaches the server names no statement of the pooler's
                // (the moved text has no reserved name left: this recurses once).
                self.replies.reserved = true;
                let mut fixed = BytesMut::new();
                message(&mut fixed, b'P', &[name, b"\0", &moved, b"\0", types]);
                return self.parse(&fixed, &fixed[5..], failed, out);
            }
        }
        let effect = state::classify(query, self.customs);
        self.effect.merge(effect);
        if name.is_empty() {
            self.replies.push(Reply::Parse {
                drop: false,
                global: Bytes::new(),
                client: None,
            });
            // `DEALLOCATE name` over the extended protocol (psycopg 3 evicts so with
            // libpq before 17): the server's name, or an empty query when the server
            // does not hold it. The books change when it is executed.
            self.replies.unnamed = None;
            if let Some((name, stmt)) = dealloc
                .as_deref()
                .and_then(|n| self.client.get_key_value(n))
            {
                let emptied = !self.server.has(&stmt.global);
                if emptied && failed {
                    // Postgres refuses this Parse itself (25P02, whatever it names;
                    // postgres.c, exec_parse_message) and skips the rest up to Sync,
                    // where an empty one would parse and only its Bind fail: the
                    // client's own text gets the very refusal, and the books stay.
                    out.extend_from_slice(raw);
                    return Ok(());
                }
                if emptied {
                    message(out, b'P', &[b"\0\0", types]);
                } else {
                    message(out, b'P', &[b"\0DEALLOCATE ", &stmt.global, b"\0", types]);
                }
                self.replies.unnamed = Some(Deallocating {
                    name: name.clone(),
                    emptied,
                });
                return Ok(());
            }
            out.extend_from_slice(raw);
            return Ok(());
        }
        let global = global_name(rest);
        // A text the client already holds under another name is not copied again.
        let parse = match self.client.text(&global) {
            Some(parse) => parse,
            None => {
                let mut parse = BytesMut::new();
                message(&mut parse, b'P', &[&global, b"\0", rest]);
                parse.freeze()
            }
        };
        let stmt = Statement {
            global: global.clone(),
            parse,
            effect,
        };
        let held = self.client.bytes() + self.client.cost_of(name, &stmt);
        if held > self.max_client_bytes {
            let reason = format!(
                "the prepared statements of this connection would hold {held} bytes \
                 (max_client_prepared_bytes = {}): close the ones no longer needed",
                self.max_client_bytes
            );
            self.refuse(out, Refusal::Bytes, &reason);
            return Ok(());
        }
        if let Some(existing) = self.ensure(name, out) {
            // The client reuses a name without closing it. Parsing the existing
            // server name again makes Postgres refuse it exactly as it would refuse
            // the client's (42P05, and the rest of the batch skipped); only the name
            // in the error is the client's. Its own Parse, old text and all: see
            // `Reply::Duplicate` for the pipeline where the server accepts it.
            out.extend_from_slice(&existing.parse);
            let name = Bytes::copy_from_slice(name);
            let previous = self.client.insert(name.clone(), stmt);
            self.replies.push(Reply::Duplicate {
                client: name,
                global: existing.global,
                previous,
            });
            return Ok(());
        }
        if self.client.len() >= self.max_per_client {
            let reason = format!(
                "too many prepared statements on this connection \
                 (max_client_prepared_statements = {}): close the ones no longer needed",
                self.max_per_client
            );
            self.refuse(out, Refusal::Count, &reason);
            return Ok(());
        }
        // Already on this server (another client, or this one before): close it
        // first, so the client's Parse gets its ParseComplete as from Postgres.
        if self.server.has(&global) {
            self.close(&global, out);
        }
        self.evict(&global, out);
        let name = Bytes::copy_from_slice(name);
        self.replies.push(Reply::Parse {
            drop: false,
            global: global.clone(),
            client: Some(name.clone()),
        });
        out.extend_from_slice(&stmt.parse);
        self.server.touch(&global);
        self.client.insert(name, stmt);
        Ok(())
    }

    /// `DEALLOCATE [PREPARE] name` of one of the client's protocol-level statements
    /// (psycopg evicts its statements so): takes it out of the books. Returns what a
    /// failure must restore; `None` when the text is not that and passes as is.
    fn deallocate(&mut self, text: &[u8]) -> Option<Undo> {
        // Every simple Query asks; most clients have no statement to deallocate.
        if self.client.is_empty() {
            return None;
        }
        let name = deallocated_name(text)?;
        let (name, stmt) = self.client.remove(name.as_slice())?;
        let on_server = self.server.has(&stmt.global);
        self.server.forget(&stmt.global);
        Some(Undo {
            name,
            stmt,
            on_server,
        })
    }

    /// A Bind: notes whether `portal` now runs the unnamed statement's `DEALLOCATE`.
    fn bound(&mut self, portal: &[u8], statement: &[u8]) {
        if statement.is_empty() {
            if let Some(d) = &self.replies.unnamed {
                self.replies.portal = Some((Bytes::copy_from_slice(portal), d.clone()));
                return;
            }
        }
        if self
            .replies
            .portal
            .as_ref()
            .is_some_and(|(p, _)| p.as_ref() == portal)
        {
            self.replies.portal = None;
        }
    }

    /// An Execute: the `DEALLOCATE` its portal runs takes effect here.
    fn execute(&mut self, portal: &[u8]) {
        let runs = self
            .replies
            .portal
            .as_ref()
            .is_some_and(|(p, _)| p.as_ref() == portal);
        if !runs {
            return;
        }
        let Some((_, Deallocating { name, emptied })) = self.replies.portal.take() else {
            return;
        };
        let undo = self.client.remove(&name).map(|(name, stmt)| {
            // Emptied: the server is not asked, and keeps it if it has it since.
            let on_server = !emptied && self.server.has(&stmt.global);
            if on_server {
                self.server.forget(&stmt.global);
            }
            Undo {
                name,
                stmt,
                on_server,
            }
        });
        self.replies.push(Reply::Deallocate {
            undo,
            emptied,
            query: false,
            answered: false,
        });
    }

    /// A Query or FunctionCall inside an unsynced extended batch: Postgres skips it if
    /// an earlier message of the batch failed, and answers it if not. A Close of the
    /// unnamed statement sent first (a simple Query drops it anyway) tells the two
    /// apart: an error that arrives before its CloseComplete is the batch's.
    fn in_batch(&mut self, out: &mut BytesMut) {
        if !self.replies.unsynced {
            return;
        }
        message(out, b'C', &[b"S\0"]);
        self.replies.push(Reply::Close {
            drop: true,
            server: None,
            client: None,
        });
    }

    /// The client's statement `name`, prepared on this server first if needed; `None`
    /// for an unnamed or unknown statement (passed through as is: the server then says
    /// what PostgreSQL says).
    fn ensure(&mut self, name: &[u8], out: &mut BytesMut) -> Option<Statement> {
        if name.is_empty() {
            return None;
        }
        let stmt = self.client.get(name)?.clone();
        if self.server.has(&stmt.global) {
            self.replies.hits += 1;
        } else {
            self.replies.misses += 1;
            self.evict(&stmt.global, out);
            self.replies.push(Reply::Parse {
                drop: true,
                global: stmt.global.clone(),
                client: None,
            });
            out.extend_from_slice(&stmt.parse);
        }
        self.server.touch(&stmt.global);
        Some(stmt)
    }

    fn close(&mut self, global: &Bytes, out: &mut BytesMut) {
        message(out, b'C', &[b"S", global, b"\0"]);
        self.replies.push(Reply::Close {
            drop: true,
            server: Some(global.clone()),
            client: None,
        });
        self.server.forget(global);
    }

    fn evict(&mut self, keep: &[u8], out: &mut BytesMut) {
        // `+ 1`: the statement about to be added.
        while let Some(old) = self
            .server
            .evictable(self.max_per_server.saturating_sub(1), keep)
        {
            self.close(&old, out);
        }
    }
}

/// The statement name of a lone `DEALLOCATE [PREPARE] name` (not `ALL`), as Postgres
/// reads it: unquoted names fold to lower case. One pass of the lexer, which stops at
/// the first token that rules it out.
fn deallocated_name(text: &[u8]) -> Option<Vec<u8>> {
    use state::lex::{Lexer, Token};
    let mut tokens = Lexer::new(text).map(|l| l.token);
    if !matches!(tokens.next(), Some(Token::Word(w)) if w.eq_ignore_ascii_case(b"DEALLOCATE")) {
        return None;
    }
    let mut name = tokens.next()?;
    if matches!(name, Token::Word(w) if w.eq_ignore_ascii_case(b"PREPARE")) {
        name = tokens.next()?;
    }
    // Nothing after the name but an optional `;`.
    match (tokens.next(), tokens.next()) {
        (None, None) | (Some(Token::Punct(b';')), None) => {}
        _ => return None,
    }
    match name {
        Token::Word(w) if w.eq_ignore_ascii_case(b"ALL") => None,
        Token::Word(w) => Some(w.to_ascii_lowercase()),
        Token::Quoted(q) => Some(state::lex::undouble(q, b'"')),
        _ => None,
    }
}

#[cfg(test)]
mod tests;
