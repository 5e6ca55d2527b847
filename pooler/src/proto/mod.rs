//! The wire protocol, without I/O: bytes in, typed values out (and back).
//!
//! Nothing here reads or writes a socket or imports tokio. Every length read from the
//! wire is checked against a maximum before anything is buffered or allocated for it.
//!
//! - [`frame`]: tag + length framing for both directions, and a zero-allocation walk over
//!   the complete messages of a read buffer (the relay hot path);
//! - [`startup`]: the untagged first packets (SSLRequest, GSSENCRequest, CancelRequest,
//!   StartupMessage) and the pooler's own startup to a server;
//! - [`backend`]: messages the pooler writes to clients, and the few server messages it
//!   must read;
//! - [`frontend`]: client messages the pooler acts on (SASL, password, Query);
//! - [`options`]: the `options` startup parameter, read as the server reads it;
//! - [`error`]: SQLSTATE codes and the ErrorResponse helper.
//!
//! Frontend messages the pooler sends to servers are written with
//! `postgres_protocol::message::frontend`, and backend messages it reads during its own
//! login are parsed with `postgres_protocol::message::backend`; this module only adds
//! what those lack.

pub mod backend;
pub mod error;
pub mod frame;
pub mod frontend;
pub mod options;
pub mod startup;

mod wire;

pub use error::SqlState;

#[cfg(test)]
mod tests;
