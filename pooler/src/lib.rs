//! The pooler: a PostgreSQL wire-protocol pooler for many small apps on one cluster.
//!
//! The path of a client connection through the modules (design.md, "Pooler"):
//! 1. [`net`] accepts it (a semaphore bounds clients), answers SSLRequest/GSSENCRequest
//!    and routes a CancelRequest to the server the client is linked to;
//! 2. [`proto`] (no I/O) frames every message, with a maximum length per type checked
//!    before anything is allocated;
//! 3. [`session`] reads the startup packet and runs [`auth`]: the verifier comes from
//!    `dataplane_auth.lookup()` (cached, single-flight, dropped on NOTIFY), and the
//!    SCRAM exchange recovers the client's ClientKey;
//! 4. [`pool`] checks a server out of the role's pool under the global budget (a pure
//!    scheduler decides who gets a slot), and [`backend`] opens servers by logging in
//!    *as the same role* with that ClientKey (SCRAM pass-through);
//! 5. [`session`] relays a transaction at a time and gives the server back on
//!    ReadyForQuery `I`;
//! 6. [`admin`] serves `/healthz`, `/readyz`, `/v1/pools` and `/v1/reload` over HTTP,
//!    and the PgBouncer-style console (`psql -d pgbouncer`), which [`session`] hands
//!    a client to instead of logging it in as an app; [`control`] (pause, kill,
//!    shutdown) and [`reload`] are what both offer; [`registry`] knows who is
//!    connected; [`config`] is the one place defaults live; [`shared`] is what all
//!    client tasks share.

pub mod admin;
pub mod auth;
pub mod backend;
pub mod config;
pub mod control;
pub mod metrics;
pub mod net;
pub mod notify;
pub mod pool;
pub mod proto;
pub mod registry;
pub mod reload;
pub mod session;
pub mod shared;
mod start;

pub use start::{
    Hooks, LoadConfig, Running, SetLogFilter, StartError, raise_open_files, start, start_with,
};
