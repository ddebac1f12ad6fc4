//! Signing requests the way each vendor does: `perkflow sign` and the test suites use it to
//! produce correctly signed webhooks from fixtures.

use crate::connector::{SourceDef, VerifyKind};
use crate::verify::{hmac, paypal, stripe};
use std::path::{Path, PathBuf};

/// What signing needs besides the body.
#[derive(Default, Clone)]
pub struct SignKeys {
    /// HMAC / Stripe secrets (Stripe sends one `v1` per secret).
    pub secrets: Vec<String>,
    /// PayPal: PKCS#8 PEM of the certificate's private key.
    pub paypal_key_pem: Option<Vec<u8>>,
    /// PayPal: the webhook id the receiver is configured with.
    pub webhook_id: Option<String>,
}

/// The signature headers for `body`, given the fixture's other headers (PayPal reads its
/// transmission id, time and cert URL from them when present).
pub fn signature_headers(
    def: &SourceDef,
    keys: &SignKeys,
    url: &str,
    body: &[u8],
    headers: &[(String, String)],
    now_unix: i64,
) -> Result<Vec<(String, String)>, String> {
    let first_secret = || {
        keys.secrets
            .first()
            .map(String::as_str)
            .ok_or_else(|| "needs --secret".to_string())
    };
    match &def.verify {
        VerifyKind::HmacSha256(d) => Ok(vec![hmac::sign(d, first_secret()?, url, body)]),
        VerifyKind::StripeV1(d) => {
            first_secret()?;
            let s: Vec<&str> = keys.secrets.iter().map(String::as_str).collect();
            Ok(vec![stripe::sign(d, &s, now_unix, body)])
        }
        VerifyKind::Paypal(d) => {
            let key = keys
                .paypal_key_pem
                .as_deref()
                .ok_or("PayPal signing needs --key (PKCS#8 PEM)")?;
            let webhook_id = keys
                .webhook_id
                .as_deref()
                .ok_or("PayPal signing needs --webhook-id")?;
            let get = |name: &str| {
                headers
                    .iter()
                    .find(|(k, _)| k.eq_ignore_ascii_case(name))
                    .map(|(_, v)| v.clone())
            };
            let tid =
                get("paypal-transmission-id").unwrap_or_else(|| format!("perkflow-{now_unix}"));
            let time = get("paypal-transmission-time").unwrap_or_else(|| rfc3339(now_unix));
            let cert_url = get("paypal-cert-url").unwrap_or_else(|| {
                format!(
                    "https://{}{}perkflow-test",
                    d.cert_hosts[0], d.cert_path_prefix
                )
            });
            paypal::sign(key, webhook_id, &tid, &time, &cert_url, body)
        }
    }
}

/// `fixtures/x/case.json` -> `fixtures/x/case.headers.yaml`.
pub fn headers_file(body_file: &Path) -> PathBuf {
    let stem = body_file
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    body_file.with_file_name(format!("{stem}.headers.yaml"))
}

/// A fixture's body bytes and the headers stored beside it.
pub type Fixture = (Vec<u8>, Vec<(String, String)>);

/// Reads a fixture and the headers stored beside it.
pub fn read_fixture(body_file: &Path) -> Result<Fixture, String> {
    let body = std::fs::read(body_file).map_err(|e| format!("{}: {e}", body_file.display()))?;
    let hf = headers_file(body_file);
    let headers = match std::fs::read_to_string(&hf) {
        Ok(t) => crate::config::yaml::string_map(&t)
            .map_err(|e| format!("{}: {e}", hf.display()))?
            .into_iter()
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(format!("{}: {e}", hf.display())),
    };
    Ok((body, headers))
}

/// Seconds since the epoch as RFC 3339 UTC (`2026-11-20T10:15:30Z`).
pub fn rfc3339(unix: i64) -> String {
    humantime::format_rfc3339_seconds(
        std::time::UNIX_EPOCH + std::time::Duration::from_secs(unix.max(0) as u64),
    )
    .to_string()
}

/// A POSIX shell single-quoted word.
pub fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_headers_beside_a_fixture() {
        assert_eq!(
            headers_file(Path::new("fixtures/shopify/orders-paid.json")),
            Path::new("fixtures/shopify/orders-paid.headers.yaml")
        );
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(shell_quote("it's"), "'it'\\''s'");
    }
}
