//! Scheduled pipelines with the daemon as a real process: a campaign run over 300 members
//! (walked one member per step, so that it takes seconds), interrupted by kill -9 while its
//! cursor is mid-way and resumed on restart, texts every member at most once
//! (and exactly once unless a send's outcome was lost in the crash, which is dead-lettered,
//! never resent).

use crate::delivery::{api, TOKEN};
use crate::helpers::*;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::time::{Duration, Instant};

const MEMBERS: usize = 300;

/// (The sandbox's Twilio refuses numbers ending in 0000 as unsubscribed.)
fn phone(i: usize) -> String {
    format!("+155501{i:03}9")
}

fn project(sandbox: &str) -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("pipelines")).unwrap();
    std::fs::write(
        dir.path().join("pipelines/campaign.yaml"),
        r#"pipeline: campaign
on:
  schedule: { cron: "0 0 1 1 *", members: all, where: "member.phone", batch: 1 }
steps:
  - deliver:
      to: sms.send_sms
      with: { to: "{{ event.member.phone }}", body: "Hi {{ event.member.id }}: double points this weekend." }
"#,
    )
    .unwrap();
    // 40 texts a second: the 300 take over 7 s, so the kill lands mid-run.
    let config = format!(
        "admin_token: {TOKEN}\nsources:\n  shop: {{ connector: shopify, secret: s }}\nsinks:\n  sms: {{ connector: twilio_sms, account_sid: AC00000000000000000000000000000000, auth_token: dev-twilio-token, from: \"+15550100\", base_url: \"{sandbox}/twilio\", rate: 40/s }}\n"
    );
    (dir, config)
}

/// Texts the sandbox accepted, per number.
fn texts(sb: &perkflow::sandbox::Sandbox) -> HashMap<String, usize> {
    let mut out = HashMap::new();
    for r in sb.received() {
        if r.vendor == "twilio" && r.status == 201 {
            let to = r.body["To"].as_str().unwrap_or("").to_string();
            *out.entry(to).or_default() += 1;
        }
    }
    out
}

#[tokio::test]
async fn a_schedule_interrupted_by_kill_9_resumes_without_duplicates() {
    let (sb, url, _stop) = sandbox().await;
    let (dir, config) = project(&url);
    let mut d = Daemon::start_in(dir.path(), &config).unwrap();
    let c = client();
    for i in 0..MEMBERS {
        // Every third member has no phone number: the schedule's `where` skips them.
        let profile = if i % 3 == 2 {
            json!({ "email": format!("m{i}@example.com") })
        } else {
            json!({ "email": format!("m{i}@example.com"), "phone": phone(i) })
        };
        let a = api(
            &c,
            &d,
            "PUT",
            &format!("/api/members/m{i:03}/profile"),
            Some(profile),
        )
        .await;
        assert_eq!(a.status, 200, "{}", a.body);
    }
    let texted: Vec<String> = (0..MEMBERS).filter(|i| i % 3 != 2).map(phone).collect();
    // An alias names the member.
    let m = api(&c, &d, "GET", "/api/members/m1@example.com", None)
        .await
        .json();
    assert_eq!(m["member"], "m001", "{m:#}");
    assert_eq!(m["profile"]["phone"], phone(1));

    let listed = api(&c, &d, "GET", "/api/schedules", None).await.json();
    assert_eq!(listed["schedules"][0]["pipeline"], "campaign", "{listed:#}");
    assert_eq!(listed["schedules"][0]["run"], Value::Null);
    let started = api(&c, &d, "POST", "/api/schedules/campaign/run", None).await;
    assert_eq!(started.status, 202, "{}", started.body);
    // A second start while the run is under way is refused.
    let again = api(&c, &d, "POST", "/api/schedules/campaign/run", None).await;
    assert_eq!(again.status, 409, "{}", again.body);

    // Kill it for real once a quarter of the texts went out.
    let deadline = Instant::now() + Duration::from_secs(30);
    while texts(&sb).values().sum::<usize>() < texted.len() / 4 {
        assert!(Instant::now() < deadline, "the run did not start sending");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The run is under way (a member at a time, 20 a second): the kill lands mid-run.
    let state = api(&c, &d, "GET", "/api/schedules", None).await.json();
    assert!(
        state["schedules"][0]["run"]["cursor"].is_string(),
        "the run should be under way: {state:#}"
    );
    d.kill9();
    let at_kill = texts(&sb).values().sum::<usize>();
    assert!(
        at_kill < texted.len(),
        "the kill came too late to test anything"
    );

    let d = Daemon::start_in(dir.path(), &config).unwrap();
    // Drained: every texted member got the text, or its send is a dead letter (an attempt
    // in flight at the kill, whose outcome is unknown: never resent).
    let deadline = Instant::now() + Duration::from_secs(60);
    let (sent, dead) = loop {
        let sent = texts(&sb);
        let dlq = api(&c, &d, "GET", "/api/dlq?limit=500", None).await.json();
        let dead: Vec<Value> = dlq["dead_letters"].as_array().cloned().unwrap_or_default();
        let run_done = api(&c, &d, "GET", "/api/schedules", None).await.json()["schedules"][0]
            ["run"]
            .is_null();
        let settled = texted
            .iter()
            .all(|p| sent.contains_key(p) || dead.iter().any(|j| j["with"]["to"] == p.as_str()));
        if run_done && settled {
            break (sent, dead);
        }
        if Instant::now() > deadline {
            let missing: Vec<&String> = texted.iter().filter(|p| !sent.contains_key(*p)).collect();
            let jobs = api(&c, &d, "GET", "/api/jobs?limit=1000", None)
                .await
                .json();
            let theirs: Vec<&Value> = jobs["jobs"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter(|j| missing.iter().any(|m| j["with"]["to"] == m.as_str()))
                        .collect()
                })
                .unwrap_or_default();
            let events = api(&c, &d, "GET", "/api/events?source=schedule&limit=500", None)
                .await
                .json();
            panic!(
                "not drained: {} texted, {} dead of {}; missing {missing:?}; their jobs {theirs:#?}; {} events\n{}",
                sent.len(),
                dead.len(),
                texted.len(),
                events["events"].as_array().map(|a| a.len()).unwrap_or(0),
                d.log()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let twice: Vec<_> = sent.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "texted twice: {twice:?}");
    assert!(
        sent.keys().all(|to| texted.contains(to)),
        "only members with a phone number are texted"
    );
    // Not texted: only a send in flight at the kill (its outcome lost, so dead-lettered for
    // an operator rather than resent). A dead letter may also be a text that did arrive.
    let missing: Vec<&String> = texted.iter().filter(|p| !sent.contains_key(*p)).collect();
    assert!(missing.len() <= dead.len(), "{missing:?} {dead:#?}");
    assert!(
        dead.len() <= 4,
        "at most the sink's concurrency was in flight: {dead:#?}"
    );
    for j in &dead {
        assert!(
            j["reason"].as_str().unwrap_or("").contains("unknown"),
            "only sends whose outcome the crash lost are dead: {j:#}"
        );
    }
    // The run finished and is recorded as the last fire.
    let listed = api(&c, &d, "GET", "/api/schedules", None).await.json();
    assert!(listed["schedules"][0]["last_fire_ms"].as_u64().is_some());
}
