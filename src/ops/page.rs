//! The status page (`GET /`), server-rendered with the one template engine (minijinja, HTML
//! auto-escaped): connectors and their state, recent failed runs linking to each event's
//! trace (`/ui/events/{id}`), dead letters with a replay button. No front-end build step.
//!
//! Admin-protected: a request carries the admin bearer token, or a session cookie set by
//! signing in with that token (`POST /login`). The cookie holds an HMAC of the token (not the
//! token), is `HttpOnly` and `SameSite=Strict`; changing the token ends every session. Forms
//! post only from the page's own origin.

use crate::app::AppState;
use crate::inbox::EventQuery;
use crate::ops::admin::AdminAccess;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Form, Router};
use hmac::{Hmac, Mac};
use minijinja::{context, Environment};
use serde_json::Value;
use sha2::Sha256;
use std::sync::OnceLock;
use subtle::ConstantTimeEq;

const COOKIE: &str = "perkflow_session";

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/", get(status_page))
        .route("/login", post(login))
        .route("/logout", post(logout))
        .route("/ui/events/{id}", get(event_page))
        .route("/ui/dlq/{key}/replay", post(replay_dead))
}

fn env() -> &'static Environment<'static> {
    static ENV: OnceLock<Environment<'static>> = OnceLock::new();
    ENV.get_or_init(|| {
        let mut env = Environment::new();
        for (name, src) in [
            ("base.html", include_str!("templates/base.html")),
            ("login.html", include_str!("templates/login.html")),
            ("status.html", include_str!("templates/status.html")),
            ("event.html", include_str!("templates/event.html")),
        ] {
            env.add_template(name, src).expect("page template compiles");
        }
        env.add_function("pct", |rate: Option<f64>| {
            rate.map(|r| format!("{:.0}%", r * 100.0))
                .unwrap_or_else(|| "–".into())
        });
        env.add_function("dur", |ms: u64| {
            humantime::format_duration(std::time::Duration::from_secs(ms / 1000)).to_string()
        });
        env.add_function("ago", |ms: Option<u64>| ago(crate::delivery::now_ms(), ms));
        env
    })
}

/// How long ago, short (`12s ago`, `5m ago`, `3h ago`, `2d ago`, `never`).
pub fn ago(now_ms: u64, at: Option<u64>) -> String {
    let Some(at) = at else {
        return "never".into();
    };
    let s = now_ms.saturating_sub(at) / 1000;
    match s {
        0..=59 => format!("{s}s ago"),
        60..=3599 => format!("{}m ago", s / 60),
        3600..=86_399 => format!("{}h ago", s / 3600),
        _ => format!("{}d ago", s / 86_400),
    }
}

fn render(status: StatusCode, name: &str, ctx: minijinja::Value) -> Response {
    match env().get_template(name).and_then(|t| t.render(ctx)) {
        Ok(html) => (
            status,
            [
                (header::CACHE_CONTROL, "no-store"),
                (header::X_FRAME_OPTIONS, "DENY"),
                (
                    header::CONTENT_SECURITY_POLICY,
                    "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'",
                ),
            ],
            Html(html),
        )
            .into_response(),
        Err(e) => {
            tracing::error!(error = %e, template = name, "the status page cannot be rendered");
            (StatusCode::INTERNAL_SERVER_ERROR, "page error").into_response()
        }
    }
}

/// How long a sign-in lasts.
const SESSION_SECS: u64 = 12 * 3600;

/// The MAC of a session ending at `until` (Unix seconds), keyed with the configured token.
fn session_mac(admin: &AdminAccess, until: u64) -> Option<String> {
    let AdminAccess::Token(t) = admin else {
        return None;
    };
    let mut mac = Hmac::<Sha256>::new_from_slice(t.expose().as_bytes()).ok()?;
    mac.update(b"perkflow status page session v2:");
    mac.update(until.to_string().as_bytes());
    Some(hex::encode(mac.finalize().into_bytes()))
}

/// A session cookie's value, `<until>.<mac>`, for a sign-in at `now` (Unix seconds): it
/// ends after `SESSION_SECS`, or as soon as the token changes.
fn session_value(admin: &AdminAccess, now: u64) -> Option<String> {
    let until = now + SESSION_SECS;
    Some(format!("{until}.{}", session_mac(admin, until)?))
}

/// Whether a session cookie's value is one `session_value` made and has not ended.
fn session_valid(admin: &AdminAccess, got: &str, now: u64) -> bool {
    let Some((until, mac)) = got.split_once('.') else {
        return false;
    };
    let Ok(until) = until.parse::<u64>() else {
        return false;
    };
    if until <= now || until > now + SESSION_SECS {
        return false;
    }
    session_mac(admin, until).is_some_and(|want| bool::from(want.as_bytes().ct_eq(mac.as_bytes())))
}

fn unix_now() -> u64 {
    crate::delivery::now_ms() / 1000
}

fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_string())
}

/// Whether the request may see the page: the bearer token, or a valid session cookie.
fn signed_in(app: &AppState, headers: &HeaderMap) -> bool {
    let auth = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    if app.admin.allows(auth).is_ok() {
        return true;
    }
    cookie(headers, COOKIE).is_some_and(|got| session_valid(&app.admin, &got, unix_now()))
}

