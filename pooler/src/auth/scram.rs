//! SCRAM-SHA-256 (RFC 5802, RFC 7677) as PostgreSQL uses it ("SASL Authentication"), in
//! both roles the pooler plays:
//!
//! - [`ServerExchange`]: the pooler verifies a client against a stored verifier and, as
//!   a by-product, recovers the client's ClientKey (design.md, "Pass-through keys");
//! - [`ClientExchange`]: the pooler logs in to PostgreSQL as the same role with that
//!   ClientKey and no password, and checks the server against the verifier's ServerKey.
//!
//! Hand-written because no library verifies from StoredKey/ServerKey or exposes the
//! ClientKey. Pure: no I/O, and nonces come in as parameters so tests can replay fixed
//! exchanges. Neither side offers channel binding (`-PLUS`), so the only gs2 headers
//! are `n,,` and `y,,`.
//!
//! Messages (RFC 5802 §7), without extensions the pooler accepts and ignores:
//! ```text
//! client-first  = gs2-header "n=" username ",r=" c-nonce
//! server-first  = "r=" c-nonce s-nonce ",s=" salt ",i=" iterations
//! client-final  = "c=" base64(gs2-header) ",r=" c-nonce s-nonce ",p=" base64(ClientProof)
//! server-final  = "v=" base64(ServerSignature) / "e=" server-error-value
//! ```

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use subtle::ConstantTimeEq;
use thiserror::Error;
use zeroize::{Zeroize, ZeroizeOnDrop};

mod parse;

use self::parse::{
    Gs2, as_text, attr, check_extensions, decode_32, is_nonce, parse_client_first_bare,
    parse_gs2_header, parse_iterations,
};
use crate::proto::SqlState;
use crate::proto::frontend::MAX_SASL_MESSAGE_LEN;
use crate::verifier::ScramSecret;
use crate::verifier::crypto::{hmac, sha256, xor};

/// The mechanism name advertised in AuthenticationSASL.
pub const SCRAM_SHA_256: &str = "SCRAM-SHA-256";

/// A client's ClientKey: enough to log in as the role anywhere the same verifier is
/// stored, so it lives in memory only, is wiped on drop, and is never printed.
#[derive(Clone)]
pub struct ClientKey([u8; 32]);

impl ClientKey {
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        ClientKey(bytes)
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl Drop for ClientKey {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl ZeroizeOnDrop for ClientKey {}

impl ConstantTimeEq for ClientKey {
    fn ct_eq(&self, other: &Self) -> subtle::Choice {
        self.0.ct_eq(&other.0)
    }
}

impl std::fmt::Debug for ClientKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClientKey(<redacted>)")
    }
}

/// Why an exchange failed. No variant carries a key, proof or nonce.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ScramError {
    /// The client's proof does not match the verifier: a wrong password, or an unknown
    /// role (mock verifier). 28P01.
    #[error("password authentication failed")]
    InvalidProof,
    #[error("SCRAM message is longer than {MAX_SASL_MESSAGE_LEN} bytes")]
    TooLong,
    #[error("SCRAM message is not valid UTF-8")]
    NotUtf8,
    #[error("malformed SCRAM message: {0}")]
    Malformed(&'static str),
    #[error("malformed SCRAM message: expected attribute '{0}'")]
    MissingAttribute(char),
    #[error("channel binding is not supported (SCRAM-SHA-256-PLUS is not offered)")]
    ChannelBindingNotSupported,
    #[error("client uses authorization identity, but it is not supported")]
    AuthzidNotSupported,
    #[error("client requires an unsupported SCRAM extension")]
    ExtensionNotSupported,
    #[error("invalid characters in SCRAM nonce")]
    InvalidNonce,
    #[error("SCRAM nonce does not match")]
    NonceMismatch,
    #[error("SCRAM channel binding check failed")]
    ChannelBindingMismatch,
    /// The server's salt or iteration count differ from our verifier's: the credentials
    /// table and `pg_authid` disagree. Salts and counts are public (every client sees
    /// them), so they are reported to say exactly what differs.
    #[error(
        "server verifier differs from ours: iterations {server_iterations} vs {expected_iterations}, salt {server_salt} vs {expected_salt}"
    )]
    VerifierMismatch {
        expected_iterations: u32,
        server_iterations: u32,
        expected_salt: String,
        server_salt: String,
    },
    /// The server's signature does not match our ServerKey: it is not the server (or
    /// not the verifier) we think it is.
    #[error("server signature does not match the verifier")]
    ServerSignatureMismatch,
    /// The server ended the exchange with `e=` (RFC 5802 §7 server-error-value).
    #[error("server reported SCRAM error: {0}")]
    ServerError(String),
    /// A method was called out of order: the caller's bug.
    #[error("SCRAM exchange used out of order: {0}")]
    State(&'static str),
}

