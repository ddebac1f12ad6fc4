//! The gift-card sink end to end against the vendor sandbox: token minted once and refreshed
//! on 401, catalog checks before anything is sent, 409 on a repeated PONumber taken as
//! success, the order's vendor id recorded.

use crate::delivery::{api, order, settled_jobs, TOKEN};
use crate::helpers::*;
use std::time::Duration;

/// A daemon whose pipeline orders `product`/`value` per paid order, PONumber from the
/// event's `po` note attribute or the event id.
fn project(sandbox: &str, product: &str, value: u32) -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("pipelines")).unwrap();
    std::fs::write(
        dir.path().join("pipelines/gift.yaml"),
        format!("pipeline: gift\non: {{ source: shop, events: [orders/paid] }}\nsteps:\n  - deliver: {{ to: rewards.order, with: {{ product: {product}, value: {value}, email: \"{{{{ event.email }}}}\", po_number: \"PO-{{{{ headers['x-po'] | default(event_id) }}}}\" }} }}\n"),
    )
    .unwrap();
    let config = format!(
        "admin_token: {TOKEN}\nsources:\n  shop: {{ connector: shopify, secret: s }}\nsinks:\n  rewards: {{ connector: giftcard, email: dev@example.com, access_token: dev-giftcard-token, base_url: \"{sandbox}/giftcard\" }}\n"
    );
    (dir, config)
}

