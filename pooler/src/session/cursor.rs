//! Message boundaries in a relayed byte stream, without buffering whole messages.
//!
//! The relay forwards bytes as they arrive; it only needs each message's tag, and the
//! body (or the first bytes of the body) of the few messages it acts on. A message it
//! does not inspect is passed through in pieces, so a 1 GiB DataRow or CopyData costs
//! no more memory than the read buffer; one it inspects is held up to a cap
//! (`max_message_bytes`) and no further.

use std::ops::ControlFlow;

use crate::proto::frame::{self, FrameError, Side};

/// How much of a message the relay must have before any of it may be forwarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// The header: the body passes as it comes.
    Header,
    /// The whole message, which must be within the cap; a longer one is refused at its
    /// header, before any of it is buffered.
    Whole,
    /// The first `cap` bytes of the body (all of it when shorter); the rest passes as
    /// it comes, each piece reported as [`Event::Tail`].
    Head,
}

/// What [`Cursor::advance`] reports.
#[derive(Debug)]
pub enum Event<'a> {
    /// A message whose header is here. `body` is the whole body for [`Need::Whole`],
    /// the whole body or exactly the first `cap` bytes for [`Need::Head`] (compare
    /// with `len`), and whatever of it is in the buffer for [`Need::Header`].
    Message {
        tag: u8,
        /// Offset of its tag byte in the buffer.
        at: usize,
        body: &'a [u8],
        /// The body's full length.
        len: usize,
    },
    /// The next piece of the body of the [`Need::Head`] message that did not fit,
    /// at `at` in this buffer; `last` when the message ends with it.
    Tail {
        at: usize,
        bytes: &'a [u8],
        last: bool,
    },
}

/// The stream cannot be relayed further.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CursorError {
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// A message the pooler must hold whole is longer than it may hold.
    #[error("message type {:?} of {len} bytes is over max_message_bytes ({cap})", char::from(*tag))]
    TooLong { tag: u8, len: usize, cap: usize },
}

/// Where the stream is: inside a message being passed through, or at a boundary.
#[derive(Debug, Default)]
pub struct Cursor {
    /// Bytes of the current message not yet seen.
    remaining: usize,
    /// The current message's pieces are reported ([`Need::Head`]).
    tail: bool,
}

/// Bytes of a header: tag + length.
const HEADER: usize = 5;

/// What a turn of [`Cursor::advance`] moves over once its event is reported.
enum Step {
    /// A piece of a streamed message's tail.
    Piece(usize),
    /// A message's header and the body bytes reported with it.
    Message {
        body_end: usize,
        len: usize,
        wanted: usize,
    },
}

