use super::*;
use crate::sink::Sent;

fn job() -> Job {
    Job {
        key: "pf-1".into(),
        event_id: "e1".into(),
        pipeline: "p".into(),
        step: "steps[0]".into(),
        sink: "sms".into(),
        action: "send_sms".into(),
        with: serde_json::json!({}),
        created_at_ms: 1_000,
        attempts: 1,
        state: JobState::InFlight,
        next_at_ms: 61_000,
        uncertain: false,
        reason: None,
        vendor_id: None,
        finished_at_ms: None,
        replays: 0,
        log: Vec::new(),
        kind: crate::outbox::JobKind::Send,
        version: 0,
        sensitive: Vec::new(),
        keep: None,
    }
}

fn policy() -> Policy {
    Policy {
        schedule: Schedule {
            initial: Duration::from_secs(1),
            max_delay: Duration::from_secs(60),
            max_retry_after: Duration::from_secs(120),
        },
        max_attempts: 3,
        max_age: Duration::from_secs(3600),
    }
}

fn sent(outcome: Outcome, status: Option<u16>) -> Sent {
    Sent {
        outcome,
        status,
        latency: Duration::from_millis(12),
        excerpt: None,
        reconciled: false,
        answer: None,
    }
}

fn retry(after: Option<u64>, uncertain: bool) -> Outcome {
    Outcome::Retry {
        after: after.map(Duration::from_secs),
        reason: "HTTP 503".into(),
        uncertain,
    }
}

#[test]
fn a_retry_is_scheduled_with_the_vendors_wait_or_jittered_backoff() {
    let now = 10_000;
    let j = settle(
        &job(),
        &sent(retry(Some(5), false), Some(429)),
        &policy(),
        now,
        0.5,
    );
    assert_eq!(j.state, JobState::Pending);
    assert_eq!(j.next_at_ms, now + 5_000, "Retry-After honoured");
    let mut second = job();
    second.attempts = 2;
    let j = settle(
        &second,
        &sent(retry(None, false), Some(503)),
        &policy(),
        now,
        0.5,
    );
    assert_eq!(j.next_at_ms, now + 1_000, "half of the 2 s interval");
    let j = settle(
        &job(),
        &sent(retry(Some(86_400), false), Some(429)),
        &policy(),
        now,
        0.5,
    );
    assert_eq!(j.next_at_ms, now + 120_000, "clamped");
    assert_eq!(j.log.len(), 1);
    assert_eq!(j.log[0].status, Some(429));
}

#[test]
fn max_attempts_and_max_age_dead_letter_with_the_reason() {
    let mut j = job();
    j.attempts = 3;
    let d = settle(
        &j,
        &sent(retry(None, false), Some(503)),
        &policy(),
        10_000,
        0.1,
    );
    assert_eq!(d.state, JobState::Dead);
    assert_eq!(
        d.reason.as_deref(),
        Some("gave up after 3 attempts: HTTP 503")
    );
    let old = settle(
        &job(),
        &sent(retry(None, false), Some(503)),
        &policy(),
        1_000 + 3_600_000,
        0.1,
    );
    assert_eq!(old.state, JobState::Dead);
    assert!(old.reason.unwrap().starts_with("older than max_age (1h)"));
}

/// A wait the vendor asks of the whole sink (the gift-card API's 422 insufficient funds, a
/// daily quota) is not the job's failure: no attempt is spent and age does not kill it; the
/// job waits as long as the vendor says.
#[test]
fn a_sink_wide_wait_spends_no_attempt_and_no_age() {
    let funds = Outcome::Retry {
        after: Some(Duration::from_secs(1800)),
        reason: "insufficient funds in the prefunded account".into(),
        uncertain: false,
    };
    let mut j = job();
    j.attempts = 3;
    let long_after = 1_000 + 7 * 24 * 3_600_000;
    let waits = settle(&j, &sent(funds, Some(422)), &policy(), long_after, 0.5);
    assert_eq!(waits.state, JobState::Pending, "{:?}", waits.reason);
    assert_eq!(waits.attempts, 2, "the attempt is given back");
    assert_eq!(
        waits.next_at_ms,
        long_after + 120_000,
        "the vendor's wait, clamped"
    );
    // A short 503 is the job's own failure: it still counts.
    let d = settle(
        &j,
        &sent(retry(Some(5), false), Some(503)),
        &policy(),
        10_000,
        0.5,
    );
    assert_eq!(d.state, JobState::Dead);
}

#[test]
fn a_permanent_error_goes_straight_to_dead_letters_and_uncertainty_sticks_until_delivered() {
    let d = settle(
        &job(),
        &sent(
            Outcome::Reject {
                reason: "HTTP 400 21211: invalid To".into(),
            },
            Some(400),
        ),
        &policy(),
        5_000,
        0.0,
    );
    assert_eq!(d.state, JobState::Dead);
    assert_eq!(d.finished_at_ms, Some(5_000));
    let u = settle(
        &job(),
        &sent(retry(None, true), None),
        &policy(),
        5_000,
        0.0,
    );
    assert!(u.uncertain);
    let mut again = u.clone();
    again.attempts = 2;
    let still = settle(
        &again,
        &sent(retry(None, false), None),
        &policy(),
        6_000,
        0.0,
    );
    assert!(
        still.uncertain,
        "a later connection failure proves nothing about the earlier attempt"
    );
    let ok = settle(
        &again,
        &sent(
            Outcome::Delivered {
                vendor_id: Some("SM1".into()),
            },
            Some(201),
        ),
        &policy(),
        7_000,
        0.0,
    );
    assert_eq!(ok.state, JobState::Delivered);
    assert!(!ok.uncertain);
    assert_eq!(ok.vendor_id.as_deref(), Some("SM1"));
}

#[test]
fn the_breaker_learns_only_from_real_failures() {
    assert_eq!(
        signal(&sent(retry(None, false), Some(503))),
        Signal::Failing
    );
    assert_eq!(signal(&sent(retry(None, true), None)), Signal::Failing);
    assert_eq!(
        signal(&sent(retry(Some(1), false), Some(429))),
        Signal::Neutral
    );
    assert_eq!(
        signal(&sent(Outcome::Reject { reason: "x".into() }, Some(400))),
        Signal::Healthy
    );
}
