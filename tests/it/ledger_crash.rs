//! The ledger across a real crash: orders flow in concurrently, the daemon is `kill -9`ed
//! mid-stream and restarted on the same data, the platform re-delivers every order (as
//! Shopify does when it got no 2xx): each order accrues exactly once, and the balance
//! crossing 1,000 emits exactly one `loyalty.threshold_crossed`, delivered once.

use crate::delivery::{api, order, TOKEN};
use crate::helpers::*;
use std::time::{Duration, Instant};

const ORDERS: usize = 60;

#[tokio::test]
async fn a_threshold_crossed_once_emits_one_event_after_a_kill_9() {
    let (sb, url, _stop) = sandbox().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("pipelines")).unwrap();
    // 1 point per order: the 60 orders end at 60, crossing 10 once, before the kill.
    std::fs::write(
        dir.path().join("pipelines/p.yaml"),
        "pipeline: p\non: { source: shop, events: [orders/paid] }\nsteps:\n  - loyalty.accrue: { member: \"{{ event.email }}\", points: 1 }\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("pipelines/t.yaml"),
        "pipeline: t\non: { source: loyalty, events: [loyalty.threshold_crossed] }\nsteps:\n  - deliver: { to: team.post, with: { text: \"{{ event.member }} crossed {{ event.threshold }}\" } }\n",
    )
    .unwrap();
    let config = format!(
        "admin_token: {TOKEN}\nloyalty:\n  thresholds: [10]\nsources:\n  shop: {{ connector: shopify, secret: s }}\nsinks:\n  team: {{ connector: webhook, url: \"{url}/webhook/x\" }}\n"
    );
    let mut d = Daemon::start_in(dir.path(), &config).unwrap();
    let c = client();
    // Concurrently, 8 at a time; the kill lands once about half were acknowledged.
    let hook = d.url("/hooks/shop");
    let acked = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut sends = Vec::new();
    for w in 0..8 {
        let (c, hook, acked) = (c.clone(), hook.clone(), acked.clone());
        sends.push(tokio::spawn(async move {
            for i in (w..ORDERS).step_by(8) {
                let o = order(i);
                let mut r = c.post(&hook).body(o.body.clone());
                for (k, v) in &o.headers {
                    r = r.header(k.as_str(), v.as_str());
                }
                let r = r.send().await;
                if r.is_ok_and(|r| r.status().is_success()) {
                    acked.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }));
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while acked.load(std::sync::atomic::Ordering::SeqCst) < ORDERS / 2 {
        assert!(Instant::now() < deadline, "orders not acknowledged");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    d.kill9();
    for s in sends {
        let _ = s.await;
    }
    assert!(
        acked.load(std::sync::atomic::Ordering::SeqCst) < ORDERS,
        "the kill came after every order was acknowledged"
    );
    let d = Daemon::start_in(dir.path(), &config).unwrap();
    // The platform re-delivers everything (duplicates answer 200 and store nothing).
    for i in 0..ORDERS {
        let a = post(&c, &d.url("/hooks/shop"), &order(i)).await;
        assert_eq!(a.status, 200, "{}", a.body);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let m = api(&c, &d, "GET", "/api/members/ada@example.com", None)
            .await
            .json();
        let posts = sb
            .received()
            .iter()
            .filter(|r| r.vendor == "webhook")
            .count();
        if m["balance"] == ORDERS && posts >= 1 {
            break;
        }
        assert!(Instant::now() < deadline, "not drained: {m:#}\n{}", d.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let m = api(&c, &d, "GET", "/api/members/ada@example.com", None)
        .await
        .json();
    assert_eq!(m["entries"], ORDERS, "one entry per order: {m:#}");
    let crossings = api(
        &c,
        &d,
        "GET",
        "/api/events?source=loyalty&type=loyalty.threshold_crossed",
        None,
    )
    .await
    .json();
    assert_eq!(
        crossings["events"].as_array().map(Vec::len),
        Some(1),
        "{crossings:#}"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let posts: Vec<_> = sb
        .received()
        .into_iter()
        .filter(|r| r.vendor == "webhook")
        .collect();
    assert_eq!(posts.len(), 1, "{posts:#?}");
    assert_eq!(posts[0].body["text"], "ada@example.com crossed 10");
}
