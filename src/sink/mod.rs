//! (7) Sinks: a connector's sink definition plus a configured sink's parameters become a
//! [`SinkClient`] that renders a job into its request, authenticates, sends it, and turns
//! the answer into an [`Outcome`] (`classify`). No code here knows a vendor by name.

pub mod auth;
pub mod classify;
pub mod request;

use crate::connector::sink::{ActionDef, SinkDef};
use crate::pipeline::expr::Engine;
use auth::TokenCache;
pub use classify::{Failure, Outcome};
use request::Request;
use serde_json::{Map, Value as Json};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Bytes of a vendor answer kept in the trace.
const EXCERPT: usize = 512;
/// Bytes of a vendor answer read at most.
const MAX_ANSWER: usize = 1 << 20;

/// Why a reconciliation lookup gave no answer.
#[derive(Debug)]
enum LookupFailed {
    /// It never reached the vendor (no token, no connection): nothing is known.
    NotAsked(String),
    /// The vendor was asked and answered with an error (or not at all).
    Failed(String),
}

impl From<String> for LookupFailed {
    fn from(s: String) -> Self {
        LookupFailed::Failed(s)
    }
}

impl From<&str> for LookupFailed {
    fn from(s: &str) -> Self {
        LookupFailed::Failed(s.to_string())
    }
}

impl std::fmt::Display for LookupFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LookupFailed::NotAsked(s) => write!(f, "the lookup could not be sent: {s}"),
            LookupFailed::Failed(s) => f.write_str(s),
        }
    }
}

/// What one send did.
#[derive(Debug, Clone)]
pub struct Sent {
    pub outcome: Outcome,
    pub status: Option<u16>,
    pub latency: Duration,
    /// The answer's start, secrets redacted.
    pub excerpt: Option<String>,
    /// The attempt was settled by looking up an earlier attempt's effect.
    pub reconciled: bool,
    /// The vendor's JSON answer of a success (what tracking reads).
    pub answer: Option<Json>,
}

impl Sent {
    /// An attempt that ended without an answer from the vendor.
    pub fn failed(reason: String, uncertain: bool) -> Sent {
        Sent {
            outcome: Outcome::Retry {
                after: None,
                reason,
                uncertain,
            },
            status: None,
            latency: Duration::ZERO,
            excerpt: None,
            reconciled: false,
            answer: None,
        }
    }
}

/// A configured sink, ready to send.
pub struct SinkClient {
    pub name: String,
    pub connector: String,
    pub def: Arc<SinkDef>,
    params: Map<String, Json>,
    /// Values never to show (credentials), longest first.
    secrets: Vec<String>,
    base_url: Option<String>,
    http: reqwest::Client,
    token: TokenCache,
    /// Catalogs by URL, with when they were read.
    catalogs: std::sync::Mutex<std::collections::HashMap<String, (Instant, Arc<Json>)>>,
    engine: Engine,
    pub timeout: Duration,
}

