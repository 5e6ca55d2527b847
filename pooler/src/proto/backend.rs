//! Messages the pooler writes to clients as if it were the server, and parsers for the
//! few server messages whose contents it acts on ("Message Formats").
//!
//! Writers append to a `BytesMut` and either write the whole message or, on error,
//! leave the buffer as it was. Parsers take a body as returned by
//! [`super::frame::split`] or [`super::frame::scan`] (without tag and length) and borrow
//! from it.

use std::borrow::Cow;

use bytes::{BufMut, BytesMut};

use super::error::{EncodeError, ParseError, SqlState};
use super::frame::tag::backend as tag;
use super::wire::{self, Reader};

/// The transaction status in ReadyForQuery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransactionStatus {
    /// `I`: not in a transaction block. The only state in which a server can be given
    /// back to the pool.
    Idle,
    /// `T`: in a transaction block.
    InTransaction,
    /// `E`: in a failed transaction block.
    Failed,
}

impl TransactionStatus {
    pub fn as_byte(self) -> u8 {
        match self {
            TransactionStatus::Idle => b'I',
            TransactionStatus::InTransaction => b'T',
            TransactionStatus::Failed => b'E',
        }
    }

    pub fn from_byte(b: u8) -> Option<Self> {
        match b {
            b'I' => Some(TransactionStatus::Idle),
            b'T' => Some(TransactionStatus::InTransaction),
            b'E' => Some(TransactionStatus::Failed),
            _ => None,
        }
    }
}

/// Severity of an ErrorResponse or NoticeResponse ("Error and Notice Message Fields").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Error,
    Fatal,
    Panic,
    Warning,
    Notice,
    Debug,
    Info,
    Log,
}

impl Severity {
    /// The non-localized name, which the pooler also uses for the localized `S` field.
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Error => "ERROR",
            Severity::Fatal => "FATAL",
            Severity::Panic => "PANIC",
            Severity::Warning => "WARNING",
            Severity::Notice => "NOTICE",
            Severity::Debug => "DEBUG",
            Severity::Info => "INFO",
            Severity::Log => "LOG",
        }
    }
}

/// The fields of an ErrorResponse or NoticeResponse the pooler writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Diagnostic<'a> {
    pub severity: Severity,
    pub code: SqlState,
    pub message: &'a str,
    pub detail: Option<&'a str>,
    pub hint: Option<&'a str>,
}

impl<'a> Diagnostic<'a> {
    pub fn new(severity: Severity, code: SqlState, message: &'a str) -> Self {
        Diagnostic {
            severity,
            code,
            message,
            detail: None,
            hint: None,
        }
    }
}

/// Longest text written into one diagnostic field; longer text is cut at a character
/// boundary. A report is for humans, and the cap makes the writer infallible.
pub const MAX_DIAGNOSTIC_FIELD: usize = 8 * 1024;

/// AuthenticationOk.
pub fn authentication_ok(buf: &mut BytesMut) {
    wire::write_fixed(buf, tag::AUTHENTICATION, &0i32.to_be_bytes());
}

/// AuthenticationSASL (code 10): the mechanism names, then an empty String.
pub fn authentication_sasl(buf: &mut BytesMut, mechanisms: &[&str]) -> Result<(), EncodeError> {
    wire::write_message(
        buf,
        Some(tag::AUTHENTICATION),
        "AuthenticationSASL",
        |buf| {
            buf.put_i32(10);
            for m in mechanisms {
                if m.is_empty() {
                    // An empty name would end the list early.
                    return Err(EncodeError::InteriorNul {
                        what: "SASL mechanism",
                    });
                }
                wire::put_cstr(buf, m.as_bytes(), "SASL mechanism")?;
            }
            buf.put_u8(0);
            Ok(())
        },
    )
}

/// AuthenticationSASLContinue (code 11) carrying a server-first-message.
pub fn authentication_sasl_continue(buf: &mut BytesMut, data: &[u8]) -> Result<(), EncodeError> {
    sasl_data(buf, 11, data, "AuthenticationSASLContinue")
}

