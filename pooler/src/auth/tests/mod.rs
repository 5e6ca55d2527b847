//! Tests of the SCRAM exchanges against an independent client (postgres-protocol's
//! `ScramSha256`), the RFC 7677 example, and garbage. Shared helpers live here.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, KeyInit, Mac};
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::random_nonce;
use super::scram::{ClientExchange, ClientKey, ScramError, ServerExchange};
use crate::proto::SqlState;
use crate::verifier::{ScramSecret, VerifierError};

mod client;
mod secrets;
mod server;

pub(super) fn hmac(key: &[u8], data: &[u8]) -> [u8; 32] {
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(key).unwrap();
    mac.update(data);
    mac.finalize().into_bytes().into()
}

/// PBKDF2-HMAC-SHA-256 with one block: RFC 5802's Hi().
pub(super) fn salted_password(password: &[u8], salt: &[u8], iterations: u32) -> [u8; 32] {
    let mut u = hmac(password, &[salt, &[0, 0, 0, 1]].concat());
    let mut out = u;
    for _ in 1..iterations {
        u = hmac(password, &u);
        for (o, x) in out.iter_mut().zip(u) {
            *o ^= x;
        }
    }
    out
}

/// A verifier computed by hand, as PostgreSQL's `scram_build_secret` does.
pub(super) fn verifier(password: &str, salt: &[u8], iterations: u32) -> (ScramSecret, [u8; 32]) {
    let salted = salted_password(password.as_bytes(), salt, iterations);
    let client_key = hmac(&salted, b"Client Key");
    let stored_key: [u8; 32] = Sha256::digest(client_key).into();
    let server_key = hmac(&salted, b"Server Key");
    let s = format!(
        "SCRAM-SHA-256${iterations}:{}${}:{}",
        STANDARD.encode(salt),
        STANDARD.encode(stored_key),
        STANDARD.encode(server_key)
    );
    (ScramSecret::parse(&s).unwrap(), client_key)
}

/// Drives our server with postgres-protocol's client. Returns the ClientKey on success.
pub(super) fn pg_client_login(
    password: &str,
    secret: &ScramSecret,
    cb: ChannelBinding,
) -> Result<ClientKey, ScramError> {
    let mut client = ScramSha256::new(password.as_bytes(), cb);
    let mut server = ServerExchange::new(secret.clone(), "srvNONCE+/=").unwrap();
    let server_first = server.client_first(client.message())?;
    client.update(&server_first).unwrap();
    let (server_final, key) = server.client_final(client.message())?;
    // The independent client must accept our server signature.
    client.finish(&server_final).unwrap();
    Ok(key)
}
