//! Pooler integration tests: a real PostgreSQL, apps made by the real provisioner,
//! real clients (tokio-postgres, psql) through an in-process pooler.

// Test code: a failed unwrap is a failed test with its message, which is what we want.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod abuse;
mod admin;
mod binary;
mod common;
mod desync;
mod drain;
mod flood;
mod functions;
mod listen;
mod login;
mod metrics;
mod names;
mod parking;
mod pooling;
mod prepared;
mod protocol;
mod raw;
mod replicas;
mod restart;
mod revocation;
mod session_mode;
mod startup;
mod state;
mod tls;
