//! Settings of `provisioner serve` that the library needs; the CLI (main.rs) fills them
//! from flags and the environment, and documents each default there.

use std::fmt;

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// Shortest API token `serve` accepts: anything shorter is guessable.
pub const MIN_TOKEN_LEN: usize = 16;

/// The bearer token the deploy pipeline presents. `Debug` never shows it.
#[derive(Clone)]
pub struct ApiToken(String);

#[derive(Debug, thiserror::Error)]
#[error("the API token must be at least {MIN_TOKEN_LEN} characters without surrounding whitespace")]
pub struct WeakToken;

impl ApiToken {
    pub fn new(token: &str) -> Result<Self, WeakToken> {
        let token = token.trim();
        if token.len() < MIN_TOKEN_LEN {
            return Err(WeakToken);
        }
        Ok(ApiToken(token.to_owned()))
    }

    /// Constant-time comparison. Hashing both sides first makes the time independent
    /// of the length too.
    pub fn matches(&self, presented: &str) -> bool {
        let a = Sha256::digest(self.0.as_bytes());
        let b = Sha256::digest(presented.as_bytes());
        a.as_slice().ct_eq(b.as_slice()).into()
    }
}

impl fmt::Debug for ApiToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiToken(<redacted>)")
    }
}

/// Where apps reach their database: the pooler's address, put into the connection URI
/// and JDBC URL the API returns.
#[derive(Debug, Clone)]
pub struct PublicEndpoint {
    pub host: String,
    pub port: u16,
    /// `sslmode` for the connection URI (`require` in production, `disable` locally).
    pub sslmode: String,
}

impl Default for PublicEndpoint {
    fn default() -> Self {
        PublicEndpoint {
            host: "localhost".into(),
            port: 5432,
            sslmode: "prefer".into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_checks() {
        assert!(ApiToken::new("short").is_err());
        let t = ApiToken::new("0123456789abcdef").unwrap();
        assert!(t.matches("0123456789abcdef"));
        assert!(!t.matches("0123456789abcdeF"));
        assert!(!t.matches(""));
        assert_eq!(format!("{t:?}"), "ApiToken(<redacted>)");
    }
}
