//! The points ledger with the daemon as a real process: a paid order accrues once however
//! often it is re-delivered or replayed; the member API shows the balance and history, and
//! 1,000 concurrent redeems never overspend; API keys are scoped.

use crate::delivery::{api, order, settled_jobs, TOKEN};
use crate::helpers::*;
use serde_json::json;
use std::time::Duration;

const READ_KEY: &str = "portal-key-0123456789abcdef";
const CHECKOUT_KEY: &str = "checkout-key-0123456789abcdef";

fn project(sandbox: &str) -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("pipelines")).unwrap();
    std::fs::write(
        dir.path().join("pipelines/points.yaml"),
        "pipeline: points\non: { source: shop, events: [orders/paid] }\nsteps:\n  - set: { points: \"{{ (event.total_price | money(event.currency)).minor * 10 // 100 }}\" }\n  - loyalty.accrue: { member: \"{{ event.email }}\", points: \"{{ points }}\", reason: \"order {{ event.name }}\" }\n  - deliver: { to: team.post, when: \"balance >= 1000\", with: { text: \"{{ event.email }} has {{ balance }} points\" } }\n",
    )
    .unwrap();
    let config = format!(
        "admin_token: {TOKEN}\napi_keys:\n  portal: {{ key: {READ_KEY}, scopes: [members:read] }}\n  checkout: {{ key: {CHECKOUT_KEY}, scopes: [members:read, members:redeem] }}\nsources:\n  shop: {{ connector: shopify, secret: s }}\nsinks:\n  team: {{ connector: webhook, url: \"{sandbox}/webhook/x\" }}\n"
    );
    (dir, config)
}

/// A project dir holding the shipped pipelines `names`, their `source: shop-main` renamed to
/// `source: shop` (the tests' source name).
fn shipped(names: &[&str]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("pipelines")).unwrap();
    for p in names {
        let text = std::fs::read_to_string(repo(&format!("pipelines/{p}.yaml")))
            .unwrap()
            .replace("source: shop-main", "source: shop");
        std::fs::write(dir.path().join(format!("pipelines/{p}.yaml")), text).unwrap();
    }
    dir
}

