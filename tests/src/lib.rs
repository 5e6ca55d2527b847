//! The throwaway PostgreSQL that every test, benchmark and the dev stack runs against.
//!
//! - [`PgCluster::start`] runs `initdb` into a fresh temp dir and starts `postgres` on a
//!   free loopback port, with `scram-sha-256` for TCP. As root (CI), both run as the
//!   `postgres` OS user, because they refuse to run as root.
//! - [`PgCluster::shared`] is the one cluster of a test binary, started on first use.
//!   Statics are never dropped, so every cluster also gets a watchdog process that waits
//!   for its owner's pid to disappear and then stops the postmaster and removes the dir:
//!   however the test process ends (passed, failed, Ctrl-C, SIGKILL), nothing is left.
//! - Tests get isolation from [`PgCluster::fresh_database`] and [`unique_tenant_id`], not
//!   from separate clusters: an `initdb` costs about a second, a database a few ms.
//! - [`stack`] puts an in-process pooler in front of such a database and provisions apps
//!   with the provisioner library.

// A harness that cannot start Postgres has nothing better to do than fail the test loudly.
#![allow(clippy::expect_used, clippy::panic)]

mod cluster;
pub mod fixtures;
pub mod stack;

pub use cluster::{HarnessError, PgCluster, StartOptions};

use std::sync::atomic::{AtomicU64, Ordering};

/// A tenant id no other test in this process has used, so tests that provision apps in
/// parallel never collide on the cluster-wide role names.
pub fn unique_tenant_id() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    // Start high enough that ids look realistic and leave 1..1000 for hand-written tests.
    1000 + NEXT.fetch_add(1, Ordering::Relaxed)
}

/// Connects with tokio-postgres and drives the connection on a spawned task.
pub async fn connect(
    config: &tokio_postgres::Config,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, connection) = config.connect(tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        // The error, if any, also surfaces on the client's next call.
        let _ = connection.await;
    });
    Ok(client)
}
