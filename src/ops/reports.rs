//! `GET /api/reports/points` and `GET /api/reports/rewards`: the loyalty program's figures
//! per period (`period=day|week|month`, `since`/`until` as RFC 3339 or a duration ago),
//! as JSON or, with `format=csv`, as CSV. Callers: the admin token or an API key with
//! `reports:read`.

use crate::app::AppState;
use crate::reports::{Period, Range};
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/reports/points", get(points))
        .route("/api/reports/rewards", get(rewards))
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Params {
    #[serde(default)]
    period: Option<String>,
    #[serde(default)]
    since: Option<String>,
    #[serde(default)]
    until: Option<String>,
    #[serde(default)]
    format: Option<String>,
}

fn error(status: StatusCode, msg: impl Into<String>) -> Response {
    (status, Json(json!({ "error": msg.into() }))).into_response()
}

/// The range asked, and whether CSV was.
fn range(p: &Params) -> Result<(Range, bool), String> {
    let now = crate::delivery::now_ms();
    let period = match &p.period {
        Some(s) => s.parse::<Period>()?,
        None => Period::Day,
    };
    let time = |t: &Option<String>| {
        t.as_deref()
            .map(|t| crate::ops::admin::parse_time(t, now))
            .transpose()
    };
    let csv = match p.format.as_deref() {
        None | Some("json") => false,
        Some("csv") => true,
        Some(other) => return Err(format!("format `{other}`: use json or csv")),
    };
    Ok((
        Range {
            period,
            since_ms: time(&p.since)?,
            until_ms: time(&p.until)?,
        },
        csv,
    ))
}

async fn report<T: serde::Serialize + Send + 'static>(
    app: AppState,
    headers: HeaderMap,
    params: Result<Query<Params>, axum::extract::rejection::QueryRejection>,
    build: fn(&crate::store::Store, &Range) -> Result<Vec<T>, crate::store::StoreError>,
) -> Response {
    if let Err((code, msg)) = crate::ops::members::authorize(&app, &headers, Some("reports:read")) {
        return error(code, msg);
    }
    let p = match params {
        Ok(Query(p)) => p,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.body_text()),
    };
    let (range, csv) = match range(&p) {
        Ok(r) => r,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    let store = app.store.clone();
    let rows = match tokio::task::spawn_blocking(move || build(&store, &range)).await {
        Ok(Ok(rows)) => rows,
        Ok(Err(e)) => return error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
        Err(_) => return error(StatusCode::INTERNAL_SERVER_ERROR, "internal error"),
    };
    if csv {
        return match crate::reports::to_csv(&rows) {
            Ok(text) => ([(header::CONTENT_TYPE, "text/csv; charset=utf-8")], text).into_response(),
            Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
        };
    }
    Json(json!({ "period": range.period, "since_ms": range.since_ms, "until_ms": range.until_ms, "rows": rows }))
        .into_response()
}

async fn points(
    State(app): State<AppState>,
    headers: HeaderMap,
    params: Result<Query<Params>, axum::extract::rejection::QueryRejection>,
) -> Response {
    report(app, headers, params, crate::store::Store::points_report).await
}

async fn rewards(
    State(app): State<AppState>,
    headers: HeaderMap,
    params: Result<Query<Params>, axum::extract::rejection::QueryRejection>,
) -> Response {
    report(app, headers, params, crate::store::Store::rewards_report).await
}