impl ScramError {
    /// What to tell a client: a bad proof is 28P01, a broken exchange 08P01, a failed
    /// login to the server 08006, misuse XX000.
    pub fn sqlstate(&self) -> SqlState {
        match self {
            ScramError::InvalidProof => SqlState::INVALID_PASSWORD,
            ScramError::VerifierMismatch { .. }
            | ScramError::ServerSignatureMismatch
            | ScramError::ServerError(_) => SqlState::CONNECTION_FAILURE,
            ScramError::State(_) => SqlState::INTERNAL_ERROR,
            _ => SqlState::PROTOCOL_VIOLATION,
        }
    }
}

/// The server side of one exchange: `new` → `client_first` → `client_final`.
pub struct ServerExchange {
    state: ServerState,
}

enum ServerState {
    AwaitingClientFirst {
        secret: ScramSecret,
        server_nonce: String,
    },
    AwaitingClientFinal {
        secret: ScramSecret,
        gs2: Gs2,
        client_first_bare: String,
        server_first: String,
        nonce: String,
    },
    /// Succeeded or failed: one exchange, one verdict, no retries.
    Finished,
}

impl std::fmt::Debug for ServerExchange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = match self.state {
            ServerState::AwaitingClientFirst { .. } => "AwaitingClientFirst",
            ServerState::AwaitingClientFinal { .. } => "AwaitingClientFinal",
            ServerState::Finished => "Finished",
        };
        f.debug_struct("ServerExchange")
            .field("state", &state)
            .finish()
    }
}

impl ServerExchange {
    /// Starts an exchange against `secret` (a real or a mock verifier). `server_nonce`
    /// must be printable ASCII without ',' (RFC 5802 §7 "printable"), e.g.
    /// [`super::random_nonce`].
    pub fn new(secret: ScramSecret, server_nonce: &str) -> Result<Self, ScramError> {
        if !is_nonce(server_nonce) {
            return Err(ScramError::InvalidNonce);
        }
        Ok(ServerExchange {
            state: ServerState::AwaitingClientFirst {
                secret,
                server_nonce: server_nonce.to_owned(),
            },
        })
    }

    /// Takes the client-first-message (the data of SASLInitialResponse) and returns the
    /// server-first-message (for AuthenticationSASLContinue).
    pub fn client_first(&mut self, client_first: &[u8]) -> Result<Vec<u8>, ScramError> {
        let ServerState::AwaitingClientFirst {
            secret,
            server_nonce,
        } = std::mem::replace(&mut self.state, ServerState::Finished)
        else {
            return Err(ScramError::State("client_first called twice"));
        };
        let text = as_text(client_first)?;
        let (gs2, bare) = parse_gs2_header(text)?;
        let client_nonce = parse_client_first_bare(bare)?;
        let nonce = format!("{client_nonce}{server_nonce}");
        let server_first = format!("r={nonce},s={},i={}", secret.salt_b64, secret.iterations);
        let reply = server_first.clone().into_bytes();
        self.state = ServerState::AwaitingClientFinal {
            secret,
            gs2,
            client_first_bare: bare.to_owned(),
            server_first,
            nonce,
        };
        Ok(reply)
    }

