//! The status page in a real headless browser (Debian's Chromium through ChromeDriver, both
//! installed by `scripts/install-test-deps.sh`): sign in with the admin token, read the
//! connector rows, click through to a failed run's trace, replay a dead letter.

use crate::delivery::{api, order, TOKEN};
use crate::helpers::*;
use fantoccini::{ClientBuilder, Locator};
use serde_json::json;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// ChromeDriver on a free 127.0.0.1 port, stopped (by its PID) on drop.
struct Driver {
    child: Child,
    url: String,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn chromedriver() -> Driver {
    let port = free_port();
    let child = Command::new("chromedriver")
        .arg(format!("--port={port}"))
        .arg("--allowed-ips=127.0.0.1")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("cannot start chromedriver ({e}): run scripts/install-test-deps.sh (scripts/test.sh does)")
        });
    let url = format!("http://127.0.0.1:{port}");
    let driver = Driver { child, url };
    let c = client();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let ready = c
            .get(format!("{}/status", driver.url))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200);
        if ready {
            break;
        }
        assert!(Instant::now() < deadline, "chromedriver did not start");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    driver
}

/// The element, once the page that has it has loaded (a click that submits a form returns
/// before the next page is there).
async fn wait(
    b: &fantoccini::Client,
    what: Locator<'_>,
) -> Result<fantoccini::elements::Element, fantoccini::error::CmdError> {
    b.wait()
        .at_most(Duration::from_secs(20))
        .for_element(what)
        .await
}

#[tokio::test]
async fn the_status_page_shows_connectors_links_to_traces_and_replays_dead_letters() {
    let (_sb, url, _stop) = sandbox().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("pipelines")).unwrap();
    // `points` reads a field the order does not have: that run fails.
    std::fs::write(
        dir.path().join("pipelines/notify.yaml"),
        "pipeline: notify\non: { source: shop, events: [orders/paid] }\nsteps:\n  - deliver: { to: sms.send_sms, with: { to: \"+15555550123\", body: hi } }\n  - deliver: { to: email.send, with: { to: a@example.com, subject: hi, text: hi } }\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("pipelines/points.yaml"),
        "pipeline: points\non: { source: shop, events: [orders/paid] }\nsteps:\n  - set: { points: \"{{ event.totl_price | int }}\" }\n",
    )
    .unwrap();
    let config = format!(
        "admin_token: {TOKEN}\nsources:\n  shop: {{ connector: shopify, secret: s }}\nsinks:\n  sms: {{ connector: twilio_sms, account_sid: AC00000000000000000000000000000000, auth_token: wrong-token, from: \"+15550100\", base_url: \"{url}/twilio\" }}\n  email: {{ connector: sendgrid, api_key: SG.dev-key, from: rewards@example.com, base_url: \"{url}/sendgrid\" }}\n"
    );
    let d = Daemon::start_in(dir.path(), &config).unwrap();
    let c = client();
    let event = stored_id(&c, &d.url("/hooks/shop"), &order(1)).await;
    // Wait until the SMS is a dead letter (refused credentials) and the e-mail delivered.
    let deadline = Instant::now() + Duration::from_secs(30);
    let dead_key = loop {
        let dlq = api(&c, &d, "GET", "/api/dlq", None).await.json();
        if let Some(k) = dlq["dead_letters"][0]["key"].as_str() {
            break k.to_string();
        }
        assert!(Instant::now() < deadline, "no dead letter: {dlq:#}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };

    let driver = chromedriver().await;
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        json!({
            "binary": "/usr/bin/chromium",
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-proxy-server"]
        }),
    );
    let b = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(caps)
        .connect(&driver.url)
        .await
        .expect("a browser session");
    let result = async {
        // Not signed in: the sign-in form. A wrong token is refused.
        b.goto(&d.url("/")).await?;
        b.find(Locator::Id("token"))
            .await?
            .send_keys("not-the-token")
            .await?;
        b.find(Locator::Id("sign-in")).await?.click().await?;
        let err = wait(&b, Locator::Id("login-error")).await?.text().await?;
        assert_eq!(err, "Wrong token.");
        b.find(Locator::Id("token")).await?.send_keys(TOKEN).await?;
        b.find(Locator::Id("sign-in")).await?.click().await?;
        wait(&b, Locator::Id("connectors")).await?;

        // The connector rows.
        let state = |name: &'static str| {
            let b = b.clone();
            async move {
                b.find(Locator::Css(&format!(
                    "#connectors tr[data-connector=\"{name}\"]"
                )))
                .await?
                .attr("data-state")
                .await
            }
        };
        let rows = b.find_all(Locator::Css("#connectors tbody tr")).await?;
        assert_eq!(rows.len(), 3, "shop, sms, email");
        assert_eq!(state("shop").await?.as_deref(), Some("ok"));
        assert_eq!(state("sms").await?.as_deref(), Some("credentials_failing"));
        assert_eq!(state("email").await?.as_deref(), Some("ok"));
        let sms = b
            .find(Locator::Css("#connectors tr[data-connector=\"sms\"]"))
            .await?
            .text()
            .await?;
        assert!(sms.contains("HTTP 401"), "{sms}");

        // A failed run links to its event's trace.
        b.find(Locator::Css(&format!(
            "#failed-runs a[href=\"/ui/events/{event}\"]"
        )))
        .await?
        .click()
        .await?;
        let title = wait(&b, Locator::Id("event-id")).await?.text().await?;
        assert_eq!(title, format!("Event {event}"));
        let failed = b
            .find(Locator::Css(
                "section.run[data-pipeline=\"points\"][data-outcome=\"failed\"] .run-error",
            ))
            .await?
            .text()
            .await?;
        assert!(
            failed.starts_with("pipeline `points`, steps[0].set.points"),
            "{failed}"
        );
        let completed = b
            .find_all(Locator::Css(
                "section.run[data-pipeline=\"notify\"][data-outcome=\"completed\"]",
            ))
            .await?;
        assert_eq!(completed.len(), 1);
        let jobs = b.find_all(Locator::Css("#jobs tbody tr")).await?;
        assert_eq!(jobs.len(), 2);

        // Back to the status page: replay the dead letter with its button.
        b.goto(&d.url("/")).await?;
        wait(&b, Locator::Id("dead-letters")).await?;
        b.find(Locator::Css(&format!(
            "#dead-letters tr[data-job=\"{dead_key}\"] button.replay"
        )))
        .await?
        .click()
        .await?;
        let flash = wait(&b, Locator::Id("flash")).await?.text().await?;
        assert_eq!(
            flash,
            format!("Dead letter {dead_key} queued again (same idempotency key).")
        );
        Ok::<(), fantoccini::error::CmdError>(())
    }
    .await;
    let _ = b.close().await;
    result.expect("browser steps");
    // The replay happened: the job counts it.
    let job = api(&c, &d, "GET", &format!("/api/jobs/{dead_key}"), None)
        .await
        .json();
    assert_eq!(job["replays"], 1, "{job:#}");
}
