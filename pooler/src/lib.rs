//! The pooler: a PostgreSQL wire-protocol pooler for many small apps on one cluster.
//!
//! The path of a client connection through the modules (design.md, "Pooler"):
//! 1. [`net`] accepts it (a semaphore bounds clients), answers SSLRequest/GSSENCRequest,
//!    and routes a CancelRequest;
//! 2. [`proto`] (no I/O) frames every message, with a maximum length per type checked
//!    before anything is allocated;
//! 3. [`session`] reads the startup packet and runs [`auth`]: the verifier comes from
//!    `dataplane_auth.lookup()` (cached, single-flight, dropped on NOTIFY), the SCRAM
//!    exchange recovers the client's ClientKey;
//! 4. [`pool`] checks a server out of the role's pool under the global budget (a pure
//!    scheduler decides who gets a slot), and [`backend`] opens servers by logging in
//!    *as the same role* with that ClientKey (SCRAM pass-through);
//! 5. [`session`] relays a transaction at a time and gives the server back on
//!    ReadyForQuery `I`;
//! 6. [`admin`] serves `/healthz` and `/readyz`.

pub mod auth;
pub mod pool;
pub mod proto;
