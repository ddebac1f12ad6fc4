//! The expression and template engine with the domain filters: any field or condition
//! source and any JSON input must compile or not, then evaluate to a value or an error —
//! never a panic, never without end (fuel); libFuzzer's RSS and malloc limits report a value
//! that outgrows the engine's limits.
//!
//! Input: `source \0 JSON`. The JSON (when it parses) is `event`; `points` and `items` are
//! always there.
#![no_main]

use libfuzzer_sys::fuzz_target;
use perkflow::pipeline::expr::{Engine, Field};
use serde_json::{json, Value};
use std::sync::LazyLock;

static ENGINE: LazyLock<Engine> = LazyLock::new(Engine::new);

fuzz_target!(|data: &[u8]| {
    let (src, input) = match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &data[..0]),
    };
    let Ok(src) = std::str::from_utf8(src) else {
        return;
    };
    let event: Value = serde_json::from_slice(input).unwrap_or(json!({
        "total_price": "125.50", "currency": "USD", "email": " Ada@Example.COM ",
        "created_at": "2026-11-20T10:15:30-05:00", "phone": "+1 555 555 0123"
    }));
    let ctx = json!({ "event": event, "points": 1255, "items": [1, 2, 3], "type": "orders/paid" });
    let e = &*ENGINE;
    if let Ok(field) = e.field(src) {
        let _ = e.eval(&field, &ctx);
        if let Field::Literal(v) = &field {
            assert_eq!(e.eval(&field, &ctx).as_ref(), Ok(v));
        }
    }
    let _ = e.condition(src, &ctx);
    let _ = e.check_condition(src);
    let known = ["event", "points"].iter().map(|s| s.to_string()).collect();
    let _ = e.unknown_names(src, false, &known);
    let _ = e.variable_paths(src);
});
