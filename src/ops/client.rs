//! The command-line side of the admin API: `perkflow events …` and `perkflow dlq …` talk to
//! a running daemon over HTTP with the admin bearer token.

use crate::config;
use anyhow::Context;
use clap::Subcommand;
use serde_json::{json, Value};
use std::path::PathBuf;

#[derive(clap::Args, Debug, Clone)]
pub struct AdminClient {
    /// Config file, for the daemon's address and admin token.
    #[arg(short, long)]
    pub config: Option<PathBuf>,
    /// Base URL of the daemon (default: http://<listen> from the config).
    #[arg(long)]
    pub url: Option<String>,
    /// Admin bearer token (default: the config's admin_token).
    #[arg(long, env = "PERKFLOW_ADMIN_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}

#[derive(Subcommand, Debug)]
pub enum EventsCommand {
    /// List stored events, newest first.
    List {
        #[command(flatten)]
        admin: AdminClient,
        /// Only this source.
        #[arg(long)]
        source: Option<String>,
        /// Only this event type.
        #[arg(long = "type")]
        event_type: Option<String>,
        /// How many (at most 500).
        #[arg(long, default_value_t = 50)]
        limit: usize,
        /// Only events older than this id (continue a listing).
        #[arg(long)]
        before: Option<String>,
        /// Only events with a pipeline run that ended so (`failed`: the runs to fix, then
        /// `perkflow events replay ID` once the pipeline is fixed).
        #[arg(long, value_parser = ["completed", "filtered", "failed"])]
        outcome: Option<String>,
    },
    /// Show one event: metadata, payload, pipeline runs, and every delivery attempt.
    Show {
        id: String,
        #[command(flatten)]
        admin: AdminClient,
        /// Print the raw JSON instead of the summary.
        #[arg(long)]
        json: bool,
    },
    /// Re-run an event through the current pipelines. Without --yes, only shows what would
    /// change; with it, queues the new and changed actions (same idempotency keys).
    Replay {
        id: String,
        #[command(flatten)]
        admin: AdminClient,
        /// Queue the actions (otherwise a dry run).
        #[arg(long)]
        yes: bool,
        /// Also resend actions that were delivered and did not change.
        #[arg(long)]
        resend_delivered: bool,
    },
}

/// Which dead letters: any combination narrows the set.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct DlqFilter {
    /// Only this sink.
    #[arg(long)]
    pub sink: Option<String>,
    /// Only reasons containing this text.
    #[arg(long)]
    pub reason: Option<String>,
    /// Dead-lettered since: RFC 3339 time or a duration ago (`2h`).
    #[arg(long)]
    pub since: Option<String>,
    /// Dead-lettered before: RFC 3339 time or a duration ago.
    #[arg(long)]
    pub until: Option<String>,
}

impl DlqFilter {
    fn body(&self, all: bool) -> Value {
        let mut b = json!({});
        for (k, v) in [
            ("sink", &self.sink),
            ("reason", &self.reason),
            ("since", &self.since),
            ("until", &self.until),
        ] {
            if let Some(v) = v {
                b[k] = json!(v);
            }
        }
        if all {
            b["all"] = json!(true);
        }
        b
    }
    fn is_empty(&self) -> bool {
        self.sink.is_none() && self.reason.is_none() && self.since.is_none() && self.until.is_none()
    }
}