/// AuthenticationSASLFinal (code 12) carrying a server-final-message.
pub fn authentication_sasl_final(buf: &mut BytesMut, data: &[u8]) -> Result<(), EncodeError> {
    sasl_data(buf, 12, data, "AuthenticationSASLFinal")
}

fn sasl_data(
    buf: &mut BytesMut,
    code: i32,
    data: &[u8],
    what: &'static str,
) -> Result<(), EncodeError> {
    wire::write_message(buf, Some(tag::AUTHENTICATION), what, |buf| {
        buf.put_i32(code);
        buf.put_slice(data);
        Ok(())
    })
}

/// ParameterStatus. The value is bytes: the pooler replays what servers sent, which is
/// in the session's client_encoding, not necessarily UTF-8.
pub fn parameter_status(buf: &mut BytesMut, name: &str, value: &[u8]) -> Result<(), EncodeError> {
    wire::write_message(buf, Some(tag::PARAMETER_STATUS), "ParameterStatus", |buf| {
        wire::put_cstr(buf, name.as_bytes(), "parameter name")?;
        wire::put_cstr(buf, value, "parameter value")
    })
}

/// BackendKeyData with a protocol 3.0 (4-byte) secret.
pub fn backend_key_data(buf: &mut BytesMut, pid: i32, secret: i32) {
    let mut body = [0u8; 8];
    body[..4].copy_from_slice(&pid.to_be_bytes());
    body[4..].copy_from_slice(&secret.to_be_bytes());
    wire::write_fixed(buf, tag::BACKEND_KEY_DATA, &body);
}

/// ReadyForQuery.
pub fn ready_for_query(buf: &mut BytesMut, status: TransactionStatus) {
    wire::write_fixed(buf, tag::READY_FOR_QUERY, &[status.as_byte()]);
}

/// ErrorResponse. Writes both `S` (localized severity) and `V` (never localized, since
/// 9.6), as the server does, so clients of every age find what they look for.
pub fn error_response(buf: &mut BytesMut, d: &Diagnostic<'_>) {
    diagnostic(buf, tag::ERROR_RESPONSE, d);
}

/// NoticeResponse (same fields as ErrorResponse).
pub fn notice_response(buf: &mut BytesMut, d: &Diagnostic<'_>) {
    diagnostic(buf, tag::NOTICE_RESPONSE, d);
}

fn diagnostic(buf: &mut BytesMut, tag: u8, d: &Diagnostic<'_>) {
    // Every field is sanitized and capped, so the body is < 64 KiB and nothing in it can
    // fail; the `Result` below is therefore always `Ok`.
    let _always_ok = wire::write_message(buf, Some(tag), "ErrorResponse", |buf| {
        field(buf, b'S', d.severity.as_str());
        field(buf, b'V', d.severity.as_str());
        field(buf, b'C', d.code.code());
        field(buf, b'M', d.message);
        if let Some(detail) = d.detail {
            field(buf, b'D', detail);
        }
        if let Some(hint) = d.hint {
            field(buf, b'H', hint);
        }
        buf.put_u8(0);
        Ok(())
    });
}

/// One diagnostic field: its type byte, then the text as a String without interior
/// NULs, cut to [`MAX_DIAGNOSTIC_FIELD`].
fn field(buf: &mut BytesMut, kind: u8, text: &str) {
    let mut end = text.len().min(MAX_DIAGNOSTIC_FIELD);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    buf.put_u8(kind);
    for chunk in text.as_bytes()[..end].split(|&b| b == 0) {
        buf.put_slice(chunk);
    }
    buf.put_u8(0);
}

/// NegotiateProtocolVersion: the newest minor version the pooler supports for the
/// requested major, and the protocol options it did not recognise.
pub fn negotiate_protocol_version(
    buf: &mut BytesMut,
    newest_minor: u32,
    unrecognized: &[String],
) -> Result<(), EncodeError> {
    let count = i32::try_from(unrecognized.len()).map_err(|_| EncodeError::TooLong {
        what: "NegotiateProtocolVersion",
        len: unrecognized.len(),
    })?;
    let version = (3u32 << 16) | (newest_minor & 0xffff);
    wire::write_message(
        buf,
        Some(tag::NEGOTIATE_PROTOCOL_VERSION),
        "NegotiateProtocolVersion",
        |buf| {
            buf.put_u32(version);
            buf.put_i32(count);
            for name in unrecognized {
                wire::put_cstr(buf, name.as_bytes(), "protocol option")?;
            }
            Ok(())
        },
    )
}

