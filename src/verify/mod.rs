//! (2) Signature kinds: pure functions of (keys, headers, raw body, signed URL, now), except
//! PayPal, which may fetch a certificate or call PayPal's verification API.
//!
//! Unverified bytes cannot reach the inbox: a [`RawRequest<Unverified>`] only becomes a
//! [`RawRequest<Verified>`] through [`Verifier::verify`].

pub mod hmac;
pub mod paypal;
pub mod stripe;

use axum::http::HeaderMap;
use bytes::Bytes;
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::SystemTime;

/// Marker: signature not checked yet.
#[derive(Debug)]
pub struct Unverified;
/// Marker: signature checked.
#[derive(Debug)]
pub struct Verified;

/// A webhook request exactly as received.
#[derive(Debug)]
pub struct RawRequest<S> {
    pub headers: HeaderMap,
    pub body: Bytes,
    /// The URL the vendor called, as it signs it (`public_url` + path, or the source's `url`).
    pub url: String,
    _state: PhantomData<S>,
}

impl RawRequest<Verified> {
    /// A fixture from the operator's own disk (`perkflow test` and `run`): trusted as is.
    /// Never for anything that came over the network.
    pub fn trusted_fixture(headers: HeaderMap, body: Bytes) -> Self {
        RawRequest {
            headers,
            body,
            url: String::new(),
            _state: PhantomData,
        }
    }
}

impl RawRequest<Unverified> {
    pub fn new(headers: HeaderMap, body: Bytes, url: String) -> Self {
        RawRequest {
            headers,
            body,
            url,
            _state: PhantomData,
        }
    }
    fn verified(self) -> RawRequest<Verified> {
        RawRequest {
            headers: self.headers,
            body: self.body,
            url: self.url,
            _state: PhantomData,
        }
    }
}

/// Why a request was refused. The HTTP answer is the same bare 401 for all of them; the
/// reason goes to logs (and metric labels).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Rejection {
    #[error("missing signature header {0}")]
    MissingHeader(String),
    #[error("malformed signature: {0}")]
    Malformed(String),
    #[error("signature does not match")]
    BadSignature,
    #[error("timestamp outside the tolerance ({age_secs}s away, tolerance {tolerance_secs}s)")]
    Stale { age_secs: i64, tolerance_secs: u64 },
    #[error("certificate URL refused: {0}")]
    CertUrlRefused(String),
    #[error("certificate refused: {0}")]
    CertInvalid(String),
    #[error("remote verification answered {0}")]
    RemoteFailure(String),
}

impl Rejection {
    /// A low-cardinality label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Rejection::MissingHeader(_) => "missing_header",
            Rejection::Malformed(_) => "malformed",
            Rejection::BadSignature => "bad_signature",
            Rejection::Stale { .. } => "stale",
            Rejection::CertUrlRefused(_) => "cert_url_refused",
            Rejection::CertInvalid(_) => "cert_invalid",
            Rejection::RemoteFailure(_) => "remote_failure",
        }
    }
}

/// A verification outcome that is neither yes nor no.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error(transparent)]
    Rejected(#[from] Rejection),
    /// Verification could not be done now (certificate fetch or PayPal API down): answer 503 so
    /// the vendor retries.
    #[error("verification unavailable: {0}")]
    Unavailable(String),
}

/// A built verifier for one source.
#[derive(Debug, Clone)]
pub enum Verifier {
    Hmac(hmac::HmacVerifier),
    Stripe(stripe::StripeVerifier),
    Paypal(Arc<paypal::PaypalVerifier>),
}

impl Verifier {
    pub async fn verify(
        &self,
        req: RawRequest<Unverified>,
        now: SystemTime,
    ) -> Result<RawRequest<Verified>, VerifyError> {
        match self {
            Verifier::Hmac(v) => v.verify(&req)?,
            Verifier::Stripe(v) => v.verify(&req, now)?,
            Verifier::Paypal(v) => v.verify(&req, now).await?,
        }
        Ok(req.verified())
    }

    /// Header names that carry the signature (never stored with the event).
    pub fn signature_headers(&self) -> Vec<String> {
        match self {
            Verifier::Hmac(v) => v.headers.clone(),
            Verifier::Stripe(v) => v.headers.clone(),
            Verifier::Paypal(_) => vec!["paypal-transmission-sig".into()],
        }
    }
}

