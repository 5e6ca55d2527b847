//! Parsing of SCRAM attribute strings (RFC 5802 §7), shared by both exchanges.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use zeroize::Zeroize;

use super::ScramError;
use crate::proto::frontend::MAX_SASL_MESSAGE_LEN;

/// The gs2 channel-binding flag of a client that does not use channel binding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Gs2 {
    /// `n`: the client does not support channel binding.
    No,
    /// `y`: the client supports it but thinks the server does not. Fine here, because
    /// the pooler indeed does not offer `-PLUS`.
    Yes,
}

impl Gs2 {
    /// `c=` of client-final: base64 of the gs2 header (RFC 5802 §7 "cbind-input"), as
    /// PostgreSQL checks it (auth-scram.c, "biws"/"eSws").
    pub(super) fn cbind_b64(self) -> &'static str {
        match self {
            Gs2::No => "biws",  // base64("n,,")
            Gs2::Yes => "eSws", // base64("y,,")
        }
    }
}

/// Bounds and decodes a SCRAM message, which RFC 5802 defines as UTF-8.
pub(super) fn as_text(msg: &[u8]) -> Result<&str, ScramError> {
    if msg.len() > MAX_SASL_MESSAGE_LEN {
        return Err(ScramError::TooLong);
    }
    std::str::from_utf8(msg).map_err(|_| ScramError::NotUtf8)
}

/// Splits `gs2-header client-first-message-bare`.
pub(super) fn parse_gs2_header(text: &str) -> Result<(Gs2, &str), ScramError> {
    let mut parts = text.splitn(3, ',');
    let gs2 = match parts.next() {
        Some("n") => Gs2::No,
        Some("y") => Gs2::Yes,
        Some(flag) if flag.starts_with("p=") => return Err(ScramError::ChannelBindingNotSupported),
        _ => return Err(ScramError::Malformed("invalid channel binding flag")),
    };
    match parts.next() {
        Some("") => {}
        Some(_) => return Err(ScramError::AuthzidNotSupported),
        None => return Err(ScramError::Malformed("truncated gs2 header")),
    }
    let bare = parts
        .next()
        .ok_or(ScramError::Malformed("truncated gs2 header"))?;
    Ok((gs2, bare))
}

/// `[reserved-mext ","] username "," nonce ["," extensions]`; returns the nonce.
/// PostgreSQL ignores the user name (it uses the startup packet's), so any is accepted.
pub(super) fn parse_client_first_bare(bare: &str) -> Result<&str, ScramError> {
    let mut attrs = bare.split(',');
    let first = attrs.next();
    if first.is_some_and(|a| a.starts_with("m=")) {
        return Err(ScramError::ExtensionNotSupported);
    }
    let _username = attr(first, 'n')?;
    let nonce = attr(attrs.next(), 'r')?;
    check_extensions(attrs)?;
    if !is_nonce(nonce) {
        return Err(ScramError::InvalidNonce);
    }
    Ok(nonce)
}

/// The value of `name=value`, or an error naming the attribute that was expected.
pub(super) fn attr(part: Option<&str>, name: char) -> Result<&str, ScramError> {
    let part = part.ok_or(ScramError::MissingAttribute(name))?;
    let mut chars = part.chars();
    match (chars.next(), chars.next()) {
        (Some(n), Some('=')) if n == name => Ok(chars.as_str()),
        _ => Err(ScramError::MissingAttribute(name)),
    }
}

/// Optional extensions (RFC 5802 §7 "extensions"): `ALPHA "=" value` each, ignored.
pub(super) fn check_extensions<'a>(rest: impl Iterator<Item = &'a str>) -> Result<(), ScramError> {
    for ext in rest {
        let b = ext.as_bytes();
        if b.len() < 2 || !b[0].is_ascii_alphabetic() || b[1] != b'=' {
            return Err(ScramError::Malformed("invalid attribute"));
        }
    }
    Ok(())
}

/// RFC 5802 §7: `c-nonce = printable`, `printable = %x21-2B / %x2D-7E` (no ','),
/// and at least one character.
pub(super) fn is_nonce(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| matches!(b, 0x21..=0x2b | 0x2d..=0x7e))
}

/// `i=`: a positive decimal count (RFC 5802 §7 "posit-number").
pub(super) fn parse_iterations(s: &str) -> Result<u32, ScramError> {
    let bad = ScramError::Malformed("invalid iteration count");
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad);
    }
    s.parse::<u32>().ok().filter(|&n| n > 0).ok_or(bad)
}

/// Base64 that must decode to exactly 32 bytes (a SHA-256 sized proof or signature).
pub(super) fn decode_32(b64: &str) -> Option<[u8; 32]> {
    // 32 bytes are 44 base64 characters; refusing other lengths first also bounds the
    // decode buffer.
    if b64.len() != 44 {
        return None;
    }
    let mut out = [0u8; 33];
    let n = STANDARD.decode_slice(b64, &mut out).ok()?;
    let key = <[u8; 32]>::try_from(&out[..n]).ok();
    out.zeroize();
    key
}
