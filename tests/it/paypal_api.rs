//! PayPal `verify: api` against a fake PayPal REST API on 127.0.0.1: OAuth client-credentials
//! token (cached, refreshed once on a 401), verify-webhook-signature with the raw event spliced
//! in byte for byte, and 503 + Retry-After (nothing stored) when PayPal cannot answer.

use crate::helpers::*;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post as route_post;
use axum::{Json, Router};
use base64::Engine;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};

const FIXTURE: &str = "fixtures/paypal/payment-capture-completed.json";
const WEBHOOK_ID: &str = "WH-API";
const CLIENT_ID: &str = "cid";
const CLIENT_SECRET: &str = "csecret";
/// The transmission signature the fake PayPal deems genuine.
const GENUINE_SIG: &str = "R2VudWluZS1wYXlwYWwtc2lnbmF0dXJl";
const TOKEN_PREFIX: &str = "A21AAtest-access-token-";

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Behaviour {
    /// Answer as PayPal does.
    Normal,
    /// Answer 500.
    ServerError,
    /// Answer 401 whatever the token (the verify endpoint only).
    Unauthorized,
}

/// The fake PayPal's state: what it issued, what it was asked, and what it found wrong.
struct Fake {
    fixture: Vec<u8>,
    event: Value,
    fixture_headers: Vec<(String, String)>,
    token_requests: AtomicUsize,
    verify_requests: AtomicUsize,
    /// Tokens the verify endpoint accepts.
    valid_tokens: Mutex<Vec<String>>,
    token_behaviour: Mutex<Behaviour>,
    verify_behaviour: Mutex<Behaviour>,
    /// Protocol violations seen by the fake (asserted empty by every test).
    problems: Mutex<Vec<String>>,
}

impl Fake {
    fn problem(&self, p: String) {
        self.problems.lock().unwrap().push(p);
    }
    fn header(&self, name: &str) -> &str {
        self.fixture_headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .unwrap_or_else(|| panic!("fixture has no {name}"))
    }
    fn tokens(&self) -> usize {
        self.token_requests.load(SeqCst)
    }
    fn verifies(&self) -> usize {
        self.verify_requests.load(SeqCst)
    }
    /// PayPal revokes every token issued so far.
    fn revoke_tokens(&self) {
        self.valid_tokens.lock().unwrap().clear();
    }
    fn set_token(&self, b: Behaviour) {
        *self.token_behaviour.lock().unwrap() = b;
    }
    fn set_verify(&self, b: Behaviour) {
        *self.verify_behaviour.lock().unwrap() = b;
    }
    fn assert_no_problems(&self) {
        let p = self.problems.lock().unwrap();
        assert!(
            p.is_empty(),
            "the fake PayPal saw protocol errors:\n{}",
            p.join("\n")
        );
    }
}

/// `POST /v1/oauth2/token`: HTTP Basic client_id:client_secret, form grant_type=client_credentials.
async fn token(State(f): State<Arc<Fake>>, headers: HeaderMap, body: Bytes) -> Response {
    let n = f.token_requests.fetch_add(1, SeqCst) + 1;
    if *f.token_behaviour.lock().unwrap() == Behaviour::ServerError {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    }
    let basic = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{CLIENT_ID}:{CLIENT_SECRET}"))
    );
    let auth = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    if auth != Some(basic.as_str()) {
        f.problem(format!(
            "token: Authorization {auth:?} is not Basic cid:csecret"
        ));
        return StatusCode::UNAUTHORIZED.into_response();
    }
    let ctype = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok());
    if ctype != Some("application/x-www-form-urlencoded") {
        f.problem(format!("token: content-type {ctype:?}"));
    }
    let form = String::from_utf8_lossy(&body);
    if !form
        .split('&')
        .any(|kv| kv == "grant_type=client_credentials")
    {
        f.problem(format!(
            "token: form {form:?} lacks grant_type=client_credentials"
        ));
        return StatusCode::BAD_REQUEST.into_response();
    }
    let access = format!("{TOKEN_PREFIX}{n}");
    f.valid_tokens.lock().unwrap().push(access.clone());
    Json(json!({
        "scope": "https://uri.paypal.com/services/applications/webhooks",
        "access_token": access,
        "token_type": "Bearer",
        "app_id": "APP-TEST",
        "expires_in": 32400,
        "nonce": "2026-11-20T10:15:30Zabc"
    }))
    .into_response()
}