/// NotificationResponse: the sending backend's process id, the channel, the payload.
/// The pooler forwards the ones it receives whole; this writer is for tests and for
/// re-encoding one whose bytes it no longer holds.
pub fn notification_response(
    buf: &mut BytesMut,
    pid: i32,
    channel: &[u8],
    payload: &[u8],
) -> Result<(), EncodeError> {
    wire::write_message(
        buf,
        Some(tag::NOTIFICATION_RESPONSE),
        "NotificationResponse",
        |buf| {
            buf.put_i32(pid);
            wire::put_cstr(buf, channel, "channel name")?;
            wire::put_cstr(buf, payload, "notification payload")
        },
    )
}

/// ParseComplete.
pub fn parse_complete(buf: &mut BytesMut) {
    wire::write_fixed(buf, tag::PARSE_COMPLETE, &[]);
}

/// BindComplete.
pub fn bind_complete(buf: &mut BytesMut) {
    wire::write_fixed(buf, tag::BIND_COMPLETE, &[]);
}

/// CloseComplete (the pooler answers Close of a statement it virtualises itself).
pub fn close_complete(buf: &mut BytesMut) {
    wire::write_fixed(buf, tag::CLOSE_COMPLETE, &[]);
}

/// EmptyQueryResponse.
pub fn empty_query_response(buf: &mut BytesMut) {
    wire::write_fixed(buf, tag::EMPTY_QUERY_RESPONSE, &[]);
}

/// CommandComplete with a command tag such as `SET` or `SHOW`.
pub fn command_complete(buf: &mut BytesMut, command_tag: &str) -> Result<(), EncodeError> {
    wire::write_message(buf, Some(tag::COMMAND_COMPLETE), "CommandComplete", |buf| {
        wire::put_cstr(buf, command_tag.as_bytes(), "command tag")
    })
}

/// Type OIDs of the columns the pooler describes itself (pg_type.dat).
pub const TEXT_OID: u32 = 25;
pub const INT8_OID: u32 = 20;

/// RowDescription of text-format columns `(name, type OID)` of no table.
pub fn row_description(buf: &mut BytesMut, columns: &[(&str, u32)]) -> Result<(), EncodeError> {
    let count = i16::try_from(columns.len()).map_err(|_| EncodeError::TooLong {
        what: "RowDescription",
        len: columns.len(),
    })?;
    wire::write_message(buf, Some(tag::ROW_DESCRIPTION), "RowDescription", |buf| {
        buf.put_i16(count);
        for (name, oid) in columns {
            wire::put_cstr(buf, name.as_bytes(), "column name")?;
            buf.put_u32(0); // table OID
            buf.put_i16(0); // column number
            buf.put_u32(*oid);
            // typlen: -1 (varlena) for text, 8 for int8.
            buf.put_i16(if *oid == INT8_OID { 8 } else { -1 });
            buf.put_i32(-1); // typmod
            buf.put_i16(0); // text format
        }
        Ok(())
    })
}

/// DataRow of already-encoded values; `None` is NULL.
pub fn data_row(buf: &mut BytesMut, values: &[Option<&[u8]>]) -> Result<(), EncodeError> {
    let count = i16::try_from(values.len()).map_err(|_| EncodeError::TooLong {
        what: "DataRow",
        len: values.len(),
    })?;
    wire::write_message(buf, Some(tag::DATA_ROW), "DataRow", |buf| {
        buf.put_i16(count);
        for value in values {
            match value {
                None => buf.put_i32(-1),
                Some(v) => {
                    let len = i32::try_from(v.len()).map_err(|_| EncodeError::TooLong {
                        what: "DataRow value",
                        len: v.len(),
                    })?;
                    buf.put_i32(len);
                    buf.put_slice(v);
                }
            }
        }
        Ok(())
    })
}

