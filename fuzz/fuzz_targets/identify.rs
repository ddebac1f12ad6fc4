//! Identifying a verified request (vendor event id, type, time; QuickBooks batches split per
//! entity): any body and id/type headers must give events or an error, never a panic; every
//! event found has a non-empty id and type, and a split batch's events are JSON.
//!
//! Input: selector byte, then `header value \0 body`.
#![no_main]

#[path = "common.rs"]
mod common;

use libfuzzer_sys::fuzz_target;
use perkflow::connector::{IdentifyKind, SourceDef};
use perkflow::ingest::identify::identify;
use perkflow::verify::RawRequest;
use std::sync::LazyLock;

static DEFS: LazyLock<Vec<SourceDef>> = LazyLock::new(|| {
    [
        "shopify",
        "woocommerce",
        "stripe",
        "square",
        "paypal",
        "quickbooks",
    ]
    .into_iter()
    .map(common::source_def)
    .collect()
});

/// Headers the connectors read ids, types and times from.
const HEADERS: &[&str] = &[
    "x-shopify-event-id",
    "x-shopify-topic",
    "x-shopify-triggered-at",
    "x-wc-webhook-topic",
    "x-wc-webhook-event",
    "x-wc-webhook-resource",
];

fuzz_target!(|data: &[u8]| {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    let def = &DEFS[sel as usize % DEFS.len()];
    let [value, body] = common::parts::<2>(rest);
    let mut headers = http::HeaderMap::new();
    if let Ok(v) = http::HeaderValue::from_bytes(value) {
        for (i, name) in HEADERS.iter().enumerate() {
            if sel as usize / DEFS.len() & (1 << (i % 5)) == 0 {
                headers.insert(*name, v.clone());
            }
        }
    }
    let req = RawRequest::trusted_fixture(headers, bytes::Bytes::copy_from_slice(body));
    if let Ok(found) = identify(&def.identify, &req) {
        assert!(!found.is_empty(), "identified no event and no error");
        for e in &found {
            assert!(!e.vendor_id.is_empty() && !e.event_type.is_empty(), "{e:?}");
            if matches!(def.identify, IdentifyKind::IntuitBatch {}) {
                serde_json::from_slice::<serde_json::Value>(&e.payload)
                    .expect("a split event is JSON");
            }
        }
    }
});