#[tokio::test]
async fn points_accrue_once_and_concurrent_redeems_never_overspend() {
    let (_sb, url, _stop) = sandbox().await;
    let (dir, config) = project(&url);
    let d = Daemon::start_in(dir.path(), &config).unwrap();
    let c = client();
    let id = stored_id(&c, &d.url("/hooks/shop"), &order(1)).await;
    let member_url = d.url("/api/members/ada@example.com");
    let member = |key: &'static str| {
        let (c, url) = (c.clone(), member_url.clone());
        async move { send(c.get(url).bearer_auth(key)).await }
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let a = member(READ_KEY).await;
        if a.status == 200 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{} {}",
            a.status,
            a.body
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let m = member(READ_KEY).await.json();
    assert_eq!(m["balance"], 1255, "{m:#}");
    assert_eq!(m["lifetime"], 1255);
    assert_eq!(m["history"][0]["reason"], "order #1042");
    assert_eq!(m["history"][0]["kind"], "accrue");
    // Later steps saw the new balance. The ledger entry is visible as soon as the accrual
    // step commits it; the run's jobs are written when the whole run commits, so wait for them.
    let jobs = settled_jobs(&c, &d, &id, 1, Duration::from_secs(20)).await;
    assert_eq!(
        jobs[0]["with"]["text"], "ada@example.com has 1255 points",
        "{jobs:#?}"
    );

    // Re-delivered, then replayed (once its job settled: a replay refuses a job in flight):
    // never a second accrual.
    assert_eq!(
        post(&c, &d.url("/hooks/shop"), &order(1)).await.json()["duplicate"],
        true
    );
    let r = api(
        &c,
        &d,
        "POST",
        &format!("/api/events/{id}/replay"),
        Some(json!({"confirm": true, "resend_delivered": true})),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    settled_jobs(&c, &d, &id, 1, Duration::from_secs(20)).await;
    let m = member(READ_KEY).await.json();
    assert_eq!(
        (m["balance"].as_i64(), m["entries"].as_i64()),
        (Some(1255), Some(1)),
        "{m:#}"
    );

    // 1,000 concurrent redeems of 5 points: exactly 251 accepted, the balance never below 0.
    let mut set = tokio::task::JoinSet::new();
    for i in 0..1000 {
        let (c, url) = (c.clone(), d.url("/api/members/ada@example.com/redeem"));
        set.spawn(async move {
            send(
                c.post(url)
                    .bearer_auth(CHECKOUT_KEY)
                    .json(&json!({"points": 5, "idempotency_key": format!("cart-{i}")})),
            )
            .await
        });
    }
    let (mut ok, mut refused) = (0, 0);
    while let Some(a) = set.join_next().await {
        let a = a.unwrap();
        match a.status {
            200 => {
                ok += 1;
                assert!(a.json()["balance"].as_i64().unwrap() >= 0);
            }
            409 => {
                refused += 1;
                assert!(a.json()["error"]
                    .as_str()
                    .unwrap()
                    .starts_with("insufficient points"));
            }
            other => panic!("{other}: {}", a.body),
        }
    }
    assert_eq!((ok, refused), (251, 749));
    let m = member(READ_KEY).await.json();
    assert_eq!(m["balance"], 0, "{m:#}");
    assert_eq!(m["entries"], 252, "every accepted redeem recorded once");
    // A checkout retrying the same redeem gets the first answer, nothing more is spent.
    let again = send(
        c.post(d.url("/api/members/ada@example.com/redeem"))
            .bearer_auth(CHECKOUT_KEY)
            .json(&json!({"points": 5, "idempotency_key": "cart-7"})),
    )
    .await;
    assert!(matches!(again.status, 200 | 409), "{}", again.body);
    if again.status == 200 {
        assert_eq!(again.json()["duplicate"], true);
    }
    assert_eq!(member(READ_KEY).await.json()["entries"], 252);

    // Scopes: the portal may read, not redeem; unknown keys get nothing; the admin token may
    // adjust.
    let a = send(
        c.post(d.url("/api/members/ada@example.com/redeem"))
            .bearer_auth(READ_KEY)
            .json(&json!({"points": 1, "idempotency_key": "x"})),
    )
    .await;
    assert_eq!(a.status, 403, "{}", a.body);
    assert_eq!(member("not-a-key-0123456789").await.status, 401);
    let a = send(
        c.post(d.url("/api/members/ada@example.com/adjust"))
            .bearer_auth(CHECKOUT_KEY)
            .json(&json!({"points": 10, "idempotency_key": "goodwill-1"})),
    )
    .await;
    assert_eq!(a.status, 403, "{}", a.body);
    let a = send(
        c.post(d.url("/api/members/ada@example.com/adjust"))
            .bearer_auth(TOKEN)
            .json(&json!({"points": 10, "idempotency_key": "goodwill-1", "reason": "goodwill"})),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(a.json()["balance"], 10);
    // Bad input: a clear 4xx, nothing stored.
    let a = send(
        c.post(d.url("/api/members/ada@example.com/redeem"))
            .bearer_auth(CHECKOUT_KEY)
            .json(&json!({"points": -5, "idempotency_key": "neg"})),
    )
    .await;
    assert_eq!(a.status, 422, "{}", a.body);
    let a = send(
        c.post(d.url("/api/members/ada@example.com/redeem"))
            .bearer_auth(CHECKOUT_KEY)
            .header("content-type", "application/json")
            .body("{\"points\": \"lots\"}"),
    )
    .await;
    assert_eq!(a.status, 400, "{}", a.body);
    // An empty idempotency key, and more points than one operation may move.
    for (body, why) in [
        (
            json!({"points": 1, "idempotency_key": ""}),
            "idempotency_key is 1 to 200",
        ),
        (
            json!({"points": 1, "idempotency_key": "k".repeat(201)}),
            "idempotency_key is 1 to 200",
        ),
    ] {
        let a = send(
            c.post(d.url("/api/members/ada@example.com/redeem"))
                .bearer_auth(CHECKOUT_KEY)
                .json(&body),
        )
        .await;
        assert_eq!(a.status, 422, "{}", a.body);
        assert!(a.body.contains(why), "{}", a.body);
    }
    let a = send(
        c.post(d.url("/api/members/ada@example.com/adjust"))
            .bearer_auth(TOKEN)
            .json(&json!({"points": i64::MAX, "idempotency_key": "huge"})),
    )
    .await;
    assert_eq!(a.status, 422, "{}", a.body);
    assert!(
        a.body.contains("points are at most 1000000000000"),
        "{}",
        a.body
    );
    assert_eq!(member(READ_KEY).await.json()["entries"], 253);
    assert_eq!(
        send(c.get(d.url("/api/members/nobody")).bearer_auth(READ_KEY))
            .await
            .status,
        404
    );
}

/// WooCommerce sends every edit of a completed order as a new event: the shipped pipeline's
/// accrual is keyed on the order, so the order earns once and is e-mailed once.
#[tokio::test]
async fn a_woocommerce_order_edited_after_completion_earns_once_and_a_refund_takes_it_back() {
    let (sb, url, _stop) = sandbox().await;
    let dir = shipped(&["woocommerce-order-points", "woocommerce-refund-points"]);
    let config = format!(
        "admin_token: {TOKEN}\nsources:\n  woo: {{ connector: woocommerce, secret: w }}\nsinks:\n  email: {{ connector: sendgrid, api_key: SG.dev-key, from: rewards@example.com, base_url: \"{url}/sendgrid\" }}\n  rewards: {{ connector: giftcard, email: dev@example.com, access_token: dev-giftcard-token, base_url: \"{url}/giftcard\" }}\n"
    );
    let d = Daemon::start_in(dir.path(), &config).unwrap();
    let c = client();
    let (body, headers) =
        perkflow::sign::read_fixture(&repo("fixtures/woocommerce/order-updated-completed.json"))
            .unwrap();
    let mut ids = Vec::new();
    for edit in ["2026-11-20T10:15:30", "2026-11-21T08:00:00"] {
        let mut order: serde_json::Value = serde_json::from_slice(&body).unwrap();
        order["date_modified_gmt"] = json!(edit);
        let req = sign_body(
            "woocommerce",
            serde_json::to_vec(&order).unwrap(),
            headers.clone(),
            &keys(&["w"]),
            "",
            0,
        );
        let a = post(&c, &d.url("/hooks/woo"), &req).await;
        assert_eq!(a.status, 200, "{}", a.body);
        assert_eq!(a.json()["duplicate"], false, "each edit is a new event");
        ids.push(a.json()["id"].as_str().unwrap().to_string());
    }
    settled_jobs(&c, &d, &ids[0], 1, Duration::from_secs(20)).await;
    // The second event's run completed too, with the accrual seen as a duplicate.
    let ev = processed(&c, &d, TOKEN, &ids[1], Duration::from_secs(20)).await;
    assert_eq!(
        ev["trace"][0]["vars"]["loyalty"]["duplicate"], true,
        "{ev:#}"
    );
    assert_eq!(ev["jobs"], json!([]), "no second e-mail: {ev:#}");
    let m = api(&c, &d, "GET", "/api/members/zoe@example.com", None)
        .await
        .json();
    assert_eq!(
        (m["balance"].as_i64(), m["entries"].as_i64()),
        (Some(89), Some(1)),
        "{m:#}"
    );
    let emails = sb
        .received()
        .iter()
        .filter(|r| r.vendor == "sendgrid")
        .count();
    assert_eq!(emails, 1);

    // Then refunded: the order's points are taken back, once.
    let refunded = sign_fixture(
        "woocommerce",
        "woocommerce/order-updated-refunded.json",
        &keys(&["w"]),
        "",
        0,
    );
    let id = stored_id(&c, &d.url("/hooks/woo"), &refunded).await;
    let jobs = settled_jobs(&c, &d, &id, 1, Duration::from_secs(20)).await;
    assert_eq!(
        jobs[0]["with"]["text"],
        "Order #4821 was refunded: 89 points were taken back. Your balance is 0 points."
    );
    let m = api(&c, &d, "GET", "/api/members/zoe@example.com", None)
        .await
        .json();
    assert_eq!(
        (m["balance"].as_i64(), m["lifetime"].as_i64()),
        (Some(0), Some(0)),
        "{m:#}"
    );
}

/// A refund reverses exactly what its order earned, once: the shipped order and refund
/// pipelines, a re-delivered refund, and a second refund of the same order (refused, visibly).
#[tokio::test]
async fn a_refund_reverses_exactly_what_its_order_earned() {
    let (sb, url, _stop) = sandbox().await;
    let dir = shipped(&["shopify-order-points", "shopify-refund-points"]);
    let config = format!(
        "admin_token: {TOKEN}\npromo_codes:\n  next_order: {{ prefix: THANKS-, length: 10 }}\nsources:\n  shop: {{ connector: shopify, secret: s }}\nsinks:\n  sms: {{ connector: twilio_sms, account_sid: AC00000000000000000000000000000000, auth_token: dev-twilio-token, from: \"+15550100\", base_url: \"{url}/twilio\" }}\n  email: {{ connector: sendgrid, api_key: SG.dev-key, from: rewards@example.com, base_url: \"{url}/sendgrid\" }}\n  rewards: {{ connector: giftcard, email: dev@example.com, access_token: dev-giftcard-token, base_url: \"{url}/giftcard\" }}\n"
    );
    let d = Daemon::start_in(dir.path(), &config).unwrap();
    let c = client();
    let paid = stored_id(&c, &d.url("/hooks/shop"), &order(1)).await;
    settled_jobs(&c, &d, &paid, 2, Duration::from_secs(20)).await;
    let balance = |c: reqwest::Client, url: String| async move {
        send(c.get(url).bearer_auth(TOKEN)).await.json()
    };
    let m = balance(c.clone(), d.url("/api/members/ada@example.com")).await;
    assert_eq!(m["balance"], 1255, "{m:#}");

    let refund = sign_fixture(
        "shopify",
        "shopify/refunds-create.json",
        &keys(&["s"]),
        "",
        0,
    );
    let id = stored_id(&c, &d.url("/hooks/shop"), &refund).await;
    let jobs = settled_jobs(&c, &d, &id, 1, Duration::from_secs(20)).await;
    assert_eq!(
        jobs[0]["with"]["text"],
        "Your refund took back 1255 points. Your balance is 0 points."
    );
    let m = balance(c.clone(), d.url("/api/members/ada@example.com")).await;
    assert_eq!(
        (m["balance"].as_i64(), m["lifetime"].as_i64()),
        (Some(0), Some(0)),
        "{m:#}"
    );
    assert_eq!(m["history"][0]["kind"], "reverse");
    assert_eq!(m["history"][0]["points"], -1255);
    // Re-delivered: nothing more.
    assert_eq!(
        post(&c, &d.url("/hooks/shop"), &refund).await.json()["duplicate"],
        true
    );
    // Another refund of the same order: nothing left to take back; the run fails visibly.
    let second = refund.clone().set("X-Shopify-Event-Id", "refund-2");
    let id2 = stored_id(&c, &d.url("/hooks/shop"), &second).await;
    let ev = processed(&c, &d, TOKEN, &id2, Duration::from_secs(20)).await;
    let run = ev["trace"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["pipeline"] == "shopify-refund-points")
        .unwrap();
    assert_eq!(run["outcome"]["outcome"], "failed", "{run:#}");
    assert!(
        run["outcome"]["error"]
            .as_str()
            .unwrap()
            .contains("was reversed in full already"),
        "{run:#}"
    );
    let m = balance(c.clone(), d.url("/api/members/ada@example.com")).await;
    assert_eq!(
        (m["balance"].as_i64(), m["entries"].as_i64()),
        (Some(0), Some(2)),
        "{m:#}"
    );
    let emails = sb
        .received()
        .iter()
        .filter(|r| r.vendor == "sendgrid")
        .count();
    assert_eq!(
        emails, 2,
        "the order's thank-you code, and the one reversal"
    );
}

/// 50 concurrent adjustments of +100 from 0 cross the 1,000 threshold in exactly one entry:
/// one `loyalty.threshold_crossed` event, one pipeline run, one job; repeating the calls
/// (same keys, as after a crash) emits nothing new.
#[tokio::test]
async fn a_threshold_crossed_once_emits_one_event_under_concurrency_and_repeats() {
    let (_sb, url, _stop) = sandbox().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("pipelines")).unwrap();
    std::fs::write(
        dir.path().join("pipelines/threshold.yaml"),
        "pipeline: threshold\non: { source: loyalty, events: [loyalty.threshold_crossed, loyalty.tier_changed] }\nsteps:\n  - deliver: { to: team.post, with: { text: \"{{ type }} {{ event.member }} {{ event.threshold | default(event.to) }}\" } }\n",
    )
    .unwrap();
    let config = format!(
        "admin_token: {TOKEN}\nloyalty:\n  tiers: [{{ name: Bronze, from: 0 }}, {{ name: Silver, from: 2000 }}]\n  thresholds: [1000]\nsources:\n  shop: {{ connector: shopify, secret: s }}\nsinks:\n  team: {{ connector: webhook, url: \"{url}/webhook/x\" }}\n"
    );
    let d = Daemon::start_in(dir.path(), &config).unwrap();
    let c = client();
    let adjust = |i: usize| {
        let (c, url) = (c.clone(), d.url("/api/members/m-7/adjust"));
        async move {
            send(
                c.post(url)
                    .bearer_auth(TOKEN)
                    .json(&json!({"points": 100, "idempotency_key": format!("bonus-{i}")})),
            )
            .await
        }
    };
    for round in 0..2 {
        let mut set = tokio::task::JoinSet::new();
        for i in 0..50 {
            set.spawn(adjust(i));
        }
        while let Some(a) = set.join_next().await {
            let a = a.unwrap();
            assert_eq!(a.status, 200, "{}", a.body);
            assert_eq!(a.json()["duplicate"], round == 1);
        }
    }
    let m = send(c.get(d.url("/api/members/m-7")).bearer_auth(TOKEN))
        .await
        .json();
    // Adjustments are not earnings: the balance moves, lifetime points and the tier do not.
    assert_eq!(
        (
            m["balance"].as_i64(),
            m["lifetime"].as_i64(),
            m["tier"].as_str()
        ),
        (Some(5000), Some(0), Some("Bronze")),
        "{m:#}"
    );
    let crossings: Vec<_> = m["history"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["crossed"] == json!([1000]))
        .collect();
    assert_eq!(crossings.len(), 1, "one entry crossed 1,000: {m:#}");
    // One event for the crossing, run once.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let page = api(&c, &d, "GET", "/api/events?source=loyalty", None)
            .await
            .json();
        let events = page["events"].as_array().unwrap();
        if events.len() == 1 && events[0]["pending"] == false {
            assert_eq!(events[0]["event_type"], "loyalty.threshold_crossed");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{page:#}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let jobs = api(&c, &d, "GET", "/api/jobs", None).await.json();
    let mut texts: Vec<&str> = jobs["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["with"]["text"].as_str().unwrap())
        .collect();
    texts.sort();
    assert_eq!(texts, ["loyalty.threshold_crossed m-7 1000"]);
}

/// Promo codes: the shipped welcome pipeline assigns a unique code once per signup and
/// e-mails it; 50 concurrent redemptions of it succeed exactly once; operators generate codes
/// in bulk; scopes apply.
#[tokio::test]
async fn a_welcome_code_is_issued_once_and_redeemed_exactly_once() {
    let (sb, url, _stop) = sandbox().await;
    let dir = shipped(&["shopify-welcome-code"]);
    let config = format!(
        "admin_token: {TOKEN}\napi_keys:\n  checkout: {{ key: {CHECKOUT_KEY}, scopes: [codes:redeem] }}\n  portal: {{ key: {READ_KEY}, scopes: [members:read] }}\npromo_codes:\n  welcome: {{ prefix: WELCOME-, length: 10, expires_after: 90d }}\nsources:\n  shop: {{ connector: shopify, secret: s }}\nsinks:\n  email: {{ connector: sendgrid, api_key: SG.dev-key, from: rewards@example.com, base_url: \"{url}/sendgrid\" }}\n"
    );
    let d = Daemon::start_in(dir.path(), &config).unwrap();
    let c = client();
    let signup = sign_fixture(
        "shopify",
        "shopify/customers-create.json",
        &keys(&["s"]),
        "",
        0,
    );
    let id = stored_id(&c, &d.url("/hooks/shop"), &signup).await;
    let jobs = settled_jobs(&c, &d, &id, 1, Duration::from_secs(20)).await;
    let text = jobs[0]["with"]["text"].as_str().unwrap().to_string();
    let code = text
        .split_whitespace()
        .find(|w| w.starts_with("WELCOME-"))
        .unwrap()
        .to_string();
    assert_eq!(code.len(), "WELCOME-".len() + 10, "{text}");
    // Replayed: the same code, no second one.
    let r = api(
        &c,
        &d,
        "POST",
        &format!("/api/events/{id}/replay"),
        Some(json!({"confirm": true, "resend_delivered": true})),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(
        r.body.contains(&code),
        "the replay assigns the same code: {}",
        r.body
    );
    // The replayed e-mail goes out (the job was set pending again by the replay).
    settled_jobs(&c, &d, &id, 1, Duration::from_secs(20)).await;
    let shown = send(
        c.get(d.url(&format!("/api/codes/{code}")))
            .bearer_auth(CHECKOUT_KEY),
    )
    .await
    .json();
    assert_eq!(shown["state"], "assigned", "{shown:#}");
    assert_eq!(shown["member"], "sam.walkin@example.com");

    // 50 checkouts at once: one wins.
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..50 {
        let (c, url) = (
            c.clone(),
            d.url(&format!("/api/codes/{}/redeem", code.to_lowercase())),
        );
        set.spawn(async move { send(c.post(url).bearer_auth(CHECKOUT_KEY)).await.status });
    }
    let mut statuses = Vec::new();
    while let Some(s) = set.join_next().await {
        statuses.push(s.unwrap());
    }
    assert_eq!(
        statuses.iter().filter(|s| **s == 200).count(),
        1,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|s| **s == 409).count(),
        49,
        "{statuses:?}"
    );

    // Operators generate in bulk; apps without the scope cannot redeem.
    let g = api(
        &c,
        &d,
        "POST",
        "/api/codes/generate",
        Some(json!({"pool": "welcome", "count": 5})),
    )
    .await;
    assert_eq!(g.status, 200, "{}", g.body);
    let codes: Vec<String> = g.json()["codes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap().to_string())
        .collect();
    assert_eq!(codes.len(), 5);
    let a = send(
        c.post(d.url(&format!("/api/codes/{}/redeem", codes[0])))
            .bearer_auth(READ_KEY),
    )
    .await;
    assert_eq!(a.status, 403, "{}", a.body);
    let a = send(
        c.post(d.url("/api/codes/generate"))
            .bearer_auth(CHECKOUT_KEY)
            .json(&json!({"pool": "welcome", "count": 1})),
    )
    .await;
    assert_eq!(a.status, 403, "{}", a.body);
    assert_eq!(
        send(
            c.post(d.url("/api/codes/WELCOME-NOTACODE00/redeem"))
                .bearer_auth(CHECKOUT_KEY)
        )
        .await
        .status,
        404
    );
    let emails = sb
        .received()
        .iter()
        .filter(|r| r.vendor == "sendgrid")
        .count();
    assert_eq!(emails, 2, "the e-mail, and its replay (resend_delivered)");
}

/// `expire_after`: a member who earns nothing for that long loses the balance, once, by an
/// `expire` entry; lifetime points stay.
#[tokio::test]
async fn inactive_balances_expire() {
    let (_sb, url, _stop) = sandbox().await;
    let (dir, config) = project(&url);
    let config = format!("loyalty: {{ expire_after: 2s }}\n{config}");
    let d = Daemon::start_in(dir.path(), &config).unwrap();
    let c = client();
    stored_id(&c, &d.url("/hooks/shop"), &order(1)).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let m = loop {
        let a = send(
            c.get(d.url("/api/members/ada@example.com"))
                .bearer_auth(TOKEN),
        )
        .await;
        if a.status == 200 && a.json()["history"][0]["kind"] == "expire" {
            break a.json();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{} {}\n{}",
            a.status,
            a.body,
            d.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(
        (m["balance"].as_i64(), m["lifetime"].as_i64()),
        (Some(0), Some(1255)),
        "{m:#}"
    );
    assert_eq!(m["history"][0]["points"], -1255);
    assert_eq!(m["history"][0]["reason"], "no points earned for 2s");
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let m = send(
        c.get(d.url("/api/members/ada@example.com"))
            .bearer_auth(TOKEN),
    )
    .await
    .json();
    assert_eq!(m["entries"], 2, "expired once: {m:#}");
}

/// Stripe: a payment earns a point per dollar; refunds take back in proportion to the
/// cumulative `amount_refunded` — a partial refund, then the rest — never more than earned.
#[tokio::test]
async fn stripe_refunds_take_back_in_proportion_never_more_than_earned() {
    let dir = shipped(&["stripe-payment-points", "stripe-refund-points"]);
    let config = format!(
        "admin_token: {TOKEN}\nsources:\n  stripe: {{ connector: stripe, secret: whsec_test }}\nsinks:\n  rewards: {{ connector: giftcard, email: dev@example.com, access_token: t, base_url: \"http://127.0.0.1:9\" }}\n"
    );
    let d = Daemon::start_in(dir.path(), &config).unwrap();
    let c = client();
    let signed = |rel: &str, edit: &dyn Fn(&mut serde_json::Value)| {
        let (body, headers) =
            perkflow::sign::read_fixture(&repo(&format!("fixtures/{rel}"))).unwrap();
        let mut v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        edit(&mut v);
        sign_body(
            "stripe",
            serde_json::to_vec(&v).unwrap(),
            headers,
            &keys(&["whsec_test"]),
            "",
            now_unix(),
        )
    };
    let member =
        |c: reqwest::Client, url: String| async move { send(c.get(url).bearer_auth(TOKEN)).await };
    let url = d.url("/api/members/ada@example.com");
    stored_id(
        &c,
        &d.url("/hooks/stripe"),
        &signed("stripe/payment-intent-succeeded.json", &|_| {}),
    )
    .await;
    let until_balance = |want: i64| {
        let (c, url) = (c.clone(), url.clone());
        async move {
            let deadline = std::time::Instant::now() + Duration::from_secs(20);
            loop {
                let a = member(c.clone(), url.clone()).await;
                if a.status == 200 && a.json()["balance"] == want {
                    return a.json();
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "{} {}",
                    a.status,
                    a.body
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    until_balance(50).await;
    // 20 USD refunded: 20 points back.
    let partial = signed("stripe/charge-refunded.json", &|v| {
        v["id"] = json!("evt_partial");
        v["data"]["object"]["amount_refunded"] = json!(2000);
        v["data"]["object"]["refunded"] = json!(false);
    });
    stored_id(&c, &d.url("/hooks/stripe"), &partial).await;
    let m = until_balance(30).await;
    assert_eq!(m["history"][0]["points"], -20, "{m:#}");
    // `amount_refunded` is a running total: 35 USD refunded in all takes back 15 more.
    let more = signed("stripe/charge-refunded.json", &|v| {
        v["id"] = json!("evt_more");
        v["data"]["object"]["amount_refunded"] = json!(3500);
        v["data"]["object"]["refunded"] = json!(false);
    });
    stored_id(&c, &d.url("/hooks/stripe"), &more).await;
    let m = until_balance(15).await;
    assert_eq!(m["history"][0]["points"], -15, "{m:#}");
    // Then all of it (50 USD): the 15 left of the award.
    stored_id(
        &c,
        &d.url("/hooks/stripe"),
        &signed("stripe/charge-refunded.json", &|_| {}),
    )
    .await;
    let m = until_balance(0).await;
    assert_eq!(m["history"][0]["points"], -15, "{m:#}");
    // The same total again (another event about it): nothing more.
    let again = signed("stripe/charge-refunded.json", &|v| {
        v["id"] = json!("evt_again");
    });
    let again = stored_id(&c, &d.url("/hooks/stripe"), &again).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while api(&c, &d, "GET", &format!("/api/events/{again}"), None)
        .await
        .json()["pending"]
        != false
    {
        assert!(std::time::Instant::now() < deadline, "not processed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let m = until_balance(0).await;
    assert_eq!(
        (m["lifetime"].as_i64(), m["entries"].as_i64()),
        (Some(0), Some(4)),
        "{m:#}"
    );
}
