//! Refunds beyond points, with the daemon as a real process: a refunded order's unused promo
//! code is voided and the gift card its points triggered, not sent yet, is cancelled; the
//! reports count it all (JSON, CSV, and the CLI's CSV export); a booking API's promo code is
//! kept on the member and e-mailed.

use crate::delivery::{api, order, settled_jobs, TOKEN};
use crate::helpers::*;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

const REPORTS_KEY: &str = "finance-key-0123456789abcdef";

fn project(names: &[&str], extra: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("pipelines")).unwrap();
    for p in names {
        let text = std::fs::read_to_string(repo(&format!("pipelines/{p}.yaml")))
            .unwrap()
            .replace("source: shop-main", "source: shop");
        std::fs::write(dir.path().join(format!("pipelines/{p}.yaml")), text).unwrap();
    }
    for (name, text) in extra {
        std::fs::write(dir.path().join(format!("pipelines/{name}.yaml")), text).unwrap();
    }
    dir
}

fn sinks(url: &str) -> String {
    format!(
        "  sms: {{ connector: twilio_sms, account_sid: AC00000000000000000000000000000000, auth_token: dev-twilio-token, from: \"+15550100\", base_url: \"{url}/twilio\" }}\n  email: {{ connector: sendgrid, api_key: SG.dev-key, from: rewards@example.com, base_url: \"{url}/sendgrid\" }}\n  rewards: {{ connector: giftcard, email: dev@example.com, access_token: dev-giftcard-token, base_url: \"{url}/giftcard\" }}\n  bookings: {{ connector: bookings, api_url: \"{url}/bookings\", api_key: dev-bookings-key }}\n"
    )
}

