//! Operator surfaces: health, readiness, metrics, the admin API.

pub mod admin;
pub mod client;
pub mod client_loyalty;
pub mod connectors;
pub mod health;
pub mod members;
pub mod page;
pub mod reports;
pub mod schedules;
