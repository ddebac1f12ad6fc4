//! The admin API under `/api`: bearer-token protected (constant-time check). Without a
//! configured `admin_token` it is not served at all: a loopback listen address does not mean
//! local callers only (a reverse proxy on the same host forwards strangers).

use crate::app::AppState;
use crate::config::secrets::Secret;
use crate::inbox::EventQuery;
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// Who may call the admin API.
#[derive(Clone, PartialEq)]
pub enum AdminAccess {
    /// `Authorization: Bearer <token>` required.
    Token(Secret),
    /// No token configured: the admin API answers 403.
    Disabled,
}

impl AdminAccess {
    pub fn decide(token: Option<Secret>) -> AdminAccess {
        match token {
            Some(t) if !t.expose().is_empty() => AdminAccess::Token(t),
            _ => AdminAccess::Disabled,
        }
    }

    pub(crate) fn allows(
        &self,
        authorization: Option<&str>,
    ) -> Result<(), (StatusCode, &'static str)> {
        match self {
            AdminAccess::Disabled => Err((
                StatusCode::FORBIDDEN,
                "the admin API is disabled: set admin_token in the config to use it",
            )),
            AdminAccess::Token(expected) => {
                let given = authorization
                    .and_then(|v| v.strip_prefix("Bearer "))
                    .unwrap_or("");
                // Hash both so the comparison is constant-time whatever the lengths.
                let a = Sha256::digest(given.as_bytes());
                let b = Sha256::digest(expected.expose().as_bytes());
                if !given.is_empty() && bool::from(a.ct_eq(&b)) {
                    Ok(())
                } else {
                    Err((StatusCode::UNAUTHORIZED, "missing or wrong bearer token"))
                }
            }
        }
    }
}

async fn guard(State(app): State<AppState>, req: Request, next: Next) -> Response {
    let auth = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    match app.admin.allows(auth) {
        Ok(()) => next.run(req).await,
        Err((code, msg)) => {
            let mut r = (code, Json(json!({ "error": msg }))).into_response();
            if code == StatusCode::UNAUTHORIZED {
                r.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    header::HeaderValue::from_static("Bearer"),
                );
            }
            r
        }
    }
}

pub fn routes(state: AppState) -> Router<AppState> {
    Router::new()
        .route("/api/connectors", get(crate::ops::connectors::connectors))
        .route("/api/reload", post(crate::reload::reload_endpoint))
        .route("/api/events", get(list_events))
        .route("/api/events/{id}", get(show_event))
        .route("/api/jobs", get(list_jobs))
        .route("/api/jobs/{key}", get(show_job))
        .route("/api/events/{id}/replay", post(replay_event))
        .route("/api/dlq", get(list_dlq))
        .route("/api/dlq/replay", post(replay_dlq))
        .route("/api/dlq/drop", post(drop_dlq))
        .route("/api/dlq/{key}", get(show_job).delete(drop_one))
        .route("/api/dlq/{key}/replay", post(replay_one))
        .route("/api/dlq/{key}/drop", post(drop_one))
        .route("/api/schedules", get(crate::ops::schedules::list))
        .route(
            "/api/schedules/{pipeline}/run",
            post(crate::ops::schedules::run_now),
        )
        .route_layer(axum::middleware::from_fn_with_state(state, guard))
}

fn store_error(e: crate::store::StoreError) -> Response {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        Json(json!({ "error": e.to_string() })),
    )
        .into_response()
}

async fn list_events(State(app): State<AppState>, Query(q): Query<EventQuery>) -> Response {
    if let Some(o) = &q.outcome {
        if !["completed", "filtered", "failed"].contains(&o.as_str()) {
            return bad_request(format!("outcome `{o}`: use completed, filtered or failed"));
        }
    }
    match app.inbox.list(&q) {
        Ok(page) => Json(page).into_response(),
        Err(e) => store_error(e),
    }
}

