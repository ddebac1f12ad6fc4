//! `hmac_sha256`: base64 or hex HMAC-SHA256 over the raw body, or over the signed URL followed
//! by the body (Square). Shopify, WooCommerce, QuickBooks and Square use it.

use super::{header, RawRequest, Rejection};
use crate::connector::{Encoding, HmacDef, KeyForm, Signs};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

#[derive(Clone)]
pub struct HmacVerifier {
    pub headers: Vec<String>,
    pub encoding: Encoding,
    pub signs: Signs,
    /// Accepted keys (several while rotating).
    keys: Vec<Vec<u8>>,
}

impl std::fmt::Debug for HmacVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HmacVerifier")
            .field("headers", &self.headers)
            .field("keys", &format_args!("[{} redacted]", self.keys.len()))
            .finish()
    }
}

impl HmacVerifier {
    pub fn new(def: &HmacDef, secrets: &[&str]) -> Self {
        let keys = secrets.iter().map(|s| key_bytes(def.key, s)).collect();
        HmacVerifier {
            headers: def.header.0.clone(),
            encoding: def.encoding,
            signs: def.signs,
            keys,
        }
    }

    pub fn verify<S>(&self, req: &RawRequest<S>) -> Result<(), Rejection> {
        let value = header(&req.headers, &self.headers)
            .ok_or_else(|| Rejection::MissingHeader(self.headers[0].clone()))?;
        let sig = decode(self.encoding, value.trim())
            .ok_or_else(|| Rejection::Malformed("not valid encoding".into()))?;
        for key in &self.keys {
            let mut mac = self.mac(key, req);
            mac.update(&req.body);
            // `verify_slice` compares in constant time.
            if mac.verify_slice(&sig).is_ok() {
                return Ok(());
            }
        }
        Err(Rejection::BadSignature)
    }

    fn mac<S>(&self, key: &[u8], req: &RawRequest<S>) -> HmacSha256 {
        let mut mac = HmacSha256::new_from_slice(key).expect("HMAC takes a key of any length");
        if self.signs == Signs::UrlAndBody {
            mac.update(req.url.as_bytes());
        }
        mac
    }
}

/// The signature header value for `body` (and `url`), for `perkflow sign` and tests.
pub fn sign(def: &HmacDef, secret: &str, url: &str, body: &[u8]) -> (String, String) {
    let mut mac = HmacSha256::new_from_slice(&key_bytes(def.key, secret)).expect("any key length");
    if def.signs == Signs::UrlAndBody {
        mac.update(url.as_bytes());
    }
    mac.update(body);
    let tag = mac.finalize().into_bytes();
    let value = match def.encoding {
        Encoding::Base64 => B64.encode(tag),
        Encoding::Hex => hex::encode(tag),
    };
    (def.header.0[0].clone(), value)
}

fn decode(encoding: Encoding, value: &str) -> Option<Vec<u8>> {
    match encoding {
        Encoding::Base64 => B64.decode(value).ok(),
        Encoding::Hex => hex::decode(value).ok(),
    }
}

fn key_bytes(form: KeyForm, secret: &str) -> Vec<u8> {
    match form {
        KeyForm::Raw => secret.as_bytes().to_vec(),
        KeyForm::HtmlEntityDecoded => html_entity_decode(secret).into_bytes(),
    }
}

