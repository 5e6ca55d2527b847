//! Message boundaries in a relayed byte stream, without buffering whole messages.
//!
//! The relay forwards bytes as they arrive; it only needs each message's tag, and the
//! body of the few messages it acts on (ReadyForQuery, ParameterStatus). A message it
//! does not inspect is passed through in pieces, so a 1 GiB DataRow or CopyData costs
//! no more memory than the read buffer.

use std::ops::ControlFlow;

use crate::proto::frame::{self, FrameError, Side};

/// Where the stream is: inside a message being passed through, or at a boundary.
#[derive(Debug, Default)]
pub struct Cursor {
    /// Bytes of the current message not yet seen.
    remaining: usize,
}

/// Bytes of a header: tag + length.
const HEADER: usize = 5;

impl Cursor {
    /// Walks `buf` from its start. Calls `on_message(tag, offset, body)` for each message whose
    /// header is here: `body` is the whole body for messages `needs_body` selects
    /// (waiting for them to be complete), and whatever of it is in `buf` for the rest.
    /// Returns how many bytes may be forwarded now; the rest (a partial header or an
    /// incomplete inspected message) must wait for more input. `on_message` may stop
    /// the walk *before* a message (`Break`); the returned count then ends at it.
    pub fn advance(
        &mut self,
        buf: &[u8],
        side: Side,
        needs_body: impl Fn(u8) -> bool,
        mut on_message: impl FnMut(u8, usize, &[u8]) -> ControlFlow<()>,
    ) -> Result<usize, FrameError> {
        let mut pos = 0;
        loop {
            if self.remaining > 0 {
                let take = self.remaining.min(buf.len() - pos);
                pos += take;
                self.remaining -= take;
                if self.remaining > 0 {
                    return Ok(pos);
                }
            }
            let rest = &buf[pos..];
            let Some(header) = frame::peek(rest, side)? else {
                return Ok(pos);
            };
            let complete = rest.len() >= header.len;
            if needs_body(header.tag) && !complete {
                return Ok(pos);
            }
            let body_end = header.len.min(rest.len());
            if on_message(header.tag, pos, &rest[HEADER.min(body_end)..body_end]).is_break() {
                return Ok(pos);
            }
            if complete {
                pos += header.len;
            } else {
                self.remaining = header.len - rest.len();
                return Ok(buf.len());
            }
        }
    }

    /// Whether the stream is at a message boundary.
    pub fn at_boundary(&self) -> bool {
        self.remaining == 0
    }
}
