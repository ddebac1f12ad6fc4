//! `perkflow schedules …` and `perkflow reports …`: the loyalty side of the admin API from
//! the command line.

use crate::ops::client::AdminClient;
use crate::reports::{PointsRow, RewardsRow};
use clap::Subcommand;
use serde_json::{json, Value};

#[derive(Subcommand, Debug)]
pub enum SchedulesCommand {
    /// Each scheduled pipeline: pattern, next and last fire, and the run under way.
    List {
        #[command(flatten)]
        admin: AdminClient,
    },
    /// Run a scheduled pipeline now (a campaign send): an event per matching member. A run
    /// survives restarts and never sends a member's message twice.
    Run {
        pipeline: String,
        #[command(flatten)]
        admin: AdminClient,
    },
}

#[derive(Subcommand, Debug)]
pub enum ReportsCommand {
    /// Points issued, released, redeemed, expired, reversed and adjusted, per period and
    /// source.
    Points {
        #[command(flatten)]
        range: ReportRange,
    },
    /// Rewards (sink actions) per period, sink, action and state.
    Rewards {
        #[command(flatten)]
        range: ReportRange,
    },
}

#[derive(clap::Args, Debug)]
pub struct ReportRange {
    #[command(flatten)]
    admin: AdminClient,
    /// day, week (ISO) or month, in UTC.
    #[arg(long, default_value = "day", value_parser = ["day", "week", "month"])]
    period: String,
    /// From: RFC 3339 time or a duration ago (`30d`).
    #[arg(long)]
    since: Option<String>,
    /// Until (excluded): RFC 3339 time or a duration ago.
    #[arg(long)]
    until: Option<String>,
    /// table, csv (with a header line; for spreadsheets) or json.
    #[arg(long, default_value = "table", value_parser = ["table", "csv", "json"])]
    format: String,
}

fn ms(v: &Value) -> String {
    v.as_u64()
        .map(|ms| crate::sign::rfc3339((ms / 1000) as i64))
        .unwrap_or_else(|| "-".into())
}

pub fn schedules(command: SchedulesCommand) -> anyhow::Result<()> {
    match command {
        SchedulesCommand::List { admin } => {
            let r = admin.get("/api/schedules", &[])?;
            let list = r["schedules"].as_array().cloned().unwrap_or_default();
            if list.is_empty() {
                println!("no scheduled pipelines");
            }
            for s in list {
                let run = match &s["run"] {
                    Value::Null => "idle".to_string(),
                    r => format!("running: {} events so far", r["emitted"]),
                };
                println!(
                    "{}  cron {:?} ({})  members: {}  next {}  last {}  {run}",
                    s["pipeline"].as_str().unwrap_or(""),
                    s["cron"].as_str().unwrap_or(""),
                    s["tz"].as_str().unwrap_or(""),
                    s["members"].as_str().unwrap_or(""),
                    ms(&s["next_fire_ms"]),
                    ms(&s["last_fire_ms"]),
                );
            }
            Ok(())
        }
        SchedulesCommand::Run { pipeline, admin } => {
            admin.post(&format!("/api/schedules/{pipeline}/run"), json!({}))?;
            println!("started a run of `{pipeline}`; `perkflow schedules list` shows its progress");
            Ok(())
        }
    }
}

pub fn reports(command: ReportsCommand) -> anyhow::Result<()> {
    let (path, r) = match &command {
        ReportsCommand::Points { range } => ("/api/reports/points", range),
        ReportsCommand::Rewards { range } => ("/api/reports/rewards", range),
    };
    let mut q = vec![("period", r.period.clone())];
    if let Some(s) = &r.since {
        q.push(("since", s.clone()));
    }
    if let Some(u) = &r.until {
        q.push(("until", u.clone()));
    }
    let body = r.admin.get(path, &q)?;
    if r.format == "json" {
        println!("{}", serde_json::to_string_pretty(&body)?);
        return Ok(());
    }
    let rows = body["rows"].clone();
    let (csv, lines) = match command {
        ReportsCommand::Points { .. } => {
            let rows: Vec<PointsRow> = serde_json::from_value(rows)?;
            let lines: Vec<String> = rows
                .iter()
                .map(|r| {
                    format!(
                        "{:<10}  {:<12}  {:<9}  {:>10}  {:>7}",
                        r.period, r.source, r.kind, r.points, r.entries
                    )
                })
                .collect();
            (
                crate::reports::to_csv(&rows),
                (
                    format!(
                        "{:<10}  {:<12}  {:<9}  {:>10}  {:>7}",
                        "PERIOD", "SOURCE", "KIND", "POINTS", "ENTRIES"
                    ),
                    lines,
                ),
            )
        }
        ReportsCommand::Rewards { .. } => {
            let rows: Vec<RewardsRow> = serde_json::from_value(rows)?;
            let lines: Vec<String> = rows
                .iter()
                .map(|r| {
                    format!(
                        "{:<10}  {:<12}  {:<16}  {:<10}  {:>7}",
                        r.period, r.sink, r.action, r.state, r.count
                    )
                })
                .collect();
            (
                crate::reports::to_csv(&rows),
                (
                    format!(
                        "{:<10}  {:<12}  {:<16}  {:<10}  {:>7}",
                        "PERIOD", "SINK", "ACTION", "STATE", "COUNT"
                    ),
                    lines,
                ),
            )
        }
    };
    if r.format == "csv" {
        print!("{}", csv.map_err(anyhow::Error::msg)?);
        return Ok(());
    }
    let (header, lines) = lines;
    if lines.is_empty() {
        println!("nothing in that range");
        return Ok(());
    }
    println!("{header}");
    for l in lines {
        println!("{l}");
    }
    Ok(())
}