/// `POST /v1/notifications/verify-webhook-signature`.
async fn verify(State(f): State<Arc<Fake>>, headers: HeaderMap, body: Bytes) -> Response {
    f.verify_requests.fetch_add(1, SeqCst);
    match *f.verify_behaviour.lock().unwrap() {
        Behaviour::ServerError => return StatusCode::INTERNAL_SERVER_ERROR.into_response(),
        Behaviour::Unauthorized => return StatusCode::UNAUTHORIZED.into_response(),
        Behaviour::Normal => {}
    }
    let auth = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let Some(bearer) = auth.and_then(|a| a.strip_prefix("Bearer ")) else {
        f.problem(format!(
            "verify: Authorization {auth:?} is not a Bearer token"
        ));
        return StatusCode::UNAUTHORIZED.into_response();
    };
    if !f.valid_tokens.lock().unwrap().iter().any(|t| t == bearer) {
        // Expired or revoked: PayPal answers 401 and the client must get a new token.
        return StatusCode::UNAUTHORIZED.into_response();
    }
    let ctype = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok());
    if ctype != Some("application/json") {
        f.problem(format!("verify: content-type {ctype:?}"));
    }
    // The event must be the received bytes, spliced in: not re-serialised.
    if !body
        .windows(f.fixture.len())
        .any(|w| w == f.fixture.as_slice())
    {
        f.problem("verify: the raw body does not contain the webhook's exact bytes".into());
    }
    let Ok(req) = serde_json::from_slice::<Value>(&body) else {
        f.problem(format!(
            "verify: body is not JSON: {}",
            String::from_utf8_lossy(&body)
        ));
        return StatusCode::BAD_REQUEST.into_response();
    };
    let field = |k: &str| req.get(k).and_then(Value::as_str).unwrap_or_default();
    for (k, h) in [
        ("auth_algo", "PAYPAL-AUTH-ALGO"),
        ("cert_url", "PAYPAL-CERT-URL"),
        ("transmission_id", "PAYPAL-TRANSMISSION-ID"),
        ("transmission_time", "PAYPAL-TRANSMISSION-TIME"),
    ] {
        if field(k) != f.header(h) {
            f.problem(format!(
                "verify: {k} {:?} is not {h} {:?}",
                field(k),
                f.header(h)
            ));
        }
    }
    let genuine = field("webhook_id") == WEBHOOK_ID
        && field("transmission_sig") == GENUINE_SIG
        && req.get("webhook_event") == Some(&f.event);
    let status = if genuine { "SUCCESS" } else { "FAILURE" };
    Json(json!({ "verification_status": status })).into_response()
}

