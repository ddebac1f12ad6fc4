//! `perkflow sandbox`: local emulators of every sink vendor on 127.0.0.1, one port, one path
//! prefix per vendor (`/twilio`, `/sendgrid`, `/klaviyo`, `/slack`, `/zendesk`, `/hubspot`,
//! `/square`, `/giftcard`, `/webhook`). They follow the documented contracts
//! (`../shared/docs/sink-apis.md`): auth checks, content types, required fields, status codes
//! and error bodies, idempotency (Zendesk `Idempotency-Key`, Klaviyo `unique_id`, Square
//! `idempotency_key`, gift-card `PONumber`), and the gift-card order lifecycle (Pending ->
//! Completed, fulfilment callback). They record what they accepted and can inject faults.
//!
//! Control endpoints: `GET /_sandbox/received[?vendor=]`, `POST /_sandbox/faults`
//! (`{"vendor", "status": [503, 429], "retry_after": 1, "delay_ms": 0}` — answered in order,
//! before the real handling), `POST /_sandbox/reset`, `POST /_sandbox/giftcard/expire-tokens`.

mod bookings;
mod giftcard;
mod limits;
mod vendors;

use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::broadcast;

/// The credentials the emulators accept: the development values of the shipped
/// `perkflow.yaml`.
#[derive(Debug, Clone)]
pub struct Credentials {
    pub twilio_sid: String,
    pub twilio_token: String,
    pub twilio_api_key_sid: String,
    pub twilio_api_key_secret: String,
    pub sendgrid_key: String,
    pub klaviyo_key: String,
    pub slack_bot_token: String,
    pub zendesk_email: String,
    pub zendesk_token: String,
    pub hubspot_token: String,
    pub quickbooks_token: String,
    pub square_token: String,
    pub giftcard_email: String,
    pub giftcard_access_token: String,
    pub bookings_key: String,
}

impl Default for Credentials {
    fn default() -> Self {
        Credentials {
            twilio_sid: "AC00000000000000000000000000000000".into(),
            twilio_token: "dev-twilio-token".into(),
            twilio_api_key_sid: "SK00000000000000000000000000000000".into(),
            twilio_api_key_secret: "dev-twilio-api-key-secret".into(),
            sendgrid_key: "SG.dev-key".into(),
            klaviyo_key: "pk_dev_klaviyo".into(),
            slack_bot_token: "xoxb-dev-slack".into(),
            zendesk_email: "agent@example.com".into(),
            zendesk_token: "dev-zendesk-token".into(),
            hubspot_token: "dev-hubspot-token".into(),
            quickbooks_token: "dev-qbo-access-token".into(),
            square_token: "dev-square-token".into(),
            giftcard_email: "dev@example.com".into(),
            giftcard_access_token: "dev-giftcard-token".into(),
            bookings_key: "dev-bookings-key".into(),
        }
    }
}

/// One request an emulator accepted (or refused), for the demo and tests.
#[derive(Debug, Clone, Serialize)]
pub struct Received {
    pub vendor: String,
    pub method: String,
    pub path: String,
    pub status: u16,
    /// One human line: what the vendor would have done.
    pub summary: String,
    pub body: Value,
    /// The request only read (a GET, a search, a token): no effect at the vendor.
    pub read: bool,
}

/// A scripted answer given before the real handling.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultSpec {
    pub vendor: String,
    /// Statuses to answer, in order, one per request (0 = reset the connection).
    #[serde(default)]
    pub status: Vec<u16>,
    #[serde(default)]
    pub retry_after: Option<u64>,
    /// Latency added to every answer of this vendor until reset.
    #[serde(default)]
    pub delay_ms: Option<u64>,
    /// The body of the scripted answers (default: a generic JSON error).
    #[serde(default)]
    pub body: Option<Value>,
}

#[derive(Default)]
struct Faults {
    queued: HashMap<String, VecDeque<u16>>,
    body: HashMap<String, Value>,
    retry_after: HashMap<String, u64>,
    delay: HashMap<String, Duration>,
}

pub struct Sandbox {
    pub creds: Credentials,
    received: Mutex<Vec<Received>>,
    faults: Mutex<Faults>,
    pub(crate) giftcard: Mutex<giftcard::Orders>,
    /// Bookings made through the promo-code bookings API.
    pub(crate) bookings: Mutex<Vec<Value>>,
    /// Zendesk tickets by Idempotency-Key, Klaviyo unique ids, Square keys -> body.
    pub(crate) idempotency: Mutex<HashMap<String, Value>>,
    pub(crate) counter: std::sync::atomic::AtomicU64,
    events: broadcast::Sender<Received>,
    /// Itself, for tasks that outlive a request (order fulfilment).
    pub(crate) me: std::sync::Weak<Sandbox>,
    /// How long a gift-card order stays Pending.
    pub fulfil_after: Duration,
    pub(crate) http: reqwest::Client,
    /// Each vendor's rate limit.
    limits: limits::Limits,
}