    /// Takes the client-final-message (the data of SASLResponse). On success returns the
    /// server-final-message (`v=...`, for AuthenticationSASLFinal) and the client's
    /// ClientKey. A wrong proof is [`ScramError::InvalidProof`]; anything else is a
    /// protocol error.
    pub fn client_final(
        &mut self,
        client_final: &[u8],
    ) -> Result<(Vec<u8>, ClientKey), ScramError> {
        let ServerState::AwaitingClientFinal {
            secret,
            gs2,
            client_first_bare,
            server_first,
            nonce,
        } = std::mem::replace(&mut self.state, ServerState::Finished)
        else {
            return Err(ScramError::State("client_final called out of order"));
        };
        let text = as_text(client_final)?;
        // The proof is the last attribute (RFC 5802 §7), and no attribute value may
        // contain ',', so the last ",p=" starts it.
        let (without_proof, proof_b64) = text
            .rsplit_once(",p=")
            .ok_or(ScramError::MissingAttribute('p'))?;
        let mut attrs = without_proof.split(',');
        let cbind = attr(attrs.next(), 'c')?;
        let final_nonce = attr(attrs.next(), 'r')?;
        check_extensions(attrs)?;
        if cbind != gs2.cbind_b64() {
            return Err(ScramError::ChannelBindingMismatch);
        }
        if final_nonce != nonce {
            return Err(ScramError::NonceMismatch);
        }
        let mut proof = decode_32(proof_b64).ok_or(ScramError::Malformed("invalid proof"))?;

        // RFC 5802 §3, design.md point 4:
        //   AuthMessage     = client-first-bare "," server-first "," client-final-without-proof
        //   ClientSignature = HMAC(StoredKey, AuthMessage)
        //   ClientKey       = ClientProof XOR ClientSignature
        //   accept iff H(ClientKey) == StoredKey, compared in constant time.
        let auth_message = [
            client_first_bare.as_bytes(),
            b",",
            server_first.as_bytes(),
            b",",
            without_proof.as_bytes(),
        ];
        let client_signature = hmac(&secret.stored_key, &auth_message);
        let client_key = ClientKey(xor(&proof, &client_signature));
        proof.zeroize();
        if !bool::from(sha256(&client_key.0).ct_eq(&secret.stored_key)) {
            return Err(ScramError::InvalidProof);
        }
        let server_signature = hmac(&secret.server_key, &auth_message);
        let reply = format!("v={}", STANDARD.encode(server_signature)).into_bytes();
        Ok((reply, client_key))
    }
}

/// The client side, logging in to PostgreSQL with a ClientKey instead of a password:
/// `new` → `client_first` → `server_first` → `server_final`.
pub struct ClientExchange {
    client_key: ClientKey,
    server_key: [u8; 32],
    salt: Vec<u8>,
    salt_b64: String,
    iterations: u32,
    client_nonce: String,
    state: ClientState,
}

enum ClientState {
    AwaitingServerFirst,
    AwaitingServerFinal {
        auth_message: String,
    },
    /// The server proved it holds the verifier's ServerKey: only now may a login
    /// that AuthenticationOk ends be trusted.
    Verified,
}

impl Drop for ClientExchange {
    fn drop(&mut self) {
        self.server_key.zeroize();
    }
}

impl std::fmt::Debug for ClientExchange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = match self.state {
            ClientState::AwaitingServerFirst => "AwaitingServerFirst",
            ClientState::AwaitingServerFinal { .. } => "AwaitingServerFinal",
            ClientState::Verified => "Verified",
        };
        f.debug_struct("ClientExchange")
            .field("state", &state)
            .finish_non_exhaustive()
    }
}

impl ClientExchange {
    /// `expected` is the verifier the ClientKey was recovered with: its salt and
    /// iteration count must be what the server announces, and its ServerKey checks the
    /// server's signature. `client_nonce`: printable ASCII without ','.
    pub fn new(
        client_key: &ClientKey,
        expected: &ScramSecret,
        client_nonce: &str,
    ) -> Result<Self, ScramError> {
        if !is_nonce(client_nonce) {
            return Err(ScramError::InvalidNonce);
        }
        Ok(ClientExchange {
            client_key: client_key.clone(),
            server_key: expected.server_key,
            salt: expected.salt.clone(),
            salt_b64: expected.salt_b64.clone(),
            iterations: expected.iterations,
            client_nonce: client_nonce.to_owned(),
            state: ClientState::AwaitingServerFirst,
        })
    }

