//! Integration tests: the daemon as a real process, real HTTP on 127.0.0.1.

mod admin;
mod browser;
mod chaos;
mod config_check;
mod conformance;
mod crash;
mod delivery;
mod demo;
mod fake_vendor;
mod giftcard;
mod helpers;
mod hostile;
mod ingest;
mod ledger_crash;
mod lookups;
mod loyalty;
mod ops;
mod paypal_api;
mod paypal_fetch;
mod pipelines;
mod reload;
mod rewards;
mod schedules;
mod sinks;
mod worker;
