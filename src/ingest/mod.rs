//! (1) The webhook edge: `POST /hooks/{source}`.
//!
//! Order per request: size limit -> verify the raw bytes -> identify -> de-duplicate and
//! persist (inbox) -> 2xx. Nothing is parsed before verification, nothing unverified is
//! stored, and the answer waits until the write is durable.

pub mod identify;

use crate::app::{AppState, SourceRuntime};
use crate::inbox::NewEvent;
use crate::verify::{RawRequest, VerifyError};
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;
use std::time::{SystemTime, UNIX_EPOCH};

/// The default `body_timeout`: a body must arrive within this time (slow senders hold a
/// connection and memory).
pub const BODY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Headers never stored with an event.
const NEVER_STORED: &[&str] = &["authorization", "cookie", "proxy-authorization"];

/// 503 with `Retry-After`: the sender should try again (nothing was stored).
fn retry_later(secs: u32, msg: &str) -> Response {
    let mut r = status(StatusCode::SERVICE_UNAVAILABLE, msg);
    r.headers_mut()
        .insert(header::RETRY_AFTER, header::HeaderValue::from(secs));
    r
}

/// How much of a body over the limit is read and dropped before the 413 goes out: a client
/// that sends its whole body before reading the answer (Python's urllib) would otherwise see
/// a reset connection instead of the 413 (nginx's lingering close does the same). Bounded in
/// bytes and time; past either, the connection is closed.
const DRAIN_BYTES: u64 = 8 << 20;
const DRAIN_TIME: std::time::Duration = std::time::Duration::from_secs(5);

enum Read {
    Whole(bytes::Bytes),
    /// Over the limit (what was read of it is dropped).
    TooLarge,
    Failed,
}

/// Reads a body of at most `max` bytes; one over it is read on, and dropped, up to
/// `DRAIN_BYTES`.
async fn read_body(mut body: Body, max: usize) -> Read {
    use http_body_util::BodyExt;
    let (mut first, mut more): (Option<bytes::Bytes>, Option<bytes::BytesMut>) = (None, None);
    let mut seen = 0u64;
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else {
            return if seen > max as u64 {
                Read::TooLarge
            } else {
                Read::Failed
            };
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        seen += data.len() as u64;
        if seen > max as u64 {
            (first, more) = (None, None);
            if seen > DRAIN_BYTES {
                return Read::TooLarge;
            }
            continue;
        }
        // One chunk (the usual case) is kept as it came; several are joined.
        match (&mut first, &mut more) {
            (None, None) => first = Some(data),
            (Some(f), None) => {
                let mut joined = bytes::BytesMut::with_capacity(f.len() + data.len());
                joined.extend_from_slice(f);
                joined.extend_from_slice(&data);
                (first, more) = (None, Some(joined));
            }
            (_, Some(m)) => m.extend_from_slice(&data),
        }
    }
    if seen > max as u64 {
        return Read::TooLarge;
    }
    Read::Whole(match (first, more) {
        (_, Some(m)) => m.freeze(),
        (Some(f), None) => f,
        (None, None) => bytes::Bytes::new(),
    })
}

fn status(code: StatusCode, msg: &str) -> Response {
    (code, Json(json!({ "error": msg }))).into_response()
}

/// Counts a webhook's outcome (metric label and connector health).
fn count(source: &str, result: &'static str, reason: &'static str) {
    metrics::counter!("perkflow_ingest_webhooks_total", "source" => source.to_string(), "result" => result, "reason" => reason)
        .increment(1);
    let health = crate::ops::connectors::registry();
    let kind = crate::ops::connectors::Kind::Source;
    let now = crate::delivery::now_ms();
    match result {
        "accepted" | "duplicate" => health.ok(kind, source, now),
        "ping" => {}
        _ => {
            let why = match reason {
                "bad_signature" => {
                    "signature does not verify (a wrong secret, or requests not sent by the vendor)"
                        .to_string()
                }
                "missing_header" => "signature header missing".to_string(),
                "stale" => "timestamp outside the tolerance".to_string(),
                other => format!("{result}: {other}"),
            };
            health.failed(kind, source, now, &why, reason == "bad_signature");
        }
    }
}

