//! `stripe_v1`: `Stripe-Signature: t=<unix>,v1=<hex>[,v1=<hex>…]`, HMAC-SHA256 over
//! `<t>.<raw body>`. Any `v1` may match (one per active secret while rolling); `v0` and other
//! labels are ignored (no downgrade). A timestamp further than the tolerance is refused.

use super::{header, RawRequest, Rejection};
use crate::connector::StripeDef;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

type HmacSha256 = Hmac<Sha256>;

#[derive(Clone)]
pub struct StripeVerifier {
    pub headers: Vec<String>,
    pub tolerance: Duration,
    keys: Vec<Vec<u8>>,
}

impl std::fmt::Debug for StripeVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StripeVerifier")
            .field("tolerance", &self.tolerance)
            .field("keys", &format_args!("[{} redacted]", self.keys.len()))
            .finish()
    }
}

/// The parsed header: timestamp and every `v1` signature.
/// More `v1` values than any rotation produces is an attack, not a rotation.
const MAX_SIGNATURES: usize = 8;

fn parse(value: &str) -> Result<(i64, Vec<Vec<u8>>), Rejection> {
    let mut t = None;
    let mut v1 = Vec::new();
    for item in value.split(',') {
        let Some((k, v)) = item.trim().split_once('=') else {
            continue;
        };
        match k {
            "t" => {
                if t.is_some() {
                    return Err(Rejection::Malformed("more than one timestamp".into()));
                }
                t = Some(
                    v.parse::<i64>()
                        .map_err(|_| Rejection::Malformed("timestamp is not an integer".into()))?,
                );
            }
            "v1" => {
                // Only well-formed SHA-256 tags count; Stripe sends one per active secret.
                if let Ok(sig) = hex::decode(v) {
                    if sig.len() == 32 {
                        v1.push(sig);
                    }
                }
                if v1.len() > MAX_SIGNATURES {
                    return Err(Rejection::Malformed("too many v1 signatures".into()));
                }
            }
            _ => {}
        }
    }
    let t = t.ok_or_else(|| Rejection::Malformed("no timestamp".into()))?;
    if v1.is_empty() {
        return Err(Rejection::Malformed("no v1 signature".into()));
    }
    Ok((t, v1))
}

impl StripeVerifier {
    pub fn new(def: &StripeDef, secrets: &[&str], tolerance: Option<Duration>) -> Self {
        StripeVerifier {
            headers: def.header.0.clone(),
            tolerance: tolerance.unwrap_or(def.tolerance.0),
            keys: secrets.iter().map(|s| s.as_bytes().to_vec()).collect(),
        }
    }

    pub fn verify<S>(&self, req: &RawRequest<S>, now: SystemTime) -> Result<(), Rejection> {
        let value = header(&req.headers, &self.headers)
            .ok_or_else(|| Rejection::MissingHeader(self.headers[0].clone()))?;
        let (t, sigs) = parse(value)?;
        // One MAC per configured key, compared in constant time with every v1 value.
        let matched = self.keys.iter().any(|key| {
            let mut mac = HmacSha256::new_from_slice(key).expect("any key length");
            mac.update(t.to_string().as_bytes());
            mac.update(b".");
            mac.update(&req.body);
            let tag = mac.finalize().into_bytes();
            sigs.iter().any(|sig| {
                bool::from(subtle::ConstantTimeEq::ct_eq(
                    tag.as_slice(),
                    sig.as_slice(),
                ))
            })
        });
        if !matched {
            return Err(Rejection::BadSignature);
        }
        let now = now
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        // A signed `t` may be anything an i64 holds: saturate rather than overflow.
        let age = now.saturating_sub(t);
        if age.unsigned_abs() > self.tolerance.as_secs() {
            return Err(Rejection::Stale {
                age_secs: age,
                tolerance_secs: self.tolerance.as_secs(),
            });
        }
        Ok(())
    }
}