impl Sandbox {
    pub fn new(creds: Credentials) -> Arc<Sandbox> {
        Arc::new_cyclic(|me| Sandbox {
            creds,
            received: Mutex::default(),
            faults: Mutex::default(),
            giftcard: Mutex::new(giftcard::Orders::default()),
            idempotency: Mutex::default(),
            bookings: Mutex::default(),
            counter: std::sync::atomic::AtomicU64::new(1),
            events: broadcast::channel(1024).0,
            fulfil_after: Duration::from_millis(1500),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .expect("http client"),
            me: me.clone(),
            limits: limits::Limits::default(),
        })
    }

    /// Every request handled from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Received> {
        self.events.subscribe()
    }

    pub fn received(&self) -> Vec<Received> {
        self.received.lock().expect("sandbox lock").clone()
    }

    pub(crate) fn next_id(&self) -> u64 {
        self.counter
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    }

    pub(crate) fn record(&self, r: Received) {
        self.received.lock().expect("sandbox lock").push(r.clone());
        let _ = self.events.send(r);
    }
}

/// Serves the sandbox on `listener` until `shutdown`.
pub async fn serve(
    sandbox: Arc<Sandbox>,
    listener: tokio::net::TcpListener,
    shutdown: tokio_util::sync::CancellationToken,
) -> std::io::Result<()> {
    let app = router(sandbox);
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}

pub fn router(sandbox: Arc<Sandbox>) -> Router {
    Router::new()
        .route("/_sandbox/received", get(list_received))
        .route("/_sandbox/faults", post(add_fault))
        .route("/_sandbox/reset", post(reset))
        .route("/_sandbox/giftcard/expire-tokens", post(expire_tokens))
        .fallback(dispatch)
        .with_state(sandbox)
}

#[derive(Deserialize)]
struct ReceivedQuery {
    vendor: Option<String>,
}

async fn list_received(
    State(sb): State<Arc<Sandbox>>,
    Query(q): Query<ReceivedQuery>,
) -> Json<Value> {
    let all: Vec<Received> = sb
        .received()
        .into_iter()
        .filter(|r| q.vendor.as_ref().is_none_or(|v| &r.vendor == v))
        .collect();
    Json(json!({ "received": all }))
}

async fn add_fault(State(sb): State<Arc<Sandbox>>, Json(f): Json<FaultSpec>) -> StatusCode {
    let mut faults = sb.faults.lock().expect("sandbox lock");
    faults
        .queued
        .entry(f.vendor.clone())
        .or_default()
        .extend(f.status);
    if let Some(r) = f.retry_after {
        faults.retry_after.insert(f.vendor.clone(), r);
    }
    if let Some(b) = f.body {
        faults.body.insert(f.vendor.clone(), b);
    }
    if let Some(d) = f.delay_ms {
        faults.delay.insert(f.vendor, Duration::from_millis(d));
    }
    StatusCode::NO_CONTENT
}

/// Every gift-card token stops working (as when the vendor rotates them early).
async fn expire_tokens(State(sb): State<Arc<Sandbox>>) -> StatusCode {
    sb.giftcard.lock().expect("sandbox lock").tokens.clear();
    StatusCode::NO_CONTENT
}

async fn reset(State(sb): State<Arc<Sandbox>>) -> StatusCode {
    *sb.faults.lock().expect("sandbox lock") = Faults::default();
    sb.received.lock().expect("sandbox lock").clear();
    StatusCode::NO_CONTENT
}

