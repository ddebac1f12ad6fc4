//! The closed set of authentication kinds: none, basic, bearer, a header, and a token minted
//! by a call and cached until shortly before it expires.

use super::classify::Failure;
use super::request;
use crate::connector::sink::AuthDef;
use crate::pipeline::expr::Engine;
use base64::Engine as _;
use serde_json::Value as Json;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Refresh a minted token this long before it expires.
const EARLY: Duration = Duration::from_secs(60);

#[derive(Default)]
pub struct TokenCache {
    token: Mutex<Option<(String, Instant)>>,
    /// One mint at a time.
    minting: tokio::sync::Mutex<()>,
}

impl TokenCache {
    /// The current token, if any (for redaction).
    pub fn peek(&self) -> Option<String> {
        self.token
            .lock()
            .expect("token lock")
            .as_ref()
            .map(|(t, _)| t.clone())
    }

    pub fn invalidate(&self) {
        *self.token.lock().expect("token lock") = None;
    }
    fn current(&self) -> Option<String> {
        let t = self.token.lock().expect("token lock");
        t.as_ref()
            .filter(|(_, until)| Instant::now() < *until)
            .map(|(v, _)| v.clone())
    }
}

#[derive(Debug)]
pub enum AuthError {
    Failure(Failure),
    Refused { status: u16, excerpt: String },
}

pub fn is_token_exchange(def: &AuthDef) -> bool {
    matches!(def, AuthDef::TokenExchange(_))
}

fn text(engine: &Engine, src: &str, ctx: &Json) -> Result<String, String> {
    Ok(match request::render_str(engine, src, ctx)? {
        Json::String(s) => s,
        Json::Null => String::new(),
        other => other.to_string(),
    })
}

/// The auth header of the kinds that need no call.
pub fn static_header(
    engine: &Engine,
    def: &AuthDef,
    ctx: &Json,
) -> Result<Option<(String, String)>, String> {
    Ok(match def {
        AuthDef::None | AuthDef::TokenExchange(_) => None,
        AuthDef::Basic { username, password } => {
            let pair = format!(
                "{}:{}",
                text(engine, username, ctx)?,
                text(engine, password, ctx)?
            );
            Some((
                "Authorization".into(),
                format!(
                    "Basic {}",
                    base64::engine::general_purpose::STANDARD.encode(pair)
                ),
            ))
        }
        AuthDef::Bearer { token } => Some((
            "Authorization".into(),
            format!("Bearer {}", text(engine, token, ctx)?),
        )),
        AuthDef::Header { name, value } => Some((name.clone(), text(engine, value, ctx)?)),
    })
}

/// The auth header for a request, minting a token when the kind needs one.
pub async fn header(
    engine: &Engine,
    def: &AuthDef,
    ctx: &Json,
    cache: &TokenCache,
    http: &reqwest::Client,
    base: Option<&str>,
) -> Result<Option<(String, String)>, AuthError> {
    let AuthDef::TokenExchange(t) = def else {
        return static_header(engine, def, ctx)
            .map_err(|e| AuthError::Failure(Failure::NotSent(e)));
    };
    if let Some(tok) = cache.current() {
        return Ok(Some(("Authorization".into(), format!("Bearer {tok}"))));
    }
    let _one = cache.minting.lock().await;
    if let Some(tok) = cache.current() {
        return Ok(Some(("Authorization".into(), format!("Bearer {tok}"))));
    }
    let url = request::url(engine, base, &t.path, &Default::default(), ctx)
        .map_err(|e| AuthError::Failure(Failure::NotSent(e)))?;
    let method = reqwest::Method::from_bytes(t.method.to_ascii_uppercase().as_bytes())
        .map_err(|e| AuthError::Failure(Failure::NotSent(e.to_string())))?;
    let mut rb = http.request(method, url);
    for (k, v) in &t.headers {
        let v = text(engine, v, ctx).map_err(|e| AuthError::Failure(Failure::NotSent(e)))?;
        rb = rb.header(k.as_str(), v);
    }
    // Whatever happens to the token call, the action itself was not sent.
    let resp = rb
        .send()
        .await
        .map_err(|e| AuthError::Failure(Failure::NotSent(format!("minting a token: {e}"))))?;
    let status = resp.status().as_u16();
    let mut resp = resp;
    let mut body = Vec::new();
    while let Ok(Some(chunk)) = resp.chunk().await {
        if body.len() + chunk.len() > 64 * 1024 {
            break;
        }
        body.extend_from_slice(&chunk);
    }
    if !(200..300).contains(&status) {
        return Err(AuthError::Refused {
            status,
            excerpt: String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned(),
        });
    }
    let json: Json = serde_json::from_slice(&body).map_err(|_| AuthError::Refused {
        status,
        excerpt: "token answer is not JSON".into(),
    })?;
    let token = json
        .pointer(&t.token)
        .and_then(Json::as_str)
        .filter(|s| !s.is_empty())
        .ok_or(AuthError::Refused {
            status,
            excerpt: format!("token answer has no {}", t.token),
        })?
        .to_string();
    let lifetime = t
        .expires_in
        .as_ref()
        .and_then(|p| json.pointer(p))
        .and_then(Json::as_u64)
        .map(Duration::from_secs)
        .unwrap_or(Duration::from_secs(3600));
    let until = Instant::now() + lifetime.saturating_sub(EARLY).max(lifetime / 2);
    *cache.token.lock().expect("token lock") = Some((token.clone(), until));
    Ok(Some(("Authorization".into(), format!("Bearer {token}"))))
}
