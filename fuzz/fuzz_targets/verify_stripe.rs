//! `stripe_v1`: any `Stripe-Signature` value, body and clock must be answered without a panic
//! (header parsing, timestamp arithmetic); only a fresh, true `v1` verifies, and what `sign`
//! produces always does within the tolerance.
//!
//! Input: 8 bytes of clock skew and timestamp, then `header value \0 body`.
#![no_main]

#[path = "common.rs"]
mod common;

use libfuzzer_sys::fuzz_target;
use perkflow::connector::{StripeDef, VerifyKind};
use perkflow::verify::stripe::{sign, StripeVerifier};
use perkflow::verify::{RawRequest, Rejection};
use std::sync::LazyLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

static DEF: LazyLock<StripeDef> = LazyLock::new(|| match common::source_def("stripe").verify {
    VerifyKind::StripeV1(d) => d,
    other => panic!("not stripe_v1: {other:?}"),
});

const NOW: u64 = 1_700_000_000;

fuzz_target!(|data: &[u8]| {
    if data.len() < 8 {
        return;
    }
    let (clock, rest) = data.split_at(8);
    let t = i64::from_le_bytes(clock.try_into().unwrap());
    let [value, body] = common::parts::<2>(rest);
    let name = &DEF.header.0[0];
    let v = StripeVerifier::new(&DEF, &["whsec_fuzz", "whsec_old"], None);
    let tolerance = v.tolerance.as_secs() as i64;
    let now = UNIX_EPOCH + Duration::from_secs(NOW);

    // Arbitrary header: no panic; accepted only if it carries a fresh, true v1.
    if let Some(h) = common::header(name, value) {
        let req = RawRequest::new(h, bytes::Bytes::copy_from_slice(body), String::new());
        if v.verify(&req, now).is_ok() {
            let text = std::str::from_utf8(value).unwrap();
            let ts: i64 = text
                .split(',')
                .find_map(|p| p.trim().strip_prefix("t="))
                .and_then(|t| t.parse().ok())
                .expect("accepted without a timestamp");
            assert!((NOW as i64 - ts).abs() <= tolerance, "stale accepted");
            let (_, good) = sign(&DEF, &["whsec_fuzz"], ts, body);
            let (_, old) = sign(&DEF, &["whsec_old"], ts, body);
            let tag = |h: &str| h.split_once(",v1=").unwrap().1.to_string();
            let lower = text.to_ascii_lowercase();
            assert!(
                lower.contains(&tag(&good)) || lower.contains(&tag(&old)),
                "accepted without a true v1"
            );
        }
    }

    // A signed request at any timestamp t, checked at any clock: fresh verifies, stale is
    // refused as stale (never a panic on the arithmetic).
    let (_, signed) = sign(&DEF, &["whsec_old"], t, body);
    let h = common::header(name, signed.as_bytes()).expect("a signature is a header value");
    let req = RawRequest::new(h, bytes::Bytes::copy_from_slice(body), String::new());
    for clock in [
        now,
        UNIX_EPOCH,
        SystemTime::UNIX_EPOCH + Duration::from_secs(u32::MAX as u64),
    ] {
        let secs = clock.duration_since(UNIX_EPOCH).unwrap().as_secs() as i128;
        let fresh = (secs - t as i128).abs() <= tolerance as i128;
        match v.verify(&req, clock) {
            Ok(()) => assert!(fresh, "stale accepted (t={t})"),
            Err(Rejection::Stale { .. }) => assert!(!fresh, "fresh refused (t={t})"),
            Err(e) => panic!("signed request refused: {e:?} (t={t})"),
        }
    }
});
