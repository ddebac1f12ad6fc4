//! Hot reload with the daemon as a real process: a pipeline file change is picked up by the
//! watcher; a configuration with problems keeps the old one running and shows the problems
//! (API, status page, `/api/reload`'s answer); SIGHUP re-reads a rotated credential file; and
//! reloads, valid and invalid, in the middle of a stream of webhooks lose and duplicate
//! nothing.

use crate::delivery::{api, order, settled_jobs, TOKEN};
use crate::helpers::*;
use serde_json::Value;
use std::time::{Duration, Instant};

const SMS: &str = "pipeline: p\non: { source: shop, events: [orders/paid] }\nsteps:\n  - deliver: { to: sms.send_sms, with: { to: \"+15555550123\", body: \"order {{ event_id }}\" } }\n";
const EMAIL: &str = "pipeline: p\non: { source: shop, events: [orders/paid] }\nsteps:\n  - deliver: { to: email.send, with: { to: a@example.com, subject: hi, text: \"order {{ event_id }}\" } }\n";

fn config(sandbox: &str, sms_extra: &str) -> String {
    format!(
        "admin_token: {TOKEN}\nsources:\n  shop: {{ connector: shopify, secret: s }}\nsinks:\n  sms: {{ connector: twilio_sms, account_sid: AC00000000000000000000000000000000, auth_token: \"${{file:twilio-token}}\", from: \"+15550100\", base_url: \"{sandbox}/twilio\"{sms_extra} }}\n  email: {{ connector: sendgrid, api_key: SG.dev-key, from: rewards@example.com, base_url: \"{sandbox}/sendgrid\" }}\n"
    )
}

async fn connectors(c: &reqwest::Client, d: &Daemon) -> Value {
    api(c, d, "GET", "/api/connectors", None).await.json()
}

/// Polls `/api/connectors` (bounded) until `done` holds.
async fn until(
    c: &reqwest::Client,
    d: &Daemon,
    what: &str,
    done: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = connectors(c, d).await;
        if done(&r) {
            return r;
        }
        assert!(Instant::now() < deadline, "{what}: {r:#}\n{}", d.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn ingest(c: &reqwest::Client, d: &Daemon, i: usize) -> String {
    stored_id(c, &d.url("/hooks/shop"), &order(i)).await
}

/// The SMS pipeline, and the Twilio token in a file (`${file:twilio-token}`).
fn project() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("pipelines")).unwrap();
    std::fs::write(dir.path().join("pipelines/p.yaml"), SMS).unwrap();
    std::fs::write(dir.path().join("twilio-token"), "dev-twilio-token").unwrap();
    dir
}