fn login_page(app: &AppState, error: Option<&str>) -> Response {
    let disabled = matches!(app.admin, AdminAccess::Disabled);
    let status = if disabled {
        StatusCode::FORBIDDEN
    } else {
        StatusCode::UNAUTHORIZED
    };
    render(
        status,
        "login.html",
        context! { disabled => disabled, error => error },
    )
}

/// A form post from another origin is refused (the cookie is SameSite=Strict too). Behind
/// a reverse proxy the origin is the forwarded host.
fn same_origin(headers: &HeaderMap) -> bool {
    let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) else {
        return true;
    };
    let origin_host = origin
        .split_once("://")
        .map(|(_, rest)| rest.trim_end_matches('/'));
    [header::HOST.as_str(), "x-forwarded-host"]
        .iter()
        .filter_map(|h| headers.get(*h).and_then(|v| v.to_str().ok()))
        .any(|host| origin_host == Some(host))
}

/// `Secure` when the page is served over HTTPS (by a proxy that says so).
fn secure(headers: &HeaderMap) -> &'static str {
    let https = headers
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|p| p.eq_ignore_ascii_case("https"));
    if https {
        "; Secure"
    } else {
        ""
    }
}

#[derive(serde::Deserialize)]
struct LoginForm {
    token: String,
}

async fn login(
    State(app): State<AppState>,
    headers: HeaderMap,
    Form(f): Form<LoginForm>,
) -> Response {
    if !same_origin(&headers) {
        return (StatusCode::FORBIDDEN, "cross-origin form post refused").into_response();
    }
    let bearer = format!("Bearer {}", f.token);
    if app.admin.allows(Some(&bearer)).is_err() {
        // Logged at a bounded rate (a stranger must not be able to fill the log); counted
        // always.
        static LOGGED: std::sync::LazyLock<governor::DefaultDirectRateLimiter> =
            std::sync::LazyLock::new(|| {
                governor::RateLimiter::direct(
                    governor::Quota::per_minute(std::num::NonZeroU32::new(10).expect("10"))
                        .allow_burst(std::num::NonZeroU32::new(10).expect("10")),
                )
            });
        metrics::counter!("perkflow_status_page_failed_sign_ins_total").increment(1);
        if LOGGED.check().is_ok() {
            tracing::warn!("status page: sign-in with a wrong token");
        }
        return login_page(&app, Some("Wrong token."));
    }
    let value = session_value(&app.admin, unix_now()).unwrap_or_default();
    (
        [(
            header::SET_COOKIE,
            format!(
                "{COOKIE}={value}; HttpOnly; SameSite=Strict; Path=/; Max-Age={SESSION_SECS}{}",
                secure(&headers)
            ),
        )],
        Redirect::to("/"),
    )
        .into_response()
}

async fn logout() -> Response {
    (
        [(
            header::SET_COOKIE,
            format!("{COOKIE}=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0"),
        )],
        Redirect::to("/"),
    )
        .into_response()
}

#[derive(serde::Deserialize)]
struct Flash {
    replayed: Option<String>,
}

async fn status_page(
    State(app): State<AppState>,
    headers: HeaderMap,
    Query(flash): Query<Flash>,
) -> Response {
    if !signed_in(&app, &headers) {
        return login_page(&app, None);
    }
    let queues = crate::ops::connectors::queues(&app).await;
    let now = crate::delivery::now_ms();
    crate::ops::connectors::publish(&app, &queues, now);
    let report = crate::ops::connectors::report(&app, &queues, now);
    // Store reads off the async threads (webhooks are answered on those).
    let (inbox, outbox) = (app.inbox.clone(), app.outbox.clone());
    let (failed, dead) = tokio::task::spawn_blocking(move || {
        let failed = inbox
            .list(&EventQuery {
                outcome: Some("failed".into()),
                limit: Some(20),
                ..Default::default()
            })
            .map(|p| p.events)
            .unwrap_or_default();
        let dead: Vec<Value> = outbox
            .dead_letters(&Default::default(), 50)
            .unwrap_or_default()
            .iter()
            .map(crate::ops::admin::job_view)
            .collect();
        (failed, dead)
    })
    .await
    .unwrap_or_default();
    let failed: Vec<Value> = failed
        .iter()
        .map(|e| {
            let mut v = serde_json::to_value(e).unwrap_or(Value::Null);
            v["id"] = Value::String(e.meta.id.clone());
            v
        })
        .collect();
    let flash = flash
        .replayed
        .map(|k| format!("Dead letter {k} queued again (same idempotency key)."));
    render(
        StatusCode::OK,
        "status.html",
        context! {
            report => minijinja::Value::from(minijinja::value::Serde(&report)),
            now => crate::sign::rfc3339((now / 1000) as i64),
            loaded => ago(now, Some(report.config_loaded_at_ms)),
            store_mib => format!("{:.1}", report.store_bytes as f64 / (1 << 20) as f64),
            scan_limit => crate::outbox::STATS_SCAN_LIMIT,
            failed_events => minijinja::Value::from(minijinja::value::Serde(&failed)),
            dead => minijinja::Value::from(minijinja::value::Serde(&dead)),
            flash => flash,
        },
    )
}

