//! The pooler: a PostgreSQL wire-protocol pooler for many small apps on one cluster.
//!
//! Not built yet; its design is `shared/design.md`, "Pooler: the path of a client
//! connection". This crate exists so the workspace has its final shape from the start.