/// A job as people see it: its event's personal data masked (its `with`, reason, vendor
/// answers), and the list of those values left out.
pub fn job_view(job: &crate::outbox::Job) -> Value {
    let mut v = serde_json::to_value(job).unwrap_or(Value::Null);
    if let Some(m) = v.as_object_mut() {
        m.remove("sensitive");
    }
    if job.sensitive.is_empty() {
        return v;
    }
    crate::redact::Values::listed(job.sensitive.clone()).json(&v)
}

fn jobs_view(jobs: &[crate::outbox::Job]) -> Value {
    Value::Array(jobs.iter().map(job_view).collect())
}

async fn show_event(State(app): State<AppState>, Path(id): Path<String>) -> Response {
    match app.inbox.get(&id) {
        Ok(Some((ev, pending))) => {
            let personal = app.runtime().personal_data(&ev);
            let mut out = serde_json::to_value(&ev.meta).unwrap_or(Value::Null);
            out["pending"] = json!(pending);
            out["payload_bytes"] = json!(ev.payload.len());
            // JSON payloads are shown as JSON; anything else as base64 of the exact bytes.
            match serde_json::from_slice::<Value>(&ev.payload) {
                _ if ev.meta.purged_at_ms.is_some() => out["payload"] = Value::Null,
                Ok(v) => out["payload"] = personal.json(&v),
                Err(_) => {
                    out["payload_base64"] =
                        json!(base64::engine::general_purpose::STANDARD.encode(&ev.payload))
                }
            }
            let trace = app.inbox.trace(&id).ok().flatten().unwrap_or(Value::Null);
            out["trace"] = personal.json(&trace);
            out["jobs"] = jobs_view(&app.outbox.event_jobs(&id).unwrap_or_default());
            Json(out).into_response()
        }
        Ok(None) => (
            StatusCode::NOT_FOUND,
            Json(json!({ "error": "no such event" })),
        )
            .into_response(),
        Err(e) => store_error(e),
    }
}

#[derive(serde::Deserialize)]
struct JobQuery {
    limit: Option<usize>,
}

/// Outbox jobs (sink actions waiting for the delivery engine).
async fn list_jobs(State(app): State<AppState>, Query(q): Query<JobQuery>) -> Response {
    match app.outbox.jobs(q.limit.unwrap_or(100).clamp(1, 1000)) {
        Ok(jobs) => Json(json!({ "jobs": jobs_view(&jobs) })).into_response(),
        Err(e) => store_error(e),
    }
}

fn not_found(what: &str) -> Response {
    (
        StatusCode::NOT_FOUND,
        Json(json!({ "error": format!("no such {what}") })),
    )
        .into_response()
}

fn bad_request(msg: impl Into<String>) -> Response {
    (
        StatusCode::BAD_REQUEST,
        Json(json!({ "error": msg.into() })),
    )
        .into_response()
}

/// One job with its attempts.
async fn show_job(State(app): State<AppState>, Path(key): Path<String>) -> Response {
    match app.outbox.job(&key) {
        Ok(Some(j)) => Json(job_view(&j)).into_response(),
        Ok(None) => not_found("job"),
        Err(e) => store_error(e),
    }
}

/// Filter of the dead-letter queue, from a query string or a JSON body. Times are RFC 3339
/// or a duration ago (`2h`).
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DlqQuery {
    pub sink: Option<String>,
    pub reason: Option<String>,
    pub since: Option<String>,
    pub until: Option<String>,
    pub limit: Option<usize>,
    /// Bulk operations need a filter, or `all: true`.
    #[serde(default)]
    pub all: bool,
}

/// `2026-11-22T10:00:00Z` or `2h` (ago) -> Unix ms.
pub fn parse_time(text: &str, now_ms: u64) -> Result<u64, String> {
    if let Ok(ts) = text.parse::<jiff::Timestamp>() {
        return Ok(ts.as_millisecond().max(0) as u64);
    }
    humantime::parse_duration(text)
        .map(|d| now_ms.saturating_sub(d.as_millis() as u64))
        .map_err(|_| format!("`{text}` is neither an RFC 3339 time nor a duration such as `2h`"))
}

