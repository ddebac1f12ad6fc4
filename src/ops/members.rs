//! The member API for checkout and self-service portals: `GET /api/members/{id}` (balance,
//! lifetime points, tier, history) and `POST /api/members/{id}/redeem` (atomic, idempotent,
//! never below zero), `POST /api/members/{id}/adjust` for operators; promo codes:
//! `POST /api/codes/{code}/redeem` (exactly once), `GET /api/codes/{code}`, and
//! `POST /api/codes/generate` (operators, bulk into a pool).
//!
//! Callers authenticate with `Authorization: Bearer <key>`: an app's key from `api_keys`
//! (scoped: `members:read`, `members:redeem`, `members:write`, `codes:redeem`) or the admin token (everything). Keys are
//! compared in constant time; a known key without the scope gets 403.

use crate::app::AppState;
use crate::config::secrets::Secret;
use crate::ledger::{Kind, LedgerError, Op};
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// An app allowed to call the member API.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiKey {
    pub name: String,
    pub key: Secret,
    pub scopes: Vec<String>,
}

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/members/{id}", get(show))
        .route("/api/members/{id}/redeem", post(redeem))
        .route("/api/members/{id}/adjust", post(adjust))
        .route("/api/members/{id}/profile", axum::routing::put(put_profile))
        .route("/api/codes/generate", post(generate_codes))
        .route("/api/codes/{code}", get(show_code))
        .route("/api/codes/{code}/redeem", post(redeem_code))
        .layer(DefaultBodyLimit::max(16 * 1024))
}

fn error(status: StatusCode, msg: impl Into<String>) -> Response {
    (status, Json(json!({ "error": msg.into() }))).into_response()
}

fn same(a: &str, b: &str) -> bool {
    let (x, y) = (Sha256::digest(a.as_bytes()), Sha256::digest(b.as_bytes()));
    bool::from(x.ct_eq(&y))
}

/// The caller's name if its key allows `scope` (`None`: the admin token is needed).
/// Why a caller may not: the status and the message of the answer.
type Denied = (StatusCode, String);

pub(crate) fn authorize(
    app: &AppState,
    headers: &HeaderMap,
    scope: Option<&str>,
) -> Result<String, Denied> {
    let auth = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    if app.admin.allows(auth).is_ok() {
        return Ok("admin".into());
    }
    let given = auth.and_then(|a| a.strip_prefix("Bearer ")).unwrap_or("");
    if given.is_empty() {
        return Err((StatusCode::UNAUTHORIZED, "missing bearer key".into()));
    }
    // Every key is compared (no early exit on a match) so timing tells nothing.
    let mut found: Option<&ApiKey> = None;
    for k in app.api_keys.iter() {
        if same(given, k.key.expose()) && found.is_none() {
            found = Some(k);
        }
    }
    let Some(k) = found else {
        return Err((StatusCode::UNAUTHORIZED, "unknown key".into()));
    };
    match scope {
        Some(s) if k.scopes.iter().any(|x| x == s) => Ok(k.name.clone()),
        Some(s) => Err((
            StatusCode::FORBIDDEN,
            format!("the key of `{}` lacks the scope `{s}`", k.name),
        )),
        None => Err((
            StatusCode::FORBIDDEN,
            "only the admin token may do this".into(),
        )),
    }
}