#[tokio::test]
async fn changes_are_checked_before_they_replace_the_running_config() {
    let (_sb, url, _stop) = sandbox().await;
    let dir = project();
    let d = Daemon::start_in(dir.path(), &config(&url, "")).unwrap();
    let c = client();
    let first = ingest(&c, &d, 1).await;
    let j = settled_jobs(&c, &d, &first, 1, Duration::from_secs(20)).await;
    assert_eq!(
        (j[0]["sink"].as_str(), j[0]["state"].as_str()),
        (Some("sms"), Some("delivered"))
    );
    let loaded = connectors(&c, &d).await["config_loaded_at_ms"]
        .as_u64()
        .unwrap();

    // The pipeline file changes: the watcher reloads; new events take the new pipeline.
    std::fs::write(dir.path().join("pipelines/p.yaml"), EMAIL).unwrap();
    until(&c, &d, "reload after a file change", |r| {
        r["config_loaded_at_ms"].as_u64().unwrap() > loaded
    })
    .await;
    let second = ingest(&c, &d, 2).await;
    let j = settled_jobs(&c, &d, &second, 1, Duration::from_secs(20)).await;
    assert_eq!(j[0]["sink"], "email", "{j:#?}");

    // A broken pipeline: refused, the problems shown, the previous config keeps running.
    std::fs::write(
        dir.path().join("pipelines/p.yaml"),
        EMAIL.replace("email.send", "emial.send"),
    )
    .unwrap();
    let r = until(&c, &d, "a refused reload", |r| !r["config_error"].is_null()).await;
    let problems = r["config_error"].as_str().unwrap();
    assert!(
        problems.contains(
            "p.yaml:4:20: steps[0].deliver.to: unknown sink `emial` (did you mean `email`?)"
        ),
        "{problems}"
    );
    let third = ingest(&c, &d, 3).await;
    let j = settled_jobs(&c, &d, &third, 1, Duration::from_secs(20)).await;
    assert_eq!(j[0]["sink"], "email", "still the previous pipeline: {j:#?}");
    let page = send(c.get(d.url("/")).bearer_auth(TOKEN)).await.body;
    assert!(
        page.contains("id=\"config-error\"") && page.contains("unknown sink `emial`"),
        "{page}"
    );
    assert!(d
        .log()
        .contains("the new configuration has problems; the previous one keeps running"));
    // POST /api/reload says the same, with every problem.
    let a = api(&c, &d, "POST", "/api/reload", None).await;
    assert_eq!(a.status, 422, "{}", a.body);
    let body = a.json();
    assert!(
        body["problems"][0]
            .as_str()
            .unwrap()
            .contains("unknown sink `emial`"),
        "{body:#}"
    );

    // Fixed: the error clears.
    std::fs::write(dir.path().join("pipelines/p.yaml"), SMS).unwrap();
    let a = api(&c, &d, "POST", "/api/reload", None).await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(a.json()["summary"]["pipelines"], 1);
    // The daemon was started with --listen: not a change that needs a restart.
    assert_eq!(
        a.json()["summary"]["need_restart"],
        serde_json::json!([]),
        "{}",
        a.body
    );
    // A new admin token and a new API key take effect at the next start: the reload says
    // so (the running token still works meanwhile).
    let cfg_path = dir.path().join("perkflow.yaml");
    let running = std::fs::read_to_string(&cfg_path).unwrap();
    std::fs::write(
        &cfg_path,
        format!(
            "{}api_keys:\n  pos: {{ key: a-new-key-0123456789, scopes: [members:read] }}\n",
            running.replace(TOKEN, "a-new-admin-token")
        ),
    )
    .unwrap();
    let a = api(&c, &d, "POST", "/api/reload", None).await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(
        a.json()["summary"]["need_restart"],
        serde_json::json!(["admin_token", "api_keys"]),
        "{}",
        a.body
    );
    std::fs::write(&cfg_path, running).unwrap();
    let a = api(&c, &d, "POST", "/api/reload", None).await;
    assert_eq!(a.json()["summary"]["need_restart"], serde_json::json!([]));
    assert!(connectors(&c, &d).await["config_error"].is_null());

    // A credential rotated in its file (not watched): SIGHUP re-reads it. Until then the
    // vendor refuses the old one.
    let r = c
        .post(format!("{url}/_sandbox/reset"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    std::fs::write(dir.path().join("twilio-token"), "old-token").unwrap();
    let a = api(&c, &d, "POST", "/api/reload", None).await;
    assert_eq!(a.status, 200, "{}", a.body);
    let refused = ingest(&c, &d, 4).await;
    let j = settled_jobs(&c, &d, &refused, 1, Duration::from_secs(20)).await;
    assert_eq!(j[0]["state"], "dead", "{j:#?}");
    std::fs::write(dir.path().join("twilio-token"), "dev-twilio-token").unwrap();
    let before = connectors(&c, &d).await["config_loaded_at_ms"]
        .as_u64()
        .unwrap();
    let status = std::process::Command::new("kill")
        .args(["-HUP", &d.pid().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    until(&c, &d, "reload on SIGHUP", |r| {
        r["config_loaded_at_ms"].as_u64().unwrap() > before
    })
    .await;
    let fifth = ingest(&c, &d, 5).await;
    let j = settled_jobs(&c, &d, &fifth, 1, Duration::from_secs(20)).await;
    assert_eq!(
        j[0]["state"], "delivered",
        "the rotated credential is used: {j:#?}"
    );
    assert!(
        !d.log().contains("dev-twilio-token"),
        "credentials are never logged"
    );
}

#[tokio::test]
async fn reloads_during_a_stream_lose_and_duplicate_nothing() {
    let (sb, url, _stop) = sandbox().await;
    let dir = project();
    let d = Daemon::start_in(dir.path(), &config(&url, "")).unwrap();
    let c = client();
    const N: usize = 300;
    let sender = {
        let (c, base) = (c.clone(), d.base.clone());
        tokio::spawn(async move {
            let mut ids = Vec::new();
            for chunk in (0..N).collect::<Vec<_>>().chunks(8) {
                let mut set = tokio::task::JoinSet::new();
                for i in chunk {
                    let (c, url, i) = (c.clone(), format!("{base}/hooks/shop"), *i);
                    set.spawn(async move { post(&c, &url, &order(1000 + i)).await });
                }
                while let Some(a) = set.join_next().await {
                    let a = a.unwrap();
                    assert_eq!(a.status, 200, "{}", a.body);
                    ids.push(a.json()["id"].as_str().unwrap().to_string());
                }
                // A steady stream, so that the reloads below land in the middle of it.
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            ids
        })
    };
    // Meanwhile: reload again and again, alternating a setting of the SMS sink (its lane is
    // rebuilt each time, with attempts in flight on the old one).
    let mut reloads = 0;
    // Every third change is invalid (an unknown sink setting): refused, the running config
    // stays, and the stream does not notice.
    let mut refused = 0;
    while !sender.is_finished() {
        let extra = match reloads % 3 {
            0 => ", rate: 500",
            1 => ", rate: 400",
            _ => ", rat: 400",
        };
        std::fs::write(dir.path().join("perkflow.yaml"), config(&url, extra)).unwrap();
        let a = api(&c, &d, "POST", "/api/reload", None).await;
        if reloads % 3 == 2 {
            assert_eq!(a.status, 422, "{}", a.body);
            refused += 1;
        } else {
            assert_eq!(a.status, 200, "{}", a.body);
        }
        reloads += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        reloads >= 5 && refused >= 1,
        "only {reloads} reloads during the stream"
    );
    let ids = sender.await.unwrap();
    assert_eq!(ids.len(), N);
    for id in &ids {
        let j = settled_jobs(&c, &d, id, 1, Duration::from_secs(60)).await;
        assert_eq!(j.len(), 1);
        assert_eq!(j[0]["state"], "delivered", "{j:#?}");
    }
    // Exactly one SMS per webhook reached the vendor.
    let sent = sb
        .received()
        .iter()
        .filter(|r| r.vendor == "twilio" && r.status == 201)
        .count();
    assert_eq!(sent, N, "one SMS per event");
}