/// NoData: a described statement returns no rows.
pub fn no_data(buf: &mut BytesMut) {
    wire::write_fixed(buf, tag::NO_DATA, &[]);
}

/// ParameterDescription of a statement without parameters.
pub fn no_parameters(buf: &mut BytesMut) {
    wire::write_fixed(buf, tag::PARAMETER_DESCRIPTION, &[0, 0]);
}

// --- parsers of server messages --------------------------------------------------------

/// The status byte of a ReadyForQuery body.
pub fn parse_ready_for_query(body: &[u8]) -> Result<TransactionStatus, ParseError> {
    const WHAT: &str = "ReadyForQuery";
    match *body {
        [b] => TransactionStatus::from_byte(b).ok_or(ParseError::Invalid {
            what: WHAT,
            reason: "unknown transaction status",
        }),
        [] => Err(ParseError::Truncated { what: WHAT }),
        _ => Err(ParseError::TrailingBytes { what: WHAT }),
    }
}

/// The fields of an ErrorResponse or NoticeResponse that the pooler looks at.
///
/// Text is in the server session's client_encoding; it is decoded lossily (without
/// copying when it is UTF-8) because the pooler only logs it or matches ASCII codes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerDiagnostic<'a> {
    /// `V` if present (non-localized, 9.6+), else `S`.
    pub severity: Cow<'a, str>,
    /// `C`: always present and five characters.
    pub code: &'a str,
    /// `M`: always present.
    pub message: Cow<'a, str>,
    pub detail: Option<Cow<'a, str>>,
    pub hint: Option<Cow<'a, str>>,
}

/// Parses an ErrorResponse or NoticeResponse body: (type byte, String) pairs ended by a
/// zero byte. "Error and Notice Message Fields" promises S, C and M in every message.
pub fn parse_error_response(body: &[u8]) -> Result<ServerDiagnostic<'_>, ParseError> {
    const WHAT: &str = "ErrorResponse";
    let mut r = Reader::new(body, WHAT);
    let (mut s, mut v, mut code, mut message, mut detail, mut hint) =
        (None, None, None, None, None, None);
    loop {
        let kind = r.u8()?;
        if kind == 0 {
            break;
        }
        let value = r.cstr()?;
        match kind {
            b'S' => s = Some(value),
            b'V' => v = Some(value),
            b'C' => code = Some(value),
            b'M' => message = Some(value),
            b'D' => detail = Some(value),
            b'H' => hint = Some(value),
            // Other fields (position, where, schema...) are for the client; skip them,
            // as the docs tell clients to ignore unknown field types.
            _ => {}
        }
    }
    r.end()?;
    let missing = |reason| ParseError::Invalid { what: WHAT, reason };
    let severity = v.or(s).ok_or(missing("no severity field"))?;
    let code = code
        .filter(|c| c.len() == 5 && c.iter().all(u8::is_ascii_alphanumeric))
        .and_then(|c| std::str::from_utf8(c).ok())
        .ok_or(missing("missing or malformed SQLSTATE"))?;
    let message = message.ok_or(missing("no message field"))?;
    Ok(ServerDiagnostic {
        severity: String::from_utf8_lossy(severity),
        code,
        message: String::from_utf8_lossy(message),
        detail: detail.map(String::from_utf8_lossy),
        hint: hint.map(String::from_utf8_lossy),
    })
}

/// A ParameterStatus: a GUC name (ASCII) and its value as bytes (client_encoding).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParameterStatus<'a> {
    pub name: &'a str,
    pub value: &'a [u8],
}

/// Parses a ParameterStatus body: two Strings.
pub fn parse_parameter_status(body: &[u8]) -> Result<ParameterStatus<'_>, ParseError> {
    let mut r = Reader::new(body, "ParameterStatus");
    let name = r.str()?;
    let value = r.cstr()?;
    r.end()?;
    Ok(ParameterStatus { name, value })
}

/// A server's cancel key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BackendKey {
    pub pid: i32,
    pub secret: i32,
}

