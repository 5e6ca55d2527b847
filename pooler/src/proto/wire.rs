//! Small shared helpers for reading and writing message bodies ("Message Data Types":
//! Int16/Int32 big-endian, String = bytes terminated by a NUL).

use bytes::{BufMut, BytesMut};

use super::error::{EncodeError, ParseError};

/// Largest value of the Int32 length word that counts itself ("Message Formats").
const MAX_LEN_WORD: usize = i32::MAX as usize;

/// Appends one message: `tag` (unless `None`, for the untagged startup packets), a
/// length word, then whatever `body` writes. On any error the buffer is truncated back
/// to where it was, so a caller never sends half a message.
pub(crate) fn write_message<F>(
    buf: &mut BytesMut,
    tag: Option<u8>,
    what: &'static str,
    body: F,
) -> Result<(), EncodeError>
where
    F: FnOnce(&mut BytesMut) -> Result<(), EncodeError>,
{
    let start = buf.len();
    if let Some(tag) = tag {
        buf.put_u8(tag);
    }
    let len_at = buf.len();
    buf.put_u32(0);
    if let Err(e) = body(buf) {
        buf.truncate(start);
        return Err(e);
    }
    let len = buf.len() - len_at;
    let Ok(word) = u32::try_from(len) else {
        buf.truncate(start);
        return Err(EncodeError::TooLong { what, len });
    };
    if len > MAX_LEN_WORD {
        buf.truncate(start);
        return Err(EncodeError::TooLong { what, len });
    }
    buf[len_at..len_at + 4].copy_from_slice(&word.to_be_bytes());
    Ok(())
}

/// Appends a fixed message that has no body (ParseComplete, ReadyForQuery's header...).
pub(crate) fn write_fixed(buf: &mut BytesMut, tag: u8, body: &[u8]) {
    buf.reserve(5 + body.len());
    buf.put_u8(tag);
    // Bodies passed here are a few bytes, so the cast cannot truncate.
    buf.put_u32(4 + body.len() as u32);
    buf.put_slice(body);
}

/// Appends a String: the bytes, then a NUL. Rejects interior NULs.
pub(crate) fn put_cstr(
    buf: &mut BytesMut,
    s: &[u8],
    what: &'static str,
) -> Result<(), EncodeError> {
    if s.contains(&0) {
        return Err(EncodeError::InteriorNul { what });
    }
    buf.put_slice(s);
    buf.put_u8(0);
    Ok(())
}

/// A read cursor over a message body. Every read is bounds-checked and returns a
/// [`ParseError`] instead of panicking.
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    what: &'static str,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8], what: &'static str) -> Self {
        Reader { buf, what }
    }

    pub(crate) fn bytes(&mut self, n: usize) -> Result<&'a [u8], ParseError> {
        if self.buf.len() < n {
            return Err(ParseError::Truncated { what: self.what });
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    pub(crate) fn u8(&mut self) -> Result<u8, ParseError> {
        let b = self.bytes(1)?;
        Ok(b[0])
    }

    pub(crate) fn i32(&mut self) -> Result<i32, ParseError> {
        let b = self.bytes(4)?;
        Ok(i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// A String without its terminating NUL.
    pub(crate) fn cstr(&mut self) -> Result<&'a [u8], ParseError> {
        let Some(nul) = self.buf.iter().position(|&b| b == 0) else {
            return Err(ParseError::MissingNul { what: self.what });
        };
        let s = &self.buf[..nul];
        self.buf = &self.buf[nul + 1..];
        Ok(s)
    }

    /// A String that must be UTF-8.
    pub(crate) fn str(&mut self) -> Result<&'a str, ParseError> {
        let what = self.what;
        std::str::from_utf8(self.cstr()?).map_err(|_| ParseError::NotUtf8 { what })
    }

    /// Fails if anything is left: lengths that disagree with the content are a protocol
    /// violation, as in the server's `pq_getmsgend`.
    pub(crate) fn end(&self) -> Result<(), ParseError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(ParseError::TrailingBytes { what: self.what })
        }
    }
}
