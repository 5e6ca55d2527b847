//! Per-role pools under one global budget.

pub mod scheduler;
mod slab;