impl std::fmt::Debug for SinkClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SinkClient")
            .field("name", &self.name)
            .field("connector", &self.connector)
            .finish_non_exhaustive()
    }
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl SinkClient {
    /// `params` are the resolved values; `secret` names the ones never to show.
    pub fn build(
        name: &str,
        connector: &str,
        def: Arc<SinkDef>,
        params: Map<String, Json>,
        base_url_override: Option<&str>,
        timeout: Duration,
    ) -> Result<SinkClient, String> {
        let engine = Engine::new();
        let mut secrets: Vec<String> = def
            .params
            .iter()
            .filter(|(_, p)| p.secret)
            .filter_map(|(k, _)| params.get(k).and_then(Json::as_str))
            .filter(|s| s.len() >= 4)
            .map(str::to_string)
            .collect();
        let encoded: Vec<String> = secrets
            .iter()
            .map(|s| form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>())
            .filter(|e| !secrets.contains(e))
            .collect();
        secrets.extend(encoded);
        secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
        let ctx = request::context(&params, &Json::Null, "", "", 0);
        let base_url = match (base_url_override, &def.base_url) {
            (Some(b), _) => Some(b.to_string()),
            (None, Some(t)) => match request::render_str(&engine, t, &ctx)? {
                Json::String(s) => Some(s),
                _ => return Err("base_url does not render to a URL".into()),
            },
            (None, None) => None,
        };
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(5)))
            .redirect(reqwest::redirect::Policy::none())
            .pool_max_idle_per_host(def.limits.concurrency.max(1))
            .user_agent(concat!("perkflow/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| e.to_string())?;
        Ok(SinkClient {
            name: name.to_string(),
            connector: connector.to_string(),
            def,
            params,
            secrets,
            base_url,
            http,
            token: TokenCache::default(),
            catalogs: Default::default(),
            engine,
            timeout,
        })
    }

    pub fn action(&self, name: &str) -> Option<&ActionDef> {
        self.def.actions.get(name)
    }

    /// The request a job would send (auth headers shown redacted).
    pub fn render(
        &self,
        action: &str,
        with: &Json,
        key: &str,
        event_id: &str,
        attempt: u32,
    ) -> Result<Request, String> {
        let act = self
            .action(action)
            .ok_or_else(|| format!("sink `{}` has no action `{action}`", self.name))?;
        let ctx = request::context(&self.params, with, key, event_id, attempt);
        let mut req =
            request::render(&self.engine, &self.def, self.base_url.as_deref(), act, &ctx)?;
        if let Some((name, _)) = auth::static_header(&self.engine, &self.def.auth, &ctx)? {
            req.headers.push((name, "[redacted]".into()));
        } else if auth::is_token_exchange(&self.def.auth) {
            req.headers
                .push(("Authorization".into(), "Bearer [redacted]".into()));
        }
        Ok(req)
    }

    /// Replaces every credential value in `text`.
    pub fn redact(&self, text: &str) -> String {
        let mut out = text.to_string();
        for s in &self.secrets {
            out = out.replace(s.as_str(), "[redacted]");
        }
        if let Some(t) = self.token.peek() {
            out = out.replace(t.as_str(), "[redacted]");
        }
        out
    }

    /// One attempt of a job: reconcile first when an earlier attempt's outcome is unknown
    /// and the action can look it up; then send (once more with a fresh token on a 401 when
    /// the token is minted by a call).
    pub async fn attempt(
        &self,
        action: &str,
        with: &Json,
        key: &str,
        event_id: &str,
        attempt: u32,
        uncertain: bool,
    ) -> Sent {
        let started = Instant::now();
        let Some(act) = self.action(action) else {
            return self.unsent(
                started,
                Outcome::Reject {
                    reason: format!(
                        "sink `{}` has no action `{action}` (the connector changed?)",
                        self.name
                    ),
                },
            );
        };
        let ctx = request::context(&self.params, with, key, event_id, attempt);
        if uncertain {
            if let Some(rec) = &act.reconcile {
                match self.reconcile(rec, &ctx).await {
                    Ok(Some(vendor_id)) => {
                        return self.settled(
                            started,
                            Outcome::Delivered {
                                vendor_id: Some(vendor_id),
                            },
                            None,
                            None,
                            true,
                        );
                    }
                    Ok(None) => {} // not there: the earlier attempt did not land; send.
                    // The lookup was answered with an error, but the vendor de-duplicates the
                    // request itself (a repeated PONumber answers 409 with the first order):
                    // resending is safe. A lookup that never reached the vendor is retried
                    // first (below): it is the lookup that decides.
                    Err(LookupFailed::Failed(why)) if act.idempotent => {
                        tracing::info!(sink = %self.name, job = key, reason = %why, "lookup of an earlier attempt failed; resending with the same idempotency key");
                    }
                    Err(why) => {
                        return self.unsent(
                            started,
                            Outcome::Retry {
                                after: None,
                                reason: format!("reconciling an earlier attempt: {why}"),
                                uncertain: true,
                            },
                        );
                    }
                }
            } else if !act.idempotent {
                return self.unsent(started, Outcome::Reject {
                    reason: "an earlier attempt's outcome is unknown (timeout or restart after the request was sent) and this action has no idempotency key or lookup: not resent, to avoid a duplicate".into(),
                });
            }
        }
        if let Some(cat) = &act.catalog {
            match self.check_catalog(cat, &ctx).await {
                Ok(()) => {}
                Err(CatalogError::Refused(reason)) => {
                    return self.unsent(started, Outcome::Reject { reason })
                }
                Err(CatalogError::Credentials(status)) => {
                    return self.settled(
                        started,
                        Outcome::Reject {
                            reason: format!("the vendor refused the credentials (HTTP {status} when minting a token)"),
                        },
                        Some(status),
                        None,
                        false,
                    )
                }
                Err(CatalogError::Unavailable(why)) => {
                    return self.unsent(started, Outcome::Retry {
                            after: None,
                            reason: format!("reading the catalog: {why}"),
                            uncertain: false,
                        })
                }
            }
        }
        let req =
            match request::render(&self.engine, &self.def, self.base_url.as_deref(), act, &ctx) {
                Ok(r) => r,
                Err(e) => {
                    return self.unsent(
                        started,
                        Outcome::Reject {
                            reason: format!("cannot build the request: {}", self.redact(&e)),
                        },
                    )
                }
            };
        match self.exchange(&req, &ctx).await {
            Err(Exchange::Auth(auth::AuthError::Failure(f))) | Err(Exchange::Send(f)) => {
                self.unsent(started, classify::classify_failure(&f))
            }
            Err(Exchange::Auth(auth::AuthError::Refused { status, excerpt })) => {
                let outcome = if status == 401 || status == 403 {
                    Outcome::Reject {
                        reason: format!(
                            "the vendor refused the credentials (HTTP {status} when minting a token)"
                        ),
                    }
                } else {
                    Outcome::Retry {
                        after: None,
                        reason: format!("minting a token: HTTP {status}"),
                        uncertain: false,
                    }
                };
                self.settled(started, outcome, Some(status), Some(excerpt), false)
            }
            Ok((status, headers, body)) => {
                let outcome = classify::classify(
                    &self.def.classify,
                    act,
                    &classify::Answer {
                        status,
                        headers: &headers,
                        body: &body,
                    },
                    now_unix(),
                );
                let excerpt = self.excerpt(&body);
                let delivered = matches!(outcome, Outcome::Delivered { .. });
                let mut sent = self.settled(started, outcome, Some(status), Some(excerpt), false);
                if delivered {
                    sent.answer = serde_json::from_slice(&body).ok();
                }
                sent
            }
        }
    }

    /// One poll of what `action` created (`vendor_id`): `Delivered` once it reached a final
    /// state (the answer tells which), `Retry` while it has not.
    pub async fn track(&self, action: &str, key: &str, event_id: &str, vendor_id: &str) -> Sent {
        let started = Instant::now();
        let Some(t) = self.action(action).and_then(|a| a.track.clone()) else {
            return self.unsent(
                started,
                Outcome::Reject {
                    reason: format!("action `{action}` is not tracked (the connector changed?)"),
                },
            );
        };
        let mut ctx = request::context(&self.params, &Json::Null, key, event_id, 0);
        ctx["job"]["vendor_id"] = Json::String(vendor_id.to_string());
        let url = match request::url(
            &self.engine,
            self.base_url.as_deref(),
            &t.path,
            &Default::default(),
            &ctx,
        ) {
            Ok(u) => u,
            Err(e) => {
                return self.unsent(
                    started,
                    Outcome::Reject {
                        reason: format!("cannot build the status request: {e}"),
                    },
                )
            }
        };
        let req = Request::get(url);
        let (status, body) = match self.exchange(&req, &ctx).await {
            Ok((status, _, body)) => (status, body),
            Err(e) => {
                return self.unsent(
                    started,
                    Outcome::Retry {
                        after: None,
                        reason: format!("status: {e}"),
                        uncertain: false,
                    },
                )
            }
        };
        let excerpt = self.excerpt(&body);
        let json: Option<Json> = serde_json::from_slice(&body).ok();
        let state = json
            .as_ref()
            .and_then(|j| j.pointer(&t.status))
            .and_then(Json::as_str)
            .map(str::to_string);
        let outcome = match (&state, (200..300).contains(&status)) {
            (Some(st), true) if t.done.contains(st) || t.failed.contains(st) => {
                Outcome::Delivered {
                    vendor_id: Some(vendor_id.to_string()),
                }
            }
            (Some(st), true) => Outcome::Retry {
                after: None,
                reason: format!("still {st}"),
                uncertain: false,
            },
            _ => Outcome::Retry {
                after: None,
                reason: format!("status request answered HTTP {status}"),
                uncertain: false,
            },
        };
        let delivered = matches!(outcome, Outcome::Delivered { .. });
        let mut sent = self.settled(started, outcome, Some(status), Some(excerpt), false);
        if delivered {
            sent.answer = json;
        }
        sent
    }

    /// The start of an answer, credentials redacted before it is cut.
    fn excerpt(&self, body: &[u8]) -> String {
        let text = self.redact(&String::from_utf8_lossy(&body[..body.len().min(64 * 1024)]));
        let mut end = text.len().min(EXCERPT);
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text[..end].to_string()
    }

    /// Sends `req` with the sink's auth. When the token is minted by a call, a 401 mints a
    /// new one and sends once more.
    async fn exchange(
        &self,
        req: &Request,
        ctx: &Json,
    ) -> Result<(u16, reqwest::header::HeaderMap, Vec<u8>), Exchange> {
        let mut refreshed = false;
        loop {
            let auth = auth::header(
                &self.engine,
                &self.def.auth,
                ctx,
                &self.token,
                &self.http,
                self.base_url.as_deref(),
            )
            .await
            .map_err(Exchange::Auth)?;
            let answer = self.send(req, auth).await.map_err(Exchange::Send)?;
            if answer.0 == 401 && auth::is_token_exchange(&self.def.auth) && !refreshed {
                self.token.invalidate();
                refreshed = true;
                continue;
            }
            return Ok(answer);
        }
    }

    /// An attempt that ended here, before any answer from the vendor.
    fn unsent(&self, started: Instant, outcome: Outcome) -> Sent {
        self.settled(started, outcome, None, None, false)
    }

    fn settled(
        &self,
        started: Instant,
        outcome: Outcome,
        status: Option<u16>,
        excerpt: Option<String>,
        reconciled: bool,
    ) -> Sent {
        let outcome = match outcome {
            Outcome::Retry {
                after,
                reason,
                uncertain,
            } => Outcome::Retry {
                after,
                reason: self.redact(&reason),
                uncertain,
            },
            Outcome::Reject { reason } => Outcome::Reject {
                reason: self.redact(&reason),
            },
            d => d,
        };
        Sent {
            answer: None,
            outcome,
            status,
            latency: started.elapsed(),
            excerpt: excerpt.filter(|e| !e.is_empty()).map(|e| self.redact(&e)),
            reconciled,
        }
    }

    async fn send(
        &self,
        req: &Request,
        auth: Option<(String, String)>,
    ) -> Result<(u16, reqwest::header::HeaderMap, Vec<u8>), Failure> {
        let method = reqwest::Method::from_bytes(req.method.as_bytes())
            .map_err(|e| Failure::NotSent(e.to_string()))?;
        let mut rb = self.http.request(method, &req.url);
        for (k, v) in &req.headers {
            rb = rb.header(k.as_str(), v.as_str());
        }
        if let Some((k, v)) = auth {
            rb = rb.header(k.as_str(), v.as_str());
        }
        if let Some(b) = &req.body {
            rb = rb.body(b.clone());
        }
        let resp = rb.send().await.map_err(|e| describe(&e))?;
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        // Once the status is known, the answer is classified by it, even if its body was cut
        // short: a 201 whose body timed out is still a 201.
        let body = read_capped(resp).await;
        Ok((status, headers, body))
    }

    /// Looks up whether an earlier attempt took effect: `Some(vendor id)` if it did.
    async fn reconcile(
        &self,
        rec: &crate::connector::sink::ReconcileDef,
        ctx: &Json,
    ) -> Result<Option<String>, LookupFailed> {
        let url = request::url(
            &self.engine,
            self.base_url.as_deref(),
            &rec.path,
            &rec.query,
            ctx,
        )?;
        let req = Request {
            method: rec.method.to_ascii_uppercase(),
            url,
            headers: Vec::new(),
            body: None,
            body_text: None,
        };
        let (status, body) = match self.exchange(&req, ctx).await {
            Ok((status, _, body)) => (status, body),
            // The lookup never reached the vendor (no token, no connection): nothing is
            // known, so nothing may be resent yet.
            Err(e @ Exchange::Auth(_)) | Err(e @ Exchange::Send(Failure::NotSent(_))) => {
                return Err(LookupFailed::NotAsked(e.to_string()))
            }
            Err(e) => return Err(LookupFailed::Failed(e.to_string())),
        };
        if status == 404 {
            return Ok(None);
        }
        if !(200..300).contains(&status) {
            return Err(format!("lookup answered HTTP {status}").into());
        }
        let json: Json =
            serde_json::from_slice(&body).map_err(|_| "lookup answer is not JSON".to_string())?;
        let scalar = |v: &Json| match v {
            Json::String(s) if !s.is_empty() => Some(s.clone()),
            Json::Number(n) => Some(n.to_string()),
            _ => None,
        };
        let Some(items) = &rec.items else {
            return Ok(json.pointer(&rec.found).and_then(scalar));
        };
        let list = json
            .pointer(items)
            .and_then(Json::as_array)
            .ok_or("lookup answer has no list")?;
        let want = match &rec.match_value {
            Some(t) => request::render_str(&self.engine, t, ctx)?,
            None => Json::Null,
        };
        let field = rec.match_field.as_deref().unwrap_or_default();
        Ok(list
            .iter()
            .find(|item| {
                item.get(field)
                    .is_some_and(|v| v == &want || scalar(v) == scalar(&want))
            })
            .and_then(|item| item.pointer(&rec.found).and_then(scalar)))
    }
}

