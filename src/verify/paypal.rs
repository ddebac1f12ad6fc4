//! `paypal`: PayPal's transmission signature, an RSA PKCS#1 v1.5 SHA-256 signature over
//! `<transmission id>|<transmission time>|<webhook id>|<crc32 of the raw body>`.
//!
//! `verify: cert` checks it offline: the `PAYPAL-CERT-URL` must be https, on the host
//! allowlist and under the certs path — checked before anything is fetched — and the
//! certificate chain must lead to a trust anchor (system roots plus `ca_file`), be valid now
//! and name a `*.paypal.com` subject. `cert_pins` map a cert URL to a local PEM (air-gapped
//! deployments, tests). `verify: api` asks PayPal's verify-webhook-signature endpoint, with an
//! OAuth client-credentials token, splicing the raw body in as `webhook_event`.

use super::{RawRequest, Rejection, VerifyError};
use crate::config::secrets::Secret;
use crate::connector::PaypalDef;
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, SignatureVerificationAlgorithm, TrustAnchor, UnixTime};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

const H_ID: &str = "paypal-transmission-id";
const H_TIME: &str = "paypal-transmission-time";
const H_SIG: &str = "paypal-transmission-sig";
const H_CERT: &str = "paypal-cert-url";
const H_ALGO: &str = "paypal-auth-algo";
/// A PEM chain larger than this is not a certificate.
const MAX_CERT_BYTES: usize = 64 * 1024;
const CACHE_ENTRIES: usize = 32;

static CHAIN_ALGS: &[&dyn SignatureVerificationAlgorithm] = &[
    webpki::ring::RSA_PKCS1_2048_8192_SHA256,
    webpki::ring::RSA_PKCS1_2048_8192_SHA384,
    webpki::ring::RSA_PKCS1_2048_8192_SHA512,
    webpki::ring::ECDSA_P256_SHA256,
    webpki::ring::ECDSA_P384_SHA384,
    webpki::ring::ECDSA_P256_SHA384,
    webpki::ring::ECDSA_P384_SHA256,
];

pub struct PaypalVerifier {
    webhook_id: String,
    mode: Mode,
}

enum Mode {
    Cert(CertMode),
    Api(ApiMode),
}

struct CertMode {
    hosts: Vec<String>,
    path_prefix: String,
    cn_suffix: String,
    anchors: Vec<TrustAnchor<'static>>,
    pins: HashMap<String, Vec<CertificateDer<'static>>>,
    cache: Mutex<HashMap<String, Arc<Vec<CertificateDer<'static>>>>>,
    client: reqwest::Client,
    fetch: bool,
}

struct ApiMode {
    base_url: String,
    client_id: Secret,
    client_secret: Secret,
    token: tokio::sync::Mutex<Option<(Secret, Instant)>>,
    client: reqwest::Client,
}

impl std::fmt::Debug for PaypalVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mode = match &self.mode {
            Mode::Cert(c) => format!("cert(hosts={:?})", c.hosts),
            Mode::Api(a) => format!("api({})", a.base_url),
        };
        f.debug_struct("PaypalVerifier")
            .field("mode", &mode)
            .finish()
    }
}

/// What `verify: cert` needs, resolved from config.
pub struct CertOptions {
    pub cert_hosts: Option<Vec<String>>,
    /// PEM bytes of extra trust anchors.
    pub ca_pem: Option<Vec<u8>>,
    /// cert URL -> PEM bytes.
    pub pins: Vec<(String, Vec<u8>)>,
    /// Also trust the system's roots (true in production).
    pub system_roots: bool,
    /// Fetch a certificate that is not pinned (true in production). Without it such a URL is
    /// refused, so verification never touches the network (fuzzing, air-gapped checks).
    pub fetch: bool,
}

/// What `verify: api` needs, resolved from config.
pub struct ApiOptions {
    pub base_url: Option<String>,
    pub client_id: Secret,
    pub client_secret: Secret,
}

