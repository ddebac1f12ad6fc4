//! `GET /api/schedules` (each scheduled pipeline: pattern, next and last fire, the run under
//! way) and `POST /api/schedules/{pipeline}/run` (start a run now: a campaign send). Behind
//! the admin token.

use crate::app::AppState;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

pub async fn list(State(app): State<AppState>) -> Response {
    let rt = app.runtime();
    let store = app.store.clone();
    let now = crate::delivery::now_ms();
    let out = tokio::task::spawn_blocking(move || {
        rt.pipelines
            .values()
            .filter_map(|p| {
                p.on.schedule
                    .as_ref()
                    .map(|s| crate::schedule::status(&store, &p.name, s, now))
            })
            .collect::<Vec<_>>()
    })
    .await
    .unwrap_or_default();
    Json(json!({ "schedules": out })).into_response()
}

pub async fn run_now(State(app): State<AppState>, Path(name): Path<String>) -> Response {
    let rt = app.runtime();
    if rt
        .pipelines
        .get(&name)
        .is_none_or(|p| p.on.schedule.is_none())
    {
        return (
            StatusCode::NOT_FOUND,
            Json(json!({ "error": format!("no scheduled pipeline `{name}`") })),
        )
            .into_response();
    }
    let store = app.store.clone();
    let now = crate::delivery::now_ms();
    let n = name.clone();
    match tokio::task::spawn_blocking(move || store.start_schedule_run(&n, now)).await {
        Ok(Ok(run)) => {
            tracing::info!(pipeline = %name, "schedule run started by an operator");
            (
                StatusCode::ACCEPTED,
                Json(json!({ "pipeline": name, "run": run })),
            )
                .into_response()
        }
        Ok(Err(e)) => (StatusCode::CONFLICT, Json(json!({ "error": e }))).into_response(),
        Err(_) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            Json(json!({ "error": "internal error" })),
        )
            .into_response(),
    }
}