#[derive(Subcommand, Debug)]
pub enum DlqCommand {
    /// List dead letters, newest first.
    List {
        #[command(flatten)]
        admin: AdminClient,
        #[command(flatten)]
        filter: DlqFilter,
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Show one dead letter with every attempt.
    Show {
        key: String,
        #[command(flatten)]
        admin: AdminClient,
    },
    /// Put dead letters back in the queue (same idempotency key, attempts reset): one by
    /// key, or every one matching a filter (or --all).
    Replay {
        key: Option<String>,
        #[command(flatten)]
        admin: AdminClient,
        #[command(flatten)]
        filter: DlqFilter,
        /// Every dead letter (when no key or filter is given).
        #[arg(long)]
        all: bool,
    },
    /// Remove dead letters from the queue (they stay in the event's trace as dropped).
    Drop {
        key: Option<String>,
        #[command(flatten)]
        admin: AdminClient,
        #[command(flatten)]
        filter: DlqFilter,
        #[arg(long)]
        all: bool,
    },
}

impl AdminClient {
    /// Calls the daemon's admin API and returns its JSON.
    pub fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<Value>,
    ) -> anyhow::Result<Value> {
        let cfg = config::load(self.config.as_deref())
            .map_err(|d| anyhow::anyhow!("invalid configuration:\n{d}"))?;
        let base = self
            .url
            .clone()
            .unwrap_or_else(|| format!("http://{}", cfg.listen));
        let token = match &self.token {
            Some(t) => Some(t.clone()),
            None => match &cfg.admin_token {
                Some(t) => Some(
                    t.resolve(&cfg.base_dir)
                        .map_err(anyhow::Error::msg)?
                        .expose()
                        .to_string(),
                ),
                None => None,
            },
        };
        let url = format!("{}{path}", base.trim_end_matches('/'));
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async {
            let client = reqwest::Client::builder()
                .timeout(std::time::Duration::from_secs(30))
                .build()?;
            let mut req = client.request(method, &url).query(query);
            if let Some(t) = &token {
                req = req.bearer_auth(t);
            }
            if let Some(b) = body {
                req = req.json(&b);
            }
            let resp = req
                .send()
                .await
                .with_context(|| format!("cannot reach the daemon at {base}"))?;
            let status = resp.status();
            let body: Value = resp.json().await.unwrap_or(Value::Null);
            if !status.is_success() {
                let msg = body["error"].as_str().unwrap_or("");
                anyhow::bail!("{url}: HTTP {status} {msg}");
            }
            Ok(body)
        })
    }

    pub(crate) fn get(&self, path: &str, query: &[(&str, String)]) -> anyhow::Result<Value> {
        self.call(reqwest::Method::GET, path, query, None)
    }

    pub(crate) fn post(&self, path: &str, body: Value) -> anyhow::Result<Value> {
        self.call(reqwest::Method::POST, path, &[], Some(body))
    }
}

fn time(ms: Option<u64>) -> String {
    ms.map(|ms| crate::sign::rfc3339((ms / 1000) as i64))
        .unwrap_or_default()
}

fn s(v: &Value) -> &str {
    v.as_str().unwrap_or("")
}

use crate::ops::page::ago;

fn rate(v: &Value) -> String {
    v.as_f64()
        .map(|r| format!("{:.0}%", r * 100.0))
        .unwrap_or_else(|| "-".into())
}

/// `perkflow status`: the connectors' health as a table. Ok(false) if any is not ok.
pub fn status(admin: AdminClient, json: bool) -> anyhow::Result<bool> {
    let r = admin.get("/api/connectors", &[])?;
    let rows = r["connectors"].as_array().cloned().unwrap_or_default();
    let all_ok = rows.iter().all(|c| c["state"] == "ok") && r["config_error"].is_null();
    if json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(all_ok);
    }
    let now = r["now_ms"].as_u64().unwrap_or(0);
    println!(
        "{:<6} {:<14} {:<15} {:<20} {:>5} {:>5} {:>6} {:>9} {:>5} {:<12} {:<12} LAST FAILURE",
        "KIND",
        "NAME",
        "CONNECTOR",
        "STATE",
        "5M",
        "1H",
        "QUEUE",
        "OVERDUE",
        "DEAD",
        "LAST OK",
        "FAILED"
    );
    for c in &rows {
        let num = |v: &Value| {
            v.as_u64()
                .map(|n| n.to_string())
                .unwrap_or_else(|| "-".into())
        };
        let overdue = c["oldest_overdue_ms"]
            .as_u64()
            .map(|ms| {
                if ms == 0 {
                    "0".into()
                } else {
                    humantime::format_duration(std::time::Duration::from_secs(ms / 1000))
                        .to_string()
                }
            })
            .unwrap_or_else(|| "-".into());
        println!(
            "{:<6} {:<14} {:<15} {:<20} {:>5} {:>5} {:>6} {:>9} {:>5} {:<12} {:<12} {}",
            s(&c["kind"]),
            s(&c["name"]),
            s(&c["connector"]),
            s(&c["state"]),
            rate(&c["success_rate_5m"]),
            rate(&c["success_rate_1h"]),
            num(&c["queue_depth"]),
            overdue,
            num(&c["dead_letters"]),
            ago(now, c["last_success_ms"].as_u64()),
            ago(now, c["last_failure_ms"].as_u64()),
            s(&c["last_failure_reason"])
        );
    }
    println!(
        "{} events waiting for their pipelines; store {} MiB",
        r["events_pending"].as_u64().unwrap_or(0),
        r["store_bytes"].as_u64().unwrap_or(0) / (1 << 20)
    );
    if r["queue_counts_truncated"].as_bool() == Some(true) {
        println!(
            "the backlog is large: queue and dead-letter counts stop at {} index entries and are lower bounds",
            crate::outbox::STATS_SCAN_LIMIT
        );
    }
    if let Some(e) = r["config_error"].as_str() {
        println!(
            "the last configuration reload was refused (the previous one keeps running):\n{e}"
        );
    }
    Ok(all_ok)
}

