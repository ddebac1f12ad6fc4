//! `lookup` steps in the daemon, against the vendor sandbox's QuickBooks API: the shipped
//! QuickBooks pipeline reads the payment, the invoice it paid and the customer before
//! e-mailing; a lookup that
//! fails for now defers the run (tried again, nothing lost); one that fails for good fails
//! the run visibly, with no job.

use crate::delivery::{api, settled_jobs, TOKEN};
use crate::helpers::*;
use std::time::{Duration, Instant};

fn project(sandbox: &str) -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("pipelines")).unwrap();
    std::fs::copy(
        repo("pipelines/quickbooks-invoice-paid.yaml"),
        dir.path().join("pipelines/qbo.yaml"),
    )
    .unwrap();
    let config = format!(
        "admin_token: {TOKEN}\npii_fields: [PrimaryEmailAddr, GivenName]\nsources:\n  qbo: {{ connector: quickbooks, secret: s }}\nsinks:\n  accounting: {{ connector: quickbooks, access_token: dev-qbo-access-token, base_url: \"{sandbox}/quickbooks\" }}\n  email: {{ connector: sendgrid, api_key: SG.dev-key, from: rewards@example.com, base_url: \"{sandbox}/sendgrid\" }}\n"
    );
    (dir, config)
}

/// A signed CloudEvents batch of one `qbo.payment.created.v1` for payment `entity`.
fn payment(id: &str, entity: &str) -> Signed {
    let body = format!(
        r#"[{{"specversion":"1.0","id":"{id}","source":"intuit.test","type":"qbo.payment.created.v1","datacontenttype":"application/json","time":"2026-11-20T10:15:28.614Z","intuitentityid":"{entity}","intuitaccountid":"9341453172471531","data":{{}}}}]"#
    );
    sign_body(
        "quickbooks",
        body.into_bytes(),
        vec![("Content-Type".into(), "application/json".into())],
        &keys(&["s"]),
        "",
        0,
    )
}

