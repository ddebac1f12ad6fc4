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
use axum::routing::get;
use axum::{Json, Router};
use base64::Engine;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// Who may call the admin API.
#[derive(Clone)]
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

    fn allows(&self, authorization: Option<&str>) -> Result<(), (StatusCode, &'static str)> {
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
        .route("/api/events", get(list_events))
        .route("/api/events/{id}", get(show_event))
        .route("/api/jobs", get(list_jobs))
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
    match app.inbox.list(&q) {
        Ok(page) => Json(page).into_response(),
        Err(e) => store_error(e),
    }
}

async fn show_event(State(app): State<AppState>, Path(id): Path<String>) -> Response {
    match app.inbox.get(&id) {
        Ok(Some((ev, pending))) => {
            let mut out = serde_json::to_value(&ev.meta).unwrap_or(Value::Null);
            out["pending"] = json!(pending);
            out["payload_bytes"] = json!(ev.payload.len());
            // JSON payloads are shown as JSON; anything else as base64 of the exact bytes.
            match serde_json::from_slice::<Value>(&ev.payload) {
                Ok(v) => out["payload"] = v,
                Err(_) => {
                    out["payload_base64"] =
                        json!(base64::engine::general_purpose::STANDARD.encode(&ev.payload))
                }
            }
            out["trace"] = app.inbox.trace(&id).ok().flatten().unwrap_or(Value::Null);
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
    match app.inbox.jobs(q.limit.unwrap_or(100).clamp(1, 1000)) {
        Ok(jobs) => Json(json!({ "jobs": jobs })).into_response(),
        Err(e) => store_error(e),
    }
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