pub fn events(command: EventsCommand) -> anyhow::Result<()> {
    match command {
        EventsCommand::List {
            admin,
            source,
            event_type,
            limit,
            before,
            outcome,
        } => {
            let mut q = vec![("limit", limit.to_string())];
            q.extend(source.map(|s| ("source", s)));
            q.extend(event_type.map(|t| ("type", t)));
            q.extend(before.map(|b| ("before", b)));
            q.extend(outcome.map(|o| ("outcome", o)));
            let page = admin.get("/api/events", &q)?;
            let rows = page["events"].as_array().cloned().unwrap_or_default();
            println!(
                "{:<20} {:<20} {:<14} {:<28} {:<9} VENDOR ID",
                "ID", "RECEIVED", "SOURCE", "TYPE", "STATE"
            );
            for e in &rows {
                let runs = e["runs"].as_array().cloned().unwrap_or_default();
                let failed = runs.iter().filter(|r| r["outcome"] == "failed").count();
                let state = if e["pending"].as_bool().unwrap_or(false) {
                    "pending".to_string()
                } else if failed > 0 {
                    format!("failed:{failed}")
                } else {
                    "processed".to_string()
                };
                println!(
                    "{:<20} {:<20} {:<14} {:<28} {:<9} {}",
                    s(&e["id"]),
                    time(e["received_at_ms"].as_u64()),
                    s(&e["source"]),
                    s(&e["event_type"]),
                    state,
                    s(&e["vendor_id"])
                );
            }
            match page["next"].as_str() {
                Some(next) => println!(
                    "{} events shown; more: perkflow events list --before {next}",
                    rows.len()
                ),
                None => println!("{} events", rows.len()),
            }
            Ok(())
        }
        EventsCommand::Show { id, admin, json } => {
            let ev = admin.get(&format!("/api/events/{id}"), &[])?;
            if json {
                println!("{}", serde_json::to_string_pretty(&ev)?);
                return Ok(());
            }
            println!(
                "event {}  {} {}  vendor id {}  received {}",
                s(&ev["id"]),
                s(&ev["source"]),
                s(&ev["event_type"]),
                s(&ev["vendor_id"]),
                time(ev["received_at_ms"].as_u64())
            );
            for run in ev["trace"].as_array().into_iter().flatten() {
                println!(
                    "  pipeline {}: {}{}",
                    s(&run["pipeline"]),
                    s(&run["outcome"]["outcome"]),
                    run["outcome"]["error"]
                        .as_str()
                        .map(|e| format!(" ({e})"))
                        .unwrap_or_default()
                );
            }
            for job in ev["jobs"].as_array().into_iter().flatten() {
                print_job(job, "  ");
            }
            println!("(--json for the payload and every step's values)");
            Ok(())
        }
        EventsCommand::Replay {
            id,
            admin,
            yes,
            resend_delivered,
        } => {
            let r = admin.post(
                &format!("/api/events/{id}/replay"),
                json!({ "confirm": yes, "resend_delivered": resend_delivered }),
            )?;
            println!(
                "{:<8} {:<10} {:<24} {:<12} KEY",
                "SENDS", "CHANGE", "TO", "NOW"
            );
            for c in r["changes"].as_array().into_iter().flatten() {
                println!(
                    "{:<8} {:<10} {:<24} {:<12} {}",
                    if c["sends"].as_bool().unwrap_or(false) {
                        "yes"
                    } else {
                        "no"
                    },
                    s(&c["change"]),
                    s(&c["to"]),
                    c["state"].as_str().unwrap_or("-"),
                    s(&c["key"])
                );
                if s(&c["change"]) == "changed" {
                    println!("         before: {}", c["with_before"]);
                    println!("         after:  {}", c["with_after"]);
                }
            }
            if yes {
                println!("{} actions queued", r["queued"]);
            } else {
                println!("dry run: nothing sent; add --yes to queue the actions marked `yes`");
            }
            Ok(())
        }
    }
}

