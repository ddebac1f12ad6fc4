//! `hmac_sha256` as Shopify, WooCommerce, Square and QuickBooks use it: any header value, body
//! and signed URL must be answered without a panic; only the true tag verifies, and what
//! `sign` produces always does.
//!
//! Input: selector byte, then `header value \0 url \0 body`.
#![no_main]

#[path = "common.rs"]
mod common;

use base64::Engine;
use libfuzzer_sys::fuzz_target;
use perkflow::connector::{Encoding, HmacDef, VerifyKind};
use perkflow::verify::hmac::{sign, HmacVerifier};
use perkflow::verify::{RawRequest, Rejection, Unverified};
use std::sync::LazyLock;

static DEFS: LazyLock<Vec<HmacDef>> = LazyLock::new(|| {
    ["shopify", "woocommerce", "square", "quickbooks"]
        .into_iter()
        .map(|id| match common::source_def(id).verify {
            VerifyKind::HmacSha256(d) => d,
            other => panic!("{id}: not hmac_sha256: {other:?}"),
        })
        .collect()
});

/// WooCommerce decodes HTML entities in the secret: keep one in it.
const SECRETS: [&str; 2] = ["fuzz &amp; secret", "rotated"];

fn decode(enc: Encoding, v: &str) -> Option<Vec<u8>> {
    match enc {
        Encoding::Base64 => base64::engine::general_purpose::STANDARD.decode(v).ok(),
        Encoding::Hex => hex::decode(v).ok(),
    }
}

fn request(name: &str, value: &[u8], url: &str, body: &[u8]) -> Option<RawRequest<Unverified>> {
    Some(RawRequest::new(
        common::header(name, value)?,
        bytes::Bytes::copy_from_slice(body),
        url.to_string(),
    ))
}

fuzz_target!(|data: &[u8]| {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    let def = &DEFS[sel as usize % DEFS.len()];
    let name = &def.header.0[(sel as usize / DEFS.len()) % def.header.0.len()];
    let [value, url, body] = common::parts::<3>(rest);
    let url = String::from_utf8_lossy(url);
    let v = HmacVerifier::new(def, &SECRETS);

    // Arbitrary header value: refused unless it is the tag of one of the keys.
    if let Some(req) = request(name, value, &url, body) {
        if v.verify(&req).is_ok() {
            let given = decode(def.encoding, std::str::from_utf8(value).unwrap().trim());
            let accepted = SECRETS
                .iter()
                .any(|s| decode(def.encoding, &sign(def, s, &url, body).1) == given);
            assert!(accepted, "a header that is no key's tag verified");
        }
    }

    // What `sign` makes verifies, with any key, under every accepted header name.
    for s in SECRETS {
        let (_, tag) = sign(def, s, &url, body);
        let req = request(name, tag.as_bytes(), &url, body).expect("a tag is a header value");
        assert_eq!(v.verify(&req), Ok(()), "a signed request was refused");
        // One more body byte: refused.
        let mut longer = body.to_vec();
        longer.push(sel);
        let req = request(name, tag.as_bytes(), &url, &longer).unwrap();
        assert_eq!(v.verify(&req), Err(Rejection::BadSignature));
    }
});