async fn show(State(app): State<AppState>, headers: HeaderMap, Path(id): Path<String>) -> Response {
    if let Err((code, msg)) = authorize(&app, &headers, Some("members:read")) {
        return error(code, msg);
    }
    if let Err(e) = crate::ledger::check_member_id(&id) {
        return error(StatusCode::BAD_REQUEST, e.to_string());
    }
    let store = app.store.clone();
    // A member may be named by its e-mail address or phone number.
    let found = tokio::task::spawn_blocking(move || {
        let id = store
            .resolve_member(&id)
            .map_err(|e| crate::store::StoreError::Io(e.to_string()))?;
        Ok::<_, crate::store::StoreError>((store.member(&id)?, store.member_entries(&id, 50)?))
    })
    .await;
    match found {
        Ok(Ok((Some(m), history))) => Json(json!({
            "member": m.id,
            "balance": m.balance,
            "pending": m.pending,
            "lifetime": m.lifetime,
            "tier": app.runtime().loyalty.tier(m.lifetime).map(|t| t.name.clone()),
            "profile": m.profile,
            "entries": m.entries,
            "created_at_ms": m.created_at_ms,
            "updated_at_ms": m.updated_at_ms,
            "history": history,
        }))
        .into_response(),
        Ok(Ok((None, _))) => error(StatusCode::NOT_FOUND, "no such member"),
        Ok(Err(e)) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
        Err(_) => error(StatusCode::INTERNAL_SERVER_ERROR, "internal error"),
    }
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Change {
    points: i64,
    /// The same key twice is the same redemption (a checkout retrying).
    idempotency_key: String,
    #[serde(default)]
    reason: Option<String>,
}

async fn apply(app: AppState, id: String, caller: String, kind: Kind, c: Change) -> Response {
    // The caller's own key, before the caller's prefix is added.
    if c.idempotency_key.trim().is_empty() || c.idempotency_key.len() > 200 {
        return (
            StatusCode::UNPROCESSABLE_ENTITY,
            Json(json!({"error": "idempotency_key is 1 to 200 characters"})),
        )
            .into_response();
    }
    let op = Op::new(
        id,
        kind,
        c.points,
        c.reason
            .unwrap_or_else(|| format!("{kind:?} through the API").to_lowercase()),
        format!("api:{caller}"),
        // Keys are per caller: two apps cannot collide on each other's keys.
        format!("api:{caller}:{}", c.idempotency_key),
    );
    let store = app.store.clone();
    let rules = app.runtime().loyalty.clone();
    let applied = tokio::task::spawn_blocking(move || store.ledger_apply(&op, &rules)).await;
    if let Ok(Ok(a)) = &applied {
        // Thresholds crossed, tiers changed: their events (de-duplicated by id).
        let events = a
            .entry
            .events(&app.runtime().loyalty, crate::delivery::now_ms());
        if !events.is_empty() {
            match app.inbox.append(events).await {
                Ok(_) => app.wake.notify_one(),
                Err(e) => {
                    tracing::error!(member = %a.entry.member, error = %e, "storing the ledger's events failed; repeating the call (same idempotency key) stores them")
                }
            }
        }
    }
    match applied {
        Ok(Ok(a)) => Json(json!({
            "member": a.entry.member,
            "balance": a.entry.balance_after,
            "lifetime": a.entry.lifetime_after,
            "duplicate": a.duplicate,
            "entry": a.entry,
        }))
        .into_response(),
        Ok(Err(e @ LedgerError::Insufficient { balance, .. })) => (
            StatusCode::CONFLICT,
            Json(json!({ "error": e.to_string(), "balance": balance })),
        )
            .into_response(),
        Ok(Err(e @ (LedgerError::Invalid(_) | LedgerError::KeyReused(_)))) => {
            error(StatusCode::UNPROCESSABLE_ENTITY, e.to_string())
        }
        Ok(Err(e @ LedgerError::Store(_))) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
        Err(_) => error(StatusCode::INTERNAL_SERVER_ERROR, "internal error"),
    }
}

async fn redeem(
    State(app): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Result<Json<Change>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let caller = match authorize(&app, &headers, Some("members:redeem")) {
        Ok(c) => c,
        Err((code, msg)) => return error(code, msg),
    };
    match body {
        Ok(Json(c)) => apply(app, id, caller, Kind::Redeem, c).await,
        Err(e) => error(StatusCode::BAD_REQUEST, e.body_text()),
    }
}

async fn adjust(
    State(app): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Result<Json<Change>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let caller = match authorize(&app, &headers, None) {
        Ok(c) => c,
        Err((code, msg)) => return error(code, msg),
    };
    match body {
        Ok(Json(c)) => apply(app, id, caller, Kind::Adjust, c).await,
        Err(e) => error(StatusCode::BAD_REQUEST, e.body_text()),
    }
}

/// Creates the member if new and merges its profile (apps with `members:write`).
async fn put_profile(
    State(app): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Result<Json<crate::ledger::Profile>, axum::extract::rejection::JsonRejection>,
) -> Response {
    if let Err((code, msg)) = authorize(&app, &headers, Some("members:write")) {
        return error(code, msg);
    }
    let profile = match body {
        Ok(Json(p)) => p,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.body_text()),
    };
    let store = app.store.clone();
    match tokio::task::spawn_blocking(move || store.set_profile(&id, profile)).await {
        Ok(Ok(m)) => Json(json!({ "member": m.id, "profile": m.profile })).into_response(),
        Ok(Err(e @ LedgerError::Store(_))) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
        Ok(Err(e)) => error(StatusCode::UNPROCESSABLE_ENTITY, e.to_string()),
        Err(_) => error(StatusCode::INTERNAL_SERVER_ERROR, "internal error"),
    }
}