impl Cursor {
    /// Walks `buf` from its start and calls `on` for each message whose header is here
    /// (and for each piece of a streamed head's body). Returns how many bytes may be
    /// forwarded now; the rest (a partial header, or an inspected message or head not
    /// all here yet) must wait for more input. `on` may stop the walk *before* a
    /// message (`Break` on its [`Event::Message`]); the returned count then ends at it.
    pub fn advance(
        &mut self,
        buf: &[u8],
        side: Side,
        cap: usize,
        need: impl Fn(u8) -> Need,
        mut on: impl FnMut(Event<'_>) -> ControlFlow<()>,
    ) -> Result<usize, CursorError> {
        let mut pos = 0;
        loop {
            // One call of `on` per turn, in one place: the relay's callbacks are inlined
            // here, which two call sites would stop (the hot path's instruction count).
            let (event, step) = if self.remaining > 0 {
                let take = self.remaining.min(buf.len() - pos);
                if take == 0 {
                    return Ok(pos);
                }
                if !self.tail {
                    // Passed through unseen.
                    self.remaining -= take;
                    pos += take;
                    continue;
                }
                let event = Event::Tail {
                    at: pos,
                    bytes: &buf[pos..pos + take],
                    last: take == self.remaining,
                };
                (event, Step::Piece(take))
            } else {
                let rest = &buf[pos..];
                let Some(header) = frame::peek(rest, side)? else {
                    return Ok(pos);
                };
                let len = header.len - HEADER;
                let wanted = match need(header.tag) {
                    Need::Header => 0,
                    Need::Whole if len > cap => {
                        return Err(CursorError::TooLong {
                            tag: header.tag,
                            len,
                            cap,
                        });
                    }
                    Need::Whole => len,
                    Need::Head => len.min(cap),
                };
                if rest.len() < HEADER + wanted {
                    return Ok(pos);
                }
                // A head is exactly `cap` bytes however much is buffered, so what is
                // held whole and what streams does not depend on how the reads fell.
                let body_end = if wanted > 0 && wanted < len {
                    HEADER + wanted
                } else {
                    header.len.min(rest.len())
                };
                let event = Event::Message {
                    tag: header.tag,
                    at: pos,
                    body: &rest[HEADER..body_end],
                    len,
                };
                (
                    event,
                    Step::Message {
                        body_end,
                        len,
                        wanted,
                    },
                )
            };
            let flow = on(event);
            match step {
                // A tail piece cannot be refused: its message is half sent.
                Step::Piece(take) => {
                    self.remaining -= take;
                    pos += take;
                    if self.remaining == 0 {
                        self.tail = false;
                    }
                }
                Step::Message { .. } if flow.is_break() => return Ok(pos),
                Step::Message {
                    body_end,
                    len,
                    wanted,
                } => {
                    pos += body_end;
                    let seen = body_end - HEADER;
                    if seen < len {
                        self.remaining = len - seen;
                        self.tail = wanted > 0;
                    }
                }
            }
        }
    }

    /// Whether the stream is at a message boundary.
    pub fn at_boundary(&self) -> bool {
        self.remaining == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut m = vec![tag];
        m.extend_from_slice(&(4 + body.len() as u32).to_be_bytes());
        m.extend_from_slice(body);
        m
    }

    /// Feeds `stream` in pieces of `piece` bytes, as reads would, forwarding what the
    /// cursor allows; returns the events as (kind, tag, bytes) and what was forwarded.
    /// An event as (kind: `m`essage, `t`ail, `l`ast tail; tag; bytes).
    type Seen = (char, u8, Vec<u8>);

    fn relay(stream: &[u8], piece: usize, cap: usize) -> (Vec<Seen>, Vec<u8>) {
        let mut cursor = Cursor::default();
        let mut buf = Vec::new();
        let mut out = Vec::new();
        let mut events = Vec::new();
        let mut max_held = 0;
        for chunk in stream.chunks(piece) {
            buf.extend_from_slice(chunk);
            max_held = max_held.max(buf.len());
            let n = cursor
                .advance(
                    &buf,
                    Side::Frontend,
                    cap,
                    |tag| match tag {
                        b'Q' => Need::Head,
                        b'S' => Need::Whole,
                        _ => Need::Header,
                    },
                    |e| {
                        match e {
                            Event::Message { tag, body, .. } => {
                                events.push(('m', tag, body.to_vec()))
                            }
                            Event::Tail { bytes, last, .. } => {
                                events.push((if last { 'l' } else { 't' }, b'Q', bytes.to_vec()))
                            }
                        }
                        ControlFlow::Continue(())
                    },
                )
                .unwrap();
            out.extend_from_slice(&buf[..n]);
            buf.drain(..n);
        }
        assert!(buf.is_empty());
        assert!(max_held <= cap + HEADER + piece, "held {max_held}");
        (events, out)
    }

    #[test]
    fn a_query_over_the_cap_streams_after_its_head() {
        let query: Vec<u8> = (0..1000u32).map(|i| b'a' + (i % 26) as u8).collect();
        let mut stream = msg(b'Q', &query);
        stream.extend(msg(b'S', b""));
        for piece in [1, 7, 64, 5000] {
            let (events, out) = relay(&stream, piece, 100);
            assert_eq!(out, stream, "piece {piece}");
            let ('m', b'Q', head) = &events[0] else {
                panic!("{events:?}")
            };
            assert!(head.len() >= 100 && head.starts_with(&query[..100]));
            let mut seen = head.clone();
            for (kind, tag, bytes) in &events[1..events.len() - 1] {
                assert_eq!(*tag, b'Q');
                assert!(matches!(kind, 't' | 'l'));
                seen.extend_from_slice(bytes);
            }
            assert_eq!(seen, query, "every byte of the body reported once");
            assert_eq!(events[events.len() - 2].0, 'l');
            assert_eq!(events.last().unwrap().1, b'S');
        }
    }

    #[test]
    fn a_whole_message_over_the_cap_is_refused_at_its_header() {
        let mut cursor = Cursor::default();
        let header = [b'S', 0, 0, 1, 0];
        let err = cursor
            .advance(
                &header,
                Side::Frontend,
                100,
                |_| Need::Whole,
                |_| ControlFlow::Continue(()),
            )
            .unwrap_err();
        assert_eq!(
            err,
            CursorError::TooLong {
                tag: b'S',
                len: 252,
                cap: 100
            }
        );
    }

    #[test]
    fn an_uninspected_message_passes_in_pieces_without_tail_events() {
        let body = vec![7u8; 10_000];
        let stream = msg(b'd', &body);
        let (events, out) = relay(&stream, 333, 100);
        assert_eq!(out, stream);
        assert_eq!(events.len(), 1);
    }
}
