//! Operator surfaces: health, readiness, metrics.

pub mod health;