fn parse_pem_chain(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs: Result<Vec<_>, _> = CertificateDer::pem_slice_iter(pem).collect();
    match certs {
        Ok(c) if !c.is_empty() => Ok(c),
        Ok(_) => Err("no certificate in PEM".into()),
        Err(e) => Err(format!("bad PEM: {e:?}")),
    }
}

/// Accepts any extended key usage: PayPal's message certificate is identified by its chain and
/// subject, not by a TLS purpose.
struct AnyUsage;
impl webpki::ExtendedKeyUsageValidator for AnyUsage {
    fn validate(&self, iter: webpki::KeyPurposeIdIter<'_, '_>) -> Result<(), webpki::Error> {
        for id in iter {
            id?;
        }
        Ok(())
    }
}

impl PaypalVerifier {
    pub fn cert(def: &PaypalDef, webhook_id: String, opts: CertOptions) -> Result<Self, String> {
        let mut anchors = Vec::new();
        if opts.system_roots {
            for der in rustls_native_certs::load_native_certs().certs {
                if let Ok(a) = webpki::anchor_from_trusted_cert(&der) {
                    anchors.push(a.to_owned());
                }
            }
        }
        let mut builder = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(Duration::from_secs(10));
        if let Some(pem) = &opts.ca_pem {
            for der in parse_pem_chain(pem).map_err(|e| format!("ca_file: {e}"))? {
                let a = webpki::anchor_from_trusted_cert(&der)
                    .map_err(|e| format!("ca_file: {e:?}"))?;
                anchors.push(a.to_owned());
                let cert =
                    reqwest::Certificate::from_der(&der).map_err(|e| format!("ca_file: {e}"))?;
                builder = builder.add_root_certificate(cert);
            }
        }
        let mut pins = HashMap::new();
        for (url, pem) in opts.pins {
            let chain = parse_pem_chain(&pem).map_err(|e| format!("cert_pins[{url}]: {e}"))?;
            pins.insert(url, chain);
        }
        let client = builder.build().map_err(|e| format!("HTTP client: {e}"))?;
        Ok(PaypalVerifier {
            webhook_id,
            mode: Mode::Cert(CertMode {
                hosts: opts.cert_hosts.unwrap_or_else(|| def.cert_hosts.clone()),
                path_prefix: def.cert_path_prefix.clone(),
                cn_suffix: def.cert_cn_suffix.to_ascii_lowercase(),
                anchors,
                pins,
                cache: Mutex::new(HashMap::new()),
                client,
                fetch: opts.fetch,
            }),
        })
    }

    pub fn api(def: &PaypalDef, webhook_id: String, opts: ApiOptions) -> Result<Self, String> {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| format!("HTTP client: {e}"))?;
        Ok(PaypalVerifier {
            webhook_id,
            mode: Mode::Api(ApiMode {
                base_url: opts
                    .base_url
                    .unwrap_or_else(|| def.api_base_url.clone())
                    .trim_end_matches('/')
                    .to_string(),
                client_id: opts.client_id,
                client_secret: opts.client_secret,
                token: tokio::sync::Mutex::new(None),
                client,
            }),
        })
    }

    pub async fn verify<S>(&self, req: &RawRequest<S>, now: SystemTime) -> Result<(), VerifyError> {
        let h = |name: &str| -> Result<&str, Rejection> {
            req.headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::trim)
                .filter(|v| !v.is_empty())
                .ok_or_else(|| Rejection::MissingHeader(name.to_ascii_uppercase()))
        };
        let (id, time, sig, cert_url, algo) =
            (h(H_ID)?, h(H_TIME)?, h(H_SIG)?, h(H_CERT)?, h(H_ALGO)?);
        match &self.mode {
            Mode::Cert(c) => {
                if !algo.eq_ignore_ascii_case("SHA256withRSA") {
                    return Err(
                        Rejection::Malformed(format!("unsupported auth algo {algo}")).into(),
                    );
                }
                let sig = B64
                    .decode(sig)
                    .map_err(|_| Rejection::Malformed("signature is not base64".into()))?;
                let message = format!(
                    "{id}|{time}|{}|{}",
                    self.webhook_id,
                    crc32fast::hash(&req.body)
                );
                let chain = c.chain(cert_url).await?;
                c.check(&chain, now, message.as_bytes(), &sig)?;
                Ok(())
            }
            Mode::Api(a) => {
                a.verify(id, time, sig, cert_url, algo, &self.webhook_id, &req.body)
                    .await
            }
        }
    }
}