async fn event_page(
    State(app): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    if !signed_in(&app, &headers) {
        return login_page(&app, None);
    }
    let (ev, pending) = match app.inbox.get(&id) {
        Ok(Some(x)) => x,
        Ok(None) => {
            return (StatusCode::NOT_FOUND, Html("no such event".to_string())).into_response()
        }
        Err(e) => return (StatusCode::SERVICE_UNAVAILABLE, e.to_string()).into_response(),
    };
    let personal = app.runtime().personal_data(&ev);
    let runs = personal.json(&app.inbox.trace(&id).ok().flatten().unwrap_or(Value::Null));
    let jobs: Vec<Value> = app
        .outbox
        .event_jobs(&id)
        .unwrap_or_default()
        .iter()
        .map(crate::ops::admin::job_view)
        .collect();
    let payload = match serde_json::from_slice::<Value>(&ev.payload) {
        Ok(v) => serde_json::to_string_pretty(&personal.json(&v)).unwrap_or_default(),
        Err(_) => personal.text(&String::from_utf8_lossy(&ev.payload)),
    };
    render(
        StatusCode::OK,
        "event.html",
        context! {
            event => minijinja::Value::from(minijinja::value::Serde(&ev.meta)),
            pending => pending,
            runs => minijinja::Value::from(minijinja::value::Serde(&runs)),
            jobs => minijinja::Value::from(minijinja::value::Serde(&jobs)),
            payload => payload,
            payload_bytes => ev.payload.len(),
        },
    )
}

async fn replay_dead(
    State(app): State<AppState>,
    headers: HeaderMap,
    Path(key): Path<String>,
) -> Response {
    if !signed_in(&app, &headers) {
        return login_page(&app, None);
    }
    if !same_origin(&headers) {
        return (StatusCode::FORBIDDEN, "cross-origin form post refused").into_response();
    }
    match app
        .outbox
        .replay_dead(std::slice::from_ref(&key), crate::delivery::now_ms())
    {
        Ok(_) => {
            app.jobs_ready.notify_one();
            let q: String = form_urlencoded::Serializer::new(String::new())
                .append_pair("replayed", &key)
                .finish();
            Redirect::to(&format!("/?{q}")).into_response()
        }
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, e.to_string()).into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::secrets::Secret;

    #[test]
    fn sessions_are_an_hmac_of_the_token_and_end_when_it_changes_or_in_12_hours() {
        let (t1, t2) = (
            AdminAccess::decide(Some(Secret::new("t1"))),
            AdminAccess::decide(Some(Secret::new("t2"))),
        );
        let now = 1_800_000_000;
        let a = session_value(&t1, now).unwrap();
        let b = session_value(&t2, now).unwrap();
        assert_ne!(a, b);
        assert!(!a.contains("t1"));
        assert!(session_valid(&t1, &a, now));
        assert!(session_valid(&t1, &a, now + SESSION_SECS - 1));
        assert!(!session_valid(&t1, &a, now + SESSION_SECS), "ended");
        assert!(!session_valid(&t2, &a, now), "another token");
        // The end cannot be moved: the MAC covers it.
        let (_, mac) = a.split_once('.').unwrap();
        let later = format!("{}.{mac}", now + SESSION_SECS + 100);
        assert!(!session_valid(&t1, &later, now + SESSION_SECS + 1));
        assert!(!session_valid(&t1, "garbage", now));
        assert!(session_value(&AdminAccess::Disabled, now).is_none());
    }

    #[test]
    fn cookies_and_origins() {
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            "a=1; perkflow_session=abc; b=2".parse().unwrap(),
        );
        assert_eq!(cookie(&h, COOKIE).as_deref(), Some("abc"));
        h.insert(header::HOST, "127.0.0.1:8080".parse().unwrap());
        assert!(same_origin(&h));
        h.insert(header::ORIGIN, "http://127.0.0.1:8080".parse().unwrap());
        assert!(same_origin(&h));
        h.insert(header::ORIGIN, "https://evil.example".parse().unwrap());
        assert!(!same_origin(&h));
        // Behind a proxy.
        h.insert(
            header::ORIGIN,
            "https://status.example.com".parse().unwrap(),
        );
        h.insert("x-forwarded-host", "status.example.com".parse().unwrap());
        assert!(same_origin(&h));
        assert_eq!(secure(&h), "");
        h.insert("x-forwarded-proto", "https".parse().unwrap());
        assert_eq!(secure(&h), "; Secure");
    }

    #[test]
    fn templates_escape_html() {
        let html = env()
            .get_template("login.html")
            .unwrap()
            .render(context! { disabled => false, error => "<script>x</script>" })
            .unwrap();
        assert!(
            html.contains("&lt;script&gt;x&lt;&#x2f;script&gt;"),
            "{html}"
        );
        assert!(!html.contains("<script>"), "{html}");
    }
}