pub async fn hook(
    State(app): State<AppState>,
    Path(name): Path<String>,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let rt = app.runtime();
    let Some(src) = rt.sources.get(&name) else {
        return status(StatusCode::NOT_FOUND, "unknown source");
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if let Some(n) = declared.filter(|n| *n > src.max_body as u64) {
        count(&name, "rejected", "too_large");
        // Read and dropped first (bounded), so that the sender sees the answer.
        if n <= DRAIN_BYTES {
            let _ = tokio::time::timeout(DRAIN_TIME, read_body(body, 0)).await;
        }
        return status(StatusCode::PAYLOAD_TOO_LARGE, "body too large");
    }
    // Reserve the memory this body may take before reading it: many slow senders cannot
    // hold more than the budget between them.
    let declared = declared.map_or(src.max_body, |n| n as usize);
    let kib = (declared.min(src.max_body) / 1024 + 1) as u32;
    let Ok(_budget) = app.body_budget.clone().try_acquire_many_owned(kib) else {
        count(&name, "unavailable", "busy");
        return retry_later(5, "too many requests in progress, retry later");
    };
    let body =
        match tokio::time::timeout(app.boot.body_timeout, read_body(body, src.max_body)).await {
            Ok(Read::Whole(b)) => b,
            Ok(Read::TooLarge) => {
                count(&name, "rejected", "too_large");
                return status(StatusCode::PAYLOAD_TOO_LARGE, "body too large");
            }
            Ok(Read::Failed) => return status(StatusCode::BAD_REQUEST, "could not read body"),
            Err(_) => {
                count(&name, "rejected", "slow_body");
                return status(StatusCode::REQUEST_TIMEOUT, "body not received in time");
            }
        };
    if let Some(ping) = &src.def.ping {
        if is_ping(&headers, &body, &ping.form_field, &src.signature_headers) {
            tracing::info!(source = %name, "acknowledged the unsigned webhook creation ping; nothing stored");
            count(&name, "ping", "none");
            return (StatusCode::OK, Json(json!({ "ping": true }))).into_response();
        }
    }
    let url = signed_url(src, &uri);
    let raw = RawRequest::new(headers, body, url);
    let verified = match src.verifier.verify(raw, SystemTime::now()).await {
        Ok(v) => v,
        Err(VerifyError::Rejected(r)) => {
            tracing::warn!(source = %name, reason = r.reason(), detail = ?r, "webhook rejected");
            count(&name, "rejected", r.reason());
            return StatusCode::UNAUTHORIZED.into_response();
        }
        Err(VerifyError::Unavailable(e)) => {
            tracing::warn!(source = %name, error = %e, "webhook could not be verified now; asked the sender to retry");
            count(&name, "unavailable", "verify_unavailable");
            return retry_later(30, "verification unavailable, retry later");
        }
    };
    let found = match identify::identify(&src.def.identify, &verified) {
        Ok(f) => f,
        Err(e) => {
            tracing::warn!(source = %name, error = %e, "verified webhook has no usable event id or type; nothing stored");
            count(&name, "rejected", "unidentified");
            return status(
                StatusCode::BAD_REQUEST,
                &format!("cannot identify the event: {e}"),
            );
        }
    };
    let received_at_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let kept: Vec<(String, String)> = verified
        .headers
        .iter()
        .filter(|(k, _)| {
            let k = k.as_str();
            !NEVER_STORED.contains(&k) && !src.signature_headers.iter().any(|s| s == k)
        })
        .filter_map(|(k, v)| Some((k.as_str().to_string(), v.to_str().ok()?.to_string())))
        .collect();
    let n = found.len();
    let mut kept = Some(kept);
    let events: Vec<NewEvent> = found
        .into_iter()
        .enumerate()
        .map(|(i, f)| NewEvent {
            source: name.clone(),
            connector: src.connector.clone(),
            vendor_id: f.vendor_id,
            event_type: f.event_type,
            event_time: f.time,
            received_at_ms,
            // The last event takes the headers; the others (a batch) copy them.
            headers: if i + 1 == n {
                kept.take().unwrap_or_default()
            } else {
                kept.clone().unwrap_or_default()
            },
            payload: f.payload,
        })
        .collect();
    // Events no pipeline listens to do not wake the worker: its idle poll passes over them.
    let listened = events
        .iter()
        .any(|e| rt.listeners(&e.source, &e.event_type).next().is_some());
    match app.inbox.append(events).await {
        Ok(done) => {
            let duplicate = done.iter().all(|a| a.duplicate);
            if !duplicate && listened {
                app.wake.notify_one();
            }
            count(
                &name,
                if duplicate { "duplicate" } else { "accepted" },
                "none",
            );
            tracing::debug!(source = %name, id = %done[0].id, duplicate, "webhook stored");
            if done.len() == 1 {
                // The common answer, without building a JSON tree (ids are `ev_` + hex).
                let body = format!(r#"{{"id":"{}","duplicate":{duplicate}}}"#, done[0].id);
                return ([(header::CONTENT_TYPE, "application/json")], body).into_response();
            }
            let mut body = json!({ "id": done[0].id, "duplicate": duplicate });
            body["events"] = json!(done
                .iter()
                .map(|a| json!({"id": a.id, "duplicate": a.duplicate}))
                .collect::<Vec<_>>());
            (StatusCode::OK, Json(body)).into_response()
        }
        Err(e) => {
            tracing::error!(source = %name, error = %e, "cannot store webhook; answered 503 so the sender retries");
            count(&name, "unavailable", "store");
            retry_later(5, "store unavailable, retry later")
        }
    }
}

/// WooCommerce's creation ping: no signature, form body `webhook_id=<digits>` and nothing else.
fn is_ping(headers: &HeaderMap, body: &[u8], field: &str, sig_headers: &[String]) -> bool {
    if sig_headers.iter().any(|h| headers.contains_key(h.as_str())) {
        return false;
    }
    let Ok(text) = std::str::from_utf8(body) else {
        return false;
    };
    let Some(value) = text
        .trim()
        .strip_prefix(field)
        .and_then(|r| r.strip_prefix('='))
    else {
        return false;
    };
    !value.is_empty() && value.len() <= 20 && value.bytes().all(|b| b.is_ascii_digit())
}

/// The URL the vendor signed: the source's `url`, or `public_url` + the request path.
fn signed_url(src: &SourceRuntime, uri: &Uri) -> String {
    match &src.signed_url {
        Some(u) if src.fixed_url => u.clone(),
        Some(base) => match uri.query() {
            Some(q) => format!("{base}?{q}"),
            None => base.clone(),
        },
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_only_the_bare_ping() {
        let h = HeaderMap::new();
        let sig = vec!["x-wc-webhook-signature".to_string()];
        assert!(is_ping(&h, b"webhook_id=17", "webhook_id", &sig));
        assert!(!is_ping(&h, b"webhook_id=17&x=1", "webhook_id", &sig));
        assert!(!is_ping(&h, b"webhook_id=", "webhook_id", &sig));
        assert!(!is_ping(&h, b"{\"id\":1}", "webhook_id", &sig));
        let mut signed = HeaderMap::new();
        signed.insert("x-wc-webhook-signature", "abc".parse().unwrap());
        assert!(!is_ping(&signed, b"webhook_id=17", "webhook_id", &sig));
    }
}
