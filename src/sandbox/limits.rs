//! Each emulated vendor's rate limit (`../shared/docs/sink-apis.md`), answered the way that
//! vendor answers it: Twilio's 429 with code 20429 and no `Retry-After`, SendGrid's
//! `X-RateLimit-*` headers, Klaviyo's and Zendesk's `Retry-After`, HubSpot's policy name,
//! Square's `RATE_LIMITED`, QuickBooks' `ThrottleExceeded` fault. Where the vendor publishes no
//! number, a generous one is used (the point is the shape of the answer).

use super::Answer;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use serde_json::json;
use std::collections::HashMap;
use std::num::NonZeroU32;
use std::time::Duration;

/// A vendor's limit: `burst` requests at once, refilled at `per_second`.
struct Limit {
    vendor: &'static str,
    per_second: f64,
    burst: u32,
}

const LIMITS: &[Limit] = &[
    // Concurrency cap per account, number not published.
    Limit {
        vendor: "twilio",
        per_second: 100.0,
        burst: 100,
    },
    // Not published; exposed through X-RateLimit-* only.
    Limit {
        vendor: "sendgrid",
        per_second: 100.0,
        burst: 100,
    },
    // Events: 350/s burst, 3,500/min steady.
    Limit {
        vendor: "klaviyo",
        per_second: 3500.0 / 60.0,
        burst: 350,
    },
    // ~1 message per second per webhook, short bursts tolerated.
    Limit {
        vendor: "slack",
        per_second: 1.0,
        burst: 30,
    },
    // Growth/Professional plans: 400 per minute.
    Limit {
        vendor: "zendesk",
        per_second: 400.0 / 60.0,
        burst: 400,
    },
    // Private apps, Free/Starter: 100 per 10 s.
    Limit {
        vendor: "hubspot",
        per_second: 10.0,
        burst: 100,
    },
    // Not published.
    Limit {
        vendor: "square",
        per_second: 100.0,
        burst: 100,
    },
    // Not published.
    Limit {
        vendor: "giftcard",
        per_second: 50.0,
        burst: 50,
    },
    // 500 per minute per realm.
    Limit {
        vendor: "quickbooks",
        per_second: 500.0 / 60.0,
        burst: 500,
    },
];

/// One limiter per vendor.
pub(crate) struct Limits(HashMap<&'static str, DefaultDirectRateLimiter>);

impl Default for Limits {
    fn default() -> Self {
        Limits(
            LIMITS
                .iter()
                .map(|l| {
                    let period = Duration::from_secs_f64(1.0 / l.per_second);
                    let quota = Quota::with_period(period)
                        .expect("a positive period")
                        .allow_burst(NonZeroU32::new(l.burst).expect("burst > 0"));
                    (l.vendor, RateLimiter::direct(quota))
                })
                .collect(),
        )
    }
}

impl Limits {
    /// The vendor's own 429 answer when `vendor` is over its limit.
    pub(crate) fn check(&self, vendor: &str) -> Option<Answer> {
        let limiter = self.0.get(vendor)?;
        let wait = match limiter.check() {
            Ok(()) => return None,
            Err(not_until) => not_until.wait_time_from(governor::clock::Clock::now(
                &governor::clock::DefaultClock::default(),
            )),
        };
        let secs = wait.as_secs().max(1);
        let summary = format!("rate limited: over the vendor's limit (retry in {secs}s)");
        Some(match vendor {
            "twilio" => Answer::json(
                429,
                json!({"code": 20429, "message": "Too Many Requests", "more_info": "https://www.twilio.com/docs/errors/20429", "status": 429}),
                summary,
            ),
            "sendgrid" => {
                let reset = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0)
                    + secs;
                Answer::json(
                    429,
                    json!({"errors": [{"field": null, "message": "too many requests"}]}),
                    summary,
                )
                .header("x-ratelimit-limit", "100")
                .header("x-ratelimit-remaining", "0")
                .header("x-ratelimit-reset", reset.to_string())
            }
            "klaviyo" => Answer::json(
                429,
                json!({"errors": [{"id": "rate-limited", "status": 429, "code": "throttled", "title": "Request was throttled.", "detail": format!("Request was throttled. Expected available in {secs} seconds.")}]}),
                summary,
            )
            .header("retry-after", secs.to_string()),
            "slack" => Answer::text(429, "rate_limited", summary).header("retry-after", secs.to_string()),
            "zendesk" => Answer::json(
                429,
                json!({"error": "TooManyRequests", "description": "You have exceeded the rate limit"}),
                summary,
            )
            .header("retry-after", secs.to_string()),
            "hubspot" => Answer::json(
                429,
                json!({"status": "error", "message": "You have reached your ten_secondly_rolling limit.", "errorType": "RATE_LIMIT", "policyName": "TEN_SECONDLY_ROLLING", "category": "RATE_LIMITS"}),
                summary,
            ),
            "square" => Answer::json(
                429,
                json!({"errors": [{"category": "RATE_LIMIT_ERROR", "code": "RATE_LIMITED", "detail": "Too many requests"}]}),
                summary,
            ),
            "quickbooks" => Answer::json(
                429,
                json!({"Fault": {"Error": [{"Message": "message=ThrottleExceeded; errorCode=003001; statusCode=429", "Detail": "The request limit for this resource has been reached", "code": "3001"}], "type": "SERVICE"}}),
                summary,
            ),
            _ => Answer::json(429, json!({"Message": "Too many requests"}), summary)
                .header("retry-after", secs.to_string()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_vendor_answers_429_its_own_way_once_over_its_burst() {
        let limits = Limits::default();
        for _ in 0..30 {
            assert!(limits.check("slack").is_none());
        }
        let a = limits.check("slack").expect("over the burst");
        assert_eq!(a.status, 429);
        assert!(a.headers.iter().any(|(k, _)| *k == "retry-after"));
        for _ in 0..100 {
            assert!(limits.check("twilio").is_none());
        }
        let a = limits.check("twilio").expect("over the burst");
        assert!(a.body.contains("20429"));
        assert!(!a.headers.iter().any(|(k, _)| *k == "retry-after"));
        assert!(
            limits.check("webhook").is_none(),
            "no limit for the generic webhook"
        );
    }
}
