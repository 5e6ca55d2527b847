//! The pooler: a PostgreSQL wire-protocol pooler for many small apps on one cluster.
//!
//! The modules, bottom to top: each names only modules above it in this list, never
//! one below (a test in `tests/tests/layering.rs` holds the order).
//!
//! - [`proto`]: the wire protocol without I/O: framing, startup, messages, errors;
//! - [`verifier`]: stored SCRAM-SHA-256 verifiers, and mock ones for unknown roles;
//! - [`config`]: the one place defaults live;
//! - [`pool`]: per-role pools under one budget (a pure scheduler decides who gets a slot);
//! - [`registry`]: who is connected (`SHOW CLIENTS`, `SHOW SERVERS`);
//! - [`metrics`]: the counters the hot path adds to, and their Prometheus text;
//! - [`net`]: the accept loop, client and server streams, TLS;
//! - [`auth`]: SCRAM exchanges, the verifier cache behind `dataplane_auth.lookup()`,
//!   login throttling;
//! - [`backend`]: server connections: log in *as the app's role* with its ClientKey
//!   (SCRAM pass-through), what a server reports and what is prepared on it;
//! - [`notify`]: LISTEN in transaction mode: one listener server per role with
//!   listening clients, their inboxes, and the sender check that keeps apps apart;
//! - [`replicas`]: several pooler replicas acting as one through a registry in
//!   Postgres: this replica's share of the cluster's budget, cancel forwarding;
//! - [`shared`]: what every client task shares: per-role state, cancel keys, the
//!   pause switch, and the connector that opens servers for the pools;
//! - [`limits`]: what a configuration asks of the process (open files) and the pools;
//! - [`control`]: the operator's pause, resume, kill and shutdown;
//! - [`reload`]: re-reading the configuration without dropping a client;
//! - [`frontdoor`]: TLS negotiation, cancel requests, the startup packet, the SCRAM
//!   exchange with a client, FATAL errors;
//! - [`session`]: an app client's life after the door: login, then relay a
//!   transaction at a time (or the session), giving the server back on ReadyForQuery `I`;
//! - [`admin`]: HTTP (`/metrics`, `/healthz`, `/readyz`, `/v1/…`) and the
//!   PgBouncer-style console (`psql -d pgbouncer`);
//! - [`fuzzing`]: the entry points of the fuzz targets (`fuzz/`) and of the test that
//!   replays their corpus; not an API;
//! - `start`: builds the shared state, binds the listeners, and hands each accepted
//!   connection to the front door, then to a session or the console.
//!
//! The path of a client connection: [`net`] accepts it; [`frontdoor`] negotiates TLS,
//! serves a CancelRequest, and reads the startup packet; [`session`] authenticates it
//! with [`auth`] and relays, checking servers out of [`pool`] that [`backend`] opened.

pub mod proto;
pub mod verifier;
pub mod config;
pub mod pool;
pub mod registry;
pub mod metrics;
pub mod net;
pub mod auth;
pub mod backend;
pub mod notify;
pub mod replicas;
pub mod shared;
pub mod limits;
pub mod control;
pub mod reload;
pub mod frontdoor;
pub mod session;
pub mod admin;
#[doc(hidden)]
pub mod fuzzing;
mod start;

pub use shared::{Hooks, LoadConfig, SetLogFilter};
pub use start::{Running, StartError, raise_open_files, start, start_with};