/// A request as the emulators see it.
pub(crate) struct Req {
    pub method: Method,
    /// The path below the vendor prefix.
    pub path: String,
    pub query: HashMap<String, String>,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Req {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
    pub fn content_type(&self) -> &str {
        self.header("content-type")
            .and_then(|c| c.split(';').next())
            .unwrap_or("")
            .trim()
    }
    pub fn json(&self) -> Option<Value> {
        serde_json::from_slice(&self.body).ok()
    }
    pub fn bearer(&self) -> Option<&str> {
        self.header("authorization")
            .and_then(|a| a.strip_prefix("Bearer "))
    }
    /// HTTP Basic (user, password).
    pub fn basic(&self) -> Option<(String, String)> {
        use base64::Engine;
        let b = self.header("authorization")?.strip_prefix("Basic ")?;
        let raw = base64::engine::general_purpose::STANDARD.decode(b).ok()?;
        let text = String::from_utf8(raw).ok()?;
        let (u, p) = text.split_once(':')?;
        Some((u.to_string(), p.to_string()))
    }
}

/// An emulator's answer plus what to record.
pub(crate) struct Answer {
    pub status: u16,
    pub headers: Vec<(&'static str, String)>,
    pub body: String,
    pub summary: String,
    /// The request only read (recorded as such even when it is not a GET).
    pub read: bool,
}

impl Answer {
    pub fn json(status: u16, body: Value, summary: impl Into<String>) -> Answer {
        Answer {
            status,
            headers: vec![("content-type", "application/json".into())],
            body: body.to_string(),
            summary: summary.into(),
            read: false,
        }
    }
    pub fn text(status: u16, body: &str, summary: impl Into<String>) -> Answer {
        Answer {
            status,
            headers: vec![("content-type", "text/plain".into())],
            body: body.to_string(),
            summary: summary.into(),
            read: false,
        }
    }
    /// Marks a request that only read (a search sent as POST, a token).
    pub fn read(mut self) -> Answer {
        self.read = true;
        self
    }
    pub fn header(mut self, k: &'static str, v: impl Into<String>) -> Answer {
        self.headers.push((k, v.into()));
        self
    }
}

async fn dispatch(
    State(sb): State<Arc<Sandbox>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let full = uri.path().to_string();
    let (vendor, rest) = match full.trim_start_matches('/').split_once('/') {
        Some((v, r)) => (v.to_string(), format!("/{r}")),
        None => (full.trim_start_matches('/').to_string(), "/".to_string()),
    };
    let query: HashMap<String, String> = uri
        .query()
        .map(|q| {
            form_urlencoded::parse(q.as_bytes())
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect()
        })
        .unwrap_or_default();
    let req = Req {
        method,
        path: rest,
        query,
        headers,
        body,
    };
    let (fault, retry_after, delay, fault_body) = {
        let mut f = sb.faults.lock().expect("sandbox lock");
        let status = f.queued.get_mut(&vendor).and_then(|q| q.pop_front());
        (
            status,
            f.retry_after.get(&vendor).copied(),
            f.delay.get(&vendor).copied(),
            f.body.get(&vendor).cloned(),
        )
    };
    if let Some(d) = delay {
        tokio::time::sleep(d).await;
    }
    let answer = match fault {
        Some(0) => {
            // A reset: the connection closes with no answer.
            sb.record(received(
                &vendor,
                &req,
                0,
                "fault injected: connection reset".into(),
            ));
            // Unwinding out of the handler drops the connection with no answer (the server
            // catches it per connection); `resume_unwind` does so without the panic hook, so
            // an injected fault prints no "panicked" line.
            std::panic::resume_unwind(Box::new("sandbox: injected connection reset"));
        }
        Some(status) => {
            let mut a = Answer::json(
                status,
                fault_body.unwrap_or_else(|| json!({"error": "fault injected by the sandbox"})),
                format!("fault injected: HTTP {status}"),
            );
            if let Some(r) = retry_after {
                a = a.header("retry-after", r.to_string());
            }
            a
        }
        None => match sb.limits.check(&vendor) {
            Some(limited) => limited,
            None => vendors::handle(&sb, &vendor, &req).await,
        },
    };
    let mut rec = received(&vendor, &req, answer.status, answer.summary.clone());
    rec.read |= answer.read;
    sb.record(rec);
    let mut r = (
        StatusCode::from_u16(answer.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        answer.body,
    )
        .into_response();
    for (k, v) in answer.headers {
        if let Ok(v) = v.parse() {
            r.headers_mut().insert(k, v);
        }
    }
    r
}

fn received(vendor: &str, req: &Req, status: u16, summary: String) -> Received {
    let body = req.json().unwrap_or_else(|| {
        if req.content_type() == "application/x-www-form-urlencoded" {
            Value::Object(
                form_urlencoded::parse(&req.body)
                    .map(|(k, v)| (k.into_owned(), Value::String(v.into_owned())))
                    .collect(),
            )
        } else {
            Value::String(
                String::from_utf8_lossy(&req.body)
                    .chars()
                    .take(2000)
                    .collect(),
            )
        }
    });
    Received {
        vendor: vendor.to_string(),
        method: req.method.to_string(),
        path: req.path.clone(),
        status,
        summary,
        body,
        read: req.method == Method::GET,
    }
}
