//! Per-role pools under one global budget.
