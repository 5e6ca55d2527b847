//! Provisioner integration tests, against the real PostgreSQL the harness starts.

// Test code: a failed unwrap is a failed test with its message, which is what we want.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod api;
mod cli;
mod common;
mod isolation;
mod lifecycle;
mod logs;
