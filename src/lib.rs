//! perkflow: verified webhooks in, durable rewards out.
//!
//! Modules follow one webhook: `ingest` (HTTP edge) -> `verify` (signature kinds) ->
//! `inbox` (de-duplicated, durable) over `store` (sled). `config` and `connector` turn YAML
//! into a checked configuration; `app` wires it all; `ops` serves health and metrics.

pub mod alloc;
pub mod app;
pub mod codes;
pub mod config;
pub mod connector;
pub mod dedup;
pub mod delivery;
pub mod demo;
pub mod eventlog;
pub mod http;
pub mod inbox;
pub mod ingest;
pub mod ledger;
pub mod lookups;
pub mod ops;
pub mod outbox;
pub mod pipeline;
pub mod redact;
pub mod reload;
pub mod reports;
pub mod retention;
pub mod sandbox;
pub mod schedule;
pub mod sign;
pub mod sink;
pub mod store;
pub mod verify;
pub mod wal;
pub mod worker;
