//! SQLSTATE codes the pooler reports, and the errors of encoding and decoding message
//! bodies.
//!
//! Codes are from the PostgreSQL docs, Appendix A "PostgreSQL Error Codes".

use thiserror::Error;

/// A five-character SQLSTATE. Only the constants below exist, so a code is always valid
/// on the wire (five ASCII characters, no NUL).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct SqlState(&'static str);

impl SqlState {
    /// 28P01 invalid_password: a failed SCRAM proof, and (on purpose) an unknown role.
    pub const INVALID_PASSWORD: SqlState = SqlState("28P01");
    /// 28000 invalid_authorization_specification: e.g. no user in the startup packet.
    pub const INVALID_AUTHORIZATION_SPECIFICATION: SqlState = SqlState("28000");
    /// 08P01 protocol_violation: malformed or oversized messages.
    pub const PROTOCOL_VIOLATION: SqlState = SqlState("08P01");
    /// 08006 connection_failure: the pooler could not reach or log in to a server.
    pub const CONNECTION_FAILURE: SqlState = SqlState("08006");
    /// 08007 transaction_resolution_unknown: the server was lost (or closed at the end
    /// of a shutdown) while a request of the client's was unanswered, a COMMIT perhaps.
    pub const TRANSACTION_RESOLUTION_UNKNOWN: SqlState = SqlState("08007");
    /// 53300 too_many_connections: client limit, or pool wait timeout.
    pub const TOO_MANY_CONNECTIONS: SqlState = SqlState("53300");
    /// 53400 configuration_limit_exceeded: a per-client bound of the pooler's
    /// configuration (pins, prepared statements and their bytes).
    pub const CONFIGURATION_LIMIT_EXCEEDED: SqlState = SqlState("53400");
    /// 54000 program_limit_exceeded: a message the pooler must hold whole is over
    /// `max_message_bytes`.
    pub const PROGRAM_LIMIT_EXCEEDED: SqlState = SqlState("54000");
    /// 25P03 idle_in_transaction_session_timeout: PostgreSQL's own code for a session
    /// idle in a transaction for too long (`idle_transaction_timeout_ms`).
    pub const IDLE_IN_TRANSACTION_TIMEOUT: SqlState = SqlState("25P03");
    /// 57P01 admin_shutdown: the pooler is shutting down.
    pub const ADMIN_SHUTDOWN: SqlState = SqlState("57P01");
    /// 3D000 invalid_catalog_name: unknown database.
    pub const INVALID_CATALOG_NAME: SqlState = SqlState("3D000");
    /// 0A000 feature_not_supported: e.g. an unsupported protocol version.
    pub const FEATURE_NOT_SUPPORTED: SqlState = SqlState("0A000");
    /// 57P03 cannot_connect_now: the pooler cannot reach Postgres (lookup, login).
    pub const CANNOT_CONNECT_NOW: SqlState = SqlState("57P03");
    /// 57014 query_canceled.
    pub const QUERY_CANCELED: SqlState = SqlState("57014");
    /// XX000 internal_error: the pooler's own fault.
    pub const INTERNAL_ERROR: SqlState = SqlState("XX000");
    /// 00000 successful_completion: the code of the console's notices.
    pub const SUCCESSFUL_COMPLETION: SqlState = SqlState("00000");
    /// 01000 warning: a console notice about something that did not take effect.
    pub const WARNING: SqlState = SqlState("01000");
    /// 25P02 in_failed_sql_transaction: a statement in a transaction that already failed.
    pub const IN_FAILED_SQL_TRANSACTION: SqlState = SqlState("25P02");
    /// 26000 invalid_sql_statement_name: a prepared statement that does not exist.
    pub const INVALID_SQL_STATEMENT_NAME: SqlState = SqlState("26000");
    /// 42601 syntax_error: an admin console command the pooler does not know.
    pub const SYNTAX_ERROR: SqlState = SqlState("42601");
    /// 22023 invalid_parameter_value: e.g. a startup setting's value.
    pub const INVALID_PARAMETER_VALUE: SqlState = SqlState("22023");
    /// 42501 insufficient_privilege: e.g. a startup setting the role may not make.
    pub const INSUFFICIENT_PRIVILEGE: SqlState = SqlState("42501");
    /// 55P02 cant_change_runtime_param: a startup setting of a parameter fixed at start.
    pub const CANT_CHANGE_RUNTIME_PARAM: SqlState = SqlState("55P02");
    /// 42704 undefined_object: e.g. `KILL` of a role the pooler has never seen.
    pub const UNDEFINED_OBJECT: SqlState = SqlState("42704");
    /// 55000 object_not_in_prerequisite_state: e.g. `RESUME` of what is not paused.
    pub const OBJECT_NOT_IN_PREREQUISITE_STATE: SqlState = SqlState("55000");
    /// F0000 config_file_error: a reload found the configuration invalid.
    pub const CONFIG_FILE_ERROR: SqlState = SqlState("F0000");