/// The first of `names` present in `headers`, as text.
pub(crate) fn header<'a>(headers: &'a HeaderMap, names: &[String]) -> Option<&'a str> {
    names
        .iter()
        .find_map(|n| headers.get(n.as_str()))
        .and_then(|v| v.to_str().ok())
}

/// Builds the verifier of a checked source: resolves its secrets and reads its files.
/// Problems are reported at the config value they come from.
pub fn build(
    src: &crate::config::Source,
    cfg: &crate::config::Config,
) -> Result<Verifier, crate::config::diagnostic::Diagnostic> {
    use crate::connector::VerifyKind;
    let path = |field: &str| format!("sources.{}.{field}", src.name);
    let resolve = |field: &str, v: &crate::config::secrets::Interpolated| {
        v.resolve(&cfg.base_dir)
            .map_err(|m| cfg.diag(&path(field), m))
    };
    let secrets =
        || -> Result<Vec<crate::config::secrets::Secret>, crate::config::diagnostic::Diagnostic> {
            let mut out = Vec::new();
            if let Some(s) = &src.spec.secret {
                out.push(resolve("secret", s)?);
            }
            for (i, s) in src.spec.secrets.iter().flatten().enumerate() {
                out.push(resolve(&format!("secrets[{i}]"), s)?);
            }
            if out.iter().any(|s| s.expose().is_empty()) {
                return Err(cfg.diag(
                    &path("secret"),
                    "the secret is empty: refusing to verify with an empty key",
                ));
            }
            Ok(out)
        };
    match &src.def.verify {
        VerifyKind::HmacSha256(def) => {
            let s = secrets()?;
            let keys: Vec<&str> = s.iter().map(|s| s.expose()).collect();
            Ok(Verifier::Hmac(hmac::HmacVerifier::new(def, &keys)))
        }
        VerifyKind::StripeV1(def) => {
            let s = secrets()?;
            let keys: Vec<&str> = s.iter().map(|s| s.expose()).collect();
            Ok(Verifier::Stripe(stripe::StripeVerifier::new(
                def,
                &keys,
                src.spec.tolerance.map(|t| t.0),
            )))
        }
        VerifyKind::Paypal(def) => {
            let webhook_id = match &src.spec.webhook_id {
                Some(w) => resolve("webhook_id", w)?.expose().to_string(),
                None => return Err(cfg.diag(&path("webhook_id"), "missing")),
            };
            let read = |field: &str, p: &std::path::Path| {
                std::fs::read(cfg.base_dir.join(p)).map_err(|e| {
                    cfg.diag(&path(field), format!("cannot read {}: {e}", p.display()))
                })
            };
            let built = match src.spec.verify.unwrap_or_default() {
                crate::config::PaypalMode::Cert => {
                    let ca_pem = src
                        .spec
                        .ca_file
                        .as_deref()
                        .map(|p| read("ca_file", p))
                        .transpose()?;
                    let mut pins = Vec::new();
                    for (url, p) in src.spec.cert_pins.iter().flatten() {
                        pins.push((url.clone(), read(&format!("cert_pins.{url}"), p)?));
                    }
                    let opts = paypal::CertOptions {
                        cert_hosts: src.spec.cert_hosts.clone(),
                        ca_pem,
                        pins,
                        system_roots: true,
                        fetch: true,
                    };
                    paypal::PaypalVerifier::cert(def, webhook_id, opts)
                }
                crate::config::PaypalMode::Api => {
                    let (Some(id), Some(secret)) = (&src.spec.client_id, &src.spec.client_secret)
                    else {
                        return Err(cfg.diag(&path("client_id"), "missing"));
                    };
                    let opts = paypal::ApiOptions {
                        base_url: src.spec.base_url.clone(),
                        client_id: resolve("client_id", id)?,
                        client_secret: resolve("client_secret", secret)?,
                    };
                    paypal::PaypalVerifier::api(def, webhook_id, opts)
                }
            };
            built
                .map(|v| Verifier::Paypal(Arc::new(v)))
                .map_err(|m| cfg.diag(&format!("sources.{}", src.name), m))
        }
    }
}