#[tokio::test]
async fn lookups_read_the_entities_a_failing_one_defers_the_run_and_a_missing_one_fails_it() {
    let (sb, url, _stop) = sandbox().await;
    let (dir, config) = project(&url);
    let d = Daemon::start_in(dir.path(), &config).unwrap();
    let c = client();

    // The first read of the payment gets a 503: the run is deferred and tried again.
    let r = c
        .post(format!("{url}/_sandbox/faults"))
        .json(&serde_json::json!({"vendor": "quickbooks", "status": [503]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let a = post(&c, &d.url("/hooks/qbo"), &payment("ce-1", "118743")).await;
    assert_eq!(a.status, 200, "{}", a.body);
    let id = a.json()["id"].as_str().unwrap().to_string();
    let jobs = settled_jobs(&c, &d, &id, 1, Duration::from_secs(30)).await;
    assert_eq!(jobs.len(), 1, "{jobs:#?}");
    assert_eq!(jobs[0]["state"], "delivered", "{:#}", jobs[0]);
    // What the lookup read about the customer is personal data (`pii_fields` names it):
    // masked in what people see, sent as is.
    assert_eq!(jobs[0]["with"]["to"], "[redacted]", "{:#}", jobs[0]);
    let sent = sb
        .received()
        .into_iter()
        .find(|r| r.vendor == "sendgrid")
        .expect("the e-mail was sent");
    assert_eq!(
        sent.body["personalizations"][0]["to"][0]["email"],
        "dana@harborstreetbakery.example"
    );
    let shown = api(&c, &d, "GET", &format!("/api/events/{id}"), None)
        .await
        .body;
    assert!(
        !shown.contains("dana@harborstreetbakery.example") && !shown.contains("\"Dana\""),
        "{shown}"
    );
    assert_eq!(jobs[0]["with"]["subject"], "You earned 250 points");

    let got = sb.received();
    let qbo: Vec<(String, u16)> = got
        .iter()
        .filter(|r| r.vendor == "quickbooks")
        .map(|r| (r.path.clone(), r.status))
        .collect();
    let path = |e: &str| format!("/v3/company/9341453172471531/{e}");
    assert_eq!(
        qbo,
        [
            (path("payment/118743"), 503),
            (path("payment/118743"), 200),
            (path("invoice/240611"), 200),
            (path("customer/58"), 200)
        ],
        "one deferred try, then the three reads"
    );
    let ev = api(&c, &d, "GET", &format!("/api/events/{id}"), None)
        .await
        .json();
    let run = &ev["trace"][0];
    assert_eq!(run["outcome"]["outcome"], "completed", "{ev:#}");
    assert_eq!(run["vars"]["points"], 250, "{ev:#}");

    // A payment QuickBooks does not have: the run fails for good, visibly, with no job.
    let a = post(&c, &d.url("/hooks/qbo"), &payment("ce-2", "999")).await;
    assert_eq!(a.status, 200, "{}", a.body);
    let missing = a.json()["id"].as_str().unwrap().to_string();
    let deadline = Instant::now() + Duration::from_secs(20);
    let ev = loop {
        let ev = api(&c, &d, "GET", &format!("/api/events/{missing}"), None)
            .await
            .json();
        if !ev["trace"].is_null() {
            break ev;
        }
        assert!(Instant::now() < deadline, "no trace: {ev:#}\n{}", d.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let run = &ev["trace"][0];
    assert_eq!(run["outcome"]["outcome"], "failed", "{ev:#}");
    let error = run["outcome"]["error"].as_str().unwrap();
    assert!(
        error.starts_with("pipeline `quickbooks-invoice-paid`, steps[0].lookup: lookup `accounting.payment`: HTTP 400")
            && error.contains("Object Not Found"),
        "{error}"
    );
    assert_eq!(ev["jobs"], serde_json::json!([]), "{ev:#}");
    assert!(
        !d.log().contains("dev-qbo-access-token"),
        "the token is never logged"
    );
}

/// Lookups count against their sink's rate like deliveries: six payments (eighteen reads)
/// through a QuickBooks sink limited to 4 requests a second take at least two seconds (the
/// connector's burst of ten, then four a second), where unlimited they take milliseconds.
#[tokio::test]
async fn lookups_go_through_the_sinks_rate_limit() {
    let (sb, url, _stop) = sandbox().await;
    let (dir, config) = project(&url);
    let config = config.replace(
        "accounting: { connector: quickbooks,",
        "accounting: { connector: quickbooks, rate: 4/s,",
    );
    assert!(config.contains("rate: 4/s"));
    let d = Daemon::start_in(dir.path(), &config).unwrap();
    let c = client();
    let t0 = Instant::now();
    for i in 0..6 {
        let a = post(
            &c,
            &d.url("/hooks/qbo"),
            &payment(&format!("rl-{i}"), "118743"),
        )
        .await;
        assert_eq!(a.status, 200, "{}", a.body);
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let reads = sb
            .received()
            .iter()
            .filter(|r| r.vendor == "quickbooks")
            .count();
        if reads >= 18 {
            break;
        }
        assert!(Instant::now() < deadline, "{reads} reads\n{}", d.log());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_millis(1900),
        "eighteen reads at 4/s after a burst of ten took only {took:?}"
    );
    assert!(sb
        .received()
        .iter()
        .filter(|r| r.vendor == "quickbooks")
        .all(|r| r.status == 200));
}

/// Square sends a payment's COMPLETED state twice (payment.updated, payment.created): the
/// Square Loyalty accrual and the SMS happen once. The first event's run is deferred by a
/// failing lookup after its ledger accrual; tried again, it still delivers both.
#[tokio::test]
async fn a_square_payment_earns_once_however_many_events_and_retries() {
    let (sb, url, _stop) = sandbox().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("pipelines")).unwrap();
    std::fs::copy(
        repo("pipelines/square-payment-points.yaml"),
        dir.path().join("pipelines/square.yaml"),
    )
    .unwrap();
    let config = format!(
        "admin_token: {TOKEN}\nsources:\n  square: {{ connector: square, secret: k, url: \"https://hooks.example.com/hooks/square\" }}\nsinks:\n  sms: {{ connector: twilio_sms, account_sid: AC00000000000000000000000000000000, auth_token: dev-twilio-token, from: \"+15550100\", base_url: \"{url}/twilio\" }}\n  loyalty: {{ connector: square_loyalty, access_token: dev-square-token, location_id: LH2T8V5N1QZRA, base_url: \"{url}/square\" }}\n"
    );
    let d = Daemon::start_in(dir.path(), &config).unwrap();
    let c = client();
    let event = |event_id: &str, ty: &str| {
        let body = std::fs::read_to_string(repo("fixtures/square/payment-updated.json"))
            .unwrap()
            .replacen("6a1c2f9e-3b8d-4f57-a0e4-7c2d9b5e1f38", event_id, 1)
            .replacen(
                "\"type\":\"payment.updated\"",
                &format!("\"type\":\"{ty}\""),
                1,
            );
        sign_body(
            "square",
            body.into_bytes(),
            vec![("Content-Type".into(), "application/json".into())],
            &keys(&["k"]),
            "https://hooks.example.com/hooks/square",
            0,
        )
    };
    // The customer read fails for now: the run is deferred after the ledger accrual.
    let r = c
        .post(format!("{url}/_sandbox/faults"))
        .json(&serde_json::json!({"vendor": "square", "status": [503]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let first = stored_id(
        &c,
        &d.url("/hooks/square"),
        &event("ev-updated", "payment.updated"),
    )
    .await;
    let jobs = settled_jobs(&c, &d, &first, 2, Duration::from_secs(60)).await;
    assert!(jobs.iter().all(|j| j["state"] == "delivered"), "{jobs:#?}");
    // The same payment again, as another event: no second accrual, no second SMS.
    let second = stored_id(
        &c,
        &d.url("/hooks/square"),
        &event("ev-created", "payment.created"),
    )
    .await;
    let ev = processed(&c, &d, TOKEN, &second, Duration::from_secs(30)).await;
    assert_eq!(ev["jobs"], serde_json::json!([]), "{ev:#}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let got = sb.received();
    let count = |path: &str| got.iter().filter(|r| r.path.ends_with(path)).count();
    assert_eq!(count("/accumulate"), 1, "{got:#?}");
    assert_eq!(count("/Messages.json"), 1, "{got:#?}");
}
