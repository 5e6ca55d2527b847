//! The untagged first packets of a connection ("Message Flow: Start-up", "Message
//! Formats": StartupMessage, SSLRequest, GSSENCRequest, CancelRequest): an Int32 length
//! that counts itself, an Int32 code, then the body.

use bytes::{BufMut, BytesMut};
use postgres_protocol::message::frontend;
use thiserror::Error;

use super::error::{EncodeError, ParseError, SqlState};
use super::wire::{self, Reader};

/// `MAX_STARTUP_PACKET_LENGTH` (pqcomm.h). As in the server's `ProcessStartupPacket`, it
/// bounds the packet without its length word, so the length word may be up to 10 004.
pub const MAX_STARTUP_LEN: usize = 10_000;
/// The code of an SSLRequest, `NEGOTIATE_SSL_CODE` (pqcomm.h): 1234.5679.
pub const SSL_REQUEST_CODE: u32 = 80_877_103;
/// The code of a GSSENCRequest, `NEGOTIATE_GSS_CODE`: 1234.5680.
pub const GSSENC_REQUEST_CODE: u32 = 80_877_104;
/// The code of a CancelRequest, `CANCEL_REQUEST_CODE`: 1234.5678.
pub const CANCEL_REQUEST_CODE: u32 = 80_877_102;
/// Protocol 3.0, the only version the pooler speaks.
pub const PROTOCOL_3_0: u32 = 3 << 16;
/// Prefix of protocol options ("Protocol Extensions"); none is recognised by 3.0.
pub const PROTOCOL_OPTION_PREFIX: &str = "_pq_.";

/// The smallest length word: itself and the code.
const MIN_LEN: usize = 8;

/// A decoded first packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartupPacket {
    /// The client asks for TLS. Answer `S` or `N`. If bytes follow it in the buffer
    /// before the TLS handshake, the client sent plaintext that a man in the middle could
    /// have injected (CVE-2021-23214): the caller must refuse them.
    SslRequest,
    /// The client asks for GSSAPI encryption; the pooler answers `N`.
    GssEncRequest,
    /// Protocol 3.0 cancel key (4-byte secret).
    Cancel { pid: i32, secret: i32 },
    Startup {
        major: u16,
        /// Anything above 0 is accepted and reported: answer with NegotiateProtocolVersion
        /// naming 3.0 ("Protocol versions").
        minor: u16,
        /// Parameters other than protocol options, in packet order. `user` is present
        /// and non-empty.
        params: Vec<(String, String)>,
        /// Names of the `_pq_.` options the client asked for; the pooler recognises none,
        /// so all belong in NegotiateProtocolVersion.
        protocol_options: Vec<String>,
    },
}

impl StartupPacket {
    /// For a Startup packet that asked for more than the pooler speaks: the
    /// `(newest supported minor, unrecognised options)` to put in a
    /// NegotiateProtocolVersion before going on as 3.0.
    pub fn negotiation(&self) -> Option<(u32, &[String])> {
        match self {
            StartupPacket::Startup {
                minor,
                protocol_options,
                ..
            } if *minor > 0 || !protocol_options.is_empty() => Some((0, protocol_options)),
            _ => None,
        }
    }
}

