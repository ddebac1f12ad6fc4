//! The delivery engine against scripted fake vendors over real HTTP, with the daemon as a
//! real process: retries with the same idempotency key, Retry-After, dead letters with the
//! vendor's reason, replay, reconciliation of unknown outcomes, restarts.

use crate::fake_vendor::{FakeVendor, Reply, Seen};
use crate::helpers::*;
use base64::Engine;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

pub const TOKEN: &str = "delivery-admin-token";

/// A project dir with one pipeline delivering `deliver` (a YAML flow map) per paid order.
pub fn project(sinks: &str, deliver: &str) -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("pipelines")).unwrap();
    std::fs::write(
        dir.path().join("pipelines/p.yaml"),
        format!("pipeline: p\non: {{ source: shop, events: [orders/paid] }}\nsteps:\n  - deliver: {deliver}\n"),
    )
    .unwrap();
    let config = format!(
        "admin_token: {TOKEN}\nsources:\n  shop: {{ connector: shopify, secret: s }}\nsinks:\n{sinks}"
    );
    (dir, config)
}

pub fn order(i: usize) -> Signed {
    sign_fixture("shopify", "shopify/orders-paid.json", &keys(&["s"]), "", 0)
        .set("X-Shopify-Event-Id", &format!("order-{i}"))
}