async fn jobs(c: &reqwest::Client, d: &Daemon) -> Vec<Value> {
    api(c, d, "GET", "/api/jobs?limit=1000", None).await.json()["jobs"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

#[tokio::test]
async fn a_refund_voids_the_orders_unused_code_and_cancels_its_unsent_gift_card() {
    let (sb, url, _stop) = sandbox().await;
    let card = "pipeline: card\non: { source: loyalty, events: [loyalty.threshold_crossed] }\nsteps:\n  - deliver: { to: rewards.order, with: { product: CVS, value: 10, delivery: email, email: \"{{ event.member }}\" } }\n";
    let dir = project(
        &["shopify-order-points", "shopify-refund-points"],
        &[("card", card)],
    );
    let config = format!(
        "admin_token: {TOKEN}\napi_keys:\n  finance: {{ key: {REPORTS_KEY}, scopes: [reports:read] }}\nloyalty:\n  tiers: [{{ name: Bronze, from: 0 }}, {{ name: Silver, from: 1000 }}]\n  thresholds: [1000]\npromo_codes:\n  next_order: {{ prefix: THANKS-, length: 10 }}\nsources:\n  shop: {{ connector: shopify, secret: s }}\nsinks:\n{}",
        sinks(&url)
    );
    // The gift-card vendor is down for now: the card's job waits, unsent.
    let faults = client()
        .post(format!("{url}/_sandbox/faults"))
        .json(&json!({ "vendor": "giftcard", "status": vec![503; 200], "retry_after": 10 }))
        .send()
        .await
        .unwrap();
    assert!(faults.status().is_success());
    let d = Daemon::start_in(dir.path(), &config).unwrap();
    let c = client();
    let paid = stored_id(&c, &d.url("/hooks/shop"), &order(1)).await;
    let order_jobs = settled_jobs(&c, &d, &paid, 2, Duration::from_secs(20)).await;
    let thanks = order_jobs
        .iter()
        .find(|j| j["sink"] == "email")
        .expect("the thank-you e-mail");
    let text = thanks["with"]["text"].as_str().unwrap();
    let code = text
        .split_whitespace()
        .find(|w| w.starts_with("THANKS-"))
        .expect("a code in the e-mail")
        .to_string();
    let shown = api(&c, &d, "GET", &format!("/api/codes/{code}"), None)
        .await
        .json();
    assert_eq!(shown["state"], "assigned", "{shown:#}");
    // The accrual's result, for later steps, carries the new balance and tier.
    let ev = api(&c, &d, "GET", &format!("/api/events/{paid}"), None)
        .await
        .json();
    let accrual = ev["trace"][0]["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["step"].as_str().unwrap().ends_with("loyalty.accrue"))
        .cloned()
        .unwrap();
    assert_eq!(accrual["detail"]["balance"], 1255, "{accrual:#}");
    assert_eq!(accrual["detail"]["tier"], "Silver", "{accrual:#}");
    assert_eq!(shown["order"], "shop:key:order-6012345678901");

    // The threshold's gift card: tried, refused for now, waiting.
    let deadline = Instant::now() + Duration::from_secs(20);
    let card_job = loop {
        if let Some(j) = jobs(&c, &d).await.into_iter().find(|j| {
            j["sink"] == "rewards" && j["state"] == "pending" && j["attempts"].as_u64() >= Some(1)
        }) {
            break j;
        }
        assert!(
            Instant::now() < deadline,
            "no gift-card attempt\n{}",
            d.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(card_job["state"], "pending", "{card_job:#}");
    assert_eq!(card_job["uncertain"], false, "{card_job:#}");

    let refund = sign_fixture(
        "shopify",
        "shopify/refunds-create.json",
        &keys(&["s"]),
        "",
        0,
    );
    let refunded = stored_id(&c, &d.url("/hooks/shop"), &refund).await;
    settled_jobs(&c, &d, &refunded, 1, Duration::from_secs(20)).await;
    let shown = api(&c, &d, "GET", &format!("/api/codes/{code}"), None)
        .await
        .json();
    assert_eq!(shown["state"], "void", "{shown:#}");
    let redeem = send(
        c.post(d.url(&format!("/api/codes/{code}/redeem")))
            .bearer_auth(TOKEN),
    )
    .await;
    assert_eq!(redeem.status, 410, "a voided code is gone: {}", redeem.body);
    let after = api(
        &c,
        &d,
        "GET",
        &format!("/api/jobs/{}", card_job["key"].as_str().unwrap()),
        None,
    )
    .await
    .json();
    assert_eq!(after["state"], "cancelled", "{after:#}");
    assert!(
        after["reason"].as_str().unwrap().contains("refund"),
        "{after:#}"
    );
    let ev = api(&c, &d, "GET", &format!("/api/events/{refunded}"), None)
        .await
        .json();
    let run = ev["trace"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["pipeline"] == "shopify-refund-points")
        .unwrap()
        .clone();
    let step = run["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["step"].as_str().unwrap().ends_with("loyalty.reverse"))
        .unwrap()
        .clone();
    assert_eq!(step["detail"]["voided_codes"], json!([code]), "{step:#}");
    assert_eq!(
        step["detail"]["cancelled"],
        json!([card_job["key"]]),
        "{step:#}"
    );
    // The vendor back, nothing goes out for the cancelled card.
    client()
        .post(format!("{url}/_sandbox/reset"))
        .send()
        .await
        .unwrap();
    // A card still waiting would be retried within 10 s now (its Retry-After).
    tokio::time::sleep(Duration::from_secs(12)).await;
    assert_eq!(
        api(
            &c,
            &d,
            "GET",
            &format!("/api/jobs/{}", card_job["key"].as_str().unwrap()),
            None
        )
        .await
        .json()["state"],
        "cancelled"
    );
    assert!(
        !sb.received()
            .iter()
            .any(|r| r.vendor == "giftcard" && r.path == "/v1/Orders" && r.status < 300),
        "no card ordered"
    );

    // Reports: the points issued and reversed, the card cancelled; JSON with the app's key.
    let points = send(
        c.get(d.url("/api/reports/points?period=month"))
            .bearer_auth(REPORTS_KEY),
    )
    .await;
    assert_eq!(points.status, 200, "{}", points.body);
    let rows = points.json()["rows"].as_array().cloned().unwrap();
    let row = |kind: &str| {
        rows.iter()
            .find(|r| r["source"] == "shop" && r["kind"] == kind)
            .cloned()
            .unwrap_or_else(|| panic!("no {kind} row: {rows:#?}"))
    };
    assert_eq!(row("issued")["points"], 1255);
    assert_eq!(row("reversed")["points"], 1255);
    let rewards = send(
        c.get(d.url("/api/reports/rewards"))
            .bearer_auth(REPORTS_KEY),
    )
    .await
    .json();
    let rows = rewards["rows"].as_array().cloned().unwrap();
    assert!(
        rows.iter()
            .any(|r| r["sink"] == "rewards" && r["state"] == "cancelled" && r["count"] == 1),
        "{rows:#?}"
    );
    // The key cannot do more than read reports; bad input is a clear 400.
    let denied = send(
        c.get(d.url("/api/members/ada@example.com"))
            .bearer_auth(REPORTS_KEY),
    )
    .await;
    assert_eq!(denied.status, 403);
    let bad = send(
        c.get(d.url("/api/reports/points?period=year"))
            .bearer_auth(REPORTS_KEY),
    )
    .await;
    assert_eq!(bad.status, 400);
    assert!(bad.body.contains("day, week or month"), "{}", bad.body);
    // CSV, from the API and from the CLI.
    let csv = send(
        c.get(d.url("/api/reports/points?format=csv"))
            .bearer_auth(REPORTS_KEY),
    )
    .await;
    assert!(
        csv.body.starts_with("period,source,kind,points,entries\n"),
        "{}",
        csv.body
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_perkflow"))
        .args(["reports", "points", "--format", "csv", "-c"])
        .arg(dir.path().join("perkflow.yaml"))
        .args(["--url", &d.base, "--token", TOKEN])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(stdout, csv.body, "the CLI exports what the API answers");
}

#[tokio::test]
async fn a_booking_apis_promo_code_is_kept_on_the_member_and_emailed() {
    let (sb, url, _stop) = sandbox().await;
    let book = "pipeline: book\non: { source: shop, events: [orders/paid] }\nsteps:\n  - deliver:\n      to: bookings.create_booking\n      with: { email: \"{{ event.email }}\", external_id: \"{{ event.email }}\", first_name: \"{{ event.customer.first_name }}\" }\n      keep: { member: \"{{ event.email }}\", as: promo_code, from: /data/promo_code }\n";
    let dir = project(&["loyalty-promo-code-email"], &[("book", book)]);
    let config = format!(
        "admin_token: {TOKEN}\nsources:\n  shop: {{ connector: shopify, secret: s }}\nsinks:\n{}",
        sinks(&url)
    );
    let d = Daemon::start_in(dir.path(), &config).unwrap();
    let c = client();
    // The member exists with an e-mail address (the e-mail pipeline needs it).
    let a = api(
        &c,
        &d,
        "PUT",
        "/api/members/ada@example.com/profile",
        Some(json!({ "email": "ada@example.com" })),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.body);
    let paid = stored_id(&c, &d.url("/hooks/shop"), &order(1)).await;
    settled_jobs(&c, &d, &paid, 1, Duration::from_secs(20)).await;
    let booked: Vec<_> = sb
        .received()
        .into_iter()
        .filter(|r| r.vendor == "bookings" && r.status == 201)
        .collect();
    assert_eq!(booked.len(), 1);
    assert_eq!(booked[0].body["external_id"], "ada@example.com");
    assert_eq!(
        booked[0].body["package_specifications"],
        json!([{ "size": "1GB" }])
    );
    let code = booked[0].summary.rsplit(' ').next().unwrap().to_string();
    assert!(code.starts_with("PROMO-"), "{}", booked[0].summary);
    let m = api(&c, &d, "GET", "/api/members/ada@example.com", None)
        .await
        .json();
    assert_eq!(
        m["profile"]["attributes"]["promo_code"],
        code.as_str(),
        "{m:#}"
    );
    // Stored, it is e-mailed (loyalty.attribute_stored -> loyalty-promo-code-email).
    let deadline = Instant::now() + Duration::from_secs(20);
    let mail = loop {
        if let Some(r) = sb.received().into_iter().find(|r| r.vendor == "sendgrid") {
            break r;
        }
        assert!(Instant::now() < deadline, "no e-mail\n{}", d.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(mail.body.to_string().contains(&code), "{:#}", mail.body);
    // Re-delivered, the webhook books nothing more.
    assert_eq!(
        post(&c, &d.url("/hooks/shop"), &order(1)).await.json()["duplicate"],
        true
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let bookings = sb
        .received()
        .iter()
        .filter(|r| r.vendor == "bookings")
        .count();
    assert_eq!(bookings, 1);
}