/// The value of the first `key` in `params`.
pub fn param<'a>(params: &'a [(String, String)], key: &str) -> Option<&'a str> {
    params
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum StartupError {
    #[error("invalid length of startup packet: {len}")]
    BadLength { len: u32 },
    #[error("invalid length {len} for request code {code}")]
    BadRequestLength { code: u32, len: usize },
    #[error("unsupported frontend protocol {major}.{minor}: server supports 3.0")]
    UnsupportedProtocol { major: u16, minor: u16 },
    #[error("invalid startup packet layout: {0}")]
    Malformed(#[from] ParseError),
    #[error("no PostgreSQL user name specified in startup packet")]
    MissingUser,
    #[error("invalid value for parameter \"replication\": \"{value}\"")]
    InvalidReplication { value: String },
    #[error("invalid startup parameter name")]
    EmptyParameterName,
    #[error("startup packet is longer than {MAX_STARTUP_LEN} bytes")]
    TooLong,
    #[error(transparent)]
    Encode(#[from] EncodeError),
}

impl StartupError {
    /// The code PostgreSQL reports for the same fault (backend_startup.c).
    pub fn sqlstate(&self) -> SqlState {
        match self {
            StartupError::UnsupportedProtocol { .. } => SqlState::FEATURE_NOT_SUPPORTED,
            StartupError::MissingUser => SqlState::INVALID_AUTHORIZATION_SPECIFICATION,
            StartupError::InvalidReplication { .. } => SqlState::INVALID_PARAMETER_VALUE,
            StartupError::Encode(_) => SqlState::INTERNAL_ERROR,
            _ => SqlState::PROTOCOL_VIOLATION,
        }
    }

    /// The hint PostgreSQL adds to the same fault.
    pub fn hint(&self) -> Option<&'static str> {
        match self {
            StartupError::InvalidReplication { .. } => {
                Some("Valid values are: \"false\", 0, \"true\", 1, \"database\".")
            }
            _ => None,
        }
    }
}

/// What the `replication` startup key asks for, read as the server reads it
/// (backend_startup.c, ProcessStartupPacket): exactly `database`, or a boolean.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Replication {
    /// A plain session.
    Off,
    /// A physical walsender (`true`, `on`, `1`, …).
    Physical,
    /// A logical walsender, connected to the database (`database`).
    Logical,
}

impl Replication {
    pub fn parse(value: &str) -> Option<Replication> {
        if value == "database" {
            return Some(Replication::Logical);
        }
        parse_bool(value).map(|on| {
            if on {
                Replication::Physical
            } else {
                Replication::Off
            }
        })
    }

    /// What a packet's parameters ask for: each `replication` key overrides the one
    /// before, as the server reads them in order.
    pub fn of(params: &[(String, String)]) -> Replication {
        params
            .iter()
            .filter(|(k, _)| k == "replication")
            .filter_map(|(_, v)| Replication::parse(v))
            .next_back()
            .unwrap_or(Replication::Off)
    }
}

/// PostgreSQL's `parse_bool` (bool.c): a non-empty prefix of `true`, `false`, `yes` or
/// `no`, or of `on`/`off` with at least two letters, any case; or exactly `1` or `0`.
fn parse_bool(value: &str) -> Option<bool> {
    let prefix_of = |word: &str, at_least: usize| {
        value.len() >= at_least
            && value.len() <= word.len()
            && word.as_bytes()[..value.len()].eq_ignore_ascii_case(value.as_bytes())
    };
    match value.as_bytes().first()?.to_ascii_lowercase() {
        b't' if prefix_of("true", 1) => Some(true),
        b'f' if prefix_of("false", 1) => Some(false),
        b'y' if prefix_of("yes", 1) => Some(true),
        b'n' if prefix_of("no", 1) => Some(false),
        b'o' if prefix_of("on", 2) => Some(true),
        b'o' if prefix_of("off", 2) => Some(false),
        b'1' if value.len() == 1 => Some(true),
        b'0' if value.len() == 1 => Some(false),
        _ => None,
    }
}

/// Takes one first packet off the front of `buf`. `Ok(None)` if it is not all there
/// yet (nothing is consumed). The length is checked before anything is buffered for it.
pub fn read(buf: &mut BytesMut) -> Result<Option<StartupPacket>, StartupError> {
    let [a, b, c, d, ..] = buf[..] else {
        return Ok(None);
    };
    let word = u32::from_be_bytes([a, b, c, d]);
    let len = word as usize;
    if !(MIN_LEN..=MAX_STARTUP_LEN + 4).contains(&len) {
        return Err(StartupError::BadLength { len: word });
    }
    if buf.len() < len {
        return Ok(None);
    }
    let packet = buf.split_to(len);
    decode(&packet[4..]).map(Some)
}