impl DlqQuery {
    fn filter(&self) -> Result<crate::outbox::DeadFilter, String> {
        let now = crate::delivery::now_ms();
        Ok(crate::outbox::DeadFilter {
            sink: self.sink.clone(),
            reason: self.reason.clone(),
            since_ms: self
                .since
                .as_deref()
                .map(|t| parse_time(t, now))
                .transpose()?,
            until_ms: self
                .until
                .as_deref()
                .map(|t| parse_time(t, now))
                .transpose()?,
        })
    }
    fn is_unfiltered(&self) -> bool {
        self.sink.is_none() && self.reason.is_none() && self.since.is_none() && self.until.is_none()
    }
}

async fn list_dlq(State(app): State<AppState>, Query(q): Query<DlqQuery>) -> Response {
    let f = match q.filter() {
        Ok(f) => f,
        Err(m) => return bad_request(m),
    };
    match app
        .outbox
        .dead_letters(&f, q.limit.unwrap_or(100).clamp(1, 10_000))
    {
        Ok(jobs) => Json(json!({ "dead_letters": jobs_view(&jobs) })).into_response(),
        Err(e) => store_error(e),
    }
}

async fn bulk(app: &AppState, q: Option<Json<DlqQuery>>, replay: bool) -> Response {
    let q = q.map(|Json(q)| q).unwrap_or_default();
    if q.is_unfiltered() && !q.all {
        return bad_request("name a filter (sink, reason, since, until) or send \"all\": true");
    }
    let f = match q.filter() {
        Ok(f) => f,
        Err(m) => return bad_request(m),
    };
    let keys: Vec<String> = match app.outbox.dead_letters(&f, usize::MAX) {
        Ok(jobs) => jobs.into_iter().map(|j| j.key).collect(),
        Err(e) => return store_error(e),
    };
    change(app, &keys, replay)
}

fn change(app: &AppState, keys: &[String], replay: bool) -> Response {
    let now = crate::delivery::now_ms();
    let done = if replay {
        app.outbox.replay_dead(keys, now)
    } else {
        app.outbox.drop_dead(keys, now)
    };
    match done {
        Ok(n) => {
            if replay && n > 0 {
                app.jobs_ready.notify_one();
            }
            let verb = if replay { "replayed" } else { "dropped" };
            tracing::info!(jobs = n, "{verb} dead letters");
            Json(json!({ verb: n })).into_response()
        }
        Err(e) => store_error(e),
    }
}

async fn replay_dlq(State(app): State<AppState>, q: Option<Json<DlqQuery>>) -> Response {
    bulk(&app, q, true).await
}

async fn drop_dlq(State(app): State<AppState>, q: Option<Json<DlqQuery>>) -> Response {
    bulk(&app, q, false).await
}

async fn one(app: &AppState, key: &str, replay: bool) -> Response {
    match app.outbox.job(key) {
        Ok(Some(j)) if j.state == crate::outbox::JobState::Dead => change(app, &[j.key], replay),
        Ok(Some(j)) => (
            StatusCode::CONFLICT,
            Json(
                json!({ "error": format!("job {key} is not a dead letter (it is {:?})", j.state) }),
            ),
        )
            .into_response(),
        Ok(None) => not_found("job"),
        Err(e) => store_error(e),
    }
}

async fn replay_one(State(app): State<AppState>, Path(key): Path<String>) -> Response {
    one(&app, &key, true).await
}

async fn drop_one(State(app): State<AppState>, Path(key): Path<String>) -> Response {
    one(&app, &key, false).await
}

#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ReplayRequest {
    /// Without it, nothing is sent: the answer shows what would change.
    #[serde(default)]
    confirm: bool,
    /// Also resend unchanged actions that were delivered (same idempotency key).
    #[serde(default)]
    resend_delivered: bool,
}

