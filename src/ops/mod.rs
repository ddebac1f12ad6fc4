//! Operator surfaces: health, readiness, metrics, the admin API.

pub mod admin;
pub mod client;
pub mod health;