/// Starts the fake PayPal on a free port; returns it and its base URL.
async fn fake_paypal() -> (Arc<Fake>, String) {
    let (fixture, fixture_headers) = perkflow::sign::read_fixture(&repo(FIXTURE)).unwrap();
    let fake = Arc::new(Fake {
        event: serde_json::from_slice(&fixture).unwrap(),
        fixture,
        fixture_headers,
        token_requests: AtomicUsize::new(0),
        verify_requests: AtomicUsize::new(0),
        valid_tokens: Mutex::new(Vec::new()),
        token_behaviour: Mutex::new(Behaviour::Normal),
        verify_behaviour: Mutex::new(Behaviour::Normal),
        problems: Mutex::new(Vec::new()),
    });
    let app = Router::new()
        .route("/v1/oauth2/token", route_post(token))
        .route(
            "/v1/notifications/verify-webhook-signature",
            route_post(verify),
        )
        .with_state(fake.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (fake, base)
}

fn start_daemon(paypal_base: &str) -> Daemon {
    Daemon::start(&format!(
        "sources:\n  paypal: {{ connector: paypal, webhook_id: {WEBHOOK_ID}, verify: api, client_id: {CLIENT_ID}, client_secret: {CLIENT_SECRET}, base_url: {paypal_base} }}\n"
    ))
}

/// The fixture with its headers and the given transmission signature.
fn webhook(sig: &str) -> Signed {
    let (body, headers) = perkflow::sign::read_fixture(&repo(FIXTURE)).unwrap();
    Signed { body, headers }.set("PAYPAL-TRANSMISSION-SIG", sig)
}

fn fixture_event_id() -> String {
    let (body, _) = perkflow::sign::read_fixture(&repo(FIXTURE)).unwrap();
    let v: Value = serde_json::from_slice(&body).unwrap();
    v["id"].as_str().unwrap().to_string()
}

/// Stops the daemon and returns (vendor id, event id) of what it stored, after checking its
/// log never showed a credential.
fn stop(mut d: Daemon) -> Vec<(String, String)> {
    let data = d.dir.join("data");
    let status = d.terminate();
    let log = d.log();
    assert!(status.success(), "daemon did not stop cleanly:\n{log}");
    assert!(
        !log.contains(CLIENT_SECRET) && !log.contains(TOKEN_PREFIX),
        "a credential was logged:\n{log}"
    );
    stored_events(&data)
        .into_iter()
        .map(|(source, vendor, id)| {
            assert_eq!(source, "paypal");
            (vendor, id)
        })
        .collect()
}

fn assert_retry_later(a: &Answer, what: &str) {
    assert_eq!(a.status, 503, "{what}: {}", a.body);
    let retry = a
        .headers
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    assert!(
        retry.is_some_and(|s| s > 0),
        "{what}: no usable Retry-After: {:?}",
        a.headers
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn genuine_is_stored_once_forgery_refused_and_token_cached() {
    let (fake, base) = fake_paypal().await;
    let d = start_daemon(&base);
    let c = client();
    let url = d.url("/hooks/paypal");

    let a = post(&c, &url, &webhook(GENUINE_SIG)).await;
    assert_eq!(a.status, 200, "{}\n{}", a.body, d.log());
    assert_eq!(a.json()["duplicate"], false);
    let id = a.json()["id"].as_str().unwrap().to_string();

    // Re-delivery: verified again, then recognised.
    let a = post(&c, &url, &webhook(GENUINE_SIG)).await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(a.json()["duplicate"], true);
    assert_eq!(a.json()["id"], id.as_str());

    // PayPal says FAILURE: refused, nothing said why.
    let a = post(&c, &url, &webhook("Zm9yZ2VkLXNpZ25hdHVyZQ==")).await;
    assert_eq!((a.status, a.body.as_str()), (401, ""));

    // Three verifications, one token.
    assert_eq!(fake.verifies(), 3);
    assert_eq!(fake.tokens(), 1, "the access token was not cached");
    fake.assert_no_problems();
    assert_eq!(stop(d), vec![(fixture_event_id(), id)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paypal_down_answers_503_with_retry_after_and_stores_nothing() {
    let (fake, base) = fake_paypal().await;
    let d = start_daemon(&base);
    let c = client();
    let url = d.url("/hooks/paypal");

    // The verify endpoint fails.
    fake.set_verify(Behaviour::ServerError);
    let a = post(&c, &url, &webhook(GENUINE_SIG)).await;
    assert_retry_later(&a, "verify endpoint answered 500");
    assert_eq!(fake.verifies(), 1);

    // The token endpoint fails (a fresh token is needed after a revocation).
    fake.set_verify(Behaviour::Normal);
    fake.revoke_tokens();
    fake.set_token(Behaviour::ServerError);
    let a = post(&c, &url, &webhook(GENUINE_SIG)).await;
    assert_retry_later(&a, "token endpoint answered 500");

    // PayPal is back: the same webhook is new, so neither failure stored it.
    fake.set_token(Behaviour::Normal);
    let a = post(&c, &url, &webhook(GENUINE_SIG)).await;
    assert_eq!(a.status, 200, "{}\n{}", a.body, d.log());
    assert_eq!(a.json()["duplicate"], false, "a 503 stored the event");
    let id = a.json()["id"].as_str().unwrap().to_string();

    fake.assert_no_problems();
    assert_eq!(stop(d), vec![(fixture_event_id(), id)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_401_from_verify_refreshes_the_token_once() {
    let (fake, base) = fake_paypal().await;
    let d = start_daemon(&base);
    let c = client();
    let url = d.url("/hooks/paypal");

    let a = post(&c, &url, &webhook(GENUINE_SIG)).await;
    assert_eq!(a.status, 200, "{}\n{}", a.body, d.log());
    assert_eq!((fake.tokens(), fake.verifies()), (1, 1));

    // PayPal revoked the cached token: 401, one new token, verified with it.
    fake.revoke_tokens();
    let a = post(&c, &url, &webhook(GENUINE_SIG)).await;
    assert_eq!(a.status, 200, "{}\n{}", a.body, d.log());
    assert_eq!(a.json()["duplicate"], true);
    assert_eq!((fake.tokens(), fake.verifies()), (2, 3));

    // The new token is cached in turn.
    let a = post(&c, &url, &webhook(GENUINE_SIG)).await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!((fake.tokens(), fake.verifies()), (2, 4));

    // A 401 that a fresh token does not cure: one refresh only, then 503 (not a rejection:
    // the webhook may well be genuine).
    fake.set_verify(Behaviour::Unauthorized);
    let a = post(&c, &url, &webhook(GENUINE_SIG)).await;
    assert_retry_later(&a, "verify endpoint refused every token");
    assert_eq!((fake.tokens(), fake.verifies()), (3, 6));

    fake.assert_no_problems();
    assert_eq!(stop(d).len(), 1);
}
