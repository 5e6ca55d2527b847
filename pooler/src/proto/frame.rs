//! Framing for both directions: every message after the startup packet is a one-byte
//! tag, an Int32 length that counts itself but not the tag, and a body
//! ("Message Formats", "Message Data Types").
//!
//! The length is checked against a per-tag maximum as soon as the five header bytes are
//! in, before the caller buffers (or allocates for) the rest; an unknown tag is refused
//! outright, since after garbage the stream has lost sync and its "length" means
//! nothing. PostgreSQL itself does the same in `SocketBackend` (postgres.c).
//!
//! The maxima, as length-word values (the tag byte is not counted):
//! - frontend Query, Parse, Bind, FunctionCall, CopyData: [`LARGE_MESSAGE_LIMIT`], the
//!   server's `PQ_LARGE_MESSAGE_LIMIT` (`MaxAllocSize - 1`, libpq.h): the server refuses
//!   anything longer, so the pooler gives up nothing by refusing it first;
//! - frontend Close, Describe, Execute, Flush, Sync, Terminate, CopyDone, CopyFail:
//!   [`SMALL_MESSAGE_LIMIT`], the server's `PQ_SMALL_MESSAGE_LIMIT` (postgres.c,
//!   copyfromparse.c use it for exactly these);
//! - frontend `p` (PasswordMessage, SASLInitialResponse, SASLResponse):
//!   [`AUTH_MESSAGE_LIMIT`], the server's `PG_MAX_AUTH_TOKEN_LENGTH` (auth.c); SASL
//!   messages are further capped at 1024 by [`super::frontend`];
//! - backend DataRow, CopyData, RowDescription, FunctionCallResponse, ErrorResponse,
//!   NoticeResponse, NotificationResponse: [`LARGE_MESSAGE_LIMIT`] (the server builds
//!   them in a StringInfo, bounded by MaxAllocSize); these are the types libpq's
//!   `VALID_LONG_MESSAGE_TYPE` (fe-protocol3.c) lets be long;
//! - backend ParameterDescription: 65535 parameters of 4 bytes, its true maximum;
//! - every other backend message: [`BACKEND_SHORT_LIMIT`], the 30000 bytes beyond which
//!   libpq declares a short message type corrupt (fe-protocol3.c, `pqParseInput3`).

use std::ops::ControlFlow;

use bytes::{Buf, Bytes, BytesMut};
use thiserror::Error;

use super::error::SqlState;

/// Bytes of a message header: the tag and the length word.
pub const HEADER_LEN: usize = 5;
/// `PQ_LARGE_MESSAGE_LIMIT` (libpq.h): `MaxAllocSize - 1`.
pub const LARGE_MESSAGE_LIMIT: usize = 0x3fff_fffe;
/// `PQ_SMALL_MESSAGE_LIMIT` (libpq.h).
pub const SMALL_MESSAGE_LIMIT: usize = 10_000;
/// `PG_MAX_AUTH_TOKEN_LENGTH` (auth.c).
pub const AUTH_MESSAGE_LIMIT: usize = 65_535;
/// libpq's limit for backend message types that are never long (fe-protocol3.c).
pub const BACKEND_SHORT_LIMIT: usize = 30_000;
/// ParameterDescription: length word, Int16 count, at most 65535 Int32 type OIDs.
const PARAMETER_DESCRIPTION_LIMIT: usize = 4 + 2 + 4 * 65_535;

