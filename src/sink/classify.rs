//! (7) The one place where a vendor's answer becomes an [`Outcome`]: status, vendor error
//! codes (from the connector's `classify` rules) and `Retry-After`/reset headers.

use crate::connector::sink::{ActionDef, ClassifyDef, RecordDef, ResetForm};
use reqwest::header::HeaderMap;
use serde_json::Value as Json;
use std::time::Duration;

/// What became of one attempt.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Delivered {
        /// The vendor's id of what was created, when the connector says where it is.
        vendor_id: Option<String>,
    },
    Retry {
        /// The vendor's own wait (`Retry-After`, a reset header, a slow rule), unclamped.
        after: Option<Duration>,
        reason: String,
        /// The request may have taken effect (a timeout or a reset after it was sent).
        uncertain: bool,
    },
    Reject {
        reason: String,
    },
}

impl Outcome {
    pub fn label(&self) -> &'static str {
        match self {
            Outcome::Delivered { .. } => "delivered",
            Outcome::Retry { .. } => "retry",
            Outcome::Reject { .. } => "rejected",
        }
    }
}

/// An answer from the vendor.
pub struct Answer<'a> {
    pub status: u16,
    pub headers: &'a HeaderMap,
    pub body: &'a [u8],
}

/// A request that got no answer.
#[derive(Debug, Clone, PartialEq)]
pub enum Failure {
    /// Nothing reached the vendor (connection refused, DNS, TLS handshake): safe to resend.
    NotSent(String),
    /// The request may have reached the vendor (timeout, connection reset mid-answer).
    Unknown(String),
}

pub fn classify_failure(f: &Failure) -> Outcome {
    match f {
        Failure::NotSent(why) => Outcome::Retry {
            after: None,
            reason: format!("not sent: {why}"),
            uncertain: false,
        },
        Failure::Unknown(why) => Outcome::Retry {
            after: None,
            reason: format!("no answer: {why}"),
            uncertain: true,
        },
    }
}

/// Classifies an answer. `now_unix` is the current Unix time in seconds (reset headers).
pub fn classify(def: &ClassifyDef, action: &ActionDef, ans: &Answer, now_unix: u64) -> Outcome {
    let json: Option<Json> = serde_json::from_slice(ans.body).ok();
    let code = error_code(def, json.as_ref(), ans.body);
    let describe = |prefix: &str| {
        let mut s = format!("{prefix}HTTP {}", ans.status);
        if let Some(c) = &code {
            s.push_str(&format!(" {c}"));
        }
        if let Some(m) = error_message(def, json.as_ref()) {
            s.push_str(&format!(": {m}"));
        }
        s
    };
    let in_codes = |list: &[String]| code.as_ref().is_some_and(|c| list.iter().any(|x| x == c));
    let success = ((200..300).contains(&ans.status) && !def.permanent.contains(&ans.status))
        || def.success.contains(&ans.status);
    if success {
        let ok = match &action.ok_field {
            None => true,
            Some(p) => json.as_ref().and_then(|j| j.pointer(p)) == Some(&Json::Bool(true)),
        };
        if ok {
            return Outcome::Delivered {
                vendor_id: record(action, json.as_ref(), ans.headers),
            };
        }
        // 2xx with `ok: false` (Slack): the vendor code decides.
        return if in_codes(&def.retry_codes) {
            Outcome::Retry {
                after: retry_after(def, ans.headers, now_unix),
                reason: describe("refused: "),
                uncertain: in_codes(&def.uncertain_codes),
            }
        } else {
            Outcome::Reject {
                reason: describe("refused: "),
            }
        };
    }
    if in_codes(&def.permanent_codes) {
        return Outcome::Reject {
            reason: describe(""),
        };
    }
    for rule in &def.slow {
        let status_ok = rule.status.is_none_or(|s| s == ans.status);
        let code_ok = rule
            .code
            .as_ref()
            .is_none_or(|c| code.as_deref() == Some(c.as_str()));
        if status_ok && code_ok {
            return Outcome::Retry {
                after: Some(rule.after.0),
                reason: format!("{} ({})", rule.reason, describe("")),
                uncertain: false,
            };
        }
    }
    let retryable = in_codes(&def.retry_codes)
        || matches!(ans.status, 408 | 425 | 429)
        || def.retry.contains(&ans.status)
        || ((500..600).contains(&ans.status) && !def.permanent.contains(&ans.status));
    if retryable {
        let uncertain = in_codes(&def.uncertain_codes)
            || (code.is_none() && def.uncertain_status.contains(&ans.status));
        Outcome::Retry {
            after: retry_after(def, ans.headers, now_unix),
            reason: describe(""),
            uncertain,
        }
    } else {
        Outcome::Reject {
            reason: describe(""),
        }
    }
}

fn scalar(v: &Json) -> Option<String> {
    match v {
        Json::String(s) if !s.is_empty() => Some(s.clone()),
        Json::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// The vendor's error code: the first configured pointer present, or a short plain-text body
/// (`invalid_payload` from a Slack webhook).
fn error_code(def: &ClassifyDef, json: Option<&Json>, body: &[u8]) -> Option<String> {
    if let Some(j) = json {
        return def
            .error_code
            .iter()
            .find_map(|p| j.pointer(p).and_then(scalar));
    }
    let text = std::str::from_utf8(body).ok()?.trim();
    (!text.is_empty()
        && text.len() <= 64
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-'))
    .then(|| text.to_string())
}

fn error_message(def: &ClassifyDef, json: Option<&Json>) -> Option<String> {
    let j = json?;
    def.error_message
        .iter()
        .find_map(|p| j.pointer(p).and_then(scalar))
        .map(|m| m.chars().take(200).collect())
}

fn record(action: &ActionDef, json: Option<&Json>, headers: &HeaderMap) -> Option<String> {
    match action.record.as_ref()? {
        RecordDef::Json(p) => json?.pointer(p).and_then(scalar),
        RecordDef::Header(h) => headers
            .get(h.as_str())
            .and_then(|v| v.to_str().ok())
            .map(str::to_string),
    }
}

/// `Retry-After` (seconds or an HTTP date), else the connector's reset header.
pub fn retry_after(def: &ClassifyDef, headers: &HeaderMap, now_unix: u64) -> Option<Duration> {
    if let Some(v) = headers.get("retry-after").and_then(|v| v.to_str().ok()) {
        let v = v.trim();
        if let Ok(secs) = v.parse::<f64>() {
            if secs.is_finite() && secs >= 0.0 {
                return Some(Duration::from_secs_f64(secs.min(1e9)));
            }
        }
        if let Ok(at) = jiff::fmt::rfc2822::parse(v) {
            let at = at.timestamp().as_second().max(0) as u64;
            return Some(Duration::from_secs(at.saturating_sub(now_unix)));
        }
    }
    let reset = def.reset_header.as_ref()?;
    let v: f64 = headers
        .get(reset.name.as_str())?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()?;
    if !v.is_finite() || v < 0.0 {
        return None;
    }
    Some(match reset.form {
        ResetForm::Seconds => Duration::from_secs_f64(v.min(1e9)),
        ResetForm::Epoch => Duration::from_secs((v as u64).saturating_sub(now_unix)),
    })
}

#[cfg(test)]
mod tests;