/// Parses a protocol 3.0 BackendKeyData body: process id and a 4-byte secret.
pub fn parse_backend_key_data(body: &[u8]) -> Result<BackendKey, ParseError> {
    let mut r = Reader::new(body, "BackendKeyData");
    let pid = r.i32()?;
    let secret = r.i32()?;
    r.end()?;
    Ok(BackendKey { pid, secret })
}

/// Parses a CommandComplete body: the command tag, e.g. `SELECT 1`.
pub fn parse_command_complete(body: &[u8]) -> Result<&str, ParseError> {
    let mut r = Reader::new(body, "CommandComplete");
    let tag = r.str()?;
    r.end()?;
    Ok(tag)
}

/// A NotificationResponse: who sent it (the backend's process id, which the pooler maps
/// to a role before any client sees it), on which channel, with what payload. Channel
/// and payload are in the receiving session's client_encoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Notification<'a> {
    pub pid: i32,
    pub channel: &'a [u8],
    pub payload: &'a [u8],
}

/// Parses a NotificationResponse body: Int32 process id, two Strings.
pub fn parse_notification_response(body: &[u8]) -> Result<Notification<'_>, ParseError> {
    let mut r = Reader::new(body, "NotificationResponse");
    let pid = r.i32()?;
    let channel = r.cstr()?;
    let payload = r.cstr()?;
    r.end()?;
    Ok(Notification {
        pid,
        channel,
        payload,
    })
}

/// Parses a NegotiateProtocolVersion body: the newest minor version the server supports
/// and the option names it did not recognise.
pub fn parse_negotiate_protocol_version(body: &[u8]) -> Result<(u32, Vec<&str>), ParseError> {
    const WHAT: &str = "NegotiateProtocolVersion";
    let mut r = Reader::new(body, WHAT);
    let version = r.i32()? as u32;
    let count = r.i32()?;
    // Each name takes at least one byte, which bounds the allocation by the body size.
    let count = usize::try_from(count)
        .ok()
        .filter(|&n| n <= body.len())
        .ok_or(ParseError::Invalid {
            what: WHAT,
            reason: "bad option count",
        })?;
    let mut names = Vec::with_capacity(count);
    for _ in 0..count {
        names.push(r.str()?);
    }
    r.end()?;
    Ok((version & 0xffff, names))
}

/// Appends a server's ErrorResponse (its `body`) as a FATAL one, every other field as
/// the server wrote it. A startup setting Postgres refuses ends the connection with
/// FATAL; the pooler learns of the refusal by trying the setting on a server, where it
/// is an ERROR. The buffer is left as it was if the body is malformed.
pub fn error_as_fatal(buf: &mut BytesMut, body: &[u8]) -> Result<(), ParseError> {
    const WHAT: &str = "ErrorResponse";
    let mut fields = Vec::new();
    let mut r = Reader::new(body, WHAT);
    loop {
        let kind = r.u8()?;
        if kind == 0 {
            break;
        }
        fields.push((kind, r.cstr()?));
    }
    r.end()?;
    // The body came from the wire whole, so it fits a message again.
    let _fits = wire::write_message(buf, Some(tag::ERROR_RESPONSE), WHAT, |buf| {
        for (kind, value) in fields {
            buf.put_u8(kind);
            match kind {
                b'S' | b'V' => buf.put_slice(Severity::Fatal.as_str().as_bytes()),
                _ => buf.put_slice(value),
            }
            buf.put_u8(0);
        }
        buf.put_u8(0);
        Ok(())
    });
    Ok(())
}

/// Appends an ErrorResponse with severity FATAL: what the pooler sends right before it
/// closes a client connection (authentication failures, protocol violations, shutdown).
///
/// Never fails: an error report must always be deliverable, so interior NULs are
/// dropped and the text is capped (see [`error_response`]).
pub fn write_fatal(buf: &mut BytesMut, code: SqlState, message: &str) {
    error_response(buf, &Diagnostic::new(Severity::Fatal, code, message));
}

/// Appends an ErrorResponse with severity ERROR: the session goes on (the client gets
/// ReadyForQuery next).
pub fn write_error(buf: &mut BytesMut, code: SqlState, message: &str) {
    error_response(buf, &Diagnostic::new(Severity::Error, code, message));
}
