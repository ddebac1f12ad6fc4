//! Every sink against the vendor sandbox: the happy path, refused credentials, 429 with and
//! without Retry-After, a retryable server error, and a permanent error whose vendor reason
//! ends up in the dead letter.

use crate::delivery::{api, order, project, settled_jobs};
use crate::helpers::*;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

struct Case {
    /// The sink entry (`{{sandbox}}` is replaced by the sandbox URL).
    sink: &'static str,
    /// The same with a wrong credential.
    bad_auth: &'static str,
    vendor: &'static str,
    deliver: &'static str,
    /// A deliver the vendor refuses, and the text of its reason.
    refused: &'static str,
    reason: &'static str,
    /// The vendor's own error body for a retryable 5xx (Twilio: with its code, else a bare 5xx
    /// leaves the outcome unknown).
    server_error_body: Option<&'static str>,
}

const CASES: &[Case] = &[
    Case {
        sink: "{ connector: twilio_sms, account_sid: AC00000000000000000000000000000000, auth_token: dev-twilio-token, from: \"+15550100\", base_url: \"{{sandbox}}/twilio\" }",
        bad_auth: "{ connector: twilio_sms, account_sid: AC00000000000000000000000000000000, auth_token: wrong, from: \"+15550100\", base_url: \"{{sandbox}}/twilio\" }",
        vendor: "twilio",
        deliver: "{ to: s.send_sms, with: { to: \"+14155550134\", body: \"hi\" } }",
        refused: "{ to: s.send_sms, with: { to: \"5550134\", body: \"hi\" } }",
        reason: "HTTP 400 21211: The 'To' number 5550134 is not a valid phone number.",
        server_error_body: Some(r#"{"code": 20500, "message": "Internal Server Error", "status": 500}"#),
    },
    Case {
        sink: "{ connector: sendgrid, api_key: SG.dev-key, from: rewards@example.com, base_url: \"{{sandbox}}/sendgrid\" }",
        bad_auth: "{ connector: sendgrid, api_key: SG.wrong, from: rewards@example.com, base_url: \"{{sandbox}}/sendgrid\" }",
        vendor: "sendgrid",
        deliver: "{ to: s.send, with: { to: ada@example.com, subject: Hi, text: Thanks } }",
        refused: "{ to: s.send, with: { to: not-an-address, subject: Hi, text: Thanks } }",
        reason: "HTTP 400: Does not contain a valid address.",
        server_error_body: None,
    },
    Case {
        sink: "{ connector: klaviyo, api_key: pk_dev_klaviyo, base_url: \"{{sandbox}}/klaviyo\" }",
        bad_auth: "{ connector: klaviyo, api_key: pk_wrong, base_url: \"{{sandbox}}/klaviyo\" }",
        vendor: "klaviyo",
        deliver: "{ to: s.track_event, with: { metric: Points Earned, email: ada@example.com } }",
        refused: "{ to: s.import_profile, with: { first_name: Ada } }",
        reason: "HTTP 400 invalid: a profile needs email, phone_number or external_id",
        server_error_body: None,
    },
    Case {
        sink: "{ connector: slack, webhook_url: \"{{sandbox}}/slack/services/T1/B1/x\", bot_token: xoxb-dev-slack, channel: C1, base_url: \"{{sandbox}}/slack\" }",
        bad_auth: "{ connector: slack, webhook_url: \"{{sandbox}}/slack/services/T1/B1/x\", bot_token: xoxb-wrong, channel: C1, base_url: \"{{sandbox}}/slack\" }",
        vendor: "slack",
        deliver: "{ to: s.post_message, with: { text: hi } }",
        refused: "{ to: s.post, with: { text: \"\" } }",
        reason: "HTTP 400 no_text",
        server_error_body: None,
    },
    Case {
        sink: "{ connector: zendesk, subdomain: acme, email: agent@example.com, api_token: dev-zendesk-token, base_url: \"{{sandbox}}/zendesk\" }",
        bad_auth: "{ connector: zendesk, subdomain: acme, email: agent@example.com, api_token: wrong, base_url: \"{{sandbox}}/zendesk\" }",
        vendor: "zendesk",
        deliver: "{ to: s.create_ticket, with: { subject: Hi, comment: Thanks } }",
        refused: "{ to: s.create_ticket, with: { subject: Hi, comment: \"\" } }",
        reason: "HTTP 422 RecordInvalid: Record validation errors: comment: cannot be blank",
        server_error_body: None,
    },
    Case {
        sink: "{ connector: hubspot, access_token: dev-hubspot-token, base_url: \"{{sandbox}}/hubspot\" }",
        bad_auth: "{ connector: hubspot, access_token: wrong, base_url: \"{{sandbox}}/hubspot\" }",
        vendor: "hubspot",
        deliver: "{ to: s.upsert_contact, with: { email: ada@example.com, properties: { points: 250 } } }",
        refused: "{ to: s.update_contact, with: { email: nobody@example.com, properties: { points: 1 } } }",
        reason: "HTTP 404 OBJECT_NOT_FOUND: resource not found",
        server_error_body: None,
    },
    Case {
        sink: "{ connector: square_loyalty, access_token: dev-square-token, location_id: L1, base_url: \"{{sandbox}}/square\" }",
        bad_auth: "{ connector: square_loyalty, access_token: wrong, location_id: L1, base_url: \"{{sandbox}}/square\" }",
        vendor: "square",
        deliver: "{ to: s.accumulate_points, with: { account_id: acct-1, points: 120 } }",
        refused: "{ to: s.create_reward, with: { account_id: acct-1, reward_tier_id: \"\" } }",
        reason: "HTTP 400 MISSING_REQUIRED_PARAMETER: reward.loyalty_account_id and reward.reward_tier_id are required",
        server_error_body: None,
    },
    Case {
        sink: "{ connector: giftcard, email: dev@example.com, access_token: dev-giftcard-token, base_url: \"{{sandbox}}/giftcard\" }",
        bad_auth: "{ connector: giftcard, email: dev@example.com, access_token: wrong, base_url: \"{{sandbox}}/giftcard\" }",
        vendor: "giftcard",
        deliver: "{ to: s.order, with: { product: AMAZON, value: 25, email: ada@example.com } }",
        refused: "{ to: s.order, with: { product: VISA-PHYSICAL, value: 50, delivery: physical } }",
        reason: "HTTP 400: LineItems[0]: ShippingAddress is required for PhysicalShipment",
        server_error_body: None,
    },
];

/// Runs one event through a daemon whose pipeline delivers `deliver` to sink `s`; returns
/// its (sending) job once settled.
async fn one(sink: &str, deliver: &str, sandbox: &str, i: usize) -> Value {
    let (dir, config) = project(
        &format!("  s: {}\n", sink.replace("{{sandbox}}", sandbox)),
        deliver,
    );
    let d = Daemon::start_in(dir.path(), &config).unwrap();
    let c = client();
    let a = post(&c, &d.url("/hooks/shop"), &order(i)).await;
    assert_eq!(a.status, 200);
    let id = a.json()["id"].as_str().unwrap().to_string();
    let jobs = settled_jobs(&c, &d, &id, 1, Duration::from_secs(40)).await;
    let job = jobs.iter().find(|j| j["kind"] == "send").cloned().unwrap();
    if job["state"] == "dead" {
        let dlq = api(&c, &d, "GET", "/api/dlq", None).await.json();
        assert_eq!(
            dlq["dead_letters"][0]["key"], job["key"],
            "the dead job is in the dead-letter queue"
        );
    }
    job
}

async fn fault(url: &str, f: Value) {
    let r = client()
        .post(format!("{url}/_sandbox/faults"))
        .json(&f)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_sink_handles_success_auth_failure_rate_limits_server_errors_and_refusals() {
    let (sb, url, _stop) = sandbox().await;
    let mut n = 0;
    for case in CASES {
        let v = case.vendor;
        let t0 = Instant::now();
        // Happy path.
        n += 1;
        let j = one(case.sink, case.deliver, &url, n).await;
        assert_eq!(j["state"], "delivered", "{v}: {j:#}");
        // Refused credentials: a dead letter saying so.
        n += 1;
        let j = one(case.bad_auth, case.deliver, &url, n).await;
        assert_eq!(j["state"], "dead", "{v}: {j:#}");
        let reason = j["reason"].as_str().unwrap();
        assert!(
            reason.contains("401") || reason.contains("invalid_auth"),
            "{v}: {reason}"
        );
        // 429 with Retry-After, 429 without, a retryable 5xx: delivered after waiting.
        for (status, retry_after) in [(429, Some(1)), (429, None), (503, None)] {
            let mut f = json!({"vendor": v, "status": [status]});
            if let Some(r) = retry_after {
                f["retry_after"] = json!(r);
            }
            if status >= 500 {
                if let Some(b) = case.server_error_body {
                    f["body"] = serde_json::from_str(b).unwrap();
                }
            }
            fault(&url, f).await;
            n += 1;
            let j = one(case.sink, case.deliver, &url, n).await;
            assert_eq!(j["state"], "delivered", "{v} after {status}: {j:#}");
            let log = j["log"].as_array().unwrap();
            // (The gift-card API's first call of a fresh daemon mints its token: the fault
            // meets that call, named in the reason.)
            let met = log[0]["status"] == status
                || log[0]["reason"]
                    .as_str()
                    .is_some_and(|r| r.contains(&format!("token: HTTP {status}")));
            assert!(met, "{v}: the first attempt met the fault: {log:?}");
        }
        // A permanent error: dead, with the vendor's reason.
        n += 1;
        let j = one(case.sink, case.refused, &url, n).await;
        assert_eq!(j["state"], "dead", "{v}: {j:#}");
        let reason = j["reason"].as_str().unwrap();
        assert_eq!(reason, case.reason, "{v}");
        eprintln!("{v}: 6 scenarios in {:?}", t0.elapsed());
    }
    assert!(sb.received().len() > CASES.len() * 6);
}

/// The sandbox enforces each vendor's documented rate limit (Slack: about one message a
/// second per webhook, short bursts tolerated). A sink configured faster than that gets the
/// vendor's 429 with Retry-After; the engine waits as told and every message arrives once,
/// the 429s costing no attempt.
#[tokio::test]
async fn a_vendor_rate_limit_is_waited_out_and_nothing_is_lost() {
    let (sb, url, _stop) = sandbox().await;
    let (dir, config) = project(
        &format!("  team: {{ connector: slack, webhook_url: \"{url}/slack/services/T1/B1/x\", rate: 100, concurrency: 4 }}\n"),
        "{ to: team.post, with: { text: \"order {{ event_id }}\" } }",
    );
    let d = Daemon::start_in(dir.path(), &config).unwrap();
    let c = client();
    const N: usize = 34;
    let mut ids = Vec::new();
    for i in 0..N {
        let a = post(&c, &d.url("/hooks/shop"), &order(i)).await;
        assert_eq!(a.status, 200);
        ids.push(a.json()["id"].as_str().unwrap().to_string());
    }
    for id in &ids {
        let j = settled_jobs(&c, &d, id, 1, Duration::from_secs(60)).await;
        assert_eq!(j[0]["state"], "delivered", "{j:#?}");
        assert_eq!(j[0]["attempts"], 1, "a 429 costs no attempt: {j:#?}");
    }
    let got = sb.received();
    let slack: Vec<_> = got.iter().filter(|r| r.vendor == "slack").collect();
    assert!(
        slack.iter().any(|r| r.status == 429),
        "the vendor limit was hit"
    );
    assert_eq!(
        slack.iter().filter(|r| r.status == 200).count(),
        N,
        "each message once"
    );
}

/// `perkflow sandbox` as a process: an injected connection reset (status 0) closes that one
/// connection with no answer and prints no panic; the next request is answered.
#[tokio::test]
async fn an_injected_connection_reset_drops_one_request_quietly() {
    use std::io::{BufRead, BufReader, Read};
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_perkflow"))
        .args(["sandbox", "--listen", "127.0.0.1:0"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    // It prints each request it receives: keep reading.
    std::thread::spawn(move || std::io::copy(&mut out, &mut std::io::sink()));
    let url = line
        .trim()
        .strip_prefix("perkflow sandbox listening on ")
        .unwrap_or_else(|| panic!("{line}"))
        .to_string();
    fault(&url, json!({ "vendor": "slack", "status": [0] })).await;
    let hook = format!("{url}/slack/services/T000/B000/XXXX");
    let c = client();
    let first = c.post(&hook).json(&json!({ "text": "hi" })).send().await;
    assert!(first.is_err(), "the reset request got an answer: {first:?}");
    let second = c
        .post(&hook)
        .json(&json!({ "text": "hi" }))
        .send()
        .await
        .unwrap();
    assert_eq!(second.status().as_u16(), 200);
    child.kill().unwrap();
    child.wait().unwrap();
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(!err.contains("panicked"), "{err}");
}

/// Twilio with an API key (SK… SID and secret as the Basic credentials, the account still
/// in the path), and Klaviyo refusing an event whose profile has no identifier.
#[tokio::test]
async fn twilio_api_keys_work_and_klaviyo_needs_a_profile_identifier() {
    let (_sb, url, _stop) = sandbox().await;
    let key = "{ connector: twilio_sms, account_sid: AC00000000000000000000000000000000, api_key_sid: SK00000000000000000000000000000000, auth_token: dev-twilio-api-key-secret, from: \"+15550100\", base_url: \"{{sandbox}}/twilio\" }";
    let sms = "{ to: s.send_sms, with: { to: \"+14155550134\", body: \"hi\" } }";
    let j = one(key, sms, &url, 1).await;
    assert_eq!(j["state"], "delivered", "{j:#}");
    let wrong = key.replace("dev-twilio-api-key-secret", "wrong");
    let j = one(&wrong, sms, &url, 2).await;
    assert_eq!(j["state"], "dead", "{j:#}");
    let klaviyo =
        "{ connector: klaviyo, api_key: pk_dev_klaviyo, base_url: \"{{sandbox}}/klaviyo\" }";
    let j = one(
        klaviyo,
        "{ to: s.track_event, with: { metric: Points Earned } }",
        &url,
        3,
    )
    .await;
    assert_eq!(j["state"], "dead", "{j:#}");
    assert!(
        j["reason"]
            .as_str()
            .unwrap()
            .contains("needs an id, email, phone_number or external_id"),
        "{j:#}"
    );
}