/// Re-runs an event through the current pipelines: shows what would change; sends on
/// `confirm`.
async fn replay_event(
    State(app): State<AppState>,
    Path(id): Path<String>,
    body: Option<Json<ReplayRequest>>,
) -> Response {
    let req = body.map(|Json(b)| b).unwrap_or_default();
    let ev = match app.inbox.get(&id) {
        Ok(Some((ev, _))) => ev,
        Ok(None) => return not_found("event"),
        Err(e) => return store_error(e),
    };
    if ev.meta.purged_at_ms.is_some() {
        return (
            StatusCode::CONFLICT,
            Json(json!({ "error": "this event's payload was purged by retention: it cannot be run again" })),
        )
            .into_response();
    }
    let existing = match app.outbox.event_jobs(&id) {
        Ok(j) => j,
        Err(e) => return store_error(e),
    };
    let rt = app.runtime();
    let resend = req.resend_delivered;
    let store = app.store.clone();
    // Lookup steps read through the sinks (blocking calls): off the async threads.
    let plan = tokio::task::spawn_blocking(move || {
        let engine = crate::pipeline::expr::Engine::new();
        let clients = crate::lookups::Clients::default();
        let live = crate::lookups::Live {
            store: &store,
            runtime: &rt,
            clients: &clients,
            handle: tokio::runtime::Handle::current(),
            last_try: false,
        };
        crate::worker::plan_replay(&rt, &engine, &live, &ev, &existing, resend)
    })
    .await;
    let (runs, items, to_send) = match plan {
        Ok(Ok(p)) => p,
        Ok(Err(reason)) => {
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(json!({ "error": format!("cannot plan the replay now: {reason}; try again later") })),
            )
                .into_response()
        }
        Err(_) => {
            return (
                StatusCode::INTERNAL_SERVER_ERROR,
                Json(json!({ "error": "planning the replay failed (internal error)" })),
            )
                .into_response()
        }
    };
    let mut sent = 0;
    if req.confirm {
        if let Some(j) = to_send.iter().find(|j| app.lanes.is_busy(&j.key)) {
            return (
                StatusCode::CONFLICT,
                Json(json!({ "error": format!("job {} is being delivered right now; try again in a moment", j.key) })),
            )
                .into_response();
        }
    }
    if req.confirm && !to_send.is_empty() {
        match app.outbox.requeue(&to_send, crate::delivery::now_ms()) {
            Ok(n) => {
                sent = n;
                app.jobs_ready.notify_one();
            }
            Err(e) => return store_error(e),
        }
    }
    let personal = app
        .inbox
        .get(&id)
        .ok()
        .flatten()
        .map(|(ev, _)| app.runtime().personal_data(&ev))
        .unwrap_or_default();
    let rt = app.runtime();
    let runs: Vec<_> = runs
        .iter()
        .map(|r| {
            let personal = crate::worker::with_lookups(&rt, &personal, r);
            crate::pipeline::run::redacted(r, &personal)
        })
        .collect();
    let items = personal.json(&serde_json::to_value(&items).unwrap_or(Value::Null));
    Json(json!({
        "event": id,
        "confirmed": req.confirm,
        "queued": sent,
        "changes": items,
        "runs": runs,
    }))
    .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decides_and_checks_access() {
        assert!(matches!(AdminAccess::decide(None), AdminAccess::Disabled));
        assert!(matches!(
            AdminAccess::decide(Some(Secret::new(""))),
            AdminAccess::Disabled
        ));
        let t = AdminAccess::decide(Some(Secret::new("s3cret")));
        assert!(t.allows(Some("Bearer s3cret")).is_ok());
        assert_eq!(
            t.allows(Some("Bearer s3cre")).unwrap_err().0,
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(
            t.allows(Some("s3cret")).unwrap_err().0,
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(t.allows(None).unwrap_err().0, StatusCode::UNAUTHORIZED);
        assert_eq!(
            AdminAccess::Disabled
                .allows(Some("Bearer x"))
                .unwrap_err()
                .0,
            StatusCode::FORBIDDEN
        );
    }
}