    /// The client-first-message, for SASLInitialResponse with [`SCRAM_SHA_256`].
    /// `n,,`: no channel binding, which PostgreSQL accepts whether or not it offers
    /// `-PLUS`; the user name is empty because PostgreSQL uses the startup packet's.
    pub fn client_first(&self) -> Vec<u8> {
        format!("n,,{}", self.client_first_bare()).into_bytes()
    }

    fn client_first_bare(&self) -> String {
        format!("n=,r={}", self.client_nonce)
    }

    /// Takes the server-first-message (AuthenticationSASLContinue) and returns the
    /// client-final-message (for SASLResponse).
    pub fn server_first(&mut self, server_first: &[u8]) -> Result<Vec<u8>, ScramError> {
        if !matches!(self.state, ClientState::AwaitingServerFirst) {
            return Err(ScramError::State("server_first called twice"));
        }
        let text = as_text(server_first)?;
        let mut attrs = text.split(',');
        let first = attrs.next();
        if first.is_some_and(|a| a.starts_with("m=")) {
            return Err(ScramError::ExtensionNotSupported);
        }
        let nonce = attr(first, 'r')?;
        let salt_b64 = attr(attrs.next(), 's')?;
        let iterations = attr(attrs.next(), 'i')?;
        check_extensions(attrs)?;
        // The server's part must follow ours and be non-empty (RFC 5802 §5.1).
        if !is_nonce(nonce) {
            return Err(ScramError::InvalidNonce);
        }
        if nonce.len() <= self.client_nonce.len() || !nonce.starts_with(&self.client_nonce) {
            return Err(ScramError::NonceMismatch);
        }
        let salt = STANDARD
            .decode(salt_b64)
            .map_err(|_| ScramError::Malformed("invalid salt"))?;
        let iterations = parse_iterations(iterations)?;
        if salt != self.salt || iterations != self.iterations {
            return Err(ScramError::VerifierMismatch {
                expected_iterations: self.iterations,
                server_iterations: iterations,
                expected_salt: self.salt_b64.clone(),
                server_salt: salt_b64.to_owned(),
            });
        }
        // design.md point 5: ClientProof = ClientKey XOR HMAC(H(ClientKey), AuthMessage').
        let without_proof = format!("c={},r={nonce}", Gs2::No.cbind_b64());
        let auth_message = format!("{},{text},{without_proof}", self.client_first_bare());
        let mut stored_key = sha256(&self.client_key.0);
        let client_signature = hmac(&stored_key, &[auth_message.as_bytes()]);
        stored_key.zeroize();
        let mut proof = xor(&self.client_key.0, &client_signature);
        let reply = format!("{without_proof},p={}", STANDARD.encode(proof)).into_bytes();
        proof.zeroize();
        self.state = ClientState::AwaitingServerFinal { auth_message };
        Ok(reply)
    }

    /// Checks the server-final-message (AuthenticationSASLFinal): its `v=` must be
    /// HMAC(ServerKey, AuthMessage), compared in constant time. Once it is, the
    /// exchange is [`verified`](Self::verified); a second call is out of order.
    pub fn server_final(&mut self, server_final: &[u8]) -> Result<(), ScramError> {
        let auth_message = match &self.state {
            ClientState::AwaitingServerFinal { auth_message } => auth_message,
            ClientState::AwaitingServerFirst => {
                return Err(ScramError::State("server_final before server_first"));
            }
            ClientState::Verified => return Err(ScramError::State("server_final called twice")),
        };
        let text = as_text(server_final)?;
        if let Some(error) = text.strip_prefix("e=") {
            return Err(ScramError::ServerError(error.to_owned()));
        }
        let mut attrs = text.split(',');
        let signature = attr(attrs.next(), 'v')?;
        check_extensions(attrs)?;
        let signature =
            decode_32(signature).ok_or(ScramError::Malformed("invalid server signature"))?;
        let expected = hmac(&self.server_key, &[auth_message.as_bytes()]);
        if bool::from(signature.ct_eq(&expected)) {
            self.state = ClientState::Verified;
            Ok(())
        } else {
            Err(ScramError::ServerSignatureMismatch)
        }
    }

    /// Whether the server's signature was checked and matched. A server that says
    /// AuthenticationOk before this has proved nothing: anyone can send it.
    pub fn verified(&self) -> bool {
        matches!(self.state, ClientState::Verified)
    }
}