impl CertMode {
    /// Refuses a cert URL that is not https, not on the allowlist or not under the certs path.
    fn check_url(&self, cert_url: &str) -> Result<(), Rejection> {
        let url = reqwest::Url::parse(cert_url)
            .map_err(|_| Rejection::CertUrlRefused("not a URL".into()))?;
        if url.scheme() != "https" {
            return Err(Rejection::CertUrlRefused(format!(
                "scheme {} is not https",
                url.scheme()
            )));
        }
        let host = url.host_str().unwrap_or_default().to_ascii_lowercase();
        let host_port = match url.port() {
            Some(p) => format!("{host}:{p}"),
            None => host.clone(),
        };
        if !self
            .hosts
            .iter()
            .any(|h| h.eq_ignore_ascii_case(&host_port))
        {
            return Err(Rejection::CertUrlRefused(format!(
                "host {host_port} is not on cert_hosts"
            )));
        }
        if !url.path().starts_with(&self.path_prefix)
            || url.query().is_some()
            || !url.username().is_empty()
        {
            return Err(Rejection::CertUrlRefused(format!(
                "path must start with {}",
                self.path_prefix
            )));
        }
        Ok(())
    }

    async fn chain(
        &self,
        cert_url: &str,
    ) -> Result<Arc<Vec<CertificateDer<'static>>>, VerifyError> {
        self.check_url(cert_url)?;
        if let Some(pinned) = self.pins.get(cert_url) {
            return Ok(Arc::new(pinned.clone()));
        }
        if let Some(hit) = self.cache.lock().expect("cache lock").get(cert_url) {
            return Ok(hit.clone());
        }
        if !self.fetch {
            return Err(Rejection::CertUrlRefused("not pinned, and fetching is off".into()).into());
        }
        let pem = self.fetch(cert_url).await?;
        let chain = Arc::new(parse_pem_chain(&pem).map_err(Rejection::CertInvalid)?);
        let mut cache = self.cache.lock().expect("cache lock");
        if cache.len() >= CACHE_ENTRIES {
            // Drop one entry, not all: PayPal's real certificate stays cached.
            if let Some(k) = cache.keys().next().cloned() {
                cache.remove(&k);
            }
        }
        cache.insert(cert_url.to_string(), chain.clone());
        Ok(chain)
    }

    async fn fetch(&self, cert_url: &str) -> Result<Vec<u8>, VerifyError> {
        let unavailable =
            |e: String| VerifyError::Unavailable(format!("fetching PayPal certificate: {e}"));
        let mut resp = self
            .client
            .get(cert_url)
            .send()
            .await
            .map_err(|e| unavailable(e.to_string()))?;
        let status = resp.status();
        if status.is_client_error() {
            // The allowed host says there is no such certificate: the request is not PayPal's.
            return Err(
                Rejection::CertInvalid(format!("certificate URL answered {status}")).into(),
            );
        }
        if !status.is_success() {
            return Err(unavailable(format!("HTTP {status}")));
        }
        let mut body = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(|e| unavailable(e.to_string()))? {
            body.extend_from_slice(&chunk);
            if body.len() > MAX_CERT_BYTES {
                return Err(Rejection::CertInvalid("certificate response too large".into()).into());
            }
        }
        Ok(body)
    }

    fn check(
        &self,
        chain: &[CertificateDer<'static>],
        now: SystemTime,
        message: &[u8],
        sig: &[u8],
    ) -> Result<(), Rejection> {
        let leaf = &chain[0];
        let ee = webpki::EndEntityCert::try_from(leaf)
            .map_err(|e| Rejection::CertInvalid(format!("{e:?}")))?;
        let time = UnixTime::since_unix_epoch(
            now.duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default(),
        );
        ee.verify_for_usage(
            CHAIN_ALGS,
            &self.anchors,
            &chain[1..],
            time,
            AnyUsage,
            None,
            None,
        )
        .map_err(|e| Rejection::CertInvalid(format!("chain: {e:?}")))?;
        let (_, parsed) = x509_parser::parse_x509_certificate(leaf)
            .map_err(|e| Rejection::CertInvalid(format!("parse: {e}")))?;
        let cn_ok = parsed
            .subject()
            .iter_common_name()
            .filter_map(|cn| cn.as_str().ok())
            .any(|cn| cn.to_ascii_lowercase().ends_with(&self.cn_suffix));
        if !cn_ok {
            return Err(Rejection::CertInvalid(format!(
                "subject CN does not end with {}",
                self.cn_suffix
            )));
        }
        ee.verify_signature(webpki::ring::RSA_PKCS1_2048_8192_SHA256, message, sig)
            .map_err(|_| Rejection::BadSignature)
    }
}