/// A request that got no answer: the token could not be had, or the request failed.
#[derive(Debug)]
enum Exchange {
    Auth(auth::AuthError),
    Send(Failure),
}

impl std::fmt::Display for Exchange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Exchange::Auth(auth::AuthError::Refused { status, .. }) => {
                write!(f, "token: HTTP {status}")
            }
            Exchange::Auth(auth::AuthError::Failure(x)) | Exchange::Send(x) => write!(f, "{x:?}"),
        }
    }
}

/// Why a catalog check did not pass.
enum CatalogError {
    /// The job asks for something the catalog does not offer: permanent.
    Refused(String),
    /// The catalog could not be read: retry.
    Unavailable(String),
    /// The vendor refused the credentials.
    Credentials(u16),
}

impl SinkClient {
    /// The catalog at `cat.path`, read at most once per `ttl`.
    async fn catalog(
        &self,
        cat: &crate::connector::sink::CatalogDef,
        ctx: &Json,
    ) -> Result<Arc<Json>, CatalogError> {
        let url = request::url(
            &self.engine,
            self.base_url.as_deref(),
            &cat.path,
            &cat.query,
            ctx,
        )
        .map_err(CatalogError::Unavailable)?;
        if let Some((at, json)) = self.catalogs.lock().expect("catalog lock").get(&url) {
            if at.elapsed() < cat.ttl.0 {
                return Ok(json.clone());
            }
        }
        let req = Request::get(url.clone());
        let (status, _, body) = self.exchange(&req, ctx).await.map_err(|e| match e {
            Exchange::Auth(auth::AuthError::Refused { status, .. })
                if matches!(status, 401 | 403) =>
            {
                CatalogError::Credentials(status)
            }
            other => CatalogError::Unavailable(other.to_string()),
        })?;
        // A catalog read per item (`/v1/Products/{id}`) answers 404 for an item it lacks.
        if status == 404 && cat.path.contains("{{") {
            return Ok(Arc::new(Json::Null));
        }
        if !(200..300).contains(&status) {
            return Err(CatalogError::Unavailable(format!("HTTP {status}")));
        }
        let json: Json = serde_json::from_slice(&body)
            .map_err(|_| CatalogError::Unavailable("the catalog is not JSON".into()))?;
        let json = Arc::new(json);
        self.catalogs
            .lock()
            .expect("catalog lock")
            .insert(url, (Instant::now(), json.clone()));
        Ok(json)
    }

