//! What one client may make the pooler hold, in the rewriter: a message too long to
//! hold whole streams past its head (or is refused, when it is a named statement whose
//! text would have to be kept), and a named statement past the client's bounds is
//! refused the way Postgres refuses one.

use bytes::{Bytes, BytesMut};

use super::replies::Reply;
use super::{Malformed, Rewriter, cstr, message, message_with_tail};
use crate::session::state;

/// What becomes of the rest of a message whose head [`Rewriter::head`] saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rest {
    /// It passes as it comes.
    Pass,
    /// It passes, and its text must be classified as it goes (state.rs).
    Classify,
    /// The message was refused: the rest is not forwarded.
    Drop,
}

/// Which bound refused a named statement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// `max_client_prepared_statements` (53400).
    Count,
    /// `max_client_prepared_bytes` (53400).
    Bytes,
    /// A text over `max_message_bytes`, which the pooler would have to hold whole
    /// (54000).
    TooLong,
}

impl Refusal {
    pub const KINDS: usize = 3;
}

impl Rewriter<'_> {
    /// The head of a message too long to hold whole (over `max_message_bytes`).
    pub(super) fn streamed(
        &mut self,
        tag: u8,
        raw: &[u8],
        tail: usize,
        out: &mut BytesMut,
    ) -> Result<Rest, Malformed> {
        let body = raw.get(5..).ok_or(Malformed)?;
        match tag {
            b'P' => {
                self.replies.unsynced = true;
                let (name, text) = cstr(body).ok_or(Malformed)?;
                if !name.is_empty() {
                    // Its text would have to be held to prepare it again elsewhere.
                    let reason = format!(
                        "a prepared statement of {} bytes is over max_message_bytes ({}): \
                         use an unnamed statement for a text this long",
                        raw.len() - 5 + tail,
                        self.max_message
                    );
                    self.refuse(out, Refusal::TooLong, &reason);
                    return Ok(Rest::Drop);
                }
                // An unnamed statement is used once and not kept: its text streams,
                // classified piece by piece (and looked at once idle: its end is not
                // seen whole).
                self.effect.merge(state::classify(text, self.customs));
                self.effect.merge(state::Effect::OPAQUE);
                self.watch_streamed(text);
                self.replies.push(Reply::Parse {
                    drop: false,
                    global: Bytes::new(),
                    client: None,
                });
                self.replies.unnamed = None;
                out.extend_from_slice(raw);
                Ok(Rest::Classify)
            }
            b'B' => {
                self.replies.unsynced = true;
                // The names come first: only the parameters stream.
                let (portal, rest) = cstr(body).ok_or(Malformed)?;
                let (name, rest) = cstr(rest).ok_or(Malformed)?;
                self.bound(portal, name);
                match self.ensure(name, out) {
                    Some(stmt) => {
                        self.effect.merge(stmt.effect);
                        message_with_tail(
                            out,
                            b'B',
                            &[portal, b"\0", &stmt.global, b"\0", rest],
                            tail,
                        );
                    }
                    None => out.extend_from_slice(raw),
                }
                Ok(Rest::Pass)
            }
            b'Q' => {
                self.query(body, out);
                self.effect.merge(state::Effect::OPAQUE);
                self.watch_streamed(body);
                // Never a lone DEALLOCATE: that is short.
                self.replies.push(Reply::End { sync: false });
                out.extend_from_slice(raw);
                Ok(Rest::Classify)
            }
            // FunctionCall: its arguments are not looked at.
            _ => self.head(tag, raw, 0, out),
        }
    }

    /// A text too long to hold whole cannot have the pooler's statement names moved out
    /// of it (reserved.rs): its head, fed here, and its tail, fed by the relay, are
    /// watched for them, and a server that got one is closed once its client is done.
    fn watch_streamed(&mut self, head: &[u8]) {
        *self.streamed = super::StreamedText::default();
        if self.streamed.feed(head) {
            self.effect.discard = true;
        }
    }

    /// A new named statement past a bound (`max_per_client`, `max_client_bytes`, or a
    /// text over `max_message_bytes`): the client's memory in the pooler is bounded.
    /// Postgres answers an error inside an extended batch by skipping the rest up to
    /// Sync, then ReadyForQuery; the simplest faithful way to give the client exactly
    /// that is to have the server do it: a Parse it cannot parse (named, so the
    /// client's unnamed statement is untouched; a syntax error comes before any other
    /// check in exec_parse_message), whose error is replaced by ours. Everything else
    /// (skipped messages, the books' undo, the tracker) then follows the ordinary
    /// error path, and the statement text says why in the server's log.
    pub(super) fn refuse(&mut self, out: &mut BytesMut, kind: Refusal, reason: &str) {
        let code = match kind {
            Refusal::Count | Refusal::Bytes => crate::proto::SqlState::CONFIGURATION_LIMIT_EXCEEDED,
            Refusal::TooLong => crate::proto::SqlState::PROGRAM_LIMIT_EXCEEDED,
        };
        let mut error = BytesMut::new();
        crate::proto::backend::write_error(&mut error, code, reason);
        message(
            out,
            b'P',
            &[
                b"dp_refused\0",
                b"a prepared statement over the pooler's limits\0",
                &0u16.to_be_bytes(),
            ],
        );
        self.replies.push(Reply::Refused {
            error: error.freeze(),
        });
        self.refused[kind as usize] += 1;
    }
}