impl ApiMode {
    async fn token(&self, refresh: bool) -> Result<Secret, VerifyError> {
        let mut slot = self.token.lock().await;
        if let Some((t, until)) = slot.as_ref() {
            if !refresh && Instant::now() < *until {
                return Ok(t.clone());
            }
        }
        let resp = self
            .client
            .post(format!("{}/v1/oauth2/token", self.base_url))
            .basic_auth(self.client_id.expose(), Some(self.client_secret.expose()))
            .form(&[("grant_type", "client_credentials")])
            .send()
            .await
            .map_err(|e| VerifyError::Unavailable(format!("PayPal OAuth: {e}")))?;
        if !resp.status().is_success() {
            return Err(VerifyError::Unavailable(format!(
                "PayPal OAuth answered {}",
                resp.status()
            )));
        }
        #[derive(serde::Deserialize)]
        struct Token {
            access_token: String,
            #[serde(default)]
            expires_in: Option<u64>,
        }
        let t: Token = resp
            .json()
            .await
            .map_err(|e| VerifyError::Unavailable(format!("PayPal OAuth: {e}")))?;
        let ttl = Duration::from_secs(t.expires_in.unwrap_or(300).saturating_sub(60).max(1));
        let token = Secret::new(t.access_token);
        *slot = Some((token.clone(), Instant::now() + ttl));
        Ok(token)
    }

