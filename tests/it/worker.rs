//! Stored events run through their pipelines; the resulting jobs land in the outbox with the
//! mark that the event is processed: exactly one job per action, even across a kill -9 in
//! the middle of processing. Failed runs are listed and re-run once the pipeline is fixed.

use crate::helpers::*;
use std::time::{Duration, Instant};

const TOKEN: &str = "worker-admin-token";
const CONFIG: &str = "admin_token: worker-admin-token\nsources:\n  shop: { connector: shopify, secret: s }\nsinks:\n  sms: { connector: twilio_sms, account_sid: a, auth_token: b, base_url: \"http://127.0.0.1:9\" }\n  team: { connector: slack, webhook_url: \"http://127.0.0.1:9/x\" }\n";

const SMS: &str = "pipeline: sms\non: { source: shop, events: [orders/paid] }\nsteps:\n  - set: { points: \"{{ (event.total_price | money(event.currency)).minor // 10 }}\" }\n  - deliver: { to: sms.send_sms, with: { to: \"{{ event.customer.phone }}\", body: \"{{ points }} points\" } }\n";
const SLACK: &str = "pipeline: slack\non: { source: shop, events: [orders/paid] }\nsteps:\n  - deliver: { to: team.post, with: { text: \"order {{ event.id }}\" } }\n";

fn project() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("pipelines")).unwrap();
    std::fs::write(dir.path().join("pipelines/sms.yaml"), SMS).unwrap();
    std::fs::write(dir.path().join("pipelines/slack.yaml"), SLACK).unwrap();
    dir
}

async fn jobs(c: &reqwest::Client, d: &Daemon) -> Vec<serde_json::Value> {
    let a = send(c.get(d.url("/api/jobs?limit=1000")).bearer_auth(TOKEN)).await;
    assert_eq!(a.status, 200, "{}", a.body);
    a.json()["jobs"].as_array().cloned().unwrap_or_default()
}