fn print_job(job: &Value, indent: &str) {
    println!(
        "{indent}{}.{}  {}  attempts {}  key {}{}",
        s(&job["sink"]),
        s(&job["action"]),
        s(&job["state"]),
        job["attempts"],
        s(&job["key"]),
        job["vendor_id"]
            .as_str()
            .map(|v| format!("  vendor id {v}"))
            .unwrap_or_default()
    );
    if let Some(r) = job["reason"].as_str() {
        println!("{indent}  reason: {r}");
    }
    for a in job["log"].as_array().into_iter().flatten() {
        println!(
            "{indent}  {}  {:<9} {:>5}  {:>6} ms{}{}",
            time(a["at_ms"].as_u64()),
            s(&a["outcome"]),
            a["status"]
                .as_u64()
                .map(|x| x.to_string())
                .unwrap_or_else(|| "-".into()),
            a["latency_ms"],
            if a["reconciled"].as_bool().unwrap_or(false) {
                "  (reconciled)"
            } else {
                ""
            },
            a["reason"]
                .as_str()
                .map(|r| format!("  {r}"))
                .unwrap_or_default()
        );
    }
}

pub fn dlq(command: DlqCommand) -> anyhow::Result<()> {
    match command {
        DlqCommand::List {
            admin,
            filter,
            limit,
        } => {
            let mut q = vec![("limit", limit.to_string())];
            q.extend(filter.sink.map(|v| ("sink", v)));
            q.extend(filter.reason.map(|v| ("reason", v)));
            q.extend(filter.since.map(|v| ("since", v)));
            q.extend(filter.until.map(|v| ("until", v)));
            let r = admin.get("/api/dlq", &q)?;
            let rows = r["dead_letters"].as_array().cloned().unwrap_or_default();
            println!(
                "{:<20} {:<24} {:<36} {:<20} REASON",
                "DEAD SINCE", "TO", "KEY", "EVENT"
            );
            for j in &rows {
                println!(
                    "{:<20} {:<24} {:<36} {:<20} {}",
                    time(j["finished_at_ms"].as_u64()),
                    format!("{}.{}", s(&j["sink"]), s(&j["action"])),
                    s(&j["key"]),
                    s(&j["event_id"]),
                    s(&j["reason"])
                );
            }
            println!("{} dead letters", rows.len());
            Ok(())
        }
        DlqCommand::Show { key, admin } => {
            let j = admin.get(&format!("/api/dlq/{key}"), &[])?;
            print_job(&j, "");
            println!("with: {}", j["with"]);
            Ok(())
        }
        DlqCommand::Replay {
            key,
            admin,
            filter,
            all,
        } => change(key, admin, filter, all, "replay"),
        DlqCommand::Drop {
            key,
            admin,
            filter,
            all,
        } => change(key, admin, filter, all, "drop"),
    }
}

fn change(
    key: Option<String>,
    admin: AdminClient,
    filter: DlqFilter,
    all: bool,
    verb: &str,
) -> anyhow::Result<()> {
    let r = match key {
        Some(k) => admin.post(&format!("/api/dlq/{k}/{verb}"), json!({}))?,
        None => {
            if filter.is_empty() && !all {
                anyhow::bail!(
                    "name a job key, a filter (--sink, --reason, --since, --until) or --all"
                );
            }
            admin.post(&format!("/api/dlq/{verb}"), filter.body(all))?
        }
    };
    let n = r["replayed"]
        .as_u64()
        .or(r["dropped"].as_u64())
        .unwrap_or(0);
    println!(
        "{n} dead letters {}",
        if verb == "replay" {
            "replayed"
        } else {
            "dropped"
        }
    );
    Ok(())
}