fn decode(packet: &[u8]) -> Result<StartupPacket, StartupError> {
    let mut r = Reader::new(packet, "startup packet");
    let code = r.i32()? as u32;
    let len = packet.len() + 4;
    match code {
        SSL_REQUEST_CODE | GSSENC_REQUEST_CODE => {
            if len != MIN_LEN {
                return Err(StartupError::BadRequestLength { code, len });
            }
            Ok(if code == SSL_REQUEST_CODE {
                StartupPacket::SslRequest
            } else {
                StartupPacket::GssEncRequest
            })
        }
        CANCEL_REQUEST_CODE => {
            // 3.0 keys are 4 bytes; the pooler never hands out longer ones (3.2).
            if len != 16 {
                return Err(StartupError::BadRequestLength { code, len });
            }
            let pid = r.i32()?;
            let secret = r.i32()?;
            Ok(StartupPacket::Cancel { pid, secret })
        }
        _ => {
            let major = (code >> 16) as u16;
            let minor = (code & 0xffff) as u16;
            if major != 3 {
                return Err(StartupError::UnsupportedProtocol { major, minor });
            }
            let (params, protocol_options) = decode_params(r)?;
            Ok(StartupPacket::Startup {
                major,
                minor,
                params,
                protocol_options,
            })
        }
    }
}

type Params = (Vec<(String, String)>, Vec<String>);

/// Name/value String pairs, then one empty String: the terminator must be the last
/// byte (backend_startup.c: "expected terminator as last byte").
fn decode_params(mut r: Reader<'_>) -> Result<Params, StartupError> {
    let mut params = Vec::new();
    let mut options = Vec::new();
    loop {
        let key = r.str()?;
        if key.is_empty() {
            break;
        }
        let value = r.str()?;
        // Refused where the server refuses it, before anything after it is read.
        if key == "replication" && Replication::parse(value).is_none() {
            return Err(StartupError::InvalidReplication {
                value: value.to_owned(),
            });
        }
        if key.starts_with(PROTOCOL_OPTION_PREFIX) {
            options.push(key.to_owned());
        } else {
            params.push((key.to_owned(), value.to_owned()));
        }
    }
    r.end()?;
    // The server refuses a missing or empty user with 28000 (backend_startup.c).
    if param(&params, "user").is_none_or(str::is_empty) {
        return Err(StartupError::MissingUser);
    }
    Ok((params, options))
}

/// Appends the pooler's own StartupMessage (protocol 3.0) for a server connection.
/// Fails on an empty name, a NUL inside a name or value, or a packet longer than the
/// server accepts; the buffer is then left as it was.
pub fn write_startup(buf: &mut BytesMut, params: &[(&str, &str)]) -> Result<(), StartupError> {
    if params.iter().any(|(k, _)| k.is_empty()) {
        return Err(StartupError::EmptyParameterName);
    }
    let start = buf.len();
    wire::write_message(buf, None, "startup packet", |buf| {
        buf.put_u32(PROTOCOL_3_0);
        for (k, v) in params {
            wire::put_cstr(buf, k.as_bytes(), "startup parameter name")?;
            wire::put_cstr(buf, v.as_bytes(), "startup parameter value")?;
        }
        buf.put_u8(0);
        Ok(())
    })?;
    if buf.len() - start > MAX_STARTUP_LEN + 4 {
        buf.truncate(start);
        return Err(StartupError::TooLong);
    }
    Ok(())
}

/// Appends an SSLRequest.
pub fn write_ssl_request(buf: &mut BytesMut) {
    frontend::ssl_request(buf);
}

/// Appends a protocol 3.0 CancelRequest with a server's real key.
pub fn write_cancel_request(buf: &mut BytesMut, pid: i32, secret: i32) {
    frontend::cancel_request(pid, secret, buf);
}