/// Polls (bounded) until the outbox holds `n` jobs.
async fn wait_for_jobs(c: &reqwest::Client, d: &Daemon, n: usize) -> Vec<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let j = jobs(c, d).await;
        if j.len() >= n || Instant::now() > deadline {
            return j;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn order(i: usize) -> Signed {
    sign_fixture("shopify", "shopify/orders-paid.json", &keys(&["s"]), "", 0)
        .set("X-Shopify-Event-Id", &format!("order-{i}"))
}

#[tokio::test]
async fn an_event_feeds_every_subscribed_pipeline_once() {
    let dir = project();
    let d = Daemon::start_in(dir.path(), CONFIG).unwrap();
    let c = client();
    let id = stored_id(&c, &d.url("/hooks/shop"), &order(1)).await;
    let ev = processed(&c, &d, TOKEN, &id, Duration::from_secs(20)).await;
    let j = wait_for_jobs(&c, &d, 2).await;
    assert_eq!(j.len(), 2, "{j:?}");
    let sms = j.iter().find(|x| x["sink"] == "sms").expect("sms job");
    assert_eq!(sms["action"], "send_sms");
    assert_eq!(sms["with"]["body"], "1255 points");
    assert_eq!(sms["event_id"], id.as_str());
    assert!(j
        .iter()
        .any(|x| x["sink"] == "team" && x["with"]["text"] == "order 6012345678901"));
    // The event is processed and carries both runs in its trace.
    assert_eq!(ev["trace"].as_array().map(Vec::len), Some(2), "{ev}");
    // A re-delivery adds nothing.
    assert_eq!(
        post(&c, &d.url("/hooks/shop"), &order(1)).await.json()["duplicate"],
        true
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(jobs(&c, &d).await.len(), 2);
}

#[tokio::test]
async fn kill_9_while_processing_leaves_exactly_one_job_per_action() {
    let dir = project();
    let mut d = Daemon::start_in(dir.path(), CONFIG).unwrap();
    let c = client();
    const N: usize = 400;
    let mut acked = Vec::new();
    for i in 0..N {
        let a = post(&c, &d.url("/hooks/shop"), &order(i)).await;
        assert_eq!(a.status, 200, "{}", a.body);
        acked.push(a.json()["id"].as_str().unwrap().to_string());
    }
    // Processing is under way (or not even started): kill it for real.
    d.kill9();
    let d = Daemon::start_in(dir.path(), CONFIG).unwrap();
    let j = wait_for_jobs(&c, &d, 2 * N).await;
    assert_eq!(
        j.len(),
        2 * N,
        "expected one job per action of every acknowledged event"
    );
    let mut keys = std::collections::HashSet::new();
    for job in &j {
        assert!(
            keys.insert(job["key"].as_str().unwrap().to_string()),
            "duplicate job {job}"
        );
    }
    let events: std::collections::HashSet<&str> =
        j.iter().map(|x| x["event_id"].as_str().unwrap()).collect();
    assert_eq!(events.len(), N);
    for id in &acked {
        assert!(
            events.contains(id.as_str()),
            "no job for acknowledged event {id}"
        );
    }
}

/// Runs the CLI against the daemon's admin API.
fn cli(d: &Daemon, args: &[&str]) -> (Option<i32>, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_perkflow"))
        .args(args)
        .args(["--url", &d.base, "--token", TOKEN])
        .output()
        .unwrap();
    (
        out.status.code(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[tokio::test]
async fn failed_runs_are_listed_and_re_run_once_the_pipeline_is_fixed() {
    let dir = project();
    // The SMS pipeline reads a field the order does not have: its run fails.
    std::fs::write(
        dir.path().join("pipelines/sms.yaml"),
        SMS.replace("event.total_price", "event.totl_price"),
    )
    .unwrap();
    let mut d = Daemon::start_in(dir.path(), CONFIG).unwrap();
    let c = client();
    let failed = stored_id(&c, &d.url("/hooks/shop"), &order(1)).await;
    processed(&c, &d, TOKEN, &failed, Duration::from_secs(20)).await;
    wait_for_jobs(&c, &d, 1).await;
    let list = |q: &'static str| {
        let c = c.clone();
        let url = d.url(&format!("/api/events{q}"));
        async move {
            let a = send(c.get(url).bearer_auth(TOKEN)).await;
            (a.status, a.json())
        }
    };
    let (status, page) = list("?outcome=failed").await;
    assert_eq!(status, 200);
    let events = page["events"].as_array().unwrap();
    assert_eq!(events.len(), 1, "{page:#}");
    assert_eq!(events[0]["id"], failed.as_str());
    let mut runs: Vec<(String, String)> = events[0]["runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["pipeline"].as_str().unwrap().into(),
                r["outcome"].as_str().unwrap().into(),
            )
        })
        .collect();
    runs.sort();
    assert_eq!(
        runs,
        [
            ("slack".into(), "completed".into()),
            ("sms".into(), "failed".into())
        ]
    );
    assert_eq!(
        list("?outcome=filtered").await.1["events"],
        serde_json::json!([])
    );
    assert_eq!(list("?outcome=bogus").await.0, 400);
    let (code, out) = cli(&d, &["events", "list", "--outcome", "failed"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.lines()
            .any(|l| l.starts_with(&failed) && l.contains("failed:1")),
        "{out}"
    );

    // Fixed and restarted: a replay runs both pipelines again; only the new SMS job is
    // queued (the Slack job is unchanged and keeps its key).
    d.terminate();
    std::fs::write(dir.path().join("pipelines/sms.yaml"), SMS).unwrap();
    let d = Daemon::start_in(dir.path(), CONFIG).unwrap();
    let (code, out) = cli(&d, &["events", "replay", &failed, "--yes"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("yes") && l.contains("new") && l.contains("sms.send_sms")),
        "{out}"
    );
    assert!(
        out.lines()
            .any(|l| l.starts_with("no") && l.contains("unchanged") && l.contains("team.post")),
        "{out}"
    );
    let j = wait_for_jobs(&c, &d, 2).await;
    assert_eq!(j.len(), 2, "{j:#?}");
    let sms = j.iter().find(|x| x["sink"] == "sms").expect("sms job");
    assert_eq!(sms["with"]["body"], "1255 points");
}