async fn show_code(
    State(app): State<AppState>,
    headers: HeaderMap,
    Path(code): Path<String>,
) -> Response {
    if let Err((status, msg)) = authorize(&app, &headers, Some("codes:redeem")) {
        return error(status, msg);
    }
    let store = app.store.clone();
    match tokio::task::spawn_blocking(move || store.code(&code)).await {
        Ok(Ok(Some(c))) => Json(c).into_response(),
        Ok(Ok(None)) => error(StatusCode::NOT_FOUND, "no such code"),
        Ok(Err(e)) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
        Err(_) => error(StatusCode::INTERNAL_SERVER_ERROR, "internal error"),
    }
}

/// Redeems a code exactly once: 200 the first time, 409 after, 410 expired or voided.
async fn redeem_code(
    State(app): State<AppState>,
    headers: HeaderMap,
    Path(code): Path<String>,
) -> Response {
    use crate::codes::CodeError;
    let caller = match authorize(&app, &headers, Some("codes:redeem")) {
        Ok(c) => c,
        Err((status, msg)) => return error(status, msg),
    };
    let store = app.store.clone();
    let now = crate::delivery::now_ms();
    match tokio::task::spawn_blocking(move || store.redeem_code(&code, &caller, now)).await {
        Ok(Ok(c)) => Json(json!({ "redeemed": true, "code": c })).into_response(),
        Ok(Err(e @ CodeError::NotFound)) => error(StatusCode::NOT_FOUND, e.to_string()),
        Ok(Err(e @ CodeError::Redeemed)) => error(StatusCode::CONFLICT, e.to_string()),
        Ok(Err(e @ (CodeError::Expired | CodeError::Void))) => {
            error(StatusCode::GONE, e.to_string())
        }
        Ok(Err(e @ CodeError::Invalid(_))) => {
            error(StatusCode::UNPROCESSABLE_ENTITY, e.to_string())
        }
        Ok(Err(e @ CodeError::Store(_))) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
        Err(_) => error(StatusCode::INTERNAL_SERVER_ERROR, "internal error"),
    }
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Generate {
    pool: String,
    count: usize,
}

/// Generates codes into a pool ahead (operators: the admin token).
async fn generate_codes(
    State(app): State<AppState>,
    headers: HeaderMap,
    body: Result<Json<Generate>, axum::extract::rejection::JsonRejection>,
) -> Response {
    if let Err((status, msg)) = authorize(&app, &headers, None) {
        return error(status, msg);
    }
    let g = match body {
        Ok(Json(g)) => g,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.body_text()),
    };
    if !(1..=10_000).contains(&g.count) {
        return error(
            StatusCode::UNPROCESSABLE_ENTITY,
            "count is 1 to 10,000 per call",
        );
    }
    let Some(spec) = app.runtime().promo_codes.get(&g.pool).cloned() else {
        return error(
            StatusCode::NOT_FOUND,
            format!("no promo code pool `{}` in the config", g.pool),
        );
    };
    let store = app.store.clone();
    let now = crate::delivery::now_ms();
    let pool = g.pool.clone();
    match tokio::task::spawn_blocking(move || store.generate_codes(&pool, &spec, g.count, now))
        .await
    {
        Ok(Ok(codes)) => Json(json!({ "pool": g.pool, "generated": codes.len(), "codes": codes }))
            .into_response(),
        Ok(Err(e)) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
        Err(_) => error(StatusCode::INTERNAL_SERVER_ERROR, "internal error"),
    }
}