pub async fn api(
    c: &reqwest::Client,
    d: &Daemon,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> Answer {
    let url = d.url(path);
    let r = match method {
        "GET" => c.get(url),
        "POST" => c.post(url),
        "DELETE" => c.delete(url),
        "PUT" => c.put(url),
        _ => unreachable!(),
    }
    .bearer_auth(TOKEN);
    send(match body {
        Some(b) => r.json(&b),
        None => r,
    })
    .await
}

/// Polls the event (bounded) until all its jobs reach a final state.
pub async fn settled_jobs(
    c: &reqwest::Client,
    d: &Daemon,
    event: &str,
    n: usize,
    timeout: Duration,
) -> Vec<Value> {
    let deadline = Instant::now() + timeout;
    loop {
        let ev = api(c, d, "GET", &format!("/api/events/{event}"), None)
            .await
            .json();
        let jobs = ev["jobs"].as_array().cloned().unwrap_or_default();
        // Not pending: the run's trace is written too (after its jobs).
        if jobs.len() >= n
            && ev["pending"] == false
            && jobs
                .iter()
                .all(|j| matches!(j["state"].as_str(), Some("delivered" | "dead")))
        {
            return jobs;
        }
        if Instant::now() > deadline {
            panic!("jobs of {event} did not settle: {jobs:#?}\n{}", d.log());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn ingest(c: &reqwest::Client, d: &Daemon, i: usize) -> String {
    let a = post(c, &d.url("/hooks/shop"), &order(i)).await;
    assert_eq!(a.status, 200, "{}", a.body);
    a.json()["id"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn retries_5xx_then_delivers_with_the_same_idempotency_key_and_records_every_attempt() {
    let fake = FakeVendor::start(|seen: &[Seen]| match seen.len() {
        1 => Reply::new(503, "Service Unavailable"),
        2 => Reply::new(500, r#"{"error":"InternalError"}"#),
        _ => Reply::new(201, r#"{"ticket":{"id":35436},"audit":{}}"#)
            .header("location", "/api/v2/tickets/35436.json"),
    })
    .await;
    let (dir, config) = project(
        &format!("  support: {{ connector: zendesk, subdomain: acme, email: agent@example.com, api_token: zd-secret-token, base_url: \"{}\" }}\n", fake.base),
        "{ to: support.create_ticket, with: { subject: \"Order {{ event.name }}\", comment: \"Paid {{ event.total_price }}\", requester_email: \"{{ event.email }}\", tags: [vip] } }",
    );
    let d = Daemon::start_in(dir.path(), &config).unwrap();
    let c = client();
    let id = ingest(&c, &d, 1).await;
    let jobs = settled_jobs(&c, &d, &id, 1, Duration::from_secs(30)).await;
    let job = &jobs[0];
    assert_eq!(job["state"], "delivered", "{job:#}");
    assert_eq!(job["vendor_id"], "35436");
    assert_eq!(job["attempts"], 3);
    let log = job["log"].as_array().unwrap();
    assert_eq!(
        log.iter()
            .map(|a| a["status"].as_u64().unwrap())
            .collect::<Vec<_>>(),
        [503, 500, 201]
    );
    assert_eq!(log[1]["reason"], "HTTP 500 InternalError");
    let seen = fake.seen();
    assert_eq!(seen.len(), 3);
    let key = job["key"].as_str().unwrap();
    for s in &seen {
        assert_eq!(s.method, "POST");
        assert_eq!(s.path, "/api/v2/tickets");
        assert_eq!(
            s.header("idempotency-key"),
            key,
            "every retry carries the same key"
        );
        assert_eq!(s.header("content-type"), "application/json");
        let basic = base64::engine::general_purpose::STANDARD
            .encode("agent@example.com/token:zd-secret-token");
        assert_eq!(s.header("authorization"), format!("Basic {basic}"));
    }
    assert_eq!(
        seen[0].json(),
        json!({"ticket": {"subject": "Order #1042", "comment": {"body": "Paid 125.50", "public": false}, "requester": {"email": "ada@example.com", "name": "ada@example.com"}, "tags": ["vip"], "external_id": key}})
    );
    // The secret never shows in the trace.
    let ev = api(&c, &d, "GET", &format!("/api/events/{id}"), None).await;
    assert!(!ev.body.contains("zd-secret-token"));
}

#[tokio::test]
async fn a_permanent_error_is_dead_lettered_with_the_vendor_reason_and_replay_keeps_the_key() {
    let fake = FakeVendor::start(|_: &[Seen]| {
        Reply::new(400, r#"{"code":21211,"message":"The 'To' number 5550100 is not a valid phone number.","more_info":"https://www.twilio.com/docs/errors/21211","status":400}"#)
    })
    .await;
    let (dir, config) = project(
        &format!("  sms: {{ connector: twilio_sms, account_sid: ACtest0001, auth_token: tw-secret-token, from: \"+15550100\", base_url: \"{}\" }}\n", fake.base),
        "{ to: sms.send_sms, with: { to: \"{{ event.customer.phone }}\", body: \"Thanks {{ event.customer.first_name }}\" } }",
    );
    let d = Daemon::start_in(dir.path(), &config).unwrap();
    let c = client();
    let id = ingest(&c, &d, 2).await;
    let jobs = settled_jobs(&c, &d, &id, 1, Duration::from_secs(30)).await;
    assert_eq!(jobs[0]["state"], "dead");
    assert_eq!(jobs[0]["attempts"], 1, "no retry of a permanent error");
    let reason = jobs[0]["reason"].as_str().unwrap();
    assert!(
        reason.starts_with("HTTP 400 21211: The 'To' number"),
        "{reason}"
    );
    let key = jobs[0]["key"].as_str().unwrap().to_string();

    // Twilio's contract: form-encoded PascalCase, Basic AccountSid:AuthToken, under the account.
    let first = &fake.seen()[0];
    assert_eq!(first.path, "/2010-04-01/Accounts/ACtest0001/Messages.json");
    assert_eq!(
        first.header("content-type"),
        "application/x-www-form-urlencoded"
    );
    let basic = base64::engine::general_purpose::STANDARD.encode("ACtest0001:tw-secret-token");
    assert_eq!(first.header("authorization"), format!("Basic {basic}"));
    let form = first.form();
    assert_eq!(
        form,
        [
            ("To".into(), "+15555550123".into()),
            ("From".into(), "+15550100".into()),
            ("Body".into(), "Thanks Ada".into())
        ]
    );

    // The dead-letter queue lists it, filtered by sink and reason.
    let dlq = api(&c, &d, "GET", "/api/dlq?sink=sms&reason=21211", None)
        .await
        .json();
    assert_eq!(dlq["dead_letters"].as_array().unwrap().len(), 1);
    assert_eq!(
        api(&c, &d, "GET", "/api/dlq?sink=email", None).await.json()["dead_letters"],
        json!([])
    );
    assert_eq!(
        api(&c, &d, "POST", "/api/dlq/replay", Some(json!({})))
            .await
            .status,
        400,
        "a bulk replay needs a filter"
    );

    // Fixed on the vendor side: replay sends it again with the same key.
    fake.set_script(|_: &[Seen]| {
        Reply::new(
            201,
            r#"{"sid":"SM0123456789abcdef0123456789abcdef","status":"queued"}"#,
        )
    });
    let r = api(
        &c,
        &d,
        "POST",
        "/api/dlq/replay",
        Some(json!({"sink": "sms", "since": "1h"})),
    )
    .await;
    assert_eq!(r.json(), json!({"replayed": 1}));
    let jobs = settled_jobs(&c, &d, &id, 1, Duration::from_secs(30)).await;
    assert_eq!(jobs[0]["state"], "delivered");
    assert_eq!(jobs[0]["key"], key.as_str());
    assert_eq!(jobs[0]["vendor_id"], "SM0123456789abcdef0123456789abcdef");
    assert_eq!(jobs[0]["replays"], 1);
    assert_eq!(
        jobs[0]["log"].as_array().unwrap().len(),
        2,
        "the first attempt stays in the trace"
    );
    assert_eq!(fake.seen()[1].body, fake.seen()[0].body);
    assert_eq!(
        api(&c, &d, "GET", "/api/dlq", None).await.json()["dead_letters"],
        json!([])
    );
}

#[tokio::test]
async fn retry_after_is_honoured() {
    let fake = FakeVendor::start(|seen: &[Seen]| match seen.len() {
        1 => Reply::new(429, "").header("retry-after", "2"),
        _ => Reply::new(200, "ok"),
    })
    .await;
    let (dir, config) = project(
        &format!(
            "  team: {{ connector: slack, webhook_url: \"{}/services/T1/B1/xyz\" }}\n",
            fake.base
        ),
        "{ to: team.post, with: { text: \"order {{ event.name }} paid\" } }",
    );
    let d = Daemon::start_in(dir.path(), &config).unwrap();
    let c = client();
    let id = ingest(&c, &d, 3).await;
    let jobs = settled_jobs(&c, &d, &id, 1, Duration::from_secs(30)).await;
    assert_eq!(jobs[0]["state"], "delivered");
    let seen = fake.seen();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[0].path, "/services/T1/B1/xyz");
    assert_eq!(seen[0].json(), json!({"text": "order #1042 paid"}));
    let gap = seen[1].at - seen[0].at;
    assert!(gap >= Duration::from_millis(1900), "waited only {gap:?}");
}

/// The gift-card API: token, order with PONumber; a timeout after the order was placed is
/// reconciled by looking the order up, never by placing it twice.
#[tokio::test]
async fn an_unknown_outcome_is_reconciled_by_po_number_before_any_resend() {
    let fake = FakeVendor::start(|seen: &[Seen]| {
        let last = seen.last().unwrap();
        let orders = || {
            seen.iter()
                .filter(|s| s.method == "POST" && s.path == "/v1/Orders")
                .collect::<Vec<_>>()
        };
        match (last.method.as_str(), last.path.as_str()) {
            ("POST", "/v1/Tokens")
                if last.header("email") == "gc@example.com"
                    && last.header("accesstoken") == "gc-secret" =>
            {
                Reply::new(200, r#"{"Value":"tok-1","ExpiresIn":3600}"#)
            }
            ("POST", "/v1/Tokens") => Reply::new(401, ""),
            (_, _) if last.header("authorization") != "Bearer tok-1" => Reply::new(401, ""),
            ("GET", "/v1/Products/CVS") => Reply::new(200, json!({"Id": "CVS", "Denominations": [5, 10, 20], "AvailableDeliveryTypes": ["DigitalDelivery", "Links"]}).to_string()),
            // The first order is placed, but the answer comes after the client gave up.
            ("POST", "/v1/Orders") if orders().len() == 1 => {
                Reply::new(201, r#"{"Id":"ord-77","Status":"Pending"}"#)
                    .after(Duration::from_secs(3))
            }
            ("POST", "/v1/Orders") => {
                Reply::new(409, r#"{"Id":"ord-77","Message":"Duplicate PONumber"}"#)
            }
            ("GET", "/v1/Orders/ord-77") => Reply::new(200, r#"{"Id":"ord-77","Status":"Completed"}"#),
            ("GET", "/v1/Orders") => {
                let po = orders()[0].json()["PONumber"].clone();
                Reply::new(
                    200,
                    json!([{"Id": "ord-77", "PONumber": po, "Status": "Completed"}]).to_string(),
                )
            }
            _ => Reply::new(404, ""),
        }
    })
    .await;
    let (dir, config) = project(
        &format!("  rewards: {{ connector: giftcard, email: gc@example.com, access_token: gc-secret, timeout: 1s, base_url: \"{}\" }}\n", fake.base),
        "{ to: rewards.order, with: { product: CVS, value: 20, email: \"{{ event.email }}\", po_number: \"LOYALTY-{{ event.id }}\", to_name: Ada, message: \"Thank you!\" } }",
    );
    let d = Daemon::start_in(dir.path(), &config).unwrap();
    let c = client();
    let id = ingest(&c, &d, 4).await;
    let jobs = settled_jobs(&c, &d, &id, 2, Duration::from_secs(30)).await;
    let job = jobs.iter().find(|j| j["kind"] == "send").unwrap();
    assert_eq!(job["state"], "delivered", "{job:#}");
    assert_eq!(job["vendor_id"], "ord-77");
    let log = job["log"].as_array().unwrap();
    assert_eq!(log[0]["outcome"], "retry");
    assert!(
        log[0]["reason"].as_str().unwrap().contains("timed out"),
        "{log:?}"
    );
    assert_eq!(log[1]["reconciled"], true);
    let seen = fake.seen();
    let posts: Vec<&Seen> = seen
        .iter()
        .filter(|s| s.method == "POST" && s.path == "/v1/Orders")
        .collect();
    assert_eq!(posts.len(), 1, "the order was placed once");
    assert_eq!(
        seen.iter().filter(|s| s.path == "/v1/Tokens").count(),
        1,
        "the token is cached"
    );
    assert_eq!(
        posts[0].json(),
        json!({"Type": "DigitalDelivery", "PONumber": "LOYALTY-6012345678901", "LineItems": [{"ProductId": "CVS", "Value": 20, "Quantity": 1, "DigitalDeliveryAddress": {"Email": "ada@example.com"}, "Personalization": {"To": "Ada", "Message": "Thank you!"}}]})
    );
}

/// Zendesk: a ticket create whose answer is lost is looked up by its external_id (the job
/// key) before any resend (how long Zendesk keeps an Idempotency-Key is not documented).
#[tokio::test]
async fn a_lost_zendesk_answer_is_reconciled_by_external_id() {
    let fake = FakeVendor::start(|seen: &[Seen]| {
        let last = seen.last().unwrap();
        let created = || {
            seen.iter()
                .find(|s| s.method == "POST")
                .map(|s| s.json()["ticket"]["external_id"].clone())
                .unwrap()
        };
        match (last.method.as_str(), last.path.as_str()) {
            // The ticket is made, but the answer comes after the client gave up.
            ("POST", "/api/v2/tickets") => {
                Reply::new(201, json!({"ticket": {"id": 35436}}).to_string())
                    .after(Duration::from_secs(3))
            }
            ("GET", "/api/v2/tickets") if last.query.contains("external_id=") => Reply::new(
                200,
                json!({"tickets": [{"id": 35436, "external_id": created()}], "count": 1})
                    .to_string(),
            ),
            _ => Reply::new(404, ""),
        }
    })
    .await;
    let (dir, config) = project(
        &format!("  desk: {{ connector: zendesk, subdomain: acme, email: a@example.com, api_token: t, timeout: 1s, base_url: \"{}\" }}\n", fake.base),
        "{ to: desk.create_ticket, with: { subject: \"order {{ event.name }}\", comment: paid } }",
    );
    let d = Daemon::start_in(dir.path(), &config).unwrap();
    let c = client();
    let id = ingest(&c, &d, 5).await;
    let jobs = settled_jobs(&c, &d, &id, 1, Duration::from_secs(30)).await;
    assert_eq!(jobs[0]["state"], "delivered", "{:#}", jobs[0]);
    assert_eq!(jobs[0]["vendor_id"], "35436");
    assert_eq!(jobs[0]["log"][1]["reconciled"], true, "{:#}", jobs[0]);
    let seen = fake.seen();
    assert_eq!(
        seen.iter().filter(|s| s.method == "POST").count(),
        1,
        "one ticket"
    );
    let lookup = seen.iter().find(|s| s.method == "GET").unwrap();
    assert_eq!(
        lookup.query,
        format!("external_id={}", jobs[0]["key"].as_str().unwrap())
    );
}

/// A non-idempotent create (Twilio) whose outcome is unknown is not resent: it is
/// dead-lettered with the reason, for a human to check.
#[tokio::test]
async fn a_non_idempotent_create_with_an_unknown_outcome_is_not_resent() {
    let fake = FakeVendor::start(|_: &[Seen]| {
        Reply::new(201, r#"{"sid":"SM1"}"#).after(Duration::from_secs(3))
    })
    .await;
    let (dir, config) = project(
        &format!("  sms: {{ connector: twilio_sms, account_sid: ACx, auth_token: t0ken, from: \"+15550100\", timeout: 1s, base_url: \"{}\" }}\n", fake.base),
        "{ to: sms.send_sms, with: { to: \"+14155550134\", body: hi } }",
    );
    let d = Daemon::start_in(dir.path(), &config).unwrap();
    let c = client();
    let id = ingest(&c, &d, 5).await;
    let jobs = settled_jobs(&c, &d, &id, 1, Duration::from_secs(30)).await;
    assert_eq!(jobs[0]["state"], "dead");
    assert!(
        jobs[0]["reason"]
            .as_str()
            .unwrap()
            .contains("outcome is unknown"),
        "{:#}",
        jobs[0]
    );
    assert_eq!(fake.seen().len(), 1, "sent once, never blindly again");
}

/// kill -9 while a request is out: after the restart the job's outcome is unknown, so the
/// ticket is looked up by its external_id and, not found, the idempotent create is resent
/// with the same key (a non-idempotent one would not be).
#[tokio::test]
async fn a_restart_mid_request_resends_an_idempotent_action_with_the_same_key() {
    let fake = FakeVendor::start(|seen: &[Seen]| match seen.len() {
        1 => Reply::new(201, r#"{"ticket":{"id":1}}"#).after(Duration::from_secs(30)),
        _ if seen.last().unwrap().method == "GET" => Reply::new(200, r#"{"tickets":[],"count":0}"#),
        _ => Reply::new(201, r#"{"ticket":{"id":1}}"#).header("x-idempotency-lookup", "hit"),
    })
    .await;
    let (dir, config) = project(
        &format!("  support: {{ connector: zendesk, subdomain: acme, oauth_token: zd-oauth, base_url: \"{}\" }}\n", fake.base),
        "{ to: support.create_ticket, with: { subject: s, comment: c } }",
    );
    let mut d = Daemon::start_in(dir.path(), &config).unwrap();
    let c = client();
    let id = ingest(&c, &d, 6).await;
    fake.wait_for("the first attempt", Duration::from_secs(20), |s| {
        !s.is_empty()
    })
    .await;
    d.kill9();
    let d = Daemon::start_in(dir.path(), &config).unwrap();
    let jobs = settled_jobs(&c, &d, &id, 1, Duration::from_secs(30)).await;
    assert_eq!(jobs[0]["state"], "delivered");
    let seen = fake.seen();
    let methods: Vec<&str> = seen.iter().map(|s| s.method.as_str()).collect();
    assert_eq!(methods, ["POST", "GET", "POST"], "looked up, then resent");
    assert_eq!(
        seen[0].header("idempotency-key"),
        seen[2].header("idempotency-key")
    );
    assert_eq!(seen[2].header("authorization"), "Bearer zd-oauth");
    // The lease of an idempotent action is not forced to disk before sending (a resend is
    // harmless), so the restarted daemon may count the resend as the first attempt.
    assert!(jobs[0]["attempts"].as_u64().unwrap() >= 1, "{:#}", jobs[0]);
}

/// Replay from the trigger: a dry run shows what would change; a confirmed one re-sends
/// with the same key.
#[tokio::test]
async fn replaying_an_event_shows_the_changes_then_resends_with_the_same_key() {
    let fake = FakeVendor::start(|_: &[Seen]| Reply::new(200, "ok")).await;
    let (dir, config) = project(
        &format!(
            "  team: {{ connector: slack, webhook_url: \"{}/hook\" }}\n",
            fake.base
        ),
        "{ to: team.post, with: { text: \"order {{ event.name }}\" } }",
    );
    let d = Daemon::start_in(dir.path(), &config).unwrap();
    let c = client();
    let id = ingest(&c, &d, 7).await;
    let jobs = settled_jobs(&c, &d, &id, 1, Duration::from_secs(30)).await;
    let key = jobs[0]["key"].as_str().unwrap().to_string();
    let dry = api(&c, &d, "POST", &format!("/api/events/{id}/replay"), None)
        .await
        .json();
    assert_eq!(dry["confirmed"], false);
    assert_eq!(dry["queued"], 0);
    assert_eq!(dry["changes"][0]["change"], "unchanged");
    assert_eq!(
        dry["changes"][0]["sends"], false,
        "a delivered, unchanged action is not resent by default"
    );
    let go = api(
        &c,
        &d,
        "POST",
        &format!("/api/events/{id}/replay"),
        Some(json!({"confirm": true, "resend_delivered": true})),
    )
    .await
    .json();
    assert_eq!(go["queued"], 1);
    fake.wait_for("the resend", Duration::from_secs(20), |s| s.len() == 2)
        .await;
    let jobs = settled_jobs(&c, &d, &id, 1, Duration::from_secs(30)).await;
    assert_eq!(jobs[0]["key"], key.as_str());
    assert_eq!(jobs[0]["replays"], 1);
    assert_eq!(
        api(&c, &d, "POST", "/api/events/nope/replay", None)
            .await
            .status,
        404
    );
}

fn cli(d: &Daemon, args: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_perkflow"))
        .args(args)
        .args(["--url", &d.base, "--token", TOKEN])
        .current_dir(&d.dir)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `perkflow dlq list/show/replay/drop` and `perkflow events show/replay` against a live
/// daemon.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_lists_shows_replays_and_drops_dead_letters() {
    let fake = FakeVendor::start(|_: &[Seen]| Reply::new(404, "no_service")).await;
    let (dir, config) = project(
        &format!(
            "  team: {{ connector: slack, webhook_url: \"{}/hook\" }}\n",
            fake.base
        ),
        "{ to: team.post, with: { text: \"order {{ event_id }}\" } }",
    );
    let d = Daemon::start_in(dir.path(), &config).unwrap();
    let c = client();
    let first = ingest(&c, &d, 8).await;
    let second = ingest(&c, &d, 9).await;
    let a = settled_jobs(&c, &d, &first, 1, Duration::from_secs(30)).await;
    let b = settled_jobs(&c, &d, &second, 1, Duration::from_secs(30)).await;
    let (ka, kb) = (
        a[0]["key"].as_str().unwrap().to_string(),
        b[0]["key"].as_str().unwrap().to_string(),
    );

    let (ok, out, err) =
        tokio::task::block_in_place(|| cli(&d, &["dlq", "list", "--sink", "team"]));
    assert!(ok, "{err}");
    assert!(out.contains(&ka) && out.contains(&kb), "{out}");
    assert!(out.contains("HTTP 404 no_service"), "{out}");
    assert!(out.ends_with("2 dead letters\n"), "{out}");

    let (ok, out, _) = tokio::task::block_in_place(|| cli(&d, &["events", "show", &first]));
    assert!(ok);
    assert!(out.contains("team.post  dead  attempts 1"), "{out}");
    assert!(out.contains("rejected    404"), "{out}");

    let (ok, out, _) = tokio::task::block_in_place(|| cli(&d, &["dlq", "drop", &kb]));
    assert!(ok);
    assert_eq!(out, "1 dead letters dropped\n");
    let (ok, _, err) = tokio::task::block_in_place(|| cli(&d, &["dlq", "replay"]));
    assert!(
        !ok && err.contains("--all"),
        "a bulk replay needs a filter: {err}"
    );

    fake.set_script(|_: &[Seen]| Reply::new(200, "ok"));
    let (ok, out, _) = tokio::task::block_in_place(|| cli(&d, &["dlq", "replay", "--all"]));
    assert!(ok);
    assert_eq!(
        out, "1 dead letters replayed\n",
        "the dropped one stays dropped"
    );
    let a = settled_jobs(&c, &d, &first, 1, Duration::from_secs(30)).await;
    assert_eq!(a[0]["state"], "delivered");
    let ev = api(&c, &d, "GET", &format!("/api/events/{second}"), None)
        .await
        .json();
    assert_eq!(ev["jobs"][0]["state"], "dropped");

    let (ok, out, _) = tokio::task::block_in_place(|| cli(&d, &["events", "replay", &second]));
    assert!(ok);
    assert!(
        out.contains("yes      unchanged  team.post"),
        "a dropped action is sent again on replay: {out}"
    );
    assert!(out.contains("dry run: nothing sent"), "{out}");
    let (ok, out, _) =
        tokio::task::block_in_place(|| cli(&d, &["events", "replay", &second, "--yes"]));
    assert!(ok);
    assert!(out.ends_with("1 actions queued\n"), "{out}");
    let b = settled_jobs(&c, &d, &second, 1, Duration::from_secs(30)).await;
    assert_eq!(b[0]["state"], "delivered");
    assert_eq!(b[0]["key"], kb.as_str());
}

/// A sink that hangs does not hold back another sink, nor ingest.
#[tokio::test]
async fn a_hanging_sink_does_not_slow_other_sinks_or_ingest() {
    let slow =
        FakeVendor::start(|_: &[Seen]| Reply::new(200, "ok").after(Duration::from_secs(20))).await;
    let fast = FakeVendor::start(|_: &[Seen]| Reply::new(200, "ok")).await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("pipelines")).unwrap();
    std::fs::write(
        dir.path().join("pipelines/p.yaml"),
        "pipeline: p\non: { source: shop, events: [orders/paid] }\nsteps:\n  - deliver: { to: slow.post, with: { text: \"{{ event_id }}\" } }\n  - deliver: { to: fast.post, with: { text: \"{{ event_id }}\" } }\n",
    )
    .unwrap();
    let config = format!(
        "admin_token: {TOKEN}\nsources:\n  shop: {{ connector: shopify, secret: s }}\nsinks:\n  slow: {{ connector: slack, webhook_url: \"{}/h\", timeout: 15s }}\n  fast: {{ connector: slack, webhook_url: \"{}/h\", rate: 100/s }}\n",
        slow.base, fast.base
    );
    let d = Daemon::start_in(dir.path(), &config).unwrap();
    let c = client();
    let t0 = Instant::now();
    for i in 0..20 {
        let a = post(&c, &d.url("/hooks/shop"), &order(100 + i)).await;
        assert_eq!(a.status, 200);
    }
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "ingest was held back: {:?}",
        t0.elapsed()
    );
    fast.wait_for("every fast delivery", Duration::from_secs(10), |s| {
        s.len() == 20
    })
    .await;
    assert!(t0.elapsed() < Duration::from_secs(10));
    assert!(
        slow.seen().len() <= 1,
        "the slow sink (concurrency 1) has one request out"
    );
}
