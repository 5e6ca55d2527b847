//! App passwords and their SCRAM verifiers.
//!
//! The plaintext is generated here, returned once to the caller, and never stored or
//! logged: only its verifier goes to Postgres (`ALTER ROLE … PASSWORD`) and to the
//! credentials table, the same string to both, because SCRAM pass-through in the pooler
//! depends on them being byte-identical.

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};

/// Random bytes per password; 32 bytes is 256 bits, 43 URL-safe characters.
pub const PASSWORD_BYTES: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("the operating system's random source failed: {0}")]
    Random(String),
    #[error("malformed SCRAM-SHA-256 verifier")]
    MalformedVerifier,
}

/// A plaintext app password. `Debug` never shows it, and there is deliberately no
/// `PartialEq` (it would not be constant-time).
#[derive(Clone)]
pub struct Password(String);

impl Password {
    /// ≥ 32 random bytes from the OS, URL-safe base64 without padding, so it needs no
    /// escaping in a connection URI or JDBC URL.
    pub fn generate() -> Result<Self, SecretError> {
        let mut bytes = [0u8; PASSWORD_BYTES];
        getrandom::fill(&mut bytes).map_err(|e| SecretError::Random(e.to_string()))?;
        Ok(Password(URL_SAFE_NO_PAD.encode(bytes)))
    }

    /// The plaintext, for the one response that returns it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// A fresh SCRAM-SHA-256 verifier (random salt, 4096 iterations).
    pub fn verifier(&self) -> Verifier {
        Verifier(postgres_protocol::password::scram_sha_256(
            self.0.as_bytes(),
        ))
    }
}

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Password(<redacted>)")
    }
}

/// A validated `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>` string.
#[derive(Clone, PartialEq, Eq)]
pub struct Verifier(String);

impl Verifier {
    /// Checks the shape and that every part decodes, so the string is safe to write as
    /// a literal in `ALTER ROLE … PASSWORD` (utility statements take no parameters).
    pub fn parse(s: &str) -> Result<Self, SecretError> {
        let bad = || SecretError::MalformedVerifier;
        let rest = s.strip_prefix("SCRAM-SHA-256$").ok_or_else(bad)?;
        let (iter_salt, keys) = rest.split_once('$').ok_or_else(bad)?;
        let (iterations, salt) = iter_salt.split_once(':').ok_or_else(bad)?;
        let (stored, server) = keys.split_once(':').ok_or_else(bad)?;
        let iterations: u32 = iterations.parse().map_err(|_| bad())?;
        if iterations == 0 || STANDARD.decode(salt).map_err(|_| bad())?.is_empty() {
            return Err(bad());
        }
        for key in [stored, server] {
            if STANDARD.decode(key).map_err(|_| bad())?.len() != 32 {
                return Err(bad());
            }
        }
        Ok(Verifier(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The verifier as a quoted SQL literal.
    pub fn literal(&self) -> String {
        postgres_protocol::escape::escape_literal(&self.0)
    }
}

impl fmt::Debug for Verifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Not the plaintext, but an offline-crackable hash all the same.
        f.write_str("Verifier(<redacted>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_long_url_safe_and_distinct() {
        let a = Password::generate().unwrap();
        let b = Password::generate().unwrap();
        assert_ne!(a.expose(), b.expose());
        assert_eq!(a.expose().len(), 43);
        assert!(
            a.expose()
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
        );
        assert_eq!(format!("{a:?}"), "Password(<redacted>)");
    }

    #[test]
    fn verifiers_parse_and_reject_garbage() {
        let v = Password::generate().unwrap().verifier();
        assert!(v.as_str().starts_with("SCRAM-SHA-256$4096:"));
        assert_eq!(Verifier::parse(v.as_str()).unwrap(), v);
        for bad in [
            "",
            "md5abc",
            "SCRAM-SHA-256$0:c2FsdA==$AAAA:AAAA",
            "SCRAM-SHA-256$4096:c2FsdA==$AAAA:AAAA",
            "SCRAM-SHA-256$4096:c2FsdA==$'; DROP ROLE x; --:AAAA",
        ] {
            assert!(Verifier::parse(bad).is_err(), "{bad:?}");
        }
    }
}
