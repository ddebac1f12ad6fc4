//! Operator surfaces: health, readiness, metrics, the admin API.

pub mod admin;
pub mod client;
pub mod connectors;
pub mod health;
pub mod members;
pub mod page;