    #[allow(clippy::too_many_arguments)]
    async fn verify(
        &self,
        id: &str,
        time: &str,
        sig: &str,
        cert_url: &str,
        algo: &str,
        webhook_id: &str,
        body: &[u8],
    ) -> Result<(), VerifyError> {
        // The event must be sent exactly as received: splice the raw JSON in.
        let event = std::str::from_utf8(body)
            .map_err(|_| Rejection::Malformed("body is not UTF-8".into()))?;
        serde_json::from_str::<serde::de::IgnoredAny>(event)
            .map_err(|_| Rejection::Malformed("body is not JSON".into()))?;
        let s = |v: &str| serde_json::Value::String(v.to_string()).to_string();
        let payload = format!(
            "{{\"auth_algo\":{},\"cert_url\":{},\"transmission_id\":{},\"transmission_sig\":{},\"transmission_time\":{},\"webhook_id\":{},\"webhook_event\":{}}}",
            s(algo), s(cert_url), s(id), s(sig), s(time), s(webhook_id), event
        );
        let url = format!(
            "{}/v1/notifications/verify-webhook-signature",
            self.base_url
        );
        for attempt in 0..2 {
            let token = self.token(attempt > 0).await?;
            let resp = self
                .client
                .post(&url)
                .bearer_auth(token.expose())
                .header("content-type", "application/json")
                .body(payload.clone())
                .send()
                .await
                .map_err(|e| VerifyError::Unavailable(format!("PayPal verify: {e}")))?;
            let status = resp.status();
            if status == reqwest::StatusCode::UNAUTHORIZED && attempt == 0 {
                continue;
            }
            if status.is_server_error()
                || status == reqwest::StatusCode::TOO_MANY_REQUESTS
                || status.as_u16() == 401
            {
                return Err(VerifyError::Unavailable(format!(
                    "PayPal verify answered {status}"
                )));
            }
            if !status.is_success() {
                return Err(Rejection::RemoteFailure(format!("HTTP {status}")).into());
            }
            #[derive(serde::Deserialize)]
            struct Answer {
                verification_status: String,
            }
            let a: Answer = resp
                .json()
                .await
                .map_err(|e| VerifyError::Unavailable(format!("PayPal verify: {e}")))?;
            return if a.verification_status == "SUCCESS" {
                Ok(())
            } else {
                Err(Rejection::RemoteFailure(a.verification_status).into())
            };
        }
        Err(VerifyError::Unavailable(
            "PayPal verify: token refused twice".into(),
        ))
    }
}