    /// The five-character code.
    pub const fn code(self) -> &'static str {
        self.0
    }

    /// The constant for a code a server sent, if the pooler has one.
    pub fn known(code: &str) -> Option<SqlState> {
        [
            SqlState::SYNTAX_ERROR,
            SqlState::UNDEFINED_OBJECT,
            SqlState::INVALID_PARAMETER_VALUE,
            SqlState::INSUFFICIENT_PRIVILEGE,
            SqlState::CANT_CHANGE_RUNTIME_PARAM,
            SqlState::FEATURE_NOT_SUPPORTED,
            SqlState::IN_FAILED_SQL_TRANSACTION,
            SqlState::INVALID_SQL_STATEMENT_NAME,
        ]
        .into_iter()
        .find(|s| s.0 == code)
    }
}

impl std::fmt::Debug for SqlState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SqlState({})", self.0)
    }
}

impl std::fmt::Display for SqlState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}

/// A message could not be written. The buffer is left as it was before the call.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum EncodeError {
    /// Strings in the protocol are C strings ("Message Data Types": String), so a NUL
    /// inside one would end it early and desynchronise the reader.
    #[error("{what} contains a NUL byte")]
    InteriorNul { what: &'static str },
    /// The length word is an Int32 that counts itself ("Message Formats").
    #[error("{what} is too long to encode ({len} bytes)")]
    TooLong { what: &'static str, len: usize },
}

/// A message body could not be decoded. Always the peer's fault: 08P01.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ParseError {
    #[error("{what}: message is truncated")]
    Truncated { what: &'static str },
    #[error("{what}: string is not NUL-terminated")]
    MissingNul { what: &'static str },
    #[error("{what}: unexpected bytes after the end of the message")]
    TrailingBytes { what: &'static str },
    #[error("{what}: text is not valid UTF-8")]
    NotUtf8 { what: &'static str },
    #[error("{what}: {reason}")]
    Invalid {
        what: &'static str,
        reason: &'static str,
    },
    #[error("{what}: {len} bytes is more than the maximum of {max}")]
    TooLong {
        what: &'static str,
        len: usize,
        max: usize,
    },
}

impl ParseError {
    /// Every decoding error is a protocol violation.
    pub fn sqlstate(&self) -> SqlState {
        SqlState::PROTOCOL_VIOLATION
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::backend::{self, write_fatal};
    use bytes::BytesMut;

    #[test]
    fn codes_are_five_ascii_characters() {
        for code in [
            SqlState::INVALID_PASSWORD,
            SqlState::INVALID_AUTHORIZATION_SPECIFICATION,
            SqlState::PROTOCOL_VIOLATION,
            SqlState::CONNECTION_FAILURE,
            SqlState::TOO_MANY_CONNECTIONS,
            SqlState::ADMIN_SHUTDOWN,
            SqlState::INVALID_CATALOG_NAME,
            SqlState::FEATURE_NOT_SUPPORTED,
            SqlState::QUERY_CANCELED,
            SqlState::INTERNAL_ERROR,
            SqlState::SUCCESSFUL_COMPLETION,
            SqlState::WARNING,
            SqlState::SYNTAX_ERROR,
            SqlState::UNDEFINED_OBJECT,
            SqlState::OBJECT_NOT_IN_PREREQUISITE_STATE,
            SqlState::CONFIG_FILE_ERROR,
        ] {
            assert_eq!(code.code().len(), 5);
            assert!(
                code.code()
                    .bytes()
                    .all(|b| b.is_ascii_digit() || b.is_ascii_uppercase())
            );
        }
    }

    #[test]
    fn write_fatal_round_trips() {
        let mut buf = BytesMut::new();
        write_fatal(
            &mut buf,
            SqlState::INVALID_PASSWORD,
            "password authentication failed",
        );
        let Some((tag, body)) =
            crate::proto::frame::split(&mut buf, crate::proto::frame::Side::Backend).unwrap()
        else {
            panic!("incomplete")
        };
        assert_eq!(tag, b'E');
        let e = backend::parse_error_response(&body).unwrap();
        assert_eq!(e.severity, "FATAL");
        assert_eq!(e.code, "28P01");
        assert_eq!(e.message, "password authentication failed");
    }
}
