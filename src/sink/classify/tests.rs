//! Classification tables per sink, against the shipped connector definitions and the
//! vendors' documented answers (sink-apis.md).

use super::*;
use crate::config::diagnostic::Diagnostics;
use crate::connector::Registry;
use reqwest::header::{HeaderName, HeaderValue};

const NOW: u64 = 1_800_000_000;

struct Case {
    status: u16,
    headers: &'static [(&'static str, &'static str)],
    body: &'static str,
    expect: Expect,
}

#[derive(Debug, PartialEq)]
enum Expect {
    Delivered(Option<&'static str>),
    Retry(Option<u64>),
    Reject,
}

fn check(connector: &str, action: &str, cases: &[Case]) {
    let mut diags = Diagnostics::default();
    let reg = Registry::load(&[], &mut diags);
    let sink = reg.get(connector).unwrap().sink.as_ref().unwrap();
    let act = &sink.actions[action];
    for (i, c) in cases.iter().enumerate() {
        let mut headers = HeaderMap::new();
        for (k, v) in c.headers {
            headers.insert(
                HeaderName::from_static(k),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        let got = classify(
            &sink.classify,
            act,
            &Answer {
                status: c.status,
                headers: &headers,
                body: c.body.as_bytes(),
            },
            NOW,
        );
        let got_short = match &got {
            Outcome::Delivered { vendor_id } => Expect::Delivered(
                vendor_id
                    .as_deref()
                    .map(|s| &*Box::leak(s.to_string().into_boxed_str())),
            ),
            Outcome::Retry { after, .. } => Expect::Retry(after.map(|d| d.as_secs())),
            Outcome::Reject { .. } => Expect::Reject,
        };
        assert_eq!(
            got_short, c.expect,
            "{connector}.{action} case {i} (HTTP {} {}): {got:?}",
            c.status, c.body
        );
    }
}

use Expect::*;

#[test]
fn twilio() {
    check(
        "twilio_sms",
        "send_sms",
        &[
            Case {
                status: 201,
                headers: &[],
                body: r#"{"sid":"SM123","status":"queued"}"#,
                expect: Delivered(Some("SM123")),
            },
            Case {
                status: 400,
                headers: &[],
                body: r#"{"code":21211,"message":"The 'To' number is not a valid phone number.","status":400}"#,
                expect: Reject,
            },
            Case {
                status: 400,
                headers: &[],
                body: r#"{"code":21610,"message":"Attempt to send to unsubscribed recipient","status":400}"#,
                expect: Reject,
            },
            Case {
                status: 401,
                headers: &[],
                body: r#"{"code":20003,"message":"Authenticate","status":401}"#,
                expect: Reject,
            },
            Case {
                status: 429,
                headers: &[],
                body: r#"{"code":20429,"message":"Too Many Requests","status":429}"#,
                expect: Retry(None),
            },
            Case {
                status: 400,
                headers: &[],
                body: r#"{"code":21611,"message":"queue full","status":400}"#,
                expect: Retry(Some(1800)),
            },
            Case {
                status: 503,
                headers: &[("retry-after", "7")],
                body: "",
                expect: Retry(Some(7)),
            },
            Case {
                status: 404,
                headers: &[],
                body: r#"{"code":20404,"message":"not found"}"#,
                expect: Reject,
            },
        ],
    );
}

#[test]
fn sendgrid() {
    check(
        "sendgrid",
        "send",
        &[
            Case {
                status: 202,
                headers: &[("x-message-id", "abc.123")],
                body: "",
                expect: Delivered(Some("abc.123")),
            },
            Case {
                status: 429,
                headers: &[("x-ratelimit-reset", "1800000042")],
                body: r#"{"errors":[{"message":"too many requests"}]}"#,
                expect: Retry(Some(42)),
            },
            Case {
                status: 400,
                headers: &[],
                body: r#"{"errors":[{"message":"Invalid email","field":"personalizations.0.to.0.email"}]}"#,
                expect: Reject,
            },
            Case {
                status: 403,
                headers: &[],
                body: r#"{"errors":[{"message":"sender not verified"}]}"#,
                expect: Reject,
            },
            Case {
                status: 413,
                headers: &[],
                body: "",
                expect: Reject,
            },
            Case {
                status: 502,
                headers: &[],
                body: "",
                expect: Retry(None),
            },
        ],
    );
}

#[test]
fn klaviyo() {
    check(
        "klaviyo",
        "track_event",
        &[
            Case {
                status: 202,
                headers: &[],
                body: "",
                expect: Delivered(None),
            },
            Case {
                status: 429,
                headers: &[("retry-after", "3")],
                body: r#"{"errors":[{"status":429,"code":"throttled","detail":"slow down"}]}"#,
                expect: Retry(Some(3)),
            },
            Case {
                status: 400,
                headers: &[],
                body: r#"{"errors":[{"status":400,"code":"invalid","detail":"bad metric"}]}"#,
                expect: Reject,
            },
            Case {
                status: 409,
                headers: &[],
                body: r#"{"errors":[{"status":409,"code":"duplicate_profile"}]}"#,
                expect: Reject,
            },
            Case {
                status: 415,
                headers: &[],
                body: "",
                expect: Reject,
            },
            Case {
                status: 500,
                headers: &[],
                body: "",
                expect: Retry(None),
            },
        ],
    );
    check(
        "klaviyo",
        "import_profile",
        &[Case {
            status: 201,
            headers: &[],
            body: r#"{"data":{"type":"profile","id":"01HXYZ"}}"#,
            expect: Delivered(Some("01HXYZ")),
        }],
    );
}

#[test]
fn slack() {
    check(
        "slack",
        "post",
        &[
            Case {
                status: 200,
                headers: &[],
                body: "ok",
                expect: Delivered(None),
            },
            Case {
                status: 400,
                headers: &[],
                body: "invalid_payload",
                expect: Reject,
            },
            Case {
                status: 404,
                headers: &[],
                body: "no_service",
                expect: Reject,
            },
            Case {
                status: 410,
                headers: &[],
                body: "channel_is_archived",
                expect: Reject,
            },
            Case {
                status: 429,
                headers: &[("retry-after", "1")],
                body: "",
                expect: Retry(Some(1)),
            },
            Case {
                status: 500,
                headers: &[],
                body: "rollup_error",
                expect: Retry(None),
            },
        ],
    );
    check(
        "slack",
        "post_message",
        &[
            Case {
                status: 200,
                headers: &[],
                body: r#"{"ok":true,"channel":"C1","ts":"1503435956.000247"}"#,
                expect: Delivered(Some("1503435956.000247")),
            },
            Case {
                status: 200,
                headers: &[],
                body: r#"{"ok":false,"error":"channel_not_found"}"#,
                expect: Reject,
            },
            Case {
                status: 200,
                headers: &[],
                body: r#"{"ok":false,"error":"invalid_auth"}"#,
                expect: Reject,
            },
            Case {
                status: 200,
                headers: &[],
                body: r#"{"ok":false,"error":"internal_error"}"#,
                expect: Retry(None),
            },
            Case {
                status: 429,
                headers: &[("retry-after", "30")],
                body: r#"{"ok":false,"error":"ratelimited"}"#,
                expect: Retry(Some(30)),
            },
        ],
    );
}

#[test]
fn zendesk() {
    check(
        "zendesk",
        "create_ticket",
        &[
            Case {
                status: 201,
                headers: &[],
                body: r#"{"ticket":{"id":35436},"audit":{}}"#,
                expect: Delivered(Some("35436")),
            },
            Case {
                status: 422,
                headers: &[],
                body: r#"{"error":"RecordInvalid","description":"Record validation errors"}"#,
                expect: Reject,
            },
            Case {
                status: 401,
                headers: &[],
                body: r#"{"error":"Couldn't authenticate you"}"#,
                expect: Reject,
            },
            Case {
                status: 409,
                headers: &[],
                body: "",
                expect: Retry(None),
            },
            Case {
                status: 429,
                headers: &[("retry-after", "60")],
                body: "",
                expect: Retry(Some(60)),
            },
            Case {
                status: 503,
                headers: &[("retry-after", "10")],
                body: "Service Unavailable",
                expect: Retry(Some(10)),
            },
        ],
    );
}

#[test]
fn hubspot() {
    check(
        "hubspot",
        "update_contact",
        &[
            Case {
                status: 200,
                headers: &[],
                body: r#"{"id":"512","properties":{}}"#,
                expect: Delivered(Some("512")),
            },
            Case {
                status: 429,
                headers: &[],
                body: r#"{"status":"error","message":"You have reached your ten_secondly_rolling limit.","policyName":"TEN_SECONDLY_ROLLING","category":"RATE_LIMITS"}"#,
                expect: Retry(None),
            },
            Case {
                status: 429,
                headers: &[],
                body: r#"{"status":"error","message":"You have reached your daily limit.","policyName":"DAILY","category":"RATE_LIMITS"}"#,
                expect: Retry(Some(3600)),
            },
            Case {
                status: 400,
                headers: &[],
                body: r#"{"status":"error","category":"VALIDATION_ERROR","message":"Property values were not valid"}"#,
                expect: Reject,
            },
            Case {
                status: 404,
                headers: &[],
                body: r#"{"status":"error","category":"OBJECT_NOT_FOUND"}"#,
                expect: Reject,
            },
            Case {
                status: 409,
                headers: &[],
                body: r#"{"status":"error","category":"CONFLICT"}"#,
                expect: Reject,
            },
            Case {
                status: 504,
                headers: &[],
                body: "",
                expect: Retry(None),
            },
        ],
    );
}

#[test]
fn square_loyalty() {
    check(
        "square_loyalty",
        "accumulate_points",
        &[
            Case {
                status: 200,
                headers: &[],
                body: r#"{"events":[{"id":"ev1","type":"ACCUMULATE_POINTS"}]}"#,
                expect: Delivered(Some("ev1")),
            },
            Case {
                status: 429,
                headers: &[],
                body: r#"{"errors":[{"category":"RATE_LIMIT_ERROR","code":"RATE_LIMITED"}]}"#,
                expect: Retry(None),
            },
            Case {
                status: 400,
                headers: &[],
                body: r#"{"errors":[{"category":"INVALID_REQUEST_ERROR","code":"IDEMPOTENCY_KEY_REUSED","detail":"same key, other body"}]}"#,
                expect: Reject,
            },
            Case {
                status: 400,
                headers: &[],
                body: r#"{"errors":[{"category":"INVALID_REQUEST_ERROR","code":"BAD_REQUEST","detail":"not enough points"}]}"#,
                expect: Reject,
            },
            Case {
                status: 503,
                headers: &[],
                body: r#"{"errors":[{"category":"API_ERROR","code":"SERVICE_UNAVAILABLE"}]}"#,
                expect: Retry(None),
            },
            Case {
                status: 404,
                headers: &[],
                body: r#"{"errors":[{"category":"INVALID_REQUEST_ERROR","code":"NOT_FOUND"}]}"#,
                expect: Reject,
            },
        ],
    );
}

#[test]
fn giftcard() {
    check(
        "giftcard",
        "order",
        &[
            Case {
                status: 201,
                headers: &[],
                body: r#"{"Id":"ord-1","PONumber":"P-1","Status":"Pending"}"#,
                expect: Delivered(Some("ord-1")),
            },
            Case {
                status: 409,
                headers: &[],
                body: r#"{"Id":"ord-1","Message":"Duplicate PONumber"}"#,
                expect: Delivered(Some("ord-1")),
            },
            Case {
                status: 422,
                headers: &[],
                body: r#"{"Message":"Insufficient funds"}"#,
                expect: Retry(Some(1800)),
            },
            Case {
                status: 504,
                headers: &[],
                body: "",
                expect: Retry(None),
            },
            Case {
                status: 400,
                headers: &[],
                body: r#"{"Message":"Unknown product"}"#,
                expect: Reject,
            },
            Case {
                status: 403,
                headers: &[],
                body: r#"{"Message":"API access disabled"}"#,
                expect: Reject,
            },
        ],
    );
}

#[test]
fn retry_after_accepts_an_http_date_and_failures_say_whether_the_request_may_have_landed() {
    let mut h = HeaderMap::new();
    h.insert(
        "retry-after",
        HeaderValue::from_static("Fri, 15 Jan 2027 08:00:10 GMT"),
    );
    let at = jiff::fmt::rfc2822::parse("Fri, 15 Jan 2027 08:00:00 GMT")
        .unwrap()
        .timestamp()
        .as_second() as u64;
    assert_eq!(
        retry_after(&ClassifyDef::default(), &h, at),
        Some(Duration::from_secs(10))
    );
    assert!(matches!(
        classify_failure(&Failure::NotSent("refused".into())),
        Outcome::Retry {
            uncertain: false,
            ..
        }
    ));
    assert!(matches!(
        classify_failure(&Failure::Unknown("timed out".into())),
        Outcome::Retry {
            uncertain: true,
            ..
        }
    ));
}

/// Slack's transient `ok:false` codes where the post may have gone out (sink-apis.md §5b)
/// are retried only as uncertain (never resent blindly); a rate limit is safe to resend.
#[test]
fn slack_codes_that_may_have_posted_are_uncertain() {
    let mut diags = Diagnostics::default();
    let reg = Registry::load(&[], &mut diags);
    let sink = reg.get("slack").unwrap().sink.as_ref().unwrap();
    let act = &sink.actions["post_message"];
    let uncertain = |code: &str| {
        let body = format!(r#"{{"ok":false,"error":"{code}"}}"#);
        match classify(
            &sink.classify,
            act,
            &Answer {
                status: 200,
                headers: &HeaderMap::new(),
                body: body.as_bytes(),
            },
            NOW,
        ) {
            Outcome::Retry { uncertain, .. } => uncertain,
            other => panic!("{code}: {other:?}"),
        }
    };
    for code in [
        "internal_error",
        "fatal_error",
        "service_unavailable",
        "request_timeout",
    ] {
        assert!(uncertain(code), "{code}");
    }
    assert!(!uncertain("ratelimited"));
}

/// The bookings API has no idempotency key: a server error may come after the booking was
/// made, so it is uncertain (the delivery engine dead-letters it rather than resend).
#[test]
fn a_bookings_server_error_is_uncertain() {
    let mut diags = Diagnostics::default();
    let reg = Registry::load(&[], &mut diags);
    let sink = reg.get("bookings").unwrap().sink.as_ref().unwrap();
    let act = &sink.actions["create_booking"];
    assert!(!act.idempotent);
    for (status, expect_uncertain) in [(500, true), (502, true), (504, true), (429, false)] {
        let got = classify(
            &sink.classify,
            act,
            &Answer {
                status,
                headers: &HeaderMap::new(),
                body: br#"{"message":"oops"}"#,
            },
            NOW,
        );
        match got {
            Outcome::Retry { uncertain, .. } => assert_eq!(uncertain, expect_uncertain, "{status}"),
            other => panic!("{status}: {other:?}"),
        }
    }
}