/// PayPal's headers for `body`, signed with a PKCS#8 RSA key (for `perkflow sign` and tests).
pub fn sign(
    key_pkcs8_pem: &[u8],
    webhook_id: &str,
    transmission_id: &str,
    transmission_time: &str,
    cert_url: &str,
    body: &[u8],
) -> Result<Vec<(String, String)>, String> {
    use rustls_pki_types::PrivatePkcs8KeyDer;
    let der =
        PrivatePkcs8KeyDer::from_pem_slice(key_pkcs8_pem).map_err(|e| format!("key: {e:?}"))?;
    let key = ring::signature::RsaKeyPair::from_pkcs8(der.secret_pkcs8_der())
        .map_err(|e| format!("key: {e}"))?;
    let message = format!(
        "{transmission_id}|{transmission_time}|{webhook_id}|{}",
        crc32fast::hash(body)
    );
    let mut sig = vec![0; key.public().modulus_len()];
    key.sign(
        &ring::signature::RSA_PKCS1_SHA256,
        &ring::rand::SystemRandom::new(),
        message.as_bytes(),
        &mut sig,
    )
    .map_err(|e| format!("sign: {e}"))?;
    Ok(vec![
        ("PAYPAL-TRANSMISSION-ID".into(), transmission_id.into()),
        ("PAYPAL-TRANSMISSION-TIME".into(), transmission_time.into()),
        ("PAYPAL-TRANSMISSION-SIG".into(), B64.encode(sig)),
        ("PAYPAL-CERT-URL".into(), cert_url.into()),
        ("PAYPAL-AUTH-ALGO".into(), "SHA256withRSA".into()),
        ("PAYPAL-AUTH-VERSION".into(), "v2".into()),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderMap;

    const PKI: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/paypal/pki/");
    const URL: &str = "https://api.paypal.com/v1/notifications/certs/CERT-test";

    fn read(name: &str) -> Vec<u8> {
        std::fs::read(format!("{PKI}{name}")).unwrap()
    }
    fn def() -> PaypalDef {
        PaypalDef {
            cert_hosts: vec!["api.paypal.com".into()],
            cert_path_prefix: "/v1/notifications/certs/".into(),
            cert_cn_suffix: ".paypal.com".into(),
            api_base_url: "https://api-m.paypal.com".into(),
        }
    }
    fn verifier(chain: &str) -> PaypalVerifier {
        let opts = CertOptions {
            cert_hosts: None,
            ca_pem: Some(read("root-ca.pem")),
            pins: vec![(URL.into(), read(chain))],
            system_roots: false,
            fetch: true,
        };
        PaypalVerifier::cert(&def(), "WH-ID".into(), opts).unwrap()
    }
    fn request(
        key: &str,
        webhook_id: &str,
        cert_url: &str,
        body: &str,
    ) -> RawRequest<super::super::Unverified> {
        let mut h = HeaderMap::new();
        for (k, v) in sign(
            &read(key),
            webhook_id,
            "tid-1",
            "2026-11-20T10:15:30Z",
            cert_url,
            body.as_bytes(),
        )
        .unwrap()
        {
            h.insert(
                axum::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        RawRequest::new(h, body.as_bytes().to_vec().into(), String::new())
    }
    fn run(v: &PaypalVerifier, r: RawRequest<super::super::Unverified>) -> Result<(), VerifyError> {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(v.verify(&r, SystemTime::now()))
    }
    fn rejected(r: Result<(), VerifyError>) -> Rejection {
        match r {
            Err(VerifyError::Rejected(x)) => x,
            other => panic!("expected a rejection, got {other:?}"),
        }
    }

    #[test]
    fn accepts_a_valid_chain_and_signature() {
        run(
            &verifier("chain.pem"),
            request("leaf.key", "WH-ID", URL, "{\"id\":\"WH-1\"}"),
        )
        .unwrap();
    }

    #[test]
    fn binds_body_and_webhook_id() {
        let v = verifier("chain.pem");
        let mut r = request("leaf.key", "WH-ID", URL, "{\"id\":\"WH-1\"}");
        r.body = b"{\"id\":\"WH-2\"}".to_vec().into();
        assert_eq!(rejected(run(&v, r)), Rejection::BadSignature);
        assert_eq!(
            rejected(run(&v, request("leaf.key", "OTHER", URL, "{}"))),
            Rejection::BadSignature
        );
    }

    #[test]
    fn refuses_untrusted_expired_and_foreign_subject_chains() {
        for (chain, key) in [
            ("untrusted-chain.pem", "untrusted-leaf.key"),
            ("expired-chain.pem", "expired-leaf.key"),
            ("wrong-cn-chain.pem", "wrong-cn-leaf.key"),
        ] {
            let r = rejected(run(&verifier(chain), request(key, "WH-ID", URL, "{}")));
            assert!(matches!(r, Rejection::CertInvalid(_)), "{chain}: {r:?}");
        }
    }

    #[test]
    fn refuses_foreign_cert_urls_before_fetching() {
        let v = verifier("chain.pem");
        for url in [
            "https://evil.example/v1/notifications/certs/CERT-test",
            "http://api.paypal.com/v1/notifications/certs/CERT-test",
            "https://api.paypal.com/other/CERT-test",
            "https://api.paypal.com.evil.example/v1/notifications/certs/x",
            "https://api.paypal.com@evil.example/v1/notifications/certs/x",
        ] {
            let r = rejected(run(&v, request("leaf.key", "WH-ID", url, "{}")));
            assert!(matches!(r, Rejection::CertUrlRefused(_)), "{url}: {r:?}");
        }
    }

    #[test]
    fn without_fetching_an_unpinned_url_is_refused() {
        let opts = CertOptions {
            cert_hosts: None,
            ca_pem: Some(read("root-ca.pem")),
            pins: vec![(URL.into(), read("chain.pem"))],
            system_roots: false,
            fetch: false,
        };
        let v = PaypalVerifier::cert(&def(), "WH-ID".into(), opts).unwrap();
        let other = "https://api.paypal.com/v1/notifications/certs/CERT-other";
        let r = rejected(run(&v, request("leaf.key", "WH-ID", other, "{}")));
        assert!(matches!(r, Rejection::CertUrlRefused(_)), "{r:?}");
        run(&v, request("leaf.key", "WH-ID", URL, "{}")).unwrap();
    }
}
