//! PayPal `verify: cert`, offline (a pinned certificate, fetching off): any transmission
//! headers and body must be answered without a panic (header parsing, base64, the CRC32
//! message, the certificate URL check, chain and RSA checks); only a true signature over
//! `id|time|webhook_id|crc32(body)` verifies, and what `sign` produces always does.
//!
//! Input: selector byte, then `id \0 time \0 sig \0 cert url \0 algo \0 body`.
#![no_main]

#[path = "common.rs"]
mod common;

use libfuzzer_sys::fuzz_target;
use perkflow::connector::VerifyKind;
use perkflow::verify::paypal::{sign, CertOptions, PaypalVerifier};
use perkflow::verify::{RawRequest, VerifyError};
use std::sync::LazyLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const PKI: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../fixtures/paypal/pki/");
const URL: &str = "https://api.paypal.com/v1/notifications/certs/CERT-fuzz";
const WEBHOOK_ID: &str = "WH-FUZZ";

fn read(name: &str) -> Vec<u8> {
    std::fs::read(format!("{PKI}{name}")).expect("PayPal test PKI")
}

static VERIFIER: LazyLock<PaypalVerifier> = LazyLock::new(|| {
    let VerifyKind::Paypal(def) = common::source_def("paypal").verify else {
        panic!("not paypal")
    };
    let opts = CertOptions {
        cert_hosts: None,
        ca_pem: Some(read("root-ca.pem")),
        pins: vec![(URL.into(), read("chain.pem"))],
        system_roots: false,
        fetch: false,
    };
    PaypalVerifier::cert(&def, WEBHOOK_ID.into(), opts).expect("verifier")
});
static KEY: LazyLock<Vec<u8>> = LazyLock::new(|| read("leaf.key"));
static RT: LazyLock<tokio::runtime::Runtime> = LazyLock::new(|| {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime")
});

/// Inside the test certificates' validity.
fn now() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_800_000_000)
}

fn verify(headers: &[(&str, &[u8])], body: &[u8]) -> Option<Result<(), VerifyError>> {
    let mut h = http::HeaderMap::new();
    for (k, v) in headers {
        h.insert(
            http::HeaderName::from_bytes(k.as_bytes()).ok()?,
            http::HeaderValue::from_bytes(v).ok()?,
        );
    }
    let req = RawRequest::new(h, bytes::Bytes::copy_from_slice(body), String::new());
    Some(RT.block_on(VERIFIER.verify(&req, now())))
}

fuzz_target!(|data: &[u8]| {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    let [id, time, sig, cert_url, algo, body] = common::parts::<6>(rest);
    // Arbitrary headers (some left out): never a panic, never a fetch, never accepted.
    let all = [
        ("paypal-transmission-id", id),
        ("paypal-transmission-time", time),
        ("paypal-transmission-sig", sig),
        ("paypal-cert-url", cert_url),
        ("paypal-auth-algo", algo),
    ];
    let given: Vec<(&str, &[u8])> = all
        .iter()
        .enumerate()
        .filter(|(i, _)| sel & (1 << i) == 0)
        .map(|(_, h)| *h)
        .collect();
    match verify(&given, body) {
        Some(Ok(())) => panic!("forged PayPal headers verified"),
        Some(Err(VerifyError::Unavailable(e))) => panic!("verification wanted the network: {e}"),
        _ => {}
    }

    // Signing is slow (RSA): round-trip one input in eight. PayPal's ids and times are
    // tokens; HTTP trims header values, so does the verifier.
    if sel & 0xe0 != 0 {
        return;
    }
    let (Ok(id), Ok(time)) = (std::str::from_utf8(id), std::str::from_utf8(time)) else {
        return;
    };
    // Header values are visible ASCII (anything else does not read as text).
    let token = |v: &str| {
        !v.is_empty() && v.trim() == v && v.bytes().all(|b| b.is_ascii_graphic() || b == b' ')
    };
    if !token(id) || !token(time) {
        return;
    }
    let signed = sign(&KEY, WEBHOOK_ID, id, time, URL, body).expect("sign");
    let headers: Vec<(String, Vec<u8>)> = signed
        .into_iter()
        .map(|(k, v)| (k.to_ascii_lowercase(), v.into_bytes()))
        .collect();
    let refs: Vec<(&str, &[u8])> = headers
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_slice()))
        .collect();
    if let Some(r) = verify(&refs, body) {
        assert!(r.is_ok(), "a signed request was refused: {r:?}");
        let mut other = body.to_vec();
        other.push(sel);
        let r = verify(&refs, &other).unwrap();
        assert!(r.is_err(), "a changed body verified");
    }
});
