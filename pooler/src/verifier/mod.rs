//! SCRAM-SHA-256 verifiers as PostgreSQL stores them in `pg_authid.rolpassword` and we in
//! `dataplane_auth.credentials.scram_verifier`:
//! `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>` (PostgreSQL docs,
//! "Password Authentication"; `parse_scram_secret` in auth-scram.c), base64 throughout.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use thiserror::Error;
use zeroize::Zeroize;

pub(crate) mod crypto;

/// PostgreSQL's default `scram_iterations`, and the count every mock verifier uses, so a
/// mock looks like a real verifier made with the defaults.
pub const DEFAULT_ITERATIONS: u32 = 4096;
/// PostgreSQL's salt length (`SCRAM_DEFAULT_SALT_LEN`), used by mock verifiers.
pub const MOCK_SALT_LEN: usize = 16;

const PREFIX: &str = "SCRAM-SHA-256$";

/// A parsed verifier. The keys are wiped on drop and never printed by `Debug`.
/// No `PartialEq`: keys are compared only in constant time, where SCRAM needs it.
#[derive(Clone)]
pub struct ScramSecret {
    pub iterations: u32,
    /// The decoded salt.
    pub salt: Vec<u8>,
    /// The salt exactly as stored; sent in server-first-message.
    pub salt_b64: String,
    pub stored_key: [u8; 32],
    pub server_key: [u8; 32],
}

impl Drop for ScramSecret {
    fn drop(&mut self) {
        // ServerKey lets its holder impersonate the server to clients; StoredKey plus one
        // observed exchange recovers a ClientKey. Neither should outlive its use.
        self.stored_key.zeroize();
        self.server_key.zeroize();
    }
}

impl std::fmt::Debug for ScramSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScramSecret")
            .field("iterations", &self.iterations)
            .field("salt_b64", &self.salt_b64)
            .field("stored_key", &"<redacted>")
            .field("server_key", &"<redacted>")
            .finish()
    }
}

/// Why a stored verifier was refused. Never contains the verifier itself.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum VerifierError {
    #[error("verifier does not start with SCRAM-SHA-256$")]
    WrongMechanism,
    #[error("verifier is missing its {0}")]
    Missing(&'static str),
    #[error("verifier iteration count is not a positive integer")]
    BadIterations,
    #[error("verifier {0} is not valid base64")]
    BadBase64(&'static str),
    #[error("verifier salt is empty")]
    EmptySalt,
    #[error("verifier {field} is {len} bytes, expected 32")]
    BadKeyLength { field: &'static str, len: usize },
}

impl ScramSecret {
    /// Parses `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`.
    pub fn parse(verifier: &str) -> Result<ScramSecret, VerifierError> {
        let rest = verifier
            .strip_prefix(PREFIX)
            .ok_or(VerifierError::WrongMechanism)?;
        let (params, keys) = rest.split_once('$').ok_or(VerifierError::Missing("keys"))?;
        let (iterations, salt_b64) = params
            .split_once(':')
            .ok_or(VerifierError::Missing("salt"))?;
        let (stored_b64, server_b64) = keys
            .split_once(':')
            .ok_or(VerifierError::Missing("ServerKey"))?;
        // Digits only: `u32::from_str` would also take a leading '+'.
        if iterations.is_empty() || !iterations.bytes().all(|b| b.is_ascii_digit()) {
            return Err(VerifierError::BadIterations);
        }
        let iterations: u32 = iterations
            .parse()
            .ok()
            .filter(|&n| n > 0)
            .ok_or(VerifierError::BadIterations)?;
        let salt = STANDARD
            .decode(salt_b64)
            .map_err(|_| VerifierError::BadBase64("salt"))?;
        if salt.is_empty() {
            return Err(VerifierError::EmptySalt);
        }
        Ok(ScramSecret {
            iterations,
            salt,
            salt_b64: salt_b64.to_owned(),
            stored_key: decode_key(stored_b64, "StoredKey")?,
            server_key: decode_key(server_b64, "ServerKey")?,
        })
    }

    /// A verifier for a role that does not exist (or may not log in), so that its
    /// exchange fails exactly like a wrong password: at client-final, with InvalidProof,
    /// after the same work (design.md, "Authenticate").
    ///
    /// The salt is derived from `(role, process_secret)`, so it is the same on every
    /// attempt (a salt that changed per attempt would reveal that the role is unknown)
    /// and cannot be predicted without the secret. The keys are HMAC outputs too: no
    /// ClientKey hashes to a StoredKey nobody can compute, so no proof is accepted.
    pub fn mock(role: &str, process_secret: &[u8; 32]) -> ScramSecret {
        let derive = |label: &[u8]| crypto::hmac(process_secret, &[label, b"\0", role.as_bytes()]);
        let mut salt = derive(b"mock salt").to_vec();
        salt.truncate(MOCK_SALT_LEN);
        ScramSecret {
            iterations: DEFAULT_ITERATIONS,
            salt_b64: STANDARD.encode(&salt),
            salt,
            stored_key: derive(b"mock StoredKey"),
            server_key: derive(b"mock ServerKey"),
        }
    }

    /// The verifier string, as PostgreSQL would store it.
    pub fn to_verifier_string(&self) -> String {
        format!(
            "{PREFIX}{}:{}${}:{}",
            self.iterations,
            self.salt_b64,
            STANDARD.encode(self.stored_key),
            STANDARD.encode(self.server_key)
        )
    }
}

fn decode_key(b64: &str, field: &'static str) -> Result<[u8; 32], VerifierError> {
    let mut bytes = STANDARD
        .decode(b64)
        .map_err(|_| VerifierError::BadBase64(field))?;
    let key = <[u8; 32]>::try_from(bytes.as_slice()).map_err(|_| VerifierError::BadKeyLength {
        field,
        len: bytes.len(),
    });
    bytes.zeroize();
    key
}