/// WordPress runs `wp_specialchars_decode(…, ENT_QUOTES)` on the webhook secret before signing:
/// zero-padded numeric forms are normalised, then one pass (PHP's `strtr`: the longest match
/// at each position, nothing decoded twice) replaces the named and numeric entities of
/// `& < > " '`; anything else stays as written.
fn html_entity_decode(s: &str) -> String {
    use std::sync::LazyLock;
    const TABLE: [(&str, &str); 12] = [
        ("&#039;", "'"),
        ("&#x27;", "'"),
        ("&quot;", "\""),
        ("&#034;", "\""),
        ("&#x22;", "\""),
        ("&lt;", "<"),
        ("&#060;", "<"),
        ("&gt;", ">"),
        ("&#062;", ">"),
        ("&amp;", "&"),
        ("&#038;", "&"),
        ("&#x26;", "&"),
    ];
    static PADDED: LazyLock<[(regex::Regex, &str); 8]> = LazyLock::new(|| {
        let re = |p: &str| regex::Regex::new(p).expect("a valid pattern");
        [
            (re("&#0*39;"), "&#039;"),
            (re("(?i)&#x0*27;"), "&#x27;"),
            (re("&#0*34;"), "&#034;"),
            (re("(?i)&#x0*22;"), "&#x22;"),
            (re("&#0*60;"), "&#060;"),
            (re("&#0*62;"), "&#062;"),
            (re("&#0*38;"), "&#038;"),
            (re("(?i)&#x0*26;"), "&#x26;"),
        ]
    });
    if !s.contains('&') {
        return s.to_string();
    }
    let mut text = s.to_string();
    for (re, to) in PADDED.iter() {
        text = re.replace_all(&text, *to).into_owned();
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text.as_str();
    while let Some(at) = rest.find('&') {
        out.push_str(&rest[..at]);
        rest = &rest[at..];
        match TABLE.iter().find(|(from, _)| rest.starts_with(from)) {
            Some((from, to)) => {
                out.push_str(to);
                rest = &rest[from.len()..];
            }
            None => {
                out.push('&');
                rest = &rest[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::scalar::Names;
    use axum::http::HeaderMap;

    fn def(signs: Signs, key: KeyForm) -> HmacDef {
        HmacDef {
            header: Names(vec!["X-Sig".into(), "x-sig-alt".into()]),
            encoding: Encoding::Base64,
            signs,
            key,
        }
    }

    fn req(h: &[(&str, &str)], body: &str, url: &str) -> RawRequest<super::super::Unverified> {
        let mut headers = HeaderMap::new();
        for (k, v) in h {
            headers.insert(
                axum::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        RawRequest::new(headers, body.as_bytes().to_vec().into(), url.into())
    }

    // Known answers computed independently (Python: base64(hmac.new(key, msg, sha256).digest())).
    #[test]
    fn matches_known_answers() {
        let d = def(Signs::Body, KeyForm::Raw);
        assert_eq!(
            sign(&d, "hush", "", b"{\"id\":1}").1,
            "VnKUjZsLuN5iZWjn5EntcBVCF9kMN43LglzCE1/GSeY="
        );
        let d = def(Signs::UrlAndBody, KeyForm::Raw);
        assert_eq!(
            sign(
                &d,
                "sqkey",
                "https://hooks.example.com/hooks/square",
                b"{\"a\":1}"
            )
            .1,
            "smuDVZTAcCUWpktzjK1tL3fthmHUhnlSgQPps3+UNB0="
        );
    }

    #[test]
    fn accepts_any_rotated_key_and_alternate_header() {
        let d = def(Signs::Body, KeyForm::Raw);
        let v = HmacVerifier::new(&d, &["old", "new"]);
        let (_, sig) = sign(&d, "new", "", b"body");
        assert!(v.verify(&req(&[("x-sig-alt", &sig)], "body", "")).is_ok());
        let (_, sig) = sign(&d, "old", "", b"body");
        assert!(v.verify(&req(&[("X-Sig", &sig)], "body", "")).is_ok());
    }

    #[test]
    fn rejects_tampering_wrong_key_missing_and_malformed() {
        let d = def(Signs::Body, KeyForm::Raw);
        let v = HmacVerifier::new(&d, &["k"]);
        let (_, sig) = sign(&d, "k", "", b"body");
        assert_eq!(
            v.verify(&req(&[("X-Sig", &sig)], "bodY", "")),
            Err(Rejection::BadSignature)
        );
        let (_, other) = sign(&d, "other", "", b"body");
        assert_eq!(
            v.verify(&req(&[("X-Sig", &other)], "body", "")),
            Err(Rejection::BadSignature)
        );
        assert!(matches!(
            v.verify(&req(&[], "body", "")),
            Err(Rejection::MissingHeader(_))
        ));
        assert!(matches!(
            v.verify(&req(&[("X-Sig", "%%%")], "body", "")),
            Err(Rejection::Malformed(_))
        ));
    }

    #[test]
    fn url_signing_binds_the_url() {
        let d = def(Signs::UrlAndBody, KeyForm::Raw);
        let v = HmacVerifier::new(&d, &["k"]);
        let (_, sig) = sign(&d, "k", "https://a.example/hooks/sq", b"{}");
        assert!(v
            .verify(&req(&[("X-Sig", &sig)], "{}", "https://a.example/hooks/sq"))
            .is_ok());
        assert_eq!(
            v.verify(&req(&[("X-Sig", &sig)], "{}", "https://b.example/hooks/sq")),
            Err(Rejection::BadSignature)
        );
    }

    /// As PHP's `wp_specialchars_decode($s, ENT_QUOTES)` answers.
    #[test]
    fn decodes_entities_as_wordpress_does() {
        for (given, decoded) in [
            ("plain", "plain"),
            ("a&amp;b", "a&b"),
            ("&#038;&#38;&#0038;&#x26;&#X26;&#x0026;", "&&&&&&"),
            ("&lt;&#060;&#60;&gt;&#062;&#62;", "<<<>>>"),
            (
                "&quot;&#034;&#34;&#x22;&#039;&#39;&#x27;&#X0027;",
                "\"\"\"\"''''",
            ),
            // One pass: a decoded `&` never starts another entity.
            ("&amp;lt;", "&lt;"),
            ("&amp;#038;", "&#038;"),
            // Other entities, and bare ampersands, stay.
            ("&nbsp;&copy;&#65;&x", "&nbsp;&copy;&#65;&x"),
            ("&#x2A;&#039", "&#x2A;&#039"),
        ] {
            assert_eq!(html_entity_decode(given), decoded, "{given}");
        }
    }

    #[test]
    fn wordpress_secret_is_entity_decoded() {
        let d = def(Signs::Body, KeyForm::HtmlEntityDecoded);
        let v = HmacVerifier::new(&d, &["a&amp;b"]);
        let (_, sig) = sign(&def(Signs::Body, KeyForm::Raw), "a&b", "", b"x");
        assert!(v.verify(&req(&[("X-Sig", &sig)], "x", "")).is_ok());
    }
}
