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

use std::collections::{HashMap, VecDeque};

use bytes::{BufMut, Bytes, BytesMut};
use sha2::{Digest, Sha256};

/// A Parse, Bind, Describe or Close whose names are not NUL-terminated.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("malformed extended-protocol message")]
pub struct Malformed;

/// A statement as the pooler knows it: its server-side name and the Parse that
/// creates it there.
#[derive(Debug, Clone)]
pub struct Statement {
    pub global: Bytes,
    /// A whole Parse message naming `global`.
    pub parse: Bytes,
}

/// One client's statements, by the names it gave them.
#[derive(Debug, Default)]
pub struct ClientStatements {
    by_name: HashMap<Bytes, Statement>,
}

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

    fn touch(&mut self, global: &Bytes) {
        self.clock += 1;
        self.used.insert(global.clone(), self.clock);
    }

    fn forget(&mut self, global: &[u8]) {
        self.used.remove(global);
    }

    /// All of them are gone (DISCARD ALL, DEALLOCATE ALL, a reset).
    pub fn clear(&mut self) {
        self.used.clear();
    }

    /// The least recently used statement other than `keep`, once more than `max` are held.
    fn evictable(&self, max: usize, keep: &[u8]) -> Option<Bytes> {
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

/// What the server will answer, for the messages that matter here: Parse and Close
/// (each one reply, unless an error skips them), and Sync.
#[derive(Debug, Default)]
pub struct Replies {
    queue: VecDeque<Reply>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reply {
    /// ParseComplete (`1`); `drop`: the pooler sent that Parse, not the client.
    Parse {
        drop: bool,
    },
    /// CloseComplete (`3`).
    Close {
        drop: bool,
    },
    Sync,
}

impl Replies {
    /// Whether a server message must be kept from the client.
    pub fn server(&mut self, tag: u8) -> bool {
        match tag {
            b'1' => self.pop(|r| matches!(r, Reply::Parse { .. })),
            b'3' => self.pop(|r| matches!(r, Reply::Close { .. })),
            // An error skips the rest of the batch up to its Sync: those replies never
            // come.
            b'E' => {
                while let Some(r) = self.queue.front() {
                    if *r == Reply::Sync {
                        break;
                    }
                    self.queue.pop_front();
                }
                false
            }
            b'Z' => {
                while let Some(r) = self.queue.pop_front() {
                    if r == Reply::Sync {
                        break;
                    }
                }
                false
            }
            _ => false,
        }
    }

    fn pop(&mut self, is: impl Fn(&Reply) -> bool) -> bool {
        match self.queue.front() {
            Some(r) if is(r) => {
                let drop = matches!(r, Reply::Parse { drop: true } | Reply::Close { drop: true });
                self.queue.pop_front();
                drop
            }
            _ => false,
        }
    }

    fn will_reply(&mut self, r: Reply) {
        self.queue.push_back(r);
    }

    /// The server's replies are all in (a ReadyForQuery with nothing pending).
    pub fn clear(&mut self) {
        self.queue.clear();
    }
}

/// Splits a NUL-terminated string off the front of `body`.
fn cstr(body: &[u8]) -> Option<(&[u8], &[u8])> {
    let end = body.iter().position(|b| *b == 0)?;
    Some((&body[..end], &body[end + 1..]))
}

fn message(out: &mut BytesMut, tag: u8, parts: &[&[u8]]) {
    let len: usize = 4 + parts.iter().map(|p| p.len()).sum::<usize>();
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

/// The client-to-server rewriting for one session.
pub struct Rewriter<'a> {
    pub client: &'a mut ClientStatements,
    pub server: &'a mut ServerStatements,
    pub replies: &'a mut Replies,
    pub max_per_server: usize,
}

impl Rewriter<'_> {
    /// Whether a whole client message must be looked at (its body is needed).
    pub fn needs_body(tag: u8) -> bool {
        matches!(tag, b'P' | b'B' | b'D' | b'C' | b'S' | b'Q')
    }

    /// Appends to `out` what the server should get for one whole client message
    /// (`raw` is the message itself, tag included).
    pub fn message(&mut self, tag: u8, raw: &[u8], out: &mut BytesMut) -> Result<(), Malformed> {
        let body = raw.get(5..).ok_or(Malformed)?;
        match tag {
            b'P' => {
                let (name, rest) = cstr(body).ok_or(Malformed)?;
                if name.is_empty() {
                    self.replies.will_reply(Reply::Parse { drop: false });
                    out.extend_from_slice(raw);
                    return Ok(());
                }
                let global = global_name(rest);
                let mut parse = BytesMut::new();
                message(&mut parse, b'P', &[&global, b"\0", rest]);
                let stmt = Statement {
                    global: global.clone(),
                    parse: parse.freeze(),
                };
                // Already on this server (another client, or this one before): close it
                // first, so the client's Parse gets its ParseComplete as from Postgres.
                if self.server.has(&global) {
                    self.close(&global, out);
                }
                self.evict(&global, out);
                self.replies.will_reply(Reply::Parse { drop: false });
                out.extend_from_slice(&stmt.parse);
                self.server.touch(&global);
                self.client
                    .by_name
                    .insert(Bytes::copy_from_slice(name), stmt);
            }
            b'B' => {
                let (portal, rest) = cstr(body).ok_or(Malformed)?;
                let (name, rest) = cstr(rest).ok_or(Malformed)?;
                match self.ensure(name, out) {
                    Some(global) => message(out, b'B', &[portal, b"\0", &global, b"\0", rest]),
                    None => out.extend_from_slice(raw),
                }
            }
            b'D' | b'C' => {
                let (&kind, rest) = body.split_first().ok_or(Malformed)?;
                let (name, _) = cstr(rest).ok_or(Malformed)?;
                if kind != b'S' || name.is_empty() {
                    if tag == b'C' {
                        self.replies.will_reply(Reply::Close { drop: false });
                    }
                    out.extend_from_slice(raw);
                    return Ok(());
                }
                if tag == b'D' {
                    match self.ensure(name, out) {
                        Some(global) => message(out, b'D', &[b"S", &global, b"\0"]),
                        None => out.extend_from_slice(raw),
                    }
                } else {
                    // The client is done with its name; the server's statement may
                    // serve other clients and stays (the LRU bound closes it later).
                    // The client still gets its CloseComplete: from a harmless Close
                    // of the name it gave.
                    self.client.by_name.remove(name);
                    self.replies.will_reply(Reply::Close { drop: false });
                    out.extend_from_slice(raw);
                }
            }
            b'S' => {
                self.replies.will_reply(Reply::Sync);
                out.extend_from_slice(raw);
            }
            b'Q' => {
                // DEALLOCATE ALL / DISCARD ALL drop every statement on the server.
                let text = cstr(body).map(|(q, _)| q).unwrap_or(body);
                let head: Vec<u8> = text
                    .iter()
                    .skip_while(|b| b.is_ascii_whitespace())
                    .take(10)
                    .map(u8::to_ascii_uppercase)
                    .collect();
                if head.starts_with(b"DISCARD") || head.starts_with(b"DEALLOCATE") {
                    self.server.clear();
                }
                out.extend_from_slice(raw);
            }
            _ => out.extend_from_slice(raw),
        }
        Ok(())
    }

    /// The server name for a client's statement, preparing it on this server first if
    /// needed; `None` for an unnamed or unknown statement (passed through as is: the
    /// server then says what PostgreSQL says).
    fn ensure(&mut self, name: &[u8], out: &mut BytesMut) -> Option<Bytes> {
        if name.is_empty() {
            return None;
        }
        let stmt = self.client.by_name.get(name)?.clone();
        if !self.server.has(&stmt.global) {
            self.evict(&stmt.global, out);
            self.replies.will_reply(Reply::Parse { drop: true });
            out.extend_from_slice(&stmt.parse);
        }
        self.server.touch(&stmt.global);
        Some(stmt.global)
    }

    fn close(&mut self, global: &[u8], out: &mut BytesMut) {
        message(out, b'C', &[b"S", global, b"\0"]);
        self.replies.will_reply(Reply::Close { drop: true });
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

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(tag: u8, parts: &[&[u8]]) -> BytesMut {
        let mut out = BytesMut::new();
        message(&mut out, tag, parts);
        out
    }

    fn tags(buf: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut rest = buf;
        while rest.len() >= 5 {
            let len = i32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize;
            out.push(rest[0]);
            rest = &rest[1 + len..];
        }
        out
    }

    #[test]
    fn a_statement_follows_its_client_to_another_server() {
        let mut client = ClientStatements::default();
        let (mut first, mut second) = (ServerStatements::default(), ServerStatements::default());
        let mut replies = Replies::default();
        let parse = msg(b'P', &[b"S_1\0", b"SELECT $1\0", &0u16.to_be_bytes()]);
        let bind = msg(b'B', &[b"\0S_1\0", &[0, 0, 0, 0, 0, 0]]);

        let mut out = BytesMut::new();
        let mut rw = Rewriter {
            client: &mut client,
            server: &mut first,
            replies: &mut replies,
            max_per_server: 200,
        };
        rw.message(b'P', &parse, &mut out).unwrap();
        rw.message(b'B', &bind, &mut out).unwrap();
        assert_eq!(tags(&out), b"PB");
        assert!(!out.windows(3).any(|w| w == b"S_1"), "renamed");

        // Another transaction, another server: the statement is prepared there first,
        // and its ParseComplete is dropped.
        let mut out = BytesMut::new();
        let mut replies = Replies::default();
        let mut rw = Rewriter {
            client: &mut client,
            server: &mut second,
            replies: &mut replies,
            max_per_server: 200,
        };
        rw.message(b'B', &bind, &mut out).unwrap();
        rw.message(b'S', &msg(b'S', &[]), &mut out).unwrap();
        assert_eq!(tags(&out), b"PBS");
        assert!(replies.server(b'1'), "our ParseComplete is dropped");
        assert!(!replies.server(b'2'));
        assert!(!replies.server(b'Z'));
    }

    #[test]
    fn reparsing_a_known_statement_closes_it_first() {
        let mut client = ClientStatements::default();
        let mut server = ServerStatements::default();
        let mut replies = Replies::default();
        let parse = msg(b'P', &[b"a\0", b"SELECT 1\0", &0u16.to_be_bytes()]);
        let mut out = BytesMut::new();
        let mut rw = Rewriter {
            client: &mut client,
            server: &mut server,
            replies: &mut replies,
            max_per_server: 200,
        };
        rw.message(b'P', &parse, &mut out).unwrap();
        rw.message(
            b'P',
            &msg(b'P', &[b"b\0", b"SELECT 1\0", &0u16.to_be_bytes()]),
            &mut out,
        )
        .unwrap();
        assert_eq!(tags(&out), b"PCP");
        assert!(!replies.server(b'1'), "the client's first ParseComplete");
        assert!(replies.server(b'3'), "our CloseComplete");
        assert!(!replies.server(b'1'));
    }

    #[test]
    fn an_error_skips_the_replies_of_the_batch() {
        let mut replies = Replies::default();
        replies.will_reply(Reply::Parse { drop: true });
        replies.will_reply(Reply::Sync);
        replies.will_reply(Reply::Parse { drop: false });
        assert!(!replies.server(b'E'));
        assert!(!replies.server(b'Z'));
        assert!(
            !replies.server(b'1'),
            "the next batch's Parse is the client's"
        );
    }

    #[test]
    fn servers_hold_a_bounded_number_of_statements() {
        let mut client = ClientStatements::default();
        let mut server = ServerStatements::default();
        let mut replies = Replies::default();
        let mut out = BytesMut::new();
        let mut rw = Rewriter {
            client: &mut client,
            server: &mut server,
            replies: &mut replies,
            max_per_server: 3,
        };
        for i in 0..5 {
            let name = format!("s{i}\0");
            let query = format!("SELECT {i}\0");
            rw.message(
                b'P',
                &msg(
                    b'P',
                    &[name.as_bytes(), query.as_bytes(), &0u16.to_be_bytes()],
                ),
                &mut out,
            )
            .unwrap();
        }
        assert_eq!(server.used.len(), 3);
        assert_eq!(tags(&out), b"PPPCPCP");
    }

    #[test]
    fn unnamed_statements_pass_through() {
        let mut client = ClientStatements::default();
        let mut server = ServerStatements::default();
        let mut replies = Replies::default();
        let parse = msg(b'P', &[b"\0", b"SELECT 1\0", &0u16.to_be_bytes()]);
        let mut out = BytesMut::new();
        let mut rw = Rewriter {
            client: &mut client,
            server: &mut server,
            replies: &mut replies,
            max_per_server: 3,
        };
        rw.message(b'P', &parse, &mut out).unwrap();
        assert_eq!(&out[..], &parse[..]);
    }
}
