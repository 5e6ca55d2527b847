//! Client messages the pooler decodes because it acts on them ("Message Formats").
//! Everything else from a client is relayed by tag and length only.
//!
//! PasswordMessage, SASLInitialResponse and SASLResponse all use tag `p`; which one a
//! body is follows from the authentication step the pooler is in, never from the bytes.
//!
//! The pooler's own messages to servers are written with
//! `postgres_protocol::message::frontend` (`sasl_initial_response`, `sasl_response`,
//! `query`, `sync`, `terminate`...), which covers everything it sends.

use super::error::ParseError;
use super::wire::Reader;

/// `PG_MAX_SASL_MESSAGE_LENGTH` (auth-sasl.c): the server refuses longer SASL messages,
/// and SCRAM's never come close.
pub const MAX_SASL_MESSAGE_LEN: usize = 1024;

/// A SASLInitialResponse: the chosen mechanism and the client-first-message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SaslInitialResponse<'a> {
    pub mechanism: &'a str,
    /// `None` when the client sent length -1 ("no initial response"); SCRAM always
    /// sends one, so the caller treats `None` as a protocol violation.
    pub data: Option<&'a [u8]>,
}

fn check_sasl_len(body: &[u8], what: &'static str) -> Result<(), ParseError> {
    // The limit applies to the message body, as the server's pq_getmessage() does.
    if body.len() + 4 > MAX_SASL_MESSAGE_LEN {
        return Err(ParseError::TooLong {
            what,
            len: body.len() + 4,
            max: MAX_SASL_MESSAGE_LEN,
        });
    }
    Ok(())
}

/// Parses a SASLInitialResponse body: String mechanism, Int32 length (-1 for none),
/// then that many bytes.
pub fn parse_sasl_initial_response(body: &[u8]) -> Result<SaslInitialResponse<'_>, ParseError> {
    const WHAT: &str = "SASLInitialResponse";
    check_sasl_len(body, WHAT)?;
    let mut r = Reader::new(body, WHAT);
    let mechanism = r.str()?;
    let len = r.i32()?;
    let data = match len {
        -1 => None,
        n => {
            let n = usize::try_from(n).map_err(|_| ParseError::Invalid {
                what: WHAT,
                reason: "negative data length",
            })?;
            Some(r.bytes(n)?)
        }
    };
    r.end()?;
    Ok(SaslInitialResponse { mechanism, data })
}

/// Parses a SASLResponse body: all of it is SASL data.
pub fn parse_sasl_response(body: &[u8]) -> Result<&[u8], ParseError> {
    check_sasl_len(body, "SASLResponse")?;
    Ok(body)
}

/// Parses a PasswordMessage body: one String that must fill the body exactly (auth.c,
/// "invalid password packet size"). Returned without its NUL.
pub fn parse_password_message(body: &[u8]) -> Result<&[u8], ParseError> {
    let mut r = Reader::new(body, "PasswordMessage");
    let password = r.cstr()?;
    r.end()?;
    Ok(password)
}

/// Parses a Query body: one String. The text is returned as bytes because it is in the
/// session's client_encoding; the pooler only matches ASCII keywords in it.
pub fn parse_query(body: &[u8]) -> Result<&[u8], ParseError> {
    let mut r = Reader::new(body, "Query");
    let query = r.cstr()?;
    r.end()?;
    Ok(query)
}

/// The names at the head of a Parse body: the statement name and the query text (the
/// parameter types after them are left unread).
pub fn parse_parse_head(body: &[u8]) -> Result<(&[u8], &[u8]), ParseError> {
    let mut r = Reader::new(body, "Parse");
    Ok((r.cstr()?, r.cstr()?))
}

/// A Bind body without its parameter values.
#[derive(Debug, PartialEq, Eq)]
pub struct Bind<'a> {
    pub portal: &'a [u8],
    pub statement: &'a [u8],
    /// Result-column format codes: none means all text, one applies to every column.
    pub result_formats: Vec<i16>,
}

pub fn parse_bind(body: &[u8]) -> Result<Bind<'_>, ParseError> {
    let mut r = Reader::new(body, "Bind");
    let portal = r.cstr()?;
    let statement = r.cstr()?;
    let i16 = |r: &mut Reader<'_>| -> Result<i16, ParseError> {
        let b = r.bytes(2)?;
        Ok(i16::from_be_bytes([b[0], b[1]]))
    };
    let formats = i16(&mut r)?;
    for _ in 0..formats.max(0) {
        i16(&mut r)?;
    }
    let params = i16(&mut r)?;
    for _ in 0..params.max(0) {
        let len = r.i32()?;
        if len > 0 {
            r.bytes(usize::try_from(len).unwrap_or(usize::MAX))?;
        }
    }
    let results = i16(&mut r)?;
    let mut codes = Vec::with_capacity(usize::try_from(results).unwrap_or(0).min(64));
    for _ in 0..results.max(0) {
        codes.push(i16(&mut r)?);
    }
    r.end()?;
    Ok(Bind {
        portal,
        statement,
        result_formats: codes,
    })
}

/// A Describe or Close body: `S` or `P`, and a name.
pub fn parse_target<'a>(body: &'a [u8], what: &'static str) -> Result<(u8, &'a [u8]), ParseError> {
    let mut r = Reader::new(body, what);
    let kind = r.u8()?;
    let name = r.cstr()?;
    r.end()?;
    Ok((kind, name))
}

/// The portal name of an Execute body (the row limit after it is left unread).
pub fn parse_execute_portal(body: &[u8]) -> Result<&[u8], ParseError> {
    Reader::new(body, "Execute").cstr()
}