async fn ingest(c: &reqwest::Client, d: &Daemon, i: usize, po: Option<&str>) -> String {
    let mut req = order(i);
    if let Some(po) = po {
        req = req.set("X-PO", po);
    }
    let a = post(c, &d.url("/hooks/shop"), &req).await;
    assert_eq!(a.status, 200, "{}", a.body);
    a.json()["id"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn orders_reuse_the_token_refresh_it_on_401_and_treat_a_repeated_po_number_as_placed() {
    let (sb, url, _stop) = sandbox().await;
    let (dir, config) = project(&url, "CVS", 20);
    let d = Daemon::start_in(dir.path(), &config).unwrap();
    let c = client();
    let first = ingest(&c, &d, 1, Some("A")).await;
    let a = settled_jobs(&c, &d, &first, 1, Duration::from_secs(30)).await;
    assert_eq!(a[0]["state"], "delivered", "{:#}", a[0]);
    let order_id = a[0]["vendor_id"].as_str().unwrap().to_string();
    assert!(order_id.starts_with("ord-"));

    // The vendor drops every token: the next order gets a 401, mints a new one, succeeds.
    let r = c
        .post(format!("{url}/_sandbox/giftcard/expire-tokens"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let second = ingest(&c, &d, 2, Some("B")).await;
    let b = settled_jobs(&c, &d, &second, 1, Duration::from_secs(30)).await;
    assert_eq!(b[0]["state"], "delivered", "{:#}", b[0]);
    assert_eq!(
        b[0]["attempts"], 1,
        "the refresh happens within the attempt"
    );

    // Another event with the same PONumber: the vendor answers 409 with the first order.
    let third = ingest(&c, &d, 3, Some("A")).await;
    let t = settled_jobs(&c, &d, &third, 1, Duration::from_secs(30)).await;
    assert_eq!(t[0]["state"], "delivered");
    assert_eq!(t[0]["vendor_id"], order_id.as_str());

    let got = sb.received();
    let count = |method: &str, path: &str, status: u16| {
        got.iter()
            .filter(|r| r.method == method && r.path == path && r.status == status)
            .count()
    };
    assert_eq!(
        count("POST", "/v1/Tokens", 200),
        2,
        "one token, then one refresh"
    );
    assert_eq!(
        count("GET", "/v1/Products/CVS", 200),
        1,
        "the product is read once (cached)"
    );
    assert_eq!(count("POST", "/v1/Orders", 201), 2, "two orders placed");
    assert_eq!(count("POST", "/v1/Orders", 409), 1);
    assert_eq!(count("POST", "/v1/Orders", 401), 1);
}

#[tokio::test]
async fn an_order_the_catalog_does_not_allow_is_dead_lettered_without_being_sent() {
    let (sb, url, _stop) = sandbox().await;
    for (product, value, reason) in [
        ("NOSUCH", 20, "`NOSUCH` is not in the vendor's catalog; nothing was sent"),
        ("CVS", 7, "`7` is not a denomination of `CVS` (offered: 5, 10, 20, 25, 50); nothing was sent"),
        ("VISA-PHYSICAL", 50, "`DigitalDelivery` is not a delivery type of `VISA-PHYSICAL` (offered: PhysicalShipment); nothing was sent"),
    ] {
        let (dir, config) = project(&url, product, value);
        let d = Daemon::start_in(dir.path(), &config).unwrap();
        let c = client();
        let id = ingest(&c, &d, 10, None).await;
        let j = settled_jobs(&c, &d, &id, 1, Duration::from_secs(30)).await;
        assert_eq!(j[0]["state"], "dead");
        assert_eq!(j[0]["reason"], reason);
        let dlq = api(&c, &d, "GET", "/api/dlq?sink=rewards", None).await.json();
        assert_eq!(dlq["dead_letters"][0]["reason"], reason);
    }
    assert!(
        !sb.received().iter().any(|r| r.path == "/v1/Orders"),
        "no order was ever sent"
    );
}

/// Orders are answered Pending; the sink polls until Completed, then emits
/// `reward.fulfilled` under its own name, which a follow-up pipeline turns into a message.
#[tokio::test]
async fn a_completed_order_emits_reward_fulfilled_for_a_follow_up_pipeline() {
    let (sb, url, _stop) = sandbox().await;
    let (dir, config) = project(&url, "CVS", 10);
    std::fs::write(
        dir.path().join("pipelines/fulfilled.yaml"),
        "pipeline: fulfilled\non: { source: rewards, events: [reward.fulfilled] }\nsteps:\n  - deliver: { to: team.post, with: { text: \"card {{ event.vendor_id }} for {{ event.job.with.email }} is {{ event.status }}\" } }\n",
    )
    .unwrap();
    let config = format!(
        "{config}  team: {{ connector: slack, webhook_url: \"{url}/slack/services/T1/B1/x\" }}\n"
    );
    let d = Daemon::start_in(dir.path(), &config).unwrap();
    let c = client();
    let id = ingest(&c, &d, 20, None).await;
    let jobs = settled_jobs(&c, &d, &id, 2, Duration::from_secs(30)).await;
    let order = jobs.iter().find(|j| j["kind"] == "send").unwrap();
    let track = jobs.iter().find(|j| j["kind"] == "track").unwrap();
    let order_id = order["vendor_id"].as_str().unwrap();
    assert_eq!(track["state"], "delivered");
    assert_eq!(
        track["key"],
        format!("{}.track", order["key"].as_str().unwrap())
    );
    // The follow-up pipeline ran on the internal event and posted.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let posted = sb.received().into_iter().find(|r| r.vendor == "slack");
        if let Some(p) = posted {
            assert_eq!(
                p.body["text"],
                format!("card {order_id} for ada@example.com is Completed")
            );
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no follow-up post; {:#?}",
            sb.received()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let events = api(&c, &d, "GET", "/api/events?source=rewards", None)
        .await
        .json();
    let ev = &events["events"][0];
    assert_eq!(ev["event_type"], "reward.fulfilled");
    assert_eq!(ev["vendor_id"], format!("{order_id}:reward.fulfilled"));
    assert_eq!(
        events["events"].as_array().unwrap().len(),
        1,
        "announced once"
    );
}

#[tokio::test]
async fn insufficient_funds_pauses_the_sink_raises_the_alarm_and_keeps_the_order() {
    let (_sb, url, _stop) = sandbox().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("pipelines")).unwrap();
    // 100 x 100 USD: more than the sandbox account's prefunded balance.
    std::fs::write(
        dir.path().join("pipelines/gift.yaml"),
        "pipeline: gift\non: { source: shop, events: [orders/paid] }\nsteps:\n  - deliver: { to: rewards.order, with: { product: AMAZON, value: 100, quantity: 100, email: \"{{ event.email }}\" } }\n",
    )
    .unwrap();
    let config = format!(
        "admin_token: {TOKEN}\nsources:\n  shop: {{ connector: shopify, secret: s }}\nsinks:\n  rewards: {{ connector: giftcard, email: dev@example.com, access_token: dev-giftcard-token, base_url: \"{url}/giftcard\" }}\n"
    );
    let d = Daemon::start_in(dir.path(), &config).unwrap();
    let c = client();
    let id = ingest(&c, &d, 1, None).await;
    // The failed attempt is recorded last (after the pause, health, the alarm): wait for it.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let ev = loop {
        let ev = api(&c, &d, "GET", &format!("/api/events/{id}"), None)
            .await
            .json();
        let tried = ev["jobs"][0]["log"].as_array().map_or(0, Vec::len);
        if ev["jobs"][0]["state"] == "pending" && tried == 1 {
            break ev;
        }
        assert!(std::time::Instant::now() < deadline, "{ev:#}\n{}", d.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let r = api(&c, &d, "GET", "/api/connectors", None).await.json();
    let rewards = r["connectors"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["name"] == "rewards")
        .cloned()
        .unwrap();
    assert!(rewards["paused_until_ms"].is_u64(), "{rewards:#}");
    // Health says what is wrong and what to do; the order waits (not a dead letter).
    assert_eq!(rewards["state"], "degraded", "{rewards:#}");
    let why = rewards["why"].as_str().unwrap();
    assert!(
        why.contains("insufficient funds in the prefunded account: fund it"),
        "{why}"
    );
    // Not the order's failure: no attempt is spent (it cannot run out of attempts, or age,
    // while the account is unfunded).
    assert_eq!(ev["jobs"][0]["attempts"], 0, "{ev:#}");
    let wait =
        ev["jobs"][0]["next_at_ms"].as_u64().unwrap() - crate::helpers::now_unix() as u64 * 1000;
    assert!(wait > 25 * 60 * 1000, "retried slowly (30 min): {wait} ms");
    // The alarm: a metric and an ERROR line.
    let m = get(&c, &d.url("/metrics")).await.body;
    assert!(
        m.contains("perkflow_sink_paused{sink=\"rewards\"} 1"),
        "{m}"
    );
    assert!(
        m.contains("perkflow_sink_paused_total{sink=\"rewards\",status=\"422\"} 1"),
        "{m}"
    );
    assert!(
        d.log().contains("ERROR") && d.log().contains("its deliveries are paused"),
        "{}",
        d.log()
    );
}
