//! Shared by the fuzz targets: input splitting and the built-in connector definitions.
#![allow(dead_code)]

use perkflow::connector::{Registry, SourceDef};

/// Cuts `data` at NUL bytes into exactly `N` parts (missing ones are empty; the last part
/// keeps any further NULs).
pub fn parts<const N: usize>(data: &[u8]) -> [&[u8]; N] {
    let mut out = [&data[..0]; N];
    let mut rest = data;
    for slot in out.iter_mut().take(N - 1) {
        match rest.iter().position(|&b| b == 0) {
            Some(i) => {
                *slot = &rest[..i];
                rest = &rest[i + 1..];
            }
            None => {
                *slot = rest;
                rest = &rest[rest.len()..];
            }
        }
    }
    out[N - 1] = rest;
    out
}

/// The built-in source connector `id`.
pub fn source_def(id: &str) -> SourceDef {
    let mut diags = Default::default();
    Registry::load(&[], &mut diags)
        .get(id)
        .and_then(|c| c.source.clone())
        .unwrap_or_else(|| panic!("no built-in source connector {id}"))
}

/// A header map with `name: value`, or `None` when the bytes are no valid header value.
pub fn header(name: &str, value: &[u8]) -> Option<http::HeaderMap> {
    let mut h = http::HeaderMap::new();
    h.insert(
        http::HeaderName::from_bytes(name.as_bytes()).ok()?,
        http::HeaderValue::from_bytes(value).ok()?,
    );
    Some(h)
}
