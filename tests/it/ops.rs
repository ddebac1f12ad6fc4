//! Operations: connector health (`GET /api/connectors`, `perkflow status`) and the queue
//! metrics, with the daemon as a real process against the vendor sandbox: a sink with
//! refused credentials, a sink whose vendor keeps failing, a healthy one, and a source whose
//! signatures do not verify.

use crate::delivery::{api, order, TOKEN};
use crate::helpers::*;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

fn connector<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["connectors"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no connector {name} in {report:#}"))
}

#[tokio::test]
async fn connector_health_tells_what_is_wrong_and_where() {
    let (_sb, url, _stop) = sandbox().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("pipelines")).unwrap();
    std::fs::write(
        dir.path().join("pipelines/p.yaml"),
        "pipeline: p\non: { source: shop, events: [orders/paid] }\nsteps:\n  - deliver: { to: sms.send_sms, with: { to: \"+15555550123\", body: hi } }\n  - deliver: { to: email.send, with: { to: a@example.com, subject: hi, text: hi } }\n  - deliver: { to: team.post, with: { text: hi } }\n",
    )
    .unwrap();
    let config = format!(
        "admin_token: {TOKEN}\nsources:\n  shop: {{ connector: shopify, secret: s }}\n  woo: {{ connector: woocommerce, secret: w }}\nsinks:\n  sms: {{ connector: twilio_sms, account_sid: AC00000000000000000000000000000000, auth_token: wrong-token, from: \"+15550100\", base_url: \"{url}/twilio\" }}\n  email: {{ connector: sendgrid, api_key: SG.dev-key, from: rewards@example.com, base_url: \"{url}/sendgrid\" }}\n  team: {{ connector: slack, webhook_url: \"{url}/slack/services/T0/B0/X\" }}\n"
    );
    // Slack keeps answering 503.
    let c = client();
    let r = c
        .post(format!("{url}/_sandbox/faults"))
        .json(&json!({"vendor": "slack", "status": vec![503; 200]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let d = Daemon::start_in(dir.path(), &config).unwrap();
    for i in 0..6 {
        assert_eq!(post(&c, &d.url("/hooks/shop"), &order(i)).await.status, 200);
    }
    // WooCommerce webhooks signed with another secret.
    for i in 0..3 {
        let bad = sign_fixture(
            "woocommerce",
            "woocommerce/order-updated-completed.json",
            &keys(&["not-w"]),
            "",
            0,
        )
        .set("X-WC-Webhook-Delivery-ID", &format!("d-{i}"));
        assert_eq!(post(&c, &d.url("/hooks/woo"), &bad).await.status, 401);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    let report = loop {
        let a = api(&c, &d, "GET", "/api/connectors", None).await;
        assert_eq!(a.status, 200, "{}", a.body);
        let r = a.json();
        let sms = connector(&r, "sms");
        let (dead, depth) = (
            sms["dead_letters"].as_u64().unwrap_or(0),
            sms["queue_depth"].as_u64().unwrap_or(0),
        );
        // Every sms job settled: dead letters, and the last one waiting for the circuit.
        let done = sms["state"] == "credentials_failing"
            && sms["circuit"] == "open"
            && dead >= 5
            && dead + depth == 6
            && connector(&r, "team")["state"] == "circuit_open"
            && connector(&r, "email")["ok_5m"] == 6;
        if done {
            break r;
        }
        assert!(Instant::now() < deadline, "{r:#}\n{}", d.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let shop = connector(&report, "shop");
    assert_eq!(shop["kind"], "source");
    assert_eq!(shop["state"], "ok");
    assert_eq!(shop["ok_5m"], 6);
    let woo = connector(&report, "woo");
    assert_eq!(woo["state"], "credentials_failing", "{woo:#}");
    assert_eq!(
        woo["why"],
        "signature does not verify (a wrong secret, or requests not sent by the vendor)"
    );
    assert_eq!(woo["failed_5m"], 3);
    let sms = connector(&report, "sms");
    assert_eq!(sms["kind"], "sink");
    assert!(
        sms["why"].as_str().unwrap().starts_with("HTTP 401"),
        "{sms:#}"
    );
    // Refused credentials open the circuit too: the last job waits for it, the others are
    // dead letters with the vendor's reason.
    assert_eq!(sms["circuit"], "open", "{sms:#}");
    assert_eq!(
        sms["dead_letters"].as_u64().unwrap() + sms["queue_depth"].as_u64().unwrap(),
        6,
        "{sms:#}"
    );
    assert!(sms["dead_letters"].as_u64().unwrap() >= 5, "{sms:#}");
    let email = connector(&report, "email");
    assert_eq!(email["state"], "ok");
    assert_eq!(email["success_rate_5m"], 1.0);
    assert!(email["last_success_ms"].as_u64().is_some());
    let team = connector(&report, "team");
    assert_eq!(team["circuit"], "open", "{team:#}");
    assert!(team["queue_depth"].as_u64().unwrap() >= 1, "{team:#}");
    assert!(
        team["last_failure_reason"]
            .as_str()
            .unwrap()
            .starts_with("HTTP 503"),
        "{team:#}"
    );
    assert!(report["config_error"].is_null());

    // The CLI prints the same as a table and exits 1: something is not ok.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_perkflow"))
        .args(["status", "--url", &d.base, "--token", TOKEN])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    let row = |name: &str| {
        text.lines()
            .find(|l| l.split_whitespace().nth(1) == Some(name))
            .unwrap_or_else(|| panic!("no row {name}:\n{text}"))
            .to_string()
    };
    assert!(row("sms").contains("credentials_failing"), "{text}");
    assert!(row("team").contains("circuit_open"), "{text}");
    assert!(row("email").contains(" ok "), "{text}");
    assert!(row("woo").contains("signature does not verify"), "{text}");

    // The queue figures are metrics too (no event ids or customers in labels).
    let m = get(&c, &d.url("/metrics")).await.body;
    assert!(m.contains("perkflow_queue_depth{sink=\"team\"}"), "{m}");
    assert!(m.contains("perkflow_dead_letters{sink=\"sms\"}"), "{m}");
    assert!(m.contains("perkflow_store_bytes"), "{m}");
    assert!(
        m.contains("perkflow_delivery_duration_seconds_bucket{sink=\"email\",le=\"0.1\"}"),
        "delivery latency is a histogram: {m}"
    );
    assert!(!m.contains("ev_0"), "no event id in any label");

    // Without the token: 401.
    assert_eq!(send(c.get(d.url("/api/connectors"))).await.status, 401);
}

#[tokio::test]
async fn the_status_page_needs_the_token_and_refuses_cross_origin_posts() {
    let c = client();
    let d = Daemon::start(&format!(
        "admin_token: {TOKEN}\nsources:\n  shop: {{ connector: shopify, secret: s }}\n"
    ));
    let a = get(&c, &d.url("/")).await;
    assert_eq!(a.status, 401);
    assert!(
        a.body.contains("<form method=\"post\" action=\"/login\">"),
        "{}",
        a.body
    );
    assert_eq!(
        get(&c, &d.url("/ui/events/ev_0000000000000000"))
            .await
            .status,
        401
    );
    let a = send(c.post(d.url("/ui/dlq/pf-x/replay"))).await;
    assert_eq!(a.status, 401);
    // Signing in from another origin is refused; from the page's own, it sets the cookie.
    let a = send(
        c.post(d.url("/login"))
            .header("Origin", "https://evil.example")
            .form(&[("token", TOKEN)]),
    )
    .await;
    assert_eq!(a.status, 403);
    let no_redirects = reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let r = no_redirects
        .post(d.url("/login"))
        .form(&[("token", TOKEN)])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    let cookie = r.headers()["set-cookie"].to_str().unwrap().to_string();
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    assert!(!cookie.contains(TOKEN), "the cookie is not the token");
    let session = cookie.split(';').next().unwrap().to_string();
    let a = send(c.get(d.url("/")).header("Cookie", &session)).await;
    assert_eq!(a.status, 200);
    assert!(a.body.contains("data-connector=\"shop\""), "{}", a.body);
    // The bearer token works too (scripts).
    assert_eq!(send(c.get(d.url("/")).bearer_auth(TOKEN)).await.status, 200);

    // No admin token configured: the page is disabled, like the admin API.
    let d = Daemon::start("sources:\n  shop: { connector: shopify, secret: s }\n");
    let a = get(&c, &d.url("/")).await;
    assert_eq!(a.status, 403);
    assert!(a.body.contains("disabled"), "{}", a.body);
}

#[tokio::test]
async fn personal_data_is_masked_everywhere_people_look_but_sent_as_is() {
    let (sb, url, _stop) = sandbox().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("pipelines")).unwrap();
    std::fs::write(
        dir.path().join("pipelines/p.yaml"),
        "pipeline: p\non: { source: shop, events: [orders/paid] }\nsteps:\n  - set: { member: \"{{ event.email }}\" }\n  - deliver: { to: sms.send_sms, with: { to: \"{{ event.customer.phone }}\", body: \"Hi {{ event.customer.first_name }} ({{ member }})\" } }\n  - deliver: { to: sms.send_sms, id: bad, with: { to: \"{{ event.email }}\", body: x } }\n",
    )
    .unwrap();
    std::fs::create_dir(dir.path().join("fixtures")).unwrap();
    for f in ["orders-paid.json", "orders-paid.headers.yaml"] {
        std::fs::copy(
            repo(&format!("fixtures/shopify/{f}")),
            dir.path().join("fixtures").join(f),
        )
        .unwrap();
    }
    let config = format!(
        "admin_token: {TOKEN}\npii_fields: [email, phone, first_name]\nsources:\n  shop: {{ connector: shopify, secret: s }}\nsinks:\n  sms: {{ connector: twilio_sms, account_sid: AC00000000000000000000000000000000, auth_token: dev-twilio-token, from: \"+15550100\", base_url: \"{url}/twilio\" }}\n"
    );
    let d = Daemon::start_in(dir.path(), &config).unwrap();
    let c = client();
    let id = stored_id(&c, &d.url("/hooks/shop"), &order(1)).await;
    let jobs = crate::delivery::settled_jobs(&c, &d, &id, 2, Duration::from_secs(30)).await;
    assert!(jobs.iter().any(|j| j["state"] == "delivered"), "{jobs:#?}");
    assert!(
        jobs.iter().any(|j| j["state"] == "dead"),
        "the e-mail is not a phone number: {jobs:#?}"
    );
    let personal = ["ada@example.com", "+15555550123", "Ada"];
    let shown = [
        api(&c, &d, "GET", &format!("/api/events/{id}"), None)
            .await
            .body,
        api(&c, &d, "GET", "/api/jobs", None).await.body,
        api(&c, &d, "GET", "/api/dlq", None).await.body,
        send(c.get(d.url(&format!("/ui/events/{id}"))).bearer_auth(TOKEN))
            .await
            .body,
        send(c.get(d.url("/")).bearer_auth(TOKEN)).await.body,
        d.log(),
    ];
    for (i, text) in shown.iter().enumerate() {
        for p in personal {
            assert!(!text.contains(p), "surface {i} shows {p}:\n{text}");
        }
    }
    let ev = api(&c, &d, "GET", &format!("/api/events/{id}"), None)
        .await
        .json();
    assert_eq!(ev["payload"]["email"], "[redacted]");
    assert_eq!(ev["payload"]["customer"]["phone"], "[redacted]");
    assert_eq!(ev["payload"]["total_price"], "125.50", "the rest is shown");
    assert!(ev["jobs"][0].get("sensitive").is_none());
    // What was sent is the real thing.
    let got = sb.received();
    let sms = got
        .iter()
        .find(|r| r.vendor == "twilio" && r.status == 201)
        .unwrap();
    assert_eq!(sms.body["To"], "+15555550123");
    assert_eq!(sms.body["Body"], "Hi Ada (ada@example.com)");

    // A dry run masks it too.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_perkflow"))
        .args(["run", "p", "--fixture", "fixtures/orders-paid.json"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(text.contains("deliver sms.send_sms"), "{text}");
    for p in personal {
        assert!(!text.contains(p), "the dry run shows {p}:\n{text}");
    }
}

#[tokio::test]
async fn retention_purges_old_payloads_traces_and_finished_jobs_but_keeps_dead_letters() {
    let (_sb, url, _stop) = sandbox().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("pipelines")).unwrap();
    std::fs::write(
        dir.path().join("pipelines/paid.yaml"),
        "pipeline: paid\non: { source: shop, events: [orders/paid] }\nsteps:\n  - deliver: { to: email.send, with: { to: a@example.com, subject: hi, text: hi } }\n  - deliver: { to: sms.send_sms, with: { to: \"+15555550123\", body: hi } }\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("pipelines/refund.yaml"),
        "pipeline: refund\non: { source: shop, events: [refunds/create] }\nsteps:\n  - deliver: { to: email.send, with: { to: a@example.com, subject: refund, text: hi } }\n",
    )
    .unwrap();
    let config = format!(
        "admin_token: {TOKEN}\nretention: 3s\nsources:\n  shop: {{ connector: shopify, secret: s }}\nsinks:\n  sms: {{ connector: twilio_sms, account_sid: AC00000000000000000000000000000000, auth_token: wrong, from: \"+15550100\", base_url: \"{url}/twilio\" }}\n  email: {{ connector: sendgrid, api_key: SG.dev-key, from: rewards@example.com, base_url: \"{url}/sendgrid\" }}\n"
    );
    let d = Daemon::start_in(dir.path(), &config).unwrap();
    let c = client();
    let paid = stored_id(&c, &d.url("/hooks/shop"), &order(1)).await;
    let refund_req = sign_fixture(
        "shopify",
        "shopify/refunds-create.json",
        &keys(&["s"]),
        "",
        0,
    );
    let refund = stored_id(&c, &d.url("/hooks/shop"), &refund_req).await;
    let jobs = crate::delivery::settled_jobs(&c, &d, &paid, 2, Duration::from_secs(20)).await;
    let dead_key = jobs.iter().find(|j| j["state"] == "dead").unwrap()["key"]
        .as_str()
        .unwrap()
        .to_string();
    crate::delivery::settled_jobs(&c, &d, &refund, 1, Duration::from_secs(20)).await;

    // Older than 3 s: purged by the next pass.
    let deadline = Instant::now() + Duration::from_secs(20);
    let ev = loop {
        let ev = api(&c, &d, "GET", &format!("/api/events/{refund}"), None)
            .await
            .json();
        if ev["purged_at_ms"].is_u64() {
            break ev;
        }
        assert!(Instant::now() < deadline, "not purged: {ev:#}\n{}", d.log());
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(ev["payload"], Value::Null, "{ev:#}");
    assert_eq!(ev["trace"], Value::Null, "{ev:#}");
    assert_eq!(ev["jobs"], json!([]), "the delivered job went too: {ev:#}");
    assert_eq!(ev["event_type"], "refunds/create", "the metadata stays");
    assert_eq!(
        ev["headers"],
        json!([]),
        "the request headers go with the payload: {ev:#}"
    );
    // A late re-delivery is still recognised.
    let again = post(&c, &d.url("/hooks/shop"), &refund_req).await.json();
    assert_eq!(again["duplicate"], true);
    assert_eq!(again["id"], refund.as_str());
    // It cannot be run again.
    let a = api(
        &c,
        &d,
        "POST",
        &format!("/api/events/{refund}/replay"),
        Some(json!({})),
    )
    .await;
    assert_eq!(a.status, 409, "{}", a.body);

    // The event holding a dead letter is kept whole: its payload, the dead letter, and its
    // delivered job (a replay must still see it was delivered, and not send it again).
    let ev = api(&c, &d, "GET", &format!("/api/events/{paid}"), None)
        .await
        .json();
    assert!(ev["purged_at_ms"].is_null(), "{ev:#}");
    assert_eq!(ev["payload"]["total_price"], "125.50");
    let mut states: Vec<&str> = ev["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["state"].as_str().unwrap())
        .collect();
    states.sort();
    assert_eq!(states, ["dead", "delivered"], "{ev:#}");
    let plan = api(
        &c,
        &d,
        "POST",
        &format!("/api/events/{paid}/replay"),
        Some(json!({})),
    )
    .await
    .json();
    let sends: Vec<&str> = plan["changes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["sends"] == true)
        .map(|c| c["key"].as_str().unwrap())
        .collect();
    assert_eq!(
        sends,
        [dead_key.as_str()],
        "only the dead letter would be sent again: {plan:#}"
    );
    let dlq = api(&c, &d, "GET", "/api/dlq", None).await.json();
    assert_eq!(dlq["dead_letters"][0]["key"], dead_key.as_str());

    // The counts are kept (added, then logged, once the pass ends: waited for).
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = api(&c, &d, "GET", "/api/connectors", None).await.json();
        let counted = r["purged_events"].as_u64().unwrap_or(0) >= 1
            && r["purged_jobs"].as_u64().unwrap_or(0) >= 1;
        if counted
            && d.log()
                .contains("retention: purged payloads and traces older than 3s")
        {
            break;
        }
        assert!(Instant::now() < deadline, "{r:#}\n{}", d.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Known secrets go in (source secrets, sink credentials, the admin token, a token the
/// gift-card API mints); traffic runs through success and failure paths; none of them may
/// appear in the log (at debug level) or anything the API, the status page, the metrics or
/// the CLI show.
#[tokio::test]
async fn no_secret_appears_in_logs_or_any_output() {
    let creds = perkflow::sandbox::Credentials {
        twilio_token: "SECRET-twilio-7f3a9c".into(),
        sendgrid_key: "SG.SECRET-sendgrid-41be07".into(),
        giftcard_access_token: "SECRET-giftcard-c0ffee".into(),
        ..Default::default()
    };
    let sb = perkflow::sandbox::Sandbox::new(creds);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let stop = tokio_util::sync::CancellationToken::new();
    tokio::spawn(perkflow::sandbox::serve(sb.clone(), listener, stop.clone()));
    let _stop = stop.drop_guard();

    let secrets = [
        "SECRET-shop-5d1e2f",
        "SECRET-twilio-7f3a9c",
        "SG.SECRET-sendgrid-41be07",
        "SECRET-giftcard-c0ffee",
        "SECRET-admin-9b8a7c",
        "SECRET-slack-bot-0a0b",
        "gc-token-",
    ];
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("pipelines")).unwrap();
    std::fs::write(
        dir.path().join("pipelines/p.yaml"),
        "pipeline: p\non: { source: shop, events: [orders/paid] }\nsteps:\n  - deliver: { to: sms.send_sms, with: { to: \"+15555550123\", body: hi } }\n  - deliver: { to: email.send, with: { to: a@example.com, subject: hi, text: hi } }\n  - deliver: { to: rewards.order, with: { product: CVS, value: 5, email: a@example.com } }\n  - deliver: { to: team.post_message, with: { text: hi } }\n",
    )
    .unwrap();
    std::fs::write(dir.path().join("shop.secret"), "SECRET-shop-5d1e2f").unwrap();
    let config = format!(
        "admin_token: SECRET-admin-9b8a7c\nsources:\n  shop: {{ connector: shopify, secret: \"${{file:shop.secret}}\" }}\nsinks:\n  sms: {{ connector: twilio_sms, account_sid: AC00000000000000000000000000000000, auth_token: SECRET-twilio-7f3a9c, from: \"+15550100\", base_url: \"{url}/twilio\" }}\n  email: {{ connector: sendgrid, api_key: SG.SECRET-sendgrid-41be07, from: rewards@example.com, base_url: \"{url}/sendgrid\" }}\n  rewards: {{ connector: giftcard, email: dev@example.com, access_token: SECRET-giftcard-c0ffee, base_url: \"{url}/giftcard\" }}\n  team: {{ connector: slack, webhook_url: \"{url}/slack/services/T1/B1/x\", bot_token: SECRET-slack-bot-0a0b, channel: C1, base_url: \"{url}/slack\" }}\n"
    );
    let d = Daemon::start_in(dir.path(), &config).unwrap();
    let c = client();
    let good = sign_fixture(
        "shopify",
        "shopify/orders-paid.json",
        &keys(&["SECRET-shop-5d1e2f"]),
        "",
        0,
    );
    let id = stored_id(&c, &d.url("/hooks/shop"), &good).await;
    // A forged webhook, and a wrong admin token.
    let forged = sign_fixture(
        "shopify",
        "shopify/orders-paid.json",
        &keys(&["guess"]),
        "",
        0,
    )
    .set("X-Shopify-Event-Id", "forged");
    assert_eq!(post(&c, &d.url("/hooks/shop"), &forged).await.status, 401);
    assert_eq!(
        send(
            c.get(d.url("/api/events"))
                .bearer_auth("SECRET-admin-9b8a7")
        )
        .await
        .status,
        401
    );
    // Every delivery settles: Twilio, SendGrid and the gift card succeed; Slack refuses the bot
    // token (the sandbox knows another one): a dead letter with the vendor's answer.
    let admin = |path: String| {
        let c = c.clone();
        let url = d.url(&path);
        async move { send(c.get(url).bearer_auth("SECRET-admin-9b8a7c")).await }
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ev = admin(format!("/api/events/{id}")).await.json();
        let jobs = ev["jobs"].as_array().cloned().unwrap_or_default();
        if jobs.len() >= 4
            && jobs
                .iter()
                .all(|j| matches!(j["state"].as_str(), Some("delivered" | "dead")))
        {
            assert!(
                jobs.iter()
                    .any(|j| j["sink"] == "team" && j["state"] == "dead"),
                "{jobs:#?}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "{ev:#}\n{}", d.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut shown = vec![
        ("log", d.log()),
        ("events", admin("/api/events".into()).await.body),
        ("event", admin(format!("/api/events/{id}")).await.body),
        ("jobs", admin("/api/jobs".into()).await.body),
        ("dlq", admin("/api/dlq".into()).await.body),
        ("connectors", admin("/api/connectors".into()).await.body),
        ("status page", admin("/".into()).await.body),
        ("event page", admin(format!("/ui/events/{id}")).await.body),
        ("metrics", get(&c, &d.url("/metrics")).await.body),
    ];
    for args in [
        vec!["check"],
        vec!["run", "p", "--fixture", "orders-paid.json"],
    ] {
        std::fs::copy(
            repo("fixtures/shopify/orders-paid.json"),
            dir.path().join("orders-paid.json"),
        )
        .unwrap();
        std::fs::copy(
            repo("fixtures/shopify/orders-paid.headers.yaml"),
            dir.path().join("orders-paid.headers.yaml"),
        )
        .unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_perkflow"))
            .args(&args)
            .current_dir(dir.path())
            .output()
            .unwrap();
        shown.push((
            "cli",
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        ));
    }
    assert!(
        shown[0].1.contains("DEBUG"),
        "the log scanned is at debug level"
    );
    assert!(
        shown.iter().any(|(_, t)| t.contains("[redacted]")),
        "credentials were shown masked"
    );
    for (what, text) in &shown {
        for s in secrets {
            assert!(!text.contains(s), "{what} shows the secret {s}:\n{text}");
        }
    }
}
