//! `/healthz` (alive), `/readyz` (store writable and config loaded), `/metrics` (Prometheus).

use crate::app::AppState;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

pub async fn healthz() -> Response {
    (StatusCode::OK, Json(json!({ "status": "ok" }))).into_response()
}

pub async fn readyz(State(app): State<AppState>) -> Response {
    let sources = app.runtime().sources.len();
    match app.inbox.ready() {
        Ok(()) => (
            StatusCode::OK,
            Json(json!({ "status": "ready", "store": "ok", "sources": sources })),
        )
            .into_response(),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "status": "not ready", "store": e.to_string(), "sources": sources })),
        )
            .into_response(),
    }
}

pub async fn metrics(State(app): State<AppState>) -> Response {
    match &app.metrics {
        Some(h) => (
            [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
            h.render(),
        )
            .into_response(),
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            "metrics recorder not installed",
        )
            .into_response(),
    }
}