/// `Stripe-Signature` for `body` at time `t`, one `v1` per secret.
pub fn sign(def: &StripeDef, secrets: &[&str], t: i64, body: &[u8]) -> (String, String) {
    let mut value = format!("t={t}");
    for s in secrets {
        let mut mac = HmacSha256::new_from_slice(s.as_bytes()).expect("any key length");
        mac.update(format!("{t}.").as_bytes());
        mac.update(body);
        value.push_str(&format!(",v1={}", hex::encode(mac.finalize().into_bytes())));
    }
    (def.header.0[0].clone(), value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::scalar::{DurationSpec, Names};
    use axum::http::HeaderMap;

    fn def() -> StripeDef {
        StripeDef {
            header: Names(vec!["Stripe-Signature".into()]),
            tolerance: DurationSpec(Duration::from_secs(300)),
        }
    }
    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }
    fn req(sig: &str, body: &str) -> RawRequest<super::super::Unverified> {
        let mut h = HeaderMap::new();
        h.insert("stripe-signature", sig.parse().unwrap());
        RawRequest::new(h, body.as_bytes().to_vec().into(), String::new())
    }
    const BODY: &str = "{\"id\":\"evt_1\"}";
    // Python: hmac.new(b"whsec_test", b'1700000000.{"id":"evt_1"}', sha256).hexdigest()
    const KNOWN: &str = "c89214b5b5da833daed6f0b8c5bb6bd58cea9022bd80ccc78230f3942d632925";

    #[test]
    fn verifies_a_known_answer_and_ignores_v0() {
        let v = StripeVerifier::new(&def(), &["whsec_test"], None);
        let h = format!("t=1700000000,v0=deadbeef,v1={KNOWN}");
        assert!(v.verify(&req(&h, BODY), at(1_700_000_010)).is_ok());
        assert_eq!(
            sign(&def(), &["whsec_test"], 1_700_000_000, BODY.as_bytes()).1,
            format!("t=1700000000,v1={KNOWN}")
        );
    }

    #[test]
    fn any_v1_may_match_while_rolling_secrets() {
        let v = StripeVerifier::new(&def(), &["whsec_new"], None);
        let (_, h) = sign(
            &def(),
            &["whsec_old", "whsec_new"],
            1_700_000_000,
            BODY.as_bytes(),
        );
        assert!(v.verify(&req(&h, BODY), at(1_700_000_000)).is_ok());
        let v = StripeVerifier::new(&def(), &["whsec_old", "whsec_new"], None);
        let (_, h) = sign(&def(), &["whsec_old"], 1_700_000_000, BODY.as_bytes());
        assert!(v.verify(&req(&h, BODY), at(1_700_000_000)).is_ok());
    }

    #[test]
    fn refuses_stale_tampered_and_malformed() {
        let v = StripeVerifier::new(&def(), &["whsec_test"], None);
        let h = format!("t=1700000000,v1={KNOWN}");
        assert!(matches!(
            v.verify(&req(&h, BODY), at(1_700_000_301)),
            Err(Rejection::Stale { .. })
        ));
        assert!(matches!(
            v.verify(&req(&h, BODY), at(1_699_999_000)),
            Err(Rejection::Stale { .. })
        ));
        assert_eq!(
            v.verify(&req(&h, "{\"id\":\"evt_2\"}"), at(1_700_000_000)),
            Err(Rejection::BadSignature)
        );
        // A v0 alone is not accepted, even when it carries the right MAC.
        let h0 = format!("t=1700000000,v0={KNOWN}");
        assert!(matches!(
            v.verify(&req(&h0, BODY), at(1_700_000_000)),
            Err(Rejection::Malformed(_))
        ));
        assert!(matches!(
            v.verify(&req("v1=abcd", BODY), at(1_700_000_000)),
            Err(Rejection::Malformed(_))
        ));
        // Thousands of empty or bogus v1 values cost nothing and are refused.
        let flood = format!("t=1700000000{}", ",v1=".repeat(5000));
        assert!(matches!(
            v.verify(&req(&flood, BODY), at(1_700_000_000)),
            Err(Rejection::Malformed(_))
        ));
        let many = format!(
            "t=1700000000{}",
            format!(",v1={}", "ab".repeat(32)).repeat(9)
        );
        assert!(matches!(
            v.verify(&req(&many, BODY), at(1_700_000_000)),
            Err(Rejection::Malformed(_))
        ));
        let v = StripeVerifier::new(&def(), &["whsec_test"], Some(Duration::from_secs(600)));
        assert!(v.verify(&req(&h, BODY), at(1_700_000_500)).is_ok());
    }

    /// Found by fuzzing (`verify_stripe`): a correctly signed header with `t` at the ends of
    /// i64 overflowed the age computation.
    #[test]
    fn extreme_signed_timestamps_are_stale_not_a_panic() {
        let v = StripeVerifier::new(&def(), &["whsec_test"], None);
        for t in [i64::MIN, i64::MIN + 1, i64::MAX] {
            let (_, h) = sign(&def(), &["whsec_test"], t, BODY.as_bytes());
            for now in [at(0), at(1_700_000_000), at(u32::MAX as u64)] {
                assert!(
                    matches!(v.verify(&req(&h, BODY), now), Err(Rejection::Stale { .. })),
                    "t={t}"
                );
            }
        }
    }
}
