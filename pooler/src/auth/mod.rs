//! SCRAM, verifiers and the verifier cache.
//!
//! - [`scram`]: the pure SCRAM exchanges, server side (recovering the ClientKey) and
//!   client side (logging in to PostgreSQL with it);
//! - [`cache`]: verifiers from `dataplane_auth.lookup()`, cached, single-flight, and
//!   dropped on `NOTIFY dataplane_auth`;
//! - [`limiter`]: failed-login throttling per source address and per (role, source);
//! - [`lru`]: the bounded map behind the cache and the limiter;
//! - [`random_nonce`]: the one place randomness enters, kept out of the state machines.

pub mod cache;
pub mod limiter;
pub mod lru;
pub mod scram;

#[cfg(test)]
mod tests;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use thiserror::Error;

/// Random bytes per nonce: 18 bytes are 24 base64 characters, as PostgreSQL's
/// `SCRAM_RAW_NONCE_LEN` (scram-common.h).
pub const NONCE_BYTES: usize = 18;

/// The operating system's random generator failed.
#[derive(Debug, Error)]
#[error("could not generate random bytes: {0}")]
pub struct RandomError(getrandom::Error);

/// A fresh SCRAM nonce: 18 random bytes, base64. Base64 uses only printable characters
/// other than ',', as RFC 5802 requires of a nonce.
pub fn random_nonce() -> Result<String, RandomError> {
    let mut bytes = [0u8; NONCE_BYTES];
    getrandom::fill(&mut bytes).map_err(RandomError)?;
    Ok(STANDARD.encode(bytes))
}