    async fn check_catalog(
        &self,
        cat: &crate::connector::sink::CatalogDef,
        ctx: &Json,
    ) -> Result<(), CatalogError> {
        let catalog = self.catalog(cat, ctx).await?;
        let render = |t: &str| {
            request::render_str(&self.engine, t, ctx)
                .map_err(|e| CatalogError::Refused(format!("cannot check the catalog: {e}")))
        };
        let wanted = render(&cat.find)?;
        let wanted_text = scalar_text(&wanted);
        let matches = |i: &&Json| i.get(&cat.key).map(scalar_text) == Some(wanted_text.clone());
        // A list of items, or (read per item) the item itself, or nothing (404).
        let found = match catalog.pointer(&cat.items) {
            Some(Json::Array(items)) => items.iter().find(matches),
            Some(item @ Json::Object(_)) => Some(item).filter(matches),
            Some(Json::Null) => None,
            _ => {
                return Err(CatalogError::Unavailable(
                    "the catalog answer has no list and no item".into(),
                ))
            }
        };
        let Some(item) = found else {
            return Err(CatalogError::Refused(format!(
                "`{wanted_text}` is not in the vendor's catalog; nothing was sent"
            )));
        };
        for rule in &cat.require {
            let value = render(&rule.value)?;
            // A product without the list (an open-amount product has no denominations) is
            // not refused for it.
            let Some(allowed) = item.pointer(&rule.field).and_then(Json::as_array) else {
                continue;
            };
            let allowed = Some(allowed);
            let ok = allowed.is_some_and(|list| {
                list.iter()
                    .any(|x| x == &value || scalar_text(x) == scalar_text(&value))
            });
            if !ok {
                let offered: Vec<String> = allowed.into_iter().flatten().map(scalar_text).collect();
                return Err(CatalogError::Refused(format!(
                    "`{}` {} `{wanted_text}` (offered: {}); nothing was sent",
                    scalar_text(&value),
                    rule.message,
                    offered.join(", ")
                )));
            }
        }
        Ok(())
    }
}