/// Message tags ("Message Formats"). Backend tags are also in
/// `postgres_protocol::message::backend`; they are repeated here so the relay can match
/// on one set of names for both directions.
pub mod tag {
    /// Sent by clients.
    pub mod frontend {
        pub const BIND: u8 = b'B';
        pub const CLOSE: u8 = b'C';
        pub const COPY_DATA: u8 = b'd';
        pub const COPY_DONE: u8 = b'c';
        pub const COPY_FAIL: u8 = b'f';
        pub const DESCRIBE: u8 = b'D';
        pub const EXECUTE: u8 = b'E';
        pub const FLUSH: u8 = b'H';
        pub const FUNCTION_CALL: u8 = b'F';
        pub const PARSE: u8 = b'P';
        /// PasswordMessage, SASLInitialResponse and SASLResponse share this tag.
        pub const PASSWORD: u8 = b'p';
        pub const QUERY: u8 = b'Q';
        pub const SYNC: u8 = b'S';
        pub const TERMINATE: u8 = b'X';
    }
    /// Sent by servers.
    pub mod backend {
        pub const AUTHENTICATION: u8 = b'R';
        pub const BACKEND_KEY_DATA: u8 = b'K';
        pub const BIND_COMPLETE: u8 = b'2';
        pub const CLOSE_COMPLETE: u8 = b'3';
        pub const COMMAND_COMPLETE: u8 = b'C';
        pub const COPY_BOTH_RESPONSE: u8 = b'W';
        pub const COPY_DATA: u8 = b'd';
        pub const COPY_DONE: u8 = b'c';
        pub const COPY_IN_RESPONSE: u8 = b'G';
        pub const COPY_OUT_RESPONSE: u8 = b'H';
        pub const DATA_ROW: u8 = b'D';
        pub const EMPTY_QUERY_RESPONSE: u8 = b'I';
        pub const ERROR_RESPONSE: u8 = b'E';
        pub const FUNCTION_CALL_RESPONSE: u8 = b'V';
        pub const NEGOTIATE_PROTOCOL_VERSION: u8 = b'v';
        pub const NO_DATA: u8 = b'n';
        pub const NOTICE_RESPONSE: u8 = b'N';
        pub const NOTIFICATION_RESPONSE: u8 = b'A';
        pub const PARAMETER_DESCRIPTION: u8 = b't';
        pub const PARAMETER_STATUS: u8 = b'S';
        pub const PARSE_COMPLETE: u8 = b'1';
        pub const PORTAL_SUSPENDED: u8 = b's';
        pub const READY_FOR_QUERY: u8 = b'Z';
        pub const ROW_DESCRIPTION: u8 = b'T';
    }
}

/// Who sent the message. The same tag means different things in each direction
/// (`D` is Describe from a client, DataRow from a server).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Frontend,
    Backend,
}

/// A validated message header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub tag: u8,
    /// Total bytes of the message, including the tag byte.
    pub len: usize,
}

/// The byte stream cannot be framed. The connection has lost sync and must be closed.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("invalid {side:?} message type 0x{tag:02x}")]
    UnknownTag { side: Side, tag: u8 },
    #[error("invalid message length {len} for message type 0x{tag:02x}")]
    BadLength { tag: u8, len: u32 },
    #[error("message type 0x{tag:02x} of {len} bytes exceeds the limit of {max}")]
    TooLong { tag: u8, len: usize, max: usize },
}

impl FrameError {
    /// Always 08P01: the peer broke the framing.
    pub fn sqlstate(&self) -> SqlState {
        SqlState::PROTOCOL_VIOLATION
    }
}

/// The largest length word accepted for `tag` from `side`, or `None` if the tag does not
/// exist in protocol 3.0 for that direction.
pub fn max_len(tag: u8, side: Side) -> Option<usize> {
    use tag::{backend as b, frontend as f};
    match side {
        Side::Frontend => match tag {
            f::QUERY | f::PARSE | f::BIND | f::FUNCTION_CALL | f::COPY_DATA => {
                Some(LARGE_MESSAGE_LIMIT)
            }
            f::CLOSE
            | f::DESCRIBE
            | f::EXECUTE
            | f::FLUSH
            | f::SYNC
            | f::TERMINATE
            | f::COPY_DONE
            | f::COPY_FAIL => Some(SMALL_MESSAGE_LIMIT),
            f::PASSWORD => Some(AUTH_MESSAGE_LIMIT),
            _ => None,
        },
        Side::Backend => match tag {
            b::DATA_ROW
            | b::COPY_DATA
            | b::ROW_DESCRIPTION
            | b::FUNCTION_CALL_RESPONSE
            | b::ERROR_RESPONSE
            | b::NOTICE_RESPONSE
            | b::NOTIFICATION_RESPONSE => Some(LARGE_MESSAGE_LIMIT),
            b::PARAMETER_DESCRIPTION => Some(PARAMETER_DESCRIPTION_LIMIT),
            b::AUTHENTICATION
            | b::BACKEND_KEY_DATA
            | b::BIND_COMPLETE
            | b::CLOSE_COMPLETE
            | b::COMMAND_COMPLETE
            | b::COPY_BOTH_RESPONSE
            | b::COPY_DONE
            | b::COPY_IN_RESPONSE
            | b::COPY_OUT_RESPONSE
            | b::EMPTY_QUERY_RESPONSE
            | b::NEGOTIATE_PROTOCOL_VERSION
            | b::NO_DATA
            | b::PARAMETER_STATUS
            | b::PARSE_COMPLETE
            | b::PORTAL_SUSPENDED
            | b::READY_FOR_QUERY => Some(BACKEND_SHORT_LIMIT),
            _ => None,
        },
    }
}

