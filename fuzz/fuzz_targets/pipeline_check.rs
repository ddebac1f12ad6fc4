//! `perkflow check` on a pipeline file, against the shipped config: any text gives a checked
//! pipeline or diagnostics, never a panic; a pipeline that passes the check then runs (dry:
//! stub lookups, in-memory ledger) on a Shopify order without a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use perkflow::config::diagnostic::Diagnostics;
use perkflow::config::Config;
use perkflow::pipeline::expr::Engine;
use perkflow::pipeline::run::{run, EventInput, Stubs};
use perkflow::pipeline::spec::{load_one, Scope};
use std::path::Path;
use std::sync::LazyLock;

const REPO: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");

static CONFIG: LazyLock<Config> = LazyLock::new(|| {
    perkflow::config::load(Some(&Path::new(REPO).join("perkflow.yaml")))
        .unwrap_or_else(|d| panic!("the shipped config does not check:\n{d}"))
});
static ENGINE: LazyLock<Engine> = LazyLock::new(Engine::new);
static EVENT: LazyLock<serde_json::Value> = LazyLock::new(|| {
    let raw = std::fs::read(Path::new(REPO).join("fixtures/shopify/orders-paid.json")).unwrap();
    serde_json::from_slice(&raw).unwrap()
});

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let cfg = &*CONFIG;
    let scope = Scope {
        sources: &cfg.sources,
        sinks: &cfg.sinks,
        connectors: &cfg.connectors,
        pools: &cfg.promo_codes,
        engine: &ENGINE,
        invalid: Default::default(),
        deliver_count: Default::default(),
        deliver_ids: Default::default(),
        known: Default::default(),
    };
    let mut diags = Diagnostics::default();
    match load_one(Path::new("pipelines/fuzz.yaml"), text, &scope, &mut diags) {
        Some(p) => {
            assert!(diags.is_empty(), "a pipeline came with problems: {diags}");
            let input = EventInput {
                source: p.on.source.clone(),
                event_type: p.on.events.first().cloned().unwrap_or_default(),
                event_id: "ev_0000000000000001".into(),
                headers: Default::default(),
                event: EVENT.clone(),
            };
            let r = run(&p, &ENGINE, &input, &Stubs::default());
            assert_eq!(r.pipeline, p.name);
        }
        None => assert!(!diags.is_empty(), "refused without a diagnostic"),
    }
});