/// A JSON scalar as text (numbers compare by value: 20 and 20.0 are the same).
fn scalar_text(v: &Json) -> String {
    match v {
        Json::String(s) => s.clone(),
        Json::Number(n) => n
            .as_f64()
            .filter(|f| f.fract() == 0.0 && f.abs() < 1e15)
            .map(|f| format!("{}", f as i64))
            .unwrap_or_else(|| n.to_string()),
        other => other.to_string(),
    }
}

/// The answer's body, at most `MAX_ANSWER` bytes; what arrived before an error.
async fn read_capped(mut resp: reqwest::Response) -> Vec<u8> {
    let mut out = Vec::new();
    while let Ok(Some(chunk)) = resp.chunk().await {
        let room = MAX_ANSWER.saturating_sub(out.len());
        out.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if room <= chunk.len() {
            break;
        }
    }
    out
}

/// Whether a failed request may have reached the vendor.
fn describe(e: &reqwest::Error) -> Failure {
    let text = {
        let mut s = e.to_string();
        let mut src = std::error::Error::source(e);
        while let Some(inner) = src {
            s.push_str(": ");
            s.push_str(&inner.to_string());
            src = inner.source();
        }
        s
    };
    if e.is_connect() || e.is_builder() {
        Failure::NotSent(text)
    } else if e.is_timeout() {
        Failure::Unknown(format!("timed out: {text}"))
    } else {
        Failure::Unknown(text)
    }
}

#[cfg(test)]
mod tests;