/// Reads and validates the header at the start of `buf`. `Ok(None)` if fewer than
/// [`HEADER_LEN`] bytes are there. The message itself may still be incomplete:
/// compare [`Header::len`] with what is buffered.
pub fn peek(buf: &[u8], side: Side) -> Result<Option<Header>, FrameError> {
    let [tag, a, b, c, d, ..] = *buf else {
        return Ok(None);
    };
    let word = u32::from_be_bytes([a, b, c, d]);
    let Some(max) = max_len(tag, side) else {
        return Err(FrameError::UnknownTag { side, tag });
    };
    if word < 4 {
        return Err(FrameError::BadLength { tag, len: word });
    }
    // u32 always fits in usize on the 32- and 64-bit targets we build for.
    let len = word as usize;
    if len > max {
        return Err(FrameError::TooLong { tag, len, max });
    }
    Ok(Some(Header { tag, len: len + 1 }))
}

/// Takes one complete message off the front of `buf`: its tag and its body (without
/// tag and length). `Ok(None)` if it is not all there yet; nothing is consumed then.
///
/// Deliberately does not `reserve` the missing bytes: a peer announcing a 1 GiB message
/// must not make the pooler allocate 1 GiB before it has sent anything. The caller reads
/// more, bounded by its own buffer policy.
pub fn split(buf: &mut BytesMut, side: Side) -> Result<Option<(u8, Bytes)>, FrameError> {
    let Some(header) = peek(buf, side)? else {
        return Ok(None);
    };
    if buf.len() < header.len {
        return Ok(None);
    }
    let mut msg = buf.split_to(header.len);
    msg.advance(HEADER_LEN);
    Ok(Some((header.tag, msg.freeze())))
}

/// One complete message found by [`scan`], borrowed from the scanned buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame<'a> {
    pub tag: u8,
    /// Offset of the tag byte in the scanned buffer.
    pub offset: usize,
    /// The body, without tag and length.
    pub body: &'a [u8],
}

impl Frame<'_> {
    /// Total bytes of the message including tag and length.
    pub fn total_len(&self) -> usize {
        HEADER_LEN + self.body.len()
    }

    /// Offset just past this message in the scanned buffer.
    pub fn end(&self) -> usize {
        self.offset + self.total_len()
    }
}

/// An iterator over the complete messages at the start of a buffer. It borrows, never
/// copies or allocates, so the relay can walk a 64 KiB read for free and forward
/// `&buf[..scan.complete()]` in one write.
///
/// It stops at the first incomplete message (check its header with
/// `peek(&buf[scan.complete()..], side)`), and yields at most one error, after which it
/// is exhausted.
#[derive(Debug, Clone)]
pub struct Scan<'a> {
    buf: &'a [u8],
    side: Side,
    pos: usize,
    failed: bool,
}

/// Starts a [`Scan`] of `buf`.
pub fn scan(buf: &[u8], side: Side) -> Scan<'_> {
    Scan {
        buf,
        side,
        pos: 0,
        failed: false,
    }
}

impl Scan<'_> {
    /// Bytes of the complete messages yielded so far.
    pub fn complete(&self) -> usize {
        self.pos
    }
}

impl<'a> Iterator for Scan<'a> {
    type Item = Result<Frame<'a>, FrameError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        let rest = self.buf.get(self.pos..)?;
        let header = match peek(rest, self.side) {
            Ok(Some(h)) => h,
            Ok(None) => return None,
            Err(e) => {
                self.failed = true;
                return Some(Err(e));
            }
        };
        let body = rest.get(HEADER_LEN..header.len)?;
        let frame = Frame {
            tag: header.tag,
            offset: self.pos,
            body,
        };
        self.pos += header.len;
        Some(Ok(frame))
    }
}

/// Calls `f(tag, body)` for each complete message at the start of `buf`, in order, until
/// the buffer runs out of complete messages or `f` breaks. Returns the bytes of the
/// messages visited (including the one `f` broke on), so the caller can forward exactly
/// `&buf[..n]`. Allocates nothing.
///
/// On a framing error nothing is returned but the error, even if some messages were
/// visited: the stream is broken and the connection must be closed.
pub fn for_each_message<F>(buf: &[u8], side: Side, mut f: F) -> Result<usize, FrameError>
where
    F: FnMut(u8, &[u8]) -> ControlFlow<()>,
{
    let mut scan = scan(buf, side);
    for frame in scan.by_ref() {
        let frame = frame?;
        if f(frame.tag, frame.body).is_break() {
            break;
        }
    }
    Ok(scan.complete())
}
